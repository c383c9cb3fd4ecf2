//! The verbs on resources: get, list, watch, create, update, patch, apply, delete,
//! deletecollection, the status/scale/binding/eviction subresources, the access reviews,
//! and the cascading deletes the API does on behalf of owners and namespaces.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_api::store::{EventKind, Expect, KeyValue, Op, Outcome};
use serde_json::{json, Map, Value};

use super::auth::{self, Attrs, Policy, User};
use super::error::{ApiError, Cause};
use super::hooks::{self, Operation};
use super::pick;
use super::resources::{self, Resource, Sub};
use super::select::{Fields, Labels};
use super::table::{self, Include};
use super::{admit, crd, openapi, patch, quota, raw, ssa, Api, Query, Target};
use crate::store::{Consistency, WatchItem};

pub fn now() -> String {
    rfc3339(now_secs())
}

/// `secs` since the epoch as Kubernetes writes a time (RFC 3339, whole seconds, UTC); a time
/// past what a timestamp holds (a client's huge grace period) is held at the last one.
pub fn rfc3339(secs: i64) -> String {
    let (min, max) = (jiff::Timestamp::MIN, jiff::Timestamp::MAX);
    let t =
        jiff::Timestamp::from_second(secs.clamp(min.as_second(), max.as_second())).unwrap_or(max);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A time field (RFC 3339) as seconds since the epoch.
pub fn seconds(t: &Value) -> Option<i64> {
    t.as_str()?
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}

fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// A stored value as the API shows it: resourceVersion is the key's mod revision.
fn from_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(internal)?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

fn set_rv(v: &mut Value, rv: u64) {
    if let Some(m) = v["metadata"].as_object_mut() {
        m.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

/// `v` as stored: without resourceVersion (the key's revision) and selfLink, written out
/// as it is rather than from a copy with those removed.
fn to_stored(v: &Value) -> Vec<u8> {
    struct Stored<'a>(&'a Value, bool);
    impl serde::Serialize for Stored<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let (Value::Object(m), top) = (self.0, self.1) else {
                return self.0.serialize(s);
            };
            let mut out = s.serialize_map(None)?;
            for (k, x) in m {
                if top && k == "metadata" {
                    out.serialize_entry(k, &Stored(x, false))?;
                } else if top || !matches!(k.as_str(), "resourceVersion" | "selfLink") {
                    out.serialize_entry(k, x)?;
                }
            }
            out.end()
        }
    }
    serde_json::to_vec(&Stored(v, true)).unwrap_or_default()
}

fn rv_of(v: &Value) -> Option<u64> {
    v["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

fn meta(v: &mut Value) -> &mut Map<String, Value> {
    if !v["metadata"].is_object() {
        v["metadata"] = json!({});
    }
    match &mut v["metadata"] {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

/// Whether `a` and `b` agree on everything but metadata and status: what a generation
/// counts changes of. Compared in place; copying both objects to compare them was a tenth
/// of a status update's cost.
fn same_spec(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    fn rest(m: &Map<String, Value>) -> impl Iterator<Item = (&String, &Value)> {
        m.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
    }
    rest(a).count() == rest(b).count() && rest(a).all(|(k, v)| b.get(k) == Some(v))
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.split(',').any(|p| p.contains("as=Table")))
}

fn include(q: &Query) -> Include {
    match q.get("includeObject") {
        Some("None") => Include::None,
        Some("Object") => Include::Object,
        _ => Include::Metadata,
    }
}

const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

pub(super) async fn load_policy(api: &Api) -> Result<Policy, ApiError> {
    let mut p = Policy::default();
    for plural in [
        "clusterroles",
        "roles",
        "clusterrolebindings",
        "rolebindings",
    ] {
        let r = resources::find("rbac.authorization.k8s.io", "v1", plural)
            .ok_or_else(|| internal("rbac"))?;
        let page = api
            .store
            .range(&r.prefix(None), None, 0, Consistency::Serializable)
            .await?;
        for kv in page.kvs {
            let v: Value = serde_json::from_slice(&kv.value).map_err(internal)?;
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = name_of(&v).to_string();
            match plural {
                "clusterroles" => {
                    p.cluster_roles.insert(name, v);
                }
                "roles" => {
                    p.roles.insert((ns, name), v);
                }
                "clusterrolebindings" => p.cluster_bindings.push(v),
                _ => p.bindings.push(v),
            }
        }
    }
    Ok(p)
}

pub(super) async fn authorize(api: &Api, user: &User, a: &Attrs) -> Result<(), ApiError> {
    if let Some(node) = super::node::node_name(user) {
        return super::node::authorize(api, node, a, None).await;
    }
    if user.is_master() || load_policy(api).await?.allows(user, a) {
        return Ok(());
    }
    // kube-apiserver's wording: `pods "x" is forbidden: User "u" cannot delete resource
    // "pods" in API group "" in the namespace "t1"`.
    let message = match &a.path {
        Some(p) => format!(
            "forbidden: User \"{}\" cannot {} path \"{p}\"",
            user.name, a.verb
        ),
        None => {
            let res = if a.subresource.is_empty() {
                a.resource.clone()
            } else {
                format!("{}/{}", a.resource, a.subresource)
            };
            let scope = if a.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace \"{}\"", a.namespace)
            };
            let what = super::error::qualified(&a.group, &a.resource);
            let what = if a.name.is_empty() {
                what
            } else {
                format!("{what} \"{}\"", a.name)
            };
            format!(
                "{what} is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
                user.name, a.verb, a.group
            )
        }
    };
    Err(ApiError::Forbidden { message })
}

/// One request on a resource.
struct Ctx<'a> {
    api: &'a Arc<Api>,
    user: User,
    res: &'static Resource,
    /// The version asked for: `res`'s own, or a view's (whose schema a CRD's objects meet).
    version: &'static str,
    ns: Option<String>,
    q: Query,
    manager: String,
    dry_run: bool,
    /// Whether writes go through admission webhooks (not an eviction's own delete, which
    /// webhooks saw as the eviction).
    hooks: bool,
}

impl Ctx<'_> {
    fn nf(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.res.qualified(), name)
    }
    fn key(&self, name: &str) -> String {
        self.res.key(self.ns.as_deref(), name)
    }
}

pub(super) async fn serve(
    api: &Arc<Api>,
    user: User,
    parts: axum::http::request::Parts,
    q: Query,
    t: Target,
    body: Bytes,
) -> Result<Response, ApiError> {
    let crd_write = (t.res.group, t.res.kind) == (crd::GROUP, "CustomResourceDefinition")
        && parts.method != Method::GET;
    let hook_write = t.res.group == hooks::GROUP && parts.method != Method::GET;
    let (mut out, warnings) = hooks::SCOPE
        .scope(hooks::Scope::new(), async {
            let out = serve_one(api, user, parts, q, t, body).await;
            (out, hooks::SCOPE.with(hooks::Scope::take_warnings))
        })
        .await;
    if let Ok(r) = &mut out {
        // As kube-apiserver passes webhooks' warnings on; kubectl prints them.
        for w in warnings {
            let text = w.replace('\\', "\\\\").replace('"', "\\\"");
            if let Ok(v) = HeaderValue::from_bytes(format!("299 - \"{text}\"").as_bytes()) {
                r.headers_mut().append(header::WARNING, v);
            }
        }
    }
    if hook_write && out.is_ok() {
        // Called from the next request on, on this member; the others follow the store.
        if let Err(e) = hooks::reload(api).await {
            tracing::warn!(error = %e, "webhooks not read again after a write; the follower will");
        }
    }
    if crd_write && out.is_ok() {
        // Served from the next request on, on this member; the others follow the store.
        if let Err(e) = reload_crds(api).await {
            tracing::warn!(error = %e, "CRDs not read again after a write; the follower will");
        }
    }
    out
}

async fn serve_one(
    api: &Arc<Api>,
    user: User,
    mut parts: axum::http::request::Parts,
    q: Query,
    t: Target,
    body: Bytes,
) -> Result<Response, ApiError> {
    let method = parts.method.clone();
    let headers = &parts.headers;
    // Set by hyper on HTTP/1.1 connections; port-forward takes the connection over with it.
    let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let watch = q.flag("watch");
    let verb = match (&method, &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => {
            return Err(ApiError::MethodNotAllowed(format!(
                "{method} is not supported"
            )))
        }
    };
    let attrs = Attrs {
        verb: verb.into(),
        group: t.group.into(),
        resource: t.res.plural.into(),
        subresource: t.sub.clone().unwrap_or_default(),
        namespace: t.ns.clone().unwrap_or_default(),
        name: t.name.clone().unwrap_or_default(),
        path: None,
    };
    let reviews = !t.res.stored && !t.res.live();
    // Anyone may ask about themselves; asking about others' tokens or rights takes RBAC.
    let about_self = reviews && t.res.kind.starts_with("Self");
    if let Some(node) = super::node::node_name(&user) {
        super::node::authorize(api, node, &attrs, q.get("fieldSelector")).await?;
    } else if !about_self {
        authorize(api, &user, &attrs).await?;
    }
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|h| h.to_str().ok())
        .and_then(|a| a.split('/').next())
        .unwrap_or("unknown")
        .to_string();
    let manager = q.get("fieldManager").map(String::from).unwrap_or(agent);
    let dry_run = q.all("dryRun").contains(&"All");
    let ctx = Ctx {
        api,
        user,
        res: t.res,
        version: t.version,
        ns: t.ns.clone(),
        q,
        manager,
        dry_run,
        hooks: true,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok());
    let table = wants_table(headers);
    let sub = match t.sub.as_deref() {
        None => None,
        Some(s) => Some(
            t.res
                .subresources
                .iter()
                .copied()
                .find(|x| x.name() == s)
                .ok_or_else(|| {
                    ApiError::NoRoute("the server could not find the requested resource".into())
                })?,
        ),
    };
    if t.res.live() {
        if method != Method::GET || sub.is_some() || watch {
            return Err(ApiError::MethodNotAllowed(format!(
                "{method} is not supported on {}",
                t.res.qualified()
            )));
        }
        return live(&ctx, t.name.as_deref(), table).await;
    }
    if reviews {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed(format!(
                "{method} is not supported on {}",
                t.res.plural
            )));
        }
        let body = super::decode_body(content_type, &body)?;
        return review(&ctx, body).await;
    }
    let name = t.name.clone().unwrap_or_default();
    match (method, sub) {
        (Method::GET, None) if t.name.is_some() => {
            let o = match get(&ctx, &name).await {
                Err(ApiError::NotFound { .. }) if node_leases(&ctx) => {
                    super::leases::get(ctx.api, &name)
                        .await?
                        .ok_or_else(|| ctx.nf(&name))?
                }
                o => o?,
            };
            if table {
                let tbl = table::table(
                    ctx.res,
                    std::slice::from_ref(&o),
                    json!({"resourceVersion": o["metadata"]["resourceVersion"]}),
                    include(&ctx.q),
                    true,
                    now_secs(),
                );
                return Ok(super::json_response(StatusCode::OK, &tbl, TABLE_CT));
            }
            Ok(respond(StatusCode::OK, &o))
        }
        (Method::GET, None) if watch => watch_stream(ctx, table).await,
        (Method::GET, None) => list(&ctx, table).await,
        (Method::GET, Some(Sub::Log)) => logs(&ctx, &name).await,
        (Method::GET | Method::POST, Some(s @ (Sub::PortForward | Sub::Exec | Sub::Attach)))
            if ctx.api.hooks.any() =>
        {
            connect_hooks(&ctx, &name, s).await?;
            let pod = get(&ctx, &name).await?;
            match s {
                Sub::PortForward => super::forward::serve(ctx.api, &pod, headers, &ctx.q, upgrade),
                _ => super::exec::serve(ctx.api, &pod, headers, &ctx.q, upgrade, s == Sub::Attach),
            }
        }
        (Method::GET | Method::POST, Some(Sub::PortForward)) => {
            let pod = get(&ctx, &name).await?;
            super::forward::serve(ctx.api, &pod, headers, &ctx.q, upgrade)
        }
        (Method::GET | Method::POST, Some(Sub::Exec)) => {
            let pod = get(&ctx, &name).await?;
            super::exec::serve(ctx.api, &pod, headers, &ctx.q, upgrade, false)
        }
        (Method::GET | Method::POST, Some(Sub::Attach)) => {
            let pod = get(&ctx, &name).await?;
            super::exec::serve(ctx.api, &pod, headers, &ctx.q, upgrade, true)
        }
        (Method::GET, Some(Sub::Status | Sub::EphemeralContainers | Sub::Approval)) => {
            Ok(respond(StatusCode::OK, &get(&ctx, &name).await?))
        }
        (Method::GET, Some(Sub::Scale)) => {
            let o = get(&ctx, &name).await?;
            Ok(respond(StatusCode::OK, &scale_of(ctx.res, &o)))
        }
        (Method::POST, None) => {
            let body = super::decode_body(content_type, &body)?;
            if let Some(node) = super::node::node_name(&ctx.user) {
                if ctx.res.kind == "Node" && body["metadata"]["name"].as_str() != Some(node) {
                    return Err(ApiError::Forbidden {
                        message: format!("node \"{node}\" may only create its own Node object"),
                    });
                }
            }
            let o = create(&ctx, body).await?;
            Ok(respond(StatusCode::CREATED, &o))
        }
        (Method::POST, Some(Sub::Binding)) => {
            let body = super::decode_body(content_type, &body)?;
            sub_create_hooks(&ctx, &name, Sub::Binding, &body).await?;
            bind(&ctx, &name, body).await
        }
        (Method::POST, Some(Sub::Token)) => {
            let req = if body.is_empty() {
                json!({})
            } else {
                super::decode_body(content_type, &body)?
            };
            let sa = get(&ctx, &name).await?;
            sub_create_hooks(&ctx, &name, Sub::Token, &req).await?;
            if let Some(node) = super::node::node_name(&ctx.user) {
                let ns = ctx.ns.as_deref().unwrap_or("default");
                super::node::token_request(ctx.api, node, ns, &name, &req).await?;
            }
            let answer = super::token::issue(ctx.api, &sa, &req).await?;
            Ok(respond(StatusCode::CREATED, &answer))
        }
        (Method::POST, Some(Sub::Eviction)) => {
            let body = if body.is_empty() {
                Value::Null
            } else {
                super::decode_body(content_type, &body)?
            };
            let pod = get(&ctx, &name).await?;
            let opts = &body["deleteOptions"];
            let (_, _, _, dry) = delete_options(&ctx, opts);
            let eviction = if body.is_object() {
                body.clone()
            } else {
                json!({"apiVersion": "policy/v1", "kind": "Eviction",
                       "metadata": {"name": name, "namespace": ctx.ns}})
            };
            sub_create_hooks(&ctx, &name, Sub::Eviction, &eviction).await?;
            super::evict::admit(ctx.api, &pod, dry).await?;
            if !dry {
                super::evict::mark(ctx.api, &pod).await;
            }
            // Webhooks saw the eviction; its delete is the API server's own, as in Kubernetes.
            let ctx = Ctx {
                hooks: false,
                ..ctx
            };
            delete(&ctx, &name, opts).await?;
            Ok(respond(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (m @ (Method::PUT | Method::PATCH), Some(s @ (Sub::Approval | Sub::Status)))
            if !ctx.user.is_master() && ctx.res.kind == "CertificateSigningRequest" =>
        {
            // Approving also takes `approve` on the request's signer, and writing its
            // certificate `sign`, as in Kubernetes.
            let verb = if s == Sub::Approval {
                "approve"
            } else {
                "sign"
            };
            let csr = get(&ctx, &name).await?;
            let signer = csr["spec"]["signerName"].as_str().unwrap_or("").to_string();
            let domain = format!("{}/*", signer.split('/').next().unwrap_or(""));
            let attrs = |name: &str| Attrs {
                verb: verb.into(),
                group: "certificates.k8s.io".into(),
                resource: "signers".into(),
                subresource: String::new(),
                namespace: String::new(),
                name: name.into(),
                path: None,
            };
            if authorize(ctx.api, &ctx.user, &attrs(&signer))
                .await
                .is_err()
            {
                authorize(ctx.api, &ctx.user, &attrs(&domain)).await?;
            }
            let body = super::decode_body(content_type, &body)?;
            let o = match m {
                Method::PUT => replace(&ctx, &name, body, Some(s)).await?,
                _ => {
                    let kind = content_type
                        .and_then(patch::Kind::from_content_type)
                        .ok_or_else(|| {
                            ApiError::UnsupportedMediaType("an unknown patch type".into())
                        })?;
                    patch_object(&ctx, &name, kind, body, Some(s)).await?.1
                }
            };
            Ok(respond(StatusCode::OK, &o))
        }
        (Method::PUT, sub) => {
            let body = super::decode_body(content_type, &body)?;
            let o = replace(&ctx, &name, body, sub).await?;
            Ok(respond(StatusCode::OK, &o))
        }
        (Method::PATCH, sub) => {
            let kind = content_type
                .and_then(patch::Kind::from_content_type)
                .ok_or_else(|| {
                    ApiError::UnsupportedMediaType(format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {})",
                        content_type.unwrap_or("none")
                    ))
                })?;
            let body = super::decode_body(content_type, &body)?;
            let (code, o, stored) = patch_object(&ctx, &name, kind, body, sub).await?;
            Ok(respond_stored(code, &o, stored))
        }
        (Method::DELETE, None) if t.name.is_some() => {
            let opts = if body.is_empty() {
                json!({})
            } else {
                super::decode_body(content_type, &body)?
            };
            let o = delete(&ctx, &name, &opts).await?;
            Ok(respond(StatusCode::OK, &o))
        }
        (Method::DELETE, None) => {
            let opts = if body.is_empty() {
                json!({})
            } else {
                super::decode_body(content_type, &body)?
            };
            delete_collection(&ctx, &opts).await
        }
        (m, s) => Err(ApiError::MethodNotAllowed(format!(
            "{m} is not supported on {}{}",
            t.res.plural,
            s.map(|s| format!("/{}", s.name())).unwrap_or_default()
        ))),
    }
}

