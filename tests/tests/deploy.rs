//! Onto boards, end to end: the aarch64 agent deploy/build.sh cross-builds, written into a
//! disk image by `outpost board-image`, run under Debian's qemu-user-static with the config
//! the image holds, joins a control plane on loopback and runs a Wasm pod the control plane
//! compiled for it; deploy/install.sh installs, upgrades and removes agents and members; the
//! documented config files name exactly the binaries' flags.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_tests::{bin, crate_dir, example, http_get, Node, Up};

fn deploy_dir() -> PathBuf {
    crate_dir().join("../deploy")
}

/// A binary deploy/build.sh made for aarch64.
fn cross_built(name: &str) -> anyhow::Result<PathBuf> {
    let p = deploy_dir()
        .join("out/aarch64-unknown-linux-musl")
        .join(name);
    if !p.is_file() {
        bail!(
            "{} is missing: run deploy/build.sh (the test command does)",
            p.display()
        );
    }
    Ok(p)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A board's disk image as Raspberry Pi OS lays one out: an MBR, a FAT boot partition (left
/// empty here) and an ext4 root file system holding `files` (path, bytes, mode).
fn board_image(dir: &Path, files: &[(&str, &[u8], u32)]) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("rootfs");
    for d in ["etc/systemd/system", "usr/bin", "var/lib"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("etc/hostname"), "board\n")?;
    for (path, bytes, mode) in files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    let part = dir.join("root.ext4");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&part)
        .arg("96M"))?;
    let (boot_at, boot_len, root_at) = (2048u32, 16384u32, 18432u32);
    let root_len = (std::fs::metadata(&part)?.len() / 512) as u32;
    let mut mbr = vec![0u8; 512];
    for (i, (ty, start, len)) in [(0x0cu8, boot_at, boot_len), (0x83, root_at, root_len)]
        .iter()
        .enumerate()
    {
        let e = 446 + 16 * i;
        mbr[e + 4] = *ty;
        mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let image = dir.join("board.img");
    let mut img = mbr;
    img.resize(root_at as usize * 512, 0);
    img.extend(std::fs::read(&part)?);
    std::fs::write(&image, img)?;
    std::fs::remove_file(&part)?;
    Ok(image)
}

/// A file out of the image's root partition (which starts at sector 18432), read by debugfs.
fn image_file(image: &Path, path: &str, out: &Path) -> anyhow::Result<Vec<u8>> {
    let _ = std::fs::remove_file(out);
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump -p {path} {}", out.display()))
        .arg(format!("{}?offset={}", image.display(), 18432 * 512)))?;
    std::fs::read(out).with_context(|| format!("{path} is not in the image"))
}

/// debugfs's `stat` of a path in the image's root partition.
fn image_stat(image: &Path, path: &str) -> anyhow::Result<String> {
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(format!("{}?offset={}", image.display(), 18432 * 512)))
}

/// The root partition, fsck'ed on a copy: the command left a consistent file system.
fn fsck_root(image: &Path, dir: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(image)?;
    let copy = dir.join("fsck.ext4");
    std::fs::write(&copy, &bytes[18432 * 512..])?;
    run(Command::new("e2fsck").arg("-fn").arg(&copy))?;
    std::fs::remove_file(&copy)?;
    Ok(())
}

/// `outpost module push` of an example; its image reference.
fn push(up: &Up, name: &str) -> anyhow::Result<String> {
    let path = example(name)?;
    let r = up
        .outpost(&["module", "push", path.to_str().unwrap_or_default()])?
        .expect_ok("outpost module push")?;
    Ok(r.stdout.trim().to_string())
}

fn pod(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  runtimeClassName: wasm\n  restartPolicy: Never\n{extra}  containers:\n  - name: main\n    image: {image}\n    args: [\"from\", \"arm\"]\n"
    )
}

