//! Runs Wasm workloads for the node agent. It owns the one wasmtime `Engine` of a node
//! (pooling allocator, epoch interruption, async support), the compiled programs (cached by
//! digest), and the running of WASI commands, preview 1 modules and preview 2 components
//! (`wasi:cli/run`), and of `wasi:http/incoming-handler` components served over HTTP on the
//! container's port with one fresh instance per request (see [`http`]): args, env,
//! preopened directories, stdout and stderr to rotated CRI log files ([`log`]), a memory
//! limit enforced by a resource limiter, a CPU limit enforced at epoch deadlines, and a
//! [`Stop`] signal, and what each guest uses ([`Usage`], for `kubectl top`). Guests run as tokio tasks: a guest waiting in a host call (a sleep) holds
//! no thread and is stopped as promptly as a busy one. It reports what the guest did as an
//! [`Exit`] that the agent turns into a container state the way the kubelet would.

mod http;
pub mod log;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

pub use wasmtime::component::Component;
use wasmtime::component::{self, ResourceTable};
pub use wasmtime::Module;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig, ResourceLimiter,
    Store, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How often the epoch advances: the granularity of CPU throttling and of stopping a guest.
pub const TICK: Duration = Duration::from_millis(10);

/// Instances the pooling allocator keeps slots for; one per running container.
const SLOTS: u32 = 256;

/// Largest linear memory any guest may have, whatever its limit says.
const MAX_MEMORY: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a Wasm module this runtime can compile.
    #[error("not a valid Wasm module: {0}")]
    Invalid(String),
    /// The module needs something the runtime does not provide.
    #[error("module imports what Outpost does not provide: {0}")]
    Unsupported(String),
    /// The module has no `_start` (it is a library, not a command).
    #[error("module is not a WASI command: {0}")]
    NotCommand(String),
    /// This agent was built without a compiler and the module has no artifact for it.
    #[error("this node agent has no Wasm compiler; it runs modules the control plane compiled for it ahead of time")]
    NoCompiler,
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It returned from `_start` (code 0) or called `proc_exit`.
    Code(i32),
    /// It asked for more memory than its limit.
    OutOfMemory { limit: u64 },
    /// It was stopped from outside.
    Stopped,
    /// It trapped.
    Trap(String),
}

impl Exit {
    /// The exit code the kubelet would report.
    pub fn code(&self) -> i32 {
        match self {
            Exit::Code(c) => *c,
            Exit::OutOfMemory { .. } => 137,
            Exit::Stopped => 143,
            // As a native program that aborts (SIGABRT) would.
            Exit::Trap(_) => 134,
        }
    }

    /// The container-state reason the kubelet would report.
    pub fn reason(&self) -> &'static str {
        match self {
            Exit::Code(0) => "Completed",
            Exit::OutOfMemory { .. } => "OOMKilled",
            _ => "Error",
        }
    }
}

/// Host names a guest's outgoing HTTP requests may use besides the node's own resolver's
/// (cluster DNS names, resolved from the node's service table): the address to connect to.
pub type Resolve = Arc<dyn Fn(&str) -> Option<std::net::IpAddr> + Send + Sync>;

/// What to run and with which limits.
#[derive(Clone, Default)]
pub struct Command {
    /// argv, including argv[0].
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Host directories preopened in the guest: (host, guest path, writable).
    pub dirs: Vec<(PathBuf, String, bool)>,
    /// Where stdout and stderr go, as CRI log records; discarded when unset.
    pub log: Option<Arc<log::Log>>,
    /// What the guest reads as stdin (`kubectl attach` writes the other end), taken by the
    /// first instance; without it stdin is empty.
    pub stdin: Option<Input>,
    /// Bytes of linear memory the guest may hold in total.
    pub memory: Option<u64>,
    /// CPU the guest may use, in thousandths of a core (`resources.limits.cpu`).
    pub millicores: Option<u64>,
    /// Where an HTTP component listens; [`DEFAULT_LISTEN`] when unset.
    pub listen: Option<SocketAddr>,
    /// Makes the listening socket where the pod's network is not the node's (a socket made
    /// in a network namespace stays in it); bound in the agent's own network when unset.
    pub bind: Option<Bind>,
    /// How long a stopped HTTP component may finish the requests in flight
    /// (`terminationGracePeriodSeconds`). A command has no signal to catch and stops at once.
    pub grace: Duration,
    /// Names for outgoing `wasi:http` requests (cluster Services); others go to the node's
    /// resolver.
    pub resolve: Option<Resolve>,
    /// Where the guest's CPU time and memory are counted, across all its instances.
    pub usage: Option<Arc<Usage>>,
}

