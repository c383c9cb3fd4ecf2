//! `/metrics`: the API server's own figures in Prometheus' text format, under the names
//! kube-apiserver uses where it has one, so dashboards made for it read them.
//!
//! - `apiserver_request_total` (verb, group, version, resource, subresource, scope, code) and
//!   `apiserver_request_duration_seconds` (a histogram by verb, group, version, resource,
//!   subresource, scope): every request through the router, the node links' included, timed
//!   to its response's head (a watch's stream is not counted in its duration).
//! - `apiserver_storage_objects` (resource): stored objects by kind, counted when scraped.
//! - `outpost_store_*`: this member's Raft view (leader, term, applied index, revision).
//! - `outpost_nodes_linked`: node links held by this member.
//! - `process_*`: resident memory, CPU seconds, open file descriptors, start time.
//!
//! Reading them takes `get` on the non-resource URL `/metrics` (the bootstrap ClusterRole
//! `system:monitoring`, bound to the group of that name, as in Kubernetes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::resources::{self, RESOURCES};
use super::Api;

/// Upper bounds of the duration buckets, in seconds (a subset of kube-apiserver's).
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Labels of one kind of request: verb, group, version, resource, subresource, scope.
type Kind = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

#[derive(Default)]
struct Timings {
    /// Counts per bucket (not cumulative), the last for slower than every bound.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// Counts by kind and HTTP code, and timings by kind.
type Tables = (BTreeMap<(Kind, u16), u64>, BTreeMap<Kind, Timings>);

/// Request counts and timings since the process started.
#[derive(Default)]
pub struct Requests {
    inner: Mutex<Tables>,
}

/// What a request was, from its method, path and query, in kube-apiserver's labels; `None`
/// for paths that name no resource.
pub fn kind(method: &str, path: &str, watch: bool, apply: bool) -> Option<Kind> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", "v1", rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return None,
    };
    let (namespaced, rest) = match rest {
        ["namespaces", _, plural, tail @ ..]
            if !(group.is_empty()
                && tail.is_empty()
                && matches!(*plural, "status" | "finalize")) =>
        {
            (true, [&[*plural][..], tail].concat())
        }
        _ => (false, rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, false, ""),
        [p, _] => (*p, true, ""),
        [p, _, s] => (*p, true, *s),
        _ => return None,
    };
    // Labels from the table, so what a client makes up does not grow the map.
    let res = resources::find(group, version, plural).or_else(|| {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.plural == plural)
    })?;
    let sub = res
        .subresources
        .iter()
        .find(|s| s.name() == sub)
        .map_or("", |s| s.name());
    let verb = match (method, name) {
        ("GET" | "HEAD", true) => "GET",
        ("GET" | "HEAD", false) if watch => "WATCH",
        ("GET" | "HEAD", false) => "LIST",
        ("POST", _) => "POST",
        ("PUT", _) => "PUT",
        ("PATCH", _) if apply => "APPLY",
        ("PATCH", _) => "PATCH",
        ("DELETE", true) => "DELETE",
        ("DELETE", false) => "DELETECOLLECTION",
        _ => return None,
    };
    let scope = if name {
        "resource"
    } else if namespaced {
        "namespace"
    } else {
        "cluster"
    };
    Some((
        verb,
        res.group,
        version_of(res, version),
        res.plural,
        sub,
        scope,
    ))
}

/// `version` as a static label: the resource's own, or `v1` for a view's older one.
fn version_of(res: &resources::Resource, version: &str) -> &'static str {
    if version == res.version {
        res.version
    } else {
        "v1"
    }
}

impl Requests {
    pub fn record(&self, kind: Kind, code: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *g.0.entry((kind, code)).or_default() += 1;
        let t = g.1.entry(kind).or_default();
        t.buckets[i] += 1;
        t.sum += secs;
        t.count += 1;
    }

