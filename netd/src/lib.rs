//! netd: Kubernetes Services without iptables, IPVS or eBPF. A TUN device owns the service
//! CIDR; smoltcp terminates every TCP connection and UDP datagram sent to a ClusterIP:port;
//! netd picks a ready endpoint and splices the flow to it over ordinary host sockets. It also
//! answers cluster DNS on a service IP and counts connections, bytes and errors per service.
//!
//! ```text
//!  pod / host ──▶ kernel route SERVICE_CIDR dev outpost-svc ──▶ TUN ──▶ smoltcp ─┐
//!                                                                              splice
//!  endpoint (pod, Wasm pod, other node) ◀── host socket ◀────────────────────────┘
//! ```
//!
//! This crate owns the data path and the service table ([`table::Table`], built from Service
//! and EndpointSlice objects). It does not watch the API: the node agent feeds it tables from
//! its link (or its cache, offline) through [`Netd::update`].

// The TUN device and socket options need a few calls into libc.
#![allow(unsafe_code)]

pub mod dns;
mod stack;
pub mod table;

pub use stack::{MemTun, Tun};

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use table::{Metrics, Table};

/// The TUN device's MTU: as large as the kernel allows, so that a bulk transfer crosses the
/// device in 64 KiB packets, as it would over loopback.
pub const MTU: usize = 65_535;
/// The device netd creates unless told otherwise.
pub const DEVICE: &str = "outpost-svc";

#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    #[error("another netd already serves this network namespace (device {0} is busy)")]
    Busy(String),
    #[error("creating the TUN device {device}: {why}")]
    Device { device: String, why: String },
    #[error("routing {cidr} to {device}: {why}")]
    Route {
        cidr: String,
        device: String,
        why: String,
    },
    #[error("netd: {0}")]
    Io(#[from] std::io::Error),
}

/// Cluster DNS settings.
#[derive(Debug, Clone)]
pub struct Dns {
    /// The service IP the DNS answers on (kube-dns's ClusterIP, `10.96.0.10` by default).
    pub ip: Ipv4Addr,
    /// The cluster domain, `cluster.local`.
    pub domain: String,
    /// Resolvers for names outside the cluster domain; none means they are refused.
    pub upstream: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub device: String,
    /// The service CIDR routed to the device.
    pub service_cidr: (Ipv4Addr, u8),
    pub dns: Option<Dns>,
    /// Connections (and dials, and UDP flows) at once; SYNs beyond are dropped, and clients
    /// retry.
    pub max_conns: usize,
    /// Each direction's buffer per connection, in bytes. Memory is taken as it is used.
    pub buffer: usize,
}

impl Config {
    pub fn new(service_cidr: (Ipv4Addr, u8)) -> Config {
        Config {
            device: DEVICE.into(),
            service_cidr,
            dns: None,
            max_conns: 4096,
            buffer: 256 << 10,
        }
    }
}

