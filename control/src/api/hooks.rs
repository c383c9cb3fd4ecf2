//! Admission webhooks (`admissionregistration.k8s.io/v1`): the Mutating- and
//! ValidatingWebhookConfigurations in the store, called as kube-apiserver calls them. A write
//! matched by a webhook's rules and selectors is sent to it as an `AdmissionReview`: mutating
//! webhooks first, one after another in name order, their JSON patches applied before the
//! object is checked; then validating webhooks, all at once, after the checks and before the
//! store. A webhook reached by `service` is called through the node link of a pod behind the
//! Service (a port-forward stream), so it works for nodes behind NAT; one reached by `url`
//! is called directly. TLS always, checked against the webhook's `caBundle`.
//!
//! Every member keeps the configurations in memory ([`Registry`]), read again whenever one
//! changes ([`run`]); with none, a write pays one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

use super::auth::User;
use super::error::{ApiError, Cause};
use super::resources::{Resource, Sub};
use super::select::Labels;
use super::upstream;
use super::Api;
use crate::store::Consistency;

/// The group of the webhook configurations; writes to it never go to a webhook, so a broken
/// webhook can always be removed.
pub const GROUP: &str = "admissionregistration.k8s.io";
const PREFIX: &str = "/registry/admissionregistration.k8s.io/";
/// Largest answer read from a webhook.
const MAX_ANSWER: usize = 3 << 20;
/// How long to wait for a change before reading the configurations again anyway.
const RESYNC: Duration = Duration::from_secs(30);

/// How long all the webhooks of one request may take together (kube-apiserver's request
/// timeout); each call gets what is left, at most its own timeout.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// The most of one warning, and of all a request's warnings, passed on.
const WARNING_MAX: usize = 256;
const WARNINGS_MAX: usize = 4096;

/// What webhooks leave for the request they are called for: its deadline and their
/// warnings, for its `Warning` headers.
pub struct Scope {
    deadline: tokio::time::Instant,
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Scope {
    pub fn new() -> Scope {
        Scope {
            deadline: tokio::time::Instant::now() + REQUEST_DEADLINE,
            warnings: Default::default(),
        }
    }

    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings.take()
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope::new()
    }
}

tokio::task_local! {
    /// The request being served.
    pub static SCOPE: Scope;
}

/// Keep the `warnings` of a webhook's answer for the request's response: each cut to
/// [`WARNING_MAX`] characters, repeats dropped, [`WARNINGS_MAX`] bytes in all.
fn keep_warnings(resp: &Value) {
    let list = resp["warnings"].as_array().into_iter().flatten();
    add_warnings(list.filter_map(Value::as_str));
}

/// Keep `list` for the request's `Warning` headers, as [`keep_warnings`] keeps a webhook's.
pub fn add_warnings<'a>(list: impl Iterator<Item = &'a str>) {
    let _ = SCOPE.try_with(|s| {
        let mut kept = s.warnings.borrow_mut();
        for w in list {
            let w: String = w
                .chars()
                .filter(|c| !c.is_control())
                .take(WARNING_MAX)
                .collect();
            let used: usize = kept.iter().map(String::len).sum();
            if !w.is_empty() && !kept.contains(&w) && used + w.len() <= WARNINGS_MAX {
                kept.push(w);
            }
        }
    });
}

