//! The endpoints controllers' decisions: which pods back a Service, at which ports, as the
//! `subsets` of its Endpoints and as EndpointSlices.
//!
//! A pod backs a Service when the Service's selector matches its labels, it is bound and has
//! an IP, and it has not finished. Ready pods are addresses; unready ones are
//! `notReadyAddresses` (or addresses, with `publishNotReadyAddresses`). Terminating pods stay
//! out of Endpoints but appear in slices with `terminating: true`, as in Kubernetes. A named
//! `targetPort` is looked up in each pod's containers, so pods that name the port differently
//! land in different subsets; a pod that lacks it is left out of that port.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::replicaset::ready;

/// Endpoints per slice, as the EndpointSlice controller's default.
pub const SLICE_MAX: usize = 100;
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGER: &str = "endpointslice-controller.k8s.io";
/// Set on the Endpoints this controller writes; an Endpoints that has it and whose Service is
/// gone is deleted.
pub const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Whether the controller keeps endpoints for `svc`: it selects pods and is not an
/// ExternalName.
pub fn managed(svc: &Value) -> bool {
    svc["spec"]["selector"]
        .as_object()
        .is_some_and(|s| !s.is_empty())
        && svc["spec"]["type"] != "ExternalName"
}

/// Whether `svc`'s selector matches `pod`'s labels (same namespace is the caller's part).
pub fn selects(svc: &Value, pod: &Value) -> bool {
    svc["spec"]["selector"].as_object().is_some_and(|s| {
        !s.is_empty()
            && s.iter()
                .all(|(k, v)| pod["metadata"]["labels"][k.as_str()] == *v)
    })
}

/// What a Service's endpoints should hold.
#[derive(Debug, Default, PartialEq)]
pub struct Want {
    /// The Endpoints' `subsets`.
    pub subsets: Vec<Value>,
    /// Each slice's `endpoints` and `ports`.
    pub slices: Vec<(Vec<Value>, Vec<Value>)>,
}

/// The port `sp` (a Service port) reaches on `pod`, if the pod has it.
pub(crate) fn target(sp: &Value, pod: &Value) -> Option<i64> {
    match &sp["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => match name.parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => pod["spec"]["containers"]
                .as_array()?
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_i64()),
        },
        _ => sp["port"].as_i64(),
    }
}

