//! What the scheduler decides, as pure functions over a snapshot: which nodes can take a pod
//! (filters) and which of those is best (scores). [`super`] keeps the snapshot from the
//! store's watch and does the binding.
//!
//! Filters, in kube-scheduler's order: node ready, cordon, the runtime the pod needs, taints
//! (NoSchedule, NoExecute), node selector and required node affinity (the RuntimeClass's
//! selector too), the node affinity of the pod's bound volumes, host ports, requests against
//! allocatable (cpu, memory, ephemeral storage, pods, extended resources). Scores, with
//! kube-scheduler's default weights: least allocated and balanced allocation (1 each),
//! preferred node affinity (2), PreferNoSchedule taints (3), spreading a controller's pods across nodes (2), the share of the pod's modules
//! the node has already (1). Ties go round-robin. Rules about other pods (inter-pod affinity,
//! topology spread constraints) are [`topo`]'s: a filter and two scores (2 each) on top of
//! these.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use outpost_api::quantity::{bytes, millicores, Quantity};
use serde_json::{Map, Value};

use super::topo::{self, PodMeta, Rules};

/// What kube-scheduler scores a pod as when it requests no CPU or memory.
const DEFAULT_CPU: u64 = 100;
const DEFAULT_MEMORY: u64 = 200 << 20;

/// CPU in millicores, memory and ephemeral storage in bytes, a count of pods, and extended
/// resources (`example.com/dongle`, `hugepages-2Mi`) in whole units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu: u64,
    pub memory: u64,
    pub pods: u64,
    pub storage: u64,
    pub extended: Vec<(String, u64)>,
}

impl Resources {
    fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.pods += o.pods;
        self.storage += o.storage;
        for (k, n) in &o.extended {
            match self.extended.iter_mut().find(|(e, _)| e == k) {
                Some((_, have)) => *have += n,
                None => self.extended.push((k.clone(), *n)),
            }
        }
    }
    fn sub(&mut self, o: &Resources) {
        self.cpu = self.cpu.saturating_sub(o.cpu);
        self.memory = self.memory.saturating_sub(o.memory);
        self.pods = self.pods.saturating_sub(o.pods);
        self.storage = self.storage.saturating_sub(o.storage);
        for (k, n) in &o.extended {
            if let Some((_, have)) = self.extended.iter_mut().find(|(e, _)| e == k) {
                *have = have.saturating_sub(*n);
            }
        }
        self.extended.retain(|(_, n)| *n > 0);
    }
    fn extended(&self, name: &str) -> u64 {
        self.extended
            .iter()
            .find(|(e, _)| e == name)
            .map_or(0, |(_, n)| *n)
    }
}

/// Resources a scheduler counts by name alone: all but CPU, memory, ephemeral storage and
/// pods.
fn is_extended(name: &str) -> bool {
    !matches!(name, "cpu" | "memory" | "ephemeral-storage" | "pods")
}

/// A quantity of an extended resource in whole units (rounded up).
fn units(q: &str) -> Option<u64> {
    Quantity::parse(q)?
        .scaled(0)
        .and_then(|n| u64::try_from(n).ok())
}

/// A host port a container asks for: protocol, port, host IP ("" for all addresses).
pub type HostPort = (String, u16, String);

#[derive(Debug, Clone, PartialEq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

#[derive(Debug, Clone, Default)]
pub struct Toleration {
    pub key: String,
    pub exists: bool,
    pub value: String,
    pub effect: String,
}

impl Toleration {
    fn tolerates(&self, t: &Taint) -> bool {
        (self.effect.is_empty() || self.effect == t.effect)
            && (self.key.is_empty() && self.exists || self.key == t.key)
            && (self.exists || self.value == t.value)
    }
}

/// One node selector term: every expression must hold.
#[derive(Debug, Clone, Default)]
pub struct Term {
    exprs: Vec<Expr>,
    fields: Vec<Expr>,
}

#[derive(Debug, Clone)]
struct Expr {
    key: String,
    op: String,
    values: Vec<String>,
}

impl Expr {
    fn holds(&self, value: Option<&str>) -> bool {
        let num = |s: &str| s.parse::<i64>().ok();
        match self.op.as_str() {
            "In" => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            "Gt" | "Lt" => match (
                value.and_then(num),
                self.values.first().and_then(|x| num(x)),
            ) {
                (Some(v), Some(x)) => (self.op == "Gt" && v > x) || (self.op == "Lt" && v < x),
                _ => false,
            },
            _ => false,
        }
    }
}

