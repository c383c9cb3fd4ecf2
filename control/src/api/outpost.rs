//! Outpost's own endpoints beside the Kubernetes API, under `/outpost/v1`:
//!
//! ```text
//! POST /outpost/v1/tokens?ttl=SECONDS&uses=N    a bootstrap token for nodes (admins)
//! POST /outpost/v1/modules?name=NAME            store a Wasm module; answers its digest
//! GET  /outpost/v1/modules/sha256:HEX           the module's bytes (nodes and admins)
//! GET  /outpost/v1/names/NAME                   the digest NAME points at
//! POST /outpost/v1/aot?module=sha256:HEX&arch=A  the module compiled for arch A (nodes and
//!                                                admins; CBOR `Artifact`); the body is the
//!                                                module when the store does not hold it
//! ```
//!
//! Modules live in the replicated store in 1 MiB chunks, so every member holds them and an
//! air-gapped fleet needs no registry. A pod names one with the image `module:sha256:HEX`, or
//! `module:NAME` for the latest push under that name (resolved by the node, as a tag is).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_api::store::{Expect, Op, Outcome};
use serde_json::{json, Value};

use super::{json_response, Api, ApiError, Query};
use crate::sha256_hex;
use crate::store::Consistency;

/// Largest module the store takes.
pub const MAX_MODULE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
const MODULES: &str = "/outpost/modules/";
const CHUNKS: &str = "/outpost/module-chunks/";
const NAMES: &str = "/outpost/module-names/";

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with("sha256")
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// The image reference of a stored module.
pub fn reference(hex: &str) -> String {
    format!("module:sha256:{hex}")
}

pub(super) async fn serve(
    api: &Api,
    method: &Method,
    rest: &[&str],
    q: &Query,
    body: Body,
) -> Result<Response, ApiError> {
    match (method, rest) {
        // Member tokens buy the CA keys: a path of their own, so RBAC can grant node tokens
        // (`/outpost/v1/tokens`) without them.
        (&Method::POST, ["tokens"] | ["tokens", "member"]) => {
            let num = |k: &str, default: u64| -> Result<u64, ApiError> {
                q.get(k).map_or(Ok(default), |v| {
                    v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        ApiError::BadRequest(format!("{k} must be a positive number, got {v:?}"))
                    })
                })
            };
            let ttl = Duration::from_secs(num("ttl", 86_400)?);
            let uses = u32::try_from(num("uses", 1)?)
                .map_err(|_| ApiError::BadRequest("uses is too large".into()))?;
            let member = rest.len() == 2;
            let kind = if member {
                crate::gateway::Kind::Member
            } else {
                crate::gateway::Kind::Node
            };
            let token = crate::gateway::create_token(api, ttl, uses, kind)
                .await
                .map_err(ApiError::Internal)?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"token": token, "ttlSeconds": ttl.as_secs(), "uses": uses,
                    "kind": if member { "member" } else { "node" }}),
                "application/json",
            ))
        }
        (&Method::POST, ["modules"]) => {
            let bytes = axum::body::to_bytes(body, MAX_MODULE)
                .await
                .map_err(|_| ApiError::TooLarge(MAX_MODULE))?;
            let name = q.get("name").filter(|n| !n.is_empty());
            if let Some(n) = name.filter(|n| !valid_name(n)) {
                return Err(ApiError::BadRequest(format!(
                    "{n:?} is not a module name: lowercase letters, digits, '-', '_' and '.', not starting with sha256"
                )));
            }
            let hex = put_module(api, &bytes).await?;
            if let Some(n) = name {
                api.store
                    .put(
                        &format!("{NAMES}{n}"),
                        hex.clone().into_bytes(),
                        Expect::Any,
                    )
                    .await?;
            }
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"digest": format!("sha256:{hex}"), "size": bytes.len(), "image": reference(&hex),
                        "name": name.map(|n| format!("module:{n}"))}),
                "application/json",
            ))
        }
        (&Method::GET, ["modules", digest]) => {
            let hex = digest_hex(digest)?;
            let bytes = get_module(api, hex).await?;
            let mut r = (StatusCode::OK, bytes).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/wasm"),
            );
            Ok(r)
        }
        (&Method::POST, ["aot"]) => {
            let arch = q.get("arch").unwrap_or("");
            if !outpost_wasm_runtime::ARCHES.contains(&arch) {
                return Err(ApiError::BadRequest(format!(
                    "arch {arch:?} is not one Outpost compiles for ({})",
                    outpost_wasm_runtime::ARCHES.join(", ")
                )));
            }
            let digest = q.get("module").unwrap_or("");
            let hex = digest_hex(digest)?.to_string();
            let sent = axum::body::to_bytes(body, MAX_MODULE)
                .await
                .map_err(|_| ApiError::TooLarge(MAX_MODULE))?;
            let wasm = async {
                if sent.is_empty() {
                    get_module(api, &hex).await.map_err(|e| match e {
                        ApiError::NotFound { .. } => crate::aot::AotError::Invalid(format!(
                            "module sha256:{hex} is not in the store; send its bytes"
                        )),
                        e => crate::aot::AotError::Internal(e.to_string()),
                    })
                } else {
                    Ok(sent.to_vec())
                }
            };
            let art = api
                .aot
                .artifact(&hex, arch, wasm)
                .await
                .map_err(|e| match e {
                    crate::aot::AotError::Invalid(m) => ApiError::BadRequest(m),
                    crate::aot::AotError::Internal(m) => ApiError::Internal(m),
                })?;
            let mut out = Vec::with_capacity(art.code.len() + 256);
            ciborium::into_writer(&art, &mut out).map_err(|e| ApiError::Internal(e.to_string()))?;
            let mut r = (StatusCode::OK, out).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/cbor"),
            );
            Ok(r)
        }
        (&Method::GET, ["names", name]) => {
            let kv = api
                .store
                .get(&format!("{NAMES}{name}"), Consistency::Serializable)
                .await?
                .ok_or_else(|| ApiError::not_found("modules", &format!("module:{name}")))?;
            let hex = String::from_utf8_lossy(&kv.value).into_owned();
            Ok(json_response(
                StatusCode::OK,
                &json!({"digest": format!("sha256:{hex}"), "image": reference(&hex)}),
                "application/json",
            ))
        }
        _ => Err(ApiError::NoRoute(
            "the server could not find the requested resource".into(),
        )),
    }
}

