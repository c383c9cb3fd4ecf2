//! OCI pods end to end: a busybox image built here from Debian's busybox-static, pushed to a
//! real registry on loopback, run by `outpost up`'s own node as Linux containers through
//! libcontainer, and driven with the real kubectl: logs, exit codes, OOM kills, exec, pull
//! failures, a layer that tries to escape its root, and Wasm and OCI pods side by side.

use anyhow::Context as _;
use outpost_tests::{busybox_layer, example, http_get_at, LayerBuilder, Registry, Up};
use serde_json::json;

/// A registry holding `busybox:1` and a running `outpost up` whose node runs OCI pods.
fn cluster() -> anyhow::Result<(Registry, String, tempfile::TempDir, Up)> {
    let reg = Registry::start()?;
    let image = reg.push_image(
        "test/busybox",
        "1",
        &[busybox_layer()?],
        json!({"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": ["sleep", "3600"]}),
    )?;
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let oci = up.wait_field(
        30,
        &["nodes"],
        "{.items[0].metadata.labels.outpost\\.dev/runtime-oci}",
        |v| !v.is_empty(),
    )?;
    anyhow::ensure!(
        oci == "true",
        "the node cannot run OCI containers: {}",
        up.kubectl(&["get", "nodes", "-o", "yaml"])?.stdout
    );
    Ok((reg, image, dir, up))
}

/// A one-container pod of `image` running `command` (a JSON list), with `extra` YAML under
/// the container.
fn pod(name: &str, image: &str, policy: &str, command: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {policy}\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {image}\n    command: {command}\n{extra}"
    )
}

/// kubectl 1.`minor` (or the one on PATH) with `args` (shell words), to be run on a terminal
/// that script(1) fakes.
fn script(up: &Up, minor: Option<&str>, args: &str) -> anyhow::Result<std::process::Command> {
    let k = outpost_tests::kubectl_bin(minor)?;
    let mut c = std::process::Command::new("script");
    c.args(["-qec"])
        .arg(format!(
            "{} --kubeconfig {} {args}",
            k.display(),
            up.kubeconfig.display()
        ))
        .arg("/dev/null");
    Ok(c)
}

/// kubectl 1.`minor` (or the one on PATH) run with `args` (shell words) on a terminal, faked
/// with script(1): how it ended, and what it printed there without carriage returns.
fn on_terminal(
    up: &Up,
    minor: Option<&str>,
    args: &str,
) -> anyhow::Result<(std::process::Output, String)> {
    let out = script(up, minor, args)?
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    Ok((out, text))
}