/// `kubectl logs`: the pod's node streams the container's output through its link.
async fn logs(ctx: &Ctx<'_>, name: &str) -> Result<Response, ApiError> {
    use outpost_api::link::{Down, LogRequest};
    let pod = get(ctx, name).await?;
    let names: Vec<String> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let container = match ctx.q.get("container") {
        Some(c) if names.iter().any(|n| n == c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::BadRequest(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        None if pod["spec"]["containers"].as_array().map(Vec::len) == Some(1) => pod["spec"]
            ["containers"][0]["name"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let num = |k: &str| -> Result<Option<u64>, ApiError> {
        ctx.q
            .get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(format!("{k} must be a number of at least 0, got {v:?}"))
                })
            })
            .transpose()
    };
    // kubectl sends tailLines=-1 for "all lines".
    let tail = match ctx.q.get("tailLines") {
        Some(v) if v.trim_start().starts_with('-') => None,
        _ => num("tailLines")?,
    };
    let since = match (num("sinceSeconds")?, ctx.q.get("sinceTime")) {
        (Some(s), _) => Some(s),
        (None, Some(t)) => {
            let t: jiff::Timestamp = t
                .parse()
                .map_err(|e| ApiError::BadRequest(format!("sinceTime: {e}")))?;
            Some(jiff::Timestamp::now().duration_since(t).as_secs().max(0) as u64)
        }
        (None, None) => None,
    };
    let req = LogRequest {
        namespace: ctx.ns.clone().unwrap_or_default(),
        pod: name.to_string(),
        container,
        follow: ctx.q.flag("follow"),
        previous: ctx.q.flag("previous"),
        timestamps: ctx.q.flag("timestamps"),
        tail_lines: tail,
        since_seconds: since,
        limit_bytes: num("limitBytes")?,
    };
    let (head, mut recv) = ctx
        .api
        .links
        .open(node, &Down::Logs(req))
        .await
        .map_err(ApiError::Internal)?;
    if head.status != 200 {
        let msg = recv.read_to_end(64 << 10).await.unwrap_or_default();
        let msg = String::from_utf8_lossy(&msg).trim().to_string();
        return Err(match head.status {
            404 => ApiError::NotFound {
                kind: "pods".into(),
                name: name.into(),
            },
            400 => ApiError::BadRequest(msg),
            _ => ApiError::Internal(msg),
        });
    }
    let stream = futures::stream::unfold(recv, |mut recv| async move {
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(c)) => Some((Ok::<_, std::io::Error>(c.bytes), recv)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), recv)),
        }
    });
    let mut r = Response::new(axum::body::Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

fn respond(code: StatusCode, v: &Value) -> Response {
    super::json_response(code, v, "application/json")
}

/// [`respond`] with `v` as written to the store (`stored`, when it was), its bytes spliced
/// with the resourceVersion rather than encoded again.
fn respond_stored(code: StatusCode, v: &Value, stored: Option<Vec<u8>>) -> Response {
    match stored
        .zip(rv_of(v))
        .and_then(|(b, rv)| super::raw::with_rv(&b, rv))
    {
        Some(bytes) => {
            let mut r = (code, bytes).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => respond(code, v),
    }
}

async fn get_kv(ctx: &Ctx<'_>, name: &str) -> Result<KeyValue, ApiError> {
    ctx.api
        .store
        .get(&ctx.key(name), Consistency::Linearizable)
        .await?
        .ok_or_else(|| ctx.nf(name))
}

/// Whether this reads Leases where nodes' Leases are: in their namespace, or in all.
fn node_leases(ctx: &Ctx<'_>) -> bool {
    (ctx.res.group, ctx.res.kind) == ("coordination.k8s.io", "Lease")
        && ctx
            .ns
            .as_deref()
            .is_none_or(|ns| ns == super::leases::NAMESPACE)
}

async fn get(ctx: &Ctx<'_>, name: &str) -> Result<Value, ApiError> {
    from_kv(&get_kv(ctx, name).await?)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    start: String,
}

fn selectors(ctx: &Ctx<'_>) -> Result<(Labels, Fields), ApiError> {
    let labels =
        Labels::parse(ctx.q.get("labelSelector").unwrap_or("")).map_err(ApiError::BadRequest)?;
    let extra = custom(ctx.res)
        .map(|c| c.selectable.clone())
        .unwrap_or_default();
    let fields = Fields::parse_with(
        ctx.res.kind,
        ctx.q.get("fieldSelector").unwrap_or(""),
        &extra,
    )
    .map_err(ApiError::BadRequest)?;
    Ok((labels, fields))
}

fn matches(v: &Value, labels: &Labels, fields: &Fields) -> bool {
    labels.matches(&v["metadata"]["labels"]) && fields.matches(v)
}

/// Node or pod metrics, read from the nodes now. The selectors are those of the nodes or
/// pods measured (metrics-server's take the same).
async fn live(ctx: &Ctx<'_>, name: Option<&str>, table: bool) -> Result<Response, ApiError> {
    let of = if ctx.res.plural == "nodes" {
        "Node"
    } else {
        "Pod"
    };
    let labels =
        Labels::parse(ctx.q.get("labelSelector").unwrap_or("")).map_err(ApiError::BadRequest)?;
    let fields = Fields::parse(of, ctx.q.get("fieldSelector").unwrap_or(""))
        .map_err(ApiError::BadRequest)?;
    let mut items =
        super::metrics::read(ctx.api, ctx.res, ctx.ns.as_deref(), name, &labels, &fields).await?;
    if let Some(n) = name {
        items.truncate(1);
        if items.is_empty() {
            return Err(ctx.nf(n));
        }
    }
    if table {
        let tbl = table::table(
            ctx.res,
            &items,
            json!({}),
            include(&ctx.q),
            true,
            now_secs(),
        );
        return Ok(super::json_response(StatusCode::OK, &tbl, TABLE_CT));
    }
    let out = match name {
        Some(_) => items.swap_remove(0),
        None => json!({"kind": list_kind(ctx),
            "apiVersion": ctx.res.api_version(), "metadata": {}, "items": items}),
    };
    Ok(respond(StatusCode::OK, &out))
}

/// Objects of the resource in the request's namespace (or all), filtered, one page, after
/// the key `start`; read at revision `at` if given (a continued list, or one asked for at
/// an exact revision), else now. Every read of one list is at one revision.
async fn list_objects(
    ctx: &Ctx<'_>,
    labels: &Labels,
    fields: &Fields,
    limit: usize,
    start: Option<String>,
    at: Option<u64>,
    c: Consistency,
) -> Result<(Vec<Value>, u64, Option<String>), ApiError> {
    let prefix = ctx.res.prefix(ctx.ns.as_deref());
    let mut out = Vec::new();
    let mut after = start;
    let mut revision = at.unwrap_or(0);
    // A field selector on the name reads one key instead of the whole prefix.
    if let Some(name) = fields.name() {
        if ctx.ns.is_some() || !ctx.res.namespaced {
            // One key, but read as a range: the revision returned is the one the object was
            // read at. The store's revision read after the object may already include its
            // deletion, and a watch from there would never tell `kubectl delete --wait`.
            let key = ctx.key(name);
            let r = match at {
                Some(rev) => ctx.api.store.range_at(&key, None, 1, rev).await?,
                None => ctx.api.store.range(&key, None, 1, c).await?,
            };
            let rev = r.revision;
            if let Some(kv) = r.kvs.into_iter().find(|kv| kv.key == key) {
                let v = from_kv(&kv)?;
                if matches(&v, labels, fields) {
                    out.push(v);
                }
            }
            return Ok((out, rev, None));
        }
    }
    loop {
        let page = if limit == 0 {
            0
        } else {
            (limit - out.len()).max(64)
        };
        let store = &ctx.api.store;
        let r = if revision == 0 {
            store.range(&prefix, after.as_deref(), page, c).await?
        } else {
            store
                .range_at(&prefix, after.as_deref(), page, revision)
                .await?
        };
        revision = r.revision;
        let mut last = None;
        for (i, kv) in r.kvs.iter().enumerate() {
            last = Some(kv.key.clone());
            let v = from_kv(kv)?;
            if matches(&v, labels, fields) {
                out.push(v);
                if limit > 0 && out.len() == limit {
                    // More may follow: continue after this key.
                    let more = r.more || i + 1 < r.kvs.len();
                    let token = more.then(|| {
                        let c = Continue {
                            rv: revision,
                            start: kv.key.clone(),
                        };
                        base64::Engine::encode(
                            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                            serde_json::to_vec(&c).unwrap_or_default(),
                        )
                    });
                    return Ok((out, revision, token));
                }
            }
        }
        if !r.more {
            return Ok((out, revision, None));
        }
        after = last;
    }
}

async fn list(ctx: &Ctx<'_>, table: bool) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(ctx)?;
    let limit: usize = ctx.q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut at = None;
    let start = match ctx.q.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(tok) => {
            let bytes =
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, tok)
                    .map_err(|_| ApiError::BadRequest("continue key is not valid".into()))?;
            let c: Continue = serde_json::from_slice(&bytes)
                .map_err(|_| ApiError::BadRequest("continue key is not valid".into()))?;
            if !c.start.starts_with(&ctx.res.prefix(ctx.ns.as_deref())) {
                return Err(ApiError::BadRequest("continue key is not valid".into()));
            }
            at = Some(c.rv);
            Some(c.start)
        }
    };
    let rv = ctx.q.get("resourceVersion").filter(|v| !v.is_empty());
    let consistency = match rv {
        Some("0") => Consistency::Serializable,
        _ => Consistency::Linearizable,
    };
    match (ctx.q.get("resourceVersionMatch"), rv) {
        (None | Some(""), _) => {}
        (Some(_), _) if at.is_some() => {
            return Err(ApiError::BadRequest(
                "specifying resource version match is not allowed when using continue".into(),
            ))
        }
        (Some("Exact"), Some(v)) => {
            let v = v.parse::<u64>().ok().filter(|v| *v > 0).ok_or_else(|| {
                ApiError::BadRequest(format!("invalid resource version: {v}"))
            })?;
            at = Some(v);
        }
        (Some("NotOlderThan"), Some(_)) => {}
        (Some(m @ ("Exact" | "NotOlderThan")), None) => {
            return Err(ApiError::BadRequest(format!(
                "resourceVersionMatch \"{m}\" is forbidden unless resourceVersion is provided"
            )))
        }
        (Some(m), _) => {
            return Err(ApiError::BadRequest(format!(
                "unsupported resourceVersionMatch \"{m}\": supported values: \"Exact\", \"NotOlderThan\""
            )))
        }
    }
    let (mut items, rev, cont) = list_objects(ctx, &labels, &fields, limit, start, at, consistency)
        .await
        .map_err(|e| match e {
            ApiError::Gone(_) if ctx.q.get("continue").is_some() => ApiError::Gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            ),
            e => e,
        })?;
    // Nodes' Leases are not stored: on the last page, those no stored Lease stands for.
    if node_leases(ctx) && cont.is_none() {
        let mut added = false;
        for l in super::leases::list(ctx.api).await? {
            let taken = items.iter().any(|i| {
                i["metadata"]["namespace"] == l["metadata"]["namespace"]
                    && i["metadata"]["name"] == l["metadata"]["name"]
            });
            if !taken && matches(&l, &labels, &fields) {
                items.push(l);
                added = true;
            }
        }
        if added {
            fn at(v: &Value) -> (Option<&str>, Option<&str>) {
                let m = &v["metadata"];
                (m["namespace"].as_str(), m["name"].as_str())
            }
            items.sort_by(|a, b| at(a).cmp(&at(b)));
        }
    }
    let mut lm = json!({"resourceVersion": rev.to_string()});
    if let Some(c) = cont {
        lm["continue"] = json!(c);
    }
    if table {
        let tbl = table::table(ctx.res, &items, lm, include(&ctx.q), true, now_secs());
        return Ok(super::json_response(StatusCode::OK, &tbl, TABLE_CT));
    }
    // A typed list's items leave out their kind, as Kubernetes writes them; a custom
    // resource's list is unstructured there, and its items keep theirs.
    let typed = custom(ctx.res).is_none();
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut v| {
            if let Some(m) = v.as_object_mut().filter(|_| typed) {
                m.remove("apiVersion");
                m.remove("kind");
            }
            v
        })
        .collect();
    Ok(respond(
        StatusCode::OK,
        &json!({"kind": list_kind(ctx), "apiVersion": ctx.res.api_version(),
                "metadata": lm, "items": items}),
    ))
}

fn watch_line(kind: &str, object: Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

async fn watch_stream(ctx: Ctx<'_>, table: bool) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(&ctx)?;
    let bookmarks = ctx.q.flag("allowWatchBookmarks");
    // Outpost's node agent watches its pods with this: it acts on spec and metadata only,
    // and most changes to its pods are its own status writes, which it need not be sent
    // back (half of what its link carried in a burst of short pods).
    let omit_status = ctx.q.flag("omitStatusOnly");
    // When no selector reads the status, a status-only change leaves whether the watch sees
    // the object as it was: it is left out before the selectors decode anything.
    let omit_early = omit_status && !fields.paths().any(|p| p.starts_with("status"));
    let timeout = ctx
        .q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_else(|| Duration::from_secs(1800 + rand::random::<u64>() % 1800));
    let rv = ctx.q.get("resourceVersion").unwrap_or("").to_string();
    let (initial, from) = match rv.as_str() {
        "" | "0" => {
            let c = if rv.is_empty() {
                Consistency::Linearizable
            } else {
                Consistency::Serializable
            };
            let (items, rev, _) = list_objects(&ctx, &labels, &fields, 0, None, None, c).await?;
            (items, rev)
        }
        n => (
            Vec::new(),
            n.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {n}")))?,
        ),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let store = ctx.api.store.clone();
    let res = ctx.res;
    let prefix = res.prefix(ctx.ns.as_deref());
    let inc = include(&ctx.q);
    let api_version = res.api_version();
    // Every change is sent as stored; with selectors, only what they read is decoded to
    // decide whether to send it.
    let whole = !table && labels.is_empty() && fields.is_empty();
    let mut read: Vec<String> = fields.paths().map(String::from).collect();
    read.push("metadata.labels".into());
    tokio::spawn(async move {
        let parts: Vec<&str> = read.iter().map(String::as_str).collect();
        let mut headers = true;
        let mut wrap = |o: Value| -> Value {
            if table {
                let t = table::table(
                    res,
                    std::slice::from_ref(&o),
                    json!({"resourceVersion": o["metadata"]["resourceVersion"]}),
                    inc,
                    headers,
                    now_secs(),
                );
                headers = false;
                t
            } else {
                o
            }
        };
        for o in initial {
            if tx.send(Ok(watch_line("ADDED", wrap(o)))).await.is_err() {
                return;
            }
        }
        let mut w = match store.watch(&prefix, from).await {
            Ok(w) => w,
            Err(e) => {
                let status = ApiError::from(e).status();
                let _ = tx.send(Ok(watch_line("ERROR", status))).await;
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = tokio::select! {
                i = w.next() => i,
                _ = tokio::time::sleep_until(deadline) => None,
                _ = tx.closed() => None,
            };
            let Some(item) = item else { return };
            match item {
                WatchItem::Progress(rev) => {
                    if bookmarks {
                        let o = json!({"kind": res.kind, "apiVersion": api_version,
                                       "metadata": {"resourceVersion": rev.to_string()}});
                        if tx.send(Ok(watch_line("BOOKMARK", o))).await.is_err() {
                            return;
                        }
                    }
                }
                WatchItem::Revision(r) => {
                    for ev in &r.events {
                        let prev = ev.prev.as_ref();
                        let status_only = || {
                            matches!(ev.kind, EventKind::Put)
                                && prev.is_some_and(|p| raw::status_only(&p.value, &ev.kv.value))
                        };
                        if omit_early && status_only() {
                            continue;
                        }
                        let seen = if whole || table {
                            None
                        } else {
                            let t = event_type(&ev.kind, &ev.kv, prev, &parts, &labels, &fields);
                            let Some(t) = t else { continue };
                            Some(t)
                        };
                        if omit_status && !omit_early && seen == Some("MODIFIED") && status_only() {
                            continue;
                        }
                        if !table {
                            if let Some(line) = raw_line(&ev.kind, &ev.kv, prev, r.revision, seen) {
                                if tx.send(Ok(line)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                        }
                        let Some((kind, obj)) = event(
                            &ev.kind,
                            &ev.kv,
                            ev.prev.as_ref(),
                            r.revision,
                            &labels,
                            &fields,
                        ) else {
                            continue;
                        };
                        if tx.send(Ok(watch_line(kind, wrap(obj)))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(Body::from_stream(stream));
    let ct = if table { TABLE_CT } else { "application/json" };
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(ct),
    );
    Ok(r)
}

/// The watch line of a store change, spliced from the stored bytes: what [`event`] gives,
/// without decoding the object. `seen` is the event's type as the watch's selectors decided
/// it (`None` for a watch without any). `None` when the stored object is not one that
/// [`raw::with_rv`] takes.
fn raw_line(
    kind: &EventKind,
    kv: &KeyValue,
    prev: Option<&KeyValue>,
    revision: u64,
    seen: Option<&'static str>,
) -> Option<Bytes> {
    let (kind, obj) = match kind {
        EventKind::Put => (
            seen.unwrap_or(if prev.is_some() { "MODIFIED" } else { "ADDED" }),
            raw::with_rv(&kv.value, kv.mod_revision)?,
        ),
        EventKind::Delete => (
            "DELETED",
            raw::with_rv(&prev.unwrap_or(kv).value, revision)?,
        ),
    };
    let mut line = Vec::with_capacity(obj.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(&obj);
    line.extend_from_slice(b"}\n");
    Some(Bytes::from(line))
}

/// The type of the watch event a store change is, seen through the selectors, deciding on
/// only the labels and the fields they read (`parts`); `None` if the watch does not see it.
/// What [`event`] decides, without building whole objects.
fn event_type(
    kind: &EventKind,
    kv: &KeyValue,
    prev: Option<&KeyValue>,
    parts: &[&str],
    labels: &Labels,
    fields: &Fields,
) -> Option<&'static str> {
    let seen = |kv: &KeyValue| -> Option<bool> {
        let o = pick::only(&kv.value, parts).ok()?;
        Some(matches(&o, labels, fields))
    };
    let old = prev.is_some_and(|p| seen(p) == Some(true));
    match kind {
        EventKind::Put => match (seen(kv)?, old) {
            (true, true) => Some("MODIFIED"),
            (true, false) => Some("ADDED"),
            (false, true) => Some("DELETED"),
            (false, false) => None,
        },
        EventKind::Delete => {
            let last = match prev {
                Some(_) => old,
                None => seen(kv)?,
            };
            last.then_some("DELETED")
        }
    }
}

/// The watch event a store change is, seen through the selectors.
fn event(
    kind: &EventKind,
    kv: &KeyValue,
    prev: Option<&KeyValue>,
    revision: u64,
    labels: &Labels,
    fields: &Fields,
) -> Option<(&'static str, Value)> {
    let old = prev.and_then(|p| from_kv(p).ok());
    let old_matches = old.as_ref().is_some_and(|o| matches(o, labels, fields));
    match kind {
        EventKind::Put => {
            let new = from_kv(kv).ok()?;
            match (matches(&new, labels, fields), old_matches) {
                (true, true) => Some(("MODIFIED", new)),
                (true, false) => Some(("ADDED", new)),
                (false, true) => Some(("DELETED", new)),
                (false, false) => None,
            }
        }
        EventKind::Delete => {
            let mut last = old.or_else(|| from_kv(kv).ok())?;
            if !matches(&last, labels, fields) {
                return None;
            }
            set_rv(&mut last, revision);
            Some(("DELETED", last))
        }
    }
}

fn check_kind(ctx: &Ctx<'_>, o: &mut Value) -> Result<(), ApiError> {
    let Some(m) = o.as_object_mut() else {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    let av = ctx.res.api_version();
    match m.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("apiVersion".into(), json!(av));
        }
        Some(v) if v == av => {}
        Some(v) => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({v}) does not match the expected API version ({av})"
            )))
        }
    }
    match m.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("kind".into(), json!(ctx.res.kind));
        }
        Some(k) if k == ctx.res.kind => {}
        Some(k) => {
            return Err(ApiError::BadRequest(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                ctx.res.kind
            )))
        }
    }
    Ok(())
}

fn check_namespace(ctx: &Ctx<'_>, o: &mut Value) -> Result<(), ApiError> {
    let m = meta(o);
    if !ctx.res.namespaced {
        m.remove("namespace");
        return Ok(());
    }
    let want = ctx.ns.clone().unwrap_or_default();
    match m.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("namespace".into(), json!(want));
        }
        Some(n) if n == want => {}
        Some(_) => return Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )),
    }
    Ok(())
}

