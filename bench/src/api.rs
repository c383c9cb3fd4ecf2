//! `outpost-bench api`: pod creates through the Kubernetes API (HTTPS, client certificate,
//! JSON bodies of a typical pod), on 1 and 3 `outpost-control` processes with fsync on, beside
//! etcd 3.4 storing the same bodies; plus the control plane's memory idle and with 10,000
//! pods stored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{percentile, port_tcp, port_udp, start_etcd};

pub fn pod(name: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench", "tier": "edge"},
                     "annotations": {"outpost.dev/bench": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.4.2",
            "args": ["--port", "8080", "--log-level", "info"],
            "env": [{"name": "MODE", "value": "edge"}, {"name": "REGION", "value": "eu-west"}],
            "ports": [{"containerPort": 8080, "name": "http"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          "limits": {"cpu": "500m", "memory": "128Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}],
            "nodeSelector": {"kubernetes.io/arch": "arm64"},
            // No scheduler by this name runs, so the pods stay as created and the figures
            // are the API's and the store's alone (`outpost-bench schedule` measures the
            // scheduler).
            "schedulerName": "outpost-bench"}
    })
    .to_string()
}

pub(crate) struct Member {
    pub child: Child,
    pub api: String,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn control_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join("outpost-control");
    if !p.exists() {
        bail!(
            "{} is missing: cargo build --release -p outpost-control",
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn start(root: &Path, members: u64, extra: &[String]) -> anyhow::Result<Vec<Member>> {
    let bin = control_bin()?;
    let mut out: Vec<Member> = Vec::new();
    let mut first_peer = String::new();
    for id in 1..=members {
        let dir = root.join(format!("m{id}"));
        let peer = format!("127.0.0.1:{}", port_udp()?);
        let api = format!("127.0.0.1:{}", port_tcp()?);
        let admin = format!("127.0.0.1:{}", port_tcp()?);
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--id",
            &id.to_string(),
            "--peer-listen",
            &peer,
            "--api-listen",
            &api,
            "--admin-listen",
            &admin,
        ])
        .arg("--data-dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null());
        // `OUTPOST_BENCH_LOGS=DIR` keeps each member's log, at `RUST_LOG` if that is set.
        let logs = std::env::var_os("OUTPOST_BENCH_LOGS");
        if logs.is_none() || std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        match logs {
            Some(d) => cmd.stderr(std::fs::File::create(
                Path::new(&d).join(format!("m{id}.log")),
            )?),
            None => cmd.stderr(Stdio::null()),
        };
        if id > 1 {
            std::fs::create_dir_all(dir.join("pki"))?;
            for f in ["peer-ca.crt", "peer-ca.key", "ca.crt", "ca.key"] {
                std::fs::copy(root.join("m1/pki").join(f), dir.join("pki").join(f))?;
            }
            cmd.args(["--join", &first_peer]);
        }
        let child = cmd.spawn().context("starting outpost-control")?;
        out.push(Member { child, api });
        let m = out.last().context("member")?;
        let _ = m;
        wait_status(&admin, id == 1)?;
        if id == 1 {
            first_peer = peer;
        }
    }
    Ok(out)
}

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn wait_status(admin: &str, leader: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(body) = http_get(admin, "/v1/status") {
            if !leader || body.contains("\"Leader\"") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("member at {admin} did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn client(pki: &Path) -> anyhow::Result<reqwest::Client> {
    let (cert, key) = outpost_control::pki::issue_client(pki, "bench", &["system:masters"])?;
    let ca = std::fs::read(pki.join("ca.crt"))?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .identity(reqwest::Identity::from_pem(
            format!("{cert}{key}").as_bytes(),
        )?)
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn create(c: &reqwest::Client, api: &str, ns: &str, name: &str) -> anyhow::Result<()> {
    let r = c
        .post(format!("https://{api}/api/v1/namespaces/{ns}/pods"))
        .header("content-type", "application/json")
        .body(pod(name))
        .send()
        .await?;
    if r.status() != reqwest::StatusCode::CREATED {
        bail!(
            "create {name}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

pub struct Figures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub creates_per_s: f64,
    pub paced_rate: f64,
    pub paced_p99_ms: f64,
    pub rss_idle_mb: f64,
    pub rss_10k_mb: f64,
}

/// Sequential latency, throughput of `clients`, and p99 at a paced `rate` for `seconds`.
pub async fn outpost(
    members: u64,
    ops: usize,
    clients: usize,
    seconds: u64,
    rate: u64,
    extra: &[String],
) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    let ms = tokio::task::block_in_place(|| start(root.path(), members, extra))?;
    let c = client(&root.path().join("m1/pki"))?;
    let api = ms[0].api.clone();
    // Wait for the bootstrap namespaces, then let the process settle before measuring idle.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .get(format!("https://{api}/api/v1/namespaces/default"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .ok()
        != Some(true)
    {
        anyhow::ensure!(Instant::now() < deadline, "the API did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = ms[0].child.id();
    let rss_idle = rss_kib(pid);
    // Fill to 10,000 pods stored and measure memory at rest, before the loads below add more.
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (c, api, next) = (c.clone(), api.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 10_000 {
                    return anyhow::Ok(());
                }
                create(&c, &api, "default", &format!("fill-{i}")).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_10k = rss_kib(pid);
    for i in 0..50 {
        create(&c, &api, "default", &format!("warm-{i}")).await?;
    }
    let mut lat = Vec::with_capacity(ops);
    for i in 0..ops {
        let t = Instant::now();
        create(&c, &api, "default", &format!("seq-{i}")).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..clients {
        let (c, api, count) = (c.clone(), api.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < stop {
                create(&c, &api, "default", &format!("conc-{w}-{n}")).await?;
                count.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let throughput = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let (plat, achieved) = paced(rate, seconds, |i| {
        let (c, api) = (c.clone(), api.clone());
        async move { create(&c, &api, "default", &format!("paced-{i}")).await }
    })
    .await?;
    Ok(Figures {
        p50_ms: percentile(&lat, 0.5) / 1000.0,
        p99_ms: percentile(&lat, 0.99) / 1000.0,
        creates_per_s: throughput,
        paced_rate: achieved,
        paced_p99_ms: percentile(&plat, 0.99) / 1000.0,
        rss_idle_mb: rss_idle as f64 / 1024.0,
        rss_10k_mb: rss_10k as f64 / 1024.0,
    })
}

/// Open loop: start `op(i)` every 1/`rate` seconds for `seconds`, whatever the answers do,
/// each on its own task. Returns the latencies (from each task's start), sorted, and the
/// rate achieved.
async fn paced<F, Fut>(rate: u64, seconds: u64, op: F) -> anyhow::Result<(Vec<Duration>, f64)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until((t0 + interval * i as u32).into()).await;
        let fut = op(i);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            fut.await?;
            anyhow::Ok((t - t0, t.elapsed()))
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut trace = String::new();
    for t in tasks {
        let (at, l) = t.await??;
        trace.push_str(&format!("{} {}\n", at.as_micros(), l.as_micros()));
        lat.push(l);
    }
    // `OUTPOST_BENCH_PACED=FILE` appends each paced load: a header with the wall-clock start
    // in µs since the epoch, then one line per request with its start offset and latency in
    // µs, so that a tail can be lined up with the members' logs (`OUTPOST_BENCH_LOGS`).
    if let Some(p) = std::env::var_os("OUTPOST_BENCH_PACED") {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let start = since.saturating_sub(t0.elapsed()).as_micros();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)?;
        std::io::Write::write_all(&mut f, format!("--- {start}\n{trace}").as_bytes())?;
    }
    let achieved = total as f64 / t0.elapsed().as_secs_f64();
    lat.sort();
    Ok((lat, achieved))
}

/// etcd's figures for the same bodies and loads.
pub struct EtcdFigures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub puts_per_s: f64,
    pub paced_p99_ms: f64,
}

/// etcd storing the same pod bodies.
pub async fn etcd(
    members: usize,
    ops: usize,
    clients: usize,
    seconds: u64,
    rate: u64,
) -> anyhow::Result<EtcdFigures> {
    let e = start_etcd(members)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kv = loop {
        if let Ok(c) = etcd_client::Client::connect(e.endpoints.clone(), None).await {
            let mut kv = c.kv_client();
            if kv.put("/ready", "1", None).await.is_ok() {
                break kv;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut lat = Vec::new();
    for i in 0..ops {
        let t = Instant::now();
        kv.put(
            format!("/registry/pods/default/seq-{i}"),
            pod(&format!("seq-{i}")),
            None,
        )
        .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < stop {
                kv.put(format!("/registry/pods/default/c-{w}-{n}"), pod("c"), None)
                    .await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let puts_per_s = total as f64 / start.elapsed().as_secs_f64();
    let (plat, _) = paced(rate, seconds, |i| {
        let mut kv = kv.clone();
        async move {
            kv.put(format!("/registry/pods/default/paced-{i}"), pod("p"), None)
                .await?;
            Ok(())
        }
    })
    .await?;
    Ok(EtcdFigures {
        p50_ms: percentile(&lat, 0.5) / 1000.0,
        p99_ms: percentile(&lat, 0.99) / 1000.0,
        puts_per_s,
        paced_p99_ms: percentile(&plat, 0.99) / 1000.0,
    })
}

/// The events of a watch of the `default` namespace's pods from `rv`, each decoded, in order;
/// the stream ends with the watch.
/// The default namespace's pod events from revision `rv`, each decoded as a `T`: a
/// `serde_json::Value`, or a struct of only the fields a benchmark reads, so that the
/// benchmark's own decoding takes less of the machine it measures.
pub async fn pod_events<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    api: &str,
    rv: &str,
) -> anyhow::Result<impl futures::Stream<Item = anyhow::Result<T>>> {
    use futures::StreamExt;
    let r = c
        .get(format!(
            "https://{api}/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"
        ))
        .timeout(Duration::from_secs(3600))
        .send()
        .await?;
    // `from`: where the search for the end of the line goes on after more bytes come.
    let lines = futures::stream::unfold(
        (r.bytes_stream(), Vec::new(), 0),
        |(mut body, mut buf, mut from)| async move {
            loop {
                if let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
                    let end = from + i;
                    let ev = serde_json::from_slice(&buf[..end]).map_err(anyhow::Error::from);
                    buf.drain(..=end);
                    return Some((ev, (body, buf, 0)));
                }
                from = buf.len();
                match body.next().await? {
                    Ok(chunk) => buf.extend_from_slice(&chunk),
                    Err(e) => return Some((Err(e.into()), (body, buf, from))),
                }
            }
        },
    );
    Ok(lines)
}
