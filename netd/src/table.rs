//! The service table: where each ClusterIP:port and node port leads, and the names cluster DNS
//! answers, built from Services and EndpointSlices. A plain value: netd builds a new one when
//! either changes and swaps it in whole, so a lookup never sees half an update.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The protocol a Kubernetes port names (`TCP` when unset); `None` for one netd does not
    /// carry (SCTP).
    pub fn of(v: &Value) -> Option<Proto> {
        match v.as_str().unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Counters of one service port. They outlive table rebuilds: a new table takes the counters
/// of the same `namespace/name:port` from [`Metrics`].
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    /// Client to backend.
    pub bytes_in: AtomicU64,
    /// Backend to client.
    pub bytes_out: AtomicU64,
    /// Connections refused (no ready endpoint, every endpoint refused) or reset.
    pub errors: AtomicU64,
}

/// A metric: its name, its help, and how to read it from one port's counters.
type Series = (&'static str, &'static str, fn(&Counters) -> u64);

/// Every service port's counters by `namespace/name:port/proto`.
#[derive(Debug, Default)]
pub struct Metrics {
    by_port: Mutex<HashMap<String, Arc<Counters>>>,
}

impl Metrics {
    fn counters(&self, key: &str) -> Arc<Counters> {
        let Ok(mut m) = self.by_port.lock() else {
            return Arc::default();
        };
        m.entry(key.to_string()).or_default().clone()
    }

    /// The counters in Prometheus' text format.
    pub fn render(&self) -> String {
        let Ok(m) = self.by_port.lock() else {
            return String::new();
        };
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        let mut out = String::new();
        let series: [Series; 4] = [
            (
                "outpost_netd_connections_total",
                "connections proxied",
                |c| c.connections.load(Ordering::Relaxed),
            ),
            (
                "outpost_netd_bytes_in_total",
                "bytes from clients to backends",
                |c| c.bytes_in.load(Ordering::Relaxed),
            ),
            (
                "outpost_netd_bytes_out_total",
                "bytes from backends to clients",
                |c| c.bytes_out.load(Ordering::Relaxed),
            ),
            (
                "outpost_netd_errors_total",
                "connections refused or reset",
                |c| c.errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in series {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for k in &keys {
                let (svc, port) = k.rsplit_once(':').unwrap_or((k.as_str(), ""));
                out.push_str(&format!(
                    "{name}{{service=\"{svc}\",port=\"{port}\"}} {}\n",
                    get(&m[*k])
                ));
            }
        }
        out
    }
}

/// One port of one service and the endpoints behind it.
#[derive(Debug)]
pub struct Port {
    /// `namespace/name`.
    pub service: String,
    pub port: u16,
    pub proto: Proto,
    /// Ready endpoints.
    pub backends: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity: Option<Duration>,
    pub counters: Arc<Counters>,
    next: AtomicUsize,
    sticky: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

/// At most this many clients are remembered per port for session affinity.
const MAX_STICKY: usize = 65_536;

impl Port {
    /// The backend for a new connection from `client`: the one it had within the affinity
    /// timeout if it is still ready, else the next in turn. `None` when there is none ready.
    pub fn pick(&self, client: IpAddr, now: Instant) -> Option<SocketAddr> {
        self.pick_except(client, now, &[])
    }

    /// As [`Port::pick`], skipping `tried` (endpoints that just refused).
    pub fn pick_except(
        &self,
        client: IpAddr,
        now: Instant,
        tried: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let live: Vec<SocketAddr> = self
            .backends
            .iter()
            .copied()
            .filter(|b| !tried.contains(b))
            .collect();
        if live.is_empty() {
            return None;
        }
        let Some(timeout) = self.affinity else {
            return Some(live[self.next.fetch_add(1, Ordering::Relaxed) % live.len()]);
        };
        let Ok(mut sticky) = self.sticky.lock() else {
            return Some(live[0]);
        };
        if let Some((b, at)) = sticky.get(&client) {
            if now.saturating_duration_since(*at) < timeout && live.contains(b) {
                let b = *b;
                sticky.insert(client, (b, now));
                return Some(b);
            }
        }
        let b = live[self.next.fetch_add(1, Ordering::Relaxed) % live.len()];
        if sticky.len() >= MAX_STICKY {
            sticky.retain(|_, (_, at)| now.saturating_duration_since(*at) < timeout);
        }
        if sticky.len() < MAX_STICKY {
            sticky.insert(client, (b, now));
        }
        Some(b)
    }
}

/// What cluster DNS knows of one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Named {
    /// The cluster IP, or the ready endpoints' addresses for a headless service.
    pub ips: Vec<Ipv4Addr>,
    /// Named ports: (name, protocol, port) for SRV records.
    pub ports: Vec<(String, Proto, u16)>,
    /// Endpoints of a headless service that have a hostname (StatefulSet pods).
    pub hosts: HashMap<String, Ipv4Addr>,
}

/// A pod's `hostPort`: the node's `port` forwarded to the pod at `to`, as the kubelet's
/// portmap plugin forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub port: u16,
    pub proto: Proto,
    /// The pod's `namespace/name`.
    pub pod: String,
    pub to: SocketAddr,
}

/// The whole table.
#[derive(Debug, Default)]
pub struct Table {
    pub frontends: HashMap<(Ipv4Addr, u16, Proto), Arc<Port>>,
    /// Ports open on every address of the node: NodePorts, and the ports of LoadBalancer
    /// Services of no other class, as K3s's ServiceLB opens them (a NodePort wins a clash,
    /// and of two balancers the first listed).
    pub node_ports: HashMap<(u16, Proto), Arc<Port>>,
    /// By `name.namespace`.
    pub names: HashMap<String, Named>,
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

impl Table {
    /// Open pods' `ports` on the node as well, each where no Service's port holds its number.
    pub fn add_host_ports(&mut self, ports: &[HostPort], metrics: &Metrics) {
        for h in ports {
            let key = format!("{}:{}/{}", h.pod, h.port, h.proto.as_str());
            self.node_ports.entry((h.port, h.proto)).or_insert_with(|| {
                Arc::new(Port {
                    service: h.pod.clone(),
                    port: h.port,
                    proto: h.proto,
                    backends: vec![h.to],
                    affinity: None,
                    counters: metrics.counters(&key),
                    next: AtomicUsize::new(0),
                    sticky: Mutex::default(),
                })
            });
        }
    }

