//! The garbage collector and the namespace controller: what happens after a delete.
//!
//! ```text
//! list every stored resource ─▶ graph (uid → key, owner uid → dependents, namespace → keys)
//!                                   ◀─ watch /registry/
//!   an object whose owners are all gone (checked again with a linearizable read) ─▶ deleted
//!   an owner deleting with the `foregroundDeletion` finalizer ─▶ its dependents deleted in
//!       the foreground, then the finalizer removed (and the owner with it)
//!   an owner deleting with the `orphan` finalizer ─▶ its reference removed from each
//!       dependent, then the finalizer removed
//!   a namespace deleting ─▶ after a 5 s grace, everything in it deleted through the API
//!       (pods stop on their nodes first), then the namespace itself once it is empty
//! ```
//!
//! Everything it needs is in the store, so a delete interrupted by a restart or a change of
//! leader goes on where it stopped. It runs on the leader as the garbage collector's service
//! account, through the API like any client.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_api::store::{EventKind, KeyValue};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{drive, fresh, system_user, while_leader, write_as, Follower};
use crate::api::resources::{by_kind, Resource, RESOURCES};
use crate::api::{Api, User};
use outpost_api::store::{Expect, Outcome};

use crate::store::Consistency;

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

/// How long a deleting namespace's contents are left alone, as kube-controller-manager's
/// namespace controller waits before it starts: `kubectl delete -f` of a manifest that lists
/// the Namespace first still finds the objects after it.
const NAMESPACE_GRACE: Duration = Duration::from_secs(5);

fn me() -> User {
    system_user("system:serviceaccount:kube-system:generic-garbage-collector")
}

/// Run until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    while_leader(&api, "garbage collector", |a| async move { lead(&a).await }).await
}

/// An owner reference: uid, apiVersion, kind, name.
#[derive(Clone, Debug, PartialEq)]
struct Ref {
    uid: String,
    api_version: String,
    kind: String,
    name: String,
}

/// What the collector keeps of one object.
#[derive(Debug)]
struct Node {
    res: &'static Resource,
    ns: Option<String>,
    name: String,
    uid: String,
    rev: u64,
    owners: Vec<Ref>,
    deleting: bool,
    /// When its delete began (Unix seconds), as its `deletionTimestamp` says.
    since: Option<i64>,
    finalizers: Vec<String>,
}

