//! The node gateway: the QUIC endpoint nodes connect to.
//!
//! ```text
//! node ──QUIC──▶ ALPN outpost-join/1: token + CSR ─▶ client certificate (system:node:NAME)
//!      ──QUIC──▶ ALPN outpost-node/1 (mutual TLS) ─▶ per stream: Up::Call ─▶ API router as
//!                the node ─▶ Head + body; Up::Renew (lease, in memory); Up::Certify
//!      ◀──────── Down::Logs, Down::PortForward streams the API opens toward the node
//!                (works behind NAT)
//! member ─QUIC─▶ ALPN outpost-relay/1 (a cluster-CA certificate in outpost:members): per
//!                stream a Relay frame ─▶ the Down stream toward a node linked here, piped
//! ```
//!
//! A member asked to open a stream toward a node linked to another member finds that member
//! in the node's link record (which holds its gateway's address) and goes through it, so
//! `kubectl logs`, `exec` and `port-forward` work through any member.
//!
//! A node's API requests go through the same router, admission and authorization as anyone's,
//! under the node's own identity, so the node authorizer in [`crate::api`] is the one place
//! that decides what a node may touch. Lease renewals are kept in memory: a heartbeat is not a
//! durable write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request};
use axum::Router;
use futures::StreamExt;
use outpost_api::link::{
    read_frame, write_frame, Down, Head, JoinReply, JoinRequest, MemberReply, MemberRequest, Relay,
    Up, ALPN_JOIN, ALPN_MEMBER, ALPN_NODE, ALPN_RELAY, GATEWAY_NAME, MAX_FRAME, MEMBERS_GROUP,
};
use outpost_api::store::{Expect, Outcome};
use quinn::{Connection, RecvStream, SendStream};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::api::{Api, Peer, User};
use crate::sha256_hex;
use crate::store::Consistency;

/// Where bootstrap tokens live in the store.
pub const TOKEN_PREFIX: &str = "/outpost/tokens/";

/// The nodes connected to this member.
#[derive(Default)]
pub struct Links {
    nodes: Mutex<HashMap<String, Link>>,
    /// How to reach nodes linked to other members (set when the gateway starts).
    relay: std::sync::OnceLock<Relayer>,
}

/// Streams toward nodes linked to other members, through those members' gateways.
struct Relayer {
    store: crate::store::Store,
    tls: Arc<quinn::crypto::rustls::QuicClientConfig>,
    endpoint: quinn::Endpoint,
    /// Connections to other members' gateways, by address.
    conns: tokio::sync::Mutex<HashMap<SocketAddr, Connection>>,
}

impl Relayer {
    async fn conn(&self, to: SocketAddr) -> Result<Connection, String> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&to).filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let mut cfg = quinn::ClientConfig::new(self.tls.clone());
        cfg.transport_config(Arc::new(transport()));
        let connecting = self
            .endpoint
            .connect_with(cfg, to, GATEWAY_NAME)
            .map_err(|e| format!("member gateway {to}: {e}"))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| format!("member gateway {to}: no answer within 10 s"))?
            .map_err(|e| format!("member gateway {to}: {e}"))?;
        conns.insert(to, conn.clone());
        Ok(conn)
    }

    /// Open `req` toward `node` through the member its link record names.
    async fn open(&self, node: &str, req: &Down) -> Result<(Head, SendStream, RecvStream), String> {
        let absent = || format!("node \"{node}\" is not connected to the control plane");
        let kv = self
            .store
            .get(&format!("{LINK_PREFIX}{node}"), Consistency::Linearizable)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(absent)?;
        let link: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        if link["connected"] != true || link["member"] == self.store.status().id {
            return Err(absent());
        }
        let to: SocketAddr = link["gateway"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                format!(
                    "node \"{node}\" is linked to member {}, whose gateway address is not known",
                    link["member"]
                )
            })?;
        let relay = Relay {
            node: node.to_string(),
            down: req.clone(),
        };
        exchange(&self.conn(to).await?, &relay)
            .await
            .map_err(|e| format!("node \"{node}\" through {to}: {e}"))
    }
}

