//! ControllerRevisions: the template history of DaemonSets and StatefulSets, which
//! `kubectl rollout history` lists and `kubectl rollout undo` patches back from.
//!
//! Each template an owner has had is one ControllerRevision named `OWNER-HASH` (the hash the
//! pods carry), owned by it, labelled like its pods, with `data` the strategic merge patch
//! that restores the template and `revision` a number that grows with each change; a template
//! brought back (an undo) gets the next number again. Beyond `revisionHistoryLimit` (10)
//! the oldest revisions no pod runs any more go.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::deployment::template_hash;

const HASH: &str = "controller-revision-hash";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// What to do with one owner's ControllerRevisions.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Option<Value>,
    /// A revision to renumber: (its name, its new `revision`).
    pub renumber: Option<(String, i64)>,
    pub delete: Vec<String>,
}

/// The value the owner's pods carry in `controller-revision-hash` for its template now: the
/// hash for a DaemonSet, `NAME-HASH` for a StatefulSet (as in Kubernetes).
pub fn pod_hash(owner: &Value) -> String {
    let hash = template_hash(&owner["spec"]["template"]);
    if owner["kind"] == "StatefulSet" {
        format!(
            "{}-{hash}",
            owner["metadata"]["name"].as_str().unwrap_or("")
        )
    } else {
        hash
    }
}

/// Plan the history of `owner` (a DaemonSet or StatefulSet) given the ControllerRevisions it
/// owns and the `controller-revision-hash` values its live pods carry.
pub fn plan(owner: &Value, revisions: &[&Value], in_use: &BTreeSet<String>) -> Plan {
    let owner_name = owner["metadata"]["name"].as_str().unwrap_or("");
    let hash = template_hash(&owner["spec"]["template"]);
    let name = format!("{owner_name}-{hash}");
    let number = |r: &Value| r["revision"].as_i64().unwrap_or(0);
    let top = revisions.iter().map(|r| number(r)).max().unwrap_or(0);
    let mut plan = Plan::default();
    let mine = revisions
        .iter()
        .find(|r| r["metadata"]["name"] == name.as_str());
    match mine {
        None => {
            let mut template = owner["spec"]["template"].clone();
            template["$patch"] = json!("replace");
            let mut labels = owner["spec"]["template"]["metadata"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            labels[HASH] = json!(pod_hash(owner));
            let mut meta = json!({
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": labels,
                "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                    "name": owner_name, "uid": owner["metadata"]["uid"],
                    "controller": true, "blockOwnerDeletion": true}],
            });
            if let Some(cause) = owner["metadata"]["annotations"][CHANGE_CAUSE].as_str() {
                meta["annotations"] = json!({CHANGE_CAUSE: cause});
            }
            plan.create = Some(json!({
                "apiVersion": "apps/v1", "kind": "ControllerRevision", "metadata": meta,
                "data": {"spec": {"template": template}}, "revision": top + 1,
            }));
        }
        Some(r) if number(r) < top => plan.renumber = Some((name.clone(), top + 1)),
        Some(_) => {}
    }
    // Oldest first, beyond the limit, keeping the current one and those pods still run.
    let limit = owner["spec"]["revisionHistoryLimit"].as_u64().unwrap_or(10) as usize;
    let mut old: Vec<&Value> = revisions
        .iter()
        .copied()
        .filter(|r| {
            let n = r["metadata"]["name"].as_str().unwrap_or("");
            let carried = r["metadata"]["labels"][HASH].as_str().unwrap_or("");
            n != name && !in_use.contains(carried)
        })
        .collect();
    old.sort_by_key(|r| number(r));
    let excess = old.len().saturating_sub(limit);
    plan.delete = old[..excess]
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str().map(String::from))
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default", "uid": "ds-1",
                "annotations": {CHANGE_CAUSE: "kubectl set image"}},
            "spec": {"revisionHistoryLimit": 1, "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "a", "image": image}]}}}})
    }

    fn made(owner: &Value, revisions: &[&Value]) -> Value {
        plan(owner, revisions, &BTreeSet::new()).create.unwrap()
    }

    #[test]
    fn each_template_is_one_numbered_revision() {
        let v1 = ds("module:one");
        let r1 = made(&v1, &[]);
        let hash = template_hash(&v1["spec"]["template"]);
        assert_eq!(r1["metadata"]["name"], format!("agent-{hash}"));
        assert_eq!(r1["revision"], 1);
        assert_eq!(r1["metadata"]["labels"]["app"], "agent");
        assert_eq!(r1["metadata"]["labels"][HASH], hash);
        assert_eq!(r1["metadata"]["ownerReferences"][0]["uid"], "ds-1");
        assert_eq!(
            r1["metadata"]["annotations"][CHANGE_CAUSE],
            "kubectl set image"
        );
        assert_eq!(r1["data"]["spec"]["template"]["$patch"], "replace");
        assert_eq!(
            r1["data"]["spec"]["template"]["spec"]["containers"][0]["image"],
            "module:one"
        );
        // Nothing more while the template stays.
        assert_eq!(plan(&v1, &[&r1], &BTreeSet::new()), Plan::default());
        // A new template is revision 2; back to the first, that one becomes 3.
        let v2 = ds("module:two");
        let r2 = made(&v2, &[&r1]);
        assert_eq!(r2["revision"], 2);
        let p = plan(&v1, &[&r1, &r2], &BTreeSet::new());
        assert_eq!(p.renumber, Some((format!("agent-{hash}"), 3)));
        // A StatefulSet's pods carry NAME-HASH.
        let mut sts = ds("module:one");
        sts["kind"] = json!("StatefulSet");
        assert_eq!(
            made(&sts, &[])["metadata"]["labels"][HASH],
            format!("agent-{hash}")
        );
    }

    #[test]
    fn old_revisions_go_beyond_the_limit_unless_pods_run_them() {
        let (v1, v2, v3) = (ds("module:one"), ds("module:two"), ds("module:three"));
        let r1 = made(&v1, &[]);
        let r2 = made(&v2, &[&r1]);
        let r3 = made(&v3, &[&r1, &r2]);
        // Limit 1: of the two old ones, the older goes.
        let p = plan(&v3, &[&r1, &r2, &r3], &BTreeSet::new());
        assert_eq!(
            p.delete,
            vec![r1["metadata"]["name"].as_str().unwrap().to_string()]
        );
        // Unless a pod still runs it.
        let running: BTreeSet<String> =
            [r1["metadata"]["labels"][HASH].as_str().unwrap().to_string()].into();
        assert!(plan(&v3, &[&r1, &r2, &r3], &running).delete.is_empty());
    }
}
