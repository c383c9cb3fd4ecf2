//! The agent: the node's pods, its link to the control plane, and the loop that reconciles
//! the two.
//!
//! ```text
//! cache ──at start──▶ pods run at once, link or not
//! link: register Node ─▶ list + watch own pods (resume from revision, relist on 410)
//!       ─▶ ensure / stop / finish-delete each pod ─▶ status patches (only on change)
//!       ◀─ Down::Logs, Down::PortForward, Down::Exec streams
//!       lease renewals every 10 s (in memory on the control plane)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod exec;

use futures::StreamExt;
use outpost_api::link::{
    read_frame, write_frame, Down, ForwardRequest, Head, LogRequest, Token, MAX_FRAME,
};
use outpost_oci_shim::registry;
use outpost_oci_shim::run::{Containers, Outcome};
use outpost_oci_shim::spec::Launch;
use outpost_oci_shim::store::{Image, Store};
use outpost_oci_shim::tty::Terminal;
use outpost_wasm_runtime::log::{self, Log};
use outpost_wasm_runtime::{Command, Exit, Runtime, Stop};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch, OnceCell};

use crate::cache::Cache;
use crate::link::{self, Change, Link, LinkError, Pki};
use crate::logs;
use crate::net::{self, Attached, PodNet};
use crate::pod::{self, Container, Next, State};
use crate::probe::{self, Probe, Tally};
use crate::services::{self, Services};
use crate::spare::Spares;
use crate::usage;
use outpost_netd::table::{HostPort, Proto};

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `HOST:PORT` of a gateway; remembered after the first start.
    pub server: Option<String>,
    /// A bootstrap token, needed only to join.
    pub token: Option<String>,
    /// The node's name when joining (defaults to the host name).
    pub name: Option<String>,
    /// Registries spoken to over plain HTTP (besides those on loopback).
    pub insecure_registries: Vec<String>,
    /// The node's `pods` capacity.
    pub max_pods: u32,
    /// The network OCI pods take their addresses from (`A.B.C.D/N`).
    pub pod_cidr: String,
    /// The address the node is known by (its InternalIP), as K3s's `--node-ip`; where unset,
    /// the one it reaches the control plane from (see `local_ip`).
    pub node_ip: Option<std::net::IpAddr>,
    /// The service proxy and cluster DNS (netd).
    pub services: services::Config,
    /// Where Wasm modules are compiled for this node.
    pub compile: Compile,
    /// How fast events are posted.
    pub events: EventLimit,
    /// How often running containers' configMap and secret volumes are brought up to date
    /// (the kubelet's `--sync-frequency`, a minute by default).
    pub sync: Duration,
}

/// The rate events are posted at, as the kubelet's `eventRecordQPS` and `eventBurst` (50
/// and 100 by default): events are for people, and in a burst of pods they wait behind the
/// pods' own writes instead of doubling the control plane's work. Those over the limit wait
/// in memory (the newest [`MAX_EVENTS`]); the same event again only raises a count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventLimit {
    /// Events per second; 0 for no limit.
    pub qps: f64,
    /// Events posted at once after a quiet spell.
    pub burst: u32,
}

impl Default for EventLimit {
    fn default() -> EventLimit {
        EventLimit {
            qps: 50.0,
            burst: 100,
        }
    }
}

/// A token bucket of [`EventLimit`].
struct Bucket {
    limit: EventLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: EventLimit) -> Bucket {
        Bucket {
            limit,
            tokens: limit.burst.max(1) as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.limit.qps).min(self.limit.burst.max(1) as f64);
        self.at = now;
    }

    /// How many of `want` may go at `now`, taken from the bucket.
    fn take(&mut self, want: usize, now: Instant) -> usize {
        if self.limit.qps <= 0.0 {
            return want;
        }
        self.refill(now);
        let n = want.min(self.tokens.floor() as usize);
        self.tokens -= n as f64;
        n
    }

    /// How long after `now` until one more may go.
    fn wait(&mut self, now: Instant) -> Duration {
        if self.limit.qps <= 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.limit.qps)
    }
}

/// Where a node's Wasm modules are compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compile {
    /// Here, with Cranelift (agents built with the compiler).
    Node,
    /// On the control plane, ahead of time for this node's architecture; the node loads the
    /// artifact after checking it, and keeps it for restarts while offline.
    Control,
}

impl Default for Compile {
    fn default() -> Compile {
        if Runtime::compiles() {
            Compile::Node
        } else {
            Compile::Control
        }
    }
}

fn now() -> String {
    stamp(jiff::Timestamp::now())
}

fn stamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Sleep for `d` unless `stop` comes first; true if stopped.
async fn nap(stop: &Stop, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => stop.stopped(),
        _ = stop.wait() => true,
    }
}

struct PodRun {
    ns: String,
    name: String,
    spec: Value,
    /// The metadata last cached, without what every write changes (see [`same_meta`]).
    meta: Value,
    stop: Arc<Stop>,
    containers: Arc<Mutex<Vec<Container>>>,
    /// True once every container task has ended.
    finished: watch::Receiver<bool>,
    /// The pod's own network, once an OCI container asked for it.
    net: Arc<OnceCell<Attached>>,
    /// What a container added later (an ephemeral one) tells of its changes, while the pod's
    /// containers run.
    changed: std::sync::Weak<watch::Sender<u64>>,
}

#[derive(Clone)]
struct StatusUpdate {
    uid: String,
    ns: String,
    name: String,
    status: Value,
}

/// A status patch, `{"metadata":{"uid":…},"status":…}` (the uid as the kubelet's carry it),
/// encoded from the update without copying its status.
fn json_patch(u: &StatusUpdate) -> impl serde::Serialize + '_ {
    #[derive(serde::Serialize)]
    struct Uid<'a> {
        uid: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Patch<'a> {
        metadata: Uid<'a>,
        status: &'a Value,
    }
    Patch {
        metadata: Uid { uid: &u.uid },
        status: &u.status,
    }
}

pub struct Agent {
    dir: PathBuf,
    /// Pod directories kept for the next pods (see [`crate::spare`]).
    spares: Spares,
    /// Pods' configMap, secret, downwardAPI and projected volumes, by pod uid and volume
    /// name (see [`crate::volatile`]).
    volatile: PathBuf,
    node: String,
    pki: Pki,
    cache: Arc<Cache>,
    /// Made for the first Wasm pod: a node that runs none does not carry the engine, its
    /// linkers and their code in memory.
    runtime: tokio::sync::OnceCell<Arc<Runtime>>,
    /// A lock per module digest, held while the module is compiled or its artifact fetched:
    /// pods of a module not yet compiled that start together wait for the first one's work,
    /// not each on a thread of its own (or with a request of its own) for the same code.
    compiling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Module names lately resolved by the control plane: digest (hex) and when.
    names: Mutex<HashMap<String, (String, Instant)>>,
    /// Config maps, secrets and claims lately read from the control plane, and when: pods
    /// started together share one read, as they share a module name's resolution.
    objects: Mutex<HashMap<String, (Arc<Value>, Instant)>>,
    /// Reads of those under way, by object: pods wanting one meanwhile wait for that read
    /// rather than each make their own (a burst's pods all want their namespace's
    /// `kube-root-ca.crt` at once, and the control plane answers each such read by looking
    /// through the namespace's pods).
    reading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Made on the first registry pull: most nodes never pull, and a TLS client with its
    /// root store costs memory a board should keep.
    registry: std::sync::OnceLock<registry::Client>,
    insecure_registries: Vec<String>,
    max_pods: u32,
    event_limit: EventLimit,
    sync: Duration,
    link: watch::Sender<Option<Link>>,
    pods: Mutex<HashMap<String, PodRun>>,
    status_tx: mpsc::UnboundedSender<StatusUpdate>,
    events_tx: mpsc::UnboundedSender<Event>,
    host_ip: Mutex<String>,
    /// The address given with `--node-ip`, which the routes do not override.
    node_ip: Option<std::net::IpAddr>,
    /// OCI containers: the image store and the helpers, or why this machine cannot run them.
    oci: Result<Oci, String>,
    /// The pod network OCI pods join; `None` where the node cannot make one.
    net: Option<PodNet>,
    /// netd, where this node runs it.
    services: Option<Arc<Services>>,
    compile: Compile,
    /// Containers running now, by container id ([`Containers::id`]): what `kubectl attach`
    /// joins, and what `kubectl top` counts.
    live: Mutex<HashMap<String, Live>>,
    meters: usage::Meters,
}

/// A container's current run, as `kubectl attach` sees it.
#[derive(Clone)]
struct Live {
    log: Arc<Log>,
    /// Where its input goes (an OCI container whose spec has `stdin` or `tty`).
    stdin: Option<Input>,
    /// `stdinOnce`: the first attach that writes to stdin closes it as it goes.
    once: bool,
    /// Asks the run to interrupt its foreground (^C typed at its terminal).
    interrupt: Option<mpsc::UnboundedSender<()>>,
    /// Its counters, for `kubectl top`.
    usage: Arc<usage::Run>,
}

/// A container's input.
#[derive(Clone)]
enum Input {
    /// Its stdin, until that is closed.
    Pipe(Arc<tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>>),
    /// Its terminal (`tty`).
    Terminal(Arc<Terminal>),
}

/// Ends a [`Live`] run: see [`Worker::live`].
struct LiveGuard {
    agent: Arc<Agent>,
    id: String,
    log: Arc<Log>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut l) = self.agent.live.lock() {
            // Only this run's entry: a next run of the container may have replaced it.
            if l.get(&self.id)
                .is_some_and(|x| Arc::ptr_eq(&x.log, &self.log))
            {
                l.remove(&self.id);
            }
        }
        self.log.end();
    }
}

struct Oci {
    store: Store,
    containers: Containers,
    /// Manifest digests of the images running containers use, by container id.
    in_use: Mutex<HashMap<String, String>>,
}

/// How long an image no container uses stays on the node.
const IMAGE_IDLE: Duration = Duration::from_secs(3600);

/// How long a module name's resolution serves pods whose pull policy is not `Always`, and
/// an object read from the control plane serves the pods that mount it. Like a tag, a name
/// or a config map is asked for when a pod needs it; pods started together (a Deployment
/// scaling up, a burst) share one answer instead of asking once each.
const NAME_MEMO: Duration = Duration::from_secs(1);

/// The host name as a node name: lowercase, and anything a DNS label may not hold becomes
/// '-' (`Pi_4` → `pi-4`).
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        "outpost-node".into()
    } else {
        name
    }
}

/// Join if needed, start the pods the cache holds, then keep the link up forever.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let cache = Arc::new(Cache::open(&cfg.data_dir)?);
    let services = Services::start(&cfg.services, &cache).await?;
    let server = match (&cfg.server, cache.meta("server")) {
        (Some(s), _) => {
            cache.put_meta("server", s)?;
            Some(s.clone())
        }
        (None, s) => s,
    };
    let pki = Pki::new(&cfg.data_dir);
    if !pki.joined() {
        let (Some(server), Some(token)) = (&server, &cfg.token) else {
            anyhow::bail!(
                "this node has not joined a cluster yet: pass --server HOST:PORT and --token (from `outpost token create`)"
            );
        };
        let token = Token::parse(token).map_err(anyhow::Error::msg)?;
        let name = cfg.name.clone().unwrap_or_else(hostname);
        let mut delay = Duration::from_millis(500);
        loop {
            match link::join(server, &token, &name, &pki).await {
                Ok(()) => {
                    tracing::info!(node = %name, %server, "joined the cluster");
                    break;
                }
                Err(LinkError::Refused(why)) => anyhow::bail!("joining {server}: {why}"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the control plane to join; retrying");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    let node = pki.node_name()?;
    if cfg.compile == Compile::Node && !Runtime::compiles() {
        anyhow::bail!("this agent was built without a Wasm compiler: use --wasm-compile control");
    }
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (volatile, why) = crate::volatile::dir(&cfg.data_dir);
    if let Some(why) = why {
        tracing::info!(reason = %why, dir = %volatile.display(), "volume files and container bundles are kept on disk, not in memory");
    }
    let oci = match outpost_oci_shim::run::unavailable() {
        Some(why) => Err(why),
        None => std::env::current_exe()
            .map_err(|e| format!("the agent's own binary: {e}"))
            .map(|exe| Oci {
                store: Store::new(&cfg.data_dir.join("oci")),
                containers: Containers::new(&cfg.data_dir.join("oci"), &volatile.join("oci"), &exe),
                in_use: Mutex::new(HashMap::new()),
            }),
    };
    if oci.is_ok() {
        // Pod cgroups an agent that died left behind: empty ones go, before any pod starts
        // (a pod of this node that starts a container again makes its own anew). Another
        // agent on the machine could lose an empty pod cgroup between libcontainer making
        // it and the container's inside; that create fails and is retried.
        let _ =
            tokio::task::spawn_blocking(|| outpost_oci_shim::run::sweep_cgroups(&pod_cgroup("")))
                .await;
    }
    match &oci {
        Err(why) => tracing::warn!(%why, "this node runs Wasm pods only"),
        Ok(_) if !outpost_oci_shim::run::seccomp() => tracing::warn!(
            "this agent was built without libseccomp: OCI pods' seccomp profiles are not enforced"
        ),
        Ok(_) => {}
    }
    // OCI pods get their own network where the node can make one; else the node's.
    let net = match (&oci, PodNet::new(&cfg.pod_cidr)) {
        (Err(_), _) => None,
        (Ok(_), Err(e)) => anyhow::bail!(e),
        (Ok(_), Ok(n)) => match tokio::task::spawn_blocking({
            let n = n.clone();
            move || {
                n.bridge()?;
                if let Err(e) = n.masquerade() {
                    tracing::warn!(error = %e, "pods cannot reach beyond this node");
                }
                Ok::<(), String>(())
            }
        })
        .await?
        {
            Ok(()) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "no pod network: OCI pods use the node's network");
                None
            }
        },
    };
    let agent = Arc::new(Agent {
        dir: cfg.data_dir.clone(),
        spares: Spares::open(&cfg.data_dir.join("pods"), cfg.max_pods as usize),
        volatile,
        node,
        pki,
        cache,
        runtime: tokio::sync::OnceCell::new(),
        compiling: Mutex::default(),
        names: Mutex::default(),
        objects: Mutex::default(),
        reading: Mutex::default(),
        registry: std::sync::OnceLock::new(),
        insecure_registries: cfg.insecure_registries.clone(),
        max_pods: cfg.max_pods,
        event_limit: cfg.events,
        sync: cfg.sync,
        link: watch::channel(None).0,
        pods: Mutex::new(HashMap::new()),
        status_tx,
        events_tx,
        host_ip: Mutex::new(cfg.node_ip.map(|ip| ip.to_string()).unwrap_or_default()),
        node_ip: cfg.node_ip,
        oci,
        net,
        services,
        compile: cfg.compile,
        live: Mutex::default(),
        meters: usage::Meters::default(),
    });
    if let (Some(_), Some(_)) = (&agent.net, &agent.services) {
        // Pods with their own network reach service IPs through this machine.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            tracing::warn!(error = %e, "cannot enable IPv4 forwarding: pods cannot reach services");
        }
    }
    let cached = agent.cache.pods();
    tracing::info!(node = %agent.node, pods = cached.len(), "node agent starting");
    // Networks of pods that ended while the agent was down.
    if let Some(pn) = agent.net.clone() {
        let keep: std::collections::HashSet<String> = cached
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
            .collect();
        let marks = agent.dir.join("net");
        tokio::task::spawn_blocking(move || {
            for e in std::fs::read_dir(&marks).into_iter().flatten().flatten() {
                let uid = e.file_name().to_string_lossy().to_string();
                if !keep.contains(&uid) {
                    pn.detach(&uid);
                    let _ = std::fs::remove_file(e.path());
                }
            }
        })
        .await?;
    }
    for p in cached {
        agent.ensure(p);
    }
    tokio::spawn(agent.clone().report(status_rx));
    tokio::spawn(agent.clone().send_events(events_rx));
    tokio::spawn(agent.clone().collect_images());
    tokio::spawn(agent.clone().meter());
    match server {
        Some(s) => agent.link_loop(s).await,
        None => {
            tracing::warn!("no control plane address known; running cached pods only");
            std::future::pending::<()>().await;
        }
    }
    Ok(())
}

fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d + d.mul_f64(rand::rng().random_range(0.0..0.5))
}

