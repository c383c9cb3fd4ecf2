//! `outpost-bench oci`: OCI containers against Debian's `runc`, in the same run.
//!
//! Start-to-exit: `/bin/true` from one busybox root file system and one runtime spec (the
//! spec the node agent writes for such a pod), run the node agent's way (the bundle written,
//! an `oci-run` helper forked by the agent's zygote: overlay mount, libcontainer create and
//! start, wait, delete) and by `runc run`, alternately, each timed from start to the end of
//! the helper or of runc. Then create→Running of an OCI pod
//! through the API, scheduler, node link and agent, with the image already on the node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_oci_shim::run::Containers;
use outpost_oci_shim::spec::{runtime_spec, Launch};
use outpost_oci_shim::store::ImageConfig;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::node::{post, wait, watch_phases, Cluster};
use super::percentile;

pub struct Figures {
    pub runs: usize,
    pub ours_ms: f64,
    pub ours_p90_ms: f64,
    /// Until the helper has also deleted the container and unmounted its root.
    pub cleaned_ms: f64,
    pub cleaned_p90_ms: f64,
    pub runc_ms: f64,
    pub runc_p90_ms: f64,
    pub first_pod_ms: f64,
    pub pods: usize,
    pub pod_p50_ms: f64,
    pub pod_p99_ms: f64,
}

