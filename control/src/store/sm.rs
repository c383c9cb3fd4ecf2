//! The state machine on fjall: the revisioned key space, its watch history and snapshots.
//!
//! Keyspaces: `kv` (key → `KeyValue`), `history` (revision → that revision's events) and
//! `sm_meta` (the applied log id, membership, revision and compaction point, written in the
//! same atomic batch as the data they describe). Apply writes are not synced on their own: the
//! Raft log shares the journal, so the log's sync covers them, and a crash loses at most a
//! suffix that the log replays.
//!
//! A snapshot is one file: a CBOR header, every key, the retained history, an end marker and a
//! SHA-256 of all that. It is checked before anything is installed from it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fjall::{Database, Keyspace, Readable};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use outpost_api::store::{Command, Event, KeyValue, Outcome, Revision};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::apply::{apply_txn, View};
use super::log::Syncer;
use super::watch::Hub;
use super::{decode, encode, Error, TypeConfig};

const STATE: &[u8] = b"state";
const SNAPSHOT: &[u8] = b"snapshot";
const INSTALLING: &[u8] = b"installing";
const LOAD_BATCH: usize = 4096;

/// What the state machine has applied, kept atomically with the data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmState {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
    pub revision: u64,
    pub compacted: u64,
}

/// A snapshot held in a file.
#[derive(Debug, Clone)]
pub struct SnapFile {
    pub path: PathBuf,
}

pub fn rev_key(r: u64) -> [u8; 8] {
    r.to_be_bytes()
}

/// The state machine's data, shared with the read and watch paths.
pub struct Shared {
    pub db: Database,
    pub kv: Keyspace,
    pub history: Keyspace,
    meta: Keyspace,
    pub snap_dir: PathBuf,
    pub state: RwLock<SmState>,
    pub hub: Hub,
    syncer: Syncer,
}

impl Shared {
    /// The revision applied, without copying the rest of the state.
    pub fn revision(&self) -> u64 {
        match self.state.read() {
            Ok(s) => s.revision,
            Err(p) => p.into_inner().revision,
        }
    }

    pub fn state(&self) -> SmState {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_state(&self, s: SmState) {
        match self.state.write() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
    }

    /// The state recorded in a fjall snapshot, consistent with that snapshot's keys.
    pub fn state_in(&self, snap: &fjall::Snapshot) -> Result<SmState, Error> {
        match snap.get(&self.meta, STATE)? {
            Some(v) => decode(&v),
            None => Ok(SmState::default()),
        }
    }
}

pub struct StateMachine {
    pub shared: Arc<Shared>,
}

fn sm_err(e: impl ToString) -> StorageError<u64> {
    StorageIOError::apply(LogId::default(), &io::Error::other(e.to_string())).into()
}

fn snap_err(e: impl ToString) -> StorageError<u64> {
    StorageIOError::read_snapshot(None, &io::Error::other(e.to_string())).into()
}

impl StateMachine {
    /// Open the state machine of member `id` (see [`super::stagger`]).
    pub fn open(
        db: &Database,
        id: u64,
        dir: &Path,
        syncer: Syncer,
        hub: Hub,
    ) -> Result<Self, Error> {
        let snap_dir = dir.join("snapshots");
        fs::create_dir_all(&snap_dir).map_err(|e| Error::io(&snap_dir, e))?;
        let shared = Arc::new(Shared {
            db: db.clone(),
            kv: db.keyspace("kv", || super::kv_options(id))?,
            history: db.keyspace("history", || super::append_options(id))?,
            meta: db.keyspace("sm_meta", super::keyspace_options)?,
            snap_dir,
            state: RwLock::new(SmState::default()),
            hub,
            syncer,
        });
        // An install that was cut short is finished from its file before anything reads.
        if let Some(v) = shared.meta.get(INSTALLING)? {
            let meta: SnapshotMeta<u64, BasicNode> = decode(&v)?;
            let path = shared.snap_dir.join(format!("{}.snap", meta.snapshot_id));
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing an interrupted snapshot install");
            verify(&path)?;
            load_snapshot(&shared, &meta, &path)?;
        }
        let state = match shared.meta.get(STATE)? {
            Some(v) => decode(&v)?,
            None => SmState::default(),
        };
        shared.hub.set_revision(state.revision);
        shared.set_state(state);
        Ok(StateMachine { shared })
    }
}

/// Reads keys through the writes of the current apply batch.
struct Overlay<'a> {
    kv: &'a Keyspace,
    pending: &'a HashMap<String, Option<KeyValue>>,
}