/// Open a stream on `conn`, send `first`, and wait (10 s at most) for the answer's head.
async fn exchange(
    conn: &Connection,
    first: &impl serde::Serialize,
) -> Result<(Head, SendStream, RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, first, MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    let head: Head =
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, MAX_FRAME))
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
    Ok((head, send, recv))
}

#[derive(Clone)]
struct Link {
    conn: Connection,
    renewed: Instant,
}

impl Links {
    /// Node names connected here, with the time since each last renewed its lease.
    pub fn connected(&self) -> Vec<(String, Duration)> {
        self.nodes
            .lock()
            .map(|n| {
                n.iter()
                    .map(|(k, l)| (k.clone(), l.renewed.elapsed()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn conn(&self, node: &str) -> Option<Connection> {
        self.nodes.lock().ok()?.get(node).map(|l| l.conn.clone())
    }

    fn insert(&self, node: &str, conn: Connection) {
        if let Ok(mut n) = self.nodes.lock() {
            if let Some(old) = n.insert(
                node.to_string(),
                Link {
                    conn,
                    renewed: Instant::now(),
                },
            ) {
                old.conn
                    .close(2u32.into(), b"replaced by a newer connection");
            }
        }
    }

    /// Forget `conn` if it is still the node's link; whether it was.
    fn remove(&self, node: &str, conn: &Connection) -> bool {
        let Ok(mut n) = self.nodes.lock() else {
            return false;
        };
        let current = n
            .get(node)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id());
        if current {
            n.remove(node);
        }
        current
    }

    fn renew(&self, node: &str) {
        if let Ok(mut n) = self.nodes.lock() {
            if let Some(l) = n.get_mut(node) {
                l.renewed = Instant::now();
            }
        }
    }

    /// Open a stream toward `node` and send `req`; returns the node's answer and the body.
    pub async fn open(&self, node: &str, req: &Down) -> Result<(Head, RecvStream), String> {
        let (head, mut send, recv) = self.open_duplex(node, req).await?;
        let _ = send.finish();
        Ok((head, recv))
    }

    /// [`Links::open`] with our half of the stream left open, for exchanges that carry bytes
    /// both ways. A node linked to another member is reached through it.
    pub async fn open_duplex(
        &self,
        node: &str,
        req: &Down,
    ) -> Result<(Head, SendStream, RecvStream), String> {
        match (self.conn(node), self.relay.get()) {
            (None, Some(r)) => r.open(node, req).await,
            _ => self.open_here(node, req).await,
        }
    }

    /// Open `req` toward `node` on its link to this member.
    async fn open_here(
        &self,
        node: &str,
        req: &Down,
    ) -> Result<(Head, SendStream, RecvStream), String> {
        let conn = self
            .conn(node)
            .ok_or_else(|| format!("node \"{node}\" is not connected to this control plane"))?;
        exchange(&conn, req)
            .await
            .map_err(|e| format!("node \"{node}\": {e}"))
    }
}

struct Gateway {
    api: Arc<Api>,
    /// Where it listens (its port is what other members dial).
    addr: SocketAddr,
    router: Router,
    pki_dir: PathBuf,
    cert_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("node gateway on {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
}

/// Bind the gateway on `listen` (UDP) and serve nodes until the returned task is aborted.
pub fn start(
    api: Arc<Api>,
    listen: SocketAddr,
    pki_dir: &Path,
    cert_ttl: Duration,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StartError> {
    let tls = crate::pki::gateway_server_config(pki_dir)?;
    let bind = |detail: String| StartError::Bind {
        addr: listen,
        detail,
    };
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| bind(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport()));
    let endpoint = quinn::Endpoint::server(server, listen).map_err(|e| bind(e.to_string()))?;
    let addr = endpoint.local_addr().map_err(|e| bind(e.to_string()))?;
    let relay = crate::pki::relay_client_config(pki_dir, api.store.status().id)
        .map_err(StartError::Pki)
        .and_then(|tls| {
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| bind(e.to_string()))
        })?;
    let unspecified = SocketAddr::new(
        if addr.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        },
        0,
    );
    let client = quinn::Endpoint::client(unspecified).map_err(|e| bind(e.to_string()))?;
    let _ = api.links.relay.set(Relayer {
        store: api.store.clone(),
        tls: Arc::new(relay),
        endpoint: client,
        conns: tokio::sync::Mutex::default(),
    });
    let gw = Arc::new(Gateway {
        addr,
        router: crate::api::router(api.clone()),
        api,
        pki_dir: pki_dir.to_path_buf(),
        cert_ttl,
    });
    tracing::info!(%addr, "node gateway listening");
    tokio::spawn(forget_stale_links(gw.api.clone()));
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let gw = gw.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => gw.connection(conn).await,
                    Err(e) => tracing::info!(%remote, error = %e, "refused a node connection"),
                }
            });
        }
    });
    Ok((addr, task))
}

