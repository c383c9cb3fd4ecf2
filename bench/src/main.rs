//! Benchmarks against the peers, measured in the same run. Not tests: they print figures.
//!
//! `outpost-bench store`: durable writes of the replicated store against etcd 3.4 (Debian's
//! `etcd-server`), 1 and 3 members on loopback, 256-byte values: one client's latency
//! (p50/p99) and the throughput of many concurrent clients. fsync stays on for both.
//!
//! `outpost-bench api`: pod creates through the Kubernetes API against etcd (see `api`).
//! `outpost-bench node`: Wasm pods end to end against the `wasmtime` CLI (see `node`).
//! `outpost-bench schedule`: bindings per second with simulated nodes (see `schedule`).
//! `outpost-bench oci`: OCI containers against `runc` (see `oci`).
//! `outpost-bench netd`: a Service's data path against direct and nftables DNAT (see `netd`).

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outpost_api::store::{Expect, Outcome};
use outpost_control::store::{Config, Store};

#[cfg(target_env = "gnu")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod deploy;
mod netd;
mod node;
mod oci;
mod schedule;

#[derive(Parser)]
#[command(about = "Outpost benchmarks against their peers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store writes against etcd.
    Store {
        /// Sequential writes for the one-client latency figures.
        #[arg(long, default_value_t = 2000)]
        ops: usize,
        /// Concurrent clients for the throughput figure.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Seconds of concurrent load per system.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections the etcd clients share (like etcd's own benchmark --conns).
        #[arg(long, default_value_t = 100)]
        etcd_conns: usize,
    },
    /// Pod creates through the Kubernetes API, memory idle and with 10,000 pods.
    Api {
        /// Sequential creates for the one-client latency figures.
        #[arg(long, default_value_t = 1000)]
        ops: usize,
        /// Concurrent clients for the throughput figure.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds of each load.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Creates per second of the paced (open-loop) load.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Cluster sizes to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 3])]
        members: Vec<u64>,
        /// Extra `outpost-control` flags, e.g. `--control-arg=--snapshot-every=100000`.
        #[arg(long = "control-arg", allow_hyphen_values = true)]
        control_args: Vec<String>,
    },
    /// A Service's data path through netd against a direct connection and nftables DNAT.
    Netd {
        /// Seconds of each iperf3 and sockperf run.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Interleaved latency runs per path; the median is kept.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Services defined for the second latency round.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
    },
    /// Wasm pods end to end: create→Running, a burst of short pods, agent memory.
    Node {
        /// Pods created one after another for the latency figures.
        #[arg(long, default_value_t = 200)]
        pods: usize,
        /// Short pods created at once for the starts/s figure.
        #[arg(long, default_value_t = 1000)]
        burst: usize,
        /// The agent binary to measure, such as the build boards get (`cargo build --profile
        /// deploy -p outpost-edge-node`); by default the release build beside this benchmark.
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
    },
    /// Boards: aarch64 binary sizes, the emulated agent's idle memory, and a Wasm pod's cold
    /// start from an ahead-of-time artifact against compiling on the node (under qemu-user).
    Deploy {
        /// Cold starts of each kind; the median is kept.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds the agents sit idle before their memory is read.
        #[arg(long, default_value_t = 10)]
        idle: u64,
    },
    /// Bindings per second, decision latency and memory with simulated nodes.
    Schedule {
        /// Simulated nodes (Node objects with no agent).
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Pending pods released at once.
        #[arg(long, default_value_t = 10000)]
        pods: usize,
    },
    /// OCI containers: /bin/true start-to-exit against `runc run`, then create->Running of
    /// OCI pods with the image cached. Needs root.
    Oci {
        /// Start-to-exit runs of each runtime.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Pods created one after another for the create->Running figures.
        #[arg(long, default_value_t = 50)]
        pods: usize,
    },
    /// The wasi:http example served by a node and by `wasmtime serve`, under `wrk`.
    Http {
        /// Seconds of load on each server.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        conns: u32,
    },
}

const VALUE: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    writes_per_s: f64,
}

