//! The disruption controller's decisions: a PodDisruptionBudget's status (how many of its
//! pods are healthy, how many must stay so, and how many evictions it allows now), from the
//! pods it selects and the scale of their controllers.
//!
//! The eviction subresource spends `disruptionsAllowed` and records the pod in
//! `disruptedPods`; this controller recomputes the budget once the pod is seen deleting, or
//! gives the disruption back after [`DISRUPTION_TIMEOUT`] if it never is.

use serde_json::{json, Value};

use super::replicaset::ready;

/// How long an eviction's record counts against the budget before the pod is seen deleting.
pub const DISRUPTION_TIMEOUT: i64 = 120;

/// Whether `pdb` selects `pod` (the same namespace is the caller's part). In policy/v1 an
/// empty selector selects every pod of the namespace, and no selector none.
pub fn selects(pdb: &Value, pod: &Value) -> bool {
    let sel = &pdb["spec"]["selector"];
    !sel.is_null()
        && crate::api::select::Labels::from_selector(sel).matches(&pod["metadata"]["labels"])
}

/// `v` (an IntOrString: `3` or `"30%"`) scaled against `total`, percentages rounded up.
fn scaled(v: &Value, total: i64) -> Result<i64, String> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("invalid value {v}")),
        Value::String(s) => {
            let pct: i64 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    format!("invalid value {s:?}: must be an integer or a percentage")
                })?;
            Ok((pct * total + 99) / 100)
        }
        _ => Err(format!("invalid value {v}")),
    }
}

/// The scale of a pod's controller: (its uid, `spec.replicas`); none for a pod no controller
/// owns (left out of the expected count, as Kubernetes does), or why its controller has none.
pub type Scale<'a> = &'a dyn Fn(&Value) -> Result<Option<(String, i64)>, String>;

/// The budget's expected pod count and desired healthy count.
fn budget(pdb: &Value, pods: &[&Value], scale: Scale<'_>) -> Result<(i64, i64), String> {
    let spec = &pdb["spec"];
    let min = &spec["minAvailable"];
    if min.is_number() {
        return Ok((pods.len() as i64, scaled(min, 0)?));
    }
    // A percentage or maxUnavailable counts against what the controllers want, not what is
    // there now.
    let mut seen = std::collections::BTreeMap::new();
    for p in pods {
        if let Some((uid, n)) = scale(p)? {
            seen.insert(uid, n);
        }
    }
    let expected: i64 = seen.values().sum();
    let desired = if min.is_string() {
        scaled(min, expected)?
    } else if !spec["maxUnavailable"].is_null() {
        (expected - scaled(&spec["maxUnavailable"], expected)?).max(0)
    } else {
        // Neither given: the API defaults minAvailable to 1.
        1
    };
    Ok((expected, desired))
}

