//! Field ownership (`metadata.managedFields`) and server-side apply. Pure.
//!
//! A field is a path of map keys, keyed-list items (`k:{"name":"c"}`) and set members
//! (`v:"x"`); lists without a merge key are owned whole. An apply takes ownership of the
//! fields in its configuration, fails with a conflict when another manager owns one of them
//! with a different value (unless forced), and removes fields its manager applied before
//! and no longer applies. Updates (create, PUT, the other patches) take ownership of what
//! they changed without conflicts. This follows structured-merge-diff with the merge keys of
//! [`super::patch`], without its type-aware atomic maps.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::patch::set_list;

/// One step of a field path, in its fieldsV1 spelling (`f:spec`, `k:{"name":"c"}`, `v:"x"`).
pub type Field = Vec<String>;

fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    super::patch::merge_key(field, |k| items.iter().any(|i| i.get(k).is_some()))
}

/// Paths the server owns, never tracked.
fn ignored(path: &[String]) -> bool {
    match path {
        [a] => a == "f:apiVersion" || a == "f:kind" || a == "f:status",
        [m, f, ..] if m == "f:metadata" => matches!(
            f.as_str(),
            "f:name"
                | "f:namespace"
                | "f:uid"
                | "f:resourceVersion"
                | "f:generation"
                | "f:creationTimestamp"
                | "f:managedFields"
                | "f:deletionTimestamp"
                | "f:deletionGracePeriodSeconds"
                | "f:selfLink"
        ),
        [s, ..] => s == "f:status",
        _ => false,
    }
}

/// The fields set in `new` (into `out`, under path `at`; `field_name` is the key `new` is
/// under, which says how a list is merged), kept only where `old`, the value at the same
/// path in the old object, differs (all of them when there is none). A subtree the two
/// hold equal is not walked: a status update, whose spec and metadata are unchanged (and
/// whose status is never tracked), costs a comparison.
fn collect(
    old: Option<&Value>,
    new: &Value,
    field_name: &str,
    at: &mut Field,
    out: &mut BTreeSet<Field>,
) {
    if old == Some(new) {
        return;
    }
    match new {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                at.push(format!("f:{k}"));
                if !ignored(at) {
                    collect(old.and_then(|o| o.get(k)), x, k, at, out);
                }
                at.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let old_items = old.and_then(Value::as_array);
            if let Some(key) = merge_key(field_name, items) {
                for item in items {
                    let Some(kv) = item.get(key) else {
                        // The list is owned whole; it differs from the old one.
                        out.insert(at.clone());
                        return;
                    };
                    // The old item is found as `value_at` finds one: the first with the key.
                    let old_item =
                        old_items.and_then(|l| l.iter().find(|i| i.get(key) == Some(kv)));
                    at.push(format!("k:{}", json!({key: kv})));
                    if old_item != Some(item) {
                        out.insert(at.clone());
                        collect(old_item, item, "", at, out);
                    }
                    at.pop();
                }
            } else if set_list(field_name) {
                for item in items {
                    if !old_items.is_some_and(|l| l.contains(item)) {
                        at.push(format!("v:{item}"));
                        out.insert(at.clone());
                        at.pop();
                    }
                }
            } else {
                out.insert(at.clone());
            }
        }
        _ => {
            out.insert(at.clone());
        }
    }
}

/// The fields of `new` whose values differ from those at the same paths in `old` (or that
/// `old` lacks).
pub fn changed_fields(old: &Value, new: &Value) -> BTreeSet<Field> {
    let mut out = BTreeSet::new();
    collect(Some(old), new, "", &mut Vec::new(), &mut out);
    out
}

/// Every field set in `v`.
pub fn fields(v: &Value) -> BTreeSet<Field> {
    let mut out = BTreeSet::new();
    collect(None, v, "", &mut Vec::new(), &mut out);
    out
}

/// The value at `path` in `v`, if any.
pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for step in path {
        if let Some(k) = step.strip_prefix("f:") {
            cur = cur.get(k)?;
        } else if let Some(k) = step.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)))?;
        } else if let Some(x) = step.strip_prefix("v:") {
            let want: Value = serde_json::from_str(x).ok()?;
            cur = cur.as_array()?.iter().find(|i| **i == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Remove the value at `path` from `v`.
pub fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for step in parent {
        let next = if let Some(k) = step.strip_prefix("f:") {
            cur.get_mut(k)
        } else if let Some(k) = step.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(k) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(k);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(key), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            cur.as_array_mut(),
        ) {
            a.retain(|i| !key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)));
        }
    } else if let Some(x) = last.strip_prefix("v:") {
        if let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(x), cur.as_array_mut()) {
            a.retain(|i| *i != want);
        }
    }
}

