//! Services on this node: netd fed from the node's watch of Services and EndpointSlices (and
//! from the cache when the link is down, so ClusterIPs keep working offline), NodePorts on
//! the node's own addresses, and netd's counters over HTTP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_netd::table::{HostPort, Proto, Table};
use outpost_netd::{Config as NetdConfig, Dns, Netd, NetdError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;

use crate::cache::Cache;
use crate::link::{Change, Link};

/// Whether the node runs netd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Where it can (root and `/dev/net/tun`); say why not otherwise.
    Auto,
    /// Always; the agent fails to start if it cannot.
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err(format!("{s:?}: the service proxy is auto, on or off")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The cluster's service CIDR (the control plane's).
    pub cidr: String,
    /// The service IP cluster DNS answers on.
    pub dns: Ipv4Addr,
    pub domain: String,
    /// Where netd's counters are served (`/metrics`); `None` for nowhere.
    pub metrics: Option<SocketAddr>,
}

pub const DEFAULT_CIDR: &str = "10.96.0.0/16";
pub const DEFAULT_DNS: &str = "10.96.0.10";
pub const DEFAULT_METRICS: &str = "127.0.0.1:10249";

impl Default for Config {
    fn default() -> Config {
        Config {
            mode: Mode::Auto,
            cidr: DEFAULT_CIDR.into(),
            dns: Ipv4Addr::new(10, 96, 0, 10),
            domain: "cluster.local".into(),
            metrics: DEFAULT_METRICS.parse().ok(),
        }
    }
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 CIDR (A.B.C.D/N)");
    let (ip, bits) = s.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let bits: u8 = bits.parse().map_err(|_| bad())?;
    if bits > 32 {
        return Err(bad());
    }
    Ok((ip, bits))
}

const KINDS: [&str; 2] = ["services", "endpointslices"];

pub struct Services {
    netd: Netd,
    cfg: Config,
    /// Services and EndpointSlices by `kind/namespace/name`, as the cache holds them.
    objects: Mutex<HashMap<String, Value>>,
    changed: Notify,
    node_ports: Mutex<HashMap<(u16, Proto), tokio::task::JoinHandle<()>>>,
    /// The hostPorts of this node's pods with addresses of their own, by pod uid.
    host_ports: Mutex<HashMap<String, Vec<HostPort>>>,
}

fn key(kind: &str, o: &Value) -> Option<(String, String, String)> {
    let m = &o["metadata"];
    Some((
        format!(
            "{kind}/{}/{}",
            m["namespace"].as_str()?,
            m["name"].as_str()?
        ),
        m["namespace"].as_str()?.to_string(),
        m["name"].as_str()?.to_string(),
    ))
}

