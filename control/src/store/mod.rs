//! The replicated, durable, revisioned key space the control plane stands on.
//!
//! ```text
//!  Store::txn ──▶ openraft ──▶ LogStore (fjall, group-committed fsync)
//!     │  (not leader: forward over QUIC)        │ committed
//!     ▼                                         ▼
//!  Store::range/get ◀── StateMachine (fjall: kv, history, meta) ──▶ Hub ──▶ Watch
//! ```
//!
//! Any member takes writes (followers forward them to the leader) and serves reads:
//! linearizable ones confirm with the leader first (read index), serializable ones read the
//! local state. Watches run on any member from its own history.

pub mod apply;
pub mod log;
pub mod net;
pub mod sm;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{Database, Readable};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use outpost_api::store::{prefix_end, Command, Expect, KeyValue, Op, Outcome, Revision};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::pki;
use net::{ForwardError, Peers, Reply, Request};

openraft::declare_raft_types!(
    /// Raft types of the store.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = sm::SnapFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Errors grouped by what the caller should do: retry (`Unavailable`), fix the request
/// (`Invalid`, `Compacted`), or give up (`Corrupt`, `Io`, `Storage`, `Stopped`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(#[from] fjall::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("revision {requested} is compacted (history starts after {compacted})")]
    Compacted { requested: u64, compacted: u64 },
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("the store has stopped")]
    Stopped,
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    // Writing CBOR into a Vec fails only if a Serialize impl errors; ours do not.
    if let Err(e) = ciborium::into_writer(v, &mut buf) {
        tracing::error!(error = %e, "encoding a record failed");
    }
    buf
}

pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Error> {
    ciborium::from_reader(b).map_err(|e| Error::Corrupt {
        what: std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("record")
            .into(),
        detail: e.to_string(),
    })
}

/// When the leader drops old watch history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    /// Keep the newest N revisions.
    Revisions(u64),
    /// Keep revisions younger than this.
    Age(Duration),
}

/// Where to compact to, or `None` if nothing is due. `samples` are (time, revision) pairs
/// the leader recorded, oldest first.
pub fn compaction_target(
    policy: Compaction,
    now: Instant,
    samples: &VecDeque<(Instant, u64)>,
    revision: u64,
    compacted: u64,
) -> Option<u64> {
    let target = match policy {
        Compaction::Revisions(n) => revision.saturating_sub(n),
        Compaction::Age(age) => samples
            .iter()
            .take_while(|(t, _)| now.saturating_duration_since(*t) >= age)
            .last()
            .map_or(0, |(_, r)| *r),
    };
    (target > compacted).then_some(target)
}

#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub data_dir: PathBuf,
    /// UDP address for member traffic.
    pub listen: SocketAddr,
    /// Address other members reach this one at; defaults to `listen`.
    pub advertise: Option<String>,
    /// Directory with the peer CA; defaults to `<data_dir>/pki`.
    pub pki_dir: Option<PathBuf>,
    /// An existing member to join through, instead of starting a new cluster.
    pub join: Option<String>,
    pub compaction: Compaction,
    /// Build a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept behind the last snapshot, for followers that are only a little behind.
    pub keep_logs: u64,
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    /// How often watchers get progress notifications.
    pub progress_every: Duration,
    /// This member stays alone (the one-machine default, whose peer port is an ephemeral
    /// loopback one): its Raft core and state machine run on a thread of their own, so that
    /// a write hands over between tasks on one thread rather than waking other threads. With
    /// peers to replicate to, that one thread would be the bottleneck.
    pub lone: bool,
}

