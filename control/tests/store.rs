//! The store against openraft's storage suite, across close and reopen, and its watch and
//! snapshot contracts, in process with real fjall on disk and real QUIC on loopback.

use std::time::Duration;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use outpost_api::store::{Expect, Outcome};
use outpost_control::store::log::{LogStore, Syncer};
use outpost_control::store::sm::{self, StateMachine};
use outpost_control::store::watch::Hub;
use outpost_control::store::{
    Compaction, Config, Consistency, Error, Store, TypeConfig, WatchItem,
};
use tempfile::TempDir;

struct Fjall;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Fjall {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let io = |e: String| {
            StorageError::from(openraft::StorageIOError::read(&std::io::Error::other(e)))
        };
        let dir = TempDir::new().map_err(|e| io(e.to_string()))?;
        let db = fjall::Database::builder(dir.path().join("db"))
            .open()
            .map_err(|e| io(e.to_string()))?;
        let syncer = Syncer::start(db.clone());
        let log = LogStore::open(&db, 1, syncer.clone()).map_err(|e| io(e.to_string()))?;
        let sm = StateMachine::open(&db, 1, dir.path(), syncer, Hub::default())
            .map_err(|e| io(e.to_string()))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(Fjall)
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::new(1, dir, "127.0.0.1:0".parse().expect("addr"));
    c.election_timeout = Duration::from_millis(150);
    c.heartbeat = Duration::from_millis(30);
    c
}

fn committed(o: &Outcome) -> u64 {
    match o {
        Outcome::Committed { revision, .. } => *revision,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[tokio::test]
async fn reopen_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    reopen_keeps_writes(false).await
}

/// The same for a lone member, whose Raft core runs on a thread of its own (`outpost up`).
#[tokio::test]
async fn a_lone_member_reopens_with_every_acknowledged_write() -> anyhow::Result<()> {
    reopen_keeps_writes(true).await
}

async fn reopen_keeps_writes(lone: bool) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let config = |d: &std::path::Path| Config { lone, ..config(d) };
    let store = Store::open(config(dir.path())).await?;
    // Concurrent writes, batched behind one in flight, and then one at a time.
    let puts = (0..50).map(|i| {
        let s = store.clone();
        async move { s.put(&format!("/c/{i:02}"), vec![i], Expect::Absent).await }
    });
    let revs: Vec<u64> = futures::future::try_join_all(puts)
        .await?
        .iter()
        .map(committed)
        .collect();
    let mut sorted = revs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 50, "one revision per write: {revs:?}");
    let mut last = 0;
    for i in 0..200 {
        last = committed(
            &store
                .put(
                    &format!("/k/{i:03}"),
                    format!("v{i}").into_bytes(),
                    Expect::Any,
                )
                .await?,
        );
    }
    let before = store.hash().await?;
    store.shutdown().await;
    drop(store);

    let store = Store::open(config(dir.path())).await?;
    let r = store
        .range("/k/", None, 0, Consistency::Linearizable)
        .await?;
    assert_eq!(r.kvs.len(), 200);
    assert_eq!(r.revision, last);
    let c = store
        .range("/c/", None, 0, Consistency::Linearizable)
        .await?;
    assert_eq!(c.kvs.len(), 50);
    assert_eq!(store.hash().await?, before);
    let kv = store
        .get("/k/007", Consistency::Linearizable)
        .await?
        .expect("key 7");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.version),
        (&b"v7"[..], 58, 1)
    );
    // Revisions go on from where they were.
    assert_eq!(
        committed(&store.put("/k/new", vec![], Expect::Absent).await?),
        last + 1
    );
    store.shutdown().await;
    Ok(())
}

