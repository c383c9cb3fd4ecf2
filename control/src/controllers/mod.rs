//! Controllers that keep the cluster at its desired state: ReplicaSets, Deployments,
//! DaemonSets, Jobs and StatefulSets, and the node lifecycle ([`nodes`]).
//!
//! ```text
//! list ─▶ cache (objects by key, children by owner uid) ◀─ watch /registry/ (newest wins)
//!   a change marks its object, or its owner, dirty; everything is dirty every 30 s
//!   (a node's change marks every DaemonSet; Jobs with a deadline or a TTL are looked at in
//!   every round)
//!   round: each dirty Deployment ─▶ deployment::plan ─▶ ReplicaSets created, scaled, revised
//!          each dirty ReplicaSet  ─▶ replicaset::plan ─▶ pods created or deleted, status
//!          each dirty DaemonSet   ─▶ daemonset::plan  ─▶ a pod per eligible node, status
//!          each CronJob           ─▶ cronjob::plan    ─▶ Jobs on schedule, history, status
//!          each dirty Job         ─▶ job::plan        ─▶ pods, completion or failure, TTL
//!          each dirty StatefulSet ─▶ statefulset::plan ─▶ pods by ordinal, rolling, status
//!          each dirty PodDisruptionBudget ─▶ disruption::status ─▶ status (healthy, allowed)
//!          each dirty Service     ─▶ endpoints::plan, servicelb::status ─▶ its Endpoints
//!                                    and EndpointSlices, a LoadBalancer's ingress
//!          (DaemonSets and StatefulSets also ─▶ history::plan ─▶ their ControllerRevisions)
//!   then wait for the watch to show the round's own writes, so the next round sees them
//! ```
//!
//! On the Raft leader only, as `system:kube-controller-manager`, through the API like any
//! client. HorizontalPodAutoscalers have a loop of their own ([`autoscaler`]), which reads
//! the nodes' metrics every 15 s rather than following the watch. The decisions are pure functions in [`replicaset`], [`deployment`], [`daemonset`],
//! [`job`], [`cronjob`], [`statefulset`], [`disruption`], [`servicelb`] and [`history`].

pub mod autoscaler;
pub mod crds;
pub mod cron;
pub mod cronjob;
pub mod csr;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod events;
pub mod gc;
pub mod history;
pub mod job;
pub mod nodes;
pub mod quota;
pub mod rbac;
pub mod replicaset;
pub mod servicelb;
pub mod statefulset;
pub mod volumes;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use outpost_api::store::{EventKind, KeyValue};
use serde_json::{json, Value};

use crate::api::{Api, User};
use crate::store::{Consistency, WatchItem};

const PODS: &str = "/registry/core/pods/";
const RSS: &str = "/registry/apps/replicasets/";
const RCS: &str = "/registry/core/replicationcontrollers/";
const DEPLOYS: &str = "/registry/apps/deployments/";
const DSS: &str = "/registry/apps/daemonsets/";
const STSS: &str = "/registry/apps/statefulsets/";
const JOBS: &str = "/registry/batch/jobs/";
const CRONS: &str = "/registry/batch/cronjobs/";
const NODES: &str = "/registry/core/nodes/";
const SVCS: &str = "/registry/core/services/";
const EPS: &str = "/registry/core/endpoints/";
const SLICES: &str = "/registry/discovery.k8s.io/endpointslices/";
const PDBS: &str = "/registry/policy/poddisruptionbudgets/";
const REVS: &str = "/registry/apps/controllerrevisions/";
/// What the controllers follow, owners before what they own.
const FOLLOWED: [&str; 14] = [
    DEPLOYS, DSS, CRONS, JOBS, RSS, RCS, STSS, SVCS, EPS, SLICES, NODES, PDBS, REVS, PODS,
];
const RESYNC: Duration = Duration::from_secs(30);
/// How long a StatefulSet waits before it makes a pod again under the name of one just
/// deleted. `kubectl delete` reads the pod, then lists and watches it until it sees it go;
/// a replacement of the same name made between that read and that list (a Wasm pod stops in
/// milliseconds) leaves every kubectl version waiting for a delete that never comes.
const SAME_NAME_PAUSE: Duration = Duration::from_secs(1);

fn manager() -> User {
    system_user("system:kube-controller-manager")
}

/// A control-plane component's identity for its calls to the API.
pub(crate) fn system_user(name: &str) -> User {
    User {
        name: name.into(),
        uid: String::new(),
        groups: vec!["system:masters".into()],
    }
}

