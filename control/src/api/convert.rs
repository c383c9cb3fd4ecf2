//! Resources served in a shape other than the one stored, by converting requests up and
//! answers down:
//! - autoscaling/v1 HorizontalPodAutoscalers (what `kubectl autoscale` writes) over
//!   autoscaling/v2. v1 has one target, CPU utilization; converting down keeps that and drops
//!   other metrics, as the Kubernetes API server does (it also stashes them in an annotation,
//!   which this server does not).
//! - events.k8s.io/v1 Events over core/v1 Events: one set of objects, as in Kubernetes, where
//!   the two groups are two views of the same storage. The newer fields are the older ones
//!   renamed (`note` is `message`, `regarding` is `involvedObject`, …).
//!
//! A request's body (object, merge or JSON patch) is converted up, its field selector renamed,
//! and it is handled as a request for the stored resource; the objects of the answer (one, a
//! list, a Table's rows, each event of a watch) are converted down.

use serde_json::{json, Value};

use super::error::{ApiError, Cause};

/// One resource served over another's storage.
pub struct View {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    /// The stored resource's group and version (the plural is the same).
    pub stored: (&'static str, &'static str),
    /// The kind as served, and as stored.
    pub kind: &'static str,
    pub up: fn(Value) -> Value,
    pub down: fn(Value) -> Value,
    /// Top-level fields renamed: (as served, as stored). Field selectors and JSON patch
    /// paths are renamed by it; `up` and `down` may do more.
    pub renames: &'static [(&'static str, &'static str)],
    /// Checks of a created object, in the served shape, before it is converted.
    pub check: Option<fn(&Value) -> Vec<Cause>>,
}

pub static VIEWS: &[View] = &[
    View {
        group: "autoscaling",
        version: "v1",
        plural: "horizontalpodautoscalers",
        stored: ("autoscaling", "v2"),
        kind: "HorizontalPodAutoscaler",
        up: hpa_up,
        down: hpa_down,
        renames: &[],
        check: None,
    },
    View {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        stored: ("", "v1"),
        kind: "Event",
        up: event_up,
        down: event_down,
        renames: EVENT_RENAMES,
        check: Some(event_check),
    },
];

/// The view serving `plural` in `group`/`version`, if that is one.
pub fn view(group: &str, version: &str, plural: &str) -> Option<&'static View> {
    VIEWS
        .iter()
        .find(|v| v.group == group && v.version == version && v.plural == plural)
}

/// Whether `group`/`version` has views (then the resources in it are found through them).
pub fn has_views(group: &str, version: &str) -> bool {
    VIEWS
        .iter()
        .any(|v| v.group == group && v.version == version)
}

/// Views that are an older version of their own group's resource (listed in discovery as
/// that group's versions), as against another group's view of it.
fn older() -> impl Iterator<Item = &'static View> {
    VIEWS.iter().filter(|v| v.group == v.stored.0)
}

/// The stored version behind an older `version` of `group`, if it is one.
pub fn stored(group: &str, version: &str) -> Option<&'static str> {
    older()
        .find(|v| v.group == group && v.version == version)
        .map(|v| v.stored.1)
}

/// Older versions of `group`, newest first.
pub fn older_versions(group: &str) -> Vec<&'static str> {
    let mut out: Vec<&str> = older()
        .filter(|v| v.group == group)
        .map(|v| v.version)
        .collect();
    out.dedup();
    out
}

/// Whether `plural` is served in the older `version` of `group`.
pub fn serves(group: &str, version: &str, plural: &str) -> bool {
    older().any(|v| v.group == group && v.version == version && v.plural == plural)
}

impl View {
    fn api_version(&self) -> String {
        super::resources::group_version(self.group, self.version)
    }

    fn stored_api_version(&self) -> String {
        super::resources::group_version(self.stored.0, self.stored.1)
    }

