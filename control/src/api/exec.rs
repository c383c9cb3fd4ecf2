//! `kubectl exec`: the client's WebSocket (the channel protocol, v5 or v4) turned into one
//! node-link stream ([`Down::Exec`]) to the pod's node, which runs the command in the
//! container.
//!
//! ```text
//! client ── binary messages, first byte the channel ──▶ API ── ExecFrame ──▶ node
//!   0 stdin, 255 [0] end of stdin (v5), 4 resize        Stdin, StdinEnd
//!   ◀── 1 stdout, 2 stderr, 3 the ending Status ─────── Stdout, Stderr, Exit
//! ```
//!
//! kubectl 1.30+ and the Python client speak this. Older kubectl only speaks SPDY, which is
//! refused with a message saying so.

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use outpost_api::link::{read_frame, write_frame, Down, ExecFrame, ExecRequest, MAX_FRAME};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::forward::accept_websocket;
use super::{Api, ApiError, Query};

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Check the request, answer the upgrade, and serve the session once hyper hands it over.
pub(super) fn serve(
    api: &Arc<Api>,
    pod: &Value,
    headers: &HeaderMap,
    q: &Query,
    upgrade: Option<OnUpgrade>,
) -> Result<Response, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => containers
            .first()
            .and_then(|c| c["name"].as_str())
            .unwrap_or("")
            .to_string(),
    };
    let Some(spec) = containers.iter().find(|c| c["name"] == container.as_str()) else {
        return Err(ApiError::BadRequest(format!(
            "container {container} is not valid for pod {name}"
        )));
    };
    if pod["spec"]["runtimeClassName"] == "wasm"
        || spec["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("module:"))
    {
        return Err(ApiError::BadRequest(format!(
            "container {container} of pod {name} runs on the Wasm runtime: a Wasm guest has no shell or other process to exec into; use kubectl logs to see its output"
        )));
    }
    let command: Vec<String> = q.all("command").into_iter().map(String::from).collect();
    if command.is_empty() {
        return Err(ApiError::BadRequest(
            "you must specify at least one command for the container".into(),
        ));
    }
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let phase = pod["status"]["phase"].as_str().unwrap_or("");
    if phase == "Succeeded" || phase == "Failed" {
        return Err(ApiError::BadRequest(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    let upgrade_to = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if upgrade_to != "websocket" {
        return Err(ApiError::BadRequest(format!(
            "exec is served over WebSocket ({}, kubectl 1.30 and later); this request asked for {:?}",
            PROTOCOLS.join(" or "),
            upgrade_to
        )));
    }
    let upgrade = upgrade.ok_or_else(|| {
        ApiError::BadRequest("exec needs an HTTP/1.1 connection that can be upgraded".into())
    })?;
    let mut reply = Response::new(axum::body::Body::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    accept_websocket(headers, reply.headers_mut(), &PROTOCOLS, "exec")?;
    let req = ExecRequest {
        namespace: pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        pod: name.to_string(),
        container,
        command,
        stdin: q.flag("stdin"),
        tty: q.flag("tty"),
    };
    let api = api.clone();
    tokio::spawn(async move {
        let io = match upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "exec upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        session(&api, &node, req, ws).await;
    });
    Ok(reply)
}

/// The Status that ends a session on channel 3, as the kubelet writes it.
fn status(code: i32, error: Option<String>) -> Value {
    match (code, error) {
        (_, Some(e)) => json!({"metadata": {}, "status": "Failure", "message": e,
            "reason": "InternalError", "code": 500}),
        (0, None) => json!({"metadata": {}, "status": "Success"}),
        (c, None) => json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}}),
    }
}

fn framed(channel: u8, b: &[u8]) -> Message {
    let mut m = Vec::with_capacity(1 + b.len());
    m.push(channel);
    m.extend_from_slice(b);
    Message::binary(m)
}

async fn session<S>(api: &Api, node: &str, req: ExecRequest, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let what = format!("{}/{} container {}", req.namespace, req.pod, req.container);
    let ending = match api.links.open_duplex(node, &Down::Exec(req)).await {
        Ok((head, mut send, mut recv)) if head.status == 200 => {
            // Client input toward the node, until the client ends it or goes away.
            let input = async move {
                while let Some(Ok(m)) = stream.next().await {
                    let b = match m {
                        Message::Binary(b) => b.to_vec(),
                        Message::Text(t) => t.as_bytes().to_vec(),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    let f = match b.split_first() {
                        Some((0, rest)) if !rest.is_empty() => ExecFrame::Stdin(rest.to_vec()),
                        Some((255, [0])) => ExecFrame::StdinEnd,
                        _ => continue,
                    };
                    if write_frame(&mut send, &f, MAX_FRAME).await.is_err() {
                        return;
                    }
                }
                let _ = write_frame(&mut send, &ExecFrame::StdinEnd, MAX_FRAME).await;
                let _ = send.finish();
            };
            let input = tokio::spawn(input);
            let ending = loop {
                match read_frame::<_, ExecFrame>(&mut recv, MAX_FRAME).await {
                    Ok(ExecFrame::Stdout(b)) => {
                        if sink.send(framed(1, &b)).await.is_err() {
                            break None;
                        }
                    }
                    Ok(ExecFrame::Stderr(b)) => {
                        if sink.send(framed(2, &b)).await.is_err() {
                            break None;
                        }
                    }
                    Ok(ExecFrame::Exit { code, error }) => break Some(status(code, error)),
                    Ok(_) => {}
                    Err(e) => {
                        break Some(status(
                            0,
                            Some(format!("exec in {what}: the node's stream ended: {e}")),
                        ))
                    }
                }
            };
            input.abort();
            ending
        }
        Ok((head, _, mut recv)) => {
            let msg = recv.read_to_end(64 << 10).await.unwrap_or_default();
            let msg = String::from_utf8_lossy(&msg).trim().to_string();
            let mut s = status(0, Some(msg));
            if head.status == 400 || head.status == 404 {
                s["reason"] = json!("BadRequest");
                s["code"] = json!(400);
            }
            Some(s)
        }
        Err(e) => Some(status(0, Some(format!("exec in {what}: {e}")))),
    };
    if let Some(s) = ending {
        let _ = sink.send(framed(3, s.to_string().as_bytes())).await;
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
}