/// Run `follow` again and again until the task is aborted, half a second after each end
/// (a watch that ended, a store that failed): the loop of every follower of the store.
pub async fn again<F, Fut>(what: &str, mut follow: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        if let Err(e) = follow().await {
            tracing::debug!(error = %e, "{what} starts again");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Run the controllers until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    while_leader(&api, "controllers", |a| async move { lead(&a).await }).await
}

/// Call `lead` whenever this member leads, again after it returns (leadership lost, or a
/// watch that fell behind: the next call starts from a fresh list).
pub(crate) async fn while_leader<F, Fut>(api: &Arc<Api>, what: &str, lead: F)
where
    F: Fn(Arc<Api>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        if api.store.leads() {
            if let Err(e) = lead(api.clone()).await {
                tracing::debug!(error = %e, "{what} restart from a fresh list");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Default)]
struct Cache {
    objs: HashMap<String, Value>,
    seen: HashMap<String, u64>,
    /// uid → key, for Deployments and ReplicaSets.
    owners: HashMap<String, String>,
    /// owner uid → keys of the objects it controls.
    children: HashMap<String, BTreeSet<String>>,
    /// key → its controller's uid.
    owner_of: HashMap<String, String>,
    /// Job key → (its failed pods, when that number last grew), for the failure back-off.
    failures: HashMap<String, (u64, i64)>,
    /// Jobs waiting out a back-off, StatefulSets a [`SAME_NAME_PAUSE`].
    backing_off: BTreeSet<String>,
    /// Owners whose last pod creates were refused: how many rounds in a row, and when to
    /// try again (doubling from 2 s up to the resync, as a work queue's rate limiter would;
    /// each try records a FailedCreate event).
    refused: HashMap<String, (u32, Instant)>,
    /// Pods deleted in the last [`SAME_NAME_PAUSE`], by key.
    gone: HashMap<String, Instant>,
    /// CronJob key → the last warning recorded for it, so a standing problem is told once.
    warned: HashMap<String, String>,
    /// Keys of pods, Services, ReplicaSets, DaemonSets, Deployments, StatefulSets, Jobs,
    /// PodDisruptionBudgets and ControllerRevisions, to find them by namespace.
    index: BTreeSet<String>,
    dirty: BTreeSet<String>,
}

/// `key`'s namespace and name, for a namespaced key under `prefix`.
fn split<'a>(key: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    key.strip_prefix(prefix)?.split_once('/')
}

fn controller_uid(o: &Value) -> Option<String> {
    o["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)
        .and_then(|r| r["uid"].as_str())
        .map(String::from)
}

/// Whether `kv` is under one of `prefixes` and newer than what `seen` has for its key
/// (recorded if so). Older changes come when a list and a watch overlap.
pub(crate) fn fresh(seen: &mut HashMap<String, u64>, prefixes: &[&str], kv: &KeyValue) -> bool {
    let key = kv.key.as_str();
    if !prefixes.iter().any(|p| key.starts_with(p))
        || seen.get(key).is_some_and(|r| *r >= kv.mod_revision)
    {
        return false;
    }
    seen.insert(key.to_string(), kv.mod_revision);
    true
}

/// A [`fresh`] change: the object (`None` for a delete), but for its managed fields, which
/// no control loop reads.
pub(crate) fn newer(
    seen: &mut HashMap<String, u64>,
    prefixes: &[&str],
    kind: &EventKind,
    kv: &KeyValue,
) -> Option<Option<Value>> {
    newer_by(seen, prefixes, kind, kv, |raw| {
        crate::api::pick::without(raw, &["metadata.managedFields"])
    })
}

/// [`newer`], with the stored object decoded by `decode` (as much of it as the caller reads).
pub(crate) fn newer_by(
    seen: &mut HashMap<String, u64>,
    prefixes: &[&str],
    kind: &EventKind,
    kv: &KeyValue,
    decode: impl FnOnce(&[u8]) -> serde_json::Result<Value>,
) -> Option<Option<Value>> {
    if !fresh(seen, prefixes, kv) {
        return None;
    }
    Some(match kind {
        // Stored values leave the resourceVersion out: it is the key's revision. Put back,
        // it makes writes that carry it (adoptions, budgets' status) conditional.
        EventKind::Put => decode(&kv.value).ok().map(|mut o| {
            if o["metadata"].is_object() {
                o["metadata"]["resourceVersion"] = json!(kv.mod_revision.to_string());
            }
            o
        }),
        EventKind::Delete => None,
    })
}

/// Whether `owner`'s `spec.selector` (with something in it) matches `o`.
fn selects(owner: &Value, o: &Value) -> bool {
    let sel = crate::api::select::Labels::of_owner(owner);
    !sel.is_empty() && sel.matches(&o["metadata"]["labels"])
}

/// Make `owner` the controller of `orphans` (pods or ReplicaSets it selects that nobody
/// owns), as the Kubernetes controllers adopt; the highest revision written.
async fn adopt(api: &Arc<Api>, owner: &Value, orphans: &[&Value]) -> u64 {
    let mut wrote = 0;
    for o in orphans {
        let (ns, name) = ns_name(o);
        let mut refs = o["metadata"]["ownerReferences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        refs.push(
            json!({"apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "controller": true, "blockOwnerDeletion": true}),
        );
        let body = json!({"metadata": {"ownerReferences": refs,
            "resourceVersion": o["metadata"]["resourceVersion"]}});
        let path = if o["kind"] == "ReplicaSet" {
            format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}")
        } else if o["kind"] == "ControllerRevision" {
            format!("/apis/apps/v1/namespaces/{ns}/controllerrevisions/{name}")
        } else {
            format!("/api/v1/namespaces/{ns}/pods/{name}")
        };
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    wrote
}

/// What [`trim_pod`] may keep of a pod: the rest is not even decoded.
const POD_PARTS: [&str; 18] = [
    "kind",
    "metadata.name",
    "metadata.generateName",
    "metadata.namespace",
    "metadata.uid",
    "metadata.labels",
    "metadata.ownerReferences",
    "metadata.creationTimestamp",
    "metadata.deletionTimestamp",
    "spec.nodeName",
    "spec.hostname",
    "spec.subdomain",
    "spec.affinity",
    "spec.containers",
    "status.phase",
    "status.podIP",
    "status.conditions",
    "status.containerStatuses",
];

/// The parts of a pod the controllers read. The cache holds every pod, so the rest (most of
/// a pod: its containers' images, commands, env, probes, resources, tolerations, status
/// details) is dropped. Every JSON object left costs over 600 bytes (a B-tree node), so even
/// the containers go unless they name a port (which Services may target by name).
fn trim_pod(mut o: Value) -> Value {
    fn keep(v: &mut Value, fields: &[&str]) {
        if let Some(m) = v.as_object_mut() {
            m.retain(|k, _| fields.contains(&k.as_str()));
        }
    }
    keep(&mut o, &["kind", "metadata", "spec", "status"]);
    keep(
        &mut o["metadata"],
        &[
            "name",
            "generateName",
            "namespace",
            "uid",
            "labels",
            "ownerReferences",
            "creationTimestamp",
            "deletionTimestamp",
            "resourceVersion",
        ],
    );
    keep(
        &mut o["spec"],
        &[
            "nodeName",
            "hostname",
            "subdomain",
            "affinity",
            "containers",
        ],
    );
    if let Some(cs) = o["spec"]["containers"].as_array_mut() {
        for c in cs.iter_mut() {
            keep(c, &["ports"]);
            if let Some(ps) = c["ports"].as_array_mut() {
                ps.retain(|p| p["name"].is_string());
                for p in ps.iter_mut() {
                    keep(p, &["name", "containerPort"]);
                }
            }
        }
        cs.retain(|c| c["ports"].as_array().is_some_and(|p| !p.is_empty()));
        if cs.is_empty() {
            if let Some(spec) = o["spec"].as_object_mut() {
                spec.remove("containers");
            }
        }
    }
    keep(
        &mut o["status"],
        &["phase", "podIP", "conditions", "containerStatuses"],
    );
    // Exit codes, for Jobs' pod failure policies.
    if let Some(cs) = o["status"]["containerStatuses"].as_array_mut() {
        for c in cs {
            let code = c["state"]["terminated"]["exitCode"].clone();
            keep(c, &["name"]);
            if !code.is_null() {
                c["state"] = json!({"terminated": {"exitCode": code}});
            }
        }
    }
    o
}

impl Cache {
    /// Note whether `key`'s pod creates were refused this round.
    fn refusals(&mut self, key: &str, refused: bool) {
        if !refused {
            self.refused.remove(key);
            return;
        }
        let tries = self.refused.get(key).map_or(0, |(n, _)| n + 1);
        let wait = Duration::from_secs(2u64 << tries.min(4)).min(RESYNC);
        self.refused
            .insert(key.to_string(), (tries, Instant::now() + wait));
    }

    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        let key = kv.key.as_str();
        let pod = key.starts_with(PODS);
        let Some(obj) = newer_by(&mut self.seen, &FOLLOWED, kind, kv, |raw| {
            if pod {
                crate::api::pick::only(raw, &POD_PARTS)
            } else {
                crate::api::pick::without(raw, &["metadata.managedFields"])
            }
        }) else {
            return;
        };
        if key.starts_with(NODES) {
            // Where DaemonSets should run, and which nodes serve load balancers, may have
            // changed.
            let marked: Vec<String> = self
                .objs
                .iter()
                .filter(|(k, o)| {
                    k.starts_with(DSS) || (k.starts_with(SVCS) && servicelb::balanced(o))
                })
                .map(|(k, _)| k.clone())
                .collect();
            self.dirty.extend(marked);
            match obj {
                Some(o) => self.objs.insert(key.to_string(), o),
                None => self.objs.remove(key),
            };
            return;
        }
        if key.starts_with(PODS) {
            // Services whose selector took the pod in or out.
            let old = self.objs.get(key);
            let svcs = self.services_selecting(key, [old, obj.as_ref()]);
            self.dirty.extend(svcs);
            // Budgets count their pods' health.
            if let Some((ns, _)) = split(key, PODS) {
                let pdbs: Vec<String> = self.in_namespace(PDBS, ns).cloned().collect();
                self.dirty.extend(pdbs);
            }
        }
        // A pod or ReplicaSet no controller owns may be adopted by one that selects it.
        for (prefix, by) in [
            (PODS, &[RSS, RCS, DSS, STSS, JOBS][..]),
            (RSS, &[DEPLOYS][..]),
            (REVS, &[DSS, STSS][..]),
        ] {
            if let Some(o) = obj
                .as_ref()
                .filter(|o| key.starts_with(prefix) && controller_uid(o).is_none())
            {
                let adopters = self.adopters(key, prefix, by, o);
                self.dirty.extend(adopters);
            }
        }
        if [PODS, SVCS, RSS, RCS, DSS, DEPLOYS, PDBS, STSS, JOBS, REVS]
            .iter()
            .any(|p| key.starts_with(p))
        {
            match obj {
                Some(_) => self.index.insert(key.to_string()),
                None => self.index.remove(key),
            };
        }
        if obj.is_none() && key.starts_with(PODS) {
            self.gone.retain(|_, t| t.elapsed() < SAME_NAME_PAUSE);
            self.gone.insert(key.to_string(), Instant::now());
        }
        if obj.is_none() {
            // A Service gone takes its Endpoints; Endpoints gone come back.
            if let Some(rest) = key.strip_prefix(SVCS) {
                self.dirty.insert(format!("{EPS}{rest}"));
            } else if let Some(rest) = key.strip_prefix(EPS) {
                self.dirty.insert(format!("{SVCS}{rest}"));
            }
        }
        if let Some(uid) = self.owner_of.remove(key) {
            if let Some(c) = self.children.get_mut(&uid) {
                c.remove(key);
            }
            if let Some(owner) = self.owners.get(&uid) {
                self.dirty.insert(owner.clone());
            }
        }
        let old = self.objs.remove(key);
        if let Some(uid) = old.as_ref().and_then(|o| o["metadata"]["uid"].as_str()) {
            self.owners.remove(uid);
        }
        let Some(o) = obj else { return };
        if !key.starts_with(PODS) {
            self.dirty.insert(key.to_string());
            if let Some(uid) = o["metadata"]["uid"].as_str() {
                self.owners.insert(uid.to_string(), key.to_string());
            }
        }
        let o = if key.starts_with(PODS) {
            trim_pod(o)
        } else {
            o
        };
        if let Some(uid) = controller_uid(&o) {
            self.children
                .entry(uid.clone())
                .or_default()
                .insert(key.to_string());
            if let Some(owner) = self.owners.get(&uid) {
                self.dirty.insert(owner.clone());
            }
            self.owner_of.insert(key.to_string(), uid);
        }
        self.objs.insert(key.to_string(), o);
    }

    /// Keys under `prefix` in namespace `ns` (pods and Services only).
    fn in_namespace<'a>(&'a self, prefix: &str, ns: &str) -> impl Iterator<Item = &'a String> {
        let start = format!("{prefix}{ns}/");
        self.index
            .range(start.clone()..)
            .take_while(move |k| k.starts_with(&start))
    }

    /// Controllers (under the prefixes `by`) in the namespace of `key` (under `prefix`) whose
    /// selector matches `o`.
    fn adopters(&self, key: &str, prefix: &str, by: &[&str], o: &Value) -> Vec<String> {
        let Some((ns, _)) = split(key, prefix) else {
            return vec![];
        };
        by.iter()
            .flat_map(|p| self.in_namespace(p, ns))
            .filter(|c| self.objs.get(*c).is_some_and(|c| selects(c, o)))
            .cloned()
            .collect()
    }

    /// Objects under `prefix` (pods, or ReplicaSets) in `owner`'s namespace that no
    /// controller owns, that are not being deleted or finished, and that `owner` selects: the
    /// ones it adopts. A StatefulSet takes only pods named as its own (`NAME-ORDINAL`).
    fn orphans(&self, prefix: &str, owner: &Value) -> Vec<&Value> {
        let ns = owner["metadata"]["namespace"].as_str().unwrap_or("default");
        let set = (owner["kind"] == "StatefulSet" && prefix == PODS)
            .then(|| format!("{}-", owner["metadata"]["name"].as_str().unwrap_or("")));
        let named = |o: &Value| {
            set.as_deref().is_none_or(|p| {
                o["metadata"]["name"]
                    .as_str()
                    .and_then(|n| n.strip_prefix(p))
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        self.in_namespace(prefix, ns)
            .filter_map(|k| self.objs.get(k))
            .filter(|o| {
                controller_uid(o).is_none()
                    && replicaset::active(o)
                    && selects(owner, o)
                    && named(o)
            })
            .collect()
    }

    /// Services in `pod_key`'s namespace that select any of `pods`.
    fn services_selecting(&self, pod_key: &str, pods: [Option<&Value>; 2]) -> Vec<String> {
        let Some((ns, _)) = split(pod_key, PODS) else {
            return vec![];
        };
        self.in_namespace(SVCS, ns)
            .filter(|k| {
                self.objs
                    .get(*k)
                    .is_some_and(|s| pods.iter().flatten().any(|p| endpoints::selects(s, p)))
            })
            .cloned()
            .collect()
    }

    /// The scale a pod's budget counts it against: its controller's uid and `spec.replicas`
    /// (a Deployment's for pods of its ReplicaSets), as the disruption controller finds them;
    /// none for a pod no controller owns.
    fn scale_of(&self, pod: &Value) -> Result<Option<(String, i64)>, String> {
        let name = pod["metadata"]["name"].as_str().unwrap_or("");
        let Some(mut uid) = controller_uid(pod) else {
            return Ok(None);
        };
        loop {
            let owner = self
                .owners
                .get(&uid)
                .and_then(|k| self.objs.get(k).map(|o| (k, o)));
            let Some((key, o)) = owner else {
                return Err(format!("found no controllers for pod \"{name}\""));
            };
            if key.starts_with(RSS) {
                if let Some(up) = controller_uid(o).filter(|u| self.owners.contains_key(u)) {
                    uid = up;
                    continue;
                }
            }
            if ![RSS, RCS, DEPLOYS, STSS].iter().any(|p| key.starts_with(p)) {
                let kind = o["kind"].as_str().unwrap_or("controller");
                return Err(format!("{kind} has no scale: pod \"{name}\""));
            }
            return Ok(Some((uid, o["spec"]["replicas"].as_i64().unwrap_or(1))));
        }
    }

    /// What `o` controls, its ControllerRevisions aside.
    fn children_of(&self, o: &Value) -> Vec<&Value> {
        self.owned(o, |k| !k.starts_with(REVS))
    }

    /// `o`'s ControllerRevisions.
    fn revisions_of(&self, o: &Value) -> Vec<&Value> {
        self.owned(o, |k| k.starts_with(REVS))
    }

    fn owned(&self, o: &Value, keep: impl Fn(&str) -> bool) -> Vec<&Value> {
        o["metadata"]["uid"]
            .as_str()
            .and_then(|u| self.children.get(u))
            .into_iter()
            .flatten()
            .filter(|k| keep(k))
            .filter_map(|k| self.objs.get(k))
            .collect()
    }
}

/// Hand every object under `prefixes` (in that order) to `apply`, then watch `/registry/`
/// from the oldest list's revision: objects listed later come again in the watch, so
/// `apply` keeps each key's newest revision.
pub(crate) async fn list_and_watch(
    api: &Arc<Api>,
    prefixes: &[&str],
    mut apply: impl FnMut(&KeyValue),
) -> Result<Feed, String> {
    let mut from = u64::MAX;
    for prefix in prefixes {
        let page = api
            .store
            .range(prefix, None, 0, Consistency::Linearizable)
            .await
            .map_err(|e| e.to_string())?;
        from = from.min(page.revision);
        page.kvs.iter().for_each(&mut apply);
    }
    let w = api
        .store
        .watch("/registry/", from)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Feed {
        api: api.clone(),
        w,
        last: from,
    })
}

/// The watch of `/registry/` a control loop follows. One that falls behind (its reader was
/// busy writing) picks up again from the last revision it delivered, out of the store's
/// history; only a compacted history ends it, and the loop starts again from a list.
pub(crate) struct Feed {
    api: Arc<Api>,
    w: crate::store::Watch,
    last: u64,
}

impl Feed {
    fn note(&mut self, i: &WatchItem) {
        self.last = self.last.max(match i {
            WatchItem::Revision(r) => r.revision,
            WatchItem::Progress(p) => *p,
        });
    }

    async fn resume(&mut self) -> Result<(), String> {
        tracing::debug!(after = self.last, "watch fell behind; resuming");
        self.w = self
            .api
            .store
            .watch("/registry/", self.last)
            .await
            .map_err(|e| format!("the watch fell behind and cannot resume: {e}"))?;
        Ok(())
    }

    /// The next item, waiting for it.
    pub(crate) async fn next(&mut self) -> Result<WatchItem, String> {
        loop {
            match self.w.next().await {
                Some(i) => {
                    self.note(&i);
                    return Ok(i);
                }
                None => self.resume().await?,
            }
        }
    }

    /// The next item if one is already here.
    pub(crate) async fn ready(&mut self) -> Result<Option<WatchItem>, String> {
        loop {
            match self.w.next().now_or_never() {
                Some(Some(i)) => {
                    self.note(&i);
                    return Ok(Some(i));
                }
                Some(None) => self.resume().await?,
                None => return Ok(None),
            }
        }
    }
}

/// Lead until leadership is lost or the watch breaks.
async fn lead(api: &Arc<Api>) -> Result<(), String> {
    // Owners first, so their children find them.
    drive(api, &FOLLOWED, &mut Cache::default()).await
}

/// List `prefixes` into `f`, then, while this member leads: a `round` (the highest revision
/// it wrote), then follow the watch until there is more to do; everything is looked at again
/// every 30 s.
pub(crate) async fn drive<F: Follower>(
    api: &Arc<Api>,
    prefixes: &[&str],
    f: &mut F,
) -> Result<(), String> {
    let mut w = list_and_watch(api, prefixes, |kv| f.apply(&EventKind::Put, kv)).await?;
    let mut synced = Instant::now();
    loop {
        if !api.store.leads() {
            return Ok(());
        }
        if synced.elapsed() > RESYNC {
            synced = Instant::now();
            f.resync();
        }
        let wrote = f.round(api).await;
        follow(&mut w, f, wrote).await?;
    }
}

/// What a watch feeds: a cache that knows when it has work.
pub(crate) trait Follower {
    fn apply(&mut self, kind: &EventKind, kv: &KeyValue);
    fn busy(&self) -> bool;
    /// Mark everything worth another look.
    fn resync(&mut self);
    /// Act on what is marked; the highest revision written.
    fn round(&mut self, api: &Arc<Api>) -> impl std::future::Future<Output = u64> + Send;
}

impl Follower for Cache {
    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        Cache::apply(self, kind, kv)
    }
    fn busy(&self) -> bool {
        !self.dirty.is_empty()
    }
    fn resync(&mut self) {
        let all: Vec<String> = self
            .objs
            .keys()
            .filter(|k| [PODS, NODES, EPS, SLICES].iter().all(|p| !k.starts_with(p)))
            .cloned()
            .collect();
        self.dirty.extend(all);
    }
    async fn round(&mut self, api: &Arc<Api>) -> u64 {
        let objs = &self.objs;
        self.refused.retain(|k, _| objs.contains_key(k));
        // Jobs (deadlines, time to live), rolling Deployments (progress deadlines) and
        // ReplicaSets with pods not yet ready long enough wait on the clock as well as on
        // changes.
        let timed: Vec<String> = self
            .objs
            .iter()
            .filter(|(k, o)| {
                (k.starts_with(JOBS)
                    && (o["spec"]["activeDeadlineSeconds"].is_number()
                        || o["spec"]["ttlSecondsAfterFinished"].is_number()))
                    || (k.starts_with(DEPLOYS) && deployment::rolling(o))
                    // CronJobs run on the clock.
                    || (k.starts_with(CRONS) && o["spec"]["suspend"] != true)
                    // Pods ready but not yet for minReadySeconds become available by the clock.
                    || ([RSS, RCS, STSS].iter().any(|p| k.starts_with(p))
                        && o["status"]["readyReplicas"] != o["status"]["availableReplicas"])
                    || (k.starts_with(DSS)
                        && o["status"]["numberReady"] != o["status"]["numberAvailable"])
                    // Evictions not yet seen as deletions time out.
                    || (k.starts_with(PDBS) && o["status"]["disruptedPods"].is_object())
            })
            .map(|(k, _)| k.clone())
            .chain(std::mem::take(&mut self.backing_off))
            .chain(
                self.refused
                    .iter()
                    .filter(|(_, (_, at))| *at <= Instant::now())
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        self.dirty.extend(timed);
        round(api, self).await
    }
}

/// Feed the watch to `f` until it has work and the watch has shown revision `wrote` (the
/// round's own writes, so the next round sees them), or for at most 2 s.
pub(crate) async fn follow(w: &mut Feed, f: &mut impl Follower, wrote: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut shown = 0;
    loop {
        let item = match w.ready().await? {
            Some(i) => i,
            None if !f.busy() || shown < wrote => {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, w.next()).await {
                    Ok(i) => i?,
                    Err(_) => return Ok(()),
                }
            }
            None => return Ok(()),
        };
        match item {
            WatchItem::Revision(r) => {
                shown = shown.max(r.revision);
                for e in &r.events {
                    f.apply(&e.kind, &e.kv);
                }
            }
            WatchItem::Progress(p) => shown = shown.max(p),
        }
        if shown >= wrote && f.busy() {
            return Ok(());
        }
    }
}

/// Reconcile every dirty object; the highest revision written.
async fn round(api: &Arc<Api>, cache: &mut Cache) -> u64 {
    let dirty: Vec<String> = std::mem::take(&mut cache.dirty).into_iter().collect();
    let mut wrote = 0;
    for key in dirty {
        let Some(o) = cache.objs.get(&key) else {
            continue;
        };
        if !o["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        // Adopt first; the plan counts them once the watch shows them owned.
        let orphans = match () {
            _ if key.starts_with(DEPLOYS) => cache.orphans(RSS, o),
            _ if [RSS, RCS, JOBS].iter().any(|p| key.starts_with(p)) => cache.orphans(PODS, o),
            // Their template history too, as a set deleted with its pods orphaned left it.
            _ if key.starts_with(DSS) || key.starts_with(STSS) => {
                let mut all = cache.orphans(PODS, o);
                all.extend(cache.orphans(REVS, o));
                all
            }
            _ => vec![],
        };
        if !orphans.is_empty() {
            wrote = wrote.max(adopt(api, o, &orphans).await);
            continue;
        }
        let children = cache.children_of(o);
        let rev = if key.starts_with(DEPLOYS) {
            sync_deployment(api, o, &children).await
        } else if key.starts_with(RSS) || key.starts_with(RCS) {
            let (rev, refused) = sync_replicaset(api, o, &children).await;
            cache.refusals(&key, refused);
            rev
        } else if key.starts_with(DSS) {
            let nodes: Vec<&Value> = cache
                .objs
                .iter()
                .filter(|(k, _)| k.starts_with(NODES))
                .map(|(_, n)| n)
                .collect();
            let revs = cache.revisions_of(o);
            let rev = sync_history(api, o, &revs, &children).await;
            let (made, refused) = sync_daemonset(api, o, &nodes, &children).await;
            cache.refusals(&key, refused);
            rev.max(made)
        } else if key.starts_with(JOBS) {
            // When its number of failed pods last grew, for the back-off.
            let failed = children
                .iter()
                .filter(|p| p["status"]["phase"] == "Failed")
                .count() as u64;
            let now = jiff::Timestamp::now().as_second();
            let seen = cache.failures.get(&key).copied();
            let at = match seen {
                Some((n, t)) if n == failed => t,
                _ => now,
            };
            let (rev, backing_off, refused) =
                sync_job(api, o, &children, (failed > 0).then_some(at)).await;
            let (failures, waiting) = (&mut cache.failures, &mut cache.backing_off);
            failures.insert(key.clone(), (failed, at));
            if backing_off {
                waiting.insert(key.clone());
            }
            cache.refusals(&key, refused);
            rev
        } else if key.starts_with(CRONS) {
            let said = cache.warned.get(&key).cloned();
            let (rev, warned) = sync_cronjob(api, o, &children, said).await;
            match warned {
                Some(w) => cache.warned.insert(key.clone(), w),
                None => cache.warned.remove(&key),
            };
            rev
        } else if key.starts_with(STSS) {
            let revs = cache.revisions_of(o);
            let (ns, _) = ns_name(o);
            let recent: Vec<&str> = cache
                .gone
                .iter()
                .filter(|(_, t)| t.elapsed() < SAME_NAME_PAUSE)
                .filter_map(|(k, _)| split(k, PODS))
                .filter(|(n, _)| *n == ns)
                .map(|(_, name)| name)
                .collect();
            let rev = sync_history(api, o, &revs, &children).await;
            let (made, held) = sync_statefulset(api, o, &children, &recent).await;
            if held {
                cache.backing_off.insert(key.clone());
            }
            rev.max(made)
        } else if key.starts_with(PDBS) {
            sync_budget(api, cache, &key, o).await
        } else if key.starts_with(SVCS) {
            let eps = sync_endpoints(api, cache, &key, o).await;
            eps.max(sync_balancer(api, cache, o).await)
        } else if let Some(rest) = key.strip_prefix(EPS) {
            match cache.objs.get(&format!("{SVCS}{rest}")) {
                Some(svc) => sync_endpoints(api, cache, &format!("{SVCS}{rest}"), svc).await,
                None if !o["metadata"]["annotations"][endpoints::TRIGGER].is_null() => {
                    let (ns, name) = ns_name(o);
                    let path = format!("/api/v1/namespaces/{ns}/endpoints/{name}");
                    write(api, "DELETE", &path, "application/json", &json!({}))
                        .await
                        .0
                }
                None => 0,
            }
        } else {
            0
        };
        wrote = wrote.max(rev);
    }
    wrote
}

/// One write: the revision it made (0 if refused) and the object written.
async fn write(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: &Value) -> (u64, Value) {
    write_as(api, &manager(), method, path, ct, body).await
}

/// [`write`] as `user`.
pub(crate) async fn write_as(
    api: &Arc<Api>,
    user: &User,
    method: &str,
    path: &str,
    ct: &str,
    body: &Value,
) -> (u64, Value) {
    let (status, v) = crate::api::call_as(api, user, method, path, ct, body).await;
    if !(200..300).contains(&status) {
        // Not found and conflicts are the ordinary races of a control loop.
        if status != 404 && status != 409 {
            tracing::debug!(%method, %path, %status, message = %v["message"], "controller write failed");
        }
        return (0, Value::Null);
    }
    let rev = v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    (rev, v)
}

/// An event about `obj` from `component`, as a client would post it.
pub(crate) fn event_body(
    component: &str,
    obj: &Value,
    kind: &str,
    reason: &str,
    msg: &str,
) -> Value {
    let m = &obj["metadata"];
    let ns = m["namespace"].as_str().unwrap_or("default");
    let name = m["name"].as_str().unwrap_or("");
    let now = crate::api::now();
    // Named as client-go's recorder names them, by the time in nanoseconds: a namespace's
    // events list in the order they happened, which `kubectl describe` keeps for events
    // of the same second.
    let nanos = jiff::Timestamp::now().as_nanosecond();
    // A cluster-scoped object's events live in `default` but name no namespace for it, which
    // is what `kubectl describe node` looks them up by.
    json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{name}.{nanos:x}"), "namespace": ns},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": name,
            "namespace": m["namespace"].as_str().unwrap_or(""), "uid": m["uid"]},
        "type": kind, "reason": reason, "message": msg,
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1})
}