/// Whether the request asks for unknown fields to be refused.
fn strict(ctx: &Ctx<'_>) -> bool {
    ctx.q.get("fieldValidation") == Some("Strict")
}

/// With `fieldValidation=Strict`, fields the schema does not know are a 400.
fn strict_fields(ctx: &Ctx<'_>, input: &Value) -> Result<(), ApiError> {
    if !strict(ctx) {
        return Ok(());
    }
    let unknown = openapi::unknown_fields(ctx.res.group, ctx.res.version, ctx.res.kind, input);
    if unknown.is_empty() {
        return Ok(());
    }
    Err(unknown_fields(ctx, &unknown))
}

/// The 400 for fields a schema does not know, as kube-apiserver's strict decoding words it.
fn unknown_fields(ctx: &Ctx<'_>, fields: &[String]) -> ApiError {
    let list: Vec<String> = fields
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    let (kind, version) = (ctx.res.kind, ctx.res.version);
    ApiError::BadRequest(format!(
        "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
        list.join(", ")
    ))
}

fn bad_patch(e: String) -> ApiError {
    ApiError::BadRequest(format!("the patch could not be applied: {e}"))
}

/// Ok if there are no `causes`, else the 422 listing them.
fn refuse(ctx: &Ctx<'_>, o: &Value, causes: Vec<Cause>) -> Result<(), ApiError> {
    if causes.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid {
        group: ctx.res.group.into(),
        kind: ctx.res.kind.into(),
        name: name_of(o).into(),
        causes,
    })
}

/// Type check, strict field check and validation. A status write (`sub`) keeps the stored
/// spec, so only the fields it may change are type-checked.
fn check(ctx: &Ctx<'_>, o: &mut Value, input: &Value, sub: Option<Sub>) -> Result<(), ApiError> {
    if let Some(c) = custom(ctx.res) {
        return check_custom(ctx, &c, o);
    }
    match ctx.q.get("fieldValidation") {
        Some("Strict") => strict_fields(ctx, input)?,
        // Asked for by name (kubectl's --validate=warn and =false): what the schema does not
        // know is dropped, as decoding into kube-apiserver's types drops it, and under Warn
        // said. Without the parameter (the server's own writers) nothing is walked.
        Some(mode @ ("Warn" | "Ignore")) => {
            let dropped = openapi::prune_unknown(ctx.res.group, ctx.res.version, ctx.res.kind, o);
            if mode == "Warn" {
                let said: Vec<String> = dropped
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                hooks::add_warnings(said.iter().map(String::as_str));
            }
        }
        _ => {}
    }
    let only: Option<&[&str]> = matches!(sub, Some(Sub::Status | Sub::Approval)).then_some(&[
        "apiVersion",
        "kind",
        "metadata",
        "status",
    ]);
    resources::check_types(ctx.res.group, ctx.res.kind, o, only)
        .map_err(|e| ApiError::BadRequest(format!("{} in body is invalid: {e}", ctx.res.kind)))?;
    // A CRD's schemas hold `default`s and `max`es of their own; a status write keeps the
    // stored spec.
    if only.is_none() && ctx.res.kind != "CustomResourceDefinition" {
        if let Some((field, text)) = admit::bad_quantity(o) {
            let (kind, version) = (ctx.res.kind, ctx.res.version);
            return Err(ApiError::BadRequest(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: quantities must match the regular expression '{}' ({field}: \"{text}\")",
                outpost_api::quantity::PATTERN
            )));
        }
    }
    // A status write keeps the stored spec: as kube-apiserver, only its metadata is checked
    // again (an object stored by an older build must still take its controllers' status).
    let kind = if only.is_some() { "" } else { ctx.res.kind };
    let causes = admit::validate(ctx.res.group, kind, o);
    refuse(ctx, o, causes)
}

/// The kind of a list of `ctx`'s resource: `PodList`, or a CRD's `listKind`.
fn list_kind(ctx: &Ctx<'_>) -> String {
    custom(ctx.res)
        .map(|c| c.list_kind.clone())
        .unwrap_or_else(|| format!("{}List", ctx.res.kind))
}

/// The CRD behind `res`, if it is a custom resource.
fn custom(res: &'static Resource) -> Option<Arc<crd::Custom>> {
    crd::behind(res)
}

/// A custom object pruned, defaulted and checked against its CRD's schema. Unknown fields
/// are dropped, or refused under `fieldValidation=Strict`.
fn check_custom(ctx: &Ctx<'_>, c: &crd::Custom, o: &mut Value) -> Result<(), ApiError> {
    let schema = c.schemas.get(ctx.version).unwrap_or_else(|| c.schema());
    let a = crd::admit(schema, o);
    if ctx.version != c.res.version {
        // Checked as the version asked for; stored as the storage version, which drops
        // what it does not know and fills in its defaults, as Kubernetes does reading it.
        let _ = crd::admit(c.schema(), o);
    }
    if strict(ctx) && !a.unknown.is_empty() {
        return Err(unknown_fields(ctx, &a.unknown));
    }
    let mut causes = a.causes;
    causes.extend(admit::validate(ctx.res.group, ctx.res.kind, o));
    refuse(ctx, o, causes)
}

/// A CRD's status as the server keeps it: names accepted unless another CRD of its group
/// holds them, established, the versions it stored.
async fn crd_status(ctx: &Ctx<'_>, old: Option<&Value>, o: &mut Value) -> Result<(), ApiError> {
    let others = stored_crds(ctx.api, Consistency::Linearizable).await?;
    let conflict = crd::conflict(o, &others);
    o["status"] = crd::status(o, old, conflict, &now());
    Ok(())
}

/// Serve the CRDs as stored now (after this member wrote one, or when a request names a
/// resource not served yet: another member may have just made it).
pub(super) async fn reload_crds(api: &Api) -> Result<(), ApiError> {
    crd::load(&stored_crds(api, Consistency::Serializable).await?);
    Ok(())
}

/// Every stored CRD.
async fn stored_crds(api: &Api, c: Consistency) -> Result<Vec<Value>, ApiError> {
    let page = api.store.range(crd::PREFIX, None, 0, c).await?;
    Ok(page
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

async fn namespace_ready(ctx: &Ctx<'_>, ns: &str, name: &str) -> Result<(), ApiError> {
    let nsr = resources::find("", "v1", "namespaces").ok_or_else(|| internal("namespaces"))?;
    let kv = ctx
        .api
        .store
        .get(&nsr.key(None, ns), Consistency::Serializable)
        .await?
        .ok_or_else(|| ApiError::not_found("namespaces", ns))?;
    let v = pick::only(&kv.value, &["metadata.deletionTimestamp"]).map_err(internal)?;
    if !v["metadata"]["deletionTimestamp"].is_null() {
        return Err(ApiError::Forbidden {
            message: format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                ctx.res.qualified()
            ),
        });
    }
    Ok(())
}

/// The object at `key` that an admission check reads, from this member's store; if absent,
/// asked again through the leader before an admission refuses on it, since a follower may
/// not yet have applied one created a moment ago.
async fn admission_read(ctx: &Ctx<'_>, key: &str) -> Result<Option<KeyValue>, ApiError> {
    match ctx.api.store.get(key, Consistency::Serializable).await? {
        Some(kv) => Ok(Some(kv)),
        None => Ok(ctx.api.store.get(key, Consistency::Linearizable).await?),
    }
}

/// As the ServiceAccount admission plugin, for a new pod: it runs as a service account that
/// exists, and gets that account's token mounted unless the pod or the account opts out.
async fn admit_service_account(ctx: &Ctx<'_>, o: &mut Value) -> Result<(), ApiError> {
    let ns = ctx.ns.as_deref().unwrap_or("default");
    let sa = admit::service_account(&o["spec"]).to_string();
    let res =
        resources::find("", "v1", "serviceaccounts").ok_or_else(|| internal("serviceaccounts"))?;
    let key = res.key(Some(ns), &sa);
    let Some(kv) = admission_read(ctx, &key).await? else {
        return Err(ApiError::Forbidden {
            message: format!(
                "pods \"{}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found",
                name_of(o)
            ),
        });
    };
    let account = pick::only(&kv.value, &["automountServiceAccountToken"]).map_err(internal)?;
    let spec = &mut o["spec"];
    spec["serviceAccountName"] = json!(sa);
    let automount = spec["automountServiceAccountToken"]
        .as_bool()
        .or(account["automountServiceAccountToken"].as_bool())
        .unwrap_or(true);
    if automount {
        admit::mount_token(spec, &random_suffix());
    }
    Ok(())
}

/// As the Priority admission plugin, for a new pod naming a PriorityClass: its priority and
/// preemption policy come from the class, and a class that does not exist refuses the pod.
/// (A pod naming none keeps priority 0: no class is taken as the cluster's default.)
async fn admit_priority(ctx: &Ctx<'_>, o: &mut Value) -> Result<(), ApiError> {
    let Some(class) = o["spec"]["priorityClassName"]
        .as_str()
        .filter(|c| !c.is_empty())
        .map(String::from)
    else {
        return Ok(());
    };
    let res = resources::find("scheduling.k8s.io", "v1", "priorityclasses")
        .ok_or_else(|| internal("priorityclasses"))?;
    let key = res.key(None, &class);
    let Some(kv) = admission_read(ctx, &key).await? else {
        return Err(ApiError::Forbidden {
            message: format!(
                "pods \"{}\" is forbidden: no PriorityClass with name {class} was found",
                name_of(o)
            ),
        });
    };
    let c = pick::only(&kv.value, &["value", "preemptionPolicy"]).map_err(internal)?;
    let spec = &mut o["spec"];
    spec["priority"] = json!(c["value"].as_i64().unwrap_or(0));
    spec["preemptionPolicy"] = match c["preemptionPolicy"].as_str() {
        Some(p) => json!(p),
        None => json!("PreemptLowerPriority"),
    };
    Ok(())
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()] as char)
        .collect()
}

/// Store ops that reserve a Service's cluster IP and node ports alongside it.
fn service_reservations(api: &Api, svc: &mut Value, taken: &[String]) -> Result<Vec<Op>, ApiError> {
    let mut ops = Vec::new();
    let ty = svc["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    if ty == "ExternalName" {
        return Ok(ops);
    }
    let (base, bits) = api.service_net;
    let size = 1u32 << (32 - bits);
    let requested = svc["spec"]["clusterIP"].as_str().map(String::from);
    let ip = match requested.as_deref() {
        Some("None") => None,
        Some(ip) if !ip.is_empty() => {
            let parsed: Ipv4Addr = ip.parse().map_err(|_| ApiError::Invalid {
                group: String::new(),
                kind: "Service".into(),
                name: name_of(svc).into(),
                causes: vec![Cause::invalid(
                    "spec.clusterIPs[0]",
                    ip,
                    "must be a valid IP address",
                )],
            })?;
            Some(parsed)
        }
        _ => {
            // Start at a random offset; .0 and .1 are the network and the `kubernetes` service.
            let start = 2 + rand::random::<u32>() % (size - 3);
            (0..size - 3)
                .map(|i| Ipv4Addr::from(u32::from(base) + 2 + (start - 2 + i) % (size - 3)))
                .find(|ip| !taken.contains(&ip.to_string()))
        }
    };
    if let Some(ip) = ip {
        let s = ip.to_string();
        svc["spec"]["clusterIP"] = json!(s);
        svc["spec"]["clusterIPs"] = json!([s]);
        ops.push(Op::Put {
            key: format!("/registry/ranges/serviceips/{s}"),
            value: name_of(svc).as_bytes().to_vec(),
            expect: Expect::Absent,
        });
    } else {
        svc["spec"]["clusterIPs"] = json!(["None"]);
    }
    // As an update from nothing: its node ports are drawn or reserved.
    ops.extend(node_port_ops(&Value::Null, svc)?.ops);
    Ok(ops)
}

/// Service `name`'s node port `port` (its `i`th) is another Service's.
fn port_allocated(name: &str, i: usize, port: u64) -> ApiError {
    ApiError::Invalid {
        group: String::new(),
        kind: "Service".into(),
        name: name.into(),
        causes: vec![Cause::invalid(
            format!("spec.ports[{i}].nodePort"),
            &port.to_string(),
            "provided port is already allocated",
        )],
    }
}

/// The index and number of a node port the client chose in `svc` whose reservation `key`
/// is.
fn taken_port(svc: &Value, key: &str) -> Option<(usize, u64)> {
    let port: u64 = key
        .strip_prefix("/registry/ranges/servicenodeports/")?
        .parse()
        .ok()?;
    svc["spec"]["ports"]
        .as_array()?
        .iter()
        .position(|p| p["nodePort"].as_u64() == Some(port))
        .map(|i| (i, port))
}

fn release_ops(res: &Resource, v: &Value) -> Vec<Op> {
    let mut ops = Vec::new();
    if res.group.is_empty() && res.kind == "Service" {
        if let Some(ip) = v["spec"]["clusterIP"]
            .as_str()
            .filter(|ip| *ip != "None" && !ip.is_empty())
        {
            ops.push(Op::Delete {
                key: format!("/registry/ranges/serviceips/{ip}"),
                expect: Expect::Any,
            });
        }
        for p in v["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(n) = p["nodePort"].as_u64() {
                ops.push(Op::Delete {
                    key: format!("/registry/ranges/servicenodeports/{n}"),
                    expect: Expect::Any,
                });
            }
        }
    }
    ops
}

async fn create(ctx: &Ctx<'_>, body: Value) -> Result<Value, ApiError> {
    // The body as sent is needed only for strict field validation.
    let input = if strict(ctx) {
        body.clone()
    } else {
        Value::Null
    };
    let mut o = body;
    check_kind(ctx, &mut o)?;
    check_namespace(ctx, &mut o)?;
    if let Some(ns) = &ctx.ns {
        let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
        namespace_ready(ctx, ns, &name).await?;
    }
    let m = meta(&mut o);
    for k in [
        "resourceVersion",
        "uid",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        m.remove(k);
    }
    let generate = m
        .get("generateName")
        .and_then(Value::as_str)
        .map(String::from);
    let named = m
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !named {
        if let Some(prefix) = &generate {
            m.insert("name".into(), json!(format!("{prefix}{}", random_suffix())));
        }
    }
    let uid = uuid::Uuid::new_v4().to_string();
    let ts = now();
    let m = meta(&mut o);
    m.insert("uid".into(), json!(uid));
    m.insert("creationTimestamp".into(), json!(ts));
    admit::defaults(ctx.res.group, ctx.res.kind, &mut o);
    // The writer owns what it sent and the kind's defaults, not what admission adds below (a
    // pod's token volume, a claim's default class, a Job's selector): kube-apiserver records
    // managers before admission. Owned, they would be taken away by the writer's next
    // server-side apply that leaves them out, as kubectl's move from client-side apply does.
    ssa::record_update(None, &mut o, &ctx.manager, &ctx.res.api_version(), "", &ts);
    admit_new(ctx, &mut o, &uid).await?;
    let name = name_of(&o).to_string();
    let hook = hook_request(ctx, Operation::Create, &name, None);
    hooks::mutate(ctx.api, &hook, &mut o, None).await?;
    check(ctx, &mut o, &input, None)?;
    admit_quota(ctx, &o).await?;
    hooks::validate(ctx.api, &hook, &o, None).await?;
    write_new(ctx, o, generate.is_some() && !named).await
}

