//! A first scheduler: binds each pod without a node to a Ready, schedulable node that offers
//! the runtime the pod needs (Wasm, or OCI once nodes offer it) and whose labels match the
//! pod's node selector (and its RuntimeClass's), preferring the node with the fewest
//! pods. A pod that fits nowhere gets `PodScheduled=False` with the reason per node, the way
//! `kubectl describe` shows it. It runs on the Raft leader and binds through the API's
//! binding subresource, as kube-scheduler does. The full filter and score set is the
//! scheduler issue's; this is the thinnest real path so that pods run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request};
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::api::{Api, Peer, User};
use crate::store::Consistency;

/// Why `node` cannot take `pod`, or `None` if it can.
pub fn unfit(pod: &Value, node: &Value, class_selector: &Value) -> Option<&'static str> {
    let ready = node["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    if !ready {
        return Some("node(s) were not ready");
    }
    if node["spec"]["unschedulable"].as_bool() == Some(true) {
        return Some("node(s) were unschedulable");
    }
    let labels = &node["metadata"]["labels"];
    if needs_oci(pod) && labels["outpost.dev/runtime-oci"] != "true" {
        return Some("node(s) didn't offer the OCI runtime the pod needs");
    }
    let matches = |sel: &Value| {
        sel.as_object()
            .is_none_or(|m| m.iter().all(|(k, v)| labels[k] == *v))
    };
    if !matches(&pod["spec"]["nodeSelector"]) || !matches(class_selector) {
        return Some("node(s) didn't match Pod's node affinity/selector");
    }
    None
}

/// A pod runs on the Wasm runtime when it names the `wasm` RuntimeClass or all its images
/// are modules from the module store; anything else needs an OCI runtime.
pub fn needs_oci(pod: &Value) -> bool {
    if pod["spec"]["runtimeClassName"] == "wasm" {
        return false;
    }
    ["initContainers", "containers"].iter().any(|k| {
        pod["spec"][k].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| !c["image"].as_str().unwrap_or("").starts_with("module:"))
        })
    })
}

fn scheduler() -> User {
    User {
        name: "system:kube-scheduler".into(),
        uid: String::new(),
        groups: vec!["system:masters".into()],
    }
}

