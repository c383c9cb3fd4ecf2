//! The HorizontalPodAutoscaler controller: every [`SYNC`], for each autoscaling/v2 HPA, the
//! scale of its target (`/scale`), the usage of the target's pods from the resource metrics
//! API (asked of the nodes, as `kubectl top` does) against their requests, and a new
//! replica count as Kubernetes' controller computes it: per metric `ceil(ratio × pods)`,
//! unchanged within a 10 % tolerance, the largest over the metrics, bounded by
//! `minReplicas`/`maxReplicas`, scale-up limited to doubling or 4 pods a round, and
//! scale-down held to the highest recommendation of the stabilization window (300 s unless
//! `behavior.scaleDown.stabilizationWindowSeconds` says). Only `Resource` metrics (cpu,
//! memory) are read; an HPA with other metrics reports why it cannot act on them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_api::quantity;
use serde_json::{json, Value};

use crate::api::auth::User;
use crate::api::resources;
use crate::api::select::Labels;
use crate::api::{rfc3339, Api};

/// How often each HPA is looked at (the kube-controller-manager's default).
pub const SYNC: Duration = Duration::from_secs(15);
/// A ratio this close to 1 changes nothing.
const TOLERANCE: f64 = 0.1;
const DOWN_WINDOW: i64 = 300;

fn user() -> User {
    super::system_user("system:horizontal-pod-autoscaler")
}

async fn call(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: Value) -> (u16, Value) {
    crate::api::call_as(api, &user(), method, path, ct, &body).await
}

/// Scale targets until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    super::while_leader(&api, "autoscaler", |a| async move { lead(&a).await }).await
}

async fn lead(api: &Arc<Api>) -> Result<(), String> {
    // Recommendations of the last rounds, by HPA uid: (unix seconds, replicas).
    let mut recent: HashMap<String, Vec<(i64, u32)>> = HashMap::new();
    while api.store.leads() {
        let (code, list) = call(
            api,
            "GET",
            "/apis/autoscaling/v2/horizontalpodautoscalers",
            "application/json",
            Value::Null,
        )
        .await;
        if code != 200 {
            return Err(format!("listing autoscalers: {code}"));
        }
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let uids: Vec<String> = items.iter().map(uid).collect();
        recent.retain(|k, _| uids.contains(k));
        for mut hpa in items {
            // List items leave these out; the status write and the events want them.
            hpa["apiVersion"] = json!("autoscaling/v2");
            hpa["kind"] = json!("HorizontalPodAutoscaler");
            let past = recent.entry(uid(&hpa)).or_default();
            reconcile(api, &hpa, past).await;
        }
        tokio::time::sleep(SYNC).await;
    }
    Ok(())
}

fn uid(o: &Value) -> String {
    o["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

/// One metric's figures over the target's pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Pods measured.
    pub pods: u32,
    /// Their usage together: millicores for cpu, bytes for memory.
    pub usage: u64,
    /// Their requests together, if every container of each has one.
    pub request: Option<u64>,
}

/// What one round decides.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// This round's recommendation, before the stabilization window.
    pub recommend: u32,
    pub desired: u32,
    pub status: Value,
}

