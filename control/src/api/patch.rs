//! The patch types: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and Kubernetes
//! strategic merge patch. Pure functions over JSON values.
//!
//! Strategic merge patch merges lists by a key that depends on the field (containers by
//! `name`, container ports by `containerPort`, service ports by `port`, …), as the Go types'
//! `patchMergeKey` tags say; lists without a key are replaced whole (tolerations, taints).

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl Kind {
    pub fn from_content_type(ct: &str) -> Option<Kind> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Some(Kind::Json),
            "application/merge-patch+json" => Some(Kind::Merge),
            "application/strategic-merge-patch+json" => Some(Kind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Kind::Apply),
            _ => None,
        }
    }
}

/// Why a JSON patch failed: it is not one, or it did not apply (a failed `test`, a missing
/// path), which kube-apiserver answers differently (400, 422).
#[derive(Debug)]
pub enum JsonPatchError {
    Malformed(String),
    Failed(String),
}

impl std::fmt::Display for JsonPatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonPatchError::Malformed(e) => write!(f, "invalid JSON patch: {e}"),
            JsonPatchError::Failed(e) => f.write_str(e),
        }
    }
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| JsonPatchError::Malformed(e.to_string()))?;
    json_patch::patch(doc, &ops.0).map_err(|e| JsonPatchError::Failed(e.to_string()))
}

/// RFC 7386.
pub fn merge_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    if !patch.is_object() {
        return Err("a merge patch must be a JSON object".into());
    }
    json_patch::merge(doc, patch);
    Ok(())
}

/// How a list field merges.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ListMerge {
    Replace,
    Key(&'static str),
    Primitive,
}

/// The merge key of a list field, as the Go types' `patchMergeKey` tags say; `has` tells
/// whether the list's items carry a key (ports are keyed by containerPort in containers and
/// by port in services). Shared with field ownership ([`super::ssa`]).
pub fn merge_key(field: &str, has: impl Fn(&str) -> bool) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "schedulingGates"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" if has("containerPort") => "containerPort",
        "ports" if has("port") => "port",
        "conditions" | "addresses" => "type",
        "hostAliases" | "podIPs" | "hostIPs" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Lists of primitives merged as sets.
pub fn set_list(field: &str) -> bool {
    matches!(field, "finalizers" | "podCIDRs")
}

fn list_strategy(field: &str, patch_items: &[Value], live_items: &[Value]) -> ListMerge {
    let has = |k: &str| {
        patch_items
            .iter()
            .chain(live_items)
            .any(|i| i.get(k).is_some())
    };
    match merge_key(field, has) {
        Some(k) => ListMerge::Key(k),
        None if set_list(field) => ListMerge::Primitive,
        None => ListMerge::Replace,
    }
}

/// Remove `$`-directives from a value that is being added whole.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|i| i.get("$patch").is_none())
                .map(strip)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Apply a strategic merge patch to `doc`.
pub fn strategic(doc: &mut Value, patch: &Value) -> Result<(), String> {
    if !patch.is_object() {
        return Err("a strategic merge patch must be a JSON object".into());
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if !merge_map(doc, patch)? {
        *doc = Value::Object(Map::new());
    }
    Ok(())
}

/// Merge `patch` into the map `doc`; returns false if the patch deletes the map itself.
fn merge_map(doc: &mut Value, patch: &Value) -> Result<bool, String> {
    let pm = patch.as_object().ok_or("expected an object")?;
    match pm.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *doc = strip(patch);
            return Ok(true);
        }
        Some("delete") => return Ok(false),
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch directive {other:?}")),
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in pm {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Some(a) = v.as_array() {
                orders.push((field.to_string(), a.clone()));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = doc.get_mut(field) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let Some(dm) = doc.as_object_mut() else {
            return Err("expected an object".into());
        };
        match v {
            Value::Null => {
                dm.remove(k);
            }
            Value::Object(_) => {
                let slot = dm.entry(k.clone()).or_insert(Value::Null);
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if !merge_map(slot, v)? {
                    dm.remove(k);
                }
            }
            Value::Array(items) => {
                let live = match dm.get(k) {
                    Some(Value::Array(a)) => a.clone(),
                    _ => Vec::new(),
                };
                match list_strategy(k, items, &live) {
                    ListMerge::Replace => {
                        dm.insert(k.clone(), strip(v));
                    }
                    ListMerge::Primitive => {
                        let mut out = live;
                        for i in items {
                            if !out.contains(i) {
                                out.push(i.clone());
                            }
                        }
                        dm.insert(k.clone(), Value::Array(out));
                    }
                    ListMerge::Key(key) => {
                        let merged = merge_keyed(live, items, key)?;
                        dm.insert(k.clone(), Value::Array(merged));
                    }
                }
            }
            scalar => {
                dm.insert(k.clone(), scalar.clone());
            }
        }
    }
    for (field, order) in orders {
        if let Some(Value::Array(items)) = doc.get_mut(&field) {
            reorder(items, &order);
        }
    }
    if let Some(keep) = pm.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        if let Some(dm) = doc.as_object_mut() {
            dm.retain(|k, _| keep.contains(&k.as_str()));
        }
    }
    Ok(true)
}

