//! The node authorizer: what a node agent (user `system:node:<name>`, group `system:nodes`)
//! may do. A node reads only the pods bound to it and the config maps, secrets, claims and
//! volumes those pods use (and the volumes provisioned on it), and writes only its own Node,
//! its own Lease, its pods' status, events, and the final delete of its own pods once they
//! have stopped. Nothing in RBAC can widen this.

use serde_json::Value;

use super::auth::{Attrs, User};
use super::{resources, Api, ApiError};
use crate::store::Consistency;

/// The node a user is, if it is one.
pub fn node_name(user: &User) -> Option<&str> {
    if !user.groups.iter().any(|g| g == "system:nodes") {
        return None;
    }
    user.name
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty())
}

/// Whether a pod (JSON) uses the config map (`secret` false) or secret named `name`.
pub fn pod_uses(pod: &Value, secret: bool, name: &str) -> bool {
    let spec = &pod["spec"];
    let is = |v: &Value| v.as_str() == Some(name);
    let volume = |v: &Value| {
        (if secret {
            is(&v["secret"]["secretName"])
        } else {
            is(&v["configMap"]["name"])
        }) || v["projected"]["sources"].as_array().is_some_and(|s| {
            s.iter().any(|src| {
                if secret {
                    is(&src["secret"]["name"])
                } else {
                    is(&src["configMap"]["name"])
                }
            })
        })
    };
    let (key_ref, from_ref) = if secret {
        ("secretKeyRef", "secretRef")
    } else {
        ("configMapKeyRef", "configMapRef")
    };
    let container = |c: &Value| {
        c["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| is(&e["valueFrom"][key_ref]["name"])))
            || c["envFrom"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| is(&e[from_ref]["name"])))
    };
    let list = |k: &str| spec[k].as_array().cloned().unwrap_or_default();
    list("volumes").iter().any(volume)
        || list("containers").iter().any(container)
        || list("initContainers").iter().any(container)
        || (secret && list("imagePullSecrets").iter().any(|s| is(&s["name"])))
}

/// The claims a pod's volumes name.
pub fn pod_claims(pod: &Value) -> impl Iterator<Item = &str> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
}

fn deny(node: &str, a: &Attrs, why: &str) -> ApiError {
    let what = match &a.path {
        Some(p) => format!("path \"{p}\""),
        None if a.subresource.is_empty() => format!("{} \"{}\"", a.resource, a.name),
        None => format!("{}/{} \"{}\"", a.resource, a.subresource, a.name),
    };
    ApiError::Forbidden {
        message: format!("node \"{node}\" cannot {} {what}: {why}", a.verb),
    }
}

/// What the authorizer reads of a pod: decoding only these fields skips building the whole
/// pod, on every status update, event and token request a node makes.
#[derive(serde::Deserialize, Default)]
struct Who {
    #[serde(default)]
    spec: WhoSpec,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WhoSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    service_account: Option<String>,
}

impl Who {
    fn on(&self, node: &str) -> bool {
        self.spec.node_name.as_deref() == Some(node)
    }

    fn service_account(&self) -> &str {
        [&self.spec.service_account_name, &self.spec.service_account]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .find(|s| !s.is_empty())
            .unwrap_or("default")
    }
}

async fn pod(api: &Api, ns: &str, name: &str) -> Result<Option<Who>, ApiError> {
    let res = resources::find("", "v1", "pods").ok_or_else(|| ApiError::Internal("pods".into()))?;
    let kv = api
        .store
        .get(&res.key(Some(ns), name), Consistency::Serializable)
        .await?;
    Ok(kv.map(|kv| serde_json::from_slice(&kv.value).unwrap_or_default()))
}

async fn bound(api: &Api, node: &str, ns: &str, name: &str) -> Result<bool, ApiError> {
    // A pod that does not exist is the node's to ask about: the answer will be 404, which
    // tells a node that lost a delete that the pod is gone.
    Ok(pod(api, ns, name).await?.is_none_or(|p| p.on(node)))
}

/// Whether any pod in `ns` bound to `node` passes `uses`.
async fn node_pod_in(
    api: &Api,
    node: &str,
    ns: &str,
    uses: impl Fn(&Value) -> bool,
) -> Result<bool, ApiError> {
    let res = resources::find("", "v1", "pods").ok_or_else(|| ApiError::Internal("pods".into()))?;
    let page = api
        .store
        .range(&res.prefix(Some(ns)), None, 0, Consistency::Serializable)
        .await?;
    Ok(page.kvs.iter().any(|kv| {
        serde_json::from_slice::<Refs>(&kv.value).is_ok_and(|r| {
            let s = r.spec;
            s.node_name.as_deref() == Some(node)
                && uses(&serde_json::json!({"spec": {
                    "volumes": s.volumes,
                    "containers": s.containers,
                    "initContainers": s.init_containers,
                    "imagePullSecrets": s.image_pull_secrets,
                }}))
        })
    }))
}

