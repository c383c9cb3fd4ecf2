//! Rules that depend on the pods already placed: inter-pod affinity and anti-affinity, and
//! topology spread constraints. A pod's rules are counted once over every node ([`view`]),
//! then each candidate node is judged ([`reject`]) and scored ([`score`]) against the counts.
//!
//! As kube-scheduler: a required affinity term is met on a node whose topology domain (the
//! value of the term's `topologyKey` label) runs a selected pod, and a pod that matches its
//! own terms may start a group no pod belongs to yet; a required anti-affinity term is broken
//! by a selected pod in the domain; a `DoNotSchedule` spread constraint allows a domain whose
//! count of selected pods, with this one, exceeds the smallest count by at most `maxSkew`
//! (counting only nodes the pod's node selector and affinity allow); and a placed pod's
//! required anti-affinity keeps the pods it selects out of its domain. Preferred terms and
//! `ScheduleAnyway` constraints only score. A term's namespaces are its `namespaces` and
//! those its `namespaceSelector` selects (`{}`: all), or the pod's own without either; the
//! selector is resolved against the namespaces' labels when the pod is placed
//! ([`Rules::resolve`]), so a placed pod's anti-affinity keeps the namespaces it selected then.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::fit::NodeInfo;
use crate::api::select::Labels;

/// A pod as other pods' rules see it.
#[derive(Debug, Clone, Default)]
pub struct PodMeta {
    /// `namespace/name`.
    pub id: String,
    pub ns: String,
    pub labels: Value,
    /// Its required anti-affinity terms, which keep other pods out of its domain too.
    anti: Vec<PodTerm>,
}

impl PodMeta {
    pub fn of(pod: &Value) -> PodMeta {
        let m = &pod["metadata"];
        let ns = m["namespace"].as_str().unwrap_or("default").to_string();
        PodMeta {
            id: format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
            anti: required(pod, "podAntiAffinity", &ns),
            ns,
            labels: m["labels"].clone(),
        }
    }

    /// Resolve its terms' namespace selectors against namespace labels.
    pub fn resolve(&mut self, labels: &HashMap<String, Value>) {
        for t in &mut self.anti {
            t.resolve(labels);
        }
    }

    /// Whether its presence keeps some pods out of its domain.
    pub fn repels(&self) -> bool {
        !self.anti.is_empty()
    }
}

