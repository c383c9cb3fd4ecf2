//! `outpost-bench node`: Wasm pods through the whole path (kubectl's API call, scheduler,
//! node link, agent, wasmtime) on one `outpost-control` and one joined `outpost-node`, both
//! release builds on loopback: create→Running latency, a burst of short pods, and the agent's
//! memory idle and with 100 running pods. The peer is the `wasmtime` CLI starting the same
//! module from the command line, in the same run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{client, rss_kib, start};
use super::percentile;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example(name: &str) -> anyhow::Result<Vec<u8>> {
    // The checkout `cargo run` runs in, not the one the binary was built in.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
    let p = dir.join("../examples/out").join(format!("{name}.wasm"));
    std::fs::read(&p).with_context(|| format!("{}: run scripts/examples.sh first", p.display()))
}

fn pod(name: &str, image: &str, policy: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"runtimeClassName": "wasm", "restartPolicy": policy,
                 "containers": [{"name": "main", "image": image,
                     "resources": {"limits": {"memory": "16Mi"}}}]}})
    .to_string()
}

pub struct Figures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_ms: f64,
    pub burst: usize,
    pub burst_per_s: f64,
    /// Store revisions per burst pod, from the first create until every pod has ended.
    pub writes_per_pod: f64,
    /// API requests per burst pod over the same span, by verb and resource, most first.
    pub requests_per_pod: Vec<(String, f64)>,
    /// CPU time per burst pod over the same span, of the control plane and of the agent:
    /// steadier than starts/s, which swings with what else the two vCPUs are doing.
    pub control_ms_per_pod: f64,
    pub agent_ms_per_pod: f64,
    /// The kernel's share of each (system time over user and system).
    pub control_sys: f64,
    pub agent_sys: f64,
    /// The benchmark's own CPU per burst pod (its 64 clients and its watch), and how busy
    /// the whole machine was from the first create to the last start: what bounds the rate.
    pub client_ms_per_pod: f64,
    pub busy: f64,
    pub rss_idle_mb: f64,
    /// None when fewer than 100 pods were created (`--pods`).
    pub rss_100_mb: Option<f64>,
    pub peer_p50_ms: Option<f64>,
}

