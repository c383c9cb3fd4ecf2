//! Nodes' Leases (`kube-node-lease/NODE`), which a kubelet renews every ten seconds and
//! `kubectl describe node` shows. An Outpost node renews its lease over its link, in the
//! memory of the member it is linked to (a heartbeat is never a durable write), so these
//! Leases are not stored: a read is answered from the Node, its link record and, on the
//! member holding the link, its last renewal. A stored Lease of the same name wins; watches
//! see stored Leases only.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

use super::error::ApiError;
use super::Api;
use crate::gateway::LINK_PREFIX;
use crate::store::Consistency;
use outpost_api::store::KeyValue;

pub const NAMESPACE: &str = "kube-node-lease";

/// How long a renewal holds: the gateway calls a silent link gone after about this long.
const DURATION_SECONDS: i64 = 40;

/// Node `name`'s Lease, if it is a node that has linked.
pub async fn get(api: &Api, name: &str) -> Result<Option<Value>, ApiError> {
    let Some(node) = super::resources::find("", "v1", "nodes").map(|r| r.key(None, name)) else {
        return Ok(None);
    };
    let node = api.store.get(&node, Consistency::Linearizable).await?;
    let link = api
        .store
        .get(&format!("{LINK_PREFIX}{name}"), Consistency::Linearizable)
        .await?;
    let held = held(api);
    Ok(node.zip(link).and_then(|(n, l)| lease(&n, &l, held(name))))
}

/// Every linked node's Lease.
pub async fn list(api: &Api) -> Result<Vec<Value>, ApiError> {
    let Some(prefix) = super::resources::find("", "v1", "nodes").map(|r| r.prefix(None)) else {
        return Ok(Vec::new());
    };
    let nodes = api
        .store
        .range(&prefix, None, 0, Consistency::Linearizable)
        .await?
        .kvs;
    let links = api
        .store
        .range(LINK_PREFIX, None, 0, Consistency::Linearizable)
        .await?
        .kvs;
    let held = held(api);
    Ok(nodes
        .iter()
        .filter_map(|n| {
            let name = n.key.strip_prefix(&prefix)?;
            let key = format!("{LINK_PREFIX}{name}");
            let l = links.iter().find(|l| l.key == key)?;
            lease(n, l, held(name))
        })
        .collect())
}

/// For a node linked to this member, how long ago it last renewed.
fn held(api: &Api) -> impl Fn(&str) -> Option<Duration> {
    let here = api.links.connected();
    move |name| here.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
}

/// The Lease of `node` from its link record `link`; `renewed`, how long ago it renewed, when
/// this member holds its link.
fn lease(node: &KeyValue, link: &KeyValue, renewed: Option<Duration>) -> Option<Value> {
    let n: Value = serde_json::from_slice(&node.value).ok()?;
    let l: Value = serde_json::from_slice(&link.value).ok()?;
    let (name, uid) = (
        n["metadata"]["name"].as_str()?,
        n["metadata"]["uid"].as_str()?,
    );
    let since = jiff::Timestamp::from_second(l["since"].as_i64()?).ok()?;
    let now = jiff::Timestamp::now();
    // Renewed just now when linked elsewhere: the link is up, or its member would have said
    // it went.
    let renew = match (l["connected"].as_bool(), renewed) {
        (Some(true), Some(ago)) => now
            .checked_sub(jiff::SignedDuration::try_from(ago).ok()?)
            .ok()?,
        (Some(true), None) => now,
        _ => since,
    };
    let micro = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    // Stable across reads and members, and not the Node's own.
    let digest = sha2::Sha256::digest(format!("lease/{uid}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let lease_uid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    Some(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": lease_uid.to_string(),
            "resourceVersion": link.mod_revision.to_string(),
            "creationTimestamp": n["metadata"]["creationTimestamp"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": DURATION_SECONDS,
            "acquireTime": micro(since),
            "renewTime": micro(renew),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, v: Value, rev: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: v.to_string().into_bytes(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
        }
    }

    #[test]
    fn a_lease_says_when_its_node_last_renewed() {
        let node = kv(
            "/registry/minions/edge",
            json!({"metadata": {"name": "edge", "uid": "u-1", "creationTimestamp": "2026-12-06T10:00:00Z"}}),
            3,
        );
        let up = kv(
            "/outpost/links/edge",
            json!({"member": 1, "connected": true, "since": 1796572800}),
            7,
        );
        let here = lease(&node, &up, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(here["metadata"]["namespace"], NAMESPACE);
        assert_eq!(here["metadata"]["resourceVersion"], "7");
        assert_eq!(here["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_ne!(here["metadata"]["uid"], "u-1");
        assert_eq!(here["spec"]["holderIdentity"], "edge");
        assert_eq!(here["spec"]["acquireTime"], "2026-12-06T16:00:00.000000Z");
        let renew: jiff::Timestamp = here["spec"]["renewTime"].as_str().unwrap().parse().unwrap();
        let ago = jiff::Timestamp::now().duration_since(renew).as_secs_f64();
        assert!((4.9..30.0).contains(&ago), "{ago}");
        // The same uid on every read.
        let again = lease(&node, &up, None).unwrap();
        assert_eq!(again["metadata"]["uid"], here["metadata"]["uid"]);
        // A node whose link went renewed last when it went.
        let down = kv(
            "/outpost/links/edge",
            json!({"member": 1, "connected": false, "since": 1796572900}),
            9,
        );
        let gone = lease(&node, &down, None).unwrap();
        assert_eq!(gone["spec"]["renewTime"], "2026-12-06T16:01:40.000000Z");
    }
}
