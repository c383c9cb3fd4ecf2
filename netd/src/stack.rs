//! The proxy loop. One thread owns the TUN device, smoltcp's interface and sockets, and the host
//! sockets toward backends, all non-blocking under one mio poll, so a byte crosses no thread.
//!
//! ```text
//!  client ─▶ kernel ─▶ TUN ─▶ smoltcp (ClusterIP:port) ◀─ splice ─▶ host socket ─▶ backend
//! ```
//!
//! A SYN to a service is held while netd connects to an endpoint; only when that connect
//! succeeds does smoltcp see the SYN (and answer SYN-ACK), so a client learns of a refused or
//! missing backend the way it would from a kernel: an RST. Data moves between smoltcp's socket
//! buffers and the host socket only when both sides have room: a slow reader on either side
//! closes the window on the other (back-pressure). A FIN on one side becomes a `shutdown` of
//! the same direction on the other (half-close), and a reset becomes a reset.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet,
    TcpPacket,
};

use crate::dns::{self, Reply};
use crate::table::{Port, Proto, Table};
use crate::{Shared, MTU};

const TUN: Token = Token(0);
pub(crate) const WAKE: Token = Token(1);
const UPSTREAM: Token = Token(2);
const FIRST: usize = 16;

/// Tries before a connection is refused when endpoints refuse it.
const TRIES: usize = 3;
/// A held SYN whose backend has not answered in this long is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle UDP flows are forgotten after this long.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// A forwarded DNS query unanswered for this long is forgotten.
const DNS_WAIT: Duration = Duration::from_secs(5);
/// DNS queries in flight upstream at once.
const DNS_INFLIGHT: usize = 1024;
/// DNS-over-TCP clients at once (each holds 192 KiB of buffers for up to a minute).
const MAX_DNS_TCP: usize = 64;
/// Packets read from the TUN device before the loop serves the rest.
const BATCH: usize = 64;

/// The TUN device as smoltcp sees it: packets the loop has read and classified wait in `rx`;
/// packets smoltcp sends are written straight to the device.
/// What the loop needs of its device: whole IPv4 packets in and out, without blocking. The
/// real one is a TUN device; [`MemTun`] is one in memory for tests and fuzzing.
pub trait Tun: Send + 'static {
    /// One packet, or `WouldBlock` when none waits.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// The descriptor the loop waits on; `None` for a device that is stepped by hand.
    fn fd(&self) -> Option<RawFd>;
}

impl Tun for tun::Device {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        tun::Device::recv(self, buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        tun::Device::send(self, buf)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// A device in memory: packets pushed to `rx` are read by the loop, packets it sends land in
/// `tx`.
#[derive(Default)]
pub struct MemTun {
    pub rx: std::sync::Mutex<VecDeque<Vec<u8>>>,
    pub tx: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Tun for Arc<MemTun> {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let p = self
            .rx
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .pop_front()
            .ok_or(ErrorKind::WouldBlock)?;
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut tx) = self.tx.lock() {
            if tx.len() < 4096 {
                tx.push(buf.to_vec());
            }
        }
        Ok(buf.len())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

struct Dev<T> {
    tun: T,
    /// Packets for smoltcp: a buffer and the packet's length in it. Buffers read from the
    /// device are MTU-sized and go back to `pool`, so no read zeroes or reallocates one.
    rx: VecDeque<(Vec<u8>, usize)>,
    pool: Vec<Vec<u8>>,
    tx: Vec<u8>,
}

struct Rx<'a> {
    buf: Vec<u8>,
    len: usize,
    pool: &'a mut Vec<Vec<u8>>,
}

struct Tx<'a, T> {
    tun: &'a T,
    buf: &'a mut Vec<u8>,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[..self.len]);
        if self.buf.len() == MTU && self.pool.len() < 256 {
            self.pool.push(self.buf);
        }
        r
    }
}

impl<T: Tun> phy::TxToken for Tx<'_, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let r = f(&mut self.buf[..len]);
        // The kernel takes a whole packet or none; a full queue drops it, as a wire would.
        let _ = self.tun.send(&self.buf[..len]);
        r
    }
}

