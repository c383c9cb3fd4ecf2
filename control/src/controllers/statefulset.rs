//! The StatefulSet controller's decisions: pods with stable names (`NAME-0`, `NAME-1`, …),
//! made in order and given up in reverse order, and rolling updates from the highest ordinal
//! down to the partition.
//!
//! With `podManagementPolicy: OrderedReady` (the default) nothing moves while any pod in range
//! is not Running and Ready: pod `i` is created only after `0..i` are, scale-down takes the
//! highest ordinal first and one at a time, and an update replaces one pod and waits for it.
//! `Parallel` creates and deletes without waiting; updates still go one at a time, as
//! Kubernetes does with the default `maxUnavailable` of 1.
//!
//! Each `volumeClaimTemplates` entry gives every pod its own claim (`TEMPLATE-NAME-N`), made
//! before the pod and kept across its restarts, rescheduling and the set's updates; the
//! `persistentVolumeClaimRetentionPolicy` says whether claims go when the set is deleted or
//! scaled down.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::deployment::template_hash;
use super::replicaset::{active, available, pod_from, ready};

pub const HASH: &str = "controller-revision-hash";
pub const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";

/// What to do for one StatefulSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Ordinals that need a pod.
    pub create: Vec<u64>,
    /// Pods to delete: finished, surplus, or from an older template.
    pub delete: Vec<String>,
    pub status: Value,
}

/// The revision a template makes: the value of each pod's `controller-revision-hash`.
pub fn revision(sts: &Value) -> String {
    let name = sts["metadata"]["name"].as_str().unwrap_or("");
    format!("{name}-{}", template_hash(&sts["spec"]["template"]))
}

