//! The scheduler: binds each pod without a node to the best node for it, on the Raft leader.
//!
//! ```text
//! list pods, nodes, RuntimeClasses,  ─▶ snapshot ◀─ watch /registry/ (each key's newest
//!      claims, volumes, StorageClasses      │        revision wins, so replays from the list
//!                                           │        are harmless)
//!   each pending pod, oldest first ─▶ fit::pick ─▶ assumed on its node ─▶ its binding,
//!               up to 64 in flight while the watch is read ─▶ a failed one is taken back
//!   fits nowhere ─▶ PodScheduled=False + FailedScheduling event with the reasons; parked
//!               until a node, claim or volume changes or a pod leaves a node
//!   claims of a WaitForFirstConsumer class ─▶ the chosen node named on each claim
//!               (`volume.kubernetes.io/selected-node`) ─▶ bound there ─▶ then the binding
//! ```
//!
//! The decisions are [`fit`]'s pure functions; this module does the IO. A binding and its
//! Scheduled event are stored in one transaction as the API's binding subresource and an
//! event's create would store them ([`crate::api::bind_with_event`]).

pub mod fit;
pub mod topo;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use outpost_api::store::{Event, EventKind, KeyValue};
use serde_json::{json, Value};

use crate::api::{Api, User};
use crate::store::{Consistency, WatchItem};
use fit::{Needs, NodeInfo};

pub use fit::needs_oci;

const PODS: &str = "/registry/core/pods/";
const NODES: &str = "/registry/core/nodes/";
const CLASSES: &str = "/registry/node.k8s.io/runtimeclasses/";
const NAMESPACES: &str = "/registry/core/namespaces/";
const CLAIMS: &str = "/registry/core/persistentvolumeclaims/";
const VOLUMES: &str = "/registry/core/persistentvolumes/";
const STORAGE: &str = "/registry/storage.k8s.io/storageclasses/";
/// How long a binding waits for the claims it had provisioned on its node to be bound.
const CLAIM_WAIT: Duration = Duration::from_secs(30);
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

/// A pod the scheduler has seen: where it runs (if anywhere) and what it takes there.
struct Placed {
    node: String,
    needs: Needs,
}

/// A pod waiting for a node: what it needs (its RuntimeClass's selector is added when it is
/// placed, as the class may change meanwhile), kept instead of the whole pod.
struct Waiting {
    needs: Needs,
    class: Option<String>,
    uid: String,
    /// The PersistentVolumeClaims its volumes name.
    claims: Vec<String>,
}

/// A PersistentVolumeClaim as the scheduler sees it.
struct Claim {
    /// The volume it is bound to.
    volume: Option<String>,
    class: String,
    deleting: bool,
}

/// The nodes, in a list `fit::pick` takes as it is, and by name.
#[derive(Default)]
struct Nodes {
    list: Vec<NodeInfo>,
    at: HashMap<String, usize>,
}