impl View for Overlay<'_> {
    fn get(&mut self, key: &str) -> Result<Option<KeyValue>, Error> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        match self.kv.get(key)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let s = self.shared.state();
        Ok((s.applied, s.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let sh = &self.shared;
        let mut state = sh.state();
        let mut batch = sh.db.batch();
        let mut pending: HashMap<String, Option<KeyValue>> = HashMap::new();
        let mut published: Vec<Revision> = Vec::new();
        let mut out = Vec::new();
        for entry in entries {
            state.applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::None,
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Outcome::None
                }
                EntryPayload::Normal(cmd) => {
                    let mut step = Step {
                        sh,
                        state: &mut state,
                        batch: &mut batch,
                        pending: &mut pending,
                        published: &mut published,
                    };
                    step.command(cmd).map_err(sm_err)?
                }
            };
            out.push(outcome);
        }
        batch.insert(&sh.meta, STATE, encode(&state));
        batch.commit().map_err(sm_err)?;
        let revision = state.revision;
        sh.set_state(state);
        sh.hub.publish(published, revision);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Builder {
        // Taken here, between applies, so the keys and the recorded state agree.
        Builder {
            shared: self.shared.clone(),
            snap: self.shared.db.snapshot(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapFile>, StorageError<u64>> {
        Ok(Box::new(SnapFile {
            path: self
                .shared
                .snap_dir
                .join(format!("recv-{}.part", rand::random::<u64>())),
        }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<SnapFile>,
    ) -> Result<(), StorageError<u64>> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || install(&shared, &meta, &snapshot.path))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        self.shared.syncer.sync().await.map_err(snap_err)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let Some(v) = self.shared.meta.get(SNAPSHOT).map_err(snap_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta<u64, BasicNode> = decode(&v).map_err(snap_err)?;
        let path = self
            .shared
            .snap_dir
            .join(format!("{}.snap", meta.snapshot_id));
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapFile { path }),
        }))
    }
}

/// One apply batch in progress: the fjall batch, the writes it holds and the revisions to
/// publish once it is committed.
struct Step<'a> {
    sh: &'a Shared,
    state: &'a mut SmState,
    batch: &'a mut fjall::OwnedWriteBatch,
    pending: &'a mut HashMap<String, Option<KeyValue>>,
    published: &'a mut Vec<Revision>,
}

