//! The Kubernetes API on a three-member control plane: writes and reads through any member,
//! and kubectl keeps working through the survivors after the leader is killed with SIGKILL.

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = kubectl(root, cfg, args)?;
        if r.ok || Instant::now() > deadline {
            return r.expect_ok(&args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

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
        Ok(())
    })
    .await??;

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
    Ok(())
}