/// Keep-alives well inside the idle timeout, so a quiet link through NAT stays mapped.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(outpost_api::link::KEEP_ALIVE));
    if let Ok(idle) = outpost_api::link::IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Whether the peer presented a cluster-CA certificate in the members' group.
fn is_member(conn: &Connection) -> bool {
    let certs = conn.peer_identity().and_then(|i| {
        i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    certs
        .and_then(|c| crate::api::serve::user_from_cert(c.first()?))
        .is_some_and(|u| u.groups.iter().any(|g| g == MEMBERS_GROUP))
}

fn node_of(conn: &Connection) -> Option<(String, User)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let user = crate::api::serve::user_from_cert(certs.first()?)?;
    let node = user.name.strip_prefix("system:node:")?.to_string();
    (user.groups.iter().any(|g| g == "system:nodes") && !node.is_empty()).then_some((node, user))
}

/// Answer the one request a bootstrapping peer (a joining node or member) sends on the first
/// stream it opens, then hold the connection until the peer has read the reply.
async fn bootstrap<Q, R>(conn: &Connection, reply: impl AsyncFnOnce(std::io::Result<Q>) -> R)
where
    Q: serde::de::DeserializeOwned,
    R: serde::Serialize,
{
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        return;
    };
    let r = reply(read_frame::<_, Q>(&mut recv, 64 << 10).await).await;
    if write_frame(&mut send, &r, MAX_FRAME).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }
}

impl Gateway {
    async fn connection(self: Arc<Self>, conn: Connection) {
        let alpn = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        match alpn.as_deref() {
            Some(ALPN_JOIN) => self.join(conn).await,
            Some(ALPN_NODE) => self.node(conn).await,
            Some(ALPN_MEMBER) => self.member(conn).await,
            Some(ALPN_RELAY) => self.relay(conn).await,
            _ => conn.close(1u32.into(), b"unknown protocol"),
        }
    }

