//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): what a CRD must say, the status the
//! server gives it, and the resources it adds to the API.
//!
//! Every member keeps a registry of the established CRDs ([`load`], fed by
//! `controllers::crds`), which [`super::resources::find`] falls back to. A CRD's storage
//! version is a [`Resource`] like the built-in ones (its objects are stored once, under a key
//! without the version); its other served versions are [`View`]s over it whose conversion is
//! the `None` strategy: only `apiVersion` changes. Objects are pruned, defaulted and checked
//! against the storage version's structural schema ([`admit`]), and printed with the CRD's
//! `additionalPrinterColumns` ([`table`]). Not served: conversion webhooks, CEL rules
//! (`x-kubernetes-validations`), `oneOf`/`anyOf`/`allOf`/`not`, and string formats.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use serde_json::{json, Map, Value};

use super::admit::{dns_label, dns_subdomain};
use super::convert::View;
use super::error::Cause;
use super::resources::{Resource, Sub};
use super::table::{human_duration, Include};

pub const GROUP: &str = "apiextensions.k8s.io";
/// Held by every CRD until its objects are gone, as in Kubernetes.
pub const CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";
/// Where CRDs are stored.
pub const PREFIX: &str = "/registry/apiextensions.k8s.io/customresourcedefinitions/";

/// One `additionalPrinterColumns` entry.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub path: String,
}

/// Where the scale subresource reads and writes replicas.
#[derive(Debug, Clone)]
pub struct Scale {
    pub spec: String,
    pub status: String,
    pub selector: Option<String>,
}

/// An established CRD, as the API serves it.
pub struct Custom {
    /// The CRD's name (`plural.group`).
    pub crd: String,
    /// The storage version.
    pub res: &'static Resource,
    /// Whether the storage version is itself served.
    pub storage_served: bool,
    /// Served versions, the preferred first.
    pub served: Vec<&'static str>,
    /// The served versions other than the storage one.
    pub views: Vec<&'static View>,
    /// Each version's `openAPIV3Schema`.
    pub schemas: HashMap<String, Value>,
    pub columns: Vec<Column>,
    pub scale: Option<Scale>,
    /// The kind of its lists (`listKind`).
    pub list_kind: String,
    /// Fields a field selector may name besides `metadata.name` and `metadata.namespace`
    /// (the storage version's `selectableFields`, as `spec.color`).
    pub selectable: Vec<String>,
    /// Being deleted: its objects are being removed and no new ones are taken.
    pub terminating: bool,
}

impl Custom {
    /// The storage version's schema, which objects are checked against.
    pub fn schema(&self) -> &Value {
        self.schemas.get(self.res.version).unwrap_or(&Value::Null)
    }
}

static REGISTRY: LazyLock<RwLock<Vec<Arc<Custom>>>> = LazyLock::new(RwLock::default);
/// Bumped by every [`load`] that changed something (OpenAPI documents are cached by it).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The registry's generation: it changes whenever the custom resources served change.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Every custom resource served.
pub fn all() -> Vec<Arc<Custom>> {
    REGISTRY.read().map(|r| r.clone()).unwrap_or_default()
}

/// The custom resource `plural` of `group` (any version).
pub fn of(group: &str, plural: &str) -> Option<Arc<Custom>> {
    let reg = REGISTRY.read().ok()?;
    reg.iter()
        .find(|c| c.res.group == group && c.res.plural == plural)
        .cloned()
}

/// The resource `plural` of `group`/`version`, if that is a served CRD's storage version.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    of(group, plural)
        .filter(|c| c.storage_served && c.res.version == version)
        .map(|c| c.res)
}

/// The storage version `version` of the custom resource `plural` of `group`, served or not
/// (its other versions are views over it).
pub fn stored(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    of(group, plural)
        .filter(|c| c.res.version == version)
        .map(|c| c.res)
}

/// The CRDs' groups, each with its served versions (the preferred first), by name.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for c in all() {
        let i = match out.iter().position(|(g, _)| *g == c.res.group) {
            Some(i) => i,
            None => {
                out.push((c.res.group, Vec::new()));
                out.len() - 1
            }
        };
        for v in &c.served {
            if !out[i].1.contains(v) {
                out[i].1.push(v);
            }
        }
    }
    for (_, vs) in out.iter_mut() {
        vs.sort_by(|a, b| priority(a).cmp(&priority(b)).then(a.cmp(b)));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// The custom resources served in `group`/`version`.
pub fn served_in(group: &str, version: &str) -> Vec<Arc<Custom>> {
    all()
        .into_iter()
        .filter(|c| c.res.group == group && c.served.contains(&version))
        .collect()
}

/// The custom resource of `kind` in `group`.
pub fn by_kind(group: &str, kind: &str) -> Option<&'static Resource> {
    let reg = REGISTRY.read().ok()?;
    reg.iter()
        .find(|c| c.res.group == group && c.res.kind == kind)
        .map(|c| c.res)
}

/// The view serving `plural` in `group`/`version`, if that is a CRD's other served version.
pub fn view(group: &str, version: &str, plural: &str) -> Option<&'static View> {
    of(group, plural)?
        .views
        .iter()
        .copied()
        .find(|v| v.version == version)
}

/// The CRD behind `r`, if it is a custom resource. A built-in one is known by its address,
/// without the registry's lock (every write asks); a custom one by its name, not its
/// address, so a request that began before its CRD changed still finds it.
pub fn behind(r: &Resource) -> Option<Arc<Custom>> {
    if super::resources::RESOURCES
        .as_ptr_range()
        .contains(&(r as *const Resource))
    {
        return None;
    }
    of(r.group, r.plural)
}

/// Serve exactly the established CRDs among `crds`.
pub fn load(crds: &[Value]) {
    let mut out: Vec<Arc<Custom>> = crds
        .iter()
        .filter(|c| established(c))
        .filter_map(custom)
        .map(Arc::new)
        .collect();
    out.sort_by(|a, b| a.crd.cmp(&b.crd));
    let Ok(mut reg) = REGISTRY.write() else {
        return;
    };
    let same = reg.len() == out.len()
        && reg.iter().zip(&out).all(|(a, b)| {
            std::ptr::eq(a.res, b.res)
                && a.served == b.served
                && a.schemas == b.schemas
                && a.terminating == b.terminating
                && a.selectable == b.selectable
                && a.list_kind == b.list_kind
                && a.columns.len() == b.columns.len()
        });
    *reg = out;
    if !same {
        GENERATION.fetch_add(1, Ordering::Relaxed);
    }
}

