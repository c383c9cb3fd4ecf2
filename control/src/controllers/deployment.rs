//! The Deployment controller's decisions: which ReplicaSet is the new one (its template is
//! the Deployment's), how far to scale it up and the old ones down (RollingUpdate within
//! maxSurge and maxUnavailable, or Recreate), revisions, history, and the status that
//! `kubectl rollout status` reads.

use serde_json::{json, Map, Value};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH: &str = "pod-template-hash";

/// What to do for one Deployment.
#[derive(Debug, Default)]
pub struct Plan {
    /// A new ReplicaSet to create.
    pub create: Option<Value>,
    /// (ReplicaSet name, replicas) to set.
    pub scale: Vec<(String, u64)>,
    /// (ReplicaSet name, revision) to set: an old template brought back becomes the newest
    /// revision.
    pub revise: Vec<(String, u64)>,
    /// (ReplicaSet name, annotations) to set on the new ReplicaSet: the Deployment's own,
    /// as [`copied`] passes them on.
    pub annotate: Vec<(String, Map<String, Value>)>,
    /// Old ReplicaSets beyond `revisionHistoryLimit`.
    pub delete: Vec<String>,
    /// The Deployment's revision annotation.
    pub revision: u64,
    pub status: Value,
}

/// A template without what does not make it different: nulls, empty maps and lists, and
/// the `pod-template-hash` label a ReplicaSet adds.
fn canon(v: &Value) -> Value {
    fn strip(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Object(m) => {
                let m: Map<String, Value> = m
                    .iter()
                    .filter_map(|(k, v)| strip(v).map(|v| (k.clone(), v)))
                    .collect();
                (!m.is_empty()).then_some(Value::Object(m))
            }
            Value::Array(a) if a.is_empty() => None,
            Value::Array(a) => Some(Value::Array(
                a.iter().map(|v| strip(v).unwrap_or(Value::Null)).collect(),
            )),
            v => Some(v.clone()),
        }
    }
    let mut t = v.clone();
    if let Some(l) = t["metadata"]["labels"].as_object_mut() {
        l.remove(HASH);
    }
    strip(&t).unwrap_or(Value::Null)
}

/// The `pod-template-hash` of a template: ten characters from the alphabet Kubernetes uses
/// for generated names (no vowels, so no words).
pub fn template_hash(template: &Value) -> String {
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let digest = outpost_api::sha256_hex(canon(template).to_string().as_bytes());
    let mut n = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
    (0..10)
        .map(|_| {
            let c = SAFE[(n % SAFE.len() as u64) as usize] as char;
            n /= SAFE.len() as u64;
            c
        })
        .collect()
}