/// A busybox root file system: the static binary and the one tool the runs use.
fn rootfs(dir: &Path) -> anyhow::Result<()> {
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copying /bin/busybox (scripts/setup.sh installs busybox-static)")?;
    std::os::unix::fs::symlink("busybox", dir.join("bin/true"))?;
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

/// The spec the agent writes for a pod running `/bin/true` in this root file system.
fn spec(lower: &Path) -> anyhow::Result<Value> {
    let pod = json!({"metadata": {"name": "bench", "namespace": "default"}, "spec": {}});
    let container = json!({"name": "main", "command": ["/bin/true"]});
    let image = ImageConfig::parse(&json!({"config": {"Env": ["PATH=/bin"]}}));
    let l = Launch {
        pod: &pod,
        container: &container,
        env: vec![],
        mounts: vec![],
        files: vec![],
        cgroup: "/outpost-bench/true".into(),
        hostname: "bench".into(),
        netns: None,
    };
    Ok(runtime_spec(&l, &image, lower)?)
}

async fn start_to_exit(runs: usize) -> anyhow::Result<[Vec<Duration>; 3]> {
    if Command::new("runc").arg("--version").output().is_err() {
        bail!("runc is not installed: OUTPOST_BENCH=1 scripts/setup.sh installs it");
    }
    let node_bin: PathBuf = super::api::control_bin()?.with_file_name("outpost-node");
    let dir = tempfile::tempdir()?;
    let lower = dir.path().join("lower");
    rootfs(&lower)?;
    let spec = spec(&lower)?;
    // Ours goes the node agent's way: the bundle written, a helper forked by the zygote, an
    // overlay of the image mounted at bundle/rootfs as for every pod. runc runs in the
    // image's directory itself, which is the cheaper of the two.
    // Bundles and libcontainer's state in memory, as the agent keeps them (`volatile.rs`).
    // The tmpfs is mounted in the host's mount namespace (and removed at the end), not in a
    // namespace of the benchmark's own, which runc would then run in too: runc runs from the
    // namespace users run it in. Its state stays where `runc` keeps it by default, /run/runc,
    // on this machine's disk.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run)?;
    outpost_oci_shim::run::tmpfs(&run)?;
    let containers = Containers::new(&dir.path().join("ours"), &run, &node_bin);
    let runc = dir.path().join("runc");
    std::fs::create_dir_all(&runc)?;
    let mut runc_spec = spec.clone();
    runc_spec["root"]["path"] = json!(lower);
    std::fs::write(runc.join("config.json"), runc_spec.to_string())?;
    let runc_state = dir.path().join("runc-state");
    // Two times: until the agent has the outcome, and until the helper has also deleted
    // the container and unmounted (what `runc run` has done when it exits).
    let run_ours = async |id: &str| -> anyhow::Result<(Duration, Duration)> {
        let t = Instant::now();
        let mut running = containers.start(id, &spec, &lower, false, None).await?;
        let out = running.wait().await;
        let took = t.elapsed();
        running.cleaned().await?;
        let cleaned = t.elapsed();
        if out.exit_code != 0 || out.error.is_some() {
            bail!("the helper: {out:?}");
        }
        Ok((took, cleaned))
    };
    let run_runc = |id: &str| -> anyhow::Result<Duration> {
        tokio::task::block_in_place(|| {
            let t = Instant::now();
            let out = Command::new("runc")
                .arg("--root")
                .arg(&runc_state)
                .args(["run", "--bundle"])
                .arg(&runc)
                .arg(id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()?;
            let took = t.elapsed();
            if !out.status.success() {
                bail!("runc run: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(took)
        })
    };
    for i in 0..3 {
        run_ours(&format!("warm-{i}")).await?;
        run_runc(&format!("warm-{i}"))?;
    }
    let (mut a, mut c, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate, so both see the same state of the machine.
        let (ours, cleaned) = run_ours(&format!("run-{i}")).await?;
        a.push(ours);
        c.push(cleaned);
        b.push(run_runc(&format!("run-{i}"))?);
    }
    // Both runtimes leave the parent of the containers' cgroup behind.
    let _ = outpost_oci_shim::run::remove_cgroup("/outpost-bench", Duration::from_secs(5));
    let _ = Command::new("umount").arg("-l").arg(&run).status();
    a.sort();
    b.sort();
    c.sort();
    Ok([a, c, b])
}

pub async fn run(runs: usize, pods: usize) -> anyhow::Result<Figures> {
    let [ours, cleaned, runc] = start_to_exit(runs).await?;
    let ms = |d: &[Duration], p: f64| percentile(d, p) / 1000.0;

    // Pod cgroups there before (other clusters' pods) are not the benchmark's to wait for.
    let v1 = Path::new("/sys/fs/cgroup/pids");
    let cgroups = if v1.is_dir() {
        v1
    } else {
        Path::new("/sys/fs/cgroup")
    }
    .join("outpost");
    let pod_cgroups = |d: &Path| -> std::collections::HashSet<PathBuf> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let before = pod_cgroups(&cgroups);
    let reg = tokio::task::block_in_place(outpost_tests::Registry::start)?;
    let layer = outpost_tests::busybox_layer()?;
    let image = reg.push_image(
        "bench/busybox",
        "1",
        &[layer],
        json!({"Env": ["PATH=/bin"], "Cmd": ["sleep", "3600"]}),
    )?;
    let cl = Cluster::start().await?;
    let (api, c) = (cl.api.clone(), cl.c.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(watch_phases(c.clone(), api.clone(), tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let create = |name: String| {
        let c = c.clone();
        let url = format!("https://{api}/api/v1/namespaces/default/pods");
        let body = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "bench"}},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image}]}});
        async move { post(&c, url, "application/json", body.to_string().into_bytes()).await }
    };
    // The first pod pulls the image; reported apart.
    let t = Instant::now();
    create("pull".into()).await?;
    let first = wait(&mut rx, "pull".into(), &["Running"]).await? - t;
    let mut lat = Vec::new();
    for i in 0..pods {
        let name = format!("box-{i}");
        let t = Instant::now();
        create(name.clone()).await?;
        lat.push(wait(&mut rx, name, &["Running"]).await? - t);
    }
    lat.sort();
    c.delete(format!("https://{api}/api/v1/namespaces/default/pods"))
        .send()
        .await?;
    // The agent removes each pod's network namespace as the pod stops: wait for that, so
    // the machine is left as it was.
    // Their cgroups too: each left would slow every later cpuset change on the machine.
    let marks = cl.root.path().join("node/net");
    let deadline = Instant::now() + Duration::from_secs(60);
    let marked = |d: &Path| std::fs::read_dir(d).is_ok_and(|mut d| d.next().is_some());
    while marked(&marks) || !pod_cgroups(&cgroups).is_subset(&before) {
        if Instant::now() > deadline {
            bail!(
                "pod networks left in {} or cgroups in {} after 60 s",
                marks.display(),
                cgroups.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Figures {
        runs,
        ours_ms: ms(&ours, 0.5),
        ours_p90_ms: ms(&ours, 0.9),
        cleaned_ms: ms(&cleaned, 0.5),
        cleaned_p90_ms: ms(&cleaned, 0.9),
        runc_ms: ms(&runc, 0.5),
        runc_p90_ms: ms(&runc, 0.9),
        first_pod_ms: first.as_secs_f64() * 1000.0,
        pods,
        pod_p50_ms: ms(&lat, 0.5),
        pod_p99_ms: ms(&lat, 0.99),
    })
}
