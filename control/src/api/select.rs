//! Label and field selectors: parsing the query strings and matching objects. Pure.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels(Vec<LabelReq>);

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(rest: &str) -> Option<Vec<String>> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl Labels {
    pub fn parse(s: &str) -> Result<Labels, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Labels(reqs));
        }
        for part in split_top(s) {
            let p = part.trim();
            let bad = || format!("unable to parse requirement: {p:?}");
            let req = if let Some(k) = p.strip_prefix('!') {
                LabelReq::Absent(k.trim().to_string())
            } else if let Some((k, v)) = p.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(i) = p.find(" notin ") {
                LabelReq::NotIn(
                    p[..i].trim().into(),
                    set_values(&p[i + 7..]).ok_or_else(bad)?,
                )
            } else if let Some(i) = p.find(" in ") {
                LabelReq::In(
                    p[..i].trim().into(),
                    set_values(&p[i + 4..]).ok_or_else(bad)?,
                )
            } else {
                LabelReq::Exists(p.to_string())
            };
            let key = match &req {
                LabelReq::Eq(k, _)
                | LabelReq::Ne(k, _)
                | LabelReq::In(k, _)
                | LabelReq::NotIn(k, _)
                | LabelReq::Exists(k)
                | LabelReq::Absent(k) => k,
            };
            if !valid_key(key) {
                return Err(bad());
            }
            reqs.push(req);
        }
        Ok(Labels(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Does an object with `labels` (a JSON map, or null) match?
    pub fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::Absent(k) => get(k).is_none(),
        })
    }

    /// From a `LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub fn from_selector(sel: &Value) -> Labels {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(LabelReq::Eq(k.clone(), v.as_str().unwrap_or("").into()));
            }
        }
        if let Some(es) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in es {
                let k = e["key"].as_str().unwrap_or("").to_string();
                let vs: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                reqs.push(match e["operator"].as_str() {
                    Some("In") => LabelReq::In(k, vs),
                    Some("NotIn") => LabelReq::NotIn(k, vs),
                    Some("Exists") => LabelReq::Exists(k),
                    _ => LabelReq::Absent(k),
                });
            }
        }
        Labels(reqs)
    }

    /// The selector of `owner`'s pods: a ReplicationController's `spec.selector` is a plain
    /// label map, every other kind's a LabelSelector.
    pub fn of_owner(owner: &Value) -> Labels {
        let sel = &owner["spec"]["selector"];
        if owner["kind"] != "ReplicationController" {
            return Labels::from_selector(sel);
        }
        let reqs = sel.as_object().into_iter().flatten();
        Labels(
            reqs.map(|(k, v)| LabelReq::Eq(k.clone(), v.as_str().unwrap_or("").into()))
                .collect(),
        )
    }

    /// The selector in query-string form (`a=b,c in (d)`), as Scale status and kubectl print it.
    pub fn to_query(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                LabelReq::Eq(k, v) => format!("{k}={v}"),
                LabelReq::Ne(k, v) => format!("{k}!={v}"),
                LabelReq::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                LabelReq::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                LabelReq::Exists(k) => k.clone(),
                LabelReq::Absent(k) => format!("!{k}"),
            })
            .collect();
        parts.join(",")
    }
}

/// A parsed `fieldSelector`: `path=value` and `path!=value` terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(String, bool, String)>);

/// Field paths every kind supports, plus those of `kind`.
fn supported(kind: &str, field: &str) -> bool {
    matches!(field, "metadata.name" | "metadata.namespace")
        || match kind {
            "Pod" => matches!(
                field,
                "spec.nodeName"
                    | "status.phase"
                    | "spec.restartPolicy"
                    | "spec.schedulerName"
                    | "spec.serviceAccountName"
                    | "spec.hostNetwork"
                    | "status.podIP"
                    | "status.nominatedNodeName"
            ),
            "Event" => {
                field.starts_with("involvedObject.")
                    || matches!(field, "reason" | "source" | "type" | "reportingComponent")
            }
            "Node" => field == "spec.unschedulable",
            "Secret" => field == "type",
            "Namespace" => field == "status.phase",
            "ReplicaSet" | "Job" => field == "status.replicas" || field == "status.successful",
            "ReplicationController" => field == "status.replicas",
            _ => false,
        }
}

