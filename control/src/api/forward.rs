//! `kubectl port-forward`: the client's upgraded connection, in whichever protocol it speaks,
//! turned into one node-link stream ([`Down::PortForward`]) per forwarded connection, so it
//! works for nodes behind NAT.
//!
//! ```text
//! kubectl 1.31+  WebSocket "SPDY/3.1+portforward.k8s.io" ─┐ SPDY session: each connection is an
//! kubectl ≤1.30  Upgrade: SPDY/3.1 (also the fallback) ────┘ error and a data stream sharing a
//!                                                            requestID ─▶ Down::PortForward
//! Python client  WebSocket v4/v5.channel.k8s.io ?ports=…  ─▶ channels 2i (data), 2i+1 (error)
//!                                                            per port ─▶ Down::PortForward
//! ```
//!
//! A failure after the upgrade (pod gone from its node, port refused) is text on the
//! connection's error stream, which kubectl prints; the other connections go on.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures::{SinkExt, Stream, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use outpost_api::link::{Down, ForwardRequest};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::spdy::{self, Frame};
use super::{Api, ApiError, Query};

const TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// Chunks read from a node at a time; kubectl's own frames are this size.
const CHUNK: usize = 32 << 10;
/// Chunks queued toward one node stream before the client's reads wait.
const QUEUE: usize = 64;

/// Where the forwarded connections go.
#[derive(Clone)]
struct Target {
    api: Arc<Api>,
    node: String,
    namespace: String,
    pod: String,
}

enum Proto {
    Tunnel,
    Spdy,
    Channels(Vec<u16>),
}

/// Answer the upgrade request and serve the connection once hyper hands it over.
pub(super) fn serve(
    api: &Arc<Api>,
    pod: &Value,
    headers: &HeaderMap,
    q: &Query,
    upgrade: Option<OnUpgrade>,
) -> Result<Response, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let target = Target {
        api: api.clone(),
        node: node.to_string(),
        namespace: pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        pod: name.to_string(),
    };
    let upgrade_to = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut reply = Response::new(axum::body::Body::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = reply.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let proto = match upgrade_to.as_str() {
        "websocket" => {
            let chosen = accept_websocket(
                headers,
                h,
                &[TUNNEL, "v5.channel.k8s.io", "v4.channel.k8s.io"],
                "port-forward",
            )?;
            if chosen == TUNNEL {
                Proto::Tunnel
            } else {
                Proto::Channels(ports(q)?)
            }
        }
        "spdy/3.1" => {
            let offered = list(headers, "x-stream-protocol-version");
            if !offered.is_empty() && !offered.iter().any(|o| o == SPDY_PROTOCOL) {
                return Err(ApiError::Forbidden {
                    message: format!(
                        "unable to upgrade: no common port-forward protocol: the client offered [{}], the server speaks [{SPDY_PROTOCOL}]",
                        offered.join(", ")
                    ),
                });
            }
            h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            h.insert(
                "x-stream-protocol-version",
                HeaderValue::from_static(SPDY_PROTOCOL),
            );
            Proto::Spdy
        }
        _ => {
            return Err(ApiError::BadRequest(
                "Upgrade request required: port-forward is a WebSocket or SPDY/3.1 connection"
                    .into(),
            ))
        }
    };
    let upgrade = upgrade.ok_or_else(|| {
        ApiError::BadRequest(
            "port-forward needs an HTTP/1.1 connection that can be upgraded".into(),
        )
    })?;
    when_upgraded(upgrade, "port-forward", |io| async move {
        match proto {
            Proto::Spdy => {
                let (r, w) = tokio::io::split(io);
                let (tx, rx) = mpsc::channel(QUEUE);
                let writer = tokio::spawn(write_raw(rx, w));
                session(target, raw_input(r), tx).await;
                let _ = writer.await;
            }
            Proto::Tunnel => {
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                let (sink, stream) = ws.split();
                let (tx, rx) = mpsc::channel(QUEUE);
                let writer = tokio::spawn(write_ws(rx, sink, |o| vec![spdy_bytes(o)]));
                session(target, ws_input(stream), tx).await;
                let _ = writer.await;
            }
            Proto::Channels(ports) => {
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                let (sink, stream) = ws.split();
                let (tx, rx) = mpsc::channel(QUEUE);
                let writer = tokio::spawn(write_ws(rx, sink, channel_messages));
                channels(target, ports, ws_input(stream), tx).await;
                let _ = writer.await;
            }
        }
    });
    Ok(reply)
}

