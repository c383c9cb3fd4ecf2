//! The resource quota controller: on the leader, every [`SYNC`], each ResourceQuota's
//! `status` is counted afresh from what its namespace holds (`hard` as the spec says, `used`
//! of each cap). Admission adds a create's share to `used` as it admits it; this gives back
//! what deletes and ended pods freed, and counts a quota made after its objects. The write
//! is conditional on the quota's resourceVersion, so a share added meanwhile is not lost.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{system_user, while_leader};
use crate::api::quota;
use crate::api::resources;
use crate::api::Api;
use crate::store::Consistency;

/// How often quotas are counted again.
pub const SYNC: Duration = Duration::from_secs(5);

/// Count quotas until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    while_leader(&api, "resource quota controller", |a| async move {
        lead(&a).await
    })
    .await
}

async fn lead(api: &Arc<Api>) -> Result<(), String> {
    let user = system_user("system:serviceaccount:kube-system:resourcequota-controller");
    let res = resources::find("", "v1", "resourcequotas").ok_or("no resourcequotas")?;
    while api.store.leads() {
        let page = api
            .store
            .range(&res.prefix(None), None, 0, Consistency::Serializable)
            .await
            .map_err(|e| format!("listing quotas: {e}"))?;
        for kv in &page.kvs {
            let Ok(q) = serde_json::from_slice::<Value>(&kv.value) else {
                continue;
            };
            let (ns, name) = (
                q["metadata"]["namespace"].as_str().unwrap_or(""),
                q["metadata"]["name"].as_str().unwrap_or(""),
            );
            let used = quota::count(api, ns, &q)
                .await
                .map_err(|e| format!("counting quota {ns}/{name}: {e}"))?;
            let status = quota::status(&q, &used);
            if q["status"] == status {
                continue;
            }
            let path = format!("/api/v1/namespaces/{ns}/resourcequotas/{name}/status");
            let body = json!({"metadata": {"resourceVersion": kv.mod_revision.to_string()},
                "status": with_nulls(&q["status"], status)});
            let (code, v) = crate::api::call_as(
                api,
                &user,
                "PATCH",
                &path,
                "application/merge-patch+json",
                &body,
            )
            .await;
            // 409: written since it was read; counted again next round.
            if !(200..300).contains(&code) && code != 409 {
                tracing::warn!(quota = %format!("{ns}/{name}"), code, message = %v["message"], "quota status not written");
            }
        }
        tokio::time::sleep(SYNC).await;
    }
    Ok(())
}

/// `new` as a merge patch over `old`: keys `old` has and `new` does not are cleared.
fn with_nulls(old: &Value, mut new: Value) -> Value {
    for part in ["hard", "used"] {
        let gone: Vec<String> = old[part]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .filter(|k| new[part].get(k).is_none())
            .collect();
        if !new[part].is_object() {
            new[part] = Value::Object(Map::new());
        }
        for k in gone {
            new[part][&k] = Value::Null;
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_taken_away_are_cleared_from_the_status() {
        let old =
            json!({"hard": {"pods": "2", "secrets": "1"}, "used": {"pods": "1", "secrets": "0"}});
        let new = json!({"hard": {"pods": "3"}, "used": {"pods": "1"}});
        assert_eq!(
            with_nulls(&old, new),
            json!({"hard": {"pods": "3", "secrets": null}, "used": {"pods": "1", "secrets": null}})
        );
        assert_eq!(
            with_nulls(&Value::Null, json!({"hard": {}, "used": {}})),
            json!({"hard": {}, "used": {}})
        );
    }
}