/// Through kubectl `args` (shell words) on a terminal faked with script(1), give a shell a
/// minute's sleep once `settle` has passed, then type ^C: the sleep ends, the shell goes on.
fn interrupt_in_a_shell(up: &Up, args: &str, settle: std::time::Duration) -> anyhow::Result<()> {
    let mut shell = script(up, None, args)?
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let t = std::time::Instant::now();
    {
        use std::io::Write as _;
        let mut typing = shell.stdin.take().context("the shell's input")?;
        std::thread::sleep(settle);
        typing.write_all(b"sleep 60; echo not interrupted\n")?;
        std::thread::sleep(std::time::Duration::from_secs(2));
        typing.write_all(b"\x03")?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        typing.write_all(b"echo after the interrupt\nexit\n")?;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let out = shell.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    anyhow::ensure!(
        text.contains("\nafter the interrupt\n")
            && !text.contains("\nnot interrupted")
            && t.elapsed() < std::time::Duration::from_secs(40),
        "{args}: {:?}: {text}",
        t.elapsed()
    );
    Ok(())
}

/// Whether the `SigIgn:` line of a `/proc/PID/status` in `text` has SIGPIPE (bit 12).
fn sigpipe_ignored(text: &str) -> Option<bool> {
    text.lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .map(|m| m & (1 << 12) != 0)
}

/// Pod `name`'s cgroup in the pids hierarchy (cgroup v1) or the unified one (v2).
fn pod_cgroup(up: &Up, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let uid = up
        .kubectl(&["get", "pod", name, "-o", "jsonpath={.metadata.uid}"])?
        .expect_ok("the pod's uid")?
        .stdout;
    let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
    let base = if v1.is_dir() {
        v1
    } else {
        std::path::Path::new("/sys/fs/cgroup")
    };
    Ok(base.join("outpost").join(uid.trim()))
}

/// The reason and exit code of pod `name`'s ended container; the pod's description if it
/// does not end in a minute.
fn terminated(up: &Up, name: &str) -> anyhow::Result<String> {
    let s = up
        .wait_field(
            60,
            &["pod", name],
            "{.status.containerStatuses[0].state.terminated.reason} {.status.containerStatuses[0].state.terminated.exitCode}",
            |s| !s.is_empty(),
        )
        .map_err(|e| {
            let d = up.kubectl(&["describe", "pod", name]).map(|o| o.stdout);
            e.context(d.unwrap_or_default())
        })?;
    if !s.starts_with("Completed") {
        eprintln!("{}", up.kubectl(&["describe", "pod", name])?.stdout);
    }
    Ok(s)
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn busybox_pods_log_exit_and_exec() -> anyhow::Result<()> {
    let (_reg, image, dir, up) = cluster()?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "hello",
            &image,
            "Never",
            r#"["sh", "-c", "echo hello from $GREETING $FROM_IMAGE; id -u; cat /etc/hostname; ls /; grep SigIgn /proc/self/status"]"#,
            "    env:\n    - name: GREETING\n      value: busybox\n",
        ),
    )?
    .expect_ok("apply hello")?;
    up.wait_field(60, &["pod", "hello"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let logs = up.kubectl(&["logs", "hello"])?.expect_ok("logs")?.stdout;
    assert!(logs.contains("hello from busybox yes"), "{logs}");
    assert!(logs.lines().any(|l| l == "0"), "runs as root: {logs}");
    assert!(logs.lines().any(|l| l == "hello"), "pod hostname: {logs}");
    assert!(logs.contains("busybox") && logs.contains("proc"), "{logs}");
    // SIGPIPE at its default, as under runc, though the agent ignores it.
    assert_eq!(sigpipe_ignored(&logs), Some(false), "{logs}");
    assert_eq!(terminated(&up, "hello")?, "Completed 0");
    let id = up.wait_field(
        5,
        &["pod", "hello"],
        "{.status.containerStatuses[0].imageID}",
        |i| !i.is_empty(),
    )?;
    assert!(id.contains("sha256:"), "{id}");
    let events = up
        .kubectl(&["describe", "pod", "hello"])?
        .expect_ok("describe")?
        .stdout;
    // The pull's progress: the one layer, then done.
    assert!(
        events.contains("Pulling image")
            && events.contains("layer 1/1")
            && events.contains("Successfully pulled image"),
        "{events}"
    );

    // Containers are forked by the agent's zygote; one killed is replaced at the next start.
    let up_pid = up.pid().expect("outpost up runs");
    let zygotes = outpost_tests::children_running(up_pid, "oci-zygote");
    assert_eq!(zygotes.len(), 1, "one zygote: {zygotes:?}");
    std::process::Command::new("kill")
        .args(["-9", &zygotes[0].to_string()])
        .status()?;

    // A non-zero exit is the container's exit code, its stderr in the logs.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "fails",
            &image,
            "Never",
            r#"["sh", "-c", "echo bye >&2; exit 3"]"#,
            "",
        ),
    )?
    .expect_ok("apply fails")?;
    assert_eq!(terminated(&up, "fails")?, "Error 3");
    up.wait_field(10, &["pod", "fails"], "{.status.phase}", |p| p == "Failed")?;
    let logs = up.kubectl(&["logs", "fails"])?.expect_ok("logs")?.stdout;
    assert!(logs.contains("bye"), "{logs}");
    let now = outpost_tests::children_running(up_pid, "oci-zygote");
    assert!(
        now.len() == 1 && now != zygotes,
        "a new zygote: {now:?}, was {zygotes:?}"
    );

    // A restarted container starts from the image again, whatever its last run wrote
    // (the layer directories of ended containers are recycled), with `/` as the image's.
    // Its runs count themselves in an emptyDir, which outlives them: the first exits 10,
    // the second 11 if its root was fresh.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "again",
            &image,
            "OnFailure",
            r#"["sh", "-c", "n=$(cat /v/n || echo 0); echo $((n+1)) > /v/n; test -e /seen && exit 3; test $(stat -c %a /) = 755 || exit 4; mkdir -p /d; touch /seen /d/f; exit $((10+n))"]"#,
            "    volumeMounts:\n    - name: v\n      mountPath: /v\n  volumes:\n  - name: v\n    emptyDir: {}\n",
        ),
    )?
    .expect_ok("apply again")?;
    let second = up.wait_field(
        60,
        &["pod", "again"],
        "{.status.containerStatuses[0].lastState.terminated.exitCode}",
        |c| !c.is_empty() && c != "10",
    )?;
    assert_eq!(
        second, "11",
        "the second run saw its first run's files or mode"
    );
    up.kubectl(&["delete", "pod", "again", "--wait=false"])?
        .expect_ok("delete again")?;

    // The image's own command; kubectl exec into it.
    up.kubectl(&["run", "box", &format!("--image={image}")])?
        .expect_ok("run box")?;
    up.wait_field(60, &["pod", "box"], "{.status.phase}", |p| p == "Running")?;
    // Its root file system is mounted in its helper's mount namespace, not the host's.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let data = dir.path().display().to_string();
    assert!(
        !mounts.contains(&data),
        "a mount under {data} in the host's namespace:\n{mounts}"
    );
    let r = up
        .kubectl(&[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "echo in $(hostname) as $(id -u); ps; grep SigIgn /proc/self/status",
        ])?
        .expect_ok("exec")?;
    assert!(r.stdout.contains("in box as 0"), "{}", r.stdout);
    // Commands run by kubectl exec start with SIGPIPE at its default too.
    assert_eq!(sigpipe_ignored(&r.stdout), Some(false), "{}", r.stdout);
    assert!(
        r.stdout.contains("sleep 3600"),
        "the pod's own processes: {}",
        r.stdout
    );
    // The service account's token, CA and namespace, mounted read-only where clients look.
    let r = up
        .kubectl(&[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "cd /var/run/secrets/kubernetes.io/serviceaccount && cat namespace && echo && head -c 3 token && echo && head -1 ca.crt && grep serviceaccount /proc/mounts | cut -d' ' -f3 && touch x",
        ])?
        .expect_err("writing to the token's volume")?;
    // In memory, as the kubelet keeps tokens and secrets: never on the node's disk.
    assert!(
        r.stdout
            .starts_with("default\neyJ\n-----BEGIN CERTIFICATE-----\ntmpfs\n"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
    let r = up.kubectl_in(
        &["exec", "-i", "box", "--", "sh", "-c", "cat; exit 7"],
        "from stdin\n",
    )?;
    assert_eq!(r.code, Some(7), "{r:?}");
    assert!(r.stdout.contains("from stdin"), "{r:?}");
    // kubectl cp both ways (tar through exec, stdin in and stdout out): 300 KB of every byte
    // value arrives unchanged.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (local, back) = (dir.path().join("cp-in.bin"), dir.path().join("cp-out.bin"));
    std::fs::write(&local, &data)?;
    up.kubectl(&[
        "cp",
        local.to_str().unwrap_or_default(),
        "box:/tmp/copied.bin",
    ])?
    .expect_ok("cp into the pod")?;
    let r = up
        .kubectl(&["exec", "box", "--", "wc", "-c", "/tmp/copied.bin"])?
        .expect_ok("wc")?;
    assert!(r.stdout.starts_with("300000 "), "{r:?}");
    up.kubectl(&[
        "cp",
        "box:/tmp/copied.bin",
        back.to_str().unwrap_or_default(),
    ])?
    .expect_ok("cp out of the pod")?;
    assert!(std::fs::read(&back)? == data, "the copy differs");
    // A command whose kubectl goes away goes too, even while it prints nothing.
    let k = outpost_tests::kubectl_bin(None)?;
    let _ = std::process::Command::new("timeout")
        .arg("2")
        .arg(&k)
        .arg("--kubeconfig")
        .arg(&up.kubeconfig)
        .args(["exec", "box", "--", "sleep", "1234"])
        .output()?;
    let t = std::time::Instant::now();
    loop {
        let ps = up
            .kubectl(&["exec", "box", "--", "ps"])?
            .expect_ok("ps")?
            .stdout;
        if !ps.contains("sleep 1234") {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "still running:\n{ps}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // kubectl before 1.30 speaks only SPDY for exec.
    for v in ["1.27", "1.29"] {
        let r = up.kubectl_v(
            v,
            &[
                "exec",
                "box",
                "--",
                "sh",
                "-c",
                "echo old $(hostname); echo err >&2; exit 4",
            ],
        )?;
        assert_eq!(r.code, Some(4), "{v}: {r:?}");
        assert!(
            r.stdout.contains("old box") && r.stderr.contains("err"),
            "{v}: {r:?}"
        );
    }
    // With a terminal (-t, faked with script(1)): the command runs on a pseudo-terminal
    // (one output stream), and its exit code comes back, over both protocols.
    for v in [None, Some("1.27")] {
        let (out, text) = on_terminal(
            &up,
            v,
            "exec -it box -- sh -c 'test -t 0 && test -t 1 && echo on a $TERM tty; echo err >&2; exit 3'",
        )?;
        assert_eq!(out.status.code(), Some(3), "{v:?}: {text}");
        assert!(
            text.contains("on a xterm tty\nerr\n") && !text.contains("Unknown stream"),
            "{v:?}: {text}"
        );
    }
    let r = up
        .kubectl_v("1.29", &["exec", "box", "--", "id", "-u"])?
        .expect_ok("exec with 1.29")?;
    assert_eq!(r.stdout.trim(), "0");
    // ^C typed in a shell on a terminal interrupts the command it runs, not the shell.
    interrupt_in_a_shell(&up, "exec -it box -- sh", std::time::Duration::ZERO)?;
    // PID 1 ignores SIGTERM: the end of the grace period the deletion gave (not the pod's
    // 30 s) ends it with SIGKILL.
    let cgroup = pod_cgroup(&up, "box")?;
    assert!(cgroup.is_dir(), "{} while box runs", cgroup.display());
    let t = std::time::Instant::now();
    up.kubectl(&["delete", "pod", "box", "--grace-period=1", "--timeout=20s"])?
        .expect_ok("delete box")?;
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    // The pod's cgroup goes with it, not only its container's.
    while cgroup.exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{} left behind",
            cgroup.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn limits_and_hardening_hold() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    // 128 MiB of buffer in a container limited to 32 MiB.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "hog",
            &image,
            "Never",
            r#"["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]"#,
            "    resources:\n      limits:\n        memory: 32Mi\n",
        ),
    )?
    .expect_ok("apply hog")?;
    // The default seccomp profile refuses new namespaces.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "unshare",
            &image,
            "Never",
            r#"["unshare", "-U", "true"]"#,
            "",
        ),
    )?
    .expect_ok("apply unshare")?;
    // Not root, no new privileges, a read-only root file system.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "locked",
            &image,
            "Never",
            r#"["sh", "-c", "id -u; id -g; touch /x || echo read-only; touch /tmp/y && echo tmp-ok; grep NoNewPrivs /proc/self/status"]"#,
            "    securityContext:\n      runAsUser: 65534\n      runAsGroup: 65534\n      readOnlyRootFilesystem: true\n    volumeMounts:\n    - name: tmp\n      mountPath: /tmp\n  volumes:\n  - name: tmp\n    emptyDir: {}\n",
        ),
    )?
    .expect_ok("apply locked")?;
    // A shell spinning under a limit of 300m: `kubectl top` reads its cgroup's counters.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "busy",
            &image,
            "Never",
            r#"["sh", "-c", "while :; do :; done"]"#,
            "    resources:\n      limits:\n        cpu: 300m\n",
        ),
    )?
    .expect_ok("apply busy")?;
    assert_eq!(terminated(&up, "hog")?, "OOMKilled 137");
    let t = std::time::Instant::now();
    let top = loop {
        let r = up.kubectl(&["top", "pod", "busy", "--no-headers"])?;
        let cols: Vec<String> = r.stdout.split_whitespace().map(String::from).collect();
        if r.ok && cols.len() == 3 && cols[1] != "0m" {
            break cols;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "kubectl top pod busy: {} {}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let millis: u64 = top[1].trim_end_matches('m').parse()?;
    // Held near 300m (a spinning shell alone takes a whole core): a short window not
    // aligned with the CFS periods can count part of one more period's quota.
    assert!((150..=450).contains(&millis), "{top:?}");
    assert!(top[2].ends_with("Ki") || top[2].ends_with("Mi"), "{top:?}");
    let out = terminated(&up, "unshare")?;
    assert!(out.starts_with("Error ") && !out.ends_with(" 0"), "{out}");
    let logs = up.kubectl(&["logs", "unshare"])?.expect_ok("logs")?.stdout;
    assert!(logs.contains("Operation not permitted"), "{logs}");
    assert_eq!(terminated(&up, "locked")?, "Completed 0");
    let logs = up.kubectl(&["logs", "locked"])?.expect_ok("logs")?.stdout;
    // stdout and stderr are read apart: only each one's own order holds.
    let ids: Vec<&str> = logs
        .lines()
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(ids, ["65534", "65534"], "{logs}");
    assert!(
        logs.contains("read-only") && logs.contains("tmp-ok"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')),
        "{logs}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn bad_images_are_refused_with_reasons() -> anyhow::Result<()> {
    let (reg, _image, _dir, up) = cluster()?;
    // A name the registry does not have: ErrImagePull, then ImagePullBackOff, with events.
    let absent = format!("{}/test/absent:1", reg.addr);
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod("absent", &absent, "Always", r#"["true"]"#, ""),
    )?
    .expect_ok("apply absent")?;
    let msg = up.wait_field(
        60,
        &["pod", "absent"],
        "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        |m| m.starts_with("ImagePullBackOff"),
    )?;
    assert!(msg.contains("not found"), "{msg}");
    let d = up
        .kubectl(&["describe", "pod", "absent"])?
        .expect_ok("describe")?
        .stdout;
    assert!(
        d.contains(&format!("Failed to pull image \"{absent}\"")),
        "{d}"
    );
    assert!(d.contains("Back-off pulling image"), "{d}");

    // A registry that wants credentials: refused without them, pulled with the pod's
    // imagePullSecrets.
    let private = Registry::start_with_auth("puller", "s3cret")?;
    let image = private.push_image(
        "test/private",
        "1",
        &[busybox_layer()?],
        json!({"Env": ["PATH=/bin"], "Cmd": ["echo", "pulled with a secret"]}),
    )?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: no-secret\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n"
        ),
    )?
    .expect_ok("apply no-secret")?;
    let msg = up.wait_field(
        60,
        &["pod", "no-secret"],
        "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        |m| m.starts_with("ErrImagePull") || m.starts_with("ImagePullBackOff"),
    )?;
    assert!(
        msg.contains("refused access") && msg.contains("imagePullSecret"),
        "{msg}"
    );
    up.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={}", private.addr),
        "--docker-username=puller",
        "--docker-password=s3cret",
    ])?
    .expect_ok("create secret")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: with-secret\nspec:\n  restartPolicy: Never\n  imagePullSecrets:\n  - name: regcred\n  containers:\n  - name: main\n    image: {image}\n"
        ),
    )?
    .expect_ok("apply with-secret")?;
    assert_eq!(terminated(&up, "with-secret")?, "Completed 0");
    let logs = up
        .kubectl(&["logs", "with-secret"])?
        .expect_ok("logs")?
        .stdout;
    assert!(logs.contains("pulled with a secret"), "{logs}");
    // A Wasm artifact in the same registry, with the same secret.
    let hello = std::fs::read(example("hello")?)?;
    let wasm = private.push("test/hello", "1", "application/wasm", &hello)?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: wasm-secret\nspec:\n  runtimeClassName: wasm\n  restartPolicy: Never\n  imagePullSecrets:\n  - name: regcred\n  containers:\n  - name: main\n    image: {wasm}\n"
        ),
    )?
    .expect_ok("apply wasm-secret")?;
    up.wait_field(60, &["pod", "wasm-secret"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;

    // A layer whose entries climb out of the root file system.
    let escape = format!("outpost-escape-{}", std::process::id());
    let mut l = LayerBuilder::new();
    l.dir("bin")?;
    l.file(
        &format!("../../../../../../../../tmp/{escape}"),
        b"out",
        0o644,
    )?;
    let bad = reg.push_image(
        "test/escape",
        "1",
        &[l.finish()?],
        json!({"Cmd": ["/bin/x"]}),
    )?;
    // Through a symlink pointing out, then a file under it.
    let mut l = LayerBuilder::new();
    l.symlink("link", "/tmp")?;
    l.file(&format!("link/{escape}"), b"out", 0o644)?;
    let sneaky = reg.push_image(
        "test/sneaky",
        "1",
        &[l.finish()?],
        json!({"Cmd": ["/bin/x"]}),
    )?;
    for (name, img) in [("escape", &bad), ("sneaky", &sneaky)] {
        up.kubectl_in(
            &["apply", "-f", "-"],
            &pod(name, img, "Never", r#"["x"]"#, ""),
        )?
        .expect_ok("apply")?;
        let msg = up.wait_field(
            60,
            &["pod", name],
            "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
            |m| m.starts_with("ErrImagePull") || m.starts_with("ImagePullBackOff"),
        )?;
        assert!(msg.contains("layer"), "{name}: {msg}");
        assert!(
            !std::path::Path::new("/tmp").join(&escape).exists(),
            "{name} wrote outside its root"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn attach_and_run_interactively() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    // kubectl run -i: the pod's stdin (stdinOnce) is what kubectl reads, until its end.
    let r = up.run_interactively(
        "reader",
        &image,
        &[
            "--",
            "sh",
            "-c",
            "read first; echo \"got $first\"; cat; echo done",
        ],
        "one\ntwo\nthree\n",
    )?;
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains("got one\ntwo\nthree\ndone"), "{r:?}");
    assert!(r.stdout.contains("pod \"reader\" deleted"), "{r:?}");
    assert!(
        !r.stderr.contains("falling back"),
        "attached, not logs: {r:?}"
    );
    // kubectl run -it (a terminal faked with script(1)): the container's stdio is a
    // terminal, and kubectl shows what it prints once attached.
    let (out, text) = on_terminal(
        &up,
        None,
        &format!("run -it --restart=Never tty --image={image} -- sh -c 'test -t 0 && test -t 1 && test -t 2 && echo on a tty; sleep 3; echo bye'"),
    )?;
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("bye\n") && !text.contains("falling back"),
        "{text}"
    );
    let logs = up.kubectl(&["logs", "tty"])?.expect_ok("logs tty")?.stdout;
    // What the client typed (script(1) sends a NUL) is echoed among it, as on any terminal.
    assert_eq!(logs.replace('\r', "").replace("^@", ""), "on a tty\nbye\n");
    // ^C at a container's own terminal interrupts what its shell runs, as in exec.
    interrupt_in_a_shell(
        &up,
        &format!("run -it --restart=Never shell --image={image} -- sh"),
        std::time::Duration::from_secs(5),
    )?;
    // kubectl attach follows a running container's output until it ends, over WebSocket and
    // (kubectl 1.27) SPDY.
    for (name, minor) in [("ticker", None), ("ticker-old", Some("1.27"))] {
        up.kubectl_in(
            &["apply", "-f", "-"],
            &pod(
                name,
                &image,
                "Never",
                r#"["sh", "-c", "sleep 1; for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; echo tock $i >&2; sleep 0.2; done"]"#,
                "",
            ),
        )?
        .expect_ok("apply ticker")?;
        up.wait_field(60, &["pod", name], "{.status.phase}", |p| p == "Running")?;
        let r = match minor {
            Some(v) => up.kubectl_v(v, &["attach", name])?,
            None => up.kubectl(&["attach", name])?,
        };
        assert!(r.ok, "{minor:?}: {r:?}");
        assert!(r.stdout.contains("tick 10\n"), "{minor:?}: {r:?}");
        assert!(!r.stdout.contains("tock"), "{minor:?}: {r:?}");
        assert!(r.stderr.contains("tock 10\n"), "{minor:?}: {r:?}");
    }
    // kubectl debug: an ephemeral container joins a running pod (its network), reads what
    // kubectl sends, and runs once; the pod's own container is left alone.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod("target", &image, "Always", r#"["sleep", "3600"]"#, ""),
    )?
    .expect_ok("apply target")?;
    up.wait_field(60, &["pod", "target"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let ip = up
        .kubectl(&["get", "pod", "target", "-o", "jsonpath={.status.podIP}"])?
        .expect_ok("pod IP")?
        .stdout;
    let r = up.kubectl_in(
        &[
            "debug",
            "target",
            &format!("--image={image}"),
            "-c",
            "debugger",
            "-i",
            "--",
            "sh",
            "-c",
            "read x; echo debugging $x; ip -4 -o addr show eth0; echo ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)",
        ],
        "hi\n",
    )?;
    assert!(r.ok, "{r:?}");
    assert!(
        r.stdout.contains("debugging hi")
            && r.stdout.contains(&format!("inet {ip}/"))
            && r.stdout.contains("ns=default"),
        "{r:?}"
    );
    let states = up.wait_field(
        30,
        &["pod", "target"],
        "{.status.ephemeralContainerStatuses[0].name} {.status.ephemeralContainerStatuses[0].state.terminated.exitCode} {.status.containerStatuses[0].restartCount} {.status.phase}",
        |s| s.starts_with("debugger 0 "),
    )?;
    assert_eq!(states, "debugger 0 0 Running");
    // What may not change: an ephemeral container, once there, stays as it is.
    let r = up.kubectl(&[
        "patch",
        "pod",
        "target",
        "--subresource=ephemeralcontainers",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/spec/ephemeralContainers/0"}]"#,
    ])?;
    assert!(!r.ok && r.stderr.contains("may not be removed"), "{r:?}");
    // An ended container has nothing to attach to.
    up.wait_field(30, &["pod", "ticker"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let r = up.kubectl(&["attach", "ticker"])?;
    assert!(!r.ok, "{r:?}");
    assert!(r.stderr.contains("completed pod"), "{r:?}");
    // A Wasm guest's output can be followed too; its run's end ends the attach.
    let sleeper = example("sleeper")?;
    up.outpost(&["module", "push", sleeper.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod("guest", "module:sleeper", "Never", "[\"sleeper\"]", ""),
    )?
    .expect_ok("apply guest")?;
    up.wait_field(60, &["pod", "guest"], "{.status.phase}", |p| p == "Running")?;
    let k = outpost_tests::kubectl_bin(None)?;
    let attached = std::process::Command::new(&k)
        .arg("--kubeconfig")
        .arg(&up.kubeconfig)
        .args(["attach", "guest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    up.kubectl(&["delete", "pod", "guest", "--wait=false"])?
        .expect_ok("delete guest")?;
    let t = std::time::Instant::now();
    let out = attached.wait_with_output()?;
    assert!(
        out.status.success() && t.elapsed() < std::time::Duration::from_secs(20),
        "{out:?} after {:?}",
        t.elapsed()
    );
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn wasm_and_oci_pods_share_a_node() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    let sleeper = example("sleeper")?;
    up.outpost(&["module", "push", sleeper.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    // One Deployment whose pods hold a Wasm container and an OCI one, and a Deployment of
    // Wasm pods rolled out to the OCI image.
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: mixed\nspec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: mixed\n  template:\n    metadata:\n      labels:\n        app: mixed\n    spec:\n      terminationGracePeriodSeconds: 2\n      containers:\n      - name: wasm\n        image: module:sleeper\n      - name: box\n        image: {image}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      terminationGracePeriodSeconds: 2\n      containers:\n      - name: main\n        image: module:sleeper\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply")?;
    for d in ["deployment/mixed", "deployment/web"] {
        up.kubectl(&["rollout", "status", d, "--timeout=90s"])?
            .expect_ok("rollout status")?;
    }
    let ready = up.wait_field(
        30,
        &["pods", "-l", "app=mixed"],
        "{range .items[*]}{.status.containerStatuses[*].ready}{\"\\n\"}{end}",
        |s| s.lines().count() == 2 && s.lines().all(|l| l == "true true"),
    )?;
    assert_eq!(ready.lines().count(), 2);
    up.kubectl(&["set", "image", "deployment/web", &format!("main={image}")])?
        .expect_ok("set image")?;
    up.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?
        .expect_ok("rollout status web")?;
    let pods = up.wait_field(
        30,
        &["pods"],
        "{range .items[*]}{.spec.nodeName} {.status.phase} {.spec.containers[*].image}{\"\\n\"}{end}",
        |s| s.lines().count() == 4 && s.lines().all(|l| l.contains(" Running ")),
    )?;
    let nodes: std::collections::HashSet<&str> =
        pods.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(nodes.len(), 1, "{pods}");
    assert_eq!(
        pods.lines()
            .filter(|l| l.ends_with(&format!("Running {image}")))
            .count(),
        2,
        "{pods}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: OCI pods get network namespaces, veths and a bridge"]
fn oci_pods_have_their_own_network() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    // Two web servers on the same port: each pod has its own address. The readiness probe
    // reaches each at its address.
    let server = r#"["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]"#;
    let probe = "    ports:\n    - containerPort: 8080\n    readinessProbe:\n      httpGet:\n        port: 8080\n        path: /index.html\n      periodSeconds: 1\n";
    for name in ["web-a", "web-b"] {
        up.kubectl_in(
            &["apply", "-f", "-"],
            &pod(name, &image, "Always", server, probe),
        )?
        .expect_ok("apply")?;
    }
    let mut ips = Vec::new();
    for name in ["web-a", "web-b"] {
        up.wait_field(
            60,
            &["pod", name],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            |s| s == "True",
        )?;
        let ip = up.wait_field(5, &["pod", name], "{.status.podIP}", |s| !s.is_empty())?;
        let host = up.wait_field(5, &["pod", name], "{.status.hostIP}", |s| !s.is_empty())?;
        assert_ne!(ip, host, "{name} has its own address");
        assert!(ip.starts_with("10.88."), "{name}: {ip}");
        // The node reaches the pod's port at its address.
        let addr: std::net::IpAddr = ip.parse()?;
        let (code, body) = http_get_at((addr, 8080).into(), "/index.html")?;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body.trim(), format!("hello from {name}"));
        let r = up
            .kubectl(&["exec", name, "--", "ip", "-4", "-o", "addr", "show", "eth0"])?
            .expect_ok("exec ip")?;
        assert!(r.stdout.contains(&format!(" {ip}/16 ")), "{}", r.stdout);
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1]);
    // hostNetwork: the node's address and interfaces.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "on-host",
            &image,
            "Never",
            r#"["sh", "-c", "ip -o link show outpost0"]"#,
            "",
        )
        .replace("  restartPolicy:", "  hostNetwork: true\n  restartPolicy:"),
    )?
    .expect_ok("apply on-host")?;
    assert_eq!(terminated(&up, "on-host")?, "Completed 0");
    let (ip, host) = (
        up.wait_field(5, &["pod", "on-host"], "{.status.podIP}", |s| !s.is_empty())?,
        up.wait_field(5, &["pod", "on-host"], "{.status.hostIP}", |s| {
            !s.is_empty()
        })?,
    );
    assert_eq!(ip, host);
    // A deleted pod's address goes back: its namespace is gone.
    up.kubectl(&["delete", "pod", "web-a", "--grace-period=1"])?
        .expect_ok("delete web-a")?;
    let t = std::time::Instant::now();
    while std::path::Path::new("/run/outpost/ipam/10.88.0.0-16")
        .join(&ips[0])
        .exists()
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{} still leased",
            ips[0]
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn exec_probes_run_in_the_container() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    // Generous timeouts: each try starts a helper process, and the whole suite shares 2 CPUs.
    let probes = "    readinessProbe:\n      exec:\n        command: [\"cat\", \"/tmp/ready\"]\n      periodSeconds: 1\n      timeoutSeconds: 5\n    livenessProbe:\n      exec:\n        command: [\"sh\", \"-c\", \"test ! -e /tmp/die\"]\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 1\n";
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "probed",
            &image,
            "Always",
            r#"["sh", "-c", "touch /tmp/ready; exec sleep 3600"]"#,
            probes,
        ),
    )?
    .expect_ok("apply probed")?;
    let ready = "{.status.conditions[?(@.type==\"Ready\")].status}";
    if let Err(e) = up.wait_field(60, &["pod", "probed"], ready, |s| s == "True") {
        eprintln!("{}", up.kubectl(&["describe", "pod", "probed"])?.stdout);
        return Err(e);
    }
    // Readiness follows the command's exit code.
    up.kubectl(&["exec", "probed", "--", "rm", "/tmp/ready"])?
        .expect_ok("exec rm")?;
    up.wait_field(30, &["pod", "probed"], ready, |s| s == "False")?;
    // A failing liveness command restarts the container, and says why.
    // (Retried while the container is between runs: on a loaded machine a probe that
    // timed out may have restarted it already.)
    let t = std::time::Instant::now();
    loop {
        let r = up.kubectl(&["exec", "probed", "--", "touch", "/tmp/die"])?;
        if r.ok || !r.stderr.contains("is not running") || t.elapsed().as_secs() > 30 {
            r.expect_ok("exec touch")?;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    up.wait_field(
        30,
        &["pod", "probed"],
        "{.status.containerStatuses[0].restartCount}",
        |n| n.parse::<u32>().is_ok_and(|n| n >= 1),
    )?;
    let d = up
        .kubectl(&["describe", "pod", "probed"])?
        .expect_ok("describe")?
        .stdout;
    assert!(d.contains("Liveness probe failed"), "{d}");
    // The restarted container is a fresh one: ready again.
    up.wait_field(60, &["pod", "probed"], ready, |s| s == "True")?;
    Ok(())
}

/// Run `cmd`, failing with its output unless it succeeds.
fn sh(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn images_from_umoci_and_skopeo_run() -> anyhow::Result<()> {
    use std::process::Command;
    // An image made and pushed with the usual tools, as an OCI manifest and as a Docker
    // schema 2 one.
    let reg = Registry::start()?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let layout = w.join("layout");
    let image = format!("{}:1", layout.display());
    sh(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout))?;
    sh(Command::new("umoci").args(["new", "--image", &image]))?;
    let bundle = w.join("bundle");
    sh(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle))?;
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))?;
    for t in ["sh", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(t))?;
    }
    sh(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    sh(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env=PATH=/bin",
        "--config.cmd=sh",
        "--config.cmd=-c",
        "--config.cmd=echo built by umoci",
    ]))?;
    let mut refs = Vec::new();
    for (name, format) in [("oci", "oci"), ("docker", "v2s2")] {
        let dest = format!("{}/interop/{name}:1", reg.addr);
        sh(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--format", format])
            .arg(format!("oci:{image}"))
            .arg(format!("docker://{dest}")))?;
        refs.push((name, dest));
    }
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    for (name, image) in &refs {
        up.kubectl(&["run", name, &format!("--image={image}"), "--restart=Never"])?
            .expect_ok("kubectl run")?;
    }
    for (name, _) in &refs {
        assert_eq!(terminated(&up, name)?, "Completed 0", "{name}");
        let logs = up.kubectl(&["logs", name])?.expect_ok("logs")?.stdout;
        assert_eq!(logs.trim(), "built by umoci", "{name}");
    }
    Ok(())
}

/// A network namespace standing for the world beyond the node: joined to the host by a veth
/// (10.251.0.1 on the host, 10.251.0.2 inside) and knowing no way back to the pod network.
/// Removed, with what runs in it, when dropped.
struct Outside {
    ns: String,
    server: Option<std::process::Child>,
}

impl Outside {
    fn new() -> anyhow::Result<Outside> {
        let ns = format!("oegress{}", std::process::id());
        let (host, inner) = (format!("veh{}", std::process::id()), "eth0");
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("ip").args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&["netns", "add", &ns])?;
        let o = Outside { ns, server: None };
        run(&[
            "link", "add", &host, "type", "veth", "peer", "name", inner, "netns", &o.ns,
        ])?;
        run(&["addr", "add", "10.251.0.1/30", "dev", &host])?;
        run(&["link", "set", &host, "up"])?;
        run(&["-n", &o.ns, "addr", "add", "10.251.0.2/30", "dev", inner])?;
        run(&["-n", &o.ns, "link", "set", inner, "up"])?;
        run(&["-n", &o.ns, "link", "set", "lo", "up"])?;
        Ok(o)
    }

    /// An HTTP server inside on port 8080 that answers with the address it sees the client at.
    fn serve(&mut self) -> anyhow::Result<()> {
        let script = "import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n    def do_GET(self):\n        b = ('from ' + self.client_address[0] + '\\n').encode()\n        self.send_response(200)\n        self.send_header('Content-Length', str(len(b)))\n        self.end_headers()\n        self.wfile.write(b)\nh.HTTPServer(('10.251.0.2', 8080), H).serve_forever()\n";
        self.server = Some(
            std::process::Command::new("ip")
                .args(["netns", "exec", &self.ns, "python3", "-c", script])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        // Listening once the host reaches it (the host is on the veth's network).
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect_timeout(
            &"10.251.0.2:8080".parse()?,
            std::time::Duration::from_millis(200),
        )
        .is_err()
        {
            anyhow::ensure!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "the outside server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Deleting the namespace takes its end of the veth, and with it the host's.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

#[test]
#[ignore = "needs root: OCI pods get network namespaces, and the test makes one for the outside"]
fn oci_pods_reach_beyond_the_node_from_its_address() -> anyhow::Result<()> {
    let (_reg, image, _dir, up) = cluster()?;
    let mut outside = Outside::new()?;
    outside.serve()?;
    // The outside has no route to the pod network: only a masqueraded request is answered,
    // and the server sees the node's address on that link.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod(
            "egress",
            &image,
            "Never",
            // Not exec'd by the shell: as the pid namespace's init, wget would ignore the
            // SIGTERM of `timeout` and hang on where the network is broken.
            r#"["sh", "-c", "timeout 10 wget -q -O - http://10.251.0.2:8080/; exit $?"]"#,
            "",
        ),
    )?
    .expect_ok("apply")?;
    let ended = terminated(&up, "egress")?;
    let logs = up.kubectl(&["logs", "egress"])?.expect_ok("logs")?.stdout;
    assert_eq!(ended, "Completed 0", "{logs}");
    assert_eq!(logs.trim(), "from 10.251.0.1");
    let ip = up.wait_field(5, &["pod", "egress"], "{.status.podIP}", |s| !s.is_empty())?;
    assert!(
        ip.starts_with("10.88."),
        "the pod has its own address: {ip}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn a_dead_agent_leaves_no_container_behind() -> anyhow::Result<()> {
    let (_reg, image, _dir, mut up) = cluster()?;
    up.kubectl(&["run", "sleeper", &format!("--image={image}")])?
        .expect_ok("run sleeper")?;
    up.wait_field(60, &["pod", "sleeper"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let procs = pod_cgroup(&up, "sleeper")?.join("sleeper/cgroup.procs");
    let pids: Vec<u32> = std::fs::read_to_string(&procs)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!pids.is_empty(), "no process in {}", procs.display());
    let zygotes = outpost_tests::children_running(up.pid().expect("outpost up runs"), "oci-zygote");
    assert_eq!(zygotes.len(), 1, "{zygotes:?}");
    // SIGKILL: the agent cannot clean up; its helpers and zygote see their sockets end.
    up.kill();
    let t = std::time::Instant::now();
    let alive = |p: &u32| std::path::Path::new(&format!("/proc/{p}")).exists();
    while pids.iter().chain(&zygotes).any(alive) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "still running after the agent died: {:?}",
            pids.iter()
                .chain(&zygotes)
                .filter(|p| alive(p))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// A layer holding the program `bin` at `/NAME` and the shared libraries it loads (`ldd`).
fn program_layer(bin: &std::path::Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("ldd").arg(bin).output()?;
    let mut b = LayerBuilder::new();
    b.file(name, &std::fs::read(bin)?, 0o755)?;
    let mut dirs = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let mut at = std::path::Path::new(rel).parent();
        let mut parents = Vec::new();
        while let Some(d) = at.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(d.to_string_lossy().to_string());
            at = d.parent();
        }
        for d in parents.into_iter().rev() {
            if dirs.insert(d.clone()) {
                b.dir(&d)?;
            }
        }
        b.file(rel, &std::fs::read(path)?, 0o755)?;
    }
    for d in ["tmp", "proc", "sys", "dev", "tls"] {
        b.dir(d)?;
    }
    b.finish()
}

#[test]
#[ignore = "needs root: OCI containers run through libcontainer"]
fn webhooks_served_by_a_pod_behind_a_service() -> anyhow::Result<()> {
    let (reg, _busybox, dir, up) = cluster()?;
    let hookd = std::path::Path::new(env!("CARGO_BIN_EXE_outpost-hookd"));
    let image = reg.push_image(
        "test/hookd",
        "1",
        &[program_layer(hookd, "hookd")?],
        json!({"Cmd": ["/hookd", "0.0.0.0:8443", "/tls/tls.crt", "/tls/tls.key"]}),
    )?;
    // The webhook's certificate names the Service as the API server calls it.
    let (ca, cert, key) = outpost_tests::hookd::certs(&["hookd.default.svc"])?;
    let (crt_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&crt_file, cert)?;
    std::fs::write(&key_file, key)?;
    up.kubectl(&[
        "create",
        "secret",
        "tls",
        "hookd-tls",
        &format!("--cert={}", crt_file.display()),
        &format!("--key={}", key_file.display()),
    ])?
    .expect_ok("the TLS secret")?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: hookd, labels: {{app: hookd}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: hookd
    image: {image}
    ports: [{{containerPort: 8443, name: https}}]
    readinessProbe: {{tcpSocket: {{port: 8443}}, periodSeconds: 1}}
    volumeMounts: [{{name: tls, mountPath: /tls}}]
  volumes: [{{name: tls, secret: {{secretName: hookd-tls}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: hookd}}
spec:
  selector: {{app: hookd}}
  ports: [{{port: 443, targetPort: https}}]
"#
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("the webhook's pod and Service")?;
    up.wait_field(
        60,
        &["pod", "hookd"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "True",
    )
    .map_err(|e| {
        let d = up.kubectl(&["describe", "pod", "hookd"]).map(|o| o.stdout);
        e.context(d.unwrap_or_default())
    })?;
    up.wait_field(
        30,
        &["endpoints", "hookd"],
        "{.subsets[0].addresses[0].ip}",
        |s| !s.is_empty(),
    )?;
    let ca = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(ca)
    };
    let config = format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: pods.hooks.outpost.test}}
webhooks:
- name: pods.hooks.outpost.test
  clientConfig:
    service: {{namespace: default, name: hookd, path: /validate}}
    caBundle: "{ca}"
  rules:
  - {{operations: ["CREATE"], apiGroups: [""], apiVersions: ["v1"], resources: ["configmaps"]}}
  objectSelector: {{matchExpressions: [{{key: hook/deny, operator: Exists}}]}}
  sideEffects: None
  admissionReviewVersions: ["v1", "v1beta1"]
"#
    );
    up.kubectl_in(&["apply", "-f", "-"], &config)?
        .expect_ok("the webhook configuration")?;
    // Called through the node's link, the pod refuses; what it does not select goes by.
    let denied = up
        .kubectl(&[
            "create",
            "configmap",
            "x",
            "--from-literal=a=b",
            "--dry-run=client",
            "-o",
            "yaml",
        ])?
        .expect_ok("a manifest")?;
    let labelled = denied
        .stdout
        .replace("name: x", "name: x\n  labels: {hook/deny: \"yes\"}");
    let r = up
        .kubectl_in(&["create", "-f", "-"], &labelled)?
        .expect_err("a refused ConfigMap")?;
    anyhow::ensure!(
        r.stderr.contains(
            "admission webhook \"pods.hooks.outpost.test\" denied the request: label hook/deny is set"
        ),
        "{}",
        r.stderr
    );
    up.kubectl(&["create", "configmap", "y", "--from-literal=a=b"])?
        .expect_ok("an unselected ConfigMap")?;
    // With its pod gone, the webhook fails closed with a reason.
    up.kubectl(&["delete", "pod", "hookd", "--wait=true"])?
        .expect_ok("delete the pod")?;
    let r = up
        .kubectl_in(&["create", "-f", "-"], &labelled)?
        .expect_err("no webhook to call")?;
    anyhow::ensure!(
        r.stderr
            .contains("failed calling webhook \"pods.hooks.outpost.test\""),
        "{}",
        r.stderr
    );
    Ok(())
}
