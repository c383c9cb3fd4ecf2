//! The volume controller: binds PersistentVolumeClaims to PersistentVolumes, provisions local
//! volumes for claims of the [`PROVISIONER`] class, and releases volumes whose claims are gone.
//!
//! ```text
//! list + watch claims, volumes, classes, nodes
//!   a pending claim ─▶ the volume already reserved for it, else the smallest Available one
//!       that fits (class, access modes, size, `volumeName`) ─▶ volume bound, then the claim
//!     none fits, its class is ours and its node is chosen (`volume.kubernetes.io/
//!       selected-node`, set by the scheduler) ─▶ a hostPath volume in that node's storage
//!       directory (the Node's `outpost.dev/storage-dir`), with node affinity to it, bound
//!   a claim of a `WaitForFirstConsumer` class waits for its node, even for a static volume
//!   a volume whose claim is gone ─▶ Released; deleted when its reclaim policy is Delete
//!       (the node's agent removes the directory once the volume is gone)
//!   a claim deleted while a pod that has not finished uses it ─▶ kept (its
//!       `kubernetes.io/pvc-protection` finalizer) until no such pod is left
//! ```
//!
//! The decisions are the pure [`claim_step`] and [`volume_step`]; it runs on the leader as
//! the persistent-volume binder, through the API like any client.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use outpost_api::quantity::bytes;
use outpost_api::store::{EventKind, KeyValue};
use serde_json::{json, Value};

use super::{drive, newer, system_user, while_leader, write_as, Follower};
use crate::api::{Api, User};
use crate::store::Consistency;

/// The provisioner of Outpost's local volumes (the `local-path` class).
pub const PROVISIONER: &str = "outpost.dev/local-path";
/// On a provisioned volume: the node whose disk holds it.
pub const NODE_ANNOTATION: &str = "outpost.dev/node";
/// On a claim: the node its first pod was scheduled to.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// On every claim from its creation: it is not deleted while a pod uses it.
pub const PROTECTION: &str = "kubernetes.io/pvc-protection";

const CLAIMS: &str = "/registry/core/persistentvolumeclaims/";
const VOLUMES: &str = "/registry/core/persistentvolumes/";
const CLASSES: &str = "/registry/storage.k8s.io/storageclasses/";
const NODES: &str = "/registry/core/nodes/";
const PODS: &str = "/registry/core/pods/";
const MERGE: &str = "application/merge-patch+json";

fn me() -> User {
    system_user("system:serviceaccount:kube-system:persistent-volume-binder")
}

/// Run until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    while_leader(&api, "volume controller", |a| async move {
        drive(
            &a,
            &[CLASSES, NODES, VOLUMES, CLAIMS],
            &mut Volumes::default(),
        )
        .await
    })
    .await
}

/// What to do for one pending claim.
#[derive(Debug, PartialEq)]
pub enum ClaimStep {
    /// Bind it to this volume.
    Bind(String),
    /// Make a volume for it on `node`, under `dir`.
    Provision { node: String, dir: String },
    /// Wait, telling why: (event type, reason, message).
    Wait(&'static str, &'static str, String),
}