/// A pod's required terms of `kind` (`podAffinity` or `podAntiAffinity`).
fn required(pod: &Value, kind: &str, ns: &str) -> Vec<PodTerm> {
    pod["spec"]["affinity"][kind]["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| PodTerm::parse(t, ns))
        .collect()
}

#[derive(Debug, Clone)]
struct PodTerm {
    /// None: a term without a selector, which selects nothing.
    selector: Option<Labels>,
    namespaces: Vec<String>,
    any_ns: bool,
    /// A `namespaceSelector` with labels to match, until resolved into `namespaces`.
    ns_selector: Option<Labels>,
    key: String,
}

impl PodTerm {
    fn parse(t: &Value, own_ns: &str) -> PodTerm {
        let mut namespaces: Vec<String> = t["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(String::from))
            .collect();
        let sel = &t["namespaceSelector"];
        // An empty selector (`{}`) selects every namespace; others wait for `resolve`.
        let ns_selector = sel.is_object().then(|| Labels::from_selector(sel));
        let any_ns = ns_selector.as_ref().is_some_and(Labels::is_empty);
        let ns_selector = ns_selector.filter(|l| !l.is_empty());
        if namespaces.is_empty() && sel.is_null() {
            namespaces.push(own_ns.to_string());
        }
        PodTerm {
            selector: t["labelSelector"]
                .is_object()
                .then(|| Labels::from_selector(&t["labelSelector"])),
            namespaces,
            any_ns,
            ns_selector,
            key: t["topologyKey"].as_str().unwrap_or("").to_string(),
        }
    }

    /// Add the namespaces the `namespaceSelector` selects, given each namespace's labels.
    fn resolve(&mut self, labels: &HashMap<String, Value>) {
        if let Some(sel) = self.ns_selector.take() {
            for (ns, l) in labels {
                if sel.matches(l) && !self.namespaces.contains(ns) {
                    self.namespaces.push(ns.clone());
                }
            }
        }
    }

    fn selects(&self, p: &PodMeta) -> bool {
        self.selector.as_ref().is_some_and(|s| s.matches(&p.labels))
            && (self.any_ns || self.namespaces.contains(&p.ns))
    }
}

#[derive(Debug, Clone)]
struct Spread {
    max_skew: u32,
    key: String,
    hard: bool,
    selector: Labels,
    min_domains: usize,
}

/// A pod's rules about other pods.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    affinity: Vec<PodTerm>,
    anti: Vec<PodTerm>,
    prefer: Vec<(i64, PodTerm)>,
    avoid: Vec<(i64, PodTerm)>,
    spread: Vec<Spread>,
}

impl Rules {
    /// Resolve its terms' namespace selectors against namespace labels (namespace name →
    /// its `metadata.labels`).
    pub fn resolve(&mut self, labels: &HashMap<String, Value>) {
        let terms = self.affinity.iter_mut().chain(self.anti.iter_mut());
        let weighted = self.prefer.iter_mut().chain(self.avoid.iter_mut());
        for t in terms.chain(weighted.map(|(_, t)| t)) {
            t.resolve(labels);
        }
    }

    pub fn parse(pod: &Value) -> Rules {
        let spec = &pod["spec"];
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let preferred = |kind: &str| -> Vec<(i64, PodTerm)> {
            spec["affinity"][kind]["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["weight"].as_i64().unwrap_or(0).max(0),
                        PodTerm::parse(&p["podAffinityTerm"], ns),
                    )
                })
                .collect()
        };
        let spread = spec["topologySpreadConstraints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                // matchLabelKeys: the pod's own values of those labels narrow the selector.
                let mut sel = c["labelSelector"].clone();
                if !sel.is_object() {
                    sel = json!({});
                }
                for k in c["matchLabelKeys"].as_array().into_iter().flatten() {
                    let k = k.as_str().unwrap_or("");
                    if let Some(v) = pod["metadata"]["labels"][k].as_str() {
                        sel["matchLabels"][k] = json!(v);
                    }
                }
                Spread {
                    max_skew: c["maxSkew"].as_u64().unwrap_or(1).max(1) as u32,
                    key: c["topologyKey"].as_str().unwrap_or("").to_string(),
                    hard: c["whenUnsatisfiable"] != "ScheduleAnyway",
                    selector: Labels::from_selector(&sel),
                    min_domains: c["minDomains"].as_u64().unwrap_or(1) as usize,
                }
            })
            .collect();
        Rules {
            affinity: required(pod, "podAffinity", ns),
            anti: required(pod, "podAntiAffinity", ns),
            prefer: preferred("podAffinity"),
            avoid: preferred("podAntiAffinity"),
            spread,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.affinity.is_empty()
            && self.anti.is_empty()
            && self.prefer.is_empty()
            && self.avoid.is_empty()
            && self.spread.is_empty()
    }
}

/// What one pod's rules need to know of the whole cluster.
#[derive(Debug, Default)]
pub struct View {
    /// Per affinity, anti-affinity, preferred and avoided term: the domains running a
    /// selected pod.
    affinity: Vec<HashSet<String>>,
    anti: Vec<HashSet<String>>,
    prefer: Vec<HashSet<String>>,
    avoid: Vec<HashSet<String>>,
    /// No pod anywhere matches any affinity term, and the pod matches them all itself.
    first_of_group: bool,
    /// Per spread constraint: selected pods per domain, and the smallest and largest count.
    spread: Vec<(HashMap<String, u32>, u32, u32)>,
    /// Whether the pod matches each spread constraint's selector itself.
    self_match: Vec<bool>,
    /// (topology key, value) domains that placed pods' anti-affinity keeps this pod out of.
    repelled: HashSet<(String, String)>,
}

fn domains<N: Borrow<NodeInfo>>(term: &PodTerm, nodes: &[N]) -> HashSet<String> {
    nodes
        .iter()
        .map(Borrow::borrow)
        .filter_map(|n: &NodeInfo| {
            let d = n.label(&term.key)?;
            n.pods().any(|p| term.selects(p)).then(|| d.to_string())
        })
        .collect()
}

