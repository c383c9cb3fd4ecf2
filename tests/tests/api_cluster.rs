//! The Kubernetes API on a three-member control plane: writes and reads through any member,
//! and kubectl keeps working through the survivors after the leader is killed with SIGKILL; a
//! node joined through a follower keeps its link and its pods when the leader dies, and its
//! pods' logs and port-forwards come through every member.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use outpost_tests::{bin, client, cluster_with, kubectl_bin, kubectl_with, leader, Member, Run};

fn kubeconfig(root: &Path, m: &Member) -> anyhow::Result<PathBuf> {
    let api = m.api.as_ref().context("member serves no API")?;
    let out = std::process::Command::new(bin("outpost"))
        .args([
            "kubeconfig",
            "--server",
            &format!("https://{api}"),
            "--group",
            "system:masters",
        ])
        .arg("--pki-dir")
        .arg(m.dir.join("pki"))
        .output()?;
    ensure!(
        out.status.success(),
        "outpost kubeconfig: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = root.join(format!("kubeconfig.{}", m.id));
    std::fs::write(&path, out.stdout)?;
    Ok(path)
}

fn kubectl(root: &Path, cfg: &Path, args: &[&str]) -> anyhow::Result<Run> {
    kubectl_with(&kubectl_bin(None)?, cfg, &root.join("cache"), args, None)
}

/// Retry while the cluster elects a new leader.
fn retry(root: &Path, cfg: &Path, args: &[&str]) -> anyhow::Result<Run> {
    retry_with(root, cfg, args, None)
}

/// Like [`retry`], with `stdin` for kubectl.
fn retry_in(root: &Path, cfg: &Path, args: &[&str], stdin: &str) -> anyhow::Result<Run> {
    retry_with(root, cfg, args, Some(stdin))
}

fn retry_with(root: &Path, cfg: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = kubectl_with(&kubectl_bin(None)?, cfg, &root.join("cache"), args, stdin)?;
        if r.ok || Instant::now() > deadline {
            return r.expect_ok(&args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

const CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gauges.ha.example.com}
spec:
  group: ha.example.com
  scope: Namespaced
  names: {plural: gauges, kind: Gauge}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties: {spec: {type: object, properties: {level: {type: integer}}}}
";

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_through_every_member_and_after_leader_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let mut members = cluster_with(&root, 3, &[], true).await?;
    let cfgs: Vec<PathBuf> = members
        .iter()
        .map(|m| kubeconfig(&root, m))
        .collect::<Result<_, _>>()?;
    let r = root.clone();
    let c2 = cfgs.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        retry(&r, &c2[1], &["get", "ns", "default"])?;
        retry(&r, &c2[1], &["create", "ns", "ha"])?;
        retry(
            &r,
            &c2[2],
            &[
                "create",
                "configmap",
                "one",
                "-n",
                "ha",
                "--from-literal=k=1",
            ],
        )?;
        // A write through one member is visible at once through the others (linearizable reads).
        for cfg in &c2 {
            let g = kubectl(
                &r,
                cfg,
                &[
                    "get",
                    "configmap",
                    "one",
                    "-n",
                    "ha",
                    "-o",
                    "jsonpath={.data.k}",
                ],
            )?
            .expect_ok("read back")?;
            ensure!(g.stdout == "1", "{}", g.stdout);
        }
        // A CRD made through one member is served by every member.
        retry_in(&r, &c2[0], &["apply", "-f", "-"], CRD)?;
        retry_in(
            &r,
            &c2[1],
            &["apply", "-n", "ha", "-f", "-"],
            "apiVersion: ha.example.com/v1\nkind: Gauge\nmetadata: {name: g}\nspec: {level: 3}\n",
        )?;
        let g = retry(
            &r,
            &c2[2],
            &[
                "get",
                "gauges",
                "-n",
                "ha",
                "-o",
                "jsonpath={.items[*].spec.level}",
            ],
        )?;
        ensure!(g.stdout == "3", "{}", g.stdout);
        Ok(())
    })
    .await??;

    // The `kubernetes` Service leads to every member's API: one EndpointSlice each, labelled
    // with its member id, and their addresses in the Endpoints.
    let endpoints = |cfg: PathBuf, want: usize| {
        let r = root.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(String, String)> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let slices = retry(
                    &r,
                    &cfg,
                    &[
                        "get",
                        "endpointslices",
                        "-l",
                        "kubernetes.io/service-name=kubernetes",
                        "-o",
                        "jsonpath={range .items[*]}{.metadata.labels.outpost\\.dev/member} {.ports[0].port}{\"\\n\"}{end}",
                    ],
                )?
                .stdout;
                let ports = retry(
                    &r,
                    &cfg,
                    &[
                        "get",
                        "endpoints",
                        "kubernetes",
                        "-o",
                        "jsonpath={.subsets[*].ports[0].port}",
                    ],
                )?
                .stdout;
                if (slices.lines().count(), ports.split(' ').count()) == (want, want)
                    || std::time::Instant::now() > deadline
                {
                    return Ok((slices, ports));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let (slices, ports) = endpoints(cfgs[0].clone(), 3).await??;
    for m in &members {
        let port = m
            .api
            .as_deref()
            .and_then(|a| a.rsplit(':').next())
            .unwrap_or("");
        ensure!(
            slices.lines().any(|l| l == format!("{} {port}", m.id)),
            "member {} at {port}: {slices}",
            m.id
        );
        ensure!(ports.split(' ').any(|p| p == port), "{port} in {ports}");
    }

    let c = client();
    let refs: Vec<&Member> = members.iter().collect();
    let lead = leader(&c, &refs).await?;
    let idx = members
        .iter()
        .position(|m| m.id == lead)
        .context("leader")?;
    members[idx].kill();
    let survivors: Vec<PathBuf> = (0..3)
        .filter(|i| *i != idx)
        .map(|i| cfgs[i].clone())
        .collect();
    let r = root.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        retry(
            &r,
            &survivors[0],
            &["create", "configmap", "two", "-n", "ha"],
        )?;
        let l = retry(
            &r,
            &survivors[1],
            &["get", "configmap", "-n", "ha", "-o", "name"],
        )?;
        ensure!(
            l.stdout.contains("configmap/one") && l.stdout.contains("configmap/two"),
            "{}",
            l.stdout
        );
        retry(
            &r,
            &survivors[1],
            &["label", "configmap", "one", "-n", "ha", "after=kill"],
        )?;
        let g = kubectl(
            &r,
            &survivors[0],
            &[
                "get",
                "configmap",
                "one",
                "-n",
                "ha",
                "-o",
                "jsonpath={.metadata.labels.after}",
            ],
        )?;
        if g.stdout != "kill" {
            bail!("label not seen through the other survivor: {g:?}");
        }
        Ok(())
    })
    .await??;
    // The dead member removed (through a survivor's admin API), the Service no longer leads
    // to it.
    let other = members.iter().find(|m| m.running()).context("a survivor")?;
    let removed = c
        .delete(other.url(&format!("/v1/members/{lead}")))
        .send()
        .await?;
    ensure!(removed.status().is_success(), "{:?}", removed.text().await?);
    let survivor = cfgs[(0..3).find(|i| *i != idx).context("survivor")?].clone();
    let (slices, ports) = endpoints(survivor, 2).await??;
    let dead = members[idx]
        .api
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .unwrap_or("")
        .to_string();
    ensure!(
        slices.lines().count() == 2 && !slices.lines().any(|l| l.starts_with(&format!("{lead} "))),
        "{slices}"
    );
    ensure!(
        ports.split(' ').count() == 2 && !ports.split(' ').any(|p| p == dead),
        "{ports}"
    );
    Ok(())
}

