//! The API router called without a socket, over a real store on disk: bad input gets a
//! Status and loses nothing, anonymous requests get 401, watches resume, bookmark, and report
//! 410 once their version is compacted.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use outpost_control::api::{self, Api, Peer, User};
use outpost_control::store::{Compaction, Config, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn setup(
    dir: &std::path::Path,
    compaction: Compaction,
) -> anyhow::Result<(Store, axum::Router)> {
    let mut cfg = Config::new(1, dir, "127.0.0.1:0".parse()?);
    cfg.election_timeout = Duration::from_millis(150);
    cfg.heartbeat = Duration::from_millis(30);
    cfg.progress_every = Duration::from_millis(300);
    cfg.compaction = compaction;
    let store = Store::open(cfg).await?;
    let api = Arc::new(Api::new(store.clone(), "127.0.0.1:6443".into()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = api::bootstrap(&api).await {
        anyhow::ensure!(std::time::Instant::now() < deadline, "bootstrap: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((store, api::router(api)))
}

fn admin() -> Peer {
    Peer(Some(User {
        name: "admin".into(),
        uid: String::new(),
        groups: vec!["system:masters".into()],
    }))
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let mut req = req.body(body.into())?;
    req.extensions_mut().insert(admin());
    let res = app.clone().oneshot(req).await?;
    let code = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((code, v))
}

#[tokio::test]
async fn bad_input_gets_a_status_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, app) = setup(dir.path(), Compaction::Age(Duration::from_secs(300))).await?;
    let cms = "/api/v1/namespaces/default/configmaps";
    let before = store.status().revision;
    let cases: Vec<(&str, Option<&str>, Vec<u8>, StatusCode)> = vec![
        (
            "POST",
            Some("application/json"),
            b"{\"kind\": ".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some("application/json"),
            b"[1,2]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some("application/yaml"),
            b"a: [b".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some("application/vnd.kubernetes.protobuf"),
            b"k8s\0\x0a\xff".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some("application/vnd.kubernetes.protobuf"),
            b"not protobuf".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some("text/csv"),
            b"a,b".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            None,
            vec![b' '; api::MAX_BODY + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "POST",
            None,
            br#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"x"}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            None,
            br#"{"metadata":{"name":"UPPER"}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            None,
            br#"{"metadata":{"name":"x"},"data":{"k":1}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, ct, body, want) in cases {
        let (code, status) = call(&app, method, cms, ct, body).await?;
        assert_eq!(code, want, "{status}");
        assert_eq!(status["kind"], "Status", "{status}");
        assert_eq!(status["code"], want.as_u16());
        assert!(status["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (code, s) = call(
        &app,
        "POST",
        &format!("{cms}?fieldValidation=Strict"),
        None,
        r#"{"metadata":{"name":"s"},"dataa":{}}"#,
    )
    .await?;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        s["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown field \"dataa\""),
        "{s}"
    );
    let (code, s) = call(
        &app,
        "POST",
        "/api/v1/namespaces/default/pods",
        None,
        r#"{"metadata":{"name":"p"},"spec":{"containers":[{"name":"c"}]}}"#,
    )
    .await?;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        s["details"]["causes"][0]["field"],
        "spec.containers[0].image"
    );
    let (code, _) = call(
        &app,
        "PATCH",
        &format!("{cms}/nope"),
        Some("application/json"),
        "{}",
    )
    .await?;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        store.status().revision,
        before,
        "refused requests wrote nothing"
    );
    // The server still works.
    let (code, o) = call(
        &app,
        "POST",
        cms,
        None,
        r#"{"metadata":{"name":"ok"},"data":{"k":"v"}}"#,
    )
    .await?;
    assert_eq!(code, StatusCode::CREATED, "{o}");
    let (code, _) = call(
        &app,
        "PATCH",
        &format!("{cms}/ok"),
        Some("application/json-patch+json"),
        r#"[{"op":"test","path":"/data/k","value":"other"}]"#,
    )
    .await?;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "as kube-apiserver");
    let (_, o) = call(&app, "GET", &format!("{cms}/ok"), None, Body::empty()).await?;
    assert_eq!(o["data"]["k"], "v");

    // deletecollection removes what the selector picks, and only that.
    for (name, tier) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let body = json!({"metadata": {"name": name, "labels": {"tier": tier}}}).to_string();
        assert_eq!(
            call(&app, "POST", cms, None, body).await?.0,
            StatusCode::CREATED
        );
    }
    let (code, gone) = call(
        &app,
        "DELETE",
        &format!("{cms}?labelSelector=tier%3Dx"),
        None,
        Body::empty(),
    )
    .await?;
    assert_eq!(code, StatusCode::OK, "{gone}");
    assert_eq!(gone["items"].as_array().map(Vec::len), Some(2));
    let (_, left) = call(&app, "GET", cms, None, Body::empty()).await?;
    let names: Vec<&str> = left["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["c", "ok"]);

    // A grace period past any time: the pod is marked for deletion at the last time there is.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "slow"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "module:x"}]}});
    let pods = "/api/v1/namespaces/default/pods";
    let (code, v) = call(
        &app,
        "POST",
        pods,
        Some("application/json"),
        pod.to_string(),
    )
    .await?;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    let body = json!({"gracePeriodSeconds": i64::MAX}).to_string();
    let (code, v) = call(
        &app,
        "DELETE",
        &format!("{pods}/slow"),
        Some("application/json"),
        body,
    )
    .await?;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["metadata"]["deletionTimestamp"], "9999-12-30T22:00:00Z");

    // No credentials: 401 with a Status.
    let req = Request::builder()
        .uri("/api/v1/namespaces")
        .body(Body::empty())?;
    let res = app.clone().oneshot(req).await?;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    store.shutdown().await;
    Ok(())
}

async fn lines(
    app: &axum::Router,
    uri: &str,
    until: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let mut req = Request::builder().uri(uri).body(Body::empty())?;
    req.extensions_mut().insert(admin());
    let res = app.clone().oneshot(req).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !until(&out) {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await?;
        let Some(frame) = frame else { break };
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                out.push(serde_json::from_slice(&line)?);
            }
        }
    }
    Ok(out)
}