/// `pdb`'s status at `now` (unix seconds), from the pods of its namespace it selects.
pub fn status(pdb: &Value, pods: &[&Value], scale: Scale<'_>, now: i64) -> Value {
    let old = &pdb["status"];
    // Evictions not yet seen as deletions, while they are recent.
    let mut disrupted = serde_json::Map::new();
    for p in pods {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let at = &old["disruptedPods"][name];
        let recent = crate::api::seconds(at).is_some_and(|t| t + DISRUPTION_TIMEOUT > now);
        if p["metadata"]["deletionTimestamp"].is_null() && recent {
            disrupted.insert(name.to_string(), at.clone());
        }
    }
    let healthy = pods
        .iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && !disrupted.contains_key(p["metadata"]["name"].as_str().unwrap_or(""))
                && ready(p)
        })
        .count() as i64;
    let (expected, desired, allowed, reason, message) = match budget(pdb, pods, scale) {
        Ok((expected, desired)) => {
            let allowed = (healthy - desired).max(0);
            let reason = if allowed > 0 {
                "SufficientPods"
            } else {
                "InsufficientPods"
            };
            (expected, desired, allowed, reason, String::new())
        }
        Err(e) => (0, 0, 0, "SyncFailed", e),
    };
    let generation = pdb["metadata"]["generation"].as_i64().unwrap_or(1);
    let state = if allowed > 0 { "True" } else { "False" };
    let was = old["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"));
    let since = match was {
        Some(c) if c["status"] == state => c["lastTransitionTime"].clone(),
        _ => json!(crate::api::rfc3339(now)),
    };
    let mut st = json!({
        "observedGeneration": generation,
        "disruptionsAllowed": allowed,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "conditions": [{"type": "DisruptionAllowed", "status": state, "reason": reason,
            "message": message, "observedGeneration": generation,
            "lastTransitionTime": since}],
    });
    if !disrupted.is_empty() {
        st["disruptedPods"] = Value::Object(disrupted);
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, owner: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"},
                "ownerReferences": [{"uid": owner, "controller": true}]},
            "status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    fn pdb(spec: Value) -> Value {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "web"}});
        json!({"metadata": {"name": "web", "generation": 2}, "spec": spec})
    }

    fn scale_of(replicas: i64) -> impl Fn(&Value) -> Result<Option<(String, i64)>, String> {
        move |p: &Value| match p["metadata"]["ownerReferences"][0]["uid"].as_str() {
            Some("ds") => Err("DaemonSet has no scale".into()),
            Some(u) => Ok(Some((u.to_string(), replicas))),
            None => Ok(None),
        }
    }

    #[test]
    fn min_available_counts_the_pods_there() {
        let (a, b, c) = (
            pod("a", true, "rs"),
            pod("b", true, "rs"),
            pod("c", false, "rs"),
        );
        let st = status(
            &pdb(json!({"minAvailable": 1})),
            &[&a, &b, &c],
            &scale_of(3),
            0,
        );
        assert_eq!(st["expectedPods"], 3);
        assert_eq!(st["currentHealthy"], 2);
        assert_eq!(st["desiredHealthy"], 1);
        assert_eq!(st["disruptionsAllowed"], 1);
        assert_eq!(st["observedGeneration"], 2);
        assert_eq!(st["conditions"][0]["reason"], "SufficientPods");
        let st = status(&pdb(json!({"minAvailable": 2})), &[&a, &b], &scale_of(2), 0);
        assert_eq!(st["disruptionsAllowed"], 0);
        assert_eq!(st["conditions"][0]["status"], "False");
        assert_eq!(st["conditions"][0]["reason"], "InsufficientPods");
    }

    #[test]
    fn percentages_and_max_unavailable_use_the_controllers_scale() {
        let (a, b) = (pod("a", true, "rs"), pod("b", true, "rs"));
        // Four wanted, two there: 50% of four rounds to two, so nothing may go.
        let st = status(
            &pdb(json!({"minAvailable": "50%"})),
            &[&a, &b],
            &scale_of(4),
            0,
        );
        assert_eq!(
            (
                &st["expectedPods"],
                &st["desiredHealthy"],
                &st["disruptionsAllowed"]
            ),
            (&json!(4), &json!(2), &json!(0))
        );
        let st = status(
            &pdb(json!({"maxUnavailable": 1})),
            &[&a, &b],
            &scale_of(2),
            0,
        );
        assert_eq!(st["desiredHealthy"], 1);
        assert_eq!(st["disruptionsAllowed"], 1);
        // 34% of three rounds up to two unavailable.
        let c = pod("c", true, "rs");
        let st = status(
            &pdb(json!({"maxUnavailable": "34%"})),
            &[&a, &b, &c],
            &scale_of(3),
            0,
        );
        assert_eq!(st["desiredHealthy"], 1);
        assert_eq!(st["disruptionsAllowed"], 2);
        // A bare pod is healthy but expected by no controller: left out of the count.
        let mut bare = pod("d", true, "");
        bare["metadata"]["ownerReferences"] = Value::Null;
        let st = status(
            &pdb(json!({"maxUnavailable": 1})),
            &[&a, &b, &bare],
            &scale_of(2),
            0,
        );
        assert_eq!(st["expectedPods"], 2);
        assert_eq!(st["currentHealthy"], 3);
        assert_eq!(st["disruptionsAllowed"], 2);
        // A controller without a scale: the budget allows nothing and says why.
        let daemon = pod("e", true, "ds");
        let st = status(
            &pdb(json!({"maxUnavailable": 1})),
            &[&daemon],
            &scale_of(1),
            0,
        );
        assert_eq!(st["disruptionsAllowed"], 0);
        assert_eq!(st["conditions"][0]["reason"], "SyncFailed");
        assert_eq!(st["conditions"][0]["message"], "DaemonSet has no scale");
    }

    #[test]
    fn evictions_count_until_seen_or_timed_out() {
        let (a, b, c) = (
            pod("a", true, "rs"),
            pod("b", true, "rs"),
            pod("c", true, "rs"),
        );
        let mut budget = pdb(json!({"minAvailable": 2}));
        budget["status"] =
            json!({"disruptedPods": {"a": "1970-01-01T00:01:40Z", "gone": "1970-01-01T00:01:40Z"}});
        let st = status(&budget, &[&a, &b, &c], &scale_of(3), 150);
        assert_eq!(st["currentHealthy"], 2);
        assert_eq!(st["disruptionsAllowed"], 0);
        assert_eq!(st["disruptedPods"], json!({"a": "1970-01-01T00:01:40Z"}));
        // Two minutes on, the eviction never happened: the pod counts again.
        let st = status(
            &budget,
            &[&a, &b, &c],
            &scale_of(3),
            100 + DISRUPTION_TIMEOUT,
        );
        assert_eq!(st["currentHealthy"], 3);
        assert!(st["disruptedPods"].is_null());
        // A pod being deleted neither counts nor stays recorded.
        let mut gone = a.clone();
        gone["metadata"]["deletionTimestamp"] = json!("1970-01-01T00:02:00Z");
        let st = status(&budget, &[&gone, &b, &c], &scale_of(3), 150);
        assert_eq!(st["currentHealthy"], 2);
        assert!(st["disruptedPods"].is_null());
    }

    #[test]
    fn selectors_follow_policy_v1() {
        let a = pod("a", true, "rs");
        let mut all = pdb(json!({}));
        all["spec"]["selector"] = json!({});
        assert!(selects(&all, &a));
        let mut none = pdb(json!({}));
        none["spec"]["selector"] = Value::Null;
        assert!(!selects(&none, &a));
        let mut other = pdb(json!({}));
        other["spec"]["selector"] = json!({"matchLabels": {"app": "db"}});
        assert!(!selects(&other, &a));
    }
}