    /// Another member's streams toward nodes linked here: each opens the node's stream and
    /// pipes bytes both ways until both halves are done.
    async fn relay(&self, conn: Connection) {
        if !is_member(&conn) {
            tracing::warn!(remote = %conn.remote_address(), "refused a relay connection without a member certificate");
            conn.close(3u32.into(), b"a member certificate is required");
            return;
        }
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let links = self.api.links.clone();
            tokio::spawn(async move {
                let r = match read_frame::<_, Relay>(&mut recv, MAX_FRAME).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = answer(
                            &mut send,
                            400,
                            format!("garbled relay frame: {e}").as_bytes(),
                        )
                        .await;
                        return;
                    }
                };
                match links.open_here(&r.node, &r.down).await {
                    Ok((head, mut to_node, mut from_node)) => {
                        if write_frame(&mut send, &head, MAX_FRAME).await.is_err() {
                            return;
                        }
                        let up = async {
                            let _ = tokio::io::copy(&mut recv, &mut to_node).await;
                            let _ = to_node.finish();
                        };
                        let down = async {
                            let _ = tokio::io::copy(&mut from_node, &mut send).await;
                            let _ = send.finish();
                        };
                        tokio::join!(up, down);
                    }
                    Err(e) => {
                        let _ = answer(&mut send, 503, e.as_bytes()).await;
                    }
                }
            });
        }
    }

    async fn join(&self, conn: Connection) {
        let remote = conn.remote_address();
        bootstrap(&conn, async |req: std::io::Result<JoinRequest>| match req {
            Ok(req) => match self.admit(&req).await {
                Ok(cert) => {
                    tracing::info!(%remote, node = %req.node, "node joined");
                    match std::fs::read_to_string(self.pki_dir.join("ca.crt")) {
                        Ok(ca) => JoinReply::Issued { cert, ca },
                        Err(e) => JoinReply::Refused(format!("reading the cluster CA: {e}")),
                    }
                }
                Err(why) => {
                    tracing::warn!(%remote, node = %req.node, reason = %why, "join refused");
                    JoinReply::Refused(why)
                }
            },
            Err(e) => JoinReply::Refused(format!("garbled join request: {e}")),
        })
        .await
    }

    /// A new control-plane member: check its member token, use it up, and hand it the
    /// cluster's CAs and this member's peer address to join through.
    async fn member(&self, conn: Connection) {
        let remote = conn.remote_address();
        let peer = self.api.store.pki_dir().to_path_buf();
        let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f));
        let files = (
            read(&peer, "peer-ca.crt"),
            read(&peer, "peer-ca.key"),
            read(&self.pki_dir, "ca.crt"),
            read(&self.pki_dir, "ca.key"),
        );
        bootstrap(&conn, async |req: std::io::Result<MemberRequest>| match req {
            Ok(req) if self.api.store.status().members.contains_key(&req.member) => {
                MemberReply::Refused(format!(
                    "member id {} is already in the cluster; start the new member with another --id",
                    req.member
                ))
            }
            Ok(req) => match files {
                (Ok(peer_ca_crt), Ok(peer_ca_key), Ok(ca_crt), Ok(ca_key)) => {
                    match self.spend(&req.id, &req.secret, Kind::Member).await {
                        Ok(()) => {
                            tracing::info!(%remote, member = req.member, "member admitted");
                            MemberReply::Admitted {
                                peer_ca_crt,
                                peer_ca_key,
                                ca_crt,
                                ca_key,
                                join: self.api.store.status().addr,
                            }
                        }
                        Err(why) => {
                            tracing::warn!(%remote, member = req.member, reason = %why, "member refused");
                            MemberReply::Refused(why)
                        }
                    }
                }
                _ => MemberReply::Refused(
                    "this member does not hold the cluster's CAs; ask another".into(),
                ),
            },
            Err(e) => MemberReply::Refused(format!("garbled member request: {e}")),
        })
        .await
    }

    /// Check the token, use it up, and sign the node's CSR.
    async fn admit(&self, req: &JoinRequest) -> Result<String, String> {
        if !valid_node_name(&req.node) {
            return Err(format!(
                "\"{}\" is not a valid node name: lowercase letters, digits, '-' and '.', at most 253",
                req.node
            ));
        }
        // Two machines with one name (two boards both called raspberrypi) would take the
        // name's link from each other over and over, and run each other's pods.
        let link = self
            .api
            .store
            .get(
                &format!("{LINK_PREFIX}{}", req.node),
                crate::store::Consistency::Linearizable,
            )
            .await
            .map_err(|e| format!("the control plane could not check the node name: {e}"))?;
        let linked = link.is_some_and(|kv| {
            serde_json::from_slice::<serde_json::Value>(&kv.value)
                .is_ok_and(|v| v["connected"] == true)
        });
        if linked {
            return Err(format!(
                "a node named \"{}\" is connected to the cluster now; join this machine with another name (--name), or stop that node first (a node that is rejoining itself can try again once its old link has dropped, within a minute)",
                req.node
            ));
        }
        self.spend(&req.id, &req.secret, Kind::Node).await?;
        crate::pki::sign_node(&self.pki_dir, &req.csr, &req.node, self.cert_ttl)
            .map_err(|e| format!("bad certificate signing request: {e}"))
    }

    /// Check a token of `kind` and use one of its joins.
    async fn spend(&self, id: &str, secret: &str, kind: Kind) -> Result<(), String> {
        let key = format!("{TOKEN_PREFIX}{id}");
        let store = &self.api.store;
        let internal =
            |e: &dyn std::fmt::Display| format!("the control plane could not check the token: {e}");
        for _ in 0..8 {
            let Some(kv) = store
                .get(&key, Consistency::Linearizable)
                .await
                .map_err(|e| internal(&e))?
            else {
                return Err("unknown token".into());
            };
            let mut t: Value = serde_json::from_slice(&kv.value).map_err(|e| internal(&e))?;
            if t["secretSha256"].as_str() != Some(&sha256_hex(secret.as_bytes())) {
                return Err("unknown token".into());
            }
            let is = if t["kind"] == "member" {
                Kind::Member
            } else {
                Kind::Node
            };
            if is != kind {
                return Err(match kind {
                    Kind::Node => "this is a member token; nodes join with `outpost token create`",
                    Kind::Member => {
                        "this is a node token; members join with `outpost token create --member`"
                    }
                }
                .into());
            }
            if t["expires"].as_i64().unwrap_or(0) <= unix_now() {
                return Err(
                    "the token has expired; create a new one with `outpost token create`".into(),
                );
            }
            let left = t["usesLeft"].as_i64().unwrap_or(0);
            if left <= 0 {
                return Err(
                    "the token has already been used; create a new one with `outpost token create`"
                        .into(),
                );
            }
            t["usesLeft"] = json!(left - 1);
            let value = serde_json::to_vec(&t).map_err(|e| internal(&e))?;
            match store
                .put(&key, value, Expect::ModRevision(kv.mod_revision))
                .await
                .map_err(|e| internal(&e))?
            {
                Outcome::Committed { .. } => return Ok(()),
                _ => continue,
            }
        }
        Err("the token is being used by other joins; try again".into())
    }

    async fn node(self: Arc<Self>, conn: Connection) {
        let Some((node, user)) = node_of(&conn) else {
            conn.close(
                3u32.into(),
                b"a node certificate from this cluster's CA is required",
            );
            return;
        };
        tracing::info!(%node, remote = %conn.remote_address(), "node connected");
        self.api.links.insert(&node, conn.clone());
        // Other members reach this node through the address it reached us at.
        let gateway = conn
            .local_ip()
            .map(|ip| SocketAddr::new(ip, self.addr.port()).to_string());
        record_link(&self.api, &node, true, gateway).await;
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let gw = self.clone();
            let (node, user) = (node.clone(), user.clone());
            tokio::spawn(async move { gw.up(&node, &user, send, recv).await });
        }
        if self.api.links.remove(&node, &conn) {
            record_link(&self.api, &node, false, None).await;
        }
        tracing::info!(%node, "node disconnected");
    }

    async fn up(&self, node: &str, user: &User, mut send: SendStream, mut recv: RecvStream) {
        let msg = match read_frame::<_, Up>(&mut recv, MAX_FRAME).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%node, error = %e, "refused a frame from a node");
                let _ = answer(&mut send, 400, format!("refused: {e}").as_bytes()).await;
                return;
            }
        };
        match msg {
            Up::Renew => {
                self.api.links.renew(node);
                let _ = answer(&mut send, 200, b"").await;
            }
            Up::Certify { csr } => {
                match crate::pki::sign_node(&self.pki_dir, &csr, node, self.cert_ttl) {
                    Ok(cert) => {
                        let _ = answer(&mut send, 200, cert.as_bytes()).await;
                    }
                    Err(e) => {
                        let _ = answer(&mut send, 400, format!("bad CSR: {e}").as_bytes()).await;
                    }
                }
            }
            Up::Call {
                method,
                path,
                content_type,
                body,
            } => {
                if let Err(e) = self
                    .call(user, &method, &path, content_type, body, send)
                    .await
                {
                    tracing::debug!(%node, %path, error = %e, "call ended early");
                }
            }
        }
    }

    async fn call(
        &self,
        user: &User,
        method: &str,
        path: &str,
        content_type: Option<String>,
        body: Vec<u8>,
        mut send: SendStream,
    ) -> Result<(), String> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "outpost-node");
        if let Some(ct) = &content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let mut req = match b.body(Body::from(body)) {
            Ok(r) => r,
            Err(e) => {
                return answer(&mut send, 400, format!("bad request: {e}").as_bytes())
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        req.extensions_mut().insert(Peer(Some(user.clone())));
        let resp = match self.router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let head = Head {
            status: resp.status().as_u16(),
            content_type: resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        };
        write_frame(&mut send, &head, MAX_FRAME)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = resp.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            send.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())
    }
}

