//! Cluster DNS: answers for names under the cluster domain from the service table, as
//! Kubernetes' DNS specification asks: `svc.ns.svc.DOMAIN` A records (the cluster IP, or the
//! ready endpoints of a headless service), `host.svc.ns.svc.DOMAIN` for endpoints with a
//! hostname, `_port._proto.svc.ns.svc.DOMAIN` SRV records for named ports, NXDOMAIN for
//! anything else under the domain. Other names are for the upstream resolver.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::table::{Proto, Table};

/// Seconds a client may cache an answer; short, since services come and go.
const TTL: u32 = 5;
/// The largest answer over UDP without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;

/// What to do with one datagram sent to the DNS address.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not a cluster name: ask the upstream resolver.
    Forward,
    /// Not a DNS query at all (or a response): drop it.
    Drop,
}

/// Answer `query` (a DNS message as received) from `table` for the cluster `domain`
/// (`cluster.local`). `upstream` says whether other names can be forwarded; without one they
/// are refused.
pub fn answer(query: &[u8], table: &Table, domain: &str, upstream: bool) -> Reply {
    answer_within(query, table, domain, upstream, None)
}

/// [`answer`] for DNS over TCP: the answer may be as large as a TCP message (64 KiB), and a
/// name outside the cluster is refused (netd forwards only datagrams).
pub fn answer_tcp(query: &[u8], table: &Table, domain: &str) -> Reply {
    answer_within(query, table, domain, false, Some(u16::MAX as usize))
}

fn answer_within(
    query: &[u8],
    table: &Table,
    domain: &str,
    upstream: bool,
    max: Option<usize>,
) -> Reply {
    let Ok(req) = Message::from_vec(query) else {
        // A header we can read gets FORMERR; anything shorter is dropped.
        if query.len() >= 12 && query[2] & 0x80 == 0 {
            let id = u16::from_be_bytes([query[0], query[1]]);
            return encode(
                Message::error_msg(id, OpCode::Query, ResponseCode::FormErr),
                UDP_PLAIN,
            );
        }
        return Reply::Drop;
    };
    if req.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    let limit = match &req.edns {
        Some(e) => {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            resp.set_edns(edns);
            usize::from(e.max_payload()).clamp(UDP_PLAIN, 1232)
        }
        None => UDP_PLAIN,
    };
    let limit = max.unwrap_or(limit);
    if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::NotImp;
        resp.queries = req.queries.clone();
        return encode(resp, limit);
    }
    let q = &req.queries[0];
    resp.add_query(q.clone());
    let Ok(zone) = Name::from_ascii(format!("{domain}.")) else {
        return Reply::Drop;
    };
    let name = q.name().to_lowercase();
    if !zone.zone_of(&name) {
        if upstream {
            return Reply::Forward;
        }
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(resp, limit);
    }
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = upstream;
    // Labels below the zone, leftmost first.
    let labels: Vec<String> = name
        .iter()
        .take(usize::from(
            name.num_labels().saturating_sub(zone.num_labels()),
        ))
        .map(|l| String::from_utf8_lossy(l).to_string())
        .collect();
    let qtype = q.query_type();
    let found = lookup(table, &zone, &labels);
    match found {
        Found::None => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(soa(&zone));
        }
        Found::Ips(ips) => {
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                for ip in ips {
                    resp.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(ip))));
                }
            }
            if resp.answers.is_empty() {
                resp.add_authority(soa(&zone));
            }
        }
        Found::Srv(port, target, ips) => {
            if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                resp.add_answer(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 100, port, target.clone())),
                ));
                for ip in ips {
                    resp.add_additional(Record::from_rdata(target.clone(), TTL, RData::A(A(ip))));
                }
            } else {
                resp.add_authority(soa(&zone));
            }
        }
    }
    if q.query_class() != DNSClass::IN && q.query_class() != DNSClass::ANY {
        resp.answers.clear();
        resp.additionals.clear();
    }
    encode(resp, limit)
}

enum Found {
    None,
    Ips(Vec<Ipv4Addr>),
    /// port, target name, target's addresses
    Srv(u16, Name, Vec<Ipv4Addr>),
}

fn lookup(table: &Table, zone: &Name, labels: &[String]) -> Found {
    let l: Vec<&str> = labels.iter().map(String::as_str).collect();
    match l.as_slice() {
        [svc, ns, "svc"] => match table.names.get(&format!("{svc}.{ns}")) {
            Some(n) => Found::Ips(n.ips.clone()),
            None => Found::None,
        },
        [host, svc, ns, "svc"] => match table.names.get(&format!("{svc}.{ns}")) {
            Some(n) => match n.hosts.get(*host) {
                Some(ip) => Found::Ips(vec![*ip]),
                None => Found::None,
            },
            None => Found::None,
        },
        [port, proto, svc, ns, "svc"] => {
            let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
            else {
                return Found::None;
            };
            let Some(n) = table.names.get(&format!("{svc}.{ns}")) else {
                return Found::None;
            };
            let want = match proto {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return Found::None,
            };
            let hit = n
                .ports
                .iter()
                .find(|(name, p, _)| name == port && *p == want);
            let target = Name::from_ascii(format!("{}.", labels[2..].join(".")))
                .and_then(|t| t.append_domain(zone));
            match (hit, target) {
                (Some((_, _, number)), Ok(t)) => Found::Srv(*number, t, n.ips.clone()),
                _ => Found::None,
            }
        }
        _ => Found::None,
    }
}