impl Nodes {
    fn get(&self, name: &str) -> Option<&NodeInfo> {
        self.at.get(name).map(|i| &self.list[*i])
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut NodeInfo> {
        self.at.get(name).map(|i| &mut self.list[*i])
    }

    fn insert(&mut self, info: NodeInfo) {
        match self.at.get(&info.name) {
            Some(i) => self.list[*i] = info,
            None => {
                self.at.insert(info.name.clone(), self.list.len());
                self.list.push(info);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(i) = self.at.remove(name) {
            self.list.swap_remove(i);
            if let Some(moved) = self.list.get(i) {
                self.at.insert(moved.name.clone(), i);
            }
        }
    }
}

#[derive(Default)]
struct Snapshot {
    nodes: Nodes,
    /// Pods on a node, or assumed there while their binding is in flight.
    placed: HashMap<String, Placed>,
    /// Pods waiting for a node, oldest first: (create revision, key) → what it needs.
    pending: BTreeMap<(u64, String), Waiting>,
    pending_at: HashMap<String, u64>,
    /// Pending pods that fit nowhere, left alone until the cluster changes.
    parked: HashSet<String>,
    /// Pending pods not parked: the next to place, oldest first.
    ready: BTreeSet<(u64, String)>,
    /// Each key's newest revision applied.
    seen: HashMap<String, u64>,
    /// RuntimeClass name → its scheduling.nodeSelector.
    classes: HashMap<String, Value>,
    /// Namespace name → its labels, for pod affinity's `namespaceSelector`.
    namespaces: HashMap<String, Value>,
    /// Claims by `namespace/name`.
    claims: HashMap<String, Claim>,
    /// PersistentVolumes' required node affinity, by name (`None`: any node).
    volumes: HashMap<String, Option<Vec<fit::Term>>>,
    /// StorageClasses that bind when a pod is scheduled (`WaitForFirstConsumer`).
    late: HashSet<String>,
    /// The unschedulable message last written per pod, so it is written once.
    told: HashMap<String, String>,
    turn: usize,
}

fn pod_key(key: &str) -> &str {
    key.strip_prefix(PODS).unwrap_or(key)
}

impl Snapshot {
    /// Take in `e` if it is a status write of a placed pod, without decoding the pod: all
    /// that can change for the scheduler then is whether the pod has ended. `false` for any
    /// other change, which [`Snapshot::apply`] takes.
    fn status_write(&mut self, e: &Event) -> bool {
        let kv = &e.kv;
        let placed = kv.key.starts_with(PODS) && self.placed.contains_key(pod_key(&kv.key));
        let status_only = placed
            && matches!(e.kind, EventKind::Put)
            && e.prev
                .as_ref()
                .is_some_and(|p| crate::api::raw::status_only(&p.value, &kv.value));
        if !status_only {
            return false;
        }
        // Read before the revision counts as seen: one that cannot be read is left to
        // `apply`, whole.
        let Ok(o) = crate::api::pick::only(&kv.value, &["status.phase"]) else {
            return false;
        };
        if !crate::controllers::fresh(&mut self.seen, &[PODS], kv) {
            return true;
        }
        if matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) {
            // An ended pod is only taken off its node, which reads nothing else.
            self.pod(pod_key(&kv.key), kv.create_revision, Some(o));
        }
        true
    }

    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        let key = kv.key.as_str();
        // Neither managed fields nor containers' statuses (a pod's largest parts after its
        // spec) count in placing pods.
        let Some(obj) = crate::controllers::newer_by(
            &mut self.seen,
            &[PODS, NODES, CLASSES, NAMESPACES, CLAIMS, VOLUMES, STORAGE],
            kind,
            kv,
            |raw| {
                crate::api::pick::without(
                    raw,
                    &[
                        "metadata.managedFields",
                        "status.containerStatuses",
                        "status.initContainerStatuses",
                        "status.ephemeralContainerStatuses",
                    ],
                )
            },
        ) else {
            return;
        };
        if let Some(k) = key.strip_prefix(CLAIMS) {
            match obj {
                Some(o) => self.claims.insert(
                    k.to_string(),
                    Claim {
                        volume: o["spec"]["volumeName"]
                            .as_str()
                            .filter(|v| !v.is_empty())
                            .map(String::from),
                        class: o["spec"]["storageClassName"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        deleting: !o["metadata"]["deletionTimestamp"].is_null(),
                    },
                ),
                None => self.claims.remove(k),
            };
            self.unpark_all();
            return;
        }
        if let Some(k) = key.strip_prefix(VOLUMES) {
            match obj {
                Some(o) => self.volumes.insert(k.to_string(), fit::volume_terms(&o)),
                None => self.volumes.remove(k),
            };
            self.unpark_all();
            return;
        }
        if let Some(k) = key.strip_prefix(STORAGE) {
            if obj
                .as_ref()
                .is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer")
            {
                self.late.insert(k.to_string());
            } else {
                self.late.remove(k);
            }
            self.unpark_all();
            return;
        }
        if let Some(name) = key.strip_prefix(NODES) {
            match obj {
                Some(o) => {
                    let mut info = NodeInfo::of(&o);
                    if let Some(old) = self.nodes.get(name) {
                        info.carry(old);
                    }
                    self.nodes.insert(info);
                }
                None => {
                    self.nodes.remove(name);
                }
            }
            self.unpark_all();
        } else if let Some(name) = key.strip_prefix(NAMESPACES) {
            match obj {
                Some(o) => self
                    .namespaces
                    .insert(name.to_string(), o["metadata"]["labels"].clone()),
                None => self.namespaces.remove(name),
            };
            self.unpark_all();
        } else if let Some(name) = key.strip_prefix(CLASSES) {
            match obj {
                Some(o) => self
                    .classes
                    .insert(name.to_string(), o["scheduling"]["nodeSelector"].clone()),
                None => self.classes.remove(name),
            };
            self.unpark_all();
        } else {
            self.pod(pod_key(key), kv.create_revision, obj);
        }
    }

    fn pod(&mut self, key: &str, created: u64, obj: Option<Value>) {
        if let Some(at) = self.pending_at.remove(key) {
            self.pending.remove(&(at, key.to_string()));
            self.ready.remove(&(at, key.to_string()));
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
                self.unpark_all();
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
                let waiting = Waiting {
                    needs: fit::needs(&o, &Value::Null),
                    class: o["spec"]["runtimeClassName"].as_str().map(String::from),
                    uid: uid_of(&o),
                    claims: crate::api::node::pod_claims(&o).map(String::from).collect(),
                };
                self.pending.insert((created, key.to_string()), waiting);
                if !self.parked.contains(key) {
                    self.ready.insert((created, key.to_string()));
                }
            }
            return;
        }
        self.parked.remove(key);
        self.told.remove(key);
        let needs = fit::needs(&o, &Value::Null).with_namespaces(&self.namespaces);
        if let Some(n) = self.nodes.get_mut(&node) {
            n.add(&needs);
        }
        self.placed.insert(key.to_string(), Placed { node, needs });
    }

    /// The cluster changed: every parked pod gets another try.
    fn unpark_all(&mut self) {
        for key in std::mem::take(&mut self.parked) {
            if let Some(at) = self.pending_at.get(&key) {
                self.ready.insert((*at, key));
            }
        }
    }

    /// What the pod `key`'s claims ask: the node affinity of the volumes they are bound to,
    /// and those waiting for this pod's node to be provisioned or bound there. An error
    /// says why the pod cannot be placed yet.
    fn claims_of(
        &self,
        key: &str,
        names: &[String],
    ) -> Result<(Vec<Vec<fit::Term>>, Vec<String>), String> {
        let ns = key.split_once('/').map_or("", |(ns, _)| ns);
        let (mut terms, mut late) = (vec![], vec![]);
        for name in names {
            let Some(c) = self.claims.get(&format!("{ns}/{name}")) else {
                return Err(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            if c.deleting {
                return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
            }
            match &c.volume {
                Some(v) => match self.volumes.get(v) {
                    Some(t) => terms.extend(t.clone()),
                    None => {
                        return Err(format!(
                            "persistentvolumeclaim \"{name}\" bound to non-existent persistentvolume \"{v}\""
                        ))
                    }
                },
                None if self.late.contains(&c.class) => late.push(name.clone()),
                None => return Err("pod has unbound immediate PersistentVolumeClaims".into()),
            }
        }
        Ok((terms, late))
    }

    fn class_selector(&self, class: Option<&str>) -> &Value {
        class
            .and_then(|c| self.classes.get(c))
            .unwrap_or(&Value::Null)
    }
}

/// A write the scheduler started.
enum Done {
    /// A binding, and whether it landed.
    Bound((u64, String), bool),
    /// A pod told why it waits.
    Told,
}

/// Writes in flight, each its own task so that they run on every core.
type Flight = FuturesUnordered<tokio::task::JoinHandle<Done>>;

/// Lead scheduling until leadership is lost or the watch cannot go on. Placing, writing and
/// reading the watch overlap: up to [`BINDS`] writes are in flight while the watch is read.
async fn lead(api: &Arc<Api>) -> Result<(), String> {
    let mut snap = Snapshot::default();
    // Nodes and classes first, so the pods find them when they are counted.
    let mut w = crate::controllers::list_and_watch(
        api,
        &[NODES, CLASSES, NAMESPACES, STORAGE, VOLUMES, CLAIMS, PODS],
        |kv| snap.apply(&EventKind::Put, kv),
    )
    .await?;
    let mut flight = Flight::new();
    loop {
        if !api.store.leads() {
            return Ok(());
        }
        place(
            api,
            &mut snap,
            BINDS.saturating_sub(flight.len()),
            &mut flight,
        );
        tokio::select! {
            i = w.next() => see(&mut snap, i?),
            Some(d) = flight.next(), if !flight.is_empty() => {
                landed(api, &mut snap, d.unwrap_or(Done::Told)).await
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        while let Some(i) = w.ready().await? {
            see(&mut snap, i);
        }
        while let Some(Some(d)) = flight.next().now_or_never() {
            landed(api, &mut snap, d.unwrap_or(Done::Told)).await;
        }
    }
}

fn see(snap: &mut Snapshot, item: WatchItem) {
    if let WatchItem::Revision(r) = item {
        for e in &r.events {
            if !snap.status_write(e) {
                snap.apply(&e.kind, &e.kv);
            }
        }
    }
}

/// Place up to `room` waiting pods, oldest first, and start their writes.
fn place(api: &Arc<Api>, snap: &mut Snapshot, room: usize, flight: &mut Flight) {
    for _ in 0..room {
        let Some(at) = snap.ready.pop_first() else {
            return;
        };
        let Some(w) = snap.pending.get(&at) else {
            continue;
        };
        // A pod whose claims cannot be placed anywhere yet waits with their reason.
        let (volumes, late, blocked) = match snap.claims_of(&at.1, &w.claims) {
            Ok((volumes, late)) => (volumes, late, None),
            Err(e) => (vec![], vec![], Some(e)),
        };
        let needs = w
            .needs
            .with_class(snap.class_selector(w.class.as_deref()))
            .with_namespaces(&snap.namespaces)
            .with_volumes(volumes);
        let uid = w.uid.clone();
        snap.turn = snap.turn.wrapping_add(1);
        let api = api.clone();
        let picked = match blocked {
            Some(e) => Err(format!(
                "0/{} nodes are available: {e}.",
                snap.nodes.list.len()
            )),
            None => fit::pick(&needs, &snap.nodes.list, snap.turn),
        };
        match picked {
            Ok(i) => {
                let node = snap.nodes.list[i].name.clone();
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
                flight.push(tokio::spawn(async move {
                    let ok = claim(&api, &at.1, &late, &node).await
                        && bind(&api, &at.1, &uid, &node).await;
                    Done::Bound(at, ok)
                }));
            }
            Err(msg) => {
                snap.parked.insert(at.1.clone());
                if snap.told.get(&at.1) != Some(&msg) {
                    snap.told.insert(at.1.clone(), msg.clone());
                    flight.push(tokio::spawn(async move {
                        unschedulable(&api, &at.1, &uid, &msg).await;
                        Done::Told
                    }));
                }
            }
        }
    }
}

/// A write finished; a binding that failed is taken back.
async fn landed(api: &Arc<Api>, snap: &mut Snapshot, d: Done) {
    let Done::Bound(at, false) = d else {
        return;
    };
    if let Some(p) = snap.placed.remove(&at.1) {
        if let Some(n) = snap.nodes.get_mut(&p.node) {
            n.remove(&p.needs);
        }
    }
    // The pod is pending again unless the store says otherwise (deleted, or bound by
    // someone else); its object is re-read so the retry sees its current state.
    let key = format!("{PODS}{}", at.1);
    if let Ok(Some(kv)) = api.store.get(&key, Consistency::Serializable).await {
        snap.seen.remove(&key);
        snap.apply(&EventKind::Put, &kv);
    }
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

/// Choose `node` for the pod `key`'s claims that wait for their first consumer, and wait
/// until they are bound there (provisioned by the volume controller), as kube-scheduler's
/// volume binding does before it binds the pod.
async fn claim(api: &Arc<Api>, key: &str, claims: &[String], node: &str) -> bool {
    let Some((ns, _)) = key.split_once('/') else {
        return false;
    };
    for c in claims {
        let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{c}");
        let body = json!({"metadata": {"annotations": {
            crate::controllers::volumes::SELECTED_NODE: node}}});
        let (status, v) = call(api, "PATCH", &path, "application/merge-patch+json", body).await;
        if !(200..300).contains(&status) {
            tracing::debug!(claim = %c, %status, message = %v["message"], "claim not annotated");
            return false;
        }
    }
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    for c in claims {
        let key = format!("{CLAIMS}{ns}/{c}");
        loop {
            let kv = api.store.get(&key, Consistency::Serializable).await;
            let bound = kv.ok().flatten().is_some_and(|kv| {
                serde_json::from_slice::<Value>(&kv.value).is_ok_and(|o| {
                    o["spec"]["volumeName"]
                        .as_str()
                        .is_some_and(|v| !v.is_empty())
                })
            });
            if bound {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                tracing::debug!(claim = %c, "claim not bound in time; the pod is tried again");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    true
}

async fn bind(api: &Arc<Api>, key: &str, uid: &str, node: &str) -> bool {
    let Some((ns, name)) = key.split_once('/') else {
        return false;
    };
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid}});
    let event = crate::controllers::event_body(
        "default-scheduler",
        &pod,
        "Normal",
        "Scheduled",
        &format!("Successfully assigned {ns}/{name} to {node}"),
    );
    match crate::api::bind_with_event(api, ns, name, node, "kube-scheduler", event).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(pod = %key, error = %e, "binding failed");
            false
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, rev: u64, v: &Value, prev: Option<&KeyValue>) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.into(),
                value: serde_json::to_vec(v).unwrap(),
                create_revision: prev.map_or(rev, |p| p.create_revision),
                mod_revision: rev,
                version: 1,
            },
            prev: prev.cloned(),
        }
    }

    /// A placed pod's status writes are read for its phase alone: it keeps its place while
    /// it runs and gives it back once it has ended.
    #[test]
    fn a_placed_pod_leaves_its_node_when_a_status_write_ends_it() {
        let mut snap = Snapshot::default();
        let node = json!({"metadata": {"name": "n"},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "10"}}});
        let e = put(&format!("{NODES}n"), 1, &node, None);
        snap.apply(&e.kind, &e.kv);
        let key = format!("{PODS}default/p");
        let mut pod = json!({"metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i",
                "resources": {"requests": {"cpu": "1"}}}]},
            "status": {"phase": "Pending"}});
        let bound = put(&key, 2, &pod, None);
        assert!(
            !snap.status_write(&bound),
            "a pod not placed yet is decoded"
        );
        snap.apply(&bound.kind, &bound.kv);
        assert!(snap.placed.contains_key("default/p"));
        pod["status"]["phase"] = json!("Running");
        let running = put(&key, 3, &pod, Some(&bound.kv));
        assert!(snap.status_write(&running));
        assert!(snap.placed.contains_key("default/p"));
        pod["metadata"]["labels"] = json!({"a": "b"});
        let labelled = put(&key, 4, &pod, Some(&running.kv));
        assert!(!snap.status_write(&labelled), "not a status write");
        snap.apply(&labelled.kind, &labelled.kv);
        pod["status"]["phase"] = json!("Succeeded");
        let done = put(&key, 5, &pod, Some(&labelled.kv));
        assert!(snap.status_write(&done));
        assert!(
            !snap.placed.contains_key("default/p"),
            "an ended pod frees its node"
        );
        assert_eq!(snap.seen.get(&key), Some(&5));
    }
}