impl Term {
    fn parse(v: &Value) -> Term {
        let exprs = |k: &str| {
            v[k].as_array()
                .into_iter()
                .flatten()
                .map(|e| Expr {
                    key: str_of(&e["key"]),
                    op: str_of(&e["operator"]),
                    values: e["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(str_of)
                        .collect(),
                })
                .collect()
        };
        Term {
            exprs: exprs("matchExpressions"),
            fields: exprs("matchFields"),
        }
    }

    fn matches(&self, node: &NodeInfo) -> bool {
        // A term with nothing in it matches no node, as in Kubernetes.
        (!self.exprs.is_empty() || !self.fields.is_empty())
            && self
                .exprs
                .iter()
                .all(|e| e.holds(node.labels.get(&e.key).and_then(Value::as_str)))
            && self
                .fields
                .iter()
                .all(|e| e.key == "metadata.name" && e.holds(Some(node.name.as_str())))
    }
}

/// A PersistentVolume's required node affinity (`spec.nodeAffinity.required`), if it has one.
pub fn volume_terms(pv: &Value) -> Option<Vec<Term>> {
    pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        .as_array()
        .map(|ts| ts.iter().map(Term::parse).collect())
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

/// What a pod asks of a node, read once from the pod.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    pub requests: Resources,
    /// CPU and memory with kube-scheduler's stand-ins for zero requests, for scoring.
    pub scored: (u64, u64),
    pub host_ports: Vec<HostPort>,
    /// The uid of the controller that owns the pod, for spreading.
    pub owner: Option<String>,
    /// The pod's node selector and its RuntimeClass's.
    selector: Vec<(String, String)>,
    /// Required node affinity: any term.
    required: Option<Vec<Term>>,
    preferred: Vec<(i64, Term)>,
    tolerations: Vec<Toleration>,
    pub oci: bool,
    /// The pod as other pods' rules see it, and its own rules about other pods.
    pub meta: PodMeta,
    pub rules: Rules,
    /// Its containers' images.
    images: Vec<String>,
    /// The node affinity of each PersistentVolume its claims are bound to: every one must
    /// match (any of its terms).
    volumes: Vec<Vec<Term>>,
}

/// A pod runs on the Wasm runtime when it names the `wasm` RuntimeClass or all its images
/// are modules from the module store; anything else needs an OCI runtime.
pub fn needs_oci(pod: &Value) -> bool {
    if pod["spec"]["runtimeClassName"] == "wasm" {
        return false;
    }
    ["initContainers", "containers"].iter().any(|k| {
        pod["spec"][k].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| !c["image"].as_str().unwrap_or("").starts_with("module:"))
        })
    })
}

impl Needs {
    /// The same, with its RuntimeClass's `scheduling.nodeSelector` added.
    pub fn with_class(&self, class_selector: &Value) -> Needs {
        let mut n = self.clone();
        n.selector.extend(pairs(class_selector));
        n
    }

    /// The same, with its volumes' node affinity (each a list of terms, any of which holds).
    pub fn with_volumes(mut self, volumes: Vec<Vec<Term>>) -> Needs {
        self.volumes = volumes;
        self
    }

    /// Its pod-affinity terms' `namespaceSelector`s resolved against the namespaces' labels
    /// (namespace name → `metadata.labels`).
    pub fn with_namespaces(mut self, labels: &HashMap<String, Value>) -> Needs {
        self.rules.resolve(labels);
        self.meta.resolve(labels);
        self
    }
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), str_of(v)))
        .collect()
}

/// A container's requests (its limits where it states no request, as the API defaults).
fn container_requests(c: &Value) -> Resources {
    let r = &c["resources"];
    let get = |k: &str, parse: fn(&str) -> Option<u64>| {
        r["requests"][k]
            .as_str()
            .or(r["limits"][k].as_str())
            .and_then(parse)
            .unwrap_or(0)
    };
    let mut extended: Vec<(String, u64)> = Vec::new();
    for field in ["requests", "limits"] {
        for (k, v) in r[field].as_object().into_iter().flatten() {
            if is_extended(k) && !extended.iter().any(|(e, _)| e == k) {
                let n = v.as_str().and_then(units).unwrap_or(0);
                if n > 0 {
                    extended.push((k.clone(), n));
                }
            }
        }
    }
    Resources {
        cpu: get("cpu", millicores),
        memory: get("memory", bytes),
        pods: 0,
        storage: get("ephemeral-storage", bytes),
        extended,
    }
}