/// Where a selectable field's value is, and what it reads as when unset: as kube-apiserver's
/// field sets, a job's `status.successful` is its `status.succeeded`, and an absent count or
/// flag is 0 or false.
fn source(field: &str) -> (&str, &'static str) {
    match field {
        "status.successful" => ("status.succeeded", "0"),
        "status.replicas" => (field, "0"),
        "spec.unschedulable" | "spec.hostNetwork" => (field, "false"),
        _ => (field, ""),
    }
}

impl Fields {
    pub fn parse(kind: &str, s: &str) -> Result<Fields, String> {
        Fields::parse_with(kind, s, &[])
    }

    /// [`Fields::parse`], with `extra` fields selectable too (a CRD's `selectableFields`).
    pub fn parse_with(kind: &str, s: &str, extra: &[String]) -> Result<Fields, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Fields(terms));
        }
        for part in s.split(',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !supported(kind, field) && !extra.iter().any(|x| x == field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(Fields(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields it reads (dotted paths).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(f, _, _)| source(f).0)
    }

    /// The name this selector pins, if it has `metadata.name=X`.
    pub fn name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| f == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let (path, unset) = source(field);
            let mut cur = obj;
            for seg in path.split('.') {
                cur = cur.get(seg).unwrap_or(&Value::Null);
            }
            let have = match cur {
                Value::String(s) => s.clone(),
                Value::Null => unset.to_string(),
                Value::Bool(b) => b.to_string(),
                other => other.to_string(),
            };
            (have == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_forms() {
        let l = json!({"app": "web", "tier": "front"});
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (web, db)", true),
            ("app notin (web,db)", false),
            ("app=web,tier=back", false),
            ("app in (db),tier", false),
            ("", true),
        ] {
            assert_eq!(Labels::parse(sel).unwrap().matches(&l), want, "{sel}");
        }
        assert!(Labels::parse("a in x").is_err());
        assert!(Labels::parse("a b=c").is_err());
    }

    #[test]
    fn fields_and_unsupported() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d"},
                         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let f = Fields::parse("Pod", "spec.nodeName=n1,status.phase!=Succeeded").unwrap();
        assert!(f.matches(&pod));
        let f = Fields::parse("Pod", "metadata.name==q").unwrap();
        assert!(!f.matches(&pod));
        let e = Fields::parse("ConfigMap", "spec.nodeName=x").unwrap_err();
        assert_eq!(e, "field label not supported: spec.nodeName");
        // An empty value matches an absent field (describe node's cluster-scoped events).
        let ev = json!({"involvedObject": {"kind": "Node"}});
        assert!(Fields::parse("Event", "involvedObject.namespace=")
            .unwrap()
            .matches(&ev));
        // Unset flags and counts read as false and 0; a Job's `successful` is `succeeded`.
        let on = |kind: &str, sel: &str, o: Value| Fields::parse(kind, sel).unwrap().matches(&o);
        assert!(on("Pod", "spec.hostNetwork=false", pod.clone()));
        assert!(on("Node", "spec.unschedulable=false", json!({"spec": {}})));
        assert!(on(
            "Job",
            "status.successful=1",
            json!({"status": {"succeeded": 1}})
        ));
        assert!(on("ReplicaSet", "status.replicas=0", json!({"status": {}})));
        let f = Fields::parse("Job", "status.successful=1").unwrap();
        assert_eq!(f.paths().collect::<Vec<_>>(), ["status.succeeded"]);
    }

    #[test]
    fn selector_object_round_trip() {
        let sel = json!({"matchLabels": {"app": "x"},
            "matchExpressions": [{"key": "t", "operator": "In", "values": ["a", "b"]}]});
        let l = Labels::from_selector(&sel);
        assert_eq!(l.to_query(), "app=x,t in (a,b)");
        assert!(l.matches(&json!({"app": "x", "t": "b"})));
        assert!(!l.matches(&json!({"app": "x"})));
    }
}