/// What a request does, in an `AdmissionReview`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    /// `kubectl exec`, `attach` and `port-forward`: the object is the request's options.
    Connect,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }

    fn options(self) -> Option<&'static str> {
        match self {
            Operation::Create => Some("CreateOptions"),
            Operation::Update => Some("UpdateOptions"),
            Operation::Delete => Some("DeleteOptions"),
            Operation::Connect => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Client {
    Url(String),
    Service {
        namespace: String,
        name: String,
        path: String,
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    operations: Vec<String>,
    groups: Vec<String>,
    versions: Vec<String>,
    resources: Vec<String>,
    scope: String,
}

/// One webhook of a configuration.
#[derive(Debug)]
struct Hook {
    /// The webhook's name, as errors name it.
    name: String,
    client: Client,
    /// The client configuration, or why there is none (each call then fails with it).
    tls: Result<Arc<rustls::ClientConfig>, String>,
    rules: Vec<Rule>,
    ignore_failure: bool,
    equivalent: bool,
    namespaces: Labels,
    objects: Labels,
    timeout: Duration,
    reinvoke: bool,
    /// `admission.k8s.io/v1` or `v1beta1`: the first of its `admissionReviewVersions` we speak.
    review: &'static str,
}

#[derive(Debug, Default)]
struct Set {
    mutating: Vec<Hook>,
    validating: Vec<Hook>,
}

/// The webhooks this member calls.
#[derive(Default)]
pub struct Registry {
    any: AtomicBool,
    set: RwLock<Arc<Set>>,
}

impl Registry {
    /// Call exactly the webhooks of `mutating` and `validating` configurations from now on.
    pub fn load(&self, mutating: &[Value], validating: &[Value]) {
        let mut set = Set::default();
        for (list, configs, m) in [
            (&mut set.mutating, mutating, true),
            (&mut set.validating, validating, false),
        ] {
            let mut sorted: Vec<&Value> = configs.iter().collect();
            sorted.sort_by(|a, b| {
                a["metadata"]["name"]
                    .as_str()
                    .cmp(&b["metadata"]["name"].as_str())
            });
            for c in sorted {
                for w in c["webhooks"].as_array().into_iter().flatten() {
                    list.push(hook(w, m));
                }
            }
        }
        let any = !set.mutating.is_empty() || !set.validating.is_empty();
        if let Ok(mut s) = self.set.write() {
            *s = Arc::new(set);
        }
        self.any.store(any, Ordering::Release);
    }

    /// Whether any webhook is configured.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    fn current(&self) -> Option<Arc<Set>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.set.read().ok().map(|s| s.clone())
    }
}

/// A webhook from its stored form (already checked and defaulted by [`check_config`] and
/// [`default_config`]).
fn hook(w: &Value, mutating: bool) -> Hook {
    let cc = &w["clientConfig"];
    let client = if let Some(u) = cc["url"].as_str() {
        Client::Url(u.to_string())
    } else {
        let s = &cc["service"];
        Client::Service {
            namespace: s["namespace"].as_str().unwrap_or("").to_string(),
            name: s["name"].as_str().unwrap_or("").to_string(),
            path: s["path"].as_str().unwrap_or("/").to_string(),
            port: s["port"].as_u64().unwrap_or(443) as u16,
        }
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let rules = w["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Rule {
            operations: strings(&r["operations"]),
            groups: strings(&r["apiGroups"]),
            versions: strings(&r["apiVersions"]),
            resources: strings(&r["resources"]),
            scope: r["scope"].as_str().unwrap_or("*").to_string(),
        })
        .collect();
    // The first version of its list that this server speaks, as kube-apiserver picks.
    let review = strings(&w["admissionReviewVersions"])
        .iter()
        .find_map(|v| match v.as_str() {
            "v1" => Some("admission.k8s.io/v1"),
            "v1beta1" => Some("admission.k8s.io/v1beta1"),
            _ => None,
        })
        .unwrap_or("admission.k8s.io/v1");
    Hook {
        name: w["name"].as_str().unwrap_or("").to_string(),
        tls: tls(&cc["caBundle"]),
        client,
        rules,
        ignore_failure: w["failurePolicy"] == "Ignore",
        equivalent: w["matchPolicy"] != "Exact",
        namespaces: Labels::from_selector(&w["namespaceSelector"]),
        objects: Labels::from_selector(&w["objectSelector"]),
        timeout: Duration::from_secs(w["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30)),
        reinvoke: mutating && w["reinvocationPolicy"] == "IfNeeded",
        review,
    }
}

/// The client configuration trusting `ca_bundle` (base64 PEM), or the system's roots when
/// there is none, as kube-apiserver does.
fn tls(ca_bundle: &Value) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_bundle.as_str().filter(|s| !s.is_empty()) {
        Some(b) => {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| format!("caBundle is not base64: {e}"))?;
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("caBundle: {e}"))?;
                roots.add(c).map_err(|e| format!("caBundle: {e}"))?;
            }
        }
        None => {
            // The system's roots: one the TLS library cannot use is left out, not fatal.
            let pem = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
            roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).flatten());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Read the configurations again; on every member, until the task is aborted.
pub async fn run(api: Arc<Api>) {
    crate::controllers::again("webhook follower", || follow(&api)).await
}

async fn follow(api: &Arc<Api>) -> Result<(), String> {
    loop {
        let revision = reload(api).await.map_err(|e| e.to_string())?;
        let mut w = api
            .store
            .watch(PREFIX, revision)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(None) = tokio::time::timeout(RESYNC, w.next()).await {
            return Err("the webhook configurations' watch ended".into());
        }
    }
}

/// Load the stored configurations into this member's registry; returns the revision read.
pub async fn reload(api: &Api) -> Result<u64, ApiError> {
    let page = api
        .store
        .range(PREFIX, None, 0, Consistency::Serializable)
        .await?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for kv in &page.kvs {
        let Ok(o) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        match o["kind"].as_str() {
            Some("MutatingWebhookConfiguration") => m.push(o),
            Some("ValidatingWebhookConfiguration") => v.push(o),
            _ => {}
        }
    }
    api.hooks.load(&m, &v);
    Ok(page.revision)
}

/// A write as webhooks see it.
pub struct Request<'a> {
    pub res: &'static Resource,
    /// The version the client asked for.
    pub version: &'a str,
    /// The subresource written (status, scale, binding, eviction, token, exec, …).
    pub sub: Option<Sub>,
    pub op: Operation,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub user: &'a User,
    pub dry_run: bool,
    pub manager: &'a str,
}

impl Request<'_> {
    /// Whether a mutating webhook's patch is applied: to a create or update of the object, its
    /// status or its ephemeral containers; the objects of other subresources (a Scale, an
    /// Eviction, a Binding, a TokenRequest, a connect's options) are made for the webhook
    /// and not kept.
    fn patchable(&self) -> bool {
        matches!(self.op, Operation::Create | Operation::Update)
            && matches!(
                self.sub,
                None | Some(Sub::Status | Sub::EphemeralContainers)
            )
    }
}

