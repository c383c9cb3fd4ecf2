//! Three `outpost-control` processes on loopback: leader failure under load, whole-cluster
//! restart, catch-up by snapshot, and watches that survive a leader change.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use outpost_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_writing_loses_nothing() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut ms = cluster(root.path(), 3, &[]).await?;
    let c = client();
    let n = 400;
    let acked = Arc::new(AtomicUsize::new(0));

    // The writer runs on its own while the test kills the leader under it.
    let refs: Vec<(String, String)> = ms.iter().map(|m| (m.admin.clone(), m.url(""))).collect();
    let writer = {
        let acked = acked.clone();
        let c = c.clone();
        tokio::spawn(async move {
            let mut revs = BTreeMap::new();
            for i in 0..n {
                let key = format!("/t/{i:04}");
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let mut j = i;
                loop {
                    let (_, base) = &refs[j % refs.len()];
                    let r = c
                        .post(format!("{base}/v1/put"))
                        .json(&serde_json::json!({"key": key, "value": format!("v{i}")}))
                        .send()
                        .await;
                    if let Ok(r) = r {
                        if r.status().is_success() {
                            let v: Value = r.json().await?;
                            revs.insert(key.clone(), v["revision"].as_u64().unwrap_or(0));
                            break;
                        }
                    }
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "write {key} never acknowledged"
                    );
                    j += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                acked.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(revs)
        })
    };

    while acked.load(Ordering::SeqCst) < n / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old = leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
    ms[(old - 1) as usize].kill();
    let revs = writer.await??;
    assert_eq!(revs.len(), n);
    let new = leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
    assert_ne!(new, old, "a new leader was elected");

    // Every acknowledged write is on both survivors.
    for m in ms.iter().filter(|m| m.running()) {
        let kvs = range(&c, m, "/t/").await?;
        assert_eq!(kvs.len(), n, "member {} has {} keys", m.id, kvs.len());
        for (k, v) in &kvs {
            let i: usize = k.trim_start_matches("/t/").parse()?;
            assert_eq!(v, &format!("v{i}"));
        }
    }
    // The killed member comes back and converges.
    ms[(old - 1) as usize].start(None)?;
    let (rev, hash) = converged(&c, &ms.iter().collect::<Vec<_>>()).await?;
    assert!(rev >= n as u64);

    // Kill everything, start again: nothing acknowledged is lost, all agree.
    for m in ms.iter_mut() {
        m.kill();
    }
    for m in ms.iter_mut() {
        m.start(None)?;
    }
    leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
    assert_eq!(
        converged(&c, &ms.iter().collect::<Vec<_>>()).await?,
        (rev, hash)
    );
    assert_eq!(range(&c, &ms[0], "/t/").await?.len(), n);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_catches_up_by_snapshot() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut ms = cluster(
        root.path(),
        3,
        &["--snapshot-every", "50", "--keep-logs", "5"],
    )
    .await?;
    let c = client();
    ms[2].kill();
    for i in 0..300 {
        put_anywhere(&c, &[&ms[0], &ms[1]], &format!("/s/{i}"), "x", i).await?;
    }
    ms[2].start(None)?;
    converged(&c, &ms.iter().collect::<Vec<_>>()).await?;
    assert_eq!(range(&c, &ms[2], "/s/").await?.len(), 300);
    assert!(
        ms[2].logs().contains("installed snapshot"),
        "member 3 should have caught up by snapshot install; its log:\n{}",
        ms[2].logs()
    );
    Ok(())
}

