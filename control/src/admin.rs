//! A small JSON-over-HTTP interface to one store member, for operators and tests until the
//! Kubernetes API stands on the store. It listens on loopback by default and has no
//! authentication of its own: do not expose it.
//!
//! ```text
//! POST /v1/put      {"key","value","create"?,"mod_revision"?}   → {"revision"} | 409
//! POST /v1/delete   {"key","mod_revision"?}                     → {"revision"} | 409
//! GET  /v1/get?key=K[&serializable=true]                        → {"kv"} | 404
//! GET  /v1/range?prefix=P[&after=K&limit=N&serializable=true]   → {"kvs","more","revision"}
//! GET  /v1/watch?prefix=P&after=R                                → NDJSON events
//! POST /v1/compact  {"revision"}     POST /v1/snapshot
//! GET  /v1/status   GET /v1/hash     POST /v1/members {"id","addr"}   DELETE /v1/members/{id}
//! ```

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use outpost_api::store::{Command, Expect, KeyValue, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{Consistency, Error, Store, WatchItem};

/// A store error as an HTTP answer; the one place errors become status codes.
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::Compacted { .. } => StatusCode::GONE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, Json(json!({"error": self.0.to_string()}))).into_response()
    }
}

#[derive(Serialize)]
struct Kv {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

impl From<&KeyValue> for Kv {
    fn from(kv: &KeyValue) -> Self {
        Kv {
            key: kv.key.clone(),
            value: String::from_utf8_lossy(&kv.value).into_owned(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

fn expect(create: bool, mod_revision: Option<u64>) -> Expect {
    match (create, mod_revision) {
        (true, _) => Expect::Absent,
        (false, Some(r)) => Expect::ModRevision(r),
        (false, None) => Expect::Any,
    }
}

fn outcome(o: Outcome) -> Response {
    match o {
        Outcome::Committed { revision, .. } => Json(json!({"revision": revision})).into_response(),
        Outcome::Failed { current, revision, .. } => (
            StatusCode::CONFLICT,
            Json(json!({"error": "precondition failed", "revision": revision, "current": current.as_ref().map(Kv::from)})),
        )
            .into_response(),
        Outcome::Compacted { compacted, revision } => Json(json!({"compacted": compacted, "revision": revision})).into_response(),
        Outcome::None | Outcome::Batch(_) => Json(json!({})).into_response(),
    }
}

#[derive(Deserialize)]
struct PutReq {
    key: String,
    value: String,
    #[serde(default)]
    create: bool,
    mod_revision: Option<u64>,
}

async fn put(State(s): State<Store>, Json(r): Json<PutReq>) -> Result<Response, ApiError> {
    Ok(outcome(
        s.put(
            &r.key,
            r.value.into_bytes(),
            expect(r.create, r.mod_revision),
        )
        .await?,
    ))
}

#[derive(Deserialize)]
struct DeleteReq {
    key: String,
    mod_revision: Option<u64>,
}

async fn del(State(s): State<Store>, Json(r): Json<DeleteReq>) -> Result<Response, ApiError> {
    Ok(outcome(
        s.delete(&r.key, expect(false, r.mod_revision)).await?,
    ))
}

fn consistency(serializable: Option<bool>) -> Consistency {
    if serializable.unwrap_or(false) {
        Consistency::Serializable
    } else {
        Consistency::Linearizable
    }
}

#[derive(Deserialize)]
struct GetQ {
    key: String,
    serializable: Option<bool>,
}

async fn get_key(State(s): State<Store>, Query(q): Query<GetQ>) -> Result<Response, ApiError> {
    Ok(match s.get(&q.key, consistency(q.serializable)).await? {
        Some(kv) => Json(json!({"kv": Kv::from(&kv)})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("{} not found", q.key)})),
        )
            .into_response(),
    })
}

#[derive(Deserialize)]
struct RangeQ {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    #[serde(default)]
    limit: usize,
    serializable: Option<bool>,
}

async fn range(State(s): State<Store>, Query(q): Query<RangeQ>) -> Result<Response, ApiError> {
    let r = s
        .range(
            &q.prefix,
            q.after.as_deref(),
            q.limit,
            consistency(q.serializable),
        )
        .await?;
    let kvs: Vec<Kv> = r.kvs.iter().map(Kv::from).collect();
    Ok(Json(json!({"kvs": kvs, "more": r.more, "revision": r.revision})).into_response())
}

#[derive(Deserialize)]
struct WatchQ {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: u64,
}

async fn watch(State(s): State<Store>, Query(q): Query<WatchQ>) -> Result<Response, ApiError> {
    let mut w = s.watch(&q.prefix, q.after).await?;
    let stream = async_stream(move |tx| async move {
        while let Some(item) = w.next().await {
            let line = match item {
                WatchItem::Revision(r) => {
                    let events: Vec<_> = r
                        .events
                        .iter()
                        .map(|e| json!({"kind": format!("{:?}", e.kind), "kv": Kv::from(&e.kv)}))
                        .collect();
                    json!({"revision": r.revision, "events": events})
                }
                WatchItem::Progress(p) => json!({"progress": p}),
            };
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(format!("{}\n", json!({"end": w.last()})).into_bytes()))
            .await;
    });
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| Error::Invalid(e.to_string()))?)
}

/// A body stream fed by a task; the task stops when the client goes away.
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Vec<u8>, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Deserialize)]
struct CompactReq {
    revision: u64,
}

async fn compact(State(s): State<Store>, Json(r): Json<CompactReq>) -> Result<Response, ApiError> {
    Ok(outcome(
        s.write(Command::Compact {
            revision: r.revision,
        })
        .await?,
    ))
}

async fn status(State(s): State<Store>) -> Json<crate::store::Status> {
    Json(s.status())
}

async fn hash(State(s): State<Store>) -> Result<Response, ApiError> {
    let (revision, hash) = s.hash().await?;
    Ok(Json(json!({"revision": revision, "hash": hash})).into_response())
}

#[derive(Deserialize)]
struct MemberReq {
    id: u64,
    addr: String,
}

async fn add_member(
    State(s): State<Store>,
    Json(r): Json<MemberReq>,
) -> Result<Response, ApiError> {
    s.add_member(r.id, r.addr).await?;
    Ok(Json(s.status()).into_response())
}

async fn remove_member(State(s): State<Store>, Path(id): Path<u64>) -> Result<Response, ApiError> {
    s.remove_member(id).await?;
    // Its API no longer serves the cluster: the `kubernetes` Service stops leading there.
    crate::api::reconcile_api_endpoints(&s, None).await;
    Ok(Json(s.status()).into_response())
}

async fn snapshot(State(s): State<Store>) -> Result<Response, ApiError> {
    s.snapshot().await?;
    Ok(Json(json!({})).into_response())
}

/// The admin interface of one member.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/v1/put", post(put))
        .route("/v1/delete", post(del))
        .route("/v1/get", get(get_key))
        .route("/v1/range", get(range))
        .route("/v1/watch", get(watch))
        .route("/v1/compact", post(compact))
        .route("/v1/snapshot", post(snapshot))
        .route("/v1/status", get(status))
        .route("/v1/hash", get(hash))
        .route("/v1/members", post(add_member))
        .route("/v1/members/{id}", delete(remove_member))
        .with_state(store)
}
