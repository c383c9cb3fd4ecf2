//! The Kubernetes API server, on axum, over the replicated [`crate::store`].
//!
//! ```text
//! request ─▶ authenticate (client cert CN/O, bearer token) ─▶ route (path → resource, verb)
//!         ─▶ authorize (RBAC) ─▶ rest: admit (defaults, validation) ─▶ store txn ─▶ JSON/Table
//! ```
//!
//! Objects are stored as JSON under `/registry/{group}/{resource}/{namespace}/{name}`; an
//! object's resourceVersion is the store revision of its last change. [`router`] is what the
//! binaries serve (behind TLS, see [`serve`]) and what tests call without a socket.

pub mod admit;
pub mod auth;
mod convert;
pub mod crd;
pub mod discovery;
pub mod error;
mod evict;
mod exec;
mod forward;
pub mod hooks;
mod leases;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod outpost;
pub mod patch;
pub mod pick;
pub mod prom;
pub mod proto;
mod proxy;
pub(crate) mod quota;
pub(crate) mod raw;
pub mod resources;
mod rest;
pub mod select;
pub mod serve;
pub mod spdy;
pub mod ssa;
pub mod table;
pub mod token;
pub mod upstream;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use tracing::Instrument;

use crate::store::Store;
pub use auth::User;
pub use error::ApiError;
use resources::Resource;
pub(crate) use rest::bind_with_event;
pub use rest::{now, reconcile_api_endpoints, rfc3339, seconds};

/// Request bodies larger than this are refused (the Kubernetes API server's limit is 3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// The API server's state.
pub struct Api {
    pub store: Store,
    /// Bearer tokens → users.
    pub tokens: HashMap<String, User>,
    /// `host:port` clients reach this server at (legacy discovery reports it).
    pub server: String,
    /// The service CIDR ClusterIPs come from.
    pub service_net: (Ipv4Addr, u8),
    /// The cluster CA's directory, where tokens and node certificates come from.
    pub pki_dir: Option<std::path::PathBuf>,
    /// Nodes connected to this member's gateway.
    pub links: Arc<crate::gateway::Links>,
    /// Modules compiled ahead of time for nodes without a compiler.
    pub aot: crate::aot::Aot,
    /// Issues and checks ServiceAccount tokens (the cluster CA's key).
    pub signer: Option<token::Signer>,
    /// Requests answered, for `/metrics`.
    pub requests: prom::Requests,
    /// The admission webhooks writes go through.
    pub hooks: hooks::Registry,
}

impl Api {
    pub fn new(store: Store, server: String) -> Api {
        Api {
            store,
            tokens: HashMap::new(),
            server,
            service_net: (Ipv4Addr::new(10, 96, 0, 0), 16),
            pki_dir: None,
            links: Arc::default(),
            aot: crate::aot::Aot::default(),
            signer: None,
            requests: prom::Requests::default(),
            hooks: hooks::Registry::default(),
        }
    }
}

/// The authenticated peer of a connection, set by the TLS layer from its client certificate.
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<User>);

pub fn router(api: Arc<Api>) -> Router {
    Router::new().fallback(handle).with_state(api)
}

/// Query parameters.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | "True"))
    }
    pub fn all(&self, k: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

pub(crate) fn json_response(code: StatusCode, v: &Value, content_type: &str) -> Response {
    let mut r = (code, serde_json::to_vec(v).unwrap_or_default()).into_response();
    if let Ok(ct) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v, "application/json")
}

async fn authenticate(api: &Api, peer: Option<&Peer>, headers: &HeaderMap) -> Option<User> {
    if let Some(tok) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    {
        let tok = tok.trim();
        let user = match api.tokens.get(tok) {
            Some(u) => Some(u.clone()),
            None if token::looks_like_jwt(tok) => token::authenticate(api, tok).await,
            None => None,
        };
        return user.map(|mut u| {
            u.groups.push("system:authenticated".into());
            u
        });
    }
    peer.and_then(|p| p.0.clone()).map(|mut u| {
        u.groups.push("system:authenticated".into());
        u
    })
}