fn soa(zone: &Name) -> Record {
    let ns = Name::from_ascii("ns.dns").unwrap_or_else(|_| Name::root());
    let admin = Name::from_ascii("hostmaster").unwrap_or_else(|_| Name::root());
    Record::from_rdata(
        zone.clone(),
        TTL,
        RData::SOA(SOA::new(
            ns.append_domain(zone).unwrap_or_else(|_| zone.clone()),
            admin.append_domain(zone).unwrap_or_else(|_| zone.clone()),
            1,
            7200,
            1800,
            86_400,
            TTL,
        )),
    )
}

/// Encode, dropping answers (and setting TC) until it fits `limit`.
fn encode(mut m: Message, limit: usize) -> Reply {
    loop {
        let Ok(bytes) = m.to_vec() else {
            return Reply::Drop;
        };
        if bytes.len() <= limit || (m.answers.is_empty() && m.additionals.is_empty()) {
            return Reply::Answer(bytes);
        }
        m.metadata.truncation = true;
        if m.additionals.pop().is_none() {
            m.answers.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Metrics;
    use hickory_proto::op::Query;
    use serde_json::json;

    fn table() -> Table {
        let svcs = [
            json!({"metadata": {"name": "web", "namespace": "default"},
                   "spec": {"clusterIP": "10.96.0.5",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
            json!({"metadata": {"name": "db", "namespace": "prod"},
                   "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        ];
        let slices = [json!({"metadata": {"namespace": "prod", "name": "db-1",
                                          "labels": {"kubernetes.io/service-name": "db"}},
                             "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
                             "endpoints": [{"addresses": ["10.88.0.9"], "hostname": "db-0"},
                                           {"addresses": ["10.88.0.10"], "hostname": "db-1"}]})];
        Table::build(&svcs, &slices, &Metrics::default())
    }

    fn ask(name: &str, ty: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.id = 77;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), ty));
        match answer(
            &q.to_vec().expect("encode"),
            &table(),
            "cluster.local",
            true,
        ) {
            Reply::Answer(b) => Message::from_vec(&b).expect("decode"),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn a_records(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn services_resolve_to_their_cluster_ip_and_headless_ones_to_endpoints() {
        let m = ask("web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.id, 77);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&m), vec!["10.96.0.5"]);
        let m = ask("WEB.Default.svc.cluster.local.", RecordType::A);
        assert_eq!(
            a_records(&m),
            vec!["10.96.0.5"],
            "names are case-insensitive"
        );
        let m = ask("db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(a_records(&m), vec!["10.88.0.9", "10.88.0.10"]);
        let m = ask("db-1.db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(a_records(&m), vec!["10.88.0.10"]);
        // A name that exists has no AAAA: NOERROR with no answers.
        let m = ask("web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn named_ports_have_srv_records() {
        let m = ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        let srv = m
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::SRV(s) => Some(s.clone()),
                _ => None,
            })
            .expect("an SRV answer");
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target.to_ascii(), "web.default.svc.cluster.local.");
        assert_eq!(m.additionals.len(), 1);
        let m = ask("_http._udp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_others_go_upstream() {
        for n in [
            "nope.default.svc.cluster.local.",
            "default.svc.cluster.local.",
            "x.cluster.local.",
        ] {
            let m = ask(n, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{n}");
            assert!(m.metadata.authoritative);
        }
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("example.com.").expect("name"),
            RecordType::A,
        ));
        let bytes = q.to_vec().expect("encode");
        assert_eq!(
            answer(&bytes, &table(), "cluster.local", true),
            Reply::Forward
        );
        let Reply::Answer(b) = answer(&bytes, &table(), "cluster.local", false) else {
            panic!("no upstream means an answer")
        };
        assert_eq!(
            Message::from_vec(&b)
                .expect("decode")
                .metadata
                .response_code,
            ResponseCode::Refused
        );
    }

    #[test]
    fn garbage_gets_formerr_or_is_dropped() {
        assert_eq!(answer(&[], &table(), "cluster.local", true), Reply::Drop);
        assert_eq!(
            answer(&[1, 2, 3], &table(), "cluster.local", true),
            Reply::Drop
        );
        let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xc0, 0x0c, 0xff]);
        match answer(&junk, &table(), "cluster.local", true) {
            Reply::Answer(b) => {
                let m = Message::from_vec(&b).expect("decode");
                assert_eq!(m.metadata.id, 0x1234);
                assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("{other:?}"),
        }
        // A response is never answered (no loops between resolvers).
        let mut r = Message::query();
        r.metadata.message_type = MessageType::Response;
        assert_eq!(
            answer(
                &r.to_vec().expect("encode"),
                &table(),
                "cluster.local",
                true
            ),
            Reply::Drop
        );
    }

    #[test]
    fn big_answers_are_truncated_to_fit() {
        let eps: Vec<serde_json::Value> = (0..200)
            .map(|i| json!({"addresses": [format!("10.88.{}.{}", i / 200, i % 200 + 1)]}))
            .collect();
        let t = Table::build(
            &[
                json!({"metadata": {"name": "big", "namespace": "d"}, "spec": {"clusterIP": "None"}}),
            ],
            &[
                json!({"metadata": {"namespace": "d", "labels": {"kubernetes.io/service-name": "big"}},
                     "endpoints": eps}),
            ],
            &Metrics::default(),
        );
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("big.d.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let Reply::Answer(b) = answer(&q.to_vec().expect("encode"), &t, "cluster.local", true)
        else {
            panic!("an answer")
        };
        assert!(b.len() <= 512);
        let m = Message::from_vec(&b).expect("decode");
        assert!(m.metadata.truncation);
        assert!(!m.answers.is_empty());
    }
}