pub fn revision(o: &Value) -> u64 {
    o["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// An int-or-percent of `total`, rounded up (surge) or down (unavailable).
fn amount(v: &Value, total: u64, up: bool) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<u64>().ok()) {
            Some(p) if up => (p * total).div_ceil(100),
            Some(p) => p * total / 100,
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

fn spec_replicas(rs: &Value) -> u64 {
    rs["spec"]["replicas"].as_u64().unwrap_or(0)
}

fn count(rs: &Value, k: &str) -> u64 {
    rs["status"][k].as_u64().unwrap_or(0)
}

/// The Deployment's annotations its ReplicaSets carry too (kubectl's
/// `kubernetes.io/change-cause`, which `rollout history` shows, among them), as the
/// Deployment controller copies them: all but those of apply and of the controller itself.
pub fn copied(d: &Value) -> Map<String, Value> {
    const SKIP: [&str; 6] = [
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        "deployment.kubernetes.io/revision-history",
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    ];
    d["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !SKIP.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The new ReplicaSet for `d` at `revision` with `replicas`.
fn new_rs(d: &Value, hash: &str, revision: u64, replicas: u64, surge: u64) -> Value {
    let name = d["metadata"]["name"].as_str().unwrap_or("");
    let want = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["labels"][HASH] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"][HASH] = json!(hash);
    let mut annotations = copied(d);
    annotations.insert(REVISION.into(), json!(revision.to_string()));
    annotations.insert(
        "deployment.kubernetes.io/desired-replicas".into(),
        json!(want.to_string()),
    );
    annotations.insert(
        "deployment.kubernetes.io/max-replicas".into(),
        json!((want + surge).to_string()),
    );
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{name}-{hash}"),
            "namespace": d["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                "uid": d["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": replicas, "selector": selector, "template": template,
            "minReadySeconds": d["spec"]["minReadySeconds"].as_u64().unwrap_or(0)}})
}

/// Plan for `d` given the ReplicaSets it controls.
pub fn plan(d: &Value, rss: &[&Value]) -> Plan {
    let want = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let strategy = &d["spec"]["strategy"];
    let recreate = strategy["type"] == "Recreate";
    let ru = &strategy["rollingUpdate"];
    let surge = if recreate {
        0
    } else {
        amount(&ru["maxSurge"], want, true)
    };
    let mut unavailable = if recreate {
        want
    } else {
        amount(&ru["maxUnavailable"], want, false)
    };
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let paused = d["spec"]["paused"].as_bool() == Some(true);
    let template = canon(&d["spec"]["template"]);
    let new = rss
        .iter()
        .copied()
        .find(|rs| canon(&rs["spec"]["template"]) == template);
    let mut olds: Vec<&Value> = rss
        .iter()
        .copied()
        .filter(|rs| !new.is_some_and(|n| std::ptr::eq(*rs, n)))
        .collect();
    olds.sort_by_key(|rs| revision(rs));
    let old_max = olds.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let mut plan = Plan::default();
    // Desired replicas per ReplicaSet, starting from what they have.
    let mut sizes: Vec<(String, u64)> =
        rss.iter().map(|rs| (name(rs), spec_replicas(rs))).collect();
    let total: u64 = sizes.iter().map(|(_, n)| n).sum();
    let set = |sizes: &mut Vec<(String, u64)>, rs: &str, n: u64| {
        if let Some(s) = sizes.iter_mut().find(|(x, _)| x == rs) {
            s.1 = n;
        }
    };
    let old_running: u64 = olds.iter().map(|rs| count(rs, "replicas")).sum();
    let old_spec: u64 = olds.iter().map(|rs| spec_replicas(rs)).sum();
    match new {
        None if paused => {}
        None => {
            let initial = if recreate {
                if old_spec == 0 && old_running == 0 {
                    want
                } else {
                    0
                }
            } else if rss.is_empty() {
                want
            } else {
                want.min((want + surge).saturating_sub(total))
            };
            let hash = template_hash(&d["spec"]["template"]);
            plan.create = Some(new_rs(d, &hash, old_max + 1, initial, surge));
            plan.revision = old_max + 1;
            if recreate {
                for rs in &olds {
                    set(&mut sizes, &name(rs), 0);
                }
            }
        }
        Some(new) => {
            let new_name = name(new);
            let have = &new["metadata"]["annotations"];
            let missing: Map<String, Value> = copied(d)
                .into_iter()
                .filter(|(k, v)| have[k] != *v)
                .collect();
            if !missing.is_empty() {
                plan.annotate.push((new_name.clone(), missing));
            }
            plan.revision = revision(new);
            if revision(new) <= old_max {
                plan.revise.push((new_name.clone(), old_max + 1));
                plan.revision = old_max + 1;
            }
            let have = spec_replicas(new);
            if paused {
            } else if recreate {
                if old_spec > 0 {
                    for rs in &olds {
                        set(&mut sizes, &name(rs), 0);
                    }
                } else if old_running == 0 {
                    set(&mut sizes, &new_name, want);
                }
            } else if have > want {
                set(&mut sizes, &new_name, want);
            } else if have < want && total < want + surge {
                set(
                    &mut sizes,
                    &new_name,
                    want.min(have + (want + surge - total)),
                );
            } else if old_spec > 0 {
                // Old pods go only as far as availability allows: the unhealthy first.
                let min_available = want.saturating_sub(unavailable);
                let new_unavailable = have.saturating_sub(count(new, "availableReplicas"));
                let mut room = total
                    .saturating_sub(min_available)
                    .saturating_sub(new_unavailable);
                for rs in &olds {
                    let unhealthy =
                        spec_replicas(rs).saturating_sub(count(rs, "availableReplicas"));
                    let cut = unhealthy.min(room);
                    if cut > 0 {
                        set(&mut sizes, &name(rs), spec_replicas(rs) - cut);
                        room -= cut;
                    }
                }
                let available: u64 = rss.iter().map(|rs| count(rs, "availableReplicas")).sum();
                let mut budget = room.min(available.saturating_sub(min_available));
                for rs in &olds {
                    let now = sizes
                        .iter()
                        .find(|(x, _)| *x == name(rs))
                        .map(|(_, n)| *n)
                        .unwrap_or(0);
                    let cut = now.min(budget);
                    if cut > 0 {
                        set(&mut sizes, &name(rs), now - cut);
                        budget -= cut;
                    }
                }
            }
        }
    }
    for (rs, n) in &sizes {
        if rss.iter().any(|x| name(x) == *rs && spec_replicas(x) != *n) {
            plan.scale.push((rs.clone(), *n));
        }
    }
    // History: old ReplicaSets scaled to nothing, oldest first, beyond the limit.
    let limit = d["spec"]["revisionHistoryLimit"].as_u64().unwrap_or(10) as usize;
    let idle: Vec<&Value> = olds
        .iter()
        .copied()
        .filter(|rs| spec_replicas(rs) == 0 && count(rs, "replicas") == 0)
        .collect();
    if idle.len() > limit {
        plan.delete = idle[..idle.len() - limit]
            .iter()
            .map(|rs| name(rs))
            .collect();
    }
    plan.status = status(d, new, rss, want, unavailable);
    plan
}

fn name(rs: &Value) -> String {
    rs["metadata"]["name"].as_str().unwrap_or("").to_string()
}

/// The reason of a Progressing condition that gave up, which `kubectl rollout status`
/// reports as "exceeded its progress deadline".
pub const DEADLINE: &str = "ProgressDeadlineExceeded";

/// Whether `d`'s rollout is under way (so its progress deadline needs watching).
pub fn rolling(d: &Value) -> bool {
    d["spec"]["paused"] != true
        && d["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["type"] == "Progressing"
                    && c["reason"] != "NewReplicaSetAvailable"
                    && c["reason"] != DEADLINE
            })
        })
}