/// Whom a request acts as: `user`, or the user its `Impersonate-*` headers name (`kubectl
/// --as`, `--as-group`, `--as-uid`) once `user` may `impersonate` that user (or service
/// account), each group, the uid and each extra, as kube-apiserver checks them.
async fn impersonate(api: &Api, user: User, headers: &HeaderMap) -> Result<User, ApiError> {
    let values = |h: &str| -> Vec<String> {
        headers
            .get_all(h)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let names = values("impersonate-user");
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid");
    let extras: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("impersonate-extra-")?;
            Some((key.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    let [name] = names.as_slice() else {
        if names.is_empty() && groups.is_empty() && uid.is_empty() && extras.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::BadRequest(
            "impersonating groups, a uid or extras needs exactly one Impersonate-User".into(),
        ));
    };
    let may = |group: &str, resource: &str, ns: &str, name: &str, sub: &str| auth::Attrs {
        verb: "impersonate".into(),
        group: group.into(),
        resource: resource.into(),
        subresource: sub.into(),
        namespace: ns.into(),
        name: name.into(),
        path: None,
    };
    let account = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    let acting = match account {
        Some((ns, sa)) => may("", "serviceaccounts", ns, sa, ""),
        None => may("", "users", "", name, ""),
    };
    rest::authorize(api, &user, &acting).await?;
    for g in &groups {
        rest::authorize(api, &user, &may("", "groups", "", g, "")).await?;
    }
    if let Some(u) = uid.first() {
        rest::authorize(api, &user, &may("authentication.k8s.io", "uids", "", u, "")).await?;
    }
    for (k, v) in &extras {
        rest::authorize(
            api,
            &user,
            &may("authentication.k8s.io", "userextras", "", v, k),
        )
        .await?;
    }
    let mut groups = groups;
    if let (Some((ns, _)), true) = (account, groups.is_empty()) {
        groups = vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ];
    }
    let joined = if name == "system:anonymous" {
        "system:unauthenticated"
    } else {
        "system:authenticated"
    };
    if !groups.iter().any(|g| g == joined) {
        groups.push(joined.into());
    }
    Ok(User {
        name: name.clone(),
        uid: uid.first().cloned().unwrap_or_default(),
        groups,
    })
}

async fn handle(State(api): State<Arc<Api>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let kind = prom::kind(
        req.method().as_str(),
        req.uri().path(),
        Query::parse(req.uri().query()).flag("watch"),
        req.headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|c| c.as_bytes().starts_with(b"application/apply-patch")),
    );
    let resp = answer(&api, req).await;
    if let Some(kind) = kind {
        api.requests
            .record(kind, resp.status().as_u16(), started.elapsed());
    }
    resp
}

async fn answer(api: &Arc<Api>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let user = authenticate(api, req.extensions().get::<Peer>(), req.headers()).await;
    let span = tracing::debug_span!("request", %method, %path,
        user = user.as_ref().map(|u| u.name.as_str()).unwrap_or(""));
    let probe = ["/livez", "/readyz", "/healthz"]
        .iter()
        .any(|p| path.starts_with(p));
    if probe {
        if let Some((code, text)) = health(&path, req.uri().query(), api.store.status().leader) {
            return (code, text).into_response();
        }
    }
    let Some(user) = user else {
        return ApiError::Unauthorized.into_response();
    };
    let user = match impersonate(api, user, req.headers()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    match dispatch(api, user, req).instrument(span).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `/livez`, `/readyz` and `/healthz` as kube-apiserver answers them, with their checks one by
/// one under the path (`/readyz/etcd`), `?verbose` and `?exclude=`: live while the process
/// answers; ready and healthy while the store has a leader too, so a member cut off from
/// its quorum drops out of a load balancer. `None` for any other path.
fn health(path: &str, query: Option<&str>, leader: Option<u64>) -> Option<(StatusCode, String)> {
    let (endpoint, only) = match path.trim_start_matches('/').split_once('/') {
        Some((e, check)) => (e, Some(check)),
        None => (path.trim_start_matches('/'), None),
    };
    let checks: &[(&str, bool)] = match endpoint {
        "livez" => &[("ping", true)],
        "readyz" | "healthz" => &[("ping", true), ("etcd", leader.is_some())],
        _ => return None,
    };
    let q = Query::parse(query);
    if let Some(check) = only {
        return Some(match checks.iter().find(|(n, _)| *n == check) {
            Some((_, true)) => (StatusCode::OK, "ok".into()),
            Some((n, false)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal server error: {n} check failed"),
            ),
            None => (StatusCode::NOT_FOUND, "404 page not found".into()),
        });
    }
    let excluded = q.all("exclude");
    let mut lines = Vec::new();
    let mut ok = true;
    for (name, passed) in checks {
        if excluded.contains(name) {
            lines.push(format!("[+]{name} excluded: ok"));
        } else if *passed {
            lines.push(format!("[+]{name} ok"));
        } else {
            ok = false;
            lines.push(format!("[-]{name} failed: reason withheld"));
        }
    }
    // Present at all, as kube-apiserver reads it (`?verbose`).
    let verbose =
        query.is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some("verbose")));
    if ok && !verbose {
        return Some((StatusCode::OK, "ok".into()));
    }
    let verdict = if ok { "passed" } else { "failed" };
    lines.push(format!("{endpoint} check {verdict}"));
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    Some((code, lines.join("\n") + "\n"))
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::TooLarge(MAX_BODY))
}