/// Phase changes of pods in `default`, as (name, phase, when seen).
/// Of a pod watch event, what [`watch_phases`] reads.
#[derive(serde::Deserialize)]
struct PodEvent {
    #[serde(rename = "type")]
    kind: String,
    object: Seen,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Seen {
    metadata: SeenMeta,
    status: SeenStatus,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct SeenMeta {
    name: String,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SeenStatus {
    phase: String,
    container_statuses: Vec<SeenContainer>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct SeenContainer {
    state: HashMap<String, serde::de::IgnoredAny>,
}

pub(crate) async fn watch_phases(
    c: reqwest::Client,
    api: String,
    tx: mpsc::UnboundedSender<(String, String, Instant)>,
) -> anyhow::Result<()> {
    let events = super::api::pod_events::<PodEvent>(&c, &api, "0").await?;
    futures::pin_mut!(events);
    while let Some(ev) = events.next().await {
        let Ok(ev) = ev else { continue };
        let (name, status) = (ev.object.metadata.name, ev.object.status);
        let started = status
            .container_statuses
            .first()
            .is_some_and(|c| c.state.contains_key("running") || c.state.contains_key("terminated"));
        let phase = if ev.kind == "DELETED" {
            "Deleted".to_string()
        } else if started && status.phase == "Pending" {
            "Started".to_string()
        } else {
            status.phase
        };
        if tx.send((name, phase, Instant::now())).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Wait until `name` is seen in one of `phases`; when it was seen.
pub(crate) async fn wait(
    rx: &mut mpsc::UnboundedReceiver<(String, String, Instant)>,
    name: String,
    phases: &[&str],
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((n, p, at))) if n == name && phases.contains(&p.as_str()) => return Ok(at),
            Ok(Some(_)) => {}
            _ => bail!("{name} did not reach {phases:?} within 30 s"),
        }
    }
}

/// User and system CPU time that process `pid` has used, in ms.
fn cpu_split_ms(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // In clock ticks of USER_HZ, which Linux fixes at 100 for /proc on x86 and arm.
    match f[..] {
        [user, sys] => (user * 10.0, sys * 10.0),
        _ => (0.0, 0.0),
    }
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (/proc/stat).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The store's revision now, from a list's resourceVersion.
/// The API's request counts by verb, resource and subresource (its `/metrics`).
async fn requests(c: &reqwest::Client, api: &str) -> anyhow::Result<HashMap<String, f64>> {
    let text = c
        .get(format!("https://{api}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, n)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (res, sub) = (label("resource"), label("subresource"));
        let what = match sub.as_str() {
            "" => format!("{} {res}", label("verb")),
            _ => format!("{} {res}/{sub}", label("verb")),
        };
        *out.entry(what).or_insert(0.0) += n.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

async fn revision(c: &reqwest::Client, api: &str) -> anyhow::Result<u64> {
    let v: Value = c
        .get(format!(
            "https://{api}/api/v1/namespaces/default/pods?limit=1"
        ))
        .send()
        .await?
        .json()
        .await?;
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("a list without a resourceVersion: {v}"))
}

pub(crate) async fn post(
    c: &reqwest::Client,
    url: String,
    ct: &str,
    body: Vec<u8>,
) -> anyhow::Result<Value> {
    let r = c
        .post(url)
        .header("content-type", ct)
        .body(body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {}", v["message"]);
    }
    Ok(v)
}

fn wasmtime_peer(module: &Path, runs: usize) -> anyhow::Result<Option<f64>> {
    if Command::new("wasmtime").arg("--version").output().is_err() {
        eprintln!("note: the wasmtime CLI is not installed (OUTPOST_BENCH=1 scripts/setup.sh installs it); no peer figure");
        return Ok(None);
    }
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = Command::new("wasmtime").arg("run").arg(module).output()?;
        if !out.status.success() {
            bail!("wasmtime run: {}", String::from_utf8_lossy(&out.stderr));
        }
        times.push(t.elapsed());
    }
    times.sort();
    Ok(Some(percentile(&times, 0.5) / 1000.0))
}

/// Start `outpost-node` (the release build beside this binary) with its output discarded.
pub(crate) fn spawn_node(cmd: &mut Command) -> anyhow::Result<Child> {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {:?} (cargo build --release -p outpost-edge-node)",
                cmd.get_program()
            )
        })
}

/// One release `outpost-control` and one joined `outpost-node`, on loopback.
/// Fields drop in order: the agent, then the control plane, then their files.
pub(crate) struct Cluster {
    agent: Agent,
    members: Vec<super::api::Member>,
    pub(crate) api: String,
    pub(crate) c: reqwest::Client,
    pub(crate) root: tempfile::TempDir,
}

impl Cluster {
    pub(crate) async fn start() -> anyhow::Result<Cluster> {
        Cluster::start_with(None).await
    }