fn merge_keyed(mut live: Vec<Value>, items: &[Value], key: &str) -> Result<Vec<Value>, String> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(strip)
            .collect());
    }
    for item in items {
        let Some(kv) = item.get(key) else {
            return Err(format!("the list item {item} has no merge key {key:?}"));
        };
        let pos = live.iter().position(|l| l.get(key) == Some(kv));
        match (item.get("$patch").and_then(Value::as_str), pos) {
            (Some("delete"), Some(p)) => {
                live.remove(p);
            }
            (Some("delete"), None) => {}
            (_, Some(p)) => {
                if !merge_map(&mut live[p], item)? {
                    live.remove(p);
                }
            }
            (_, None) => {
                let mut fresh = Value::Object(Map::new());
                if merge_map(&mut fresh, item)? {
                    live.push(fresh);
                }
            }
        }
    }
    Ok(live)
}

/// Put the items named in `order` first, in that order; others keep their relative order.
fn reorder(items: &mut Vec<Value>, order: &[Value]) {
    let matches = |item: &Value, o: &Value| match o {
        Value::Object(m) => m.iter().all(|(k, v)| item.get(k) == Some(v)),
        other => item == other,
    };
    let mut out = Vec::with_capacity(items.len());
    for o in order {
        if let Some(p) = items.iter().position(|i| matches(i, o)) {
            out.push(items.remove(p));
        }
    }
    out.append(items);
    *items = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kubectl_apply_patch() {
        let mut d = json!({"spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "nginx", "image": "nginx:1.25", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "x"}]},
            {"name": "side", "image": "busybox"}]}}}});
        let p = json!({"spec": {"replicas": 3, "template": {"spec": {
            "$setElementOrder/containers": [{"name": "nginx"}, {"name": "side"}],
            "containers": [{"$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
                            "env": [{"name": "A", "value": "2"}], "image": "nginx:1.27", "name": "nginx"}]}}}});
        strategic(&mut d, &p).unwrap();
        assert_eq!(d["spec"]["replicas"], 3);
        let c = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], "nginx:1.27");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "2"}, {"name": "B", "value": "x"}])
        );
        assert_eq!(c[1]["name"], "side");
    }

    #[test]
    fn directives() {
        let mut d = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}],
            "tolerations": [{"key": "x"}], "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}},
            "metadata": {"finalizers": ["f1"], "labels": {"a": "1", "b": "2"}}});
        let p = json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}],
            "tolerations": [{"key": "y"}],
            "strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
            "metadata": {"finalizers": ["f2"], "labels": {"a": null},
                         "$deleteFromPrimitiveList/finalizers": ["f1"]}});
        strategic(&mut d, &p).unwrap();
        assert_eq!(d["spec"]["containers"], json!([{"name": "b"}]));
        assert_eq!(d["spec"]["tolerations"], json!([{"key": "y"}]));
        assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(d["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(d["metadata"]["finalizers"], json!(["f2"]));
    }

    #[test]
    fn ports_by_kind_and_replace_marker() {
        let mut svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}]}});
        strategic(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .unwrap();
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 2);
        let mut c = json!({"ports": [{"containerPort": 80}]});
        strategic(
            &mut c,
            &json!({"ports": [{"$patch": "replace"}, {"containerPort": 81}]}),
        )
        .unwrap();
        assert_eq!(c["ports"], json!([{"containerPort": 81}]));
        assert!(strategic(&mut c, &json!({"env": [{"value": "no key"}]})).is_err());
        assert!(strategic(&mut c, &json!([1])).is_err());
    }

    #[test]
    fn json_and_merge() {
        let mut d = json!({"metadata": {"resourceVersion": "5", "labels": {"a": "1"}}});
        json_patch(
            &mut d,
            &json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                                   {"op": "add", "path": "/metadata/labels/b", "value": "2"}]),
        )
        .unwrap();
        assert_eq!(d["metadata"]["labels"]["b"], "2");
        assert!(json_patch(
            &mut d,
            &json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "6"}])
        )
        .is_err());
        assert!(json_patch(&mut d, &json!({"op": "x"})).is_err());
        merge_patch(&mut d, &json!({"metadata": {"labels": {"a": null}}})).unwrap();
        assert_eq!(d["metadata"]["labels"], json!({"b": "2"}));
    }
}