impl Request<'_> {
    fn review(&self, hook: &Hook, uid: &str, object: &Value, old: Option<&Value>) -> Value {
        let (g, v, r) = (self.res.group, self.version, self.res.plural);
        let kind = match (self.sub, self.op) {
            (_, Operation::Connect) => {
                json!({"group": "", "version": "v1", "kind": object["kind"]})
            }
            (Some(s), _) => {
                let (g, v, k) = s.response_kind(self.res);
                json!({"group": g, "version": v, "kind": k})
            }
            _ => json!({"group": g, "version": v, "kind": self.res.kind}),
        };
        let resource = json!({"group": g, "version": v, "resource": r});
        let mut req = json!({
            "uid": uid, "kind": kind, "resource": resource, "requestKind": kind,
            "requestResource": resource, "name": self.name, "operation": self.op.name(),
            "userInfo": {"username": self.user.name, "groups": self.user.groups},
            "object": if self.op == Operation::Delete { Value::Null } else { object.clone() },
            "oldObject": old.cloned().unwrap_or(Value::Null),
            "dryRun": self.dry_run,
        });
        if let Some(kind) = self.op.options() {
            req["options"] = json!({"apiVersion": "meta.k8s.io/v1", "kind": kind});
        }
        if !self.user.uid.is_empty() {
            req["userInfo"]["uid"] = json!(self.user.uid);
        }
        if let Some(s) = self.sub {
            req["subResource"] = json!(s.name());
            req["requestSubResource"] = json!(s.name());
        }
        // A Namespace's own name is its request's namespace, as kube-apiserver reports it.
        let namespace = if (self.res.group, self.res.kind) == ("", "Namespace") {
            Some(self.name)
        } else {
            self.namespace
        };
        if let Some(ns) = namespace {
            req["namespace"] = json!(ns);
        }
        if self.dry_run && self.op.options().is_some() {
            req["options"]["dryRun"] = json!(["All"]);
        }
        if self.op.options().is_some() && self.op != Operation::Delete && !self.manager.is_empty() {
            req["options"]["fieldManager"] = json!(self.manager);
        }
        json!({"apiVersion": hook.review, "kind": "AdmissionReview", "request": req})
    }
}

/// Whether `rule` covers the request.
fn covers(rule: &Rule, req: &Request<'_>, equivalent: bool) -> bool {
    let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
    if !any(&rule.operations, req.op.name()) || !any(&rule.groups, req.res.group) {
        return false;
    }
    // Under the Equivalent policy a rule naming another version of the resource covers it too
    // (this server serves each built-in resource in one version; a CRD's versions differ in
    // apiVersion alone).
    let other_version = equivalent && !rule.versions.is_empty();
    if !any(&rule.versions, req.version) && !other_version {
        return false;
    }
    let scoped = match rule.scope.as_str() {
        "Cluster" => !req.res.namespaced,
        "Namespaced" => req.res.namespaced,
        _ => true,
    };
    if !scoped {
        return false;
    }
    let plural = req.res.plural;
    // As kube-apiserver's rule matcher: `pods/*` and `*/*` cover the resource itself too.
    let have = req.sub.map_or("", Sub::name);
    rule.resources.iter().any(|r| {
        let (main, sub) = r.split_once('/').unwrap_or((r, ""));
        (main == "*" || main == plural) && (sub == "*" || sub == have)
    })
}

/// Run the mutating webhooks that match over `o` (a create's or update's new object).
pub async fn mutate(
    api: &Arc<Api>,
    req: &Request<'_>,
    o: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(set) = api.hooks.current() else {
        return Ok(());
    };
    if set.mutating.is_empty() || req.res.group == GROUP {
        return Ok(());
    }
    let ns_labels = namespace_labels(api, req, o, old).await?;
    let mut called = Vec::new();
    let mut last_change = None;
    for (i, h) in set.mutating.iter().enumerate() {
        if !applies(h, req, o, old, &ns_labels) {
            continue;
        }
        called.push(i);
        if call_mutating(api, h, req, o, old).await? {
            last_change = Some(i);
        }
    }
    // reinvocationPolicy IfNeeded: once more for such a webhook, among those called, if
    // another changed the object after it ran.
    for i in called {
        let h = &set.mutating[i];
        if h.reinvoke && last_change.is_some_and(|l| l > i) {
            call_mutating(api, h, req, o, old).await?;
        }
    }
    Ok(())
}

/// Run the validating webhooks that match, all at once; any refusal refuses the write.
pub async fn validate(
    api: &Arc<Api>,
    req: &Request<'_>,
    o: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(set) = api.hooks.current() else {
        return Ok(());
    };
    if set.validating.is_empty() || req.res.group == GROUP {
        return Ok(());
    }
    let ns_labels = namespace_labels(api, req, o, old).await?;
    let calls = set
        .validating
        .iter()
        .filter(|h| applies(h, req, o, old, &ns_labels))
        .map(|h| async move {
            let uid = uuid::Uuid::new_v4().to_string();
            let answer = call(api, h, &req.review(h, &uid, o, old), &uid).await;
            verdict(h, answer).map(|r| {
                if let Some(resp) = r {
                    keep_warnings(&resp);
                }
            })
        });
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// One mutating call; whether it changed `o`.
async fn call_mutating(
    api: &Arc<Api>,
    h: &Hook,
    req: &Request<'_>,
    o: &mut Value,
    old: Option<&Value>,
) -> Result<bool, ApiError> {
    let uid = uuid::Uuid::new_v4().to_string();
    let answer = call(api, h, &req.review(h, &uid, o, old), &uid).await;
    let Some(resp) = verdict(h, answer)? else {
        return Ok(false);
    };
    keep_warnings(&resp);
    let Some(patch) = resp["patch"].as_str().filter(|p| !p.is_empty()) else {
        return Ok(false);
    };
    let failed = |e: String| failure(h, &format!("the webhook's patch: {e}"));
    if req.op == Operation::Delete {
        return Err(failed(
            "attempted to modify the object, which is not supported for this operation".into(),
        ));
    }
    if !req.patchable() {
        return Ok(false);
    }
    // v1beta1 answers may leave the type out; it can only be a JSON patch then.
    let v1beta1 = h.review.ends_with("v1beta1");
    if resp["patchType"] != "JSONPatch" && !(v1beta1 && resp["patchType"].is_null()) {
        return fail_or_ignore(
            h,
            failed(format!("unsupported patchType {}", resp["patchType"])),
        )
        .map(|()| false);
    }
    let bytes = match base64::engine::general_purpose::STANDARD.decode(patch) {
        Ok(b) => b,
        Err(e) => return fail_or_ignore(h, failed(e.to_string())).map(|()| false),
    };
    let ops: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return fail_or_ignore(h, failed(e.to_string())).map(|()| false),
    };
    // A patch that does not apply fails the request whatever the failure policy, as in
    // Kubernetes.
    let mut next = o.clone();
    super::patch::json_patch(&mut next, &ops).map_err(|e| failed(e.to_string()))?;
    for k in ["name", "namespace", "uid"] {
        if next["metadata"][k] != o["metadata"][k] {
            return Err(failed(format!("metadata.{k} may not be changed")));
        }
    }
    if next == *o {
        return Ok(false);
    }
    // What the webhook added gets the kind's defaults (an injected container's pull policy).
    super::admit::defaults(req.res.group, req.res.kind, &mut next);
    *o = next;
    Ok(true)
}