/// Decide for `hpa`, whose target has `current` replicas, from `samples` by resource name
/// (`None` where the metric could not be read), with the recommendations of the last rounds
/// (`past`, oldest first), at `now`.
pub fn plan(
    hpa: &Value,
    current: u32,
    samples: &HashMap<String, Option<Sample>>,
    past: &[(i64, u32)],
    now: i64,
) -> Plan {
    let spec = &hpa["spec"];
    let min = spec["minReplicas"].as_u64().unwrap_or(1) as u32;
    let max = spec["maxReplicas"].as_u64().unwrap_or(1).max(1) as u32;
    let metrics = metrics_of(spec);
    let mut proposals = Vec::new();
    let mut current_metrics = Vec::new();
    let mut failure: Option<(String, String)> = None;
    for m in &metrics {
        let r = &m["resource"];
        let name = r["name"].as_str().unwrap_or("");
        if m["type"] != "Resource" {
            failure = Some((
                "InvalidMetricSourceType".into(),
                format!("the {} metric source type is not supported", m["type"]),
            ));
            continue;
        }
        let Some(Some(s)) = samples.get(name) else {
            failure = Some((
                "FailedGetResourceMetric".into(),
                format!("unable to get metrics for resource {name}: no metrics returned from resource metrics API"),
            ));
            continue;
        };
        if s.pods == 0 {
            failure = Some((
                "FailedGetResourceMetric".into(),
                format!("unable to get metrics for resource {name}: no pods measured"),
            ));
            continue;
        }
        let average = s.usage / u64::from(s.pods);
        let shown = if name == "cpu" {
            format!("{average}m")
        } else {
            average.to_string()
        };
        let target = &r["target"];
        let ratio = if let Some(goal) = target["averageUtilization"].as_f64() {
            let Some(request) = s.request.filter(|r| *r > 0) else {
                failure = Some((
                    "FailedGetResourceMetric".into(),
                    format!("missing request for {name}"),
                ));
                continue;
            };
            let util = s.usage as f64 * 100.0 / request as f64;
            current_metrics.push(json!({"type": "Resource", "resource": {"name": name,
                "current": {"averageUtilization": util.round() as i64, "averageValue": shown}}}));
            util / goal.max(1.0)
        } else {
            let goal = target["averageValue"]
                .as_str()
                .and_then(|q| amount(name, q))
                .unwrap_or(0);
            if goal == 0 {
                failure = Some((
                    "InvalidMetricSourceType".into(),
                    format!("the {name} metric has no target"),
                ));
                continue;
            }
            current_metrics.push(json!({"type": "Resource", "resource": {"name": name,
                "current": {"averageValue": shown}}}));
            average as f64 / goal as f64
        };
        proposals.push(if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (ratio * f64::from(s.pods)).ceil() as u32
        });
    }
    let old = &hpa["status"];
    let active = !proposals.is_empty();
    let recommend = proposals.into_iter().max().unwrap_or(current);
    // Scale-down: the highest recommendation of the window; scale-up: at once, limited.
    let window = spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        .as_i64()
        .unwrap_or(DOWN_WINDOW);
    let held = past
        .iter()
        .filter(|(t, _)| now - t < window)
        .map(|(_, r)| *r)
        .chain([recommend])
        .max()
        .unwrap_or(recommend);
    let mut desired = if recommend < current {
        held.min(current)
    } else {
        recommend
    };
    let up_limit = (current * 2).max(current + 4);
    let (mut limited, mut limit_reason) = (false, String::new());
    if desired > up_limit {
        desired = up_limit;
        limited = true;
        limit_reason = "ScaleUpLimit".into();
    }
    if desired > max {
        desired = max;
        limited = true;
        limit_reason = "TooManyReplicas".into();
    }
    if desired < min {
        desired = min;
        limited = true;
        limit_reason = "TooFewReplicas".into();
    }
    if !active {
        desired = current.clamp(min, max.max(min));
    }
    if current == 0 && min > 0 {
        // Scaled to zero by hand: autoscaling is off until someone scales it up again.
        desired = 0;
    }
    let time = rfc3339(now);
    let cond = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old["conditions"]
            .as_array()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == kind && c["status"] == status)
            })
            .map(|c| c["lastTransitionTime"].clone())
            .unwrap_or_else(|| json!(time));
        json!({"type": kind, "status": status, "lastTransitionTime": since, "reason": reason,
            "message": message})
    };
    let mut conditions = vec![cond(
        "AbleToScale",
        true,
        if desired != current {
            "SucceededRescale"
        } else {
            "ReadyForNewScale"
        },
        "the HPA controller was able to update the target scale".into(),
    )];
    conditions.push(match &failure {
        Some((reason, msg)) if !active => cond("ScalingActive", false, reason, msg.clone()),
        _ => cond(
            "ScalingActive",
            true,
            "ValidMetricFound",
            "the HPA was able to successfully calculate a replica count".into(),
        ),
    });
    conditions.push(if limited {
        cond(
            "ScalingLimited",
            true,
            &limit_reason,
            "the desired replica count is beyond the allowed range".into(),
        )
    } else {
        cond(
            "ScalingLimited",
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range".into(),
        )
    });
    let mut status = json!({
        "observedGeneration": hpa["metadata"]["generation"],
        "currentReplicas": current,
        "desiredReplicas": desired,
        "currentMetrics": current_metrics,
        "conditions": conditions,
    });
    if desired != current {
        status["lastScaleTime"] = json!(time);
    } else if !old["lastScaleTime"].is_null() {
        status["lastScaleTime"] = old["lastScaleTime"].clone();
    }
    Plan {
        recommend,
        desired,
        status,
    }
}

