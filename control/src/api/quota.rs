//! Namespace limits: LimitRanges and ResourceQuotas, as the LimitRanger and ResourceQuota
//! admission plugins and the quota controller treat them.
//!
//! - A LimitRange's `Container` items give a new pod's containers their default requests and
//!   limits and bound them (min, max, maxLimitRequestRatio); `Pod` items bound the sums over
//!   a pod's containers, `PersistentVolumeClaim` items a claim's storage. A pod or claim out
//!   of bounds is refused (403) with each reason.
//! - A ResourceQuota's `spec.hard` caps what a namespace holds: object counts (`pods`,
//!   `services`, `count/deployments.apps`, …), the requests and limits of its pods that have
//!   not ended, claims' storage, node ports and load balancers. A create that would pass a
//!   cap is refused (403 `exceeded quota`), and one that is admitted adds its share to the
//!   quota's `status.used` in the same breath (a conditional write, retried), so creates
//!   racing each other cannot both take the last unit. An update that grows an object's share
//!   (a Service's node ports, a claim's storage) is checked and counted the same way. Deletes
//!   give back at the controller's next count (`controllers/quota.rs`), as in Kubernetes.
//!
//! Quantities are compared as thousandths (millicores, millibytes): exact for every
//! quantity Kubernetes writes.

use std::collections::BTreeMap;

use outpost_api::quantity::Quantity;
use serde_json::{json, Map, Value};

use super::resources::{self, Resource};

/// What a quota tracks, in thousandths of a unit.
pub type Usage = BTreeMap<String, u128>;

/// Quantities past this many thousandths are held at it: far beyond anything real, and
/// sums of a great many of them stay exact.
const MOST: u128 = 1 << 100;

/// A quantity (`500m`, `1.5`, `64Mi`, `1G`, `2e3`, `1Ei`) in thousandths of its unit,
/// exactly, rounded up as Kubernetes' `MilliValue` does; held at [`MOST`] past it.
pub fn milli(q: &Value) -> Option<u128> {
    let q = match q {
        Value::String(s) => Quantity::parse(s.trim())?,
        Value::Number(n) => Quantity::parse(&n.to_string())?,
        _ => return None,
    };
    if q.is_negative() {
        return None;
    }
    Some(q.milli().map_or(MOST, |m| (m as u128).min(MOST)))
}

/// `m` thousandths as a quantity for resource `name`: CPU in cores or millicores, bytes with
/// the largest binary suffix that divides them, counts as integers.
pub fn quantity(name: &str, m: u128) -> String {
    if !m.is_multiple_of(1000) {
        return format!("{m}m");
    }
    let n = m / 1000;
    let bytes = ["memory", "storage"].iter().any(|k| name.contains(k));
    if bytes && n > 0 {
        for (suffix, size) in [
            ("Ei", 60),
            ("Pi", 50),
            ("Ti", 40),
            ("Gi", 30),
            ("Mi", 20),
            ("Ki", 10),
        ] {
            if n.is_multiple_of(1u128 << size) {
                return format!("{}{suffix}", n >> size);
            }
        }
    }
    n.to_string()
}

fn map(v: &Value) -> impl Iterator<Item = (&String, &Value)> {
    v.as_object().into_iter().flatten()
}

/// The defaults Kubernetes gives a LimitRange's `Container` items: a default limit from the
/// max, a default request from the default limit, else from the min.
pub fn default_limit_range(o: &mut Value) {
    let Some(items) = o
        .get_mut("spec")
        .and_then(|s| s.get_mut("limits"))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for item in items.iter_mut().filter(|i| i["type"] == "Container") {
        let fill = |item: &mut Value, to: &str, from: &str| {
            let src: Vec<(String, Value)> = map(&item[from])
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if src.is_empty() {
                return;
            }
            if !item[to].is_object() {
                item[to] = json!({});
            }
            let dst = item[to].as_object_mut().expect("made an object");
            for (k, v) in src {
                dst.entry(k).or_insert(v);
            }
        };
        fill(item, "default", "max");
        fill(item, "defaultRequest", "default");
        fill(item, "defaultRequest", "min");
    }
}

/// A container whose resources can be filled in: an object, its `resources` and their
/// `requests` and `limits` objects or absent. Anything else is left for validation to refuse.
fn well_formed(c: &Value) -> bool {
    let r = &c["resources"];
    c.is_object()
        && (r.is_null() || r.is_object())
        && ["requests", "limits"]
            .iter()
            .all(|f| r[f].is_null() || r[f].is_object())
}