/// Read what `pod` needs; `class_selector` is its RuntimeClass's `scheduling.nodeSelector`.
pub fn needs(pod: &Value, class_selector: &Value) -> Needs {
    let spec = &pod["spec"];
    let mut requests = Resources {
        pods: 1,
        ..Resources::default()
    };
    let (mut scored_cpu, mut scored_mem) = (0u64, 0u64);
    let mut host_ports = vec![];
    for c in spec["containers"].as_array().into_iter().flatten() {
        let r = container_requests(c);
        scored_cpu += if r.cpu == 0 { DEFAULT_CPU } else { r.cpu };
        scored_mem += if r.memory == 0 {
            DEFAULT_MEMORY
        } else {
            r.memory
        };
        requests.add(&r);
        for p in c["ports"].as_array().into_iter().flatten() {
            let port = p["hostPort"].as_u64().and_then(|p| u16::try_from(p).ok());
            if let Some(port) = port.filter(|p| *p > 0) {
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                host_ports.push((proto, port, str_of(&p["hostIP"])));
            }
        }
    }
    // Init containers run one at a time, before the others: the largest one counts.
    for c in spec["initContainers"].as_array().into_iter().flatten() {
        let r = container_requests(c);
        requests.cpu = requests.cpu.max(r.cpu);
        requests.memory = requests.memory.max(r.memory);
        requests.storage = requests.storage.max(r.storage);
        for (k, n) in r.extended {
            let have = requests.extended(&k);
            if n > have {
                requests.extended.retain(|(e, _)| *e != k);
                requests.extended.push((k, n));
            }
        }
    }
    let overhead = &spec["overhead"];
    requests.cpu += overhead["cpu"].as_str().and_then(millicores).unwrap_or(0);
    requests.memory += overhead["memory"].as_str().and_then(bytes).unwrap_or(0);
    let mut selector = pairs(&spec["nodeSelector"]);
    selector.extend(pairs(class_selector));
    let affinity = &spec["affinity"]["nodeAffinity"];
    let required = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .as_array()
        .map(|ts| ts.iter().map(Term::parse).collect());
    let preferred = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["weight"].as_i64().unwrap_or(0),
                Term::parse(&p["preference"]),
            )
        })
        .collect();
    let tolerations = spec["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| Toleration {
            key: str_of(&t["key"]),
            exists: t["operator"] == "Exists",
            value: str_of(&t["value"]),
            effect: str_of(&t["effect"]),
        })
        .collect();
    let owner = pod["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["controller"] == true)
        .and_then(|o| o["uid"].as_str())
        .map(String::from);
    Needs {
        requests,
        scored: (scored_cpu, scored_mem),
        host_ports,
        owner,
        selector,
        required,
        preferred,
        tolerations,
        oci: needs_oci(pod),
        meta: PodMeta::of(pod),
        rules: Rules::parse(pod),
        images: ["initContainers", "containers"]
            .iter()
            .flat_map(|k| spec[k].as_array().into_iter().flatten())
            .filter_map(|c| c["image"].as_str().map(String::from))
            .collect(),
        volumes: Vec::new(),
    }
}

/// A node as the scheduler sees it: what it offers and what its pods already take.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    labels: Map<String, Value>,
    taints: Vec<Taint>,
    pub allocatable: Resources,
    pub requested: Resources,
    scored: (u64, u64),
    ports: HashMap<HostPort, u32>,
    ready: bool,
    unschedulable: bool,
    /// Pods on the node per owning controller.
    owners: HashMap<String, u32>,
    /// The pods on the node, by `namespace/name`, for other pods' affinity and spreading.
    pods: HashMap<String, PodMeta>,
    /// How many of them have required anti-affinity (which other pods must respect).
    repelling: u32,
    /// The names of the images (Wasm modules) the node has (`status.images`).
    images: HashSet<String>,
}