    /// Build the table from Service and EndpointSlice objects (JSON, as the API serves them).
    /// Objects that make no sense (no name, a cluster IP that is not IPv4) are passed over.
    pub fn build(services: &[Value], slices: &[Value], metrics: &Metrics) -> Table {
        // EndpointSlices by (namespace, service).
        let mut by_svc: HashMap<(&str, &str), Vec<&Value>> = HashMap::new();
        for s in slices {
            let m = &s["metadata"];
            let svc = text(&m["labels"]["kubernetes.io/service-name"]);
            if !svc.is_empty() {
                by_svc
                    .entry((text(&m["namespace"]), svc))
                    .or_default()
                    .push(s);
            }
        }
        let mut t = Table::default();
        for svc in services {
            let (ns, name) = (
                text(&svc["metadata"]["namespace"]),
                text(&svc["metadata"]["name"]),
            );
            if ns.is_empty() || name.is_empty() {
                continue;
            }
            let spec = &svc["spec"];
            let slices = by_svc.remove(&(ns, name)).unwrap_or_default();
            let cluster_ip: Option<Ipv4Addr> = text(&spec["clusterIP"]).parse().ok();
            let affinity = (text(&spec["sessionAffinity"]) == "ClientIP").then(|| {
                Duration::from_secs(
                    spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
                        .as_u64()
                        .unwrap_or(10_800),
                )
            });
            let balanced = text(&spec["type"]) == "LoadBalancer"
                && text(&spec["loadBalancerClass"]).is_empty();
            let mut named = Named::default();
            if let Some(ip) = cluster_ip {
                named.ips.push(ip);
            }
            for sp in spec["ports"].as_array().into_iter().flatten() {
                let (Some(proto), Some(port)) = (
                    Proto::of(&sp["protocol"]),
                    sp["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                ) else {
                    continue;
                };
                let pname = text(&sp["name"]);
                if !pname.is_empty() {
                    named.ports.push((pname.to_string(), proto, port));
                }
                let backends = ready(&slices, pname, proto);
                let key = format!("{ns}/{name}:{port}/{}", proto.as_str());
                let p = Arc::new(Port {
                    service: format!("{ns}/{name}"),
                    port,
                    proto,
                    backends,
                    affinity,
                    counters: metrics.counters(&key),
                    next: AtomicUsize::new(0),
                    sticky: Mutex::default(),
                });
                if let Some(ip) = cluster_ip {
                    t.frontends.insert((ip, port, proto), p.clone());
                }
                if balanced {
                    t.node_ports
                        .entry((port, proto))
                        .or_insert_with(|| p.clone());
                }
                if let Some(np) = sp["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
                    t.node_ports.insert((np, proto), p);
                }
            }
            if text(&spec["clusterIP"]) == "None" {
                for s in &slices {
                    for ep in s["endpoints"].as_array().into_iter().flatten() {
                        if ep["conditions"]["ready"] == Value::Bool(false) {
                            continue;
                        }
                        for a in ep["addresses"].as_array().into_iter().flatten() {
                            if let Ok(ip) = text(a).parse::<Ipv4Addr>() {
                                if !named.ips.contains(&ip) {
                                    named.ips.push(ip);
                                }
                                let host = text(&ep["hostname"]);
                                if !host.is_empty() {
                                    named.hosts.insert(host.to_string(), ip);
                                }
                            }
                        }
                    }
                }
            }
            t.names.insert(format!("{name}.{ns}"), named);
        }
        t
    }
}

/// The ready endpoints of the service port named `pname` across a service's slices.
fn ready(slices: &[&Value], pname: &str, proto: Proto) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in slices {
        let port = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| text(&p["name"]) == pname && Proto::of(&p["protocol"]) == Some(proto));
        let Some(port) = port
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in s["endpoints"].as_array().into_iter().flatten() {
            // Absent means ready, as in Kubernetes.
            if ep["conditions"]["ready"] == Value::Bool(false) {
                continue;
            }
            for a in ep["addresses"].as_array().into_iter().flatten() {
                if let Ok(ip) = text(a).parse::<Ipv4Addr>() {
                    let b = SocketAddr::new(IpAddr::V4(ip), port);
                    if !out.contains(&b) {
                        out.push(b);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, ip: &str, extra: Value) -> Value {
        let mut s = json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP"}]}});
        if let (Some(s), Some(e)) = (s["spec"].as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        s
    }

    fn slice(svc: &str, eps: &[(&str, Option<bool>)]) -> Value {
        let eps: Vec<Value> = eps
            .iter()
            .map(|(ip, ready)| {
                let mut e =
                    json!({"addresses": [ip], "hostname": format!("h-{}", ip.replace('.', "-"))});
                if let Some(r) = ready {
                    e["conditions"] = json!({"ready": r});
                }
                e
            })
            .collect();
        json!({"metadata": {"namespace": "default", "name": format!("{svc}-x"),
                            "labels": {"kubernetes.io/service-name": svc}},
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                         {"name": "dns", "port": 5353, "protocol": "UDP"}],
               "endpoints": eps})
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn load_balancers_and_host_ports_listen_on_the_node() {
        let m = Metrics::default();
        let lb = json!({"type": "LoadBalancer"});
        let t = Table::build(
            &[
                // Another class's balancer is that implementation's to serve.
                svc(
                    "c",
                    "10.96.0.7",
                    json!({"type": "LoadBalancer", "loadBalancerClass": "example.com/lb"}),
                ),
                svc("a", "10.96.0.5", lb.clone()),
                // The same port again: the first balancer keeps it.
                svc("b", "10.96.0.6", lb),
            ],
            &[],
            &m,
        );
        assert_eq!(t.node_ports[&(80, Proto::Tcp)].service, "default/a");
        assert_eq!(t.node_ports[&(53, Proto::Udp)].service, "default/a");
        let mut plain = Table::build(&[svc("d", "10.96.0.8", json!({}))], &[], &m);
        assert!(!plain.node_ports.contains_key(&(80, Proto::Tcp)));
        assert!(plain.node_ports.contains_key(&(30080, Proto::Tcp)));
        // Pods' host ports open where no Service's port is.
        let host = |port, pod: &str| HostPort {
            port,
            proto: Proto::Tcp,
            pod: pod.into(),
            to: sa("10.88.0.9:8080"),
        };
        plain.add_host_ports(&[host(8081, "default/p"), host(30080, "default/q")], &m);
        let p = &plain.node_ports[&(8081, Proto::Tcp)];
        assert_eq!(
            (p.service.as_str(), &p.backends[..]),
            ("default/p", &[sa("10.88.0.9:8080")][..])
        );
        assert_eq!(plain.node_ports[&(30080, Proto::Tcp)].service, "default/d");
    }

    #[test]
    fn ready_endpoints_back_each_port_and_unready_ones_do_not() {
        let m = Metrics::default();
        let t = Table::build(
            &[svc("web", "10.96.0.5", json!({}))],
            &[slice(
                "web",
                &[
                    ("10.88.0.2", Some(true)),
                    ("10.88.0.3", Some(false)),
                    ("10.88.0.4", None),
                ],
            )],
            &m,
        );
        let p = &t.frontends[&("10.96.0.5".parse().expect("ip"), 80, Proto::Tcp)];
        assert_eq!(p.backends, vec![sa("10.88.0.2:8080"), sa("10.88.0.4:8080")]);
        let u = &t.frontends[&("10.96.0.5".parse().expect("ip"), 53, Proto::Udp)];
        assert_eq!(u.backends, vec![sa("10.88.0.2:5353"), sa("10.88.0.4:5353")]);
        assert!(Arc::ptr_eq(&t.node_ports[&(30080, Proto::Tcp)], p));
        assert_eq!(
            t.names["web.default"].ips,
            vec!["10.96.0.5".parse::<Ipv4Addr>().expect("ip")]
        );
        assert_eq!(t.names["web.default"].ports.len(), 2);
        // Round-robin over the ready ones.
        let c: IpAddr = "10.0.0.1".parse().expect("ip");
        let now = Instant::now();
        let picks: Vec<_> = (0..4).map(|_| p.pick(c, now)).collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1]);
        assert_eq!(
            p.pick_except(c, now, &[sa("10.88.0.2:8080")]),
            Some(sa("10.88.0.4:8080"))
        );
        assert_eq!(p.pick_except(c, now, &p.backends), None);
    }

    #[test]
    fn client_ip_affinity_sticks_until_its_timeout_or_the_endpoint_goes() {
        let m = Metrics::default();
        let extra = json!({"sessionAffinity": "ClientIP",
                           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}});
        let t = Table::build(
            &[svc("web", "10.96.0.5", extra.clone())],
            &[slice(
                "web",
                &[
                    ("10.88.0.2", None),
                    ("10.88.0.3", None),
                    ("10.88.0.4", None),
                ],
            )],
            &m,
        );
        let p = &t.frontends[&("10.96.0.5".parse().expect("ip"), 80, Proto::Tcp)];
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let t0 = Instant::now();
        let first = p.pick(a, t0);
        for s in 1..10 {
            assert_eq!(p.pick(a, t0 + Duration::from_secs(s)), first);
        }
        assert_ne!(
            p.pick(b, t0),
            first,
            "another client takes the next endpoint"
        );
        // Long after the last use, the client is assigned afresh (round-robin moves on).
        let later = t0 + Duration::from_secs(1000);
        let again = p.pick(a, later);
        assert!(again.is_some());
        // An endpoint that left is never returned.
        let gone = first.expect("picked");
        assert_ne!(p.pick_except(a, later, &[gone]), Some(gone));
    }

    #[test]
    fn headless_services_name_their_endpoints_and_counters_survive_rebuilds() {
        let m = Metrics::default();
        let build = |ready: bool| {
            Table::build(
                &[
                    svc("db", "None", json!({})),
                    svc("web", "10.96.0.5", json!({})),
                ],
                &[
                    slice("db", &[("10.88.0.7", Some(ready)), ("10.88.0.8", None)]),
                    slice("web", &[("10.88.0.2", None)]),
                ],
                &m,
            )
        };
        let t = build(true);
        let db = &t.names["db.default"];
        assert_eq!(db.ips.len(), 2);
        assert_eq!(
            db.hosts["h-10-88-0-7"],
            "10.88.0.7".parse::<Ipv4Addr>().expect("ip")
        );
        assert!(t
            .frontends
            .keys()
            .all(|(ip, _, _)| ip.to_string() == "10.96.0.5"));
        let web = &t.frontends[&("10.96.0.5".parse().expect("ip"), 80, Proto::Tcp)];
        web.counters.connections.fetch_add(3, Ordering::Relaxed);
        let t2 = build(false);
        assert_eq!(
            t2.names["db.default"].ips,
            vec!["10.88.0.8".parse::<Ipv4Addr>().expect("ip")]
        );
        let web2 = &t2.frontends[&("10.96.0.5".parse().expect("ip"), 80, Proto::Tcp)];
        assert_eq!(web2.counters.connections.load(Ordering::Relaxed), 3);
        let text = m.render();
        assert!(
            text.contains(
                "outpost_netd_connections_total{service=\"default/web\",port=\"80/tcp\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn nonsense_objects_are_passed_over() {
        let m = Metrics::default();
        let t = Table::build(
            &[
                json!({}),
                json!({"metadata": {"name": "x", "namespace": "d"},
                     "spec": {"clusterIP": "fd00::1", "ports": [{"port": 99999}, {"port": 80, "protocol": "SCTP"}]}}),
                json!("not an object"),
            ],
            &[
                json!({"metadata": {"labels": {"kubernetes.io/service-name": "x"}}, "endpoints": "no"}),
            ],
            &m,
        );
        assert!(t.frontends.is_empty());
        assert_eq!(t.names["x.d"], Named::default());
    }
}
