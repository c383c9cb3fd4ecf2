//! Discovery: `/version`, aggregated discovery (`apidiscovery.k8s.io` v2 and v2beta1) and
//! the legacy `APIVersions` / `APIGroupList` / `APIResourceList` forms.

use serde_json::{json, Value};

use super::resources::{group_version, groups, Resource, RESOURCES};
use super::{convert, crd};

/// The Kubernetes version we answer to ([`outpost_api::KUBE_MINOR`]).
pub fn version() -> Value {
    let minor = outpost_api::KUBE_MINOR;
    json!({
        "major": "1", "minor": minor.to_string(), "gitVersion": format!("v1.{minor}.0-outpost"),
        "gitCommit": env!("CARGO_PKG_VERSION"), "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.4", "compiler": "gc",
        "platform": format!("linux/{}", match std::env::consts::ARCH {
            "x86_64" => "amd64", "aarch64" => "arm64", other => other,
        }),
    })
}

/// Which aggregated form the `Accept` header asks for, if any.
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    let asks = |v: &str| {
        accept.split(',').any(|part| {
            part.contains("g=apidiscovery.k8s.io")
                && part.contains("as=APIGroupDiscoveryList")
                && part.split(';').any(|p| p.trim() == format!("v={v}"))
        })
    };
    if asks("v2") {
        Some("v2")
    } else if asks("v2beta1") {
        Some("v2beta1")
    } else {
        None
    }
}

pub fn content_type(v: &str) -> String {
    format!("application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList")
}

fn scope(r: &Resource) -> &'static str {
    if r.namespaced {
        "Namespaced"
    } else {
        "Cluster"
    }
}

fn aggregated_resource(r: &Resource) -> Value {
    let subs: Vec<Value> = r
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k) = s.response_kind(r);
            json!({"subresource": s.name(), "responseKind": {"group": g, "version": v, "kind": k},
                   "verbs": s.verbs()})
        })
        .collect();
    let mut o = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": scope(r), "singularResource": r.singular, "verbs": r.verbs(),
    });
    if !r.short.is_empty() {
        o["shortNames"] = json!(r.short);
    }
    if !r.categories.is_empty() {
        o["categories"] = json!(r.categories);
    }
    if !subs.is_empty() {
        o["subresources"] = Value::Array(subs);
    }
    o
}

/// `/api` (`core` true) or `/apis` as an `APIGroupDiscoveryList`.
pub fn aggregated(core: bool, version: &str) -> Value {
    let items: Vec<Value> = groups()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, v)| {
            let mut versions = Vec::new();
            for (served, stored) in std::iter::once((v, v))
                .chain(convert::older_versions(g).into_iter().map(|o| (o, v)))
            {
                let resources: Vec<Value> = RESOURCES
                    .iter()
                    .filter(|r| r.group == g && r.version == stored)
                    .filter(|r| served == stored || convert::serves(g, served, r.plural))
                    .map(|r| {
                        let mut o = aggregated_resource(r);
                        if served != stored {
                            o["responseKind"]["version"] = json!(served);
                        }
                        o
                    })
                    .collect();
                versions.push(
                    json!({"version": served, "resources": resources, "freshness": "Current"}),
                );
            }
            json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
        })
        .chain(crd::groups().into_iter().filter(|_| !core).map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = crd::served_in(g, v)
                        .iter()
                        .map(|c| {
                            let mut o = aggregated_resource(c.res);
                            o["responseKind"]["version"] = json!(v);
                            o
                        })
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
        }))
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": format!("apidiscovery.k8s.io/{version}"),
           "metadata": {}, "items": items})
}

/// Legacy `/api`.
pub fn api_versions(server: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]})
}

fn api_group(g: &str, v: &str) -> Value {
    let vs: Vec<&str> = std::iter::once(v)
        .chain(convert::older_versions(g))
        .collect();
    api_group_of(g, &vs)
}

/// A group with `versions`, the preferred first.
fn api_group_of(g: &str, versions: &[&str]) -> Value {
    let gv = |v: &str| json!({"groupVersion": group_version(g, v), "version": v});
    let list: Vec<Value> = versions.iter().map(|v| gv(v)).collect();
    json!({"name": g, "versions": list,
           "preferredVersion": versions.first().map_or(Value::Null, |v| gv(v))})
}

/// Legacy `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| api_group(g, v))
        .chain(crd::groups().iter().map(|(g, vs)| api_group_of(g, vs)))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Legacy `/apis/{group}`.
pub fn group(name: &str) -> Option<Value> {
    groups()
        .into_iter()
        .find(|(g, _)| *g == name && !g.is_empty())
        .map(|(g, v)| api_group(g, v))
        .or_else(|| {
            crd::groups()
                .into_iter()
                .find(|(g, _)| *g == name)
                .map(|(g, vs)| api_group_of(g, &vs))
        })
        .map(|mut o| {
            o["kind"] = json!("APIGroup");
            o["apiVersion"] = json!("v1");
            o
        })
}

/// Legacy `/api/v1` or `/apis/{group}/{version}`.
pub fn resource_list(g: &str, v: &str) -> Option<Value> {
    let mut out = Vec::new();
    let stored = convert::stored(g, v).unwrap_or(v);
    let custom: Vec<&'static Resource> = crd::served_in(g, v).iter().map(|c| c.res).collect();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == g && r.version == stored)
        .filter(|r| stored == v || convert::serves(g, v, r.plural))
        .chain(custom)
    {
        let mut o = json!({"name": r.plural, "singularName": r.singular,
            "namespaced": r.namespaced, "kind": r.kind, "verbs": r.verbs()});
        if !r.short.is_empty() {
            o["shortNames"] = json!(r.short);
        }
        if !r.categories.is_empty() {
            o["categories"] = json!(r.categories);
        }
        out.push(o);
        for s in r.subresources {
            let (sg, sv, sk) = s.response_kind(r);
            let mut o = json!({"name": format!("{}/{}", r.plural, s.name()), "singularName": "",
                "namespaced": r.namespaced, "kind": sk, "verbs": s.verbs()});
            if (sg, sv) != (r.group, r.version) {
                o["group"] = json!(sg);
                o["version"] = json!(sv);
            }
            out.push(o);
        }
    }
    (!out.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": group_version(g, v), "resources": out})
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let k132 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(k132), Some("v2"));
        let k127 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(k127), Some("v2beta1"));
        assert_eq!(aggregated_version("application/json"), None);
    }

    #[test]
    fn every_resource_has_response_kind_and_eviction_is_cross_group() {
        let apis = aggregated(false, "v2");
        for g in apis["items"].as_array().unwrap() {
            for r in g["versions"][0]["resources"].as_array().unwrap() {
                assert!(r["responseKind"]["kind"].is_string(), "{r}");
            }
        }
        let core = resource_list("", "v1").unwrap();
        let ev = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods/eviction")
            .unwrap();
        assert_eq!(
            (ev["group"].as_str(), ev["version"].as_str()),
            (Some("policy"), Some("v1"))
        );
    }
}
