//! The state machine's apply step as a pure function.
//!
//! `apply_txn` decides what a transaction does given a view of the current keys; it performs
//! no IO. The fjall state machine feeds it a view (committed keys overlaid with the writes of
//! the same apply batch) and persists what it returns.

use outpost_api::store::{Event, EventKind, KeyValue, Op, Outcome};

/// A read view of the current key space.
pub trait View {
    fn get(&mut self, key: &str) -> Result<Option<KeyValue>, super::Error>;
}

/// A key's new state: `Some` to store, `None` to remove.
pub type Write = (String, Option<KeyValue>);

/// The result of applying one transaction.
#[derive(Debug, PartialEq)]
pub struct Applied {
    pub outcome: Outcome,
    pub writes: Vec<Write>,
    /// Empty unless the transaction changed something; then all carry `revision`.
    pub events: Vec<Event>,
}

/// Apply `ops` atomically at store revision `revision` (the revision before this write).
///
/// All expectations are checked against the state before the transaction. If every one holds
/// and at least one op changes a key, the writes get revision `revision + 1`. An op that
/// touches a key an earlier op of the same transaction touched sees that earlier op's result.
pub fn apply_txn(view: &mut impl View, revision: u64, ops: &[Op]) -> Result<Applied, super::Error> {
    let mut before = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let current = view.get(op.key())?;
        if !op.expect().holds(current.as_ref()) {
            return Ok(Applied {
                outcome: Outcome::Failed {
                    op: i,
                    current,
                    revision,
                },
                writes: Vec::new(),
                events: Vec::new(),
            });
        }
        before.push(current);
    }

    let next = revision + 1;
    let mut state: Vec<(String, Option<KeyValue>)> = Vec::new();
    let mut events = Vec::new();
    for (op, original) in ops.iter().zip(&before) {
        // Later ops on the same key build on the earlier op's result.
        let prev = match state.iter().find(|(k, _)| k == op.key()) {
            Some((_, v)) => v.clone(),
            None => original.clone(),
        };
        let new = match op {
            Op::Put { key, value, .. } => Some(KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: prev.as_ref().map_or(next, |p| p.create_revision),
                mod_revision: next,
                version: prev.as_ref().map_or(1, |p| p.version + 1),
            }),
            Op::Delete { .. } => None,
        };
        let event = match (&new, &prev) {
            (Some(kv), _) => Some(Event {
                kind: EventKind::Put,
                kv: kv.clone(),
                prev: prev.clone(),
            }),
            (None, Some(p)) => Some(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    mod_revision: next,
                    ..p.clone()
                },
                prev: prev.clone(),
            }),
            (None, None) => None,
        };
        if let Some(e) = event {
            events.push(e);
            match state.iter_mut().find(|(k, _)| k == op.key()) {
                Some(slot) => slot.1 = new,
                None => state.push((op.key().to_string(), new)),
            }
        }
    }

    let changed = !events.is_empty();
    Ok(Applied {
        outcome: Outcome::Committed {
            revision: if changed { next } else { revision },
            prev: before,
        },
        writes: state,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::store::Expect;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Map(BTreeMap<String, KeyValue>);

    impl View for Map {
        fn get(&mut self, key: &str) -> Result<Option<KeyValue>, super::super::Error> {
            Ok(self.0.get(key).cloned())
        }
    }

    impl Map {
        fn run(&mut self, revision: &mut u64, ops: &[Op]) -> Applied {
            let a = apply_txn(self, *revision, ops).expect("apply");
            for (k, v) in &a.writes {
                match v {
                    Some(kv) => self.0.insert(k.clone(), kv.clone()),
                    None => self.0.remove(k),
                };
            }
            if !a.events.is_empty() {
                *revision += 1;
            }
            a
        }
    }

    fn put(key: &str, value: &str, expect: Expect) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            expect,
        }
    }

    #[test]
    fn revisions_and_versions() {
        let mut m = Map::default();
        let mut rev = 0;
        m.run(&mut rev, &[put("a", "1", Expect::Absent)]);
        m.run(&mut rev, &[put("b", "1", Expect::Any)]);
        m.run(&mut rev, &[put("a", "2", Expect::ModRevision(1))]);
        let a = &m.0["a"];
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
        assert_eq!(rev, 3);
    }

    #[test]
    fn failed_expectation_applies_nothing() {
        let mut m = Map::default();
        let mut rev = 0;
        m.run(&mut rev, &[put("a", "1", Expect::Any)]);
        let out = m.run(
            &mut rev,
            &[
                put("b", "1", Expect::Any),
                put("a", "2", Expect::ModRevision(7)),
            ],
        );
        assert!(matches!(
            out.outcome,
            Outcome::Failed {
                op: 1,
                current: Some(_),
                revision: 1
            }
        ));
        assert!(out.writes.is_empty() && out.events.is_empty());
        assert!(!m.0.contains_key("b"));
        assert_eq!(rev, 1);
        let out = m.run(&mut rev, &[put("a", "x", Expect::Absent)]);
        assert!(matches!(out.outcome, Outcome::Failed { op: 0, .. }));
    }

    #[test]
    fn delete_event_carries_last_value() {
        let mut m = Map::default();
        let mut rev = 0;
        m.run(&mut rev, &[put("a", "1", Expect::Any)]);
        let out = m.run(
            &mut rev,
            &[Op::Delete {
                key: "a".into(),
                expect: Expect::Present,
            }],
        );
        assert_eq!(out.events.len(), 1);
        let e = &out.events[0];
        assert_eq!(e.kind, EventKind::Delete);
        assert_eq!(e.kv.value, b"1");
        assert_eq!(e.kv.mod_revision, 2);
        assert!(m.0.is_empty());
    }

    #[test]
    fn deleting_absent_key_changes_nothing() {
        let mut m = Map::default();
        let mut rev = 5;
        let out = m.run(
            &mut rev,
            &[Op::Delete {
                key: "nope".into(),
                expect: Expect::Any,
            }],
        );
        assert_eq!(
            out.outcome,
            Outcome::Committed {
                revision: 5,
                prev: vec![None]
            }
        );
        assert_eq!(rev, 5);
    }

    #[test]
    fn ops_on_one_key_chain_within_txn() {
        let mut m = Map::default();
        let mut rev = 0;
        let out = m.run(
            &mut rev,
            &[put("a", "1", Expect::Absent), put("a", "2", Expect::Absent)],
        );
        assert_eq!(out.events.len(), 2);
        let a = &m.0["a"];
        assert_eq!(
            (a.value.as_slice(), a.version, a.create_revision),
            (&b"2"[..], 2, 1)
        );
        assert!(out.events.iter().all(|e| e.kv.mod_revision == 1));
    }
}