/// Plan for `svc` over the pods of its namespace.
pub fn plan(svc: &Value, pods: &[&Value]) -> Want {
    let publish = svc["spec"]["publishNotReadyAddresses"] == true;
    let svc_ports: Vec<&Value> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    // Pods grouped by the ports they serve: (ready, not ready, slice endpoints).
    type Group = (Vec<Value>, Vec<Value>, Vec<Value>);
    let mut groups: BTreeMap<String, (Vec<Value>, Group)> = BTreeMap::new();
    let mut chosen: Vec<&Value> = pods
        .iter()
        .copied()
        .filter(|p| {
            selects(svc, p)
                && !p["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
                && !p["status"]["podIP"].as_str().unwrap_or("").is_empty()
                && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
        })
        .collect();
    chosen.sort_by_key(|p| {
        (
            p["status"]["podIP"].as_str().unwrap_or("").to_string(),
            p["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    });
    for p in chosen {
        let ports: Vec<Value> = svc_ports
            .iter()
            .filter_map(|sp| {
                let mut port = json!({"port": target(sp, p)?,
                    "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
                if let Some(n) = sp["name"].as_str().filter(|n| !n.is_empty()) {
                    port["name"] = json!(n);
                }
                if let Some(a) = sp["appProtocol"].as_str() {
                    port["appProtocol"] = json!(a);
                }
                Some(port)
            })
            .collect();
        if ports.is_empty() && !svc_ports.is_empty() {
            continue;
        }
        let m = &p["metadata"];
        let ip = p["status"]["podIP"].clone();
        let node = p["spec"]["nodeName"].clone();
        let target_ref =
            json!({"kind": "Pod", "namespace": m["namespace"], "name": m["name"], "uid": m["uid"]});
        let terminating = !m["deletionTimestamp"].is_null();
        let is_ready = ready(p) && !terminating;
        let mut addr = json!({"ip": ip, "nodeName": node, "targetRef": target_ref});
        if let Some(h) = p["spec"]["hostname"].as_str() {
            if p["spec"]["subdomain"] == svc["metadata"]["name"] {
                addr["hostname"] = json!(h);
            }
        }
        let key = serde_json::to_string(&ports).unwrap_or_default();
        let (_, (up, down, slice)) = groups
            .entry(key)
            .or_insert_with(|| (ports, Default::default()));
        let mut ep = json!({"addresses": [ip],
            "conditions": {"ready": is_ready || (publish && !terminating),
                "serving": ready(p) || publish, "terminating": terminating},
            "nodeName": node, "targetRef": target_ref});
        if let Some(h) = addr.get("hostname") {
            ep["hostname"] = h.clone();
        }
        slice.push(ep);
        if terminating && !publish {
            continue;
        }
        if is_ready || publish {
            up.push(addr);
        } else {
            down.push(addr);
        }
    }
    let mut want = Want::default();
    for (ports, (up, down, slice)) in groups.into_values() {
        if !up.is_empty() || !down.is_empty() {
            let mut s = json!({"ports": ports});
            if !up.is_empty() {
                s["addresses"] = json!(up);
            }
            if !down.is_empty() {
                s["notReadyAddresses"] = json!(down);
            }
            want.subsets.push(s);
        }
        for chunk in slice.chunks(SLICE_MAX) {
            want.slices.push((chunk.to_vec(), named(&ports)));
        }
    }
    if want.slices.is_empty() {
        // An empty slice still says the Service has no endpoints, as Kubernetes keeps one.
        let ports: Vec<Value> = svc_ports
            .iter()
            .map(|sp| {
                let mut port = json!({"port": sp["targetPort"].as_i64().or(sp["port"].as_i64()),
                    "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
                if let Some(n) = sp["name"].as_str().filter(|n| !n.is_empty()) {
                    port["name"] = json!(n);
                }
                port
            })
            .collect();
        want.slices.push((vec![], named(&ports)));
    }
    want
}

/// A slice's ports always carry a name, empty for a Service's one unnamed port, as the
/// EndpointSlice controller writes them (`kubectl describe service` reads it unchecked).
fn named(ports: &[Value]) -> Vec<Value> {
    ports
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if p.get("name").is_none() {
                p["name"] = json!("");
            }
            p
        })
        .collect()
}

/// A new EndpointSlice for `svc` holding `endpoints` at `ports`.
pub fn slice_for(svc: &Value, endpoints: &[Value], ports: &[Value]) -> Value {
    let m = &svc["metadata"];
    let name = m["name"].as_str().unwrap_or("");
    let mut labels = m["labels"].as_object().cloned().unwrap_or_default();
    labels.insert(SERVICE_NAME.into(), json!(name));
    labels.insert(MANAGED_BY.into(), json!(MANAGER));
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"generateName": format!("{name}-"), "namespace": m["namespace"],
            "labels": labels,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                "uid": m["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4", "endpoints": endpoints, "ports": ports})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(target: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "s1"},
               "spec": {"selector": {"app": "web"}, "ports": [
                   {"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
    }

    fn pod(name: &str, ip: &str, ready: bool, port: Option<(&str, i64)>) -> Value {
        let ports = port.map_or(json!([]), |(n, p)| json!([{"name": n, "containerPort": p}]));
        json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"),
                   "labels": {"app": "web"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
               "status": {"phase": "Running", "podIP": ip, "conditions": [
                   {"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn ready_and_unready_pods_split() {
        let (a, b) = (
            pod("a", "10.0.0.2", true, None),
            pod("b", "10.0.0.1", false, None),
        );
        let mut other = pod("c", "10.0.0.3", true, None);
        other["metadata"]["labels"]["app"] = json!("db");
        let mut unbound = pod("d", "", true, None);
        unbound["spec"]["nodeName"] = json!("");
        let w = plan(&svc(json!(8080)), &[&a, &b, &other, &unbound]);
        assert_eq!(w.subsets.len(), 1);
        let s = &w.subsets[0];
        assert_eq!(s["addresses"][0]["ip"], "10.0.0.2");
        assert_eq!(s["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(s["notReadyAddresses"][0]["ip"], "10.0.0.1");
        assert_eq!(
            s["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        assert_eq!(w.slices.len(), 1);
        let (eps, ports) = &w.slices[0];
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0]["addresses"][0], "10.0.0.1", "sorted by address");
        assert_eq!(eps[0]["conditions"]["ready"], false);
        assert_eq!(eps[1]["conditions"]["ready"], true);
        assert_eq!(ports[0]["port"], 8080);
    }

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let a = pod("a", "10.0.0.1", true, Some(("web", 8080)));
        let b = pod("b", "10.0.0.2", true, Some(("web", 9090)));
        let none = pod("c", "10.0.0.3", true, None);
        let w = plan(&svc(json!("web")), &[&a, &b, &none]);
        let ports: Vec<i64> = w
            .subsets
            .iter()
            .map(|s| s["ports"][0]["port"].as_i64().unwrap())
            .collect();
        assert_eq!(
            ports,
            [8080, 9090],
            "one subset per port set, the portless pod left out"
        );
        assert_eq!(w.slices.len(), 2);
    }

    #[test]
    fn terminating_pods_leave_endpoints_but_stay_in_slices() {
        let mut a = pod("a", "10.0.0.1", true, None);
        a["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let w = plan(&svc(json!(80)), &[&a]);
        assert!(w.subsets.is_empty());
        let ep = &w.slices[0].0[0];
        assert_eq!(
            ep["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        let mut publish = svc(json!(80));
        publish["spec"]["publishNotReadyAddresses"] = json!(true);
        let b = pod("b", "10.0.0.2", false, None);
        assert_eq!(
            plan(&publish, &[&b]).subsets[0]["addresses"][0]["ip"],
            "10.0.0.2"
        );
    }

    #[test]
    fn no_pods_leave_one_empty_slice_and_big_services_split() {
        let w = plan(&svc(json!(80)), &[]);
        assert!(w.subsets.is_empty());
        assert_eq!(w.slices.len(), 1);
        assert!(w.slices[0].0.is_empty());
        let many: Vec<Value> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.0.{}.{}", i / 200, i % 200),
                    true,
                    None,
                )
            })
            .collect();
        let w = plan(&svc(json!(80)), &many.iter().collect::<Vec<_>>());
        let sizes: Vec<usize> = w.slices.iter().map(|s| s.0.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let s = slice_for(&svc(json!(80)), &w.slices[0].0, &w.slices[0].1);
        assert_eq!(s["metadata"]["labels"][SERVICE_NAME], "web");
        assert_eq!(s["metadata"]["ownerReferences"][0]["uid"], "s1");
        assert_eq!(s["addressType"], "IPv4");
    }

    #[test]
    fn selectorless_and_external_services_are_left_alone() {
        let mut s = svc(json!(80));
        assert!(managed(&s));
        s["spec"]["selector"] = json!({});
        assert!(!managed(&s));
        let mut e = svc(json!(80));
        e["spec"]["type"] = json!("ExternalName");
        assert!(!managed(&e));
    }
}
