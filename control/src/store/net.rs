//! Raft traffic between members over QUIC with mutual TLS.
//!
//! Every request is one bidirectional stream: a length-prefixed CBOR request, then a
//! length-prefixed CBOR reply. A snapshot rides its own stream: the request frame, then the
//! file's bytes. Besides Raft's own RPCs the same channel carries forwarded writes, read-index
//! requests and joins, so any member can serve a client without knowing who leads.
//!
//! Frames are bounded; a frame that does not decode is answered with `Refused` and the
//! connection closed, never a panic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, Fatal, InstallSnapshotError, NetworkError, RPCError,
    RaftError, RemoteError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft, Snapshot, SnapshotMeta, Vote};
use outpost_api::store::{Command, Outcome};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::sm::SnapFile;
use super::TypeConfig;
use crate::pki::MEMBER_NAME;

pub const ALPN: &[u8] = b"outpost-raft/1";
/// Largest request or reply frame. Append batches are capped well below this.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest snapshot a member accepts.
pub const MAX_SNAPSHOT: u64 = 64 << 30;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    /// Followed on the stream by `len` bytes of snapshot file.
    Snapshot {
        vote: Vote<u64>,
        meta: SnapshotMeta<u64, BasicNode>,
        len: u64,
    },
    /// A client write, for the leader to apply.
    Forward(Command),
    /// Confirm leadership and return the index a linearizable read must wait for.
    ReadIndex,
    /// Add a member: first as a learner that catches up, then as a voter.
    Join {
        id: u64,
        addr: String,
    },
    /// Remove a member from the voters.
    Leave {
        id: u64,
    },
}

/// Why a forwarded request did not complete on the member it reached.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<SnapshotResponse<u64>, String>),
    Forward(Result<Outcome, ForwardError>),
    ReadIndex(Result<u64, ForwardError>),
    Join(Result<(), ForwardError>),
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("stream to {addr}: {detail}")]
    Stream { addr: String, detail: String },
    #[error("{addr} timed out")]
    Timeout { addr: String },
    #[error("{addr} refused: {detail}")]
    Refused { addr: String, detail: String },
}

pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> std::io::Result<()> {
    outpost_api::link::write_frame(send, msg, MAX_FRAME).await
}

/// One frame. A frame that is over the limit or does not decode is `InvalidData` (the peer
/// does not speak our protocol); anything else means the peer went (`ConnectionAborted`).
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
) -> std::io::Result<T> {
    outpost_api::link::read_frame(recv, MAX_FRAME)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => e,
            _ => std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e),
        })
}

/// Outgoing connections to other members, one per address, opened on demand.
pub struct Peers {
    endpoint: Endpoint,
    conns: Mutex<HashMap<String, Connection>>,
}

impl Peers {
    pub fn new(endpoint: Endpoint) -> Self {
        Peers {
            endpoint,
            conns: Mutex::new(HashMap::new()),
        }
    }

    async fn connection(&self, addr: &str) -> Result<Connection, NetError> {
        let cached = self.conns.lock().ok().and_then(|c| c.get(addr).cloned());
        if let Some(c) = cached {
            if c.close_reason().is_none() {
                return Ok(c);
            }
        }
        let err = |detail: String| NetError::Connect {
            addr: addr.to_string(),
            detail,
        };
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| err(e.to_string()))?
            .next()
            .ok_or_else(|| err("no address".into()))?;
        let conn = self
            .endpoint
            .connect(sock, MEMBER_NAME)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        if let Ok(mut c) = self.conns.lock() {
            c.insert(addr.to_string(), conn.clone());
        }
        Ok(conn)
    }

    fn forget(&self, addr: &str) {
        if let Ok(mut c) = self.conns.lock() {
            c.remove(addr);
        }
    }

    /// Send one request and wait for its reply, for at most `timeout`.
    pub async fn call(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        match tokio::time::timeout(timeout, self.call_inner(addr, req, None)).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout { addr: addr.into() }),
        }
    }

    async fn call_inner(
        &self,
        addr: &str,
        req: &Request,
        body: Option<PathBuf>,
    ) -> Result<Reply, NetError> {
        let conn = self.connection(addr).await?;
        let res = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, req)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(path) = body {
                let mut f = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::io::copy(&mut f, &mut send)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            send.finish().map_err(|e| e.to_string())?;
            read_frame::<Reply>(&mut recv)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match res {
            Ok(Reply::Refused(detail)) => Err(NetError::Refused {
                addr: addr.into(),
                detail,
            }),
            Ok(r) => Ok(r),
            Err(detail) => {
                self.forget(addr);
                Err(NetError::Stream {
                    addr: addr.into(),
                    detail,
                })
            }
        }
    }
}