/// A pod's containers and init containers that are [`well_formed`].
fn containers_mut(spec: &mut Value) -> impl Iterator<Item = &mut Value> {
    let Some(m) = spec.as_object_mut() else {
        return Vec::new().into_iter();
    };
    let mut out = Vec::new();
    for (k, v) in m.iter_mut() {
        if k == "containers" || k == "initContainers" {
            if let Some(list) = v.as_array_mut() {
                out.extend(list.iter_mut().filter(|c| well_formed(c)));
            }
        }
    }
    out.into_iter()
}

/// A new pod under `ranges` (LimitRange objects): its containers' missing requests and
/// limits filled from the `Container` defaults, then every bound checked; the reasons it
/// breaks them (none: admitted).
pub fn limit_pod(ranges: &[Value], pod: &mut Value) -> Vec<String> {
    let items: Vec<&Value> = ranges
        .iter()
        .flat_map(|r| r["spec"]["limits"].as_array().into_iter().flatten())
        .collect();
    // A request left out is its limit, as the API defaults every pod, before any default
    // request: a container stating only limits stays Guaranteed.
    for c in containers_mut(&mut pod["spec"]) {
        let limits: Vec<(String, Value)> = map(&c["resources"]["limits"])
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if limits.is_empty() {
            continue;
        }
        if !c["resources"]["requests"].is_object() {
            c["resources"]["requests"] = json!({});
        }
        if let Some(r) = c["resources"]["requests"].as_object_mut() {
            for (k, v) in limits {
                r.entry(k).or_insert(v);
            }
        }
    }
    for item in items.iter().filter(|i| i["type"] == "Container") {
        for c in containers_mut(&mut pod["spec"]) {
            for (field, from) in [("limits", "default"), ("requests", "defaultRequest")] {
                for (k, v) in map(&item[from]) {
                    let r = &mut c["resources"];
                    if !r.is_object() {
                        *r = json!({});
                    }
                    if !r[field].is_object() {
                        r[field] = json!({});
                    }
                    let m = r[field].as_object_mut().expect("made an object");
                    m.entry(k.clone()).or_insert(v.clone());
                }
            }
        }
    }
    let mut why = Vec::new();
    let spec = &pod["spec"];
    let all: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
        .collect();
    for item in &items {
        match item["type"].as_str() {
            Some("Container") => {
                for c in &all {
                    bounds(item, "Container", &c["resources"], &mut why);
                }
            }
            Some("Pod") => {
                let mut sums = json!({"requests": {}, "limits": {}});
                for field in ["requests", "limits"] {
                    let mut total: BTreeMap<String, u128> = BTreeMap::new();
                    for c in spec["containers"].as_array().into_iter().flatten() {
                        for (k, v) in map(&c["resources"][field]) {
                            let t = total.entry(k.clone()).or_default();
                            *t = t.saturating_add(milli(v).unwrap_or(0));
                        }
                    }
                    for (k, m) in total {
                        sums[field][&k] = json!(quantity(&k, m));
                    }
                }
                bounds(item, "Pod", &sums, &mut why);
            }
            _ => {}
        }
    }
    why
}

/// A new claim under `ranges`: the reasons its storage request is out of their
/// `PersistentVolumeClaim` bounds.
pub fn limit_claim(ranges: &[Value], claim: &Value) -> Vec<String> {
    let mut why = Vec::new();
    for item in ranges
        .iter()
        .flat_map(|r| r["spec"]["limits"].as_array().into_iter().flatten())
        .filter(|i| i["type"] == "PersistentVolumeClaim")
    {
        bounds(
            item,
            "PersistentVolumeClaim",
            &claim["spec"]["resources"],
            &mut why,
        );
    }
    why
}