async fn answer(send: &mut SendStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    write_frame(
        send,
        &Head {
            status,
            content_type: Some("text/plain".into()),
        },
        MAX_FRAME,
    )
    .await?;
    send.write_all(body).await?;
    send.finish().map_err(std::io::Error::other)
}

/// A DNS-1123 subdomain, as Kubernetes requires of node names.
/// Where each node's link is: `{"member": ID, "connected": BOOL, "since": UNIX SECONDS,
/// "gateway": "IP:PORT" of the member's gateway as the node reached it}`,
/// written when a link comes or goes (a change of state, never a heartbeat), so the node
/// lifecycle controller on the leader knows about links held by any member.
pub const LINK_PREFIX: &str = "/outpost/links/";

async fn record_link(api: &Api, node: &str, connected: bool, gateway: Option<String>) {
    let me = api.store.status().id;
    let key = format!("{LINK_PREFIX}{node}");
    let value = json!({"member": me, "connected": connected, "since": unix_now(),
        "gateway": gateway})
    .to_string();
    let expect = if connected {
        Expect::Any
    } else {
        // Only our own link's loss: the node may already be linked to another member.
        match api
            .store
            .get(&key, crate::store::Consistency::Linearizable)
            .await
        {
            Ok(Some(kv)) => {
                let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
                if v["member"] != me || v["connected"] != true {
                    return;
                }
                Expect::ModRevision(kv.mod_revision)
            }
            _ => return,
        }
    };
    if let Err(e) = api.store.put(&key, value.into_bytes(), expect).await {
        tracing::warn!(%node, error = %e, "could not record the node's link");
    }
}