/// A watch without selectors sends each change as stored (spliced, not decoded); a watch
/// whose selector matches everything decodes each. Both see the same events: types, objects
/// and resourceVersions.
#[tokio::test]
async fn watches_with_and_without_selectors_agree() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, app) = setup(dir.path(), Compaction::Revisions(1000)).await?;
    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, o) = call(
        &app,
        "POST",
        cms,
        None,
        json!({"metadata": {"name": "w", "labels": {"all": "yes"}}, "data": {"k": "v\"}{"}})
            .to_string(),
    )
    .await?;
    assert_eq!(code, StatusCode::CREATED);
    let from = o["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .parse::<u64>()?
        - 1;
    let (code, _) = call(
        &app,
        "PATCH",
        &format!("{cms}/w"),
        Some("application/merge-patch+json"),
        json!({"data": {"k": "changed"}}).to_string(),
    )
    .await?;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = call(&app, "DELETE", &format!("{cms}/w"), None, "").await?;
    assert_eq!(code, StatusCode::OK);
    let plain = lines(
        &app,
        &format!("{cms}?watch=true&resourceVersion={from}"),
        |e| e.len() >= 3,
    )
    .await?;
    let selected = lines(
        &app,
        &format!("{cms}?watch=true&resourceVersion={from}&labelSelector=all%3Dyes"),
        |e| e.len() >= 3,
    )
    .await?;
    let types: Vec<&str> = plain
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    assert_eq!(plain, selected);
    let rvs: Vec<u64> = plain
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    assert!(
        rvs[0] > from && rvs[0] < rvs[1] && rvs[1] < rvs[2],
        "{rvs:?}"
    );
    assert_eq!(plain[0]["object"]["data"]["k"], "v\"}{");
    assert_eq!(plain[1]["object"]["data"]["k"], "changed");
    store.shutdown().await;
    Ok(())
}

