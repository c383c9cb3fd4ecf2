//! ClusterRole aggregation, on the leader, as Kubernetes' clusterrole-aggregation
//! controller: a ClusterRole with an `aggregationRule` gets the rules of every ClusterRole
//! its selectors pick ([`crate::api::auth::aggregate`]), written again whenever a
//! ClusterRole changes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{system_user, while_leader};
use crate::api::{auth, Api};
use crate::store::Consistency;

const ROLES: &str = "/registry/rbac.authorization.k8s.io/clusterroles/";

/// Aggregate until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    while_leader(&api, "ClusterRole aggregation", |a| async move {
        lead(&a).await
    })
    .await
}

async fn lead(api: &Arc<Api>) -> Result<(), String> {
    let user = system_user("system:controller:clusterrole-aggregation-controller");
    while api.store.leads() {
        let page = api
            .store
            .range(ROLES, None, 0, Consistency::Linearizable)
            .await
            .map_err(|e| e.to_string())?;
        let roles: Vec<(u64, Value)> = page
            .kvs
            .iter()
            .filter_map(|kv| Some((kv.mod_revision, serde_json::from_slice(&kv.value).ok()?)))
            .collect();
        let all: Vec<Value> = roles.iter().map(|(_, r)| r.clone()).collect();
        for (rv, role) in &roles {
            let Some(rules) = auth::aggregate(role, &all) else {
                continue;
            };
            if role["rules"] == rules || (role["rules"].is_null() && rules == json!([])) {
                continue;
            }
            let name = role["metadata"]["name"].as_str().unwrap_or("");
            let body = json!({"metadata": {"resourceVersion": rv.to_string()}, "rules": rules});
            let (code, v) = crate::api::call_as(
                api,
                &user,
                "PATCH",
                &format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}"),
                "application/merge-patch+json",
                &body,
            )
            .await;
            // 409: changed meanwhile; the watch brings it back.
            if !(200..300).contains(&code) && code != 409 {
                tracing::warn!(role = name, code, message = %v["message"], "aggregated rules not written");
            }
        }
        let mut w = api
            .store
            .watch(ROLES, page.revision)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(None) = tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            return Err("the ClusterRole watch ended".into());
        }
    }
    Ok(())
}
