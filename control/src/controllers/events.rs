//! Event expiry: an Event lasts [`TTL`] after it was last written, as kube-apiserver's
//! `--event-ttl` keeps it (there by an etcd lease on each write). Without it a cluster that
//! runs for months keeps every event it ever recorded. On the leader, every [`SWEEP`] at most,
//! events whose last write (the newest of the times the server wrote: their managed fields'
//! and their creation) is older than the TTL are deleted, each on the condition that it has
//! not been written since it was read.
//!
//! Events once kept apart for events.k8s.io, before that group became a view of the core
//! ones ([`crate::api::convert`]), are no longer seen by any reader; they go at the first
//! sweep.

use std::sync::Arc;
use std::time::Duration;

use outpost_api::store::{Expect, KeyValue};
use serde_json::Value;

use super::while_leader;
use crate::api::seconds;
use crate::api::Api;
use crate::store::Consistency;

/// kube-apiserver's default `--event-ttl`.
pub const TTL: Duration = Duration::from_secs(3600);
/// The longest wait between sweeps; a short TTL sweeps more often.
const SWEEP: Duration = Duration::from_secs(60);
/// Keys read at a time.
const PAGE: usize = 500;

const EVENTS: &str = "/registry/core/events/";
const OLD_EVENTS: &str = "/registry/events.k8s.io/events/";

/// Expire events until the task is aborted. Only the leader acts.
pub async fn run(api: Arc<Api>, ttl: Duration) {
    while_leader(&api, "event expiry", |a| async move { lead(&a, ttl).await }).await
}

async fn lead(api: &Arc<Api>, ttl: Duration) -> Result<(), String> {
    sweep(api, OLD_EVENTS, |_| true).await?;
    while api.store.leads() {
        let cutoff = now() - ttl.as_secs() as i64;
        let gone = sweep(api, EVENTS, |kv| {
            last_write(&kv.value).is_some_and(|t| t < cutoff)
        })
        .await?;
        if gone > 0 {
            tracing::debug!(events = gone, "expired events deleted");
        }
        tokio::time::sleep((ttl / 10).clamp(Duration::from_secs(1), SWEEP)).await;
    }
    Ok(())
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Delete the keys under `prefix` that `expired` picks; how many went.
async fn sweep(
    api: &Arc<Api>,
    prefix: &str,
    expired: impl Fn(&KeyValue) -> bool,
) -> Result<usize, String> {
    let mut after: Option<String> = None;
    let mut gone = 0;
    loop {
        let page = api
            .store
            .range(prefix, after.as_deref(), PAGE, Consistency::Serializable)
            .await
            .map_err(|e| format!("reading events: {e}"))?;
        for kv in page.kvs.iter().filter(|kv| expired(kv)) {
            // Written since it was read: not expired after all, or the next sweep sees.
            if api
                .store
                .delete(&kv.key, Expect::ModRevision(kv.mod_revision))
                .await
                .is_ok()
            {
                gone += 1;
            }
        }
        match page.kvs.last() {
            Some(kv) if page.more => after = Some(kv.key.clone()),
            _ => return Ok(gone),
        }
    }
}

/// When a stored event was last written, from the times the server wrote: its creation and
/// each writer's last write (managed fields). The times its reporter sets (lastTimestamp,
/// eventTime, a series' last observation) are not taken: a node with its clock ahead would
/// keep its events for ever.
fn last_write(raw: &[u8]) -> Option<i64> {
    let o = crate::api::pick::only(
        raw,
        &["metadata.creationTimestamp", "metadata.managedFields"],
    )
    .ok()?;
    let managed = o["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| &m["time"]);
    std::iter::once(&o["metadata"]["creationTimestamp"])
        .chain(managed)
        .filter_map(|t: &Value| seconds(t))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_events_last_write_is_its_newest_time() {
        let e = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "a", "time": "2026-01-01T00:10:00Z"},
                              {"manager": "b", "time": "2026-01-01T00:05:00Z"}]},
            "lastTimestamp": "2026-01-01T00:02:00Z",
            "eventTime": "2026-01-01T00:01:00.123456Z",
            "series": {"count": 3, "lastObservedTime": "2026-01-01T00:20:00.5Z"}});
        let raw = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            last_write(&raw),
            Some(seconds(&json!("2026-01-01T00:10:00Z")).unwrap())
        );
        let bare = json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}});
        assert_eq!(
            last_write(&serde_json::to_vec(&bare).unwrap()),
            Some(seconds(&json!("2026-01-01T00:00:00Z")).unwrap())
        );
        // Nothing to go by: kept.
        assert_eq!(last_write(b"{\"metadata\":{}}"), None);
        assert_eq!(last_write(b"not json"), None);
    }
}