/// Builds a client per target for openraft.
#[derive(Clone)]
pub struct Factory {
    pub id: u64,
    pub peers: Arc<Peers>,
}

pub struct Client {
    peers: Arc<Peers>,
    id: u64,
    target: u64,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Client;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Client {
        Client {
            peers: self.peers.clone(),
            id: self.id,
            target,
            addr: node.addr.clone(),
        }
    }
}

fn unreachable<E: std::error::Error>(e: &NetError) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn unexpected<E: std::error::Error>(addr: &str) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
        "{addr} sent a reply of the wrong kind"
    ))))
}

impl Client {
    /// A reply that is late is a timeout, not an unreachable member: openraft backs off for
    /// half a second from an unreachable one, and a follower that was only slow for a moment
    /// (a busy CPU, a large batch) would then stall commits for that long.
    async fn rpc<E: std::error::Error>(
        &self,
        req: Request,
        action: RPCTypes,
        opt: &RPCOption,
    ) -> Result<Reply, RPCError<u64, BasicNode, E>> {
        self.peers
            .call(&self.addr, &req, opt.hard_ttl())
            .await
            .map_err(|e| match e {
                NetError::Timeout { .. } => RPCError::Timeout(Timeout {
                    action,
                    id: self.id,
                    target: self.target,
                    timeout: opt.hard_ttl(),
                }),
                e => unreachable(&e),
            })
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .rpc(Request::Append(rpc), RPCTypes::AppendEntries, &option)
            .await?
        {
            Reply::Append(Ok(r)) => Ok(r),
            Reply::Append(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected(&self.addr)),
        }
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        // Snapshots travel whole through `full_snapshot`; the chunked RPC is never used.
        Err(RPCError::Network(NetworkError::new(
            &std::io::Error::other("chunked snapshots are not used; snapshots are streamed whole"),
        )))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .rpc(Request::Vote(rpc), RPCTypes::Vote, &option)
            .await?
        {
            Reply::Vote(Ok(r)) => Ok(r),
            Reply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected(&self.addr)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let path = snapshot.snapshot.path.clone();
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?
            .len();
        let req = Request::Snapshot {
            vote,
            meta: snapshot.meta.clone(),
            len,
        };
        tracing::info!(target_id = self.target, len, snapshot = %snapshot.meta.snapshot_id, "sending snapshot");
        let send = self.peers.call_inner(&self.addr, &req, Some(path));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => match r {
                Ok(Reply::Snapshot(Ok(resp))) => Ok(resp),
                Ok(Reply::Snapshot(Err(e))) => Err(StreamingError::Network(NetworkError::new(&std::io::Error::other(e)))),
                Ok(_) => Err(StreamingError::Network(NetworkError::new(&std::io::Error::other("wrong reply to a snapshot")))),
                Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            }
        }
    }
}

/// What the server side needs from the local member.
pub trait Handler: Send + Sync + 'static {
    fn raft(&self) -> &Raft<TypeConfig>;
    fn snapshot_dir(&self) -> PathBuf;
    fn forward(
        &self,
        cmd: Command,
    ) -> impl std::future::Future<Output = Result<Outcome, ForwardError>> + Send;
    fn read_index(&self) -> impl std::future::Future<Output = Result<u64, ForwardError>> + Send;
    fn join(
        &self,
        id: u64,
        addr: String,
    ) -> impl std::future::Future<Output = Result<(), ForwardError>> + Send;
    fn leave(&self, id: u64) -> impl std::future::Future<Output = Result<(), ForwardError>> + Send;
}