/// Read a watch stream from one member until it ends or `stop` says so, collecting
/// (revision, key) pairs; returns the last revision seen.
async fn follow(
    c: &reqwest::Client,
    base: &str,
    after: u64,
    out: &mut Vec<(u64, String)>,
    stop: &AtomicUsize,
) -> anyhow::Result<u64> {
    let resp = c
        .get(format!("{base}/v1/watch"))
        .query(&[("prefix", "/w/"), ("after", &after.to_string())])
        .timeout(Duration::from_secs(3600))
        .send()
        .await?
        .error_for_status()?;
    let mut last = after;
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stop.load(Ordering::SeqCst) == 1 { return Ok(last) }
                continue;
            }
        };
        let Some(chunk) = chunk else { return Ok(last) };
        let Ok(chunk) = chunk else { return Ok(last) };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line)?;
            if let Some(r) = v["revision"].as_u64() {
                for e in v["events"].as_array().into_iter().flatten() {
                    out.push((r, e["kv"]["key"].as_str().unwrap_or_default().to_string()));
                }
                last = r;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_leader_change() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut ms = cluster(root.path(), 3, &[]).await?;
    let c = client();
    let bases: Vec<String> = ms.iter().map(|m| m.url("")).collect();
    let stop = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicUsize::new(0)); // id of the killed member, once killed

    // The watcher follows from whichever member is up, resuming from its last revision.
    let watcher = {
        let (c, stop, down, bases) = (c.clone(), stop.clone(), down.clone(), bases.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut last = 0;
            let mut i = 0usize;
            while stop.load(Ordering::SeqCst) == 0 {
                let id = i % bases.len() + 1;
                i += 1;
                if down.load(Ordering::SeqCst) == id {
                    continue;
                }
                match follow(&c, &bases[id - 1], last, &mut seen, &stop).await {
                    Ok(l) => last = l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            seen
        })
    };

    let n = 300;
    for i in 0..n {
        if i == n / 2 {
            let old = leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
            down.store(old as usize, Ordering::SeqCst);
            ms[(old - 1) as usize].kill();
        }
        put_anywhere(
            &c,
            &ms.iter().collect::<Vec<_>>(),
            &format!("/w/{i:04}"),
            "x",
            i,
        )
        .await?;
    }
    // Let the watcher drain, then compare with the full history read fresh from a survivor.
    let alive = ms.iter().find(|m| m.running()).expect("a survivor");
    let truth = {
        let mut all = Vec::new();
        let never = AtomicUsize::new(0);
        let base = alive.url("");
        let handle = follow(&c, &base, 0, &mut all, &never);
        let _ = tokio::time::timeout(Duration::from_secs(3), handle).await;
        all
    };
    assert!(truth.len() >= n, "history has {} events", truth.len());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(1, Ordering::SeqCst);
    let seen = watcher.await?;
    assert_eq!(seen, truth, "the watcher saw every event once, in order");
    Ok(())
}

/// Five members survive two failures, including the leader; a dead member is removed and the
/// remaining four carry on, all agreeing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_tolerate_two_failures_and_remove_one() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut ms = cluster(root.path(), 5, &[]).await?;
    let c = client();
    put_range(&c, &ms, 0..20, "a").await?;
    let old = leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
    let other = if old == 5 { 4 } else { 5 };
    ms[(old - 1) as usize].kill();
    ms[(other - 1) as usize].kill();
    put_range(&c, &ms, 20..40, "b").await?;
    let new = leader(&c, &ms.iter().collect::<Vec<_>>()).await?;
    assert_ne!(new, old);

    // Remove the second dead member through a survivor; four voters remain.
    let via = ms.iter().find(|m| m.running()).context("a survivor")?;
    let r = c
        .delete(via.url(&format!("/v1/members/{other}")))
        .send()
        .await?;
    assert!(r.status().is_success(), "remove: {}", r.text().await?);
    eventually(30, "four voters", || async {
        let s = status(&c, via).await?;
        let voters: Vec<u64> = s["voters"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        Ok(voters.len() == 4 && !voters.contains(&other))
    })
    .await?;

    // The old leader returns; writes still commit and the four converge.
    ms[(old - 1) as usize].start(None)?;
    put_range(&c, &ms, 40..60, "c").await?;
    let live: Vec<&Member> = ms.iter().filter(|m| m.running()).collect();
    assert_eq!(live.len(), 4);
    converged(&c, &live).await?;
    for m in &live {
        assert_eq!(range(&c, m, "/f/").await?.len(), 60, "member {}", m.id);
    }
    Ok(())
}

/// Write `/f/{i}` = `value` for each i, through whichever members are up.
async fn put_range(
    c: &reqwest::Client,
    ms: &[Member],
    keys: std::ops::Range<usize>,
    value: &str,
) -> anyhow::Result<()> {
    let all: Vec<&Member> = ms.iter().collect();
    for i in keys {
        put_anywhere(c, &all, &format!("/f/{i}"), value, i).await?;
    }
    Ok(())
}
