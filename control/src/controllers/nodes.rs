//! The node lifecycle controller: a node whose link has been gone longer than the grace
//! period is marked `Ready=Unknown` and tainted `node.kubernetes.io/unreachable` (NoSchedule,
//! NoExecute); its pods are evicted only once it has been gone longer than its autonomy
//! window (24 h unless `outpost.dev/autonomy-window` on the Node says otherwise, in seconds),
//! DaemonSet pods never; its pods are marked not ready at once, so Services stop sending to
//! them. When its link returns, the taints go (the agent reports Ready itself, and its pods'
//! status again).
//!
//! Other NoExecute taints (`kubectl taint nodes N key=value:NoExecute`) evict the pods that
//! do not tolerate them at once, and those that tolerate them for `tolerationSeconds` once
//! that has passed, as kube-controller-manager's taint eviction controller does.
//!
//! Liveness comes from the link records the gateways write when a link comes or goes
//! (`/outpost/links/NODE`), so a node linked to any member counts, and no heartbeat is ever
//! a durable write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{Api, User};
use crate::gateway::LINK_PREFIX;
use crate::store::Consistency;
use outpost_api::store::KeyValue;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NODES: &str = "/registry/core/nodes/";
pub const WINDOW_ANNOTATION: &str = "outpost.dev/autonomy-window";

/// How long a node may be gone before it is called unreachable, and before its pods are
/// evicted.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    pub grace: Duration,
    pub window: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            grace: Duration::from_secs(40),
            window: Duration::from_secs(24 * 3600),
        }
    }
}

/// What to do about one node.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Set its conditions to Unknown.
    pub unknown: bool,
    /// Add the unreachable taints.
    pub taint: bool,
    /// Remove them: the node is back.
    pub untaint: bool,
    /// Its autonomy window is over: evict its pods.
    pub evict: bool,
}

/// Judge `node` from its link record at `now` (unix seconds). `since` stands for when the
/// node was last known to be linked if it has no record (the controller's start).
pub fn judge(node: &Value, link: Option<&Value>, now: i64, since: i64, l: &Lifecycle) -> Verdict {
    let linked = link.is_some_and(|r| r["connected"] == true);
    let tainted = node["spec"]["taints"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["key"] == UNREACHABLE));
    if linked {
        return Verdict {
            untaint: tainted,
            ..Verdict::default()
        };
    }
    let gone_since = link.and_then(|r| r["since"].as_i64()).unwrap_or(since);
    let gone = now - gone_since;
    if gone <= l.grace.as_secs() as i64 {
        return Verdict::default();
    }
    let window = node["metadata"]["annotations"][WINDOW_ANNOTATION]
        .as_str()
        .and_then(|w| w.parse::<i64>().ok())
        .unwrap_or(l.window.as_secs() as i64);
    let ready = node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"].as_str().unwrap_or(""));
    Verdict {
        unknown: ready != Some("Unknown"),
        taint: !tainted,
        untaint: false,
        evict: gone > window,
    }
}

fn controller() -> User {
    super::system_user("system:node-controller")
}