impl Services {
    /// Start netd as `cfg` says, with the table the cache holds. `Ok(None)` when the mode is
    /// off, or auto and this node cannot (the reason is logged).
    pub async fn start(cfg: &Config, cache: &Cache) -> anyhow::Result<Option<Arc<Services>>> {
        if cfg.mode == Mode::Off {
            return Ok(None);
        }
        let cidr = parse_cidr(&cfg.cidr).map_err(anyhow::Error::msg)?;
        let why_not = if !std::path::Path::new("/dev/net/tun").exists() {
            Some("there is no /dev/net/tun".to_string())
        } else if !outpost_oci_shim::run::is_root() {
            Some("netd needs root to make its TUN device and routes".to_string())
        } else {
            None
        };
        if let Some(why) = why_not {
            if cfg.mode == Mode::On {
                anyhow::bail!("the service proxy cannot run: {why}");
            }
            tracing::warn!(%why, "no service proxy: ClusterIPs and cluster DNS do not work on this node");
            return Ok(None);
        }
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let mut nc = NetdConfig::new(cidr);
        nc.dns = Some(Dns {
            ip: cfg.dns,
            domain: cfg.domain.clone(),
            upstream: outpost_netd::nameservers(&resolv, cfg.dns),
        });
        let netd = match tokio::task::spawn_blocking(move || Netd::start(nc)).await? {
            Ok(n) => n,
            Err(e @ NetdError::Busy(_)) if cfg.mode == Mode::Auto => {
                tracing::warn!(error = %e, "no service proxy of this node's own");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut objects = HashMap::new();
        for kind in KINDS {
            for o in cache.objects_of(kind) {
                if let Some((k, _, _)) = key(kind, &o) {
                    objects.insert(k, o);
                }
            }
        }
        let s = Arc::new(Services {
            netd,
            cfg: cfg.clone(),
            objects: Mutex::new(objects),
            changed: Notify::new(),
            node_ports: Mutex::default(),
            host_ports: Mutex::default(),
        });
        s.rebuild();
        tokio::spawn(s.clone().rebuild_loop());
        if let Some(addr) = cfg.metrics {
            tokio::spawn(s.clone().serve_metrics(addr));
        }
        Ok(Some(s))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The address of a Service named `host` as a pod in namespace `ns` would reach it
    /// through cluster DNS and its search path (`svc`, `svc.ns`, `svc.ns.svc`, or the full
    /// name under the cluster domain): its cluster IP, or an endpoint of a headless one.
    pub fn resolve(&self, host: &str, ns: &str) -> Option<std::net::IpAddr> {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        let rest = h
            .strip_suffix(&format!(".{}", self.cfg.domain))
            .unwrap_or(&h);
        let labels: Vec<&str> = rest.split('.').collect();
        let key = match labels.as_slice() {
            [svc] => format!("{svc}.{ns}"),
            [svc, n] | [svc, n, "svc"] => format!("{svc}.{n}"),
            _ => return None,
        };
        let t = self.netd.table();
        t.names
            .get(&key)?
            .ips
            .first()
            .map(|ip| std::net::IpAddr::V4(*ip))
    }

    /// The Service variables of a container in namespace `ns` (see [`service_env`]), from
    /// the Services this node follows (or has cached, offline).
    pub fn env(&self, ns: &str, links: bool) -> Vec<(String, String)> {
        let Ok(o) = self.objects.lock() else {
            return Vec::new();
        };
        let svcs: Vec<&Value> = o
            .iter()
            .filter(|(k, _)| k.starts_with("services/"))
            .map(|(_, v)| v)
            .collect();
        service_env(&svcs, ns, links)
    }

    /// Keep the table following the cluster's Services and EndpointSlices while `link`
    /// lasts. Never returns on its own; a failed watch is retried.
    pub async fn follow(self: Arc<Self>, link: Link, cache: Arc<Cache>) {
        let one = |kind: &'static str, path: &'static str| {
            let (me, link, cache) = (self.clone(), link.clone(), cache.clone());
            async move {
                loop {
                    let why = link.list_watch(path, |c| me.apply(kind, c, &cache)).await;
                    tracing::debug!(%why, kind, "service watch ended; again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tokio::join!(
            one("services", "/api/v1/services"),
            one("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
        );
    }

    fn apply(&self, kind: &str, c: Change, cache: &Cache) {
        let Ok(mut objs) = self.objects.lock() else {
            return;
        };
        match c {
            Change::Listed(items) => {
                let mut keep = std::collections::HashSet::new();
                for o in items {
                    if let Some((k, ns, name)) = key(kind, &o) {
                        let _ = cache.put_object(kind, &ns, &name, &o);
                        keep.insert(k.clone());
                        objs.insert(k, o);
                    }
                }
                let prefix = format!("{kind}/");
                let gone: Vec<String> = objs
                    .keys()
                    .filter(|k| k.starts_with(&prefix) && !keep.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    if let Some(o) = objs.remove(&k) {
                        if let Some((_, ns, name)) = key(kind, &o) {
                            let _ = cache.remove_object(kind, &ns, &name);
                        }
                    }
                }
            }
            Change::Upsert(o) => {
                if let Some((k, ns, name)) = key(kind, &o) {
                    let _ = cache.put_object(kind, &ns, &name, &o);
                    objs.insert(k, o);
                }
            }
            Change::Deleted(o) => {
                if let Some((k, ns, name)) = key(kind, &o) {
                    let _ = cache.remove_object(kind, &ns, &name);
                    objs.remove(&k);
                }
            }
        }
        self.changed.notify_one();
    }

    fn rebuild(self: &Arc<Self>) {
        let (svcs, slices): (Vec<Value>, Vec<Value>) = {
            let Ok(objs) = self.objects.lock() else {
                return;
            };
            let mut s = Vec::new();
            let mut e = Vec::new();
            for (k, v) in objs.iter() {
                if k.starts_with("services/") {
                    s.push(v.clone());
                } else {
                    e.push(v.clone());
                }
            }
            (s, e)
        };
        let mut t = Table::build(&svcs, &slices, self.netd.metrics());
        if let Ok(h) = self.host_ports.lock() {
            let all: Vec<HostPort> = h.values().flatten().cloned().collect();
            t.add_host_ports(&all, self.netd.metrics());
        }
        let ports: Vec<(u16, Proto)> = t.node_ports.keys().copied().collect();
        self.netd.update(t);
        self.sync_node_ports(&ports);
    }

    async fn rebuild_loop(self: Arc<Self>) {
        loop {
            self.changed.notified().await;
            // Let a burst of changes (a list, a rollout) land in one table.
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.rebuild();
        }
    }

    /// Forward the node's `ports` to the pod `uid` (none: the pod's go).
    pub fn set_host_ports(&self, uid: &str, ports: Vec<HostPort>) {
        let changed = match self.host_ports.lock() {
            Ok(mut h) if ports.is_empty() => h.remove(uid).is_some(),
            Ok(mut h) if h.get(uid) != Some(&ports) => {
                h.insert(uid.to_string(), ports);
                true
            }
            _ => false,
        };
        if changed {
            self.changed.notify_one();
        }
    }

    /// Listen on every node port the table has, and only those.
    fn sync_node_ports(self: &Arc<Self>, want: &[(u16, Proto)]) {
        let Ok(mut open) = self.node_ports.lock() else {
            return;
        };
        open.retain(|k, task| {
            let keep = want.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for &(p, proto) in want {
            if open.contains_key(&(p, proto)) {
                continue;
            }
            let me = Arc::downgrade(self);
            let task = match proto {
                Proto::Tcp => {
                    let l = match std::net::TcpListener::bind(("0.0.0.0", p))
                        .and_then(|l| l.set_nonblocking(true).map(|_| l))
                        .and_then(TcpListener::from_std)
                    {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(port = p, error = %e, "cannot listen on a node port");
                            continue;
                        }
                    };
                    tokio::spawn(async move {
                        loop {
                            let Ok((c, peer)) = l.accept().await else {
                                continue;
                            };
                            let Some(s) = me.upgrade() else { return };
                            let port = s.netd.table().node_ports.get(&(p, Proto::Tcp)).cloned();
                            if let Some(port) = port {
                                tokio::spawn(node_port_conn(port, c, peer));
                            }
                        }
                    })
                }
                Proto::Udp => {
                    let sock = match std::net::UdpSocket::bind(("0.0.0.0", p))
                        .and_then(|u| u.set_nonblocking(true).map(|_| u))
                        .and_then(UdpSocket::from_std)
                    {
                        Ok(u) => Arc::new(u),
                        Err(e) => {
                            tracing::warn!(port = p, error = %e, "cannot listen on a UDP node port");
                            continue;
                        }
                    };
                    tokio::spawn(udp_node_port(me, p, sock))
                }
            };
            open.insert((p, proto), task);
        }
    }

    /// Serve netd's counters in Prometheus' text format on `GET /metrics`.
    async fn serve_metrics(self: Arc<Self>, addr: SocketAddr) {
        let l = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve netd's metrics");
                return;
            }
        };
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                continue;
            };
            let body = self.netd.metrics().render();
            tokio::spawn(async move {
                // The whole request head (it may come in pieces), at most 8 KiB, 5 s.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while buf.len() < 8192 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                })
                .await;
                let head = String::from_utf8_lossy(&buf);
                let reply = if head.starts_with("GET /metrics") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .into()
                };
                let _ = c.write_all(reply.as_bytes()).await;
            });
        }
    }
}

/// Datagrams to a UDP node port: each client gets a flow (a socket connected to one ready
/// endpoint) whose answers go back from the node port; a flow idle for a minute ends.
async fn udp_node_port(me: std::sync::Weak<Services>, p: u16, sock: Arc<UdpSocket>) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Some(s) = me.upgrade() else { return };
        let Some(port) = s.netd.table().node_ports.get(&(p, Proto::Udp)).cloned() else {
            continue;
        };
        let flow = flows.lock().ok().and_then(|f| f.get(&client).cloned());
        let flow = match flow {
            Some(f) => f,
            None => {
                let Some(b) = port.pick(client.ip(), std::time::Instant::now()) else {
                    port.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let Ok(up) = UdpSocket::bind("0.0.0.0:0").await else {
                    continue;
                };
                if up.connect(b).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                port.counters.connections.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = flows.lock() {
                    f.insert(client, up.clone());
                }
                let (up2, sock2, flows2, port2) =
                    (up.clone(), sock.clone(), flows.clone(), port.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(60), up2.recv(&mut buf)).await
                    {
                        port2
                            .counters
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                        let _ = sock2.send_to(&buf[..n], client).await;
                    }
                    if let Ok(mut f) = flows2.lock() {
                        f.remove(&client);
                    }
                });
                up
            }
        };
        if flow.send(&buf[..n]).await.is_ok() {
            port.counters
                .bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// One connection to a node port: to a ready endpoint, spliced both ways.
async fn node_port_conn(port: Arc<outpost_netd::table::Port>, mut c: TcpStream, peer: SocketAddr) {
    let now = std::time::Instant::now();
    let mut tried = Vec::new();
    while let Some(b) = port.pick_except(peer.ip(), now, &tried) {
        match TcpStream::connect(b).await {
            Ok(mut up) => {
                port.counters.connections.fetch_add(1, Ordering::Relaxed);
                let _ = c.set_nodelay(true);
                let _ = up.set_nodelay(true);
                match tokio::io::copy_bidirectional(&mut c, &mut up).await {
                    Ok((i, o)) => {
                        port.counters.bytes_in.fetch_add(i, Ordering::Relaxed);
                        port.counters.bytes_out.fetch_add(o, Ordering::Relaxed);
                    }
                    Err(_) => {
                        port.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
            Err(_) => {
                tried.push(b);
                if tried.len() >= 3 {
                    break;
                }
            }
        }
    }
    port.counters.errors.fetch_add(1, Ordering::Relaxed);
    // Dropping `c` closes it; linger 0 would be kinder to say "refused", but a node port's
    // client has already connected, so a close is what it sees from kube-proxy too.
}

/// The environment kubelet gives a container for Services (`enableServiceLinks`): for each
/// Service with a cluster IP in the pod's namespace when `links`, and for `default/kubernetes`
/// always (a Service of that name in the pod's own namespace wins), `NAME_SERVICE_HOST`,
/// `NAME_SERVICE_PORT`, `NAME_SERVICE_PORT_PORTNAME` per named port, and the Docker-link
/// variables `NAME_PORT` and `NAME_PORT_P_PROTO{,_PROTO,_PORT,_ADDR}`. The container's own
/// `env` and `envFrom` override these.
pub fn service_env(svcs: &[&Value], ns: &str, links: bool) -> Vec<(String, String)> {
    let mut chosen: std::collections::BTreeMap<&str, &Value> = std::collections::BTreeMap::new();
    for &s in svcs {
        let (Some(name), Some(sns)) = (
            s["metadata"]["name"].as_str(),
            s["metadata"]["namespace"].as_str(),
        ) else {
            continue;
        };
        if sns == ns && links {
            chosen.insert(name, s);
        } else if sns == "default" && name == "kubernetes" {
            chosen.entry(name).or_insert(s);
        }
    }
    let upper = |s: &str| s.to_ascii_uppercase().replace('-', "_");
    let mut out = Vec::new();
    for (name, s) in chosen {
        let ip = s["spec"]["clusterIP"].as_str().unwrap_or("");
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ports = s["spec"]["ports"].as_array().map_or(&[][..], Vec::as_slice);
        let n = upper(name);
        let port = |p: &Value| p["port"].as_u64().unwrap_or(0).to_string();
        let proto = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase();
        out.push((format!("{n}_SERVICE_HOST"), ip.to_string()));
        if let Some(first) = ports.first() {
            out.push((format!("{n}_SERVICE_PORT"), port(first)));
            out.push((
                format!("{n}_PORT"),
                format!("{}://{ip}:{}", proto(first), port(first)),
            ));
        }
        for p in ports {
            if let Some(pn) = p["name"].as_str().filter(|x| !x.is_empty()) {
                out.push((format!("{n}_SERVICE_PORT_{}", upper(pn)), port(p)));
            }
        }
        for p in ports {
            let (pr, po) = (proto(p), port(p));
            let prefix = format!("{n}_PORT_{po}_{}", pr.to_ascii_uppercase());
            out.push((prefix.clone(), format!("{pr}://{ip}:{po}")));
            out.push((format!("{prefix}_PROTO"), pr));
            out.push((format!("{prefix}_PORT"), po));
            out.push((format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": name},
               "spec": {"clusterIP": ip, "ports": ports}})
    }

    #[test]
    fn service_variables_follow_kubelet() {
        let svcs = [
            svc(
                "default",
                "kubernetes",
                "10.96.0.1",
                json!([{"name": "https", "port": 443, "protocol": "TCP"}]),
            ),
            svc(
                "shop",
                "web-front",
                "10.96.0.20",
                json!([
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"}]),
            ),
            svc("shop", "headless", "None", json!([{"port": 80}])),
            svc("other", "elsewhere", "10.96.0.30", json!([{"port": 80}])),
        ];
        let all: Vec<&Value> = svcs.iter().collect();
        let env = service_env(&all, "shop", true);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("WEB_FRONT_SERVICE_HOST"), Some("10.96.0.20"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT"), Some("80"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT_DNS_UDP"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT"), Some("tcp://10.96.0.20:80"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP"), Some("udp://10.96.0.20:53"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PORT"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_ADDR"), Some("10.96.0.20"));
        assert!(
            env.iter()
                .all(|(k, _)| !k.starts_with("HEADLESS_") && !k.starts_with("ELSEWHERE_")),
            "{env:?}"
        );
        // Without service links only the API server's Service is there; a Service named
        // `kubernetes` in the pod's own namespace wins over it.
        let env = service_env(&all, "shop", false);
        assert!(
            env.iter().all(|(k, _)| k.starts_with("KUBERNETES_")),
            "{env:?}"
        );
        assert_eq!(env.len(), 8, "{env:?}");
        let mine = [
            svc("shop", "kubernetes", "10.96.0.99", json!([{"port": 1}])),
            svcs[0].clone(),
        ];
        let env = service_env(&[&mine[0], &mine[1]], "shop", true);
        assert!(
            env.contains(&("KUBERNETES_SERVICE_HOST".into(), "10.96.0.99".into())),
            "{env:?}"
        );
    }
}