impl Agent {
    /// A token of pod `pod`'s service account, bound to the pod (uid `uid`), as the kubelet
    /// asks for one for source `t` of volume `vname`. It is kept in the node's cache, so a pod
    /// restarts with it while the control plane is out of reach; one still in the first 80%
    /// of its lifetime is used again as it is.
    async fn token(
        &self,
        pod: &Value,
        uid: &str,
        t: &Value,
        vname: &str,
        path: &str,
    ) -> Result<String, String> {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let sa = outpost_api::service_account(&pod["spec"]);
        let key = format!("{vname}/{path}");
        let cached = self.cache.object(TOKENS, uid, &key);
        let now = jiff::Timestamp::now().as_second();
        if let Some(c) = &cached {
            if c["refresh"].as_i64().is_some_and(|r| r > now) {
                if let Some(token) = c["token"].as_str() {
                    return Ok(token.to_string());
                }
            }
        }
        let link = self.link.borrow().clone();
        if let Some(link) = link {
            let ttl = t["expirationSeconds"].as_i64().unwrap_or(3600);
            let mut spec = json!({"expirationSeconds": ttl, "boundObjectRef": {
                "kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"], "uid": uid}});
            if let Some(a) = t["audience"].as_str().filter(|a| !a.is_empty()) {
                spec["audiences"] = json!([a]);
            }
            let body = json!({"apiVersion": "authentication.k8s.io/v1",
                              "kind": "TokenRequest", "spec": spec});
            let at = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
            let asked = link
                .call(
                    "POST",
                    &at,
                    Some(("application/json", body.to_string().into_bytes())),
                )
                .await;
            match asked {
                Ok(a) if a.ok() => {
                    let answer = a.json();
                    let Some(token) = answer["status"]["token"].as_str() else {
                        return Err("the token request had no token".into());
                    };
                    let keep = json!({"token": token, "refresh": now + ttl * 8 / 10});
                    let _ = self.cache.put_object(TOKENS, uid, &key, &keep);
                    return Ok(token.to_string());
                }
                Ok(a) => return Err(format!("service account {ns}/{sa}: {}", a.message())),
                // Out of reach: the cached token, however old.
                Err(_) => {}
            }
        }
        cached
            .and_then(|c| c["token"].as_str().map(String::from))
            .ok_or_else(|| {
                format!(
                    "no token of service account {ns}/{sa} is cached and the control plane is unreachable"
                )
            })
    }

    /// Replace the tokens in running pods' volumes that are past 80% of their lifetime, as
    /// the kubelet does: a pod that rereads its token file stays signed in.
    async fn refresh_tokens(&self) {
        let running: Vec<(String, Value)> = match self.pods.lock() {
            Ok(p) => p
                .iter()
                .filter(|(_, r)| !*r.finished.borrow())
                .map(|(uid, r)| {
                    let pod = json!({"metadata": {"name": r.name, "namespace": r.ns},
                                     "spec": r.spec});
                    (uid.clone(), pod)
                })
                .collect(),
            Err(_) => return,
        };
        let now = jiff::Timestamp::now().as_second();
        for (uid, pod) in running {
            for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
                let vname = v["name"].as_str().unwrap_or("");
                let dir = self.volatile.join(&uid).join(vname);
                for src in v["projected"]["sources"].as_array().into_iter().flatten() {
                    let t = &src["serviceAccountToken"];
                    let Some(path) = t["path"].as_str() else {
                        continue;
                    };
                    let due = self
                        .cache
                        .object(TOKENS, &uid, &format!("{vname}/{path}"))
                        .is_some_and(|c| c["refresh"].as_i64().is_none_or(|r| r <= now));
                    if !due || !dir.is_dir() || path.split('/').any(|p| p == "..") {
                        continue;
                    }
                    match self.token(&pod, &uid, t, vname, path).await {
                        // Renamed into place: a reader sees the old token or the new one.
                        Ok(token) => {
                            let f = dir.join(path);
                            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                            let tmp =
                                f.with_file_name(format!(".{}.new", name.unwrap_or_default()));
                            if let Err(e) =
                                std::fs::write(&tmp, token).and_then(|()| std::fs::rename(&tmp, &f))
                            {
                                tracing::warn!(pod = %uid, volume = vname, error = %e, "writing a renewed token");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(pod = %uid, volume = vname, error = %e, "renewing a token")
                        }
                    }
                }
            }
        }
    }

    /// The address the control plane sees this node at; empty before the first session.
    fn host_ip(&self) -> String {
        self.host_ip.lock().map(|h| h.clone()).unwrap_or_default()
    }

    async fn link_loop(self: Arc<Self>, server: String) {
        let mut delay = Duration::from_millis(500);
        loop {
            match Link::connect(&server, &self.pki).await {
                Ok(l) => {
                    let began = Instant::now();
                    let why = self.clone().session(&server, l.clone()).await;
                    self.link.send_replace(None);
                    l.conn.close(0u32.into(), b"session ended");
                    tracing::warn!(error = %why, "link to the control plane lost; reconnecting");
                    if began.elapsed() > Duration::from_secs(30) {
                        delay = Duration::from_millis(500);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot reach the control plane"),
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// One connected session; returns why it ended.
    async fn session(self: Arc<Self>, server: &str, link: Link) -> String {
        let found = match self.node_ip {
            Some(_) => None,
            None => local_ip(server).await.ok(),
        };
        if let Some(ip) = found {
            if let Ok(mut h) = self.host_ip.lock() {
                *h = ip;
            }
        }
        if let Err(e) = self.register(&link).await {
            return format!("registering the node: {e}");
        }
        tracing::info!(node = %self.node, %server, "connected to the control plane");
        self.link.send_replace(Some(link.clone()));
        let down = tokio::spawn(self.clone().serve_down(link.clone()));
        let follow = self
            .services
            .clone()
            .map(|s| tokio::spawn(s.follow(link.clone(), self.cache.clone())));
        let peers = self
            .net
            .is_some()
            .then(|| tokio::spawn(self.clone().route_peers(link.clone())));
        let renew = {
            let (link, me) = (link.clone(), self.clone());
            tokio::spawn(async move {
                for round in 0u64.. {
                    if let Err(e) = link.renew().await {
                        return format!("lease renewal: {e}");
                    }
                    me.maybe_recertify(&link).await;
                    if round % 3 == 0 {
                        me.sweep_storage(&link).await;
                    }
                    if round % 6 == 5 {
                        me.refresh_tokens().await;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                String::new()
            })
        };
        let why = tokio::select! {
            w = self.watch_pods(&link) => w,
            w = renew => w.unwrap_or_else(|e| e.to_string()),
        };
        down.abort();
        for t in [follow, peers].into_iter().flatten() {
            t.abort();
        }
        why
    }

    /// Keep routes to the other nodes' pod networks through their addresses, so that netd
    /// and pods here reach pods there. Never returns on its own.
    async fn route_peers(self: Arc<Self>, link: Link) {
        let Some(net) = self.net.clone() else { return };
        let nodes: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let routed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        loop {
            let why = link
                .list_watch("/api/v1/nodes", |c| {
                    let Ok(mut n) = nodes.lock() else { return };
                    match c {
                        Change::Listed(items) => {
                            n.clear();
                            for i in items {
                                if let Some(k) = i["metadata"]["name"].as_str() {
                                    n.insert(k.to_string(), i);
                                }
                            }
                        }
                        Change::Upsert(i) => {
                            if let Some(k) = i["metadata"]["name"].as_str() {
                                n.insert(k.to_string(), i);
                            }
                        }
                        Change::Deleted(i) => {
                            if let Some(k) = i["metadata"]["name"].as_str() {
                                n.remove(k);
                            }
                        }
                    }
                    let all: Vec<Value> = n.values().cloned().collect();
                    let want = net::peer_routes(&all, &self.node, &net.cidr(), &self.host_ip());
                    let Ok(mut had) = routed.lock() else { return };
                    if *had != want {
                        let routed = tokio::task::block_in_place(|| {
                            net::route_peers(&had, &want).map(|()| net::unmasked(&want))
                        });
                        match routed {
                            Ok(unmasked) => {
                                if let Err(e) = unmasked {
                                    tracing::debug!(error = %e, "other nodes' pod networks stay masqueraded");
                                }
                                *had = want
                            }
                            Err(e) => tracing::warn!(error = %e, "routing to other nodes' pods"),
                        }
                    }
                })
                .await;
            tracing::debug!(%why, "node watch ended; again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn maybe_recertify(&self, link: &Link) {
        let Ok((left, whole)) = self.pki.cert_lifetime() else {
            return;
        };
        if left < whole / 3 {
            match link.recertify(&self.pki, &self.node).await {
                Ok(()) => tracing::info!("node certificate renewed"),
                Err(e) => tracing::warn!(error = %e, "renewing the node certificate failed"),
            }
        }
    }

    /// The cached modules as the Node's `status.images` (largest first, at most 50, as the
    /// kubelet reports them): each by digest and by the names last resolved to it, so the
    /// scheduler can prefer a node that has a pod's module already.
    fn images(&self) -> Value {
        let names = self.cache.meta_under("name/");
        let mut mods = self.cache.modules();
        mods.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let images: Vec<Value> = mods
            .into_iter()
            .take(50)
            .map(|(digest, size)| {
                let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
                let mut refs = vec![format!("module:{digest}")];
                refs.extend(
                    names
                        .iter()
                        .filter(|(_, h)| h == hex)
                        .map(|(n, _)| format!("module:{n}")),
                );
                json!({"names": refs, "sizeBytes": size})
            })
            .collect();
        let mut images = images;
        if let Ok(oci) = &self.oci {
            let mut imgs = oci.store.images();
            imgs.sort_by_key(|b| std::cmp::Reverse(b.1));
            images.extend(
                imgs.into_iter()
                    .filter(|(n, _)| !n.is_empty())
                    .map(|(n, size)| json!({"names": n, "sizeBytes": size})),
            );
        }
        images.truncate(50);
        json!(images)
    }

    /// Drop images no container has used for [`IMAGE_IDLE`], now and then.
    async fn collect_images(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(300)).await;
            let Ok(oci) = &self.oci else { return };
            let in_use: std::collections::HashSet<String> = oci
                .in_use
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let me = self.clone();
            let gone = tokio::task::spawn_blocking(move || match &me.oci {
                Ok(oci) => oci.store.collect(&in_use, IMAGE_IDLE),
                Err(_) => Vec::new(),
            })
            .await
            .unwrap_or_default();
            if !gone.is_empty() {
                tracing::info!(images = ?gone, "removed unused images");
                self.report_images();
            }
        }
    }

    /// Tell the control plane what modules the node has now (best effort; the next
    /// registration says it again).
    fn report_images(&self) {
        let Some(link) = self.link.borrow().clone() else {
            return;
        };
        let body = json!({"status": {"images": self.images()}});
        let path = format!("/api/v1/nodes/{}/status", self.node);
        tokio::spawn(async move {
            let patch = Some((
                "application/merge-patch+json",
                body.to_string().into_bytes(),
            ));
            if let Err(e) = link.call("PATCH", &path, patch).await {
                tracing::debug!(error = %e, "reporting the node's modules failed");
            }
        });
    }

    fn node_object(&self) -> Value {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let cpus = node_cpus();
        let mem_kib = node_memory() / 1024;
        let ip = self.host_ip();
        let t = now();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let disk = disk_bytes(&self.dir);
        let capacity = json!({"cpu": cpus.to_string(), "memory": format!("{mem_kib}Ki"),
            "pods": self.max_pods.to_string(), "ephemeral-storage": format!("{}Ki", disk / 1024)});
        let mut allocatable = capacity.clone();
        // Less the kubelet's default hard eviction threshold (`nodefs.available<10%`).
        allocatable["ephemeral-storage"] = json!((disk - disk / 10).to_string());
        let mut node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {
                "kubernetes.io/arch": arch, "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": self.node, "beta.kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux", "outpost.dev/runtime-wasm": "true",
                "outpost.dev/runtime-oci": if self.oci.is_ok() { "true" } else { "false" }}},
            "status": {
                "capacity": capacity, "allocatable": allocatable,
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady",
                     "message": "outpost-node is posting ready status",
                     "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                     "message": "", "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
                     "message": "", "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
                     "message": "", "lastHeartbeatTime": t, "lastTransitionTime": t}],
                "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": self.node}],
                "nodeInfo": {"architecture": arch, "operatingSystem": "linux",
                    "kubeletVersion": format!("v1.{}.0-outpost", outpost_api::KUBE_MINOR), "kubeProxyVersion": "",
                    "containerRuntimeVersion": if self.oci.is_ok() { "wasmtime://48.0+libcontainer://0.7" } else { "wasmtime://48.0" }, "kernelVersion": kernel,
                    "osImage": os_image(), "machineID": host_id(&["/etc/machine-id", "/var/lib/dbus/machine-id"]),
                    "systemUUID": host_id(&["/sys/class/dmi/id/product_uuid"]),
                    "bootID": host_id(&["/proc/sys/kernel/random/boot_id"])},
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "images": self.images(),
            }
        });
        // The network this node's pods take addresses from; other nodes route it here.
        if let Some(n) = &self.net {
            node["spec"] = json!({"podCIDR": n.cidr(), "podCIDRs": [n.cidr()]});
        }
        // Where the volume controller puts this node's local volumes.
        node["metadata"]["annotations"] = json!({
            outpost_api::STORAGE_DIR_ANNOTATION: self.storage_dir().to_string_lossy()});
        // Why OCI pods will not be placed here, for `kubectl describe node`.
        if let Err(why) = &self.oci {
            node["metadata"]["annotations"]["outpost.dev/runtime-oci-unavailable"] = json!(why);
        }
        node
    }

    /// Create the Node object, or bring its status up to date.
    async fn register(&self, link: &Link) -> Result<(), LinkError> {
        let obj = self.node_object();
        let a = link
            .call(
                "POST",
                "/api/v1/nodes",
                Some(("application/json", obj.to_string().into_bytes())),
            )
            .await?;
        if a.ok() {
            // Create keeps the spec and metadata; the status goes through its subresource.
        } else if a.status != 409 {
            return Err(LinkError::Refused(a.message()));
        }
        let mut patch = json!({"metadata": {"labels": obj["metadata"]["labels"],
            "annotations": obj["metadata"]["annotations"]}});
        if obj["spec"].is_object() {
            patch["spec"] = obj["spec"].clone();
        }
        let a = link
            .call(
                "PATCH",
                &format!("/api/v1/nodes/{}", self.node),
                Some((
                    "application/merge-patch+json",
                    patch.to_string().into_bytes(),
                )),
            )
            .await?;
        if !a.ok() {
            return Err(LinkError::Refused(a.message()));
        }
        let status = json!({"status": obj["status"]});
        let a = link
            .call(
                "PATCH",
                &format!("/api/v1/nodes/{}/status", self.node),
                Some((
                    "application/merge-patch+json",
                    status.to_string().into_bytes(),
                )),
            )
            .await?;
        if !a.ok() {
            return Err(LinkError::Refused(a.message()));
        }
        Ok(())
    }

    /// List, then watch, the pods bound to this node until the link fails.
    async fn watch_pods(self: &Arc<Self>, link: &Link) -> String {
        // Without the events that only echo status writes (see `ensure`): they change
        // nothing here.
        let path = format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{}&omitStatusOnly=true",
            self.node
        );
        link.list_watch(&path, |c| match c {
            Change::Listed(items) => self.reconcile(items),
            Change::Upsert(pod) => self.ensure(pod),
            Change::Deleted(pod) => {
                if let Some(uid) = pod["metadata"]["uid"].as_str() {
                    self.gone(uid);
                }
            }
        })
        .await
    }

    /// Make the running pods match a full list from the control plane.
    fn reconcile(self: &Arc<Self>, items: Vec<Value>) {
        let want: std::collections::HashSet<String> = items
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
            .collect();
        let mut known: Vec<String> = self
            .pods
            .lock()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        known.extend(
            self.cache
                .pods()
                .iter()
                .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from)),
        );
        for uid in known {
            if !want.contains(&uid) {
                self.gone(&uid);
            }
        }
        for p in items {
            self.ensure(p);
        }
    }

    /// A pod from the control plane (or the cache): run it, keep it, or stop it.
    fn ensure(self: &Arc<Self>, pod: Value) {
        let Some(uid) = pod["metadata"]["uid"].as_str().map(String::from) else {
            return;
        };
        if pod["spec"]["nodeName"].as_str() != Some(self.node.as_str()) {
            return;
        }
        // Most events of a running pod echo its status writes: the spec and metadata are
        // those cached already, and nothing is to be done.
        let echo = self.pods.lock().ok().is_some_and(|p| {
            p.get(&uid)
                .is_some_and(|r| r.spec == pod["spec"] && same_meta(&r.meta, &pod["metadata"]))
        });
        if echo {
            return;
        }
        if let Err(e) = self.cache.put_pod(&uid, &pod) {
            tracing::error!(error = %e, "caching a pod");
        }
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            self.clone().finish(uid);
            return;
        }
        // The same spec (most events: status echoes), one that differs only by ephemeral
        // containers (`kubectl debug`: they join the running pod), or another.
        enum Spec {
            Same,
            Ephemeral,
            Changed,
        }
        let same = self.pods.lock().ok().and_then(|p| {
            p.get(&uid).map(|r| {
                if r.spec == pod["spec"] {
                    return Spec::Same;
                }
                let without = |s: &Value| {
                    let mut s = s.clone();
                    if let Some(m) = s.as_object_mut() {
                        m.remove("ephemeralContainers");
                    }
                    s
                };
                if without(&r.spec) == without(&pod["spec"]) {
                    Spec::Ephemeral
                } else {
                    Spec::Changed
                }
            })
        });
        match same {
            Some(Spec::Same) => {
                if let Some(r) = self.pods.lock().ok().as_mut().and_then(|p| p.get_mut(&uid)) {
                    r.meta = kept_meta(&pod["metadata"]);
                }
            }
            Some(Spec::Ephemeral) => self.add_ephemeral(&uid, &pod),
            Some(Spec::Changed) => {
                // A changed spec (an image update): stop the old run, start the new.
                let me = self.clone();
                tokio::spawn(async move {
                    me.stop_and_wait(&uid).await;
                    if let Ok(mut p) = me.pods.lock() {
                        p.remove(&uid);
                    }
                    me.start(&uid, pod);
                });
            }
            None => self.start(&uid, pod),
        }
    }

    /// Start the ephemeral containers of `pod` its run does not have yet.
    fn add_ephemeral(self: &Arc<Self>, uid: &str, pod: &Value) {
        let Ok(mut pods) = self.pods.lock() else {
            return;
        };
        let Some(r) = pods.get_mut(uid) else {
            return;
        };
        r.spec = pod["spec"].clone();
        let Some(changed) = r.changed.upgrade() else {
            return;
        };
        let Ok(mut containers) = r.containers.lock() else {
            return;
        };
        let shared = Arc::new(pod.clone());
        for spec in pod["spec"]["ephemeralContainers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = spec["name"].as_str().unwrap_or("");
            if containers.iter().any(|c| c.name == name) {
                continue;
            }
            let mut c = Container::new(name, spec["image"].as_str().unwrap_or(""));
            c.ephemeral = true;
            containers.push(c);
            let w = Worker {
                agent: self.clone(),
                uid: uid.to_string(),
                pod: shared.clone(),
                spec: spec.clone(),
                index: containers.len() - 1,
                containers: r.containers.clone(),
                stop: r.stop.clone(),
                changed: changed.clone(),
                net: r.net.clone(),
            };
            tokio::spawn(w.run());
        }
        drop(containers);
        changed.send_modify(|n| *n += 1);
    }

    async fn stop_and_wait(&self, uid: &str) {
        self.stop_within(uid, None).await;
    }

    /// Stop a pod's containers, each given `grace` (or its own grace period) to end, and
    /// wait until they have.
    async fn stop_within(&self, uid: &str, grace: Option<Duration>) {
        let waiter = self.pods.lock().ok().and_then(|p| {
            p.get(uid).map(|r| {
                r.stop.stop_within(grace);
                r.finished.clone()
            })
        });
        if let Some(mut f) = waiter {
            let _ = f.wait_for(|d| *d).await;
        }
    }

    /// The pod was deleted with a grace period: stop it, then delete it for good.
    fn finish(self: Arc<Self>, uid: String) {
        tokio::spawn(async move {
            // The deletion's grace period, which `kubectl delete --grace-period` may shorten.
            let grace = self
                .cache
                .pod(&uid)
                .and_then(|p| p["metadata"]["deletionGracePeriodSeconds"].as_u64())
                .map(Duration::from_secs);
            self.stop_within(&uid, grace).await;
            let Some(pod) = self.cache.pod(&uid) else {
                return;
            };
            let (ns, name) = (
                pod["metadata"]["namespace"].as_str().unwrap_or("default"),
                pod["metadata"]["name"].as_str().unwrap_or(""),
            );
            let link = self.link.borrow().clone();
            let Some(link) = link else {
                // Offline: the next list will show the pod still deleting, and we come back.
                return;
            };
            let body = json!({"gracePeriodSeconds": 0, "preconditions": {"uid": uid}});
            match link
                .call(
                    "DELETE",
                    &format!("/api/v1/namespaces/{ns}/pods/{name}"),
                    Some(("application/json", body.to_string().into_bytes())),
                )
                .await
            {
                Ok(a) if a.ok() || a.status == 404 || a.status == 409 => self.forget(&uid),
                Ok(a) => {
                    tracing::warn!(pod = %name, error = %a.message(), "deleting a stopped pod")
                }
                Err(e) => tracing::warn!(pod = %name, error = %e, "deleting a stopped pod"),
            }
        });
    }

    /// The pod is gone from the control plane: stop it and forget it.
    fn gone(self: &Arc<Self>, uid: &str) {
        let me = self.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            me.stop_and_wait(&uid).await;
            me.forget(&uid);
        });
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut p) = self.pods.lock() {
            p.remove(uid);
        }
        let _ = self.cache.remove_pod(uid);
        let _ = self.cache.remove_objects_in(TOKENS, uid);
        let _ = self.cache.remove_objects_in(ENDED, uid);
        self.spares.retire(&self.dir.join("pods").join(uid));
        let _ = std::fs::remove_dir_all(self.volatile.join(uid));
    }

    fn start(self: &Arc<Self>, uid: &str, pod: Value) {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
        let list = |k: &str| pod["spec"][k].as_array().cloned().unwrap_or_default();
        let (inits, mains) = (list("initContainers"), list("containers"));
        // Init containers first, then the others; the others wait in PodInitializing.
        let specs: Vec<Value> = inits.iter().chain(&mains).cloned().collect();
        let containers = Arc::new(Mutex::new(
            specs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (n, image) = (
                        c["name"].as_str().unwrap_or(""),
                        c["image"].as_str().unwrap_or(""),
                    );
                    if i < inits.len() {
                        Container::init(n, image, c["restartPolicy"] == "Always")
                    } else if !inits.is_empty() {
                        Container {
                            state: State::waiting("PodInitializing", ""),
                            ..Container::new(n, image)
                        }
                    } else {
                        Container::new(n, image)
                    }
                })
                .collect::<Vec<_>>(),
        ));
        let stop = Stop::new();
        let (changed_tx, changed_rx) = watch::channel(0u64);
        let changed_tx = Arc::new(changed_tx);
        let (finished_tx, finished_rx) = watch::channel(false);
        let net = Arc::new(OnceCell::new());
        // Why the pod failed as a whole (its active deadline), over what its containers say.
        let verdict: Arc<Mutex<Option<&'static str>>> = Arc::default();
        let deadline = pod["spec"]["activeDeadlineSeconds"].as_u64();
        if deadline.is_some() && self.cache.object(ENDED, uid, PAST_DEADLINE).is_some() {
            // Failed so before the agent restarted: nothing runs again.
            if let Ok(mut v) = verdict.lock() {
                *v = Some(DEADLINE_EXCEEDED);
            }
            stop.stop_within(None);
        } else if let Some(secs) = deadline {
            let (stop, verdict) = (stop.clone(), verdict.clone());
            let (me, uid) = (self.clone(), uid.to_string());
            let (changed, mut finished) = (Arc::downgrade(&changed_tx), finished_rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                    _ = finished.wait_for(|d| *d) => return,
                    _ = stop.wait() => return,
                }
                if let Ok(mut v) = verdict.lock() {
                    *v = Some(DEADLINE_EXCEEDED);
                }
                if let Err(e) = me.cache.put_object(ENDED, &uid, PAST_DEADLINE, &json!({})) {
                    tracing::warn!(error = %e, "caching a pod's deadline");
                }
                stop.stop_within(None);
                if let Some(c) = changed.upgrade() {
                    c.send_modify(|n| *n += 1);
                }
            });
        }
        if let Ok(mut p) = self.pods.lock() {
            p.insert(
                uid.to_string(),
                PodRun {
                    ns: ns.clone(),
                    name: name.clone(),
                    spec: pod["spec"].clone(),
                    meta: kept_meta(&pod["metadata"]),
                    stop: stop.clone(),
                    containers: containers.clone(),
                    finished: finished_rx,
                    net: net.clone(),
                    changed: Arc::downgrade(&changed_tx),
                },
            );
        }
        let started = now();
        let pod = Arc::new(pod);
        let worker = |index: usize, spec: Value, stop: Arc<Stop>| Worker {
            agent: self.clone(),
            uid: uid.to_string(),
            pod: pod.clone(),
            spec,
            index,
            containers: containers.clone(),
            stop,
            changed: changed_tx.clone(),
            net: net.clone(),
        };
        if inits.is_empty() {
            for (i, spec) in specs.into_iter().enumerate() {
                tokio::spawn(worker(i, spec, stop.clone()).run());
            }
        } else {
            let workers: Vec<Worker> = specs
                .into_iter()
                .enumerate()
                .map(|(i, spec)| {
                    // A sidecar stops once the others have ended, or with the pod.
                    let own = (i < inits.len() && spec["restartPolicy"] == "Always")
                        .then(Stop::new)
                        .unwrap_or_else(|| stop.clone());
                    worker(i, spec, own)
                })
                .collect();
            tokio::spawn(initialize(workers, inits.len(), stop.clone()));
        }
        drop(changed_tx);
        // The reporter: a status each time a container changes, until all have ended.
        let me = self.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            let mut rx = changed_rx;
            let mut prev = Value::Null;
            // A pod whose containers start at once goes from Pending straight to their
            // state: its ContainerCreating status would be a write nobody sees for long (a
            // third of a short pod's). One that takes longer shows it after QUIET_START.
            let _ = tokio::time::timeout(QUIET_START, rx.changed()).await;
            loop {
                let list = containers.lock().map(|c| c.clone()).unwrap_or_default();
                let ip = me.host_ip();
                let pod_ip = net.get().map_or(ip.clone(), |a| a.ip.to_string());
                let mut status = pod::status(&list, &started, &ip, &pod_ip, &now());
                if let Some(why) = verdict.lock().ok().and_then(|v| *v) {
                    status["phase"] = json!("Failed");
                    status["reason"] = json!(why);
                    status["message"] =
                        json!("Pod was active on the node longer than the specified deadline");
                }
                keep_transition_times(&mut status, &prev);
                if status != prev {
                    prev = status.clone();
                    let _ = me.status_tx.send(StatusUpdate {
                        uid: uid.clone(),
                        ns: ns.clone(),
                        name: name.clone(),
                        status,
                    });
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // Every container has ended: the pod's host ports and network go, and its
            // cgroup once the helpers have removed their containers' own.
            if let (Some(_), Some(pn)) = (net.get(), me.net.clone()) {
                if let Some(s) = &me.services {
                    s.set_host_ports(&uid, Vec::new());
                }
                let (uid, mark) = (uid.clone(), me.dir.join("net").join(&uid));
                let _ = tokio::task::spawn_blocking(move || {
                    pn.detach(&uid);
                    let _ = std::fs::remove_file(mark);
                })
                .await;
            }
            let cgroup = pod_cgroup(&uid);
            // Only pods that ran a container have one. A pod whose every container is Wasm
            // by its image or runtime class never did, and skips the stats.
            let wasm = containers
                .lock()
                .is_ok_and(|c| c.iter().all(|c| surely_wasm(&pod, &c.image)));
            if me.oci.is_ok() && !wasm && outpost_oci_shim::run::cgroup_exists(&cgroup) {
                let removed = tokio::task::spawn_blocking(move || {
                    outpost_oci_shim::run::remove_cgroup(&cgroup, Duration::from_secs(10))
                })
                .await;
                if let Ok(Err(e)) = removed {
                    tracing::warn!(pod = %name, error = %e, "removing the pod's cgroup");
                }
            }
            finished_tx.send_replace(true);
        });
    }

    /// Send pod status to the control plane, newest per pod, when the link is up. Each new
    /// link sends every pod's last status again: while the node was away the control plane
    /// may have marked its pods not ready.
    async fn report(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<StatusUpdate>) {
        let mut pending: HashMap<String, StatusUpdate> = HashMap::new();
        let mut sent: HashMap<String, StatusUpdate> = HashMap::new();
        let mut links = self.link.subscribe();
        let mut up = false;
        loop {
            let link = links.borrow_and_update().clone();
            if link.is_some() && !up {
                for (uid, u) in &sent {
                    pending.entry(uid.clone()).or_insert_with(|| u.clone());
                }
            }
            up = link.is_some();
            if let Some(link) = link.filter(|_| !pending.is_empty()) {
                // Independent patches: many in flight at once, the newest status of each pod.
                let batch: Vec<StatusUpdate> = pending.drain().map(|(_, u)| u).collect();
                let results = futures::stream::iter(batch)
                    .map(|u| {
                        let link = link.clone();
                        async move {
                            let body = serde_json::to_vec(&json_patch(&u)).unwrap_or_default();
                            let path =
                                format!("/api/v1/namespaces/{}/pods/{}/status", u.ns, u.name);
                            // Strategic: conditions merge by type, so the ones others set
                            // (DisruptionTarget on an eviction) stay, as with the kubelet.
                            let r = link
                                .call(
                                    "PATCH",
                                    &path,
                                    Some(("application/strategic-merge-patch+json", body)),
                                )
                                .await;
                            (u, r)
                        }
                    })
                    .buffer_unordered(32)
                    .collect::<Vec<_>>()
                    .await;
                for (u, r) in results {
                    match r {
                        Ok(a) if a.ok() => {
                            sent.insert(u.uid.clone(), u);
                        }
                        Ok(a) if a.status == 404 => {
                            sent.remove(&u.uid);
                        }
                        Ok(a) => {
                            tracing::warn!(pod = %u.name, error = %a.message(), "status update refused")
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "status update failed; will retry");
                            // Keep it for the next try unless a newer one came meanwhile.
                            pending.entry(u.uid.clone()).or_insert(u);
                        }
                    }
                }
            }
            tokio::select! {
                u = rx.recv() => match u {
                    Some(u) => { pending.insert(u.uid.clone(), u); }
                    None => return,
                },
                r = links.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)), if !pending.is_empty() => {}
            }
            // Take what else is queued before calling out.
            while let Ok(u) = rx.try_recv() {
                pending.insert(u.uid.clone(), u);
            }
        }
    }

    /// Post events, oldest first, when the link is up, at most as fast as [`EventLimit`]
    /// lets. Offline, the newest [`MAX_EVENTS`] wait in memory: events are for people
    /// watching now, not worth a write to flash. An event that happened before (the same
    /// object, container, reason, message and type) raises the recorded one's count and last
    /// time instead of making another, as the kubelet's recorder does: a pod restarting all
    /// day is a few events, not thousands.
    async fn send_events(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut queue: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
        let mut recorded: HashMap<String, Recorded> = HashMap::new();
        let mut links = self.link.subscribe();
        let mut bucket = Bucket::new(self.event_limit);
        loop {
            let link = links.borrow_and_update().clone();
            // Only when the limit lets one go: each event arriving meanwhile wakes this loop.
            let ready = bucket.wait(Instant::now()).is_zero();
            if let Some(link) = link.filter(|_| !queue.is_empty() && ready) {
                let n = bucket.take(queue.len(), Instant::now());
                let batch = fold(queue.drain(..n).collect());
                let node = self.node.clone();
                let known: Vec<Option<(String, u64)>> = batch
                    .iter()
                    .map(|e| recorded.get(&e.key()).map(|r| (r.name.clone(), r.count)))
                    .collect();
                let results = futures::stream::iter(batch.into_iter().zip(known))
                    .map(|(e, known)| {
                        let link = link.clone();
                        let node = node.clone();
                        async move {
                            let path = format!("/api/v1/namespaces/{}/events", e.on.ns);
                            if let Some((name, count)) = known {
                                let count = count + e.count;
                                let patch = json!({"count": count, "lastTimestamp": e.at});
                                let r = link
                                    .call(
                                        "PATCH",
                                        &format!("{path}/{name}"),
                                        Some((
                                            "application/merge-patch+json",
                                            patch.to_string().into_bytes(),
                                        )),
                                    )
                                    .await;
                                // Gone (events expire): recorded anew below.
                                if !matches!(&r, Ok(a) if a.status == 404) {
                                    return (e, Some((name, count)), r);
                                }
                            }
                            let nanos = jiff::Timestamp::now().as_nanosecond();
                            let name = format!("{}.{:x}", e.on.pod, nanos);
                            let body = e.json(&node, &name, e.count);
                            let r = link
                                .call(
                                    "POST",
                                    &path,
                                    Some(("application/json", body.to_string().into_bytes())),
                                )
                                .await;
                            let count = e.count;
                            (e, Some((name, count)), r)
                        }
                    })
                    .buffered(16)
                    .collect::<Vec<_>>()
                    .await;
                for (e, now, r) in results {
                    match r {
                        Ok(a) if !a.ok() => {
                            tracing::debug!(reason = e.reason, error = %a.message(), "event refused")
                        }
                        Ok(_) => {
                            if let Some((name, count)) = now {
                                if recorded.len() >= RECORDED {
                                    recorded.clear();
                                }
                                recorded.insert(e.key(), Recorded { name, count });
                            }
                        }
                        Err(_) => queue.push_back(e),
                    }
                }
            }
            // Failed posts are tried again in 5 s; those over the limit when it allows.
            let pause = match bucket.wait(Instant::now()) {
                Duration::ZERO => Duration::from_secs(5),
                d => d.min(Duration::from_secs(5)),
            };
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => queue.push_back(e),
                    None => return,
                },
                r = links.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(pause), if !queue.is_empty() => {}
            }
            while let Ok(e) = rx.try_recv() {
                queue.push_back(e);
            }
            while queue.len() > MAX_EVENTS {
                queue.pop_front();
            }
        }
    }

    /// Serve the streams the control plane opens toward this node.
    async fn serve_down(self: Arc<Self>, link: Link) {
        while let Ok((mut send, mut recv)) = link.conn.accept_bi().await {
            let me = self.clone();
            tokio::spawn(async move {
                match read_frame::<_, Down>(&mut recv, MAX_FRAME).await {
                    Ok(Down::Logs(req)) => me.logs(&req, &mut send).await,
                    Ok(Down::PortForward(req)) => me.forward(&req, send, recv).await,
                    Ok(Down::Exec(req)) => me.exec(&req, send, recv).await,
                    Ok(Down::Attach(req)) => me.attach(&req, send, recv).await,
                    Ok(Down::Usage) => me.usage(&mut send).await,
                    Err(e) => {
                        let _ = reply(&mut send, 400, &format!("refused: {e}")).await;
                    }
                }
            });
        }
    }

    /// The counters of every container running now.
    fn runs(&self) -> Vec<Arc<usage::Run>> {
        self.live
            .lock()
            .map(|l| l.values().map(|x| x.usage.clone()).collect())
            .unwrap_or_default()
    }

    /// Read counters every [`usage::TICK`], so `kubectl top` has a window to measure over.
    async fn meter(self: Arc<Self>) {
        loop {
            self.meters.tick(&self.runs());
            tokio::time::sleep(usage::TICK).await;
        }
    }

    async fn usage(&self, send: &mut quinn::SendStream) {
        let u = self.meters.usage(&self.runs()).await;
        let head = Head {
            status: 200,
            content_type: None,
        };
        if write_frame(send, &head, MAX_FRAME).await.is_ok() {
            let _ = write_frame(send, &u, MAX_FRAME).await;
        }
        let _ = send.finish();
    }

    async fn logs(&self, req: &LogRequest, send: &mut quinn::SendStream) {
        let found = self.pods.lock().ok().and_then(|p| {
            p.iter()
                .find(|(_, r)| r.ns == req.namespace && r.name == req.pod)
                .map(|(uid, r)| (uid.clone(), r.containers.clone(), r.finished.clone()))
        });
        let Some((uid, containers, finished)) = found else {
            let _ = reply(
                send,
                404,
                &format!("pod \"{}\" is not on this node", req.pod),
            )
            .await;
            return;
        };
        let c = containers
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|c| c.name == req.container).cloned());
        let Some(c) = c else {
            let _ = reply(
                send,
                400,
                &format!(
                    "container {} is not valid for pod {}",
                    req.container, req.pod
                ),
            )
            .await;
            return;
        };
        let run = if req.previous {
            if c.last.is_none() {
                let _ = reply(
                    send,
                    400,
                    &format!(
                        "previous terminated container \"{}\" in pod \"{}\" not found",
                        req.container, req.pod
                    ),
                )
                .await;
                return;
            }
            c.restarts.saturating_sub(1)
        } else {
            c.restarts
        };
        let path = logs::file(&self.dir, &uid, &req.container, run);
        let head = Head {
            status: 200,
            content_type: Some("text/plain".into()),
        };
        if write_frame(send, &head, MAX_FRAME).await.is_err() {
            return;
        }
        let name = req.container.clone();
        let running = move || {
            !*finished.borrow()
                && containers.lock().is_ok_and(|c| {
                    c.iter().find(|c| c.name == name).is_some_and(|c| {
                        c.restarts == run && matches!(c.state, State::Running { .. })
                    })
                })
        };
        let follow_current = !req.previous;
        let mut req = req.clone();
        req.follow &= follow_current;
        let _ = logs::serve(&path, &req, send, running).await;
        let _ = send.finish();
    }

    /// `kubectl port-forward`: one connection to a port of a pod, carried on the stream.
    async fn forward(
        &self,
        req: &ForwardRequest,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let (ns, name, port) = (&req.namespace, &req.pod, req.port);
        let found = self.pods.lock().ok().and_then(|p| {
            p.values()
                .find(|r| &r.ns == ns && &r.name == name)
                .map(|r| (r.spec.clone(), r.net.get().map(|a| a.ip)))
        });
        let Some((spec, own_ip)) = found else {
            let _ = reply(
                &mut send,
                404,
                &format!("pod \"{ns}/{name}\" is not on this node"),
            )
            .await;
            return;
        };
        let ports = forward_ports(&spec);
        if own_ip.is_none() && !ports.contains(&port) {
            // A pod on the node's network: an open port there
            // could be anything on the node: only the pod's own ports are reachable.
            let _ = reply(
                &mut send,
                400,
                &format!(
                    "port {port} is not a port of pod {ns}/{name} (it listens on {}); Outpost forwards only to the containerPorts a pod declares, or 8080 when it declares none",
                    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                ),
            )
            .await;
            return;
        }
        // A pod with its own network listens at its address, others on the node's.
        let addr =
            std::net::SocketAddr::from((own_ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST), port));
        let tcp = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let msg = format!(
                    "error forwarding port {port} to pod {ns}/{name}: dial tcp {addr}: {e}"
                );
                let _ = reply(&mut send, 502, &msg).await;
                return;
            }
            Err(_) => {
                let msg = format!("error forwarding port {port} to pod {ns}/{name}: dial tcp {addr}: no answer within 5 s");
                let _ = reply(&mut send, 502, &msg).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let head = Head {
            status: 200,
            content_type: None,
        };
        if write_frame(&mut send, &head, MAX_FRAME).await.is_err() {
            return;
        }
        let (mut tcp_r, mut tcp_w) = tcp.into_split();
        // Each direction ends on its own, so half-closes pass through as they do in TCP.
        let up = async {
            let _ = tokio::io::copy(&mut recv, &mut tcp_w).await;
            let _ = tcp_w.shutdown().await;
        };
        let down = async {
            match tokio::io::copy(&mut tcp_r, &mut send).await {
                Ok(_) => {
                    let _ = send.finish();
                }
                Err(_) => {
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                }
            }
        };
        tokio::join!(up, down);
    }

    /// A config map or secret a pod uses: fresh from the control plane when linked, else
    /// from the cache.
    async fn object(&self, kind: &str, ns: &str, name: &str) -> Result<Arc<Value>, String> {
        let memo = format!("{kind}/{ns}/{name}");
        let memoized = || {
            self.objects.lock().ok().and_then(|m| {
                m.get(&memo)
                    .filter(|(_, at)| at.elapsed() < NAME_MEMO)
                    .map(|(v, _)| v.clone())
            })
        };
        if let Some(v) = memoized() {
            return Ok(v);
        }
        let _turn = turn(&self.reading, &memo).await;
        // A read that finished while this one waited serves it too.
        if let Some(v) = memoized() {
            return Ok(v);
        }
        let link = self.link.borrow().clone();
        if let Some(link) = link {
            let path = if ns.is_empty() {
                format!("/api/v1/{kind}/{name}")
            } else {
                format!("/api/v1/namespaces/{ns}/{kind}/{name}")
            };
            match link.call("GET", &path, None).await {
                Ok(a) if a.ok() => {
                    let v = Arc::new(a.json());
                    let _ = self.cache.put_object(kind, ns, name, &v);
                    if let Ok(mut m) = self.objects.lock() {
                        m.retain(|_, (_, at)| at.elapsed() < NAME_MEMO);
                        m.insert(memo, (v.clone(), Instant::now()));
                    }
                    return Ok(v);
                }
                Ok(a) if a.status == 404 => {
                    return Err(format!("{} \"{name}\" not found", singular(kind)))
                }
                Ok(a) => return Err(a.message()),
                Err(_) => {}
            }
        }
        self.cache
            .object(kind, ns, name)
            .map(Arc::new)
            .ok_or_else(|| {
                format!(
                    "{} \"{name}\" is not cached and the control plane is unreachable",
                    singular(kind)
                )
            })
    }

    /// Where this node keeps local PersistentVolumes, as an absolute path (it is written
    /// into the volumes' specs).
    fn storage_dir(&self) -> PathBuf {
        let d = self.dir.join("storage");
        std::path::absolute(&d).unwrap_or(d)
    }

    /// The directory behind claim `ns/claim`: its volume's `hostPath` or `local` path (made
    /// if the volume says so, or if it is one of this node's own local volumes).
    async fn claim_dir(&self, ns: &str, claim: &str) -> Result<PathBuf, String> {
        let c = self.object("persistentvolumeclaims", ns, claim).await?;
        let pv = c["spec"]["volumeName"]
            .as_str()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" is not bound yet"))?;
        let v = self.object("persistentvolumes", "", pv).await?;
        let spec = &v["spec"];
        let path = spec["hostPath"]["path"]
            .as_str()
            .or(spec["local"]["path"].as_str())
            .map(PathBuf::from)
            .ok_or_else(|| {
                format!("persistentvolume \"{pv}\": only hostPath and local volumes can be mounted on an Outpost node")
            })?;
        // This node's own local volumes are world-writable, as local-path volumes are.
        let ours = path.starts_with(self.storage_dir());
        let create = ours || spec["hostPath"]["type"] == "DirectoryOrCreate";
        host_dir(&path, create, ours).map_err(|e| format!("persistentvolume \"{pv}\": {e}"))?;
        Ok(path)
    }

    /// Remove the directories of this node's local volumes that the control plane says are
    /// gone (deleted after their claims were). Only a 404 for a volume this agent mounted
    /// counts: with no link, or any other answer, everything stays.
    async fn sweep_storage(&self, link: &Link) {
        let Ok(dirs) = std::fs::read_dir(self.storage_dir()) else {
            return;
        };
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().to_string();
            let Some(pv) = name.split('_').next().filter(|p| p.starts_with("pvc-")) else {
                continue;
            };
            // Only volumes this agent mounted in this cluster: a directory it knows nothing
            // of (a cache wiped, a node moved to another cluster) is left alone.
            if self.cache.object("persistentvolumes", "", pv).is_none() {
                continue;
            }
            let gone = link
                .call("GET", &format!("/api/v1/persistentvolumes/{pv}"), None)
                .await
                .is_ok_and(|a| a.status == 404);
            if gone {
                match std::fs::remove_dir_all(d.path()) {
                    Ok(()) => {
                        tracing::info!(volume = %pv, "removed the directory of a deleted volume")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %pv, error = %e, "removing a deleted volume's directory")
                    }
                }
                let _ = self.cache.remove_object("persistentvolumes", "", pv);
            }
        }
    }

    /// The Wasm runtime, made on first use (off the async threads: it sets up the engine's
    /// pool and links every host function).
    async fn wasm(&self) -> Result<Arc<Runtime>, String> {
        self.runtime
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(Runtime::new)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(Arc::new)
                    .map_err(|e| format!("starting the Wasm runtime: {e}"))
            })
            .await
            .cloned()
    }

    /// A Wasm OCI artifact from its registry, with the kubelet's pull policies: `Never`
    /// and `IfNotPresent` (the default but for `:latest`) use what this node pulled before;
    /// `Always` asks the registry, and falls back to that copy when the registry cannot be
    /// reached, so an offline node still starts its pods.
    async fn artifact(
        &self,
        image: &str,
        policy: Option<&str>,
        auth: Option<(String, String)>,
    ) -> Result<(String, Vec<u8>, bool), String> {
        let r = registry::Reference::parse(image).map_err(|e| e.to_string())?;
        let key = format!("oci/{r}");
        let cached = self
            .cache
            .meta(&key)
            .and_then(|d| self.cache.module(&d).map(|b| (d, b)));
        let policy = policy.unwrap_or(
            if r.digest.is_none() && r.tag.as_deref() == Some("latest") {
                "Always"
            } else {
                "IfNotPresent"
            },
        );
        match (policy, cached) {
            ("Never", None) => Err(format!(
                "image \"{image}\" is not present on this node and imagePullPolicy is Never"
            )),
            ("Never" | "IfNotPresent", Some((d, b))) => Ok((d, b, false)),
            (_, cached) => self.pull(image, &key, cached, auth).await,
        }
    }

    /// Pull `image` from its registry into the cache under `key` (true: pulled); when the
    /// registry cannot be reached, the `cached` copy.
    async fn pull(
        &self,
        image: &str,
        key: &str,
        cached: Option<(String, Vec<u8>)>,
        auth: Option<(String, String)>,
    ) -> Result<(String, Vec<u8>, bool), String> {
        let client = self
            .registry
            .get_or_init(|| registry::Client::new(self.insecure_registries.clone()))
            .with_auth(auth);
        match client.pull_wasm(image).await {
            Ok(w) => {
                self.cache
                    .put_module(&w.digest, &w.bytes)
                    .and_then(|()| self.cache.put_meta(key, &w.digest))
                    .map_err(|e| e.to_string())?;
                Ok((w.digest, w.bytes, true))
            }
            Err(registry::Error::Registry(what, why)) => match cached {
                Some(c) => {
                    tracing::warn!(image = %what, %why, "registry unreachable; using the copy pulled before");
                    Ok((c.0, c.1, false))
                }
                None => Err(registry::Error::Registry(what, why).to_string()),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    /// The digest a module name points at: asked of the control plane when linked (as a tag
    /// is pulled; within [`NAME_MEMO`] of the last answer only under `Always`), else the
    /// last answer, from the cache.
    async fn resolve(&self, name: &str, policy: Option<&str>) -> Result<String, String> {
        if policy != Some("Always") {
            let memo = self.names.lock().ok().and_then(|n| n.get(name).cloned());
            if let Some((hex, _)) = memo.filter(|(_, at)| at.elapsed() < NAME_MEMO) {
                return Ok(hex);
            }
        }
        let link = self.link.borrow().clone();
        if let Some(link) = link {
            match link.call("GET", &format!("/outpost/v1/names/{name}"), None).await {
                Ok(a) if a.ok() => {
                    let hex = a.json()["digest"]
                        .as_str()
                        .and_then(|d| d.strip_prefix("sha256:"))
                        .unwrap_or("")
                        .to_string();
                    let _ = self.cache.put_meta(&format!("name/{name}"), &hex);
                    if let Ok(mut n) = self.names.lock() {
                        n.insert(name.to_string(), (hex.clone(), Instant::now()));
                    }
                    return Ok(hex);
                }
                Ok(a) if a.status == 404 => {
                    return Err(format!("no module named \"{name}\": push one with `outpost module push FILE --name {name}`"))
                }
                Ok(a) => return Err(a.message()),
                Err(_) => {}
            }
        }
        self.cache.meta(&format!("name/{name}")).ok_or_else(|| {
            format!("module:{name} was never resolved here and the control plane is unreachable")
        })
    }

    /// The module `digest` compiled for this node by the control plane: the artifact cached
    /// here, else asked for over the link (with the module's `bytes` unless the control
    /// plane's store holds it). Checked before loading, from the link and from disk alike.
    async fn compiled(
        &self,
        digest: &str,
        bytes: Vec<u8>,
        stored: bool,
    ) -> Result<outpost_wasm_runtime::Program, String> {
        let runtime = self.wasm().await?;
        if let Some(p) = runtime.cached(digest) {
            return Ok(p);
        }
        let _turn = turn(&self.compiling, digest).await;
        if let Some(p) = runtime.cached(digest) {
            return Ok(p);
        }
        let arch = std::env::consts::ARCH;
        let key = format!("aot/{arch}/{digest}");
        let art = match self.cache.module(&key).map(|b| artifact(&b, digest, arch)) {
            Some(Ok(a)) => a,
            cached => {
                if let Some(Err(e)) = cached {
                    tracing::warn!(%digest, error = %e, "dropping a cached artifact that fails its check");
                }
                let link = self.link.borrow().clone();
                let Some(link) = link else {
                    return Err(format!(
                        "module {digest} has no artifact compiled for {arch} here and the control plane is unreachable"
                    ));
                };
                let path = format!("/outpost/v1/aot?module={digest}&arch={arch}");
                let body = (!stored).then_some(("application/wasm", bytes));
                let a = link
                    .call("POST", &path, body)
                    .await
                    .map_err(|e| format!("compiling {digest} on the control plane: {e}"))?;
                if !a.ok() {
                    return Err(format!(
                        "compiling {digest} on the control plane: {}",
                        a.message()
                    ));
                }
                let art = artifact(&a.body, digest, arch)?;
                self.cache
                    .put_module(&key, &a.body)
                    .map_err(|e| e.to_string())?;
                art
            }
        };
        let d = digest.to_string();
        tokio::task::spawn_blocking(move || runtime.load(&d, &art.code))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// The module an image names: from the cache, else from the control plane's store.
    /// A module by `module:` reference, or a Wasm artifact from a registry, pulled with
    /// `auth` (from the pod's imagePullSecrets).
    async fn module(
        &self,
        image: &str,
        policy: Option<&str>,
        auth: Option<(String, String)>,
    ) -> Result<(String, Code, bool), (String, String)> {
        let pull = |m: String| ("ErrImagePull".to_string(), m);
        let Some(reference) = image.strip_prefix("module:") else {
            let (digest, bytes, pulled) = self.artifact(image, policy, auth).await.map_err(pull)?;
            return Ok((digest, Code::Bytes(bytes), pulled));
        };
        let hex = match reference.strip_prefix("sha256:") {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => h.to_string(),
            Some(_) => {
                return Err(pull(format!(
                    "image \"{image}\": a digest is sha256: and 64 hex digits"
                )))
            }
            None => self.resolve(reference, policy).await.map_err(pull)?,
        };
        let hex = hex.as_str();
        let digest = format!("sha256:{hex}");
        // Compiled already: the module's bytes (tens of kilobytes from the cache) are not needed.
        if let Some(p) = self.runtime.get().and_then(|r| r.cached(&digest)) {
            return Ok((digest, Code::Ready(p), false));
        }
        if let Some(b) = self.cache.module(&digest) {
            return Ok((digest, Code::Bytes(b), false));
        }
        let link = self.link.borrow().clone();
        let Some(link) = link else {
            return Err(pull(format!(
                "module {digest} is not cached and the control plane is unreachable"
            )));
        };
        let a = link
            .call("GET", &format!("/outpost/v1/modules/{digest}"), None)
            .await
            .map_err(|e| pull(format!("fetching {digest}: {e}")))?;
        if !a.ok() {
            return Err(pull(format!("fetching {digest}: {}", a.message())));
        }
        if crate::sha256_hex(&a.body) != hex {
            return Err(pull(format!(
                "module {digest} arrived with the wrong digest"
            )));
        }
        self.cache
            .put_module(&digest, &a.body)
            .map_err(|e| pull(e.to_string()))?;
        self.report_images();
        Ok((digest, Code::Bytes(a.body), true))
    }
}

/// Gates by key: one holder at a time per key, the others waiting without a thread. The
/// gate of `key` in `gates` is made on first use, and the ones no one holds or waits for
/// are dropped on the way.
async fn turn(
    gates: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &str,
) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    let gate = gates.lock().ok().map(|mut g| {
        g.retain(|_, l| Arc::strong_count(l) > 1);
        g.entry(key.to_string()).or_default().clone()
    })?;
    Some(gate.lock_owned().await)
}

/// A Wasm module's code as [`Agent::module`] finds it.
enum Code {
    /// Compiled already, in this agent's runtime.
    Ready(outpost_wasm_runtime::Program),
    Bytes(Vec<u8>),
}

/// An [`Artifact`](outpost_api::Artifact) from its CBOR, if it is `module` compiled for
/// `arch` and its code is what its digest says.
fn artifact(cbor: &[u8], module: &str, arch: &str) -> Result<outpost_api::Artifact, String> {
    let a: outpost_api::Artifact =
        ciborium::from_reader(cbor).map_err(|e| format!("compiled artifact: {e}"))?;
    if a.module != module || a.arch != arch {
        return Err(format!(
            "compiled artifact is {} for {}, not {module} for {arch}",
            a.module, a.arch
        ));
    }
    if crate::sha256_hex(&a.code) != a.sha256 {
        return Err(format!(
            "compiled artifact of {module} does not match its digest sha256:{}",
            a.sha256
        ));
    }
    Ok(a)
}

/// The cgroup under which a pod's containers get theirs.
fn pod_cgroup(uid: &str) -> String {
    format!("/outpost/{uid}")
}

/// A pod's resolv.conf as kubelet writes it for its `dnsPolicy`: cluster DNS (with the search
/// path `NS.svc.DOMAIN svc.DOMAIN DOMAIN` and `ndots:5`) for `ClusterFirst` pods with their
/// own network and `ClusterFirstWithHostNet` ones, the node's for `Default` (and where this
/// node has no cluster DNS), only `dnsConfig` for `None`; `dnsConfig` adds to any of them.
fn pod_resolv(pod: &Value, host: &str, cluster: Option<&services::Config>) -> String {
    let spec = &pod["spec"];
    let host_net = spec["hostNetwork"].as_bool().unwrap_or(false);
    let policy = spec["dnsPolicy"].as_str().unwrap_or("ClusterFirst");
    let (mut servers, mut search, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        (Vec::new(), Vec::new(), Vec::new());
    let from_host =
        |servers: &mut Vec<String>, search: &mut Vec<String>, options: &mut Vec<String>| {
            for l in host.lines() {
                let mut w = l.split_whitespace();
                match w.next() {
                    Some("nameserver") => servers.extend(w.next().map(String::from)),
                    Some("search" | "domain") => search.extend(w.map(String::from)),
                    Some("options") => options.extend(w.map(String::from)),
                    _ => {}
                }
            }
        };
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_net,
        _ => false,
    };
    match (policy, cluster) {
        ("None", _) => {}
        (_, Some(c)) if cluster_first => {
            let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
            servers.push(c.dns.to_string());
            search.extend([
                format!("{ns}.svc.{}", c.domain),
                format!("svc.{}", c.domain),
                c.domain.clone(),
            ]);
            options.push("ndots:5".into());
        }
        _ => from_host(&mut servers, &mut search, &mut options),
    }
    let cfg = &spec["dnsConfig"];
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    servers.extend(strs(&cfg["nameservers"]));
    search.extend(strs(&cfg["searches"]));
    for o in cfg["options"].as_array().into_iter().flatten() {
        if let Some(n) = o["name"].as_str() {
            let o = match o["value"].as_str() {
                Some(v) => format!("{n}:{v}"),
                None => n.to_string(),
            };
            // A pod's option replaces the same option from above.
            let name = n.to_string();
            options.retain(|x| x.split(':').next() != Some(name.as_str()));
            options.push(o);
        }
    }
    let mut out = String::new();
    for ns in servers.iter().take(3) {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

fn singular(kind: &str) -> &str {
    kind.strip_suffix('s').unwrap_or(kind)
}

/// Conditions keep their last transition time while their status stays the same.
fn keep_transition_times(status: &mut Value, prev: &Value) {
    let Some(conds) = status["conditions"].as_array_mut() else {
        return;
    };
    for c in conds {
        let old = prev["conditions"]
            .as_array()
            .and_then(|p| p.iter().find(|o| o["type"] == c["type"]));
        if let Some(o) = old.filter(|o| o["status"] == c["status"]) {
            c["lastTransitionTime"] = o["lastTransitionTime"].clone();
        }
    }
}

/// The ports `kubectl port-forward` may reach in a pod: those its containers declare, and
/// 8080 (where an HTTP component listens when it names no port) for a container naming none.
fn forward_ports(spec: &Value) -> Vec<u16> {
    let mut ports = vec![];
    for c in spec["containers"].as_array().into_iter().flatten() {
        let declared = c["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        if declared.is_empty() {
            ports.push(8080);
        }
        ports.extend(
            declared
                .iter()
                .filter_map(|p| p["containerPort"].as_u64())
                .filter_map(|p| u16::try_from(p).ok()),
        );
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

async fn reply(send: &mut quinn::SendStream, status: u16, msg: &str) -> std::io::Result<()> {
    let head = Head {
        status,
        content_type: Some("text/plain".into()),
    };
    write_frame(send, &head, MAX_FRAME).await?;
    send.write_all(msg.as_bytes()).await?;
    send.finish().map_err(std::io::Error::other)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

/// Whether a container of `pod` with `image` runs on wasmtime whatever its image holds: the
/// module store's or the pod's runtime class says so. (Other images are looked at.)
fn surely_wasm(pod: &Value, image: &str) -> bool {
    image.starts_with("module:") || pod["spec"]["runtimeClassName"] == "wasm"
}

/// The first of `files` that can be read, trimmed, as the kubelet reads the host's machine
/// id, DMI system UUID (absent on most ARM boards) and boot id; empty when none can.
fn host_id(files: &[&str]) -> String {
    files
        .iter()
        .find_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The hostPorts of `pod`'s containers: (node port, protocol, pod `namespace/name`,
/// container port).
fn host_ports(pod: &Value) -> Vec<(u16, Proto, String, u16)> {
    let m = &pod["metadata"];
    let name = format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or("default"),
        m["name"].as_str().unwrap_or("")
    );
    let port = |v: &Value| {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    };
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][*k].as_array().into_iter().flatten())
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| {
            Some((
                port(&p["hostPort"])?,
                Proto::of(&p["protocol"])?,
                name.clone(),
                port(&p["containerPort"])?,
            ))
        })
        .collect()
}

/// The address this host is known by: the one it uses toward `server`, unless that is a
/// loopback address (the control plane on this machine, as `outpost up` runs it), in which
/// case the one its default route leaves from, as K3s picks a node's address: what other
/// machines reach its LoadBalancers and its pods' host ports at. Loopback where there is no
/// such route.
async fn local_ip(server: &str) -> std::io::Result<String> {
    let to = tokio::net::lookup_host(server)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let ip = source_toward(to).await?;
    if !ip.is_loopback() {
        return Ok(ip.to_string());
    }
    // A documentation address: only the route is looked up, no datagram is sent.
    let anywhere: std::net::SocketAddr = if to.is_ipv6() {
        "[2001:db8::1]:9".parse()
    } else {
        "198.51.100.1:9".parse()
    }
    .map_err(std::io::Error::other)?;
    Ok(source_toward(anywhere).await.unwrap_or(ip).to_string())
}

/// The source address the kernel's routes pick toward `to`.
async fn source_toward(to: std::net::SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let bind = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let s = tokio::net::UdpSocket::bind(bind).await?;
    s.connect(to).await?;
    Ok(s.local_addr()?.ip())
}

/// One container's loop: prepare, run, decide, back off.
/// A container ready to run, on one runtime or the other.
enum Prepared {
    Wasm(Arc<Runtime>, outpost_wasm_runtime::Program, Command),
    Oci(OciRun),
}

struct OciRun {
    id: String,
    spec: Value,
    image: Image,
    log: Arc<Log>,
    signal: i32,
    grace: Duration,
}

/// How a run ended.
enum Ran {
    Wasm(Result<Exit, String>),
    Oci(Outcome),
}

/// The kubelet's (exit code, reason, message) for an OCI run; `killed` says why a probe
/// stopped it.
fn oci_state(o: &Outcome, killed: Option<&str>) -> (i32, String, String) {
    match (o, killed) {
        (
            Outcome {
                error: Some(e),
                exit_code: 128,
                ..
            },
            _,
        ) => (128, "StartError".into(), e.clone()),
        (
            Outcome {
                oom_killed: true, ..
            },
            _,
        ) => (137, "OOMKilled".into(), String::new()),
        (o, Some(k)) => (o.exit_code, "Error".into(), k.to_string()),
        (o, None) => (
            o.exit_code,
            if o.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            String::new(),
        ),
    }
}

/// Make the files under `to` what they are under `from`: changed and new files copied in
/// by rename, files `from` lacks removed. Returns how many files changed.
fn sync_files(from: &Path, to: &Path) -> std::io::Result<usize> {
    fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                files(root, &p, out)?;
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_path_buf());
            }
        }
        Ok(())
    }
    let (mut new, mut old) = (Vec::new(), Vec::new());
    files(from, from, &mut new)?;
    files(to, to, &mut old)?;
    let mut changed = 0;
    for rel in &new {
        let (src, dst) = (from.join(rel), to.join(rel));
        if std::fs::read(&src).ok() == std::fs::read(&dst).ok()
            && std::fs::metadata(&src).map(|m| m.permissions()).ok()
                == std::fs::metadata(&dst).map(|m| m.permissions()).ok()
        {
            continue;
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dst.with_extension("outpost-new");
        std::fs::copy(&src, &tmp)?;
        std::fs::rename(&tmp, &dst)?;
        changed += 1;
    }
    for rel in old.iter().filter(|r| !new.contains(r)) {
        std::fs::remove_file(to.join(rel))?;
        changed += 1;
    }
    Ok(changed)
}

/// A pod's status reason once it has run longer than its `activeDeadlineSeconds`.
const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";

/// Run a pod's init containers (the first `inits` of `workers`) one at a time, each until it
/// has ended well (a sidecar until it has started), then the others; stop the sidecars once
/// the others have ended. An init container that fails for good fails the pod: nothing
/// after it runs.
async fn initialize(workers: Vec<Worker>, inits: usize, pod: Arc<Stop>) {
    let Some(first) = workers.first() else {
        return;
    };
    let (containers, changed) = (first.containers.clone(), first.changed.clone());
    let mut sidecars = Vec::new();
    let mut workers = workers.into_iter();
    // Until `pred` holds of the container at `index`; false if the pod stopped first.
    let wait = |index: usize, pred: fn(&Container) -> bool| {
        let (containers, pod) = (containers.clone(), pod.clone());
        let mut rx = changed.subscribe();
        async move {
            loop {
                let holds = containers
                    .lock()
                    .is_ok_and(|c| c.get(index).is_some_and(pred));
                if holds {
                    return true;
                }
                tokio::select! {
                    _ = pod.wait() => return false,
                    r = rx.changed() => if r.is_err() { return false },
                }
            }
        }
    };
    for index in 0..inits {
        let Some(w) = workers.next() else { return };
        if !Arc::ptr_eq(&w.stop, &pod) {
            let (own, pod) = (w.stop.clone(), pod.clone());
            sidecars.push(own.clone());
            tokio::spawn(async move {
                pod.wait().await;
                own.stop_within(pod.grace());
            });
        }
        tokio::spawn(w.run());
        let over = |c: &Container| c.initialized() || c.failed_init();
        if !wait(index, over).await {
            return;
        }
        if containers
            .lock()
            .is_ok_and(|c| c.get(index).is_some_and(Container::failed_init))
        {
            // The rest never start: they stay waiting, and the pod has failed.
            for s in &sidecars {
                s.stop();
            }
            changed.send_modify(|n| *n += 1);
            return;
        }
    }
    let mains: Vec<usize> = (inits..inits + workers.len()).collect();
    for w in workers {
        tokio::spawn(w.run());
    }
    if sidecars.is_empty() {
        return;
    }
    for index in mains {
        if !wait(index, |c| c.done).await {
            return;
        }
    }
    for s in sidecars {
        s.stop();
    }
}

/// The node's CPUs, its allocatable CPU.
fn node_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The size in bytes of the file system holding `dir` (the node's pods' logs, empty dirs and
/// writable layers): its ephemeral storage.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    // The fields are type aliases, 32 bits wide on some targets.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
        (s.blocks() as u64).saturating_mul(s.fragment_size() as u64)
    })
}

