//! `outpost-bench schedule`: the scheduler on one release `outpost-control` (fsync on) with
//! simulated nodes (Node objects with no agent behind them) and a backlog of pending pods.
//!
//! The pods are created held back by their RuntimeClass's node selector, which no node
//! matches; once everything is stored and quiet, one update of the RuntimeClass releases
//! them all at once. Bindings per second run from that update to the last binding seen in a
//! watch. The decision latency is `fit::pick` alone, in this process, over the same number of
//! nodes. There is no kube-scheduler here to run beside it; its own CI bar at 5,000 nodes
//! (680–810 pods/s) is printed for comparison.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use outpost_control::scheduler::fit;
use serde_json::{json, Value};

use super::api::{client, rss_kib, start};
use super::percentile;

pub struct Figures {
    pub binds_per_s: f64,
    pub bound: usize,
    pub decide_p50_us: f64,
    pub decide_p99_us: f64,
    pub rss_mb: f64,
}

fn node(i: usize) -> (Value, Value) {
    let name = format!("sim-{i:05}");
    let obj = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
            "outpost.dev/runtime-wasm": "true", "zone": format!("z{}", i % 4)}}});
    let status = json!({"status": {
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}});
    (obj, status)
}

fn pod(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p-{i:05}"), "labels": {"app": "bench"}},
        "spec": {"runtimeClassName": "bench",
            "containers": [{"name": "c", "image": "module:bench",
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})
}

/// Run `f` over `items` with `conc` requests in flight; fail on the first error.
async fn each<T, F, Fut>(items: Vec<T>, conc: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(items)
        .map(f)
        .buffer_unordered(conc)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn send(r: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let r = r.send().await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {}", v["message"]);
    }
    Ok(v)
}

/// The store revision, which stops moving once the control plane is quiet.
async fn revision(c: &reqwest::Client, api: &str) -> anyhow::Result<u64> {
    let v = send(c.get(format!("https://{api}/api/v1/namespaces?limit=1"))).await?;
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("resourceVersion")
}

/// `fit::pick` alone: one pod's decision among `nodes` nodes, p50 and p99 in µs.
fn decisions(nodes: usize, pods: usize) -> (f64, f64) {
    let mut infos: Vec<fit::NodeInfo> = (0..nodes)
        .map(|i| {
            fit::NodeInfo::of(&{
                let (mut n, s) = node(i);
                n["status"] = s["status"].clone();
                n
            })
        })
        .collect();
    let mut times = Vec::with_capacity(pods);
    for i in 0..pods {
        let needs = fit::needs(&pod(i), &json!({"outpost.dev/runtime-wasm": "true"}));
        let t = Instant::now();
        let refs: Vec<&fit::NodeInfo> = infos.iter().collect();
        let picked = fit::pick(&needs, &refs, i);
        times.push(t.elapsed());
        if let Ok(k) = picked {
            infos[k].add(&needs);
        }
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

pub async fn run(nodes: usize, pods: usize) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    // Simulated nodes have no agent and so no link: keep the node lifecycle controller from
    // calling them unreachable during the run.
    let quiet = ["--node-grace=1000000000".to_string()];
    let ms = tokio::task::block_in_place(|| start(root.path(), 1, &quiet))?;
    let api = ms[0].api.clone();
    let c = client(&root.path().join("m1/pki"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(c.get(format!(
        "https://{api}/apis/node.k8s.io/v1/runtimeclasses/wasm"
    )))
    .await
    .is_err()
    {
        if Instant::now() > deadline {
            bail!("the control plane did not bootstrap");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let classes = format!("https://{api}/apis/node.k8s.io/v1/runtimeclasses");
    send(c.post(&classes).json(
        &json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "bench"}, "handler": "wasm",
        "scheduling": {"nodeSelector": {"bench": "held"}}}),
    ))
    .await?;
    eprintln!("creating {nodes} nodes and {pods} held pods ...");
    each((0..nodes).collect(), 64, |i| {
        let c = c.clone();
        let api = api.clone();
        async move {
            let (n, s) = node(i);
            let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
            send(c.post(format!("https://{api}/api/v1/nodes")).json(&n)).await?;
            send(
                c.patch(format!("https://{api}/api/v1/nodes/{name}/status"))
                    .header("content-type", "application/merge-patch+json")
                    .body(s.to_string()),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    each((0..pods).collect(), 64, |i| {
        let c = c.clone();
        let api = api.clone();
        async move {
            send(
                c.post(format!("https://{api}/api/v1/namespaces/default/pods"))
                    .json(&pod(i)),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    eprintln!("created; waiting for the control plane to go quiet ...");
    // Quiet: the scheduler has looked at every pod and found no node for it.
    let mut last = revision(&c, &api).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = revision(&c, &api).await?;
        if now == last {
            break;
        }
        last = now;
    }
    let events = super::api::pod_events::<Value>(&c, &api, &last.to_string()).await?;
    futures::pin_mut!(events);
    eprintln!("quiet at revision {last}; releasing");
    let released = Instant::now();
    send(
        c.patch(format!("{classes}/bench"))
            .header("content-type", "application/merge-patch+json")
            .body(
                json!({"scheduling": {"nodeSelector": {"bench": null, "outpost.dev/runtime-wasm": "true"}}})
                    .to_string(),
            ),
    )
    .await?;
    let mut seen = std::collections::HashSet::new();
    let mut last_bound = released;
    let limit = Instant::now() + Duration::from_secs(300);
    while seen.len() < pods {
        let ev = tokio::time::timeout_at(limit.into(), events.next()).await;
        let Ok(Some(ev)) = ev else {
            eprintln!(
                "the watch ended or timed out with {} pods bound",
                seen.len()
            );
            break;
        };
        let Ok(ev) = ev else { continue };
        let o = &ev["object"];
        if !o["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
            && seen.insert(o["metadata"]["name"].as_str().unwrap_or("").to_string())
        {
            last_bound = Instant::now();
        }
    }
    let elapsed = last_bound.duration_since(released).as_secs_f64();
    let rss = rss_kib(ms[0].child.id()) as f64 / 1024.0;
    let (p50, p99) = tokio::task::block_in_place(|| decisions(nodes, 2000));
    Ok(Figures {
        binds_per_s: seen.len() as f64 / elapsed.max(1e-9),
        bound: seen.len(),
        decide_p50_us: p50,
        decide_p99_us: p99,
        rss_mb: rss,
    })
}