/// What a container's guest uses: the CPU time its code ran (the time the executor spent
/// polling it, which with epoch yields is the guest's own computing and its host calls) and
/// the linear memory its live instances hold.
#[derive(Debug, Default)]
pub struct Usage {
    cpu_nanos: AtomicU64,
    memory: AtomicU64,
}

impl Usage {
    pub fn cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed))
    }

    /// Bytes of linear memory held now.
    pub fn memory(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }
}

/// `f`, with the time spent polling it added to `usage`.
async fn metered<F: std::future::Future>(f: F, usage: Option<Arc<Usage>>) -> F::Output {
    let Some(usage) = usage else {
        return f.await;
    };
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        let t = std::time::Instant::now();
        let r = f.as_mut().poll(cx);
        let spent = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        usage.cpu_nanos.fetch_add(spent, Ordering::Relaxed);
        r
    })
    .await
}

/// Makes a listening socket on an address, blocking while it does.
pub type Bind = Arc<dyn Fn(SocketAddr) -> std::io::Result<std::net::TcpListener> + Send + Sync>;

/// The read end of a pipe that becomes a guest's stdin.
pub type Input = Arc<std::sync::Mutex<Option<tokio::net::unix::pipe::Receiver>>>;

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("args", &self.args)
            .field("env", &self.env)
            .field("dirs", &self.dirs)
            .field("memory", &self.memory)
            .field("millicores", &self.millicores)
            .field("listen", &self.listen)
            .field("grace", &self.grace)
            .field("resolve", &self.resolve.is_some())
            .field("usage", &self.usage)
            .finish()
    }
}

/// Where an HTTP component listens when its container names no port (as `wasmtime serve`).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

/// Ends a running guest from outside, whatever it is doing.
pub struct Stop {
    flag: AtomicBool,
    notify: Notify,
    /// Seconds the run has to end once stopped, when the stop says (a deletion's grace
    /// period); `u64::MAX` when it does not.
    grace: AtomicU64,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            flag: AtomicBool::new(false),
            notify: Notify::new(),
            grace: AtomicU64::new(u64::MAX),
        }
    }
}

impl Stop {
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop::default())
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Stop, giving the run `grace` to end (instead of its own grace period).
    pub fn stop_within(&self, grace: Option<Duration>) {
        if let Some(g) = grace {
            self.grace.store(g.as_secs(), Ordering::Relaxed);
        }
        self.stop();
    }

    /// The grace period the stop gave, if it gave one.
    pub fn grace(&self) -> Option<Duration> {
        match self.grace.load(Ordering::Relaxed) {
            u64::MAX => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    pub fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Resolves once `stop` has been called.
    pub async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.stopped() {
                return;
            }
            n.await;
        }
    }
}

/// Compiled code: a core module (WASI preview 1), a command component (WASI preview 2), or
/// a component that exports `wasi:http/incoming-handler` and is served, not run.
#[derive(Clone)]
pub enum Program {
    Core(Module),
    Component(Component),
    Http(Component),
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Program::Core(_) => "Program::Core",
            Program::Component(_) => "Program::Component",
            Program::Http(_) => "Program::Http",
        })
    }
}

/// Whether `bytes` are a component rather than a core module (the layer in the preamble).
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[6..8] == [1, 0]
}