impl NodeInfo {
    pub fn of(node: &Value) -> NodeInfo {
        let alloc = &node["status"]["allocatable"];
        NodeInfo {
            name: str_of(&node["metadata"]["name"]),
            labels: node["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
            taints: node["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| Taint {
                    key: str_of(&t["key"]),
                    value: str_of(&t["value"]),
                    effect: str_of(&t["effect"]),
                })
                .collect(),
            allocatable: Resources {
                cpu: alloc["cpu"].as_str().and_then(millicores).unwrap_or(0),
                memory: alloc["memory"].as_str().and_then(bytes).unwrap_or(0),
                pods: alloc["pods"]
                    .as_str()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(110),
                storage: alloc["ephemeral-storage"]
                    .as_str()
                    .and_then(bytes)
                    .unwrap_or(0),
                extended: alloc
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| is_extended(k))
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str().and_then(units)?)))
                    .collect(),
            },
            ready: node["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            }),
            unschedulable: node["spec"]["unschedulable"].as_bool() == Some(true),
            images: node["status"]["images"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|i| i["names"].as_array().into_iter().flatten())
                .map(str_of)
                .collect(),
            ..NodeInfo::default()
        }
    }

    /// Keep what the pods on `old` take when the node object changes.
    pub fn carry(&mut self, old: &NodeInfo) {
        self.requested = old.requested.clone();
        self.scored = old.scored;
        self.ports = old.ports.clone();
        self.owners = old.owners.clone();
        self.pods = old.pods.clone();
        self.repelling = old.repelling;
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).and_then(Value::as_str)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodMeta> {
        self.pods.values()
    }

    /// A pod placed on this node.
    pub fn add(&mut self, n: &Needs) {
        self.requested.add(&n.requests);
        self.scored.0 += n.scored.0;
        self.scored.1 += n.scored.1;
        for p in &n.host_ports {
            *self.ports.entry(p.clone()).or_default() += 1;
        }
        if let Some(o) = &n.owner {
            *self.owners.entry(o.clone()).or_default() += 1;
        }
        if let Some(old) = self.pods.insert(n.meta.id.clone(), n.meta.clone()) {
            self.repelling -= u32::from(old.repels());
        }
        self.repelling += u32::from(n.meta.repels());
    }

    /// A pod gone from this node (deleted, or finished).
    pub fn remove(&mut self, n: &Needs) {
        self.requested.sub(&n.requests);
        self.scored.0 = self.scored.0.saturating_sub(n.scored.0);
        self.scored.1 = self.scored.1.saturating_sub(n.scored.1);
        for p in &n.host_ports {
            if let Some(c) = self.ports.get_mut(p) {
                *c -= 1;
                if *c == 0 {
                    self.ports.remove(p);
                }
            }
        }
        if let Some(o) = &n.owner {
            if let Some(c) = self.owners.get_mut(o) {
                *c -= 1;
                if *c == 0 {
                    self.owners.remove(o);
                }
            }
        }
        if let Some(old) = self.pods.remove(&n.meta.id) {
            self.repelling -= u32::from(old.repels());
        }
    }

    fn port_taken(&self, (proto, port, ip): &HostPort) -> bool {
        self.ports.keys().any(|(p, n, i)| {
            p == proto
                && n == port
                && (i.is_empty() || ip.is_empty() || i == ip || i == "0.0.0.0" || ip == "0.0.0.0")
        })
    }
}

fn offers_runtime(n: &Needs, node: &NodeInfo) -> bool {
    !n.oci
        || node
            .labels
            .get("outpost.dev/runtime-oci")
            .and_then(Value::as_str)
            == Some("true")
}

/// The first NoSchedule or NoExecute taint the pod does not tolerate.
fn untolerated<'a>(n: &Needs, node: &'a NodeInfo) -> Option<&'a Taint> {
    node.taints.iter().find(|t| {
        matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !n.tolerations.iter().any(|tol| tol.tolerates(t))
    })
}

/// Node selector (the pod's and its RuntimeClass's) and required node affinity.
fn selects(n: &Needs, node: &NodeInfo) -> bool {
    n.selector
        .iter()
        .all(|(k, v)| node.labels.get(k).and_then(Value::as_str) == Some(v.as_str()))
        && n.required
            .as_ref()
            .is_none_or(|terms| terms.iter().any(|t| t.matches(node)))
}

/// Whether a DaemonSet should run this pod on `node`: its selectors, affinity, tolerations
/// and runtime allow it, whatever the node's readiness or free room (as the DaemonSet
/// controller decides; the scheduler then places it when it fits).
pub fn should_run(n: &Needs, node: &NodeInfo) -> bool {
    offers_runtime(n, node) && untolerated(n, node).is_none() && selects(n, node)
}

/// Why `node` cannot take the pod (kube-scheduler's wording), or nothing if it can.
pub fn filter(n: &Needs, node: &NodeInfo) -> Vec<String> {
    if !node.ready {
        return vec!["node(s) were not ready".into()];
    }
    if node.unschedulable {
        return vec!["node(s) were unschedulable".into()];
    }
    if !offers_runtime(n, node) {
        return vec!["node(s) didn't offer the OCI runtime the pod needs".into()];
    }
    if let Some(t) = untolerated(n, node) {
        return vec![format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key, t.value
        )];
    }
    if !selects(n, node) {
        return vec!["node(s) didn't match Pod's node affinity/selector".into()];
    }
    if !n
        .volumes
        .iter()
        .all(|terms| terms.iter().any(|t| t.matches(node)))
    {
        return vec!["node(s) had volume node affinity conflict".into()];
    }
    if n.host_ports.iter().any(|p| node.port_taken(p)) {
        return vec!["node(s) didn't have free ports for the requested pod ports".into()];
    }
    let (a, r, q) = (&node.allocatable, &node.requested, &n.requests);
    let mut short = vec![];
    if r.pods + q.pods > a.pods {
        short.push("Too many pods".to_string());
    }
    if q.cpu > 0 && r.cpu + q.cpu > a.cpu {
        short.push("Insufficient cpu".to_string());
    }
    if q.memory > 0 && r.memory + q.memory > a.memory {
        short.push("Insufficient memory".to_string());
    }
    if q.storage > 0 && r.storage + q.storage > a.storage {
        short.push("Insufficient ephemeral-storage".to_string());
    }
    for (k, n) in &q.extended {
        if r.extended(k) + n > a.extended(k) {
            short.push(format!("Insufficient {k}"));
        }
    }
    short
}

