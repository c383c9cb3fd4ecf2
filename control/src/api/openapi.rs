//! OpenAPI v3 documents, one per group/version, built from k8s-openapi's JSON schemas, and
//! the strict field check (`fieldValidation=Strict`) that walks a body against them.
//!
//! The PATCH operations deliberately do not list the strategic-merge content type: kubectl
//! would then compute apply patches from these schemas, which lack the patch-merge-key
//! extensions; without it kubectl uses the Go types compiled into it, which have them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

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
    let name = kind_body.then(|| resources::schema_name(r.group, r.kind).unwrap_or_default());
    operation_of(r, r.version, verb, name.as_deref())
}

/// An operation on `r` served as `version`, its body of schema `body` if it takes one.
fn operation_of(r: &resources::Resource, version: &str, verb: &str, body: Option<&str>) -> Value {
    let gvk = json!({"group": r.group, "version": version, "kind": r.kind});
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
    if let Some(name) = body {
        let schema = json!({"$ref": format!("#/components/schemas/{name}")});
        op["requestBody"] =
            json!({"content": {"application/json": {"schema": schema}}, "required": true});
    }
    op
}

/// A PATCH operation with the patch types it takes (not strategic merge: see above).
fn patch_op(mut op: Value) -> Value {
    op["requestBody"] = json!({"content": {
        "application/json-patch+json": {"schema": {"type": "object"}},
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "application/apply-patch+yaml": {"schema": {"type": "object"}},
    }, "required": true});
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
        if r.live() {
            paths.insert(base.clone(), json!({"get": operation(r, "list", false)}));
            paths.insert(
                format!("{base}/{{name}}"),
                json!({"get": operation(r, "get", false)}),
            );
            continue;
        }
        if !r.stored {
            paths.insert(base, json!({"post": operation(r, "post", true)}));
            continue;
        }
        let patch = patch_op(operation(r, "patch", false));
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
    finish(paths, schemas)
}

fn finish(paths: Map<String, Value>, schemas: Map<String, Value>) -> Doc {
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

/// Documents by path (`apis/apps/v1`).
type Docs = BTreeMap<String, Arc<Doc>>;

fn docs() -> &'static Docs {
    static DOCS: OnceLock<Docs> = OnceLock::new();
    DOCS.get_or_init(|| {
        groups()
            .into_iter()
            .map(|(g, v)| (gv_path(g, v), Arc::new(build(g, v))))
            .collect()
    })
}

/// The schema name of a custom kind, as Kubernetes names it (`com.example.v1.Widget`).
fn custom_schema_name(group: &str, version: &str, kind: &str) -> String {
    let rev: Vec<&str> = group.split('.').rev().collect();
    format!("{}.{version}.{kind}", rev.join("."))
}

/// The document of a CRDs' group/version: their paths, and each kind's schema as its CRD
/// gives it (what `kubectl explain` reads).
fn build_custom(g: &str, v: &str) -> Doc {
    let mut generator = SchemaSettings::openapi3()
        .with(|s| s.meta_schema = None)
        .into_generator();
    let meta =
        generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>();
    let meta = serde_json::to_value(&meta).unwrap_or_default();
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for c in super::crd::served_in(g, v) {
        let r = c.res;
        let name = custom_schema_name(g, v, r.kind);
        let mut schema = c
            .schemas
            .get(v)
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": g, "version": v, "kind": r.kind}]);
        // The fields every object has, as Kubernetes publishes them for a CRD's kind.
        if let Some(props) = schema
            .as_object_mut()
            .map(|m| m.entry("properties").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
        {
            props.entry("apiVersion").or_insert_with(|| {
                json!({"type": "string", "description": "The group and version of this object's schema."})
            });
            props.entry("kind").or_insert_with(
                || json!({"type": "string", "description": "The kind of object this is."}),
            );
            props.insert(
                "metadata".into(),
                json!({"allOf": [meta], "description": "The object's metadata: its name, namespace, labels, annotations, owners."}),
            );
        }
        schemas.insert(name.clone(), schema);
        let base = if r.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(g, v), r.plural)
        } else {
            format!("/{}/{}", gv_path(g, v), r.plural)
        };
        let op = |verb: &str, body: bool| operation_of(r, v, verb, body.then_some(name.as_str()));
        let patch = patch_op(op("patch", false));
        paths.insert(
            base.clone(),
            json!({"get": op("list", false), "post": op("post", true),
                   "delete": op("deletecollection", false)}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get", false), "put": op("put", true),
                   "patch": patch, "delete": op("delete", false)}),
        );
    }
    schemas.extend(generator.take_definitions(true));
    finish(paths, schemas)
}