/// The whole path a board takes: `outpost board-image` writes the aarch64 agent (the build
/// without a compiler), its unit and its config into a board image; the agent and config
/// read back out of the image run under qemu-user as the board would run them, join the
/// control plane, register as arm64, and run a Wasm pod to completion from the artifact
/// the control plane compiled for aarch64.
#[test]
fn a_board_image_agent_joins_under_qemu_and_runs_wasm_compiled_for_it() -> anyhow::Result<()> {
    let agent = cross_built("outpost-node-aot")?;
    let dir = tempfile::tempdir()?;
    let agent_bytes = std::fs::read(&agent)?;
    // The image's own /usr/bin/env tells the command the board is aarch64.
    let image = board_image(dir.path(), &[("/usr/bin/env", &agent_bytes, 0o755)])?;
    let up = Up::start(dir.path())?;
    let token = up.token()?;

    // An agent of the wrong architecture, a file that is no image and a bad token are
    // refused, and leave the image as it was.
    let before = std::fs::read(&image)?;
    let host_agent = bin("outpost-node");
    let (image_s, agent_s) = (
        image.to_str().unwrap_or_default(),
        agent.to_str().unwrap_or_default(),
    );
    for (target, with, tok, why) in [
        (
            image_s,
            host_agent.to_str().unwrap_or_default(),
            token.as_str(),
            "is aarch64 but the agent is x86_64",
        ),
        (agent_s, agent_s, token.as_str(), "no partition table"),
        (image_s, agent_s, "op1.nope", "token"),
    ] {
        let r = up
            .outpost(&[
                "board-image",
                target,
                "--agent",
                with,
                "--server",
                "127.0.0.1:1",
                "--token",
                tok,
            ])?
            .expect_err("board-image refuses")?;
        assert!(r.stderr.contains(why), "{}", r.stderr);
    }
    assert!(
        std::fs::read(&image)? == before,
        "a refused command changed the image"
    );

    let gateway = up.gateway();
    let r = up
        .outpost(&[
            "board-image",
            image_s,
            "--agent",
            agent_s,
            "--server",
            &gateway,
            "--token",
            &token,
            "--name",
            "pi",
        ])?
        .expect_ok("board-image")?;
    assert!(r.stdout.contains("partition 2"), "{}", r.stdout);
    fsck_root(&image, dir.path())?;

    // What the board boots with.
    let scratch = dir.path().join("x");
    let board_agent = dir.path().join("outpost-node");
    assert_eq!(
        image_file(&image, "/usr/local/bin/outpost-node", &board_agent)?,
        agent_bytes
    );
    let unit = image_file(&image, "/etc/systemd/system/outpost-node.service", &scratch)?;
    assert_eq!(
        unit,
        std::fs::read(deploy_dir().join("outpost-node.service"))?
    );
    let stat = image_stat(
        &image,
        "/etc/systemd/system/multi-user.target.wants/outpost-node.service",
    )?;
    assert!(stat.contains("symlink"), "{stat}");
    let config_path = dir.path().join("node.toml");
    let config = image_file(&image, "/etc/outpost/node.toml", &config_path)?;
    let config = String::from_utf8(config)?;
    assert!(config.contains(&format!("token = \"{token}\"")), "{config}");
    assert!(config.contains("name = \"pi\""), "{config}");
    let mode = image_stat(&image, "/etc/outpost/node.toml")?;
    assert!(
        mode.contains("Mode:  0600"),
        "the token's file is private: {mode}"
    );

    // Boot: the agent from the image, with the config from the image.
    let mut node = Node::new(&dir.path().join("board"));
    node.program = Some(vec!["qemu-aarch64-static".into(), board_agent]);
    node.start(&["--config", config_path.to_str().unwrap_or_default()])?;
    up.node_ready(&node, "pi", 120)?;
    let arch = up.wait_field(
        5,
        &["node", "pi"],
        "{.metadata.labels.kubernetes\\.io/arch}",
        |a| !a.is_empty(),
    )?;
    assert_eq!(arch, "arm64");

    // A Wasm pod for arm64 runs to completion from the control plane's artifact.
    let hello = push(&up, "hello")?;
    let image_ref = hello;
    let selector = "  nodeSelector:\n    kubernetes.io/arch: arm64\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("arm", &image_ref, selector))?
        .expect_ok("apply")?;
    up.wait_field(180, &["pod", "arm"], "{.status.phase}", |p| {
        p == "Succeeded" || p == "Failed"
    })
    .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", node.logs()))?;
    let phase = up.wait_field(
        5,
        &["pod", "arm"],
        "{.status.phase}/{.spec.nodeName}",
        |p| !p.is_empty(),
    )?;
    assert_eq!(phase, "Succeeded/pi", "node log: {}", node.logs());
    let logs = up.kubectl(&["logs", "arm"])?.expect_ok("logs")?;
    assert!(logs.stdout.contains("Hello, edge!"), "{}", logs.stdout);
    assert!(logs.stdout.contains("args: from arm"), "{}", logs.stdout);
    // The artifact came from the control plane's compiler, which keeps it.
    let cached: Vec<String> = std::fs::read_dir(up.dir.join("control/aot"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached.iter().any(|f| f.contains(".aarch64.")),
        "no aarch64 artifact in the control plane's cache: {cached:?}"
    );
    Ok(())
}

/// A module that is not valid Wasm is refused by the control plane's compiler with the
/// reason, as the pod's waiting reason; nothing crashes.
#[test]
fn the_compiler_refuses_a_bad_module_with_its_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let mut node = Node::new(&dir.path().join("aot"));
    let token = up.token()?;
    node.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &token,
        "--name",
        "aot",
        "--wasm-compile",
        "control",
    ])?;
    up.node_ready(&node, "aot", 30)?;
    // The Wasm magic, then garbage: the store takes it, the compiler does not.
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0\x01\xff\xff\xff")?;
    let r = up
        .outpost(&["module", "push", bad.to_str().unwrap_or_default()])?
        .expect_ok("push")?;
    let selector = "  nodeSelector:\n    kubernetes.io/hostname: aot\n";
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod("bad", r.stdout.trim(), selector),
    )?
    .expect_ok("apply")?;
    let why = up.wait_field(
        60,
        &["pod", "bad"],
        "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        |s| s.starts_with("CreateContainerError"),
    )?;
    assert!(why.contains("compiling"), "{why}");
    // And a good one runs on the same node, compiled by the control plane.
    let hello = push(&up, "hello")?;
    up.kubectl_in(&["apply", "-f", "-"], &pod("good", &hello, selector))?
        .expect_ok("apply")?;
    up.wait_field(60, &["pod", "good"], "{.status.phase}", |p| {
        p == "Succeeded"
    })
    .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", node.logs()))?;
    Ok(())
}

