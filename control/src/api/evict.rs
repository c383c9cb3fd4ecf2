//! The eviction subresource's budget check: a pod may be evicted only when the one
//! PodDisruptionBudget that selects it (if any) allows a disruption now. The allowance is
//! spent by a compare-and-swap on the budget's status, so two evictions never share one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::error::{ApiError, Cause};
use super::Api;
use crate::controllers::disruption;
use crate::store::Consistency;

/// More evictions than this not yet seen by the disruption controller stop further ones.
const MAX_DISRUPTED: usize = 2000;

/// Whether `pod` may be evicted now; when a budget allows it, the budget records the
/// disruption (unless `dry`). Errors are what the eviction answers: 429 while the budget
/// allows nothing or is not yet counted, 500 for a pod with more than one budget.
pub(super) async fn admit(api: &Arc<Api>, pod: &Value, dry: bool) -> Result<(), ApiError> {
    let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
    // A pod already going, finished or not yet running disrupts nothing.
    if !pod["metadata"]["deletionTimestamp"].is_null()
        || matches!(phase, "Succeeded" | "Failed" | "Pending")
    {
        return Ok(());
    }
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let prefix = format!("/registry/policy/poddisruptionbudgets/{ns}/");
    // A lost compare-and-swap means another eviction or the controller changed the budget:
    // look again.
    for _ in 0..8 {
        let page = api
            .store
            .range(&prefix, None, 0, Consistency::Linearizable)
            .await?;
        let mut budgets = Vec::new();
        for kv in &page.kvs {
            let mut b: Value = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::Internal(format!("a stored budget is unreadable: {e}")))?;
            // Stored values leave it out; the status update below is conditional on it.
            b["metadata"]["resourceVersion"] = json!(kv.mod_revision.to_string());
            if disruption::selects(&b, pod) {
                budgets.push(b);
            }
        }
        let mut pdb = match budgets.len() {
            0 => return Ok(()),
            1 => budgets.remove(0),
            _ => {
                return Err(ApiError::Internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.".into(),
                ))
            }
        };
        let budget = pdb["metadata"]["name"].as_str().unwrap_or("").to_string();
        let st = &pdb["status"];
        let (healthy, desired) = (
            st["currentHealthy"].as_i64().unwrap_or(0),
            st["desiredHealthy"].as_i64().unwrap_or(0),
        );
        if !crate::controllers::replicaset::ready(pod) {
            // An unready pod adds nothing to the budget's health: it may go when the policy
            // says always, or (the default) while the budget is met without it.
            let always = pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow";
            if always || (healthy >= desired && desired > 0) {
                return Ok(());
            }
        }
        let generation = pdb["metadata"]["generation"].as_i64().unwrap_or(1);
        if st["observedGeneration"].as_i64().unwrap_or(0) < generation {
            return Err(too_many(format!(
                "The disruption budget {budget} is still being processed by the server."
            )));
        }
        let allowed = st["disruptionsAllowed"].as_i64().unwrap_or(0);
        if allowed < 0 {
            return Err(forbidden(&budget, "pdb disruptions allowed is negative"));
        }
        if st["disruptedPods"].as_object().map_or(0, |m| m.len()) > MAX_DISRUPTED {
            return Err(forbidden(
                &budget,
                "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
            ));
        }
        if allowed == 0 {
            return Err(too_many(format!(
                "The disruption budget {budget} needs {desired} healthy pods and has {healthy} currently"
            )));
        }
        if dry {
            return Ok(());
        }
        let status = &mut pdb["status"];
        status["disruptionsAllowed"] = json!(allowed - 1);
        if !status["disruptedPods"].is_object() {
            status["disruptedPods"] = json!({});
        }
        status["disruptedPods"][name] = json!(super::now());
        let path = format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{budget}/status");
        // The budget as read, resourceVersion included: a stale one is refused.
        let user = crate::controllers::system_user("system:serviceaccount:kube-system:disruption");
        match super::call_as(api, &user, "PUT", &path, "application/json", &pdb).await {
            (200, _) => return Ok(()),
            (409, _) => continue,
            (code, v) => {
                return Err(ApiError::Internal(format!(
                    "recording the disruption in {budget} failed ({code}): {}",
                    v["message"]
                )))
            }
        }
    }
    Err(too_many(
        "The disruption budget changed too often while this eviction was considered.".into(),
    ))
}

/// Say on a running pod that it is being evicted (the `DisruptionTarget` condition), as
/// kube-apiserver does before the delete, so that a Job's pod failure policy can tell an
/// eviction from a failure of its own.
pub(super) async fn mark(api: &Arc<Api>, pod: &Value) {
    let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") || !pod["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
    let body = json!({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True",
        "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting",
        "lastTransitionTime": super::now()}]}});
    let user = crate::controllers::system_user("system:serviceaccount:kube-system:disruption");
    let ct = "application/strategic-merge-patch+json";
    let (code, v) = super::call_as(api, &user, "PATCH", &path, ct, &body).await;
    if code != 200 {
        tracing::debug!(%name, code, message = %v["message"], "DisruptionTarget not recorded");
    }
}

fn too_many(cause: String) -> ApiError {
    ApiError::TooManyRequests {
        message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
        causes: vec![Cause::new("DisruptionBudget", "", cause)],
    }
}

fn forbidden(budget: &str, why: &str) -> ApiError {
    ApiError::Forbidden {
        message: format!("poddisruptionbudgets.policy \"{budget}\" is forbidden: {why}"),
    }
}