/// How good a node that passed the filters is for the pod; `most` is the largest number of
/// the pod's siblings (same controller) on any candidate node.
pub fn score(n: &Needs, node: &NodeInfo, most: u32) -> i64 {
    let frac = |used: u64, cap: u64| {
        if cap == 0 {
            1.0
        } else {
            (used as f64 / cap as f64).min(1.0)
        }
    };
    let cpu = frac(node.scored.0 + n.scored.0, node.allocatable.cpu);
    let mem = frac(node.scored.1 + n.scored.1, node.allocatable.memory);
    let least = ((1.0 - cpu) + (1.0 - mem)) * 50.0;
    let balanced = (1.0 - (cpu - mem).abs()) * 100.0;
    let total: i64 = n.preferred.iter().map(|(w, _)| w.max(&0)).sum();
    let matched: i64 = n
        .preferred
        .iter()
        .filter(|(_, t)| t.matches(node))
        .map(|(w, _)| *w.max(&0))
        .sum();
    let affinity = if total > 0 {
        matched as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    let soft = node
        .taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !n.tolerations.iter().any(|x| x.tolerates(t)))
        .count();
    let taints = 100.0 / (1.0 + soft as f64);
    let siblings = n
        .owner
        .as_ref()
        .and_then(|o| node.owners.get(o))
        .copied()
        .unwrap_or(0);
    let spread = if most == 0 {
        100.0
    } else {
        f64::from(most - siblings.min(most)) * 100.0 / f64::from(most)
    };
    // Image locality: the share of the pod's images (modules) the node has already.
    let local = if n.images.is_empty() {
        0.0
    } else {
        let have = n.images.iter().filter(|i| node.images.contains(*i)).count();
        have as f64 * 100.0 / n.images.len() as f64
    };
    (least + balanced + 2.0 * affinity + 3.0 * taints + 2.0 * spread + local).round() as i64
}

