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
//!
//! The newest entries also stay in memory, decoded ([`Recent`]): each is read back right
//! after it is written, by the state machine to apply it and on a leader once per follower to
//! replicate it, and decoding it from fjall each time was a tenth of a 3-member store's CPU.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

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
    recent: Arc<Mutex<Recent>>,
}

/// Encoded bytes of the newest entries kept decoded in memory.
const RECENT_BYTES: usize = 4 << 20;

/// The newest log entries, consecutive by index, decoded.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Arc<Entry<TypeConfig>>, usize)>,
    bytes: usize,
}

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, e: Entry<TypeConfig>, size: usize) {
        let next = self.entries.back().map(|(e, _)| e.log_id.index + 1);
        if next.is_some_and(|n| n != e.log_id.index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.entries.push_back((Arc::new(e), size));
        while self.bytes > RECENT_BYTES && self.entries.len() > 1 {
            if let Some((_, n)) = self.entries.pop_front() {
                self.bytes -= n;
            }
        }
    }

    /// Drop entries from index `from` on (a truncation).
    fn cut(&mut self, from: u64) {
        let at = self.offset(from);
        self.bytes -= self.entries.drain(at..).map(|(_, n)| n).sum::<usize>();
    }

    /// Drop entries up to index `upto` (a purge).
    fn purge(&mut self, upto: u64) {
        let at = self.offset(upto.saturating_add(1));
        self.bytes -= self.entries.drain(..at).map(|(_, n)| n).sum::<usize>();
    }

    /// Where the entry with `index` is, or would go, clamped to what is held.
    fn offset(&self, index: u64) -> usize {
        let first = self.first().unwrap_or(index);
        (index.saturating_sub(first) as usize).min(self.entries.len())
    }

    /// Entries `start..end` (`end` exclusive, `None` for all after `start`), if all are here.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Arc<Entry<TypeConfig>>>> {
        let first = self.first()?;
        let last = self.entries.back().map(|(e, _)| e.log_id.index)?;
        let end = end.unwrap_or(last + 1);
        if start < first || start > last + 1 || end > last + 1 {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end.max(start) - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
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
    /// Open the log of member `id` (whose id staggers its memtables, see [`super::stagger`]).
    pub fn open(db: &Database, id: u64, syncer: Syncer) -> Result<Self, super::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.keyspace("raft_log", || super::append_options(id))?,
            meta: db.keyspace("raft_meta", super::keyspace_options)?,
            syncer,
            recent: Arc::default(),
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
        let upto = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        let hit = self.recent.lock().ok().and_then(|r| r.get(start, upto));
        if let Some(hit) = hit {
            // Cloned outside the lock: an entry may hold a batch of a thousand writes.
            return Ok(hit.iter().map(|e| Entry::clone(e)).collect());
        }
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
        let mut kept = Vec::new();
        for e in entries {
            let bytes = encode(&e);
            let size = bytes.len();
            batch.insert(&self.log, index_key(e.get_log_id().index), bytes);
            kept.push((e, size));
        }
        batch.commit().map_err(write_err)?;
        if let Ok(mut r) = self.recent.lock() {
            for (e, size) in kept {
                r.push(e, size);
            }
        }
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
        if let Ok(mut r) = self.recent.lock() {
            r.cut(log_id.index);
        }
        let mut batch = self.db.batch();
        for item in self.log.range(index_key(log_id.index)..) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)?;
        self.syncer.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        if let Ok(mut r) = self.recent.lock() {
            r.purge(log_id.index);
        }
        let mut batch = self.db.batch();
        batch.insert(&self.meta, PURGED, encode(&log_id));
        for item in self.log.range(..=index_key(log_id.index)) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(i: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: Option<Vec<Arc<Entry<TypeConfig>>>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_answer_only_what_they_wholly_hold() {
        let mut r = Recent::default();
        for i in 5..=9 {
            r.push(entry(i), 10);
        }
        assert_eq!(indexes(r.get(6, Some(8))), Some(vec![6, 7]));
        assert_eq!(indexes(r.get(5, None)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(r.get(10, None)), Some(vec![]));
        assert_eq!(indexes(r.get(4, Some(6))), None, "4 is not held");
        assert_eq!(indexes(r.get(8, Some(11))), None, "10 is not held");
        assert_eq!(indexes(r.get(12, None)), None);

        r.cut(8);
        assert_eq!(indexes(r.get(5, None)), Some(vec![5, 6, 7]));
        r.push(entry(8), 10);
        r.purge(6);
        assert_eq!(indexes(r.get(7, None)), Some(vec![7, 8]));
        assert_eq!(r.bytes, 20);

        // A gap (a snapshot installed past the held entries) starts over.
        r.push(entry(20), 10);
        assert_eq!(indexes(r.get(20, None)), Some(vec![20]));
        assert_eq!(indexes(r.get(7, None)), None);

        // Bounded by size; the newest entry always stays.
        r.push(entry(21), RECENT_BYTES);
        assert_eq!(indexes(r.get(21, None)), Some(vec![21]));
        assert_eq!(r.first(), Some(21));
    }
}