/// `outpost` with `args` against `cfg`; its stdout.
fn outpost(cfg: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin("outpost"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cfg)
        .output()?;
    ensure!(
        out.status.success(),
        "outpost {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn pod(name: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  runtimeClassName: wasm\n  containers:\n  - name: main\n    image: module:sleeper\n")
}

/// Poll `jsonpath` of `what` through `cfg` until `ok`.
fn wait_for(
    root: &Path,
    cfg: &Path,
    what: &[&str],
    jsonpath: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        let p = format!("jsonpath={jsonpath}");
        args.extend(["-o", &p]);
        let r = kubectl(root, cfg, &args)?;
        if r.ok && ok(&r.stdout) {
            return Ok(r.stdout);
        }
        if Instant::now() > deadline {
            bail!(
                "{} {jsonpath}: last {:?} {}",
                what.join(" "),
                r.stdout,
                r.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_link_survives_a_leader_change() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let mut members = cluster_with(&root, 3, &[], true).await?;
    let c = client();
    let refs: Vec<&Member> = members.iter().collect();
    let lead = leader(&c, &refs).await?;
    // The node joins through a follower's gateway; then the leader dies under it.
    let via = members
        .iter()
        .position(|m| m.id != lead)
        .context("a follower")?;
    let cfg = kubeconfig(&root, &members[via])?;
    let every: Vec<PathBuf> = members
        .iter()
        .map(|m| kubeconfig(&root, m))
        .collect::<anyhow::Result<_>>()?;
    let server = members[via].api.clone().context("api")?;
    let example = outpost_tests::crate_dir().join("../examples/out/sleeper.wasm");
    let r = root.clone();
    let mut node = outpost_tests::Node::new(&root.join("node"));
    let node = tokio::task::spawn_blocking(move || -> anyhow::Result<outpost_tests::Node> {
        let token = outpost(&cfg, &["token", "create"])?;
        outpost(
            &cfg,
            &["module", "push", example.to_str().unwrap_or_default()],
        )?;
        node.start(&["--server", &server, "--token", &token, "--name", "ha-node"])?;
        wait_for(
            &r,
            &cfg,
            &["node", "ha-node"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            |s| s == "True",
        )?;
        retry_in(&r, &cfg, &["apply", "-f", "-"], &pod("before"))?;
        wait_for(&r, &cfg, &["pod", "before"], "{.status.phase}", |p| {
            p == "Running"
        })?;
        // Its output through every member: the two without the node's link go through the
        // one that has it.
        for c in &every {
            let out = retry(&r, c, &["logs", "before"])?.stdout;
            ensure!(out.contains("up"), "logs through {c:?}: {out:?}");
        }
        // A port-forward through a member without the link carries bytes both ways. The
        // pod shares the node's network, so its port is an echo server this test runs.
        let port = outpost_tests::echo_server()?;
        let echo_pod = format!("{}    ports:\n    - containerPort: {port}\n", pod("echo"));
        retry_in(&r, &cfg, &["apply", "-f", "-"], &echo_pod)?;
        wait_for(&r, &cfg, &["pod", "echo"], "{.status.phase}", |p| {
            p == "Running"
        })?;
        let other = every
            .iter()
            .find(|c| **c != cfg)
            .context("another member")?;
        let fwd = outpost_tests::port_forward(
            other,
            &r.join("cache"),
            None,
            &[],
            &["pod/echo", &format!(":{port}")],
        )?;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", fwd.local))?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let sent: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut conn, &sent)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut got)?;
        ensure!(
            got == sent,
            "echoed {} of {} bytes through another member: {}",
            got.len(),
            sent.len(),
            fwd.stderr()
        );
        Ok(node)
    })
    .await??;
    let idx = members
        .iter()
        .position(|m| m.id == lead)
        .context("leader")?;
    members[idx].kill();
    let refs: Vec<&Member> = members.iter().filter(|m| m.running()).collect();
    let new = leader(&c, &refs).await?;
    ensure!(new != lead, "the dead member still leads");
    let cfg = kubeconfig(&root, &members[via])?;
    let r = root.clone();
    let logs = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        // A pod created after the change reaches the node over the same link; the one from
        // before was not restarted.
        retry_in(&r, &cfg, &["apply", "-f", "-"], &pod("after"))?;
        wait_for(&r, &cfg, &["pod", "after"], "{.status.phase}", |p| {
            p == "Running"
        })?;
        let restarts = wait_for(
            &r,
            &cfg,
            &["pod", "before"],
            "{.status.containerStatuses[0].restartCount}",
            |c| !c.is_empty(),
        )?;
        ensure!(restarts == "0", "restarted {restarts} times");
        Ok(node.logs())
    })
    .await??;
    let links = logs.matches("connected to the control plane").count();
    ensure!(links == 1, "the node connected {links} times:\n{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_renews_its_certificate_while_connected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    // Certificates valid for 30 s: renewed once a third is left, well before they expire.
    let members = cluster_with(&root, 1, &["--node-cert-ttl", "30"], true).await?;
    let cfg = kubeconfig(&root, &members[0])?;
    let server = members[0].api.clone().context("api")?;
    let r = root.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut node = outpost_tests::Node::new(&r.join("node"));
        let token = outpost(&cfg, &["token", "create"])?;
        node.start(&["--server", &server, "--token", &token, "--name", "renewing"])?;
        let ready = |r: &Path| {
            wait_for(
                r,
                &cfg,
                &["node", "renewing"],
                "{.status.conditions[?(@.type==\"Ready\")].status}",
                |s| s == "True",
            )
        };
        ready(&r)?;
        let joined = Instant::now();
        let cert = r.join("node/pki/node.crt");
        let first = std::fs::read_to_string(&cert)?;
        while !node.logs().contains("node certificate renewed") {
            ensure!(
                joined.elapsed() < Duration::from_secs(45),
                "no renewal: {}",
                node.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        ensure!(
            std::fs::read_to_string(&cert)? != first,
            "the same certificate"
        );
        // Once the first certificate has expired, a restarted agent still gets in: with the
        // renewed one.
        while joined.elapsed() < Duration::from_secs(32) {
            std::thread::sleep(Duration::from_millis(250));
        }
        node.kill();
        node.start(&[])?;
        let t = Instant::now();
        while node
            .logs()
            .matches("connected to the control plane")
            .count()
            < 2
        {
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "no reconnect: {}",
                node.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        ready(&r)?;
        Ok(())
    })
    .await??;
    Ok(())
}

/// `outpost-control --server HOST:PORT --token T` with a member token: the new member gets
/// the cluster's CAs from the member it names (trusted through the token's CA pin), joins,
/// and serves kubectl under the same CA. A node token, a used member token and a garbled one
/// are refused with the reason, before the member writes anything.
#[tokio::test(flavor = "multi_thread")]
async fn members_join_with_a_member_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let mut members = cluster_with(&root, 1, &[], true).await?;
    let api1 = members[0].api.clone().context("api")?;
    let cfg1 = kubeconfig(&root, &members[0])?;
    let token = |extra: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(bin("outpost"))
            .args(["token", "create"])
            .args(extra)
            .arg("--kubeconfig")
            .arg(&cfg1)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let member_token = token(&["--member"])?;
    let node_token = token(&[])?;
    // A would-be member that must be refused: its error, and nothing in its pki directory.
    let refused = |id: u64, token: &str| -> anyhow::Result<String> {
        let data = root.join(format!("refused{id}"));
        let out = std::process::Command::new(bin("outpost-control"))
            .args(["--id", &id.to_string(), "--server", &api1, "--token", token])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--peer-listen",
                &format!("127.0.0.1:{}", outpost_tests::free_udp_port()),
            ])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", outpost_tests::free_tcp_port()),
            ])
            .output()?;
        ensure!(!out.status.success(), "member {id} started with {token}");
        ensure!(!data.join("pki").join("ca.key").exists());
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let said = refused(9, &node_token)?;
    ensure!(said.contains("this is a node token"), "{said}");
    // An id already in the cluster is refused, and the token is not spent on it.
    let said = refused(1, &member_token)?;
    ensure!(
        said.contains("member id 1 is already in the cluster"),
        "{said}"
    );

    let mut m2 = Member::new(2, &root, &["--server", &api1, "--token", &member_token]);
    m2.api = Some(format!("127.0.0.1:{}", outpost_tests::free_tcp_port()));
    m2.start(None)?;
    let c = client();
    let first = &members[0];
    outpost_tests::eventually(60, "the member to become a voter", || async {
        let s = outpost_tests::status(&c, first).await?;
        Ok(s["voters"].as_array().map_or(0, |v| v.len()) == 2)
    })
    .await?;
    for f in ["ca.crt", "peer-ca.crt"] {
        ensure!(
            std::fs::read(m2.dir.join("pki").join(f))?
                == std::fs::read(first.dir.join("pki").join(f))?,
            "{f} differs"
        );
    }
    let cfg2 = kubeconfig(&root, &m2)?;
    let r = root.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        retry(&r, &cfg2, &["create", "configmap", "via-two"])?;
        let got = retry(&r, &cfg1, &["get", "configmap", "via-two", "-o", "name"])?;
        ensure!(got.stdout.trim() == "configmap/via-two", "{}", got.stdout);
        Ok(())
    })
    .await??;

    let said = refused(3, &member_token)?;
    ensure!(said.contains("already been used"), "{said}");
    let said = refused(4, "op1.not-a-token")?;
    ensure!(said.contains("a token looks like"), "{said}");
    // A restarted member needs no token again.
    m2.kill();
    m2.extra.clear();
    m2.start(None)?;
    outpost_tests::eventually(60, "the restarted member to follow", || async {
        let s = outpost_tests::status(&c, &m2).await?;
        Ok(s["state"] == "Follower" || s["state"] == "Leader")
    })
    .await?;
    members.push(m2);
    Ok(())
}