async fn call(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: Value) -> (u16, Value) {
    let app = crate::api::router(api.clone());
    let Ok(mut req) = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, ct)
        .body(Body::from(body.to_string()))
    else {
        return (400, Value::Null);
    };
    req.extensions_mut().insert(Peer(Some(scheduler())));
    let Ok(resp) = app.oneshot(req).await;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Schedule until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>) {
    let mut told: HashMap<String, String> = HashMap::new();
    loop {
        let st = api.store.status();
        if st.leader == Some(st.id) {
            if let Err(e) = pass(&api, &mut told).await {
                tracing::debug!(error = %e, "scheduling pass failed");
            }
        }
        // A pass is a range over pods and nodes: cheap at edge scale. Wake on any change.
        match api.store.watch("/registry/core/", st.revision).await {
            Ok(mut w) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        if let Some(crate::store::WatchItem::Revision(_)) = w.next().await {
                            break;
                        }
                    }
                })
                .await;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn list(api: &Arc<Api>, prefix: &str) -> Result<Vec<Value>, String> {
    let page = api
        .store
        .range(prefix, None, 0, Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?;
    Ok(page
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

async fn pass(api: &Arc<Api>, told: &mut HashMap<String, String>) -> Result<(), String> {
    let pods = list(api, "/registry/core/pods/").await?;
    let pending: Vec<&Value> = pods
        .iter()
        .filter(|p| {
            p["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
                && p["metadata"]["deletionTimestamp"].is_null()
                && p["spec"]["schedulerName"]
                    .as_str()
                    .is_none_or(|s| s == "default-scheduler")
        })
        .collect();
    if pending.is_empty() {
        told.clear();
        return Ok(());
    }
    let nodes = list(api, "/registry/core/nodes/").await?;
    let classes = list(api, "/registry/node.k8s.io/runtimeclasses/").await?;
    let mut load: HashMap<String, usize> = HashMap::new();
    for p in &pods {
        if let Some(n) = p["spec"]["nodeName"].as_str() {
            *load.entry(n.to_string()).or_default() += 1;
        }
    }
    let mut binds = Vec::new();
    for pod in pending {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = pod["metadata"]["name"].as_str().unwrap_or("");
        let class = pod["spec"]["runtimeClassName"].as_str();
        let class_sel = class
            .and_then(|c| classes.iter().find(|rc| rc["metadata"]["name"] == c))
            .map(|rc| rc["scheduling"]["nodeSelector"].clone())
            .unwrap_or(Value::Null);
        let mut reasons: HashMap<&str, usize> = HashMap::new();
        let best = nodes
            .iter()
            .filter(|n| match unfit(pod, n, &class_sel) {
                Some(r) => {
                    *reasons.entry(r).or_default() += 1;
                    false
                }
                None => true,
            })
            .min_by_key(|n| {
                load.get(n["metadata"]["name"].as_str().unwrap_or(""))
                    .copied()
                    .unwrap_or(0)
            })
            .and_then(|n| n["metadata"]["name"].as_str().map(String::from));
        match best {
            Some(node) => {
                *load.entry(node.clone()).or_default() += 1;
                binds.push((ns.to_string(), name.to_string(), node));
            }
            None => {
                let mut parts: Vec<String> =
                    reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                parts.sort();
                let msg = format!(
                    "0/{} nodes are available: {}.",
                    nodes.len(),
                    if parts.is_empty() {
                        "no nodes have joined".to_string()
                    } else {
                        parts.join(", ")
                    }
                );
                let key = format!("{ns}/{name}");
                if told.get(&key) == Some(&msg) {
                    continue;
                }
                let patch = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable", "message": msg,
                    "lastProbeTime": null, "lastTransitionTime": crate::api::now()}]}});
                call(
                    api,
                    "PATCH",
                    &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                    "application/merge-patch+json",
                    patch,
                )
                .await;
                told.insert(key, msg);
            }
        }
    }
    // Bindings are independent writes: many in flight share the store's group commit.
    futures::stream::iter(binds)
        .map(|(ns, name, node)| async move {
            let body = json!({"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
            let (status, v) = call(
                api,
                "POST",
                &format!("/api/v1/namespaces/{ns}/pods/{name}/binding"),
                "application/json",
                body,
            )
            .await;
            if (200..300).contains(&status) {
                tracing::debug!(pod = %format!("{ns}/{name}"), %node, "bound");
            } else {
                tracing::debug!(pod = %name, %status, message = %v["message"], "binding failed");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_ready_matching_nodes_only() {
        let node = |ready: &str, labels: Value| {
            json!({"metadata": {"labels": labels},
                   "status": {"conditions": [{"type": "Ready", "status": ready}]}})
        };
        let pod = json!({"spec": {"nodeSelector": {"zone": "a"}}});
        let wasm = json!({"outpost.dev/runtime-wasm": "true"});
        assert_eq!(
            unfit(
                &pod,
                &node(
                    "True",
                    json!({"zone": "a", "outpost.dev/runtime-wasm": "true"})
                ),
                &wasm
            ),
            None
        );
        assert_eq!(
            unfit(&pod, &node("False", json!({"zone": "a"})), &Value::Null),
            Some("node(s) were not ready")
        );
        assert!(unfit(&pod, &node("True", json!({"zone": "b"})), &Value::Null).is_some());
        assert!(unfit(&json!({}), &node("True", json!({})), &wasm).is_some());
        let oci = json!({"spec": {"containers": [{"image": "nginx:1.27"}]}});
        assert!(needs_oci(&oci));
        assert_eq!(
            unfit(
                &oci,
                &node("True", json!({"outpost.dev/runtime-wasm": "true"})),
                &Value::Null
            ),
            Some("node(s) didn't offer the OCI runtime the pod needs")
        );
        let module = json!({"spec": {"containers": [{"image": "module:hello"}]}});
        assert!(!needs_oci(&module));
        let mut cordoned = node("True", json!({}));
        cordoned["spec"] = json!({"unschedulable": true});
        assert_eq!(
            unfit(&json!({}), &cordoned, &Value::Null),
            Some("node(s) were unschedulable")
        );
    }
}
