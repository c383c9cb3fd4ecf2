//! The replicated store's data model: an etcd-like revisioned key space.
//!
//! Every applied write that changes something gets the next global revision. Each key carries
//! the revision that created it, the revision that last changed it and how many times it has
//! changed since creation. A transaction's operations all succeed under one revision or none is
//! applied.

use serde::{Deserialize, Serialize};

/// What a write expects of the key's current state before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Expect {
    /// No condition.
    #[default]
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist.
    Present,
    /// The key must exist with exactly this `mod_revision` (compare-and-swap).
    ModRevision(u64),
}

impl Expect {
    /// Whether `current` satisfies this expectation.
    pub fn holds(self, current: Option<&KeyValue>) -> bool {
        match (self, current) {
            (Expect::Any, _) => true,
            (Expect::Absent, c) => c.is_none(),
            (Expect::Present, c) => c.is_some(),
            (Expect::ModRevision(r), Some(kv)) => kv.mod_revision == r,
            (Expect::ModRevision(_), None) => false,
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expect: Expect,
    },
    /// Remove `key`. Deleting an absent key with `Expect::Any` is not an error and changes
    /// nothing.
    Delete { key: String, expect: Expect },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }

    pub fn expect(&self) -> Expect {
        match self {
            Op::Put { expect, .. } | Op::Delete { expect, .. } => *expect,
        }
    }
}

/// A command in the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Apply all operations atomically under one new revision, if every expectation holds.
    Txn(Vec<Op>),
    /// Drop watch history at or below `revision`.
    Compact { revision: u64 },
    /// Several commands in one log entry, applied in order, each as if alone (each
    /// transaction gets its own revision). This is how concurrent writes share one disk sync.
    Batch(Vec<Command>),
}

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    /// Number of writes since creation; 1 after the create.
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change at one revision. For a delete, `kv` holds the key's last value and its
/// `mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The key's state before this change, if it existed.
    pub prev: Option<KeyValue>,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every expectation held; `prev` holds each op's key before the change. `revision` is
    /// the store revision after the transaction (unchanged if no op changed anything).
    Committed {
        revision: u64,
        prev: Vec<Option<KeyValue>>,
    },
    /// Op number `op` failed its expectation; nothing was applied. `current` is that key's
    /// state, so a caller can report the conflict.
    Failed {
        op: usize,
        current: Option<KeyValue>,
        revision: u64,
    },
    /// History at or below `compacted` is gone.
    Compacted { compacted: u64, revision: u64 },
    /// The entry carried no command (a blank or membership entry).
    None,
    /// One outcome per command of a `Command::Batch`.
    Batch(Vec<Outcome>),
}

/// Events of one revision, delivered together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u64,
    pub events: Vec<Event>,
}

/// The smallest key greater than every key with `prefix`, for range ends; `None` when the
/// prefix is empty or all 0xff (the range is open-ended).
pub fn prefix_end(prefix: &str) -> Option<String> {
    // Keys are UTF-8, so bump the last char rather than the last byte.
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) = char::from_u32(c as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(mod_revision: u64) -> KeyValue {
        KeyValue {
            key: "k".into(),
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision,
            version: 1,
        }
    }

    #[test]
    fn expectations() {
        assert!(Expect::Absent.holds(None));
        assert!(!Expect::Absent.holds(Some(&kv(3))));
        assert!(Expect::ModRevision(3).holds(Some(&kv(3))));
        assert!(!Expect::ModRevision(2).holds(Some(&kv(3))));
        assert!(!Expect::ModRevision(3).holds(None));
        assert!(Expect::Present.holds(Some(&kv(1))));
        assert!(!Expect::Present.holds(None));
    }

    #[test]
    fn prefix_end_bumps_last_char() {
        assert_eq!(
            prefix_end("/registry/pods/").as_deref(),
            Some("/registry/pods0")
        );
        assert_eq!(prefix_end("a"), Some("b".into()));
        assert_eq!(prefix_end(""), None);
    }

    #[test]
    fn values_are_cbor_byte_strings() {
        let op = Op::Put {
            key: "k".into(),
            value: vec![1, 2, 3],
            expect: Expect::Any,
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&op, &mut buf).expect("encode");
        // A byte string of 3 is 0x43 followed by the bytes, not an array of integers.
        assert!(buf.windows(4).any(|w| w == [0x43, 1, 2, 3]));
        let back: Op = ciborium::from_reader(buf.as_slice()).expect("decode");
        assert_eq!(back, op);
    }
}
