//! The service load balancer's decision, as K3s's ServiceLB makes it: a LoadBalancer Service
//! of no other class is served on its own ports by every node's netd (see
//! `outpost_netd::table`), so its ingress is the address of every Ready node: the node's
//! ExternalIP where it has one, else its InternalIP. Nodes labelled
//! `node.kubernetes.io/exclude-from-external-load-balancers` are left out, as the cloud
//! controllers leave them out.

use serde_json::{json, Value};

/// The label that keeps a node out of every load balancer.
pub const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Whether this controller balances `svc`.
pub fn balanced(svc: &Value) -> bool {
    svc["spec"]["type"] == "LoadBalancer"
        && svc["spec"]["loadBalancerClass"]
            .as_str()
            .is_none_or(str::is_empty)
}

/// `svc`'s `status.loadBalancer` as this controller would have it over `nodes`; `None` where
/// it is not this controller's to say (another class's balancer).
pub fn status<'a>(svc: &Value, nodes: impl IntoIterator<Item = &'a Value>) -> Option<Value> {
    if !balanced(svc) {
        // A Service that is no longer a LoadBalancer loses the ingress it had; another
        // class's is that implementation's.
        return (svc["spec"]["type"] != "LoadBalancer").then(|| json!({}));
    }
    let mut ips: Vec<&str> = nodes
        .into_iter()
        .filter(|n| n["metadata"]["labels"].get(EXCLUDE).is_none())
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|n| {
            let addrs = n["status"]["addresses"].as_array()?;
            let of = |t: &str| {
                addrs
                    .iter()
                    .find(|a| a["type"] == t)
                    .and_then(|a| a["address"].as_str())
            };
            of("ExternalIP").or(of("InternalIP"))
        })
        .collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        return Some(json!({}));
    }
    let ingress: Vec<Value> = ips
        .into_iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    Some(json!({"ingress": ingress}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: &str, addrs: Value, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels},
            "status": {"addresses": addrs,
                "conditions": [{"type": "Ready", "status": ready}]}})
    }

    #[test]
    fn every_ready_node_serves_a_balancer() {
        let nodes = [
            node(
                "b",
                "True",
                json!([{"type": "InternalIP", "address": "10.0.0.2"}]),
                json!({}),
            ),
            node(
                "a",
                "True",
                json!([{"type": "InternalIP", "address": "10.0.0.1"},
                       {"type": "ExternalIP", "address": "203.0.113.7"}]),
                json!({}),
            ),
            node(
                "down",
                "Unknown",
                json!([{"type": "InternalIP", "address": "10.0.0.3"}]),
                json!({}),
            ),
            node(
                "out",
                "True",
                json!([{"type": "InternalIP", "address": "10.0.0.4"}]),
                json!({EXCLUDE: ""}),
            ),
        ];
        let lb = json!({"spec": {"type": "LoadBalancer"}});
        assert_eq!(
            status(&lb, &nodes),
            Some(json!({"ingress": [{"ip": "10.0.0.2", "ipMode": "VIP"},
                                    {"ip": "203.0.113.7", "ipMode": "VIP"}]}))
        );
        // No node to serve it: pending, as `kubectl get` shows it.
        assert_eq!(status(&lb, &nodes[2..]), Some(json!({})));
        // Turned ClusterIP: its ingress goes.
        let plain = json!({"spec": {"type": "ClusterIP"}});
        assert_eq!(status(&plain, &nodes), Some(json!({})));
        // Another implementation's class: not ours to touch.
        let other = json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "x.io/lb"}});
        assert_eq!(status(&other, &nodes), None);
    }
}
