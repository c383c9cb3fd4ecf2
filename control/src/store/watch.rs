//! Watch fan-out.
//!
//! The state machine publishes each apply batch's revisions here after they are committed.
//! A watcher registers under the hub's lock and learns the last published revision at that
//! moment; it reads older events from the stored history and newer ones from its channel, so
//! it sees every revision once, in order, with no gap.
//!
//! A watcher that does not keep up is dropped rather than buffered without bound; it learns
//! this as the end of its stream and resumes from its last revision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_api::store::Revision;
use tokio::sync::mpsc;

/// Room for this many messages per watcher before it counts as fallen behind.
const QUEUE: usize = 4096;

#[derive(Debug)]
pub enum Msg {
    Revision(Arc<Revision>),
    /// Every revision up to this one has been sent.
    Progress(u64),
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Msg>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    last: u64,
    watchers: HashMap<u64, Watcher>,
}

#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
}

/// A registration: the revision it starts after and the live channel.
pub struct Subscription {
    pub id: u64,
    pub after: u64,
    pub rx: mpsc::Receiver<Msg>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn set_revision(&self, revision: u64) {
        self.lock().last = revision;
    }

    pub fn revision(&self) -> u64 {
        self.lock().last
    }

    pub fn subscribe(&self, prefix: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut g = self.lock();
        g.next += 1;
        let id = g.next;
        g.watchers.insert(
            id,
            Watcher {
                prefix: prefix.to_string(),
                tx,
            },
        );
        Subscription {
            id,
            after: g.last,
            rx,
        }
    }

    pub fn unsubscribe(&self, id: u64) {
        self.lock().watchers.remove(&id);
    }

    pub fn watchers(&self) -> usize {
        self.lock().watchers.len()
    }

    pub fn publish(&self, revisions: Vec<Revision>, revision: u64) {
        let mut g = self.lock();
        g.last = revision;
        if revisions.is_empty() || g.watchers.is_empty() {
            return;
        }
        let all: Vec<Arc<Revision>> = revisions.into_iter().map(Arc::new).collect();
        g.watchers.retain(|_, w| {
            for r in &all {
                let msg = if w.prefix.is_empty()
                    || r.events.iter().all(|e| e.kv.key.starts_with(&w.prefix))
                {
                    Arc::clone(r)
                } else {
                    let events: Vec<_> = r
                        .events
                        .iter()
                        .filter(|e| e.kv.key.starts_with(&w.prefix))
                        .cloned()
                        .collect();
                    if events.is_empty() {
                        continue;
                    }
                    Arc::new(Revision {
                        revision: r.revision,
                        events,
                    })
                };
                if w.tx.try_send(Msg::Revision(msg)).is_err() {
                    return false;
                }
            }
            true
        });
    }

    /// Tell every watcher it is current up to the last published revision.
    pub fn progress(&self) {
        let g = self.lock();
        for w in g.watchers.values() {
            let _ = w.tx.try_send(Msg::Progress(g.last));
        }
    }

    /// End every watch: the history they follow was replaced (a snapshot install).
    pub fn reset(&self, revision: u64) {
        let mut g = self.lock();
        g.last = revision;
        g.watchers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::store::{Event, EventKind, KeyValue};

    fn rev(r: u64, keys: &[&str]) -> Revision {
        Revision {
            revision: r,
            events: keys
                .iter()
                .map(|k| Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: k.to_string(),
                        value: vec![],
                        create_revision: r,
                        mod_revision: r,
                        version: 1,
                    },
                    prev: None,
                })
                .collect(),
        }
    }

    #[test]
    fn filters_by_prefix_and_orders() {
        let hub = Hub::default();
        let mut s = hub.subscribe("/a/");
        assert_eq!(s.after, 0);
        hub.publish(
            vec![
                rev(1, &["/a/x", "/b/y"]),
                rev(2, &["/b/z"]),
                rev(3, &["/a/w"]),
            ],
            3,
        );
        let Ok(Msg::Revision(r)) = s.rx.try_recv() else {
            panic!("expected revision 1")
        };
        assert_eq!((r.revision, r.events.len()), (1, 1));
        let Ok(Msg::Revision(r)) = s.rx.try_recv() else {
            panic!("expected revision 3")
        };
        assert_eq!(r.revision, 3);
        assert!(s.rx.try_recv().is_err());
        hub.progress();
        assert!(matches!(s.rx.try_recv(), Ok(Msg::Progress(3))));
        assert_eq!(hub.subscribe("").after, 3);
    }

    #[test]
    fn slow_watcher_is_dropped() {
        let hub = Hub::default();
        let mut s = hub.subscribe("");
        for r in 1..=(QUEUE as u64 + 1) {
            hub.publish(vec![rev(r, &["k"])], r);
        }
        assert_eq!(hub.watchers(), 0);
        let mut n = 0;
        while let Ok(Msg::Revision(_)) = s.rx.try_recv() {
            n += 1;
        }
        assert_eq!(n, QUEUE);
    }
}