/// Let the disk finish what the last system measured left behind (its writes still in the
/// page cache, its deleted data directory) before the next is measured: every system starts
/// on a quiet disk, whichever ran before it.
fn settle() {
    tokio::task::block_in_place(|| {
        let _ = std::process::Command::new("sync").status();
        std::thread::sleep(Duration::from_secs(1));
    });
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Run the one-client and many-client loads against a `put` function.
async fn measure<F, Fut>(
    put: F,
    ops: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Figures>
where
    F: Fn(String, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let value = vec![b'v'; VALUE];
    for i in 0..100 {
        put(format!("/warm/{i}"), value.clone()).await?;
    }
    let mut lat = Vec::with_capacity(ops);
    for i in 0..ops {
        let t = Instant::now();
        put(format!("/seq/{i:08}"), value.clone()).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let put = put.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                put(format!("/conc/{c:05}/{}", n % 64), value.clone()).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(Figures {
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        writes_per_s: total as f64 / start.elapsed().as_secs_f64(),
    })
}

fn port_tcp() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_udp() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn outpost(
    members: u64,
    ops: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    let mut stores = Vec::new();
    let mut first_peer = String::new();
    for id in 1..=members {
        let dir = root.path().join(format!("m{id}"));
        let mut cfg = Config::new(id, &dir, format!("127.0.0.1:{}", port_udp()?).parse()?);
        // One member is measured as `outpost up` runs it.
        cfg.lone = members == 1;
        if id > 1 {
            std::fs::create_dir_all(dir.join("pki"))?;
            for f in ["peer-ca.crt", "peer-ca.key"] {
                std::fs::copy(root.path().join("m1/pki").join(f), dir.join("pki").join(f))?;
            }
            cfg.join = Some(first_peer.clone());
        }
        let s = Store::open(cfg).await?;
        if id == 1 {
            first_peer = s.status().addr;
            // Wait for the first member to lead before the others join it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while s.status().leader != Some(1) {
                anyhow::ensure!(Instant::now() < deadline, "no leader");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        stores.push(s);
    }
    let leader = stores[0].clone();
    let put = move |k: String, v: Vec<u8>| {
        let s = leader.clone();
        async move {
            match s.put(&k, v, Expect::Any).await? {
                Outcome::Committed { .. } => Ok(()),
                other => bail!("unexpected {other:?}"),
            }
        }
    };
    let f = measure(put, ops, clients, seconds).await?;
    for s in &stores {
        s.shutdown().await;
    }
    Ok(f)
}

struct Etcd {
    children: Vec<Child>,
    _dir: tempfile::TempDir,
    endpoints: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_etcd(members: usize) -> anyhow::Result<Etcd> {
    let dir = tempfile::tempdir()?;
    let peers: Vec<(String, u16, u16)> = (0..members)
        .map(|i| Ok((format!("e{i}"), port_tcp()?, port_tcp()?)))
        .collect::<anyhow::Result<_>>()?;
    let initial: Vec<String> = peers
        .iter()
        .map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}"))
        .collect();
    let mut children = Vec::new();
    let mut endpoints = Vec::new();
    for (name, client, peer) in &peers {
        let c = Command::new("etcd")
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.path().join(name))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--log-level",
                "error",
                "--logger",
                "zap",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting etcd (apt-get install etcd-server, or OUTPOST_BENCH=1 scripts/setup.sh)",
            )?;
        children.push(c);
        endpoints.push(format!("127.0.0.1:{client}"));
    }
    Ok(Etcd {
        children,
        _dir: dir,
        endpoints,
    })
}

async fn etcd(
    members: usize,
    ops: usize,
    clients: usize,
    seconds: u64,
    conns: usize,
) -> anyhow::Result<Figures> {
    let e = start_etcd(members)?;
    // Talk to the leader, as our figures do: find it by asking each member.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let mut found = None;
        for ep in &e.endpoints {
            if let Ok(mut c) = etcd_client::Client::connect([ep.as_str()], None).await {
                if let Ok(s) = c.status().await {
                    if s.leader() != 0 && s.leader() == s.header().map_or(0, |h| h.member_id()) {
                        found = Some(ep.clone());
                    }
                }
            }
        }
        if let Some(f) = found {
            break f;
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd elected no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut pool = Vec::new();
    for _ in 0..conns.max(1) {
        pool.push(
            etcd_client::Client::connect([leader.as_str()], None)
                .await?
                .kv_client(),
        );
    }
    let pool = Arc::new(pool);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let put = move |k: String, v: Vec<u8>| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len();
        let mut kv = pool[i].clone();
        async move {
            kv.put(k, v, None).await?;
            Ok(())
        }
    };
    measure(put, ops, clients, seconds).await
}

fn row(name: &str, ours: f64, theirs: f64, unit: &str, higher_better: bool) {
    let ratio = if higher_better {
        ours / theirs
    } else {
        theirs / ours
    };
    println!("  {name:<26} outpost {ours:>10.1} {unit:<8} etcd {theirs:>10.1} {unit:<8} ratio {ratio:>5.2}x");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Store {
            ops,
            clients,
            seconds,
            etcd_conns,
        } => {
            println!("store writes, {VALUE}-byte values, fsync on; one client x {ops} sequential writes, {clients} clients x {seconds}s");
            println!("(ratio > 1 means Outpost is better: faster latency or more writes/s)");
            for members in [1u64, 3] {
                settle();
                let ours = outpost(members, ops, clients, seconds).await?;
                settle();
                let theirs = etcd(members as usize, ops, clients, seconds, etcd_conns).await?;
                println!("{members} member(s):");
                row("one client p50", ours.p50_us, theirs.p50_us, "us", false);
                row("one client p99", ours.p99_us, theirs.p99_us, "us", false);
                row(
                    &format!("{clients} clients"),
                    ours.writes_per_s,
                    theirs.writes_per_s,
                    "writes/s",
                    true,
                );
            }
        }
        Cmd::Api {
            ops,
            clients,
            seconds,
            rate,
            members: sizes,
            control_args,
        } => {
            println!("pod creates through the API (HTTPS, {}-byte JSON pods, fsync on) vs etcd puts of the same bodies", api::pod("seq-0").len());
            println!("(ratio > 1 means Outpost is better; etcd stores bytes, Outpost admits, validates and stores an object)");
            for members in sizes {
                settle();
                let ours =
                    api::outpost(members, ops, clients, seconds, rate, &control_args).await?;
                settle();
                let etcd = api::etcd(members as usize, ops, clients, seconds, rate).await?;
                println!("{members} member(s):");
                row(
                    "one client p50",
                    ours.p50_ms * 1000.0,
                    etcd.p50_ms * 1000.0,
                    "us",
                    false,
                );
                row(
                    "one client p99",
                    ours.p99_ms * 1000.0,
                    etcd.p99_ms * 1000.0,
                    "us",
                    false,
                );
                row(
                    &format!("{clients} clients"),
                    ours.creates_per_s,
                    etcd.puts_per_s,
                    "ops/s",
                    true,
                );
                row(
                    &format!("paced {rate}/s p99"),
                    ours.paced_p99_ms * 1000.0,
                    etcd.paced_p99_ms * 1000.0,
                    "us",
                    false,
                );
                println!("  paced load achieved {:.0}/s", ours.paced_rate);
                println!(
                    "  control plane RSS (member 1): idle {:.1} MB, with 10,000 pods {:.1} MB",
                    ours.rss_idle_mb, ours.rss_10k_mb
                );
            }
        }
        Cmd::Oci { runs, pods } => {
            let f = oci::run(runs, pods).await?;
            println!("OCI containers: /bin/true start-to-exit, same busybox root file system and spec, {} runs each, alternating", f.runs);
            println!(
                "  outpost, until the agent has the outcome  median {:>6.1} ms   p90 {:>6.1} ms",
                f.ours_ms, f.ours_p90_ms
            );
            println!(
                "  outpost, until deleted and unmounted      median {:>6.1} ms   p90 {:>6.1} ms",
                f.cleaned_ms, f.cleaned_p90_ms
            );
            println!(
                "  runc run (Debian), until it exits         median {:>6.1} ms   p90 {:>6.1} ms",
                f.runc_ms, f.runc_p90_ms
            );
            println!(
                "  ratio outpost/runc                        {:>6.2}   (target <= 0.5; {:.2} until deleted)",
                f.ours_ms / f.runc_ms,
                f.cleaned_ms / f.runc_ms
            );
            println!("OCI pods through the API, scheduler, node link and agent (1 member, 1 node, release builds)");
            println!(
                "  first pod (pulls the image)        {:>8.1} ms",
                f.first_pod_ms
            );
            println!(
                "  create->Running p50 ({} pods, cached) {:>7.1} ms",
                f.pods, f.pod_p50_ms
            );
            println!(
                "  create->Running p99                {:>8.1} ms",
                f.pod_p99_ms
            );
        }
        Cmd::Netd {
            seconds,
            rounds,
            services,
        } => {
            let paths =
                tokio::task::spawn_blocking(move || netd::run(seconds, rounds.max(1), services))
                    .await??;
            println!("A Service's data path, client and backend in two network namespaces joined by a veth");
            println!(
                "  {:<14} {:>10} {:>22} {:>22}",
                "path",
                "Gbit/s",
                "RTT p50/p99, 10 svc",
                format!("p50/p99, {services} svc")
            );
            for p in &paths {
                println!(
                    "  {:<14} {:>10.2} {:>12.1} / {:>6.1} µs {:>12.1} / {:>6.1} µs",
                    p.name, p.gbits, p.rtt[0].0, p.rtt[0].1, p.rtt[1].0, p.rtt[1].1
                );
            }
            let (direct, netd, nft) = (&paths[0], &paths[1], &paths[2]);
            println!(
                "  netd throughput {:.2} Gbit/s (target >= 5): {:.2}x direct, {:.2}x nftables",
                netd.gbits,
                netd.gbits / direct.gbits,
                netd.gbits / nft.gbits
            );
            println!(
                "  netd added p50 {:.1} µs over direct (target <= 10), nftables adds {:.1} µs; ratio netd/nftables RTT {:.2}",
                netd.rtt[0].0 - direct.rtt[0].0,
                nft.rtt[0].0 - direct.rtt[0].0,
                netd.rtt[0].0 / nft.rtt[0].0
            );
            println!(
                "  10 -> {services} services: netd p50 {:.1} -> {:.1} µs ({:+.1}%), nftables {:.1} -> {:.1} µs",
                netd.rtt[0].0,
                netd.rtt[1].0,
                (netd.rtt[1].0 / netd.rtt[0].0 - 1.0) * 100.0,
                nft.rtt[0].0,
                nft.rtt[1].0
            );
        }
        Cmd::Node { pods, burst, agent } => {
            let which = match &agent {
                Some(a) => format!("agent {}", a.display()),
                None => "release builds".into(),
            };
            println!("Wasm pods through the API, scheduler, node link and agent (1 member, 1 node, {which})");
            let f = node::run(pods, burst, agent).await?;
            println!("  first pod (compiles the module)  {:>8.1} ms", f.first_ms);
            println!(
                "  create->Running p50 ({pods} pods)   {:>8.1} ms   (target <= 20)",
                f.p50_ms
            );
            println!(
                "  create->Running p99               {:>8.1} ms   (target <= 100)",
                f.p99_ms
            );
            println!(
                "  burst of {} short pods            {:>8.0} starts/s (target >= 1000)",
                f.burst, f.burst_per_s
            );
            println!(
                "  store writes per burst pod        {:>8.1}",
                f.writes_per_pod
            );
            let asked: Vec<String> = f
                .requests_per_pod
                .iter()
                .map(|(k, n)| format!("{k} {n:.2}"))
                .collect();
            println!("  API requests per burst pod        {}", asked.join(", "));
            println!(
                "  CPU per burst pod                 {:>8.2} ms control plane, {:.2} ms agent   (kernel {:.0} %, {:.0} %)",
                f.control_ms_per_pod,
                f.agent_ms_per_pod,
                f.control_sys * 100.0,
                f.agent_sys * 100.0
            );
            println!(
                "  machine in the burst              {:>8.0} % busy   (benchmark client {:.2} ms CPU per pod)",
                f.busy * 100.0,
                f.client_ms_per_pod
            );
            println!(
                "  agent RSS idle                    {:>8.1} MB   (target <= 15)",
                f.rss_idle_mb
            );
            match f.rss_100_mb {
                Some(mb) => {
                    println!("  agent RSS with 100 running pods   {mb:>8.1} MB   (target <= 40)")
                }
                None => {
                    println!("  agent RSS with 100 running pods   not measured (--pods under 100)")
                }
            }
            match f.peer_p50_ms {
                Some(p) => println!(
                    "  `wasmtime run hello.wasm` p50     {p:>8.1} ms   ratio {:.2}x (its start / our create->Running)",
                    p / f.p50_ms
                ),
                None => println!("  wasmtime CLI peer: not installed"),
            }
        }
        Cmd::Deploy { rounds, idle } => {
            println!("Boards: aarch64 static builds (deploy/build.sh), agents under qemu-aarch64-static on this x86_64 machine");
            let f = tokio::task::block_in_place(|| deploy::run(rounds, Duration::from_secs(idle)))?;
            for (name, bytes) in &f.sizes {
                let target = match name.as_str() {
                    "outpost-node" => "   (target <= 20)",
                    "outpost-node-aot" => "   (target <= 10)",
                    _ => "",
                };
                println!(
                    "  {name:<18} stripped {:>8.1} MB{target}",
                    *bytes as f64 / 1e6
                );
            }
            println!(
                "  agent RSS idle, aarch64 under qemu {:>7.1} MB   (includes the emulator)",
                f.rss_qemu_mb
            );
            println!(
                "  agent RSS idle, native x86_64      {:>7.1} MB   ratio {:.2}x",
                f.rss_native_mb,
                f.rss_qemu_mb / f.rss_native_mb.max(0.001)
            );
            println!(
                "  cold Wasm pod create->Succeeded, emulated aarch64: AOT from the control plane {:>8.0} ms, compiled on the node {:>8.0} ms, ratio {:.2}x",
                f.aot_ms,
                f.jit_ms,
                f.aot_ms / f.jit_ms.max(0.001)
            );
            match f.peer {
                Some((jit, aot)) => println!(
                    "  wasmtime CLI peer (native): `wasmtime run` {jit:.1} ms, precompiled .cwasm {aot:.1} ms, ratio {:.2}x",
                    aot / jit.max(0.001)
                ),
                None => println!("  wasmtime CLI peer: not installed"),
            }
        }
        Cmd::Schedule { nodes, pods } => {
            println!("Scheduler: {pods} pending pods released at once onto {nodes} simulated nodes (1 member, release build)");
            let f = schedule::run(nodes, pods).await?;
            println!(
                "  bindings committed              {:>8.0} /s   ({} of {pods} bound; target >= 2000; kube-scheduler's CI bar at 5,000 nodes: 680-810 pods/s)",
                f.binds_per_s, f.bound
            );
            println!(
                "  decision (fit::pick) p50 / p99  {:>8.1} / {:.1} us over {nodes} nodes",
                f.decide_p50_us, f.decide_p99_us
            );
            println!(
                "  control plane RSS               {:>8.1} MB   ({nodes} nodes, {pods} pods stored)",
                f.rss_mb
            );
        }
        Cmd::Http { secs, conns } => {
            println!("wasi:http hello under wrk ({conns} connections, {secs} s each, 1 node, release builds)");
            let f = node::http(secs, conns).await?;
            let line = |who: &str, l: &node::Load| {
                println!(
                    "  {who:<22} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
                    l.per_s, l.p50_ms, l.p99_ms
                )
            };
            line("outpost node", &f.ours);
            match &f.peer {
                Some(p) => {
                    line("wasmtime serve", p);
                    println!(
                        "  ratio (ours / wasmtime serve) {:.2}x throughput (target >= 0.8)",
                        f.ours.per_s / p.per_s
                    );
                }
                None => println!("  wasmtime serve peer: not installed"),
            }
        }
    }
    Ok(())
}