/// Objects of a kilobyte and more live in blob files once their memtable is flushed: 24 MiB of
/// them (past the 16 MiB memtable) come back whole after a reopen, and so do overwrites and
/// deletes of some, and a garbled blob file is an error on read or open, never a wrong value.
#[tokio::test]
async fn large_values_come_back_from_blob_files() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let value = |i: usize, round: u8| {
        let mut v = vec![round; 8 * 1024];
        v[..8].copy_from_slice(&(i as u64).to_be_bytes());
        v
    };
    // Every third key is overwritten, the one after it deleted.
    let expected = |i: usize| value(i, if i.is_multiple_of(3) { 2 } else { 1 });
    let store = Store::open(config(dir.path())).await?;
    for i in 0..3_000 {
        store
            .put(&format!("/big/{i:04}"), value(i, 1), Expect::Any)
            .await?;
    }
    for i in (0..3_000).step_by(3) {
        store
            .put(&format!("/big/{i:04}"), value(i, 2), Expect::Any)
            .await?;
    }
    for i in (1..3_000).step_by(3) {
        store.delete(&format!("/big/{i:04}"), Expect::Any).await?;
    }
    let before = store.hash().await?;
    store.shutdown().await;
    drop(store);
    let blobs: Vec<_> = walk(&dir.path().join("db"))?
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "blobs"))
        .collect();
    assert!(!blobs.is_empty(), "no blob files were written");

    let store = Store::open(config(dir.path())).await?;
    assert_eq!(store.hash().await?, before);
    let r = store
        .range("/big/", None, 0, Consistency::Linearizable)
        .await?;
    assert_eq!(r.kvs.len(), 2_000);
    for kv in &r.kvs {
        let i: usize = kv.key.trim_start_matches("/big/").parse()?;
        assert!(kv.value == expected(i), "{} came back changed", kv.key);
    }
    store.shutdown().await;
    drop(store);

    for p in &blobs {
        let mut bytes = match std::fs::read(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r?,
        };
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(p, bytes)?;
    }
    let opened = tokio::spawn(Store::open(config(dir.path()))).await;
    let opened = opened.map_err(|e| anyhow::anyhow!("opening garbled blobs panicked: {e}"))?;
    if let Ok(s) = opened {
        let read = tokio::spawn({
            let s = s.clone();
            async move { s.range("/big/", None, 0, Consistency::Serializable).await }
        })
        .await
        .map_err(|e| anyhow::anyhow!("reading garbled blobs panicked: {e}"))?;
        if let Ok(r) = read {
            for kv in r.kvs {
                let i: usize = kv.key.trim_start_matches("/big/").parse()?;
                assert!(kv.value == expected(i), "{} came back changed", kv.key);
            }
        }
        s.shutdown().await;
    }
    Ok(())
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn compare_and_swap_and_paged_range() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    let r1 = committed(&store.put("/a", b"1".to_vec(), Expect::Absent).await?);
    assert!(matches!(
        store.put("/a", b"x".to_vec(), Expect::Absent).await?,
        Outcome::Failed { op: 0, .. }
    ));
    assert!(matches!(
        store
            .put("/a", b"x".to_vec(), Expect::ModRevision(r1 + 5))
            .await?,
        Outcome::Failed { .. }
    ));
    let r2 = committed(
        &store
            .put("/a", b"2".to_vec(), Expect::ModRevision(r1))
            .await?,
    );
    assert_eq!(r2, r1 + 1);
    for i in 0..25 {
        store
            .put(&format!("/p/{i:02}"), vec![], Expect::Any)
            .await?;
    }
    store.put("/q", vec![], Expect::Any).await?;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .range("/p/", after.as_deref(), 10, Consistency::Serializable)
            .await?;
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
    }
    let want: Vec<String> = (0..25).map(|i| format!("/p/{i:02}")).collect();
    assert_eq!(seen, want);
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_range_reads_the_keys_as_they_were_at_a_revision() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut cfg = config(dir.path());
    cfg.compaction = Compaction::Revisions(1_000_000);
    let store = Store::open(cfg).await?;
    for i in [1, 3, 5, 7] {
        store
            .put(&format!("/r/{i}"), b"old".to_vec(), Expect::Any)
            .await?;
    }
    store.put("/s/1", vec![], Expect::Any).await?;
    let then = store
        .range("/r/", None, 0, Consistency::Serializable)
        .await?;
    // After: a key added before, between and after the old ones, one changed twice, one
    // deleted, one deleted and made again, and writes elsewhere.
    for (k, v) in [
        ("/r/0", "new"),
        ("/r/4", "new"),
        ("/r/9", "new"),
        ("/r/3", "a"),
    ] {
        store.put(k, v.as_bytes().to_vec(), Expect::Any).await?;
    }
    store.put("/r/3", b"b".to_vec(), Expect::Any).await?;
    store.delete("/r/5", Expect::Any).await?;
    store.delete("/r/7", Expect::Any).await?;
    store.put("/r/7", b"again".to_vec(), Expect::Any).await?;
    store.put("/s/2", vec![], Expect::Any).await?;
    let at = |after: Option<String>, limit: usize| {
        let store = &store;
        async move {
            store
                .range_at("/r/", after.as_deref(), limit, then.revision)
                .await
        }
    };
    let whole = at(None, 0).await?;
    assert_eq!(whole.kvs, then.kvs, "the same keys, values and revisions");
    assert_eq!(whole.revision, then.revision);
    assert!(!whole.more);
    // Page by page, as a list's continue tokens read it.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = at(after, 1).await?;
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
    }
    assert_eq!(seen, ["/r/1", "/r/3", "/r/5", "/r/7"]);
    // Today, for comparison, and a revision compacted away.
    let now = store
        .range("/r/", None, 0, Consistency::Serializable)
        .await?;
    let keys: Vec<&str> = now.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/r/0", "/r/1", "/r/3", "/r/4", "/r/7", "/r/9"]);
    assert_eq!(
        store.range_at("/r/", None, 0, now.revision).await?.kvs,
        now.kvs
    );
    store
        .write(outpost_api::store::Command::Compact {
            revision: then.revision + 2,
        })
        .await?;
    assert!(matches!(at(None, 0).await, Err(Error::Compacted { .. })));
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn watch_resumes_exactly_once_and_reports_compaction() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut cfg = config(dir.path());
    cfg.compaction = Compaction::Revisions(1_000_000);
    cfg.progress_every = Duration::from_secs(1);
    let store = Store::open(cfg).await?;
    for i in 0..10 {
        store.put(&format!("/w/{i}"), vec![], Expect::Any).await?;
        store
            .put(&format!("/other/{i}"), vec![], Expect::Any)
            .await?;
    }
    // From the start: every /w/ revision once, in order, then live ones.
    let mut w = store.watch("/w/", 0).await?;
    let mut revs = Vec::new();
    for _ in 0..10 {
        match w.next().await {
            Some(WatchItem::Revision(r)) => revs.push(r.revision),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(revs, (0..10).map(|i| 1 + 2 * i).collect::<Vec<u64>>());
    let live = committed(&store.put("/w/live", vec![], Expect::Any).await?);
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await? {
        Some(WatchItem::Revision(r)) => assert_eq!(r.revision, live),
        other => panic!("unexpected {other:?}"),
    }
    // Idle: a progress notification at the current revision.
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await? {
        Some(WatchItem::Progress(p)) => assert_eq!(p, live),
        other => panic!("unexpected {other:?}"),
    }
    // Resume after revision 9: /w/ writes 11, 13, ..., 19, then the live one.
    let mut w = store.watch("/w/", 9).await?;
    for want in [11, 13, 15, 17, 19, live] {
        match w.next().await {
            Some(WatchItem::Revision(r)) => assert_eq!(r.revision, want),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Compact, then a watch from before the compaction point fails distinctly.
    store
        .write(outpost_api::store::Command::Compact { revision: 12 })
        .await?;
    match store.watch("/w/", 5).await {
        Err(Error::Compacted {
            requested: 5,
            compacted: 12,
        }) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("watch from a compacted revision must fail"),
    }
    let mut w = store.watch("/w/", 12).await?;
    match w.next().await {
        Some(WatchItem::Revision(r)) => assert_eq!(r.revision, 13),
        other => panic!("unexpected {other:?}"),
    }
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn automatic_compaction_by_revisions() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut cfg = config(dir.path());
    cfg.compaction = Compaction::Revisions(10);
    let store = Store::open(cfg).await?;
    for i in 0..50 {
        store.put(&format!("/c/{i}"), vec![], Expect::Any).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.status().compacted < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic compaction: {:?}",
            store.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        store.watch("", 1).await,
        Err(Error::Compacted { .. })
    ));
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn snapshot_survives_reopen_and_corruption_is_refused() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    for i in 0..100 {
        store
            .put(&format!("/s/{i}"), vec![b'x'; 100], Expect::Any)
            .await?;
    }
    store.snapshot().await?;
    let snap_dir = dir.path().join("snapshots");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let file = loop {
        let found = std::fs::read_dir(&snap_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "snap"));
        if let Some(f) = found {
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sm::verify(&file)?;
    let hash = store.hash().await?;
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).await?;
    assert_eq!(store.hash().await?, hash);
    store.shutdown().await;

    // One flipped byte in a copy of the snapshot: the checksum catches it.
    let copy = dir.path().join("copy.snap");
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&copy, &bytes)?;
    let err = sm::verify(&copy).expect_err("corrupt snapshot accepted");
    assert!(err.to_string().contains("checksum"), "{err}");
    std::fs::write(&copy, &bytes[..10])?;
    assert!(sm::verify(&copy).is_err());
    Ok(())
}

/// A QUIC client endpoint presenting the member identity found in `pki`.
fn peer_client(pki: &std::path::Path) -> anyhow::Result<quinn::Endpoint> {
    use outpost_control::pki;
    use outpost_control::store::net::ALPN;
    let id = pki::load_or_issue(pki, false)?;
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(pki::client_config(&id, ALPN)?)?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(tls)));
    Ok(ep)
}