async fn call(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: &Value) -> u16 {
    let (status, v) = crate::api::call_as(api, &controller(), method, path, ct, body).await;
    if !(200..300).contains(&status) {
        tracing::debug!(%method, %path, %status, message = %v["message"], "node controller write failed");
    }
    status
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Watch over nodes until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>, l: Lifecycle) {
    let mut led_since: Option<i64> = None;
    // Linked nodes that may need something (all of them at first); the others are not even
    // decoded, so a large fleet of healthy nodes costs a key scan every 2 s.
    let mut heed: Option<HashSet<String>> = None;
    let mut seen = Seen::default();
    // Nodes this leadership has registered (announced with a RegisteredNode event, as
    // kube-controller-manager's node controller does when it first sees each).
    let mut known: HashSet<String> = HashSet::new();
    // Pods bound to a node that does not exist, by key, and since when (unix seconds).
    let mut orphans: HashMap<String, i64> = HashMap::new();
    let mut round = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !api.store.leads() {
            led_since = None;
            heed = None;
            seen = Seen::default();
            known.clear();
            orphans.clear();
            continue;
        }
        round += 1;
        // A node with no record has been unaccounted for only since this leadership began.
        let since = *led_since.get_or_insert_with(unix_now);
        // One read of the Nodes serves both passes.
        let nodes = match api
            .store
            .range(NODES, None, 0, Consistency::Serializable)
            .await
        {
            Ok(page) => page.kvs,
            Err(e) => {
                tracing::debug!(error = %e, "nodes not read");
                continue;
            }
        };
        for kv in &nodes {
            let name = kv.key.trim_start_matches(NODES);
            if known.insert(name.to_string()) {
                if let Ok(node) = serde_json::from_slice::<Value>(&kv.value) {
                    let msg = format!("Node {name} event: Registered Node {name} in Controller");
                    super::event(
                        &api,
                        "node-controller",
                        &node,
                        "Normal",
                        "RegisteredNode",
                        &msg,
                    )
                    .await;
                }
            }
        }
        let current: HashSet<&str> = nodes
            .iter()
            .map(|kv| kv.key.trim_start_matches(NODES))
            .collect();
        known.retain(|n| current.contains(n.as_str()));
        // As the pod garbage collector: a pod whose node is gone (`kubectl delete node`) is
        // deleted once it has been so for the grace period (40 s, as its quarantine); its
        // controller makes another.
        if round.is_multiple_of(5) {
            let grace = l.grace.as_secs() as i64;
            if let Err(e) = collect_orphans(&api, &current, grace, &mut orphans).await {
                tracing::debug!(error = %e, "orphaned pods pass failed");
            }
        }
        if let Err(e) = taint_evictions(&api, &nodes, &mut seen).await {
            tracing::debug!(error = %e, "taint eviction pass failed");
        }
        if let Err(e) = pass(&api, &nodes, &l, since, &mut heed).await {
            tracing::debug!(error = %e, "node lifecycle pass failed");
        }
    }
}

async fn list(api: &Arc<Api>, prefix: &str) -> Result<Vec<(String, Value)>, String> {
    let page = api
        .store
        .range(prefix, None, 0, Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?;
    Ok(page
        .kvs
        .iter()
        .filter_map(|kv| {
            let v = serde_json::from_slice(&kv.value).ok()?;
            Some((kv.key.trim_start_matches(prefix).to_string(), v))
        })
        .collect())
}

async fn pass(
    api: &Arc<Api>,
    nodes: &[KeyValue],
    l: &Lifecycle,
    since: i64,
    heed: &mut Option<HashSet<String>>,
) -> Result<(), String> {
    let links: HashMap<String, Value> = list(api, LINK_PREFIX).await?.into_iter().collect();
    let now = unix_now();
    let first = heed.is_none();
    let heed = heed.get_or_insert_with(HashSet::new);
    for kv in nodes {
        let name = kv.key.trim_start_matches(NODES).to_string();
        let link = links.get(&name);
        let linked = link.is_some_and(|r| r["connected"] == true);
        if linked && !first && !heed.contains(&name) {
            continue;
        }
        let Ok(node) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let (name, node) = (&name, &node);
        let v = judge(node, link, now, since, l);
        // A linked node with nothing to undo needs no look until its link goes.
        if linked && !v.untaint {
            heed.remove(name);
        } else {
            heed.insert(name.clone());
        }
        let path = format!("/api/v1/nodes/{name}");
        if v.unknown {
            let t = crate::api::now();
            let conditions: Vec<Value> = node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let mut c = c.clone();
                    c["status"] = json!("Unknown");
                    c["reason"] = json!("NodeStatusUnknown");
                    c["message"] = json!("Kubelet stopped posting node status.");
                    c["lastTransitionTime"] = json!(t);
                    c
                })
                .collect();
            let body = json!({"status": {"conditions": conditions}});
            if call(api, "PATCH", &format!("{path}/status"), MERGE, &body).await < 300 {
                tracing::info!(node = %name, "node unreachable");
                let msg = format!("Node {name} status is now: NodeNotReady");
                super::event(api, "node-controller", node, "Normal", "NodeNotReady", &msg).await;
                mark_not_ready(api, name).await?;
            }
        }
        if v.taint || v.untaint {
            let mut taints: Vec<Value> = node["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t["key"] != UNREACHABLE)
                .collect();
            if v.taint {
                for effect in ["NoSchedule", "NoExecute"] {
                    taints.push(json!({"key": UNREACHABLE, "effect": effect,
                        "timeAdded": crate::api::now()}));
                }
            }
            call(
                api,
                "PATCH",
                &path,
                MERGE,
                &json!({"spec": {"taints": taints}}),
            )
            .await;
        }
        if v.untaint {
            let msg = format!("Node {name} status is now: NodeReady");
            super::event(api, "node-controller", node, "Normal", "NodeReady", &msg).await;
        }
        if v.evict {
            evict(api, name).await?;
        }
    }
    Ok(())
}