/// The ordinal in a pod's name, if it is `NAME-N`.
fn ordinal(sts_name: &str, pod: &Value) -> Option<u64> {
    pod["metadata"]["name"]
        .as_str()?
        .strip_prefix(sts_name)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// Running and available (Ready for `min_ready` seconds at `now`), as the next step waits for.
fn healthy(p: &Value, min_ready: i64, now: i64) -> bool {
    active(p) && p["status"]["phase"] == "Running" && available(p, min_ready, now)
}

fn name(p: &Value) -> String {
    p["metadata"]["name"].as_str().unwrap_or("").to_string()
}

/// Plan for `sts` given the pods it controls, at `now` (unix seconds).
pub fn plan(sts: &Value, pods: &[&Value], now: i64) -> Plan {
    let min_ready = sts["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let healthy = |p: &Value| healthy(p, min_ready, now);
    let spec = &sts["spec"];
    let me = sts["metadata"]["name"].as_str().unwrap_or("");
    let want = spec["replicas"].as_u64().unwrap_or(1);
    let start = spec["ordinals"]["start"].as_u64().unwrap_or(0);
    let ordered = spec["podManagementPolicy"] != "Parallel";
    let update = revision(sts);
    let rev = |p: &Value| {
        p["metadata"]["labels"][HASH]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    let mut plan = Plan::default();
    let mut by: BTreeMap<u64, &Value> = BTreeMap::new();
    let mut condemned: Vec<(u64, &Value)> = vec![];
    for p in pods.iter().copied() {
        match ordinal(me, p) {
            Some(i) if (start..start + want).contains(&i) => {
                by.insert(i, p);
            }
            Some(i) => condemned.push((i, p)),
            // Not one of ours by name: it cannot keep a stable identity, so it goes.
            None if p["metadata"]["deletionTimestamp"].is_null() => plan.delete.push(name(p)),
            None => {}
        }
    }
    condemned.sort_by_key(|(i, _)| std::cmp::Reverse(*i));

    // Fill the range in order; in OrderedReady mode stop at the first pod that is not
    // Running and Ready (waiting on it).
    let mut waiting = false;
    for i in start..start + want {
        match by.get(&i) {
            None => {
                plan.create.push(i);
                waiting = true;
            }
            Some(p) if !p["metadata"]["deletionTimestamp"].is_null() => waiting = true,
            Some(p) if !active(p) => {
                // A finished pod is replaced under the same name.
                plan.delete.push(name(p));
                waiting = true;
            }
            Some(p) => waiting = !healthy(p),
        }
        if waiting && ordered {
            break;
        }
    }
    let unhealthy = waiting || by.values().any(|p| !healthy(p));

    // Surplus ordinals, highest first; one at a time in OrderedReady mode, and only while
    // the rest are healthy.
    let terminating = condemned
        .iter()
        .any(|(_, p)| !p["metadata"]["deletionTimestamp"].is_null());
    for (_, p) in &condemned {
        if ordered && (unhealthy || terminating) {
            break;
        }
        if p["metadata"]["deletionTimestamp"].is_null() {
            plan.delete.push(name(p));
            if ordered {
                break;
            }
        }
    }

    // Rolling update: replace the highest pod at or above the partition that is not at the
    // update revision, once everything is healthy and nothing else is changing.
    let rolling = spec["updateStrategy"]["type"]
        .as_str()
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    let partition = spec["updateStrategy"]["rollingUpdate"]["partition"]
        .as_u64()
        .unwrap_or(0);
    let settled =
        !unhealthy && condemned.is_empty() && plan.create.is_empty() && plan.delete.is_empty();
    if rolling && settled {
        if let Some((_, p)) = by
            .iter()
            .rev()
            .filter(|(i, _)| **i >= start + partition)
            .find(|(_, p)| rev(p) != update)
        {
            plan.delete.push(name(p));
        }
    }

    let live: Vec<&Value> = pods.iter().copied().filter(|p| active(p)).collect();
    let updated = live.iter().filter(|p| rev(p) == update).count() as u64;
    // The current revision moves to the update revision once every pod has it.
    let done = updated == want && live.len() as u64 == want;
    let current = match sts["status"]["currentRevision"].as_str() {
        Some(c) if !c.is_empty() && !done => c.to_string(),
        _ => update.clone(),
    };
    let ready_n = live.iter().filter(|p| ready(p)).count();
    plan.status = json!({
        "replicas": live.len(),
        "readyReplicas": ready_n,
        "availableReplicas": live.iter().filter(|p| available(p, min_ready, now)).count(),
        "currentReplicas": live.iter().filter(|p| rev(p) == current).count(),
        "updatedReplicas": updated,
        "currentRevision": current,
        "updateRevision": update,
        "collisionCount": 0,
        "observedGeneration": sts["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    plan
}

/// Pod `ordinal` of `sts`: its stable name, hostname and subdomain (the governing service),
/// and the labels that say which pod and which revision it is.
pub fn pod_for(sts: &Value, ordinal: u64) -> Value {
    let mut p = pod_from(sts, "apps/v1", "StatefulSet");
    let me = sts["metadata"]["name"].as_str().unwrap_or("");
    let name = format!("{me}-{ordinal}");
    let m = p["metadata"].as_object_mut().expect("a pod has metadata");
    m.remove("generateName");
    m.insert("name".into(), json!(name));
    let labels = m.entry("labels").or_insert_with(|| json!({}));
    labels[HASH] = json!(revision(sts));
    labels[POD_NAME] = json!(name);
    labels[POD_INDEX] = json!(ordinal.to_string());
    p["spec"]["hostname"] = json!(name);
    if let Some(svc) = sts["spec"]["serviceName"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        p["spec"]["subdomain"] = json!(svc);
    }
    // Each claim template becomes the volume of that name, backed by this ordinal's claim.
    for (vol, claim) in claims_for(sts, ordinal) {
        let volume =
            json!({"name": vol, "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}});
        let vols = &mut p["spec"]["volumes"];
        if !vols.is_array() {
            *vols = json!([]);
        }
        if let Some(vols) = vols.as_array_mut() {
            vols.retain(|v| v["name"] != vol.as_str());
            vols.push(volume);
        }
    }
    p
}

/// The claims pod `ordinal` uses, one per `volumeClaimTemplates` entry: (template name,
/// claim named `TEMPLATE-STS-ORDINAL`). With `whenDeleted: Delete` they are owned by the
/// StatefulSet, so they go with it; otherwise they outlive it, as Kubernetes keeps them.
pub fn claims_for(sts: &Value, ordinal: u64) -> Vec<(String, Value)> {
    let me = sts["metadata"]["name"].as_str().unwrap_or("");
    let ns = sts["metadata"]["namespace"].as_str().unwrap_or("default");
    let owned = sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete";
    let mut labels = sts["spec"]["selector"]["matchLabels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let vol = t["metadata"]["name"].as_str()?.to_string();
            let mut c = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("{vol}-{me}-{ordinal}"), "namespace": ns,
                    "labels": labels.clone()},
                "spec": t["spec"].clone()});
            if let Some(l) = t["metadata"]["labels"].as_object() {
                for (k, v) in l {
                    c["metadata"]["labels"][k] = v.clone();
                }
            }
            if let Some(a) = t["metadata"]["annotations"].as_object() {
                c["metadata"]["annotations"] = json!(a);
            }
            if owned {
                c["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
                    "kind": "StatefulSet", "name": me, "uid": sts["metadata"]["uid"],
                    "controller": true, "blockOwnerDeletion": true}]);
            }
            Some((vol, c))
        })
        .collect()
}

/// The ordinal of a pod this StatefulSet no longer wants (scaled away), whose claims
/// `whenScaled: Delete` gives up with it.
pub fn scaled_away(sts: &Value, pod: &str) -> Option<u64> {
    let me = sts["metadata"]["name"].as_str().unwrap_or("");
    let i: u64 = pod.strip_prefix(me)?.strip_prefix('-')?.parse().ok()?;
    let start = sts["spec"]["ordinals"]["start"].as_u64().unwrap_or(0);
    let want = sts["spec"]["replicas"].as_u64().unwrap_or(1);
    let gone = !(start..start + want).contains(&i);
    (gone && sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete")
        .then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(replicas: u64, policy: &str) -> Value {
        json!({"metadata": {"name": "db", "namespace": "default", "uid": "u1", "generation": 2},
               "spec": {"replicas": replicas, "serviceName": "db", "podManagementPolicy": policy,
                   "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
                   "template": {"metadata": {"labels": {"app": "db"}},
                       "spec": {"containers": [{"name": "c", "image": "module:v1"}]}}}})
    }

    #[test]
    fn claim_templates_become_each_pods_claims() {
        let mut s = sts(2, "OrderedReady");
        s["spec"]["selector"] = json!({"matchLabels": {"app": "db"}});
        s["spec"]["template"]["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}},
                                                          {"name": "cfg", "configMap": {"name": "c"}}]);
        s["spec"]["volumeClaimTemplates"] = json!([{"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]);
        let claims = claims_for(&s, 1);
        assert_eq!(claims.len(), 1);
        let (vol, c) = &claims[0];
        assert_eq!(vol, "data");
        assert_eq!(c["metadata"]["name"], "data-db-1");
        assert_eq!(c["metadata"]["labels"]["app"], "db");
        assert_eq!(c["spec"]["resources"]["requests"]["storage"], "1Gi");
        // Kept when the set goes, unless the policy says otherwise.
        assert!(c["metadata"]["ownerReferences"].is_null());
        let p = pod_for(&s, 1);
        let vols = p["spec"]["volumes"].as_array().unwrap();
        assert_eq!(
            vols.len(),
            2,
            "the template's own `data` volume is replaced: {vols:?}"
        );
        assert!(
            vols.iter()
                .any(|v| v["name"] == "data"
                    && v["persistentVolumeClaim"]["claimName"] == "data-db-1")
        );
        s["spec"]["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenDeleted": "Delete", "whenScaled": "Delete"});
        assert_eq!(
            claims_for(&s, 0)[0].1["metadata"]["ownerReferences"][0]["uid"],
            "u1"
        );
        assert_eq!(scaled_away(&s, "db-2"), Some(2));
        assert_eq!(scaled_away(&s, "db-1"), None);
        s["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] = json!("Retain");
        assert_eq!(scaled_away(&s, "db-2"), None);
    }

    /// Pod `i` of `s`, at `s`'s revision, in `phase` and `ready`.
    fn pod(s: &Value, i: u64, phase: &str, ready: bool) -> Value {
        let mut p = pod_for(s, i);
        p["status"] = json!({"phase": phase, "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]});
        p
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.delete.iter().map(String::as_str).collect()
    }

    #[test]
    fn pods_have_stable_names_and_identity() {
        let p = pod_for(&sts(3, "OrderedReady"), 2);
        assert_eq!(p["metadata"]["name"], "db-2");
        assert!(p["metadata"].get("generateName").is_none());
        assert_eq!(p["metadata"]["labels"][POD_NAME], "db-2");
        assert_eq!(p["metadata"]["labels"][POD_INDEX], "2");
        assert_eq!(p["metadata"]["labels"]["app"], "db");
        assert_eq!(p["spec"]["hostname"], "db-2");
        assert_eq!(p["spec"]["subdomain"], "db");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "StatefulSet");
    }

    #[test]
    fn ordered_creation_waits_for_each_pod() {
        let s = sts(3, "OrderedReady");
        assert_eq!(plan(&s, &[], 0).create, [0]);
        let p0 = pod(&s, 0, "Pending", false);
        assert!(plan(&s, &[&p0], 0).create.is_empty(), "waits for db-0");
        let p0 = pod(&s, 0, "Running", true);
        assert_eq!(plan(&s, &[&p0], 0).create, [1]);
        let p1 = pod(&s, 1, "Running", true);
        let pl = plan(&s, &[&p0, &p1], 0);
        assert_eq!(pl.create, [2]);
        assert_eq!(pl.status["readyReplicas"], 2);
        // Parallel makes them all at once.
        assert_eq!(plan(&sts(3, "Parallel"), &[], 0).create, [0, 1, 2]);
    }

    #[test]
    fn min_ready_seconds_hold_the_next_pod() {
        let mut s = sts(2, "OrderedReady");
        s["spec"]["minReadySeconds"] = json!(10);
        let mut p0 = pod(&s, 0, "Running", true);
        p0["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
        let t0 = "2026-01-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        let early = plan(&s, &[&p0], t0 + 5);
        assert!(
            early.create.is_empty(),
            "db-0 is ready but not yet available"
        );
        assert_eq!(early.status["availableReplicas"], 0);
        let later = plan(&s, &[&p0], t0 + 10);
        assert_eq!(later.create, [1]);
        assert_eq!(later.status["availableReplicas"], 1);
    }

    #[test]
    fn a_missing_middle_pod_is_made_again_first() {
        let s = sts(3, "OrderedReady");
        let (p0, p2) = (pod(&s, 0, "Running", true), pod(&s, 2, "Running", true));
        let pl = plan(&s, &[&p0, &p2], 0);
        assert_eq!(pl.create, [1]);
        assert!(pl.delete.is_empty());
        let failed = pod(&s, 1, "Failed", false);
        assert_eq!(names(&plan(&s, &[&p0, &failed, &p2], 0)), ["db-1"]);
    }

    #[test]
    fn scale_down_takes_the_highest_first_one_at_a_time() {
        let big = sts(4, "OrderedReady");
        let ps: Vec<Value> = (0..4).map(|i| pod(&big, i, "Running", true)).collect();
        let refs: Vec<&Value> = ps.iter().collect();
        let s = sts(1, "OrderedReady");
        assert_eq!(names(&plan(&s, &refs, 0)), ["db-3"]);
        let mut going = ps[3].clone();
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert!(
            plan(&s, &[&ps[0], &ps[1], &ps[2], &going], 0)
                .delete
                .is_empty(),
            "waits for db-3 to be gone"
        );
        assert_eq!(names(&plan(&s, &[&ps[0], &ps[1], &ps[2]], 0)), ["db-2"]);
        // Not while a pod in range is unhealthy.
        let sick = pod(&s, 0, "Running", false);
        assert!(plan(&s, &[&sick, &ps[1]], 0).delete.is_empty());
        // Parallel gives up all surplus at once.
        assert_eq!(
            names(&plan(&sts(1, "Parallel"), &refs, 0)),
            ["db-3", "db-2", "db-1"]
        );
    }

    #[test]
    fn updates_roll_from_the_top_down_to_the_partition() {
        let old = sts(3, "OrderedReady");
        let ps: Vec<Value> = (0..3).map(|i| pod(&old, i, "Running", true)).collect();
        let refs: Vec<&Value> = ps.iter().collect();
        let mut new = old.clone();
        new["spec"]["template"]["spec"]["containers"][0]["image"] = json!("module:v2");
        new["status"]["currentRevision"] = json!(revision(&old));
        let pl = plan(&new, &refs, 0);
        assert_eq!(names(&pl), ["db-2"]);
        assert_eq!(pl.status["updatedReplicas"], 0);
        assert_eq!(pl.status["currentRevision"], revision(&old));
        assert_eq!(pl.status["updateRevision"], revision(&new));
        // db-2 back at the new revision but not yet ready: wait.
        let p2 = pod(&new, 2, "Running", false);
        assert!(plan(&new, &[&ps[0], &ps[1], &p2], 0).delete.is_empty());
        let p2 = pod(&new, 2, "Running", true);
        assert_eq!(names(&plan(&new, &[&ps[0], &ps[1], &p2], 0)), ["db-1"]);
        // A partition of 2 keeps db-0 and db-1 at the old revision.
        let mut part = new.clone();
        part["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = json!(2);
        assert!(plan(&part, &[&ps[0], &ps[1], &p2], 0).delete.is_empty());
        // All updated: the current revision follows.
        let all: Vec<Value> = (0..3).map(|i| pod(&new, i, "Running", true)).collect();
        let pl = plan(&new, &all.iter().collect::<Vec<_>>(), 0);
        assert!(pl.delete.is_empty() && pl.create.is_empty());
        assert_eq!(pl.status["currentRevision"], revision(&new));
        assert_eq!(pl.status["currentReplicas"], 3);
        // OnDelete leaves old pods alone.
        let mut manual = new.clone();
        manual["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(plan(&manual, &refs, 0).delete.is_empty());
    }
}
