//! Harness for the end-to-end suite: starts real Outpost processes on loopback, kills them
//! with SIGKILL, restarts them, and talks to them from outside as a user would.

pub mod hookd;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// Where the workspace's binaries are: `OUTPOST_BIN_DIR`, or beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("OUTPOST_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/<test> → <target>/<profile>/<name>
    exe.parent()
        .and_then(Path::parent)
        .map(|p| p.join(name))
        .expect("target directory")
}

/// A loopback port no other test in this run holds, free for TCP and UDP both (the API's
/// port also carries the node gateway's QUIC).
pub fn free_tcp_port() -> u16 {
    reserve_port()
}

pub fn free_udp_port() -> u16 {
    reserve_port()
}

/// Ports come from below the kernel's ephemeral range, so no `bind(0)` or outgoing
/// connection takes one between the test choosing it and its process binding it; a lock
/// file per port, held until the test process exits, keeps the tests nextest runs side by
/// side (each in its own process) from choosing the same one. Picking with `bind(0)` and
/// closing did not: the kernel handed the same port out twice.
fn reserve_port() -> u16 {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    let dir = std::env::temp_dir().join("outpost-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock directory");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..COUNT {
        let port = (FIRST + (seed.wrapping_add(i)) % COUNT) as u16;
        let Ok(file) = std::fs::File::create(dir.join(format!("{port}.lock"))) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// The ids of `parent`'s child processes whose command line contains `word`.
pub fn children_running(parent: u32, word: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            status
                .lines()
                .any(|l| l.strip_prefix("PPid:").map(str::trim) == Some(&parent.to_string()))
                && String::from_utf8_lossy(&cmdline).contains(word)
        })
        .collect()
}