const MERGE: &str = "application/merge-patch+json";

/// The clocks of `tolerationSeconds` (unix seconds): when each NoExecute taint was first
/// seen on its node, by (node, key, effect), and each pod first seen under one, by uid; a
/// pod's time runs from the later of the two, as the taint eviction controller's does.
#[derive(Default)]
struct Seen {
    taints: HashMap<(String, String, String), i64>,
    pods: HashMap<String, i64>,
}

/// The NoExecute taints the taint eviction controller acts on: all but the lifecycle's own
/// unreachable taint, whose pods wait for the node's autonomy window instead.
fn no_execute(node: &Value) -> Vec<&Value> {
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["effect"] == "NoExecute" && t["key"] != UNREACHABLE)
        .collect()
}

/// Whether toleration `tol` tolerates `taint`, as the scheduler's helper decides.
pub fn tolerates(tol: &Value, taint: &Value) -> bool {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let effect = text(&tol["effect"]);
    if !effect.is_empty() && effect != text(&taint["effect"]) {
        return false;
    }
    let key = text(&tol["key"]);
    if !key.is_empty() && key != text(&taint["key"]) {
        return false;
    }
    match tol["operator"].as_str().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" => !key.is_empty() && text(&tol["value"]) == text(&taint["value"]),
        _ => false,
    }
}

