//! The resource metrics API (`metrics.k8s.io/v1beta1`, what metrics-server serves and
//! `kubectl top` reads): node and pod usage, asked of the nodes over their links when a
//! client asks, as metrics-server asks each kubelet. Nothing is stored; a node that does not
//! answer within [`ASK`] is left out, as metrics-server leaves out a kubelet it cannot reach.
//!
//! k8s-openapi has no types for this group, so its two kinds are defined here, with the
//! fields metrics-server's types have.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use outpost_api::link::{read_frame, Down, Head, Usage, Use, MAX_FRAME};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::resources::Resource;
use super::select::{Fields, Labels};
use super::Api;
use crate::store::Consistency;

pub const GROUP: &str = "metrics.k8s.io";
/// How long a node has to answer.
const ASK: Duration = Duration::from_secs(5);

/// A node's usage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.NodeMetrics")]
pub struct NodeMetrics {
    pub metadata: ObjectMeta,
    pub timestamp: String,
    pub window: String,
    pub usage: BTreeMap<String, Quantity>,
}

/// A pod's usage, by container.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.PodMetrics")]
pub struct PodMetrics {
    pub metadata: ObjectMeta,
    pub timestamp: String,
    pub window: String,
    pub containers: Vec<ContainerMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.ContainerMetrics")]
pub struct ContainerMetrics {
    pub name: String,
    pub usage: BTreeMap<String, Quantity>,
}

/// The metrics objects of `res` (`nodes` or `pods`) the request selects.
pub async fn read(
    api: &Arc<Api>,
    res: &Resource,
    ns: Option<&str>,
    name: Option<&str>,
    labels: &Labels,
    fields: &Fields,
) -> Result<Vec<Value>, ApiError> {
    let wanted = |v: &Value| {
        labels.matches(&v["metadata"]["labels"])
            && fields.matches(v)
            && name.is_none_or(|n| v["metadata"]["name"] == n)
    };
    if res.plural == "nodes" {
        let prefix = super::resources::find("", "v1", "nodes")
            .map(|r| r.prefix(None))
            .unwrap_or_default();
        let nodes = objects(api, &prefix).await?;
        let nodes: Vec<Value> = nodes.into_iter().filter(wanted).collect();
        let names: Vec<String> = nodes.iter().map(|n| name_of(n).to_string()).collect();
        let usage = ask_all(api, &names).await;
        return Ok(nodes
            .iter()
            .filter_map(|n| {
                let u = usage.get(name_of(n))?;
                Some(json!({
                    "kind": "NodeMetrics",
                    "apiVersion": "metrics.k8s.io/v1beta1",
                    "metadata": meta(n),
                    "timestamp": u.time,
                    "window": window(u.window_ms),
                    "usage": quantities(u.node),
                }))
            })
            .collect());
    }
    Ok(pods(api, ns, wanted)
        .await?
        .into_iter()
        .filter_map(|(_, m)| m)
        .collect())
}

/// The pods in `ns` (or all) that `wanted` picks, each with its PodMetrics if its node
/// answered with its usage (a pod not running has none).
pub async fn pods(
    api: &Arc<Api>,
    ns: Option<&str>,
    wanted: impl Fn(&Value) -> bool,
) -> Result<Vec<(Value, Option<Value>)>, ApiError> {
    let prefix = super::resources::find("", "v1", "pods")
        .map(|r| r.prefix(ns))
        .unwrap_or_default();
    let pods: Vec<Value> = objects(api, &prefix)
        .await?
        .into_iter()
        .filter(|p| wanted(p))
        .collect();
    let mut nodes: Vec<String> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    nodes.sort();
    nodes.dedup();
    let usage = ask_all(api, &nodes).await;
    Ok(pods
        .into_iter()
        .map(|p| {
            let m = pod_metrics(&p, &usage);
            (p, m)
        })
        .collect())
}

fn pod_metrics(p: &Value, usage: &BTreeMap<String, Usage>) -> Option<Value> {
    let u = usage.get(p["spec"]["nodeName"].as_str()?)?;
    let pu = u.pods.iter().find(|x| {
        x.namespace == p["metadata"]["namespace"].as_str().unwrap_or("") && x.name == name_of(p)
    })?;
    let containers: Vec<Value> = pu
        .containers
        .iter()
        .map(|(c, use_)| json!({"name": c, "usage": quantities(*use_)}))
        .collect();
    Some(json!({
        "kind": "PodMetrics",
        "apiVersion": "metrics.k8s.io/v1beta1",
        "metadata": meta(p),
        "timestamp": u.time,
        "window": window(u.window_ms),
        "containers": containers,
    }))
}

fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

/// The object's identity and labels, as metrics-server copies them.
fn meta(o: &Value) -> Value {
    let m = &o["metadata"];
    let mut out = json!({"name": m["name"], "creationTimestamp": jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ").to_string()});
    for k in ["namespace", "labels"] {
        if !m[k].is_null() {
            out[k] = m[k].clone();
        }
    }
    out
}

/// A window as Go's `time.Duration` prints one in seconds (`10.004s`).
fn window(ms: u64) -> String {
    format!("{}s", ms as f64 / 1000.0)
}

fn quantities(u: Use) -> Value {
    json!({"cpu": format!("{}n", u.nanocores), "memory": format!("{}Ki", u.memory / 1024)})
}

/// Every object under `prefix`.
async fn objects(api: &Api, prefix: &str) -> Result<Vec<Value>, ApiError> {
    let r = api
        .store
        .range(prefix, None, 0, Consistency::Serializable)
        .await?;
    Ok(r.kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Ask each of `nodes` at once; those that answer, by name.
async fn ask_all(api: &Arc<Api>, nodes: &[String]) -> BTreeMap<String, Usage> {
    let asks = nodes.iter().map(|n| async move {
        match tokio::time::timeout(ASK, ask(api, n)).await {
            Ok(Ok(u)) => Some((n.clone(), u)),
            Ok(Err(e)) => {
                tracing::debug!(node = %n, error = %e, "no usage from node");
                None
            }
            Err(_) => {
                tracing::debug!(node = %n, "no usage from node in time");
                None
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn ask(api: &Api, node: &str) -> Result<Usage, String> {
    let (head, mut recv): (Head, _) = api.links.open(node, &Down::Usage).await?;
    if head.status != 200 {
        return Err(format!("node answered {}", head.status));
    }
    read_frame(&mut recv, MAX_FRAME)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_what_kubectl_top_parses() {
        let q = quantities(Use {
            nanocores: 1_500_000,
            memory: 10 << 20,
        });
        assert_eq!(q, json!({"cpu": "1500000n", "memory": "10240Ki"}));
        assert_eq!(window(10_004), "10.004s");
        assert_eq!(window(1_000), "1s");
        let m = meta(
            &json!({"metadata": {"name": "p", "namespace": "n", "uid": "u",
            "labels": {"app": "a"}}}),
        );
        assert_eq!(
            (m["name"].as_str(), m["namespace"].as_str()),
            (Some("p"), Some("n"))
        );
        assert_eq!(m["labels"], json!({"app": "a"}));
        assert!(m["uid"].is_null());
    }
}
