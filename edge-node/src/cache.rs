//! The node's own store (fjall): everything it needs to run its pods with no control plane.
//! Pod objects by uid, the config maps and secrets they use, module bytes by digest, and the
//! module names last resolved. Writes happen only when something changed, so a board's flash
//! sees no write per heartbeat. They are synced by a background thread that takes every write
//! made since its last sync in one fsync (group commit), at most one every [`SYNC_GAP`]: a
//! burst of pods costs a few syncs, not one each, and a write is on disk within tens of
//! milliseconds.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use fjall::{Database, Keyspace, PersistMode};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("node cache: {0}")]
pub struct CacheError(String);

fn err(e: impl std::fmt::Display) -> CacheError {
    CacheError(e.to_string())
}

/// The least time between two syncs. A sync each time one ended was two per pod in a
/// burst of short pods (their specs and tokens written, then removed).
const SYNC_GAP: std::time::Duration = std::time::Duration::from_millis(20);

pub struct Cache {
    db: Database,
    dirty: Arc<(Mutex<Dirty>, Condvar)>,
    pods: Keyspace,
    objects: Keyspace,
    modules: Keyspace,
    meta: Keyspace,
}

#[derive(Default)]
struct Dirty {
    pending: bool,
    closed: bool,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let db = Database::builder(dir.join("cache"))
            .cache_size(4 << 20)
            // See the control plane's store: one worker spins less than two.
            .worker_threads(1)
            .open()
            .map_err(err)?;
        let dirty: Arc<(Mutex<Dirty>, Condvar)> = Arc::default();
        {
            let (db, dirty) = (db.clone(), dirty.clone());
            std::thread::Builder::new()
                .name("outpost-cache-sync".into())
                .spawn(move || loop {
                    let (lock, cv) = &*dirty;
                    let Ok(mut d) = lock.lock() else { return };
                    while !d.pending && !d.closed {
                        d = match cv.wait(d) {
                            Ok(d) => d,
                            Err(_) => return,
                        };
                    }
                    if !d.pending {
                        return;
                    }
                    d.pending = false;
                    drop(d);
                    if let Err(e) = db.persist(PersistMode::SyncData) {
                        tracing::error!(error = %e, "syncing the node cache");
                    }
                    std::thread::sleep(SYNC_GAP);
                })
                .map_err(err)?;
        }
        let opts = || fjall::KeyspaceCreateOptions::default().max_memtable_size(4 << 20);
        Ok(Cache {
            pods: db.keyspace("pods", opts).map_err(err)?,
            objects: db.keyspace("objects", opts).map_err(err)?,
            modules: db.keyspace("modules", opts).map_err(err)?,
            meta: db.keyspace("meta", opts).map_err(err)?,
            db,
            dirty,
        })
    }

    /// Ask the sync thread for a sync; it takes every write made before it runs.
    fn sync_soon(&self) -> Result<(), CacheError> {
        let (lock, cv) = &*self.dirty;
        lock.lock().map_err(err)?.pending = true;
        cv.notify_one();
        Ok(())
    }

    /// Put `value` under `key` unless it is already there; true if it wrote.
    fn put_if_changed(&self, ks: &Keyspace, key: &str, value: &[u8]) -> Result<bool, CacheError> {
        if ks.get(key).map_err(err)?.as_deref() == Some(value) {
            return Ok(false);
        }
        ks.insert(key, value).map_err(err)?;
        self.sync_soon()?;
        Ok(true)
    }

    /// Sync everything written so far, now.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.db.persist(PersistMode::SyncData).map_err(err)
    }

    pub fn pods(&self) -> Vec<Value> {
        self.pods
            .iter()
            .filter_map(|g| g.value().ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    pub fn pod(&self, uid: &str) -> Option<Value> {
        let v = self.pods.get(uid).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Keep `pod` as a restart needs it: without its status, resourceVersion and managed
    /// fields, which change at every write of the pod and are most of its bytes (left out
    /// as it is encoded, not from a copy).
    pub fn put_pod(&self, uid: &str, pod: &Value) -> Result<bool, CacheError> {
        let bytes = serde_json::to_vec(&Without(pod, &["status"])).map_err(err)?;
        self.put_if_changed(&self.pods, uid, &bytes)
    }

    pub fn remove_pod(&self, uid: &str) -> Result<(), CacheError> {
        if self.pods.get(uid).map_err(err)?.is_some() {
            self.pods.remove(uid).map_err(err)?;
            self.sync_soon()?;
        }
        Ok(())
    }

    /// `kind` is `configmaps` or `secrets`.
    pub fn object(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let v = self.objects.get(format!("{kind}/{ns}/{name}")).ok()??;
        serde_json::from_slice(&v).ok()
    }

    pub fn put_object(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        v: &Value,
    ) -> Result<(), CacheError> {
        let mut v = v.clone();
        // The resource version changes with every write to the object, even unchanged ones.
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        let bytes = serde_json::to_vec(&v).map_err(err)?;
        self.put_if_changed(&self.objects, &format!("{kind}/{ns}/{name}"), &bytes)
            .map(|_| ())
    }

    /// Every cached object of `kind`.
    pub fn objects_of(&self, kind: &str) -> Vec<Value> {
        self.objects
            .prefix(format!("{kind}/"))
            .filter_map(|g| g.value().ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Remove every cached object of `kind` in `ns`.
    pub fn remove_objects_in(&self, kind: &str, ns: &str) -> Result<(), CacheError> {
        let keys: Vec<_> = self
            .objects
            .prefix(format!("{kind}/{ns}/"))
            .filter_map(|g| g.into_inner().ok().map(|(k, _)| k))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        for k in keys {
            self.objects.remove(k).map_err(err)?;
        }
        self.sync_soon()
    }

    pub fn remove_object(&self, kind: &str, ns: &str, name: &str) -> Result<(), CacheError> {
        let key = format!("{kind}/{ns}/{name}");
        if self.objects.get(&key).map_err(err)?.is_some() {
            self.objects.remove(key).map_err(err)?;
            self.sync_soon()?;
        }
        Ok(())
    }

    pub fn module(&self, digest: &str) -> Option<Vec<u8>> {
        self.modules.get(digest).ok()?.map(|v| v.to_vec())
    }

    pub fn has_module(&self, digest: &str) -> bool {
        self.modules.get(digest).ok().flatten().is_some()
    }

    pub fn put_module(&self, digest: &str, bytes: &[u8]) -> Result<(), CacheError> {
        self.put_if_changed(&self.modules, digest, bytes)
            .map(|_| ())
    }

    /// Cached modules: (digest, size in bytes). Compiled artifacts (keys under `aot/`) live
    /// beside them and are not modules.
    pub fn modules(&self) -> Vec<(String, u64)> {
        self.modules
            .iter()
            .filter_map(|g| g.into_inner().ok())
            .filter_map(|(k, v)| Some((String::from_utf8(k.to_vec()).ok()?, v.len() as u64)))
            .filter(|(k, _)| !k.starts_with("aot/"))
            .collect()
    }

    /// Meta entries under `prefix`: (the rest of the key, value).
    pub fn meta_under(&self, prefix: &str) -> Vec<(String, String)> {
        self.meta
            .prefix(prefix)
            .filter_map(|g| g.into_inner().ok())
            .filter_map(|(k, v)| {
                let k = String::from_utf8(k.to_vec()).ok()?;
                Some((
                    k.strip_prefix(prefix)?.to_string(),
                    String::from_utf8(v.to_vec()).ok()?,
                ))
            })
            .collect()
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        let v = self.meta.get(key).ok()??;
        String::from_utf8(v.to_vec()).ok()
    }

    pub fn put_meta(&self, key: &str, value: &str) -> Result<(), CacheError> {
        self.put_if_changed(&self.meta, key, value.as_bytes())
            .map(|_| ())
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = self.flush();
        let (lock, cv) = &*self.dirty;
        if let Ok(mut d) = lock.lock() {
            d.closed = true;
        }
        cv.notify_one();
    }
}

/// The metadata every write of a pod changes: its resourceVersion, and its managed fields
/// (most of its metadata). Neither is kept, nor compared to tell an echo of a status write.
pub const EVERY_WRITE: &[&str] = &["resourceVersion", "managedFields"];

/// An object encoded without its members named in the list (its metadata without
/// [`EVERY_WRITE`]).
struct Without<'a>(&'a Value, &'a [&'a str]);

impl serde::Serialize for Without<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(m) = self.0.as_object() else {
            return self.0.serialize(s);
        };
        let mut out = s.serialize_map(None)?;
        for (k, v) in m.iter().filter(|(k, _)| !self.1.contains(&k.as_str())) {
            if k == "metadata" {
                out.serialize_entry(k, &Without(v, EVERY_WRITE))?;
            } else {
                out.serialize_entry(k, v)?;
            }
        }
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_is_kept_without_what_each_write_changes() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let p = json!({"metadata": {"uid": "u1", "name": "a", "resourceVersion": "7",
                                    "managedFields": [{"manager": "m"}], "labels": {"k": "v"}},
                       "spec": {"nodeName": "n", "metadata": {"resourceVersion": "deep"}},
                       "status": {"phase": "Running"}});
        assert!(c.put_pod("u1", &p).unwrap());
        let mut echo = p.clone();
        echo["metadata"]["resourceVersion"] = json!("8");
        echo["status"]["phase"] = json!("Succeeded");
        assert!(!c.put_pod("u1", &echo).unwrap(), "nothing kept changed");
        assert_eq!(
            c.pods(),
            [
                json!({"metadata": {"uid": "u1", "name": "a", "labels": {"k": "v"}},
                    "spec": {"nodeName": "n", "metadata": {"resourceVersion": "deep"}}})
            ]
        );
    }

    #[test]
    fn writes_only_changes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Cache::open(dir.path()).unwrap();
            let p = json!({"metadata": {"uid": "u1", "name": "a"}});
            assert!(c.put_pod("u1", &p).unwrap());
            assert!(
                !c.put_pod("u1", &p).unwrap(),
                "an unchanged pod is not written again"
            );
            c.put_module("sha256:x", b"\0asm").unwrap();
            c.put_object("configmaps", "ns", "cm", &json!({"data": {"k": "v"}}))
                .unwrap();
        }
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.pods().len(), 1);
        assert_eq!(c.module("sha256:x").as_deref(), Some(&b"\0asm"[..]));
        assert_eq!(
            c.object("configmaps", "ns", "cm").unwrap()["data"]["k"],
            "v"
        );
        c.remove_pod("u1").unwrap();
        assert!(c.pods().is_empty());
    }
}