/// A field set in the fieldsV1 form.
pub fn to_v1(set: &BTreeSet<Field>) -> Value {
    fn insert(m: &mut Map<String, Value>, path: &[String], keyed: bool) {
        match path.split_first() {
            None => {
                if keyed {
                    m.insert(".".into(), json!({}));
                }
            }
            Some((step, rest)) => {
                if let Value::Object(child) = m.entry(step.clone()).or_insert_with(|| json!({})) {
                    insert(child, rest, keyed);
                }
            }
        }
    }
    let mut root = Map::new();
    for path in set {
        insert(
            &mut root,
            path,
            path.last().is_some_and(|s| s.starts_with("k:")),
        );
    }
    Value::Object(root)
}

/// A fieldsV1 value back to a set of paths.
pub fn from_v1(v: &Value) -> BTreeSet<Field> {
    fn walk(v: &Value, at: &mut Field, out: &mut BTreeSet<Field>) {
        let Some(m) = v.as_object() else { return };
        let leaf = m.is_empty() || (m.len() == 1 && m.contains_key("."));
        if (leaf || m.contains_key(".")) && !at.is_empty() {
            out.insert(at.clone());
        }
        for (k, x) in m {
            if k == "." {
                continue;
            }
            at.push(k.clone());
            walk(x, at, out);
            at.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: BTreeSet<Field>,
}

pub fn entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(entry)
        .collect()
}

fn entry(e: &Value) -> Entry {
    Entry {
        manager: e["manager"].as_str().unwrap_or("").into(),
        operation: e["operation"].as_str().unwrap_or("Update").into(),
        api_version: e["apiVersion"].as_str().unwrap_or("").into(),
        time: e["time"].as_str().unwrap_or("").into(),
        subresource: e["subresource"].as_str().unwrap_or("").into(),
        fields: from_v1(&e["fieldsV1"]),
    }
}

fn entry_json(e: &Entry) -> Value {
    let mut o = json!({"manager": e.manager, "operation": e.operation,
        "apiVersion": e.api_version, "time": e.time, "fieldsType": "FieldsV1",
        "fieldsV1": to_v1(&e.fields)});
    if !e.subresource.is_empty() {
        o["subresource"] = json!(e.subresource);
    }
    o
}

pub fn store_entries(obj: &mut Value, es: &[Entry]) {
    let list: Vec<Value> = es
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(entry_json)
        .collect();
    put_entries(obj, list);
}

fn put_entries(obj: &mut Value, list: Vec<Value>) {
    if let Some(m) = obj["metadata"].as_object_mut() {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Record an update by `manager`: it owns what changed from `old` to `new`.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: &str,
    now: &str,
) {
    // The entries are `new`'s: those it came with (a request that rewrites managedFields
    // itself, as kubectl's client-side to server-side apply migration does, gets what it
    // wrote), or the stored ones it carries unchanged. Only the entries this update changes
    // are written out again; the rest stay as they came.
    let mut raw = match new["metadata"].get_mut("managedFields").map(Value::take) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    let mut es: Vec<Entry> = raw.iter().map(entry).collect();
    let mut touched = vec![false; es.len()];
    let changed: BTreeSet<Field> = match old {
        Some(o) => changed_fields(o, new),
        None => fields(new),
    };
    if !changed.is_empty() {
        for (e, t) in es.iter_mut().zip(touched.iter_mut()) {
            let before = e.fields.len();
            e.fields.retain(|f| !changed.contains(f));
            *t = e.fields.len() != before;
        }
        let mine = es.iter().position(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        });
        match mine {
            Some(i) => {
                es[i].fields.extend(changed);
                es[i].time = now.into();
                touched[i] = true;
            }
            None => {
                es.push(Entry {
                    manager: manager.into(),
                    operation: "Update".into(),
                    api_version: api_version.into(),
                    time: now.into(),
                    subresource: subresource.into(),
                    fields: changed,
                });
                touched.push(true);
                raw.push(Value::Null);
            }
        }
    }
    let list = es
        .iter()
        .zip(raw)
        .zip(touched)
        .filter(|((e, _), _)| !e.fields.is_empty())
        .map(|((e, r), t)| if t { entry_json(e) } else { r })
        .collect();
    put_entries(new, list);
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
}

/// `.spec.containers[name="c"].image`, as kubectl prints conflicts.
pub fn display(path: &[String]) -> String {
    let mut s = String::new();
    for step in path {
        if let Some(k) = step.strip_prefix("f:") {
            s.push('.');
            s.push_str(k);
        } else if let Some(k) = step.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(a, b)| format!("{a}={b}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = step.strip_prefix("v:") {
            s.push_str(&format!("[{v}]"));
        }
    }
    s
}

/// The annotation in which kubectl's client-side apply keeps what it applied last.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// `live`'s last client-side apply, if it has one.
fn last_applied(live: &Value) -> Option<Value> {
    let text = live["metadata"]["annotations"][LAST_APPLIED].as_str()?;
    serde_json::from_str(text).ok()
}

/// Server-side apply of `config` by `manager` onto `live`. Returns the new object, whose
/// managedFields are updated, or the conflicts.
///
/// kubectl's own server-side apply (manager `kubectl`) upgrades an object it applied
/// client-side, as kube-apiserver lets it: conflicts on fields that still hold what the
/// last-applied annotation says are taken over rather than refused (one another hand has
/// changed since is a conflict), and the annotation is kept up to date, so that a later
/// client-side apply still knows what was applied.
pub fn apply(
    live: &Value,
    config: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut es = entries(live);
    let applied = fields(config);
    let mut conflicts = Vec::new();
    let mut contested: BTreeSet<Field> = BTreeSet::new();
    let upgrade = if manager == "kubectl" {
        last_applied(live)
    } else {
        None
    };
    for e in es.iter().filter(|e| e.manager != manager) {
        for f in e.fields.intersection(&applied) {
            let (a, b) = (value_at(live, f), value_at(config, f));
            let differs = match (a, b) {
                (Some(Value::Object(_)), Some(Value::Object(_))) => false,
                (Some(Value::Array(_)), Some(Value::Array(_)))
                    if f.last().is_some_and(|s| s.starts_with("k:")) =>
                {
                    false
                }
                _ => a != b,
            };
            if differs {
                contested.insert(f.clone());
                if !upgrade
                    .as_ref()
                    .is_some_and(|u| a.is_none() || value_at(u, f) == a)
                {
                    conflicts.push(Conflict {
                        manager: e.manager.clone(),
                        api_version: e.api_version.clone(),
                        field: display(f),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let before: BTreeSet<Field> = es
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply")
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut out = live.clone();
    let mut patch = config.clone();
    if let Some(m) = patch["metadata"].as_object_mut() {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    // Apply configurations merge like a strategic patch without deletions.
    let _ = super::patch::strategic(&mut out, &patch);
    for e in es.iter_mut().filter(|e| e.manager != manager) {
        e.fields.retain(|f| !contested.contains(f));
    }
    let others: BTreeSet<Field> = es
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply"))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let dropped: Vec<&Field> = before
        .iter()
        .filter(|f| !applied.contains(*f) && !others.contains(*f))
        .filter(|f| !applied.iter().any(|a| a.starts_with(f)))
        .collect();
    // A field goes whole, with what is under it, when no other manager owns anything there;
    // an item another manager still has a hand in keeps its key fields, which name it.
    let whole = |f: &Field| !others.iter().any(|o| o.len() > f.len() && o.starts_with(f));
    let names_item = |f: &Field| match f.as_slice() {
        [.., item, last] => item.strip_prefix("k:").is_some_and(|k| {
            serde_json::from_str::<Map<String, Value>>(k)
                .is_ok_and(|key| last.strip_prefix("f:").is_some_and(|n| key.contains_key(n)))
        }),
        _ => false,
    };
    let mut gone: Vec<&Field> = dropped
        .iter()
        .copied()
        .filter(|f| whole(f) && !names_item(f))
        .filter(|f| {
            !dropped
                .iter()
                .any(|g| g.len() < f.len() && f.starts_with(g) && whole(g))
        })
        .collect();
    // Deepest first, so an item goes before the list that held it.
    gone.sort_by_key(|f| std::cmp::Reverse(f.len()));
    for f in gone {
        remove_at(&mut out, f);
    }
    if upgrade.is_some() {
        // `get_mut`, not indexing, which would add a null `annotations` to either.
        let mut last = patch.clone();
        if let Some(a) = last
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
            .and_then(Value::as_object_mut)
        {
            a.remove(LAST_APPLIED);
        }
        if let Some(a) = out
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
            .and_then(Value::as_object_mut)
        {
            a.insert(LAST_APPLIED.into(), Value::String(last.to_string()));
        }
    }
    match es
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Apply")
    {
        Some(e) => {
            e.fields = applied;
            e.time = now.into();
            e.api_version = api_version.into();
        }
        None => es.push(Entry {
            manager: manager.into(),
            operation: "Apply".into(),
            api_version: api_version.into(),
            time: now.into(),
            subresource: String::new(),
            fields: applied,
        }),
    }
    store_entries(&mut out, &es);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    #[test]
    fn fields_v1_round_trip() {
        let f = fields(&deploy(2, "x"));
        assert!(f.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        let v1 = to_v1(&f);
        assert_eq!(
            v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["."],
            json!({})
        );
        assert_eq!(from_v1(&v1), f);
    }

    #[test]
    fn apply_conflicts_and_force() {
        let now = "2026-01-01T00:00:00Z";
        let live = apply(
            &json!({"metadata": {"name": "d"}}),
            &deploy(2, "x"),
            "a",
            "apps/v1",
            false,
            now,
        )
        .unwrap();
        assert_eq!(live["spec"]["replicas"], 2);
        // Same value from another manager is shared ownership, not a conflict.
        let shared = apply(&live, &deploy(2, "x"), "b", "apps/v1", false, now).unwrap();
        assert_eq!(entries(&shared).len(), 2);
        let err = apply(&live, &deploy(3, "x"), "b", "apps/v1", false, now).unwrap_err();
        assert_eq!(err[0].field, ".spec.replicas");
        assert_eq!(err[0].manager, "a");
        let forced = apply(&live, &deploy(3, "x"), "b", "apps/v1", true, now).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        // Manager a no longer owns replicas; it may now drop it without removing it.
        let mut smaller = deploy(3, "x");
        smaller["spec"].as_object_mut().unwrap().remove("replicas");
        smaller["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels");
        let after = apply(&forced, &smaller, "a", "apps/v1", false, now).unwrap();
        assert_eq!(after["spec"]["replicas"], 3);
        // b still applies the label, so it stays.
        assert_eq!(after["metadata"]["labels"]["a"], "1");
        // A field only its own applier held goes when that applier stops sending it.
        let alone = apply(
            &json!({"metadata": {"name": "d"}}),
            &deploy(1, "x"),
            "a",
            "apps/v1",
            false,
            now,
        )
        .unwrap();
        let dropped = apply(&alone, &smaller, "a", "apps/v1", false, now).unwrap();
        assert!(
            dropped["metadata"]["labels"].get("a").is_none(),
            "{dropped}"
        );
    }

    #[test]
    fn changed_fields_are_the_fields_whose_values_changed() {
        let slow = |old: &Value, new: &Value| -> BTreeSet<Field> {
            fields(new)
                .into_iter()
                .filter(|f| value_at(old, f) != value_at(new, f))
                .collect()
        };
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "1"}, "finalizers": ["x", "y"],
                "annotations": {}},
            "spec": {"nodeName": "", "containers": [
                {"name": "c", "image": "i", "env": [{"name": "E", "value": "1"}],
                 "args": ["a", "b"], "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                {"name": "d", "image": "j"}],
                "volumes": [{"name": "v", "emptyDir": {}}], "tolerations": [{"key": "k"}]},
            "status": {"phase": "Pending"}});
        let edits: Vec<fn(&mut Value)> = vec![
            |_| {},
            |p| p["status"] = json!({"phase": "Running", "podIP": "10.0.0.1"}),
            |p| p["spec"]["nodeName"] = json!("n"),
            |p| p["spec"]["containers"][0]["image"] = json!("i2"),
            |p| p["spec"]["containers"][0]["env"][0]["value"] = json!("2"),
            |p| p["spec"]["containers"][0]["args"] = json!(["a"]),
            |p| p["spec"]["containers"].as_array_mut().unwrap().reverse(),
            |p| {
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "e"}))
            },
            |p| {
                p["spec"]["containers"].as_array_mut().unwrap().remove(0);
            },
            |p| p["metadata"]["labels"]["b"] = json!("2"),
            |p| p["metadata"]["finalizers"] = json!(["y", "z"]),
            |p| p["metadata"]["annotations"] = json!({"n": "1"}),
            |p| p["spec"]["volumes"][0]["emptyDir"] = json!({"medium": "Memory"}),
            |p| p["spec"]["tolerations"] = json!([{"key": "k", "effect": "NoSchedule"}]),
            |p| p["spec"]["containers"] = json!("not a list"),
            |p| p["spec"]["extra"] = json!({"deep": {"x": [1, 2]}}),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut new = pod.clone();
            edit(&mut new);
            assert_eq!(changed_fields(&pod, &new), slow(&pod, &new), "edit {i}");
            assert_eq!(
                changed_fields(&new, &pod),
                slow(&new, &pod),
                "edit {i}, undone"
            );
        }
        assert!(changed_fields(&pod, &pod).is_empty());
    }

    #[test]
    fn kubectl_takes_over_what_it_applied_client_side() {
        let now = "t";
        // Client-side apply: an update by kubectl-client-side-apply that records the config.
        let mut v = deploy(1, "x");
        v["metadata"]["annotations"] = json!({LAST_APPLIED: deploy(1, "x").to_string()});
        record_update(
            None,
            &mut v,
            "kubectl-client-side-apply",
            "apps/v1",
            "",
            now,
        );
        // Scaled by another hand: replicas is no longer what kubectl applied.
        let old = v.clone();
        let mut scaled = v.clone();
        scaled["spec"]["template"] = json!({"x": 1});
        record_update(Some(&old), &mut scaled, "kubectl-edit", "apps/v1", "", now);
        // kubectl's server-side apply takes the fields of its last client-side apply over.
        let up = apply(&scaled, &deploy(2, "y"), "kubectl", "apps/v1", false, now).unwrap();
        assert_eq!(up["spec"]["replicas"], 2);
        let last: Value = serde_json::from_str(
            up["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            last["spec"]["replicas"], 2,
            "the annotation follows: {last}"
        );
        // What was applied, and nothing it did not hold (`deploy` has no annotations).
        assert!(last["metadata"].get("annotations").is_none(), "{last}");
        // Another manager, or a field kubectl never applied, still conflicts.
        let err = apply(&scaled, &deploy(2, "y"), "other", "apps/v1", false, now).unwrap_err();
        assert!(err.iter().any(|c| c.field == ".spec.replicas"), "{err:?}");
        let mut more = deploy(2, "y");
        more["spec"]["template"] = json!({"x": 2});
        let err = apply(&scaled, &more, "kubectl", "apps/v1", false, now).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].field, ".spec.template.x");
        assert_eq!(err[0].manager, "kubectl-edit");
    }

    #[test]
    fn an_item_no_longer_applied_goes_whole() {
        let now = "t";
        let two = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"template": {"spec": {"containers": [
                {"name": "c1", "image": "a", "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}]},
                {"name": "c2", "image": "b"}]}}}});
        let live = apply(
            &json!({"metadata": {"name": "d"}}),
            &two,
            "m",
            "apps/v1",
            false,
            now,
        )
        .unwrap();
        let mut one = two.clone();
        one["spec"]["template"]["spec"]["containers"] =
            json!([{"name": "c1", "image": "a", "env": [{"name": "E1", "value": "1"}]}]);
        let out = apply(&live, &one, "m", "apps/v1", false, now).unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            one["spec"]["template"]["spec"]["containers"]
        );
        // An item another manager also has a hand in keeps that, and the key naming it.
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][1]["args"] = json!(["x"]);
        record_update(Some(&live), &mut edited, "editor", "apps/v1", "", now);
        let out = apply(&edited, &one, "m", "apps/v1", false, now).unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][1],
            json!({"name": "c2", "args": ["x"]})
        );
    }

    #[test]
    fn a_value_changed_since_the_last_client_side_apply_conflicts() {
        let now = "t";
        let cm = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": v}});
        let mut v = cm("a");
        v["metadata"]["annotations"] = json!({LAST_APPLIED: cm("a").to_string()});
        record_update(None, &mut v, "kubectl-client-side-apply", "v1", "", now);
        let old = v.clone();
        let mut patched = v.clone();
        patched["data"]["k"] = json!("zzz");
        record_update(Some(&old), &mut patched, "kubectl-patch", "v1", "", now);
        let err = apply(&patched, &cm("b"), "kubectl", "v1", false, now).unwrap_err();
        assert_eq!(err[0].field, ".data.k");
        assert_eq!(err[0].manager, "kubectl-patch");
        // Unchanged since: taken over.
        assert!(apply(&v, &cm("b"), "kubectl", "v1", false, now).is_ok());
    }

    #[test]
    fn updates_take_ownership() {
        let now = "t";
        let mut v = deploy(1, "x");
        record_update(None, &mut v, "kubectl-create", "apps/v1", "", now);
        let old = v.clone();
        let mut new = v.clone();
        new["spec"]["replicas"] = json!(5);
        record_update(
            Some(&old),
            &mut new,
            "kubectl-scale",
            "apps/v1",
            "scale",
            now,
        );
        let es = entries(&new);
        let scale = es.iter().find(|e| e.manager == "kubectl-scale").unwrap();
        assert_eq!(scale.fields.len(), 1);
        let err = apply(&new, &deploy(2, "x"), "kubectl", "apps/v1", false, now).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].manager, "kubectl-scale");
    }
}