/// The node's memory in bytes, its allocatable memory.
fn node_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[derive(Clone)]
struct Worker {
    agent: Arc<Agent>,
    uid: String,
    /// Shared by the pod's containers' workers.
    pod: Arc<Value>,
    spec: Value,
    index: usize,
    containers: Arc<Mutex<Vec<Container>>>,
    stop: Arc<Stop>,
    changed: Arc<watch::Sender<u64>>,
    net: Arc<OnceCell<Attached>>,
}

impl Worker {
    fn update(&self, f: impl FnOnce(&mut Container)) {
        if let Ok(mut c) = self.containers.lock() {
            if let Some(c) = c.get_mut(self.index) {
                f(c);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or("")
    }

    fn on(&self) -> On {
        On {
            ns: self.pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            pod: self.pod["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            uid: self.uid.clone(),
            container: self.name().to_string(),
        }
    }

    fn event(&self, warning: bool, reason: &'static str, message: String) {
        let _ = self
            .agent
            .events_tx
            .send(Event::new(self.on(), warning, reason, message));
    }

    fn probing(&self) -> Probing {
        Probing {
            on: self.on(),
            events: self.agent.events_tx.clone(),
            containers: self.containers.clone(),
            index: self.index,
            changed: self.changed.clone(),
            what: format!(
                "{}/{} container {}",
                self.pod["metadata"]["namespace"].as_str().unwrap_or(""),
                self.pod["metadata"]["name"].as_str().unwrap_or(""),
                self.name()
            ),
        }
    }

    async fn run(self) {
        let (ephemeral, init, sidecar) = self
            .containers
            .lock()
            .ok()
            .and_then(|c| c.get(self.index).map(|c| (c.ephemeral, c.init, c.sidecar)))
            .unwrap_or_default();
        let pod_policy = self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always");
        // An ephemeral container runs once, whatever the pod's policy; an init container
        // runs again after a failure unless the pod never restarts; a sidecar always.
        let policy = match (ephemeral, init, sidecar) {
            (true, ..) => "Never",
            (_, true, true) => "Always",
            (_, true, false) if pod_policy == "Never" => "Never",
            (_, true, false) => "OnFailure",
            _ => pod_policy,
        }
        .to_string();
        let mut failures = 0u32;
        let last = logs::last_run(&self.agent.dir, &self.uid, self.name());
        // A container that ended for good before the agent restarted stays ended: a pod that
        // has completed does not run again.
        // (A run under `Always` never ends for good: no need to look.)
        let ended = (policy != "Always")
            .then(|| self.agent.cache.object(ENDED, &self.uid, self.name()))
            .flatten();
        if let Some(state) = ended.and_then(|v| State::terminated_from(&v)) {
            self.update(|c| {
                c.state = state;
                c.done = true;
                c.restarts = last.map_or(0, |l| l.0);
            });
            return;
        }
        // A container that ran before the agent restarted goes on counting; its last run
        // ended unseen, as the kubelet reports a container lost in a reboot.
        let mut restarts = match last {
            Some((run, started, finished)) => {
                let at = |t: std::time::SystemTime| {
                    stamp(jiff::Timestamp::try_from(t).unwrap_or_else(|_| jiff::Timestamp::now()))
                };
                self.update(|c| {
                    c.last = Some(State::Terminated {
                        code: 255,
                        reason: "Unknown".into(),
                        message: String::new(),
                        started: at(started),
                        finished: at(finished),
                    })
                });
                run + 1
            }
            None => 0,
        };
        if self.stop.stopped() {
            // Stopped before this agent ran it (a pod past its deadline): its last run is
            // how it ended.
            self.update(|c| {
                if let Some(l) = c.last.take() {
                    c.state = l;
                }
            });
            return;
        }
        let probes = match Probes::of(&self.spec) {
            Ok(p) => p,
            Err(e) => {
                // The spec cannot change: wait to be deleted, saying why.
                self.event(true, "Failed", format!("Error: {e}"));
                self.update(|c| c.state = State::waiting("CreateContainerConfigError", e));
                self.stop.wait().await;
                return;
            }
        };
        loop {
            if self.stop.stopped() {
                return;
            }
            let prepared = match self.prepare(restarts).await {
                Ok(p) => {
                    failures = 0;
                    p
                }
                Err((reason, message)) => {
                    tracing::warn!(pod = %self.pod["metadata"]["name"], container = %self.name(), %reason, %message, "container cannot start");
                    let d = pod::backoff(failures);
                    failures += 1;
                    if reason == "ErrImagePull" {
                        let image = self.spec["image"].as_str().unwrap_or("");
                        self.event(
                            true,
                            "Failed",
                            format!("Failed to pull image \"{image}\": {message}"),
                        );
                        self.event(true, "Failed", "Error: ErrImagePull".into());
                        self.update(|c| c.state = State::waiting(&reason, message.clone()));
                        // As the kubelet: ErrImagePull once, then ImagePullBackOff while
                        // it waits to try again.
                        let first = d.min(Duration::from_secs(2));
                        if nap(&self.stop, first).await {
                            return;
                        }
                        self.event(
                            false,
                            "BackOff",
                            format!("Back-off pulling image \"{image}\""),
                        );
                        self.update(|c| {
                            c.state = State::waiting(
                                "ImagePullBackOff",
                                format!(
                                    "Back-off pulling image \"{image}\": ErrImagePull: {message}"
                                ),
                            )
                        });
                        if nap(&self.stop, d - first).await {
                            return;
                        }
                        continue;
                    }
                    self.event(true, "Failed", format!("Error: {reason}: {message}"));
                    self.update(|c| c.state = State::waiting(&reason, message));
                    if nap(&self.stop, d).await {
                        return;
                    }
                    continue;
                }
            };
            if let (Prepared::Wasm(..), Some(key)) = (&prepared, probes.execs()) {
                // The spec cannot change: wait to be deleted, saying why.
                let why = format!("{key}: {}", probe::NO_PROCESS);
                self.event(true, "Failed", format!("Error: {why}"));
                self.update(|c| c.state = State::waiting("CreateContainerConfigError", why));
                self.stop.wait().await;
                return;
            }
            let started = now();
            let t0 = Instant::now();
            self.event(
                false,
                "Created",
                format!("Created container {}", self.name()),
            );
            self.event(
                false,
                "Started",
                format!("Started container {}", self.name()),
            );
            self.update(|c| {
                c.state = State::Running {
                    started: started.clone(),
                };
                c.restarts = restarts;
                c.started = probes.startup.is_none();
                c.ready = c.started && probes.readiness.is_none();
            });
            // This run ends when the pod stops or a probe gives up on it.
            let stop = Stop::new();
            let this_run = stop.clone();
            // A pod with its own network listens at its address; an OCI container runs
            // exec probes' commands.
            let mut run_probes = probes.clone();
            let mut gate = None;
            if let Some(a) = self.net.get() {
                run_probes.at(std::net::IpAddr::V4(a.ip));
            }
            if let (Prepared::Oci(o), Ok(oci)) = (&prepared, &self.agent.oci) {
                run_probes.exec_in(exec_in(oci.containers.clone(), o.id.clone()));
                gate = Some((oci.containers.clone(), o.id.clone()));
            }
            // Deleted, the pod's container runs its preStop hook first, within the grace
            // period, then is stopped with what is left of it. The task waits out the run, so
            // a container without the hook gets one that holds nothing else.
            let forward = {
                let (pod, run) = (self.stop.clone(), stop.clone());
                match run_probes.pre_stop.take() {
                    None => tokio::spawn(async move {
                        pod.wait().await;
                        run.stop_within(pod.grace());
                    }),
                    Some(h) => {
                        let (events, on) = (self.agent.events_tx.clone(), self.on());
                        tokio::spawn(async move {
                            pod.wait().await;
                            let t0 = Instant::now();
                            let limit = pod.grace().unwrap_or(Duration::from_secs(30));
                            let ran = tokio::time::timeout(limit, Box::pin(h.run(limit))).await;
                            let failed = match ran {
                                Ok(Ok(())) => None,
                                Ok(Err(why)) => Some(why),
                                Err(_) => Some(format!("did not end within {}s", limit.as_secs())),
                            };
                            if let Some(why) = failed {
                                let msg = format!("PreStopHook failed: {why}");
                                let _ = events.send(Event::new(on, true, "FailedPreStopHook", msg));
                            }
                            run.stop_within(pod.grace().map(|g| g.saturating_sub(t0.elapsed())));
                        })
                    }
                }
            };
            // Its configMap and secret volumes follow their objects while it runs.
            let refresher = self.refreshes().then(|| {
                let me = self.clone();
                tokio::spawn(async move {
                    loop {
                        let jitter = Duration::from_millis(rand::random::<u64>() % 1000);
                        tokio::time::sleep(me.agent.sync + jitter).await;
                        me.refresh_volumes().await;
                    }
                })
            });
            let watch = {
                let (probing, stop) = (self.probing(), stop.clone());
                tokio::spawn(async move {
                    // As the kubelet's, probes start once the container has started.
                    if let Some((containers, id)) = gate {
                        // A slow start (a copied image) may take longer than one wait; the
                        // run's end aborts this task.
                        while !containers.started(&id).await {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    // As the kubelet: postStart first, and a container whose hook fails
                    // is killed; probes begin once it has run.
                    if let Some(h) = run_probes.post_start.take() {
                        // A guest starts beside its hook: one that listens gets two seconds
                        // to begin before a refused hook counts.
                        let limit = Duration::from_secs(30);
                        let mut tried = Box::pin(h.run(limit)).await;
                        let t0 = Instant::now();
                        while tried.is_err() && t0.elapsed() < Duration::from_secs(2) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            tried = Box::pin(h.run(limit)).await;
                        }
                        if let Err(why) = tried {
                            let msg = format!("PostStartHook failed: {why}");
                            probing.failed_hook(msg.clone());
                            stop.stop();
                            return Some(msg);
                        }
                    }
                    probing.watch(run_probes, stop).await
                })
            };
            let ran = match prepared {
                Prepared::Wasm(runtime, module, mut cmd) => {
                    // A guest whose spec has `stdin` reads a pipe `kubectl attach` writes.
                    let input = (self.spec["stdin"].as_bool() == Some(true))
                        .then(tokio::net::unix::pipe::pipe)
                        .and_then(Result::ok)
                        .map(|(tx, rx)| {
                            cmd.stdin = Some(Arc::new(Mutex::new(Some(rx))));
                            Input::Pipe(Arc::new(tokio::sync::Mutex::new(Some(tx))))
                        });
                    let counters = Arc::new(outpost_wasm_runtime::Usage::default());
                    cmd.usage = Some(counters.clone());
                    let live = cmd.log.clone().map(|log| {
                        self.live(Live {
                            log,
                            stdin: input,
                            once: self.spec["stdinOnce"].as_bool() == Some(true),
                            interrupt: None,
                            usage: self.run_usage(usage::Meter::Guest(counters)),
                        })
                    });
                    let ran = tokio::spawn(async move { runtime.run(&module, &cmd, &stop).await })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    drop(live);
                    Ran::Wasm(ran)
                }
                Prepared::Oci(o) => Ran::Oci(self.run_oci(o, stop).await),
            };
            forward.abort();
            if let Some(r) = refresher {
                r.abort();
            }
            // A run a probe stopped (not the pod) ended because of it: wait for its reason,
            // which it gives right after stopping the run.
            let killed = if watch.is_finished() || (this_run.stopped() && !self.stop.stopped()) {
                watch.await.ok().flatten()
            } else {
                watch.abort();
                None
            };
            self.update(|c| {
                c.ready = false;
                c.started = false;
            });
            let (code, reason, message) = match &ran {
                // Stopped by a probe or a hook, however the guest ended (an HTTP component
                // stops serving as if it had finished).
                Ran::Wasm(Ok(Exit::Stopped | Exit::Code(_))) if killed.is_some() => {
                    (137, "Error".to_string(), killed.clone().unwrap_or_default())
                }
                Ran::Wasm(Ok(Exit::OutOfMemory { limit })) => (
                    137,
                    "OOMKilled".to_string(),
                    format!("memory limit of {limit} bytes reached"),
                ),
                Ran::Wasm(Ok(Exit::Trap(t))) => (134, "Error".into(), t.clone()),
                Ran::Wasm(Ok(e)) => (e.code(), e.reason().to_string(), String::new()),
                Ran::Wasm(Err(e)) => {
                    self.event(true, "Failed", format!("Error: {e}"));
                    (128, "StartError".into(), e.clone())
                }
                Ran::Oci(o) => oci_state(o, killed.as_deref()),
            };
            // Wasm guests have no /dev/termination-log; a failed run's last output is its
            // message when the container asks for that.
            let message = if message.is_empty()
                && code != 0
                && self.spec["terminationMessagePolicy"] == "FallbackToLogsOnError"
            {
                logs::last_words(&logs::file(
                    &self.agent.dir,
                    &self.uid,
                    self.name(),
                    restarts,
                ))
            } else {
                message
            };
            let ended = State::Terminated {
                code,
                reason,
                message,
                started,
                finished: now(),
            };
            if self.stop.stopped() {
                self.event(
                    false,
                    "Killing",
                    format!("Stopping container {}", self.name()),
                );
                self.update(|c| c.state = ended);
                return;
            }
            match pod::after_exit(&policy, code, restarts, t0.elapsed()) {
                Next::Stay => {
                    if let Err(e) =
                        self.agent
                            .cache
                            .put_object(ENDED, &self.uid, self.name(), &ended.json())
                    {
                        tracing::warn!(error = %e, "caching an ended container");
                    }
                    self.update(|c| {
                        c.state = ended;
                        c.done = true;
                    });
                    return;
                }
                Next::Restart(d) => {
                    let msg = format!(
                        "back-off {}s restarting failed container={} pod={}_{}({})",
                        d.as_secs(),
                        self.name(),
                        self.pod["metadata"]["name"].as_str().unwrap_or(""),
                        self.pod["metadata"]["namespace"].as_str().unwrap_or(""),
                        self.uid
                    );
                    self.event(
                        true,
                        "BackOff",
                        format!("Back-off restarting failed container {}", self.name()),
                    );
                    self.update(|c| {
                        c.last = Some(ended);
                        c.state = State::waiting("CrashLoopBackOff", msg);
                    });
                    if nap(&self.stop, d).await {
                        return;
                    }
                    restarts += 1;
                }
            }
        }
    }

    /// The log file of run `run`, made ready (see [`logs::prepare`]).
    fn log(&self, run: u32) -> Result<Arc<Log>, String> {
        let a = &self.agent;
        logs::prepare(&a.spares, &a.dir, &self.uid, self.name(), run)
            .and_then(|p| Log::open(&p, log::MAX))
            .map_err(|e| format!("log file: {e}"))
    }

    /// Everything a run needs: the compiled module and the command. Errors are a waiting
    /// reason and message, as `kubectl describe` shows them.
    async fn prepare(&self, run: u32) -> Result<Prepared, (String, String)> {
        let dir = self.agent.dir.join("pods").join(&self.uid);
        self.agent.spares.make(&dir).map_err(|e| {
            (
                "CreateContainerConfigError".to_string(),
                format!("pod directory {}: {e}", dir.display()),
            )
        })?;
        let image = self.spec["image"].as_str().unwrap_or("");
        let wasm = surely_wasm(&self.pod, image);
        if let (false, Ok(oci)) = (wasm, &self.agent.oci) {
            if let Some(p) = self.prepare_oci(run, oci).await? {
                return Ok(p);
            }
        }
        let auth = match registry::Reference::parse(image) {
            Ok(r) if !image.starts_with("module:") => self.pull_auth(&r.registry).await,
            _ => None,
        };
        let t0 = Instant::now();
        let (digest, bytes, pulled) = self
            .agent
            .module(image, self.spec["imagePullPolicy"].as_str(), auth)
            .await?;
        // The kubelet's events, a module standing for an image.
        let pulled = match (&bytes, pulled) {
            (Code::Bytes(b), true) => {
                let t = t0.elapsed().as_secs_f64();
                format!("Successfully pulled image \"{image}\" in {t:.3}s ({t:.3}s including waiting). Image size: {} bytes.", b.len())
            }
            _ => format!("Container image \"{image}\" already present on machine"),
        };
        self.event(false, "Pulled", pulled);
        self.update(|c| {
            c.image_id = digest.clone();
            // A new id for each run, as a container runtime gives one.
            c.id = format!("wasm://{:032x}", rand::random::<u128>());
        });
        let runtime = self
            .agent
            .wasm()
            .await
            .map_err(|e| ("CreateContainerError".to_string(), e))?;
        let module = match (bytes, self.agent.compile) {
            (Code::Ready(p), _) => p,
            (Code::Bytes(bytes), Compile::Node) => {
                let _turn = turn(&self.agent.compiling, &digest).await;
                match runtime.cached(&digest) {
                    Some(p) => p,
                    None => {
                        let runtime = runtime.clone();
                        let d = digest.clone();
                        tokio::task::spawn_blocking(move || runtime.module(&d, &bytes))
                            .await
                            .map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?
                            .map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?
                    }
                }
            }
            (Code::Bytes(bytes), Compile::Control) => self
                .agent
                .compiled(&digest, bytes, image.starts_with("module:"))
                .await
                .map_err(|e| ("CreateContainerError".to_string(), e))?,
        };
        let config = |m: String| ("CreateContainerConfigError".to_string(), m);
        let mut env = self.env().await.map_err(config)?;
        let dirs = self.volumes().await.map_err(config)?;
        let log = self.log(run).map_err(config)?;
        let strings = |k: &str| -> Vec<String> {
            self.spec[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let expand = |a: String| outpost_oci_shim::spec::expand(&a, &env);
        let mut args: Vec<String> = strings("command").into_iter().map(expand).collect();
        if args.is_empty() {
            args.push(self.name().to_string());
        }
        args.extend(strings("args").into_iter().map(expand));
        // What a container runtime sets from the pod's hostname (after expansion, which
        // sees only the container's own variables).
        if !env.iter().any(|(k, _)| k == "HOSTNAME") {
            let host = self.pod["spec"]["hostname"]
                .as_str()
                .or(self.pod["metadata"]["name"].as_str())
                .unwrap_or("");
            env.insert(0, ("HOSTNAME".into(), host.chars().take(63).collect()));
        }
        let limits = &self.spec["resources"]["limits"];
        let memory = match limits["memory"].as_str() {
            Some(q) => Some(
                outpost_api::quantity::bytes(q)
                    .ok_or_else(|| config(format!("bad memory limit {q:?}")))?,
            ),
            None => None,
        };
        let millicores = match limits["cpu"].as_str() {
            Some(q) => Some(
                outpost_api::quantity::millicores(q)
                    .ok_or_else(|| config(format!("bad cpu limit {q:?}")))?,
            ),
            None => None,
        };
        // An HTTP component listens on the container's first port. Where the node has a pod
        // network it gets an address of its own there, as an OCI pod does, so that replicas
        // on one node do not contend for the port; elsewhere (and with `hostNetwork`) it
        // listens on every address of the node, whose IP is then the pod's.
        let listen = self.spec["ports"][0]["containerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .map(|p| std::net::SocketAddr::from(([0, 0, 0, 0], p)));
        let bind = match &module {
            outpost_wasm_runtime::Program::Http(_) => self.network().await?.map(|a| {
                Arc::new(move |addr| net::listen_in(&a.netns, addr)) as outpost_wasm_runtime::Bind
            }),
            _ => None,
        };
        Ok(Prepared::Wasm(
            runtime,
            module,
            Command {
                args,
                env,
                dirs,
                log: Some(log),
                stdin: None,
                memory,
                millicores,
                listen,
                bind,
                grace: Duration::from_secs(
                    self.pod["spec"]["terminationGracePeriodSeconds"]
                        .as_u64()
                        .unwrap_or(30),
                ),
                resolve: self.agent.services.clone().map(|s| {
                    let ns = self.pod["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string();
                    Arc::new(move |host: &str| s.resolve(host, &ns))
                        as outpost_wasm_runtime::Resolve
                }),
                usage: None,
            },
        ))
    }

    /// An OCI container's image, bundle spec and log; `None` when the image turns out to be
    /// a Wasm artifact, which the Wasm runtime runs.
    async fn prepare_oci(&self, run: u32, oci: &Oci) -> Result<Option<Prepared>, (String, String)> {
        let Some(image) = self.image(oci).await? else {
            return Ok(None);
        };
        let id = Containers::id(&self.uid, self.name());
        // Probes and exec from now on wait for this run, not the last one's remains.
        oci.containers.reset(&id);
        self.update(|c| {
            c.image_id = image.digest.clone();
            c.id = format!("outpost://{id}");
        });
        let config = |m: String| ("CreateContainerConfigError".to_string(), m);
        let attached = self.network().await?;
        let env = self.env().await.map_err(config)?;
        let mounts = self.volumes().await.map_err(config)?;
        let ip = attached
            .as_ref()
            .map_or_else(|| self.agent.host_ip(), |a| a.ip.to_string());
        let files = self.pod_files(&ip).map_err(config)?;
        let log = self.log(run).map_err(config)?;
        let (pod, container) = (self.pod.clone(), self.spec.clone());
        let hostname = self.pod["spec"]["hostname"]
            .as_str()
            .or(self.pod["metadata"]["name"].as_str())
            .unwrap_or("pod")
            .chars()
            .take(63)
            .collect();
        let cgroup = format!("{}/{}", pod_cgroup(&self.uid), self.name());
        let (config_img, rootfs) = (image.config.clone(), image.rootfs.clone());
        let spec = tokio::task::spawn_blocking(move || {
            let l = Launch {
                pod: &pod,
                container: &container,
                env,
                mounts,
                files,
                cgroup,
                hostname,
                netns: attached.map(|a| a.netns),
            };
            outpost_oci_shim::spec::runtime_spec(&l, &config_img, &rootfs)
        })
        .await
        .map_err(|e| config(e.to_string()))?
        .map_err(|e| config(e.to_string()))?;
        let signal = outpost_oci_shim::run::signal_number(&image.config.stop_signal);
        Ok(Some(Prepared::Oci(OciRun {
            id,
            spec,
            image,
            log,
            signal,
            grace: Duration::from_secs(
                self.pod["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap_or(30),
            ),
        })))
    }

    /// The container's image, pulled as `imagePullPolicy` says, with the kubelet's events.
    async fn image(&self, oci: &Oci) -> Result<Option<Image>, (String, String)> {
        let name = self.spec["image"].as_str().unwrap_or("");
        let pull = |m: String| ("ErrImagePull".to_string(), m);
        let r = registry::Reference::parse(name)
            .map_err(|e| ("InvalidImageName".to_string(), e.to_string()))?;
        let policy = self.spec["imagePullPolicy"].as_str().unwrap_or(
            if r.digest.is_none() && r.tag.as_deref() == Some("latest") {
                "Always"
            } else {
                "IfNotPresent"
            },
        );
        // A few small reads: not worth a blocking task.
        let cached = oci.store.cached(name);
        match (policy, cached) {
            ("Never", None) => {
                return Err((
                    "ErrImageNeverPull".into(),
                    format!("Container image \"{name}\" is not present with pull policy of Never"),
                ))
            }
            ("Never" | "IfNotPresent", Some(img)) => {
                self.event(
                    false,
                    "Pulled",
                    format!("Container image \"{name}\" already present on machine"),
                );
                return Ok(Some(img));
            }
            _ => {}
        }
        let auth = self.pull_auth(&r.registry).await;
        let client = self
            .agent
            .registry
            .get_or_init(|| registry::Client::new(self.agent.insecure_registries.clone()))
            .with_auth(auth);
        self.event(false, "Pulling", format!("Pulling image \"{name}\""));
        let t0 = Instant::now();
        let progress = |m: String| {
            self.event(false, "Pulling", format!("Pulling image \"{name}\": {m}"));
        };
        match oci.store.pull(&client, name, &progress).await {
            Ok(img) => {
                let t = t0.elapsed().as_secs_f64();
                self.event(
                    false,
                    "Pulled",
                    format!("Successfully pulled image \"{name}\" in {t:.3}s ({t:.3}s including waiting). Image size: {} bytes.", img.size),
                );
                self.agent.report_images();
                Ok(Some(img))
            }
            Err(outpost_oci_shim::Error::IsWasm(_)) => Ok(None),
            // Offline: the copy pulled before keeps the pod running.
            Err(e @ outpost_oci_shim::Error::Registry(..)) => match oci.store.cached(name) {
                Some(img) => {
                    tracing::warn!(image = %name, error = %e, "registry unreachable; using the copy pulled before");
                    Ok(Some(img))
                }
                None => Err(pull(e.to_string())),
            },
            Err(e) => Err(pull(e.to_string())),
        }
    }

    /// Credentials for `registry` from the pod's imagePullSecrets.
    async fn pull_auth(&self, registry: &str) -> Option<(String, String)> {
        let ns = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        for s in self.pod["spec"]["imagePullSecrets"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(name) = s["name"].as_str() else {
                continue;
            };
            let Ok(o) = self.agent.object("secrets", ns, name).await else {
                tracing::warn!(secret = %name, "imagePullSecret not found");
                continue;
            };
            for (k, v) in data_of("secrets", &o) {
                if k == ".dockerconfigjson" || k == ".dockercfg" {
                    let mut cfg: Value = serde_json::from_str(&v).unwrap_or_default();
                    if k == ".dockercfg" {
                        cfg = json!({"auths": cfg});
                    }
                    if let Some(a) = registry::docker_auth(&cfg, registry) {
                        return Some(a);
                    }
                }
            }
        }
        None
    }

    /// The pod's own network, made by the first of its OCI containers to start; `None`
    /// with `hostNetwork: true` or where the node has no pod network.
    async fn network(&self) -> Result<Option<Attached>, (String, String)> {
        let Some(pn) = self.agent.net.clone() else {
            return Ok(None);
        };
        if self.pod["spec"]["hostNetwork"] == true {
            return Ok(None);
        }
        let uid = self.uid.clone();
        let marks = self.agent.dir.join("net");
        let (services, pod) = (self.agent.services.clone(), self.pod.clone());
        self.net
            .get_or_try_init(|| async move {
                let u = uid.clone();
                let a = tokio::task::spawn_blocking(move || {
                    // Marked first, so a crash between the two still finds it at start.
                    std::fs::create_dir_all(&marks)
                        .and_then(|()| std::fs::write(marks.join(&u), ""))
                        .map_err(|e| format!("{}: {e}", marks.display()))?;
                    pn.attach(&u)
                })
                .await
                .map_err(|e| e.to_string())??;
                // The pod's hostPorts lead to it from the node's addresses until it ends.
                let wanted = host_ports(&pod);
                if let Some(s) = services.filter(|_| !wanted.is_empty()) {
                    let at = |(port, proto, pod, to): (u16, Proto, String, u16)| HostPort {
                        port,
                        proto,
                        pod,
                        to: std::net::SocketAddr::from((a.ip, to)),
                    };
                    s.set_host_ports(&uid, wanted.into_iter().map(at).collect());
                }
                Ok::<_, String>(a)
            })
            .await
            .cloned()
            .map(Some)
            .map_err(|e| {
                (
                    "CreateContainerError".to_string(),
                    format!("setting up the pod's network: {e}"),
                )
            })
    }

    /// `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` for the pod's containers, whose
    /// address is `ip`.
    fn pod_files(&self, ip: &str) -> Result<Vec<(PathBuf, String)>, String> {
        let dir = self.agent.dir.join("pods").join(&self.uid).join("etc");
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(io)?;
        let host = self.pod["spec"]["hostname"]
            .as_str()
            .or(self.pod["metadata"]["name"].as_str())
            .unwrap_or("pod");
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if !ip.is_empty() {
            hosts.push_str(&format!("{ip}\t{host}\n"));
        }
        for a in self.pod["spec"]["hostAliases"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let names: Vec<&str> = a["hostnames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if let Some(ip) = a["ip"].as_str() {
                hosts.push_str(&format!("{ip}\t{}\n", names.join(" ")));
            }
        }
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let cluster = self.agent.services.as_ref().map(|s| s.config());
        let resolv = pod_resolv(&self.pod, &host_resolv, cluster);
        let files = [
            ("hosts", hosts),
            ("hostname", format!("{host}\n")),
            ("resolv.conf", resolv),
        ];
        let mut out = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io)?;
            out.push((p, format!("/etc/{name}")));
        }
        Ok(out)
    }

    /// Counters of this container's run, named as `kubectl top` shows them.
    fn run_usage(&self, meter: usage::Meter) -> Arc<usage::Run> {
        let on = self.on();
        Arc::new(usage::Run::new(&on.ns, &on.pod, &on.container, meter))
    }

    /// Make this run the one `kubectl attach` joins, until the guard is dropped (the run and
    /// its output have ended): then attached clients see the end.
    fn live(&self, live: Live) -> LiveGuard {
        let id = Containers::id(&self.uid, self.name());
        let log = live.log.clone();
        if let Ok(mut l) = self.agent.live.lock() {
            l.insert(id.clone(), live);
        }
        LiveGuard {
            agent: self.agent.clone(),
            id,
            log,
        }
    }

    /// Run an OCI container until it exits or `stop` (then its stop signal, and SIGKILL
    /// after the grace period).
    async fn run_oci(&self, o: OciRun, stop: Arc<Stop>) -> Outcome {
        let Ok(oci) = &self.agent.oci else {
            return Outcome {
                exit_code: 128,
                error: Some("this node cannot run OCI containers".into()),
                ..Outcome::default()
            };
        };
        let stdin = self.spec["stdin"].as_bool() == Some(true);
        let (term, slave) = if self.spec["tty"].as_bool() == Some(true) {
            match Terminal::open() {
                Ok((t, s)) => (Some(Arc::new(t)), Some(s)),
                Err(e) => {
                    return Outcome {
                        exit_code: 128,
                        error: Some(format!("a terminal for the container: {e}")),
                        ..Outcome::default()
                    }
                }
            }
        } else {
            (None, None)
        };
        let mut r = match oci
            .containers
            .start(&o.id, &o.spec, &o.image.rootfs, stdin, slave)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome {
                    exit_code: 128,
                    error: Some(e.to_string()),
                    ..Outcome::default()
                }
            }
        };
        oci.store.touch(&o.image);
        if let Ok(mut u) = oci.in_use.lock() {
            u.insert(o.id.clone(), o.image.digest.clone());
        }
        let mut pumps = Vec::new();
        if let Some(t) = term.clone() {
            // A terminal has one output stream.
            let w = o.log.clone();
            pumps.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 32 << 10];
                while let Ok(n @ 1..) = t.read(&mut buf).await {
                    if w.write("stdout", &buf[..n]).is_err() {
                        return;
                    }
                }
            }));
        }
        if let Some(mut out) = r.stdout.take() {
            let mut w = o.log.stream("stdout");
            pumps.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut out, &mut w).await;
            }));
        }
        if let Some(mut err) = r.stderr.take() {
            let mut w = o.log.stream("stderr");
            pumps.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut err, &mut w).await;
            }));
        }
        // The container's stdin FIFO is joinable only once the helper has opened it: input
        // written and closed (`stdinOnce`) before that would go with the pipe, and leave
        // the helper waiting for a writer. The container has started by then.
        if r.stdin.is_some() {
            tokio::select! {
                _ = oci.containers.started(&o.id) => {}
                () = stop.wait() => {}
            }
        }
        let (interrupt, mut interrupted) = mpsc::unbounded_channel::<()>();
        let live = self.live(Live {
            interrupt: term.is_some().then_some(interrupt),
            log: o.log.clone(),
            stdin: match term {
                Some(t) => Some(Input::Terminal(t)),
                None => r
                    .stdin
                    .take()
                    .map(|w| Input::Pipe(Arc::new(tokio::sync::Mutex::new(Some(w))))),
            },
            once: self.spec["stdinOnce"].as_bool() == Some(true),
            usage: self.run_usage(usage::Meter::Cgroup(format!(
                "{}/{}",
                pod_cgroup(&self.uid),
                self.name()
            ))),
        });
        let ended = loop {
            tokio::select! {
                out = r.wait() => break Some(out),
                () = stop.wait() => break None,
                Some(()) = interrupted.recv() => r.interrupt().await,
            }
        };
        let outcome = match ended {
            Some(out) => out,
            None => {
                r.signal(o.signal, false).await;
                let grace = stop.grace().unwrap_or(o.grace);
                match tokio::time::timeout(grace, r.wait()).await {
                    Ok(out) => out,
                    Err(_) => {
                        r.signal(9, true).await;
                        r.wait().await
                    }
                }
            }
        };
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
        }
        drop(live);
        if let Ok(mut u) = oci.in_use.lock() {
            u.remove(&o.id);
        }
        outcome
    }

    async fn env(&self) -> Result<Vec<(String, String)>, String> {
        let ns = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        // Service variables first: the container's own env and envFrom override them.
        let links = self.pod["spec"]["enableServiceLinks"].as_bool() != Some(false);
        let mut out: Vec<(String, String)> = match &self.agent.services {
            Some(s) => s.env(ns, links),
            None => Vec::new(),
        };
        fn set(out: &mut Vec<(String, String)>, k: String, v: String) {
            out.retain(|(kk, _)| *kk != k);
            out.push((k, v));
        }
        for from in self.spec["envFrom"].as_array().cloned().unwrap_or_default() {
            let prefix = from["prefix"].as_str().unwrap_or("");
            let (kind, r) = if from["configMapRef"].is_object() {
                ("configmaps", &from["configMapRef"])
            } else {
                ("secrets", &from["secretRef"])
            };
            let name = r["name"].as_str().unwrap_or("");
            match self.agent.object(kind, ns, name).await {
                Ok(o) => {
                    for (k, v) in data_of(kind, &o) {
                        set(&mut out, format!("{prefix}{k}"), v);
                    }
                }
                Err(_) if r["optional"].as_bool() == Some(true) => {}
                Err(e) => return Err(e),
            }
        }
        for e in self.spec["env"].as_array().cloned().unwrap_or_default() {
            let name = e["name"].as_str().unwrap_or("").to_string();
            if let Some(v) = e["value"].as_str() {
                // References to variables defined before this one, the kubelet's way.
                let v = outpost_oci_shim::spec::expand(v, &out);
                set(&mut out, name, v);
                continue;
            }
            let vf = &e["valueFrom"];
            let keyed = [
                ("configmaps", "configMapKeyRef"),
                ("secrets", "secretKeyRef"),
            ];
            if let Some((kind, r)) = keyed
                .iter()
                .find(|(_, k)| vf[*k].is_object())
                .map(|(kind, k)| (*kind, &vf[*k]))
            {
                let obj = r["name"].as_str().unwrap_or("");
                let key = r["key"].as_str().unwrap_or("");
                let optional = r["optional"].as_bool() == Some(true);
                match self.agent.object(kind, ns, obj).await {
                    Ok(o) => match data_of(kind, &o).into_iter().find(|(k, _)| k == key) {
                        Some((_, v)) => set(&mut out, name, v),
                        None if optional => {}
                        None => {
                            return Err(format!(
                                "couldn't find key {key} in {} {ns}/{obj}",
                                singular(kind)
                            ))
                        }
                    },
                    Err(_) if optional => {}
                    Err(e) => return Err(e),
                }
            } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                let v = self.field(path, false)?;
                set(&mut out, name, v);
            } else if vf["resourceFieldRef"].is_object() {
                let v = self
                    .resource_field(&vf["resourceFieldRef"])
                    .map_err(|e| format!("env {name}: {e}"))?;
                set(&mut out, name, v);
            }
        }
        Ok(out)
    }

    /// The value of a downward-API `resourceFieldRef`, as the kubelet gives it: a container's
    /// limit (the node's allocatable where it sets none) or request (0 where none), divided
    /// by `divisor` (1 by default, and where it is 0, as typed clients send it unset) and
    /// rounded up.
    fn resource_field(&self, r: &Value) -> Result<String, String> {
        let resource = r["resource"].as_str().unwrap_or("");
        let spec = &self.pod["spec"];
        let c = match r["containerName"].as_str().filter(|n| !n.is_empty()) {
            Some(n) => ["containers", "initContainers"]
                .iter()
                .flat_map(|k| spec[k].as_array().into_iter().flatten())
                .find(|c| c["name"] == n)
                .ok_or_else(|| format!("resourceFieldRef: the pod has no container {n:?}"))?,
            None => &self.spec,
        };
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let (kind, name) = resource.split_once('.').unwrap_or(("", ""));
        let set = text(&c["resources"][kind][name]);
        let divisor = text(&r["divisor"])
            .filter(|d| {
                outpost_api::quantity::Quantity::parse(d).and_then(|q| q.milli()) != Some(0)
            })
            .unwrap_or_else(|| "1".into());
        let bad = || format!("resourceFieldRef: unsupported resource {resource:?}");
        let (have, per) = match (kind, name) {
            ("limits" | "requests", "cpu") => {
                let node = (kind == "limits").then(|| node_cpus() as u64 * 1000);
                let have = set.as_deref().and_then(outpost_api::quantity::millicores);
                (
                    have.or(node).unwrap_or(0),
                    outpost_api::quantity::millicores(&divisor),
                )
            }
            ("limits" | "requests", "memory" | "ephemeral-storage") => {
                let node = match (kind, name) {
                    ("limits", "memory") => Some(node_memory()),
                    ("limits", _) => Some(disk_bytes(&self.agent.dir)),
                    _ => None,
                };
                let have = set.as_deref().and_then(outpost_api::quantity::bytes);
                (
                    have.or(node).unwrap_or(0),
                    outpost_api::quantity::bytes(&divisor),
                )
            }
            _ => return Err(bad()),
        };
        let per = per
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("resourceFieldRef: bad divisor {divisor:?}"))?;
        Ok(have.div_ceil(per).to_string())
    }

    /// The value of a downward-API `fieldRef`; `maps` allows the whole label and annotation
    /// maps (a volume's files may hold them, an env var may not).
    fn field(&self, path: &str, maps: bool) -> Result<String, String> {
        let m = &self.pod["metadata"];
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let ip = || self.agent.host_ip();
        Ok(match path {
            "metadata.name" => s(&m["name"]),
            "metadata.namespace" => m["namespace"].as_str().unwrap_or("default").to_string(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.agent.node.clone(),
            "spec.serviceAccountName" => {
                outpost_api::service_account(&self.pod["spec"]).to_string()
            }
            "status.hostIP" => ip(),
            "status.podIP" => self.net.get().map_or_else(ip, |a| a.ip.to_string()),
            "metadata.labels" | "metadata.annotations" if maps => {
                // As the kubelet writes them: `key="value"` lines, sorted by key.
                let map = m[&path["metadata.".len()..]].as_object();
                let mut lines: Vec<String> = map
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", Value::String(s(v))))
                    .collect();
                lines.sort();
                lines.join("\n")
            }
            p => {
                let label = p
                    .strip_prefix("metadata.labels['")
                    .map(|l| ("labels", l))
                    .or_else(|| {
                        p.strip_prefix("metadata.annotations['")
                            .map(|a| ("annotations", a))
                    });
                match label.and_then(|(k, key)| Some((k, key.strip_suffix("']")?))) {
                    Some((k, key)) => s(&m[k][key]),
                    None => return Err(format!("unsupported fieldRef {p:?}")),
                }
            }
        })
    }

    /// The pod's volumes this container mounts, as preopened directories.
    async fn volumes(&self) -> Result<Vec<(PathBuf, String, bool)>, String> {
        let ns = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let vols = self.pod["spec"]["volumes"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let base = self.agent.dir.join("pods").join(&self.uid).join("volumes");
        let mut out = Vec::new();
        for m in self.spec["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or("");
            let guest = m["mountPath"].as_str().unwrap_or("").to_string();
            if m["subPath"].as_str().is_some_and(|s| !s.is_empty()) {
                return Err(format!(
                    "volume mount {vname}: subPath is not supported for Wasm pods"
                ));
            }
            let v = vols
                .iter()
                .find(|v| v["name"] == vname)
                .ok_or_else(|| format!("volume mount {vname}: no such volume in the pod"))?;
            let ro = m["readOnly"].as_bool() == Some(true);
            let dir = base.join(vname);
            let io = |e: std::io::Error| format!("volume {vname}: {e}");
            if v["emptyDir"].is_object() {
                // World-writable as the kubelet makes it: a container may run as any user.
                host_dir(&dir, true, true).map_err(|e| format!("volume {vname}: {e}"))?;
                out.push((dir, guest, !ro));
            } else if let Some(p) = v["hostPath"]["path"].as_str() {
                let p = PathBuf::from(p);
                let create = v["hostPath"]["type"].as_str() == Some("DirectoryOrCreate");
                host_dir(&p, create, false).map_err(|e| format!("volume {vname}: hostPath {e}"))?;
                out.push((p, guest, !ro));
            } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                let p = self
                    .agent
                    .claim_dir(ns, claim)
                    .await
                    .map_err(|e| format!("volume {vname}: {e}"))?;
                let ro = ro || v["persistentVolumeClaim"]["readOnly"] == true;
                out.push((p, guest, !ro));
            } else if ["configMap", "secret", "downwardAPI", "projected"]
                .iter()
                .any(|k| v[*k].is_object())
            {
                let dir = self.agent.volatile.join(&self.uid).join(vname);
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).map_err(io)?;
                let sources = match v["projected"]["sources"].as_array() {
                    Some(s) => s.as_slice(),
                    None => std::slice::from_ref(v),
                };
                for src in sources {
                    self.project(&dir, src, vname).await?;
                }
                out.push((dir, guest, false));
            } else {
                return Err(format!(
                    "volume {vname}: only emptyDir, hostPath, configMap, secret, downwardAPI, projected and persistentVolumeClaim volumes are supported"
                ));
            }
        }
        Ok(out)
    }
    /// The configMap, secret, downwardAPI and projected volumes this container mounts that
    /// can change under it: those without a service-account token (whose files are not
    /// asked for again, the token being valid for a year), by name.
    fn refreshable(&self) -> Vec<(String, Value)> {
        let vols = self.pod["spec"]["volumes"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        self.spec["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| vols.iter().find(|v| v["name"] == m["name"]))
            .filter(|v| {
                ["configMap", "secret", "projected"]
                    .iter()
                    .any(|k| v[*k].is_object())
                    && !v["projected"]["sources"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["serviceAccountToken"].is_object()))
            })
            .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone()))
            .collect()
    }

    fn refreshes(&self) -> bool {
        !self.refreshable().is_empty()
    }

    /// Bring the files of this container's changeable volumes up to what their objects
    /// hold now, as the kubelet does every sync: each volume is written afresh beside the
    /// one in use, and only files that differ are replaced (by rename, so a reader sees
    /// the old file or the new one) or removed. A volume whose object cannot be read keeps
    /// its files.
    async fn refresh_volumes(&self) {
        for (vname, v) in self.refreshable() {
            let dir = self.agent.volatile.join(&self.uid).join(&vname);
            let fresh = self
                .agent
                .volatile
                .join(&self.uid)
                .join(format!(".{vname}.sync"));
            let _ = std::fs::remove_dir_all(&fresh);
            if std::fs::create_dir_all(&fresh).is_err() {
                continue;
            }
            let sources = match v["projected"]["sources"].as_array() {
                Some(s) => s.clone(),
                None => vec![v.clone()],
            };
            let mut ok = true;
            for src in &sources {
                if let Err(e) = self.project(&fresh, src, &vname).await {
                    tracing::debug!(volume = %vname, error = %e, "volume not refreshed");
                    ok = false;
                    break;
                }
            }
            if ok {
                match sync_files(&fresh, &dir) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(pod = %self.pod["metadata"]["name"], volume = %vname, files = n, "volume updated")
                    }
                    Err(e) => tracing::warn!(volume = %vname, error = %e, "updating a volume"),
                }
            }
            let _ = std::fs::remove_dir_all(&fresh);
        }
    }

    /// Write the files of one source of a configMap, secret, downwardAPI or projected
    /// volume `vname` into `dir`.
    async fn project(&self, dir: &Path, src: &Value, vname: &str) -> Result<(), String> {
        let ns = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let mut files: Vec<(String, String)> = Vec::new();
        if src["configMap"].is_object() || src["secret"].is_object() {
            let (kind, r) = if src["configMap"].is_object() {
                ("configmaps", &src["configMap"])
            } else {
                ("secrets", &src["secret"])
            };
            // A secret volume names its secret `secretName`; a projected source, `name`.
            let name = r["name"]
                .as_str()
                .or(r["secretName"].as_str())
                .unwrap_or("");
            let data = match self.agent.object(kind, ns, name).await {
                Ok(o) => data_of(kind, &o),
                Err(_) if r["optional"].as_bool() == Some(true) => Vec::new(),
                Err(e) => return Err(format!("volume {vname}: {e}")),
            };
            let items = r["items"].as_array().map_or(&[][..], Vec::as_slice);
            for (k, val) in data {
                let path = if items.is_empty() {
                    Some(k.clone())
                } else {
                    items
                        .iter()
                        .find(|i| i["key"] == k.as_str())
                        .and_then(|i| i["path"].as_str().map(String::from))
                };
                if let Some(p) = path {
                    files.push((p, val));
                }
            }
        } else if src["downwardAPI"].is_object() {
            for item in src["downwardAPI"]["items"].as_array().into_iter().flatten() {
                let path = item["path"].as_str().unwrap_or("").to_string();
                let value = match item["fieldRef"]["fieldPath"].as_str() {
                    Some(f) => self.field(f, true),
                    None if item["resourceFieldRef"].is_object() => {
                        self.resource_field(&item["resourceFieldRef"])
                    }
                    None => Err(format!(
                        "downwardAPI item {path:?} has neither fieldRef nor resourceFieldRef"
                    )),
                }
                .map_err(|e| format!("volume {vname}: {e}"))?;
                files.push((path, value));
            }
        } else if src["serviceAccountToken"].is_object() {
            let t = &src["serviceAccountToken"];
            let path = t["path"].as_str().unwrap_or("token").to_string();
            let token = self.token(t, vname, &path).await?;
            files.push((path, token));
        } else {
            return Err(format!(
                "volume {vname}: a projected volume takes configMap, secret, downwardAPI and serviceAccountToken sources"
            ));
        }
        let io = |e: std::io::Error| format!("volume {vname}: {e}");
        for (path, val) in files {
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|s| s == "..") {
                continue;
            }
            // `dir` is made: only a nested path needs its directories.
            if let Some((parent, _)) = path.rsplit_once('/') {
                std::fs::create_dir_all(dir.join(parent)).map_err(io)?;
            }
            std::fs::write(dir.join(path), val).map_err(io)?;
        }
        Ok(())
    }

    /// A token of the pod's service account for source `t` of volume `vname`.
    async fn token(&self, t: &Value, vname: &str, path: &str) -> Result<String, String> {
        self.agent
            .token(&self.pod, &self.uid, t, vname, path)
            .await
            .map_err(|e| format!("volume {vname}: {e}"))
    }
}