/// The logs of starts 1..=`starts` of a process, `DIR/STEM.N`, one after the other.
fn numbered_logs(dir: &Path, stem: &str, starts: u32) -> String {
    (1..=starts)
        .filter_map(|n| std::fs::read_to_string(dir.join(format!("{stem}.{n}"))).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `outpost-control` process.
pub struct Member {
    pub id: u64,
    pub dir: PathBuf,
    pub peer: String,
    pub admin: String,
    pub extra: Vec<String>,
    /// Kubernetes API address, when the member serves the API.
    pub api: Option<String>,
    join: Option<String>,
    child: Option<Child>,
    starts: u32,
}

impl Member {
    pub fn new(id: u64, root: &Path, extra: &[&str]) -> Self {
        Member {
            id,
            dir: root.join(format!("m{id}")),
            peer: format!("127.0.0.1:{}", free_udp_port()),
            admin: format!("127.0.0.1:{}", free_tcp_port()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            api: None,
            join: None,
            child: None,
            starts: 0,
        }
    }

    /// Start the process; `join` names a member to join through on first start.
    pub fn start(&mut self, join: Option<&Member>) -> anyhow::Result<()> {
        if let Some(j) = join {
            self.join = Some(j.peer.clone());
            // A new member gets the cluster's peer CA, as an operator would copy it.
            let pki = self.dir.join("pki");
            std::fs::create_dir_all(&pki)?;
            for f in ["peer-ca.crt", "peer-ca.key", "ca.crt", "ca.key"] {
                let to = pki.join(f);
                if !to.exists() {
                    std::fs::copy(j.dir.join("pki").join(f), &to)?;
                }
            }
        }
        std::fs::create_dir_all(&self.dir)?;
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("log.{}", self.starts)))?;
        let mut cmd = Command::new(bin("outpost-control"));
        cmd.args(["--id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--peer-listen", &self.peer, "--admin-listen", &self.admin])
            .args(["--election-ms", "400"])
            .args(&self.extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(j) = &self.join {
            cmd.args(["--join", j]);
        }
        if let Some(a) = &self.api {
            cmd.args(["--api-listen", a]);
        }
        self.child = Some(cmd.spawn().context("spawning outpost-control")?);
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything this member has logged, across restarts.
    pub fn logs(&self) -> String {
        numbered_logs(&self.dir, "log", self.starts)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

pub async fn status(c: &reqwest::Client, m: &Member) -> anyhow::Result<Value> {
    Ok(c.get(m.url("/v1/status"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// `f` until it succeeds, every 200 ms for up to `secs` seconds; its last error, said as
/// `what`, when it never does.
pub fn retry<T>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if t.elapsed() > Duration::from_secs(secs) => {
                anyhow::bail!("{what}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Wait until `f` holds, polling; fail with `what` after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last_err = String::new();
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last_err})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id of the member that says it leads.
pub async fn leader(c: &reqwest::Client, members: &[&Member]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for m in members.iter().filter(|m| m.running()) {
            if let Ok(s) = status(c, m).await {
                if s["state"] == "Leader" {
                    return s["id"].as_u64().context("leader id");
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no leader within 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Start a cluster of `n` members: the first initializes it, the rest join through it.
pub async fn cluster(root: &Path, n: u64, extra: &[&str]) -> anyhow::Result<Vec<Member>> {
    cluster_with(root, n, extra, false).await
}

/// Like [`cluster`]; with `api` each member also serves the Kubernetes API.
pub async fn cluster_with(
    root: &Path,
    n: u64,
    extra: &[&str],
    api: bool,
) -> anyhow::Result<Vec<Member>> {
    let c = client();
    let mut members: Vec<Member> = (1..=n).map(|id| Member::new(id, root, extra)).collect();
    if api {
        for m in &mut members {
            m.api = Some(format!("127.0.0.1:{}", free_tcp_port()));
        }
    }
    members[0].start(None)?;
    eventually(30, "the first member", || async {
        Ok(status(&c, &members[0]).await?["state"] == "Leader")
    })
    .await?;
    for i in 1..members.len() {
        let (head, tail) = members.split_at_mut(i);
        tail[0].start(Some(&head[0]))?;
    }
    eventually(60, "all members to be voters", || async {
        let s = status(&c, &members[0]).await?;
        Ok(s["voters"].as_array().map_or(0, |v| v.len()) == n as usize)
    })
    .await?;
    // A member's Kubernetes API listens a moment after it has joined as a voter.
    eventually(30, "every member's API to listen", || async {
        Ok(members
            .iter()
            .filter_map(|m| m.api.as_deref())
            .all(|a| std::net::TcpStream::connect(a).is_ok()))
    })
    .await?;
    Ok(members)
}

/// Put with retries across members: the write is idempotent, so a retry after a lost reply
/// is safe. Returns the revision from the acknowledgement.
pub async fn put_anywhere(
    c: &reqwest::Client,
    members: &[&Member],
    key: &str,
    value: &str,
    start: usize,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = start;
    loop {
        let live: Vec<&&Member> = members.iter().filter(|m| m.running()).collect();
        if !live.is_empty() {
            let m = live[i % live.len()];
            let res = c
                .post(m.url("/v1/put"))
                .json(&serde_json::json!({"key": key, "value": value}))
                .send()
                .await;
            if let Ok(r) = res {
                if r.status().is_success() {
                    let v: Value = r.json().await?;
                    return v["revision"].as_u64().context("revision in reply");
                }
            }
        }
        if Instant::now() > deadline {
            bail!("could not write {key} within a minute");
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// All keys under `prefix` as one member sees them (linearizable).
pub async fn range(
    c: &reqwest::Client,
    m: &Member,
    prefix: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let v: Value = c
        .get(m.url("/v1/range"))
        .query(&[("prefix", prefix)])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["kvs"]
        .as_array()
        .context("kvs")?
        .iter()
        .map(|kv| {
            (
                kv["key"].as_str().unwrap_or_default().to_string(),
                kv["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Wait until every running member reports the same revision and key-space hash.
pub async fn converged(c: &reqwest::Client, members: &[&Member]) -> anyhow::Result<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for m in members.iter().filter(|m| m.running()) {
            let r = async {
                let v: Value = c
                    .get(m.url("/v1/hash"))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                anyhow::Ok((
                    v["revision"].as_u64().unwrap_or(0),
                    v["hash"].as_str().unwrap_or("").to_string(),
                ))
            }
            .await;
            match r {
                Ok(x) => seen.push(x),
                Err(_) => break,
            }
        }
        let all = seen.len() == members.iter().filter(|m| m.running()).count();
        if all && !seen.is_empty() && seen.windows(2).all(|w| w[0] == w[1]) {
            return Ok(seen[0].clone());
        }
        if Instant::now() > deadline {
            bail!("members did not converge within 60s: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The output of one kubectl run.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Fail with the whole output unless the command succeeded.
    pub fn expect_ok(self, what: &str) -> anyhow::Result<Run> {
        if !self.ok {
            bail!(
                "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
    pub fn expect_err(self, what: &str) -> anyhow::Result<Run> {
        if self.ok {
            bail!("{what} should have failed:\nstdout: {}", self.stdout);
        }
        Ok(self)
    }

    /// [`Run::expect_err`], saying `why` on stderr.
    pub fn expect_refusal(self, what: &str, why: &str) -> anyhow::Result<Run> {
        let r = self.expect_err(what)?;
        if !r.stderr.contains(why) {
            bail!("{what} failed without {why:?}:\nstderr: {}", r.stderr);
        }
        Ok(r)
    }
}

/// A kubectl binary: the one on PATH, or `kubectl.1.NN` installed beside its real file.
pub fn kubectl_bin(minor: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").context("PATH")?;
    let onpath = std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .context("kubectl is not on PATH; the end-to-end suite drives the real kubectl")?;
    match minor {
        None => Ok(onpath),
        Some(v) => {
            let real = std::fs::canonicalize(&onpath)?;
            let p = real
                .parent()
                .context("kubectl dir")?
                .join(format!("kubectl.{v}"));
            if !p.is_file() {
                bail!("{} is missing", p.display());
            }
            Ok(p)
        }
    }
}

/// Run `bin` with `args` against `kubeconfig`, discovery cached under `cache`.
pub fn kubectl_with(
    bin: &Path,
    kubeconfig: &Path,
    cache: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Run> {
    use std::io::Write;
    std::fs::create_dir_all(cache)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("HOME", cache)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    wait_timeout(child, Duration::from_secs(60)).map(Run::from)
}

fn wait_timeout(mut child: Child, limit: Duration) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "command timed out; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Move the calling thread into a network namespace of its own, with loopback up; the
/// processes it starts from then on (a cluster, kubectl, a registry) share it, and nothing
/// they route or bind touches the machine's or another test's.
#[allow(unsafe_code)]
pub fn private_netns() -> anyhow::Result<()> {
    // SAFETY: unshare takes no pointers; it changes only this thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("ip link set lo up")?;
    anyhow::ensure!(ok.success(), "ip link set lo up failed");
    Ok(())
}

/// `outpost up` as a user runs it: a one-machine cluster and its kubeconfig.
pub struct Up {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub api: String,
    admin: String,
    cache: PathBuf,
    child: Option<Child>,
    starts: u32,
    extra: Vec<String>,
    /// Whether its node runs netd (the service proxy); off unless a test asks, since netd
    /// takes the service CIDR of the network namespace it runs in.
    services: bool,
}

impl Up {
    /// `outpost up` whose node runs netd. Call [`private_netns`] first: the cluster's service
    /// network is then the test's alone.
    pub fn start_with_services(root: &Path) -> anyhow::Result<Up> {
        Up::start_inner(root, &[], true, "127.0.0.1")
    }

    /// As [`Up::start_with_services`], the API and node gateway listening on `ip` (for nodes
    /// in other network namespaces), with `extra` flags.
    pub fn start_at(root: &Path, ip: &str, extra: &[&str]) -> anyhow::Result<Up> {
        Up::start_inner(root, extra, true, ip)
    }

    pub fn start(root: &Path) -> anyhow::Result<Up> {
        Up::start_with(root, &[])
    }

    /// `outpost up` with extra flags (e.g. `--no-node`).
    pub fn start_with(root: &Path, extra: &[&str]) -> anyhow::Result<Up> {
        Up::start_inner(root, extra, false, "127.0.0.1")
    }

    fn start_inner(root: &Path, extra: &[&str], services: bool, ip: &str) -> anyhow::Result<Up> {
        let mut up = Up {
            services,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: root.join("outpost"),
            kubeconfig: root.join("outpost").join("kubeconfig"),
            api: format!("{ip}:{}", free_tcp_port()),
            admin: format!("127.0.0.1:{}", free_tcp_port()),
            cache: root.join("kube-cache"),
            child: None,
            starts: 0,
        };
        std::fs::create_dir_all(&up.cache)?;
        up.launch()?;
        Ok(up)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("up.log.{}", self.starts)))?;
        let _ = std::fs::remove_file(&self.kubeconfig);
        let child = Command::new(bin("outpost"))
            .args(["up", "--listen", &self.api, "--admin-listen", &self.admin])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "info,openraft=warn")
            .env(
                "OUTPOST_SERVICE_PROXY",
                if self.services { "on" } else { "off" },
            )
            .env(
                "OUTPOST_PROXY_METRICS",
                if self.services {
                    "127.0.0.1:10249"
                } else {
                    "off"
                },
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning outpost up")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.kubeconfig.exists() {
                if let Ok(r) = self.kubectl(&["get", "namespace", "default", "-o", "name"]) {
                    if r.ok {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("outpost up did not come up in 30s: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop (SIGKILL) and start again on the same data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()
    }

    /// The `outpost up` process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        numbered_logs(&self.dir, "up.log", self.starts)
    }

    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Run> {
        kubectl_with(
            &kubectl_bin(None)?,
            &self.kubeconfig,
            &self.cache,
            args,
            None,
        )
    }

    pub fn kubectl_in(&self, args: &[&str], stdin: &str) -> anyhow::Result<Run> {
        kubectl_with(
            &kubectl_bin(None)?,
            &self.kubeconfig,
            &self.cache,
            args,
            Some(stdin),
        )
    }

    /// `kubectl run -i --rm --restart=Never NAME --image=IMAGE ARGS...` with `stdin` as its
    /// input: a pod that reads what kubectl sends, and is deleted after.
    pub fn run_interactively(
        &self,
        name: &str,
        image: &str,
        args: &[&str],
        stdin: &str,
    ) -> anyhow::Result<Run> {
        let image = format!("--image={image}");
        let mut all = vec!["run", "-i", "--rm", "--restart=Never", name, &image];
        all.extend_from_slice(args);
        self.kubectl_in(&all, stdin)
    }

    /// kubectl 1.NN, from beside the real kubectl.
    pub fn kubectl_v(&self, minor: &str, args: &[&str]) -> anyhow::Result<Run> {
        self.kubectl_v_with(minor, args, None)
    }

    /// [`Up::kubectl_v`] with `stdin` as kubectl's input.
    pub fn kubectl_v_in(&self, minor: &str, args: &[&str], stdin: &str) -> anyhow::Result<Run> {
        self.kubectl_v_with(minor, args, Some(stdin))
    }

    fn kubectl_v_with(
        &self,
        minor: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<Run> {
        let cache = self.cache.join(minor);
        std::fs::create_dir_all(&cache)?;
        kubectl_with(
            &kubectl_bin(Some(minor))?,
            &self.kubeconfig,
            &cache,
            args,
            stdin,
        )
    }

    /// A one-use bootstrap token from `outpost token create`.
    pub fn token(&self) -> anyhow::Result<String> {
        let r = self
            .outpost(&["token", "create"])?
            .expect_ok("token create")?;
        Ok(r.stdout.trim().to_string())
    }

    /// An `outpost-node` named `name`, its data under `dir`, joined with a fresh token and
    /// Ready.
    pub fn join(&self, dir: &Path, name: &str) -> anyhow::Result<Node> {
        self.join_with(dir, name, None, 30)
    }

    /// As [`Up::join`], the agent run by `program` (see [`Node::program`]), Ready within
    /// `secs`.
    pub fn join_with(
        &self,
        dir: &Path,
        name: &str,
        program: Option<Vec<PathBuf>>,
        secs: u64,
    ) -> anyhow::Result<Node> {
        let token = self.token()?;
        let mut node = Node::new(dir);
        node.program = program;
        node.start(&[
            "--server",
            &self.gateway(),
            "--token",
            &token,
            "--name",
            name,
        ])?;
        self.node_ready(&node, name, secs)?;
        Ok(node)
    }

    /// Wait up to `secs` for Node `name` (run by `node`) to be Ready; its log if it is not.
    pub fn node_ready(&self, node: &Node, name: &str, secs: u64) -> anyhow::Result<()> {
        self.wait_field(
            secs,
            &["node", name],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            |s| s == "True",
        )
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", node.logs()))
    }

    /// `kubectl port-forward ARGS` (kubectl 1.NN if `minor` is given, with `env` set), once
    /// it listens on the local port it prints.
    pub fn port_forward(
        &self,
        minor: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> anyhow::Result<Forward> {
        port_forward(&self.kubeconfig, &self.cache, minor, env, args)
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Where nodes join and connect: the API's address, on UDP.
    pub fn gateway(&self) -> String {
        self.api.clone()
    }

    /// The `outpost` command against this cluster (module push, token create).
    pub fn outpost(&self, args: &[&str]) -> anyhow::Result<Run> {
        let child = Command::new(bin("outpost"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running outpost")?;
        wait_timeout(child, Duration::from_secs(60)).map(Run::from)
    }

    /// `kubectl get` one field with jsonpath, retried until `want` says yes.
    /// Wait up to `secs` for `kubectl describe WHAT` to show every one of `words` (events
    /// arrive a little after what they tell of); the description.
    pub fn wait_described(
        &self,
        secs: u64,
        what: &[&str],
        words: &[&str],
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut all: Vec<&str> = vec!["describe"];
        all.extend_from_slice(what);
        loop {
            let d = self.kubectl(&all)?.expect_ok("describe")?.stdout;
            if words.iter().all(|w| d.contains(w)) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("waited {secs}s for {words:?} in the description of {what:?}:\n{d}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn wait_field(
        &self,
        secs: u64,
        args: &[&str],
        jsonpath: &str,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let path = format!("jsonpath={jsonpath}");
        let mut all: Vec<&str> = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", &path]);
        let mut last = String::new();
        loop {
            if let Ok(r) = self.kubectl(&all) {
                last = format!("{}{}", r.stdout, r.stderr);
                if r.ok && want(r.stdout.trim()) {
                    return Ok(r.stdout.trim().to_string());
                }
            }
            if Instant::now() > deadline {
                bail!("waited {secs}s for {args:?} {jsonpath}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// This package's directory, as the test runner gives it when the test runs. The path built
/// into the binary is only the fallback: checkouts that share one target directory (as the
/// test command arranges) may run a binary another checkout built.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A Wasm example built by `scripts/examples.sh`.
pub fn example(name: &str) -> anyhow::Result<PathBuf> {
    let p = crate_dir()
        .join("../examples/out")
        .join(format!("{name}.wasm"));
    if !p.is_file() {
        bail!(
            "{} is missing: run scripts/examples.sh (the test command does)",
            p.display()
        );
    }
    Ok(p)
}

/// One `outpost-node` process.
pub struct Node {
    pub dir: PathBuf,
    /// A named network namespace to run in, else the test's.
    pub netns: Option<String>,
    /// The command that runs the agent (an installed copy, or `qemu-aarch64-static AGENT`),
    /// else the workspace's `outpost-node`.
    pub program: Option<Vec<PathBuf>>,
    child: Option<Child>,
    starts: u32,
}

impl Node {
    pub fn new(dir: &Path) -> Node {
        Node {
            dir: dir.to_path_buf(),
            netns: None,
            program: None,
            child: None,
            starts: 0,
        }
    }

    /// Start the agent with `args` (after `--data-dir DIR`).
    pub fn start(&mut self, args: &[&str]) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("node.log.{}", self.starts)))?;
        let program = self
            .program
            .clone()
            .unwrap_or_else(|| vec![bin("outpost-node")]);
        let mut cmd = match &self.netns {
            // nsenter, not `ip netns exec`: that one mounts a /sys of its own, without the
            // cgroup hierarchy OCI pods need.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .args(&program);
                c
            }
            None => {
                let mut c = Command::new(&program[0]);
                c.args(&program[1..]);
                c
            }
        };
        let child = cmd
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env("OUTPOST_SERVICE_PROXY", "off")
            .env("OUTPOST_PROXY_METRICS", "off")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning outpost-node")?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait for the agent to exit on its own (a refused join); its status.
    pub fn wait_exit(&mut self, secs: u64) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("outpost-node still running after {secs}s: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        numbered_logs(&self.dir, "node.log", self.starts)
    }

    /// The running agent's process id (qemu's, for an emulated agent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        clean_netns(&self.dir);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.kill();
        clean_netns(&self.dir.join("node"));
    }
}

/// Remove the pod network namespaces an agent with data dir `dir` left: a killed agent
/// cannot, and this machine outlives the test.
fn clean_netns(dir: &Path) {
    for e in std::fs::read_dir(dir.join("net"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let ns = format!("outpost-{}", e.file_name().to_string_lossy());
        let _ = Command::new("ip")
            .args(["netns", "delete", &ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Status, headers (lowercase names) and body of one HTTP exchange.
type Reply = (u16, Vec<(String, String)>, Vec<u8>);

/// A real OCI registry (Debian's `docker-registry`, the CNCF distribution) on loopback, with
/// a way to push Wasm artifacts to it as `oras` or `wkg` would.
pub struct Registry {
    pub addr: String,
    child: Child,
    /// `Authorization` for the registry's htpasswd user, when it has one.
    auth: Option<String>,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> anyhow::Result<Registry> {
        Registry::start_with(None, "127.0.0.1")
    }

    /// A registry listening on `ip` (for nodes in other network namespaces).
    pub fn start_at(ip: &str) -> anyhow::Result<Registry> {
        Registry::start_with(None, ip)
    }

    /// A registry that answers only `user` with `password` (htpasswd auth, as registries
    /// behind imagePullSecrets do).
    pub fn start_with_auth(user: &str, password: &str) -> anyhow::Result<Registry> {
        Registry::start_with(Some((user, password)), "127.0.0.1")
    }

    fn start_with(auth: Option<(&str, &str)>, ip: &str) -> anyhow::Result<Registry> {
        use base64::Engine;
        let dir = tempfile::tempdir()?;
        let addr = format!("{ip}:{}", free_tcp_port());
        let config = dir.path().join("config.yml");
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            // bcrypt through the C library's crypt (libxcrypt), at the lowest cost.
            let out = Command::new("python3")
                .args(["-W", "ignore", "-c"])
                .arg("import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))")
                .arg(password)
                .output()
                .context("hashing the registry password with python3")?;
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !hash.starts_with("$2") {
                bail!("no bcrypt hash: {}", String::from_utf8_lossy(&out.stderr));
            }
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            yml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: outpost-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yml)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (scripts/setup.sh installs it)")?;
        let r = Registry {
            addr,
            child,
            auth: auth.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
            _dir: dir,
        };
        let t = Instant::now();
        while r.http("GET", "/v2/", &[], &[]).map(|x| x.0) != Ok(200) {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("the registry did not come up on {}", r.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(r)
    }

    /// One HTTP/1.1 exchange: status, headers (lowercase names), body.
    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Reply, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(a) = &self.auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .and_then(|()| s.write_all(body))
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no header end")?;
        let head = String::from_utf8_lossy(&out[..end]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        let hs = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, hs, out[end + 4..].to_vec()))
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> anyhow::Result<String> {
        let digest = format!("sha256:{}", outpost_api::sha256_hex(data));
        let (code, hs, _) = self
            .http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])
            .map_err(anyhow::Error::msg)?;
        let loc = hs
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| v.clone())
            .with_context(|| format!("upload start: HTTP {code}"))?;
        let loc = loc
            .strip_prefix(&format!("http://{}", self.addr))
            .unwrap_or(&loc)
            .to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let (code, _, body) = self
            .http(
                "PUT",
                &format!("{loc}{sep}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                data,
            )
            .map_err(anyhow::Error::msg)?;
        if code != 201 {
            bail!(
                "blob upload: HTTP {code}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(digest)
    }

    /// Push `data` as a one-layer artifact `repo:tag` whose layer has `media_type`
    /// (`application/wasm` for a Wasm artifact); returns the image reference.
    pub fn push(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        data: &[u8],
    ) -> anyhow::Result<String> {
        self.push_manifest(
            repo,
            tag,
            ("application/vnd.wasm.config.v0+json", b"{}"),
            &[(media_type, data)],
        )
    }

    /// Push an OCI image `repo:tag` of `layers` (gzipped tars) and an image config whose
    /// `config` section is `config` (Env, Cmd, User…); returns the image reference.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: Value,
    ) -> anyhow::Result<String> {
        use std::io::Read;
        let mut diff_ids = Vec::new();
        for l in layers {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&l[..]).read_to_end(&mut tar)?;
            diff_ids.push(format!("sha256:{}", outpost_api::sha256_hex(&tar)));
        }
        let image = serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let layers: Vec<(&str, &[u8])> = layers.iter().map(|l| (gz, &l[..])).collect();
        self.push_manifest(
            repo,
            tag,
            ("application/vnd.oci.image.config.v1+json", image.as_bytes()),
            &layers,
        )
    }

    fn push_manifest(
        &self,
        repo: &str,
        tag: &str,
        config: (&str, &[u8]),
        layers: &[(&str, &[u8])],
    ) -> anyhow::Result<String> {
        let config_digest = self.push_blob(repo, config.1)?;
        let mut descs = Vec::new();
        for (media_type, data) in layers {
            let digest = self.push_blob(repo, data)?;
            descs.push(
                serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()}),
            );
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": config.0, "digest": config_digest, "size": config.1.len()},
            "layers": descs,
        })
        .to_string();
        let (code, _, body) = self
            .http(
                "PUT",
                &format!("/v2/{repo}/manifests/{tag}"),
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                manifest.as_bytes(),
            )
            .map_err(anyhow::Error::msg)?;
        if code != 201 {
            bail!("manifest: HTTP {code}: {}", String::from_utf8_lossy(&body));
        }
        Ok(format!("{}/{repo}:{tag}", self.addr))
    }
}

/// This machine's architecture as OCI names it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

/// The tools a busybox image links to `/bin/busybox`.
const BUSYBOX_TOOLS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "id", "env", "ls", "dd", "unshare", "hostname",
    "head", "tr", "wc", "touch", "mkdir", "kill", "ps", "httpd", "ip", "wget", "rm", "tar",
];

/// One gzipped tar layer holding Debian's static busybox (busybox-static, which
/// scripts/setup.sh installs) at /bin/busybox, its tools as symlinks, and an /etc/passwd and
/// /etc/group with root and nobody: enough of a distribution for the OCI tests.
pub fn busybox_layer() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (scripts/setup.sh installs busybox-static)")?;
    let mut b = LayerBuilder::new();
    b.dir("bin")?;
    b.file("bin/busybox", &busybox, 0o755)?;
    for t in BUSYBOX_TOOLS {
        b.symlink(&format!("bin/{t}"), "busybox")?;
    }
    b.dir("etc")?;
    b.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    b.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    for d in ["tmp", "root", "proc", "sys", "dev"] {
        b.dir(d)?;
    }
    b.finish()
}

/// A gzipped tar layer built entry by entry, with no checks: tests also build layers a
/// registry should never have served.
pub struct LayerBuilder(tar::Builder<flate2::write::GzEncoder<Vec<u8>>>);

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder(tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        )))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// A path written as given, even `../x` or `/x` (tar's own setters refuse those).
    fn append(&mut self, mut h: tar::Header, path: &str, data: &[u8]) -> anyhow::Result<()> {
        let name = &mut h.as_old_mut().name;
        if path.len() >= name.len() {
            bail!("layer path {path} is too long");
        }
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.0.append(&h, data)?;
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        self.append(Self::header(tar::EntryType::Directory, 0o755, 0), path, &[])
    }

    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        let h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.append(h, path, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        h.set_link_name(target)?;
        self.append(h, path, &[])
    }

    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.0.into_inner()?.finish()?)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `kubectl port-forward`, stopped when dropped.
pub struct Forward {
    child: Child,
    /// The local port it listens on.
    pub local: u16,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Forward {
    /// What kubectl has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Its exit status, if it exits within `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with the official `kubernetes` client that scripts/setup.sh installs
/// (`OUTPOST_PYTHON` overrides it).
pub fn python() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("OUTPOST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/outpost/py/bin/python"))
        })
        .context("no HOME")?;
    if !p.exists() {
        bail!("{} is missing: run scripts/setup.sh", p.display());
    }
    Ok(p)
}

/// One HTTP/1.0 GET (no chunked body to decode) to `127.0.0.1:port`: the status and body.
/// Waits up to 10 s for the port to accept, as a server may still be binding.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// [`http_get`] to any address.
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(10) => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// `kubectl port-forward ARGS` against `kubeconfig` (kubectl 1.NN if `minor` is given, with
/// `env` set), once it listens on the local port it prints.
pub fn port_forward(
    kubeconfig: &Path,
    cache: &Path,
    minor: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Forward> {
    use std::io::BufRead;
    let cache = cache.join(minor.unwrap_or("pf"));
    std::fs::create_dir_all(&cache)?;
    let mut child = Command::new(kubectl_bin(minor)?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("port-forward")
        .args(args)
        .env("HOME", &cache)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (err_pipe, out_pipe) = (child.stderr.take(), child.stdout.take());
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err_pipe?).lines() {
            let line = line.ok()?;
            sink.lock().ok()?.push_str(&(line + "\n"));
        }
        Some(())
    });
    let (tx, rx) = std::sync::mpsc::channel();
    // Read to the end: kubectl dies of SIGPIPE if its stdout closes.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out_pipe?).lines() {
            let _ = tx.send(line.ok()?);
        }
        Some(())
    });
    let mut fwd = Forward {
        child,
        local: 0,
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while fwd.local == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            // "Forwarding from 127.0.0.1:41234 -> 8080"
            Ok(l) => {
                if let Some(rest) = l.strip_prefix("Forwarding from 127.0.0.1:") {
                    fwd.local = rest
                        .split_whitespace()
                        .next()
                        .and_then(|p| p.parse().ok())
                        .context("local port")?;
                }
            }
            Err(_) => bail!(
                "kubectl port-forward {args:?} did not start listening: {}",
                fwd.stderr()
            ),
        }
    }
    Ok(fwd)
}

/// A TCP echo server on loopback for the life of the test: each connection gets back what it
/// sends, and a half-close once its input ends. Its port.
pub fn echo_server() -> anyhow::Result<u16> {
    let echo = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = echo.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut back = conn.try_clone()?;
                std::io::copy(&mut conn, &mut back)?;
                back.shutdown(std::net::Shutdown::Write)
            });
        }
    });
    Ok(port)
}