/// `omitStatusOnly` (what the node agent asks for) leaves out the changes that only touch a
/// pod's status, with or without selectors; every other change still comes, and so do
/// status writes that take the pod in or out of a selector on its status.
#[tokio::test]
async fn a_watch_can_leave_out_status_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, app) = setup(dir.path(), Compaction::Revisions(1000)).await?;
    let pods = "/api/v1/namespaces/default/pods";
    let pod = json!({"metadata": {"name": "p"},
                     "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}});
    let (code, o) = call(&app, "POST", pods, None, pod.to_string()).await?;
    assert_eq!(code, StatusCode::CREATED, "{o}");
    let from = o["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .parse::<u64>()?
        - 1;
    // Status, labels, status, labels: each status write alone between two others.
    for (sub, body) in [
        ("/status", json!({"status": {"phase": "Running"}})),
        ("", json!({"metadata": {"labels": {"a": "b"}}})),
        ("/status", json!({"status": {"phase": "Succeeded"}})),
        ("", json!({"metadata": {"labels": {"a": "c"}}})),
    ] {
        let (code, o) = call(
            &app,
            "PATCH",
            &format!("{pods}/p{sub}"),
            Some("application/merge-patch+json"),
            body.to_string(),
        )
        .await?;
        assert_eq!(code, StatusCode::OK, "{o}");
    }
    let seen = |q: &'static str, n: usize| {
        let app = app.clone();
        async move {
            let evs = lines(
                &app,
                &format!("{pods}?watch=true&resourceVersion={from}{q}"),
                |e| e.len() >= n,
            )
            .await?;
            anyhow::Ok(
                evs.iter()
                    .map(|e| {
                        let o = &e["object"];
                        format!(
                            "{} {} {}",
                            e["type"].as_str().unwrap_or(""),
                            o["status"]["phase"].as_str().unwrap_or("-"),
                            o["metadata"]["labels"]["a"].as_str().unwrap_or("-")
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let all = seen("&fieldSelector=spec.nodeName%3Dn1", 5).await?;
    assert_eq!(
        all,
        [
            "ADDED Pending -",
            "MODIFIED Running -",
            "MODIFIED Running b",
            "MODIFIED Succeeded b",
            "MODIFIED Succeeded c"
        ]
    );
    let want = [
        "ADDED Pending -",
        "MODIFIED Running b",
        "MODIFIED Succeeded c",
    ];
    for q in [
        "&fieldSelector=spec.nodeName%3Dn1&omitStatusOnly=true",
        "&omitStatusOnly=true",
    ] {
        assert_eq!(seen(q, 3).await?, want, "{q}");
    }
    // A selector on the status still sees the pod come and go by status writes.
    assert_eq!(
        seen(
            "&fieldSelector=status.phase%3DRunning&omitStatusOnly=true",
            3
        )
        .await?,
        [
            "ADDED Running -",
            "MODIFIED Running b",
            "DELETED Succeeded b"
        ]
    );
    store.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn watch_resumes_bookmarks_and_expires() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, app) = setup(dir.path(), Compaction::Revisions(5)).await?;
    let cms = "/api/v1/namespaces/default/configmaps";
    let mut rvs = Vec::new();
    for i in 0..3 {
        let (code, o) = call(
            &app,
            "POST",
            cms,
            None,
            json!({"metadata": {"name": format!("c{i}"), "labels": {"n": i.to_string()}}})
                .to_string(),
        )
        .await?;
        assert_eq!(code, StatusCode::CREATED);
        rvs.push(
            o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    // Resume after the first: exactly the later two, in order; a selector filters events.
    let evs = lines(
        &app,
        &format!("{cms}?watch=true&resourceVersion={}", rvs[0]),
        |e| e.len() >= 2,
    )
    .await?;
    let names: Vec<&str> = evs
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["c1", "c2"]);
    assert!(evs.iter().all(|e| e["type"] == "ADDED"));
    let evs = lines(
        &app,
        &format!("{cms}?watch=1&resourceVersion=0&labelSelector=n%3D2"),
        |e| !e.is_empty(),
    )
    .await?;
    assert_eq!(evs[0]["object"]["metadata"]["name"], "c2");
    let evs = lines(
        &app,
        &format!(
            "{cms}?watch=true&resourceVersion={}&allowWatchBookmarks=true",
            rvs[2]
        ),
        |e| e.iter().any(|x| x["type"] == "BOOKMARK"),
    )
    .await?;
    let bm = evs
        .iter()
        .find(|x| x["type"] == "BOOKMARK")
        .cloned()
        .unwrap_or_default();
    assert_eq!(bm["object"]["kind"], "ConfigMap");
    assert!(bm["object"]["metadata"]["resourceVersion"].is_string());
    // Push history past the retained revisions, then ask for the first version again.
    for i in 3..20 {
        call(
            &app,
            "POST",
            cms,
            None,
            json!({"metadata": {"name": format!("c{i}")}}).to_string(),
        )
        .await?;
    }
    let first: u64 = rvs[0].parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.status().compacted <= first {
        assert!(std::time::Instant::now() < deadline, "no compaction");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let evs = lines(
        &app,
        &format!("{cms}?watch=true&resourceVersion={first}"),
        |e| !e.is_empty(),
    )
    .await?;
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");
    store.shutdown().await;
    Ok(())
}

async fn get(app: &axum::Router, uri: &str) -> anyhow::Result<(StatusCode, Value)> {
    call(app, "GET", uri, None, "").await
}

/// A list read in pages is one snapshot: later pages show what was there at the first,
/// whatever changed since; a list can be read at an exact earlier revision; a continue
/// token whose revision is compacted is 410 Expired.
#[tokio::test]
async fn paged_lists_are_one_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, app) = setup(dir.path(), Compaction::Revisions(1_000_000)).await?;
    let cms = "/api/v1/namespaces/snap/configmaps";
    call(
        &app,
        "POST",
        "/api/v1/namespaces",
        None,
        json!({"metadata": {"name": "snap"}}).to_string(),
    )
    .await?;
    for n in ["a", "c", "e", "g"] {
        let (code, _) = call(
            &app,
            "POST",
            cms,
            None,
            json!({"metadata": {"name": n}, "data": {"v": "old"}}).to_string(),
        )
        .await?;
        assert_eq!(code, StatusCode::CREATED);
    }
    let names = |l: &Value| -> Vec<String> {
        l["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                format!(
                    "{}={}",
                    i["metadata"]["name"].as_str().unwrap_or(""),
                    i["data"]["v"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let (code, first) = call(&app, "GET", &format!("{cms}?limit=2"), None, "").await?;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(names(&first), ["a=old", "c=old"]);
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let token = first["metadata"]["continue"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!token.is_empty());
    // Changes after the first page: one added in its range, one deleted, one changed.
    call(
        &app,
        "POST",
        cms,
        None,
        json!({"metadata": {"name": "d"}}).to_string(),
    )
    .await?;
    call(&app, "DELETE", &format!("{cms}/e"), None, "").await?;
    call(
        &app,
        "PATCH",
        &format!("{cms}/g"),
        Some("application/merge-patch+json"),
        json!({"data": {"v": "new"}}).to_string(),
    )
    .await?;
    let (code, rest) = get(&app, &format!("{cms}?limit=2&continue={token}")).await?;
    assert_eq!(code, StatusCode::OK, "{rest}");
    assert_eq!(names(&rest), ["e=old", "g=old"]);
    assert_eq!(rest["metadata"]["resourceVersion"], rv.as_str());
    assert!(rest["metadata"]["continue"].is_null(), "{rest}");
    // The same revision asked for exactly, and today's list.
    let (_, exact) = get(
        &app,
        &format!("{cms}?resourceVersion={rv}&resourceVersionMatch=Exact"),
    )
    .await?;
    assert_eq!(names(&exact), ["a=old", "c=old", "e=old", "g=old"]);
    let (_, now) = call(&app, "GET", cms, None, "").await?;
    assert_eq!(names(&now), ["a=old", "c=old", "d=", "g=new"]);
    let (code, bad) = get(&app, &format!("{cms}?resourceVersionMatch=Exact")).await?;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
    // Once that revision is compacted, the token has expired.
    let at: u64 = rv.parse()?;
    store
        .write(outpost_api::store::Command::Compact { revision: at + 1 })
        .await?;
    let (code, gone) = get(&app, &format!("{cms}?limit=2&continue={token}")).await?;
    assert_eq!(code, StatusCode::GONE, "{gone}");
    assert_eq!(gone["reason"], "Expired");
    assert!(gone["message"]
        .as_str()
        .unwrap_or("")
        .contains("continue parameter is too old"));
    store.shutdown().await;
    Ok(())
}

/// Evictions spend a disruption budget's allowance by a compare-and-swap: of three evictions
/// at once against a budget that allows one, exactly one goes through and the others get 429
/// with the budget's cause; the budget records the one it let go; a pod two budgets select
/// cannot be evicted.
#[tokio::test]
async fn evictions_spend_a_budget_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_store, app) = setup(dir.path(), Compaction::Revisions(10_000)).await?;
    let pods = "/api/v1/namespaces/default/pods";
    for p in ["p0", "p1", "p2"] {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "module:x"}]}});
        let (code, v) = call(
            &app,
            "POST",
            pods,
            Some("application/json"),
            pod.to_string(),
        )
        .await?;
        anyhow::ensure!(code == StatusCode::CREATED, "{v}");
        let running = json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        let (code, v) = call(
            &app,
            "PATCH",
            &format!("{pods}/{p}/status"),
            Some("application/merge-patch+json"),
            running.to_string(),
        )
        .await?;
        anyhow::ensure!(code == StatusCode::OK, "{v}");
    }
    let pdbs = "/apis/policy/v1/namespaces/default/poddisruptionbudgets";
    let budget = |name: &str| {
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}})
        .to_string()
    };
    let (code, v) = call(&app, "POST", pdbs, Some("application/json"), budget("web")).await?;
    anyhow::ensure!(code == StatusCode::CREATED, "{v}");
    // The status the disruption controller would write: one disruption allowed.
    let mut pdb = v;
    pdb["status"] = json!({"observedGeneration": pdb["metadata"]["generation"],
        "currentHealthy": 3, "desiredHealthy": 2, "expectedPods": 3, "disruptionsAllowed": 1});
    let (code, v) = call(
        &app,
        "PUT",
        &format!("{pdbs}/web/status"),
        Some("application/json"),
        pdb.to_string(),
    )
    .await?;
    anyhow::ensure!(code == StatusCode::OK, "{v}");

    let evict = |p: &'static str| {
        let app = app.clone();
        async move {
            let body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": p, "namespace": "default"}});
            call(
                &app,
                "POST",
                &format!("/api/v1/namespaces/default/pods/{p}/eviction"),
                Some("application/json"),
                body.to_string(),
            )
            .await
        }
    };
    let (a, b, c) = tokio::join!(evict("p0"), evict("p1"), evict("p2"));
    let answers = [("p0", a?), ("p1", b?), ("p2", c?)];
    let gone: Vec<&str> = answers
        .iter()
        .filter(|(_, (code, _))| *code == StatusCode::CREATED)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(gone.len(), 1, "{answers:?}");
    for (_, (code, v)) in answers.iter().filter(|(p, _)| *p != gone[0]) {
        assert_eq!(*code, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(v["reason"], "TooManyRequests");
        assert_eq!(v["details"]["causes"][0]["reason"], "DisruptionBudget");
    }
    let (_, pdb) = call(&app, "GET", &format!("{pdbs}/web"), None, Body::empty()).await?;
    assert_eq!(pdb["status"]["disruptionsAllowed"], 0);
    let recorded: Vec<&String> = pdb["status"]["disruptedPods"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(recorded, [gone[0]]);

    // Two budgets over one pod: the eviction subresource does not choose.
    let (code, v) = call(
        &app,
        "POST",
        pdbs,
        Some("application/json"),
        budget("second"),
    )
    .await?;
    anyhow::ensure!(code == StatusCode::CREATED, "{v}");
    let left = ["p0", "p1", "p2"]
        .into_iter()
        .find(|p| *p != gone[0])
        .unwrap_or("p2");
    let (code, v) = evict(left).await?;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("more than one PodDisruptionBudget")),
        "{v}"
    );
    Ok(())
}