/// The cache's kind for the service-account tokens of pods (named `pod-uid/volume/path`).
const TOKENS: &str = "tokens";
/// The cache's kind for containers that ended for good, by pod uid and container name.
const ENDED: &str = "ended";
/// The name in [`ENDED`] that marks a pod failed past its `activeDeadlineSeconds`, one no
/// container can have.
const PAST_DEADLINE: &str = "-";

/// Make sure directory `p` is there: made if `create` (world-writable if `open`, for
/// containers that may run as any user), else an error if it is missing.
fn host_dir(p: &Path, create: bool, open: bool) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", p.display());
    if !create {
        if p.exists() {
            return Ok(());
        }
        return Err(format!("{} does not exist", p.display()));
    }
    std::fs::create_dir_all(p).map_err(io)?;
    if open {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(io)?;
    }
    Ok(())
}

/// The key/value pairs of a config map (data) or secret (data, base64-decoded).
fn data_of(kind: &str, o: &Value) -> Vec<(String, String)> {
    let Some(d) = o["data"].as_object() else {
        return Vec::new();
    };
    d.iter()
        .filter_map(|(k, v)| {
            let s = v.as_str()?;
            let s = if kind == "secrets" {
                String::from_utf8(crate::base64_decode(s)?).ok()?
            } else {
                s.to_string()
            };
            Some((k.clone(), s))
        })
        .collect()
}