/// Links this member recorded before it restarted are gone: say so.
async fn forget_stale_links(api: Arc<Api>) {
    for _ in 0..120 {
        let me = api.store.status().id;
        let Ok(page) = api
            .store
            .range(
                LINK_PREFIX,
                None,
                0,
                crate::store::Consistency::Linearizable,
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        for kv in page.kvs {
            let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            let node = kv.key.trim_start_matches(LINK_PREFIX);
            if v["member"] == me && v["connected"] == true && api.links.conn(node).is_none() {
                let gone = json!({"member": me, "connected": false, "since": unix_now()});
                let _ = api
                    .store
                    .put(
                        &kv.key,
                        gone.to_string().into_bytes(),
                        Expect::ModRevision(kv.mod_revision),
                    )
                    .await;
            }
        }
        return;
    }
}

pub fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a bootstrap token lets join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    /// A control-plane member: the token buys the cluster's CA keys.
    Member,
}

/// Store a new bootstrap token of `kind` valid for `ttl` and `uses` joins; returns it in
/// full.
pub async fn create_token(
    api: &Api,
    ttl: Duration,
    uses: u32,
    kind: Kind,
) -> Result<String, String> {
    use rand::Rng;
    let pki = api
        .pki_dir
        .as_deref()
        .ok_or("this API server has no cluster CA configured")?;
    let ca_hash = crate::pki::ca_hash(pki).map_err(|e| e.to_string())?;
    // ThreadRng is not Send: draw everything before the first await.
    let token = {
        let mut rng = rand::rng();
        let mut hex = |n: usize| -> String {
            (0..n)
                .map(|_| format!("{:x}", rng.random_range(0..16u8)))
                .collect()
        };
        outpost_api::link::Token {
            ca_hash,
            id: hex(6),
            secret: hex(32),
        }
    };
    let record = json!({
        "secretSha256": sha256_hex(token.secret.as_bytes()),
        "expires": unix_now() + ttl.as_secs() as i64,
        "usesLeft": uses,
        "kind": if kind == Kind::Member { "member" } else { "node" },
    });
    let out = api
        .store
        .put(
            &format!("{TOKEN_PREFIX}{}", token.id),
            serde_json::to_vec(&record).map_err(|e| e.to_string())?,
            Expect::Absent,
        )
        .await
        .map_err(|e| e.to_string())?;
    match out {
        Outcome::Committed { .. } => Ok(token.to_string()),
        other => Err(format!("storing the token: {other:?}")),
    }
}