    /// [`Cluster::start`] with the agent binary `agent` instead of the release build beside
    /// this benchmark.
    pub(crate) async fn start_with(agent: Option<PathBuf>) -> anyhow::Result<Cluster> {
        let root = tempfile::tempdir()?;
        let ms = tokio::task::block_in_place(|| start(root.path(), 1, &[]))?;
        let api = ms[0].api.clone();
        let c = client(&root.path().join("m1/pki"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = c
                .get(format!(
                    "https://{api}/apis/node.k8s.io/v1/runtimeclasses/wasm"
                ))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("the control plane did not bootstrap");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let token = post(
            &c,
            format!("https://{api}/outpost/v1/tokens"),
            "application/json",
            vec![],
        )
        .await?;
        let token = token["token"].as_str().unwrap_or_default().to_string();
        let node_bin: PathBuf = match agent {
            Some(a) => a,
            None => super::api::control_bin()?.with_file_name("outpost-node"),
        };
        let agent = Agent(spawn_node(
            Command::new(&node_bin)
                .args(["--server", &api, "--token", &token, "--name", "bench-node"])
                // Room for the whole burst at once (kubelet's default is 110).
                .args(["--max-pods", "2000"])
                .arg("--data-dir")
                .arg(root.path().join("node"))
                .env("RUST_LOG", "warn"),
        )?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c
                .get(format!("https://{api}/api/v1/nodes/bench-node"))
                .send()
                .await?;
            if r.status().is_success() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the node did not register");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Cluster {
            root,
            api,
            c,
            agent,
            members: ms,
        })
    }

    async fn push(&self, name: &str) -> anyhow::Result<()> {
        post(
            &self.c,
            format!("https://{}/outpost/v1/modules?name={name}", self.api),
            "application/wasm",
            example(name)?,
        )
        .await?;
        Ok(())
    }
}

pub async fn run(pods: usize, burst: usize, agent: Option<PathBuf>) -> anyhow::Result<Figures> {
    let cl = Cluster::start_with(agent).await?;
    let (root, api, c, agent) = (cl.root.path(), cl.api.clone(), cl.c.clone(), &cl.agent);
    for name in ["sleeper", "hello"] {
        cl.push(name).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(agent.0.id()) as f64 / 1024.0;

    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(watch_phases(c.clone(), api.clone(), tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let create = |name: String, image: &'static str, policy: &'static str| {
        let c = c.clone();
        let url = format!("https://{api}/api/v1/namespaces/default/pods");
        async move {
            post(
                &c,
                url,
                "application/json",
                pod(&name, image, policy).into_bytes(),
            )
            .await
        }
    };
    // The first pod pays for compiling the module; reported apart.
    let t = Instant::now();
    create("warm".into(), "module:sleeper", "Always").await?;
    let first = wait(&mut rx, "warm".into(), &["Running"]).await? - t;
    let mut lat = Vec::new();
    let mut rss_100 = None;
    for i in 0..pods {
        let name = format!("sleeper-{i}");
        let t = Instant::now();
        create(name.clone(), "module:sleeper", "Always").await?;
        lat.push(wait(&mut rx, name, &["Running"]).await? - t);
        if i + 1 == 100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_100 = Some(rss_kib(agent.0.id()) as f64 / 1024.0);
        }
    }
    lat.sort();
    // The burst's module is compiled by one pod before it, as a node that runs a module's
    // pods has: the burst counts starts, and the first pod's figure above is the compile.
    create("hello-warm".into(), "module:hello", "Never").await?;
    wait(&mut rx, "hello-warm".into(), &["Succeeded"]).await?;
    // Clear the sleepers, then a burst of short pods: creates from 64 clients at once, until
    // every pod has started.
    c.delete(format!("https://{api}/api/v1/namespaces/default/pods"))
        .send()
        .await?;
    let mut left = pods + 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    while left > 0 {
        let gone = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            rx.recv(),
        )
        .await;
        match gone {
            Ok(Some((_, p, _))) if p == "Deleted" => left -= 1,
            Ok(Some(_)) => {}
            _ => bail!("{left} sleepers were not deleted within 60 s"),
        }
    }
    let rev0 = revision(&c, &api).await?;
    let asked0 = requests(&c, &api).await?;
    let control_pid = cl.members[0].child.id();
    let cpu0 = (cpu_split_ms(control_pid), cpu_split_ms(agent.0.id()));
    let client0 = cpu_split_ms(std::process::id());
    let ticks0 = machine_ticks();
    // For profiling a burst from outside: who to attach to, and when.
    eprintln!(
        "burst of {burst} pods starts: control plane pid {control_pid}, agent pid {}",
        agent.0.id()
    );
    let t0 = Instant::now();
    let names: Vec<String> = (0..burst).map(|i| format!("burst-{i}")).collect();
    let creates = futures::stream::iter(names.clone())
        .map(|n| create(n, "module:hello", "Never"))
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut ended = std::collections::HashSet::new();
    let watcher = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while started.len() < burst {
            match tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                rx.recv(),
            )
            .await
            {
                Ok(Some((n, p, at)))
                    if n.starts_with("burst-")
                        && matches!(p.as_str(), "Started" | "Running" | "Succeeded" | "Failed") =>
                {
                    if matches!(p.as_str(), "Succeeded" | "Failed") {
                        ended.insert(n.clone());
                    }
                    started.entry(n).or_insert(at);
                }
                Ok(Some(_)) => {}
                _ => bail!(
                    "only {} of {burst} burst pods started within 120 s",
                    started.len()
                ),
            }
        }
        Ok(())
    };
    let (results, watched) = tokio::join!(creates, watcher);
    for r in results {
        r?;
    }
    watched?;
    let last = started.values().max().copied().unwrap_or(t0);
    let burst_s = (last - t0).as_secs_f64();
    let ticks1 = machine_ticks();
    let busy = (ticks1.0 - ticks0.0) as f64 / (ticks1.1 - ticks0.1).max(1) as f64;
    // Every pod's last status lands once all have ended; then nothing more is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended.len() < burst && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some((n, p, _))) if matches!(p.as_str(), "Succeeded" | "Failed") => {
                ended.insert(n);
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_per_pod = (revision(&c, &api).await? - rev0) as f64 / burst as f64;
    let mut requests_per_pod: Vec<(String, f64)> = requests(&c, &api)
        .await?
        .into_iter()
        .map(|(k, n)| {
            let d = (n - asked0.get(&k).copied().unwrap_or(0.0)) / burst as f64;
            (k, d)
        })
        .filter(|(k, d)| *d >= 0.01 && !k.starts_with("WATCH") && !k.starts_with("LIST"))
        .collect();
    requests_per_pod.sort_by(|a, b| b.1.total_cmp(&a.1));
    let used = |pid: u32, (user0, sys0): (f64, f64)| {
        let (user, sys) = cpu_split_ms(pid);
        let (user, sys) = (user - user0, sys - sys0);
        ((user + sys) / burst as f64, sys / (user + sys).max(1.0))
    };
    let (control_ms_per_pod, control_sys) = used(control_pid, cpu0.0);
    let (agent_ms_per_pod, agent_sys) = used(agent.0.id(), cpu0.1);
    let (client_ms_per_pod, _) = used(std::process::id(), client0);
    let peer = tokio::task::block_in_place(|| {
        let f = root.join("hello.wasm");
        std::fs::write(&f, example("hello")?)?;
        wasmtime_peer(&f, 30)
    })?;
    Ok(Figures {
        p50_ms: percentile(&lat, 0.5) / 1000.0,
        p99_ms: percentile(&lat, 0.99) / 1000.0,
        first_ms: first.as_secs_f64() * 1000.0,
        burst,
        burst_per_s: burst as f64 / burst_s,
        writes_per_pod,
        requests_per_pod,
        control_ms_per_pod,
        agent_ms_per_pod,
        control_sys,
        agent_sys,
        client_ms_per_pod,
        busy,
        rss_idle_mb: rss_idle,
        rss_100_mb: rss_100,
        peer_p50_ms: peer,
    })
}

/// Requests/s and latency of one load run.
pub struct Load {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub struct HttpFigures {
    pub ours: Load,
    pub peer: Option<Load>,
}

/// `wrk` against `url` for `secs` with `conns` connections, with its latency distribution.
fn wrk(url: &str, secs: u64, conns: u32) -> anyhow::Result<Load> {
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk (OUTPOST_BENCH=1 scripts/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
            .with_context(|| format!("no {label:?} in wrk's output: {text}"))
    };
    let ms = |v: String| -> anyhow::Result<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse()?;
        Ok(match unit {
            "us" => n / 1000.0,
            "s" => n * 1000.0,
            _ => n,
        })
    };
    Ok(Load {
        per_s: field("Requests/sec:")?.parse()?,
        p50_ms: ms(field("50%")?)?,
        p99_ms: ms(field("99%")?)?,
    })
}

/// Wait until `url` answers 2xx.
async fn answers(url: &str, who: &str) -> anyhow::Result<()> {
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("{who} did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The wasi:http example served by a node, and by `wasmtime serve`, under the same load.
pub async fn http(secs: u64, conns: u32) -> anyhow::Result<HttpFigures> {
    let cl = Cluster::start().await?;
    cl.push("http-hello").await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // On the node's network, as the peer below listens: the same loopback path for both,
    // where a pod network would add a veth and a bridge to ours.
    let spec = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "http-hello"},
        "spec": {"runtimeClassName": "wasm", "hostNetwork": true, "containers": [{"name": "main",
            "image": "module:http-hello", "ports": [{"containerPort": port}]}]}});
    post(
        &cl.c,
        format!("https://{}/api/v1/namespaces/default/pods", cl.api),
        "application/json",
        spec.to_string().into_bytes(),
    )
    .await?;
    let url = format!("http://127.0.0.1:{port}/bench");
    answers(&url, "the http-hello pod").await?;
    let ours = tokio::task::block_in_place(|| wrk(&url, secs, conns))?;
    drop(cl);
    if Command::new("wasmtime").arg("--version").output().is_err() {
        eprintln!("note: the wasmtime CLI is not installed (OUTPOST_BENCH=1 scripts/setup.sh installs it); no peer figure");
        return Ok(HttpFigures { ours, peer: None });
    }
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("http-hello.wasm");
    std::fs::write(&f, example("http-hello")?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // `-S cli`: the example reads its environment, as it may in a pod.
    let _peer = Agent(
        Command::new("wasmtime")
            .args(["serve", "-S", "cli", "--addr", &format!("127.0.0.1:{port}")])
            .arg(&f)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let url = format!("http://127.0.0.1:{port}/bench");
    answers(&url, "wasmtime serve").await?;
    let peer = tokio::task::block_in_place(|| wrk(&url, secs, conns))?;
    Ok(HttpFigures {
        ours,
        peer: Some(peer),
    })
}