/// A container's probes, parsed once: its spec cannot change.
#[derive(Debug, Clone, Default)]
struct Probes {
    startup: Option<Probe>,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    /// Lifecycle hooks, which reach the container as probes do.
    post_start: Option<probe::Hook>,
    pre_stop: Option<probe::Hook>,
}

impl Probes {
    fn each(&mut self) -> impl Iterator<Item = &mut Probe> {
        let hooks = probe::hook_probes([&mut self.post_start, &mut self.pre_stop].into_iter());
        [&mut self.startup, &mut self.liveness, &mut self.readiness]
            .into_iter()
            .flatten()
            .chain(hooks)
    }

    /// Probe the container at `host` instead of the node's loopback.
    fn at(&mut self, host: std::net::IpAddr) {
        self.each().for_each(|p| p.host = host);
    }

    /// Run exec probes' commands through `e`.
    fn exec_in(&mut self, e: probe::ExecIn) {
        self.each().for_each(|p| p.exec = Some(e.clone()));
    }

    /// The key of a probe that runs a command, if any does.
    fn execs(&self) -> Option<&'static str> {
        [
            ("startupProbe", &self.startup),
            ("livenessProbe", &self.liveness),
            ("readinessProbe", &self.readiness),
        ]
        .into_iter()
        .find(|(_, p)| {
            p.as_ref()
                .is_some_and(|p| matches!(p.check, probe::Check::Exec { .. }))
        })
        .map(|(k, _)| k)
        .or_else(|| {
            [
                ("lifecycle.postStart", &self.post_start),
                ("lifecycle.preStop", &self.pre_stop),
            ]
            .into_iter()
            .find(|(_, h)| h.as_ref().is_some_and(probe::Hook::runs_a_command))
            .map(|(k, _)| k)
        })
    }

    fn of(spec: &Value) -> Result<Probes, String> {
        Ok(Probes {
            startup: probe::parse(spec, "startupProbe")?,
            liveness: probe::parse(spec, "livenessProbe")?,
            readiness: probe::parse(spec, "readinessProbe")?,
            post_start: probe::hook(spec, "postStart")?,
            pre_stop: probe::hook(spec, "preStop")?,
        })
    }
}