/// The long flags `BIN --help` lists, without help, version and config.
fn flags(bin_path: &Path) -> anyhow::Result<BTreeSet<String>> {
    let help = run(Command::new(bin_path).arg("--help"))?;
    // Option lines: `  --data-dir <DATA_DIR>` or `  -h, --help`.
    Ok(help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .filter(|r| r.get(1..3) == Some(", "))
                .map_or(l, |r| &r[3..]);
            l.strip_prefix("--")
        })
        .map(|w| {
            w.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|f| !f.is_empty() && !["help", "version", "config"].contains(&f.as_str()))
        .collect())
}

/// The keys a documented config file shows, set or commented out (`# key = value`).
fn keys(file: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(file)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches('#').trim();
            let (k, _) = l.split_once(" = ")?;
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-')
                .then(|| k.to_string())
        })
        .collect())
}

/// Every flag of each binary is in its documented config file and every key there is a
/// flag; and a binary started with its file takes the settings (an unknown key is refused).
#[test]
fn config_files_and_flags_agree() -> anyhow::Result<()> {
    for (b, file) in [
        ("outpost-node", "node.toml"),
        ("outpost-control", "control.toml"),
    ] {
        let f = flags(&bin(b))?;
        let k = keys(&deploy_dir().join(file))?;
        assert_eq!(
            f, k,
            "{b}'s flags (left) and deploy/{file}'s keys (right) differ"
        );
        assert!(f.len() > 10, "{b}: {f:?}");
    }
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max-pod = 3\n")?;
    let out = Command::new(bin("outpost-node"))
        .args(["--config", bad.to_str().unwrap_or_default()])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"max-pod\" is not a setting"), "{err}");
    Ok(())
}

fn mode(p: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777)
}

fn install(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("bash")
        .arg(deploy_dir().join("install.sh"))
        .args(args))
}