pub(crate) struct Shared {
    table: Mutex<Arc<Table>>,
    changed: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A running netd. Dropping it stops the loop; the device and its routes go with it.
pub struct Netd {
    shared: Arc<Shared>,
    waker: mio::Waker,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    cfg: Config,
}

impl Netd {
    /// Create the device, route the service CIDR to it, and start the loop. Fails with
    /// [`NetdError::Busy`] when another netd owns the device in this network namespace.
    pub fn start(cfg: Config) -> Result<Netd, NetdError> {
        let mut tc = tun::Configuration::default();
        tc.tun_name(&cfg.device)
            .address(Ipv4Addr::new(169, 254, 77, 1))
            .netmask(Ipv4Addr::new(255, 255, 255, 255))
            .mtu(MTU as u16)
            .up();
        let dev = tun::create(&tc).map_err(|e| {
            let why = e.to_string();
            if why.contains("busy") || why.contains("EBUSY") {
                NetdError::Busy(cfg.device.clone())
            } else {
                NetdError::Device {
                    device: cfg.device.clone(),
                    why,
                }
            }
        })?;
        let cidr = format!("{}/{}", cfg.service_cidr.0, cfg.service_cidr.1);
        let out = std::process::Command::new("ip")
            .args(["route", "replace", &cidr, "dev", &cfg.device])
            .output()
            .map_err(|e| NetdError::Route {
                cidr: cidr.clone(),
                device: cfg.device.clone(),
                why: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(NetdError::Route {
                cidr,
                device: cfg.device.clone(),
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let shared = Arc::new(Shared {
            table: Mutex::new(Arc::new(Table::default())),
            changed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), stack::WAKE)?;
        let settings = stack::Settings {
            dns: cfg.dns.clone(),
            max_conns: cfg.max_conns,
            buffer: cfg.buffer,
        };
        dev.set_nonblock()?;
        let st = stack::Stack::new(shared.clone(), poll, dev, settings)?;
        let thread = std::thread::Builder::new()
            .name("outpost-netd".into())
            .spawn(move || st.run())?;
        tracing::info!(device = %cfg.device, %cidr, dns = ?cfg.dns.as_ref().map(|d| d.ip), "netd serving services");
        Ok(Netd {
            shared,
            waker,
            thread: Some(thread),
            metrics: Arc::new(Metrics::default()),
            cfg,
        })
    }

    /// The counters tables are built against; pass them to [`Table::build`].
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Swap in a new table; connections already open keep their endpoints.
    pub fn update(&self, t: Table) {
        if let Ok(mut cur) = self.shared.table.lock() {
            *cur = Arc::new(t);
        }
        self.shared.changed.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Whether the loop has taken the table last given to [`Netd::update`]: it takes a new
    /// table before it reads the device again, so every packet from then on meets it.
    pub fn settled(&self) -> bool {
        !self.shared.changed.load(Ordering::Acquire)
    }

    /// The current table (for NodePorts and tests).
    pub fn table(&self) -> Arc<Table> {
        self.shared.table()
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Closing the device removed it and every route through it.
    }
}

/// netd's loop over a device in memory, stepped by hand, for tests and fuzz targets that
/// need no root: packets go in with [`Harness::inject`], what netd sends comes out of
/// [`Harness::sent`]. Backends are real sockets.
pub struct Harness {
    stack: stack::Stack<Arc<MemTun>>,
    tun: Arc<MemTun>,
    shared: Arc<Shared>,
    events: mio::Events,
}

impl Harness {
    pub fn new(table: Table, dns: Option<Dns>) -> Result<Harness, NetdError> {
        let shared = Arc::new(Shared {
            table: Mutex::new(Arc::new(table)),
            changed: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let tun = Arc::new(MemTun::default());
        let settings = stack::Settings {
            dns,
            max_conns: 256,
            buffer: 64 << 10,
        };
        let stack = stack::Stack::new(shared.clone(), mio::Poll::new()?, tun.clone(), settings)?;
        Ok(Harness {
            stack,
            tun,
            shared,
            events: mio::Events::with_capacity(256),
        })
    }

    pub fn inject(&self, packet: Vec<u8>) {
        if let Ok(mut rx) = self.tun.rx.lock() {
            rx.push_back(packet);
        }
    }

    /// One turn of the loop, waiting at most `wait` for backends.
    pub fn step(&mut self, wait: std::time::Duration) -> Result<(), NetdError> {
        Ok(self.stack.step(&mut self.events, Some(wait))?)
    }

    /// The packets netd sent since the last call.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.tun
            .tx
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    /// Connections, dials and UDP flows held now (never more than the limit, 256).
    pub fn held(&self) -> usize {
        self.stack.held()
    }

    pub fn set_table(&self, t: Table) {
        if let Ok(mut cur) = self.shared.table.lock() {
            *cur = Arc::new(t);
        }
        self.shared.changed.store(true, Ordering::Release);
    }
}

/// Nameservers in a resolv.conf, skipping `skip` (cluster DNS itself).
pub fn nameservers(resolv: &str, skip: Ipv4Addr) -> Vec<SocketAddr> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| *a != std::net::IpAddr::V4(skip))
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}