/// Count, over all `nodes`, what `rules` ask about; `eligible` says which nodes the pod's
/// node selector and affinity allow (spreading counts only those).
pub fn view<N: Borrow<NodeInfo>>(
    rules: &Rules,
    me: &PodMeta,
    nodes: &[N],
    eligible: impl Fn(&NodeInfo) -> bool,
) -> View {
    let each = |terms: &[PodTerm]| terms.iter().map(|t| domains(t, nodes)).collect();
    let each_w = |terms: &[(i64, PodTerm)]| terms.iter().map(|(_, t)| domains(t, nodes)).collect();
    let affinity: Vec<HashSet<String>> = each(&rules.affinity);
    let first_of_group = !rules.affinity.is_empty()
        && affinity.iter().all(HashSet::is_empty)
        && rules.affinity.iter().all(|t| t.selects(me));
    let spread = rules
        .spread
        .iter()
        .map(|c| {
            let mut counts: HashMap<String, u32> = HashMap::new();
            for n in nodes.iter().map(Borrow::borrow).filter(|n| eligible(n)) {
                let Some(d) = n.label(&c.key) else { continue };
                let here = n
                    .pods()
                    .filter(|p| p.ns == me.ns && c.selector.matches(&p.labels))
                    .count() as u32;
                *counts.entry(d.to_string()).or_default() += here;
            }
            let min = if counts.len() < c.min_domains {
                0
            } else {
                counts.values().copied().min().unwrap_or(0)
            };
            let max = counts.values().copied().max().unwrap_or(0);
            (counts, min, max)
        })
        .collect();
    // The other way round: placed pods whose required anti-affinity selects this one.
    let mut repelled = HashSet::new();
    for n in nodes.iter().map(Borrow::borrow) {
        for p in n.pods().filter(|p| p.repels()) {
            for t in p.anti.iter().filter(|t| t.selects(me)) {
                if let Some(d) = n.label(&t.key) {
                    repelled.insert((t.key.clone(), d.to_string()));
                }
            }
        }
    }
    View {
        repelled,
        affinity,
        anti: each(&rules.anti),
        prefer: each_w(&rules.prefer),
        avoid: each_w(&rules.avoid),
        first_of_group,
        spread,
        self_match: rules
            .spread
            .iter()
            .map(|c| c.selector.matches(&me.labels))
            .collect(),
    }
}

/// Why `node` breaks the pod's required rules (kube-scheduler's wording), if it does.
pub fn reject(rules: &Rules, view: &View, node: &NodeInfo) -> Option<&'static str> {
    let in_any =
        |t: &PodTerm, ds: &HashSet<String>| node.label(&t.key).is_some_and(|d| ds.contains(d));
    if !view.first_of_group
        && rules
            .affinity
            .iter()
            .zip(&view.affinity)
            .any(|(t, ds)| !in_any(t, ds))
    {
        return Some("node(s) didn't match pod affinity rules");
    }
    if rules
        .anti
        .iter()
        .zip(&view.anti)
        .any(|(t, ds)| in_any(t, ds))
    {
        return Some("node(s) didn't match pod anti-affinity rules");
    }
    // After the pod's own terms, in kube-scheduler's order.
    if view
        .repelled
        .iter()
        .any(|(k, d)| node.label(k) == Some(d.as_str()))
    {
        return Some("node(s) didn't satisfy existing pods anti-affinity rules");
    }
    for (i, c) in rules.spread.iter().enumerate().filter(|(_, c)| c.hard) {
        let Some(d) = node.label(&c.key) else {
            return Some(
                "node(s) didn't match pod topology spread constraints (missing required label)",
            );
        };
        let (counts, min, _) = &view.spread[i];
        let count = counts.get(d).copied().unwrap_or(0) + u32::from(view.self_match[i]);
        if count.saturating_sub(*min) > c.max_skew {
            return Some("node(s) didn't match pod topology spread constraints");
        }
    }
    None
}