/// Exec probes' commands run in OCI container `id` through the `oci-exec` helper.
fn exec_in(containers: Containers, id: String) -> probe::ExecIn {
    probe::ExecIn(Arc::new(move |cmd: Vec<String>| -> probe::Ran {
        let (containers, id) = (containers.clone(), id.clone());
        Box::pin(async move {
            // Dropped when the probe's time is up, which kills the command.
            let mut exec = containers
                .exec(&id, &cmd, None)
                .await
                .map_err(|e| e.to_string())?;
            drop(exec.0.stdin.take());
            let (mut out, mut err) = (Vec::new(), Vec::new());
            if let (Some(o), Some(e)) = (exec.0.stdout.as_mut(), exec.0.stderr.as_mut()) {
                use tokio::io::AsyncReadExt;
                let _ = tokio::join!(o.read_to_end(&mut out), e.read_to_end(&mut err));
            }
            let status = exec.0.wait().await.map_err(|e| e.to_string())?;
            out.extend_from_slice(&err);
            Ok((
                status.code().unwrap_or(128),
                String::from_utf8_lossy(&out).into_owned(),
            ))
        })
    }))
}

/// What the probes of one run may change: the container's started and ready flags.
struct Probing {
    on: On,
    events: mpsc::UnboundedSender<Event>,
    containers: Arc<Mutex<Vec<Container>>>,
    index: usize,
    changed: Arc<watch::Sender<u64>>,
    what: String,
}