fn modes(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn class_of(o: &Value) -> &str {
    o["spec"]["storageClassName"].as_str().unwrap_or("")
}

/// Whether volume `pv` may serve `claim`: not taken by another claim, same class, every
/// access mode the claim asks for, at least its size, and the one it names if it names one.
fn fits(claim: &Value, pv: &Value) -> bool {
    let m = &claim["metadata"];
    let reserved = &pv["spec"]["claimRef"];
    if reserved.is_object()
        && (reserved["name"] != m["name"]
            || reserved["namespace"] != m["namespace"]
            || reserved["uid"].as_str().is_some_and(|u| m["uid"] != u))
    {
        return false;
    }
    if !reserved.is_object()
        && pv["status"]["phase"]
            .as_str()
            .is_some_and(|p| p != "Available")
    {
        return false;
    }
    let want = claim["spec"]["volumeName"].as_str().unwrap_or("");
    if !want.is_empty() && pv["metadata"]["name"] != want {
        return false;
    }
    let size = |q: &Value| q.as_str().and_then(bytes).unwrap_or(0);
    let has = modes(&pv["spec"]["accessModes"]);
    class_of(claim) == class_of(pv)
        && modes(&claim["spec"]["accessModes"])
            .iter()
            .all(|x| has.contains(x))
        && size(&pv["spec"]["capacity"]["storage"])
            >= size(&claim["spec"]["resources"]["requests"]["storage"])
        && pv["metadata"]["deletionTimestamp"].is_null()
}

/// Decide for a claim not yet bound. `class` is its StorageClass if that exists; `dir_of`
/// gives a node's storage directory.
pub fn claim_step(
    claim: &Value,
    volumes: &[&Value],
    class: Option<&Value>,
    dir_of: impl Fn(&str) -> Option<String>,
) -> ClaimStep {
    let size = |pv: &Value| {
        pv["spec"]["capacity"]["storage"]
            .as_str()
            .and_then(bytes)
            .unwrap_or(0)
    };
    let waits = class.is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer");
    let node = claim["metadata"]["annotations"][SELECTED_NODE]
        .as_str()
        .filter(|n| !n.is_empty());
    if waits && node.is_none() {
        return ClaimStep::Wait(
            "Normal",
            "WaitForFirstConsumer",
            "waiting for first consumer to be created before binding".into(),
        );
    }
    // A volume reserved for this claim first, then the smallest that fits.
    let reserved = volumes
        .iter()
        .find(|pv| pv["spec"]["claimRef"]["name"] == claim["metadata"]["name"] && fits(claim, pv));
    let best = reserved.or_else(|| {
        volumes
            .iter()
            .filter(|pv| !pv["spec"]["claimRef"].is_object() && fits(claim, pv))
            .filter(|pv| node.is_none_or(|n| allows(pv, n)))
            .min_by_key(|pv| size(pv))
    });
    if let Some(pv) = best {
        return ClaimStep::Bind(pv["metadata"]["name"].as_str().unwrap_or("").to_string());
    }
    let Some(class) = class else {
        let msg = match class_of(claim) {
            "" => "no persistent volumes available for this claim and no storage class is set"
                .to_string(),
            c => format!("storageclass.storage.k8s.io \"{c}\" not found"),
        };
        return ClaimStep::Wait("Warning", "ProvisioningFailed", msg);
    };
    let provisioner = class["provisioner"].as_str().unwrap_or("");
    if provisioner != PROVISIONER {
        return ClaimStep::Wait(
            "Normal",
            "ExternalProvisioning",
            format!("Waiting for a volume to be created by the external provisioner \"{provisioner}\". Outpost provisions only \"{PROVISIONER}\" volumes."),
        );
    }
    let Some(node) = node else {
        return ClaimStep::Wait(
            "Warning",
            "ProvisioningFailed",
            format!("local volumes live on one node: the class needs volumeBindingMode WaitForFirstConsumer (the \"{PROVISIONER}\" provisioner cannot pick a node itself)"),
        );
    };
    match dir_of(node) {
        Some(dir) => ClaimStep::Provision {
            node: node.to_string(),
            dir,
        },
        None => ClaimStep::Wait(
            "Warning",
            "ProvisioningFailed",
            format!("node \"{node}\" has no storage directory (outpost.dev/storage-dir); is its agent running?"),
        ),
    }
}

/// Whether a volume's node affinity lets it be used on node `name` (a volume with none
/// may be used anywhere). Only `kubernetes.io/hostname` and `metadata.name` are judged here;
/// the scheduler judges the rest.
fn allows(pv: &Value, name: &str) -> bool {
    let terms = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"];
    let Some(terms) = terms.as_array() else {
        return true;
    };
    terms.iter().any(|t| {
        ["matchExpressions", "matchFields"].iter().all(|k| {
            t[*k].as_array().into_iter().flatten().all(|e| {
                let about_name = matches!(
                    e["key"].as_str(),
                    Some("kubernetes.io/hostname" | "metadata.name")
                );
                !about_name
                    || e["operator"] != "In"
                    || e["values"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|x| x == name))
            })
        })
    })
}