    /// A request body as the stored resource's: a JSON patch's paths renamed, anything else
    /// (an object, a merge or apply patch) converted.
    pub fn body_up(&self, body: Value) -> Value {
        match body {
            Value::Array(ops) => Value::Array(
                ops.into_iter()
                    .map(|mut op| {
                        for k in ["path", "from"] {
                            if let Some(p) = op[k].as_str() {
                                op[k] = json!(self.rename_path(p, '/', true));
                            }
                        }
                        op
                    })
                    .collect(),
            ),
            v => {
                let mut v = (self.up)(v);
                // A view that is another version of the same kind (a CRD's) changes nothing
                // but the version.
                if v["apiVersion"] == self.api_version().as_str() {
                    v["apiVersion"] = json!(self.stored_api_version());
                }
                v
            }
        }
    }

    /// A stored object in the served shape.
    fn down(&self, o: Value) -> Value {
        let mut o = (self.down)(o);
        if o["apiVersion"] == self.stored_api_version().as_str() {
            o["apiVersion"] = json!(self.api_version());
        }
        o
    }

    /// `path` (its segments split by `sep`, led by one when `lead`) with its first segment
    /// renamed to the stored name.
    fn rename_path(&self, path: &str, sep: char, lead: bool) -> String {
        let body = if lead {
            path.strip_prefix(sep).unwrap_or(path)
        } else {
            path
        };
        let (first, rest) = match body.find(sep) {
            Some(i) => body.split_at(i),
            None => (body, ""),
        };
        let first = self
            .renames
            .iter()
            .find(|(served, _)| *served == first)
            .map_or(first, |(_, stored)| stored);
        format!(
            "{}{first}{rest}",
            if lead { sep.to_string() } else { String::new() }
        )
    }

    /// A field selector in the stored names. Names only the stored shape has are refused
    /// as unknown, as they would be by a server storing this shape.
    pub fn selector_up(&self, sel: &str) -> Result<String, ApiError> {
        let mut out = Vec::new();
        for term in sel.split(',').filter(|t| !t.trim().is_empty()) {
            let i = term.find(['=', '!']).unwrap_or(term.len());
            let (field, rest) = term.split_at(i);
            let field = field.trim();
            let first = field.split('.').next().unwrap_or("");
            if self.renames.iter().any(|(_, stored)| *stored == first) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {field}"
                )));
            }
            out.push(format!("{}{rest}", self.rename_path(field, '.', false)));
        }
        Ok(out.join(","))
    }

    /// An answer's JSON body in the served shape: an object, a list of them, a Table's rows;
    /// anything else (a Status) as it is.
    pub fn answer_down(&self, mut body: Value) -> Value {
        let stored_av = self.stored_api_version();
        let kind = body["kind"].as_str().unwrap_or("");
        if kind == self.kind && body["apiVersion"] == stored_av.as_str() {
            return self.down(body);
        }
        // A list (a CRD's may have its own `listKind`).
        if kind == format!("{}List", self.kind) || (kind != "Table" && body["items"].is_array()) {
            body["apiVersion"] = json!(self.api_version());
            if let Some(items) = body["items"].as_array_mut() {
                for i in items.iter_mut() {
                    *i = self.down(std::mem::take(i));
                }
            }
        } else if kind == "Table" {
            if let Some(rows) = body["rows"].as_array_mut() {
                for r in rows.iter_mut() {
                    let o = &mut r["object"];
                    // PartialObjectMetadata rows are the same in both shapes.
                    if o["kind"] == self.kind && o["apiVersion"] == stored_av.as_str() {
                        *o = self.down(std::mem::take(o));
                    }
                }
            }
        }
        body
    }

    /// One line of a watch (`{"type": …, "object": …}`) in the served shape.
    pub fn watch_line_down(&self, line: &[u8]) -> Vec<u8> {
        let Ok(mut e) = serde_json::from_slice::<Value>(line) else {
            return line.to_vec();
        };
        let o = std::mem::take(&mut e["object"]);
        e["object"] = self.answer_down(o);
        serde_json::to_vec(&e).unwrap_or_else(|_| line.to_vec())
    }
}