    fn write(&self, out: &mut String) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |k: &Kind| {
            format!(
                "verb=\"{}\",group=\"{}\",version=\"{}\",resource=\"{}\",subresource=\"{}\",scope=\"{}\",component=\"apiserver\"",
                k.0, k.1, k.2, k.3, k.4, k.5
            )
        };
        out.push_str("# HELP apiserver_request_total Requests answered, by verb, resource and HTTP code.\n# TYPE apiserver_request_total counter\n");
        for ((k, code), n) in &g.0 {
            let _ = writeln!(
                out,
                "apiserver_request_total{{{},code=\"{code}\"}} {n}",
                labels(k)
            );
        }
        out.push_str("# HELP apiserver_request_duration_seconds Time to answer a request (to its response's head).\n# TYPE apiserver_request_duration_seconds histogram\n");
        for (k, t) in &g.1 {
            let l = labels(k);
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += t.buckets[i];
                let _ = writeln!(
                    out,
                    "apiserver_request_duration_seconds_bucket{{{l},le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "apiserver_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                t.count
            );
            let _ = writeln!(
                out,
                "apiserver_request_duration_seconds_sum{{{l}}} {}",
                t.sum
            );
            let _ = writeln!(
                out,
                "apiserver_request_duration_seconds_count{{{l}}} {}",
                t.count
            );
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The whole text of `/metrics`.
pub async fn render(api: &Api) -> String {
    let mut out = String::new();
    api.requests.write(&mut out);
    out.push_str("# HELP apiserver_storage_objects Stored objects, by resource.\n# TYPE apiserver_storage_objects gauge\n");
    let mut seen = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.stored) {
        let prefix = r.prefix(None);
        if seen.contains(&prefix) {
            continue;
        }
        let n = api.store.count_prefix(&prefix).await.unwrap_or(0);
        let _ = writeln!(
            out,
            "apiserver_storage_objects{{resource=\"{}\"}} {n}",
            super::error::qualified(r.group, r.plural)
        );
        seen.push(prefix);
    }
    let s = api.store.status();
    gauge(
        &mut out,
        "outpost_store_has_leader",
        "1 while the store has a Raft leader.",
        "gauge",
        u8::from(s.leader.is_some()),
    );
    gauge(
        &mut out,
        "outpost_store_is_leader",
        "1 while this member leads.",
        "gauge",
        u8::from(s.leader == Some(s.id)),
    );
    gauge(
        &mut out,
        "outpost_store_term",
        "This member's Raft term.",
        "gauge",
        s.term,
    );
    gauge(
        &mut out,
        "outpost_store_applied_index",
        "The last Raft log index this member applied.",
        "gauge",
        s.applied_index,
    );
    gauge(
        &mut out,
        "outpost_store_revision",
        "The store's revision (the newest resourceVersion).",
        "gauge",
        s.revision,
    );
    gauge(
        &mut out,
        "outpost_nodes_linked",
        "Nodes linked to this member.",
        "gauge",
        api.links.connected().len(),
    );
    process(&mut out);
    out
}

/// The process figures Prometheus' client libraries export, from `/proc/self`.
fn process(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14, 15 (utime, stime) and 22 (start time) of stat(5), counted from the state
    // (field 3) at index 0, in clock ticks of 100 a second.
    gauge(
        out,
        "process_cpu_seconds_total",
        "User and system CPU time spent, in seconds.",
        "counter",
        (num(11) + num(12)) / 100.0,
    );
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    gauge(
        out,
        "process_start_time_seconds",
        "Start time of the process since the epoch, in seconds.",
        "gauge",
        boot + num(19) / 100.0,
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    gauge(
        out,
        "process_resident_memory_bytes",
        "Resident memory size, in bytes.",
        "gauge",
        rss * 1024,
    );
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    gauge(
        out,
        "process_open_fds",
        "Open file descriptors.",
        "gauge",
        fds,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_as_kube_apiserver_labels_them() {
        let k = |m, p, w, a| kind(m, p, w, a);
        assert_eq!(
            k("GET", "/api/v1/namespaces/default/pods", true, false),
            Some(("WATCH", "", "v1", "pods", "", "namespace"))
        );
        assert_eq!(
            k("PATCH", "/api/v1/namespaces/d/pods/p/status", false, false),
            Some(("PATCH", "", "v1", "pods", "status", "resource"))
        );
        assert_eq!(
            k(
                "PATCH",
                "/apis/apps/v1/namespaces/d/deployments/web",
                false,
                true
            )
            .map(|k| k.0),
            Some("APPLY")
        );
        assert_eq!(
            k("GET", "/apis/apps/v1/deployments", false, false),
            Some(("LIST", "apps", "v1", "deployments", "", "cluster"))
        );
        assert_eq!(
            k("DELETE", "/api/v1/namespaces/d/configmaps", false, false).map(|k| k.0),
            Some("DELETECOLLECTION")
        );
        // Made-up names and subresources do not become labels.
        assert_eq!(
            k("GET", "/api/v1/namespaces/d/nothings", false, false),
            None
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces/d/pods/p/madeup", false, false).map(|k| k.4),
            Some("")
        );
        assert_eq!(k("GET", "/version", false, false), None);
        assert_eq!(
            k(
                "GET",
                "/apis/autoscaling/v1/namespaces/d/horizontalpodautoscalers",
                false,
                false
            )
            .map(|k| k.2),
            Some("v1")
        );

        let r = Requests::default();
        let pods = kind("GET", "/api/v1/namespaces/d/pods/p", false, false).unwrap();
        r.record(pods, 200, Duration::from_millis(3));
        r.record(pods, 200, Duration::from_millis(70));
        r.record(pods, 404, Duration::from_secs(60));
        let mut out = String::new();
        r.write(&mut out);
        let labels = "verb=\"GET\",group=\"\",version=\"v1\",resource=\"pods\",subresource=\"\",scope=\"resource\",component=\"apiserver\"";
        for line in [
            format!("apiserver_request_total{{{labels},code=\"200\"}} 2"),
            format!("apiserver_request_total{{{labels},code=\"404\"}} 1"),
            format!("apiserver_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1"),
            format!("apiserver_request_duration_seconds_bucket{{{labels},le=\"0.1\"}} 2"),
            format!("apiserver_request_duration_seconds_bucket{{{labels},le=\"30\"}} 2"),
            format!("apiserver_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 3"),
            format!("apiserver_request_duration_seconds_count{{{labels}}} 3"),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }
}
