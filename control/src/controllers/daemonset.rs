//! The DaemonSet controller's decisions: one pod on every node that should run one (the
//! caller decides which, from the template's selector, affinity and tolerations), none
//! elsewhere, and rolling updates within `maxUnavailable`.
//!
//! As in Kubernetes, the controller does not bind: each pod it makes carries a required node
//! affinity on its node's name, and the scheduler places it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::deployment::template_hash;
use super::replicaset::{active, available, ready};

/// The label that says which template a DaemonSet pod was made from.
pub const HASH: &str = "controller-revision-hash";

/// What to do for one DaemonSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes that need a pod.
    pub create: Vec<String>,
    /// Pods to delete.
    pub delete: Vec<String>,
    pub status: Value,
}

/// The node a DaemonSet pod is for: where it is bound, or where its affinity sends it.
fn target(pod: &Value) -> Option<String> {
    pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            pod["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchFields"][0]["values"][0]
                .as_str()
        })
        .map(String::from)
}

fn name(p: &Value) -> String {
    p["metadata"]["name"].as_str().unwrap_or("").to_string()
}

/// Plan for `ds` over `nodes` (name, whether it should run a pod) given its pods, at `now`
/// (unix seconds; a pod is available once Ready for `minReadySeconds`).
pub fn plan(ds: &Value, nodes: &[(String, bool)], pods: &[&Value], now: i64) -> Plan {
    let min_ready = ds["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let hash = template_hash(&ds["spec"]["template"]);
    let mut on: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    let mut plan = Plan::default();
    for p in pods.iter().copied().filter(|p| active(p)) {
        match target(p) {
            Some(n) => on.entry(n).or_default().push(p),
            None => plan.delete.push(name(p)),
        }
    }
    // Pods for nodes that are gone.
    for (node, ps) in &on {
        if !nodes.iter().any(|(n, _)| n == node) {
            plan.delete.extend(ps.iter().map(|p| name(p)));
        }
    }
    let current = |p: &Value| p["metadata"]["labels"][HASH] == hash.as_str();
    let (mut desired, mut scheduled, mut misscheduled) = (0, 0, 0);
    let (mut ready_n, mut available_n, mut updated) = (0, 0, 0);
    // Nodes whose pod is from an older template, and how many nodes lack an available pod.
    let mut outdated = vec![];
    let mut unavailable = 0;
    for (node, should) in nodes {
        let mut ps: Vec<&Value> = on.get(node).cloned().unwrap_or_default();
        if !should {
            if !ps.is_empty() {
                misscheduled += 1;
                plan.delete.extend(ps.iter().map(|p| name(p)));
            }
            continue;
        }
        desired += 1;
        if ps.is_empty() {
            plan.create.push(node.clone());
            unavailable += 1;
            continue;
        }
        scheduled += 1;
        // Keep the best one: current template, then ready, then oldest.
        ps.sort_by_key(|p| {
            (
                !current(p),
                !ready(p),
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        });
        plan.delete.extend(ps[1..].iter().map(|p| name(p)));
        let kept = ps[0];
        ready_n += u32::from(ready(kept));
        if available(kept, min_ready, now) {
            available_n += 1;
        } else {
            unavailable += 1;
        }
        if current(kept) {
            updated += 1;
        } else {
            outdated.push(name(kept));
        }
    }
    let strategy = &ds["spec"]["updateStrategy"];
    if strategy["type"] != "OnDelete" {
        let max = match &strategy["rollingUpdate"]["maxUnavailable"] {
            Value::Number(n) => n.as_u64().unwrap_or(1),
            Value::String(s) => s
                .strip_suffix('%')
                .and_then(|p| p.parse::<u64>().ok())
                .map(|p| (p * desired / 100).max(1))
                .unwrap_or(1),
            _ => 1,
        };
        let room = max.saturating_sub(unavailable) as usize;
        plan.delete.extend(outdated.into_iter().take(room));
    }
    plan.status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": ready_n,
        "numberAvailable": available_n,
        "numberUnavailable": desired - available_n,
        "updatedNumberScheduled": updated,
        "observedGeneration": ds["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    plan
}

/// Tolerations every DaemonSet pod gets, so that it stays on a node that is unreachable,
/// under pressure or cordoned.
fn tolerations() -> Vec<Value> {
    let mut t = vec![
        json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}),
        json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}),
    ];
    for k in [
        "disk-pressure",
        "memory-pressure",
        "pid-pressure",
        "unschedulable",
    ] {
        t.push(
            json!({"key": format!("node.kubernetes.io/{k}"), "operator": "Exists",
            "effect": "NoSchedule"}),
        );
    }
    t
}