impl Step<'_> {
    fn command(&mut self, cmd: Command) -> Result<Outcome, Error> {
        let sh = self.sh;
        Ok(match cmd {
            Command::Txn(ops) => {
                let mut view = Overlay {
                    kv: &sh.kv,
                    pending: self.pending,
                };
                let applied = apply_txn(&mut view, self.state.revision, &ops)?;
                if !applied.events.is_empty() {
                    self.state.revision += 1;
                    for (k, v) in applied.writes {
                        match &v {
                            Some(kv) => self.batch.insert(&sh.kv, k.as_str(), encode(kv)),
                            None => self.batch.remove(&sh.kv, k.as_str()),
                        }
                        self.pending.insert(k, v);
                    }
                    self.batch.insert(
                        &sh.history,
                        rev_key(self.state.revision),
                        encode(&applied.events),
                    );
                    self.published.push(Revision {
                        revision: self.state.revision,
                        events: applied.events,
                    });
                }
                applied.outcome
            }
            Command::Compact { revision } => {
                let target = revision.min(self.state.revision);
                if target > self.state.compacted {
                    let range = rev_key(self.state.compacted + 1)..=rev_key(target);
                    for item in sh.history.range(range) {
                        self.batch.remove(&sh.history, item.key()?);
                    }
                    self.state.compacted = target;
                }
                Outcome::Compacted {
                    compacted: self.state.compacted,
                    revision: self.state.revision,
                }
            }
            Command::Batch(cmds) => Outcome::Batch(
                cmds.into_iter()
                    .map(|c| self.command(c))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

pub struct Builder {
    shared: Arc<Shared>,
    snap: fjall::Snapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let shared = self.shared.clone();
        let snap = self.snap.clone();
        let snapshot = tokio::task::spawn_blocking(move || build(&shared, &snap))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        // The log below this snapshot may be purged next, so what it covers must be durable.
        self.shared.syncer.sync().await.map_err(snap_err)?;
        Ok(snapshot)
    }
}

#[derive(Serialize, Deserialize)]
enum Item {
    Header {
        format: u32,
        state: SmState,
    },
    Kv {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    History {
        revision: u64,
        #[serde(with = "serde_bytes")]
        events: Vec<u8>,
    },
    End {
        keys: u64,
    },
}

struct HashWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_item(w: &mut impl Write, item: &Item) -> Result<(), Error> {
    ciborium::into_writer(item, w).map_err(|e| Error::Corrupt {
        what: "snapshot item".into(),
        detail: e.to_string(),
    })
}

fn build(shared: &Shared, snap: &fjall::Snapshot) -> Result<Snapshot<TypeConfig>, Error> {
    let state = shared.state_in(snap)?;
    let (term, index) = state
        .applied
        .map_or((0, 0), |l| (l.leader_id.term, l.index));
    let id = format!(
        "{term}-{index}-{}-{:08x}",
        state.revision,
        rand::random::<u32>()
    );
    let tmp = shared.snap_dir.join(format!("{id}.tmp"));
    let path = shared.snap_dir.join(format!("{id}.snap"));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = HashWriter {
        inner: BufWriter::new(file),
        hash: Sha256::new(),
    };
    write_item(
        &mut w,
        &Item::Header {
            format: 1,
            state: state.clone(),
        },
    )?;
    let mut keys = 0u64;
    for item in snap.iter(&shared.kv) {
        let (k, v) = item.into_inner()?;
        write_item(
            &mut w,
            &Item::Kv {
                key: k.to_vec(),
                value: v.to_vec(),
            },
        )?;
        keys += 1;
    }
    for item in snap.range(&shared.history, rev_key(state.compacted + 1)..) {
        let (k, v) = item.into_inner()?;
        let revision = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| Error::Corrupt {
            what: "history key".into(),
            detail: format!("{} bytes", k.len()),
        })?);
        write_item(
            &mut w,
            &Item::History {
                revision,
                events: v.to_vec(),
            },
        )?;
    }
    write_item(&mut w, &Item::End { keys })?;
    let digest = w.hash.finalize();
    let mut inner = w.inner;
    inner.write_all(&digest).map_err(|e| Error::io(&tmp, e))?;
    let file = inner
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(&shared.snap_dir)?;

    let meta = SnapshotMeta {
        last_log_id: state.applied,
        last_membership: state.membership.clone(),
        snapshot_id: id,
    };
    shared.meta.insert(SNAPSHOT, encode(&meta))?;
    remove_other_snapshots(&shared.snap_dir, &path);
    tracing::info!(snapshot = %meta.snapshot_id, keys, revision = state.revision, "built snapshot");
    Ok(Snapshot {
        meta,
        snapshot: Box::new(SnapFile { path }),
    })
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn remove_other_snapshots(dir: &Path, keep: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let ours = p.extension().is_some_and(|x| x == "snap" || x == "tmp");
        if ours && p != keep {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Check a snapshot file's trailing SHA-256 against its content.
pub fn verify(path: &Path) -> Result<(), Error> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 32 {
        return Err(Error::Corrupt {
            what: path.display().to_string(),
            detail: "snapshot shorter than its checksum".into(),
        });
    }
    let mut hash = Sha256::new();
    let mut left = len - 32;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = f
            .read(&mut buf[..left.min(1 << 16) as usize])
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Err(Error::Corrupt {
                what: path.display().to_string(),
                detail: "snapshot ended early".into(),
            });
        }
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    let mut want = [0u8; 32];
    f.read_exact(&mut want).map_err(|e| Error::io(path, e))?;
    if hash.finalize().as_slice() != want {
        return Err(Error::Corrupt {
            what: path.display().to_string(),
            detail: "snapshot checksum mismatch".into(),
        });
    }
    Ok(())
}

fn install(shared: &Shared, meta: &SnapshotMeta<u64, BasicNode>, from: &Path) -> Result<(), Error> {
    verify(from)?;
    let path = shared.snap_dir.join(format!("{}.snap", meta.snapshot_id));
    if from != path {
        if from.parent() == Some(shared.snap_dir.as_path()) {
            fs::rename(from, &path).map_err(|e| Error::io(&path, e))?;
        } else {
            fs::copy(from, &path).map_err(|e| Error::io(&path, e))?;
        }
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        sync_dir(&shared.snap_dir)?;
    }
    // Mark the install first: if we crash while the keyspaces are half replaced, the next
    // start finishes the install from the file instead of serving a mix.
    shared.meta.insert(INSTALLING, encode(meta))?;
    shared.db.persist(fjall::PersistMode::SyncData)?;
    load_snapshot(shared, meta, &path)?;
    remove_other_snapshots(&shared.snap_dir, &path);
    Ok(())
}

/// Replace the keyspaces with a snapshot file's content. The caller has verified the file.
fn load_snapshot(
    shared: &Shared,
    meta: &SnapshotMeta<u64, BasicNode>,
    path: &Path,
) -> Result<(), Error> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(f);
    let corrupt = |detail: String| Error::Corrupt {
        what: path.display().to_string(),
        detail,
    };
    let read = |r: &mut BufReader<File>| -> Result<Item, Error> {
        ciborium::from_reader(r).map_err(|e| corrupt(e.to_string()))
    };
    let Item::Header { format: 1, state } = read(&mut r)? else {
        return Err(corrupt("missing or unknown snapshot header".into()));
    };
    shared.kv.clear()?;
    shared.history.clear()?;
    let mut batch = shared.db.batch();
    let mut n = 0usize;
    let mut keys = 0u64;
    loop {
        match read(&mut r)? {
            Item::Kv { key, value } => {
                batch.insert(&shared.kv, key, value);
                keys += 1;
            }
            Item::History { revision, events } => {
                // Decoded once here so a garbled record stops the install, not a later watch.
                let _: Vec<Event> = decode(&events)?;
                batch.insert(&shared.history, rev_key(revision), events);
            }
            Item::End { keys: want } => {
                if want != keys {
                    return Err(corrupt(format!(
                        "snapshot has {keys} keys, header says {want}"
                    )));
                }
                break;
            }
            Item::Header { .. } => return Err(corrupt("second header".into())),
        }
        n += 1;
        if n.is_multiple_of(LOAD_BATCH) {
            std::mem::replace(&mut batch, shared.db.batch()).commit()?;
        }
    }
    let state = SmState {
        applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        ..state
    };
    batch.insert(&shared.meta, STATE, encode(&state));
    batch.insert(&shared.meta, SNAPSHOT, encode(meta));
    batch.remove(&shared.meta, INSTALLING);
    batch.commit()?;
    shared.db.persist(fjall::PersistMode::SyncData)?;
    let revision = state.revision;
    shared.set_state(state);
    // Watchers saw a history this member no longer continues: they must resume elsewhere.
    shared.hub.reset(revision);
    tracing::info!(snapshot = %meta.snapshot_id, keys, revision, "installed snapshot");
    Ok(())
}
