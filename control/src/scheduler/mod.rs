//! The scheduler: binds each pod without a node to the best node for it, on the Raft leader.
//!
//! ```text
//! list pods, nodes, RuntimeClasses ─▶ snapshot ◀─ watch /registry/ (each key's newest revision
//!                                        │         wins, so replays from the list are harmless)
//!   each round: every pending pod ─▶ fit::pick ─▶ assumed on its node ─▶ bindings, many in
//!               flight (one group commit) ─▶ a failed one is taken back and retried
//!   fits nowhere ─▶ PodScheduled=False + FailedScheduling event with the reasons; parked
//!               until a node changes or a pod leaves one
//! ```
//!
//! The decisions are [`fit`]'s pure functions; this module does the IO. Binding goes through
//! the API's binding subresource, as kube-scheduler's does, under `system:kube-scheduler`.

pub mod fit;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use outpost_api::store::{EventKind, KeyValue};
use serde_json::{json, Value};

use crate::api::{Api, User};
use crate::store::{Consistency, WatchItem};
use fit::{Needs, NodeInfo};

pub use fit::needs_oci;

const PODS: &str = "/registry/core/pods/";
const NODES: &str = "/registry/core/nodes/";
const CLASSES: &str = "/registry/node.k8s.io/runtimeclasses/";
/// Bindings in flight at once.
const BINDS: usize = 64;

fn scheduler() -> User {
    crate::controllers::system_user("system:kube-scheduler")
}

async fn call(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: Value) -> (u16, Value) {
    crate::api::call_as(api, &scheduler(), method, path, ct, &body).await
}

/// Schedule until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    crate::controllers::while_leader(&api, "scheduler", |a| async move { lead(&a).await }).await
}

fn is_leader(api: &Api) -> bool {
    let st = api.store.status();
    st.leader == Some(st.id)
}

/// A pod the scheduler has seen: where it runs (if anywhere) and what it takes there.
struct Placed {
    node: String,
    needs: Needs,
}

#[derive(Default)]
struct Snapshot {
    nodes: BTreeMap<String, NodeInfo>,
    /// Pods on a node, or assumed there while their binding is in flight.
    placed: HashMap<String, Placed>,
    /// Pods waiting for a node, oldest first: (create revision, key) → pod.
    pending: BTreeMap<(u64, String), Value>,
    pending_at: HashMap<String, u64>,
    /// Pending pods that fit nowhere, left alone until the cluster changes.
    parked: HashSet<String>,
    /// Each key's newest revision applied.
    seen: HashMap<String, u64>,
    /// RuntimeClass name → its scheduling.nodeSelector.
    classes: HashMap<String, Value>,
    /// The unschedulable message last written per pod, so it is written once.
    told: HashMap<String, String>,
    turn: usize,
}

fn pod_key(key: &str) -> &str {
    key.strip_prefix(PODS).unwrap_or(key)
}