/// Check `res` (`{requests, limits}`) against one LimitRange item, as the LimitRanger words
/// its refusals.
fn bounds(item: &Value, scope: &str, res: &Value, why: &mut Vec<String>) {
    let get = |field: &str, k: &str| res[field].get(k).and_then(milli);
    let show = |field: &str, k: &str| {
        res[field][k]
            .as_str()
            .map_or_else(|| res[field][k].to_string(), String::from)
    };
    // One reason per bound and resource, the first found, as the LimitRanger gives.
    for (k, min) in map(&item["min"]) {
        let Some(lo) = milli(min) else { continue };
        let min = min.as_str().unwrap_or_default();
        let reason = match (get("requests", k), get("limits", k)) {
            (None, _) => {
                format!("minimum {k} usage per {scope} is {min}.  No request is specified")
            }
            (Some(r), _) if r < lo => format!(
                "minimum {k} usage per {scope} is {min}, but request is {}",
                show("requests", k)
            ),
            (_, Some(l)) if l < lo => format!(
                "minimum {k} usage per {scope} is {min}, but limit is {}",
                show("limits", k)
            ),
            _ => continue,
        };
        why.push(reason);
    }
    for (k, max) in map(&item["max"]) {
        let Some(hi) = milli(max) else { continue };
        let max = max.as_str().unwrap_or_default();
        let reason = match (get("limits", k), get("requests", k)) {
            // A claim is bounded by its request; it has no limit.
            (None, Some(r)) if scope == "PersistentVolumeClaim" && r > hi => format!(
                "maximum {k} usage per {scope} is {max}, but request is {}",
                show("requests", k)
            ),
            (None, _) if scope == "PersistentVolumeClaim" => continue,
            (None, _) => format!("maximum {k} usage per {scope} is {max}.  No limit is specified"),
            (Some(l), _) if l > hi => format!(
                "maximum {k} usage per {scope} is {max}, but limit is {}",
                show("limits", k)
            ),
            (_, Some(r)) if r > hi => format!(
                "maximum {k} usage per {scope} is {max}, but request is {}",
                show("requests", k)
            ),
            _ => continue,
        };
        why.push(reason);
    }
    for (k, ratio) in map(&item["maxLimitRequestRatio"]) {
        let (Some(ratio), Some(l)) = (milli(ratio), get("limits", k)) else {
            continue;
        };
        match get("requests", k) {
            Some(r) if r > 0 && l.saturating_mul(1000) > ratio.saturating_mul(r) => why.push(format!(
                "{k} max limit to request ratio per {scope} is {}, but provided ratio is {:.6}",
                quantity("", ratio),
                l as f64 / r as f64
            )),
            None | Some(0) => why.push(format!(
                "{k} max limit to request ratio per {scope} is {}, but no request is specified or request is 0",
                quantity("", ratio)
            )),
            _ => {}
        }
    }
}

/// The resource whose objects a quota's `name` counts or sums, if it knows the name.
pub fn counted(name: &str) -> Option<&'static Resource> {
    let core = |plural| resources::find("", "v1", plural);
    match name {
        "pods" | "cpu" | "memory" | "ephemeral-storage" => core("pods"),
        n if n.starts_with("requests.") && n != "requests.storage" => core("pods"),
        n if n.starts_with("limits.") => core("pods"),
        "services" | "services.nodeports" | "services.loadbalancers" => core("services"),
        "persistentvolumeclaims" | "requests.storage" => core("persistentvolumeclaims"),
        n if n.contains(".storageclass.storage.k8s.io/") => core("persistentvolumeclaims"),
        "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas" => core(name),
        n => {
            let what = n.strip_prefix("count/")?;
            let (plural, group) = what.split_once('.').unwrap_or((what, ""));
            // A CRD's objects are counted by any served version (`count/widgets.example.com`).
            resources::RESOURCES
                .iter()
                .find(|r| r.plural == plural && r.group == group && r.stored)
                .or_else(|| super::crd::of(group, plural).map(|c| c.res))
        }
    }
}