/// When `pod` is to be evicted from under `taints` (each with when it was first seen): at
/// once if one is not tolerated, when the shortest `tolerationSeconds` of those tolerating
/// them has passed, or never.
pub fn eviction_at(pod: &Value, taints: &[(&Value, i64)]) -> Option<i64> {
    let tolerations: Vec<&Value> = pod["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let mut at: Option<i64> = None;
    for (taint, seen) in taints {
        // The first toleration that matches is the one that counts, as in Kubernetes.
        let Some(tol) = tolerations.iter().find(|t| tolerates(t, taint)) else {
            return Some(*seen);
        };
        if let Some(l) = tol["tolerationSeconds"].as_i64() {
            let when = seen + l.max(0);
            at = Some(at.map_or(when, |a| a.min(when)));
        }
    }
    at
}

/// Evict pods from nodes with NoExecute taints they do not tolerate (or no longer do).
async fn taint_evictions(
    api: &Arc<Api>,
    nodes: &[KeyValue],
    seen: &mut Seen,
) -> Result<(), String> {
    let now = unix_now();
    let mut tainted: HashMap<String, Vec<(Value, i64)>> = HashMap::new();
    let mut still = HashSet::new();
    for kv in nodes {
        // Most nodes have no such taint: only those whose bytes mention one are decoded.
        if !kv.value.windows(9).any(|w| w == b"NoExecute") {
            continue;
        }
        let Ok(node) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let name = kv.key.trim_start_matches(NODES).to_string();
        for t in no_execute(&node) {
            let id = (
                name.clone(),
                t["key"].as_str().unwrap_or("").to_string(),
                t["effect"].as_str().unwrap_or("").to_string(),
            );
            let first = *seen.taints.entry(id.clone()).or_insert(now);
            still.insert(id);
            tainted
                .entry(name.clone())
                .or_default()
                .push((t.clone(), first));
        }
    }
    seen.taints.retain(|k, _| still.contains(k));
    if tainted.is_empty() {
        seen.pods.clear();
        return Ok(());
    }
    // Only the pods whose bytes name a tainted node are decoded.
    let marks: Vec<Vec<u8>> = tainted
        .keys()
        .map(|n| format!("\"nodeName\":{}", json!(n)).into_bytes())
        .collect();
    let page = api
        .store
        .range("/registry/core/pods/", None, 0, Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?;
    let mut present = HashSet::new();
    for kv in &page.kvs {
        if !marks
            .iter()
            .any(|m| kv.value.windows(m.len()).any(|w| w == m.as_slice()))
        {
            continue;
        }
        let Ok(p) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let Some(taints) = p["spec"]["nodeName"].as_str().and_then(|n| tainted.get(n)) else {
            continue;
        };
        // Finished pods stay: a Job counts its completions and failures from them.
        let done = matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        if !p["metadata"]["deletionTimestamp"].is_null() || done {
            continue;
        }
        let uid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let since = *seen.pods.entry(uid.clone()).or_insert(now);
        present.insert(uid);
        let list: Vec<(&Value, i64)> = taints.iter().map(|(t, s)| (t, (*s).max(since))).collect();
        if eviction_at(&p, &list).is_none_or(|at| at > now) {
            continue;
        }
        delete_pod(api, &p, "a NoExecute taint it does not tolerate").await;
    }
    seen.pods.retain(|k, _| present.contains(k));
    Ok(())
}

/// Delete `p` as the taint eviction controller does, saying so in an event.
async fn delete_pod(api: &Arc<Api>, p: &Value, why: &str) {
    let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = p["metadata"]["name"].as_str().unwrap_or("");
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
    if call(api, "DELETE", &path, "application/json", &json!({})).await < 300 {
        let node = p["spec"]["nodeName"].as_str().unwrap_or("");
        tracing::info!(%node, pod = %format!("{ns}/{name}"), "evicted: {why}");
        let msg = format!("Marking for deletion Pod {ns}/{name}");
        super::event(
            api,
            "taint-eviction-controller",
            p,
            "Normal",
            "TaintManagerEviction",
            &msg,
        )
        .await;
    }
}

/// Mark the pods of an unreachable node not ready (Services stop sending to them); the
/// node's agent reports them again when it is back.
async fn mark_not_ready(api: &Arc<Api>, node: &str) -> Result<(), String> {
    let pods = list(api, "/registry/core/pods/").await?;
    let t = crate::api::now();
    for (_, p) in pods.iter().filter(|(_, p)| p["spec"]["nodeName"] == node) {
        let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if !ready {
            continue;
        }
        let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let body = json!({"status": {"conditions": [{"type": "Ready", "status": "False",
            "reason": "NodeNotReady", "message": "the node is unreachable",
            "lastProbeTime": null, "lastTransitionTime": t}]}});
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
        call(
            api,
            "PATCH",
            &path,
            "application/strategic-merge-patch+json",
            &body,
        )
        .await;
    }
    Ok(())
}

/// Delete the pods bound to a node not among `nodes` for `grace` seconds.
async fn collect_orphans(
    api: &Arc<Api>,
    nodes: &HashSet<&str>,
    grace: i64,
    orphans: &mut HashMap<String, i64>,
) -> Result<(), String> {
    let page = api
        .store
        .range("/registry/core/pods/", None, 0, Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?;
    let now = unix_now();
    let mut still = HashSet::new();
    for kv in &page.kvs {
        let Ok(p) = crate::api::pick::only(&kv.value, &["metadata", "spec.nodeName"]) else {
            continue;
        };
        let node = p["spec"]["nodeName"].as_str().unwrap_or("");
        if node.is_empty() || nodes.contains(node) {
            continue;
        }
        still.insert(kv.key.clone());
        let since = *orphans.entry(kv.key.clone()).or_insert(now);
        if now - since < grace {
            continue;
        }
        let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        let body = json!({"gracePeriodSeconds": 0,
            "preconditions": {"uid": p["metadata"]["uid"]}});
        if call(api, "DELETE", &path, "application/json", &body).await < 300 {
            tracing::info!(%node, pod = %format!("{ns}/{name}"), "deleted a pod whose node is gone");
        }
    }
    orphans.retain(|k, _| still.contains(k));
    Ok(())
}

/// Delete the pods of an unreachable node, DaemonSet pods aside; their controllers replace
/// them elsewhere.
async fn evict(api: &Arc<Api>, node: &str) -> Result<(), String> {
    let pods = list(api, "/registry/core/pods/").await?;
    for (_, p) in pods {
        let on_node = p["spec"]["nodeName"] == node;
        let daemon = p["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["kind"] == "DaemonSet"));
        if !on_node || daemon || !p["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        delete_pod(api, &p, "the node's autonomy window is over").await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_execute_taints_evict_what_does_not_tolerate_them() {
        let taint = json!({"key": "maint", "value": "now", "effect": "NoExecute"});
        let pod = |tols: Value| json!({"spec": {"tolerations": tols}});
        let t = [(&taint, 100)];
        assert_eq!(eviction_at(&pod(json!([])), &t), Some(100));
        assert_eq!(
            eviction_at(&pod(json!([{"key": "maint", "operator": "Exists"}])), &t),
            None
        );
        assert_eq!(
            eviction_at(
                &pod(
                    json!([{"key": "maint", "value": "now", "effect": "NoExecute", "tolerationSeconds": 30}])
                ),
                &t
            ),
            Some(130)
        );
        // A wrong value, or another effect, tolerates nothing.
        assert_eq!(
            eviction_at(&pod(json!([{"key": "maint", "value": "later"}])), &t),
            Some(100)
        );
        assert_eq!(
            eviction_at(
                &pod(json!([{"key": "maint", "operator": "Exists", "effect": "NoSchedule"}])),
                &t
            ),
            Some(100)
        );
        // An empty key with Exists tolerates every taint.
        assert_eq!(eviction_at(&pod(json!([{"operator": "Exists"}])), &t), None);
        // The lifecycle's unreachable taint is left to the autonomy window.
        let node =
            json!({"spec": {"taints": [{"key": UNREACHABLE, "effect": "NoExecute"}, taint]}});
        assert_eq!(no_execute(&node).len(), 1);
    }

    fn node(ready: &str, tainted: bool, window: Option<&str>) -> Value {
        let mut n = json!({"metadata": {"name": "n", "annotations": {}},
            "spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}});
        if tainted {
            n["spec"]["taints"]
                .as_array_mut()
                .unwrap()
                .push(json!({"key": UNREACHABLE, "effect": "NoExecute"}));
        }
        if let Some(w) = window {
            n["metadata"]["annotations"][WINDOW_ANNOTATION] = json!(w);
        }
        n
    }

    #[test]
    fn a_node_gone_past_its_grace_is_unknown_and_tainted_then_evicted_past_its_window() {
        let l = Lifecycle {
            grace: Duration::from_secs(40),
            window: Duration::from_secs(3600),
        };
        let lost = |at: i64| json!({"member": 1, "connected": false, "since": at});
        // Within the grace period: nothing.
        assert_eq!(
            judge(&node("True", false, None), Some(&lost(1000)), 1030, 0, &l),
            Verdict::default()
        );
        // Past it: Unknown and tainted, not yet evicted.
        let v = judge(&node("True", false, None), Some(&lost(1000)), 1041, 0, &l);
        assert_eq!(
            v,
            Verdict {
                unknown: true,
                taint: true,
                untaint: false,
                evict: false
            }
        );
        // Already marked: only eviction is left to decide.
        let v = judge(&node("Unknown", true, None), Some(&lost(1000)), 2000, 0, &l);
        assert_eq!(v, Verdict::default());
        let v = judge(&node("Unknown", true, None), Some(&lost(1000)), 4601, 0, &l);
        assert!(v.evict && !v.unknown && !v.taint);
        // A per-node window overrides the default.
        let v = judge(
            &node("Unknown", true, Some("60")),
            Some(&lost(1000)),
            1061,
            0,
            &l,
        );
        assert!(v.evict);
        // No record: counted from when this leader began.
        let v = judge(&node("True", false, None), None, 1041, 1000, &l);
        assert!(v.unknown && v.taint);
        // Back: the taints go.
        let back = json!({"member": 2, "connected": true, "since": 5000});
        assert_eq!(
            judge(&node("Unknown", true, None), Some(&back), 9999, 0, &l),
            Verdict {
                untaint: true,
                ..Verdict::default()
            }
        );
    }
}