fn established(crd: &Value) -> bool {
    crd["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Established" && c["status"] == "True")
}

/// A `&'static str` for `s`, made once per distinct string (CRDs are few and their names
/// change rarely, so the leak is bounded).
fn intern(s: &str) -> &'static str {
    static STRS: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);
    let mut set = STRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(x) = set.get(s) {
        return x;
    }
    let x: &'static str = Box::leak(s.to_string().into_boxed_str());
    set.insert(x);
    x
}

/// A `&'static` list equal to `v`'s strings, made once per distinct list.
fn intern_strs(v: &Value) -> &'static [&'static str] {
    static LISTS: LazyLock<Mutex<HashMap<Vec<&'static str>, &'static [&'static str]>>> =
        LazyLock::new(Mutex::default);
    let list: Vec<&'static str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(intern)
        .collect();
    if list.is_empty() {
        return &[];
    }
    let mut all = LISTS.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(list.clone())
        .or_insert_with(|| Box::leak(list.into_boxed_slice()))
}

/// A `&'static Resource` equal to `r`, made once per distinct resource.
fn intern_resource(r: Resource) -> &'static Resource {
    static RES: LazyLock<Mutex<Vec<&'static Resource>>> = LazyLock::new(Mutex::default);
    let mut all = RES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(x) = all.iter().find(|x| ***x == r) {
        return x;
    }
    let x: &'static Resource = Box::leak(Box::new(r));
    all.push(x);
    x
}

fn intern_view(
    group: &'static str,
    version: &'static str,
    stored: &'static Resource,
) -> &'static View {
    static VIEWS: LazyLock<Mutex<HashMap<String, &'static View>>> = LazyLock::new(Mutex::default);
    let key = format!(
        "{group}/{version}/{}/{}/{}",
        stored.plural, stored.version, stored.kind
    );
    let mut all = VIEWS.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(key).or_insert_with(|| {
        Box::leak(Box::new(View {
            group,
            version,
            plural: stored.plural,
            stored: (stored.group, stored.version),
            kind: stored.kind,
            up: std::convert::identity::<Value>,
            down: std::convert::identity::<Value>,
            renames: &[],
            check: None,
        }))
    })
}

/// The served form of an established CRD; None if it has no storage version.
fn custom(crd: &Value) -> Option<Custom> {
    let spec = &crd["spec"];
    // Served under the names it was given, which a later clash does not take away.
    let accepted = &crd["status"]["acceptedNames"];
    let names = if accepted["plural"].as_str().is_some_and(|p| !p.is_empty()) {
        accepted
    } else {
        &spec["names"]
    };
    let group = intern(spec["group"].as_str()?);
    let plural = intern(names["plural"].as_str()?);
    let kind = intern(names["kind"].as_str()?);
    let versions = spec["versions"].as_array()?;
    let storage = versions.iter().find(|v| v["storage"] == true)?;
    let mut subs = Vec::new();
    if storage["subresources"]["status"].is_object() {
        subs.push(Sub::Status);
    }
    let scale = storage["subresources"]["scale"].as_object().map(|s| Scale {
        spec: s
            .get("specReplicasPath")
            .and_then(Value::as_str)
            .unwrap_or(".spec.replicas")
            .into(),
        status: s
            .get("statusReplicasPath")
            .and_then(Value::as_str)
            .unwrap_or(".status.replicas")
            .into(),
        selector: s
            .get("labelSelectorPath")
            .and_then(Value::as_str)
            .map(String::from),
    });
    if scale.is_some() {
        subs.push(Sub::Scale);
    }
    let res = intern_resource(Resource {
        group,
        version: intern(storage["name"].as_str()?),
        kind,
        plural,
        singular: intern(
            names["singular"]
                .as_str()
                .map_or_else(|| kind.to_lowercase(), String::from)
                .as_str(),
        ),
        short: intern_strs(&names["shortNames"]),
        namespaced: spec["scope"] != "Cluster",
        categories: intern_strs(&names["categories"]),
        subresources: match (subs.contains(&Sub::Status), subs.contains(&Sub::Scale)) {
            (true, true) => &[Sub::Status, Sub::Scale],
            (true, false) => &[Sub::Status],
            (false, true) => &[Sub::Scale],
            (false, false) => &[],
        },
        stored: true,
    });
    let mut served: Vec<&'static str> = versions
        .iter()
        .filter(|v| v["served"] == true)
        .filter_map(|v| v["name"].as_str())
        .map(intern)
        .collect();
    served.sort_by(|a, b| priority(a).cmp(&priority(b)).then(a.cmp(b)));
    let views = served
        .iter()
        .filter(|v| **v != res.version)
        .map(|v| intern_view(group, v, res))
        .collect();
    let schemas = versions
        .iter()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["schema"]["openAPIV3Schema"].clone(),
            ))
        })
        .collect();
    let cols = &storage["additionalPrinterColumns"];
    let columns = match cols.as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .map(|c| Column {
                name: c["name"].as_str().unwrap_or("").into(),
                ty: c["type"].as_str().unwrap_or("string").into(),
                format: c["format"].as_str().unwrap_or("").into(),
                description: c["description"].as_str().map_or_else(
                    || {
                        format!(
                            "Custom resource definition column (in JSONPath format): {}",
                            c["jsonPath"].as_str().unwrap_or("")
                        )
                    },
                    String::from,
                ),
                priority: c["priority"].as_i64().unwrap_or(0),
                path: c["jsonPath"].as_str().unwrap_or("").into(),
            })
            .collect(),
        _ => vec![Column {
            name: "Age".into(),
            ty: "date".into(),
            format: String::new(),
            description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
            priority: 0,
            path: ".metadata.creationTimestamp".into(),
        }],
    };
    let selectable = storage["selectableFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["jsonPath"].as_str())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let list_kind = names["listKind"]
        .as_str()
        .filter(|k| !k.is_empty())
        .map_or_else(|| format!("{kind}List"), String::from);
    Some(Custom {
        list_kind,
        crd: crd["metadata"]["name"].as_str().unwrap_or("").into(),
        selectable,
        storage_served: storage["served"] == true,
        res,
        served,
        views,
        schemas,
        columns,
        scale,
        terminating: !crd["metadata"]["deletionTimestamp"].is_null(),
    })
}