impl<T: Tun> phy::Device for Dev<T> {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a, T>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx<'_>, Tx<'_, T>)> {
        let (buf, len) = self.rx.pop_front()?;
        Some((
            Rx {
                buf,
                len,
                pool: &mut self.pool,
            },
            Tx {
                tun: &self.tun,
                buf: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_, T>> {
        Some(Tx {
            tun: &self.tun,
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // Packets from the TUN device come from this machine's kernel, which computed their
        // checksums; verifying them again would only cost time. Ours are computed: the
        // kernel checks them.
        let mut sums = ChecksumCapabilities::default();
        sums.ipv4 = Checksum::Tx;
        sums.tcp = Checksum::Tx;
        sums.udp = Checksum::Tx;
        sums.icmpv4 = Checksum::Tx;
        caps.checksum = sums;
        caps
    }
}

type Flow = (SocketAddrV4, SocketAddrV4);

enum Slot {
    /// A SYN held while a backend is dialled.
    Dialing {
        stream: TcpStream,
        syn: Vec<u8>,
        flow: Flow,
        port: Arc<Port>,
        backend: SocketAddr,
        tried: Vec<SocketAddr>,
        since: std::time::Instant,
    },
    Open(Conn),
    Udp(UdpFlow),
    /// A DNS-over-TCP client, answered here: two-byte length, message, as many as it asks.
    DnsTcp {
        handle: SocketHandle,
        buf: Vec<u8>,
        since: std::time::Instant,
    },
}

struct Conn {
    handle: SocketHandle,
    flow: Flow,
    /// The client's FIN has arrived (its last bytes may still wait in smoltcp's buffer).
    fin_seen: bool,
    stream: TcpStream,
    port: Arc<Port>,
    readable: bool,
    writable: bool,
    /// The client's FIN has been passed on (`shutdown(Write)` of the host socket).
    up_done: bool,
    /// The backend's EOF has been passed on (smoltcp `close`, a FIN after the data).
    down_done: bool,
    /// Something reset the connection; the other side gets a reset too.
    reset: bool,
}

struct UdpFlow {
    sock: UdpSocket,
    client: IpEndpoint,
    frontend: (Ipv4Addr, u16),
    port: Arc<Port>,
    backend: SocketAddr,
    last: std::time::Instant,
}

pub struct Settings {
    pub dns: Option<crate::Dns>,
    pub max_conns: usize,
    pub buffer: usize,
}

pub struct Stack<T: Tun> {
    shared: Arc<Shared>,
    poll: Poll,
    dev: Dev<T>,
    iface: Interface,
    sockets: SocketSet<'static>,
    table: Arc<Table>,
    settings: Settings,
    epoch: std::time::Instant,
    last_sweep: std::time::Instant,
    tun_ready: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    dialing: HashMap<Flow, usize>,
    udp_flows: HashMap<(IpEndpoint, Ipv4Addr, u16), usize>,
    udp_fronts: HashMap<(Ipv4Addr, u16), SocketHandle>,
    dns_sock: Option<SocketHandle>,
    upstream: Option<UdpSocket>,
    inflight: HashMap<u16, (IpEndpoint, u16, std::time::Instant)>,
    next_id: u16,
}

impl<T: Tun> Stack<T> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        poll: Poll,
        tun: T,
        settings: Settings,
    ) -> std::io::Result<Stack<T>> {
        if let Some(fd) = tun.fd() {
            poll.registry()
                .register(&mut SourceFd(&fd), TUN, Interest::READABLE)?;
        }
        let mut dev = Dev {
            tun,
            rx: VecDeque::new(),
            pool: Vec::new(),
            tx: vec![0; MTU],
        };
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_millis(0),
        );
        // Every address routed to the device is ours: the whole service CIDR.
        iface.set_any_ip(true);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(169, 254, 77, 1), 32));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let dns_sock = match &settings.dns {
            Some(d) => {
                let mut s = udp::Socket::new(
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0; 1 << 16]),
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0; 1 << 16]),
                );
                s.bind(IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(d.ip)),
                    port: 53,
                })
                .map_err(|e| std::io::Error::other(format!("binding cluster DNS: {e}")))?;
                Some(sockets.add(s))
            }
            None => None,
        };
        let upstream = match settings.dns.as_ref().map(|d| d.upstream.is_empty()) {
            Some(false) => {
                let mut u = UdpSocket::bind("0.0.0.0:0".parse().map_err(std::io::Error::other)?)?;
                poll.registry()
                    .register(&mut u, UPSTREAM, Interest::READABLE)?;
                Some(u)
            }
            _ => None,
        };
        let table = shared.table();
        Ok(Stack {
            shared,
            poll,
            dev,
            iface,
            sockets,
            table,
            settings,
            epoch: std::time::Instant::now(),
            last_sweep: std::time::Instant::now(),
            tun_ready: true,
            slots: Vec::new(),
            free: Vec::new(),
            dialing: HashMap::new(),
            udp_flows: HashMap::new(),
            udp_fronts: HashMap::new(),
            dns_sock,
            upstream,
            inflight: HashMap::new(),
            next_id: 1,
        })
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        self.sync_udp_fronts();
        while !self.shared.stop.load(Ordering::Acquire) {
            if let Err(e) = self.step(&mut events, None) {
                tracing::error!(error = %e, "netd: polling");
                return;
            }
        }
    }

    /// One turn of the loop: take a new table, read the device, let smoltcp and the splices
    /// run, then wait for something to do, at most `max_wait` (smoltcp's next timer
    /// otherwise, and never more than a second).
    pub fn step(&mut self, events: &mut Events, max_wait: Option<Duration>) -> std::io::Result<()> {
        if self.shared.changed.swap(false, Ordering::AcqRel) {
            self.table = self.shared.table();
            self.sync_udp_fronts();
            self.drop_stale_udp_flows();
        }
        if self.tun_ready {
            self.read_tun();
        }
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.serve_dns();
        self.serve_udp();
        self.pump_all();
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        if self.last_sweep.elapsed() > Duration::from_secs(1) {
            self.last_sweep = std::time::Instant::now();
            self.sweep();
        }
        let timeout = if self.tun_ready {
            Duration::ZERO
        } else {
            self.iface
                .poll_delay(now, &self.sockets)
                .map_or(Duration::from_secs(1), |d| {
                    Duration::from_micros(d.total_micros())
                })
                .min(Duration::from_secs(1))
        };
        let timeout = max_wait.map_or(timeout, |m| m.min(timeout));
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if self.dev.tun.fd().is_none() {
            // A device in memory has no descriptor to wake us: always look.
            self.tun_ready = true;
        }
        for ev in events.iter() {
            match ev.token() {
                TUN => self.tun_ready = true,
                WAKE => {}
                UPSTREAM => self.upstream_answers(),
                Token(t) => self.on_event(
                    t - FIRST,
                    ev.is_readable() || ev.is_error() || ev.is_read_closed(),
                    ev.is_writable() || ev.is_error(),
                ),
            }
        }
        Ok(())
    }

    /// Read up to a batch of packets; SYNs to services are held while a backend is dialled.
    fn read_tun(&mut self) {
        for _ in 0..BATCH {
            let mut buf = self.dev.pool.pop().unwrap_or_else(|| vec![0; MTU]);
            match self.dev.tun.recv(&mut buf) {
                Ok(n) => {
                    if self.classify(&buf[..n]) {
                        self.dev.rx.push_back((buf, n));
                    } else {
                        self.dev.pool.push(buf);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.tun_ready = false;
                    self.dev.pool.push(buf);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "netd: reading the TUN device");
                    self.tun_ready = false;
                    return;
                }
            }
        }
    }

    /// Whether `buf` goes on to smoltcp; `false` when the loop keeps a copy (a SYN being
    /// dialled) or drops it.
    fn classify(&mut self, buf: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(buf) else {
            // Not IPv4 (or not whole): nothing of ours.
            return false;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return true;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return false;
        };
        if !tcp.syn() || tcp.ack() || tcp.rst() {
            return true;
        }
        let flow = (
            SocketAddrV4::new(src, tcp.src_port()),
            SocketAddrV4::new(dst, tcp.dst_port()),
        );
        if let Some(&i) = self.dialing.get(&flow) {
            // The client repeats its SYN: while it is dialled, drop it; once open, smoltcp
            // answers it on the connection's own socket.
            return matches!(self.slots.get(i), Some(Some(Slot::Open(_))));
        }
        if tcp.dst_port() == 53 && self.settings.dns.as_ref().is_some_and(|d| d.ip == dst) {
            // DNS over TCP is answered here; any listener on the address is as good as another.
            let dns_conns = self
                .slots
                .iter()
                .filter(|s| matches!(s, Some(Slot::DnsTcp { .. })))
                .count();
            if self.live() < self.settings.max_conns && dns_conns < MAX_DNS_TCP {
                let mut sock = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 1 << 16]),
                    tcp::SocketBuffer::new(vec![0; 1 << 17]),
                );
                sock.set_nagle_enabled(false);
                sock.set_ack_delay(None);
                sock.set_timeout(Some(smoltcp::time::Duration::from_secs(30)));
                if sock
                    .listen(IpListenEndpoint {
                        addr: Some(IpAddress::Ipv4(dst)),
                        port: 53,
                    })
                    .is_ok()
                {
                    let handle = self.sockets.add(sock);
                    self.alloc(Slot::DnsTcp {
                        handle,
                        buf: Vec::new(),
                        since: std::time::Instant::now(),
                    });
                }
            }
            return true;
        }
        let Some(port) = self
            .table
            .frontends
            .get(&(dst, tcp.dst_port(), Proto::Tcp))
            .cloned()
        else {
            return true; // smoltcp answers RST
        };
        if self.live() >= self.settings.max_conns {
            // Full: drop it; the client will try again.
            return false;
        }
        match port.pick(IpAddr::V4(src), std::time::Instant::now()) {
            Some(b) => {
                self.dial(buf.to_vec(), flow, port, b, Vec::new());
                false
            }
            None => {
                port.counters.errors.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    pub fn held(&self) -> usize {
        self.live()
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn alloc(&mut self, s: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        }
    }

    fn dial(
        &mut self,
        syn: Vec<u8>,
        flow: Flow,
        port: Arc<Port>,
        backend: SocketAddr,
        tried: Vec<SocketAddr>,
    ) {
        let stream = match TcpStream::connect(backend) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %backend, "netd: dialling");
                return self.refused(syn, flow, port, backend, tried);
            }
        };
        let _ = stream.set_nodelay(true);
        let i = self.alloc(Slot::Dialing {
            stream,
            syn,
            flow,
            port,
            backend,
            tried,
            since: std::time::Instant::now(),
        });
        if let Some(Some(Slot::Dialing { stream, .. })) = self.slots.get_mut(i) {
            if self
                .poll
                .registry()
                .register(
                    stream,
                    Token(FIRST + i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                self.slots[i] = None;
                self.free.push(i);
                return;
            }
        }
        self.dialing.insert(flow, i);
    }

    /// `backend` refused: try another, or refuse the client.
    fn refused(
        &mut self,
        syn: Vec<u8>,
        flow: Flow,
        port: Arc<Port>,
        backend: SocketAddr,
        mut tried: Vec<SocketAddr>,
    ) {
        tried.push(backend);
        if tried.len() < TRIES {
            if let Some(b) =
                port.pick_except(IpAddr::V4(*flow.0.ip()), std::time::Instant::now(), &tried)
            {
                return self.dial(syn, flow, port, b, tried);
            }
        }
        port.counters.errors.fetch_add(1, Ordering::Relaxed);
        // With no socket listening, smoltcp answers the SYN with an RST.
        let n = syn.len();
        self.dev.rx.push_back((syn, n));
    }

    fn on_event(&mut self, i: usize, readable: bool, writable: bool) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        match slot {
            Some(Slot::Open(c)) => {
                c.readable |= readable;
                c.writable |= writable;
            }
            Some(Slot::Dialing { stream, .. }) => {
                let done = match stream.take_error() {
                    Ok(Some(_)) | Err(_) => Some(false),
                    Ok(None) => match stream.peer_addr() {
                        Ok(_) => Some(true),
                        Err(e) if e.kind() == ErrorKind::NotConnected => None,
                        Err(_) => Some(false),
                    },
                };
                if let Some(ok) = done {
                    self.dialed(i, ok);
                }
            }
            Some(Slot::Udp(_)) => self.udp_back(i),
            Some(Slot::DnsTcp { .. }) | None => {}
        }
    }

    /// A dial finished: open the client's side, or try again.
    fn dialed(&mut self, i: usize, ok: bool) {
        if !ok {
            return self.dial_failed(i);
        }
        let Some(Slot::Dialing {
            stream,
            syn,
            flow,
            port,
            ..
        }) = self.slots[i].take()
        else {
            return;
        };
        let n = self.settings.buffer;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; n]),
            tcp::SocketBuffer::new(vec![0; n]),
        );
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        sock.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
        let listen = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*flow.1.ip())),
            port: flow.1.port(),
        };
        if sock.listen(listen).is_err() {
            self.dialing.remove(&flow);
            self.free.push(i);
            return;
        }
        let handle = self.sockets.add(sock);
        port.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.slots[i] = Some(Slot::Open(Conn {
            handle,
            flow,
            fin_seen: false,
            stream,
            port,
            readable: true,
            writable: true,
            up_done: false,
            down_done: false,
            reset: false,
        }));
        // Only this SYN may meet the new listener: hand it over and let smoltcp take it now,
        // before any other SYN to the same service is handed over.
        let n = syn.len();
        self.dev.rx.push_front((syn, n));
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    /// A dial failed or timed out: try another endpoint, or refuse the client.
    fn dial_failed(&mut self, i: usize) {
        let Some(Slot::Dialing {
            mut stream,
            syn,
            flow,
            port,
            backend,
            tried,
            ..
        }) = self.slots[i].take()
        else {
            return;
        };
        self.dialing.remove(&flow);
        let _ = self.poll.registry().deregister(&mut stream);
        self.free.push(i);
        self.refused(syn, flow, port, backend, tried);
    }

    fn pump_all(&mut self) {
        for i in 0..self.slots.len() {
            match self.slots[i] {
                Some(Slot::Open(_)) => self.pump(i),
                Some(Slot::DnsTcp { .. }) => self.pump_dns(i),
                _ => {}
            }
        }
    }

    /// Answer what a DNS-over-TCP client has sent whole; free it once it has gone.
    fn pump_dns(&mut self, i: usize) {
        let Some(Some(Slot::DnsTcp { handle, buf, since })) = self.slots.get_mut(i) else {
            return;
        };
        let sock = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
        use tcp::State::*;
        let state = sock.state();
        if since.elapsed() > Duration::from_secs(60) && state != Closed {
            // A DNS client has had its minute: free the slot (an RST if it is still there).
            sock.abort();
            return;
        }
        if matches!(state, Closed | TimeWait) {
            let h = *handle;
            self.sockets.remove(h);
            self.slots[i] = None;
            self.free.push(i);
            return;
        }
        while sock.can_recv() && buf.len() < (1 << 16) + 2 {
            let _ = sock.recv(|d| {
                let n = d.len().min((1 << 16) + 2 - buf.len());
                buf.extend_from_slice(&d[..n]);
                (n, ())
            });
        }
        let Some(d) = self.settings.dns.as_ref() else {
            return;
        };
        while buf.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + n {
                break;
            }
            match dns::answer_tcp(&buf[2..2 + n], &self.table, &d.domain) {
                Reply::Answer(a) if sock.send_capacity() - sock.send_queue() >= a.len() + 2 => {
                    let _ = sock.send_slice(&(a.len() as u16).to_be_bytes());
                    let _ = sock.send_slice(&a);
                }
                Reply::Answer(_) => break, // no room yet: answer once the client has read
                Reply::Forward | Reply::Drop => sock.abort(),
            }
            buf.drain(..2 + n);
        }
        if matches!(state, CloseWait) && buf.len() < 2 {
            sock.close();
        }
    }

    /// Move what both sides have room for, pass on FINs and resets, and free a finished
    /// connection.
    fn pump(&mut self, i: usize) {
        let Some(Some(Slot::Open(c))) = self.slots.get_mut(i) else {
            return;
        };
        let sock = self.sockets.get_mut::<tcp::Socket<'_>>(c.handle);
        use tcp::State::*;
        let state = sock.state();
        if matches!(state, CloseWait | LastAck | Closing | TimeWait) {
            c.fin_seen = true;
        }
        // The SYN was handed over and polled when the connection opened: a socket still (or,
        // after an RST in the handshake, again) listening has no client. Closed without the
        // client's FIN is a reset (or smoltcp's timeout), passed on as one.
        let dead = state == Listen || (state == Closed && !c.fin_seen) || c.reset;
        let done = matches!(state, Closed | TimeWait) && sock.recv_queue() == 0 && c.up_done;
        if dead || done {
            let clean = !dead && (c.down_done || state == TimeWait);
            let mut c = match self.slots[i].take() {
                Some(Slot::Open(c)) => c,
                _ => return,
            };
            if !clean {
                c.port.counters.errors.fetch_add(1, Ordering::Relaxed);
                let _ = socket_linger_zero(&c.stream);
            }
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.sockets.remove(c.handle);
            self.dialing.remove(&c.flow);
            self.free.push(i);
            return;
        }
        if matches!(state, SynReceived | SynSent) {
            return;
        }
        // Client to backend.
        if c.writable && !c.up_done {
            while sock.can_recv() {
                let r = sock.recv(|buf| match c.stream.write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(n)) if n > 0 => {
                        c.port
                            .counters
                            .bytes_in
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => {
                        c.writable = false;
                        break;
                    }
                    Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(Err(_)) => {
                        c.reset = true;
                        sock.abort();
                        return;
                    }
                    Err(_) => break,
                }
            }
        }
        if c.fin_seen && !c.up_done && sock.recv_queue() == 0 {
            let _ = c.stream.shutdown(Shutdown::Write);
            c.up_done = true;
        }
        // Backend to client.
        if c.readable && !c.down_done {
            while sock.can_send() {
                let r = sock.send(|buf| match c.stream.read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        c.down_done = true;
                        sock.close();
                        break;
                    }
                    Ok(Ok(n)) => {
                        c.port
                            .counters
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => {
                        c.readable = false;
                        break;
                    }
                    Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(Err(_)) => {
                        c.reset = true;
                        sock.abort();
                        return;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Bind a smoltcp UDP socket to each UDP service port that has endpoints; the others are
    /// left unbound, so smoltcp answers ICMP port unreachable.
    fn sync_udp_fronts(&mut self) {
        let want: Vec<(Ipv4Addr, u16)> = self
            .table
            .frontends
            .iter()
            .filter(|((ip, port, proto), p)| {
                *proto == Proto::Udp
                    && !p.backends.is_empty()
                    && !(self.settings.dns.as_ref().is_some_and(|d| d.ip == *ip) && *port == 53)
            })
            .map(|((ip, port, _), _)| (*ip, *port))
            .collect();
        let gone: Vec<(Ipv4Addr, u16)> = self
            .udp_fronts
            .keys()
            .filter(|k| !want.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(h) = self.udp_fronts.remove(&k) {
                self.sockets.remove(h);
            }
        }
        for (ip, port) in want {
            if self.udp_fronts.contains_key(&(ip, port)) {
                continue;
            }
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 1 << 17]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 1 << 17]),
            );
            if s.bind(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(ip)),
                port,
            })
            .is_ok()
            {
                let h = self.sockets.add(s);
                self.udp_fronts.insert((ip, port), h);
            }
        }
    }

    /// UDP flows whose endpoint is no longer ready end, so the client's next datagram picks a
    /// ready one (as kube-proxy clears conntrack entries). TCP connections stay.
    fn drop_stale_udp_flows(&mut self) {
        for i in 0..self.slots.len() {
            let stale = match &self.slots[i] {
                Some(Slot::Udp(f)) => !self
                    .table
                    .frontends
                    .get(&(f.frontend.0, f.frontend.1, Proto::Udp))
                    .is_some_and(|p| p.backends.contains(&f.backend)),
                _ => false,
            };
            if !stale {
                continue;
            }
            if let Some(Slot::Udp(mut f)) = self.slots[i].take() {
                let _ = self.poll.registry().deregister(&mut f.sock);
                self.udp_flows
                    .remove(&(f.client, f.frontend.0, f.frontend.1));
                self.free.push(i);
            }
        }
    }

    /// Datagrams from clients to UDP services: each client gets a flow (a host socket
    /// connected to one endpoint) that its datagrams keep using.
    fn serve_udp(&mut self) {
        // Every turn of the loop comes here: leave at once unless a datagram waits.
        let fronts: Vec<((Ipv4Addr, u16), SocketHandle)> = self
            .udp_fronts
            .iter()
            .filter(|(_, h)| self.sockets.get::<udp::Socket<'_>>(**h).can_recv())
            .map(|(k, h)| (*k, *h))
            .collect();
        if fronts.is_empty() {
            return;
        }
        let mut buf = vec![0u8; 65_536];
        for ((ip, port), h) in fronts {
            loop {
                let sock = self.sockets.get_mut::<udp::Socket<'_>>(h);
                let Ok((n, meta)) = sock.recv_slice(&mut buf) else {
                    break;
                };
                let key = (meta.endpoint, ip, port);
                let i = match self.udp_flows.get(&key) {
                    Some(i) => *i,
                    None => {
                        let Some(p) = self.table.frontends.get(&(ip, port, Proto::Udp)).cloned()
                        else {
                            continue;
                        };
                        let client = match meta.endpoint.addr {
                            IpAddress::Ipv4(a) => IpAddr::V4(a),
                        };
                        if self.slots.len() - self.free.len() >= self.settings.max_conns {
                            p.counters.errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let Some(b) = p.pick(client, std::time::Instant::now()) else {
                            continue;
                        };
                        let Ok(bind) = "0.0.0.0:0".parse() else {
                            continue;
                        };
                        let Ok(s) = UdpSocket::bind(bind) else {
                            continue;
                        };
                        if s.connect(b).is_err() {
                            continue;
                        }
                        p.counters.connections.fetch_add(1, Ordering::Relaxed);
                        let i = self.alloc(Slot::Udp(UdpFlow {
                            sock: s,
                            client: meta.endpoint,
                            frontend: (ip, port),
                            port: p,
                            backend: b,
                            last: std::time::Instant::now(),
                        }));
                        if let Some(Some(Slot::Udp(f))) = self.slots.get_mut(i) {
                            let _ = self.poll.registry().register(
                                &mut f.sock,
                                Token(FIRST + i),
                                Interest::READABLE,
                            );
                        }
                        self.udp_flows.insert(key, i);
                        i
                    }
                };
                if let Some(Some(Slot::Udp(f))) = self.slots.get_mut(i) {
                    f.last = std::time::Instant::now();
                    match f.sock.send(&buf[..n]) {
                        Ok(_) => {
                            f.port
                                .counters
                                .bytes_in
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            f.port.counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Datagrams from a UDP flow's endpoint back to its client.
    fn udp_back(&mut self, i: usize) {
        let mut buf = [0u8; 65_536];
        let Some(Some(Slot::Udp(f))) = self.slots.get_mut(i) else {
            return;
        };
        let Some(h) = self.udp_fronts.get(&f.frontend).copied() else {
            return;
        };
        // Until WouldBlock (edge-triggered); an error (an ICMP refusal from the endpoint) is
        // counted and reading goes on (a socket reports each such error once).
        let mut errors = 0;
        loop {
            let n = match f.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) if errors < 16 => {
                    errors += 1;
                    f.port.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(_) => break,
            };
            f.last = std::time::Instant::now();
            f.port
                .counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
            let sock = self.sockets.get_mut::<udp::Socket<'_>>(h);
            let meta = udp::UdpMetadata {
                endpoint: f.client,
                local_address: Some(IpAddress::Ipv4(f.frontend.0)),
                meta: Default::default(),
            };
            if sock.send_slice(&buf[..n], meta).is_err() {
                f.port.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn serve_dns(&mut self) {
        let (Some(h), Some(d)) = (self.dns_sock, self.settings.dns.as_ref()) else {
            return;
        };
        let mut forward = Vec::new();
        {
            let sock = self.sockets.get_mut::<udp::Socket<'_>>(h);
            while let Ok((q, meta)) = sock.recv() {
                match dns::answer(q, &self.table, &d.domain, !d.upstream.is_empty()) {
                    Reply::Answer(a) => {
                        let _ = sock.send_slice(&a, meta.endpoint);
                    }
                    Reply::Forward => forward.push((q.to_vec(), meta.endpoint)),
                    Reply::Drop => {}
                }
            }
        }
        for (mut q, client) in forward {
            self.forward(&mut q, client);
        }
    }

    /// Send a query for a name outside the cluster to the upstream resolver, under an id of
    /// ours so that answers find their way back.
    fn forward(&mut self, q: &mut [u8], client: IpEndpoint) {
        let (Some(u), Some(d)) = (&self.upstream, &self.settings.dns) else {
            return;
        };
        if q.len() < 12 || self.inflight.len() >= DNS_INFLIGHT {
            return;
        }
        let orig = u16::from_be_bytes([q[0], q[1]]);
        let mut id = self.next_id;
        while self.inflight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        q[..2].copy_from_slice(&id.to_be_bytes());
        for up in &d.upstream {
            if u.send_to(q, *up).is_ok() {
                self.inflight
                    .insert(id, (client, orig, std::time::Instant::now()));
                return;
            }
        }
    }

    fn upstream_answers(&mut self) {
        let (Some(u), Some(d), Some(h)) = (&self.upstream, &self.settings.dns, self.dns_sock)
        else {
            return;
        };
        let mut buf = [0u8; 65_536];
        loop {
            let (n, from) = match u.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if n < 12 || !d.upstream.contains(&from) {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let Some((client, orig, _)) = self.inflight.remove(&id) else {
                continue;
            };
            buf[..2].copy_from_slice(&orig.to_be_bytes());
            let sock = self.sockets.get_mut::<udp::Socket<'_>>(h);
            let _ = sock.send_slice(&buf[..n], client);
        }
    }

    /// Expire what waits too long: dials, UDP flows, forwarded queries.
    fn sweep(&mut self) {
        let now = std::time::Instant::now();
        self.inflight
            .retain(|_, (_, _, at)| now.duration_since(*at) < DNS_WAIT);
        for i in 0..self.slots.len() {
            let stale = match &self.slots[i] {
                Some(Slot::Dialing { since, .. }) => now.duration_since(*since) > CONNECT_TIMEOUT,
                Some(Slot::Udp(f)) => now.duration_since(f.last) > UDP_IDLE,
                _ => false,
            };
            if !stale {
                continue;
            }
            if matches!(self.slots[i], Some(Slot::Dialing { .. })) {
                self.dial_failed(i);
                continue;
            }
            match self.slots[i].take() {
                Some(Slot::Udp(mut f)) => {
                    let _ = self.poll.registry().deregister(&mut f.sock);
                    self.udp_flows
                        .remove(&(f.client, f.frontend.0, f.frontend.1));
                    self.free.push(i);
                }
                other => self.slots[i] = other,
            }
        }
    }
}

/// Make the next close of `s` send RST.
fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `s` is an open socket for the duration of the call, and `l` is a valid
    // `linger` whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