/// The volume Outpost makes for `claim` on `node`, in the node's storage directory `dir`.
pub fn provisioned(claim: &Value, class: &Value, node: &str, dir: &str) -> Value {
    let m = &claim["metadata"];
    let (ns, name, uid) = (
        m["namespace"].as_str().unwrap_or("default"),
        m["name"].as_str().unwrap_or(""),
        m["uid"].as_str().unwrap_or(""),
    );
    let pv = format!("pvc-{uid}");
    json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv, "annotations": {
            "pv.kubernetes.io/provisioned-by": PROVISIONER, NODE_ANNOTATION: node}},
        "spec": {
            "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
            "accessModes": claim["spec"]["accessModes"],
            "persistentVolumeReclaimPolicy": class["reclaimPolicy"].as_str().unwrap_or("Delete"),
            "storageClassName": class_of(claim),
            "volumeMode": claim["spec"]["volumeMode"].as_str().unwrap_or("Filesystem"),
            // The directory's name starts with the volume's, which is all the agent needs
            // to find it again when the volume is gone.
            "hostPath": {"path": format!("{dir}/{pv}_{ns}_{name}"), "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
            "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                "namespace": ns, "name": name, "uid": uid}}})
}

/// What to do for one volume, given its claim if that still exists.
#[derive(Debug, PartialEq)]
pub enum VolumeStep {
    /// Set `status.phase`.
    Phase(&'static str),
    Delete,
    Nothing,
}

pub fn volume_step(pv: &Value, claim: Option<&Value>) -> VolumeStep {
    let phase = pv["status"]["phase"].as_str().unwrap_or("");
    let reserved = &pv["spec"]["claimRef"];
    // A volume reserved by name for a claim not yet bound to it is still free to that claim.
    let want = if reserved["uid"].as_str().is_none_or(str::is_empty) {
        "Available"
    } else {
        let same = claim.is_some_and(|c| c["metadata"]["uid"] == reserved["uid"]);
        if same {
            "Bound"
        } else if pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete" {
            return if pv["metadata"]["deletionTimestamp"].is_null() {
                VolumeStep::Delete
            } else {
                VolumeStep::Nothing
            };
        } else {
            "Released"
        }
    };
    if phase == want {
        VolumeStep::Nothing
    } else {
        VolumeStep::Phase(want)
    }
}

/// The controller's view: claims and volumes by key, classes by name, nodes' storage
/// directories.
#[derive(Default)]
struct Volumes {
    seen: HashMap<String, u64>,
    claims: BTreeMap<String, Value>,
    volumes: BTreeMap<String, Value>,
    classes: BTreeMap<String, Value>,
    dirs: HashMap<String, String>,
    /// What each waiting claim was last told, so it is told once.
    told: HashMap<String, String>,
    dirty: bool,
}

impl Follower for Volumes {
    fn apply(&mut self, kind: &EventKind, kv: &KeyValue) {
        // Pods are not followed, only noticed: a claim being deleted may be free now.
        if kv.key.starts_with(PODS) {
            if self.claims.values().any(deleting) {
                self.dirty = true;
            }
            return;
        }
        let Some(obj) = newer(&mut self.seen, &[CLAIMS, VOLUMES, CLASSES, NODES], kind, kv) else {
            return;
        };
        let key = kv.key.clone();
        if let Some(name) = key.strip_prefix(NODES) {
            let dir = obj.as_ref().and_then(|n| {
                n["metadata"]["annotations"][outpost_api::STORAGE_DIR_ANNOTATION]
                    .as_str()
                    .map(String::from)
            });
            if self.dirs.get(name) == dir.as_ref() {
                return;
            }
            match dir {
                Some(d) => self.dirs.insert(name.to_string(), d),
                None => self.dirs.remove(name),
            };
        } else {
            // Classes by name (claims name them); claims and volumes by key.
            let (map, k) = match key.strip_prefix(CLASSES) {
                Some(name) => (&mut self.classes, name.to_string()),
                None if key.starts_with(CLAIMS) => (&mut self.claims, key.clone()),
                None => (&mut self.volumes, key.clone()),
            };
            match obj {
                Some(o) => map.insert(k, o),
                None => {
                    self.told.remove(&k);
                    map.remove(&k)
                }
            };
        }
        self.dirty = true;
    }

    fn busy(&self) -> bool {
        self.dirty
    }

    fn resync(&mut self) {
        self.dirty = true;
    }

    async fn round(&mut self, api: &Arc<Api>) -> u64 {
        if !std::mem::take(&mut self.dirty) {
            return 0;
        }
        let mut wrote = 0;
        for (key, pv) in &self.volumes {
            let reserved = &pv["spec"]["claimRef"];
            let claim = match (reserved["namespace"].as_str(), reserved["name"].as_str()) {
                (Some(ns), Some(n)) => self.claims.get(&format!("{CLAIMS}{ns}/{n}")),
                _ => None,
            };
            let name = key.strip_prefix(VOLUMES).unwrap_or("");
            let path = format!("/api/v1/persistentvolumes/{name}");
            let rev = match volume_step(pv, claim) {
                VolumeStep::Phase(p) => {
                    let body = json!({"status": {"phase": p}});
                    call(api, "PATCH", &format!("{path}/status"), &body).await.0
                }
                VolumeStep::Delete => call(api, "DELETE", &path, &json!({})).await.0,
                VolumeStep::Nothing => 0,
            };
            wrote = wrote.max(rev);
        }
        let volumes: Vec<&Value> = self.volumes.values().collect();
        for (key, claim) in &self.claims {
            if deleting(claim) {
                wrote = wrote.max(unprotect(api, claim).await);
                continue;
            }
            let bound_to = claim["spec"]["volumeName"].as_str().unwrap_or("");
            let pv = self.volumes.get(&format!("{VOLUMES}{bound_to}"));
            if claim["status"]["phase"] == "Bound" {
                // A bound claim whose volume went away is lost, as Kubernetes calls it.
                if pv.is_none() && !bound_to.is_empty() {
                    let (ns, name) = super::ns_name(claim);
                    let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
                    let body = json!({"status": {"phase": "Lost"}});
                    wrote = wrote.max(call(api, "PATCH", &format!("{path}/status"), &body).await.0);
                    let msg =
                        "Bound claim has lost its PersistentVolume. Data on the volume is lost!";
                    super::event(
                        api,
                        "persistentvolume-controller",
                        claim,
                        "Warning",
                        "ClaimLost",
                        msg,
                    )
                    .await;
                }
                continue;
            }
            let class = self.classes.get(class_of(claim));
            let step = claim_step(claim, &volumes, class, |n| self.dirs.get(n).cloned());
            let rev = match step {
                ClaimStep::Bind(pv) => match self.volumes.get(&format!("{VOLUMES}{pv}")) {
                    Some(v) => bind(api, claim, v).await,
                    None => 0,
                },
                ClaimStep::Provision { node, dir } => {
                    let Some(class) = class else { continue };
                    let v = provisioned(claim, class, &node, &dir);
                    let (rev, made) = call(api, "POST", "/api/v1/persistentvolumes", &v).await;
                    if rev == 0 {
                        continue;
                    }
                    let msg = format!(
                        "Successfully provisioned volume {} on node {node}",
                        made["metadata"]["name"].as_str().unwrap_or("")
                    );
                    super::event(
                        api,
                        PROVISIONER,
                        claim,
                        "Normal",
                        "ProvisioningSucceeded",
                        &msg,
                    )
                    .await;
                    rev.max(bind(api, claim, &made).await)
                }
                ClaimStep::Wait(kind, reason, msg) => {
                    if self.told.get(key) != Some(&msg) {
                        super::event(
                            api,
                            "persistentvolume-controller",
                            claim,
                            kind,
                            reason,
                            &msg,
                        )
                        .await;
                        self.told.insert(key.clone(), msg);
                    }
                    0
                }
            };
            wrote = wrote.max(rev);
        }
        wrote
    }
}

fn deleting(claim: &Value) -> bool {
    !claim["metadata"]["deletionTimestamp"].is_null()
}

/// Lift a deleted claim's protection once no pod that has not finished uses it.
async fn unprotect(api: &Arc<Api>, claim: &Value) -> u64 {
    let finalizers: Vec<&Value> = claim["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if !finalizers.iter().any(|f| *f == PROTECTION) {
        return 0;
    }
    let (ns, name) = super::ns_name(claim);
    let pods = api
        .store
        .range(&format!("{PODS}{ns}/"), None, 0, Consistency::Linearizable)
        .await;
    let Ok(pods) = pods else { return 0 };
    let used = pods.kvs.iter().any(|kv| {
        serde_json::from_slice::<Value>(&kv.value).is_ok_and(|p| {
            !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
                && crate::api::node::pod_claims(&p).any(|c| c == name)
        })
    });
    if used {
        return 0;
    }
    let rest: Vec<&Value> = finalizers
        .into_iter()
        .filter(|f| *f != PROTECTION)
        .collect();
    let body = json!({"metadata": {"finalizers": rest,
        "resourceVersion": claim["metadata"]["resourceVersion"]}});
    let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
    call(api, "PATCH", &path, &body).await.0
}

async fn call(api: &Arc<Api>, method: &str, path: &str, body: &Value) -> (u64, Value) {
    let ct = if method == "PATCH" {
        MERGE
    } else {
        "application/json"
    };
    write_as(api, &me(), method, path, ct, body).await
}

/// Bind `claim` and volume `pv`: the volume is reserved first, so a claim is never bound to
/// a volume another claim holds.
async fn bind(api: &Arc<Api>, claim: &Value, pv: &Value) -> u64 {
    let m = &claim["metadata"];
    let (ns, name) = super::ns_name(claim);
    let pv_name = pv["metadata"]["name"].as_str().unwrap_or("");
    let pv_path = format!("/api/v1/persistentvolumes/{pv_name}");
    let mut wrote = 0;
    if pv["spec"]["claimRef"]["uid"] != m["uid"] {
        // Conditional on the volume as this controller saw it: a volume reserved meanwhile
        // by someone else is not taken from them.
        let body = json!({"metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
            "spec": {"claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
            "namespace": ns, "name": name, "uid": m["uid"]}}});
        let (rev, _) = call(api, "PATCH", &pv_path, &body).await;
        if rev == 0 {
            return 0;
        }
        wrote = rev;
    }
    if pv["status"]["phase"] != "Bound" {
        let body = json!({"status": {"phase": "Bound"}});
        wrote = wrote.max(
            call(api, "PATCH", &format!("{pv_path}/status"), &body)
                .await
                .0,
        );
    }
    let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
    let body = json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
        "spec": {"volumeName": pv_name}});
    wrote = wrote.max(call(api, "PATCH", &path, &body).await.0);
    let body = json!({"status": {"phase": "Bound", "accessModes": pv["spec"]["accessModes"],
        "capacity": pv["spec"]["capacity"]}});
    wrote.max(call(api, "PATCH", &format!("{path}/status"), &body).await.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(class: &str, size: &str, node: Option<&str>) -> Value {
        let mut c = json!({"metadata": {"name": "data-web-0", "namespace": "default", "uid": "u1"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                     "resources": {"requests": {"storage": size}}}});
        if let Some(n) = node {
            c["metadata"]["annotations"] = json!({SELECTED_NODE: n});
        }
        c
    }

    fn pv(name: &str, class: &str, size: &str) -> Value {
        json!({"metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "storageClassName": class,
                     "capacity": {"storage": size}, "hostPath": {"path": "/srv"},
                     "persistentVolumeReclaimPolicy": "Retain"},
            "status": {"phase": "Available"}})
    }

    fn local() -> Value {
        json!({"metadata": {"name": "local-path"}, "provisioner": PROVISIONER,
               "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"})
    }

    #[test]
    fn static_claims_take_the_smallest_volume_that_fits() {
        let (small, big, other) = (
            pv("small", "manual", "1Gi"),
            pv("big", "manual", "10Gi"),
            pv("other", "fast", "1Gi"),
        );
        let vols = [&big, &small, &other];
        let none = |_: &str| None;
        assert_eq!(
            claim_step(&claim("manual", "512Mi", None), &vols, None, none),
            ClaimStep::Bind("small".into())
        );
        assert_eq!(
            claim_step(&claim("manual", "2Gi", None), &vols, None, none),
            ClaimStep::Bind("big".into())
        );
        let step = claim_step(&claim("manual", "20Gi", None), &vols, None, none);
        assert!(
            matches!(step, ClaimStep::Wait("Warning", "ProvisioningFailed", _)),
            "{step:?}"
        );
        // Another claim's volume is not taken; a Released one neither.
        let mut taken = pv("taken", "manual", "1Gi");
        taken["spec"]["claimRef"] = json!({"namespace": "default", "name": "other", "uid": "u9"});
        let mut released = pv("released", "manual", "1Gi");
        released["status"]["phase"] = json!("Released");
        let step = claim_step(
            &claim("manual", "1Gi", None),
            &[&taken, &released],
            None,
            none,
        );
        assert!(matches!(step, ClaimStep::Wait(..)), "{step:?}");
        // A volume reserved for the claim wins over a smaller free one.
        let mut mine = pv("mine", "manual", "10Gi");
        mine["spec"]["claimRef"] = json!({"namespace": "default", "name": "data-web-0"});
        assert_eq!(
            claim_step(&claim("manual", "1Gi", None), &[&small, &mine], None, none),
            ClaimStep::Bind("mine".into())
        );
    }

    #[test]
    fn local_claims_wait_for_their_node_then_provision_there() {
        let class = local();
        let dirs = |n: &str| (n == "edge-1").then(|| "/var/lib/outpost/storage".to_string());
        let step = claim_step(&claim("local-path", "1Gi", None), &[], Some(&class), dirs);
        assert!(matches!(
            step,
            ClaimStep::Wait("Normal", "WaitForFirstConsumer", _)
        ));
        let c = claim("local-path", "1Gi", Some("edge-1"));
        let step = claim_step(&c, &[], Some(&class), dirs);
        assert_eq!(
            step,
            ClaimStep::Provision {
                node: "edge-1".into(),
                dir: "/var/lib/outpost/storage".into()
            }
        );
        let v = provisioned(&c, &class, "edge-1", "/var/lib/outpost/storage");
        assert_eq!(v["metadata"]["name"], "pvc-u1");
        assert_eq!(
            v["spec"]["hostPath"]["path"],
            "/var/lib/outpost/storage/pvc-u1_default_data-web-0"
        );
        assert_eq!(v["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(v["spec"]["claimRef"]["uid"], "u1");
        assert!(allows(&v, "edge-1") && !allows(&v, "edge-2"));
        // The made volume is the claim's: bound on the next look.
        assert_eq!(
            claim_step(&c, &[&v], Some(&class), dirs),
            ClaimStep::Bind("pvc-u1".into())
        );
        // A node without a storage directory cannot take it.
        let step = claim_step(
            &claim("local-path", "1Gi", Some("edge-2")),
            &[],
            Some(&class),
            dirs,
        );
        assert!(matches!(
            step,
            ClaimStep::Wait("Warning", "ProvisioningFailed", _)
        ));
        // Immediate binding cannot choose a node for a local volume.
        let mut now = local();
        now["volumeBindingMode"] = json!("Immediate");
        let step = claim_step(&claim("local-path", "1Gi", None), &[], Some(&now), dirs);
        assert!(
            matches!(step, ClaimStep::Wait("Warning", "ProvisioningFailed", m) if m.contains("WaitForFirstConsumer"))
        );
    }

    #[test]
    fn volumes_follow_their_claims() {
        let c = claim("manual", "1Gi", None);
        let free = pv("a", "manual", "1Gi");
        assert_eq!(volume_step(&free, None), VolumeStep::Nothing);
        // Reserved by name for a claim that has not bound yet: still Available.
        let mut named = free.clone();
        named["spec"]["claimRef"] = json!({"namespace": "default", "name": "data-web-0"});
        assert_eq!(volume_step(&named, None), VolumeStep::Nothing);
        let mut new = free.clone();
        new["status"] = json!({});
        assert_eq!(volume_step(&new, None), VolumeStep::Phase("Available"));
        let mut held = free.clone();
        held["spec"]["claimRef"] =
            json!({"namespace": "default", "name": "data-web-0", "uid": "u1"});
        assert_eq!(volume_step(&held, Some(&c)), VolumeStep::Phase("Bound"));
        held["status"]["phase"] = json!("Bound");
        assert_eq!(volume_step(&held, Some(&c)), VolumeStep::Nothing);
        // The claim is gone (or is another claim of the same name): released or deleted.
        assert_eq!(volume_step(&held, None), VolumeStep::Phase("Released"));
        let mut again = c.clone();
        again["metadata"]["uid"] = json!("u2");
        assert_eq!(
            volume_step(&held, Some(&again)),
            VolumeStep::Phase("Released")
        );
        held["spec"]["persistentVolumeReclaimPolicy"] = json!("Delete");
        assert_eq!(volume_step(&held, None), VolumeStep::Delete);
    }
}
