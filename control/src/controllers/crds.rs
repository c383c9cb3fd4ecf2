//! CustomResourceDefinitions, on every member: the API serves exactly the established CRDs
//! in the store ([`crate::api::crd`]), read again whenever one changes. On the leader, a
//! deleted CRD's objects are deleted (each through the API, so their own finalizers hold
//! them), then its cleanup finalizer is lifted and the CRD goes, as in Kubernetes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::system_user;
use crate::api::{crd, Api};
use crate::store::Consistency;
use outpost_api::store::KeyValue;

/// How long to wait for a change before reading the CRDs again anyway.
const RESYNC: Duration = Duration::from_secs(30);
/// How often a CRD being deleted is looked at while its objects go.
const EMPTYING: Duration = Duration::from_secs(1);

/// Follow the CRDs until the task is aborted.
pub async fn run(api: Arc<Api>) {
    super::again("CRD follower", || follow(&api)).await
}

async fn follow(api: &Arc<Api>) -> Result<(), String> {
    loop {
        let page = api
            .store
            .range(crd::PREFIX, None, 0, Consistency::Serializable)
            .await
            .map_err(|e| e.to_string())?;
        let crds: Vec<(&KeyValue, Value)> = page
            .kvs
            .iter()
            .filter_map(|kv| Some((kv, serde_json::from_slice(&kv.value).ok()?)))
            .collect();
        let values: Vec<Value> = crds.iter().map(|(_, v)| v.clone()).collect();
        crd::load(&values);
        let going: Vec<&(&KeyValue, Value)> = crds
            .iter()
            .filter(|(_, c)| {
                !c["metadata"]["deletionTimestamp"].is_null()
                    && c["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == crd::CLEANUP))
            })
            .collect();
        if api.store.leads() {
            for (kv, c) in &going {
                if let Err(e) = empty(api, kv.mod_revision, c).await {
                    tracing::warn!(crd = %c["metadata"]["name"], error = %e, "deleting a CRD's objects");
                }
            }
            for (_, c) in &crds {
                if let Err(e) = migrate(api, c).await {
                    tracing::warn!(crd = %c["metadata"]["name"], error = %e, "objects not moved to the storage version");
                }
            }
            // A CRD that waited for names another CRD held takes them once they are free.
            for (_, c) in &crds {
                if !crd::accepted(c)
                    && c["metadata"]["deletionTimestamp"].is_null()
                    && crd::conflict(c, &values).is_none()
                {
                    let name = c["metadata"]["name"].as_str().unwrap_or("");
                    let path = format!(
                        "/apis/{}/v1/customresourcedefinitions/{name}/status",
                        crd::GROUP
                    );
                    let user = system_user("system:apiextensions-naming");
                    let (code, v) = crate::api::call_as(
                        api,
                        &user,
                        "PATCH",
                        &path,
                        "application/merge-patch+json",
                        &json!({}),
                    )
                    .await;
                    if !(200..300).contains(&code) {
                        tracing::warn!(crd = name, code, message = %v["message"], "CRD names not taken");
                    }
                }
            }
        }
        let mut w = api
            .store
            .watch(crd::PREFIX, page.revision)
            .await
            .map_err(|e| e.to_string())?;
        let wait = if going.is_empty() { RESYNC } else { EMPTYING };
        if let Ok(None) = tokio::time::timeout(wait, w.next()).await {
            return Err("the CRD watch ended".into());
        }
    }
}

/// Objects of CRD `c` stored under an earlier storage version are written again as the
/// storage version (its `apiVersion`: versions differ in nothing else), as a storage
/// migration would; each on the condition that it was not written since it was read.
async fn migrate(api: &Arc<Api>, c: &Value) -> Result<(), String> {
    let storage = c["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
        .and_then(|v| v["name"].as_str());
    let earlier = c["status"]["storedVersions"]
        .as_array()
        .is_some_and(|s| s.iter().any(|v| v.as_str() != storage));
    let (Some(storage), true) = (storage, earlier) else {
        return Ok(());
    };
    if !c["metadata"]["deletionTimestamp"].is_null() {
        return Ok(());
    }
    let group = c["spec"]["group"].as_str().unwrap_or("");
    let plural = c["spec"]["names"]["plural"].as_str().unwrap_or("");
    let av = format!("{group}/{storage}");
    let page = api
        .store
        .range(
            &format!("/registry/{group}/{plural}/"),
            None,
            0,
            Consistency::Linearizable,
        )
        .await
        .map_err(|e| e.to_string())?;
    for kv in &page.kvs {
        let Ok(mut o) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        if o["apiVersion"] == av.as_str() {
            continue;
        }
        o["apiVersion"] = json!(av);
        let value = serde_json::to_vec(&o).map_err(|e| e.to_string())?;
        // A write in between wins; the next pass looks again.
        let _ = api
            .store
            .put(
                &kv.key,
                value,
                outpost_api::store::Expect::ModRevision(kv.mod_revision),
            )
            .await;
    }
    Ok(())
}

/// One step of deleting CRD `c` (at revision `rv`): delete its objects; once none is left,
/// lift the cleanup finalizer.
async fn empty(api: &Arc<Api>, rv: u64, c: &Value) -> Result<(), String> {
    let user = system_user("system:apiextensions-cleanup");
    let (group, plural) = (
        c["spec"]["group"].as_str().unwrap_or(""),
        c["spec"]["names"]["plural"].as_str().unwrap_or(""),
    );
    let prefix = format!("/registry/{group}/{plural}/");
    let page = api
        .store
        .range(&prefix, None, 0, Consistency::Linearizable)
        .await
        .map_err(|e| e.to_string())?;
    let res = crd::of(group, plural).map(|c| c.res);
    for kv in &page.kvs {
        let Ok(o) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        if !o["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        match res {
            Some(r) => {
                let ns = o["metadata"]["namespace"].as_str();
                let name = o["metadata"]["name"].as_str().unwrap_or("");
                let (code, v) = crate::api::call_as(
                    api,
                    &user,
                    "DELETE",
                    &r.path(ns, name),
                    "application/json",
                    &Value::Null,
                )
                .await;
                if !(200..300).contains(&code) && code != 404 {
                    return Err(format!("deleting {name}: {}", v["message"]));
                }
            }
            // Never served (its names were not accepted): nothing can hold its objects.
            None => {
                api.store
                    .delete(&kv.key, outpost_api::store::Expect::Any)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    if !page.kvs.is_empty() {
        return Ok(());
    }
    let name = c["metadata"]["name"].as_str().unwrap_or("");
    let left: Vec<&Value> = c["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| *f != crd::CLEANUP)
        .collect();
    let body = json!({"metadata": {"finalizers": left, "resourceVersion": rv.to_string()}});
    let (code, v) = crate::api::call_as(
        api,
        &user,
        "PATCH",
        &format!("/apis/{}/v1/customresourcedefinitions/{name}", crd::GROUP),
        "application/merge-patch+json",
        &body,
    )
    .await;
    // 409: written meanwhile; the watch brings it back.
    if !(200..300).contains(&code) && code != 409 && code != 404 {
        return Err(format!("lifting the finalizer: {}", v["message"]));
    }
    Ok(())
}