/// events.k8s.io/v1 names and the core/v1 ones: Kubernetes' conversion between the two.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// `o` with the renamed fields under their stored names (`up`) or their served ones.
fn rename(mut o: Value, up: bool) -> Value {
    if let Some(m) = o.as_object_mut() {
        for &(served, stored) in EVENT_RENAMES {
            let (a, b) = if up {
                (served, stored)
            } else {
                (stored, served)
            };
            if let Some(v) = m.remove(a) {
                m.insert(b.into(), v);
            }
        }
    }
    o
}

/// An events.k8s.io/v1 Event (or a patch of one) as core/v1.
pub fn event_up(o: Value) -> Value {
    let mut o = rename(o, true);
    if o["apiVersion"] == "events.k8s.io/v1" {
        o["apiVersion"] = json!("v1");
    }
    o
}

/// A core/v1 Event as events.k8s.io/v1.
pub fn event_down(o: Value) -> Value {
    let mut o = rename(o, false);
    if o["apiVersion"] == "v1" {
        o["apiVersion"] = json!("events.k8s.io/v1");
    }
    o
}

/// What the Kubernetes API server asks of an Event created through events.k8s.io/v1: the
/// fields a new-style recorder sets, none of the deprecated ones.
fn event_check(o: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if o["eventTime"].as_str().is_none_or(str::is_empty) {
        causes.push(Cause::required("eventTime"));
    }
    let t = o["type"].as_str().unwrap_or("");
    if t != "Normal" && t != "Warning" {
        causes.push(Cause::new(
            "FieldValueNotSupported",
            "type",
            format!("Unsupported value: \"{t}\": supported values: \"Normal\", \"Warning\""),
        ));
    }
    for (field, most) in [
        ("reportingController", 253),
        ("reportingInstance", 128),
        ("action", 128),
        ("reason", 128),
    ] {
        match o[field].as_str().unwrap_or("") {
            "" => causes.push(Cause::required(field)),
            v if v.len() > most => causes.push(Cause::new(
                "FieldValueTooLong",
                field,
                format!("Too long: may not be more than {most} bytes"),
            )),
            _ => {}
        }
    }
    if o["note"].as_str().is_some_and(|n| n.len() > 1024) {
        causes.push(Cause::new(
            "FieldValueTooLong",
            "note",
            "Too long: may not be more than 1024 bytes",
        ));
    }
    for field in [
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
        "deprecatedSource",
    ] {
        let set = match &o[field] {
            Value::Null => false,
            Value::Object(m) => m
                .values()
                .any(|v| v.as_str().is_some_and(|s| !s.is_empty())),
            Value::Number(n) => n.as_i64() != Some(0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if set {
            causes.push(Cause::invalid(field, "", "needs to be unset"));
        }
    }
    if let Some(series) = o["series"].as_object() {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            causes.push(Cause::invalid(
                "series.count",
                &series
                    .get("count")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                "should be at least 2",
            ));
        }
        if series.get("lastObservedTime").is_none_or(Value::is_null) {
            causes.push(Cause::required("series.lastObservedTime"));
        }
    }
    causes
}

/// Remove v1's `{prefix}CPUUtilizationPercentage` from `m`, however spelled: the protobuf
/// decoder spells the acronym as the generated messages do (`Cpu`).
fn take(m: &mut serde_json::Map<String, Value>, prefix: &str) -> Option<Value> {
    let a = m.remove(&format!("{prefix}CPUUtilizationPercentage"));
    let b = m.remove(&format!("{prefix}CpuUtilizationPercentage"));
    a.or(b)
}

/// A v1 HorizontalPodAutoscaler (or a merge patch of one) as v2.
pub fn hpa_up(mut o: Value) -> Value {
    if o["apiVersion"] == "autoscaling/v1" {
        o["apiVersion"] = json!("autoscaling/v2");
    }
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        if let Some(cpu) = take(spec, "target") {
            let metrics = if cpu.is_null() {
                Value::Null
            } else {
                json!([{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": cpu}}}])
            };
            spec.insert("metrics".into(), metrics);
        }
    }
    if let Some(st) = o.get_mut("status").and_then(Value::as_object_mut) {
        if let Some(cpu) = take(st, "current") {
            if !cpu.is_null() {
                st.insert(
                    "currentMetrics".into(),
                    json!([{"type": "Resource", "resource": {"name": "cpu",
                        "current": {"averageUtilization": cpu}}}]),
                );
            }
        }
    }
    o
}

fn cpu_of<'a>(list: &'a Value, field: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu")
        .map(|m| &m["resource"][field]["averageUtilization"])
        .filter(|u| !u.is_null())
}

/// A v2 HorizontalPodAutoscaler as v1.
pub fn hpa_down(mut o: Value) -> Value {
    if o["apiVersion"] == "autoscaling/v2" {
        o["apiVersion"] = json!("autoscaling/v1");
    }
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        let metrics = spec.remove("metrics").unwrap_or(Value::Null);
        spec.remove("behavior");
        if let Some(u) = cpu_of(&metrics, "target") {
            spec.insert("targetCPUUtilizationPercentage".into(), u.clone());
        }
    }
    if let Some(st) = o.get_mut("status").and_then(Value::as_object_mut) {
        let current = st.remove("currentMetrics").unwrap_or(Value::Null);
        st.remove("conditions");
        if let Some(u) = cpu_of(&current, "current") {
            st.insert("currentCPUUtilizationPercentage".into(), u.clone());
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_autoscale_bodies_round_trip() {
        // What `kubectl autoscale deployment web --min 2 --max 5 --cpu-percent 60` posts.
        let v1 = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60},
            "status": {"currentReplicas": 0, "desiredReplicas": 0}});
        let v2 = hpa_up(v1.clone());
        assert_eq!(v2["apiVersion"], "autoscaling/v2");
        assert_eq!(
            v2["spec"]["metrics"][0]["resource"]["target"],
            json!({"type": "Utilization", "averageUtilization": 60})
        );
        assert!(v2["spec"]["targetCPUUtilizationPercentage"].is_null());
        let mut stored = v2.clone();
        stored["status"]["currentMetrics"] = json!([{"type": "Resource",
            "resource": {"name": "cpu", "current": {"averageUtilization": 75, "averageValue": "75m"}}}]);
        stored["status"]["conditions"] = json!([{"type": "AbleToScale", "status": "True"}]);
        let back = VIEWS[0].answer_down(stored);
        assert_eq!(back["apiVersion"], "autoscaling/v1");
        assert_eq!(back["spec"], v1["spec"]);
        assert_eq!(back["status"]["currentCPUUtilizationPercentage"], 75);
        assert!(back["status"]["conditions"].is_null());
        let proto = hpa_up(json!({"spec": {"targetCpuUtilizationPercentage": 70}}));
        assert_eq!(
            proto["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            70
        );
        // A merge patch clearing the target clears the metrics.
        let p = hpa_up(json!({"spec": {"targetCPUUtilizationPercentage": null}}));
        assert_eq!(p, json!({"spec": {"metrics": null}}));
        let list = VIEWS[0].answer_down(json!({"kind": "HorizontalPodAutoscalerList",
            "apiVersion": "autoscaling/v2", "items": [{"spec": {"metrics": []}}]}));
        assert_eq!(list["apiVersion"], "autoscaling/v1");
        assert_eq!(list["items"][0]["spec"], json!({}));
        assert_eq!(super::stored("autoscaling", "v1"), Some("v2"));
        assert!(serves("autoscaling", "v1", "horizontalpodautoscalers"));
        assert!(!serves("autoscaling", "v1", "scales"));
    }

    #[test]
    fn events_k8s_io_is_a_view_of_core_events() {
        let v = view("events.k8s.io", "v1", "events").unwrap();
        let new = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "eventTime": "2026-12-06T10:00:00.000000Z", "reportingController": "example.com/c",
            "reportingInstance": "c-1", "action": "Pull", "reason": "Pulled", "type": "Normal",
            "note": "done", "regarding": {"kind": "Pod", "name": "p"},
            "series": {"count": 2, "lastObservedTime": "2026-12-06T10:01:00.000000Z"}});
        assert!(event_check(&new).is_empty(), "{:?}", event_check(&new));
        let core = v.body_up(new.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["message"], "done");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["reportingComponent"], "example.com/c");
        assert!(core["note"].is_null() && core["regarding"].is_null());
        // Back again, in every shape an answer takes.
        assert_eq!(v.answer_down(core.clone()), new);
        let list = v.answer_down(json!({"apiVersion": "v1", "kind": "EventList",
            "metadata": {}, "items": [core.clone()]}));
        assert_eq!(list["apiVersion"], "events.k8s.io/v1");
        assert_eq!(list["items"][0], new);
        let table = v.answer_down(json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "rows": [{"cells": [], "object": core.clone()}]}));
        assert_eq!(table["rows"][0]["object"], new);
        let line = serde_json::to_vec(&json!({"type": "ADDED", "object": core})).unwrap();
        let down: Value = serde_json::from_slice(&v.watch_line_down(&line)).unwrap();
        assert_eq!(down, json!({"type": "ADDED", "object": new}));
        let status = json!({"kind": "Status", "code": 404});
        assert_eq!(v.answer_down(status.clone()), status);
        // Patches: merge patches are renamed, JSON patches' paths too.
        assert_eq!(v.body_up(json!({"note": "x"})), json!({"message": "x"}));
        assert_eq!(
            v.body_up(
                json!([{"op": "replace", "path": "/regarding/name", "value": "q"},
                {"op": "move", "from": "/note", "path": "/reason"}])
            ),
            json!([{"op": "replace", "path": "/involvedObject/name", "value": "q"},
                {"op": "move", "from": "/message", "path": "/reason"}])
        );
        // Field selectors in the view's names; the stored names are not the view's.
        assert_eq!(
            v.selector_up("regarding.name=p,reportingController!=x,type=Normal")
                .unwrap(),
            "involvedObject.name=p,reportingComponent!=x,type=Normal"
        );
        assert!(v.selector_up("involvedObject.name=p").is_err());
        assert!(v.selector_up("source=x").is_err());
    }

    #[test]
    fn a_new_style_event_must_say_who_and_when() {
        let fields =
            |o: Value| -> Vec<String> { event_check(&o).into_iter().map(|c| c.field).collect() };
        assert_eq!(
            fields(json!({"type": "Odd", "deprecatedCount": 3,
                "deprecatedSource": {"component": "kubelet"}, "note": "x".repeat(1025),
                "series": {"count": 1}})),
            [
                "eventTime",
                "type",
                "reportingController",
                "reportingInstance",
                "action",
                "reason",
                "note",
                "deprecatedCount",
                "deprecatedSource",
                "series.count",
                "series.lastObservedTime"
            ]
        );
        // Deprecated fields at their zero values are as good as unset.
        let ok = json!({"eventTime": "2026-12-06T10:00:00Z", "type": "Warning",
            "reportingController": "c", "reportingInstance": "i", "action": "a", "reason": "r",
            "deprecatedCount": 0, "deprecatedSource": {}, "deprecatedLastTimestamp": null});
        assert!(event_check(&ok).is_empty());
        assert!(view("events.k8s.io", "v1", "leases").is_none());
        assert!(has_views("events.k8s.io", "v1") && !has_views("apps", "v1"));
    }
}