/// The part of a stored object the collector reads; the rest is skipped while parsing
/// (every write passes through here).
#[derive(Deserialize, Default)]
struct Stored {
    #[serde(default)]
    metadata: StoredMeta,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct StoredMeta {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    uid: String,
    owner_references: Option<Vec<StoredRef>>,
    deletion_timestamp: Option<String>,
    finalizers: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRef {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

impl Node {
    fn of(res: &'static Resource, rev: u64, o: Stored) -> Node {
        let m = o.metadata;
        Node {
            res,
            ns: m.namespace,
            name: m.name,
            uid: m.uid,
            rev,
            owners: m
                .owner_references
                .unwrap_or_default()
                .into_iter()
                .map(|r| Ref {
                    uid: r.uid,
                    api_version: r.api_version,
                    kind: r.kind,
                    name: r.name,
                })
                .collect(),
            deleting: m.deletion_timestamp.is_some(),
            since: m
                .deletion_timestamp
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_second()),
            finalizers: m.finalizers.unwrap_or_default(),
        }
    }

    fn path(&self) -> String {
        self.res.path(self.ns.as_deref(), &self.name)
    }

    fn is_namespace(&self) -> bool {
        self.res.group.is_empty() && self.res.kind == "Namespace"
    }
}

/// The stored resources and their key prefixes (resources sharing a prefix once). Events
/// are left out: they own nothing and are owned by nothing, and they are half of all writes;
/// a namespace's events are deleted with it by collection.
fn stored() -> Vec<(String, &'static Resource)> {
    let mut out: Vec<(String, &'static Resource)> = vec![];
    let custom: Vec<&'static Resource> = crate::api::crd::all().iter().map(|c| c.res).collect();
    for r in RESOURCES
        .iter()
        .filter(|r| r.stored && r.kind != "Event")
        .chain(custom)
    {
        let p = r.prefix(None);
        if !out.iter().any(|(q, _)| *q == p) {
            out.push((p, r));
        }
    }
    out
}

/// The custom resource whose objects are stored under `key`, if any.
fn custom_of_key(key: &str) -> Option<&'static Resource> {
    let mut parts = key.strip_prefix("/registry/")?.split('/');
    let (group, plural) = (parts.next()?, parts.next()?);
    crate::api::crd::of(group, plural).map(|c| c.res)
}

#[derive(Default)]
struct Graph {
    prefixes: Vec<(String, &'static Resource)>,
    seen: HashMap<String, u64>,
    objs: HashMap<String, Node>,
    /// uid → key.
    by_uid: HashMap<String, String>,
    /// owner uid → keys of its dependents.
    deps: HashMap<String, BTreeSet<String>>,
    /// namespace → keys of what it holds.
    by_ns: HashMap<String, BTreeSet<String>>,
    dirty: BTreeSet<String>,
    /// Deleting namespaces left alone until their grace ends: key → when.
    waiting: HashMap<String, Instant>,
}

impl Graph {
    /// How long the deleting namespace at `key` is still left alone, if it is one.
    fn grace_left(&self, key: &str) -> Option<Duration> {
        let n = self
            .objs
            .get(key)
            .filter(|n| n.deleting && n.is_namespace())?;
        let age = jiff::Timestamp::now().as_second() - n.since?;
        let left = NAMESPACE_GRACE.as_secs() as i64 - age;
        (left > 0).then(|| Duration::from_secs(left as u64))
    }

    fn namespace_key(&self, ns: &str) -> String {
        format!("/registry/core/namespaces/{ns}")
    }

    /// Mark `n`'s owners that wait on their dependents.
    fn touch_owners(&mut self, n: &Node) {
        for r in &n.owners {
            if let Some(k) = self.by_uid.get(&r.uid) {
                if self.objs.get(k).is_some_and(|o| o.deleting) {
                    self.dirty.insert(k.clone());
                }
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Node> {
        let n = self.objs.remove(key)?;
        self.by_uid.remove(&n.uid);
        for r in &n.owners {
            if let Some(d) = self.deps.get_mut(&r.uid) {
                d.remove(key);
                if d.is_empty() {
                    self.deps.remove(&r.uid);
                }
            }
        }
        if let Some(ns) = &n.ns {
            if let Some(keys) = self.by_ns.get_mut(ns) {
                keys.remove(key);
            }
        }
        Some(n)
    }
}

impl Follower for Graph {
    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        if !self
            .prefixes
            .iter()
            .any(|(p, _)| kv.key.starts_with(p.as_str()))
        {
            // A CRD's objects are followed from the first seen; anything else outside the
            // prefixes (events, half of all writes) is not looked at again.
            match custom_of_key(&kv.key) {
                Some(r) => self.prefixes.push((r.prefix(None), r)),
                None => return,
            }
        }
        let prefixes: Vec<&str> = self.prefixes.iter().map(|(p, _)| p.as_str()).collect();
        if !fresh(&mut self.seen, &prefixes, kv) {
            return;
        }
        let obj: Option<Stored> = match kind {
            EventKind::Put => serde_json::from_slice(&kv.value).ok(),
            EventKind::Delete => None,
        };
        let key = kv.key.as_str();
        let old = self.remove(key);
        if let Some(old) = &old {
            self.touch_owners(old);
        }
        let Some(o) = obj else {
            // Gone: its dependents may be orphans now, and its namespace may be empty.
            if let Some(old) = old {
                if let Some(d) = self.deps.get(&old.uid) {
                    self.dirty.extend(d.iter().cloned());
                }
                if let Some(ns) = &old.ns {
                    let nk = self.namespace_key(ns);
                    if self.objs.get(&nk).is_some_and(|n| n.deleting) {
                        self.dirty.insert(nk);
                    }
                }
            }
            return;
        };
        let Some(res) = self
            .prefixes
            .iter()
            .find(|(p, _)| key.starts_with(p.as_str()))
            .map(|(_, r)| *r)
        else {
            return;
        };
        let n = Node::of(res, kv.mod_revision, o);
        self.touch_owners(&n);
        if n.deleting || !n.owners.is_empty() {
            self.dirty.insert(key.to_string());
        }
        self.by_uid.insert(n.uid.clone(), key.to_string());
        for r in &n.owners {
            self.deps
                .entry(r.uid.clone())
                .or_default()
                .insert(key.to_string());
        }
        if let Some(ns) = &n.ns {
            self.by_ns
                .entry(ns.clone())
                .or_default()
                .insert(key.to_string());
        }
        self.objs.insert(key.to_string(), n);
    }

    fn busy(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn resync(&mut self) {
        let all: Vec<String> = self
            .objs
            .iter()
            .filter(|(_, n)| n.deleting || !n.owners.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty.extend(all);
    }

    async fn round(&mut self, api: &Arc<Api>) -> u64 {
        let now = Instant::now();
        let due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.waiting.remove(&k);
            self.dirty.insert(k);
        }
        let mut wrote = 0;
        for key in std::mem::take(&mut self.dirty) {
            if let Some(left) = self.grace_left(&key) {
                self.waiting.insert(key, now + left);
                continue;
            }
            wrote = wrote.max(settle(api, self, &key).await);
        }
        wrote
    }
}

async fn lead(api: &Arc<Api>) -> Result<(), String> {
    let mut g = Graph {
        prefixes: stored(),
        ..Graph::default()
    };
    let prefixes: Vec<String> = g.prefixes.iter().map(|(p, _)| p.clone()).collect();
    let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    drive(api, &refs, &mut g).await
}

/// One call as the collector: the revision it wrote (0 if none).
async fn call(api: &Arc<Api>, method: &str, path: &str, body: &Value) -> u64 {
    let ct = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    write_as(api, &me(), method, path, ct, body).await.0
}

/// Do what the object at `key` needs; the highest revision written.
async fn settle(api: &Arc<Api>, g: &Graph, key: &str) -> u64 {
    let Some(n) = g.objs.get(key) else {
        return 0;
    };
    if n.deleting && n.is_namespace() {
        return empty_namespace(api, g, key, n).await;
    }
    let deps: Vec<&Node> = g
        .deps
        .get(&n.uid)
        .into_iter()
        .flatten()
        .filter_map(|k| g.objs.get(k))
        .collect();
    if n.deleting && n.finalizers.iter().any(|f| f == ORPHAN) {
        let mut wrote = 0;
        for d in &deps {
            let kept: Vec<Value> = d
                .owners
                .iter()
                .filter(|r| r.uid != n.uid)
                .map(|r| {
                    json!({"apiVersion": r.api_version, "kind": r.kind, "name": r.name, "uid": r.uid})
                })
                .collect();
            let refs = if kept.is_empty() {
                Value::Null
            } else {
                json!(kept)
            };
            let body = json!({"metadata": {"ownerReferences": refs,
                "resourceVersion": d.rev.to_string()}});
            wrote = wrote.max(call(api, "PATCH", &d.path(), &body).await);
        }
        if deps.is_empty() {
            wrote = drop_finalizer(api, n, ORPHAN).await;
        }
        return wrote;
    }
    if n.deleting && n.finalizers.iter().any(|f| f == FOREGROUND) {
        let mut wrote = 0;
        for d in deps.iter().filter(|d| !d.deleting) {
            let body = json!({"propagationPolicy": "Foreground"});
            wrote = wrote.max(call(api, "DELETE", &d.path(), &body).await);
        }
        if deps.is_empty() {
            wrote = drop_finalizer(api, n, FOREGROUND).await;
        }
        return wrote;
    }
    if n.deleting || n.owners.is_empty() || n.owners.iter().any(|r| g.by_uid.contains_key(&r.uid)) {
        return 0;
    }
    // Every owner looks gone; make sure before deleting.
    for r in &n.owners {
        if owner_exists(api, r, n.ns.as_deref()).await {
            return 0;
        }
    }
    let body = json!({"propagationPolicy": "Background",
        "preconditions": {"uid": n.uid}});
    call(api, "DELETE", &n.path(), &body).await
}

/// Whether the object `r` names still exists (an unknown kind counts as existing, so its
/// dependents are left alone).
async fn owner_exists(api: &Arc<Api>, r: &Ref, ns: Option<&str>) -> bool {
    let group = r.api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let Some(res) = by_kind(group, &r.kind) else {
        return true;
    };
    let key = res.key(ns, &r.name);
    match api.store.get(&key, Consistency::Linearizable).await {
        Ok(Some(kv)) => serde_json::from_slice::<Value>(&kv.value)
            .map(|o| o["metadata"]["uid"] == r.uid.as_str())
            .unwrap_or(true),
        Ok(None) => false,
        Err(_) => true,
    }
}

async fn drop_finalizer(api: &Arc<Api>, n: &Node, f: &str) -> u64 {
    let rest: Vec<&String> = n.finalizers.iter().filter(|x| *x != f).collect();
    let list = if rest.is_empty() {
        Value::Null
    } else {
        json!(rest)
    };
    let body = json!({"metadata": {"finalizers": list, "resourceVersion": n.rev.to_string()}});
    call(api, "PATCH", &n.path(), &body).await
}

/// Delete what namespace `n` holds; once nothing is left (and no finalizer holds it), the
/// namespace itself.
async fn empty_namespace(api: &Arc<Api>, g: &Graph, key: &str, n: &Node) -> u64 {
    let held: Vec<&Node> = g
        .by_ns
        .get(&n.name)
        .into_iter()
        .flatten()
        .filter_map(|k| g.objs.get(k))
        .collect();
    if held.is_empty() {
        if !n.finalizers.is_empty() {
            return 0;
        }
        // events.k8s.io shows the same events.
        let path = format!("/api/v1/namespaces/{}/events", n.name);
        call(api, "DELETE", &path, &json!({})).await;
        return match api.store.delete(key, Expect::ModRevision(n.rev)).await {
            Ok(Outcome::Committed { revision, .. }) => revision,
            _ => 0,
        };
    }
    let mut wrote = 0;
    for h in held.iter().filter(|h| !h.deleting) {
        let body = json!({"propagationPolicy": "Background"});
        wrote = wrote.max(call(api, "DELETE", &h.path(), &body).await);
    }
    wrote
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, rev: u64, o: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(&o).unwrap_or_default(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
        }
    }

    fn graph() -> Graph {
        Graph {
            prefixes: stored(),
            ..Graph::default()
        }
    }

    const RS: &str = "/registry/apps/replicasets/default/web";
    const POD: &str = "/registry/core/pods/default/web-1";
    const NS: &str = "/registry/core/namespaces/default";

    fn rs() -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "rs1"}})
    }

    fn pod() -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "default", "uid": "p1",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web",
                "uid": "rs1", "controller": true}]}})
    }

    #[test]
    fn a_deleted_owner_marks_its_dependents() {
        let mut g = graph();
        g.apply(&EventKind::Put, &kv(RS, 1, rs()));
        g.apply(&EventKind::Put, &kv(POD, 2, pod()));
        assert_eq!(g.deps["rs1"].iter().collect::<Vec<_>>(), [POD]);
        assert_eq!(g.objs[POD].res.kind, "Pod");
        g.dirty.clear();
        g.apply(&EventKind::Delete, &kv(RS, 3, Value::Null));
        assert!(g.dirty.contains(POD), "the pod may be an orphan now");
        assert!(!g.by_uid.contains_key("rs1"));
        // An old event for a key already seen newer is ignored.
        g.apply(&EventKind::Put, &kv(RS, 1, rs()));
        assert!(!g.objs.contains_key(RS));
    }

    #[test]
    fn a_waiting_owner_hears_of_each_dependent_that_goes() {
        let mut g = graph();
        let mut owner = rs();
        owner["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        owner["metadata"]["finalizers"] = json!([FOREGROUND]);
        g.apply(&EventKind::Put, &kv(RS, 1, owner));
        assert!(g.dirty.contains(RS));
        assert_eq!(g.objs[RS].finalizers, [FOREGROUND]);
        g.apply(&EventKind::Put, &kv(POD, 2, pod()));
        g.dirty.clear();
        g.apply(&EventKind::Delete, &kv(POD, 3, Value::Null));
        assert!(g.dirty.contains(RS));
        assert!(!g.deps.contains_key("rs1"));
    }

    #[test]
    fn a_terminating_namespace_hears_when_it_empties() {
        let mut g = graph();
        let ns = json!({"metadata": {"name": "default", "uid": "n1",
            "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        g.apply(&EventKind::Put, &kv(NS, 1, ns));
        assert!(g.objs[NS].is_namespace());
        g.apply(&EventKind::Put, &kv(POD, 2, pod()));
        assert_eq!(g.by_ns["default"].len(), 1);
        assert_eq!(g.objs[POD].path(), "/api/v1/namespaces/default/pods/web-1");
        g.dirty.clear();
        g.apply(&EventKind::Delete, &kv(POD, 3, Value::Null));
        assert!(g.dirty.contains(NS));
        assert!(g.by_ns["default"].is_empty());
        assert_eq!(g.grace_left(NS), None, "deleted long ago");
    }

    #[test]
    fn a_namespace_just_deleted_is_left_alone_for_its_grace() {
        let mut g = graph();
        let at = jiff::Timestamp::now().to_string();
        let ns = json!({"metadata": {"name": "default", "uid": "n1", "deletionTimestamp": at}});
        g.apply(&EventKind::Put, &kv(NS, 1, ns));
        let left = g.grace_left(NS).expect("still in its grace");
        assert!(
            left <= NAMESPACE_GRACE && left >= Duration::from_secs(4),
            "{left:?}"
        );
        // Only namespaces wait.
        let mut p = pod();
        p["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
        g.apply(&EventKind::Put, &kv(POD, 2, p));
        assert_eq!(g.grace_left(POD), None);
    }
}