/// The labels a namespace selector sees: the object's own for a Namespace (the old one's
/// for a delete), its namespace's for a namespaced object, none for other cluster-scoped
/// ones (which every selector lets by).
async fn namespace_labels(
    api: &Arc<Api>,
    req: &Request<'_>,
    o: &Value,
    old: Option<&Value>,
) -> Result<Option<Value>, ApiError> {
    if (req.res.group, req.res.kind) == ("", "Namespace") {
        let from = match req.op {
            Operation::Delete => old.unwrap_or(o),
            _ => o,
        };
        return Ok(Some(from["metadata"]["labels"].clone()));
    }
    let Some(ns) = req.namespace else {
        return Ok(None);
    };
    let res = super::resources::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::Internal("no namespaces".into()))?;
    let kv = api
        .store
        .get(&res.key(None, ns), Consistency::Serializable)
        .await?
        .ok_or_else(|| ApiError::not_found("namespaces", ns))?;
    let n: Value =
        serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(n["metadata"]["labels"].clone()))
}

fn applies(
    h: &Hook,
    req: &Request<'_>,
    o: &Value,
    old: Option<&Value>,
    ns_labels: &Option<Value>,
) -> bool {
    if !h.rules.iter().any(|r| covers(r, req, h.equivalent)) {
        return false;
    }
    if let Some(l) = ns_labels {
        if !h.namespaces.matches(l) {
            return false;
        }
    }
    let labels = |v: &Value| v["metadata"]["labels"].clone();
    let new_ok = req.op != Operation::Delete && h.objects.matches(&labels(o));
    new_ok || old.is_some_and(|x| h.objects.matches(&labels(x)))
}

/// What a webhook's answer means: its `response` when the write may go on; the refusal, or
/// the failure under `failurePolicy: Fail`, as the error; `None` for an ignored failure.
fn verdict(h: &Hook, answer: Result<Value, String>) -> Result<Option<Value>, ApiError> {
    let resp = match answer {
        Ok(r) => r,
        Err(e) => return fail_or_ignore(h, failure(h, &e)).map(|()| None),
    };
    if resp["allowed"] == true {
        return Ok(Some(resp));
    }
    let mut status = match &resp["status"] {
        Value::Object(_) => resp["status"].clone(),
        _ => json!({}),
    };
    let code = status["code"].as_u64().filter(|c| *c >= 400).unwrap_or(400);
    let denied = format!("admission webhook \"{}\" denied the request", h.name);
    let message = match (status["message"].as_str(), status["reason"].as_str()) {
        (Some(m), _) if !m.is_empty() => format!("{denied}: {m}"),
        (_, Some(r)) if !r.is_empty() => format!("{denied}: {r}"),
        _ => format!("{denied} without explanation"),
    };
    status["message"] = json!(message);
    status["code"] = json!(code);
    status["status"] = json!("Failure");
    status["kind"] = json!("Status");
    status["apiVersion"] = json!("v1");
    if !status["metadata"].is_object() {
        status["metadata"] = json!({});
    }
    Err(ApiError::Denied(status))
}

fn failure(h: &Hook, detail: &str) -> ApiError {
    ApiError::Internal(format!(
        "Internal error occurred: failed calling webhook \"{}\": {detail}",
        h.name
    ))
}

fn fail_or_ignore(h: &Hook, e: ApiError) -> Result<(), ApiError> {
    if h.ignore_failure {
        tracing::warn!(webhook = %h.name, error = %e, "webhook failed; ignored (failurePolicy: Ignore)");
        Ok(())
    } else {
        Err(e)
    }
}