/// A component that exports `wasi:http/incoming-handler` is served; others are commands.
fn program(engine: &Engine, c: Component) -> Program {
    let serves = c
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("wasi:http/incoming-handler@"));
    if serves {
        Program::Http(c)
    } else {
        Program::Component(c)
    }
}

/// The engine settings a node's runtime and the control plane's compiler share: an artifact
/// loads only into an engine set up as the one that compiled it.
fn config() -> Config {
    let mut cfg = Config::new();
    cfg.epoch_interruption(true);
    cfg
}

/// The architecture names a node reports and the [`Compiler`] takes (Rust's, as
/// `std::env::consts::ARCH` spells them).
pub const ARCHES: [&str; 3] = ["x86_64", "aarch64", "riscv64"];

/// Compiles modules ahead of time for nodes of any architecture in [`ARCHES`] (the control
/// plane's side of [`Runtime::load`]): one engine per architecture, made on first use.
#[cfg(feature = "cross")]
#[derive(Default)]
pub struct Compiler {
    engines: Mutex<HashMap<String, Engine>>,
}

#[cfg(feature = "cross")]
impl Compiler {
    /// The artifact of `bytes` (a module or component) for Linux nodes of `arch`.
    pub fn compile(&self, arch: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        if !ARCHES.contains(&arch) {
            return Err(Error::Unsupported(format!(
                "no compiler for architecture {arch:?}; known: {}",
                ARCHES.join(", ")
            )));
        }
        let engine = {
            let mut engines = self.engines.lock().map_err(|_| Error::Io {
                what: "the compiler".into(),
                detail: "poisoned".into(),
            })?;
            match engines.get(arch) {
                Some(e) => e.clone(),
                None => {
                    let mut cfg = config();
                    // The host's own architecture keeps the host's CPU features, so the
                    // artifact is what a node here would compile; others get the baseline
                    // every CPU of the architecture has.
                    if arch != std::env::consts::ARCH {
                        cfg.target(&format!("{arch}-unknown-linux-gnu"))
                            .map_err(|e| Error::Unsupported(format!("{e:#}")))?;
                    }
                    let e = Engine::new(&cfg).map_err(|e| Error::Io {
                        what: format!("creating the {arch} compiler"),
                        detail: format!("{e:#}"),
                    })?;
                    engines.insert(arch.to_string(), e.clone());
                    e
                }
            }
        };
        let invalid = |e: wasmtime::Error| Error::Invalid(format!("{e:#}"));
        if is_component(bytes) {
            engine.precompile_component(bytes).map_err(invalid)
        } else {
            engine.precompile_module(bytes).map_err(invalid)
        }
    }
}

/// The node's Wasm engine.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Guest>,
    components: component::Linker<Guest2>,
    modules: Mutex<HashMap<String, Program>>,
    compiling: Mutex<()>,
    ticking: Arc<AtomicBool>,
}

struct Guest {
    wasi: WasiP1Ctx,
    limits: Limits,
}

/// The store data of a preview 2 component.
struct Guest2 {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    hooks: Names,
    table: ResourceTable,
    limits: Limits,
}

impl Guest2 {
    fn new(b: &mut WasiCtxBuilder, limits: Limits, resolve: Option<Resolve>) -> Guest2 {
        Guest2 {
            ctx: b.build(),
            http: WasiHttpCtx::new(),
            hooks: Names(resolve),
            table: ResourceTable::new(),
            limits,
        }
    }
}

/// Outgoing requests as wasmtime sends them, except that a plain-HTTP request to a name
/// `Resolve` knows connects to its address (the `Host` header keeps the name).
struct Names(Option<Resolve>);