/// Accept member connections until the endpoint closes.
pub async fn serve<H: Handler>(endpoint: Endpoint, handler: Arc<H>) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a member connection");
                    return;
                }
            };
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let handler = handler.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    match handle(&*handler, send, recv).await {
                        Ok(()) => {}
                        Err(Failure::Bad(e)) => {
                            tracing::warn!(%remote, error = %e, "bad request from a member; closing its connection");
                            conn.close(1u32.into(), b"bad request");
                        }
                        // The caller gave up on this request (a timeout); its other requests on
                        // the connection are still good.
                        Err(Failure::Gone(e)) => {
                            tracing::debug!(%remote, error = %e, "a member left before its reply")
                        }
                    }
                });
            }
        });
    }
}

/// Why serving one request stopped.
enum Failure {
    /// The request itself was garbled: the peer is not speaking our protocol.
    Bad(std::io::Error),
    /// The caller stopped sending or waiting, usually on a timeout.
    Gone(std::io::Error),
}

async fn handle<H: Handler>(
    h: &H,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), Failure> {
    let req: Request = match read_frame(&mut recv).await {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
            return Err(Failure::Gone(e))
        }
        Err(e) => {
            let _ = write_frame(&mut send, &Reply::Refused(e.to_string())).await;
            let _ = send.finish();
            // Let the refusal reach the peer before the connection is closed under it.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            return Err(Failure::Bad(e));
        }
    };
    let reply = match req {
        Request::Append(rpc) => Reply::Append(h.raft().append_entries(rpc).await),
        Request::Vote(rpc) => Reply::Vote(h.raft().vote(rpc).await),
        Request::Snapshot { vote, meta, len } => {
            Reply::Snapshot(receive_snapshot(h, vote, meta, len, &mut recv).await)
        }
        Request::Forward(cmd) => Reply::Forward(h.forward(cmd).await),
        Request::ReadIndex => Reply::ReadIndex(h.read_index().await),
        Request::Join { id, addr } => Reply::Join(h.join(id, addr).await),
        Request::Leave { id } => Reply::Join(h.leave(id).await),
    };
    write_frame(&mut send, &reply)
        .await
        .map_err(Failure::Gone)?;
    send.finish()
        .map_err(|e| Failure::Gone(std::io::Error::other(e)))?;
    Ok(())
}

async fn receive_snapshot<H: Handler>(
    h: &H,
    vote: Vote<u64>,
    meta: SnapshotMeta<u64, BasicNode>,
    len: u64,
    recv: &mut RecvStream,
) -> Result<SnapshotResponse<u64>, String> {
    if len > MAX_SNAPSHOT {
        return Err(format!("snapshot of {len} bytes over the limit"));
    }
    let path = h
        .snapshot_dir()
        .join(format!("recv-{}.part", rand::random::<u64>()));
    let res = async {
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut limited = recv.take(len);
        let got = tokio::io::copy(&mut limited, &mut f)
            .await
            .map_err(|e| e.to_string())?;
        if got != len {
            return Err(format!("snapshot cut short at {got} of {len} bytes"));
        }
        f.sync_all().await.map_err(|e| e.to_string())?;
        // Checked here, before Raft sees it: a storage error inside Raft would stop this member.
        let p = path.clone();
        tokio::task::spawn_blocking(move || super::sm::verify(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(SnapFile { path: path.clone() }),
        };
        h.raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&path).await;
    }
    res
}

/// Map openraft's write error to what a forwarding member needs.
pub fn forward_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> ForwardError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ForwardError::NotLeader {
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        other => ForwardError::Failed(other.to_string()),
    }
}

pub fn read_error(e: RaftError<u64, CheckIsLeaderError<u64, BasicNode>>) -> ForwardError {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => ForwardError::NotLeader {
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        other => ForwardError::Failed(other.to_string()),
    }
}