/// The metrics an HPA scales on: CPU at 80 % of requests when it names none.
fn metrics_of(spec: &Value) -> Vec<Value> {
    match spec["metrics"].as_array() {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 80}}})],
    }
}

/// A quantity of `resource` in the unit samples use.
fn amount(resource: &str, q: &str) -> Option<u64> {
    if resource == "cpu" {
        quantity::millicores(q)
    } else {
        quantity::bytes(q)
    }
}

async fn reconcile(api: &Arc<Api>, hpa: &Value, past: &mut Vec<(i64, u32)>) {
    let ns = hpa["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = hpa["metadata"]["name"].as_str().unwrap_or("");
    let target = &hpa["spec"]["scaleTargetRef"];
    let group = target["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .map_or("", |(g, _)| g);
    let Some(res) = target["kind"]
        .as_str()
        .and_then(|k| resources::by_kind(group, k))
        .filter(|r| r.has(resources::Sub::Scale))
    else {
        return;
    };
    let scale_path = format!(
        "{}/scale",
        res.path(Some(ns), target["name"].as_str().unwrap_or(""))
    );
    let (code, scale) = call(api, "GET", &scale_path, "application/json", Value::Null).await;
    if code != 200 {
        tracing::debug!(hpa = %name, code, "no scale for the autoscaler's target");
        return;
    }
    let current = scale["spec"]["replicas"].as_u64().unwrap_or(0) as u32;
    let selector = scale["status"]["selector"].as_str().unwrap_or("");
    let samples = measure(api, ns, selector, &metrics_of(&hpa["spec"])).await;
    let now = jiff::Timestamp::now().as_second();
    let p = plan(hpa, current, &samples, past, now);
    past.push((now, p.recommend));
    // An hour covers any stabilization window worth having; older rounds go.
    past.retain(|(t, _)| now - t < 3600);
    if p.desired != current {
        let (code, _) = call(
            api,
            "PATCH",
            &scale_path,
            "application/merge-patch+json",
            json!({"spec": {"replicas": p.desired}}),
        )
        .await;
        if code == 200 {
            let msg = format!("New size: {}; reason: {}", p.desired, reason(&p, current));
            super::event(
                api,
                "horizontal-pod-autoscaler",
                hpa,
                "Normal",
                "SuccessfulRescale",
                &msg,
            )
            .await;
        }
    }
    if hpa["status"]["desiredReplicas"] != p.status["desiredReplicas"]
        || hpa["status"]["currentMetrics"] != p.status["currentMetrics"]
        || hpa["status"]["conditions"] != p.status["conditions"]
        || hpa["status"]["currentReplicas"] != p.status["currentReplicas"]
    {
        let mut o = hpa.clone();
        o["status"] = p.status;
        let path =
            format!("/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{name}/status");
        let (code, _) = call(api, "PUT", &path, "application/json", o).await;
        if code != 200 {
            tracing::debug!(hpa = %name, code, "autoscaler status not written");
        }
    }
}

fn reason(p: &Plan, current: u32) -> &'static str {
    if p.desired > current {
        "resource utilization above target"
    } else {
        "All metrics below target"
    }
}

/// Usage and requests of the pods `selector` picks in `ns`, per resource `metrics` name.
async fn measure(
    api: &Arc<Api>,
    ns: &str,
    selector: &str,
    metrics: &[Value],
) -> HashMap<String, Option<Sample>> {
    let mut out: HashMap<String, Option<Sample>> = HashMap::new();
    let labels = match Labels::parse(selector) {
        Ok(l) if !l.is_empty() => l,
        _ => return out,
    };
    let Ok(pods) = crate::api::metrics::pods(api, Some(ns), |p| {
        labels.matches(&p["metadata"]["labels"])
            && p["status"]["phase"] == "Running"
            && p["metadata"]["deletionTimestamp"].is_null()
    })
    .await
    else {
        return out;
    };
    for name in metrics
        .iter()
        .filter_map(|m| m["resource"]["name"].as_str())
    {
        let mut s = Sample {
            request: Some(0),
            ..Sample::default()
        };
        for (pod, m) in &pods {
            let Some(m) = m else { continue };
            s.pods += 1;
            for c in m["containers"].as_array().into_iter().flatten() {
                let q = c["usage"][name].as_str().unwrap_or("0");
                s.usage += amount(name, q).unwrap_or(0);
            }
            for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
                let r = c["resources"]["requests"][name]
                    .as_str()
                    .and_then(|q| amount(name, q));
                s.request = s.request.zip(r).map(|(a, b)| a + b);
            }
        }
        out.insert(name.to_string(), (s.pods > 0).then_some(s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(min: u64, max: u64, util: u64) -> Value {
        json!({"metadata": {"name": "h", "generation": 1},
            "spec": {"minReplicas": min, "maxReplicas": max,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": util}}}]}})
    }

    fn cpu(pods: u32, usage: u64, request: u64) -> HashMap<String, Option<Sample>> {
        HashMap::from([(
            "cpu".to_string(),
            Some(Sample {
                pods,
                usage,
                request: Some(request),
            }),
        )])
    }

    #[test]
    fn scales_up_to_the_ratio_within_bounds_and_limits() {
        // One pod at 200 % of its request, target 50 %: four, capped at max 3.
        let p = plan(&hpa(1, 3, 50), 1, &cpu(1, 200, 100), &[], 1000);
        assert_eq!((p.recommend, p.desired), (4, 3));
        assert_eq!(
            p.status["currentMetrics"][0]["resource"]["current"]["averageUtilization"],
            200
        );
        assert_eq!(p.status["conditions"][2]["reason"], "TooManyReplicas");
        assert!(p.status["lastScaleTime"].is_string());
        // Far above target: no more than double or +4 a round.
        let p = plan(&hpa(1, 100, 10), 10, &cpu(10, 10_000, 1000), &[], 1000);
        assert_eq!(p.desired, 20);
        assert_eq!(p.status["conditions"][2]["reason"], "ScaleUpLimit");
    }

    #[test]
    fn within_tolerance_nothing_changes() {
        let p = plan(&hpa(1, 10, 50), 4, &cpu(4, 210, 400), &[], 1000);
        assert_eq!(p.desired, 4);
        assert!(p.status["lastScaleTime"].is_null());
        assert_eq!(p.status["conditions"][0]["reason"], "ReadyForNewScale");
    }

    #[test]
    fn scale_down_waits_out_the_window() {
        // Idle now, but 4 was recommended 100 s ago: hold 4; once that is 300 s old, go to 1.
        let p = plan(&hpa(1, 10, 50), 4, &cpu(4, 0, 400), &[(900, 4)], 1000);
        assert_eq!((p.recommend, p.desired), (0, 4));
        let p = plan(&hpa(1, 10, 50), 4, &cpu(4, 0, 400), &[(600, 4)], 1000);
        assert_eq!(p.desired, 1);
        assert_eq!(p.status["conditions"][2]["reason"], "TooFewReplicas");
    }

    #[test]
    fn missing_metrics_or_requests_leave_the_scale_and_say_why() {
        let none = HashMap::from([("cpu".to_string(), None)]);
        let p = plan(&hpa(1, 5, 50), 2, &none, &[], 1000);
        assert_eq!(p.desired, 2);
        // Scaled to zero by hand: left there.
        assert_eq!(plan(&hpa(1, 5, 50), 0, &none, &[], 1000).desired, 0);
        assert_eq!(p.status["conditions"][1]["status"], "False");
        assert_eq!(
            p.status["conditions"][1]["reason"],
            "FailedGetResourceMetric"
        );
        let unrequested = HashMap::from([(
            "cpu".to_string(),
            Some(Sample {
                pods: 2,
                usage: 300,
                request: None,
            }),
        )]);
        let p = plan(&hpa(1, 5, 50), 2, &unrequested, &[], 1000);
        assert_eq!(p.desired, 2);
        assert!(p.status["conditions"][1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing request for cpu")));
        // An average value target needs no requests.
        let avg = json!({"spec": {"maxReplicas": 5, "metrics": [{"type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "AverageValue", "averageValue": "100m"}}}]}});
        let p = plan(&avg, 2, &unrequested, &[], 1000);
        assert_eq!(p.desired, 3);
        assert_eq!(
            p.status["currentMetrics"][0]["resource"]["current"]["averageValue"],
            "150m"
        );
    }

    #[test]
    fn no_metrics_means_cpu_at_80_percent() {
        let bare = json!({"spec": {"maxReplicas": 4}});
        let p = plan(&bare, 1, &cpu(1, 160, 100), &[], 1000);
        assert_eq!(p.desired, 2);
    }
}