type SendFuture = Box<
    dyn std::future::Future<
            Output = Result<
                (
                    hyper::Response<wasmtime_wasi_http::WasiBody>,
                    Box<
                        dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                            + Send,
                    >,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl wasmtime_wasi_http::WasiHttpHooks for Names {
    fn send_request(
        &mut self,
        mut request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        let uri = request.uri().clone();
        if let (Some(resolve), Some(host), Some("http")) = (&self.0, uri.host(), uri.scheme_str()) {
            if let Some(ip) = resolve(host) {
                let port = uri.port_u16().unwrap_or(80);
                let mut parts = uri.into_parts();
                if let Ok(a) = format!("{ip}:{port}").parse() {
                    parts.authority = Some(a);
                }
                if let Ok(u) = hyper::Uri::from_parts(parts) {
                    *request.uri_mut() = u;
                }
            }
        }
        wasmtime_wasi_http::default_hooks().send_request(request, options, fut)
    }
}

impl WasiHttpView for Guest2 {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl WasiView for Guest2 {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

trait HasLimits: Send + 'static {
    fn limits(&mut self) -> &mut Limits;
}

impl HasLimits for Guest {
    fn limits(&mut self) -> &mut Limits {
        &mut self.limits
    }
}

impl HasLimits for Guest2 {
    fn limits(&mut self) -> &mut Limits {
        &mut self.limits
    }
}

/// Memory and table growth policy of one guest.
struct Limits {
    memory: Option<u64>,
    hit: bool,
    usage: Option<Arc<Usage>>,
    /// Bytes of linear memory this instance's memories were allowed to reach, counted in
    /// `usage` until the instance goes.
    held: u64,
}

impl Limits {
    fn of(cmd: &Command) -> Limits {
        Limits {
            memory: cmd.memory,
            hit: false,
            usage: cmd.usage.clone(),
            held: 0,
        }
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        if let Some(u) = &self.usage {
            u.memory.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match self.memory {
            Some(max) if desired as u64 > max => {
                self.hit = true;
                Err(wasmtime::Error::msg(format!(
                    "memory limit of {max} bytes reached (asked for {desired})"
                )))
            }
            _ => {
                let grown = (desired.saturating_sub(current)) as u64;
                self.held += grown;
                if let Some(u) = &self.usage {
                    u.memory.fetch_add(grown, Ordering::Relaxed);
                }
                Ok(true)
            }
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io {
        what,
        detail: e.to_string(),
    }
}

impl Runtime {
    pub fn new() -> Result<Runtime, Error> {
        // Each slot reserves a guest memory's whole address range up front (about 4 GiB),
        // so 256 slots take about 1 TiB of address space. Kernels with 39-bit addresses (some
        // ARM boards') have only 512 GiB: with fewer slots the engine still starts, and its
        // code is the same, so artifacts compiled ahead of time still load.
        let mut slots = SLOTS;
        let engine = loop {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_memories(slots)
                .total_tables(slots)
                .total_core_instances(slots)
                .total_stacks(slots)
                .max_memory_size(MAX_MEMORY);
            let mut cfg = config();
            cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&cfg) {
                Ok(e) => break e,
                Err(e) if slots > 8 => {
                    tracing::warn!(slots, error = %format!("{e:#}"), "the Wasm pool does not fit this machine's address space; halving it");
                    slots /= 2;
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "creating the Wasm engine".into(),
                        detail: format!("{e:#}"),
                    })
                }
            }
        };
        let mut linker: Linker<Guest> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |g: &mut Guest| &mut g.wasi).map_err(
            |e| Error::Io {
                what: "linking WASI".into(),
                detail: e.to_string(),
            },
        )?;
        let mut components: component::Linker<Guest2> = component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut components))
            .map_err(|e| Error::Io {
                what: "linking WASI preview 2".into(),
                detail: e.to_string(),
            })?;
        let ticking = Arc::new(AtomicBool::new(true));
        {
            let engine = engine.clone();
            let ticking = ticking.clone();
            std::thread::Builder::new()
                .name("outpost-epoch".into())
                .spawn(move || {
                    while ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(io("starting the epoch thread"))?;
        }
        Ok(Runtime {
            engine,
            linker,
            components,
            modules: Mutex::new(HashMap::new()),
            compiling: Mutex::new(()),
            ticking,
        })
    }

    /// Compile `bytes`, or return the module already compiled under `digest`. One compile
    /// at a time: a burst of pods of one module compiles it once, not once per pod (and
    /// each compile already uses every core).
    pub fn module(&self, digest: &str, bytes: &[u8]) -> Result<Program, Error> {
        if let Some(m) = self.cached(digest) {
            return Ok(m);
        }
        let _one = self.compiling.lock();
        if let Some(m) = self.cached(digest) {
            return Ok(m);
        }
        let m = self.compile(bytes)?;
        if let Ok(mut c) = self.modules.lock() {
            c.insert(digest.to_string(), m.clone());
        }
        Ok(m)
    }

    #[cfg(feature = "compiler")]
    fn compile(&self, bytes: &[u8]) -> Result<Program, Error> {
        let invalid = |e: wasmtime::Error| Error::Invalid(format!("{e:#}"));
        Ok(if is_component(bytes) {
            program(
                &self.engine,
                Component::new(&self.engine, bytes).map_err(invalid)?,
            )
        } else {
            Program::Core(Module::new(&self.engine, bytes).map_err(invalid)?)
        })
    }

    #[cfg(not(feature = "compiler"))]
    fn compile(&self, _bytes: &[u8]) -> Result<Program, Error> {
        Err(Error::NoCompiler)
    }

    /// Whether this runtime can compile modules itself; without, it runs only artifacts
    /// compiled ahead of time for it ([`Runtime::load`]).
    pub fn compiles() -> bool {
        cfg!(feature = "compiler")
    }

    /// The code of an artifact compiled ahead of time for this node ([`Compiler`]), cached
    /// under the module's `digest`. Wasmtime refuses an artifact of another version, target,
    /// CPU features or engine settings with an error, never loading it.
    ///
    /// The caller vouches for the bytes: they came from the control plane over the node's
    /// mutually authenticated link and their SHA-256 matches what it announced.
    pub fn load(&self, digest: &str, artifact: &[u8]) -> Result<Program, Error> {
        if let Some(m) = self.cached(digest) {
            return Ok(m);
        }
        let bad = |e: wasmtime::Error| Error::Invalid(format!("compiled artifact: {e:#}"));
        let m = match Engine::detect_precompiled(artifact) {
            Some(wasmtime::Precompiled::Module) => {
                // SAFETY: the artifact is wasmtime's own serialization, made by the control
                // plane's compiler for this engine's settings and verified by digest before
                // it reaches here (see above); wasmtime checks its version and target too.
                #[allow(unsafe_code)]
                let m = unsafe { Module::deserialize(&self.engine, artifact) }.map_err(bad)?;
                Program::Core(m)
            }
            Some(wasmtime::Precompiled::Component) => {
                // SAFETY: as for modules above.
                #[allow(unsafe_code)]
                let c = unsafe { Component::deserialize(&self.engine, artifact) }.map_err(bad)?;
                program(&self.engine, c)
            }
            None => {
                return Err(Error::Invalid(
                    "compiled artifact: not a wasmtime artifact".into(),
                ))
            }
        };
        if let Ok(mut c) = self.modules.lock() {
            c.insert(digest.to_string(), m.clone());
        }
        Ok(m)
    }

    pub fn cached(&self, digest: &str) -> Option<Program> {
        self.modules.lock().ok()?.get(digest).cloned()
    }

    /// Run a WASI command to its end, or serve an HTTP component until stopped. A busy guest
    /// yields to the executor every tick; `stop` ends the guest within a tick, or at once if it
    /// is waiting in a host call.
    pub async fn run(&self, module: &Program, cmd: &Command, stop: &Stop) -> Result<Exit, Error> {
        if let Program::Http(c) = module {
            return http::serve(self, c, cmd, stop).await;
        }
        tokio::select! {
            r = metered(self.run_guest(module, cmd), cmd.usage.clone()) => r,
            // Dropping the guest's future tears its fiber and instance down.
            _ = stop.wait() => Ok(Exit::Stopped),
        }
    }

    async fn run_guest(&self, program: &Program, cmd: &Command) -> Result<Exit, Error> {
        let limits = Limits::of(cmd);
        let b = wasi_builder(cmd)?;
        match program {
            Program::Core(module) => {
                let pre = self
                    .linker
                    .instantiate_pre(module)
                    .map_err(|e| Error::Unsupported(format!("{e:#}")))?;
                let mut b = b;
                let mut store = store(
                    &self.engine,
                    Guest {
                        wasi: b.build_p1(),
                        limits,
                    },
                    cmd,
                );
                let run = match pre.instantiate_async(&mut store).await {
                    Ok(inst) => match inst.get_typed_func::<(), ()>(&mut store, "_start") {
                        Ok(start) => start.call_async(&mut store, ()).await,
                        Err(e) => return Err(Error::NotCommand(e.to_string())),
                    },
                    Err(e) => Err(e),
                };
                Ok(exit_of(run, &store.data().limits))
            }
            Program::Component(component) => {
                let pre = self
                    .components
                    .instantiate_pre(component)
                    .map_err(|e| Error::Unsupported(format!("{e:#}")))?;
                let pre = wasmtime_wasi::p2::bindings::CommandPre::new(pre)
                    .map_err(|e| Error::NotCommand(format!("{e:#}")))?;
                let mut b = b;
                let mut store = store(
                    &self.engine,
                    Guest2::new(&mut b, limits, cmd.resolve.clone()),
                    cmd,
                );
                let run = match pre.instantiate_async(&mut store).await {
                    Ok(command) => command
                        .wasi_cli_run()
                        .call_run(&mut store)
                        .await
                        .map(|r| r.map_or(1, |()| 0)),
                    Err(e) => Err(e),
                };
                Ok(match run {
                    Ok(code) => Exit::Code(code),
                    Err(e) => exit_of(Err(e), &store.data().limits),
                })
            }
            Program::Http(_) => Err(Error::NotCommand(
                "an HTTP component is served, not run".into(),
            )),
        }
    }
}

/// A store with the memory limiter and the CPU policy at each epoch deadline.
fn store<T: HasLimits>(engine: &Engine, data: T, cmd: &Command) -> Store<T> {
    let mut store = Store::new(engine, data);
    store.limiter(|g| g.limits());
    store.set_epoch_deadline(1);
    // Each tick the guest ran, it sleeps long enough to hold its share of one core.
    let pause = cmd
        .millicores
        .filter(|m| *m < 1000)
        .map(|m| m.max(10))
        .map(|m| TICK.mul_f64((1000 - m) as f64 / m as f64));
    store.epoch_deadline_callback(move |_| {
        // Yield at every tick so one busy guest never holds an executor thread; under a
        // CPU limit, sleep long enough to hold only its share of one core.
        Ok(match pause {
            Some(p) => UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(p))),
            None => UpdateDeadline::Yield(1),
        })
    });
    store
}