/// The component a control-plane identity belongs to, as Kubernetes names its field
/// manager: the scheduler's writes are `kube-scheduler`'s, the API server's own
/// `kube-apiserver`'s, every controller's `kube-controller-manager`'s.
fn component(user: &str) -> &'static str {
    match user {
        "system:kube-scheduler" => "kube-scheduler",
        u if u.starts_with("system:apiextensions") => "kube-apiserver",
        _ => "kube-controller-manager",
    }
}

/// A request to the API from inside the control plane (scheduler, controllers) as `user`,
/// through the same router, admission and authorization as any client's: the status and
/// the JSON body.
pub async fn call_as(
    api: &Arc<Api>,
    user: &User,
    method: &str,
    path: &str,
    content_type: &str,
    body: &Value,
) -> (u16, Value) {
    use tower::ServiceExt;
    let Ok(mut req) = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::USER_AGENT, component(&user.name))
        .body(Body::from(body.to_string()))
    else {
        return (400, Value::Null);
    };
    req.extensions_mut().insert(Peer(Some(user.clone())));
    let Ok(resp) = router(api.clone()).oneshot(req).await;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Decode a request body by its Content-Type (JSON when none is given).
pub fn decode_body(content_type: Option<&str>, bytes: &[u8]) -> Result<Value, ApiError> {
    let base = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("the request body is empty".into()));
    }
    match base {
        "" | "application/json" | "*/*" | "application/json-patch+json"
        | "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            serde_json::from_slice(bytes).map_err(|e| {
                ApiError::BadRequest(format!("couldn't decode the request body as JSON: {e}"))
            })
        }
        "application/yaml" | "application/apply-patch+yaml" | "application/x-yaml" => {
            serde_json::from_slice(bytes).or_else(|_| {
                serde_norway::from_slice::<Value>(bytes).map_err(|e| {
                    ApiError::BadRequest(format!("couldn't decode the request body as YAML: {e}"))
                })
            })
        }
        "application/vnd.kubernetes.protobuf" => proto::decode(bytes),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format ({other}) - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf"
        ))),
    }
}

/// Where a resource request points.
#[derive(Debug)]
pub(crate) struct Target {
    pub res: &'static Resource,
    /// The group asked for, which RBAC judges: the resource's own, or a view's.
    pub group: &'static str,
    /// The version asked for: the resource's own, or a view's.
    pub version: &'static str,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    parse_target_in(group, version, rest, resources::find)
}

