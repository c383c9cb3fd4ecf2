//! `kubectl exec` and `kubectl attach`: the client's WebSocket (the channel protocol, v5 or
//! v4) turned into one node-link stream ([`Down::Exec`], [`Down::Attach`]) to the pod's node,
//! which runs the command in the container or joins the container's own input and output.
//!
//! ```text
//! client ── binary messages, first byte the channel ──▶ API ── ExecFrame ──▶ node
//!   0 stdin, 255 [0] end of stdin (v5), 4 resize        Stdin, StdinEnd
//!   ◀── 1 stdout, 2 stderr, 3 the ending Status ─────── Stdout, Stderr, Exit
//! ```
//!
//! kubectl 1.30+ and the Python client speak this. Older kubectl (and newer with
//! `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`) speaks SPDY/3.1 with the v4 protocol: one SPDY
//! stream per channel (`streamtype` error, stdin, stdout, stderr), the Status JSON on the
//! error stream at the end.

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use outpost_api::link::{read_frame, write_frame, Down, ExecFrame, ExecRequest, MAX_FRAME};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::forward::{accept_websocket, list, when_upgraded};
use super::spdy::{self, Frame};
use super::{Api, ApiError, Query};

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// The SPDY flavour: the newest one whose Status on the error stream carries exit codes.
const SPDY_PROTOCOL: &str = "v4.channel.k8s.io";
/// Bytes read from the client at a time.
const CHUNK: usize = 32 << 10;

/// Check the request, answer the upgrade, and serve the session once hyper hands it over:
/// an attach with `attach`, else an exec.
pub(super) fn serve(
    api: &Arc<Api>,
    pod: &Value,
    headers: &HeaderMap,
    q: &Query,
    upgrade: Option<OnUpgrade>,
    attach: bool,
) -> Result<Response, ApiError> {
    let what = if attach { "attach" } else { "exec" };
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let specs = |k: &str| pod["spec"][k].as_array().map_or(&[][..], Vec::as_slice);
    let containers = specs("containers");
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => containers
            .first()
            .and_then(|c| c["name"].as_str())
            .unwrap_or("")
            .to_string(),
    };
    // An ephemeral container (`kubectl debug`) is attached to and exec'd into as the others.
    let Some(spec) = containers
        .iter()
        .chain(specs("ephemeralContainers"))
        .find(|c| c["name"] == container.as_str())
    else {
        return Err(ApiError::BadRequest(format!(
            "container {container} is not valid for pod {name}"
        )));
    };
    // A Wasm guest's output can be followed; there is nothing in it to exec.
    if !attach
        && (pod["spec"]["runtimeClassName"] == "wasm"
            || spec["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("module:")))
    {
        return Err(ApiError::BadRequest(format!(
            "container {container} of pod {name} runs on the Wasm runtime: a Wasm guest has no shell or other process to exec into; use kubectl logs to see its output"
        )));
    }
    let command: Vec<String> = q.all("command").into_iter().map(String::from).collect();
    if command.is_empty() && !attach {
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
        return Err(ApiError::BadRequest(if attach {
            format!("cannot attach a container in a completed pod; current phase is {phase}")
        } else {
            format!("cannot exec into a container in a completed pod; current phase is {phase}")
        }));
    }
    let upgrade_to = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let upgrade = upgrade.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{what} needs an HTTP/1.1 connection that can be upgraded"
        ))
    })?;
    let mut reply = Response::new(axum::body::Body::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let websocket = match upgrade_to.as_str() {
        "websocket" => {
            accept_websocket(headers, reply.headers_mut(), &PROTOCOLS, what)?;
            true
        }
        "spdy/3.1" => {
            let offered = list(headers, "x-stream-protocol-version");
            if !offered.iter().any(|o| o == SPDY_PROTOCOL) {
                return Err(ApiError::Forbidden {
                    message: format!(
                        "unable to upgrade: no common {what} protocol: the client offered [{}], the server speaks [{SPDY_PROTOCOL}] over SPDY",
                        offered.join(", ")
                    ),
                });
            }
            let h = reply.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            h.insert(
                "x-stream-protocol-version",
                HeaderValue::from_static(SPDY_PROTOCOL),
            );
            false
        }
        _ => {
            return Err(ApiError::BadRequest(format!(
                "Upgrade request required: {what} is a WebSocket or SPDY/3.1 connection"
            )))
        }
    };
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
    let wants = Wants {
        stdin: req.stdin,
        stdout: q.flag("stdout"),
        stderr: !req.tty && q.flag("stderr"),
    };
    let req = if attach {
        Down::Attach(req)
    } else {
        Down::Exec(req)
    };
    let api = api.clone();
    when_upgraded(upgrade, what, move |io| async move {
        if websocket {
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            over_websocket(api, node, req, ws).await;
        } else {
            over_spdy(api, node, req, wants, io).await;
        }
    });
    Ok(reply)
}