/// Send `review` to the webhook and return its `response`, checked to answer this request.
async fn call(api: &Arc<Api>, h: &Hook, review: &Value, uid: &str) -> Result<Value, String> {
    // At most the webhook's own timeout, and what is left of the request's.
    let left = SCOPE
        .try_with(|s| {
            s.deadline
                .saturating_duration_since(tokio::time::Instant::now())
        })
        .unwrap_or(REQUEST_DEADLINE);
    let timeout = h.timeout.min(left);
    let query = format!("timeout={}s", timeout.as_secs().max(1));
    let body = serde_json::to_vec(review).map_err(|e| e.to_string())?;
    let url = match &h.client {
        Client::Url(u) => u.clone(),
        Client::Service {
            namespace,
            name,
            path,
            port,
        } => format!("https://{name}.{namespace}.svc:{port}{path}"),
    };
    let what = format!("Post \"{url}?{query}\"");
    if timeout.is_zero() {
        return Err(format!(
            "failed to call webhook: {what}: context deadline exceeded"
        ));
    }
    let answer = match &h.client {
        Client::Url(u) => tokio::time::timeout(timeout, post_url(h, u, &query, body)).await,
        Client::Service {
            namespace,
            name,
            path,
            port,
        } => {
            let path = format!("{path}?{query}");
            tokio::time::timeout(
                timeout,
                post_service(api, h, namespace, name, &path, *port, body),
            )
            .await
        }
    };
    let (status, bytes) = match answer {
        Err(_) => {
            return Err(format!(
                "failed to call webhook: {what}: context deadline exceeded"
            ))
        }
        Ok(Err(e)) => return Err(format!("failed to call webhook: {what}: {e}")),
        Ok(Ok(x)) => x,
    };
    if !(200..300).contains(&status) {
        return Err(format!(
            "failed to call webhook: the server responded with the status code {status} but did not return more information"
        ));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("received invalid webhook response: {e}"))?;
    // v1beta1 answers were never checked for their kind or uid; v1 ones are.
    let v1beta1 = h.review.ends_with("v1beta1");
    if !v1beta1 && v["kind"] != "AdmissionReview" {
        return Err(format!(
            "received invalid webhook response: expected kind AdmissionReview, got {}",
            v["kind"]
        ));
    }
    let resp = &v["response"];
    if !resp.is_object() {
        return Err("webhook response was absent".into());
    }
    if !v1beta1 && resp["uid"] != uid {
        return Err(format!(
            "expected response.uid=\"{uid}\", got {}",
            resp["uid"]
        ));
    }
    Ok(resp.clone())
}

/// POST to a webhook's `url`.
async fn post_url(
    h: &Hook,
    url: &str,
    query: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let host = uri.host().ok_or("the URL has no host")?.to_string();
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
    let path = format!("{}?{query}", uri.path());
    exchange(h, tcp, &bare, &host, &path, body).await
}

/// POST to a webhook's Service: through the link of the node running one of its ready pods
/// (an address outside any pod is dialled directly).
async fn post_service(
    api: &Arc<Api>,
    h: &Hook,
    ns: &str,
    name: &str,
    path: &str,
    port: u16,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let host = format!("{name}.{ns}.svc");
    let target = upstream::service(api, ns, name, &port.to_string()).await?;
    let io = upstream::connect(api, &target).await?;
    exchange(h, io, &host, &host, path, body).await
}