/// What [`pod_uses`] and [`pod_claims`] read of a pod: the rest (its metadata, status and
/// most of its spec) is skipped rather than built, for each of a namespace's pods.
#[derive(serde::Deserialize, Default)]
struct Refs {
    #[serde(default)]
    spec: RefSpec,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RefSpec {
    node_name: Option<String>,
    #[serde(default)]
    volumes: Value,
    #[serde(default)]
    containers: Value,
    #[serde(default)]
    init_containers: Value,
    #[serde(default)]
    image_pull_secrets: Value,
}

/// A PersistentVolume is the node's to read when one of its pods' claims is bound to it,
/// when it was provisioned on the node, or when it does not exist (the 404 tells the agent
/// that the volume's directory may go).
async fn volume_readable(api: &Api, node: &str, name: &str) -> Result<bool, ApiError> {
    let res = resources::find("", "v1", "persistentvolumes")
        .ok_or_else(|| ApiError::Internal("persistentvolumes".into()))?;
    let Some(kv) = api
        .store
        .get(&res.key(None, name), Consistency::Serializable)
        .await?
    else {
        return Ok(true);
    };
    let pv: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
    if pv["metadata"]["annotations"][crate::controllers::volumes::NODE_ANNOTATION] == node {
        return Ok(true);
    }
    let claim = &pv["spec"]["claimRef"];
    match (claim["namespace"].as_str(), claim["name"].as_str()) {
        (Some(ns), Some(c)) => node_pod_in(api, node, ns, |p| pod_claims(p).any(|x| x == c)).await,
        _ => Ok(false),
    }
}

/// A token a node asks for (as kube-apiserver's NodeRestriction admits it): bound to a pod
/// on this node that runs as service account `ns/sa`.
pub async fn token_request(
    api: &Api,
    node: &str,
    ns: &str,
    sa: &str,
    req: &Value,
) -> Result<(), ApiError> {
    let deny = |why: String| ApiError::Forbidden {
        message: format!(
            "node \"{node}\" cannot request a token for serviceaccount {ns}/{sa}: {why}"
        ),
    };
    let b = &req["spec"]["boundObjectRef"];
    if b["kind"] != "Pod" {
        return Err(deny("a node's token must be bound to a pod".into()));
    }
    let name = b["name"].as_str().unwrap_or("");
    let Some(p) = pod(api, ns, name).await? else {
        return Err(deny(format!("pod \"{name}\" not found")));
    };
    if !p.on(node) {
        return Err(deny(format!("pod \"{name}\" is not bound to this node")));
    }
    if p.service_account() != sa {
        return Err(deny(format!(
            "pod \"{name}\" runs as another service account"
        )));
    }
    Ok(())
}

/// Decide a node's request. `fields` is the request's field selector (for lists and
/// watches of pods).
pub async fn authorize(
    api: &Api,
    node: &str,
    a: &Attrs,
    fields: Option<&str>,
) -> Result<(), ApiError> {
    let read = matches!(a.verb.as_str(), "get" | "list" | "watch");
    if let Some(p) = &a.path {
        let compile = a.verb == "create" && p == "/outpost/v1/aot";
        let ok = compile
            || a.verb == "get"
                && (p.starts_with("/outpost/v1/modules/")
                    || p.starts_with("/outpost/v1/names/")
                    || p == "/version"
                    || p == "/api"
                    || p == "/apis"
                    || p.starts_with("/api/")
                    || p.starts_with("/apis/")
                    || p.starts_with("/openapi/"));
        return if ok {
            Ok(())
        } else {
            Err(deny(
                node,
                a,
                "nodes may only read discovery and modules, and ask for compiled modules",
            ))
        };
    }
    let own = a.name == node;
    let sub = a.subresource.as_str();
    let ok = match (a.group.as_str(), a.resource.as_str()) {
        ("", "nodes") => match a.verb.as_str() {
            "get" | "list" | "watch" => true,
            // The name of a created node is checked against the body at create.
            "create" => sub.is_empty(),
            "update" | "patch" => own && matches!(sub, "" | "status"),
            _ => false,
        },
        ("", "pods") => match (a.verb.as_str(), sub) {
            ("list" | "watch", "") => {
                let want = format!("spec.nodeName={node}");
                if fields.map(str::trim) != Some(want.as_str()) {
                    return Err(deny(
                        node,
                        a,
                        &format!("a node may only list its own pods (fieldSelector={want})"),
                    ));
                }
                true
            }
            ("get", "" | "status") | ("update" | "patch", "status") | ("delete", "") => {
                bound(api, node, &a.namespace, &a.name).await?
            }
            _ => false,
        },
        ("", plural @ ("configmaps" | "secrets")) if a.verb == "get" => {
            let secret = plural == "secrets";
            node_pod_in(api, node, &a.namespace, |p| pod_uses(p, secret, &a.name)).await?
        }
        // Decided on the body, by [`token_request`]: bound to one of the node's pods that
        // runs as this account (one read, where a scan of the namespace's pods would cost
        // every pod start as much as there are pods).
        ("", "serviceaccounts") => a.verb == "create" && sub == "token",
        ("", "persistentvolumeclaims") if a.verb == "get" => {
            node_pod_in(api, node, &a.namespace, |p| {
                pod_claims(p).any(|c| c == a.name)
            })
            .await?
        }
        ("", "persistentvolumes") if a.verb == "get" => volume_readable(api, node, &a.name).await?,
        ("", "events") | ("events.k8s.io", "events") => {
            matches!(a.verb.as_str(), "create" | "update" | "patch")
        }
        ("coordination.k8s.io", "leases") => {
            a.namespace == "kube-node-lease" && (own || a.verb == "create") && a.verb != "delete"
        }
        ("node.k8s.io", "runtimeclasses")
        | ("", "services" | "endpoints" | "namespaces")
        | ("discovery.k8s.io", "endpointslices") => read,
        ("authorization.k8s.io", "selfsubjectaccessreviews") => a.verb == "create",
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(deny(
            node,
            a,
            "nodes may only touch their own Node, Lease and pods, and what their pods use",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_a_pods_node_and_account_alone() {
        let p: Who = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "serviceAccount": "old", "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}}))
        .unwrap();
        assert!(p.on("n1") && !p.on("n2"));
        assert_eq!(p.service_account(), "old");
        let p: Who = serde_json::from_value(
            json!({"spec": {"serviceAccountName": "new", "serviceAccount": "old"}}),
        )
        .unwrap();
        assert_eq!(p.service_account(), "new");
        assert!(!p.on("n1"), "not bound yet");
        let p: Who = serde_json::from_value(json!({"spec": {"serviceAccountName": ""}})).unwrap();
        assert_eq!(p.service_account(), "default");
    }

    #[test]
    fn finds_every_way_a_pod_uses_a_config_map_or_secret() {
        let p = json!({"spec": {
            "volumes": [{"name": "a", "configMap": {"name": "cm-vol"}},
                        {"name": "b", "secret": {"secretName": "s-vol"}},
                        {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}]}}],
            "containers": [{"name": "x",
                "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "cm-from"}}]}],
            "imagePullSecrets": [{"name": "s-pull"}]}});
        for n in ["cm-vol", "cm-proj", "cm-from"] {
            assert!(pod_uses(&p, false, n), "{n}");
            assert!(!pod_uses(&p, true, n), "{n} is not a secret");
        }
        for n in ["s-vol", "s-env", "s-pull"] {
            assert!(pod_uses(&p, true, n), "{n}");
        }
        assert!(!pod_uses(&p, false, "other"));
    }

    #[test]
    fn finds_a_pods_claims() {
        let p = json!({"spec": {"volumes": [
            {"name": "a", "persistentVolumeClaim": {"claimName": "data-web-0"}},
            {"name": "b", "emptyDir": {}},
            {"name": "c", "persistentVolumeClaim": {"claimName": "logs"}}]}});
        assert_eq!(pod_claims(&p).collect::<Vec<_>>(), ["data-web-0", "logs"]);
        assert_eq!(pod_claims(&json!({})).count(), 0);
    }

    #[test]
    fn only_node_users_are_nodes() {
        let u = |name: &str, g: &str| User {
            name: name.into(),
            uid: String::new(),
            groups: vec![g.into()],
        };
        assert_eq!(node_name(&u("system:node:a", "system:nodes")), Some("a"));
        assert_eq!(node_name(&u("system:node:a", "system:masters")), None);
        assert_eq!(node_name(&u("system:node:", "system:nodes")), None);
    }
}