/// Input from the client, whatever its protocol.
enum In {
    Stdin(Vec<u8>),
    StdinEnd,
    /// Its terminal's new size, columns and rows.
    Resize(u16, u16),
}

/// The terminal sizes in `b`, one JSON object (`{"Width": W, "Height": H}`) after another,
/// as kubectl sends them on the resize channel or stream; whatever else is skipped.
fn sizes(b: &[u8]) -> Vec<In> {
    serde_json::Deserializer::from_slice(b)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .filter_map(|v| {
            let dim = |k: &str| v[k].as_u64().and_then(|n| u16::try_from(n).ok());
            Some(In::Resize(dim("Width")?, dim("Height")?))
        })
        .collect()
}

/// The streams a SPDY client opens: error always, the others as the query asks.
#[derive(Debug, Clone, Copy)]
struct Wants {
    stdin: bool,
    stdout: bool,
    stderr: bool,
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

/// Run `down` (an exec or an attach) on `node`: the client's input from `input`, output to
/// `out` by channel (1 stdout, 2 stderr), and last the Status on channel 3.
async fn run(
    api: Arc<Api>,
    node: String,
    down: Down,
    mut input: mpsc::Receiver<In>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
) {
    let (req, verb) = match &down {
        Down::Attach(r) => (r, "attach to"),
        Down::Exec(r) => (r, "exec in"),
        _ => return,
    };
    let what = format!("{}/{} container {}", req.namespace, req.pod, req.container);
    // A terminal has one output stream, and a client that asked for one reads no other.
    let err_channel = if req.tty { 1 } else { 2 };
    let ending = match api.links.open_duplex(&node, &down).await {
        Ok((head, mut send, mut recv)) if head.status == 200 => {
            let feed = tokio::spawn(async move {
                while let Some(i) = input.recv().await {
                    let f = match i {
                        In::Stdin(b) => ExecFrame::Stdin(b),
                        In::StdinEnd => ExecFrame::StdinEnd,
                        In::Resize(width, height) => ExecFrame::Resize { width, height },
                    };
                    if write_frame(&mut send, &f, MAX_FRAME).await.is_err() {
                        return;
                    }
                }
                // The client is gone: no more input.
                let _ = write_frame(&mut send, &ExecFrame::StdinEnd, MAX_FRAME).await;
                let _ = send.finish();
            });
            let ending = loop {
                let (ch, b) = match read_frame::<_, ExecFrame>(&mut recv, MAX_FRAME).await {
                    Ok(ExecFrame::Stdout(b)) => (1, b),
                    Ok(ExecFrame::Stderr(b)) => (err_channel, b),
                    Ok(ExecFrame::Exit { code, error }) => break Some(status(code, error)),
                    Ok(_) => continue,
                    Err(e) => {
                        break Some(status(
                            0,
                            Some(format!("{verb} {what}: the node's stream ended: {e}")),
                        ))
                    }
                };
                if out.send((ch, b)).await.is_err() {
                    break None;
                }
            };
            feed.abort();
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
        Err(e) => Some(status(0, Some(format!("{verb} {what}: {e}")))),
    };
    if let Some(s) = ending {
        let _ = out.send((3, s.to_string().into_bytes())).await;
    }
}

fn framed(channel: u8, b: &[u8]) -> Message {
    let mut m = Vec::with_capacity(1 + b.len());
    m.push(channel);
    m.extend_from_slice(b);
    Message::binary(m)
}

async fn over_websocket<S>(api: Arc<Api>, node: String, req: Down, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            let b = match m {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            let is = match b.split_first() {
                Some((0, rest)) if !rest.is_empty() => vec![In::Stdin(rest.to_vec())],
                Some((255, [0])) => vec![In::StdinEnd],
                Some((4, rest)) => sizes(rest),
                _ => continue,
            };
            for i in is {
                if in_tx.send(i).await.is_err() {
                    return;
                }
            }
        }
    });
    let runner = tokio::spawn(run(api, node, req, in_rx, out_tx));
    while let Some((ch, b)) = out_rx.recv().await {
        if sink.send(framed(ch, &b)).await.is_err() {
            break;
        }
    }
    reader.abort();
    runner.abort();
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
}

