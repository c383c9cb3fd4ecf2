//! The pods and services proxy, as kube-apiserver serves it (`kubectl proxy`, `kubectl get
//! --raw`, dashboards):
//!
//! ```text
//! /api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH
//! /api/v1/namespaces/NS/services/[http:]NAME[:PORT]/proxy/PATH
//! ```
//!
//! The request (any method, its query and body) goes to the pod's port, or a ready
//! endpoint of the Service's port, over a connection [`super::upstream`] opens: through the
//! node's link, so it reaches pods behind NAT. HTTP only; the answer streams back as the pod
//! gave it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, Method};
use axum::response::Response;
use serde_json::Value;

use super::auth::{Attrs, User};
use super::error::ApiError;
use super::upstream::{self, Endpoint};
use super::Api;
use crate::store::Consistency;

/// How long the pod may take to answer with its headers.
const ANSWER: Duration = Duration::from_secs(60);

/// Headers that belong to one connection, not passed on (RFC 9110 §7.6.1), and the
/// client's credentials for this server.
const DROPPED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
];

/// Whether `rest` (a core path's segments after `/api/v1`) asks for the proxy; its
/// namespace, resource, `NAME[:PORT]` segment.
pub(super) fn target<'a>(rest: &[&'a str]) -> Option<(&'a str, &'a str, &'a str)> {
    match rest {
        ["namespaces", ns, kind @ ("pods" | "services"), name, "proxy", ..] => {
            Some((ns, kind, name))
        }
        _ => None,
    }
}

/// `[SCHEME:]NAME[:PORT]`.
fn split(segment: &str) -> (&str, &str, &str) {
    let parts: Vec<&str> = segment.split(':').collect();
    match parts.as_slice() {
        [name] => ("", name, ""),
        [name, port] => ("", name, port),
        [scheme, name, port, ..] => (scheme, name, port),
        [] => ("", "", ""),
    }
}

pub(super) async fn serve(
    api: &Arc<Api>,
    user: &User,
    parts: axum::http::request::Parts,
    body: Body,
    (ns, kind, segment): (&str, &str, &str),
) -> Result<Response, ApiError> {
    let attrs = Attrs {
        verb: super::method_verb(&parts.method).into(),
        group: String::new(),
        resource: kind.into(),
        subresource: "proxy".into(),
        namespace: ns.into(),
        name: segment.into(),
        path: None,
    };
    super::rest::authorize(api, user, &attrs).await?;
    let (scheme, name, port) = split(segment);
    if !matches!(scheme, "" | "http") {
        return Err(ApiError::BadRequest(format!(
            "the {scheme} scheme is not supported by this server's proxy; use http"
        )));
    }
    let to = match kind {
        "pods" => pod_endpoint(api, ns, name, port).await?,
        _ => upstream::service(api, ns, name, port)
            .await
            .map_err(ApiError::Unavailable)?,
    };
    // What follows `/proxy` in the path as sent (a trailing slash kept), and the query.
    let prefix = format!("/api/v1/namespaces/{ns}/{kind}/{segment}/proxy");
    let path = parts.uri.path();
    let tail = path.strip_prefix(prefix.as_str()).unwrap_or("");
    let tail = if tail.is_empty() { "/" } else { tail };
    let uri = match parts.uri.query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail.to_string(),
    };
    let body = super::read_body(body).await?;
    let io = upstream::connect(api, &to).await.map_err(|e| {
        ApiError::Unavailable(format!("error trying to reach {kind} \"{name}\": {e}"))
    })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| ApiError::Unavailable(format!("error trying to reach {kind}: {e}")))?;
    tokio::spawn(conn);
    let host = match &to {
        Endpoint::Pod { pod, port, .. } => format!("{pod}:{port}"),
        Endpoint::Address(ip, port) => format!("{ip}:{port}"),
    };
    let mut req = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(uri);
    for (k, v) in &parts.headers {
        if !DROPPED.contains(&k.as_str()) && *k != header::HOST {
            req = req.header(k, v);
        }
    }
    let req = req
        .header(header::HOST, host)
        .body(http_body_util::Full::new(body))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let resp = tokio::time::timeout(ANSWER, send.send_request(req))
        .await
        .map_err(|_| ApiError::Unavailable(format!("{kind} \"{name}\" did not answer")))?
        .map_err(|e| {
            ApiError::Unavailable(format!("error trying to reach {kind} \"{name}\": {e}"))
        })?;
    let (mut head, incoming) = resp.into_parts();
    for h in DROPPED {
        head.headers.remove(HeaderName::from_static(h));
    }
    if parts.method == Method::HEAD {
        return Ok(Response::from_parts(head, Body::empty()));
    }
    Ok(Response::from_parts(head, Body::new(incoming)))
}

/// The pod `name`'s port: `port` (a number, or a container port's name), else its first
/// declared container port, else 80, as kube-apiserver picks.
async fn pod_endpoint(
    api: &Arc<Api>,
    ns: &str,
    name: &str,
    port: &str,
) -> Result<Endpoint, ApiError> {
    let pods = super::resources::find("", "v1", "pods")
        .ok_or_else(|| ApiError::Internal("no pods".into()))?;
    let kv = api
        .store
        .get(&pods.key(Some(ns), name), Consistency::Serializable)
        .await?
        .ok_or_else(|| ApiError::not_found("pods", name))?;
    let pod: Value =
        serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(e.to_string()))?;
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "pod \"{name}\" is not scheduled to a node yet"
        )));
    }
    let declared = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten());
    let number = if port.is_empty() {
        declared
            .clone()
            .find_map(|p| p["containerPort"].as_u64())
            .unwrap_or(80)
    } else if let Ok(n) = port.parse::<u64>() {
        n
    } else {
        declared
            .clone()
            .find(|p| p["name"] == port)
            .and_then(|p| p["containerPort"].as_u64())
            .ok_or_else(|| {
                ApiError::BadRequest(format!("pod \"{name}\" has no port named {port:?}"))
            })?
    };
    let port = u16::try_from(number)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("invalid port {number}")))?;
    Ok(Endpoint::Pod {
        node: node.to_string(),
        pod: name.to_string(),
        namespace: ns.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths_name_their_target() {
        let segs = [
            "namespaces",
            "web",
            "services",
            "http:front:8080",
            "proxy",
            "x",
        ];
        assert_eq!(target(&segs), Some(("web", "services", "http:front:8080")));
        assert_eq!(target(&["namespaces", "web", "pods", "p"]), None);
        assert_eq!(split("http:front:8080"), ("http", "front", "8080"));
        assert_eq!(split("front:web"), ("", "front", "web"));
        assert_eq!(split("front"), ("", "front", ""));
    }
}