/// The CRDs' documents, made again whenever the CRDs served change.
fn custom_docs() -> Docs {
    static CACHE: Mutex<Option<(u64, Docs)>> = Mutex::new(None);
    let generation = super::crd::generation();
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, docs)) = c.as_ref().filter(|(g, _)| *g == generation) {
        return docs.clone();
    }
    let docs: Docs = super::crd::groups()
        .into_iter()
        .flat_map(|(g, vs)| vs.into_iter().map(move |v| (g, v)))
        .map(|(g, v)| (gv_path(g, v), Arc::new(build_custom(g, v))))
        .collect();
    *c = Some((generation, docs.clone()));
    docs
}

/// The `/openapi/v3` root.
pub fn root() -> Value {
    let paths: Map<String, Value> = docs()
        .iter()
        .map(|(p, d)| (p.clone(), d.clone()))
        .chain(custom_docs())
        .map(|(p, d)| {
            let url = json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", d.hash)});
            (p, url)
        })
        .collect();
    json!({"paths": paths})
}

/// The document for `api/v1` or `apis/{g}/{v}`.
pub fn doc(path: &str) -> Option<Arc<Doc>> {
    docs()
        .get(path)
        .cloned()
        .or_else(|| custom_docs().get(path).cloned())
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

/// One step of the way to a value: a field, a list index or a map entry.
enum Step<'a> {
    Field(&'a str),
    Index(usize),
    Entry(&'a str),
}

/// The way from the object's root, as a linked list up the stack: the path is only spelled
/// out for a field that is dropped.
struct Way<'a> {
    up: Option<&'a Way<'a>>,
    step: Step<'a>,
}

fn spell(way: Option<&Way<'_>>, last: &str) -> String {
    let mut steps: Vec<String> = vec![last.to_string()];
    let mut cur = way;
    while let Some(w) = cur {
        steps.push(match w.step {
            Step::Field(k) => format!(".{k}"),
            Step::Index(i) => format!("[{i}]"),
            Step::Entry(k) => format!("[{k}]"),
        });
        cur = w.up;
    }
    steps.reverse();
    let out = steps.concat();
    out.strip_prefix('.').map(String::from).unwrap_or(out)
}

fn prune_walk(
    schemas: &Map<String, Value>,
    schema: &Value,
    v: &mut Value,
    way: Option<&Way<'_>>,
    out: &mut Vec<String>,
) {
    let schema = resolve(schemas, schema);
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                let unknown: Vec<String> = m
                    .keys()
                    .filter(|k| !props.contains_key(k.as_str()))
                    .cloned()
                    .collect();
                for k in unknown {
                    out.push(spell(way, &format!(".{k}")));
                    m.remove(&k);
                }
                for (k, x) in m.iter_mut() {
                    if let Some(ps) = props.get(k) {
                        let w = Way {
                            up: way,
                            step: Step::Field(k),
                        };
                        prune_walk(schemas, ps, x, Some(&w), out);
                    }
                }
            } else if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, x) in m.iter_mut() {
                    let w = Way {
                        up: way,
                        step: Step::Entry(k),
                    };
                    prune_walk(schemas, ap, x, Some(&w), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for (i, x) in items.iter_mut().enumerate() {
                    let w = Way {
                        up: way,
                        step: Step::Index(i),
                    };
                    prune_walk(schemas, is, x, Some(&w), out);
                }
            }
        }
        _ => {}
    }
}