/// The pod for `ds` on `node`.
pub fn pod_for(ds: &Value, node: &str) -> Value {
    let mut pod = super::replicaset::pod_from(ds, "apps/v1", "DaemonSet");
    pod["metadata"]["labels"][HASH] = json!(template_hash(&ds["spec"]["template"]));
    let spec = &mut pod["spec"];
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
        "nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]});
    let mut tol = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for extra in tolerations() {
        if !tol
            .iter()
            .any(|t| t["key"] == extra["key"] && t["effect"] == extra["effect"])
        {
            tol.push(extra);
        }
    }
    spec["tolerations"] = json!(tol);
    pod
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(image: &str) -> Value {
        json!({"metadata": {"name": "agent", "namespace": "default", "uid": "u", "generation": 1},
            "spec": {"template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    fn pod_on(ds: &Value, node: &str, name: &str, ready: bool) -> Value {
        let mut p = pod_for(ds, node);
        p["metadata"]["name"] = json!(name);
        p["spec"]["nodeName"] = json!(node);
        p["status"] = json!({"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]});
        p
    }

    fn nodes(list: &[(&str, bool)]) -> Vec<(String, bool)> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn available_waits_for_min_ready_seconds() {
        let mut d = ds("module:v1");
        d["spec"]["minReadySeconds"] = json!(10);
        let mut a = pod_on(&d, "n1", "a", true);
        a["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
        let t0 = "2026-01-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        let early = plan(&d, &nodes(&[("n1", true)]), &[&a], t0 + 3);
        assert_eq!(
            (
                early.status["numberReady"].as_u64(),
                early.status["numberAvailable"].as_u64()
            ),
            (Some(1), Some(0))
        );
        let later = plan(&d, &nodes(&[("n1", true)]), &[&a], t0 + 10);
        assert_eq!(later.status["numberAvailable"], 1);
    }

    #[test]
    fn one_pod_per_eligible_node_and_none_elsewhere() {
        let d = ds("module:v1");
        let a = pod_on(&d, "n1", "a", true);
        let extra = pod_on(&d, "n1", "extra", false);
        let stray = pod_on(&d, "n3", "stray", true);
        let gone = pod_on(&d, "n9", "gone", true);
        let p = plan(
            &d,
            &nodes(&[("n1", true), ("n2", true), ("n3", false)]),
            &[&a, &extra, &stray, &gone],
            0,
        );
        assert_eq!(p.create, ["n2"]);
        let mut deleted = p.delete.clone();
        deleted.sort();
        assert_eq!(deleted, ["extra", "gone", "stray"]);
        assert_eq!(p.status["desiredNumberScheduled"], 2);
        assert_eq!(p.status["currentNumberScheduled"], 1);
        assert_eq!(p.status["numberMisscheduled"], 1);
        assert_eq!(p.status["numberReady"], 1);
    }

    #[test]
    fn a_new_template_rolls_one_node_at_a_time() {
        let old = ds("module:v1");
        let (a, b) = (pod_on(&old, "n1", "a", true), pod_on(&old, "n2", "b", true));
        let new = ds("module:v2");
        let all = nodes(&[("n1", true), ("n2", true)]);
        let p = plan(&new, &all, &[&a, &b], 0);
        assert_eq!(p.delete, ["a"], "maxUnavailable 1");
        assert_eq!(p.status["updatedNumberScheduled"], 0);
        // n1's new pod not ready yet: n2 waits.
        let a2 = pod_on(&new, "n1", "a2", false);
        assert!(plan(&new, &all, &[&a2, &b], 0).delete.is_empty());
        let a2 = pod_on(&new, "n1", "a2", true);
        assert_eq!(plan(&new, &all, &[&a2, &b], 0).delete, ["b"]);
    }

    #[test]
    fn pods_are_pinned_to_their_node_and_tolerate_its_troubles() {
        let p = pod_for(&ds("module:v1"), "n7");
        assert_eq!(target(&p).as_deref(), Some("n7"));
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");
        assert!(p["metadata"]["labels"][HASH].is_string());
        let keys: Vec<&str> = p["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["key"].as_str())
            .collect();
        assert!(keys.contains(&"node.kubernetes.io/unreachable"));
        assert!(keys.contains(&"node.kubernetes.io/unschedulable"));
    }
}