/// Answer a WebSocket upgrade in `reply`: the accept key and the first of `protocols` the
/// client offers, which is returned.
pub(super) fn accept_websocket(
    headers: &HeaderMap,
    reply: &mut HeaderMap,
    protocols: &[&'static str],
    what: &str,
) -> Result<&'static str, ApiError> {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::BadRequest("Sec-WebSocket-Key is missing".into()))?;
    let offered = list(headers, header::SEC_WEBSOCKET_PROTOCOL.as_str());
    let chosen = protocols
        .iter()
        .copied()
        .find(|p| offered.iter().any(|o| o == p))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{what} over WebSocket speaks {}; the client offered [{}]",
                protocols.join(", "),
                offered.join(", ")
            ))
        })?;
    reply.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    reply.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    reply.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(
            &tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    reply.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(chosen),
    );
    Ok(chosen)
}

/// Once hyper hands the upgraded connection over, serve it with `serve` on a task of its own.
pub(super) fn when_upgraded<F, Fut>(upgrade: OnUpgrade, what: &'static str, serve: F)
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        match upgrade.await {
            Ok(u) => serve(TokioIo::new(u)).await,
            Err(e) => tracing::debug!(error = %e, "{what} upgrade failed"),
        }
    });
}

/// A header's values, whether repeated or comma-separated.
pub(super) fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn ports(q: &Query) -> Result<Vec<u16>, ApiError> {
    let raw: Vec<&str> = q
        .all("ports")
        .into_iter()
        .flat_map(|p| p.split(','))
        .collect();
    if raw.is_empty() {
        return Err(ApiError::BadRequest(
            "query parameter \"ports\" is required".into(),
        ));
    }
    raw.iter()
        .map(|p| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "invalid port {p:?}: ports are 1 to 65535"
            ))),
        })
        .collect()
}

/// One forwarded connection's two streams (SPDY stream ids, or channel numbers).
#[derive(Debug, Clone, Copy)]
struct Tag {
    data: u32,
    error: u32,
}

/// What goes back to the client.
enum Out {
    /// Already-encoded SPDY control frames.
    Raw(Vec<u8>),
    Data(Tag, Bytes),
    /// The pod's side finished: end both streams.
    End(Tag),
    /// The connection failed with this message.
    Failed(Tag, String),
}

fn spdy_bytes(o: Out) -> Vec<u8> {
    match o {
        Out::Raw(b) => b,
        Out::Data(t, b) => spdy::data(t.data, false, &b),
        Out::End(t) => {
            let mut b = spdy::data(t.data, true, b"");
            b.extend(spdy::data(t.error, true, b""));
            b
        }
        Out::Failed(t, msg) => {
            let mut b = spdy::data(t.error, true, msg.as_bytes());
            b.extend(spdy::data(t.data, true, b""));
            b
        }
    }
}

/// The channel protocol: each message is its channel's number, then the payload.
fn channel_messages(o: Out) -> Vec<Vec<u8>> {
    let framed = |ch: u32, b: &[u8]| {
        let mut m = Vec::with_capacity(1 + b.len());
        m.push(ch as u8);
        m.extend_from_slice(b);
        m
    };
    match o {
        Out::Raw(m) => vec![m],
        Out::Data(t, b) => vec![framed(t.data, &b)],
        Out::End(_) => vec![],
        Out::Failed(t, msg) => vec![framed(t.error, msg.as_bytes())],
    }
}

type Input = std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>>;

fn raw_input<R: tokio::io::AsyncRead + Unpin + Send + 'static>(r: R) -> Input {
    Box::pin(futures::stream::unfold(r, |mut r| async move {
        let mut buf = vec![0u8; CHUNK];
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Bytes::from(buf), r))
            }
        }
    }))
}