fn status(d: &Value, new: Option<&Value>, rss: &[&Value], want: u64, unavailable: u64) -> Value {
    let sum = |k: &str| rss.iter().map(|rs| count(rs, k)).sum::<u64>();
    let spec_total: u64 = rss.iter().map(|rs| spec_replicas(rs)).sum();
    let (replicas, ready, available) = (
        sum("replicas"),
        sum("readyReplicas"),
        sum("availableReplicas"),
    );
    let updated = new.map(|n| count(n, "replicas")).unwrap_or(0);
    let new_name = new.map(name).unwrap_or_default();
    let old = |t: &str| {
        d["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
    };
    let now = crate::api::now();
    // A condition keeps its times while its status and reason stay the same.
    let cond = |t: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let prev = old(t);
        let same = prev
            .as_ref()
            .is_some_and(|p| p["status"] == status && p["reason"] == reason);
        let changed = prev.as_ref().is_none_or(|p| p["status"] != status);
        let keep = |k: &str| prev.as_ref().map(|p| p[k].clone()).filter(|v| !v.is_null());
        json!({"type": t, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": if same { keep("lastUpdateTime").unwrap_or(json!(now)) } else { json!(now) },
            "lastTransitionTime": if changed { json!(now) } else { keep("lastTransitionTime").unwrap_or(json!(now)) }})
    };
    let minimum = available >= want.saturating_sub(unavailable);
    let complete = new.is_some() && updated == want && replicas == want && available >= want;
    let available_cond = if minimum {
        cond(
            "Available",
            true,
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
        )
    } else {
        cond(
            "Available",
            false,
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
        )
    };
    // Progress (more pods updated, ready or available than the status says) renews the
    // Progressing condition; a rollout with none for progressDeadlineSeconds has failed.
    let was = |k: &str| d["status"][k].as_u64().unwrap_or(0);
    let moved = updated != was("updatedReplicas")
        || ready != was("readyReplicas")
        || available != was("availableReplicas");
    let last = old("Progressing");
    let stalled = last.as_ref().is_some_and(|c| c["reason"] == DEADLINE)
        || (!moved
            && d["spec"]["paused"] != true
            && last.as_ref().is_some_and(|c| {
                let since = c["lastUpdateTime"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok());
                let deadline = d["spec"]["progressDeadlineSeconds"].as_i64().unwrap_or(600);
                since.is_some_and(|t| (jiff::Timestamp::now() - t).get_seconds() > deadline)
            }));
    let progressing = if complete {
        cond(
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
        )
    } else if new.is_some() && stalled && !moved {
        cond(
            "Progressing",
            false,
            DEADLINE,
            format!("ReplicaSet \"{new_name}\" has timed out progressing."),
        )
    } else if new.is_some() {
        let mut c = cond(
            "Progressing",
            true,
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
        );
        if moved {
            c["lastUpdateTime"] = json!(now);
        }
        c
    } else {
        cond(
            "Progressing",
            true,
            "NewReplicaSetCreated",
            "Created a new replica set.".into(),
        )
    };
    json!({
        "observedGeneration": d["metadata"]["generation"].as_i64().unwrap_or(1),
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": spec_total.max(want).saturating_sub(available),
        "conditions": [available_cond, progressing],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(replicas: u64, image: &str, strategy: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "d1", "generation": 2},
            "spec": {"replicas": replicas, "strategy": strategy, "revisionHistoryLimit": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    fn rolling(surge: Value, unavailable: Value) -> Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}})
    }

    /// The ReplicaSet the plan would create, as it stands once `ready` of its pods run.
    fn made(p: &Plan, ready: u64) -> Value {
        let mut rs = p.create.clone().expect("a new ReplicaSet");
        rs["status"] =
            json!({"replicas": ready, "readyReplicas": ready, "availableReplicas": ready});
        rs
    }

    fn with(rs: &Value, spec: u64, ready: u64) -> Value {
        let mut rs = rs.clone();
        rs["spec"]["replicas"] = json!(spec);
        rs["status"] =
            json!({"replicas": ready, "readyReplicas": ready, "availableReplicas": ready});
        rs
    }

    #[test]
    fn replicasets_carry_the_change_cause() {
        let mut d = deploy(1, "module:v1", rolling(json!(1), json!(0)));
        d["metadata"]["annotations"] = json!({"kubernetes.io/change-cause": "v1",
            "kubectl.kubernetes.io/last-applied-configuration": "{}", REVISION: "1"});
        let p = plan(&d, &[]);
        let rs = made(&p, 1);
        let a = &rs["metadata"]["annotations"];
        assert_eq!(a["kubernetes.io/change-cause"], "v1");
        assert!(a["kubectl.kubernetes.io/last-applied-configuration"].is_null());
        assert!(plan(&d, &[&rs]).annotate.is_empty());
        // Annotated after its ReplicaSet was made: passed on to it.
        d["metadata"]["annotations"]["kubernetes.io/change-cause"] = json!("scaled");
        let p = plan(&d, &[&rs]);
        assert_eq!(p.annotate.len(), 1);
        assert_eq!(p.annotate[0].1["kubernetes.io/change-cause"], "scaled");
    }

    #[test]
    fn first_replicaset_gets_everything_and_a_stable_hash() {
        let d = deploy(3, "module:v1", rolling(json!("25%"), json!("25%")));
        let p = plan(&d, &[]);
        let rs = p.create.as_ref().expect("created");
        let hash = template_hash(&d["spec"]["template"]);
        assert_eq!(hash.len(), 10);
        assert_eq!(rs["metadata"]["name"], format!("web-{hash}"));
        assert_eq!(rs["spec"]["replicas"], 3);
        assert_eq!(rs["spec"]["selector"]["matchLabels"][HASH], hash.as_str());
        assert_eq!(
            rs["spec"]["template"]["metadata"]["labels"][HASH],
            hash.as_str()
        );
        assert_eq!(rs["metadata"]["annotations"][REVISION], "1");
        assert_eq!(p.revision, 1);
        // The same template with nulls or empty parts, or the hash label, is the same.
        let mut noisy = d["spec"]["template"].clone();
        noisy["metadata"]["creationTimestamp"] = Value::Null;
        noisy["metadata"]["labels"][HASH] = json!(hash);
        noisy["spec"]["volumes"] = json!([]);
        assert_eq!(template_hash(&noisy), hash);
        let status = &p.status;
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["conditions"][0]["status"], "False");
    }

    #[test]
    fn rolling_update_stays_within_surge_and_unavailability() {
        // 4 replicas, maxSurge 1, maxUnavailable 0: never more than 5, never fewer than 4 ready.
        let strategy = rolling(json!(1), json!(0));
        let v1 = deploy(4, "module:v1", strategy.clone());
        let old = with(&made(&plan(&v1, &[]), 4), 4, 4);
        let v2 = deploy(4, "module:v2", strategy);
        let p = plan(&v2, &[&old]);
        let new = made(&p, 0);
        assert_eq!(new["spec"]["replicas"], 1, "one surge pod");
        assert_eq!(new["metadata"]["annotations"][REVISION], "2");
        assert!(
            p.scale.is_empty(),
            "old ones stay until the new one is available"
        );
        // The new pod not yet available: nothing more may happen.
        let p = plan(&v2, &[&old, &with(&new, 1, 0)]);
        assert!(p.scale.is_empty(), "{:?}", p.scale);
        // Available: one old pod may go.
        let p = plan(&v2, &[&old, &with(&new, 1, 1)]);
        assert_eq!(p.scale, vec![(name(&old), 3)]);
        // Then the new one grows into the room.
        let p = plan(&v2, &[&with(&old, 3, 3), &with(&new, 1, 1)]);
        assert_eq!(p.scale, vec![(name(&new), 2)]);
        // At the end, old at 0: complete, and the history beyond its limit goes.
        let p = plan(&v2, &[&with(&old, 0, 0), &with(&new, 4, 4)]);
        assert!(p.scale.is_empty());
        assert!(p.delete.is_empty(), "one old revision is kept");
        assert_eq!(p.status["updatedReplicas"], 4);
        assert_eq!(
            p.status["conditions"][1]["reason"],
            "NewReplicaSetAvailable"
        );
        assert_eq!(p.status["conditions"][0]["status"], "True");
    }

    #[test]
    fn recreate_empties_the_old_before_the_new() {
        let strategy = json!({"type": "Recreate"});
        let v1 = deploy(2, "module:v1", strategy.clone());
        let old = with(&made(&plan(&v1, &[]), 2), 2, 2);
        let v2 = deploy(2, "module:v2", strategy);
        let p = plan(&v2, &[&old]);
        assert_eq!(p.create.as_ref().unwrap()["spec"]["replicas"], 0);
        assert_eq!(p.scale, vec![(name(&old), 0)]);
        let new = made(&p, 0);
        // Old pods still running: wait.
        let p = plan(&v2, &[&with(&old, 0, 1), &with(&new, 0, 0)]);
        assert!(p.scale.is_empty());
        let p = plan(&v2, &[&with(&old, 0, 0), &with(&new, 0, 0)]);
        assert_eq!(p.scale, vec![(name(&new), 2)]);
    }

    #[test]
    fn undo_brings_an_old_replicaset_back_as_the_newest_revision() {
        let strategy = rolling(json!("25%"), json!("25%"));
        let v1 = deploy(2, "module:v1", strategy.clone());
        let first = with(&made(&plan(&v1, &[]), 2), 0, 0);
        let v2 = deploy(2, "module:v2", strategy);
        let mut second = with(&made(&plan(&v2, &[&first]), 2), 2, 2);
        second["metadata"]["annotations"][REVISION] = json!("2");
        // Back to v1's template: its ReplicaSet is the new one again, as revision 3.
        let p = plan(&v1, &[&first, &second]);
        assert!(p.create.is_none());
        assert_eq!(p.revise, vec![(name(&first), 3)]);
        assert_eq!(p.revision, 3);
        assert_eq!(p.scale, vec![(name(&first), 1)], "surge of 25% of 2 is 1");
    }

    #[test]
    fn scaling_a_settled_deployment_scales_its_replicaset() {
        let strategy = rolling(json!("25%"), json!("25%"));
        let d = deploy(2, "module:v1", strategy.clone());
        let rs = with(&made(&plan(&d, &[]), 2), 2, 2);
        assert_eq!(
            plan(&deploy(5, "module:v1", strategy.clone()), &[&rs]).scale,
            vec![(name(&rs), 5)]
        );
        assert_eq!(
            plan(&deploy(1, "module:v1", strategy), &[&rs]).scale,
            vec![(name(&rs), 1)]
        );
        let mut paused = deploy(5, "module:v2", rolling(json!(1), json!(0)));
        paused["spec"]["paused"] = json!(true);
        let p = plan(&paused, &[&rs]);
        assert!(
            p.create.is_none() && p.scale.is_empty(),
            "paused: no rollout"
        );
    }
}