/// Drop the fields of `v` that its kind's schema does not know, as decoding into
/// kube-apiserver's types drops them; their paths (`spec.template.foo`) come back.
pub fn prune_unknown(group: &str, version: &str, kind: &str, v: &mut Value) -> Vec<String> {
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
    prune_walk(&doc.schemas, schema, v, None, &mut out);
    out
}

/// Fields of `v` that its kind's schema does not know, as `spec.template.foo` paths.
pub fn unknown_fields(group: &str, version: &str, kind: &str, v: &Value) -> Vec<String> {
    prune_unknown(group, version, kind, &mut v.clone())
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
        let mut pruned = v.clone();
        let dropped = prune_unknown("apps", "v1", "Deployment", &mut pruned);
        assert_eq!(dropped, unknown_fields("apps", "v1", "Deployment", &v));
        assert!(pruned["spec"].get("foo").is_none());
        assert!(pruned["spec"]["template"]["spec"]["containers"][0]
            .get("imagePolicy")
            .is_none());
        assert_eq!(
            pruned["metadata"]["labels"]["a"], "b",
            "maps keep their entries"
        );
        assert!(prune_unknown("apps", "v1", "Deployment", &mut pruned).is_empty());
    }
}

/// OpenAPI v2 (swagger 2.0), for kubectl 1.27 and 1.28, which read only v2, and for tools
/// that read `/openapi/v2`. The JSON form carries the definitions; the protobuf form
/// (gnostic's `openapi.v2.Document`, which those kubectl versions ask for) carries the paths
/// with their group-version-kind and parameters, which is what kubectl checks to learn that
/// the server validates fields itself; without definitions kubectl falls back to the
/// types compiled into it for apply patches.
pub mod v2 {
    use std::sync::OnceLock;

    use schemars::generate::SchemaSettings;
    use serde_json::{json, Map, Value};

    use super::super::resources::{self, RESOURCES};
    use super::gv_path;

    /// What the Kubernetes API server answers with (clients ask with `@v1.0`, which Go's MIME
    /// parser refuses in a Content-Type).
    pub const PROTO_TYPE: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

    /// (path, method, resource) of every operation.
    fn operations() -> Vec<(String, &'static str, &'static resources::Resource)> {
        let mut out = Vec::new();
        for r in RESOURCES {
            let base = if r.namespaced {
                format!(
                    "/{}/namespaces/{{namespace}}/{}",
                    gv_path(r.group, r.version),
                    r.plural
                )
            } else {
                format!("/{}/{}", gv_path(r.group, r.version), r.plural)
            };
            if r.live() {
                out.push((base.clone(), "get", r));
                out.push((format!("{base}/{{name}}"), "get", r));
                continue;
            }
            out.push((base.clone(), "post", r));
            if r.stored {
                out.push((base.clone(), "get", r));
                for m in ["get", "put", "patch", "delete"] {
                    out.push((format!("{base}/{{name}}"), m, r));
                }
            }
        }
        out
    }

    const PARAMS: [&str; 3] = ["dryRun", "fieldManager", "fieldValidation"];