/// A client endpoint with a member identity of the cluster whose data is in `member_dir`.
fn fellow_member(member_dir: &std::path::Path) -> anyhow::Result<(TempDir, quinn::Endpoint)> {
    let peer = TempDir::new()?;
    for f in ["peer-ca.crt", "peer-ca.key"] {
        std::fs::copy(member_dir.join("pki").join(f), peer.path().join(f))?;
    }
    let ep = peer_client(peer.path())?;
    Ok((peer, ep))
}

#[tokio::test]
async fn peer_from_another_cluster_is_refused() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    let addr: std::net::SocketAddr = store.status().addr.parse()?;

    let other = TempDir::new()?;
    outpost_control::pki::create_ca(other.path())?;
    let ep = peer_client(other.path())?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(addr, outpost_control::pki::MEMBER_NAME)?,
    )
    .await?;
    assert!(
        conn.is_err(),
        "a certificate from another cluster's CA must not connect"
    );

    // The member is unharmed.
    assert!(matches!(
        store.put("/after", vec![], Expect::Any).await?,
        Outcome::Committed { .. }
    ));
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn garbled_and_oversized_frames_are_refused() -> anyhow::Result<()> {
    use outpost_control::store::net::{read_frame, Reply};
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    let addr: std::net::SocketAddr = store.status().addr.parse()?;

    // A legitimate peer certificate, so the frames themselves are what is judged.
    let (_peer, ep) = fellow_member(dir.path())?;
    for frame in [
        [&5u32.to_be_bytes()[..], b"hello"].concat(),
        [&3u32.to_be_bytes()[..], &[0xff, 0x00, 0x13][..]].concat(),
        u32::MAX.to_be_bytes().to_vec(),
    ] {
        let conn = ep.connect(addr, outpost_control::pki::MEMBER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&frame).await?;
        send.finish()?;
        match tokio::time::timeout(Duration::from_secs(5), read_frame::<Reply>(&mut recv)).await? {
            Ok(Reply::Refused(why)) => assert!(!why.is_empty()),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The member closes a connection that sent garbage.
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        assert!(closed.is_ok(), "connection left open after a bad frame");
    }
    assert!(matches!(
        store.put("/after", vec![], Expect::Any).await?,
        Outcome::Committed { .. }
    ));
    assert_eq!(
        store
            .get("/after", Consistency::Linearizable)
            .await?
            .map(|kv| kv.version),
        Some(1)
    );
    store.shutdown().await;
    Ok(())
}

/// A caller that gives up on a request (openraft cancels an append after its timeout) loses
/// that request only: the member keeps the connection and its other requests.
#[tokio::test]
async fn abandoned_request_keeps_the_connection() -> anyhow::Result<()> {
    use outpost_control::store::net::{read_frame, write_frame, Reply, Request};
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    let addr: std::net::SocketAddr = store.status().addr.parse()?;
    let (_peer, ep) = fellow_member(dir.path())?;
    let conn = ep.connect(addr, outpost_control::pki::MEMBER_NAME)?.await?;

    // Abandoned halfway through sending the request.
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&100u32.to_be_bytes()).await?;
    send.write_all(&[0u8; 10]).await?;
    send.reset(0u32.into())?;
    // Abandoned while waiting for the reply.
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Request::ReadIndex).await?;
    send.finish()?;
    recv.stop(0u32.into())?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Request::ReadIndex).await?;
    send.finish()?;
    let reply =
        tokio::time::timeout(Duration::from_secs(5), read_frame::<Reply>(&mut recv)).await??;
    assert!(matches!(reply, Reply::ReadIndex(Ok(_))), "{reply:?}");
    assert!(
        conn.close_reason().is_none(),
        "the member closed the connection"
    );
    store.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_batched_with_one_revision_each() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    store.put("/cas", b"0".to_vec(), Expect::Absent).await?;
    let base = store.status().revision;
    // Many writers at once: they share log entries but each gets its own revision.
    let mut tasks = Vec::new();
    for i in 0..300 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.put(&format!("/b/{i}"), vec![1], Expect::Absent).await
        }));
    }
    // Compare-and-swaps racing on one key inside those batches: exactly one may win.
    let mut cas = Vec::new();
    for i in 0..20 {
        let s = store.clone();
        cas.push(tokio::spawn(async move {
            s.put("/cas", format!("{i}").into_bytes(), Expect::ModRevision(1))
                .await
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(committed(&t.await??));
    }
    let wins = futures_count(cas).await?;
    assert_eq!(
        wins, 1,
        "exactly one compare-and-swap on the same revision wins"
    );
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 300, "every write has its own revision");
    assert_eq!(store.status().revision, base + 301);
    let r = store
        .range("/b/", None, 0, Consistency::Linearizable)
        .await?;
    assert_eq!(r.kvs.len(), 300);
    store.shutdown().await;
    Ok(())
}

async fn futures_count(
    tasks: Vec<tokio::task::JoinHandle<Result<Outcome, Error>>>,
) -> anyhow::Result<usize> {
    let mut wins = 0;
    for t in tasks {
        if let Outcome::Committed { .. } = t.await?? {
            wins += 1;
        }
    }
    Ok(wins)
}

/// Flip bytes in the middle of every file of the database: opening must fail with an error
/// (or recover a consistent prefix), never panic or serve garbage.
#[tokio::test]
async fn corrupted_database_files_are_refused() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Store::open(config(dir.path())).await?;
    for i in 0..200 {
        store
            .put(&format!("/k/{i:04}"), vec![b'v'; 512], Expect::Any)
            .await?;
    }
    store.shutdown().await;
    drop(store);
    let mut garbled = 0;
    for p in walk(&dir.path().join("db"))? {
        // fjall's worker may still be removing a merged table after the store closed.
        let mut bytes = match std::fs::read(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r?,
        };
        if bytes.len() > 64 {
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 32] {
                *b ^= 0x5a;
            }
            std::fs::write(&p, bytes)?;
            garbled += 1;
        }
    }
    assert!(garbled > 0);
    let opened = tokio::spawn(Store::open(config(dir.path()))).await;
    let opened = opened.map_err(|e| anyhow::anyhow!("opening a corrupted store panicked: {e}"))?;
    match opened {
        Err(e) => println!("refused as expected: {e}"),
        Ok(s) => {
            // Recovery kept a prefix: whatever it serves must be intact values.
            let r = s.range("/k/", None, 0, Consistency::Serializable).await;
            if let Ok(r) = r {
                for kv in r.kvs {
                    assert_eq!(kv.value, vec![b'v'; 512], "{}", kv.key);
                }
            }
            s.shutdown().await;
        }
    }
    Ok(())
}