/// The SPDY streams of one exec, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Streams {
    fn ready(&self, w: Wants) -> bool {
        self.error.is_some()
            && (!w.stdin || self.stdin.is_some())
            && (!w.stdout || self.stdout.is_some())
            && (!w.stderr || self.stderr.is_some())
    }
}

async fn over_spdy<IO>(api: Arc<Api>, node: String, req: Down, wants: Wants, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(io);
    let (raw_tx, mut raw_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(b) = raw_rx.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let (ids_tx, ids_rx) = tokio::sync::oneshot::channel::<Streams>();
    // Output onto the client's streams once they exist; the Status ends the session.
    let output = {
        let raw = raw_tx.clone();
        tokio::spawn(async move {
            let Ok(ids) = ids_rx.await else { return };
            let Some(error) = ids.error else { return };
            while let Some((ch, b)) = out_rx.recv().await {
                let id = match ch {
                    1 => ids.stdout,
                    2 => ids.stderr,
                    _ => Some(error),
                };
                if let Some(id) = id {
                    if raw.send(spdy::data(id, false, &b)).await.is_err() {
                        return;
                    }
                }
                if ch == 3 {
                    break;
                }
            }
            for id in [ids.stdout, ids.stderr, Some(error)].into_iter().flatten() {
                let _ = raw.send(spdy::data(id, true, b"")).await;
            }
        })
    };
    // Client frames: its streams (the command starts once all it asked for are open),
    // stdin, pings.
    let input = async move {
        let mut reader = spdy::Reader::default();
        let mut replies = spdy::Writer::default();
        let mut streams = Streams::default();
        let mut start = Some((in_rx, out_tx, ids_tx));
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            reader.feed(&buf[..n]);
            loop {
                let frame = match reader.frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "exec over SPDY refused");
                        return;
                    }
                };
                match &frame {
                    Frame::Syn { id, .. } => {
                        let id = *id;
                        let slot = match frame.header("streamtype") {
                            Some("error") => &mut streams.error,
                            Some("stdin") => &mut streams.stdin,
                            Some("stdout") => &mut streams.stdout,
                            Some("stderr") => &mut streams.stderr,
                            // Window sizes: not one the session waits for.
                            Some("resize") => {
                                streams.resize = Some(id);
                                if raw_tx.send(replies.syn_reply(id)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            _ => {
                                let _ = raw_tx.send(spdy::rst(id, spdy::PROTOCOL_ERROR)).await;
                                continue;
                            }
                        };
                        *slot = Some(id);
                        if raw_tx.send(replies.syn_reply(id)).await.is_err() {
                            return;
                        }
                        if streams.ready(wants) {
                            if let Some((in_rx, out_tx, ids_tx)) = start.take() {
                                let _ = ids_tx.send(Streams {
                                    stdin: None,
                                    ..streams
                                });
                                tokio::spawn(run(
                                    api.clone(),
                                    node.clone(),
                                    req.clone(),
                                    in_rx,
                                    out_tx,
                                ));
                            }
                        }
                    }
                    Frame::Data { id, data, .. } if Some(*id) == streams.resize => {
                        for i in sizes(data) {
                            let _ = in_tx.send(i).await;
                        }
                    }
                    Frame::Data { id, fin, data } if Some(*id) == streams.stdin => {
                        if !data.is_empty() {
                            let _ = in_tx.send(In::Stdin(data.to_vec())).await;
                        }
                        if *fin {
                            let _ = in_tx.send(In::StdinEnd).await;
                        }
                    }
                    Frame::Ping(p) => {
                        let _ = raw_tx.send(spdy::ping(*p)).await;
                    }
                    Frame::GoAway => return,
                    _ => {}
                }
            }
        }
    };
    let mut input = Box::pin(input);
    let mut output = output;
    tokio::select! {
        () = &mut input => output.abort(),
        _ = &mut output => {}
    }
    // Every sender is gone once `input` is dropped: the writer flushes and closes.
    drop(input);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sizes_are_read_one_object_after_another() {
        let got: Vec<(u16, u16)> =
            sizes(b"{\"Width\":80,\"Height\":24}\n{\"Width\":120,\"Height\":40}\n")
                .into_iter()
                .filter_map(|i| match i {
                    In::Resize(w, h) => Some((w, h)),
                    _ => None,
                })
                .collect();
        assert_eq!(got, [(80, 24), (120, 40)]);
        // Nonsense and sizes out of range are skipped, not a failure.
        assert!(sizes(b"{\"Width\":99999,\"Height\":1}").is_empty());
        assert!(sizes(b"not json").is_empty());
    }
}