/// Whether a pod spec's affinity or anti-affinity to other pods looks beyond its own
/// namespace (a term naming namespaces, or with a namespace selector, even an empty one).
fn cross_namespace(spec: &Value) -> bool {
    let aff = &spec["affinity"];
    ["podAffinity", "podAntiAffinity"].iter().any(|k| {
        let a = &aff[*k];
        let required = a["requiredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .into_iter()
            .flatten();
        let preferred = a["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| &w["podAffinityTerm"]);
        required.chain(preferred).any(|t| {
            t["namespaces"].as_array().is_some_and(|n| !n.is_empty())
                || t["namespaceSelector"].is_object()
        })
    })
}

/// Whether quota `q`'s scopes take in pod `pod` (a quota with scopes counts pods only).
pub fn in_scope(q: &Value, pod: Option<&Value>) -> bool {
    let scopes: Vec<(&str, &str, Vec<&str>)> = q["spec"]["scopes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s.as_str()?, "Exists", vec![])))
        .chain(
            q["spec"]["scopeSelector"]["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let values = e["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    Some((e["scopeName"].as_str()?, e["operator"].as_str()?, values))
                }),
        )
        .collect();
    if scopes.is_empty() {
        return true;
    }
    let Some(pod) = pod else {
        return false;
    };
    let spec = &pod["spec"];
    scopes.iter().all(|(scope, op, values)| {
        let holds = match *scope {
            "Terminating" => spec["activeDeadlineSeconds"].is_number(),
            "NotTerminating" => !spec["activeDeadlineSeconds"].is_number(),
            "BestEffort" => super::admit::qos_class(spec) == "BestEffort",
            "NotBestEffort" => super::admit::qos_class(spec) != "BestEffort",
            "CrossNamespacePodAffinity" => cross_namespace(spec),
            "PriorityClass" => {
                let class = spec["priorityClassName"].as_str().unwrap_or("");
                return match *op {
                    "In" => values.contains(&class),
                    "NotIn" => !values.contains(&class),
                    "Exists" => !class.is_empty(),
                    "DoesNotExist" => class.is_empty(),
                    _ => false,
                };
            }
            _ => false,
        };
        match *op {
            "DoesNotExist" => !holds,
            _ => holds,
        }
    })
}

/// A pod's effective amount of `resource` in `field` (`requests` or `limits`): the sum over
/// its containers or the largest of its init containers, whichever is more; a request left
/// out is its limit, as the API defaults it.
fn pod_amount(spec: &Value, field: &str, resource: &str) -> u128 {
    let of = |c: &Value| {
        let r = &c["resources"];
        let v = r[field].get(resource).or_else(|| {
            (field == "requests")
                .then(|| r["limits"].get(resource))
                .flatten()
        });
        v.and_then(milli).unwrap_or(0)
    };
    let list = |k: &str| spec[k].as_array().into_iter().flatten();
    let sum = list("containers").map(of).fold(0u128, u128::saturating_add);
    sum.max(list("initContainers").map(of).max().unwrap_or(0))
}

/// What object `o` (a `res`) adds to quota resource `name`; `None` if `name` is not about
/// it (or it is a pod that has ended).
pub fn share(name: &str, res: &Resource, o: &Value) -> Option<u128> {
    if counted(name).is_none_or(|r| !std::ptr::eq(r, res)) {
        return None;
    }
    let one = Some(1000);
    match (res.kind, name) {
        ("Pod", _) if matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) => {
            Some(0)
        }
        ("Pod", "pods" | "count/pods") => one,
        ("Pod", n) => {
            let (field, r) = n.split_once('.').unwrap_or(("requests", n));
            Some(pod_amount(&o["spec"], field, r))
        }
        ("Service", "services.nodeports") => {
            let ty = o["spec"]["type"].as_str().unwrap_or("ClusterIP");
            let ports = o["spec"]["ports"].as_array().map_or(0, Vec::len) as u128;
            Some(if matches!(ty, "NodePort" | "LoadBalancer") {
                ports * 1000
            } else {
                0
            })
        }
        ("Service", "services.loadbalancers") => Some(if o["spec"]["type"] == "LoadBalancer" {
            1000
        } else {
            0
        }),
        ("PersistentVolumeClaim", "requests.storage") => o["spec"]["resources"]["requests"]
            .get("storage")
            .and_then(milli)
            .or(Some(0)),
        ("PersistentVolumeClaim", n) if n.contains(".storageclass.storage.k8s.io/") => {
            let (class, what) = n.split_once(".storageclass.storage.k8s.io/")?;
            if o["spec"]["storageClassName"] != class {
                return Some(0);
            }
            match what {
                "persistentvolumeclaims" => one,
                "requests.storage" => o["spec"]["resources"]["requests"]
                    .get("storage")
                    .and_then(milli)
                    .or(Some(0)),
                _ => Some(0),
            }
        }
        _ => one,
    }
}

/// The compute resources a quota caps that every container of a new pod must state, and the
/// containers that do not: `must specify limits.cpu for: web; …`.
pub fn unstated(q: &Value, pod: &Value) -> Option<String> {
    let mut out = Vec::new();
    for name in map(&q["spec"]["hard"]).map(|(k, _)| k.as_str()) {
        let (field, r) = match name {
            "cpu" | "memory" => ("requests", name),
            n => match n.split_once('.') {
                Some((f @ ("requests" | "limits"), r)) if r != "storage" => (f, r),
                _ => continue,
            },
        };
        if !matches!(r, "cpu" | "memory") {
            continue;
        }
        let missing: Vec<&str> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
            .filter(|c| {
                let res = &c["resources"];
                res[field].get(r).is_none()
                    && !(field == "requests" && res["limits"].get(r).is_some())
            })
            .filter_map(|c| c["name"].as_str())
            .collect();
        if !missing.is_empty() {
            out.push(format!("{name} for: {}", missing.join(",")));
        }
    }
    (!out.is_empty()).then(|| format!("must specify {}", out.join("; ")))
}

/// What the objects in namespace `ns` use of each of quota `q`'s caps, counted afresh from
/// the store (this member's copy).
pub async fn count(api: &super::Api, ns: &str, q: &Value) -> Result<Usage, crate::store::Error> {
    let mut objs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut usage = Usage::new();
    for name in map(&q["spec"]["hard"]).map(|(k, _)| k) {
        let Some(res) = counted(name) else {
            continue;
        };
        let prefix = res.prefix(Some(ns));
        if !objs.contains_key(&prefix) {
            let page = api
                .store
                .range(&prefix, None, 0, crate::store::Consistency::Serializable)
                .await?;
            let list = page
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                .collect();
            objs.insert(prefix.clone(), list);
        }
        let pods = res.kind == "Pod" && res.group.is_empty();
        let total = objs[&prefix]
            .iter()
            .filter(|o| in_scope(q, pods.then_some(*o)))
            .filter_map(|o| share(name, res, o))
            .fold(0, u128::saturating_add);
        usage.insert(name.clone(), total);
    }
    Ok(usage)
}

/// A quota's `status.used` in thousandths, if it is known for every cap the spec names
/// (a cap just added is not: then the quota must be counted afresh).
pub fn used(q: &Value) -> Option<Usage> {
    let u = q["status"]["used"].as_object()?;
    if q["status"]["hard"] != q["spec"]["hard"]
        || map(&q["spec"]["hard"]).any(|(k, _)| !u.contains_key(k))
    {
        return None;
    }
    Some(
        u.iter()
            .filter_map(|(k, v)| Some((k.clone(), milli(v)?)))
            .collect(),
    )
}

/// `status` for quota `q` with `used`: its hard caps as the spec says, what is used of each.
pub fn status(q: &Value, used: &Usage) -> Value {
    let hard = q["spec"]["hard"].clone();
    let used: Map<String, Value> = map(&hard)
        .map(|(k, _)| {
            let m = used.get(k).copied().unwrap_or(0);
            (k.clone(), json!(quantity(k, m)))
        })
        .collect();
    json!({"hard": hard, "used": used})
}

/// Which caps of `q` taking `add` on top of `used` would pass; `exceeded quota: …` if any.
pub fn exceeded(q: &Value, used: &Usage, add: &Usage) -> Option<String> {
    // (name, requested, used, hard) of each cap passed.
    let mut over: Vec<(&str, [u128; 3])> = Vec::new();
    for (k, hard) in map(&q["spec"]["hard"]) {
        let (Some(n), Some(hard)) = (add.get(k).filter(|n| **n > 0), milli(hard)) else {
            continue;
        };
        let u = used.get(k).copied().unwrap_or(0);
        if u.saturating_add(*n) > hard {
            over.push((k, [*n, u, hard]));
        }
    }
    if over.is_empty() {
        return None;
    }
    let list = |i: usize| {
        over.iter()
            .map(|(k, v)| format!("{k}={}", quantity(k, v[i])))
            .collect::<Vec<_>>()
            .join(",")
    };
    Some(format!(
        "exceeded quota: {}, requested: {}, used: {}, limited: {}",
        q["metadata"]["name"].as_str().unwrap_or(""),
        list(0),
        list(1),
        list(2)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_thousandths() {
        assert_eq!(milli(&json!("500m")), Some(500));
        assert_eq!(milli(&json!("1.5")), Some(1500));
        assert_eq!(milli(&json!(2)), Some(2000));
        assert_eq!(milli(&json!("64Mi")), Some(64 * 1024 * 1024 * 1000));
        assert_eq!(milli(&json!("1G")), Some(1_000_000_000_000));
        assert_eq!(milli(&json!("2e3")), Some(2_000_000));
        assert_eq!(milli(&json!("1E")), Some(1_000_000_000_000_000_000_000));
        // Exact where floating point would round up a thousandth too many.
        assert_eq!(milli(&json!("350m")), Some(350));
        assert_eq!(milli(&json!("700m")), Some(700));
        assert_eq!(milli(&json!("9m")), Some(9));
        assert_eq!(milli(&json!("16.1")), Some(16100));
        assert_eq!(milli(&json!("0.5Ki")), Some(512_000));
        assert_eq!(milli(&json!("1Ei")), Some((1u128 << 60) * 1000));
        assert_eq!(milli(&json!("1e-3")), Some(1));
        assert_eq!(milli(&json!("100n")), Some(1));
        assert_eq!(milli(&json!("+1")), Some(1000));
        assert_eq!(milli(&json!("1e36")), Some(MOST));
        assert_eq!(milli(&json!("9".repeat(60))), Some(MOST));
        assert_eq!(milli(&json!("1.")), Some(1000));
        assert_eq!(milli(&json!(".")), None);
        assert_eq!(milli(&json!("1Q")), None);
        assert_eq!(milli(&json!("x")), None);
        assert_eq!(milli(&json!("-1")), None);
        assert_eq!(quantity("requests.cpu", 1500), "1500m");
        assert_eq!(quantity("requests.cpu", 2000), "2");
        assert_eq!(quantity("limits.memory", 128 * 1024 * 1024 * 1000), "128Mi");
        assert_eq!(quantity("requests.memory", 1_000_000_000_000), "1000000000");
        assert_eq!(quantity("pods", 3000), "3");
    }

    #[test]
    fn limit_ranges_default_and_bound_containers() {
        let mut lr = json!({"spec": {"limits": [{"type": "Container",
            "max": {"memory": "1Gi"}, "min": {"cpu": "100m"},
            "default": {"cpu": "500m"}}]}});
        default_limit_range(&mut lr);
        let item = &lr["spec"]["limits"][0];
        assert_eq!(item["default"], json!({"cpu": "500m", "memory": "1Gi"}));
        assert_eq!(
            item["defaultRequest"],
            json!({"cpu": "500m", "memory": "1Gi"})
        );
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"memory": "256Mi"}}},
            {"name": "b"}]}});
        assert!(limit_pod(std::slice::from_ref(&lr), &mut pod).is_empty());
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"limits": {"memory": "256Mi", "cpu": "500m"},
                   "requests": {"cpu": "500m", "memory": "256Mi"}})
        );
        assert_eq!(
            pod["spec"]["containers"][1]["resources"]["limits"]["memory"],
            "1Gi"
        );
        let mut big = json!({"spec": {"containers": [{"name": "a",
            "resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "50m"}}}]}});
        assert_eq!(
            limit_pod(std::slice::from_ref(&lr), &mut big),
            [
                "minimum cpu usage per Container is 100m, but request is 50m",
                "maximum memory usage per Container is 1Gi, but limit is 2Gi"
            ]
        );
        // Malformed pods and ranges are left for validation, not a panic.
        let mut odd = json!({"spec": {"containers": ["x", {"name": "a", "resources": "y"},
            {"name": "b", "resources": {"limits": 3}}]}});
        let before = odd.clone();
        limit_pod(std::slice::from_ref(&lr), &mut odd);
        assert_eq!(odd, before);
        let mut bad = json!({"spec": "x"});
        default_limit_range(&mut bad);
        assert_eq!(bad, json!({"spec": "x"}));
        let pods = json!({"spec": {"limits": [{"type": "Pod", "max": {"cpu": "1"}},
            {"type": "Container", "maxLimitRequestRatio": {"cpu": "2"}}]}});
        let mut two = json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"cpu": "800m"}, "requests": {"cpu": "300m"}}},
            {"name": "b", "resources": {"limits": {"cpu": "400m"}, "requests": {"cpu": "400m"}}}]}});
        let why = limit_pod(&[pods], &mut two);
        assert_eq!(why.len(), 2, "{why:?}");
        assert_eq!(why[0], "maximum cpu usage per Pod is 1, but limit is 1200m");
        assert_eq!(
            why[1],
            "cpu max limit to request ratio per Container is 2, but provided ratio is 2.666667"
        );
        let claims = json!({"spec": {"limits": [{"type": "PersistentVolumeClaim",
            "max": {"storage": "2Gi"}, "min": {"storage": "1Gi"}}]}});
        let claim = |s: &str| json!({"spec": {"resources": {"requests": {"storage": s}}}});
        assert!(limit_claim(std::slice::from_ref(&claims), &claim("1Gi")).is_empty());
        assert_eq!(
            limit_claim(std::slice::from_ref(&claims), &claim("5Gi")),
            ["maximum storage usage per PersistentVolumeClaim is 2Gi, but request is 5Gi"]
        );
    }

    #[test]
    fn quotas_count_and_sum_what_they_name() {
        let pods = resources::find("", "v1", "pods").unwrap();
        let svcs = resources::find("", "v1", "services").unwrap();
        let pod = json!({"spec": {"containers": [
                {"name": "a", "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "250m"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}]},
            "status": {"phase": "Pending"}});
        assert_eq!(share("pods", pods, &pod), Some(1000));
        assert_eq!(share("count/pods", pods, &pod), Some(1000));
        assert_eq!(share("requests.cpu", pods, &pod), Some(2000));
        assert_eq!(share("limits.cpu", pods, &pod), Some(1000));
        assert_eq!(share("memory", pods, &pod), Some(64 * 1024 * 1024 * 1000));
        assert_eq!(share("services", pods, &pod), None);
        let mut done = pod.clone();
        done["status"]["phase"] = json!("Succeeded");
        assert_eq!(share("pods", pods, &done), Some(0));
        let np = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 443}]}});
        assert_eq!(share("services.nodeports", svcs, &np), Some(2000));
        assert_eq!(share("services", svcs, &np), Some(1000));
        let deploys = resources::find("apps", "v1", "deployments").unwrap();
        assert!(std::ptr::eq(
            counted("count/deployments.apps").unwrap(),
            deploys
        ));
        assert!(counted("count/nothings").is_none());

        let q = json!({"metadata": {"name": "q"}, "spec": {"hard": {"pods": "2", "limits.cpu": "2",
            "requests.memory": "1Gi"}}});
        assert_eq!(
            unstated(&q, &pod).as_deref(),
            Some("must specify limits.cpu for: i,b; requests.memory for: i,b")
        );
        let used: Usage = [("pods".to_string(), 2000)].into();
        let add: Usage = [("pods".to_string(), 1000), ("limits.cpu".to_string(), 1000)].into();
        assert_eq!(
            exceeded(&q, &used, &add).as_deref(),
            Some("exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2")
        );
        assert_eq!(exceeded(&q, &Usage::new(), &add), None);
        assert_eq!(
            status(&q, &used),
            json!({"hard": q["spec"]["hard"], "used": {"pods": "2", "limits.cpu": "0",
                "requests.memory": "0"}})
        );
        let counted = json!({"spec": {"hard": {"pods": "3"}},
            "status": {"hard": {"pods": "3"}, "used": {"pods": "2"}}});
        assert_eq!(self::used(&counted), Some(used));
        // A cap added since the last count: unknown until counted again.
        let mut grown = counted.clone();
        grown["spec"]["hard"]["secrets"] = json!("1");
        assert_eq!(self::used(&grown), None);

        let scoped = json!({"spec": {"scopes": ["BestEffort"], "hard": {"pods": "1"}}});
        assert!(!in_scope(&scoped, Some(&pod)));
        assert!(in_scope(
            &scoped,
            Some(&json!({"spec": {"containers": [{"name": "a"}]}}))
        ));
        assert!(!in_scope(&scoped, None));
        let by_class = json!({"spec": {"scopeSelector": {"matchExpressions": [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}]}}});
        assert!(in_scope(
            &by_class,
            Some(&json!({"spec": {"priorityClassName": "high"}}))
        ));
        assert!(!in_scope(&by_class, Some(&pod)));
        let cross = json!({"spec": {"scopes": ["CrossNamespacePodAffinity"]}});
        let term = |t: Value| {
            json!({"spec": {"affinity": {"podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "podAffinityTerm": t}]}}}})
        };
        assert!(in_scope(
            &cross,
            Some(&term(json!({"namespaceSelector": {}})))
        ));
        assert!(in_scope(&cross, Some(&term(json!({"namespaces": ["b"]})))));
        assert!(!in_scope(&cross, Some(&term(json!({"topologyKey": "x"})))));
        assert!(!in_scope(&cross, Some(&pod)));
    }
}