/// How many fitting nodes are enough to choose among: every node up to 100, then
/// kube-scheduler's adaptive share (50% less 1% per 125 nodes, at least 5%).
fn enough(nodes: usize) -> usize {
    if nodes <= 100 {
        return nodes.max(1);
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

/// The node for a pod: the best-scored of those that pass the filters, ties broken by
/// `turn`. Otherwise the message `kubectl describe` shows.
pub fn pick<N: Borrow<NodeInfo>>(n: &Needs, nodes: &[N], turn: usize) -> Result<usize, String> {
    let at = |i: usize| -> &NodeInfo { nodes[i].borrow() };
    let mut reasons: HashMap<String, usize> = HashMap::new();
    // As kube-scheduler does in large clusters, stop looking once enough nodes fit, starting
    // each pod where the last left off so that every node gets its turn.
    let enough = enough(nodes.len());
    let start = if nodes.is_empty() {
        0
    } else {
        turn % nodes.len()
    };
    // Rules about other pods need the whole cluster counted once.
    let repelled = nodes.iter().any(|x| x.borrow().repelling > 0);
    let view = (repelled || !n.rules.is_empty())
        .then(|| topo::view(&n.rules, &n.meta, nodes, |x| selects(n, x)));
    let mut fit = Vec::with_capacity(enough.min(nodes.len()));
    for i in (start..nodes.len()).chain(0..start) {
        let mut why = filter(n, at(i));
        if let (true, Some(v)) = (why.is_empty(), &view) {
            why.extend(topo::reject(&n.rules, v, at(i)).map(String::from));
        }
        for r in &why {
            *reasons.entry(r.clone()).or_default() += 1;
        }
        if why.is_empty() {
            fit.push(i);
            if fit.len() >= enough {
                break;
            }
        }
    }
    if fit.is_empty() {
        let mut parts: Vec<String> = reasons.iter().map(|(r, c)| format!("{c} {r}")).collect();
        // Sorted as whole strings, count first, as kube-scheduler sorts them.
        parts.sort();
        return Err(format!(
            "0/{} nodes are available: {}.",
            nodes.len(),
            if parts.is_empty() {
                "no nodes have joined the cluster".to_string()
            } else {
                parts.join(", ")
            }
        ));
    }
    let most = n
        .owner
        .as_ref()
        .map(|o| {
            fit.iter()
                .map(|&i| at(i).owners.get(o).copied().unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let scored: Vec<(usize, i64)> = fit
        .iter()
        .map(|&i| {
            let extra = view.as_ref().map_or(0, |v| {
                let (affinity, spread) = topo::score(&n.rules, v, at(i));
                (2.0 * (affinity + spread)).round() as i64
            });
            (i, score(n, at(i), most) + extra)
        })
        .collect();
    let best = scored.iter().map(|(_, s)| *s).max().unwrap_or(0);
    let mut top: Vec<usize> = scored
        .iter()
        .filter(|(_, s)| *s == best)
        .map(|(i, _)| *i)
        .collect();
    top.sort_unstable();
    Ok(top[turn % top.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, labels: Value, spec: Value) -> NodeInfo {
        NodeInfo::of(
            &json!({"metadata": {"name": name, "labels": labels}, "spec": spec,
            "status": {"allocatable": {"cpu": "2", "memory": "1Gi", "pods": "3"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
        )
    }

    fn pod(spec: Value) -> Needs {
        needs(&json!({"metadata": {}, "spec": spec}), &Value::Null)
    }

    fn wasm(extra: Value) -> Value {
        let mut spec = json!({"runtimeClassName": "wasm",
            "containers": [{"name": "c", "image": "module:x",
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        spec
    }

    #[test]
    fn a_node_with_the_module_already_is_preferred() {
        let p = pod(wasm(json!({})));
        let mut with = NodeInfo::of(&json!({"metadata": {"name": "with"},
            "status": {"allocatable": {"cpu": "2", "memory": "1Gi", "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}],
                "images": [{"names": ["module:sha256:00", "module:x"], "sizeBytes": 10}]}}));
        let without = node("without", json!({}), json!({}));
        for t in 0..4 {
            assert_eq!(pick(&p, &[&without, &with], t), Ok(1));
        }
        with.images.clear();
        let picks: Vec<usize> = (0..4)
            .map(|t| pick(&p, &[&without, &with], t).unwrap())
            .collect();
        assert!(
            picks.contains(&0) && picks.contains(&1),
            "a tie again: {picks:?}"
        );
    }

    #[test]
    fn requests_count_init_containers_overhead_and_limits() {
        let n = pod(json!({
            "containers": [
                {"resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                {"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                {}],
            "initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}],
            "overhead": {"cpu": "10m"}}));
        assert_eq!(n.requests.cpu, 2010);
        assert_eq!(n.requests.memory, (64 << 20) + (1 << 30));
        assert_eq!(n.requests.pods, 1);
        // The container asking for nothing is scored as kube-scheduler's stand-in.
        assert_eq!(
            n.scored,
            (250 + 1000 + 100, (64 << 20) + (1 << 30) + (200 << 20))
        );
        assert!(n.oci, "OCI images and no wasm RuntimeClass");
        assert!(!pod(wasm(json!({}))).oci);
    }

    #[test]
    fn filters_say_why_in_kube_schedulers_words() {
        let p = pod(wasm(json!({})));
        let ok = node("a", json!({}), json!({}));
        assert!(filter(&p, &ok).is_empty());
        let mut down = ok.clone();
        down.ready = false;
        assert_eq!(filter(&p, &down), ["node(s) were not ready"]);
        let cordoned = node("a", json!({}), json!({"unschedulable": true}));
        assert_eq!(filter(&p, &cordoned), ["node(s) were unschedulable"]);
        let oci = pod(json!({"containers": [{"image": "nginx"}]}));
        assert_eq!(
            filter(&oci, &ok),
            ["node(s) didn't offer the OCI runtime the pod needs"]
        );
        let tainted = node(
            "a",
            json!({}),
            json!({"taints": [{"key": "dedicated", "value": "edge", "effect": "NoSchedule"}]}),
        );
        assert_eq!(
            filter(&p, &tainted),
            ["node(s) had untolerated taint {dedicated: edge}"]
        );
        for tol in [
            json!({"key": "dedicated", "operator": "Equal", "value": "edge"}),
            json!({"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}),
            json!({"operator": "Exists"}),
        ] {
            let t = pod(wasm(json!({"tolerations": [tol]})));
            assert!(filter(&t, &tainted).is_empty(), "{tol}");
        }
        let wrong = pod(wasm(json!({"tolerations": [
            {"key": "dedicated", "value": "other"},
            {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]})));
        assert!(!filter(&wrong, &tainted).is_empty());
        let soft = node(
            "a",
            json!({}),
            json!({"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}),
        );
        assert!(filter(&p, &soft).is_empty(), "PreferNoSchedule only scores");
    }

    #[test]
    fn a_pods_volumes_keep_it_on_their_node() {
        let here = node(
            "edge-1",
            json!({"kubernetes.io/hostname": "edge-1"}),
            json!({}),
        );
        let there = node(
            "edge-2",
            json!({"kubernetes.io/hostname": "edge-2"}),
            json!({}),
        );
        let pv = json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                   "values": ["edge-1"]}]}]}}}});
        let terms = volume_terms(&pv).expect("the volume has node affinity");
        let p = pod(wasm(json!({}))).with_volumes(vec![terms]);
        assert!(filter(&p, &here).is_empty());
        assert_eq!(
            filter(&p, &there),
            ["node(s) had volume node affinity conflict"]
        );
        assert_eq!(pick(&p, &[&there, &here], 0), Ok(1));
        assert!(volume_terms(&json!({"spec": {"hostPath": {"path": "/x"}}})).is_none());
    }

    #[test]
    fn selectors_and_node_affinity() {
        let zone_a = node("n1", json!({"zone": "a", "gpu": "2"}), json!({}));
        let zone_b = node("n2", json!({"zone": "b"}), json!({}));
        let sel = pod(wasm(json!({"nodeSelector": {"zone": "a"}})));
        assert!(filter(&sel, &zone_a).is_empty());
        assert_eq!(
            filter(&sel, &zone_b),
            ["node(s) didn't match Pod's node affinity/selector"]
        );
        let class = needs(&json!({"spec": wasm(json!({}))}), &json!({"zone": "b"}));
        assert!(!filter(&class, &zone_a).is_empty() && filter(&class, &zone_b).is_empty());
        let affinity = |terms: Value| {
            pod(wasm(json!({"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})))
        };
        let cases = [
            (
                json!([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "c"]}]}]),
                true,
                false,
            ),
            (
                json!([{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}]),
                false,
                true,
            ),
            (
                json!([{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]),
                true,
                false,
            ),
            (
                json!([{"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}]),
                false,
                true,
            ),
            (
                json!([{"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["1"]}]}]),
                true,
                false,
            ),
            (
                json!([{"matchExpressions": [{"key": "gpu", "operator": "Lt", "values": ["1"]}]}]),
                false,
                false,
            ),
            (
                json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]),
                false,
                true,
            ),
            // Terms are ORed; expressions within one are ANDed; an empty term matches nothing.
            (
                json!([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]},
                                          {"key": "gpu", "operator": "In", "values": ["3"]}]}]),
                false,
                true,
            ),
            (json!([{}]), false, false),
        ];
        for (terms, on_a, on_b) in cases {
            let p = affinity(terms.clone());
            assert_eq!(filter(&p, &zone_a).is_empty(), on_a, "{terms} on n1");
            assert_eq!(filter(&p, &zone_b).is_empty(), on_b, "{terms} on n2");
        }
    }

    #[test]
    fn resources_and_host_ports_run_out() {
        let p = pod(wasm(json!({})));
        let mut n = node("a", json!({}), json!({}));
        for _ in 0..2 {
            assert!(filter(&p, &n).is_empty());
            n.add(&p);
        }
        // Two of 1Gi used by 2 × 256Mi, two of 2 CPUs by 2 × 500m: room for exactly one more.
        assert!(filter(&p, &n).is_empty());
        n.add(&p);
        let again = filter(&p, &n);
        assert!(again.contains(&"Too many pods".to_string()), "{again:?}");
        let big = pod(
            json!({"runtimeClassName": "wasm", "containers": [{"image": "module:x",
            "resources": {"requests": {"cpu": "3", "memory": "2Gi"}}}]}),
        );
        let mut empty = node("b", json!({}), json!({}));
        assert_eq!(
            filter(&big, &empty),
            ["Insufficient cpu", "Insufficient memory"]
        );
        n.remove(&p);
        assert!(filter(&p, &n).is_empty(), "a pod gone frees its room");
        let port = |ip: &str| {
            pod(wasm(json!({"containers": [{"image": "module:x",
                "ports": [{"containerPort": 80, "hostPort": 8080, "hostIP": ip}]}]})))
        };
        empty.add(&port(""));
        assert_eq!(
            filter(&port("10.0.0.1"), &empty),
            ["node(s) didn't have free ports for the requested pod ports"]
        );
        let udp = pod(wasm(json!({"containers": [{"image": "module:x",
            "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}]}]})));
        assert!(filter(&udp, &empty).is_empty(), "another protocol");
    }

    #[test]
    fn ephemeral_storage_and_extended_resources_are_counted() {
        let n = |alloc: Value| {
            NodeInfo::of(
                &json!({"metadata": {"name": "n"}, "status": {"allocatable": alloc,
                "conditions": [{"type": "Ready", "status": "True"}]}}),
            )
        };
        let ask = |r: Value| {
            pod(json!({"runtimeClassName": "wasm", "containers": [
                {"image": "module:x", "resources": r}]}))
        };
        let mut board = n(json!({"cpu": "4", "memory": "4Gi", "pods": "10",
            "ephemeral-storage": "10Gi", "example.com/dongle": "2"}));
        let bare = n(json!({"cpu": "4", "memory": "4Gi", "pods": "10"}));
        let disk = ask(json!({"requests": {"ephemeral-storage": "6Gi"}}));
        assert!(filter(&disk, &board).is_empty());
        assert_eq!(filter(&disk, &bare), ["Insufficient ephemeral-storage"]);
        board.add(&disk);
        assert_eq!(filter(&disk, &board), ["Insufficient ephemeral-storage"]);
        board.remove(&disk);
        // Extended resources are asked for by limit (requests default to it) and counted.
        let dongle = ask(json!({"limits": {"example.com/dongle": "1"}}));
        assert_eq!(
            dongle.requests.extended,
            [("example.com/dongle".to_string(), 1)]
        );
        assert_eq!(filter(&dongle, &bare), ["Insufficient example.com/dongle"]);
        board.add(&dongle);
        board.add(&dongle);
        assert_eq!(filter(&dongle, &board), ["Insufficient example.com/dongle"]);
        board.remove(&dongle);
        assert!(filter(&dongle, &board).is_empty(), "one is free again");
        let huge = ask(json!({"limits": {"hugepages-2Mi": "4Mi", "memory": "1Gi"}}));
        assert_eq!(filter(&huge, &board), ["Insufficient hugepages-2Mi"]);
        // An init container's larger ask counts, not the sum.
        let init = needs(
            &json!({"spec": {"runtimeClassName": "wasm",
                "initContainers": [{"image": "module:i",
                    "resources": {"limits": {"example.com/dongle": "2"}}}],
                "containers": [{"image": "module:x",
                    "resources": {"limits": {"example.com/dongle": "1"}}}]}}),
            &Value::Null,
        );
        assert_eq!(
            init.requests.extended,
            [("example.com/dongle".to_string(), 2)]
        );
    }

    #[test]
    fn pick_prefers_room_affinity_and_spreading_and_explains_refusals() {
        let p = pod(wasm(json!({})));
        let mut busy = node("busy", json!({}), json!({}));
        busy.add(&p);
        let idle = node("idle", json!({}), json!({}));
        assert_eq!(pick(&p, &[&busy, &idle], 0), Ok(1), "least allocated");
        let pref = pod(wasm(json!({"affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "preference":
                {"matchExpressions": [{"key": "fast", "operator": "Exists"}]}}]}}})));
        let fast = node("fast", json!({"fast": "yes"}), json!({}));
        assert_eq!(pick(&pref, &[&idle, &fast], 0), Ok(1), "preferred affinity");
        // A controller's pods spread: the node without a sibling wins over an equal one.
        let owned = needs(
            &json!({"metadata": {"ownerReferences": [{"uid": "rs-1", "controller": true}]},
                    "spec": wasm(json!({}))}),
            &Value::Null,
        );
        let mut with_sibling = node("s1", json!({}), json!({}));
        with_sibling.add(&owned);
        let mut other = node("s2", json!({}), json!({}));
        other.add(&p);
        assert_eq!(pick(&owned, &[&with_sibling, &other], 0), Ok(1));
        // Equal nodes take turns.
        let (a, b) = (
            node("a", json!({}), json!({})),
            node("b", json!({}), json!({})),
        );
        let picks: Vec<usize> = (0..4).map(|t| pick(&p, &[&a, &b], t).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        let tainted = node(
            "t",
            json!({}),
            json!({"taints": [{"key": "dedicated", "value": "edge", "effect": "NoSchedule"}]}),
        );
        let big = pod(
            json!({"runtimeClassName": "wasm", "containers": [{"image": "module:x",
            "resources": {"requests": {"memory": "2Gi"}}}]}),
        );
        assert_eq!(
            pick(&big, &[&a, &tainted, &tainted], 0),
            Err("0/3 nodes are available: 1 Insufficient memory, 2 node(s) had untolerated taint {dedicated: edge}.".into())
        );
        assert_eq!(
            pick::<NodeInfo>(&p, &[], 0),
            Err("0/0 nodes are available: no nodes have joined the cluster.".into())
        );
        assert_eq!(
            (enough(3), enough(100), enough(1000), enough(5000)),
            (3, 100, 420, 500)
        );
        // In a large cluster a pick looks at a share of the nodes, and the share moves on.
        let many: Vec<NodeInfo> = (0..1000)
            .map(|i| node(&format!("n{i}"), json!({}), json!({})))
            .collect();
        let refs: Vec<&NodeInfo> = many.iter().collect();
        let first = pick(&p, &refs, 0).unwrap();
        assert!(first < 420, "{first}");
        let later = pick(&p, &refs, 600).unwrap();
        assert!(!(20..600).contains(&later), "{later}");
    }
}