/// [`parse_target`], the resource found by `find`.
fn parse_target_in(
    group: &str,
    version: &str,
    rest: &[&str],
    find: fn(&str, &str, &str) -> Option<&'static Resource>,
) -> Result<Target, ApiError> {
    let nf = || ApiError::NoRoute("the server could not find the requested resource".into());
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !(group.is_empty()
                && matches!(*plural, "status" | "finalize")
                && tail.is_empty()) =>
        {
            (Some(ns.to_string()), {
                let mut v = vec![*plural];
                v.extend_from_slice(tail);
                v
            })
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return Err(nf()),
    };
    let res = find(group, version, plural).ok_or_else(nf)?;
    if ns.is_some() && !res.namespaced {
        return Err(nf());
    }
    if res.namespaced && ns.is_none() && name.is_some() {
        return Err(nf());
    }
    if name.as_deref() == Some("") {
        return Err(nf());
    }
    Ok(Target {
        res,
        group: res.group,
        version: res.version,
        ns,
        name,
        sub,
    })
}

async fn dispatch(api: &Arc<Api>, user: User, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/').to_string();
    let query = Query::parse(parts.uri.query());
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let non_resource = |p: &str| auth::Attrs {
        verb: method_verb(&parts.method).into(),
        group: String::new(),
        resource: String::new(),
        subresource: String::new(),
        namespace: String::new(),
        name: String::new(),
        path: Some(p.to_string()),
    };
    if let ["outpost", "v1", rest @ ..] = segs.as_slice() {
        let mut attrs = non_resource(&path);
        if parts.method == Method::POST {
            attrs.verb = "create".into();
        }
        rest::authorize(api, &user, &attrs).await?;
        return outpost::serve(api, &parts.method, rest, &query, body).await;
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", "v1", rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (g, v, rest),
        _ => {
            let p = if path.is_empty() { "/" } else { path.as_str() };
            rest::authorize(api, &user, &non_resource(p)).await?;
            if p == "/metrics" && parts.method == Method::GET {
                let text = prom::render(api).await;
                return Ok((
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
                    .into_response());
            }
            if parts.method != Method::GET {
                return Err(ApiError::MethodNotAllowed(format!(
                    "{} is not supported on {p}",
                    parts.method
                )));
            }
            if let (Some(signer), true) = (
                &api.signer,
                matches!(p, "/.well-known/openid-configuration" | "/openid/v1/jwks"),
            ) {
                let host = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or(parts.uri.authority().map(|a| a.as_str()))
                    .unwrap_or("kubernetes.default.svc");
                let (ct, v) = match p {
                    "/openid/v1/jwks" => ("application/jwk-set+json", signer.jwks()),
                    _ => ("application/json", token::discovery(host)),
                };
                return Ok(([(header::CONTENT_TYPE, ct)], v.to_string()).into_response());
            }
            return non_resource_get(api, &segs, &accept);
        }
    };
    if let (true, Some(t)) = (group.is_empty(), proxy::target(rest)) {
        return proxy::serve(api, &user, parts, body, t).await;
    }
    if let Some(view) = view_of(group, version, rest)? {
        return viewed(api, user, parts, query, view, rest, body).await;
    }
    let target = match parse_target(group, version, rest) {
        Err(ApiError::NoRoute(_)) if !resources::builtin(group) && crd_reload_due() => {
            // A CRD another member just made is served here once this member has read it.
            rest::reload_crds(api).await?;
            if let Some(view) = view_of(group, version, rest)? {
                return viewed(api, user, parts, query, view, rest, body).await;
            }
            parse_target(group, version, rest)?
        }
        t => t?,
    };
    let body = read_body(body).await?;
    rest::serve(api, user, parts, query, target, body).await
}

/// Whether a request for an unknown group may read the CRDs again: at most ten times a
/// second, so requests for groups nobody serves cost no more than a 404.
fn crd_reload_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1000;
    let last = LAST.load(Ordering::Relaxed);
    now >= last + 100
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// The view ([`convert`]) a request for `group`/`version` goes through, if any; a version
/// served only by views answers nothing else.
fn view_of(
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Option<&'static convert::View>, ApiError> {
    let plural = match rest {
        ["namespaces", _, p, ..] => p,
        [p, ..] => p,
        [] => "",
    };
    if let Some(v) = crd::view(group, version, plural) {
        return Ok(Some(v));
    }
    if !convert::has_views(group, version) {
        return Ok(None);
    }
    match convert::view(group, version, plural) {
        Some(v) => Ok(Some(v)),
        None if convert::stored(group, version).is_some() => Err(ApiError::NoRoute(
            "the server could not find the requested resource".into(),
        )),
        None => Ok(None),
    }
}

/// A request through a view: its body and field selector converted up, the stored
/// resource's handling, and the objects of the answer (a watch's too) converted down.
async fn viewed(
    api: &Arc<Api>,
    user: User,
    mut parts: axum::http::request::Parts,
    mut query: Query,
    view: &'static convert::View,
    rest: &[&str],
    body: Body,
) -> Result<Response, ApiError> {
    // A CRD's storage version is there for its views even when not served itself.
    let mut target = parse_target_in(view.stored.0, view.stored.1, rest, |g, v, p| {
        resources::find(g, v, p).or_else(|| crd::stored(g, v, p))
    })?;
    // Permission is for what was asked: events in events.k8s.io are not core events to RBAC.
    target.group = view.group;
    target.version = view.version;
    for (k, v) in query.0.iter_mut() {
        if k == "fieldSelector" {
            *v = view.selector_up(v)?;
        }
    }
    let mut body = read_body(body).await?;
    if !body.is_empty() {
        let ct = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .map(String::from);
        let v = decode_body(ct.as_deref(), &body)?;
        if let Some(check) = view.check.filter(|_| parts.method == Method::POST) {
            let causes = check(&v);
            if !causes.is_empty() {
                return Err(ApiError::Invalid {
                    group: view.group.into(),
                    kind: view.kind.into(),
                    name: v["metadata"]["name"].as_str().unwrap_or("").into(),
                    causes,
                });
            }
        }
        let v = view.body_up(v);
        body = Bytes::from(serde_json::to_vec(&v).map_err(|e| ApiError::Internal(e.to_string()))?);
        // Now JSON, which is also YAML: patches keep their type, objects say JSON.
        if !ct.as_deref().is_some_and(|c| c.contains("patch")) {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    // The answer is converted as JSON; a client that prefers protobuf takes JSON too.
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if accept.contains("protobuf") {
        let json: Vec<&str> = accept
            .split(',')
            .filter(|a| a.trim().starts_with("application/json"))
            .collect();
        let json = if json.is_empty() {
            "application/json".to_string()
        } else {
            json.join(",")
        };
        if let Ok(h) = HeaderValue::from_str(&json) {
            parts.headers.insert(header::ACCEPT, h);
        }
    }
    // A stream only where the answer is one: a GET of a collection asking to watch.
    let watch = query.flag("watch") && parts.method == Method::GET && target.name.is_none();
    let resp = rest::serve(api, user, parts, query, target, body).await?;
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !ct.starts_with("application/json") {
        return Ok(resp);
    }
    let (head, body) = resp.into_parts();
    let mut headers = head.headers;
    headers.remove(header::CONTENT_LENGTH);
    if watch {
        use futures::StreamExt;
        // One event a line; a line may come in pieces, and the last may end unterminated.
        let buf = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let rest = buf.clone();
        let lines = body
            .into_data_stream()
            .map(move |chunk| {
                chunk.map(|c| {
                    let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
                    buf.extend_from_slice(&c);
                    let mut out = Vec::new();
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        out.extend(view.watch_line_down(&line[..i]));
                        out.push(b'\n');
                    }
                    Bytes::from(out)
                })
            })
            .chain(futures::stream::once(async move {
                let left = std::mem::take(&mut *rest.lock().unwrap_or_else(|e| e.into_inner()));
                Ok(if left.is_empty() {
                    Bytes::new()
                } else {
                    Bytes::from(view.watch_line_down(&left))
                })
            }));
        return Ok((head.status, headers, Body::from_stream(lines)).into_response());
    }
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => serde_json::to_vec(&view.answer_down(v)).unwrap_or_else(|_| bytes.to_vec()),
        Err(_) => bytes.to_vec(),
    };
    Ok((head.status, headers, out).into_response())
}

fn method_verb(m: &Method) -> &'static str {
    match *m {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn non_resource_get(api: &Api, segs: &[&str], accept: &str) -> Result<Response, ApiError> {
    let nf = || ApiError::NoRoute("the server could not find the requested resource".into());
    match segs {
        ["version"] => Ok(ok(&discovery::version())),
        ["api"] | ["apis"] => {
            let core = segs[0] == "api";
            match discovery::aggregated_version(accept) {
                Some(v) => Ok(json_response(
                    StatusCode::OK,
                    &discovery::aggregated(core, v),
                    &discovery::content_type(v),
                )),
                None if core => Ok(ok(&discovery::api_versions(&api.server))),
                None => Ok(ok(&discovery::api_group_list())),
            }
        }
        ["api", "v1"] => discovery::resource_list("", "v1")
            .map(|v| ok(&v))
            .ok_or_else(nf),
        ["apis", g] => discovery::group(g).map(|v| ok(&v)).ok_or_else(nf),
        ["apis", g, v] => discovery::resource_list(g, v)
            .map(|v| ok(&v))
            .ok_or_else(nf),
        ["openapi", "v3"] => Ok(ok(&openapi::root())),
        ["openapi", "v2"] | ["swagger-2.0.0.pb-v1"] | ["swagger.json"] => {
            let proto = accept.contains("protobuf") || segs[0] == "swagger-2.0.0.pb-v1";
            let (body, ct) = if proto {
                (openapi::v2::proto_doc(), openapi::v2::PROTO_TYPE)
            } else {
                (openapi::v2::json_doc(), "application/json")
            };
            let mut r = (StatusCode::OK, body.to_vec()).into_response();
            if let Ok(v) = HeaderValue::from_str(ct) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            Ok(r)
        }
        ["openapi", "v3", rest @ ..] => {
            let doc = openapi::doc(&rest.join("/")).ok_or_else(nf)?;
            let mut r = (StatusCode::OK, doc.body.clone()).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, immutable, max-age=31536000"),
            );
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", doc.hash)) {
                h.insert(header::ETAG, etag);
            }
            Ok(r)
        }
        _ => Err(nf()),
    }
}