/// As kube-apiserver: `kubectl exec`, `attach` and `port-forward` go through the webhooks
/// that select their CONNECT, with the request's options as the object.
async fn connect_hooks(ctx: &Ctx<'_>, name: &str, sub: Sub) -> Result<(), ApiError> {
    let q = &ctx.q;
    let options = match sub {
        Sub::PortForward => json!({"kind": "PodPortForwardOptions", "apiVersion": "v1",
            "ports": q.all("ports").iter().filter_map(|p| p.parse::<u16>().ok()).collect::<Vec<_>>()}),
        _ => {
            let mut o = json!({"kind": if sub == Sub::Exec { "PodExecOptions" } else { "PodAttachOptions" },
                "apiVersion": "v1", "stdin": q.flag("stdin"), "stdout": q.flag("stdout"),
                "stderr": q.flag("stderr"), "tty": q.flag("tty")});
            if let Some(c) = q.get("container") {
                o["container"] = json!(c);
            }
            if sub == Sub::Exec {
                o["command"] = json!(q.all("command"));
            }
            o
        }
    };
    let hook = hook_request(ctx, Operation::Connect, name, Some(sub));
    hooks::mutate(ctx.api, &hook, &mut options.clone(), None).await?;
    hooks::validate(ctx.api, &hook, &options, None).await
}

/// A create on a subresource (a binding, an eviction, a token request) as webhooks see it:
/// the body as the object, allowed or refused (not patched).
async fn sub_create_hooks(
    ctx: &Ctx<'_>,
    name: &str,
    sub: Sub,
    body: &Value,
) -> Result<(), ApiError> {
    if !ctx.api.hooks.any() {
        return Ok(());
    }
    let hook = hook_request(ctx, Operation::Create, name, Some(sub));
    hooks::mutate(ctx.api, &hook, &mut body.clone(), None).await?;
    hooks::validate(ctx.api, &hook, body, None).await
}

/// A write as admission webhooks see it.
fn hook_request<'a>(
    ctx: &'a Ctx<'_>,
    op: Operation,
    name: &'a str,
    sub: Option<Sub>,
) -> hooks::Request<'a> {
    hooks::Request {
        res: ctx.res,
        version: ctx.version,
        sub,
        op,
        namespace: ctx.ns.as_deref(),
        name,
        user: &ctx.user,
        dry_run: ctx.dry_run,
        manager: &ctx.manager,
    }
}