/// Kubernetes' version order: GA before beta before alpha, higher numbers first, and
/// versions not of the `v1beta2` form last (alphabetically, by the caller).
pub fn priority(v: &str) -> (u8, i64, i64) {
    let parse = || -> Option<(u8, i64, i64)> {
        let rest = v.strip_prefix('v')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: i64 = rest[..digits].parse().ok()?;
        if major == 0 {
            return None;
        }
        let tail = &rest[digits..];
        if tail.is_empty() {
            return Some((0, -major, 0));
        }
        let (tier, n) = if let Some(n) = tail.strip_prefix("beta") {
            (1, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (2, n)
        } else {
            return None;
        };
        let minor: i64 = n.parse().ok()?;
        Some((tier, -major, -minor))
    };
    parse().unwrap_or((3, 0, 0))
}

// ---------------------------------------------------------------------------------------
// The CRD itself: defaults, checks, status.

/// Defaults Kubernetes fills into a CRD: the singular and list names, the conversion
/// strategy, and the finalizer that removes its objects when it goes.
pub fn defaults(crd: &mut Value) {
    let names = &mut crd["spec"]["names"];
    if let Some(kind) = names["kind"].as_str().map(String::from) {
        if names["singular"].as_str().is_none_or(str::is_empty) {
            names["singular"] = json!(kind.to_lowercase());
        }
        if names["listKind"].as_str().is_none_or(str::is_empty) {
            names["listKind"] = json!(format!("{kind}List"));
        }
    }
    if crd["spec"]["conversion"].is_null() {
        crd["spec"]["conversion"] = json!({"strategy": "None"});
    }
}

/// Add the cleanup finalizer to a new CRD.
pub fn hold(crd: &mut Value) {
    let fins = crd["metadata"]
        .as_object_mut()
        .map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
    if let Some(Value::Array(list)) = fins {
        if !list.iter().any(|f| f == CLEANUP) {
            list.push(json!(CLEANUP));
        }
    }
}

/// What is wrong with a CRD, as kube-apiserver's validation words it (a subset: names,
/// scope, versions, schemas and printer columns).
pub fn validate(crd: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or("");
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or("");
    if group.is_empty() {
        out.push(Cause::required("spec.group"));
    } else if !dns_subdomain(group) || !group.contains('.') {
        out.push(Cause::invalid(
            "spec.group",
            group,
            "should be a domain with at least one dot",
        ));
    } else if super::resources::RESOURCES.iter().any(|r| r.group == group)
        || [GROUP, "metrics.k8s.io", "apiregistration.k8s.io"].contains(&group)
    {
        out.push(Cause::invalid(
            "spec.group",
            group,
            "is a group this server serves itself",
        ));
    }
    let approved = crd["metadata"]["annotations"]["api-approved.kubernetes.io"].is_string();
    let protected = [".k8s.io", ".kubernetes.io"]
        .iter()
        .any(|p| group.ends_with(p) || group == &p[1..]);
    if protected && !approved {
        out.push(Cause::required_msg(
            "metadata.annotations[api-approved.kubernetes.io]",
            "protected groups must have approval annotation \"api-approved.kubernetes.io\", see https://github.com/kubernetes/enhancements/pull/1111",
        ));
    }
    for (field, v) in [
        ("plural", plural),
        ("singular", names["singular"].as_str().unwrap_or("")),
    ] {
        if v.is_empty() && field == "plural" {
            out.push(Cause::required("spec.names.plural"));
        } else if !v.is_empty() && !dns_label(v) {
            out.push(Cause::invalid(
                format!("spec.names.{field}"),
                v,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            ));
        }
    }
    for (i, s) in names["shortNames"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let s = s.as_str().unwrap_or("");
        if !dns_label(s) {
            out.push(Cause::invalid(
                format!("spec.names.shortNames[{i}]"),
                s,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            ));
        }
    }
    for field in ["kind", "listKind"] {
        let v = names[field].as_str().unwrap_or("");
        if v.is_empty() {
            out.push(Cause::required(format!("spec.names.{field}")));
        } else if !v.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            || !v.chars().all(|c| c.is_ascii_alphanumeric())
        {
            out.push(Cause::invalid(
                format!("spec.names.{field}"),
                v,
                "may have mixed case, but should otherwise match: [a-z]([-a-z0-9]*[a-z0-9])?",
            ));
        }
    }
    let name = crd["metadata"]["name"].as_str().unwrap_or("");
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        out.push(Cause::invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        None | Some("") => out.push(Cause::required("spec.scope")),
        Some(s) => out.push(Cause::new(
            "FieldValueNotSupported",
            "spec.scope",
            format!("Unsupported value: \"{s}\": supported values: \"Cluster\", \"Namespaced\""),
        )),
    }
    match spec["conversion"]["strategy"].as_str() {
        None | Some("None") => {}
        Some("Webhook") => out.push(Cause::invalid(
            "spec.conversion.strategy",
            "Webhook",
            "conversion webhooks are not served by this server; use the None strategy",
        )),
        Some(s) => out.push(Cause::new(
            "FieldValueNotSupported",
            "spec.conversion.strategy",
            format!("Unsupported value: \"{s}\": supported values: \"None\", \"Webhook\""),
        )),
    }
    let versions = spec["versions"].as_array().map_or(&[][..], Vec::as_slice);
    if versions.is_empty() {
        out.push(Cause::invalid(
            "spec.versions",
            "null",
            "must have exactly one version marked as storage version",
        ));
    } else if versions.iter().filter(|v| v["storage"] == true).count() != 1 {
        out.push(Cause::invalid(
            "spec.versions",
            &serde_json::to_string(&versions.iter().map(|v| &v["name"]).collect::<Vec<_>>())
                .unwrap_or_default(),
            "must have exactly one version marked as storage version",
        ));
    }
    let mut seen = HashSet::new();
    for (i, v) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        let vname = v["name"].as_str().unwrap_or("");
        if vname.is_empty() {
            out.push(Cause::required(format!("{at}.name")));
        } else if !dns_label(vname) || !vname.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(Cause::invalid(
                format!("{at}.name"),
                vname,
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-'",
            ));
        } else if !seen.insert(vname) {
            out.push(Cause::new(
                "FieldValueDuplicate",
                format!("{at}.name"),
                format!("Duplicate value: \"{vname}\""),
            ));
        }
        if !v["served"].is_boolean() {
            out.push(Cause::required(format!("{at}.served")));
        }
        if !v["storage"].is_boolean() {
            out.push(Cause::required(format!("{at}.storage")));
        }
        let schema = &v["schema"]["openAPIV3Schema"];
        if !schema.is_object() {
            out.push(Cause::required(format!("{at}.schema.openAPIV3Schema")));
        } else {
            let sat = format!("{at}.schema.openAPIV3Schema");
            if schema["type"] != "object" {
                out.push(Cause::invalid(
                    format!("{sat}.type"),
                    schema["type"].as_str().unwrap_or(""),
                    "must be object at the root",
                ));
            }
            structural(schema, &sat, &mut out);
        }
        let fields = v["selectableFields"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if fields.len() > 8 {
            out.push(Cause::new(
                "FieldValueTooMany",
                format!("{at}.selectableFields"),
                format!("Too many: {}: must have at most 8 items", fields.len()),
            ));
        }
        for (j, f) in fields.iter().enumerate() {
            let p = f["jsonPath"].as_str().unwrap_or("");
            let plain = parse_path(p)
                .is_some_and(|steps| steps.iter().all(|s| matches!(s, Step::Field(_))));
            if !plain || !p.starts_with('.') {
                out.push(Cause::invalid(
                    format!("{at}.selectableFields[{j}].jsonPath"),
                    p,
                    "must be a simple path to a field, as .spec.color",
                ));
            }
        }
        if let Some(sc) = v["subresources"]["scale"].as_object() {
            for (f, prefixes, required) in [
                ("specReplicasPath", &[".spec."][..], true),
                ("statusReplicasPath", &[".status."][..], true),
                ("labelSelectorPath", &[".spec.", ".status."][..], false),
            ] {
                let field = format!("{at}.subresources.scale.{f}");
                match sc.get(f).and_then(Value::as_str) {
                    None if required => out.push(Cause::required(field)),
                    None => {}
                    Some(p) => {
                        let plain = parse_path(p)
                            .is_some_and(|steps| steps.iter().all(|s| matches!(s, Step::Field(_))));
                        if !plain || !prefixes.iter().any(|x| p.starts_with(x)) {
                            out.push(Cause::invalid(
                                field,
                                p,
                                &format!("should be a json path under {}", prefixes.join(" or ")),
                            ));
                        }
                    }
                }
            }
        }
        for (j, c) in v["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cat = format!("{at}.additionalPrinterColumns[{j}]");
            for f in ["name", "type", "jsonPath"] {
                if c[f].as_str().is_none_or(str::is_empty) {
                    out.push(Cause::required(format!("{cat}.{f}")));
                }
            }
            let ty = c["type"].as_str().unwrap_or("");
            if !ty.is_empty() && !["integer", "number", "string", "boolean", "date"].contains(&ty) {
                out.push(Cause::new(
                    "FieldValueNotSupported",
                    format!("{cat}.type"),
                    format!("Unsupported value: \"{ty}\": supported values: \"boolean\", \"date\", \"integer\", \"number\", \"string\""),
                ));
            }
            if let Some(p) = c["jsonPath"].as_str().filter(|p| !p.is_empty()) {
                if parse_path(p).is_none() {
                    out.push(Cause::invalid(
                        format!("{cat}.jsonPath"),
                        p,
                        "must be a simple json path",
                    ));
                }
            }
        }
    }
    out
}