impl Snapshot {
    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        let key = kv.key.as_str();
        let Some(obj) =
            crate::controllers::newer(&mut self.seen, &[PODS, NODES, CLASSES], kind, kv)
        else {
            return;
        };
        if let Some(name) = key.strip_prefix(NODES) {
            match obj {
                Some(o) => {
                    let mut info = NodeInfo::of(&o);
                    if let Some(old) = self.nodes.get(name) {
                        info.carry(old);
                    }
                    self.nodes.insert(name.to_string(), info);
                }
                None => {
                    self.nodes.remove(name);
                }
            }
            self.parked.clear();
        } else if let Some(name) = key.strip_prefix(CLASSES) {
            match obj {
                Some(o) => self
                    .classes
                    .insert(name.to_string(), o["scheduling"]["nodeSelector"].clone()),
                None => self.classes.remove(name),
            };
            self.parked.clear();
        } else {
            self.pod(pod_key(key), kv.create_revision, obj);
        }
    }

    fn pod(&mut self, key: &str, created: u64, obj: Option<Value>) {
        if let Some(at) = self.pending_at.remove(key) {
            self.pending.remove(&(at, key.to_string()));
        }
        let node = obj
            .as_ref()
            .and_then(|o| o["spec"]["nodeName"].as_str())
            .unwrap_or("")
            .to_string();
        let finished = obj
            .as_ref()
            .is_some_and(|o| matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed")));
        // Where it was counted before, if anywhere.
        if let Some(old) = self.placed.remove(key) {
            if let Some(n) = self.nodes.get_mut(&old.node) {
                n.remove(&old.needs);
            }
            // A pod leaving a node may make room for a parked one.
            if obj.is_none() || finished {
                self.parked.clear();
            }
        }
        let Some(o) = obj else {
            self.parked.remove(key);
            self.told.remove(key);
            return;
        };
        if finished {
            return;
        }
        if node.is_empty() {
            let ours = o["spec"]["schedulerName"]
                .as_str()
                .is_none_or(|s| s == "default-scheduler");
            if ours && o["metadata"]["deletionTimestamp"].is_null() {
                // What the pod already says need not be written again (after a restart of
                // the scheduler, re-reporting every waiting pod would feed its own watch).
                let said = o["status"]["conditions"].as_array().and_then(|c| {
                    c.iter()
                        .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                });
                if let Some(m) = said.and_then(|c| c["message"].as_str()) {
                    self.told.insert(key.to_string(), m.to_string());
                }
                self.pending_at.insert(key.to_string(), created);
                self.pending.insert((created, key.to_string()), o);
            }
            return;
        }
        self.parked.remove(key);
        self.told.remove(key);
        let needs = fit::needs(&o, &Value::Null);
        if let Some(n) = self.nodes.get_mut(&node) {
            n.add(&needs);
        }
        self.placed.insert(key.to_string(), Placed { node, needs });
    }

    fn class_selector(&self, pod: &Value) -> Value {
        pod["spec"]["runtimeClassName"]
            .as_str()
            .and_then(|c| self.classes.get(c))
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// Lead scheduling until leadership is lost or the watch breaks.
async fn lead(api: &Arc<Api>) -> Result<(), String> {
    let mut snap = Snapshot::default();
    // Nodes and classes first, so the pods find them when they are counted.
    let mut w = crate::controllers::list_and_watch(api, &[NODES, CLASSES, PODS], |kv| {
        snap.apply(&EventKind::Put, kv)
    })
    .await?;
    loop {
        if !is_leader(api) {
            return Ok(());
        }
        round(api, &mut snap).await;
        // Sleep until something changes (or a while, to notice a lost leadership), then take
        // everything already queued before the next round.
        let first = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
        let mut item = match first {
            Ok(Some(i)) => Some(i),
            Ok(None) => return Err("the watch fell behind".into()),
            Err(_) => None,
        };
        while let Some(i) = item {
            if let WatchItem::Revision(r) = i {
                for e in &r.events {
                    snap.apply(&e.kind, &e.kv);
                }
            }
            item = match w.next().now_or_never() {
                Some(Some(i)) => Some(i),
                Some(None) => return Err("the watch fell behind".into()),
                None => None,
            };
        }
    }
}

/// Place every pending pod that is not parked, then bind them.
async fn round(api: &Arc<Api>, snap: &mut Snapshot) {
    let mut binds = vec![];
    let mut unfit = vec![];
    let keys: Vec<(u64, String)> = snap
        .pending
        .keys()
        .filter(|(_, k)| !snap.parked.contains(k))
        .cloned()
        .collect();
    for at in keys {
        let Some(pod) = snap.pending.get(&at) else {
            continue;
        };
        let needs = fit::needs(pod, &snap.class_selector(pod));
        let uid = uid_of(pod);
        let nodes: Vec<&NodeInfo> = snap.nodes.values().collect();
        snap.turn = snap.turn.wrapping_add(1);
        match fit::pick(&needs, &nodes, snap.turn) {
            Ok(i) => {
                let node = nodes[i].name.clone();
                // Assumed there until the binding lands (or fails and is taken back).
                if let Some(n) = snap.nodes.get_mut(&node) {
                    n.add(&needs);
                }
                snap.pending.remove(&at);
                snap.pending_at.remove(&at.1);
                snap.placed.insert(
                    at.1.clone(),
                    Placed {
                        node: node.clone(),
                        needs,
                    },
                );
                binds.push((at, node, uid));
            }
            Err(msg) => {
                snap.parked.insert(at.1.clone());
                if snap.told.get(&at.1) != Some(&msg) {
                    snap.told.insert(at.1.clone(), msg.clone());
                    unfit.push((at.1, uid, msg));
                }
            }
        }
    }
    for (key, uid, msg) in unfit {
        unschedulable(api, &key, &uid, &msg).await;
    }
    let results: Vec<((u64, String), String, bool)> = futures::stream::iter(binds)
        .map(|(at, node, uid)| async move {
            let ok = bind(api, &at.1, &uid, &node).await;
            (at, node, ok)
        })
        .buffer_unordered(BINDS)
        .collect()
        .await;
    for (at, _, ok) in results {
        if ok {
            continue;
        }
        // Take the assumption back; the pod is pending again unless the watch says
        // otherwise (deleted, or bound by someone else), which it will in this round's events.
        if let Some(p) = snap.placed.remove(&at.1) {
            if let Some(n) = snap.nodes.get_mut(&p.node) {
                n.remove(&p.needs);
            }
        }
        // Its object is re-read from the store so the retry sees its current state.
        let key = format!("{PODS}{}", at.1);
        if let Ok(Some(kv)) = api.store.get(&key, Consistency::Serializable).await {
            snap.seen.remove(&key);
            snap.apply(&EventKind::Put, &kv);
        }
    }
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

async fn bind(api: &Arc<Api>, key: &str, uid: &str, node: &str) -> bool {
    let Some((ns, name)) = key.split_once('/') else {
        return false;
    };
    let body = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    let (status, v) = call(
        api,
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods/{name}/binding"),
        "application/json",
        body,
    )
    .await;
    if !(200..300).contains(&status) {
        tracing::debug!(pod = %key, %status, message = %v["message"], "binding failed");
        return false;
    }
    event(
        api,
        (ns, name, uid),
        "Normal",
        "Scheduled",
        &format!("Successfully assigned {ns}/{name} to {node}"),
    )
    .await;
    true
}

/// `PodScheduled=False` with the reasons, and a FailedScheduling event.
async fn unschedulable(api: &Arc<Api>, key: &str, uid: &str, msg: &str) {
    let Some((ns, name)) = key.split_once('/') else {
        return;
    };
    let patch = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": msg,
        "lastProbeTime": null, "lastTransitionTime": crate::api::now()}]}});
    call(
        api,
        "PATCH",
        &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
        "application/strategic-merge-patch+json",
        patch,
    )
    .await;
    event(api, (ns, name, uid), "Warning", "FailedScheduling", msg).await;
}

/// An event about the pod `(namespace, name, uid)`; `kubectl describe` finds it by the uid.
async fn event(
    api: &Arc<Api>,
    (ns, pod, uid): (&str, &str, &str),
    kind: &str,
    reason: &str,
    msg: &str,
) {
    let obj = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns, "uid": uid}});
    crate::controllers::event(api, "default-scheduler", &obj, kind, reason, msg).await;
}
