//! netd's loop over a device in memory (no root): a TCP handshake and a splice to a real
//! backend socket built packet by packet, and storms of malformed packets, SYN floods and DNS
//! garbage that must leave it answering. Randomised parts take `NETD_SEED` and print theirs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use outpost_netd::table::{Metrics, Table};
use outpost_netd::{Dns, Harness};
use serde_json::json;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

const SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 5);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);

fn table(backend_port: u16) -> Table {
    Table::build(
        &[json!({"metadata": {"name": "web", "namespace": "default"},
                 "spec": {"clusterIP": SVC.to_string(), "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})],
        &[json!({"metadata": {"name": "web-1", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": "web"}},
                 "ports": [{"name": "p", "port": backend_port, "protocol": "TCP"}],
                 "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]})],
        &Metrics::default(),
    )
}

fn harness(backend_port: u16) -> Harness {
    Harness::new(
        table(backend_port),
        Some(Dns {
            ip: DNS_IP,
            domain: "cluster.local".into(),
            upstream: Vec::new(),
        }),
    )
    .expect("harness")
}

struct Seg<'a> {
    sport: u16,
    seq: u32,
    ack: Option<u32>,
    control: TcpControl,
    payload: &'a [u8],
}

fn tcp(s: Seg<'_>) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: s.sport,
        dst_port: 80,
        control: s.control,
        seq_number: TcpSeqNumber(s.seq as i32),
        ack_number: s.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65_535,
        window_scale: None,
        max_seg_size: if s.control == TcpControl::Syn {
            Some(1460)
        } else {
            None
        },
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: s.payload,
    };
    let ip = Ipv4Repr {
        src_addr: CLIENT,
        dst_addr: SVC,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + repr.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    repr.emit(
        &mut TcpPacket::new_unchecked(p.payload_mut()),
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        &caps,
    );
    buf
}

fn udp(dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let ip = Ipv4Repr {
        src_addr: CLIENT,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: repr.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + repr.header_len() + payload.len()];
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    repr.emit(
        &mut UdpPacket::new_unchecked(p.payload_mut()),
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// The TCP segments netd sent: (control, seq, ack, payload).
fn segments(h: &Harness) -> Vec<(TcpControl, u32, Option<u32>, Vec<u8>)> {
    h.sent()
        .iter()
        .filter_map(|b| {
            let ip = Ipv4Packet::new_checked(&b[..]).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let t = TcpPacket::new_checked(ip.payload()).ok()?;
            let r = TcpRepr::parse(
                &t,
                &ip.src_addr().into(),
                &ip.dst_addr().into(),
                &ChecksumCapabilities::default(),
            )
            .ok()?;
            Some((
                r.control,
                r.seq_number.0 as u32,
                r.ack_number.map(|a| a.0 as u32),
                r.payload.to_vec(),
            ))
        })
        .collect()
}

fn until<T>(h: &mut Harness, what: &str, mut f: impl FnMut(&mut Harness) -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        h.step(Duration::from_millis(5)).expect("step");
        if let Some(v) = f(h) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
    }
}

fn dns_query(name: &str) -> Vec<u8> {
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    q.to_vec().expect("encode")
}

fn dns_answers(h: &Harness) -> Vec<Message> {
    h.sent()
        .iter()
        .filter_map(|b| {
            let ip = Ipv4Packet::new_checked(&b[..]).ok()?;
            let u = UdpPacket::new_checked(ip.payload()).ok()?;
            (u.src_port() == 53).then(|| Message::from_vec(u.payload()).ok())?
        })
        .collect()
}

#[test]
fn a_handshake_and_a_splice_built_packet_by_packet() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nb");
    let port = l.local_addr().expect("addr").port();
    let mut h = harness(port);
    h.inject(tcp(Seg {
        sport: 40000,
        seq: 1000,
        ack: None,
        control: TcpControl::Syn,
        payload: &[],
    }));
    // The SYN is held until the backend accepts, then answered.
    let mut backend = until(&mut h, "netd dials the backend", |_| {
        l.accept().ok().map(|(b, _)| b)
    });
    backend.set_nonblocking(false).expect("blocking");
    let synack = until(&mut h, "SYN-ACK", |h| {
        segments(h).into_iter().find(|s| s.0 == TcpControl::Syn)
    });
    assert_eq!(synack.2, Some(1001));
    let iss = synack.1;
    h.inject(tcp(Seg {
        sport: 40000,
        seq: 1001,
        ack: Some(iss + 1),
        control: TcpControl::None,
        payload: b"ping",
    }));
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = [0u8; 4];
    let t = Instant::now();
    let mut n = 0;
    while n < 4 {
        h.step(Duration::from_millis(5)).expect("step");
        backend.set_nonblocking(true).expect("nb");
        if let Ok(k) = backend.read(&mut got[n..]) {
            n += k;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "data reaches the backend"
        );
    }
    assert_eq!(&got, b"ping");
    backend.set_nonblocking(false).expect("blocking");
    backend.write_all(b"pong").expect("reply");
    let data = until(&mut h, "the reply", |h| {
        segments(h).into_iter().find(|s| !s.3.is_empty())
    });
    assert_eq!(data.3, b"pong");
    assert_eq!(data.1, iss + 1);
    // The backend closes: a FIN follows the data.
    drop(backend);
    until(&mut h, "FIN", |h| {
        segments(h).into_iter().find(|s| s.0 == TcpControl::Fin)
    });
}

#[test]
fn a_syn_to_nothing_is_reset_and_dns_answers_over_the_device() {
    let mut h = harness(9);
    // Nobody listens on the backend's port 9: the held SYN is answered with RST.
    h.inject(tcp(Seg {
        sport: 40001,
        seq: 5,
        ack: None,
        control: TcpControl::Syn,
        payload: &[],
    }));
    let rst = until(&mut h, "RST", |h| {
        segments(h).into_iter().find(|s| s.0 == TcpControl::Rst)
    });
    assert_eq!(rst.2, Some(6));
    h.inject(udp(
        DNS_IP,
        5353,
        53,
        &dns_query("web.default.svc.cluster.local."),
    ));
    let m = until(&mut h, "a DNS answer", |h| {
        dns_answers(h).into_iter().next()
    });
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
}

/// xorshift64*: the storms are reproducible from the seed they print.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn malformed_packets_syn_floods_and_dns_garbage_leave_it_answering() {
    let seed = std::env::var("NETD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("NETD_SEED={seed}");
    let mut r = Rng(seed);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nb");
    let port = l.local_addr().expect("addr").port();
    let mut h = harness(port);
    let valid = [
        tcp(Seg {
            sport: 1,
            seq: 7,
            ack: None,
            control: TcpControl::Syn,
            payload: &[],
        }),
        tcp(Seg {
            sport: 2,
            seq: 7,
            ack: Some(9),
            control: TcpControl::None,
            payload: b"data",
        }),
        udp(DNS_IP, 3, 53, &dns_query("web.default.svc.cluster.local.")),
        udp(SVC, 4, 80, b"udp to a tcp service"),
    ];
    for round in 0..20_000 {
        let mut p = match r.below(4) {
            // Pure noise of any length.
            0 => (0..r.below(200)).map(|_| r.next() as u8).collect(),
            // A valid packet with bytes flipped, cut short or grown.
            1 => {
                let mut p = valid[r.below(valid.len())].clone();
                for _ in 0..=r.below(4) {
                    let i = r.below(p.len());
                    p[i] ^= r.next() as u8;
                }
                p
            }
            2 => {
                let p = &valid[r.below(valid.len())];
                p[..r.below(p.len())].to_vec()
            }
            // DNS garbage in a well-formed datagram.
            _ => {
                let junk: Vec<u8> = (0..r.below(600)).map(|_| r.next() as u8).collect();
                udp(DNS_IP, 5, 53, &junk)
            }
        };
        if round % 7 == 0 {
            // A SYN flood from ever new ports.
            p = tcp(Seg {
                sport: 10_000 + (round % 50_000) as u16,
                seq: round,
                ack: None,
                control: TcpControl::Syn,
                payload: &[],
            });
        }
        h.inject(p);
        if round % 64 == 0 {
            h.step(Duration::ZERO).expect("step");
            assert!(
                h.held() <= 256,
                "bounded: {} held, NETD_SEED={seed}",
                h.held()
            );
            let _ = h.sent();
            while l.accept().is_ok() {}
        }
    }
    h.step(Duration::ZERO).expect("step");
    let _ = h.sent();
    // Still answering.
    h.inject(udp(
        DNS_IP,
        6,
        53,
        &dns_query("web.default.svc.cluster.local."),
    ));
    let m = until(&mut h, "DNS after the storm", |h| {
        dns_answers(h).into_iter().find(|m| !m.answers.is_empty())
    });
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "NETD_SEED={seed}"
    );
}