/// Create the objects every cluster starts with (namespaces, bootstrap RBAC, the
/// `kubernetes` service). Idempotent; [`start`] runs it on every member.
pub async fn bootstrap(api: &Arc<Api>) -> Result<(), ApiError> {
    rest::bootstrap(api).await
}

/// How to serve the API.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: std::net::SocketAddr,
    /// Holds the cluster CA (`ca.crt`, `ca.key`).
    pub pki_dir: std::path::PathBuf,
    /// Names and addresses the serving certificate covers.
    pub names: Vec<String>,
    /// A Kubernetes token file (`token,user,uid,"groups"`), if any.
    pub token_file: Option<std::path::PathBuf>,
    /// UDP address of the node gateway, if this member serves nodes.
    pub gateway: Option<std::net::SocketAddr>,
    /// Validity of the client certificates nodes get ([`crate::pki::NODE_CERT_TTL`]).
    pub node_cert_ttl: std::time::Duration,
    /// When a node without a link is unreachable, and when its pods are evicted.
    pub lifecycle: crate::controllers::nodes::Lifecycle,
    /// How long an Event lasts after its last write ([`crate::controllers::events::TTL`]).
    pub event_ttl: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Gateway(#[from] crate::gateway::StartError),
}

/// A running API server.
pub struct Started {
    pub addr: std::net::SocketAddr,
    /// Where the node gateway listens, if it was asked for.
    pub gateway: Option<std::net::SocketAddr>,
    pub api: Arc<Api>,
    /// Serves until aborted (with the gateway).
    pub task: tokio::task::JoinHandle<()>,
}