/// TLS to `server_name` over `io`, then one HTTP/1.1 POST of `body` to `path`.
async fn exchange<IO>(
    h: &Hook,
    io: IO,
    server_name: &str,
    host: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let config = h.tls.clone().map_err(|e| format!("tls: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .header("user-agent", "outpost-apiserver")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes()
        .to_vec();
    Ok((status, bytes))
}

/// The defaults kube-apiserver gives a webhook configuration.
pub fn default_config(o: &mut Value, mutating: bool) {
    let Some(list) = o["webhooks"].as_array_mut() else {
        return;
    };
    for w in list {
        let Some(m) = w.as_object_mut() else {
            continue;
        };
        for (k, v) in [
            ("failurePolicy", json!("Fail")),
            ("matchPolicy", json!("Equivalent")),
            ("namespaceSelector", json!({})),
            ("objectSelector", json!({})),
            ("timeoutSeconds", json!(10)),
        ] {
            m.entry(k).or_insert(v);
        }
        if mutating {
            m.entry("reinvocationPolicy").or_insert(json!("Never"));
        }
        for r in m
            .get_mut("rules")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_object_mut() {
                r.entry("scope").or_insert(json!("*"));
            }
        }
        if let Some(s) = m
            .get_mut("clientConfig")
            .and_then(|c| c.get_mut("service"))
            .and_then(Value::as_object_mut)
        {
            s.entry("port").or_insert(json!(443));
        }
    }
}

/// The checks kube-apiserver makes of a webhook configuration, field by field.
pub fn check_config(o: &Value, mutating: bool) -> Vec<Cause> {
    let mut out = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (i, w) in o["webhooks"].as_array().into_iter().flatten().enumerate() {
        let at = |f: &str| format!("webhooks[{i}].{f}");
        match w["name"].as_str().filter(|n| !n.is_empty()) {
            None => out.push(Cause::required(at("name"))),
            Some(n) => {
                if n.split('.').count() < 3 || !super::admit::dns_subdomain(n) {
                    out.push(Cause::invalid(
                        at("name"),
                        n,
                        "should be a domain with at least three segments separated by dots",
                    ));
                } else if names.contains(&n) {
                    out.push(Cause::new(
                        "FieldValueDuplicate",
                        at("name"),
                        format!("Duplicate value: \"{n}\""),
                    ));
                }
                names.push(n);
            }
        }
        let versions = w["admissionReviewVersions"].as_array();
        if versions.is_none_or(Vec::is_empty) {
            out.push(Cause::required(at("admissionReviewVersions")));
        } else if !versions
            .into_iter()
            .flatten()
            .any(|v| v == "v1" || v == "v1beta1")
        {
            out.push(Cause::invalid(
                at("admissionReviewVersions"),
                &w["admissionReviewVersions"].to_string(),
                "must include at least one of v1, v1beta1",
            ));
        }
        one_of(
            w,
            "sideEffects",
            &["None", "NoneOnDryRun"],
            true,
            &at,
            &mut out,
        );
        one_of(
            w,
            "failurePolicy",
            &["Ignore", "Fail"],
            false,
            &at,
            &mut out,
        );
        one_of(
            w,
            "matchPolicy",
            &["Exact", "Equivalent"],
            false,
            &at,
            &mut out,
        );
        if mutating {
            one_of(
                w,
                "reinvocationPolicy",
                &["Never", "IfNeeded"],
                false,
                &at,
                &mut out,
            );
        }
        if let Some(t) = w.get("timeoutSeconds").filter(|t| !t.is_null()) {
            if !t.as_i64().is_some_and(|t| (1..=30).contains(&t)) {
                out.push(Cause::invalid(
                    at("timeoutSeconds"),
                    &t.to_string(),
                    "the timeout value must be between 1 and 30 seconds",
                ));
            }
        }
        if w["matchConditions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
        {
            out.push(Cause::new(
                "FieldValueForbidden",
                at("matchConditions"),
                "Forbidden: matchConditions (CEL) are not supported by this server; use namespaceSelector and objectSelector",
            ));
        }
        check_client(&w["clientConfig"], &at("clientConfig"), &mut out);
        for f in ["namespaceSelector", "objectSelector"] {
            check_selector(&w[f], &at(f), &mut out);
        }
        for (j, r) in w["rules"].as_array().into_iter().flatten().enumerate() {
            check_rule(r, &at(&format!("rules[{j}]")), &mut out);
        }
        let ca = &w["clientConfig"]["caBundle"];
        if ca.as_str().is_some_and(|s| !s.is_empty()) {
            if let Err(e) = tls(ca) {
                out.push(Cause::invalid(at("clientConfig.caBundle"), "", &e));
            }
        }
    }
    out
}

fn one_of(
    w: &Value,
    field: &str,
    allowed: &[&str],
    required: bool,
    at: &dyn Fn(&str) -> String,
    out: &mut Vec<Cause>,
) {
    match w.get(field).filter(|v| !v.is_null()) {
        None if required => out.push(Cause::new(
            "FieldValueRequired",
            at(field),
            format!(
                "Required value: must be one of {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        None => {}
        Some(v) if v.as_str().is_some_and(|s| allowed.contains(&s)) => {}
        Some(v) => out.push(Cause::new(
            "FieldValueNotSupported",
            at(field),
            format!(
                "Unsupported value: {v}: supported values: {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn check_client(cc: &Value, at: &str, out: &mut Vec<Cause>) {
    let (url, svc) = (&cc["url"], &cc["service"]);
    match (url.as_str(), svc.is_object()) {
        (Some(_), true) | (None, false) => out.push(Cause::required_msg(
            at,
            "exactly one of url or service is required",
        )),
        (Some(u), false) => match u.parse::<hyper::Uri>() {
            Err(e) => out.push(Cause::invalid(
                format!("{at}.url"),
                u,
                &format!("must be a valid URL: {e}"),
            )),
            Ok(p) => {
                if p.scheme_str() != Some("https") {
                    out.push(Cause::invalid(
                        format!("{at}.url"),
                        u,
                        "'https' is the only allowed URL scheme",
                    ));
                }
                if p.host().is_none_or(str::is_empty) {
                    out.push(Cause::invalid(
                        format!("{at}.url"),
                        u,
                        "host must be specified",
                    ));
                }
                if u.contains('#') {
                    out.push(Cause::invalid(
                        format!("{at}.url"),
                        u,
                        "fragments are not permitted",
                    ));
                }
                if p.query().is_some() {
                    out.push(Cause::invalid(
                        format!("{at}.url"),
                        u,
                        "query parameters are not permitted",
                    ));
                }
                if p.authority().is_some_and(|a| a.as_str().contains('@')) {
                    out.push(Cause::invalid(
                        format!("{at}.url"),
                        u,
                        "user information is not permitted in the URL",
                    ));
                }
            }
        },
        (None, true) => {
            for f in ["name", "namespace"] {
                if svc[f].as_str().is_none_or(str::is_empty) {
                    out.push(Cause::required(format!("{at}.service.{f}")));
                }
            }
            if let Some(p) = svc["path"].as_str() {
                if !p.starts_with('/') {
                    out.push(Cause::invalid(
                        format!("{at}.service.path"),
                        p,
                        "must start with a '/'",
                    ));
                }
            }
            if let Some(p) = svc.get("port").filter(|p| !p.is_null()) {
                if !p.as_u64().is_some_and(|p| (1..=65535).contains(&p)) {
                    out.push(Cause::invalid(
                        format!("{at}.service.port"),
                        &p.to_string(),
                        "port is not valid: must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
    }
}

/// A label selector's expressions, as kube-apiserver checks them (an unknown operator would
/// otherwise select nothing or everything).
fn check_selector(sel: &Value, at: &str, out: &mut Vec<Cause>) {
    for (i, e) in sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.matchExpressions[{i}]");
        if e["key"].as_str().is_none_or(str::is_empty) {
            out.push(Cause::required(format!("{at}.key")));
        }
        let values = e["values"].as_array().map_or(0, Vec::len);
        match e["operator"].as_str() {
            Some("In" | "NotIn") if values == 0 => out.push(Cause::required_msg(
                format!("{at}.values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            Some("Exists" | "DoesNotExist") if values > 0 => out.push(Cause::new(
                "FieldValueForbidden",
                format!("{at}.values"),
                "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            Some("In" | "NotIn" | "Exists" | "DoesNotExist") => {}
            other => out.push(Cause::invalid(
                format!("{at}.operator"),
                other.unwrap_or(""),
                "not a valid selector operator",
            )),
        }
    }
}

fn check_rule(r: &Value, at: &str, out: &mut Vec<Cause>) {
    for (f, allowed) in [
        (
            "operations",
            Some(&["*", "CREATE", "UPDATE", "DELETE", "CONNECT"][..]),
        ),
        ("apiGroups", None),
        ("apiVersions", None),
        ("resources", None),
    ] {
        let list = r[f].as_array();
        if list.is_none_or(Vec::is_empty) {
            out.push(Cause::required(format!("{at}.{f}")));
            continue;
        }
        let list = list.into_iter().flatten().collect::<Vec<_>>();
        if list.len() > 1 && list.iter().any(|x| *x == "*") {
            out.push(Cause::invalid(
                format!("{at}.{f}"),
                &r[f].to_string(),
                "if '*' is present, must not specify other values",
            ));
        }
        if let Some(allowed) = allowed {
            for (k, v) in list.iter().enumerate() {
                if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        format!("{at}.{f}[{k}]"),
                        format!(
                            "Unsupported value: {v}: supported values: \"*\", \"CONNECT\", \"CREATE\", \"DELETE\", \"UPDATE\""
                        ),
                    ));
                }
            }
        }
    }
    if let Some(s) = r.get("scope").filter(|s| !s.is_null()) {
        if !s
            .as_str()
            .is_some_and(|s| ["*", "Cluster", "Namespaced"].contains(&s))
        {
            out.push(Cause::new(
                "FieldValueNotSupported",
                format!("{at}.scope"),
                format!(
                    "Unsupported value: {s}: supported values: \"*\", \"Cluster\", \"Namespaced\""
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook_of(w: Value) -> Hook {
        let mut c = json!({"webhooks": [w]});
        default_config(&mut c, true);
        hook(&c["webhooks"][0], true)
    }

    fn req<'a>(
        res: &'static Resource,
        sub: Option<Sub>,
        op: Operation,
        user: &'a User,
    ) -> Request<'a> {
        Request {
            res,
            version: res.version,
            sub,
            op,
            namespace: Some("default"),
            name: "x",
            user,
            dry_run: false,
            manager: "kubectl",
        }
    }

    #[test]
    fn rules_cover_resources_subresources_and_scope() {
        let pods = super::super::resources::find("", "v1", "pods").unwrap();
        let nodes = super::super::resources::find("", "v1", "nodes").unwrap();
        let user = User {
            name: "u".into(),
            uid: String::new(),
            groups: vec![],
        };
        let rule = |ops: &[&str], res: &[&str], scope: &str| Rule {
            operations: ops.iter().map(|s| s.to_string()).collect(),
            groups: vec!["".into()],
            versions: vec!["v1".into()],
            resources: res.iter().map(|s| s.to_string()).collect(),
            scope: scope.into(),
        };
        let create = req(pods, None, Operation::Create, &user);
        let status = req(pods, Some(Sub::Status), Operation::Update, &user);
        assert!(covers(&rule(&["CREATE"], &["pods"], "*"), &create, false));
        assert!(!covers(&rule(&["UPDATE"], &["pods"], "*"), &create, false));
        assert!(covers(&rule(&["*"], &["*"], "*"), &create, false));
        // A main resource does not cover its subresources, nor `*/status` the main one.
        assert!(!covers(&rule(&["*"], &["pods"], "*"), &status, false));
        assert!(covers(&rule(&["*"], &["pods/status"], "*"), &status, false));
        assert!(covers(&rule(&["*"], &["*/*"], "*"), &status, false));
        assert!(!covers(&rule(&["*"], &["*/status"], "*"), &create, false));
        // `*/*` and `pods/*` cover the resource itself too, as in Kubernetes.
        assert!(covers(&rule(&["*"], &["*/*"], "*"), &create, false));
        assert!(covers(&rule(&["*"], &["pods/*"], "*"), &create, false));
        assert!(!covers(&rule(&["*"], &["*"], "Cluster"), &create, false));
        let node = req(nodes, None, Operation::Create, &user);
        assert!(covers(&rule(&["*"], &["*"], "Cluster"), &node, false));
        assert!(!covers(&rule(&["*"], &["*"], "Namespaced"), &node, false));
        // Another version of the resource: only under the Equivalent policy.
        let mut v2 = rule(&["*"], &["pods"], "*");
        v2.versions = vec!["v2".into()];
        assert!(!covers(&v2, &create, false));
        assert!(covers(&v2, &create, true));
    }

    #[test]
    fn selectors_see_the_new_or_the_old_object() {
        let cms = super::super::resources::find("", "v1", "configmaps").unwrap();
        let user = User {
            name: "u".into(),
            uid: String::new(),
            groups: vec![],
        };
        let h = hook_of(json!({"name": "a.b.c", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "clientConfig": {"url": "https://h/"},
            "rules": [{"operations": ["*"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "objectSelector": {"matchLabels": {"team": "a"}},
            "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}));
        let labelled = json!({"metadata": {"labels": {"team": "a"}}});
        let plain = json!({"metadata": {}});
        let prod = Some(json!({"env": "prod"}));
        let update = req(cms, None, Operation::Update, &user);
        assert!(applies(&h, &update, &labelled, None, &prod));
        assert!(applies(&h, &update, &plain, Some(&labelled), &prod));
        assert!(!applies(&h, &update, &plain, Some(&plain), &prod));
        assert!(!applies(
            &h,
            &update,
            &labelled,
            None,
            &Some(json!({"env": "dev"}))
        ));
        let delete = req(cms, None, Operation::Delete, &user);
        assert!(applies(&h, &delete, &Value::Null, Some(&labelled), &prod));
    }

    #[test]
    fn refusals_read_as_kube_apiservers() {
        let h = hook_of(json!({"name": "deny.example.com", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "clientConfig": {"url": "https://h/"}, "rules": []}));
        let e = verdict(
            &h,
            Ok(json!({"allowed": false, "status": {"message": "no"}})),
        )
        .unwrap_err();
        let s = e.status();
        assert_eq!(s["code"], 400);
        assert_eq!(
            s["message"],
            "admission webhook \"deny.example.com\" denied the request: no"
        );
        let e = verdict(
            &h,
            Ok(json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden"}})),
        )
        .unwrap_err();
        assert_eq!(e.code(), axum::http::StatusCode::FORBIDDEN);
        assert_eq!(
            e.status()["message"],
            "admission webhook \"deny.example.com\" denied the request: Forbidden"
        );
        let e = verdict(&h, Ok(json!({"allowed": false}))).unwrap_err();
        assert!(e.status()["message"]
            .as_str()
            .unwrap()
            .ends_with("without explanation"));
        // A failed call refuses under Fail and lets the write by under Ignore.
        let e = verdict(&h, Err("connection refused".into())).unwrap_err();
        assert_eq!(e.code(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.status()["message"]
            .as_str()
            .unwrap()
            .contains("failed calling webhook \"deny.example.com\""));
        let mut ignore = h;
        ignore.ignore_failure = true;
        assert!(verdict(&ignore, Err("connection refused".into()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn configurations_are_checked_field_by_field() {
        let mut c = json!({"webhooks": [
            {"name": "short", "admissionReviewVersions": ["v2"], "sideEffects": "Some",
             "timeoutSeconds": 60, "clientConfig": {"url": "http://h/x?y=1"},
             "rules": [{"operations": ["CREATE", "PATCH"], "apiGroups": [], "apiVersions": ["*", "v1"], "resources": ["pods"]}]},
            {"name": "ok.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
             "clientConfig": {"service": {"namespace": "", "name": "s", "path": "x"}},
             "matchConditions": [{"name": "a", "expression": "true"}],
             "namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "in"},
                                                        {"key": "b", "operator": "In"}]}},
        ]});
        default_config(&mut c, false);
        let fields: Vec<String> = check_config(&c, false)
            .into_iter()
            .map(|c| c.field)
            .collect();
        for f in [
            "webhooks[0].name",
            "webhooks[0].admissionReviewVersions",
            "webhooks[0].sideEffects",
            "webhooks[0].timeoutSeconds",
            "webhooks[0].clientConfig.url",
            "webhooks[0].rules[0].operations[1]",
            "webhooks[0].rules[0].apiGroups",
            "webhooks[0].rules[0].apiVersions",
            "webhooks[1].clientConfig.service.namespace",
            "webhooks[1].clientConfig.service.path",
            "webhooks[1].matchConditions",
            "webhooks[1].namespaceSelector.matchExpressions[0].operator",
            "webhooks[1].namespaceSelector.matchExpressions[1].values",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        assert_eq!(c["webhooks"][1]["clientConfig"]["service"]["port"], 443);
        assert_eq!(c["webhooks"][1]["failurePolicy"], "Fail");
        assert!(c["webhooks"][1].get("reinvocationPolicy").is_none());
    }

    #[test]
    fn reviews_carry_the_request() {
        let pods = super::super::resources::find("", "v1", "pods").unwrap();
        let user = User {
            name: "alice".into(),
            uid: String::new(),
            groups: vec!["devs".into()],
        };
        let h = hook_of(json!({"name": "a.b.c", "sideEffects": "None",
            "admissionReviewVersions": ["v1beta1"], "clientConfig": {"url": "https://h/"}, "rules": []}));
        let r = req(pods, Some(Sub::Status), Operation::Update, &user);
        let v = r.review(&h, "u1", &json!({"a": 1}), Some(&json!({"a": 0})));
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1beta1");
        let q = &v["request"];
        assert_eq!(q["uid"], "u1");
        assert_eq!(
            q["resource"],
            json!({"group": "", "version": "v1", "resource": "pods"})
        );
        assert_eq!(q["subResource"], "status");
        assert_eq!(q["operation"], "UPDATE");
        assert_eq!(q["userInfo"]["username"], "alice");
        assert_eq!(q["oldObject"]["a"], 0);
        assert_eq!(q["options"]["kind"], "UpdateOptions");
        // A Namespace's request names it as its namespace.
        let nss = super::super::resources::find("", "v1", "namespaces").unwrap();
        let mut r = req(nss, None, Operation::Create, &user);
        r.name = "team";
        let v = r.review(&h, "u2", &json!({}), None);
        assert_eq!(v["request"]["namespace"], "team");
    }
}
