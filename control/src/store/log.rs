//! The Raft log on fjall, with group commit.
//!
//! Entries are written to fjall's journal as they arrive and acknowledged only once a sync
//! covering them has finished. One thread does the syncing: it takes every waiter queued
//! while the previous `fdatasync` ran and covers them all with the next one, so many appends
//! share one disk flush. The state machine lives in the same fjall database, so the same
//! journal sync also covers its buffered writes.
//!
//! A member alone in its cluster syncs its appends in place instead: with nobody to
//! replicate to, the Raft core has nothing to do while the flush runs, and the hand-off to
//! the sync thread and back saves two thread wake-ups per write. Measured: one-client
//! latency unchanged within noise, 1,000 concurrent clients 3–21 % more writes/s (larger
//! batches form while the core waits on the disk).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use fjall::{Database, Keyspace, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogId, StorageError, StorageIOError, Vote};
use tokio::sync::oneshot;

use super::{decode, encode, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Something waiting for the journal to reach the disk.
enum Waiter {
    Log(LogFlushed<TypeConfig>),
    Done(oneshot::Sender<io::Result<()>>),
}

/// Hands waiters to the sync thread.
#[derive(Clone)]
pub struct Syncer {
    tx: mpsc::Sender<Waiter>,
    /// Whether this member is the only one in its membership (see the module doc).
    solo: Arc<AtomicBool>,
}

impl Syncer {
    pub fn start(db: Database) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("outpost-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let res = db.persist(PersistMode::SyncData);
                    for w in batch {
                        let r = match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::other(e.to_string())),
                        };
                        match w {
                            Waiter::Log(cb) => cb.log_io_completed(r),
                            Waiter::Done(tx) => {
                                let _ = tx.send(r);
                            }
                        }
                    }
                }
            })
            .expect("spawning the sync thread");
        Syncer {
            tx,
            solo: Arc::default(),
        }
    }

    /// Say whether this member is alone in its cluster, so appends sync in place.
    pub fn set_solo(&self, solo: bool) {
        self.solo.store(solo, Ordering::Relaxed);
    }

    /// Wait until everything written so far is on disk.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Waiter::Done(tx))
            .map_err(|_| io::Error::other("sync thread stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("sync thread stopped"))?
    }
}

#[derive(Clone)]
pub struct LogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    syncer: Syncer,
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn read_err(e: impl ToString) -> StorageError<u64> {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}

fn write_err(e: impl ToString) -> StorageError<u64> {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

impl LogStore {
    pub fn open(db: &Database, syncer: Syncer) -> Result<Self, super::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.keyspace("raft_log", super::append_options)?,
            meta: db.keyspace("raft_meta", super::keyspace_options)?,
            syncer,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<u64>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError<u64>> {
        self.meta.insert(key, encode(v)).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self
            .log
            .range::<[u8; 8], _>((Bound::Included(index_key(start)), end))
        {
            let v = item.value().map_err(read_err)?;
            let entry: Entry<TypeConfig> = decode(&v).map_err(read_err)?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(PURGED)?;
        let last = match self.log.last_key_value() {
            Some(g) => {
                let v = g.value().map_err(read_err)?;
                let e: Entry<TypeConfig> = decode(&v).map_err(read_err)?;
                Some(*e.get_log_id())
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.put_meta(VOTE, vote)?;
        // A vote must be on disk before it is acknowledged.
        self.syncer
            .sync()
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // Not synced: after a crash the committed index is re-learned from the leader; this
        // only lets a restarted member re-apply what it already knew was committed.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.get_meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.db.batch();
        for e in entries {
            batch.insert(&self.log, index_key(e.get_log_id().index), encode(&e));
        }
        batch.commit().map_err(write_err)?;
        if self.syncer.solo.load(Ordering::Relaxed) {
            let r = self
                .db
                .persist(PersistMode::SyncData)
                .map_err(|e| io::Error::other(e.to_string()));
            callback.log_io_completed(r);
            return Ok(());
        }
        self.syncer
            .tx
            .send(Waiter::Log(callback))
            .map_err(|_| write_err("sync thread stopped"))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut batch = self.db.batch();
        for item in self.log.range(index_key(log_id.index)..) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)?;
        self.syncer.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut batch = self.db.batch();
        batch.insert(&self.meta, PURGED, encode(&log_id));
        for item in self.log.range(..=index_key(log_id.index)) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)
    }
}
