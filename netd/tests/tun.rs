//! netd on a real TUN device, each test in a network namespace of its own (made by the test
//! thread with `unshare`, so it needs root), with backends on ordinary sockets.

#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use outpost_netd::table::Table;
use outpost_netd::{Config, Dns, Netd};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Run `f` on a thread in a fresh network namespace with loopback up; threads it starts share
/// the namespace.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        outpost_tests::private_netns().expect("a network namespace of the test's own");
        f()
    })
    .join()
    .expect("test thread")
}

fn start() -> Netd {
    let mut cfg = Config::new(CIDR);
    cfg.dns = Some(Dns {
        ip: DNS_IP,
        domain: "cluster.local".into(),
        upstream: Vec::new(),
    });
    Netd::start(cfg).expect("netd starts")
}

fn service(name: &str, ip: &str, ports: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": ports}})
}

fn slice(svc: &str, port: u16, proto: &str, eps: &[(&str, bool)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    json!({"metadata": {"namespace": "default", "name": format!("{svc}-{proto}"),
                        "labels": {"kubernetes.io/service-name": svc}},
           "ports": [{"name": "p", "port": port, "protocol": proto}], "endpoints": eps})
}

/// Give netd a table and wait until its loop has taken it: until then its addresses are
/// refused.
fn set(n: &Netd, svcs: &[Value], slices: &[Value]) {
    n.update(Table::build(svcs, slices, n.metrics()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !n.settled() {
        assert!(
            std::time::Instant::now() < deadline,
            "netd never took the table"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A backend on 127.0.0.N that writes its name to each connection, then echoes.
fn backend(ip: &str, name: &'static str) -> (u16, Arc<AtomicBool>) {
    let l = TcpListener::bind(format!("{ip}:0")).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if s.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let _ = c.write_all(format!("{name}\n").as_bytes());
                let mut buf = vec![0; 1 << 16];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, stop)
}

fn hello(addr: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).to_string())
}

fn ports(port: u16) -> Value {
    json!([{"name": "p", "port": port, "protocol": "TCP"}])
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn a_client_reaches_a_backend_through_its_cluster_ip() {
    in_netns(|| {
        let n = start();
        let (bp, _s) = backend("127.0.0.1", "one");
        set(
            &n,
            &[service("web", "10.96.0.5", ports(80))],
            &[slice("web", bp, "TCP", &[("127.0.0.1", true)])],
        );
        assert_eq!(hello("10.96.0.5:80").expect("connect through netd"), "one");
        // A port the service does not have, and an address no service has, are refused.
        for a in ["10.96.0.5:81", "10.96.0.77:80"] {
            let e = TcpStream::connect_timeout(&a.parse().expect("addr"), Duration::from_secs(5))
                .expect_err(a);
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{a}: {e}");
        }
        let m = n.metrics().render();
        assert!(
            m.contains("outpost_netd_connections_total{service=\"default/web\",port=\"80/tcp\"} 1"),
            "{m}"
        );
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn three_backends_share_the_load_and_an_unready_one_leaves_at_once() {
    in_netns(|| {
        let n = start();
        let (pa, _a) = backend("127.0.0.2", "a");
        // The endpoints of one service port share a port number; give each its own address.
        let l3 = TcpListener::bind(format!("127.0.0.3:{pa}")).expect("bind b");
        let l4 = TcpListener::bind(format!("127.0.0.4:{pa}")).expect("bind c");
        for (l, name) in [(l3, "b"), (l4, "c")] {
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    let _ = c.write_all(format!("{name}\n").as_bytes());
                }
            });
        }
        let svc = [service("web", "10.96.0.6", ports(80))];
        let all = [
            ("127.0.0.2", true),
            ("127.0.0.3", true),
            ("127.0.0.4", true),
        ];
        set(&n, &svc, &[slice("web", pa, "TCP", &all)]);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..30 {
            *seen
                .entry(hello("10.96.0.6:80").expect("hello"))
                .or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|c| *c == 10), "round-robin: {seen:?}");
        set(
            &n,
            &svc,
            &[slice(
                "web",
                pa,
                "TCP",
                &[
                    ("127.0.0.2", true),
                    ("127.0.0.3", false),
                    ("127.0.0.4", true),
                ],
            )],
        );
        for _ in 0..20 {
            assert_ne!(
                hello("10.96.0.6:80").expect("hello"),
                "b",
                "an unready endpoint gets no new connection"
            );
        }
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn no_endpoints_or_refusing_ones_are_refused_quickly() {
    in_netns(|| {
        let n = start();
        // A port nothing listens on.
        let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
        let dp = dead.local_addr().expect("addr").port();
        drop(dead);
        set(
            &n,
            &[
                service("empty", "10.96.0.7", ports(80)),
                service("dead", "10.96.0.8", ports(80)),
            ],
            &[
                slice("empty", 80, "TCP", &[("127.0.0.1", false)]),
                slice("dead", dp, "TCP", &[("127.0.0.1", true)]),
            ],
        );
        for a in ["10.96.0.7:80", "10.96.0.8:80"] {
            let t = Instant::now();
            let e = TcpStream::connect_timeout(&a.parse().expect("addr"), Duration::from_secs(5))
                .expect_err(a);
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{a}: {e}");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{a} took {:?}",
                t.elapsed()
            );
        }
        // One refusing endpoint beside a live one: the client still gets through.
        let (live, _s) = backend("127.0.0.5", "live");
        let l = TcpListener::bind(format!("127.0.0.5:{}", live + 1));
        drop(l);
        set(
            &n,
            &[service("mixed", "10.96.0.9", ports(80))],
            &[slice(
                "mixed",
                live,
                "TCP",
                &[("127.0.0.6", true), ("127.0.0.5", true)],
            )],
        );
        for _ in 0..4 {
            assert_eq!(
                hello("10.96.0.9:80").expect("retried on the live endpoint"),
                "live"
            );
        }
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn a_large_transfer_arrives_intact_and_half_close_passes_through() {
    in_netns(|| {
        let n = start();
        let (bp, _s) = backend("127.0.0.1", "echo");
        set(
            &n,
            &[service("echo", "10.96.0.11", ports(7))],
            &[slice("echo", bp, "TCP", &[("127.0.0.1", true)])],
        );
        let mut c = TcpStream::connect("10.96.0.11:7").expect("connect");
        let mut w = c.try_clone().expect("clone");
        const SIZE: usize = 64 << 20;
        let sent = std::thread::spawn(move || {
            let mut h = Sha256::new();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut buf = vec![0u8; 1 << 16];
            let mut left = SIZE;
            while left > 0 {
                for b in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                let k = left.min(buf.len());
                w.write_all(&buf[..k]).expect("send");
                h.update(&buf[..k]);
                left -= k;
            }
            // Half-close: the backend sees EOF, echoes the rest, then closes its side.
            w.shutdown(std::net::Shutdown::Write).expect("shutdown");
            h.finalize()
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read to the backend's FIN");
        let sent = sent.join().expect("sender");
        assert_eq!(&got[..5], b"echo\n");
        assert_eq!(got.len() - 5, SIZE);
        assert_eq!(Sha256::digest(&got[5..]), sent, "bytes arrive intact");
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn open_connections_survive_table_updates_and_late_client_bytes_arrive() {
    in_netns(|| {
        let n = start();
        let (bp, _s) = backend("127.0.0.1", "echo");
        let svc = service("echo", "10.96.0.14", ports(7));
        let sl = slice("echo", bp, "TCP", &[("127.0.0.1", true)]);
        set(&n, std::slice::from_ref(&svc), std::slice::from_ref(&sl));
        let mut c = TcpStream::connect("10.96.0.14:7").expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut line = [0u8; 5];
        c.read_exact(&mut line).expect("greeting");
        // Tables change under an open connection (another service comes and goes).
        for k in 0..5 {
            let other = service(&format!("o{k}"), &format!("10.96.1.{k}"), ports(80));
            set(&n, &[svc.clone(), other], std::slice::from_ref(&sl));
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(b"ping").expect("write after an update");
            let mut b = [0u8; 4];
            c.read_exact(&mut b).expect("echo after an update");
            assert_eq!(&b, b"ping");
        }
        drop(c);

        // The backend closes its side first; the client's bytes sent after that, and its
        // FIN, still reach it whole.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        set(
            &n,
            &[service("late", "10.96.0.15", ports(80))],
            &[slice("late", port, "TCP", &[("127.0.0.1", true)])],
        );
        let got = std::thread::spawn(move || {
            let (mut b, _) = l.accept().expect("accept");
            b.shutdown(std::net::Shutdown::Write).expect("backend FIN");
            let mut all = Vec::new();
            b.read_to_end(&mut all).expect("read the client's bytes");
            all
        });
        let mut c = TcpStream::connect("10.96.0.15:80").expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut none = Vec::new();
        c.read_to_end(&mut none).expect("the backend's FIN");
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).expect("send after the backend's FIN");
        c.shutdown(std::net::Shutdown::Write).expect("client FIN");
        let all = got.join().expect("backend");
        assert_eq!(all.len(), data.len());
        assert!(all == data, "bytes arrive intact");
    });
}

/// Close `s` with an RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open for the call; `l` is a valid linger of the size given.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn a_reset_on_either_side_resets_the_other() {
    in_netns(|| {
        let n = start();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        set(
            &n,
            &[service("r", "10.96.0.13", ports(80))],
            &[slice("r", port, "TCP", &[("127.0.0.1", true)])],
        );
        // The backend resets: the client's read fails with a reset, not an orderly EOF.
        let mut c = TcpStream::connect("10.96.0.13:80").expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (b, _) = l.accept().expect("accept");
        reset(b);
        let mut buf = [0u8; 16];
        let e = c.read(&mut buf).expect_err("a reset, not EOF");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        // The client resets: the backend's read fails with a reset too.
        let c = TcpStream::connect("10.96.0.13:80").expect("connect");
        let (mut b, _) = l.accept().expect("accept");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        reset(c);
        let e = b.read(&mut buf).expect_err("a reset, not EOF");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        let m = n.metrics().render();
        assert!(
            m.contains("outpost_netd_errors_total{service=\"default/r\",port=\"80/tcp\"} 2"),
            "{m}"
        );
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn cluster_dns_and_udp_services() {
    in_netns(|| {
        let n = start();
        let echo = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let ep = echo.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            while let Ok((k, from)) = echo.recv_from(&mut b) {
                let mut out = b"re:".to_vec();
                out.extend_from_slice(&b[..k]);
                let _ = echo.send_to(&out, from);
            }
        });
        set(
            &n,
            &[service(
                "web",
                "10.96.0.5",
                json!([{"name": "p", "port": 53, "protocol": "UDP"}]),
            )],
            &[slice("web", ep, "UDP", &[("127.0.0.1", true)])],
        );
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let ask = |name: &str| {
            let mut q = Message::query();
            q.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            s.send_to(&q.to_vec().expect("encode"), SocketAddr::from((DNS_IP, 53)))
                .expect("send");
            let mut b = [0u8; 1500];
            let (k, from) = s.recv_from(&mut b).expect("an answer");
            assert_eq!(from, SocketAddr::from((DNS_IP, 53)));
            Message::from_vec(&b[..k]).expect("decode")
        };
        let m = ask("web.default.svc.cluster.local.");
        let ips: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec!["10.96.0.5"]);
        assert_eq!(
            ask("nope.default.svc.cluster.local.")
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        // The UDP service echoes through its cluster IP.
        s.send_to(b"ping", "10.96.0.5:53").expect("send");
        let mut b = [0u8; 64];
        let (k, from) = s.recv_from(&mut b).expect("udp echo through netd");
        assert_eq!(&b[..k], b"re:ping");
        assert_eq!(from, "10.96.0.5:53".parse::<SocketAddr>().expect("addr"));
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn dns_over_tcp_answers_what_a_datagram_cannot_hold() {
    in_netns(|| {
        let n = start();
        // A headless service with 100 endpoints: too many A records for 512 bytes.
        let eps: Vec<Value> = (1..=100)
            .map(|i| json!({"addresses": [format!("10.88.1.{i}")]}))
            .collect();
        set(
            &n,
            &[service("big", "None", json!([]))],
            &[json!({"metadata": {"namespace": "default", "name": "big-1",
                                  "labels": {"kubernetes.io/service-name": "big"}},
                     "endpoints": eps})],
        );
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("big.default.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let q = q.to_vec().expect("encode");
        let mut c =
            TcpStream::connect_timeout(&SocketAddr::from((DNS_IP, 53)), Duration::from_secs(5))
                .expect("DNS over TCP");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // Two queries on one connection, the first in two pieces.
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        c.write_all(&framed[..5]).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        c.write_all(&framed[5..]).expect("send");
        c.write_all(&framed).expect("send");
        for _ in 0..2 {
            let mut len = [0u8; 2];
            c.read_exact(&mut len).expect("length");
            let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
            c.read_exact(&mut m).expect("message");
            let m = Message::from_vec(&m).expect("decode");
            assert!(!m.metadata.truncation);
            assert_eq!(m.answers.len(), 100);
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .expect("netd closes after the client");
        assert!(rest.is_empty());
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn other_names_are_forwarded_upstream_and_udp_flows_follow_readiness() {
    in_netns(|| {
        // An upstream resolver that answers every query with 192.0.2.7.
        let up = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let up_addr = up.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = up.recv_from(&mut b) {
                let Ok(q) = Message::from_vec(&b[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.add_queries(q.queries.clone());
                let name = q.queries[0].name().clone();
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    name,
                    60,
                    RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, 7))),
                ));
                let _ = up.send_to(&r.to_vec().expect("encode"), from);
            }
        });
        let mut cfg = Config::new(CIDR);
        cfg.dns = Some(Dns {
            ip: DNS_IP,
            domain: "cluster.local".into(),
            upstream: vec![up_addr],
        });
        let n = Netd::start(cfg).expect("netd");
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.add_query(Query::query(
            Name::from_ascii("example.org.").expect("name"),
            RecordType::A,
        ));
        s.send_to(&q.to_vec().expect("encode"), SocketAddr::from((DNS_IP, 53)))
            .expect("send");
        let mut b = [0u8; 1500];
        let (k, _) = s.recv_from(&mut b).expect("the upstream's answer, relayed");
        let m = Message::from_vec(&b[..k]).expect("decode");
        assert_eq!(m.metadata.id, 4242, "the client's own id comes back");
        assert!(matches!(&m.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(192, 0, 2, 7)));

        // A UDP service with two endpoints: a client's flow sticks to one, and moves when
        // that one stops being ready.
        // Two endpoints on one port number, as endpoints of one service port are.
        let ex = UdpSocket::bind("127.0.0.2:0").expect("bind");
        let port = ex.local_addr().expect("addr").port();
        let ey = UdpSocket::bind(format!("127.0.0.3:{port}")).expect("bind the same port");
        for (e, tag) in [(ex, "x"), (ey, "y")] {
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok((_, from)) = e.recv_from(&mut b) {
                    let _ = e.send_to(tag.as_bytes(), from);
                }
            });
        }
        let svc = [service(
            "u",
            "10.96.0.12",
            json!([{"name": "p", "port": 9, "protocol": "UDP"}]),
        )];
        let eps = |a: bool, b: bool| {
            [slice(
                "u",
                port,
                "UDP",
                &[("127.0.0.2", a), ("127.0.0.3", b)],
            )]
        };
        set(&n, &svc, &eps(true, true));
        let mut ask = || {
            s.send_to(b"?", "10.96.0.12:9").expect("send");
            let (k, _) = s.recv_from(&mut b).expect("udp answer");
            String::from_utf8_lossy(&b[..k]).to_string()
        };
        let first = ask();
        for _ in 0..5 {
            assert_eq!(ask(), first, "one flow, one endpoint");
        }
        let (a, bb) = if first == "x" {
            (false, true)
        } else {
            (true, false)
        };
        set(&n, &svc, &eps(a, bb));
        std::thread::sleep(Duration::from_millis(50));
        assert_ne!(ask(), first, "the flow moved off the unready endpoint");
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun"]
fn a_second_netd_in_the_same_namespace_is_told_it_is_busy() {
    in_netns(|| {
        let _n = start();
        match Netd::start(Config::new(CIDR)) {
            Err(outpost_netd::NetdError::Busy(_)) => {}
            Err(e) => panic!("expected Busy, got {e}"),
            Ok(_) => panic!("two netds on one device"),
        }
    });
}
