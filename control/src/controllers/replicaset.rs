//! The ReplicaSet controller's decisions: how many pods to create or which to delete so that
//! a ReplicaSet has `spec.replicas` active pods, and the status it reports.

use serde_json::{json, Value};

/// What to do for one ReplicaSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create from the template.
    pub create: usize,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    pub status: Value,
}

/// A pod still counts while it is neither finished nor being deleted.
pub fn active(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && !matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
}

pub fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Ready for at least `min_ready` seconds at `now` (unix seconds): what Kubernetes counts as
/// available.
pub fn available(pod: &Value, min_ready: i64, now: i64) -> bool {
    if min_ready <= 0 {
        return ready(pod);
    }
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter().any(|c| {
            c["type"] == "Ready"
                && c["status"] == "True"
                && crate::api::seconds(&c["lastTransitionTime"])
                    .is_some_and(|t| t + min_ready <= now)
        })
    })
}

/// Which pod to give up first when scaling down, as the ReplicaSet controller ranks them:
/// unscheduled before scheduled, pending before running, not ready before ready, then the
/// newest first.
fn rank(pod: &Value) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = !pod["spec"]["nodeName"].as_str().unwrap_or("").is_empty();
    let running = pod["status"]["phase"] == "Running";
    (
        u8::from(scheduled),
        u8::from(running),
        u8::from(ready(pod)),
        std::cmp::Reverse(
            pod["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ),
    )
}

/// Plan for `rs` given the pods it controls, at `now` (unix seconds).
pub fn plan(rs: &Value, pods: &[&Value], now: i64) -> Plan {
    let want = rs["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
    let mut live: Vec<&Value> = pods.iter().copied().filter(|p| active(p)).collect();
    let (create, delete) = if live.len() < want {
        (want - live.len(), vec![])
    } else {
        live.sort_by_key(|p| rank(p));
        let extra = live.len() - want;
        let delete = live[..extra]
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect();
        (0, delete)
    };
    let labels = rs["spec"]["template"]["metadata"]["labels"].as_object();
    let fully = live
        .iter()
        .filter(|p| labels.is_none_or(|l| l.iter().all(|(k, v)| p["metadata"]["labels"][k] == *v)))
        .count();
    let ready_n = live.iter().filter(|p| ready(p)).count();
    let min_ready = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let available_n = live.iter().filter(|p| available(p, min_ready, now)).count();
    let status = json!({
        "replicas": live.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": ready_n,
        "availableReplicas": available_n,
        "observedGeneration": rs["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    Plan {
        create,
        delete,
        status,
    }
}

/// A new pod for `rs`, named by the API from `generateName`.
pub fn pod_for(rs: &Value) -> Value {
    pod_from(rs, "apps/v1", "ReplicaSet")
}

/// A pod from `owner`'s template (`spec.template`), named by the API from `generateName`,
/// with `owner` (of `api_version` and `kind`) as its controller.
pub fn pod_from(owner: &Value, api_version: &str, kind: &str) -> Value {
    let t = &owner["spec"]["template"];
    let name = owner["metadata"]["name"].as_str().unwrap_or("");
    let mut meta = t["metadata"].as_object().cloned().unwrap_or_default();
    meta.remove("creationTimestamp");
    meta.insert("generateName".into(), json!(format!("{name}-")));
    meta.insert("namespace".into(), owner["metadata"]["namespace"].clone());
    meta.insert(
        "ownerReferences".into(),
        json!([{"apiVersion": api_version, "kind": kind, "name": name,
                "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]),
    );
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": t["spec"]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, phase: &str, ready: bool, created: &str) -> Value {
        json!({"metadata": {"name": name, "creationTimestamp": created, "labels": {"app": "a"}},
               "spec": {"nodeName": node},
               "status": {"phase": phase, "conditions": [
                   {"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    fn rs(replicas: u64) -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "default", "uid": "u1", "generation": 3},
               "spec": {"replicas": replicas, "template": {
                   "metadata": {"labels": {"app": "a"}, "creationTimestamp": null},
                   "spec": {"containers": [{"name": "c", "image": "module:x"}]}}}})
    }

    #[test]
    fn creates_what_is_missing_and_reports() {
        let a = pod("a", "n1", "Running", true, "2026-01-01T00:00:01Z");
        let done = pod("b", "n1", "Succeeded", false, "2026-01-01T00:00:02Z");
        let p = plan(&rs(3), &[&a, &done], 0);
        assert_eq!(p.create, 2, "a finished pod does not count");
        assert!(p.delete.is_empty());
        assert_eq!(p.status["replicas"], 1);
        assert_eq!(p.status["readyReplicas"], 1);
        assert_eq!(p.status["observedGeneration"], 3);
    }

    #[test]
    fn available_means_ready_for_min_ready_seconds() {
        let mut a = pod("a", "n1", "Running", true, "2026-01-01T00:00:01Z");
        a["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-01-01T00:00:10Z");
        let mut slow = rs(1);
        slow["spec"]["minReadySeconds"] = json!(5);
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
        let early = plan(&slow, &[&a], at("2026-01-01T00:00:12Z"));
        assert_eq!(
            (
                early.status["readyReplicas"].as_u64(),
                early.status["availableReplicas"].as_u64()
            ),
            (Some(1), Some(0))
        );
        let later = plan(&slow, &[&a], at("2026-01-01T00:00:15Z"));
        assert_eq!(later.status["availableReplicas"], 1);
    }

    #[test]
    fn deletes_the_least_settled_first() {
        let ready_old = pod("ready-old", "n1", "Running", true, "2026-01-01T00:00:01Z");
        let ready_new = pod("ready-new", "n1", "Running", true, "2026-01-01T00:00:05Z");
        let unready = pod("unready", "n1", "Running", false, "2026-01-01T00:00:02Z");
        let pending = pod("pending", "n1", "Pending", false, "2026-01-01T00:00:03Z");
        let unscheduled = pod("unscheduled", "", "Pending", false, "2026-01-01T00:00:04Z");
        let all = [&ready_old, &ready_new, &unready, &pending, &unscheduled];
        assert_eq!(plan(&rs(4), &all, 0).delete, ["unscheduled"]);
        assert_eq!(
            plan(&rs(1), &all, 0).delete,
            ["unscheduled", "pending", "unready", "ready-new"]
        );
    }

    #[test]
    fn new_pods_carry_the_template_and_an_owner() {
        let p = pod_for(&rs(1));
        assert_eq!(p["metadata"]["generateName"], "web-1-");
        assert_eq!(p["metadata"]["labels"]["app"], "a");
        assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
        assert!(p["metadata"].get("creationTimestamp").is_none());
        assert_eq!(p["spec"]["containers"][0]["image"], "module:x");
    }
}