/// How well `node` suits the pod's preferences, 0 to 100 for each of preferred
/// (anti-)affinity and soft spreading (50 and 100 when the pod has none).
pub fn score(rules: &Rules, view: &View, node: &NodeInfo) -> (f64, f64) {
    let total: i64 = rules
        .prefer
        .iter()
        .chain(&rules.avoid)
        .map(|(w, _)| *w)
        .sum();
    let mut raw = 0;
    for ((w, t), ds) in rules.prefer.iter().zip(&view.prefer) {
        if node.label(&t.key).is_some_and(|d| ds.contains(d)) {
            raw += w;
        }
    }
    for ((w, t), ds) in rules.avoid.iter().zip(&view.avoid) {
        if node.label(&t.key).is_some_and(|d| ds.contains(d)) {
            raw -= w;
        }
    }
    let affinity = if total > 0 {
        (raw as f64 / total as f64 + 1.0) * 50.0
    } else {
        50.0
    };
    let soft: Vec<f64> = rules
        .spread
        .iter()
        .zip(&view.spread)
        .filter(|(c, _)| !c.hard)
        .map(|(c, (counts, _, max))| {
            let here = node
                .label(&c.key)
                .map_or(*max, |d| counts.get(d).copied().unwrap_or(0));
            f64::from(max - here.min(*max)) * 100.0 / f64::from((*max).max(1))
        })
        .collect();
    let spread = if soft.is_empty() {
        100.0
    } else {
        soft.iter().sum::<f64>() / soft.len() as f64
    };
    (affinity, spread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::fit::{needs, pick};

    /// Node `name` in `zone`, running pods labelled `app=` each of `apps`.
    fn node(name: &str, zone: &str, apps: &[&str]) -> NodeInfo {
        let mut n = NodeInfo::of(&json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": zone}},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "100"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}));
        for (i, app) in apps.iter().enumerate() {
            let p = json!({"metadata": {"name": format!("{name}-{i}"), "namespace": "default",
                "labels": {"app": app}}, "spec": {"containers": [{"name": "c", "image": "module:x"}]}});
            n.add(&needs(&p, &Value::Null));
        }
        n
    }

    fn pod(affinity: Value, spread: Value) -> super::super::fit::Needs {
        needs(
            &json!({"metadata": {"name": "new", "namespace": "default", "labels": {"app": "web"}},
                "spec": {"affinity": affinity, "topologySpreadConstraints": spread,
                    "containers": [{"name": "c", "image": "module:x"}]}}),
            &Value::Null,
        )
    }

    fn term(app: &str, key: &str) -> Value {
        json!({"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": key})
    }

    #[test]
    fn anti_affinity_keeps_replicas_apart() {
        let (a, b, c) = (
            node("a", "z1", &["web"]),
            node("b", "z1", &[]),
            node("c", "z2", &[]),
        );
        let nodes = [&a, &b, &c];
        let host = pod(
            json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                [term("web", "kubernetes.io/hostname")]}}),
            Value::Null,
        );
        let picks: Vec<usize> = (0..6).map(|t| pick(&host, &nodes, t).unwrap()).collect();
        assert!(
            !picks.contains(&0),
            "never beside the other web pod: {picks:?}"
        );
        let zone = pod(
            json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                [term("web", "zone")]}}),
            Value::Null,
        );
        assert_eq!(pick(&zone, &nodes, 0), Ok(2), "the only other zone");
        let full = [&a, &b];
        assert_eq!(
            pick(&zone, &full, 0),
            Err("0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.".into())
        );
    }

    /// Node `name` running one pod labelled `app=web` in each namespace of `nss`.
    fn node_in(name: &str, nss: &[&str]) -> NodeInfo {
        let mut n = node(name, name, &[]);
        for (i, ns) in nss.iter().enumerate() {
            let p = json!({"metadata": {"name": format!("{name}-{i}"), "namespace": ns,
                "labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "module:x"}]}});
            n.add(&needs(&p, &Value::Null));
        }
        n
    }

    #[test]
    fn namespace_selectors_pick_the_namespaces_a_term_counts() {
        let labels: HashMap<String, Value> = [
            (
                "default".to_string(),
                json!({"kubernetes.io/metadata.name": "default"}),
            ),
            ("shop".to_string(), json!({"team": "shop"})),
            ("ops".to_string(), json!({"team": "ops"})),
        ]
        .into();
        let (a, b, c) = (
            node_in("a", &["shop"]),
            node_in("b", &["ops"]),
            node_in("c", &[]),
        );
        let nodes = [&a, &b, &c];
        let anti = |extra: Value| {
            let mut t = term("web", "kubernetes.io/hostname");
            if let (Some(t), Some(e)) = (t.as_object_mut(), extra.as_object()) {
                t.extend(e.clone());
            }
            pod(
                json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [t]}}),
                Value::Null,
            )
            .with_namespaces(&labels)
        };
        // The nodes each rule allows, judged one node at a time.
        let allowed = |n: &super::super::fit::Needs| -> Vec<usize> {
            (0..3)
                .filter(|i| pick(n, &[nodes[*i]], 0).is_ok())
                .collect()
        };
        // No namespaces, no selector: only the pod's own (default), where no web pod runs.
        assert_eq!(allowed(&anti(Value::Null)), [0, 1, 2]);
        // Selecting team=shop keeps it off a only.
        let shop = anti(json!({"namespaceSelector": {"matchLabels": {"team": "shop"}}}));
        assert_eq!(allowed(&shop), [1, 2]);
        // A selector and a name add up.
        let both = anti(
            json!({"namespaceSelector": {"matchLabels": {"team": "shop"}},
                               "namespaces": ["ops"]}),
        );
        assert_eq!(allowed(&both), [2]);
        // {} is every namespace; a selector matching none counts none.
        assert_eq!(allowed(&anti(json!({"namespaceSelector": {}}))), [2]);
        let none = anti(json!({"namespaceSelector": {"matchLabels": {"team": "nobody"}}}));
        assert_eq!(allowed(&none), [0, 1, 2]);
        // Unresolved (no namespace labels known), a selector counts no namespace either.
        let unresolved = pod(
            json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "web"}},
                 "topologyKey": "kubernetes.io/hostname",
                 "namespaceSelector": {"matchLabels": {"team": "shop"}}}]}}),
            Value::Null,
        );
        assert_eq!(allowed(&unresolved), [0, 1, 2]);
    }

    #[test]
    fn a_placed_pods_anti_affinity_keeps_others_out() {
        let mut a = node("a", "z1", &[]);
        let loner = json!({"metadata": {"name": "loner", "namespace": "default",
            "labels": {"app": "db"}},
            "spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                [term("web", "kubernetes.io/hostname")]}},
                "containers": [{"name": "c", "image": "module:x"}]}});
        a.add(&needs(&loner, &Value::Null));
        let b = node("b", "z1", &[]);
        // An ordinary web pod has no rules of its own, yet stays off the loner's node.
        let web = pod(Value::Null, Value::Null);
        for t in 0..4 {
            assert_eq!(pick(&web, &[&a, &b], t), Ok(1));
        }
        assert_eq!(
            pick(&web, &[&a], 0),
            Err("0/1 nodes are available: 1 node(s) didn't satisfy existing pods anti-affinity rules.".into())
        );
    }

    #[test]
    fn affinity_follows_the_group_and_may_start_it() {
        let (a, b) = (node("a", "z1", &["db"]), node("b", "z2", &[]));
        let near_db = pod(
            json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                [term("db", "zone")]}}),
            Value::Null,
        );
        for t in 0..4 {
            assert_eq!(pick(&near_db, &[&b, &a], t), Ok(1));
        }
        // No db pod anywhere: nothing fits, unless the pod is the group's first.
        let lone = node("c", "z3", &[]);
        assert!(pick(&near_db, &[&b, &lone], 0)
            .unwrap_err()
            .contains("didn't match pod affinity rules"));
        let self_group = pod(
            json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                [term("web", "zone")]}}),
            Value::Null,
        );
        assert!(pick(&self_group, &[&b, &lone], 0).is_ok());
        // Preferred: scored, not required.
        let likes_db = pod(
            json!({"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution":
                [{"weight": 100, "podAffinityTerm": term("db", "zone")}]}}),
            Value::Null,
        );
        for t in 0..4 {
            assert_eq!(pick(&likes_db, &[&b, &a], t), Ok(1));
        }
    }

    #[test]
    fn spread_constraints_bound_the_skew() {
        let a = node("a", "z1", &["web", "web"]);
        let b = node("b", "z2", &["web"]);
        let c = node("c", "z2", &[]);
        let spread = |skew: u32, when: &str| {
            pod(
                Value::Null,
                json!([{"maxSkew": skew, "topologyKey": "zone", "whenUnsatisfiable": when,
                    "labelSelector": {"matchLabels": {"app": "web"}}}]),
            )
        };
        // z1 has 2, z2 has 1: one more in z1 would be a skew of 2.
        let hard = spread(1, "DoNotSchedule");
        for t in 0..4 {
            let i = pick(&hard, &[&a, &b, &c], t).unwrap();
            assert_ne!(i, 0, "z1 is full for a skew of 1");
        }
        assert!(pick(&spread(2, "DoNotSchedule"), &[&a], 0).is_ok());
        // A node without the key cannot be placed in the spread.
        let bare = NodeInfo::of(&json!({"metadata": {"name": "bare"},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "100"},
                "conditions": [{"type": "Ready", "status": "True"}]}}));
        assert_eq!(
            pick(&hard, &[&bare], 0),
            Err("0/1 nodes are available: 1 node(s) didn't match pod topology spread constraints (missing required label).".into())
        );
        // ScheduleAnyway only prefers the emptier domain: b (z2, one pod) over d (z1,
        // empty, but in the zone with two).
        let soft = spread(1, "ScheduleAnyway");
        let d = node("d", "z1", &[]);
        for t in 0..4 {
            assert_eq!(pick(&soft, &[&a, &d, &b], t), Ok(2));
        }
        assert!(pick(&soft, &[&a], 0).is_ok());
    }
}
