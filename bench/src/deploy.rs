//! `outpost-bench deploy`: what a board gets. The stripped sizes of the aarch64 binaries
//! deploy/build.sh made (the agent with and without the Wasm compiler), the idle memory of
//! the aarch64 agent under qemu-user beside the native agent's, and the cold start of a Wasm
//! pod on an emulated aarch64 node: from an artifact the control plane compiled ahead of time
//! against compiling on the node. The peer is the `wasmtime` CLI: `wasmtime run` compiling a
//! module against running its precompiled `.cwasm`, natively, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_tests::{Node, Up};

use super::api::rss_kib;

pub struct Figures {
    /// (file, bytes) of each binary found.
    pub sizes: Vec<(String, u64)>,
    pub rss_qemu_mb: f64,
    pub rss_native_mb: f64,
    /// create→Succeeded medians, ms: artifact from the control plane; compiled on the node.
    pub aot_ms: f64,
    pub jit_ms: f64,
    /// `wasmtime run` medians, ms: compiling; precompiled.
    pub peer: Option<(f64, f64)>,
}

fn out_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
    dir.join("../deploy/out/aarch64-unknown-linux-musl")
}

fn examples() -> PathBuf {
    out_dir().join("../../../examples/out")
}

/// `bytes` with a custom section naming `tag`: the same code under a digest no node or
/// member has seen, so every pod starts cold.
fn fresh(bytes: &[u8], tag: &str) -> Vec<u8> {
    let name = format!("outpost-bench/{tag}");
    let mut out = bytes.to_vec();
    out.push(0);
    out.push((1 + name.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// create→Succeeded of a pod of a never-seen copy of hello on node `on`, in ms.
fn cold_start(up: &Up, dir: &Path, on: &str, round: usize) -> anyhow::Result<f64> {
    let hello = std::fs::read(examples().join("hello.wasm"))
        .context("examples/out/hello.wasm: run scripts/examples.sh first")?;
    let file = dir.join(format!("{on}-{round}.wasm"));
    std::fs::write(&file, fresh(&hello, &format!("{on}-{round}")))?;
    let image = up
        .outpost(&["module", "push", file.to_str().unwrap_or_default()])?
        .expect_ok("module push")?
        .stdout
        .trim()
        .to_string();
    let name = format!("{on}-{round}");
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  runtimeClassName: wasm\n  restartPolicy: Never\n  nodeSelector:\n    kubernetes.io/hostname: {on}\n  containers:\n  - name: main\n    image: {image}\n"
    );
    let t = Instant::now();
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply")?;
    loop {
        let r = up.kubectl(&["get", "pod", &name, "-o", "jsonpath={.status.phase}"])?;
        match r.stdout.trim() {
            "Succeeded" => return Ok(t.elapsed().as_secs_f64() * 1e3),
            "Failed" => bail!("pod {name} failed"),
            _ if t.elapsed() > Duration::from_secs(300) => bail!("pod {name} did not finish"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn wasmtime_peer(dir: &Path, rounds: usize) -> anyhow::Result<Option<(f64, f64)>> {
    if Command::new("wasmtime").arg("--version").output().is_err() {
        eprintln!("note: the wasmtime CLI is not installed (OUTPOST_BENCH=1 scripts/setup.sh installs it); no peer figure");
        return Ok(None);
    }
    let hello = std::fs::read(examples().join("hello.wasm"))?;
    let (mut jit, mut aot) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let wasm = dir.join(format!("peer-{round}.wasm"));
        let cwasm = dir.join(format!("peer-{round}.cwasm"));
        std::fs::write(&wasm, fresh(&hello, &format!("peer-{round}")))?;
        let t = Instant::now();
        let out = Command::new("wasmtime").arg("run").arg(&wasm).output()?;
        jit.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!("wasmtime run: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("wasmtime")
            .arg("compile")
            .arg(&wasm)
            .arg("-o")
            .arg(&cwasm)
            .output()?;
        if !out.status.success() {
            bail!("wasmtime compile: {}", String::from_utf8_lossy(&out.stderr));
        }
        let t = Instant::now();
        let out = Command::new("wasmtime")
            .args(["run", "--allow-precompiled"])
            .arg(&cwasm)
            .output()?;
        aot.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "wasmtime run --allow-precompiled: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(Some((median(jit), median(aot))))
}

pub fn run(rounds: usize, idle: Duration) -> anyhow::Result<Figures> {
    // The test harness finds `outpost` and `outpost-node` beside test executables; these
    // are the release builds beside this one.
    if std::env::var_os("OUTPOST_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        if let Some(dir) = exe.parent() {
            std::env::set_var("OUTPOST_BIN_DIR", dir);
        }
    }
    let out = out_dir();
    let (node_jit, node_aot) = (out.join("outpost-node"), out.join("outpost-node-aot"));
    for b in [&node_jit, &node_aot] {
        if !b.is_file() {
            bail!("{} is missing: run deploy/build.sh first", b.display());
        }
    }
    let sizes = [
        "outpost-node",
        "outpost-node-aot",
        "outpost-control",
        "outpost",
    ]
    .iter()
    .filter_map(|n| Some((n.to_string(), std::fs::metadata(out.join(n)).ok()?.len())))
    .collect();
    let dir = tempfile::tempdir()?;
    let up = Up::start_with(dir.path(), &["--no-node"])?;
    let qemu = |b: &Path| Some(vec![PathBuf::from("qemu-aarch64-static"), b.to_path_buf()]);
    let aot = up.join_with(&dir.path().join("arm-aot"), "arm-aot", qemu(&node_aot), 180)?;
    let native = up.join_with(&dir.path().join("native"), "native", None, 60)?;
    std::thread::sleep(idle);
    let rss = |n: &Node| n.pid().map_or(0.0, |p| rss_kib(p) as f64 / 1024.0);
    let (rss_qemu_mb, rss_native_mb) = (rss(&aot), rss(&native));
    drop(native);
    let jit = up.join_with(&dir.path().join("arm-jit"), "arm-jit", qemu(&node_jit), 180)?;
    let (mut a, mut j) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        a.push(cold_start(&up, dir.path(), "arm-aot", round)?);
        j.push(cold_start(&up, dir.path(), "arm-jit", round)?);
    }
    drop((aot, jit));
    Ok(Figures {
        sizes,
        rss_qemu_mb,
        rss_native_mb,
        aot_ms: median(a),
        jit_ms: median(j),
        peer: wasmtime_peer(dir.path(), rounds)?,
    })
}
