//! Reaching a pod's port from the API server: through the link of the pod's node (a
//! port-forward stream, so pods on nodes behind NAT are reached), or directly for a Service
//! endpoint that is no pod. Admission webhooks and the pods and services proxy use it.

use std::sync::Arc;

use outpost_api::link::{Down, ForwardRequest};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Api;
use crate::store::Consistency;

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// A pod's port, through its node's link.
    Pod {
        node: String,
        pod: String,
        namespace: String,
        port: u16,
    },
    /// An address the API server dials itself.
    Address(String, u16),
}

/// A byte stream both ways.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A ready endpoint of Service `ns/name` for its port `port`: a port number or name, or the
/// first port when empty. One is picked at random among the ready ones.
pub async fn service(api: &Arc<Api>, ns: &str, name: &str, port: &str) -> Result<Endpoint, String> {
    let no_svc = || format!("services \"{name}\" not found");
    let svcs = super::resources::find("", "v1", "services").ok_or_else(no_svc)?;
    let kv = api
        .store
        .get(&svcs.key(Some(ns), name), Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(no_svc)?;
    let svc: Value = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
    let sp = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            port.is_empty()
                || p["name"].as_str() == Some(port)
                || p["port"].as_u64().is_some_and(|n| n.to_string() == port)
        })
        .ok_or_else(|| format!("no service port {port:?} found for service \"{name}\""))?;
    let port_name = sp["name"].as_str().unwrap_or("");
    let slices = super::resources::find("discovery.k8s.io", "v1", "endpointslices")
        .ok_or("no EndpointSlices")?;
    let page = api
        .store
        .range(&slices.prefix(Some(ns)), None, 0, Consistency::Serializable)
        .await
        .map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    for kv in &page.kvs {
        let Ok(s) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        if s["metadata"]["labels"]["kubernetes.io/service-name"] != name {
            continue;
        }
        let Some(target) = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().unwrap_or("") == port_name)
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == false {
                continue;
            }
            let r = &e["targetRef"];
            let node = e["nodeName"].as_str().filter(|n| !n.is_empty());
            found.push(match (r["kind"].as_str(), r["name"].as_str(), node) {
                (Some("Pod"), Some(pod), Some(node)) => Endpoint::Pod {
                    node: node.to_string(),
                    pod: pod.to_string(),
                    // The Service's namespace, whatever the slice says: a slice may not
                    // lead the API server's calls into another namespace's pod.
                    namespace: ns.to_string(),
                    port: target,
                },
                _ => match e["addresses"][0].as_str() {
                    Some(ip) => Endpoint::Address(ip.to_string(), target),
                    None => continue,
                },
            });
        }
    }
    if found.is_empty() {
        return Err(format!("no endpoints available for service \"{name}\""));
    }
    let i = rand::random::<u32>() as usize % found.len();
    Ok(found.swap_remove(i))
}

/// How long a direct dial may take.
const DIAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the API server may dial `ip` for a client: not its own loopback, nor link-local,
/// unspecified or multicast addresses, as kube-apiserver's proxy refuses them (a Service's
/// endpoint would otherwise reach the member's own admin interface).
pub fn dialable(ip: std::net::IpAddr) -> bool {
    let link_local = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local)
}

/// Open a connection to `e`.
pub async fn connect(api: &Arc<Api>, e: &Endpoint) -> Result<Box<dyn Io>, String> {
    match e {
        Endpoint::Pod {
            node,
            pod,
            namespace,
            port,
        } => {
            let req = Down::PortForward(ForwardRequest {
                namespace: namespace.clone(),
                pod: pod.clone(),
                port: *port,
            });
            let (head, send, mut recv) = api.links.open_duplex(node, &req).await?;
            if head.status != 200 {
                let msg = recv.read_to_end(64 << 10).await.unwrap_or_default();
                return Err(format!(
                    "pod {pod} on node {node}: {}",
                    String::from_utf8_lossy(&msg).trim()
                ));
            }
            Ok(Box::new(tokio::io::join(recv, send)))
        }
        Endpoint::Address(ip, port) => {
            // An address, never a name to look up; and one the API server may reach.
            let addr: std::net::IpAddr = ip
                .parse()
                .map_err(|_| format!("address {ip:?} is not an IP address"))?;
            if !dialable(addr) {
                return Err(format!("address {ip} is not permitted"));
            }
            let tcp = tokio::time::timeout(DIAL, tokio::net::TcpStream::connect((addr, *port)))
                .await
                .map_err(|_| format!("dial tcp {ip}:{port}: i/o timeout"))?
                .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))?;
            Ok(Box::new(tcp))
        }
    }
}