    pub fn json_doc() -> &'static [u8] {
        static DOC: OnceLock<Vec<u8>> = OnceLock::new();
        DOC.get_or_init(|| {
            let mut generator = SchemaSettings::openapi3()
                .with(|s| {
                    s.meta_schema = None;
                    s.definitions_path = "/definitions".into();
                })
                .into_generator();
            let mut paths: Map<String, Value> = Map::new();
            for (path, method, r) in operations() {
                let _ = resources::schema(r.group, r.kind, &mut generator);
                let params: Vec<Value> = PARAMS
                    .iter()
                    .map(|p| json!({"name": p, "in": "query", "type": "string", "uniqueItems": true}))
                    .collect();
                let op = json!({
                    "operationId": format!("{method}{}", r.kind),
                    "x-kubernetes-action": method,
                    "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                    "parameters": params,
                    "responses": {"200": {"description": "OK"}},
                });
                if let Value::Object(item) = paths.entry(path).or_insert_with(|| json!({})) {
                    item.insert(method.into(), op);
                }
            }
            let mut defs = generator.take_definitions(true);
            for r in RESOURCES {
                if let Some(Value::Object(s)) = resources::schema_name(r.group, r.kind).and_then(|n| defs.get_mut(&n)) {
                    s.insert(
                        "x-kubernetes-group-version-kind".into(),
                        json!([{"group": r.group, "version": r.version, "kind": r.kind}]),
                    );
                }
            }
            let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
                             "paths": paths, "definitions": defs});
            serde_json::to_vec(&doc).unwrap_or_default()
        })
    }

    use super::super::proto::put_bytes as field;

    fn named_any(name: &str, yaml: &str) -> Vec<u8> {
        let mut any = Vec::new();
        field(&mut any, 2, yaml.as_bytes()); // Any.yaml
        let mut out = Vec::new();
        field(&mut out, 1, name.as_bytes());
        field(&mut out, 2, &any);
        out
    }

    fn query_param(name: &str) -> Vec<u8> {
        let mut q = Vec::new(); // QueryParameterSubSchema
        field(&mut q, 2, b"query");
        field(&mut q, 4, name.as_bytes());
        field(&mut q, 6, b"string");
        let mut nb = Vec::new(); // NonBodyParameter.query_parameter_sub_schema
        field(&mut nb, 3, &q);
        let mut p = Vec::new(); // Parameter.non_body_parameter
        field(&mut p, 2, &nb);
        let mut item = Vec::new(); // ParametersItem.parameter
        field(&mut item, 1, &p);
        item
    }

    fn operation(method: &str, r: &resources::Resource) -> Vec<u8> {
        let mut op = Vec::new();
        field(&mut op, 5, format!("{method}{}", r.kind).as_bytes());
        for p in PARAMS {
            field(&mut op, 8, &query_param(p));
        }
        let mut resp = Vec::new(); // Response.description
        field(&mut resp, 1, b"OK");
        let mut rv = Vec::new(); // ResponseValue.response
        field(&mut rv, 1, &resp);
        let mut named = Vec::new();
        field(&mut named, 1, b"200");
        field(&mut named, 2, &rv);
        let mut responses = Vec::new();
        field(&mut responses, 1, &named);
        field(&mut op, 9, &responses);
        let group = if r.group.is_empty() { "\"\"" } else { r.group };
        let gvk = format!("group: {group}\nkind: {}\nversion: {}\n", r.kind, r.version);
        field(
            &mut op,
            13,
            &named_any("x-kubernetes-group-version-kind", &gvk),
        );
        field(&mut op, 13, &named_any("x-kubernetes-action", method));
        op
    }

    /// The gnostic protobuf form.
    pub fn proto_doc() -> &'static [u8] {
        static DOC: OnceLock<Vec<u8>> = OnceLock::new();
        DOC.get_or_init(|| {
            type Ops = Vec<(&'static str, Vec<u8>)>;
            let mut items: Vec<(String, Ops)> = Vec::new();
            for (path, method, r) in operations() {
                let op = operation(method, r);
                match items.iter_mut().find(|(p, _)| *p == path) {
                    Some((_, ops)) => ops.push((method, op)),
                    None => items.push((path, vec![(method, op)])),
                }
            }
            let mut paths = Vec::new();
            for (path, ops) in items {
                let mut item = Vec::new(); // PathItem
                for (method, op) in ops {
                    let tag = match method {
                        "get" => 2,
                        "put" => 3,
                        "post" => 4,
                        "delete" => 5,
                        _ => 8,
                    };
                    field(&mut item, tag, &op);
                }
                let mut named = Vec::new(); // NamedPathItem
                field(&mut named, 1, path.as_bytes());
                field(&mut named, 2, &item);
                field(&mut paths, 2, &named);
            }
            let mut info = Vec::new();
            field(&mut info, 1, b"Kubernetes");
            field(&mut info, 2, b"v1.32.0");
            let mut doc = Vec::new();
            field(&mut doc, 1, b"2.0");
            field(&mut doc, 2, &info);
            field(&mut doc, 8, &paths);
            doc
        })
    }
}