fn ws_input<S>(stream: S) -> Input
where
    S: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Send + 'static,
{
    Box::pin(
        stream
            .take_while(|m| futures::future::ready(matches!(m, Ok(m) if !m.is_close())))
            .filter_map(|m| {
                futures::future::ready(match m {
                    Ok(Message::Binary(b)) => Some(b),
                    Ok(Message::Text(t)) => Some(Bytes::from(t)),
                    _ => None,
                })
            }),
    )
}

async fn write_raw<W: tokio::io::AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Out>, mut w: W) {
    while let Some(o) = rx.recv().await {
        let mut buf = spdy_bytes(o);
        // Whatever else is queued goes out in the same write.
        while buf.len() < CHUNK {
            match rx.try_recv() {
                Ok(o) => buf.extend(spdy_bytes(o)),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn write_ws<S>(mut rx: mpsc::Receiver<Out>, mut sink: S, encode: fn(Out) -> Vec<Vec<u8>>)
where
    S: futures::Sink<Message> + Unpin,
{
    while let Some(o) = rx.recv().await {
        for m in encode(o) {
            if sink.feed(Message::binary(m)).await.is_err() {
                return;
            }
        }
        if rx.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

/// Bytes from the client toward one forwarded connection.
enum Feed {
    Bytes(Bytes),
    /// The client finished its half.
    Fin,
}

/// A data stream waiting for its error stream, or the other way round.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<(u32, Result<u16, String>, mpsc::Receiver<Feed>)>,
}

/// A SPDY port-forward session: kubectl opens an error stream and a data stream per local
/// connection, with the same `requestID` and `port` headers.
async fn session(target: Target, mut input: Input, out: mpsc::Sender<Out>) {
    let mut reader = spdy::Reader::default();
    let mut writer = spdy::Writer::default();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut feeds: HashMap<u32, mpsc::Sender<Feed>> = HashMap::new();
    // Dropped with the session, which ends every connection still open.
    let mut tasks = JoinSet::new();
    'conn: while let Some(chunk) = input.next().await {
        reader.feed(&chunk);
        loop {
            let frame = match reader.frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, pod = %target.pod, "port-forward connection refused");
                    break 'conn;
                }
            };
            match frame {
                Frame::Syn { id, .. } => {
                    if out.send(Out::Raw(writer.syn_reply(id))).await.is_err() {
                        break 'conn;
                    }
                    // Clients before requestID paired streams by order; one id then serves.
                    let rid = frame.header("requestid").unwrap_or("").to_string();
                    let pair = pairs.entry(rid.clone()).or_default();
                    match frame.header("streamtype") {
                        Some("error") => pair.error = Some(id),
                        Some("data") => {
                            let port = frame.header("port").unwrap_or("");
                            let port =
                                port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                                    format!("invalid port {port:?}: ports are 1 to 65535")
                                });
                            let (tx, rx) = mpsc::channel(QUEUE);
                            feeds.insert(id, tx);
                            pair.data = Some((id, port, rx));
                        }
                        other => {
                            tracing::debug!(stream = id, kind = ?other, "unknown port-forward stream");
                            let _ = out
                                .send(Out::Raw(spdy::rst(id, spdy::PROTOCOL_ERROR)))
                                .await;
                            continue;
                        }
                    }
                    let ready = pairs
                        .get(&rid)
                        .is_some_and(|p| p.error.is_some() && p.data.is_some());
                    if let Some(Pair {
                        error: Some(error),
                        data: Some((data, port, rx)),
                    }) = ready.then(|| pairs.remove(&rid)).flatten()
                    {
                        let tag = Tag { data, error };
                        match port {
                            Ok(port) => {
                                tasks.spawn(pump(target.clone(), port, tag, rx, out.clone()));
                            }
                            Err(msg) => {
                                let _ = out.send(Out::Failed(tag, msg)).await;
                            }
                        }
                    }
                }
                Frame::Data { id, fin, data } => {
                    if let Some(tx) = feeds.get(&id) {
                        // A connection whose pump ended no longer takes bytes.
                        if !data.is_empty() && tx.send(Feed::Bytes(data)).await.is_err() {
                            feeds.remove(&id);
                        } else if fin {
                            let _ = tx.send(Feed::Fin).await;
                            feeds.remove(&id);
                        }
                    }
                }
                Frame::Rst { id, .. } => {
                    feeds.remove(&id);
                }
                Frame::Ping(p) => {
                    if out.send(Out::Raw(spdy::ping(p))).await.is_err() {
                        break 'conn;
                    }
                }
                Frame::GoAway => break 'conn,
                Frame::Ignored => {}
            }
        }
        while tasks.try_join_next().is_some() {}
    }
}