/// What may not change in an established CRD: its scope and its kind.
pub fn validate_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    if !established(old) {
        return out;
    }
    for (field, a, b) in [
        ("spec.scope", &new["spec"]["scope"], &old["spec"]["scope"]),
        (
            "spec.names.kind",
            &new["spec"]["names"]["kind"],
            &old["spec"]["names"]["kind"],
        ),
    ] {
        if a != b {
            out.push(Cause::invalid(
                field,
                a.as_str().unwrap_or(""),
                "field is immutable",
            ));
        }
    }
    out
}

/// The structural schema rules this server relies on: every node has a type (unless it
/// keeps unknown fields or is int-or-string), and `properties` and `additionalProperties`
/// are not both set.
fn structural(s: &Value, at: &str, out: &mut Vec<Cause>) {
    let ty = s["type"].as_str().unwrap_or("");
    let open = s["x-kubernetes-preserve-unknown-fields"] == true
        || s["x-kubernetes-int-or-string"] == true;
    if ty.is_empty() && !open {
        out.push(Cause::required(format!("{at}.type")));
    } else if !ty.is_empty()
        && !["object", "array", "string", "integer", "number", "boolean"].contains(&ty)
    {
        out.push(Cause::new(
            "FieldValueNotSupported",
            format!("{at}.type"),
            format!("Unsupported value: \"{ty}\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""),
        ));
    }
    if s["uniqueItems"] == true {
        out.push(Cause::new(
            "FieldValueForbidden",
            format!("{at}.uniqueItems"),
            "Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        ));
    }
    if s["properties"].is_object() && s["additionalProperties"].is_object() {
        out.push(Cause::new(
            "FieldValueForbidden",
            format!("{at}.additionalProperties"),
            "Forbidden: additionalProperties and properties are mutual exclusive",
        ));
    }
    if let Some(props) = s["properties"].as_object() {
        for (k, p) in props {
            structural(p, &format!("{at}.properties[{k}]"), out);
        }
    }
    if s["items"].is_object() {
        structural(&s["items"], &format!("{at}.items"), out);
    } else if ty == "array" {
        out.push(Cause::required(format!("{at}.items")));
    }
    if s["additionalProperties"].is_object() {
        structural(
            &s["additionalProperties"],
            &format!("{at}.additionalProperties"),
            out,
        );
    }
}

/// The status the server gives a CRD: its names accepted (unless another CRD of the group
/// has them: `conflict` says which) and it established, with the versions ever stored.
pub fn status(crd: &Value, old: Option<&Value>, conflict: Option<String>, now: &str) -> Value {
    let names = crd["spec"]["names"].clone();
    let mut stored: Vec<Value> = old
        .and_then(|o| o["status"]["storedVersions"].as_array().cloned())
        .unwrap_or_default();
    if let Some(v) = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
    {
        if !stored.contains(&v["name"]) {
            stored.push(v["name"].clone());
        }
    }
    let was = |t: &str| {
        old.and_then(|o| {
            o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == t)
                .cloned()
        })
    };
    let cond = |t: &str, ok: bool, reason: &str, message: &str| {
        let status = if ok { "True" } else { "False" };
        let since = was(t)
            .filter(|c| c["status"] == status)
            .map_or(json!(now), |c| c["lastTransitionTime"].clone());
        json!({"type": t, "status": status, "lastTransitionTime": since,
               "reason": reason, "message": message})
    };
    let (accepted, established) = match &conflict {
        None => (
            cond("NamesAccepted", true, "NoConflicts", "no conflicts found"),
            cond(
                "Established",
                true,
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        ),
        // Once established, a CRD stays so under the names it had.
        Some(why) if old.is_some_and(established) => (
            cond("NamesAccepted", false, "NameConflict", why),
            cond(
                "Established",
                true,
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        ),
        Some(why) => (
            cond("NamesAccepted", false, "NameConflict", why),
            cond(
                "Established",
                false,
                "NotAccepted",
                "not all names are accepted",
            ),
        ),
    };
    // Names once accepted stay so: served objects keep their names.
    let accepted_names = match (&conflict, old) {
        (Some(_), Some(o)) => o["status"]["acceptedNames"].clone(),
        (Some(_), None) => json!({"plural": "", "kind": ""}),
        (None, _) => names,
    };
    json!({"conditions": [accepted, established], "acceptedNames": accepted_names,
           "storedVersions": stored})
}

/// Whether `crd`'s names were accepted.
pub fn accepted(crd: &Value) -> bool {
    crd["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "NamesAccepted" && c["status"] == "True")
}

/// Which of `crd`'s names another CRD of its group (among `others`) already has.
pub fn conflict(crd: &Value, others: &[Value]) -> Option<String> {
    let spec = &crd["spec"];
    let name = crd["metadata"]["name"].as_str().unwrap_or("");
    let mine = names_of(spec);
    for o in others {
        if o["metadata"]["name"] == name || o["spec"]["group"] != spec["group"] {
            continue;
        }
        // Only names given: a CRD waiting for its names holds none.
        let theirs: HashSet<String> = names_of(&o["status"]["acceptedNames"])
            .into_iter()
            .collect();
        if let Some(n) = mine.iter().find(|n| theirs.contains(*n)) {
            return Some(format!(
                "\"{}\" is already in use",
                n.split_once(':').map_or(n.as_str(), |(_, v)| v)
            ));
        }
    }
    None
}

/// A CRD's names, tagged by what they name (`kind:Widget`, `res:widgets`).
fn names_of(spec: &Value) -> Vec<String> {
    let n = if spec["names"].is_object() {
        &spec["names"]
    } else {
        spec
    };
    let mut out = Vec::new();
    for f in ["kind", "listKind"] {
        if let Some(v) = n[f].as_str().filter(|v| !v.is_empty()) {
            out.push(format!("kind:{v}"));
        }
    }
    for f in ["plural", "singular"] {
        if let Some(v) = n[f].as_str().filter(|v| !v.is_empty()) {
            out.push(format!("res:{v}"));
        }
    }
    for s in n["shortNames"].as_array().into_iter().flatten() {
        if let Some(v) = s.as_str() {
            out.push(format!("res:{v}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Objects: pruning, defaults and checks against the structural schema.

/// What [`admit`] found.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Fields the schema does not know, dropped (paths as `spec.foo`).
    pub unknown: Vec<String>,
    pub causes: Vec<Cause>,
}

/// Prune `o` to `schema` (fields it does not know are dropped, unless a node keeps unknown
/// fields), fill in its defaults, and check it, as kube-apiserver does for a custom resource.
/// `apiVersion`, `kind` and `metadata` at the root are the server's own.
pub fn admit(schema: &Value, o: &mut Value) -> Admitted {
    let mut out = Admitted::default();
    let Some(m) = o.as_object_mut() else {
        out.causes.push(Cause::invalid("", "", "must be an object"));
        return out;
    };
    walk_object(schema, m, "", true, &mut out);
    out
}

fn join(at: &str, k: &str) -> String {
    if at.is_empty() {
        k.to_string()
    } else {
        format!("{at}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn walk(s: &Value, v: &mut Value, at: &str, out: &mut Admitted) {
    if v.is_null() && s["nullable"] == true {
        return;
    }
    let ty = s["type"].as_str().unwrap_or("");
    let int_or_string = s["x-kubernetes-int-or-string"] == true;
    let fits = match (ty, &*v) {
        _ if int_or_string => v.is_string() || v.is_i64() || v.is_u64(),
        ("", _) => true,
        ("object", Value::Object(_)) | ("array", Value::Array(_)) => true,
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => true,
        ("number", Value::Number(_)) => true,
        ("integer", Value::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    };
    if !fits {
        let want = if int_or_string {
            "integer or string"
        } else {
            ty
        };
        out.causes.push(Cause::new(
            "FieldValueTypeInvalid",
            at,
            format!(
                "Invalid value: \"{}\": {at} in body must be of type {want}: \"{}\"",
                type_name(v),
                type_name(v)
            ),
        ));
        return;
    }
    if let Some(list) = s["enum"].as_array() {
        if !list.contains(v) {
            let allowed: Vec<String> = list.iter().map(|x| x.to_string()).collect();
            out.causes.push(Cause::new(
                "FieldValueNotSupported",
                at,
                format!(
                    "Unsupported value: {}: supported values: {}",
                    v,
                    allowed.join(", ")
                ),
            ));
        }
    }
    match v {
        Value::Object(m) => {
            let keeps_meta = s["x-kubernetes-embedded-resource"] == true;
            walk_object(s, m, at, keeps_meta, out);
            let n = m.len() as u64;
            bound(
                s,
                "minProperties",
                "maxProperties",
                n,
                at,
                "properties",
                out,
            );
        }
        Value::Array(items) => {
            if s["items"].is_object() {
                for (i, x) in items.iter_mut().enumerate() {
                    walk(&s["items"], x, &format!("{at}[{i}]"), out);
                }
            }
            bound(
                s,
                "minItems",
                "maxItems",
                items.len() as u64,
                at,
                "items",
                out,
            );
            if s["x-kubernetes-list-type"] == "set" {
                // Hashed by their JSON text: linear in the list, whatever its length.
                let mut seen = HashSet::new();
                for (i, x) in items.iter().enumerate() {
                    let text = x.to_string();
                    if seen.contains(&text) {
                        out.causes.push(Cause::new(
                            "FieldValueDuplicate",
                            format!("{at}[{i}]"),
                            format!("Duplicate value: {text}"),
                        ));
                    } else {
                        seen.insert(text);
                    }
                }
            }
        }
        Value::String(st) => {
            let n = st.chars().count() as u64;
            bound(s, "minLength", "maxLength", n, at, "chars", out);
            if let Some(p) = s["pattern"].as_str() {
                if let Some(re) = pattern(p) {
                    if !re.is_match(st) {
                        out.causes.push(Cause::invalid(
                            at,
                            st,
                            &format!("{at} in body should match '{p}'"),
                        ));
                    }
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let shown = n.to_string();
            for (key, excl, below) in [
                ("minimum", "exclusiveMinimum", true),
                ("maximum", "exclusiveMaximum", false),
            ] {
                let Some(b) = s[key].as_f64() else {
                    continue;
                };
                let exclusive = s[excl] == true;
                if (if below { x < b } else { x > b }) || (exclusive && x == b) {
                    let rel = match (below, exclusive) {
                        (true, true) => "greater than",
                        (true, false) => "greater than or equal to",
                        (false, true) => "less than",
                        (false, false) => "less than or equal to",
                    };
                    out.causes.push(Cause::invalid(
                        at,
                        &shown,
                        &format!("{at} in body should be {rel} {}", s[key]),
                    ));
                }
            }
            if let Some(k) = s["multipleOf"].as_f64().filter(|k| *k > 0.0) {
                // Within rounding, as go-openapi checks it: 0.3 is a multiple of 0.1.
                let q = x / k;
                if (q - q.round()).abs() > 1e-9 * q.abs().max(1.0) {
                    out.causes.push(Cause::invalid(
                        at,
                        &shown,
                        &format!("{at} in body should be a multiple of {}", s["multipleOf"]),
                    ));
                }
            }
        }
        _ => {}
    }
}

/// A `min…`/`max…` pair of counts.
fn bound(s: &Value, min: &str, max: &str, n: u64, at: &str, what: &str, out: &mut Admitted) {
    if let Some(lo) = s[min].as_u64().filter(|lo| n < *lo) {
        let msg = match what {
            "chars" => format!("{at} in body should be at least {lo} chars long"),
            "items" => format!("{at} in body should have at least {lo} items"),
            _ => format!("{at} in body should have at least {lo} properties"),
        };
        out.causes.push(Cause::invalid(at, &n.to_string(), &msg));
    }
    if let Some(hi) = s[max].as_u64().filter(|hi| n > *hi) {
        let (reason, msg) = match what {
            "chars" => (
                "FieldValueTooLong",
                format!("Too long: may not be more than {hi} bytes"),
            ),
            "items" => (
                "FieldValueTooMany",
                format!("Too many: {n}: must have at most {hi} items"),
            ),
            _ => (
                "FieldValueTooMany",
                format!("Too many: {n}: must have at most {hi} items"),
            ),
        };
        out.causes.push(Cause::new(reason, at, msg));
    }
}

/// `pattern` compiled, once; None for patterns this server cannot run (ECMA-262 features
/// such as look-around), which are then not checked.
fn pattern(p: &str) -> Option<regex::Regex> {
    static CACHE: LazyLock<Mutex<HashMap<String, Option<regex::Regex>>>> =
        LazyLock::new(Mutex::default);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    c.entry(p.to_string())
        .or_insert_with(|| regex::Regex::new(p).ok())
        .clone()
}

fn walk_object(s: &Value, m: &mut Map<String, Value>, at: &str, root: bool, out: &mut Admitted) {
    let keep_unknown = s["x-kubernetes-preserve-unknown-fields"] == true;
    let props = s["properties"].as_object();
    let extra = &s["additionalProperties"];
    // Nulls of fields that may not be null are dropped before defaults, as Kubernetes does.
    let nulls: Vec<String> = m
        .iter()
        .filter(|(k, v)| {
            v.is_null()
                && !(root && ["apiVersion", "kind", "metadata"].contains(&k.as_str()))
                && props
                    .and_then(|p| p.get(*k))
                    .is_none_or(|p| p["nullable"] != true)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in nulls {
        m.remove(&k);
    }
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        if root && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
            continue;
        }
        let path = join(at, &k);
        let sub = props
            .and_then(|p| p.get(&k))
            .or(extra.is_object().then_some(extra));
        match sub {
            Some(ps) => {
                if let Some(x) = m.get_mut(&k) {
                    if !x.is_null() {
                        walk(ps, x, &path, out);
                    }
                }
            }
            None if keep_unknown || *extra == true => {}
            None => {
                m.remove(&k);
                out.unknown.push(path);
            }
        }
    }
    if let Some(props) = props {
        for (k, ps) in props {
            if m.contains_key(k) {
                continue;
            }
            if let Some(d) = ps.get("default") {
                let mut d = d.clone();
                walk(ps, &mut d, &join(at, k), &mut Admitted::default());
                m.insert(k.clone(), d);
            }
        }
    }
    for r in s["required"].as_array().into_iter().flatten() {
        if let Some(k) = r.as_str() {
            if !m.contains_key(k) {
                out.causes.push(Cause::required(join(at, k)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Printing: additionalPrinterColumns.

/// One step of a simple JSON path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    /// `[?(@.a.b=="x")]`: the items whose field equals the value.
    Filter(Vec<String>, Value),
}

/// Parse a printer column's JSON path (`.spec.size`, `.status.conditions[0].type`,
/// `.items[*].name`, `.status.conditions[?(@.type=="Ready")].status`), with or without braces.
fn parse_path(p: &str) -> Option<Vec<Step>> {
    let p = p.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(p)
        .trim();
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut steps = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end == 0 {
                return None;
            }
            steps.push(Step::Field(r[..end].to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = bracket_end(r)?;
            let inner = r[..end].trim();
            rest = &r[end + 1..];
            if inner == "*" {
                steps.push(Step::All);
            } else if let Ok(i) = inner.parse::<usize>() {
                steps.push(Step::Index(i));
            } else if let Some(q) = inner
                .strip_prefix('\'')
                .and_then(|x| x.strip_suffix('\''))
                .or_else(|| inner.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
            {
                steps.push(Step::Field(q.to_string()));
            } else if let Some(f) = inner.strip_prefix("?(").and_then(|x| x.strip_suffix(')')) {
                let (lhs, rhs) = f.split_once("==")?;
                let path: Vec<String> = lhs
                    .trim()
                    .strip_prefix("@.")?
                    .split('.')
                    .map(String::from)
                    .collect();
                let rhs = rhs.trim();
                let value = if let Some(s) = rhs
                    .strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .or_else(|| rhs.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                {
                    json!(s)
                } else {
                    serde_json::from_str(rhs).ok()?
                };
                steps.push(Step::Filter(path, value));
            } else {
                return None;
            }
        } else {
            return None;
        }
    }
    if steps.is_empty() {
        return None;
    }
    Some(steps)
}

/// Where the `]` closing a bracket that opened just before `r` is (quotes respected).
fn bracket_end(r: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in r.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, ']') => return Some(i),
            _ => {}
        }
    }
    None
}

/// The values `path` picks out of `o`.
fn pick<'a>(o: &'a Value, path: &[Step]) -> Vec<&'a Value> {
    let mut cur = vec![o];
    for step in path {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => next.extend(v.get(f.as_str())),
                Step::Index(i) => next.extend(v.get(*i)),
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Filter(p, want) => {
                    for item in v.as_array().into_iter().flatten() {
                        let got = p.iter().try_fold(item, |x, f| x.get(f.as_str()));
                        if got == Some(want) {
                            next.push(item);
                        }
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

/// The value at `path` in `o` (the first, if it picks several), for writing through it.
pub fn value_at<'a>(o: &'a Value, path: &str) -> Option<&'a Value> {
    parse_path(path).and_then(|p| pick(o, &p).into_iter().next())
}

/// Set the value at a plain field path (`.spec.replicas`) of `o`, making objects on the way.
pub fn set_at(o: &mut Value, path: &str, v: Value) -> bool {
    let Some(steps) = parse_path(path) else {
        return false;
    };
    let mut cur = o;
    for s in &steps {
        let Step::Field(f) = s else {
            return false;
        };
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = &mut cur[f.as_str()];
    }
    *cur = v;
    true
}

fn cell(c: &Column, o: &Value, now: i64) -> Value {
    let Some(v) = parse_path(&c.path).and_then(|p| pick(o, &p).into_iter().next()) else {
        return Value::Null;
    };
    match c.ty.as_str() {
        "date" => match v.as_str() {
            Some(_) => json!(super::rest::seconds(v)
                .map_or("<invalid>".to_string(), |t| human_duration(now - t))),
            None => Value::Null,
        },
        "integer" => match v {
            Value::Number(n) => n
                .as_i64()
                .map_or_else(|| json!(n.as_f64().unwrap_or(0.0) as i64), |i| json!(i)),
            _ => Value::Null,
        },
        "number" | "boolean" => v.clone(),
        _ => json!(shown(v)),
    }
}

/// A Table of custom objects, with the CRD's printer columns after the name.
pub fn table(
    c: &Custom,
    objects: &[Value],
    list_meta: Value,
    include: Include,
    headers: bool,
    now: i64,
) -> Value {
    let defs = headers.then(|| {
        let mut d = vec![json!({"name": "Name", "type": "string", "format": "name",
            "description": super::table::NAME_DESCRIPTION, "priority": 0})];
        d.extend(c.columns.iter().map(|col| {
            json!({"name": col.name, "type": col.ty, "format": col.format,
                   "description": col.description, "priority": col.priority})
        }));
        Value::Array(d)
    });
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![json!(o["metadata"]["name"].as_str().unwrap_or(""))];
            cells.extend(c.columns.iter().map(|col| cell(col, o, now)));
            super::table::row_of(cells, o, include)
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
           "columnDefinitions": defs.unwrap_or(Value::Null), "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                            "port": {"x-kubernetes-int-or-string": true},
                            "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}}},
                        "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
                    "additionalPrinterColumns": [
                        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                        {"name": "Ready", "type": "string",
                         "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]}]}})
    }

    #[test]
    fn a_good_crd_passes_and_gets_its_defaults_and_status() {
        let mut c = crd();
        defaults(&mut c);
        assert_eq!(c["spec"]["names"]["singular"], "widget");
        assert_eq!(c["spec"]["names"]["listKind"], "WidgetList");
        assert_eq!(validate(&c), vec![]);
        let st = status(&c, None, None, "2026-01-01T00:00:00Z");
        assert_eq!(st["conditions"][1]["type"], "Established");
        assert_eq!(st["conditions"][1]["status"], "True");
        assert_eq!(st["storedVersions"], json!(["v1"]));
    }

    #[test]
    fn bad_crds_are_refused_field_by_field() {
        let mut c = crd();
        c["metadata"]["name"] = json!("widgets.other.com");
        c["spec"]["scope"] = json!("Galaxy");
        c["spec"]["versions"][0]["storage"] = json!(false);
        c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["x"] = json!({"description": "no type"});
        c["spec"]["versions"][0]["selectableFields"] = json!([{"jsonPath": ".spec.items[0]"}]);
        defaults(&mut c);
        let fields: Vec<String> = validate(&c).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "spec.scope",
                "spec.versions",
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[x].type",
                "spec.versions[0].selectableFields[0].jsonPath"
            ]
        );
        let mut c = crd();
        c["spec"]["group"] = json!("apps");
        assert_eq!(validate(&c)[0].field, "spec.group");
    }

    #[test]
    fn what_kubernetes_forbids_is_refused() {
        let mut c = crd();
        defaults(&mut c);
        let v = &mut c["spec"]["versions"][0];
        v["name"] = json!("1v");
        v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tags"] =
            json!({"type": "array", "uniqueItems": true, "items": {"type": "string"}});
        v["subresources"] = json!({"scale": {"specReplicasPath": ".status.replicas",
                                             "statusReplicasPath": ".status.replicas"}});
        c["spec"]["group"] = json!("widgets.k8s.io");
        c["metadata"]["name"] = json!("widgets.widgets.k8s.io");
        let fields: Vec<String> = validate(&c).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "metadata.annotations[api-approved.kubernetes.io]",
                "spec.versions[0].name",
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[tags].uniqueItems",
                "spec.versions[0].subresources.scale.specReplicasPath"
            ]
        );
        // Once established, its scope and kind stay.
        let mut old = crd();
        defaults(&mut old);
        old["status"] = status(&old, None, None, "t");
        let mut new = old.clone();
        new["spec"]["scope"] = json!("Cluster");
        assert_eq!(validate_update(&new, &old)[0].field, "spec.scope");
        // And a later clash of names does not take it away.
        let st = status(&new, Some(&old), Some("taken".into()), "t");
        assert_eq!(st["conditions"][1]["status"], "True");
        assert_eq!(st["conditions"][0]["status"], "False");
    }

    #[test]
    fn a_second_crd_with_taken_names_is_not_established() {
        let mut a = crd();
        defaults(&mut a);
        let mut b = crd();
        b["metadata"]["name"] = json!("gadgets.example.com");
        b["spec"]["names"] = json!({"plural": "gadgets", "kind": "Widget"});
        defaults(&mut b);
        // Names only a CRD's status gives are held: a CRD still waiting holds none.
        assert_eq!(conflict(&b, std::slice::from_ref(&a)), None);
        a["status"] = status(&a, None, None, "t");
        let why = conflict(&b, &[a]).unwrap();
        assert!(why.contains("Widget"), "{why}");
        let st = status(&b, None, Some(why), "t");
        assert_eq!(st["conditions"][1]["status"], "False");
    }

    #[test]
    fn objects_are_pruned_defaulted_and_checked() {
        let c = crd();
        let schema = &c["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut o = json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": "w", "labels": {"a": "b"}},
            "spec": {"size": 3, "extra": 1, "labels": {"x": "y"}, "free": {"any": [1]},
                     "port": "http", "name": null}, "junk": true});
        let a = admit(schema, &mut o);
        assert_eq!(a.unknown, ["junk", "spec.extra"]);
        assert!(a.causes.is_empty(), "{:?}", a.causes);
        assert_eq!(o["spec"]["color"], "red");
        assert_eq!(o["spec"]["free"]["any"], json!([1]));
        assert_eq!(o["metadata"]["labels"]["a"], "b");
        assert!(o["spec"].get("name").is_none());

        let mut bad = json!({"spec": {"size": "big", "color": "green", "labels": {"x": 1},
                                      "port": 1.5, "name": "TooLongName"}});
        let a = admit(schema, &mut bad);
        let fields: Vec<(&str, &str)> = a
            .causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("spec.color", "FieldValueNotSupported"),
                ("spec.labels.x", "FieldValueTypeInvalid"),
                ("spec.name", "FieldValueTooLong"),
                ("spec.name", "FieldValueInvalid"),
                ("spec.port", "FieldValueTypeInvalid"),
                ("spec.size", "FieldValueTypeInvalid"),
            ]
        );
        let mut missing = json!({"spec": {"size": 11}});
        let a = admit(schema, &mut missing);
        assert_eq!(a.causes[0].field, "spec.size");
        assert!(
            a.causes[0].message.contains("less than or equal to 10"),
            "{:?}",
            a.causes
        );
        let mut none = json!({"spec": {}});
        assert_eq!(
            admit(schema, &mut none).causes,
            vec![Cause::required("spec.size")]
        );
    }

    #[test]
    fn printer_columns_follow_json_paths() {
        let mut c = crd();
        defaults(&mut c);
        c["status"] = status(&c, None, None, "t");
        let custom = custom(&c).unwrap();
        let o = json!({"metadata": {"name": "w", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"size": 3},
            "status": {"conditions": [{"type": "Synced", "status": "False"},
                                      {"type": "Ready", "status": "True"}]}});
        let now = super::super::rest::seconds(&json!("2026-01-01T00:02:30Z")).unwrap();
        let t = table(&custom, &[o], json!({}), Include::None, true, now);
        assert_eq!(t["rows"][0]["cells"], json!(["w", 3, "True", "2m30s"]));
        assert_eq!(t["columnDefinitions"][1]["name"], "Size");
        assert_eq!(parse_path("{.a['b.c'][*].d}").unwrap().len(), 4);
        assert!(parse_path(".a[").is_none());
        assert!(parse_path("spec").is_none());
    }

    #[test]
    fn the_registry_serves_established_crds_and_their_views() {
        let mut c = crd();
        defaults(&mut c);
        load(std::slice::from_ref(&c));
        assert!(
            find("example.com", "v1", "widgets").is_none(),
            "not established yet"
        );
        c["status"] = status(&c, None, None, "t");
        let mut v2 = c["spec"]["versions"][0].clone();
        v2["name"] = json!("v2");
        v2["storage"] = json!(false);
        c["spec"]["versions"][0]["served"] = json!(false);
        c["spec"]["versions"].as_array_mut().unwrap().push(v2);
        load(std::slice::from_ref(&c));
        // The storage version is not served, but its view is, over it.
        assert!(find("example.com", "v1", "widgets").is_none());
        assert!(stored("example.com", "v1", "widgets").is_some());
        assert_eq!(view("example.com", "v2", "widgets").unwrap().stored.1, "v1");
        assert_eq!(groups(), vec![("example.com", vec!["v2"])]);
        load(&[]);
        assert!(of("example.com", "widgets").is_none());
    }

    #[test]
    fn versions_sort_as_kubernetes_sorts_them() {
        let mut v = vec!["v1alpha1", "v2", "foo", "v1beta2", "v1", "v1beta1", "v10"];
        v.sort_by(|a, b| priority(a).cmp(&priority(b)).then(a.cmp(b)));
        assert_eq!(
            v,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