/// The WASI context a command gets: args, env, preopened directories, output files.
fn wasi_builder(cmd: &Command) -> Result<WasiCtxBuilder, Error> {
    let mut b = WasiCtxBuilder::new();
    b.args(&cmd.args).envs(&cmd.env);
    for (host, guest, writable) in &cmd.dirs {
        let perms = if *writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(host, guest, perms).map_err(|e| Error::Io {
            what: format!("opening {} for the guest", host.display()),
            detail: e.to_string(),
        })?;
    }
    if let Some(log) = &cmd.log {
        b.stdout(log.stream("stdout")).stderr(log.stream("stderr"));
    }
    if let Some(input) = cmd.stdin.as_ref().and_then(|i| i.lock().ok()?.take()) {
        b.stdin(wasmtime_wasi::cli::AsyncStdinStream::new(input));
    }
    Ok(b)
}

/// How a guest that returned `run` ended.
fn exit_of(run: wasmtime::Result<()>, limits: &Limits) -> Exit {
    match run {
        Ok(()) => Exit::Code(0),
        Err(e) => {
            if let Some(x) = e.downcast_ref::<I32Exit>() {
                Exit::Code(x.0)
            } else if limits.hit {
                Exit::OutOfMemory {
                    limit: limits.memory.unwrap_or(0),
                }
            } else {
                Exit::Trap(format!("{e:#}"))
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}