impl Config {
    pub fn new(id: u64, data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Config {
            id,
            data_dir: data_dir.into(),
            listen,
            advertise: None,
            pki_dir: None,
            join: None,
            compaction: Compaction::Age(Duration::from_secs(300)),
            snapshot_every: 100_000,
            keep_logs: 1_000,
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(800),
            progress_every: Duration::from_secs(5),
            lone: false,
        }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began, on any member.
    #[default]
    Linearizable,
    /// This member's current state, possibly behind the leader.
    Serializable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// The store revision the keys were read at.
    pub revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: u64,
    pub addr: String,
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: u64,
    pub revision: u64,
    pub compacted: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: BTreeMap<u64, String>,
}

struct Inner {
    id: u64,
    addr: String,
    raft: Raft<TypeConfig>,
    sm: Arc<sm::Shared>,
    peers: Arc<Peers>,
    endpoint: quinn::Endpoint,
    timeout: Duration,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    proposals: mpsc::Sender<Proposal>,
    /// Proposals between `client_write` and its answer, through either path.
    in_flight: Arc<AtomicUsize>,
    /// Ends the Raft core's own thread, for a lone member.
    core_stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    syncer: log::Syncer,
    /// Where the peer CA and this member's certificate live.
    pki_dir: PathBuf,
}

type Proposal = (
    Command,
    tokio::sync::oneshot::Sender<Result<Outcome, ForwardError>>,
);

/// Most commands in one batched log entry.
const MAX_BATCH: usize = 1024;

/// Counts a proposal in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n.clone())
    }

    /// Only if nothing else is in flight.
    fn alone(n: &Arc<AtomicUsize>) -> Option<Self> {
        n.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| InFlight(n.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Proposes local writes to Raft one log entry at a time. openraft 0.9 syncs each proposal
/// before it takes the next, so the writes that arrive meanwhile are gathered and proposed
/// together as one `Command::Batch`: one disk sync for all of them.
async fn propose_loop(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::Receiver<Proposal>,
    in_flight: Arc<AtomicUsize>,
) {
    let mut queue: Vec<Proposal> = Vec::new();
    while let Some(first) = rx.recv().await {
        let _busy = InFlight::enter(&in_flight);
        queue.push(first);
        while queue.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => queue.push(p),
                Err(_) => break,
            }
        }
        let (cmds, replies): (Vec<Command>, Vec<_>) = queue.drain(..).unzip();
        let one = cmds.len() == 1;
        let cmd = if one {
            cmds.into_iter()
                .next()
                .unwrap_or(Command::Batch(Vec::new()))
        } else {
            Command::Batch(cmds)
        };
        match raft.client_write(cmd).await {
            Ok(r) => match (one, r.data) {
                (false, Outcome::Batch(outcomes)) if outcomes.len() == replies.len() => {
                    for (tx, o) in replies.into_iter().zip(outcomes) {
                        let _ = tx.send(Ok(o));
                    }
                }
                (true, o) => {
                    for tx in replies {
                        let _ = tx.send(Ok(o.clone()));
                    }
                }
                (_, other) => {
                    let e = ForwardError::Failed(format!(
                        "batch applied with a mismatched outcome {other:?}"
                    ));
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            },
            Err(e) => {
                let e = net::forward_error(e);
                for tx in replies {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Start the Raft core of a lone member on a current-thread runtime of its own; openraft's
/// tasks (the core, the state machine worker) go where `Raft::new` runs. The sender ends it.
#[allow(clippy::type_complexity)]
fn core_thread(
    id: u64,
    raft_cfg: openraft::Config,
    factory: net::Factory,
    log_store: log::LogStore,
    state_machine: sm::StateMachine,
) -> Result<
    (
        impl std::future::Future<Output = Result<Raft<TypeConfig>, openraft::error::Fatal<u64>>>,
        tokio::sync::oneshot::Sender<()>,
    ),
    Error,
> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Unavailable(format!("the Raft core's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("raft-core".into())
        .spawn(move || {
            rt.block_on(async move {
                let raft = Raft::new(id, Arc::new(raft_cfg), factory, log_store, state_machine);
                let _ = tx.send(raft.await);
                // Until the store shuts down or is dropped.
                let _ = stop_rx.await;
            })
        })
        .map_err(|e| Error::Unavailable(format!("the Raft core's thread: {e}")))?;
    let raft = async move { rx.await.unwrap_or(Err(openraft::error::Fatal::Panicked)) };
    Ok((raft, stop_tx))
}

/// A running member of the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// The server side of the member channel, backed by the local member.
struct Local(Store);

impl net::Handler for Local {
    fn raft(&self) -> &Raft<TypeConfig> {
        &self.0.inner.raft
    }
    fn snapshot_dir(&self) -> PathBuf {
        self.0.inner.sm.snap_dir.clone()
    }
    async fn forward(&self, cmd: Command) -> Result<Outcome, ForwardError> {
        self.0
            .inner
            .raft
            .client_write(cmd)
            .await
            .map(|r| r.data)
            .map_err(net::forward_error)
    }
    async fn read_index(&self) -> Result<u64, ForwardError> {
        let id = self
            .0
            .inner
            .raft
            .ensure_linearizable()
            .await
            .map_err(net::read_error)?;
        Ok(id.map_or(0, |l| l.index))
    }
    async fn join(&self, id: u64, addr: String) -> Result<(), ForwardError> {
        self.0
            .add_member(id, addr)
            .await
            .map_err(|e| ForwardError::Failed(e.to_string()))
    }
    async fn leave(&self, id: u64) -> Result<(), ForwardError> {
        self.0
            .remove_member(id)
            .await
            .map_err(|e| ForwardError::Failed(e.to_string()))
    }
}

impl Store {
    /// Open (or create) a member's data and start it. Returns once the member runs; it may
    /// not know a leader yet.
    pub async fn open(cfg: Config) -> Result<Store, Error> {
        let dir = &cfg.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let db = open_db(dir).await?;
        let syncer = log::Syncer::start(db.clone());
        let hub = watch::Hub::default();
        let log_store = log::LogStore::open(&db, cfg.id, syncer.clone())?;
        let state_machine = sm::StateMachine::open(&db, cfg.id, dir, syncer.clone(), hub)?;
        let shared = state_machine.shared.clone();

        let pki_dir = cfg.pki_dir.clone().unwrap_or_else(|| dir.join("pki"));
        let identity = pki::load_or_issue(&pki_dir, cfg.join.is_none())?;
        let server = pki::server_config(&identity, net::ALPN)?;
        let client = pki::client_config(&identity, net::ALPN)?;
        let quic_err = |e: String| Error::Unavailable(format!("quic: {e}"));
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| quic_err(e.to_string()))?;
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| quic_err(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(2)));
        transport.max_idle_timeout(Some(
            Duration::from_secs(10)
                .try_into()
                .map_err(|_| quic_err("idle timeout".into()))?,
        ));
        let transport = Arc::new(transport);
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server));
        server_cfg.transport_config(transport.clone());
        let mut endpoint =
            quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|e| Error::io(dir, e))?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(client));
        client_cfg.transport_config(transport);
        endpoint.set_default_client_config(client_cfg);
        let bound = endpoint.local_addr().map_err(|e| Error::io(dir, e))?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());

        let hb = cfg.heartbeat.as_millis() as u64;
        let et = cfg.election_timeout.as_millis() as u64;
        let raft_cfg = openraft::Config {
            cluster_name: "outpost".into(),
            heartbeat_interval: hb,
            election_timeout_min: et,
            election_timeout_max: et * 2,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 1024,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let peers = Arc::new(Peers::new(endpoint.clone()));
        let (proposals, proposal_rx) = mpsc::channel(MAX_BATCH * 4);
        let factory = net::Factory {
            id: cfg.id,
            peers: peers.clone(),
        };
        let (raft, core_stop) = if cfg.lone {
            let (raft, stop) = core_thread(cfg.id, raft_cfg, factory, log_store, state_machine)?;
            (raft.await, Some(stop))
        } else {
            let raft = Raft::new(
                cfg.id,
                Arc::new(raft_cfg),
                factory,
                log_store,
                state_machine,
            );
            (raft.await, None)
        };
        let raft = raft.map_err(|e| Error::Unavailable(e.to_string()))?;

        let store = Store {
            inner: Arc::new(Inner {
                id: cfg.id,
                addr: addr.clone(),
                raft,
                sm: shared,
                peers,
                endpoint: endpoint.clone(),
                timeout: Duration::from_secs(10),
                tasks: std::sync::Mutex::new(Vec::new()),
                proposals,
                in_flight: Arc::new(AtomicUsize::new(0)),
                core_stop: std::sync::Mutex::new(core_stop),
                syncer,
                pki_dir: pki_dir.clone(),
            }),
        };
        let proposer = tokio::spawn(propose_loop(
            store.inner.raft.clone(),
            proposal_rx,
            store.inner.in_flight.clone(),
        ));
        store.track(proposer);
        let server = tokio::spawn(net::serve(endpoint, Arc::new(Local(store.clone()))));
        store.track(server);
        tracing::info!(id = cfg.id, %addr, "store member listening");

        let initialized = store
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if !initialized {
            match &cfg.join {
                None => {
                    let members = BTreeMap::from([(cfg.id, BasicNode { addr: addr.clone() })]);
                    store
                        .inner
                        .raft
                        .initialize(members)
                        .await
                        .map_err(|e| Error::Unavailable(e.to_string()))?;
                }
                Some(via) => store.join_via(via).await?,
            }
        }
        store.note_membership();
        store.spawn_background(cfg.compaction, cfg.progress_every);
        Ok(store)
    }

    async fn join_via(&self, via: &str) -> Result<(), Error> {
        let req = Request::Join {
            id: self.inner.id,
            addr: self.inner.addr.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut wait = Duration::from_millis(200);
        loop {
            let err = match self
                .inner
                .peers
                .call(via, &req, Duration::from_secs(60))
                .await
            {
                Ok(Reply::Join(Ok(()))) => {
                    tracing::info!(via, "joined the cluster");
                    return Ok(());
                }
                Ok(Reply::Join(Err(e))) => e.to_string(),
                Ok(other) => format!("unexpected reply {other:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(Error::Unavailable(format!("joining through {via}: {err}")));
            }
            tracing::warn!(via, error = %err, "join failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(3));
        }
    }

    fn track(&self, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.push(task);
        }
    }

    fn spawn_background(&self, policy: Compaction, progress_every: Duration) {
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
            let tick = Duration::from_millis(500);
            let mut since_progress = Duration::ZERO;
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = Store { inner };
                store.note_membership();
                since_progress += tick;
                if since_progress >= progress_every {
                    store.inner.sm.hub.progress();
                    since_progress = Duration::ZERO;
                }
                let now = Instant::now();
                let st = store.inner.sm.state();
                samples.push_back((now, st.revision));
                if let Compaction::Age(age) = policy {
                    // Keep one sample older than the window so the target can reach it.
                    while samples.len() > 2 && now.saturating_duration_since(samples[1].0) >= age {
                        samples.pop_front();
                    }
                } else {
                    samples.clear();
                }
                if !store.leads() {
                    continue;
                }
                if let Some(target) =
                    compaction_target(policy, now, &samples, st.revision, st.compacted)
                {
                    if let Err(e) = store.write(Command::Compact { revision: target }).await {
                        tracing::warn!(error = %e, target, "compaction failed");
                    }
                }
            }
        });
        self.track(task);
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The directory of the peer CA and this member's certificate.
    pub fn pki_dir(&self) -> &Path {
        &self.inner.pki_dir
    }

    /// Tell the log whether this member is alone in its membership (voters and learners);
    /// looked at twice a second, as it changes only when members are added or removed.
    fn note_membership(&self) {
        let m = self.inner.raft.metrics();
        let alone = {
            let m = m.borrow();
            let mut nodes = m.membership_config.membership().nodes();
            nodes.next().is_some_and(|(id, _)| *id == self.inner.id) && nodes.next().is_none()
        };
        self.inner.syncer.set_solo(alone);
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    fn leader_addr(&self) -> Option<(u64, String)> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.addr.clone()))
    }

    /// Whether this member is the leader, as far as it knows; cheap enough for control
    /// loops to ask every round.
    pub fn leads(&self) -> bool {
        self.inner.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The revision this member has applied.
    pub fn revision(&self) -> u64 {
        self.inner.sm.revision()
    }

    /// Wait for a leader to be known, up to the store's timeout.
    async fn wait_leader(&self) -> Result<(u64, String), Error> {
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            if let Some(l) = self.leader_addr() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable("no leader elected".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Apply a command through the leader, wherever it is.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, Error> {
        let deadline = Instant::now() + self.inner.timeout;
        let mut hint: Option<(u64, String)> = None;
        loop {
            let attempt = match hint.take() {
                Some((id, _)) if id == self.inner.id => None,
                Some((_, addr)) => Some(addr),
                None => match self.leader_addr() {
                    Some((id, _)) if id == self.inner.id => None,
                    Some((_, addr)) => Some(addr),
                    None => {
                        // Try locally: a single member elects itself, and openraft tells us
                        // the leader if it knows one.
                        None
                    }
                },
            };
            let err = match attempt {
                None => match self.propose(cmd.clone()).await {
                    Ok(o) => return Ok(o),
                    Err(e) => e,
                },
                Some(addr) => match self
                    .inner
                    .peers
                    .call(&addr, &Request::Forward(cmd.clone()), self.inner.timeout)
                    .await
                {
                    Ok(Reply::Forward(Ok(o))) => return Ok(o),
                    Ok(Reply::Forward(Err(e))) => e,
                    Ok(other) => ForwardError::Failed(format!("unexpected reply {other:?}")),
                    Err(e) => ForwardError::Failed(e.to_string()),
                },
            };
            if Instant::now() > deadline {
                return Err(Error::Unavailable(err.to_string()));
            }
            match err {
                ForwardError::NotLeader { leader: Some(l) } => hint = Some(l),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Propose on this member (which should be the leader): itself when nothing else is in
    /// flight, as there is nothing to batch with and the batcher would cost two task
    /// switches; else through the batcher.
    async fn propose(&self, cmd: Command) -> Result<Outcome, ForwardError> {
        if let Some(_alone) = InFlight::alone(&self.inner.in_flight) {
            return self
                .inner
                .raft
                .client_write(cmd)
                .await
                .map(|r| r.data)
                .map_err(net::forward_error);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .proposals
            .send((cmd, tx))
            .await
            .map_err(|_| ForwardError::Failed("the store has stopped".into()))?;
        rx.await
            .map_err(|_| ForwardError::Failed("the store has stopped".into()))?
    }

    /// Apply `ops` atomically (see [`Outcome`]).
    pub async fn txn(&self, ops: Vec<Op>) -> Result<Outcome, Error> {
        self.write(Command::Txn(ops)).await
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<Outcome, Error> {
        self.txn(vec![Op::Put {
            key: key.into(),
            value,
            expect,
        }])
        .await
    }

    pub async fn delete(&self, key: &str, expect: Expect) -> Result<Outcome, Error> {
        self.txn(vec![Op::Delete {
            key: key.into(),
            expect,
        }])
        .await
    }

    /// Make this member's state reflect every write acknowledged before now.
    async fn read_barrier(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            let index = match self.inner.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(e) => match net::read_error(e) {
                    ForwardError::NotLeader {
                        leader: Some((id, addr)),
                    } if id != self.inner.id => {
                        match self
                            .inner
                            .peers
                            .call(&addr, &Request::ReadIndex, self.inner.timeout)
                            .await
                        {
                            Ok(Reply::ReadIndex(Ok(i))) => Ok(i),
                            Ok(Reply::ReadIndex(Err(e))) => Err(e.to_string()),
                            Ok(other) => Err(format!("unexpected reply {other:?}")),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    e => Err(e.to_string()),
                },
            };
            match index {
                Ok(i) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return self
                        .inner
                        .raft
                        .wait(Some(left))
                        .applied_index_at_least(Some(i), "read barrier")
                        .await
                        .map(|_| ())
                        .map_err(|e| Error::Unavailable(e.to_string()));
                }
                Err(e) if Instant::now() > deadline => return Err(Error::Unavailable(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub async fn get(&self, key: &str, c: Consistency) -> Result<Option<KeyValue>, Error> {
        if c == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        match self.inner.sm.kv.get(key)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Whether any key starts with `prefix`, on this member: a cheap look before a range.
    pub fn has_prefix(&self, prefix: &str) -> Result<bool, Error> {
        match self.inner.sm.kv.prefix(prefix).next() {
            None => Ok(false),
            Some(g) => g.key().map(|_| true).map_err(Error::from),
        }
    }

    /// How many keys start with `prefix`, on this member.
    pub async fn count_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let sm = self.inner.sm.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for item in sm.kv.prefix(&prefix) {
                item.key()?;
                n += 1;
            }
            Ok(n)
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?
    }

    /// Keys starting with `prefix`, in order, after `start_after` if given, at most `limit`
    /// (0 means no limit), all read at one revision.
    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        c: Consistency,
    ) -> Result<RangeResult, Error> {
        if c == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        let sm = self.inner.sm.clone();
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || -> Result<RangeResult, Error> {
            let snap = sm.db.snapshot();
            let revision = sm.state_in(&snap)?.revision;
            let (start, end) = key_bounds(&prefix, start_after.as_deref());
            let mut kvs = Vec::new();
            let mut more = false;
            for item in snap.range(&sm.kv, (start, end)) {
                if limit > 0 && kvs.len() == limit {
                    more = true;
                    break;
                }
                let v = item.value()?;
                kvs.push(decode::<KeyValue>(&v)?);
            }
            Ok(RangeResult {
                kvs,
                more,
                revision,
            })
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?
    }

    /// [`Store::range`] as the keys stood at `revision`: today's keys with each change made
    /// since undone from the history (the first change to a key after `revision` holds what
    /// it was then). What a paginated list's later pages read, so all its pages are one
    /// snapshot. Fails with [`Error::Compacted`] once that history is gone.
    pub async fn range_at(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: u64,
    ) -> Result<RangeResult, Error> {
        if self.revision() < revision {
            self.read_barrier().await?;
        }
        let sm = self.inner.sm.clone();
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || -> Result<RangeResult, Error> {
            let snap = sm.db.snapshot();
            let st = sm.state_in(&snap)?;
            if revision < st.compacted {
                return Err(Error::Compacted {
                    requested: revision,
                    compacted: st.compacted,
                });
            }
            if revision > st.revision {
                return Err(Error::Invalid(format!(
                    "revision {revision} is ahead of the store ({})",
                    st.revision
                )));
            }
            let after = |k: &str| {
                k.starts_with(prefix.as_str()) && start_after.as_deref().is_none_or(|s| k > s)
            };
            let mut then: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
            for item in snap.range(
                &sm.history,
                sm::rev_key(revision + 1)..=sm::rev_key(st.revision),
            ) {
                let events: Vec<outpost_api::store::Event> = decode(&item.value()?)?;
                for e in events.into_iter().filter(|e| after(&e.kv.key)) {
                    then.entry(e.kv.key).or_insert(e.prev);
                }
            }
            let (start, end) = key_bounds(&prefix, start_after.as_deref());
            // Today's keys and the changed ones, merged in key order; a changed key's old
            // state (or its absence) stands for today's.
            let mut now = snap
                .range(&sm.kv, (start, end))
                .map(|item| -> Result<KeyValue, Error> { decode(&item.value()?) })
                .peekable();
            let mut changed = then.into_iter().peekable();
            let (mut kvs, mut more) = (Vec::new(), false);
            loop {
                let from_history = match (now.peek(), changed.peek()) {
                    (None, None) => break,
                    (Some(_), None) | (Some(Err(_)), Some(_)) => false,
                    (None, Some(_)) => true,
                    (Some(Ok(kv)), Some((k, _))) => k.as_str() <= kv.key.as_str(),
                };
                let kv = if from_history {
                    let Some((k, was)) = changed.next() else {
                        break;
                    };
                    if matches!(now.peek(), Some(Ok(kv)) if kv.key == k) {
                        now.next();
                    }
                    was
                } else {
                    match now.next() {
                        Some(kv) => Some(kv?),
                        None => break,
                    }
                };
                let Some(kv) = kv else { continue };
                if limit > 0 && kvs.len() == limit {
                    more = true;
                    break;
                }
                kvs.push(kv);
            }
            Ok(RangeResult {
                kvs,
                more,
                revision,
            })
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?
    }

    /// Follow changes under `prefix` with revisions above `after`.
    ///
    /// Fails with [`Error::Compacted`] if history after `after` is no longer kept.
    pub async fn watch(&self, prefix: &str, after: u64) -> Result<Watch, Error> {
        let sm = &self.inner.sm;
        let sub = sm.hub.subscribe(prefix);
        let guard = WatchGuard {
            hub: sm.hub.clone(),
            id: sub.id,
        };
        let upto = sub.after;
        let backlog = if after < upto {
            let sm = sm.clone();
            let prefix = prefix.to_string();
            tokio::task::spawn_blocking(move || read_history(&sm, &prefix, after, upto))
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))??
        } else {
            VecDeque::new()
        };
        // Compaction only moves forward, so checking after the read covers it.
        let compacted = sm.state().compacted;
        if after < compacted {
            return Err(Error::Compacted {
                requested: after,
                compacted,
            });
        }
        Ok(Watch {
            rx: sub.rx,
            backlog,
            last: after,
            _guard: guard,
        })
    }

    /// Add a member: as a learner first, so it catches up without holding up writes, then
    /// as a voter. Runs on the leader, wherever this is called.
    pub async fn add_member(&self, id: u64, addr: String) -> Result<(), Error> {
        if !self.leads() {
            let (lid, laddr) = self.wait_leader().await?;
            if lid != self.inner.id {
                return match self
                    .inner
                    .peers
                    .call(&laddr, &Request::Join { id, addr }, Duration::from_secs(60))
                    .await
                {
                    Ok(Reply::Join(Ok(()))) => Ok(()),
                    Ok(Reply::Join(Err(e))) => Err(Error::Unavailable(e.to_string())),
                    Ok(other) => Err(Error::Unavailable(format!("unexpected reply {other:?}"))),
                    Err(e) => Err(Error::Unavailable(e.to_string())),
                };
            }
        }
        let raft = &self.inner.raft;
        let unavailable = |e: String| Error::Unavailable(e);
        let voters: BTreeSet<u64> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.contains(&id) {
            return Ok(());
        }
        raft.add_learner(id, BasicNode { addr }, true)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        tracing::info!(id, "member added");
        Ok(())
    }

    /// Remove a member from the cluster.
    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        if !self.leads() {
            let (lid, laddr) = self.wait_leader().await?;
            if lid != self.inner.id {
                return match self
                    .inner
                    .peers
                    .call(&laddr, &Request::Leave { id }, Duration::from_secs(60))
                    .await
                {
                    Ok(Reply::Join(Ok(()))) => Ok(()),
                    Ok(Reply::Join(Err(e))) => Err(Error::Unavailable(e.to_string())),
                    Ok(other) => Err(Error::Unavailable(format!("unexpected reply {other:?}"))),
                    Err(e) => Err(Error::Unavailable(e.to_string())),
                };
            }
        }
        self.inner
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(())
    }

    pub fn status(&self) -> Status {
        let m = self.inner.raft.metrics().borrow().clone();
        let st = self.inner.sm.state();
        let membership = m.membership_config.membership();
        Status {
            id: self.inner.id,
            addr: self.inner.addr.clone(),
            state: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            revision: st.revision,
            compacted: st.compacted,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            members: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
        }
    }

    /// A digest of every key, value and revision, with the revision it was taken at, so
    /// members can be compared.
    pub async fn hash(&self) -> Result<(u64, String), Error> {
        let sm = self.inner.sm.clone();
        tokio::task::spawn_blocking(move || -> Result<(u64, String), Error> {
            let snap = sm.db.snapshot();
            let revision = sm.state_in(&snap)?.revision;
            let mut h = Sha256::new();
            for item in snap.iter(&sm.kv) {
                let (k, v) = item.into_inner()?;
                h.update((k.len() as u64).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(&v);
            }
            let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Ok((revision, hex))
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?
    }

    /// Build a snapshot now (and let the log behind it be purged).
    pub async fn snapshot(&self) -> Result<(), Error> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    /// Stop this member. Its data is released once the last handle to it is dropped.
    pub async fn shutdown(&self) {
        if let Ok(mut t) = self.inner.tasks.lock() {
            for task in t.drain(..) {
                task.abort();
            }
        }
        let _ = self.inner.raft.shutdown().await;
        if let Some(stop) = self.inner.core_stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        self.inner.endpoint.wait_idle().await;
    }
}

/// Keyspace options: memtables flush at 16 MiB rather than fjall's 64 MiB, so that a small
/// board does not hold tens of megabytes of recent writes in memory per keyspace.
pub(crate) fn keyspace_options() -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default().max_memtable_size(16 * 1024 * 1024)
}

/// The current key space's memtable: 8 MiB, where it was 16 like the small keyspaces'. A
/// member with 10,000 pods held 143–151 MB with 16 and 131–140 MB with 8, with the same
/// paced tail (`outpost-bench api`, session 20).
const KV_MEMTABLE: u64 = 8 << 20;

/// Options for the current key space: objects of 512 bytes or more (a pod is about a
/// kilobyte) live in blob files, and the tables hold keys and pointers. Merging tables then
/// rewrites pointers, not objects: with the objects inline, each merge into the first level
/// rewrote the whole key space at once, and on a shared disk that burst of writes made every
/// member's log sync wait behind it (3-member paced p99 of 52–113 ms against 12–23 ms
/// separated). fjall reads these options only when it creates the keyspace, so a data
/// directory made before keeps its layout.
pub(crate) fn kv_options(id: u64) -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default()
        .max_memtable_size(stagger(id, KV_MEMTABLE))
        .with_kv_separation(Some(
            fjall::KvSeparationOptions::default().separation_threshold(512),
        ))
}

/// Options for keyspaces written once and read back rarely (the Raft log, the revision
/// history): their recent writes are not what reads look for, so a small memtable suffices.
pub(crate) fn append_options(id: u64) -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default().max_memtable_size(stagger(id, 4 << 20))
}

/// A memtable size made a little different for each member. Members get the same writes at
/// the same moments, so with equal memtables they all flush (and then merge) at once; where
/// they share a disk, each of those stalls carries every member's flush and holds up the
/// log syncs a commit waits for. Sizes 0.8–1.2 times the nominal one keep their flushes
/// apart, and the members' memory the same on average.
pub(crate) fn stagger(id: u64, bytes: u64) -> u64 {
    const SIXTEENTHS: [u64; 5] = [16, 13, 19, 14, 18];
    bytes * SIXTEENTHS[(id.saturating_sub(1) % 5) as usize] / 16
}

/// fjall's background threads (flushes and compactions). With two or more, its first worker
/// hands every compaction request back to the queue for another, and while that other is
/// busy the two bounce it between them; on a board's two cores one worker did 5–10 % more
/// writes/s (`outpost-bench store`, 1 and 3 members).
const FJALL_WORKERS: usize = 1;

/// Open the member's database. A previous instance may still be letting go of it (a process
/// exiting, or an in-process store whose tasks are finishing), so a lock is waited out for a
/// while before it counts as "another member runs here".
async fn open_db(dir: &Path) -> Result<Database, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Database::builder(dir.join("db"))
            .cache_size(16 * 1024 * 1024)
            .worker_threads(FJALL_WORKERS)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(fjall::Error::Locked) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(fjall::Error::Locked) => {
                return Err(Error::Unavailable(format!(
                    "{} is in use by another running member",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(Error::Corrupt {
                    what: format!("database in {}", dir.display()),
                    detail: e.to_string(),
                })
            }
        }
    }
}

/// The keys under `prefix` after `start_after` (if it falls under the prefix or past it).
fn key_bounds(
    prefix: &str,
    start_after: Option<&str>,
) -> (std::ops::Bound<String>, std::ops::Bound<String>) {
    use std::ops::Bound;
    let start = match start_after {
        Some(k) if k >= prefix => Bound::Excluded(k.to_string()),
        _ => Bound::Included(prefix.to_string()),
    };
    let end = match prefix_end(prefix) {
        Some(e) => Bound::Excluded(e),
        None => Bound::Unbounded,
    };
    (start, end)
}

fn read_history(
    sm: &sm::Shared,
    prefix: &str,
    after: u64,
    upto: u64,
) -> Result<VecDeque<Revision>, Error> {
    let mut out = VecDeque::new();
    for item in sm.history.range(sm::rev_key(after + 1)..=sm::rev_key(upto)) {
        let (k, v) = item.into_inner()?;
        let revision = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| Error::Corrupt {
            what: "history key".into(),
            detail: format!("{} bytes", k.len()),
        })?);
        let mut events: Vec<outpost_api::store::Event> = decode(&v)?;
        events.retain(|e| e.kv.key.starts_with(prefix));
        if !events.is_empty() {
            out.push_back(Revision { revision, events });
        }
    }
    Ok(out)
}

struct WatchGuard {
    hub: watch::Hub,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
    }
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// The events of one revision under the prefix.
    Revision(Arc<Revision>),
    /// Everything up to this revision has been delivered.
    Progress(u64),
}

/// A stream of changes. It ends (returns `None`) when it fell behind or the member's history
/// was replaced; resume from the last revision seen.
pub struct Watch {
    rx: mpsc::Receiver<watch::Msg>,
    backlog: VecDeque<Revision>,
    last: u64,
    _guard: WatchGuard,
}

impl Watch {
    /// The revision of the last event delivered (or the starting point).
    pub fn last(&self) -> u64 {
        self.last
    }

    pub async fn next(&mut self) -> Option<WatchItem> {
        if let Some(r) = self.backlog.pop_front() {
            self.last = r.revision;
            return Some(WatchItem::Revision(Arc::new(r)));
        }
        loop {
            match self.rx.recv().await? {
                watch::Msg::Revision(r) if r.revision > self.last => {
                    self.last = r.revision;
                    return Some(WatchItem::Revision(r));
                }
                watch::Msg::Revision(_) => continue,
                watch::Msg::Progress(p) => return Some(WatchItem::Progress(p.max(self.last))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_by_revisions() {
        let s = VecDeque::new();
        let now = Instant::now();
        assert_eq!(
            compaction_target(Compaction::Revisions(100), now, &s, 50, 0),
            None
        );
        assert_eq!(
            compaction_target(Compaction::Revisions(100), now, &s, 250, 0),
            Some(150)
        );
        assert_eq!(
            compaction_target(Compaction::Revisions(100), now, &s, 250, 150),
            None
        );
    }

    #[test]
    fn compaction_by_age() {
        let now = Instant::now();
        let age = Duration::from_secs(60);
        let s: VecDeque<_> = [
            (now - Duration::from_secs(90), 10),
            (now - Duration::from_secs(61), 20),
            (now - Duration::from_secs(30), 30),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            compaction_target(Compaction::Age(age), now, &s, 40, 0),
            Some(20)
        );
        assert_eq!(
            compaction_target(Compaction::Age(age), now, &s, 40, 20),
            None
        );
    }
}
