#![no_main]
//! Cluster DNS must answer or drop any datagram, never panic.

use libfuzzer_sys::fuzz_target;
use outpost_netd::dns::answer;
use outpost_netd::table::{Metrics, Table};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let table = Table::build(
        &[json!({"metadata": {"name": "web", "namespace": "default"},
                 "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]}})],
        &[],
        &Metrics::default(),
    );
    let _ = answer(data, &table, "cluster.local", true);
    let _ = answer(data, &table, "cluster.local", false);
});