/// What admission does to any new object, by create or by server-side apply: the claim's
/// default class, the Job's selector, the pod's service account, priority and limits, a
/// new claim's or volume's Pending status (and a claim's protection), a new pod's phase and
/// QoS class, the generation.
async fn admit_new(ctx: &Ctx<'_>, o: &mut Value, uid: &str) -> Result<(), ApiError> {
    if (ctx.res.group, ctx.res.kind) == ("", "PersistentVolumeClaim")
        && o["spec"]["storageClassName"].is_null()
    {
        // As the DefaultStorageClass admission plugin: only a claim naming no class at all
        // (an empty name asks for no class).
        if let Some(c) = default_class(ctx.api).await? {
            o["spec"]["storageClassName"] = json!(c);
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("batch", "Job") {
        admit::job_selector(o, uid);
        // As batch/v1's defaults: a Job without labels shows its pods' (the generated
        // job-name and controller-uid among them).
        let none = o["metadata"]["labels"]
            .as_object()
            .is_none_or(|m| m.is_empty());
        let template = o["spec"]["template"]["metadata"]["labels"].clone();
        if none && template.is_object() {
            meta(o).insert("labels".into(), template);
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("certificates.k8s.io", "CertificateSigningRequest") {
        // Who asked, as the API server records it whatever the body says.
        let u = &ctx.user;
        let spec = child_of(o, "spec");
        spec["username"] = json!(u.name);
        spec["uid"] = json!(u.uid);
        spec["groups"] = json!(u.groups);
        if let Some(m) = o.as_object_mut() {
            m.remove("status");
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("", "Pod") {
        admit_service_account(ctx, o).await?;
        admit_priority(ctx, o).await?;
        admit_limits(ctx, o).await?;
    }
    if (ctx.res.group, ctx.res.kind) == ("", "PersistentVolumeClaim") {
        admit_limits(ctx, o).await?;
    }
    if ctx.res.group.is_empty()
        && matches!(ctx.res.kind, "PersistentVolumeClaim" | "PersistentVolume")
    {
        // As the API server: a new claim or volume starts Pending, whatever the body says.
        o["status"] = json!({"phase": "Pending"});
        if ctx.res.kind == "PersistentVolumeClaim" {
            // A claim in use by a pod is not deleted under it (the volume controller lifts
            // this once no pod uses it).
            let f = &mut meta(o).entry("finalizers").or_insert_with(|| json!([]));
            if let Some(list) = f.as_array_mut() {
                let p = json!(crate::controllers::volumes::PROTECTION);
                if !list.contains(&p) {
                    list.push(p);
                }
            }
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("", "Pod") {
        let phase = o["status"]["phase"].is_null();
        if phase {
            o["status"] = json!({"phase": "Pending", "qosClass": admit::qos_class(&o["spec"])});
        }
    }
    if (ctx.res.group, ctx.res.kind) == (crd::GROUP, "CustomResourceDefinition") {
        crd::hold(o);
        crd_status(ctx, None, o).await?;
    }
    let c = custom(ctx.res);
    if c.as_ref().is_some_and(|c| c.terminating) {
        return Err(ApiError::MethodNotAllowed(
            "create not allowed while custom resource definition is terminating".into(),
        ));
    }
    if c.is_some() && ctx.res.has(Sub::Status) {
        // Its status is written through the subresource only, as in Kubernetes.
        if let Some(m) = o.as_object_mut() {
            m.remove("status");
        }
    }
    if c.is_none() && ctx.res.has(Sub::Status) {
        // As the API server's create strategies: a workload's status is the controllers' to
        // write, and every built-in object with a status has one, if only `{}` (clients read
        // `status.readyReplicas` of a new Deployment without a None check).
        let cleared = match (ctx.res.group, ctx.res.kind) {
            ("", "Service") | ("networking.k8s.io", "Ingress") => Some(json!({"loadBalancer": {}})),
            ("apps", _)
            | ("batch", _)
            | ("autoscaling", "HorizontalPodAutoscaler")
            | ("policy", "PodDisruptionBudget")
            | ("", "ReplicationController") => Some(json!({})),
            _ => None,
        };
        match cleared {
            Some(s) => o["status"] = s,
            None if o.get("status").is_none_or(Value::is_null) => o["status"] = json!({}),
            None => {}
        }
    }
    no_escalation(ctx, o).await?;
    if o.get("spec").is_some() || c.is_some() {
        meta(o).insert("generation".into(), json!(1));
    }
    Ok(())
}

/// As the ResourceQuota admission plugin, for an update that makes an object use more (a
/// Service turned NodePort or LoadBalancer, a claim grown): refused if it would pass a cap,
/// else the writes that add the growth to each quota's `status.used`, conditional on the
/// quota as read.
async fn quota_growth(ctx: &Ctx<'_>, old: &Value, new: &Value) -> Result<Vec<Op>, ApiError> {
    let Some(ns) = &ctx.ns else {
        return Ok(Vec::new());
    };
    if !(ctx.res.group.is_empty() && matches!(ctx.res.kind, "Service" | "PersistentVolumeClaim")) {
        return Ok(Vec::new());
    }
    let res =
        resources::find("", "v1", "resourcequotas").ok_or_else(|| internal("resourcequotas"))?;
    let prefix = res.prefix(Some(ns));
    if !ctx.api.store.has_prefix(&prefix)? {
        return Ok(Vec::new());
    }
    let page = ctx
        .api
        .store
        .range(&prefix, None, 0, Consistency::Serializable)
        .await?;
    let grow = |k: &str| {
        let more = quota::share(k, ctx.res, new)?
            .saturating_sub(quota::share(k, ctx.res, old).unwrap_or(0));
        (more > 0).then_some(more)
    };
    let ops = quota_writes(ctx, ns, &page.kvs, None, new, grow).await?;
    Ok(if ctx.dry_run { Vec::new() } else { ops })
}

/// For each quota in `quotas` whose scopes take the object `o` in (`pod`, if it is one), what
/// `grow` says it adds to each cap: refused if a cap would be passed (or a pod leaves out a
/// compute resource a cap needs), else the writes that add it to each quota's `status.used`,
/// conditional on the quota as read.
async fn quota_writes(
    ctx: &Ctx<'_>,
    ns: &str,
    quotas: &[KeyValue],
    pod: Option<&Value>,
    o: &Value,
    grow: impl Fn(&str) -> Option<u128>,
) -> Result<Vec<Op>, ApiError> {
    let mut ops = Vec::new();
    for kv in quotas {
        let q = from_kv(kv)?;
        if !quota::in_scope(&q, pod) {
            continue;
        }
        let add: quota::Usage = q["spec"]["hard"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, _)| Some((k.clone(), grow(k)?)))
            .collect();
        if add.is_empty() {
            continue;
        }
        if let Some(m) = pod.and_then(|p| quota::unstated(&q, p)) {
            let why = format!("failed quota: {}: {m}", name_of(&q));
            return Err(refused(ctx, o, &[why]));
        }
        let used = match quota::used(&q) {
            Some(u) => u,
            None => quota::count(ctx.api, ns, &q).await?,
        };
        if let Some(m) = quota::exceeded(&q, &used, &add) {
            return Err(refused(ctx, o, &[m]));
        }
        let mut sum = used;
        for (k, n) in &add {
            let u = sum.entry(k.clone()).or_default();
            *u = u.saturating_add(*n);
        }
        let mut next = q.clone();
        next["status"] = quota::status(&q, &sum);
        ops.push(Op::Put {
            key: kv.key.clone(),
            value: to_stored(&next),
            expect: Expect::ModRevision(kv.mod_revision),
        });
    }
    Ok(ops)
}

/// As kube-apiserver's RBAC escalation check: a Role or ClusterRole may be written only by
/// someone who holds every permission it grants (or may `escalate` it), and a binding only
/// by someone who holds every permission of the role it names, where it applies (or may
/// `bind` that role). Otherwise whoever may write bindings in a namespace could grant
/// themselves anything there, quotas included.
async fn no_escalation(ctx: &Ctx<'_>, o: &Value) -> Result<(), ApiError> {
    const RBAC: &str = "rbac.authorization.k8s.io";
    if ctx.res.group != RBAC || ctx.user.is_master() {
        return Ok(());
    }
    let ns = ctx.ns.clone().unwrap_or_default();
    let (rules, verb, role_plural, role) = match ctx.res.kind {
        "Role" | "ClusterRole" => (
            o["rules"].clone(),
            "escalate",
            ctx.res.plural,
            name_of(o).to_string(),
        ),
        "RoleBinding" | "ClusterRoleBinding" => {
            let kind = o["roleRef"]["kind"].as_str().unwrap_or("");
            let role = o["roleRef"]["name"].as_str().unwrap_or("").to_string();
            let (plural, key_ns) = match kind {
                "ClusterRole" => ("clusterroles", None),
                "Role" => ("roles", Some(ns.as_str())),
                _ => return Ok(()),
            };
            let res = resources::find(RBAC, "v1", plural).ok_or_else(|| internal(plural))?;
            let rules = match admission_read(ctx, &res.key(key_ns, &role)).await? {
                Some(kv) => pick::only(&kv.value, &["rules"]).map_err(internal)?["rules"].clone(),
                // A binding to a role not made yet grants nothing until it is.
                None => Value::Null,
            };
            (rules, "bind", plural, role)
        }
        _ => return Ok(()),
    };
    let policy = load_policy(ctx.api).await?;
    let may =
        |verb: &str, group: &str, resource: &str, sub: &str, name: &str, path: Option<&str>| {
            policy.allows(
                &ctx.user,
                &Attrs {
                    verb: verb.into(),
                    group: group.into(),
                    resource: resource.into(),
                    subresource: sub.into(),
                    namespace: ns.clone(),
                    name: name.into(),
                    path: path.map(String::from),
                },
            )
        };
    if may(verb, RBAC, role_plural, "", &role, None) {
        return Ok(());
    }
    // An aggregated role takes rules from any role it selects: only full authority may
    // make one, as in Kubernetes.
    if ctx.res.kind == "ClusterRole"
        && !o["aggregationRule"].is_null()
        && !(may("*", "*", "*", "", "", None) && may("*", "", "", "", "", Some("*")))
    {
        return Err(ApiError::Forbidden {
            message: format!(
                "{} \"{}\" is forbidden: must have cluster-admin privileges to use the aggregationRule",
                ctx.res.qualified(),
                name_of(o)
            ),
        });
    }
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    let mut missing = Vec::new();
    for rule in rules.as_array().into_iter().flatten() {
        let verbs = strs(&rule["verbs"]);
        for url in strs(&rule["nonResourceURLs"]) {
            for v in &verbs {
                if !may(v, "", "", "", "", Some(&url)) {
                    missing.push(format!("{v} {url}"));
                }
            }
        }
        let mut names = strs(&rule["resourceNames"]);
        if names.is_empty() {
            names.push(String::new());
        }
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                let (res, sub) = r.split_once('/').unwrap_or((&r, ""));
                for v in &verbs {
                    for n in &names {
                        if !may(v, &g, res, sub, n, None) {
                            let g = if g.is_empty() { "core" } else { &g };
                            missing.push(format!("{v} {g}/{r}"));
                        }
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    missing.dedup();
    Err(ApiError::Forbidden {
        message: format!(
            "{} \"{}\" is forbidden: user \"{}\" (groups={:?}) is attempting to grant RBAC permissions not currently held: {}",
            ctx.res.qualified(),
            name_of(o),
            ctx.user.name,
            ctx.user.groups,
            missing.join(", ")
        ),
    })
}

/// A refusal by an admission plugin: `pods "web" is forbidden: …`, the reasons listed as
/// Kubernetes aggregates them.
fn refused(ctx: &Ctx<'_>, o: &Value, why: &[String]) -> ApiError {
    let why = match why {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    ApiError::Forbidden {
        message: format!(
            "{} \"{}\" is forbidden: {why}",
            ctx.res.qualified(),
            name_of(o)
        ),
    }
}

/// As the LimitRanger admission plugin, for a new pod or claim: its namespace's LimitRanges
/// fill in its containers' requests and limits and bound them ([`quota::limit_pod`]).
async fn admit_limits(ctx: &Ctx<'_>, o: &mut Value) -> Result<(), ApiError> {
    let Some(ns) = &ctx.ns else {
        return Ok(());
    };
    let res = resources::find("", "v1", "limitranges").ok_or_else(|| internal("limitranges"))?;
    let prefix = res.prefix(Some(ns));
    if !ctx.api.store.has_prefix(&prefix)? {
        return Ok(());
    }
    let ranges: Vec<Value> = ctx
        .api
        .store
        .range(&prefix, None, 0, Consistency::Serializable)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| from_kv(kv).ok())
        .collect();
    let why = if ctx.res.kind == "Pod" {
        quota::limit_pod(&ranges, o)
    } else {
        quota::limit_claim(&ranges, o)
    };
    if why.is_empty() {
        Ok(())
    } else {
        Err(refused(ctx, o, &why))
    }
}

/// As the ResourceQuota admission plugin, for any new object in a namespace with quotas:
/// refused if it would pass a cap; otherwise its share is added to each quota's
/// `status.used` before it is stored, on the condition that no other create changed the
/// quota meanwhile (then all is read and checked again).
async fn admit_quota(ctx: &Ctx<'_>, o: &Value) -> Result<(), ApiError> {
    let Some(ns) = &ctx.ns else {
        return Ok(());
    };
    let res =
        resources::find("", "v1", "resourcequotas").ok_or_else(|| internal("resourcequotas"))?;
    let prefix = res.prefix(Some(ns));
    if !ctx.api.store.has_prefix(&prefix)? {
        return Ok(());
    }
    let pod = ctx.res.group.is_empty() && ctx.res.kind == "Pod";
    for tries in 0..16u64 {
        if tries > 0 {
            // Creates racing for the same quota: spread them out.
            let ms = rand::random::<u64>() % (2 * tries) + 1;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        // This member's copy: as an informer's cache serves the plugin in Kubernetes. The
        // conditional write catches a copy that is behind.
        let page = ctx
            .api
            .store
            .range(&prefix, None, 0, Consistency::Serializable)
            .await?;
        let counts_it = page.kvs.iter().any(|kv| {
            pick::only(&kv.value, &["spec.hard"]).is_ok_and(|q| {
                q["spec"]["hard"].as_object().is_some_and(|h| {
                    h.keys()
                        .any(|k| quota::counted(k).is_some_and(|r| std::ptr::eq(r, ctx.res)))
                })
            })
        });
        if !counts_it {
            return Ok(());
        }
        let grow = |k: &str| quota::share(k, ctx.res, o);
        let ops = quota_writes(ctx, ns, &page.kvs, pod.then_some(o), o, grow).await?;
        if ops.is_empty() || ctx.dry_run {
            return Ok(());
        }
        match ctx.api.store.txn(ops).await? {
            Outcome::Committed { .. } => return Ok(()),
            Outcome::Failed { .. } => continue,
            other => return Err(internal(format!("unexpected outcome {other:?}"))),
        }
    }
    Err(ApiError::Unavailable(format!(
        "the quotas of namespace {ns} changed too often to be checked; try again"
    )))
}

/// The StorageClass marked default (the newest, if several are).
async fn default_class(api: &Api) -> Result<Option<String>, ApiError> {
    let r = resources::find("storage.k8s.io", "v1", "storageclasses")
        .ok_or_else(|| internal("storageclasses"))?;
    let page = api
        .store
        .range(&r.prefix(None), None, 0, Consistency::Serializable)
        .await?;
    Ok(page
        .kvs
        .iter()
        .filter_map(|kv| Some((kv.create_revision, from_kv(kv).ok()?)))
        .filter(|(_, c)| is_default_class(c))
        .max_by_key(|(rev, _)| *rev)
        .and_then(|(_, c)| c["metadata"]["name"].as_str().map(String::from)))
}

/// Whether a StorageClass carries the default-class annotation.
pub fn is_default_class(c: &Value) -> bool {
    c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
}

/// Store a new object (retrying generated names and reservations that collide).
async fn write_new(ctx: &Ctx<'_>, mut o: Value, generated: bool) -> Result<Value, ApiError> {
    let is_service = ctx.res.group.is_empty() && ctx.res.kind == "Service";
    let taken: Vec<String> = if is_service && !ctx.dry_run {
        ctx.api
            .store
            .range(
                "/registry/ranges/serviceips/",
                None,
                0,
                Consistency::Serializable,
            )
            .await?
            .kvs
            .into_iter()
            .filter_map(|kv| kv.key.rsplit('/').next().map(String::from))
            .collect()
    } else {
        Vec::new()
    };
    let mut taken = taken;
    let original = o.clone();
    for _ in 0..8 {
        let mut ops = Vec::new();
        if is_service {
            o["spec"] = original["spec"].clone();
            ops.extend(service_reservations(ctx.api, &mut o, &taken)?);
        }
        if ctx.dry_run {
            return Ok(o);
        }
        let name = name_of(&o).to_string();
        let mut all = vec![Op::Put {
            key: ctx.key(&name),
            value: to_stored(&o),
            expect: Expect::Absent,
        }];
        all.extend(ops);
        let keys: Vec<String> = all.iter().map(|op| op.key().to_string()).collect();
        match ctx.api.store.txn(all).await? {
            Outcome::Committed { revision, .. } => {
                set_rv(&mut o, revision);
                after_create(ctx, &o).await;
                return Ok(o);
            }
            Outcome::Failed { op: 0, .. } if generated => {
                let prefix = o["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                meta(&mut o).insert("name".into(), json!(format!("{prefix}{}", random_suffix())));
            }
            Outcome::Failed { op: 0, .. } => {
                return Err(ApiError::AlreadyExists {
                    group: ctx.res.group.into(),
                    kind: ctx.res.plural.into(),
                    name,
                })
            }
            Outcome::Failed { op, .. }
                if taken_port(&original, keys.get(op).map_or("", String::as_str)).is_some() =>
            {
                let (i, port) = taken_port(&original, &keys[op]).unwrap_or_default();
                return Err(port_allocated(&name, i, port));
            }
            Outcome::Failed { op, .. }
                if o["spec"]["clusterIP"] == original["spec"]["clusterIP"]
                    && original["spec"]["clusterIP"].is_string()
                    && keys
                        .get(op)
                        .is_some_and(|k| k.starts_with("/registry/ranges/serviceips/")) =>
            {
                return Err(ApiError::Invalid {
                    group: String::new(),
                    kind: "Service".into(),
                    name,
                    causes: vec![Cause::invalid(
                        "spec.clusterIPs",
                        o["spec"]["clusterIP"].as_str().unwrap_or(""),
                        "failed to allocate IP: provided IP is already allocated",
                    )],
                });
            }
            Outcome::Failed { .. } => {
                // Another create took this address (or node port) meanwhile; pick again.
                if let Some(ip) = o["spec"]["clusterIP"].as_str() {
                    taken.push(ip.to_string());
                }
            }
            other => return Err(internal(format!("unexpected outcome {other:?}"))),
        }
    }
    Err(ApiError::Unavailable(
        "could not allocate a name or address; try again".into(),
    ))
}

/// The ConfigMap every namespace gets with the cluster CA, for clients inside the cluster
/// to check the API server with (kube-controller-manager's root CA publisher makes it).
const ROOT_CA: &str = "kube-root-ca.crt";

/// Put `ROOT_CA` into namespace `ns` unless it is there.
async fn publish_root_ca(api: &Arc<Api>, ns: &str) {
    let Some(pem) = api
        .pki_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("ca.crt")).ok())
    else {
        return;
    };
    let Some(cms) = resources::find("", "v1", "configmaps") else {
        return;
    };
    let v = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CA, "namespace": ns,
            "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now(),
            "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
        "data": {"ca.crt": pem}});
    let _ = api
        .store
        .put(&cms.key(Some(ns), ROOT_CA), to_stored(&v), Expect::Absent)
        .await;
}

/// The label on the `kubernetes` Service's EndpointSlices naming the member whose API the
/// slice leads to.
const MEMBER_LABEL: &str = "outpost.dev/member";

/// Lead the `kubernetes` Service to this member's API, as kube-apiserver's endpoint
/// reconciler does: its address (127.0.0.1 when it listens on every address) in an
/// EndpointSlice of its own (`kubernetes-HASH`: members may listen on different ports, and a
/// slice has one set of ports) labelled with its member id, replacing any it published from
/// another address before; then [`reconcile_api_endpoints`] writes the Endpoints. A pod
/// reaches the API through its node's netd at the Service's cluster IP.
async fn publish_api_endpoint(api: &Arc<Api>) {
    let Ok(addr) = api.server.parse::<std::net::SocketAddr>() else {
        return;
    };
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let Some(slices) = resources::find("discovery.k8s.io", "v1", "endpointslices") else {
        return;
    };
    let me = api.store.id().to_string();
    let name = format!(
        "kubernetes-{}",
        &outpost_api::sha256_hex(api.server.as_bytes())[..10]
    );
    let key = slices.key(Some("default"), &name);
    let old = match api.store.get(&key, Consistency::Linearizable).await {
        Ok(kv) => kv,
        Err(_) => return,
    };
    let mut slice = old
        .as_ref()
        .and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .unwrap_or_else(|| {
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "default",
                    "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now()}})
        });
    let want = (
        json!({"kubernetes.io/service-name": "kubernetes",
               "endpointslice.kubernetes.io/skip-mirror": "true",
               MEMBER_LABEL: me}),
        json!([{"addresses": [ip], "conditions": {"ready": true}}]),
        json!([{"name": "https", "port": addr.port(), "protocol": "TCP"}]),
    );
    let have = (
        slice["metadata"]["labels"].clone(),
        slice["endpoints"].clone(),
        slice["ports"].clone(),
    );
    if have != want {
        slice["metadata"]["labels"] = want.0;
        slice["addressType"] = json!("IPv4");
        slice["endpoints"] = want.1;
        slice["ports"] = want.2;
        let expect = old.map_or(Expect::Absent, |kv| Expect::ModRevision(kv.mod_revision));
        let _ = api.store.put(&key, to_stored(&slice), expect).await;
    }
    reconcile_api_endpoints(&api.store, Some((&me, &key))).await;
}

/// Make the `kubernetes` Service's endpoints those of the current members: remove the
/// EndpointSlices of members no longer in the membership (and, given `mine`, this member's
/// id and current slice, its slices from other addresses), then write the Endpoints
/// `default/kubernetes` from the slices left. Called as a member starts and when one is
/// removed.
pub async fn reconcile_api_endpoints(store: &crate::store::Store, mine: Option<(&str, &str)>) {
    let (Some(eps), Some(slices)) = (
        resources::find("", "v1", "endpoints"),
        resources::find("discovery.k8s.io", "v1", "endpointslices"),
    ) else {
        return;
    };
    let Ok(found) = store
        .range(
            &slices.prefix(Some("default")),
            None,
            0,
            Consistency::Linearizable,
        )
        .await
    else {
        return;
    };
    // After the range's read barrier: a removal committed through another member shows.
    let members: std::collections::BTreeSet<String> =
        store.status().members.keys().map(u64::to_string).collect();
    // By port, the addresses leading to a member's API.
    let mut ports: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for kv in found.kvs {
        let Ok(o) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let labels = &o["metadata"]["labels"];
        if labels["kubernetes.io/service-name"] != "kubernetes" {
            continue;
        }
        let member = labels[MEMBER_LABEL].as_str().unwrap_or("");
        let stale = !members.contains(member)
            || mine.is_some_and(|(me, key)| member == me && kv.key != key);
        if stale {
            let _ = store
                .delete(&kv.key, Expect::ModRevision(kv.mod_revision))
                .await;
            continue;
        }
        let port = o["ports"][0]["port"].as_u64().unwrap_or(0);
        for e in o["endpoints"].as_array().into_iter().flatten() {
            for a in e["addresses"].as_array().into_iter().flatten() {
                if let Some(a) = a.as_str() {
                    let at = ports.entry(port).or_default();
                    if !at.iter().any(|x| x == a) {
                        at.push(a.to_string());
                    }
                }
            }
        }
    }
    let subsets: Vec<Value> = ports
        .iter()
        .map(|(port, ips)| {
            let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
            json!({"addresses": addresses,
                   "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
        })
        .collect();
    let key = eps.key(Some("default"), "kubernetes");
    let Ok(old) = store.get(&key, Consistency::Linearizable).await else {
        return;
    };
    let mut o = old
        .as_ref()
        .and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .unwrap_or_else(|| {
            json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default",
                    "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
                    "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now()}})
        });
    if o["subsets"] != json!(subsets) {
        o["subsets"] = json!(subsets);
        let expect = old.map_or(Expect::Absent, |kv| Expect::ModRevision(kv.mod_revision));
        let _ = store.put(&key, to_stored(&o), expect).await;
    }
}

/// What follows a create: every namespace gets its `default` service account and the
/// cluster CA's ConfigMap.
async fn after_create(ctx: &Ctx<'_>, o: &Value) {
    if (ctx.res.group, ctx.res.kind) == ("", "Secret")
        && o["type"] == "kubernetes.io/service-account-token"
        && !ctx.dry_run
    {
        if let Err(e) = fill_token_secret(ctx.api, o).await {
            tracing::warn!(secret = %name_of(o), error = %e, "service account token not filled in");
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("", "Namespace") {
        let ns = name_of(o).to_string();
        publish_root_ca(ctx.api, &ns).await;
        if let Some(sa) = resources::find("", "v1", "serviceaccounts") {
            let v = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": ns,
                             "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now()}});
            let _ = ctx
                .api
                .store
                .put(&sa.key(Some(&ns), "default"), to_stored(&v), Expect::Absent)
                .await;
        }
    }
}

/// A new `kubernetes.io/service-account-token` Secret gets its token, the cluster CA and the
/// namespace, as kube-controller-manager's token controller gives them: a token of its
/// ServiceAccount that holds while the Secret exists.
async fn fill_token_secret(api: &Arc<Api>, secret: &Value) -> Result<(), ApiError> {
    let m = &secret["metadata"];
    let (ns, name) = (
        m["namespace"].as_str().unwrap_or("default"),
        name_of(secret),
    );
    let Some(sa_name) = m["annotations"]["kubernetes.io/service-account.name"].as_str() else {
        return Ok(());
    };
    if !secret["data"]["token"].is_null() {
        return Ok(());
    }
    let sas = resources::find("", "v1", "serviceaccounts").ok_or_else(|| internal("sa"))?;
    let Some(kv) = api
        .store
        .get(&sas.key(Some(ns), sa_name), Consistency::Linearizable)
        .await?
    else {
        return Ok(());
    };
    let sa = from_kv(&kv)?;
    let req = json!({"spec": {"expirationSeconds": super::token::MAX_TTL,
        "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": name, "uid": m["uid"]}}});
    let answer = super::token::issue(api, &sa, &req).await?;
    let token = answer["status"]["token"].as_str().unwrap_or("").to_string();
    let ca = api
        .pki_dir
        .as_ref()
        .and_then(|d| std::fs::read(d.join("ca.crt")).ok())
        .unwrap_or_default();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let data = json!({"token": b64(token.as_bytes()), "ca.crt": b64(&ca), "namespace": b64(ns.as_bytes())});
    let sa_uid = sa["metadata"]["uid"].clone();
    let res = resources::find("", "v1", "secrets").ok_or_else(|| internal("secrets"))?;
    let ctx = system_ctx(api, res, Some(ns.to_string()));
    update_with(&ctx, name, None, false, |old| {
        let mut new = old.clone();
        for (k, v) in data.as_object().into_iter().flatten() {
            new["data"][k] = v.clone();
        }
        new["metadata"]["annotations"]["kubernetes.io/service-account.uid"] = sa_uid.clone();
        Ok((new, false))
    })
    .await
    .map(|_| ())
}

/// Carry what a client may not change from `old` to `new`, bump generation, and validate.
/// Member `key` of the object `o`, an empty object put there if it has none.
fn child_of<'a>(o: &'a mut Value, key: &str) -> &'a mut Value {
    if !o.is_object() {
        *o = json!({});
    }
    if !o[key].is_object() {
        o[key] = json!({});
    }
    &mut o[key]
}

/// Make the object `new` hold what `old` holds, but for its `own` members, which stay as
/// they are.
fn same_as(new: &mut Value, old: &Value, own: &[&str]) {
    let (Some(n), Some(o)) = (new.as_object_mut(), old.as_object()) else {
        *new = old.clone();
        return;
    };
    n.retain(|k, _| own.contains(&k.as_str()) || o.contains_key(k));
    for (k, v) in o {
        if own.contains(&k.as_str()) || n.get(k) == Some(v) {
            continue;
        }
        n.insert(k.clone(), v.clone());
    }
}

/// What an update of a Service leaves unsaid keeps its allocated value, as kube-apiserver
/// keeps it: the cluster IPs (and their families) and each port's node port (matched by port
/// and protocol), so that `kubectl replace` of the manifest it was made from changes nothing.
fn keep_allocated(old: &Value, new: &mut Value) {
    let unset = |v: &Value| v.is_null() || v == "" || v == 0;
    let (was, spec) = (&old["spec"], child_of(new, "spec"));
    if spec["type"] != "ExternalName" && was["type"] != "ExternalName" && unset(&spec["clusterIP"])
    {
        for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if unset(&spec[f]) && !was[f].is_null() {
                spec[f] = was[f].clone();
            }
        }
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        let proto = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_string();
        let olds = was["ports"].as_array().cloned().unwrap_or_default();
        for p in spec["ports"].as_array_mut().into_iter().flatten() {
            if !unset(&p["nodePort"]) {
                continue;
            }
            if let Some(o) = olds
                .iter()
                .find(|o| o["port"] == p["port"] && proto(o) == proto(p) && !unset(&o["nodePort"]))
            {
                p["nodePort"] = o["nodePort"].clone();
            }
        }
        if unset(&spec["healthCheckNodePort"]) && !unset(&was["healthCheckNodePort"]) {
            spec["healthCheckNodePort"] = was["healthCheckNodePort"].clone();
        }
    } else {
        // The type has no node ports: the ones the update left as they were go with the old
        // type, as kube-apiserver drops the fields only a type has.
        let olds = was["ports"].as_array().cloned().unwrap_or_default();
        for p in spec["ports"].as_array_mut().into_iter().flatten() {
            let proto = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_string();
            let kept = olds.iter().any(|o| {
                o["port"] == p["port"] && proto(o) == proto(p) && o["nodePort"] == p["nodePort"]
            });
            if !unset(&p["nodePort"]) && kept {
                if let Some(p) = p.as_object_mut() {
                    p.remove("nodePort");
                }
            }
        }
        for f in ["healthCheckNodePort", "externalTrafficPolicy"] {
            drop_same(spec, was, f);
        }
    }
    if spec["type"] != "LoadBalancer" {
        for f in ["allocateLoadBalancerNodePorts", "loadBalancerClass"] {
            drop_same(spec, was, f);
        }
    }
}

/// Remove field `f` of `spec` where it is what it was in `was`.
fn drop_same(spec: &mut Value, was: &Value, f: &str) {
    if spec.get(f).is_some() && spec[f] == was[f] {
        if let Some(s) = spec.as_object_mut() {
            s.remove(f);
        }
    }
}

/// The node ports an update of a Service reserves and releases ([`node_port_ops`]).
#[derive(Default)]
struct NodePorts {
    ops: Vec<Op>,
    /// The ports (index, number) the client chose: their clash is the client's error.
    chosen: Vec<(usize, u64)>,
}

/// What an update of a Service does to its node ports, as kube-apiserver's does: a port of a
/// NodePort or LoadBalancer Service without one is given one, one the client chose is
/// reserved, and the ones the update leaves are released.
fn node_port_ops(old: &Value, new: &mut Value) -> Result<NodePorts, ApiError> {
    let ports_of = |v: &Value| -> Vec<u64> {
        v["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["nodePort"].as_u64().filter(|n| *n != 0))
            .collect()
    };
    let key = |n: u64| format!("/registry/ranges/servicenodeports/{n}");
    let had = ports_of(old);
    let ty = new["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    let has = ty == "NodePort" || ty == "LoadBalancer";
    let allocates =
        ty == "NodePort" || (has && new["spec"]["allocateLoadBalancerNodePorts"] != false);
    let name = name_of(new).to_string();
    let invalid = |cause: Cause| ApiError::Invalid {
        group: String::new(),
        kind: "Service".into(),
        name: name.clone(),
        causes: vec![cause],
    };
    let (mut ops, mut chosen) = (Vec::new(), Vec::new());
    if let Some(Value::Array(ports)) = new["spec"].get_mut("ports") {
        for (i, p) in ports.iter_mut().enumerate() {
            let field = format!("spec.ports[{i}].nodePort");
            match p["nodePort"].as_u64().filter(|n| *n != 0) {
                Some(_) if !has => {
                    return Err(invalid(Cause::new(
                        "FieldValueForbidden",
                        field,
                        format!("Forbidden: may not be used when `type` is '{ty}'"),
                    )))
                }
                Some(n) if had.contains(&n) => {}
                Some(n) if !(30000..=32767).contains(&n) => {
                    return Err(invalid(Cause::invalid(
                        field,
                        &n.to_string(),
                        "provided port is not in the valid range. The range of valid ports is 30000-32767",
                    )))
                }
                Some(n) => {
                    chosen.push((i, n));
                    ops.push(Op::Put {
                        key: key(n),
                        value: Vec::new(),
                        expect: Expect::Absent,
                    });
                }
                None if allocates => {
                    let n = 30000 + u64::from(rand::random::<u32>() % 2768);
                    p["nodePort"] = json!(n);
                    ops.push(Op::Put {
                        key: key(n),
                        value: Vec::new(),
                        expect: Expect::Absent,
                    });
                }
                None => {}
            }
        }
    }
    let kept = ports_of(new);
    for n in had.into_iter().filter(|n| !kept.contains(n)) {
        ops.push(Op::Delete {
            key: key(n),
            expect: Expect::Any,
        });
    }
    Ok(NodePorts { ops, chosen })
}

fn prepare_update(
    ctx: &Ctx<'_>,
    old: &Value,
    new: &mut Value,
    sub: Option<Sub>,
    record: bool,
) -> Result<(), ApiError> {
    check_kind(ctx, new)?;
    check_namespace(ctx, new)?;
    if name_of(new) != name_of(old) {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            name_of(new),
            name_of(old)
        )));
    }
    let keep = [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ];
    for k in keep {
        match old["metadata"].get(k) {
            Some(v) => {
                meta(new).insert(k.into(), v.clone());
            }
            None => {
                meta(new).remove(k);
            }
        }
    }
    if (ctx.res.group, ctx.res.kind) == ("", "Service") && sub.is_none() {
        keep_allocated(old, new);
    }
    if (ctx.res.group, ctx.res.kind) == ("certificates.k8s.io", "CertificateSigningRequest") {
        // What was asked for never changes; Approved and Denied change only through the
        // approval subresource, as in Kubernetes.
        new["spec"] = old["spec"].clone();
        if sub == Some(Sub::Status) {
            let decided = |c: &Value| c["type"] == "Approved" || c["type"] == "Denied";
            let mut conds: Vec<Value> = old["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| decided(c))
                .cloned()
                .collect();
            conds.extend(
                new["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| !decided(c))
                    .cloned(),
            );
            new["status"]["conditions"] = json!(conds);
        }
    }
    if sub == Some(Sub::Approval) {
        // Only the conditions change (Approved, Denied), as in Kubernetes.
        let conditions = new["status"]["conditions"].take();
        let managed = new["metadata"]
            .as_object_mut()
            .and_then(|m| m.remove("managedFields"));
        *new = old.clone();
        new["status"]["conditions"] = conditions;
        if let Some(m) = managed {
            meta(new).insert("managedFields".into(), m);
        }
    } else if sub == Some(Sub::Status) {
        // Everything but the status, labels, annotations and managed fields as it was. A
        // status write usually leaves the rest as it was read: only what differs is copied.
        same_as(new, old, &["status", "metadata"]);
        let m = child_of(new, "metadata");
        same_as(
            m,
            &old["metadata"],
            &["labels", "annotations", "managedFields"],
        );
    } else if sub == Some(Sub::EphemeralContainers) {
        let added = new["spec"]["ephemeralContainers"].take();
        let managed = new["metadata"]
            .as_object_mut()
            .and_then(|m| m.remove("managedFields"));
        *new = old.clone();
        ephemeral(old, &added)?;
        if !added.is_null() {
            new["spec"]["ephemeralContainers"] = added;
        }
        let had = old["spec"]["ephemeralContainers"]
            .as_array()
            .map_or(0, Vec::len);
        admit::mount_token_ephemeral(&mut new["spec"], had);
        if let Some(m) = managed {
            meta(new).insert("managedFields".into(), m);
        }
    } else if ctx.res.has(Sub::Status) && sub != Some(Sub::Binding) {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    admit::defaults(ctx.res.group, ctx.res.kind, new);
    if (ctx.res.group, ctx.res.kind, sub) == ("", "Pod", None) && old["spec"] != new["spec"] {
        // Against the old spec as today's defaults make it: a pod stored by an older build
        // may lack a default that a label change would otherwise count as a change.
        let mut was = old.clone();
        admit::defaults("", "Pod", &mut was);
        pod_spec_update(&was, new)?;
    }
    // A status update leaves the rest as it was (above).
    let changed = if custom(ctx.res).is_some() {
        // A custom object's generation counts changes to anything but its metadata (and its
        // status, when that is a subresource), as in Kubernetes.
        let status = ctx.res.has(Sub::Status);
        fn keys(v: &Value) -> impl Iterator<Item = &str> {
            v.as_object().into_iter().flatten().map(|(k, _)| k.as_str())
        }
        keys(old)
            .chain(keys(new))
            .filter(|k| *k != "metadata" && !(status && *k == "status"))
            .any(|k| old.get(k) != new.get(k))
    } else {
        new.get("spec").is_some() && !same_spec(old, new)
    };
    if sub != Some(Sub::Status) && changed {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        meta(new).insert("generation".into(), json!(g));
    }
    if record {
        let subname = sub.map(|s| s.name()).unwrap_or("");
        ssa::record_update(
            Some(old),
            new,
            &ctx.manager,
            &ctx.res.api_version(),
            subname,
            &now(),
        );
    }
    Ok(())
}

/// A pod's spec after an update, as kube-apiserver validates it: only the containers' images,
/// an `activeDeadlineSeconds` set or shortened, tolerations added, scheduling gates removed
/// and a negative grace period made 1 may change. Anything else (env, ports, volumes, the
/// node, ephemeral containers outside their subresource) is 422, and the pod runs on as it
/// was; a different pod is a new pod (`kubectl replace --force`, or a Deployment's rollout).
fn pod_spec_update(old: &Value, new: &Value) -> Result<(), ApiError> {
    let (o, n) = (&old["spec"], &new["spec"]);
    if o == n {
        return Ok(());
    }
    // `allowed` is the old spec with each permitted change of `n` carried in.
    let mut allowed = o.clone();
    let carry = |a: &mut Value, k: &str| match n.get(k) {
        Some(v) => a[k] = v.clone(),
        None => {
            if let Some(m) = a.as_object_mut() {
                m.remove(k);
            }
        }
    };
    for list in ["containers", "initContainers"] {
        // `get_mut`, not an index, which would add the list as null where it is not.
        let was = allowed.get_mut(list).and_then(Value::as_array_mut);
        if let (Some(was), Some(now)) = (was, n[list].as_array()) {
            if was.len() == now.len() {
                for (c, d) in was.iter_mut().zip(now) {
                    c["image"] = d["image"].clone();
                }
            }
        }
    }
    let deadline = |v: &Value| v.get("activeDeadlineSeconds").and_then(Value::as_i64);
    if match (deadline(o), deadline(n)) {
        (None, Some(d)) => d > 0,
        (Some(was), Some(d)) => d > 0 && d <= was,
        (was, now) => was == now,
    } {
        carry(&mut allowed, "activeDeadlineSeconds");
    }
    let list = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    let (was, now) = (list(o, "tolerations"), list(n, "tolerations"));
    if was.iter().all(|t| now.contains(t)) {
        carry(&mut allowed, "tolerations");
    }
    let (was, now) = (list(o, "schedulingGates"), list(n, "schedulingGates"));
    if now.iter().all(|g| was.contains(g)) {
        carry(&mut allowed, "schedulingGates");
    }
    let grace = |v: &Value| {
        v.get("terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
    };
    if grace(o).is_some_and(|g| g < 0) && grace(n) == Some(1) {
        carry(&mut allowed, "terminationGracePeriodSeconds");
    }
    if &allowed == n {
        return Ok(());
    }
    let changed: Vec<String> = n
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| allowed.get(k.as_str()) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(
            allowed
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| n.get(k.as_str()).is_none())
                .map(|(k, _)| k.clone()),
        )
        .collect();
    Err(ApiError::Invalid {
        group: String::new(),
        kind: "Pod".into(),
        name: name_of(old).into(),
        causes: vec![Cause::new(
            "FieldValueForbidden",
            "spec",
            format!(
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative); changed: {}",
                changed
                    .iter()
                    .map(|k| format!("spec.{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )],
    })
}

/// Check the ephemeral containers `want` for pod `old`, as the API server does: those it
/// had are kept unchanged (they cannot be removed or altered), new ones have a unique name
/// and an image, and none has ports, probes, resources or lifecycle hooks.
fn ephemeral(old: &Value, want: &Value) -> Result<(), ApiError> {
    let path = "spec.ephemeralContainers";
    let invalid = |causes: Vec<Cause>| ApiError::Invalid {
        group: String::new(),
        kind: "Pod".into(),
        name: name_of(old).into(),
        causes,
    };
    let had = old["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(want) = want.as_array().filter(|_| !want.is_null()) else {
        return if had.is_empty() {
            Ok(())
        } else {
            Err(invalid(vec![Cause::new(
                "FieldValueForbidden",
                path,
                "Forbidden: existing ephemeral containers may not be removed",
            )]))
        };
    };
    if want.len() < had.len() || had.iter().zip(want).any(|(a, b)| a["name"] != b["name"]) {
        return Err(invalid(vec![Cause::new(
            "FieldValueForbidden",
            path,
            "Forbidden: existing ephemeral containers may not be removed",
        )]));
    }
    let mut names: std::collections::HashSet<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| old["spec"][k].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let mut causes = Vec::new();
    for (i, c) in want.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if let Some(before) = had.get(i) {
            if before != c {
                causes.push(Cause::new(
                    "FieldValueForbidden",
                    &at,
                    "Forbidden: existing ephemeral containers may not be changed",
                ));
            }
        }
        let name = c["name"].as_str().unwrap_or("");
        if name.is_empty() {
            causes.push(Cause::required(format!("{at}.name")));
        } else if !names.insert(name.to_string()) {
            causes.push(Cause::new(
                "FieldValueDuplicate",
                format!("{at}.name"),
                format!("Duplicate value: \"{name}\""),
            ));
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            causes.push(Cause::required(format!("{at}.image")));
        }
        for f in [
            "ports",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "lifecycle",
            "resources",
        ] {
            if c.get(f)
                .is_some_and(|v| !v.is_null() && *v != json!({}) && *v != json!([]))
            {
                causes.push(Cause::new(
                    "FieldValueForbidden",
                    format!("{at}.{f}"),
                    "Forbidden: cannot be set for an Ephemeral Container",
                ));
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(causes))
    }
}

/// The read-modify-write loop behind update, patch and apply. `change` gets the current
/// object and returns the new one; a stale resourceVersion in its result is a conflict.
async fn update_with<F>(
    ctx: &Ctx<'_>,
    name: &str,
    sub: Option<Sub>,
    input_check: bool,
    change: F,
) -> Result<Value, ApiError>
where
    F: Fn(&Value) -> Result<(Value, bool), ApiError>,
{
    Ok(update_and(ctx, name, sub, input_check, change, &[])
        .await?
        .0)
}

/// [`update_with`], with `extra` written in the same transaction as the object; the object
/// as stored (without its resourceVersion) comes back too when it was written.
async fn update_and<F>(
    ctx: &Ctx<'_>,
    name: &str,
    sub: Option<Sub>,
    input_check: bool,
    change: F,
    extra: &[Op],
) -> Result<(Value, Option<Vec<u8>>), ApiError>
where
    F: Fn(&Value) -> Result<(Value, bool), ApiError>,
{
    for _ in 0..16 {
        let kv = get_kv(ctx, name).await?;
        let old = from_kv(&kv)?;
        let (mut new, record) = change(&old)?;
        let pinned = rv_of(&new);
        if let Some(rv) = pinned {
            if rv != kv.mod_revision {
                return Err(ApiError::modified(&ctx.res.qualified(), name));
            }
        }
        let input = if input_check && strict(ctx) {
            new.clone()
        } else {
            Value::Null
        };
        let hook = hook_request(ctx, Operation::Update, name, sub);
        let hooked =
            ctx.hooks && matches!(sub, None | Some(Sub::Status | Sub::EphemeralContainers));
        if hooked && ctx.api.hooks.any() {
            // As kube-apiserver: webhooks see the decoded (defaulted) object before the
            // update's own rules (status kept, generation, what a pod may change) apply.
            admit::defaults(ctx.res.group, ctx.res.kind, &mut new);
            hooks::mutate(ctx.api, &hook, &mut new, Some(&old)).await?;
        }
        prepare_update(ctx, &old, &mut new, sub, record)?;
        let NodePorts {
            ops: reserved,
            chosen,
        } = match (ctx.res.group, ctx.res.kind, sub) {
            ("", "Service", None) => node_port_ops(&old, &mut new)?,
            _ => Default::default(),
        };
        // A binding changes a stored, valid pod in two known fields (the scheduler's hot
        // path); anything else is checked whole.
        if sub != Some(Sub::Binding) {
            check(ctx, &mut new, &input, sub)?;
        }
        if sub.is_none() {
            refuse(
                ctx,
                &new,
                admit::validate_update(ctx.res.group, ctx.res.kind, &old, &new),
            )?;
        }
        if (ctx.res.group, ctx.res.kind) == (crd::GROUP, "CustomResourceDefinition") {
            refuse(ctx, &new, crd::validate_update(&new, &old))?;
            crd_status(ctx, Some(&old), &mut new).await?;
        }
        set_rv(&mut new, kv.mod_revision);
        no_escalation(ctx, &new).await?;
        if hooked {
            hooks::validate(ctx.api, &hook, &new, Some(&old)).await?;
        } else if ctx.hooks && sub == Some(Sub::Scale) {
            // Webhooks see a Scale, as the client does (allowed or refused, not patched).
            let (s, was) = (scale_of(ctx.res, &new), scale_of(ctx.res, &old));
            hooks::mutate(ctx.api, &hook, &mut s.clone(), Some(&was)).await?;
            hooks::validate(ctx.api, &hook, &s, Some(&was)).await?;
        }
        if ctx.dry_run && sub.is_none() {
            // Refused as the real update would be; nothing written.
            quota_growth(ctx, &old, &new).await?;
        }
        if new == old || ctx.dry_run {
            return Ok((new, None));
        }
        // A namespace goes only when the namespace controller has emptied it.
        let finalized = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
            && (ctx.res.group, ctx.res.kind) != ("", "Namespace");
        let key = ctx.key(name);
        let stored = (!finalized).then(|| to_stored(&new));
        let mut ops = vec![match &stored {
            None => Op::Delete {
                key: key.clone(),
                expect: Expect::ModRevision(kv.mod_revision),
            },
            Some(value) => Op::Put {
                key: key.clone(),
                value: value.clone(),
                expect: Expect::ModRevision(kv.mod_revision),
            },
        }];
        // Their keys by their place in the transaction (after the object's own op).
        let reserving: Vec<Option<String>> = std::iter::once(None)
            .chain(reserved.iter().map(|o| match o {
                Op::Put { key, .. } => Some(key.clone()),
                _ => None,
            }))
            .collect();
        ops.extend(reserved);
        if finalized {
            ops.extend(release_ops(ctx.res, &new));
        } else if sub.is_none() {
            // In the same transaction: a quota that changed meanwhile retries the whole.
            ops.extend(quota_growth(ctx, &old, &new).await?);
        }
        ops.extend_from_slice(extra);
        match ctx.api.store.txn(ops).await? {
            Outcome::Committed { revision, .. } => {
                set_rv(&mut new, revision);
                return Ok((new, stored));
            }
            Outcome::Failed { op, .. } if op > 0 && op < reserving.len() => {
                // A node port the client chose is another Service's; one drawn at random
                // is drawn again.
                let clash = reserving[op].as_deref().and_then(|k| taken_port(&new, k));
                if let Some((i, port)) = clash.filter(|c| chosen.contains(c)) {
                    return Err(port_allocated(name, i, port));
                }
            }
            Outcome::Failed { .. } if pinned.is_some() => {
                // Stale only if the object moved on, not a quota written in between.
                if get_kv(ctx, name).await?.mod_revision != kv.mod_revision {
                    return Err(ApiError::modified(&ctx.res.qualified(), name));
                }
            }
            Outcome::Failed { .. } => continue,
            other => return Err(internal(format!("unexpected outcome {other:?}"))),
        }
    }
    Err(ApiError::modified(&ctx.res.qualified(), name))
}

async fn replace(
    ctx: &Ctx<'_>,
    name: &str,
    body: Value,
    sub: Option<Sub>,
) -> Result<Value, ApiError> {
    match sub {
        Some(Sub::Scale) => return scale_update(ctx, name, |_| Ok(body.clone())).await,
        Some(Sub::Binding | Sub::Eviction | Sub::Token) => {
            return Err(ApiError::MethodNotAllowed("only POST is supported".into()))
        }
        _ => {}
    }
    if !body.is_object() {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    }
    update_with(ctx, name, sub, true, |_| Ok((body.clone(), true))).await
}

async fn patch_object(
    ctx: &Ctx<'_>,
    name: &str,
    kind: patch::Kind,
    body: Value,
    sub: Option<Sub>,
) -> Result<(StatusCode, Value, Option<Vec<u8>>), ApiError> {
    let apply_patch = |doc: &mut Value| -> Result<(), ApiError> {
        match kind {
            // As kube-apiserver: a JSON patch that cannot be applied (a failed `test`, a
            // missing path) is unprocessable, a 422; a malformed one of the others, a 400.
            patch::Kind::Json => patch::json_patch(doc, &body).map_err(|e| match e {
                patch::JsonPatchError::Malformed(_) => bad_patch(e.to_string()),
                patch::JsonPatchError::Failed(_) => ApiError::Denied(json!({"kind": "Status",
                    "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Invalid",
                    "code": 422, "message": format!("the patch could not be applied: {e}")})),
            }),
            patch::Kind::Merge => patch::merge_patch(doc, &body).map_err(bad_patch),
            patch::Kind::Strategic => patch::strategic(doc, &body).map_err(bad_patch),
            patch::Kind::Apply => Ok(()),
        }
    };
    if sub == Some(Sub::Scale) {
        let o = scale_update(ctx, name, |scale| {
            let mut s = scale.clone();
            apply_patch(&mut s)?;
            Ok(s)
        })
        .await?;
        return Ok((StatusCode::OK, o, None));
    }
    if kind != patch::Kind::Apply {
        let change = |old: &Value| {
            let mut doc = old.clone();
            apply_patch(&mut doc)?;
            // A patch that leaves resourceVersion as it was does not pin it.
            if doc["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"] {
                meta(&mut doc).remove("resourceVersion");
            }
            Ok((doc, true))
        };
        let (o, stored) =
            update_and(ctx, name, sub, kind != patch::Kind::Json, change, &[]).await?;
        return Ok((StatusCode::OK, o, stored));
    }
    // Server-side apply.
    if ctx.q.get("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::BadRequest(
            "PATCH, application/apply-patch+yaml requires fieldManager to be set".into(),
        ));
    }
    let mut config = body;
    check_kind(ctx, &mut config)?;
    admit::normalize_quantities(&mut config);
    if name_of(&config) != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&config)
        )));
    }
    let force = ctx.q.flag("force");
    let av = ctx.res.api_version();
    let manager = ctx.manager.clone();
    let ts = now();
    let conflict = |cs: Vec<ssa::Conflict>| {
        let n = cs.len();
        let list: Vec<String> = cs
            .iter()
            .map(|c| {
                format!(
                    "conflict with \"{}\" using {}: {}",
                    c.manager, c.api_version, c.field
                )
            })
            .collect();
        let message = if n == 1 {
            format!("Apply failed with 1 conflict: {}", list[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", list.join("\n"))
        };
        ApiError::Conflict {
            kind: ctx.res.qualified(),
            name: name.into(),
            message,
            causes: cs
                .iter()
                .map(|c| {
                    Cause::new(
                        "FieldManagerConflict",
                        c.field.clone(),
                        format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                    )
                })
                .collect(),
        }
    };
    let exists = ctx
        .api
        .store
        .get(&ctx.key(name), Consistency::Linearizable)
        .await?
        .is_some();
    if !exists {
        let mut base = json!({"apiVersion": av, "kind": ctx.res.kind, "metadata": {"name": name}});
        if let Some(ns) = &ctx.ns {
            base["metadata"]["namespace"] = json!(ns);
        }
        let applied = ssa::apply(&base, &config, &manager, &av, force, &ts).map_err(conflict)?;
        let mut o = applied;
        check_namespace(ctx, &mut o)?;
        if let Some(ns) = &ctx.ns {
            namespace_ready(ctx, ns, name).await?;
        }
        let uid = uuid::Uuid::new_v4().to_string();
        meta(&mut o).insert("uid".into(), json!(uid));
        meta(&mut o).insert("creationTimestamp".into(), json!(ts));
        admit::defaults(ctx.res.group, ctx.res.kind, &mut o);
        admit_new(ctx, &mut o, &uid).await?;
        let hook = hook_request(ctx, Operation::Create, name, None);
        hooks::mutate(ctx.api, &hook, &mut o, None).await?;
        check(ctx, &mut o, &config, None)?;
        admit_quota(ctx, &o).await?;
        hooks::validate(ctx.api, &hook, &o, None).await?;
        let o = write_new(ctx, o, false).await?;
        return Ok((StatusCode::CREATED, o, None));
    }
    let o = update_with(ctx, name, sub, false, |old| {
        let mut cfg = config.clone();
        if let Some(m) = cfg["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        strict_fields(ctx, &cfg)?;
        let mut new = ssa::apply(old, &cfg, &manager, &av, force, &ts).map_err(conflict)?;
        // The stored object's resourceVersion came along: it must not pin the write, or a
        // controller's status update in between would fail an apply that never named one.
        if new["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"] {
            meta(&mut new).remove("resourceVersion");
        }
        Ok((new, false))
    })
    .await?;
    Ok((StatusCode::OK, o, None))
}

fn scale_of(res: &'static Resource, o: &Value) -> Value {
    let m = &o["metadata"];
    let (spec, status, selector) = match custom(res).and_then(|c| c.scale.clone()) {
        // A CRD's scale subresource names where its replicas and selector are.
        Some(s) => (
            crd::value_at(o, &s.spec).and_then(Value::as_i64),
            crd::value_at(o, &s.status).and_then(Value::as_i64),
            s.selector
                .and_then(|p| {
                    crd::value_at(o, &p)
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or_default(),
        ),
        None => (
            o["spec"]["replicas"].as_i64(),
            o["status"]["replicas"].as_i64(),
            Labels::of_owner(o).to_query(),
        ),
    };
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": spec.unwrap_or(0)},
        "status": {"replicas": status.unwrap_or(0), "selector": selector}})
}

async fn scale_update<F>(ctx: &Ctx<'_>, name: &str, f: F) -> Result<Value, ApiError>
where
    F: Fn(&Value) -> Result<Value, ApiError>,
{
    let o = update_with(ctx, name, Some(Sub::Scale), false, |old| {
        let scale = scale_of(ctx.res, old);
        let new_scale = f(&scale)?;
        let replicas = new_scale["spec"]["replicas"]
            .as_i64()
            .ok_or_else(|| ApiError::Invalid {
                group: "autoscaling".into(),
                kind: "Scale".into(),
                name: name.into(),
                causes: vec![Cause::required("spec.replicas")],
            })?;
        if replicas < 0 {
            return Err(ApiError::Invalid {
                group: "autoscaling".into(),
                kind: "Scale".into(),
                name: name.into(),
                causes: vec![Cause::invalid(
                    "spec.replicas",
                    &replicas.to_string(),
                    "must be greater than or equal to 0",
                )],
            });
        }
        let mut new = old.clone();
        match custom(ctx.res).and_then(|c| c.scale.clone()) {
            Some(s) => {
                crd::set_at(&mut new, &s.spec, json!(replicas));
            }
            None => new["spec"]["replicas"] = json!(replicas),
        }
        // A resourceVersion is a precondition only when the client set one: a patch leaves
        // the one we filled in, which must not fail against a concurrent write (the
        // controllers write status all the time).
        match rv_of(&new_scale).filter(|rv| Some(*rv) != rv_of(&scale)) {
            Some(rv) => new["metadata"]["resourceVersion"] = json!(rv.to_string()),
            None => {
                meta(&mut new).remove("resourceVersion");
            }
        }
        Ok((new, true))
    })
    .await?;
    Ok(scale_of(ctx.res, &o))
}

async fn bind(ctx: &Ctx<'_>, name: &str, body: Value) -> Result<Response, ApiError> {
    let node = body["target"]["name"].as_str().unwrap_or("").to_string();
    // The pod is not checked whole on this path, so the one field it takes is.
    let bad = if node.is_empty() {
        Some(Cause::required("target.name"))
    } else {
        admit::check_name("Node", &node).map(|mut c| {
            c.field = "target.name".into();
            c
        })
    };
    if let Some(cause) = bad {
        return Err(ApiError::Invalid {
            group: String::new(),
            kind: "Binding".into(),
            name: name.into(),
            causes: vec![cause],
        });
    }
    update_with(ctx, name, Some(Sub::Binding), false, |old| {
        bound(old, name, &node)
    })
    .await?;
    Ok(respond(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// Pod `old` bound to `node`, as the API server's binding makes it: no managed fields
/// recorded, and the PodScheduled condition set with the node.
fn bound(old: &Value, name: &str, node: &str) -> Result<(Value, bool), ApiError> {
    if let Some(n) = old["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::Conflict {
            kind: "pods".into(),
            name: name.into(),
            message: format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{n}\""),
            causes: vec![],
        });
    }
    let mut new = old.clone();
    new["spec"]["nodeName"] = json!(node);
    // As the API server's binding does: the pod is scheduled, whatever an earlier attempt
    // said.
    let mut conds: Vec<Value> = new["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    conds.retain(|c| c["type"] != "PodScheduled");
    conds.push(json!({"type": "PodScheduled", "status": "True",
        "lastProbeTime": null, "lastTransitionTime": now()}));
    new["status"]["conditions"] = json!(conds);
    meta(&mut new).remove("resourceVersion");
    Ok((new, false))
}

/// The scheduler's binding of pod `ns/name` to `node` and its `event` (a body as a client
/// posts it), stored in one transaction as the binding subresource and a create of the
/// event would store them. The scheduler's hot path: as two requests through the router
/// and two log entries per pod, bindings ran a quarter slower.
pub(crate) async fn bind_with_event(
    api: &Arc<Api>,
    ns: &str,
    name: &str,
    node: &str,
    manager: &str,
    mut event: Value,
) -> Result<(), ApiError> {
    let pods = resources::find("", "v1", "pods").ok_or_else(|| internal("pods"))?;
    let events = resources::find("", "v1", "events").ok_or_else(|| internal("events"))?;
    let ts = now();
    let m = meta(&mut event);
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(ts));
    ssa::record_update(None, &mut event, manager, "v1", "", &ts);
    // Its name holds the time in nanoseconds: a clash would be the same pod's event of the
    // same nanosecond, which may as well be this one.
    let put = Op::Put {
        key: events.key(Some(ns), name_of(&event)),
        value: to_stored(&event),
        expect: Expect::Any,
    };
    let ctx = system_ctx(api, pods, Some(ns.to_string()));
    update_and(
        &ctx,
        name,
        Some(Sub::Binding),
        false,
        |old| bound(old, name, node),
        &[put],
    )
    .await
    .map(drop)
}

/// Delete options from the body and the query (the Python client sends them as parameters).
fn delete_options(ctx: &Ctx<'_>, body: &Value) -> (String, Option<String>, Option<String>, bool) {
    let policy = body["propagationPolicy"]
        .as_str()
        .or(ctx.q.get("propagationPolicy"))
        .or(match body["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan"),
            _ => None,
        })
        .unwrap_or("Background")
        .to_string();
    let uid = body["preconditions"]["uid"].as_str().map(String::from);
    let rv = body["preconditions"]["resourceVersion"]
        .as_str()
        .map(String::from);
    let dry = ctx.dry_run
        || body["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    (policy, uid, rv, dry)
}

/// Namespaces the cluster needs, which the NamespaceLifecycle admission plugin keeps.
const IMMORTAL: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

async fn delete(ctx: &Ctx<'_>, name: &str, body: &Value) -> Result<Value, ApiError> {
    if (ctx.res.group, ctx.res.kind) == ("", "Namespace") && IMMORTAL.contains(&name) {
        return Err(ApiError::Forbidden {
            message: format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            ),
        });
    }
    let (policy, uid, rv, dry) = delete_options(ctx, body);
    if !matches!(policy.as_str(), "Background" | "Foreground" | "Orphan") {
        return Err(ApiError::BadRequest(format!(
            "unknown propagationPolicy {policy:?}"
        )));
    }
    for _ in 0..16 {
        let kv = get_kv(ctx, name).await?;
        let mut o = from_kv(&kv)?;
        if uid.as_deref().is_some_and(|u| o["metadata"]["uid"] != u)
            || rv
                .as_deref()
                .is_some_and(|r| r != kv.mod_revision.to_string())
        {
            return Err(ApiError::Conflict {
                kind: ctx.res.qualified(),
                name: name.into(),
                message: format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the precondition was not met",
                    ctx.res.qualified()
                ),
                causes: vec![],
            });
        }
        if ctx.hooks {
            let mut hook = hook_request(ctx, Operation::Delete, name, None);
            hook.dry_run = dry;
            hooks::mutate(ctx.api, &hook, &mut Value::Null, Some(&o)).await?;
            hooks::validate(ctx.api, &hook, &Value::Null, Some(&o)).await?;
        }
        if dry {
            return Ok(o);
        }
        let namespace = ctx.res.kind == "Namespace" && ctx.res.group.is_empty();
        let finalizers = o["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if let Some(grace) = pod_grace(ctx, &o, body) {
            // A pod on a node stops there first; the node deletes it once its containers
            // have ended (or the pod is force-deleted with a grace period of 0).
            let shorter = o["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .is_none_or(|g| grace < g);
            if !o["metadata"]["deletionTimestamp"].is_null() && !shorter {
                return Ok(o);
            }
            let m = meta(&mut o);
            m.insert(
                "deletionTimestamp".into(),
                json!(rfc3339(now_secs().saturating_add(grace))),
            );
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            match ctx
                .api
                .store
                .put(
                    &ctx.key(name),
                    to_stored(&o),
                    Expect::ModRevision(kv.mod_revision),
                )
                .await?
            {
                Outcome::Committed { revision, .. } => {
                    set_rv(&mut o, revision);
                    return Ok(o);
                }
                Outcome::Failed { .. } => continue,
                other => return Err(internal(format!("unexpected outcome {other:?}"))),
            }
        }
        // The garbage collector finishes what is pending: a namespace's contents, a foreground
        // delete's dependents, an orphaning delete's references.
        let pending = namespace || finalizers || policy != "Background";
        if pending {
            if !o["metadata"]["deletionTimestamp"].is_null() {
                return Ok(o);
            }
            let m = meta(&mut o);
            m.insert("deletionTimestamp".into(), json!(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            let hold = match policy.as_str() {
                "Foreground" => Some("foregroundDeletion"),
                "Orphan" => Some("orphan"),
                _ => None,
            };
            if let Some(hold) = hold.filter(|_| !namespace) {
                let f = m.entry("finalizers".to_string()).or_insert(json!([]));
                if let Value::Array(list) = f {
                    if !list.iter().any(|x| x == hold) {
                        list.push(json!(hold));
                    }
                }
            }
            if namespace {
                o["status"]["phase"] = json!("Terminating");
            }
            if !mark_deleting(ctx, name, kv.mod_revision, &mut o).await? {
                continue;
            }
            return Ok(o);
        }
        let mut ops = vec![Op::Delete {
            key: ctx.key(name),
            expect: Expect::ModRevision(kv.mod_revision),
        }];
        ops.extend(release_ops(ctx.res, &o));
        match ctx.api.store.txn(ops).await? {
            Outcome::Committed { .. } => return Ok(o),
            Outcome::Failed { .. } => continue,
            other => return Err(internal(format!("unexpected outcome {other:?}"))),
        }
    }
    Err(ApiError::modified(&ctx.res.qualified(), name))
}

/// Store `o` (now carrying a deletion timestamp) if the object is still at `rev`; false if
/// it changed meanwhile and the delete must look again.
async fn mark_deleting(
    ctx: &Ctx<'_>,
    name: &str,
    rev: u64,
    o: &mut Value,
) -> Result<bool, ApiError> {
    match ctx
        .api
        .store
        .put(&ctx.key(name), to_stored(o), Expect::ModRevision(rev))
        .await?
    {
        Outcome::Committed { revision, .. } => {
            set_rv(o, revision);
            Ok(true)
        }
        Outcome::Failed { .. } => Ok(false),
        other => Err(internal(format!("unexpected outcome {other:?}"))),
    }
}

/// The grace period a delete gives a pod that is running on a node, or `None` when the pod
/// goes at once (not on a node, already finished, or a grace period of 0).
fn pod_grace(ctx: &Ctx<'_>, o: &Value, body: &Value) -> Option<i64> {
    if ctx.res.kind != "Pod" || !ctx.res.group.is_empty() {
        return None;
    }
    if o["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
        || matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let grace = body["gracePeriodSeconds"]
        .as_i64()
        .or_else(|| ctx.q.get("gracePeriodSeconds")?.parse().ok())
        .or_else(|| o["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30);
    (grace > 0).then_some(grace)
}

async fn delete_collection(ctx: &Ctx<'_>, body: &Value) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(ctx)?;
    let (items, _, _) = list_objects(
        ctx,
        &labels,
        &fields,
        0,
        None,
        None,
        Consistency::Linearizable,
    )
    .await?;
    let mut gone = Vec::new();
    for o in items {
        let name = name_of(&o).to_string();
        let sub = Ctx {
            api: ctx.api,
            user: ctx.user.clone(),
            res: ctx.res,
            version: ctx.version,
            ns: o["metadata"]["namespace"]
                .as_str()
                .map(String::from)
                .or(ctx.ns.clone()),
            q: ctx.q.clone(),
            manager: ctx.manager.clone(),
            dry_run: ctx.dry_run,
            hooks: ctx.hooks,
        };
        match delete(&sub, &name, body).await {
            Ok(v) => gone.push(v),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(respond(
        StatusCode::OK,
        &json!({"kind": list_kind(ctx), "apiVersion": ctx.res.api_version(),
                "metadata": {}, "items": gone}),
    ))
}

async fn review(ctx: &Ctx<'_>, mut body: Value) -> Result<Response, ApiError> {
    check_kind(ctx, &mut body)?;
    let user = &ctx.user;
    let policy = load_policy(ctx.api).await?;
    match ctx.res.kind {
        "TokenReview" => {
            let token = body["spec"]["token"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_string();
            // The audiences asked about (the API server's own when none), and those of them
            // the token was meant for.
            let asked: Vec<String> = body["spec"]["audiences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            let mut asked: Vec<&str> = asked.iter().map(String::as_str).collect();
            if asked.is_empty() {
                asked.push(super::token::ISSUER);
            }
            let who = match ctx.api.tokens.get(&token) {
                // Static tokens are the API server's own.
                Some(u) if asked.contains(&super::token::ISSUER) => {
                    Some((u.clone(), vec![super::token::ISSUER.to_string()]))
                }
                Some(_) => None,
                None if super::token::looks_like_jwt(&token) => {
                    super::token::authenticate_for(ctx.api, &token, &asked).await
                }
                None => None,
            };
            body["status"] = match who {
                Some((mut u, audiences)) => {
                    u.groups.push("system:authenticated".into());
                    json!({"authenticated": true, "audiences": audiences,
                           "user": {"username": u.name, "uid": u.uid, "groups": u.groups}})
                }
                None => json!({"authenticated": false, "error": "token not valid"}),
            };
        }
        "SubjectAccessReview" | "LocalSubjectAccessReview" => {
            let spec = &body["spec"];
            let subject = User {
                name: spec["user"].as_str().unwrap_or("").into(),
                uid: spec["uid"].as_str().unwrap_or("").into(),
                groups: spec["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str().map(String::from))
                    .collect(),
            };
            if subject.name.is_empty() && subject.groups.is_empty() {
                return Err(ApiError::Invalid {
                    group: ctx.res.group.into(),
                    kind: ctx.res.kind.into(),
                    name: String::new(),
                    causes: vec![Cause::invalid(
                        "spec.user",
                        "",
                        "at least one of user or group must be specified",
                    )],
                });
            }
            let mut attrs = review_attrs(spec);
            if ctx.res.kind == "LocalSubjectAccessReview" {
                // Only about the namespace of the request.
                attrs.namespace = ctx.ns.clone().unwrap_or_default();
                if attrs.path.is_some() {
                    return Err(ApiError::BadRequest(
                        "a LocalSubjectAccessReview may not ask about a non-resource path".into(),
                    ));
                }
            }
            let allowed = subject.is_master() || policy.allows(&subject, &attrs);
            body["status"] = if allowed {
                json!({"allowed": true, "reason": "allowed by RBAC"})
            } else {
                json!({"allowed": false})
            };
        }
        "SelfSubjectAccessReview" => {
            let attrs = review_attrs(&body["spec"]);
            let allowed = policy.allows(user, &attrs);
            body["status"] = if allowed {
                json!({"allowed": true, "reason": "allowed by RBAC"})
            } else {
                json!({"allowed": false})
            };
        }
        "SelfSubjectRulesReview" => {
            let ns = body["spec"]["namespace"].as_str().unwrap_or("").to_string();
            let mut rules = policy.rules_for(user, &ns);
            if user.is_master() && rules.is_empty() {
                rules.push(json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}));
            }
            let (mut res_rules, mut non) = (Vec::new(), Vec::new());
            for r in rules {
                if r.get("nonResourceURLs")
                    .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
                {
                    non.push(json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}));
                } else {
                    let mut o = json!({"verbs": r["verbs"], "apiGroups": r["apiGroups"], "resources": r["resources"]});
                    if r["resourceNames"].is_array() {
                        o["resourceNames"] = r["resourceNames"].clone();
                    }
                    res_rules.push(o);
                }
            }
            body["status"] =
                json!({"resourceRules": res_rules, "nonResourceRules": non, "incomplete": false});
        }
        _ => {
            body["status"] = json!({"userInfo": {"username": user.name, "uid": user.uid, "groups": user.groups}});
        }
    }
    meta(&mut body).insert("creationTimestamp".into(), Value::Null);
    Ok(respond(StatusCode::CREATED, &body))
}

/// The request an access review asks about.
fn review_attrs(spec: &Value) -> Attrs {
    if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        let s = |k: &str| ra[k].as_str().unwrap_or("").to_string();
        Attrs {
            verb: s("verb"),
            group: s("group"),
            resource: s("resource"),
            subresource: s("subresource"),
            namespace: s("namespace"),
            name: s("name"),
            path: None,
        }
    } else {
        let na = &spec["nonResourceAttributes"];
        Attrs {
            verb: na["verb"].as_str().unwrap_or("").into(),
            group: String::new(),
            resource: String::new(),
            subresource: String::new(),
            namespace: String::new(),
            name: String::new(),
            path: Some(na["path"].as_str().unwrap_or("").into()),
        }
    }
}

fn system_ctx<'a>(api: &'a Arc<Api>, res: &'static Resource, ns: Option<String>) -> Ctx<'a> {
    Ctx {
        api,
        user: User {
            name: "system:apiserver".into(),
            uid: String::new(),
            groups: vec!["system:masters".into()],
        },
        res,
        version: res.version,
        ns,
        q: Query::default(),
        manager: "kube-apiserver".into(),
        dry_run: false,
        hooks: true,
    }
}

/// Create the objects every cluster starts with (idempotent; runs on every start).
/// A bootstrap ClusterRole stored by an earlier version, given this version's rules unless
/// its `rbac.authorization.kubernetes.io/autoupdate` annotation says `false` (how an
/// administrator keeps a changed one). Unlike kube-apiserver, which only adds, the rules are
/// replaced: a version that narrows a role (admin and edit no longer write quotas) must
/// narrow it on clusters made before too.
async fn update_role(ctx: &Ctx<'_>, want: &Value) -> Result<(), ApiError> {
    let name = name_of(want).to_string();
    let stored = from_kv(&get_kv(ctx, &name).await?)?;
    let keep =
        stored["metadata"]["annotations"]["rbac.authorization.kubernetes.io/autoupdate"] == "false";
    // An aggregated role's rules are the aggregation controller's: only its rule is ours.
    let same = if want["aggregationRule"].is_object() {
        stored["aggregationRule"] == want["aggregationRule"]
    } else {
        stored["rules"] == want["rules"]
    };
    let labels = want["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let labelled = labels
        .iter()
        .all(|(k, v)| stored["metadata"]["labels"][k] == *v);
    if keep || (same && labelled) {
        return Ok(());
    }
    tracing::info!(role = %name, "bootstrap ClusterRole updated to this version's rules");
    update_with(ctx, &name, None, false, |old| {
        let mut new = old.clone();
        if !same {
            new["rules"] = want["rules"].clone();
            match want.get("aggregationRule") {
                Some(a) => new["aggregationRule"] = a.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("aggregationRule");
                    }
                }
            }
        }
        for (k, v) in &labels {
            new["metadata"]["labels"][k] = v.clone();
        }
        Ok((new, true))
    })
    .await
    .map(|_| ())
}

pub async fn bootstrap(api: &Arc<Api>) -> Result<(), ApiError> {
    for (group, kind, o) in auth::bootstrap_objects() {
        let r = resources::by_kind(group, kind).ok_or_else(|| internal(kind))?;
        let ctx = system_ctx(api, r, None);
        match create(&ctx, o.clone()).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { .. }) if kind == "ClusterRole" => {
                update_role(&ctx, &o).await?;
            }
            Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // Namespaces made before the CA's ConfigMap was published (or that lost it) get it now.
    let nss = resources::find("", "v1", "namespaces").ok_or_else(|| internal("namespaces"))?;
    let listed = api
        .store
        .range(&nss.prefix(None), None, 0, Consistency::Linearizable)
        .await?;
    for kv in &listed.kvs {
        if let Some(ns) = kv.key.rsplit('/').next() {
            publish_root_ca(api, ns).await;
        }
    }
    // The `kubernetes` service holds the first address of the service network.
    let svc = resources::find("", "v1", "services").ok_or_else(|| internal("services"))?;
    let ip = Ipv4Addr::from(u32::from(api.service_net.0) + 1).to_string();
    let ctx = system_ctx(api, svc, Some("default".into()));
    let o = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": ip, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}});
    match create(&ctx, o).await {
        Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    publish_api_endpoint(api).await;
    // Cluster DNS: every node's netd answers on the tenth address (as kubeadm's kube-dns is);
    // the Service holds the address and shows it, and has no pods behind it.
    let ip = Ipv4Addr::from(u32::from(api.service_net.0) + 10).to_string();
    let ctx = system_ctx(api, svc, Some("kube-system".into()));
    let o = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
        "spec": {"clusterIP": ip, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}});
    match create(&ctx, o).await {
        Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_node_ports_follow_its_type_through_updates() {
        let key = |n: u64| format!("/registry/ranges/servicenodeports/{n}");
        let svc = |ty: &str, ports: Value| json!({"metadata": {"name": "web"}, "spec": {"type": ty, "ports": ports}});
        let plain = svc("ClusterIP", json!([{"port": 80, "protocol": "TCP"}]));
        // Made a LoadBalancer: its port is given a node port, reserved.
        let mut lb = svc("LoadBalancer", json!([{"port": 80, "protocol": "TCP"}]));
        let r = node_port_ops(&plain, &mut lb).unwrap();
        let n = lb["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=32767).contains(&n));
        assert!(matches!(&r.ops[..], [Op::Put { key: k, .. }] if *k == key(n)));
        assert!(r.chosen.is_empty());
        // Unchanged, nothing more; a port the client chose is reserved as its choice.
        let mut same = lb.clone();
        assert!(node_port_ops(&lb, &mut same).unwrap().ops.is_empty());
        let mut chosen = svc(
            "NodePort",
            json!([{"port": 80, "protocol": "TCP", "nodePort": 30111}]),
        );
        let r = node_port_ops(&lb, &mut chosen).unwrap();
        assert_eq!(r.chosen, [(0, 30111)]);
        assert!(matches!(&r.ops[1], Op::Delete { key: k, .. } if *k == key(n)));
        // Back to ClusterIP, keep_allocated has dropped the node port: it is released.
        let mut back = plain.clone();
        keep_allocated(&lb, &mut back);
        let r = node_port_ops(&lb, &mut back).unwrap();
        assert!(matches!(&r.ops[..], [Op::Delete { key: k, .. }] if *k == key(n)));
        // A node port the client sets on a ClusterIP is refused.
        let mut bad = svc(
            "ClusterIP",
            json!([{"port": 80, "protocol": "TCP", "nodePort": 30112}]),
        );
        assert!(matches!(
            node_port_ops(&plain, &mut bad),
            Err(ApiError::Invalid { .. })
        ));
        // A balancer that asks for none gets none.
        let mut bare = svc("LoadBalancer", json!([{"port": 80, "protocol": "TCP"}]));
        bare["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
        assert!(node_port_ops(&plain, &mut bare).unwrap().ops.is_empty());
    }

    #[test]
    fn same_as_keeps_only_its_own_members() {
        let old = json!({"spec": {"a": 1}, "status": {"phase": "Pending"}, "gone": true,
            "metadata": {"name": "p", "labels": {"x": "1"}, "uid": "u"}});
        let mut new = json!({"spec": {"a": 2}, "status": {"phase": "Running"}, "extra": 1,
            "metadata": {"name": "p", "labels": {"x": "2"}, "uid": "v", "finalizers": ["f"]}});
        same_as(&mut new, &old, &["status", "metadata"]);
        same_as(
            child_of(&mut new, "metadata"),
            &old["metadata"],
            &["labels"],
        );
        assert_eq!(
            new,
            json!({"spec": {"a": 1}, "status": {"phase": "Running"}, "gone": true,
                "metadata": {"name": "p", "labels": {"x": "2"}, "uid": "u"}})
        );
    }

    #[test]
    fn stored_without_resource_version() {
        let o = json!({"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "4",
            "selfLink": "/x", "labels": {"resourceVersion": "l"}}, "spec": {"selfLink": 1}});
        let back: Value = serde_json::from_slice(&to_stored(&o)).unwrap();
        assert_eq!(
            back,
            json!({"kind": "Pod", "metadata": {"name": "p", "labels": {"resourceVersion": "l"}},
                   "spec": {"selfLink": 1}})
        );
        assert_eq!(to_stored(&json!([1])), b"[1]");
    }

    #[test]
    fn selected_watch_lines_spliced_as_decoded() {
        let kv = |node: &str, app: &str, rev: u64| KeyValue {
            key: "/registry/core/pods/default/p".into(),
            value: serde_json::to_vec(&json!({"kind": "Pod", "metadata": {"name": "p",
                "labels": {"app": app}, "managedFields": [{"manager": "m"}]},
                "spec": {"nodeName": node}, "status": {"phase": "Running"}}))
            .unwrap(),
            create_revision: 2,
            mod_revision: rev,
            version: 1,
        };
        let (a, b, c) = (kv("n1", "web", 5), kv("n2", "web", 6), kv("n1", "db", 7));
        let labels = Labels::parse("app=web").unwrap();
        let fields = Fields::parse("Pod", "spec.nodeName=n1").unwrap();
        let parts = ["spec.nodeName", "metadata.labels"];
        let cases: [(EventKind, &KeyValue, Option<&KeyValue>); 7] = [
            (EventKind::Put, &a, None),
            (EventKind::Put, &a, Some(&a)),
            (EventKind::Put, &b, Some(&a)),
            (EventKind::Put, &a, Some(&b)),
            (EventKind::Put, &c, Some(&a)),
            (EventKind::Delete, &a, Some(&a)),
            (EventKind::Delete, &b, Some(&b)),
        ];
        for (kind, kv, prev) in cases {
            let decoded =
                event(&kind, kv, prev, 9, &labels, &fields).map(|(t, o)| watch_line(t, o));
            let spliced = event_type(&kind, kv, prev, &parts, &labels, &fields)
                .and_then(|t| raw_line(&kind, kv, prev, 9, Some(t)));
            let as_json =
                |b: Option<Bytes>| b.map(|b| serde_json::from_slice::<Value>(&b).unwrap());
            assert_eq!(
                as_json(spliced),
                as_json(decoded),
                "{kind:?} {}",
                kv.mod_revision
            );
        }
    }

    #[test]
    fn a_pod_update_changes_only_what_kubernetes_lets_it() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "a", "env": [{"name": "X", "value": "1"}]}],
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "activeDeadlineSeconds": 60}});
        let with = |f: &dyn Fn(&mut Value)| {
            let mut p = pod.clone();
            f(&mut p);
            p
        };
        for ok in [
            with(&|p| p["spec"]["containers"][0]["image"] = json!("b")),
            with(&|p| p["spec"]["activeDeadlineSeconds"] = json!(30)),
            with(&|p| {
                p["spec"]["tolerations"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"key": "z", "operator": "Exists"}))
            }),
            with(&|p| p["metadata"]["labels"] = json!({"a": "b"})),
        ] {
            assert!(pod_spec_update(&pod, &ok).is_ok(), "{ok}");
        }
        for (bad, field) in [
            (
                with(&|p| p["spec"]["containers"][0]["env"][0]["value"] = json!("2")),
                "spec.containers",
            ),
            (
                with(&|p| p["spec"]["activeDeadlineSeconds"] = json!(120)),
                "spec.activeDeadlineSeconds",
            ),
            (
                with(&|p| p["spec"]["tolerations"] = json!([])),
                "spec.tolerations",
            ),
            (
                with(&|p| p["spec"]["nodeName"] = json!("elsewhere")),
                "spec.nodeName",
            ),
            (
                with(&|p| p["spec"]["ephemeralContainers"] = json!([{"name": "d", "image": "x"}])),
                "spec.ephemeralContainers",
            ),
        ] {
            let Err(ApiError::Invalid { causes, .. }) = pod_spec_update(&pod, &bad) else {
                panic!("accepted: {bad}");
            };
            assert_eq!(causes[0].field, "spec");
            assert!(causes[0].message.contains(field), "{}", causes[0].message);
        }
    }

    #[test]
    fn ephemeral_containers_only_grow() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "main", "image": "i"}],
            "ephemeralContainers": [{"name": "dbg", "image": "busybox"}]}});
        let had = pod["spec"]["ephemeralContainers"].clone();
        let more = json!([{"name": "dbg", "image": "busybox"}, {"name": "dbg2", "image": "b"}]);
        assert!(ephemeral(&pod, &had).is_ok());
        assert!(ephemeral(&pod, &more).is_ok());
        let fields = |r: Result<(), ApiError>| match r {
            Err(ApiError::Invalid { causes, .. }) => {
                causes.into_iter().map(|c| c.field).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            fields(ephemeral(&pod, &json!([]))),
            ["spec.ephemeralContainers"]
        );
        assert_eq!(
            fields(ephemeral(&pod, &json!([{"name": "dbg", "image": "other"}]))),
            ["spec.ephemeralContainers[0]"]
        );
        let bad = json!([{"name": "dbg", "image": "busybox"},
            {"name": "main", "image": "b", "ports": [{"containerPort": 80}]},
            {"name": "x"}]);
        assert_eq!(
            fields(ephemeral(&pod, &bad)),
            [
                "spec.ephemeralContainers[1].name",
                "spec.ephemeralContainers[1].ports",
                "spec.ephemeralContainers[2].image"
            ]
        );
    }

    #[test]
    fn generations_count_changes_outside_metadata_and_status() {
        let a = json!({"metadata": {"name": "a"}, "spec": {"x": 1}, "status": {"p": 1}});
        let b = json!({"metadata": {"name": "b"}, "spec": {"x": 1}, "status": {"p": 2}});
        assert!(same_spec(&a, &b));
        assert!(!same_spec(&a, &json!({"metadata": {}, "spec": {"x": 2}})));
        assert!(!same_spec(&a, &json!({"spec": {"x": 1}, "data": {}})));
        assert!(!same_spec(&json!({"spec": {"x": 1}, "data": {}}), &a));
        assert!(same_spec(&json!({"spec": {"x": 1}}), &a));
    }

    #[test]
    fn times_round_trip_and_saturate() {
        let t = rfc3339(1_767_225_600);
        assert_eq!(t, "2026-01-01T00:00:00Z");
        assert_eq!(seconds(&json!(t)), Some(1_767_225_600));
        assert_eq!(seconds(&json!("yesterday")), None);
        assert_eq!(seconds(&Value::Null), None);
        assert_eq!(rfc3339(i64::MAX), "9999-12-30T22:00:00Z");
        assert_eq!(rfc3339(i64::MIN), "-9999-01-02T01:59:59Z");
    }
}
