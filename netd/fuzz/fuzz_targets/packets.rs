#![no_main]
//! netd's loop over a device in memory, fed the input as packets (each preceded by a one-byte
//! length): it must never panic.

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outpost_netd::table::{Metrics, Table};
use outpost_netd::{Dns, Harness};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let table = Table::build(
        &[json!({"metadata": {"name": "web", "namespace": "default"},
                 "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "p", "port": 80}]}})],
        &[json!({"metadata": {"name": "w", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": "web"}},
                 "ports": [{"name": "p", "port": 9, "protocol": "TCP"}],
                 "endpoints": [{"addresses": ["127.0.0.1"]}]})],
        &Metrics::default(),
    );
    let dns = Dns {
        ip: "10.96.0.10".parse().unwrap(),
        domain: "cluster.local".into(),
        upstream: vec![],
    };
    let Ok(mut h) = Harness::new(table, Some(dns)) else {
        return;
    };
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        h.inject(tail[..n].to_vec());
        rest = &tail[n..];
    }
    let _ = h.step(Duration::ZERO);
    let _ = h.sent();
});