/// deploy/install.sh into a root file system (as a chroot or a board would have it): the
/// node's binary, unit (enabled) and config; the installed agent joins with the token it was
/// given; an upgrade swaps the binary under the running agent and keeps config, identity
/// and pods; uninstall removes it all. The control plane's install runs a member from its
/// config file.
#[test]
fn install_upgrade_and_uninstall_a_node_and_a_member() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start_with(dir.path(), &["--no-node"])?;
    let root = dir.path().join("root");
    // The data dir as the installed system names it, and where that is from here: the
    // agent below gets the latter on its command line, which overrides the file.
    let data = root.join("var/lib/outpost-edge");
    let token = up.token()?;
    let gateway = up.gateway();
    let first = dir.path().join("outpost-node.v1");
    std::fs::copy(bin("outpost-node"), &first)?;
    let out = install(&[
        "node",
        "--root",
        root.to_str().unwrap_or_default(),
        "--server",
        &gateway,
        "--token",
        &token,
        "--name",
        "installed",
        "--data-dir",
        "/var/lib/outpost-edge",
        "--binary",
        first.to_str().unwrap_or_default(),
    ])?;
    assert!(out.contains("starts at the system's next boot"), "{out}");
    let installed = root.join("usr/local/bin/outpost-node");
    let conf = root.join("etc/outpost/node.toml");
    let unit = root.join("etc/systemd/system/outpost-node.service");
    assert_eq!(mode(&installed)?, 0o755);
    assert_eq!(mode(&conf)?, 0o600);
    assert_eq!(
        std::fs::read(&unit)?,
        std::fs::read(deploy_dir().join("outpost-node.service"))?
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants/outpost-node.service");
    assert_eq!(
        std::fs::read_link(&wants)?,
        Path::new("/etc/systemd/system/outpost-node.service")
    );
    let settings = std::fs::read_to_string(&conf)?;
    for want in [
        format!("server = \"{gateway}\""),
        format!("token = \"{token}\""),
        "name = \"installed\"".to_string(),
        "data-dir = \"/var/lib/outpost-edge\"".to_string(),
    ] {
        assert!(settings.contains(&want), "{want} not in {settings}");
    }
    // A first install without a token is refused.
    let r = Command::new("bash")
        .arg(deploy_dir().join("install.sh"))
        .args([
            "node",
            "--root",
            dir.path().join("other").to_str().unwrap_or_default(),
        ])
        .output()?;
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--token"));

    // Boot: the unit's command line, from the installed files.
    let mut node = Node::new(&data);
    node.program = Some(vec![installed.clone(), "--config".into(), conf.clone()]);
    node.start(&[])?;
    up.node_ready(&node, "installed", 60)?;

    // A pod serving HTTP on it.
    let port = outpost_tests::free_tcp_port();
    let http = push(&up, "http-hello")?;
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  runtimeClassName: wasm\n  hostNetwork: true\n  containers:\n  - name: main\n    image: {}\n    ports:\n    - containerPort: {port}\n",
        http
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply")?;
    up.wait_field(60, &["pod", "web"], "{.status.phase}", |p| p == "Running")
        .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", node.logs()))?;
    let uid = up.wait_field(5, &["pod", "web"], "{.metadata.uid}", |u| !u.is_empty())?;
    wait_http(port, 30)?;
    let cert = std::fs::read(data.join("pki/node.crt"))?;

    // Upgrade: a new build (here the same code with bytes appended, so it differs) swapped
    // in under the running agent; the config stays as it was.
    let second = dir.path().join("outpost-node.v2");
    let mut v2 = std::fs::read(bin("outpost-node"))?;
    v2.extend_from_slice(b"\0outpost upgrade test\0");
    std::fs::write(&second, &v2)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&second, std::fs::Permissions::from_mode(0o755))?;
    }
    let conf_before = std::fs::read(&conf)?;
    install(&[
        "node",
        "--root",
        root.to_str().unwrap_or_default(),
        "--binary",
        second.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(
        std::fs::read(&installed)?,
        v2,
        "the binary was not replaced"
    );
    assert_eq!(
        std::fs::read(&conf)?,
        conf_before,
        "an upgrade rewrote the config"
    );
    // The old agent still runs from the replaced file until restarted, as systemd would.
    wait_http(port, 5)?;
    node.kill();
    let t = Instant::now();
    node.start(&[])?;
    // Pods come back from the cache; the identity is the same, with no new join (the token
    // was for one use only).
    wait_http(port, 30).map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", node.logs()))?;
    let back = t.elapsed();
    up.wait_field(30, &["pod", "web"], "{.status.phase}", |p| p == "Running")?;
    assert_eq!(
        up.wait_field(5, &["pod", "web"], "{.metadata.uid}", |u| !u.is_empty())?,
        uid
    );
    up.wait_field(
        30,
        &["node", "installed"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "True",
    )?;
    let nodes = up
        .kubectl(&["get", "nodes", "-o", "name"])?
        .expect_ok("nodes")?;
    assert_eq!(nodes.stdout.trim(), "node/installed", "{}", nodes.stdout);
    let cert_after = std::fs::read(data.join("pki/node.crt"))?;
    assert_eq!(cert, cert_after, "the node's identity changed");
    assert_eq!(
        node.logs().matches("joined the cluster").count(),
        1,
        "the upgraded agent joined again"
    );
    eprintln!("serving again {back:?} after the upgraded agent started");

    // Uninstall keeps data unless purged; --purge takes config and data.
    node.kill();
    install(&[
        "uninstall",
        "node",
        "--root",
        root.to_str().unwrap_or_default(),
    ])?;
    assert!(!installed.exists() && !unit.exists() && !wants.exists());
    assert!(conf.exists() && data.exists());
    install(&[
        "uninstall",
        "node",
        "--root",
        root.to_str().unwrap_or_default(),
        "--purge",
    ])?;
    assert!(!conf.exists() && !data.exists());

    // A control plane member from its installed config (ports and data dir given on the
    // command line, as flags override the file).
    let croot = dir.path().join("croot");
    let bindir = bin("outpost-control");
    install(&[
        "control",
        "--root",
        croot.to_str().unwrap_or_default(),
        "--binary",
        bindir.parent().and_then(Path::to_str).unwrap_or_default(),
        "--api-listen",
        "127.0.0.1:6443",
    ])?;
    let cconf = croot.join("etc/outpost/control.toml");
    assert!(croot.join("usr/local/bin/outpost").is_file());
    assert!(std::fs::read_to_string(&cconf)?.contains("api-listen = \"127.0.0.1:6443\""));
    let api = outpost_tests::free_tcp_port();
    let cdata = dir.path().join("cdata");
    let log = std::fs::File::create(dir.path().join("control.log"))?;
    let mut member = Command::new(croot.join("usr/local/bin/outpost-control"))
        .arg("--config")
        .arg(&cconf)
        .arg("--data-dir")
        .arg(&cdata)
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--peer-listen")
        .arg(format!("127.0.0.1:{}", outpost_tests::free_udp_port()))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", outpost_tests::free_tcp_port()))
        .stderr(log)
        .spawn()?;
    let kubeconfig = dir.path().join("member.kubeconfig");
    let t = Instant::now();
    let mut last = String::new();
    let r = loop {
        if cdata.join("pki/ca.key").exists() {
            let kc = run(Command::new(bin("outpost"))
                .args(["kubeconfig", "--pki-dir"])
                .arg(cdata.join("pki"))
                .args(["--group", "system:masters"])
                .args(["--server", &format!("https://127.0.0.1:{api}")]))?;
            std::fs::write(&kubeconfig, kc)?;
            let r = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "namespace", "kube-system", "-o", "name"])
                .output()?;
            if r.status.success() {
                break String::from_utf8_lossy(&r.stdout).into_owned();
            }
            last = String::from_utf8_lossy(&r.stderr).into_owned();
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = member.kill();
            bail!(
                "the installed member did not serve ({last}): {}",
                std::fs::read_to_string(dir.path().join("control.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = member.kill();
    let _ = member.wait();
    assert_eq!(r.trim(), "namespace/kube-system");
    install(&[
        "uninstall",
        "control",
        "--root",
        croot.to_str().unwrap_or_default(),
        "--purge",
    ])?;
    assert!(!croot.join("usr/local/bin/outpost-control").exists() && !cconf.exists());
    Ok(())
}

fn wait_http(port: u16, secs: u64) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        match http_get(port, "/") {
            Ok((200, _)) => return Ok(()),
            r if t.elapsed() > Duration::from_secs(secs) => {
                bail!("port {port} does not serve after {secs}s: {r:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The systemd units load without a warning (`systemd-analyze verify`, the binary swapped for
/// /bin/true since none is installed here), and the control plane's confinement scores as
/// systemd's own audit rates a well-confined service.
#[test]
fn the_units_verify_and_the_control_plane_is_confined() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for unit in ["outpost-node.service", "outpost-control.service"] {
        let text = std::fs::read_to_string(deploy_dir().join(unit))?;
        assert!(text.contains("Restart=always"), "{unit}");
        let test_unit = dir.path().join(unit);
        let exec = text
            .lines()
            .map(|l| {
                if l.starts_with("ExecStart=") {
                    "ExecStart=/bin/true --config /etc/outpost/x.toml".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&test_unit, exec)?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&test_unit)
            .output()
            .context("systemd-analyze (Debian's systemd)")?;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }
    let audit = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(dir.path().join("outpost-control.service")))?;
    let level: f64 = audit
        .lines()
        .find_map(|l| l.split("outpost-control.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no exposure level in systemd-analyze's audit")?;
    assert!(level <= 2.5, "exposure {level}: {audit}");
    Ok(())
}