/// Bind the API port (and the node gateway), create the cluster's bootstrap objects once the
/// store has a leader, and serve until the returned task is aborted.
pub async fn start(store: Store, cfg: ServeConfig) -> Result<Started, StartError> {
    let mut api = Api::new(store, String::new());
    // Pods reach the API as the `kubernetes` Service, by its names or its cluster IP (the
    // first of the service network), and check it against the CA in their token's volume.
    let mut names = cfg.names.clone();
    let service_ip = Ipv4Addr::from(u32::from(api.service_net.0) + 1).to_string();
    for n in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        &service_ip,
    ] {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    let tls = crate::pki::api_server_config(&cfg.pki_dir, &names)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Io {
            what: format!("binding the API on {}", cfg.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Io {
        what: "API address".into(),
        source,
    })?;
    api.server = addr.to_string();
    api.pki_dir = Some(cfg.pki_dir.clone());
    api.aot = crate::aot::Aot::new(Some(cfg.pki_dir.with_file_name("aot")));
    api.signer = match token::Signer::from_pki(&cfg.pki_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "ServiceAccount tokens cannot be issued or checked");
            None
        }
    };
    if let Some(f) = &cfg.token_file {
        api.tokens = auth::load_tokens(f).map_err(|source| StartError::Io {
            what: format!("reading {}", f.display()),
            source,
        })?;
    }
    let api = Arc::new(api);
    let gateway = match cfg.gateway {
        Some(listen) => Some(crate::gateway::start(
            api.clone(),
            listen,
            &cfg.pki_dir,
            cfg.node_cert_ttl,
        )?),
        None => None,
    };
    let boot = api.clone();
    let app = router(api.clone());
    let mut helpers: Vec<tokio::task::AbortHandle> =
        gateway.iter().map(|(_, t)| t.abort_handle()).collect();
    helpers.push(tokio::spawn(crate::scheduler::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::autoscaler::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::gc::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::crds::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(hooks::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::csr::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::rbac::run(api.clone())).abort_handle());
    helpers.push(tokio::spawn(crate::controllers::quota::run(api.clone())).abort_handle());
    helpers.push(
        tokio::spawn(crate::controllers::events::run(api.clone(), cfg.event_ttl)).abort_handle(),
    );
    helpers.push(tokio::spawn(crate::controllers::volumes::run(api.clone())).abort_handle());
    helpers.push(
        tokio::spawn(crate::controllers::nodes::run(api.clone(), cfg.lifecycle)).abort_handle(),
    );
    let task = tokio::spawn(async move {
        // Aborting the API's task takes the gateway, the scheduler and the controllers with it.
        struct Abort(Vec<tokio::task::AbortHandle>);
        impl Drop for Abort {
            fn drop(&mut self) {
                for h in &self.0 {
                    h.abort();
                }
            }
        }
        let _helpers = Abort(helpers);
        tokio::spawn(async move {
            for attempt in 0u32.. {
                match rest::bootstrap(&boot).await {
                    Ok(()) => break,
                    Err(e) if attempt % 20 == 19 => {
                        tracing::warn!(error = %e, "bootstrap objects not created yet; retrying")
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
        if let Err(e) = serve::serve(listener, Arc::new(tls), app).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    tracing::info!(%addr, "Kubernetes API listening");
    Ok(Started {
        addr,
        gateway: gateway.map(|(a, _)| a),
        api,
        task,
    })
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn health_checks_say_which_passed() {
        let ok = |p: &str, q: Option<&str>, l| health(p, q, l).unwrap();
        assert_eq!(ok("/livez", None, None), (StatusCode::OK, "ok".into()));
        assert_eq!(ok("/readyz", None, Some(1)), (StatusCode::OK, "ok".into()));
        assert_eq!(
            ok("/readyz", Some("verbose"), Some(1)),
            (
                StatusCode::OK,
                "[+]ping ok\n[+]etcd ok\nreadyz check passed\n".into()
            )
        );
        // No leader: not ready, but alive.
        let (code, text) = ok("/readyz", None, None);
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(text.contains("[-]etcd failed"), "{text}");
        assert_eq!(
            ok("/healthz", None, None).0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(ok("/livez", Some("verbose"), None).0, StatusCode::OK);
        assert_eq!(ok("/readyz", Some("exclude=etcd"), None).0, StatusCode::OK);
        assert_eq!(ok("/readyz/ping", None, None).0, StatusCode::OK);
        assert_eq!(
            ok("/readyz/etcd", None, None).0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(ok("/livez/nope", None, None).0, StatusCode::NOT_FOUND);
        assert!(health("/version", None, None).is_none());
        assert!(health("/api", None, None).is_none());
    }
}