/// Record an event about `obj` from `component`, as `kubectl describe` shows it.
pub(crate) async fn event(
    api: &Arc<Api>,
    component: &str,
    obj: &Value,
    kind: &str,
    reason: &str,
    msg: &str,
) {
    let mut body = event_body(component, obj, kind, reason, msg);
    let ns = body["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let path = format!("/api/v1/namespaces/{ns}/events");
    let (mut status, mut v) =
        crate::api::call_as(api, &manager(), "POST", &path, "application/json", &body).await;
    if status == 409 {
        // Two events of one object in the same nanosecond: the second gets a made-up name.
        body["metadata"] = json!({"generateName": format!("{name}."), "namespace": ns});
        (status, v) =
            crate::api::call_as(api, &manager(), "POST", &path, "application/json", &body).await;
    }
    if !(200..300).contains(&status) {
        tracing::debug!(%name, %status, message = %v["message"], "event not recorded");
    }
}

const MERGE: &str = "application/merge-patch+json";

fn ns_name(o: &Value) -> (String, String) {
    (
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        o["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

/// Whether `want`'s fields differ from those in `have`.
fn differs(have: &Value, want: &Value) -> bool {
    want.as_object()
        .is_some_and(|w| w.iter().any(|(k, v)| have[k] != *v))
}

/// Start and clean up a CronJob's Jobs. `said` is the warning last recorded for it; returns
/// the highest revision written and the warning standing now.
async fn sync_cronjob(
    api: &Arc<Api>,
    cj: &Value,
    jobs: &[&Value],
    said: Option<String>,
) -> (u64, Option<String>) {
    const ME: &str = "cronjob-controller";
    let plan = cronjob::plan(cj, jobs, jiff::Timestamp::now().as_second());
    let (ns, name) = ns_name(cj);
    let base = format!("/apis/batch/v1/namespaces/{ns}/jobs");
    let mut wrote = 0;
    for n in &plan.delete {
        let body = json!({"propagationPolicy": "Background"});
        let path = format!("{base}/{n}");
        wrote = wrote.max(
            write(api, "DELETE", &path, "application/json", &body)
                .await
                .0,
        );
    }
    let mut status = plan.status;
    if let Some(job) = &plan.create {
        let (rev, made) = write(api, "POST", &base, "application/json", job).await;
        if rev > 0 {
            if let Some(a) = status["active"].as_array_mut() {
                a.push(cronjob::reference(&made));
            }
        } else {
            // Not started: the time stays due.
            status["lastScheduleTime"] = cj["status"]["lastScheduleTime"].clone();
        }
        wrote = wrote.max(rev);
    }
    let mut warned = None;
    for (kind, reason, msg) in &plan.events {
        if *kind == "Warning" || *reason == "JobAlreadyActive" {
            let w = format!("{reason}: {msg}");
            if said.as_deref() == Some(w.as_str()) {
                warned = said.clone();
                continue;
            }
            warned = Some(w);
        }
        event(api, ME, cj, kind, reason, msg).await;
    }
    if differs(&cj["status"], &status) {
        let path = format!("/apis/batch/v1/namespaces/{ns}/cronjobs/{name}/status");
        let body = json!({"status": status});
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    (wrote, warned)
}

/// A PodDisruptionBudget's status from the pods it selects.
async fn sync_budget(api: &Arc<Api>, cache: &Cache, key: &str, pdb: &Value) -> u64 {
    let Some((ns, name)) = split(key, PDBS) else {
        return 0;
    };
    let pods: Vec<&Value> = cache
        .in_namespace(PODS, ns)
        .filter_map(|k| cache.objs.get(k))
        .filter(|p| disruption::selects(pdb, p))
        .collect();
    let now = jiff::Timestamp::now().as_second();
    let status = disruption::status(pdb, &pods, &|p| cache.scale_of(p), now);
    if !differs(&pdb["status"], &status)
        && pdb["status"]["disruptedPods"] == status["disruptedPods"]
    {
        return 0;
    }
    let path = format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}/status");
    // The whole status, on the version this was computed from: an eviction that spent the
    // budget meanwhile makes it a conflict (and its change brings the budget back here),
    // never an allowance handed out twice.
    let mut body = pdb.clone();
    body["status"] = status;
    write(api, "PUT", &path, "application/json", &body).await.0
}

/// Sync a ReplicaSet or a ReplicationController (the same controller in Kubernetes, and
/// here): the highest revision written, and whether a pod was refused.
async fn sync_replicaset(api: &Arc<Api>, rs: &Value, pods: &[&Value]) -> (u64, bool) {
    let plan = replicaset::plan(rs, pods, jiff::Timestamp::now().as_second());
    let (ns, name) = ns_name(rs);
    let (me, base, new) = if rs["kind"] == "ReplicationController" {
        let pod = replicaset::pod_from(rs, "v1", "ReplicationController");
        (
            "replication-controller",
            format!("/api/v1/namespaces/{ns}/replicationcontrollers"),
            pod,
        )
    } else {
        let pod = replicaset::pod_for(rs);
        (
            "replicaset-controller",
            format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
            pod,
        )
    };
    let (mut wrote, refused) = create_pods(api, me, rs, vec![new; plan.create]).await;
    wrote = wrote.max(delete_pods(api, me, rs, &plan.delete).await);
    if differs(&rs["status"], &plan.status) {
        let path = format!("{base}/{name}/status");
        let body = json!({"status": plan.status});
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    (wrote, refused)
}

async fn sync_deployment(api: &Arc<Api>, d: &Value, rss: &[&Value]) -> u64 {
    const ME: &str = "deployment-controller";
    let plan = deployment::plan(d, rss);
    let (ns, name) = ns_name(d);
    let base = format!("/apis/apps/v1/namespaces/{ns}/replicasets");
    let mut wrote = 0;
    let scaled = |rs: &str, from: u64, to: u64| {
        let how = if to > from { "up" } else { "down" };
        format!("Scaled {how} replica set {rs} from {from} to {to}")
    };
    if let Some(rs) = &plan.create {
        let (rev, made) = write(api, "POST", &base, "application/json", rs).await;
        wrote = wrote.max(rev);
        let n = rs["spec"]["replicas"].as_u64().unwrap_or(0);
        if rev > 0 && n > 0 {
            let rs_name = made["metadata"]["name"].as_str().unwrap_or("");
            event(
                api,
                ME,
                d,
                "Normal",
                "ScalingReplicaSet",
                &scaled(rs_name, 0, n),
            )
            .await;
        }
    }
    for (rs, rev) in &plan.revise {
        let body = json!({"metadata": {"annotations": {deployment::REVISION: rev.to_string()}}});
        wrote = wrote.max(
            write(api, "PATCH", &format!("{base}/{rs}"), MERGE, &body)
                .await
                .0,
        );
    }
    for (rs, annotations) in &plan.annotate {
        let body = json!({"metadata": {"annotations": annotations}});
        wrote = wrote.max(
            write(api, "PATCH", &format!("{base}/{rs}"), MERGE, &body)
                .await
                .0,
        );
    }
    for (rs, n) in &plan.scale {
        let from = rss
            .iter()
            .find(|x| x["metadata"]["name"] == rs.as_str())
            .and_then(|x| x["spec"]["replicas"].as_u64())
            .unwrap_or(0);
        let body = json!({"spec": {"replicas": n}});
        let (rev, _) = write(api, "PATCH", &format!("{base}/{rs}"), MERGE, &body).await;
        if rev > 0 {
            wrote = wrote.max(rev);
            event(
                api,
                ME,
                d,
                "Normal",
                "ScalingReplicaSet",
                &scaled(rs, from, *n),
            )
            .await;
        }
    }
    for rs in &plan.delete {
        let path = format!("{base}/{rs}");
        wrote = wrote.max(
            write(api, "DELETE", &path, "application/json", &json!({}))
                .await
                .0,
        );
    }
    let path = format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}");
    if plan.revision > 0 && deployment::revision(d) != plan.revision {
        let body =
            json!({"metadata": {"annotations": {deployment::REVISION: plan.revision.to_string()}}});
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    if differs(&d["status"], &plan.status) {
        let body = json!({"status": plan.status});
        wrote = wrote.max(
            write(api, "PATCH", &format!("{path}/status"), MERGE, &body)
                .await
                .0,
        );
    }
    wrote
}

/// Create `pods` for `owner`, with an event for each: SuccessfulCreate, or FailedCreate with
/// the API's reason (a pod whose ServiceAccount does not exist yet, a namespace going away).
/// The highest revision written, and whether any was refused (worth another try soon).
async fn create_pods(api: &Arc<Api>, me: &str, owner: &Value, pods: Vec<Value>) -> (u64, bool) {
    let ns = owner["metadata"]["namespace"].as_str().unwrap_or("default");
    let path = format!("/api/v1/namespaces/{ns}/pods");
    let user = manager();
    let created: Vec<(u16, Value)> =
        futures::stream::iter(pods)
            .map(|p| {
                let (path, user) = (path.clone(), &user);
                async move {
                    crate::api::call_as(api, user, "POST", &path, "application/json", &p).await
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let (mut wrote, mut refused) = (0, false);
    for (status, p) in created {
        if (200..300).contains(&status) {
            wrote = wrote.max(
                p["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            );
            let n = p["metadata"]["name"].as_str().unwrap_or("");
            event(
                api,
                me,
                owner,
                "Normal",
                "SuccessfulCreate",
                &format!("Created pod: {n}"),
            )
            .await;
        } else if status != 409 {
            refused = true;
            let why = p["message"].as_str().unwrap_or("refused");
            event(
                api,
                me,
                owner,
                "Warning",
                "FailedCreate",
                &format!("Error creating: {why}"),
            )
            .await;
        }
    }
    (wrote, refused)
}

/// Delete pods by name, with a SuccessfulDelete event each.
async fn delete_pods(api: &Arc<Api>, me: &str, owner: &Value, names: &[String]) -> u64 {
    let ns = owner["metadata"]["namespace"].as_str().unwrap_or("default");
    let mut wrote = 0;
    for p in names {
        let path = format!("/api/v1/namespaces/{ns}/pods/{p}");
        let (rev, _) = write(api, "DELETE", &path, "application/json", &json!({})).await;
        if rev > 0 {
            wrote = wrote.max(rev);
            event(
                api,
                me,
                owner,
                "Normal",
                "SuccessfulDelete",
                &format!("Deleted pod: {p}"),
            )
            .await;
        }
    }
    wrote
}

/// The highest revision written, and whether a pod was refused.
async fn sync_daemonset(
    api: &Arc<Api>,
    ds: &Value,
    nodes: &[&Value],
    pods: &[&Value],
) -> (u64, bool) {
    const ME: &str = "daemonset-controller";
    let eligible: Vec<(String, bool)> = nodes
        .iter()
        .map(|n| {
            let info = crate::scheduler::fit::NodeInfo::of(n);
            let pod = daemonset::pod_for(ds, &info.name);
            let needs = crate::scheduler::fit::needs(&pod, &Value::Null);
            let should = crate::scheduler::fit::should_run(&needs, &info);
            (info.name, should)
        })
        .collect();
    let plan = daemonset::plan(ds, &eligible, pods, jiff::Timestamp::now().as_second());
    let (ns, name) = ns_name(ds);
    let new: Vec<Value> = plan
        .create
        .iter()
        .map(|node| daemonset::pod_for(ds, node))
        .collect();
    let (mut wrote, refused) = create_pods(api, ME, ds, new).await;
    wrote = wrote.max(delete_pods(api, ME, ds, &plan.delete).await);
    if differs(&ds["status"], &plan.status) {
        let path = format!("/apis/apps/v1/namespaces/{ns}/daemonsets/{name}/status");
        let body = json!({"status": plan.status});
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    (wrote, refused)
}

/// Keep a DaemonSet's or StatefulSet's ControllerRevisions: one per template, numbered.
async fn sync_history(api: &Arc<Api>, owner: &Value, revs: &[&Value], pods: &[&Value]) -> u64 {
    let in_use = pods
        .iter()
        .filter(|p| replicaset::active(p))
        .filter_map(|p| p["metadata"]["labels"][daemonset::HASH].as_str())
        .map(String::from)
        .collect();
    let plan = history::plan(owner, revs, &in_use);
    let (ns, _) = ns_name(owner);
    let base = format!("/apis/apps/v1/namespaces/{ns}/controllerrevisions");
    let mut wrote = 0;
    if let Some(r) = &plan.create {
        wrote = wrote.max(write(api, "POST", &base, "application/json", r).await.0);
    }
    if let Some((name, n)) = &plan.renumber {
        let body = json!({"revision": n});
        wrote = wrote.max(
            write(api, "PATCH", &format!("{base}/{name}"), MERGE, &body)
                .await
                .0,
        );
    }
    for name in &plan.delete {
        let path = format!("{base}/{name}");
        wrote = wrote.max(
            write(api, "DELETE", &path, "application/json", &json!({}))
                .await
                .0,
        );
    }
    wrote
}

/// The ingress of a LoadBalancer Service ([`servicelb`]), written where it differs.
async fn sync_balancer(api: &Arc<Api>, cache: &Cache, svc: &Value) -> u64 {
    let nodes = cache
        .objs
        .iter()
        .filter(|(k, _)| k.starts_with(NODES))
        .map(|(_, n)| n);
    let Some(want) = servicelb::status(svc, nodes) else {
        return 0;
    };
    let had = &svc["status"]["loadBalancer"];
    if *had == want || (had.is_null() && want == json!({})) {
        return 0;
    }
    // A merge patch replaces the list whole, and removes it with a null.
    let patch = match want.get("ingress") {
        Some(_) => json!({"status": {"loadBalancer": want}}),
        None => json!({"status": {"loadBalancer": {"ingress": null}}}),
    };
    let (ns, name) = ns_name(svc);
    let path = format!("/api/v1/namespaces/{ns}/services/{name}/status");
    write(api, "PATCH", &path, "application/merge-patch+json", &patch)
        .await
        .0
}

/// Bring the Endpoints and EndpointSlices of the Service at `key` up to date.
async fn sync_endpoints(api: &Arc<Api>, cache: &Cache, key: &str, svc: &Value) -> u64 {
    let (ns, name) = ns_name(svc);
    let slices: Vec<&Value> = cache
        .children_of(svc)
        .into_iter()
        .filter(|s| s["metadata"]["labels"][endpoints::MANAGED_BY] == endpoints::MANAGER)
        .collect();
    let slice_base = format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices");
    let mut wrote = 0;
    if !endpoints::managed(svc) {
        for s in slices {
            let path = format!(
                "{slice_base}/{}",
                s["metadata"]["name"].as_str().unwrap_or("")
            );
            wrote = wrote.max(
                write(api, "DELETE", &path, "application/json", &json!({}))
                    .await
                    .0,
            );
        }
        return wrote;
    }
    let pods: Vec<&Value> = cache
        .in_namespace(PODS, &ns)
        .filter_map(|k| cache.objs.get(k))
        .collect();
    let want = endpoints::plan(svc, &pods);
    let stamp = crate::api::now();
    let eps_path = format!("/api/v1/namespaces/{ns}/endpoints");
    match cache
        .objs
        .get(&format!("{EPS}{}", key.strip_prefix(SVCS).unwrap_or("")))
    {
        None => {
            let body = json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns, "labels": svc["metadata"]["labels"],
                    "annotations": {endpoints::TRIGGER: stamp}},
                "subsets": want.subsets});
            wrote = wrote.max(
                write(api, "POST", &eps_path, "application/json", &body)
                    .await
                    .0,
            );
        }
        Some(eps) => {
            let have = eps["subsets"].as_array().cloned().unwrap_or_default();
            if have != want.subsets {
                let body = json!({"metadata": {"annotations": {endpoints::TRIGGER: stamp}},
                    "subsets": want.subsets});
                let path = format!("{eps_path}/{name}");
                wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
            }
        }
    }
    let mut slices = slices;
    slices.sort_by_key(|s| s["metadata"]["name"].as_str().unwrap_or("").to_string());
    for i in 0..want.slices.len().max(slices.len()) {
        let rev = match (want.slices.get(i), slices.get(i)) {
            (Some((eps, ports)), None) => {
                let body = endpoints::slice_for(svc, eps, ports);
                write(api, "POST", &slice_base, "application/json", &body)
                    .await
                    .0
            }
            (Some((eps, ports)), Some(s)) => {
                let have_eps = s["endpoints"].as_array().map_or(&[][..], Vec::as_slice);
                let have_ports = s["ports"].as_array().map_or(&[][..], Vec::as_slice);
                if have_eps == eps.as_slice() && have_ports == ports.as_slice() {
                    0
                } else {
                    let path = format!(
                        "{slice_base}/{}",
                        s["metadata"]["name"].as_str().unwrap_or("")
                    );
                    let body = json!({"endpoints": eps, "ports": ports});
                    write(api, "PATCH", &path, MERGE, &body).await.0
                }
            }
            (None, Some(s)) => {
                let path = format!(
                    "{slice_base}/{}",
                    s["metadata"]["name"].as_str().unwrap_or("")
                );
                write(api, "DELETE", &path, "application/json", &json!({}))
                    .await
                    .0
            }
            (None, None) => 0,
        };
        wrote = wrote.max(rev);
    }
    wrote
}

/// The highest revision written, and whether a pod was held back by [`SAME_NAME_PAUSE`]
/// (`recent`: the names of pods deleted within it).
async fn sync_statefulset(
    api: &Arc<Api>,
    sts: &Value,
    pods: &[&Value],
    recent: &[&str],
) -> (u64, bool) {
    const ME: &str = "statefulset-controller";
    let plan = statefulset::plan(sts, pods, jiff::Timestamp::now().as_second());
    let (ns, name) = ns_name(sts);
    let base = format!("/api/v1/namespaces/{ns}/pods");
    let mut wrote = 0;
    // Deletes first: a finished pod must be gone before its name is used again.
    for p in &plan.delete {
        if let Some(i) = statefulset::scaled_away(sts, p) {
            // Its claims go with the pod: the garbage collector deletes them once it is gone.
            let uid = pods
                .iter()
                .find(|x| x["metadata"]["name"] == p.as_str())
                .map(|x| x["metadata"]["uid"].clone());
            for (_, c) in statefulset::claims_for(sts, i)
                .into_iter()
                .filter(|_| uid.is_some())
            {
                let cname = c["metadata"]["name"].as_str().unwrap_or("");
                let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{cname}");
                let mut owners = c["metadata"]["ownerReferences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                owners.push(json!({"apiVersion": "v1", "kind": "Pod", "name": p, "uid": uid}));
                let body = json!({"metadata": {"ownerReferences": owners}});
                wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
            }
        }
        let (rev, _) = write(
            api,
            "DELETE",
            &format!("{base}/{p}"),
            "application/json",
            &json!({}),
        )
        .await;
        if rev > 0 {
            wrote = wrote.max(rev);
            let msg = format!("delete Pod {p} in StatefulSet {name} successful");
            event(api, ME, sts, "Normal", "SuccessfulDelete", &msg).await;
        }
    }
    // A pod still waiting for a node whose claim is gone (deleted by a scale-down's
    // retention policy as the set grew again) gets it made again.
    for p in pods.iter().filter(|p| p["spec"]["nodeName"].is_null()) {
        let i = p["metadata"]["labels"][statefulset::POD_INDEX]
            .as_str()
            .and_then(|i| i.parse::<u64>().ok());
        if let Some(i) = i {
            let (rev, _) = make_claims(api, sts, i).await;
            wrote = wrote.max(rev);
        }
    }
    let mut held = false;
    for i in &plan.create {
        if recent.contains(&format!("{name}-{i}").as_str()) {
            held = true;
            continue;
        }
        // Its claims first (kept from an earlier pod of this ordinal if they exist).
        let (rev, failed) = make_claims(api, sts, *i).await;
        wrote = wrote.max(rev);
        if failed {
            break;
        }
        let pod = statefulset::pod_for(sts, *i);
        let (rev, _) = write(api, "POST", &base, "application/json", &pod).await;
        if rev > 0 {
            wrote = wrote.max(rev);
            let msg = format!("create Pod {name}-{i} in StatefulSet {name} successful");
            event(api, ME, sts, "Normal", "SuccessfulCreate", &msg).await;
        }
    }
    if differs(&sts["status"], &plan.status) {
        let path = format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/status");
        let body = json!({"status": plan.status});
        wrote = wrote.max(write(api, "PATCH", &path, MERGE, &body).await.0);
    }
    (wrote, held)
}

/// Make the claims of StatefulSet pod `i` that do not exist, each with an event: the highest
/// revision written, and whether one was refused (the pod must wait).
async fn make_claims(api: &Arc<Api>, sts: &Value, i: u64) -> (u64, bool) {
    const ME: &str = "statefulset-controller";
    let (ns, name) = ns_name(sts);
    let mut wrote = 0;
    for (_, c) in statefulset::claims_for(sts, i) {
        let cname = c["metadata"]["name"].as_str().unwrap_or("");
        // A local read first: most claims outlive their pods, and a create of one that
        // exists would still cost a round of the log.
        let key = format!("/registry/core/persistentvolumeclaims/{ns}/{cname}");
        if !matches!(
            api.store.get(&key, Consistency::Serializable).await,
            Ok(None)
        ) {
            continue;
        }
        let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims");
        let (status, v) =
            crate::api::call_as(api, &manager(), "POST", &path, "application/json", &c).await;
        match status {
            200..=299 => {
                wrote = wrote.max(
                    v["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                );
                let msg =
                    format!("create Claim {cname} Pod {name}-{i} in StatefulSet {name} success");
                event(api, ME, sts, "Normal", "SuccessfulCreate", &msg).await;
            }
            409 => {}
            _ => {
                let msg = format!(
                    "create Claim {cname} for Pod {name}-{i} in StatefulSet {name} failed error: {}",
                    v["message"].as_str().unwrap_or("")
                );
                event(api, ME, sts, "Warning", "FailedCreate", &msg).await;
                return (wrote, true);
            }
        }
    }
    (wrote, false)
}

/// The highest revision written, whether the Job is waiting out its failure back-off, and
/// whether a pod was refused.
async fn sync_job(
    api: &Arc<Api>,
    j: &Value,
    pods: &[&Value],
    failed_at: Option<i64>,
) -> (u64, bool, bool) {
    const ME: &str = "job-controller";
    let now = jiff::Timestamp::now();
    let plan = job::plan(j, pods, now.as_second(), &crate::api::now(), failed_at);
    let backing_off = plan.backing_off;
    let (ns, name) = ns_name(j);
    let path = format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}");
    if plan.expire {
        let body = json!({"propagationPolicy": "Background"});
        let rev = write(api, "DELETE", &path, "application/json", &body)
            .await
            .0;
        return (rev, false, false);
    }
    let new = if plan.indexes.is_empty() {
        vec![job::pod_for(j); plan.create]
    } else {
        plan.indexes
            .iter()
            .map(|i| job::pod_for_index(j, *i))
            .collect()
    };
    let (mut wrote, refused) = create_pods(api, ME, j, new).await;
    wrote = wrote.max(delete_pods(api, ME, j, &plan.delete).await);
    if differs(&j["status"], &plan.status) {
        let body = json!({"status": plan.status});
        let rev = write(api, "PATCH", &format!("{path}/status"), MERGE, &body)
            .await
            .0;
        wrote = wrote.max(rev);
        if rev > 0 {
            for (kind, reason, msg) in &plan.events {
                event(api, ME, j, kind, reason, msg).await;
            }
        }
    }
    (wrote, backing_off, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_pods_keep_what_controllers_read() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "default", "uid": "u1",
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "ownerReferences": [{"uid": "rs1", "controller": true}]},
            "spec": {"nodeName": "n1", "tolerations": [{"key": "k", "operator": "Exists"}],
                "containers": [
                    {"name": "app", "image": "module:web", "env": [{"name": "A", "value": "1"}],
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                               {"containerPort": 9090}]},
                    {"name": "side", "image": "module:side", "ports": [{"containerPort": 1}]}]},
            "status": {"phase": "Failed", "podIP": "10.0.0.5", "hostIP": "192.168.1.2",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "app", "image": "module:web",
                    "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}});
        // Decoding only the parts it may keep changes nothing.
        let raw = serde_json::to_vec(&pod).unwrap();
        let picked = crate::api::pick::only(&raw, &POD_PARTS).unwrap();
        assert_eq!(trim_pod(picked), trim_pod(pod.clone()));
        let t = trim_pod(pod);
        assert_eq!(
            t["spec"],
            json!({"nodeName": "n1",
                "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]})
        );
        assert!(t["metadata"]["annotations"].is_null());
        assert_eq!(t["metadata"]["labels"]["app"], "web");
        assert_eq!(controller_uid(&t).as_deref(), Some("rs1"));
        assert_eq!(t["status"]["podIP"], "10.0.0.5");
        assert!(t["status"]["hostIP"].is_null());
        assert_eq!(t["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(
            t["status"]["containerStatuses"],
            json!([{"name": "app", "state": {"terminated": {"exitCode": 3}}}])
        );
        // Services reach a named port through what is left.
        let sp = json!({"port": 80, "targetPort": "http"});
        assert_eq!(endpoints::target(&sp, &t), Some(8080));
        // Nothing named: no containers at all.
        let bare = trim_pod(json!({"kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 1}]}]}}));
        assert!(bare["spec"]["containers"].is_null());
    }
}