fn digest_hex(digest: &str) -> Result<&str, ApiError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{digest:?} is not a digest (sha256:<64 hex digits>)"
            ))
        })
}

async fn put_module(api: &Api, bytes: &Bytes) -> Result<String, ApiError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(ApiError::BadRequest(
            "not a Wasm module or component: it does not start with the Wasm magic number".into(),
        ));
    }
    let hex = sha256_hex(bytes);
    let key = format!("{MODULES}{hex}");
    if api
        .store
        .get(&key, Consistency::Linearizable)
        .await?
        .is_some()
    {
        return Ok(hex);
    }
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
    for (i, c) in chunks.iter().enumerate() {
        api.store
            .txn(vec![Op::Put {
                key: format!("{CHUNKS}{hex}/{i:06}"),
                value: c.to_vec(),
                expect: Expect::Any,
            }])
            .await?;
    }
    // The record goes last: a module is visible only once all of it is stored.
    let record = json!({"size": bytes.len(), "chunks": chunks.len()});
    match api
        .store
        .put(&key, record.to_string().into_bytes(), Expect::Any)
        .await?
    {
        Outcome::Committed { .. } => Ok(hex),
        other => Err(ApiError::Internal(format!("storing the module: {other:?}"))),
    }
}

async fn get_module(api: &Api, hex: &str) -> Result<Vec<u8>, ApiError> {
    let nf = || ApiError::not_found("modules", &format!("sha256:{hex}"));
    let kv = api
        .store
        .get(&format!("{MODULES}{hex}"), Consistency::Serializable)
        .await?
        .ok_or_else(nf)?;
    let rec: Value =
        serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(e.to_string()))?;
    let size = rec["size"].as_u64().unwrap_or(0) as usize;
    let page = api
        .store
        .range(
            &format!("{CHUNKS}{hex}/"),
            None,
            0,
            Consistency::Serializable,
        )
        .await?;
    let mut out = Vec::with_capacity(size);
    for kv in page.kvs {
        out.extend_from_slice(&kv.value);
    }
    if out.len() != size || sha256_hex(&out) != hex {
        return Err(ApiError::Internal(format!(
            "module sha256:{hex} is incomplete in the store ({} of {size} bytes)",
            out.len()
        )));
    }
    Ok(out)
}
