//! OpenAPI v3 documents, one per group/version, built from k8s-openapi's JSON schemas, and
//! the strict field check (`fieldValidation=Strict`) that walks a body against them.
//!
//! The PATCH operations deliberately do not list the strategic-merge content type: kubectl
//! would then compute apply patches from these schemas, which lack the patch-merge-key
//! extensions; without it kubectl uses the Go types compiled into it, which have them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::resources::{self, groups, RESOURCES};

pub struct Doc {
    pub hash: String,
    pub body: Vec<u8>,
    /// The component schemas, for the strict field check.
    pub schemas: Map<String, Value>,
}

/// The path segment of a group/version: `api/v1` or `apis/apps/v1`.
pub fn gv_path(g: &str, v: &str) -> String {
    if g.is_empty() {
        format!("api/{v}")
    } else {
        format!("apis/{g}/{v}")
    }
}

fn operation(r: &resources::Resource, verb: &str, kind_body: bool) -> Value {
    let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
    let mut op = json!({
        "operationId": format!("{verb}{}", r.kind),
        "x-kubernetes-action": verb,
        "x-kubernetes-group-version-kind": gvk,
        "parameters": [
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "OK"}},
    });
    if kind_body {
        let schema = json!({"$ref": format!("#/components/schemas/{}",
            resources::schema_name(r.group, r.kind).unwrap_or_default())});
        op["requestBody"] =
            json!({"content": {"application/json": {"schema": schema}}, "required": true});
    }
    op
}

fn build(g: &str, v: &str) -> Doc {
    let mut generator = SchemaSettings::openapi3()
        .with(|s| s.meta_schema = None)
        .into_generator();
    let mut paths = Map::new();
    let mut gvks: BTreeMap<String, Value> = BTreeMap::new();
    for r in RESOURCES.iter().filter(|r| r.group == g && r.version == v) {
        let _ = resources::schema(r.group, r.kind, &mut generator);
        if let Some(n) = resources::schema_name(r.group, r.kind) {
            gvks.insert(
                n,
                json!([{"group": r.group, "version": r.version, "kind": r.kind}]),
            );
        }
        let base = if r.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(g, v), r.plural)
        } else {
            format!("/{}/{}", gv_path(g, v), r.plural)
        };
        if !r.stored {
            paths.insert(base, json!({"post": operation(r, "post", true)}));
            continue;
        }
        let mut patch = operation(r, "patch", false);
        patch["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }, "required": true});
        paths.insert(
            base.clone(),
            json!({"get": operation(r, "list", false), "post": operation(r, "post", true),
                   "delete": operation(r, "deletecollection", false)}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": operation(r, "get", false), "put": operation(r, "put", true),
                   "patch": patch, "delete": operation(r, "delete", false)}),
        );
    }
    let mut schemas = generator.take_definitions(true);
    for (name, gvk) in gvks {
        if let Some(Value::Object(s)) = schemas.get_mut(&name) {
            s.insert("x-kubernetes-group-version-kind".into(), gvk);
        }
    }
    let doc = json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas.clone()},
    });
    let body = serde_json::to_vec(&doc).unwrap_or_default();
    let digest = Sha256::digest(&body);
    let hash: String = digest[..16].iter().map(|b| format!("{b:02X}")).collect();
    Doc {
        hash,
        body,
        schemas,
    }
}

fn docs() -> &'static BTreeMap<String, Doc> {
    static DOCS: OnceLock<BTreeMap<String, Doc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        groups()
            .into_iter()
            .map(|(g, v)| (gv_path(g, v), build(g, v)))
            .collect()
    })
}

/// The `/openapi/v3` root.
pub fn root() -> Value {
    let paths: Map<String, Value> = docs()
        .iter()
        .map(|(p, d)| {
            (
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", d.hash)}),
            )
        })
        .collect();
    json!({"paths": paths})
}

/// The document for `api/v1` or `apis/{g}/{v}`.
pub fn doc(path: &str) -> Option<&'static Doc> {
    docs().get(path)
}

fn resolve<'a>(schemas: &'a Map<String, Value>, mut s: &'a Value) -> &'a Value {
    for _ in 0..8 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or("");
            match schemas.get(name) {
                Some(t) => s = t,
                None => return s,
            }
        } else if let Some(Value::Array(all)) = s.get("allOf") {
            match all.first() {
                Some(first) => s = first,
                None => return s,
            }
        } else {
            return s;
        }
    }
    s
}

fn walk(schemas: &Map<String, Value>, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(schemas, schema);
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (k, x) in m {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    match props.get(k) {
                        Some(ps) => walk(schemas, ps, x, &path, out),
                        None => out.push(path),
                    }
                }
            } else if let Some(ap) = schema.get("additionalProperties") {
                if ap.is_object() {
                    for (k, x) in m {
                        walk(schemas, ap, x, &format!("{at}[{k}]"), out);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for (i, x) in items.iter().enumerate() {
                    walk(schemas, is, x, &format!("{at}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Fields of `v` that its kind's schema does not know, as `spec.template.foo` paths.
pub fn unknown_fields(group: &str, version: &str, kind: &str, v: &Value) -> Vec<String> {
    let Some(doc) = doc(&gv_path(group, version)) else {
        return vec![];
    };
    let Some(name) = resources::schema_name(group, kind) else {
        return vec![];
    };
    let Some(schema) = doc.schemas.get(&name) else {
        return vec![];
    };
    let mut out = Vec::new();
    walk(&doc.schemas, schema, v, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_carry_gvk_and_find_unknown_fields() {
        let root = root();
        assert!(root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/openapi/v3/apis/apps/v1?hash="));
        let d = doc("apis/apps/v1").unwrap();
        let dep = &d.schemas["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            dep["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let v = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"a": "b"}},
            "spec": {"replicas": 1, "foo": 1, "template": {"spec": {"containers": [
                {"name": "c", "image": "i", "imagePolicy": "x", "resources": {"limits": {"cpu": "1"}}}]}}}});
        assert_eq!(
            unknown_fields("apps", "v1", "Deployment", &v),
            ["spec.foo", "spec.template.spec.containers[0].imagePolicy"]
        );
    }
}