impl Probing {
    fn unhealthy(&self, message: String) {
        let _ = self
            .events
            .send(Event::new(self.on.clone(), true, "Unhealthy", message));
    }

    fn failed_hook(&self, message: String) {
        let _ = self.events.send(Event::new(
            self.on.clone(),
            true,
            "FailedPostStartHook",
            message,
        ));
    }

    fn killing(&self, message: String) {
        let _ = self
            .events
            .send(Event::new(self.on.clone(), false, "Killing", message));
    }

    fn set(&self, f: impl FnOnce(&mut Container) -> bool) {
        let changed = self
            .containers
            .lock()
            .ok()
            .and_then(|mut c| c.get_mut(self.index).map(f))
            .unwrap_or(false);
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Probe one run as the kubelet does: the startup probe first; then liveness and
    /// readiness side by side. Returns why the run was stopped, if a probe stopped it.
    async fn watch(self, probes: Probes, run: Arc<Stop>) -> Option<String> {
        // As the kubelet: every failed try is an Unhealthy event (counted as it repeats).
        let me = &self;
        let failed = |kind: &str| {
            let kind = kind.to_string();
            move |why: &str| me.unhealthy(format!("{kind} probe failed: {why}"))
        };
        if let Some(p) = &probes.startup {
            if let Err(why) = until(p, true, failed("Startup")).await {
                tracing::info!(container = %self.what, %why, "startup probe failed; killing");
                self.killing(format!(
                    "Container {} failed startup probe, will be restarted",
                    self.on.container
                ));
                run.stop();
                return Some(format!("Startup probe failed: {why}"));
            }
            let ready = probes.readiness.is_none();
            self.set(|c| {
                c.started = true;
                c.ready = ready;
                true
            });
        }
        let live = async {
            match &probes.liveness {
                Some(p) => until(p, false, failed("Liveness"))
                    .await
                    .err()
                    .unwrap_or_default(),
                None => std::future::pending().await,
            }
        };
        let ready = async {
            let Some(p) = &probes.readiness else {
                return std::future::pending().await;
            };
            tokio::time::sleep(p.delay).await;
            let mut tally = Tally::default();
            let failed = failed("Readiness");
            loop {
                let r = p.try_once().await;
                if let Err(why) = &r {
                    tracing::debug!(container = %self.what, %why, "readiness probe failed");
                    failed(why);
                }
                if let Some(v) = tally.record(p, r.is_ok()) {
                    self.set(|c| std::mem::replace(&mut c.ready, v) != v);
                }
                tokio::time::sleep(p.period).await;
            }
        };
        tokio::select! {
            why = live => {
                tracing::info!(container = %self.what, %why, "liveness probe failed; restarting");
                self.killing(format!(
                    "Container {} failed liveness probe, will be restarted",
                    self.on.container
                ));
                run.stop();
                Some(format!("Liveness probe failed: {why}"))
            }
            () = ready => None,
        }
    }
}

/// Try `p` every period after its delay until it passes (`Ok`) when `pass` is true, or
/// until it fails its threshold (`Err` with the last failure): the startup probe waits
/// for a pass, then returns; the liveness probe runs until it fails.
async fn until(p: &Probe, pass: bool, failed: impl Fn(&str)) -> Result<(), String> {
    tokio::time::sleep(p.delay).await;
    let mut tally = Tally::default();
    loop {
        let r = p.try_once().await;
        if let Err(why) = &r {
            failed(why);
        }
        match tally.record(p, r.is_ok()) {
            Some(true) if pass => return Ok(()),
            Some(false) => return Err(r.err().unwrap_or_default()),
            _ => {}
        }
        tokio::time::sleep(p.period).await;
    }
}

/// Events waiting for the link, at most.
const MAX_EVENTS: usize = 1000;

/// How long a new pod's first status waits for its containers to change state.
const QUIET_START: Duration = Duration::from_millis(50);

/// The container an event is about.
#[derive(Debug, Clone)]
struct On {
    ns: String,
    pod: String,
    uid: String,
    container: String,
}

/// An event as the kubelet records one.
#[derive(Debug)]
struct Event {
    on: On,
    warning: bool,
    reason: &'static str,
    message: String,
    at: String,
    /// When it first happened and how many times, for events that came again before they
    /// were sent (an agent offline for a while).
    first: String,
    count: u64,
}

impl Event {
    fn new(on: On, warning: bool, reason: &'static str, message: String) -> Event {
        let at = now();
        Event {
            on,
            warning,
            reason,
            message,
            first: at.clone(),
            at,
            count: 1,
        }
    }

