//! Older API versions served by converting to and from the one stored: autoscaling/v1
//! HorizontalPodAutoscalers (what `kubectl autoscale` writes) over autoscaling/v2. A v1
//! request's body is converted up and handled as a v2 request; objects and lists in the
//! answer are converted down. v1 has one target, CPU utilization; converting down keeps
//! that and drops other metrics, as the Kubernetes API server does (it also stashes them in
//! an annotation, which this server does not).

use serde_json::{json, Value};

/// (group, older version, stored version, plural).
pub const OLDER: &[(&str, &str, &str, &str)] =
    &[("autoscaling", "v1", "v2", "horizontalpodautoscalers")];

/// The stored version behind an older `version` of `group`, if it is one.
pub fn stored(group: &str, version: &str) -> Option<&'static str> {
    OLDER
        .iter()
        .find(|(g, v, _, _)| *g == group && *v == version)
        .map(|(_, _, s, _)| *s)
}

/// Older versions of `group`, newest first.
pub fn older_versions(group: &str) -> Vec<&'static str> {
    OLDER
        .iter()
        .filter(|(g, _, _, _)| *g == group)
        .map(|(_, v, _, _)| *v)
        .collect()
}

/// Whether `plural` is served in the older `version` of `group`.
pub fn serves(group: &str, version: &str, plural: &str) -> bool {
    OLDER
        .iter()
        .any(|(g, v, _, p)| *g == group && *v == version && *p == plural)
}

/// Remove v1's `{prefix}CPUUtilizationPercentage` from `m`, however spelled: the protobuf
/// decoder spells the acronym as the generated messages do (`Cpu`).
fn take(m: &mut serde_json::Map<String, Value>, prefix: &str) -> Option<Value> {
    let a = m.remove(&format!("{prefix}CPUUtilizationPercentage"));
    let b = m.remove(&format!("{prefix}CpuUtilizationPercentage"));
    a.or(b)
}

/// A v1 HorizontalPodAutoscaler (or a merge patch of one) as v2.
pub fn hpa_up(mut o: Value) -> Value {
    if o["apiVersion"] == "autoscaling/v1" {
        o["apiVersion"] = json!("autoscaling/v2");
    }
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        if let Some(cpu) = take(spec, "target") {
            let metrics = if cpu.is_null() {
                Value::Null
            } else {
                json!([{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": cpu}}}])
            };
            spec.insert("metrics".into(), metrics);
        }
    }
    if let Some(st) = o.get_mut("status").and_then(Value::as_object_mut) {
        if let Some(cpu) = take(st, "current") {
            if !cpu.is_null() {
                st.insert(
                    "currentMetrics".into(),
                    json!([{"type": "Resource", "resource": {"name": "cpu",
                        "current": {"averageUtilization": cpu}}}]),
                );
            }
        }
    }
    o
}

fn cpu_of<'a>(list: &'a Value, field: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu")
        .map(|m| &m["resource"][field]["averageUtilization"])
        .filter(|u| !u.is_null())
}

/// A v2 HorizontalPodAutoscaler as v1.
pub fn hpa_down(mut o: Value) -> Value {
    if o["apiVersion"] == "autoscaling/v2" {
        o["apiVersion"] = json!("autoscaling/v1");
    }
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        let metrics = spec.remove("metrics").unwrap_or(Value::Null);
        spec.remove("behavior");
        if let Some(u) = cpu_of(&metrics, "target") {
            spec.insert("targetCPUUtilizationPercentage".into(), u.clone());
        }
    }
    if let Some(st) = o.get_mut("status").and_then(Value::as_object_mut) {
        let current = st.remove("currentMetrics").unwrap_or(Value::Null);
        st.remove("conditions");
        if let Some(u) = cpu_of(&current, "current") {
            st.insert("currentCPUUtilizationPercentage".into(), u.clone());
        }
    }
    o
}

/// An answer's JSON body as the older version: objects and lists of them; anything else
/// (a Status, a Table) as it is.
pub fn answer_down(mut body: Value) -> Value {
    match body["kind"].as_str() {
        Some("HorizontalPodAutoscaler") => hpa_down(body),
        Some("HorizontalPodAutoscalerList") => {
            body["apiVersion"] = json!("autoscaling/v1");
            if let Some(items) = body["items"].as_array_mut() {
                for i in items.iter_mut() {
                    *i = hpa_down(std::mem::take(i));
                }
            }
            body
        }
        _ => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_autoscale_bodies_round_trip() {
        // What `kubectl autoscale deployment web --min 2 --max 5 --cpu-percent 60` posts.
        let v1 = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60},
            "status": {"currentReplicas": 0, "desiredReplicas": 0}});
        let v2 = hpa_up(v1.clone());
        assert_eq!(v2["apiVersion"], "autoscaling/v2");
        assert_eq!(
            v2["spec"]["metrics"][0]["resource"]["target"],
            json!({"type": "Utilization", "averageUtilization": 60})
        );
        assert!(v2["spec"]["targetCPUUtilizationPercentage"].is_null());
        let mut stored = v2.clone();
        stored["status"]["currentMetrics"] = json!([{"type": "Resource",
            "resource": {"name": "cpu", "current": {"averageUtilization": 75, "averageValue": "75m"}}}]);
        stored["status"]["conditions"] = json!([{"type": "AbleToScale", "status": "True"}]);
        let back = answer_down(stored);
        assert_eq!(back["apiVersion"], "autoscaling/v1");
        assert_eq!(back["spec"], v1["spec"]);
        assert_eq!(back["status"]["currentCPUUtilizationPercentage"], 75);
        assert!(back["status"]["conditions"].is_null());
        let proto = hpa_up(json!({"spec": {"targetCpuUtilizationPercentage": 70}}));
        assert_eq!(
            proto["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            70
        );
        // A merge patch clearing the target clears the metrics.
        let p = hpa_up(json!({"spec": {"targetCPUUtilizationPercentage": null}}));
        assert_eq!(p, json!({"spec": {"metrics": null}}));
        let list = answer_down(json!({"kind": "HorizontalPodAutoscalerList",
            "apiVersion": "autoscaling/v2", "items": [{"spec": {"metrics": []}}]}));
        assert_eq!(list["apiVersion"], "autoscaling/v1");
        assert_eq!(list["items"][0]["spec"], json!({}));
        assert_eq!(super::stored("autoscaling", "v1"), Some("v2"));
        assert!(serves("autoscaling", "v1", "horizontalpodautoscalers"));
        assert!(!serves("autoscaling", "v1", "scales"));
    }
}