/// The channel protocol: every port in `ports` is forwarded once, for the life of the
/// WebSocket.
async fn channels(target: Target, ports: Vec<u16>, mut input: Input, out: mpsc::Sender<Out>) {
    let mut feeds = Vec::with_capacity(ports.len());
    let mut tasks = JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        let tag = Tag {
            data: 2 * i as u32,
            error: 2 * i as u32 + 1,
        };
        // Each channel opens with the port it carries, little-endian.
        for ch in [tag.data, tag.error] {
            let mut m = vec![ch as u8];
            m.extend_from_slice(&port.to_le_bytes());
            let _ = out.send(Out::Raw(m)).await;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        feeds.push(Some(tx));
        tasks.spawn(pump(target.clone(), *port, tag, rx, out.clone()));
    }
    loop {
        tokio::select! {
            m = input.next() => {
                let Some(m) = m else { return };
                let Some((&ch, payload)) = m.split_first() else { continue };
                // v5 closes a channel with [255, channel].
                let (ch, fin) = match (ch, payload) {
                    (255, [c, ..]) => (*c, true),
                    _ => (ch, false),
                };
                let Some(slot) = feeds.get_mut(usize::from(ch) / 2).filter(|_| ch % 2 == 0) else {
                    continue;
                };
                if let Some(tx) = slot {
                    let sent = if fin {
                        tx.send(Feed::Fin).await
                    } else {
                        tx.send(Feed::Bytes(Bytes::copy_from_slice(payload))).await
                    };
                    if fin || sent.is_err() {
                        *slot = None;
                    }
                }
            }
            done = tasks.join_next() => {
                if done.is_none() {
                    return;
                }
            }
        }
    }
}

/// One forwarded connection: a node-link stream to the pod's port, bytes pumped both ways.
async fn pump(
    target: Target,
    port: u16,
    tag: Tag,
    mut feed: mpsc::Receiver<Feed>,
    out: mpsc::Sender<Out>,
) {
    let req = Down::PortForward(ForwardRequest {
        namespace: target.namespace.clone(),
        pod: target.pod.clone(),
        port,
    });
    let (mut send, mut recv) = match target.api.links.open_duplex(&target.node, &req).await {
        Ok((head, send, recv)) if head.status == 200 => (send, recv),
        Ok((_, _, mut recv)) => {
            let msg = recv.read_to_end(64 << 10).await.unwrap_or_default();
            let msg = String::from_utf8_lossy(&msg).trim().to_string();
            let _ = out.send(Out::Failed(tag, msg)).await;
            return;
        }
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod {}: {e}", target.pod);
            let _ = out.send(Out::Failed(tag, msg)).await;
            return;
        }
    };
    let up = async {
        while let Some(f) = feed.recv().await {
            match f {
                Feed::Bytes(b) => {
                    if send.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Feed::Fin => {
                    let _ = send.finish();
                    return;
                }
            }
        }
        // The client reset the stream or went away.
        let _ = send.reset(quinn::VarInt::from_u32(0));
    };
    let down = async {
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(c)) => {
                    if out.send(Out::Data(tag, c.bytes)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = out.send(Out::End(tag)).await;
                    return;
                }
                Err(e) => {
                    let msg = format!("error forwarding port {port} to pod {}: {e}", target.pod);
                    let _ = out.send(Out::Failed(tag, msg)).await;
                    return;
                }
            }
        }
    };
    // The pod's side finishing ends the connection (kubectl resets the stream then); the
    // client finishing first leaves the pod's answer to come.
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut up => down.await,
        _ = &mut down => {}
    }
}