    /// What makes two events the same, told as one with a count (as client-go's event
    /// recorder does: the same object, container, reason, message and type).
    fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}",
            self.on.uid, self.on.container, self.reason, self.warning, self.on.ns, self.message
        )
    }

    fn json(&self, node: &str, name: &str, count: u64) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": self.on.ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": self.on.ns,
                "name": self.on.pod, "uid": self.on.uid,
                "fieldPath": format!("spec.containers{{{}}}", self.on.container)},
            "reason": self.reason, "message": self.message,
            "type": if self.warning { "Warning" } else { "Normal" },
            "source": {"component": "kubelet", "host": node},
            "reportingComponent": "kubelet", "reportingInstance": node,
            "firstTimestamp": self.first, "lastTimestamp": self.at, "count": count,
        })
    }
}

/// An event already recorded: its name and count, to count the same event again there.
struct Recorded {
    name: String,
    count: u64,
}

/// How many recorded events are remembered for counting (client-go keeps as many).
const RECORDED: usize = 4096;

/// Whether metadata key `k` is kept by [`kept_meta`] (see [`crate::cache::EVERY_WRITE`]).
fn kept_key(k: &str) -> bool {
    !crate::cache::EVERY_WRITE.contains(&k)
}

/// Pod metadata `m` without what [`kept_key`] leaves out.
fn kept_meta(m: &Value) -> Value {
    match m.as_object() {
        Some(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| kept_key(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => m.clone(),
    }
}

/// Whether two pods' metadata are the same but for what every write of the pod changes.
fn same_meta(a: &Value, b: &Value) -> bool {
    let kept = |(k, _): &(&String, &Value)| kept_key(k);
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a.iter().filter(kept).eq(b.iter().filter(kept)),
        _ => a == b,
    }
}

/// Fold events of `batch` that are the same (see [`Event::key`]) into the first of them:
/// its count grows, its time becomes the last one's.
fn fold(batch: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(batch.len());
    let mut at: HashMap<String, usize> = HashMap::new();
    for e in batch {
        match at.get(&e.key()) {
            Some(&i) => {
                out[i].count += e.count;
                out[i].at = e.at;
            }
            None => {
                at.insert(e.key(), out.len());
                out.push(e);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn one_holder_per_key_and_no_thread_for_those_waiting() {
        let gates = Mutex::default();
        let a = turn(&gates, "m").await;
        // Another key is not held up.
        let b = turn(&gates, "n").await;
        assert!(a.is_some() && b.is_some());
        // The same key waits, on this task, until its holder is done.
        let mut waiting = Box::pin(turn(&gates, "m"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err()
        );
        drop(a);
        assert!(waiting.await.is_some());
        drop(b);
        // The gates no one holds or waits for go when the next one is made.
        let _c = turn(&gates, "o").await;
        assert_eq!(gates.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_status_echo_has_the_same_metadata() {
        let a = json!({"name": "p", "labels": {"app": "x"}, "resourceVersion": "5",
            "managedFields": [{"manager": "kubectl"}]});
        let echo = json!({"name": "p", "labels": {"app": "x"}, "resourceVersion": "9",
            "managedFields": [{"manager": "kubectl"}, {"manager": "outpost-node"}]});
        assert!(same_meta(&a, &echo));
        assert!(same_meta(&kept_meta(&a), &echo));
        assert!(kept_meta(&a).get("managedFields").is_none());
        let relabeled = json!({"name": "p", "labels": {"app": "y"}, "resourceVersion": "9"});
        assert!(!same_meta(&a, &relabeled));
        let deleting = json!({"name": "p", "labels": {"app": "x"},
            "deletionTimestamp": "2026-12-06T10:00:00Z"});
        assert!(!same_meta(&a, &deleting));
    }

    #[test]
    fn events_go_at_the_limit_after_a_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(EventLimit {
            qps: 50.0,
            burst: 100,
        });
        assert_eq!(b.take(1000, t0), 100, "the burst goes at once");
        assert_eq!(b.take(900, t0), 0);
        let w = b.wait(t0);
        assert!(w > Duration::from_millis(15) && w <= Duration::from_millis(20));
        assert_eq!(b.wait(t0 + w + Duration::from_millis(1)), Duration::ZERO);
        assert_eq!(
            b.take(900, t0 + Duration::from_millis(1010)),
            50,
            "then 50 a second"
        );
        // A quiet spell fills the bucket up to the burst, no further.
        assert_eq!(b.take(1000, t0 + Duration::from_secs(60)), 100);
        let mut free = Bucket::new(EventLimit { qps: 0.0, burst: 0 });
        assert_eq!(free.take(5000, t0), 5000, "0 is no limit");
        assert_eq!(free.wait(t0), Duration::ZERO);
    }

    #[test]
    fn pods_get_cluster_dns_as_their_dns_policy_says() {
        let c = services::Config::default();
        let host = "nameserver 192.168.1.1\nsearch lan\noptions edns0\n";
        let pod = |spec: Value| json!({"metadata": {"namespace": "shop"}, "spec": spec});
        let first = pod_resolv(&pod(json!({})), host, Some(&c));
        assert_eq!(
            first,
            "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        // Without cluster DNS on the node, or for hostNetwork and Default pods: the node's.
        assert_eq!(
            pod_resolv(&pod(json!({})), host, None),
            "nameserver 192.168.1.1\nsearch lan\noptions edns0\n"
        );
        assert!(
            pod_resolv(&pod(json!({"hostNetwork": true})), host, Some(&c))
                .starts_with("nameserver 192.168.1.1")
        );
        assert!(
            pod_resolv(&pod(json!({"dnsPolicy": "Default"})), host, Some(&c))
                .starts_with("nameserver 192.168.1.1")
        );
        assert!(pod_resolv(
            &pod(json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"})),
            host,
            Some(&c)
        )
        .starts_with("nameserver 10.96.0.10"));
        let none = pod_resolv(
            &pod(
                json!({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.b"],
                         "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}}),
            ),
            host,
            Some(&c),
        );
        assert_eq!(
            none,
            "nameserver 1.1.1.1\nsearch a.b\noptions ndots:2 rotate\n"
        );
        let added = pod_resolv(
            &pod(json!({"dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}})),
            host,
            Some(&c),
        );
        assert!(added.ends_with("options ndots:1\n"), "{added}");
    }

    #[test]
    fn port_forward_reaches_declared_ports_or_the_http_default() {
        let spec = json!({"containers": [
            {"name": "a", "ports": [{"containerPort": 9000}, {"containerPort": 80}]},
            {"name": "b"},
        ]});
        assert_eq!(forward_ports(&spec), vec![80, 8080, 9000]);
        let spec = json!({"containers": [{"name": "a", "ports": [{"containerPort": 70000}]}]});
        assert_eq!(forward_ports(&spec), Vec::<u16>::new());
    }
}
