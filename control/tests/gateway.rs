//! The node gateway over real QUIC with a real store: joins that must be refused, forged
//! certificates, garbled and oversized frames, a node reaching for another node's pods, and
//! relay connections from anyone but a member. Each refusal is clear and leaves the other
//! nodes' links working.

use outpost_control::gateway::Kind;
use std::sync::Arc;
use std::time::Duration;

use outpost_api::link::{read_frame, Head, Token, MAX_FRAME};
use outpost_control::api::{self, Api, ServeConfig};
use outpost_control::store::{Config, Store};
use outpost_edge_node::link::{self, Link, LinkError, Pki};

struct Cluster {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    api: Arc<Api>,
    gateway: String,
    _store: Store,
}

async fn cluster() -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut cfg = Config::new(1, dir.path().join("store"), "127.0.0.1:0".parse()?);
    cfg.election_timeout = Duration::from_millis(150);
    cfg.heartbeat = Duration::from_millis(30);
    let store = Store::open(cfg).await?;
    let pki = dir.path().join("pki");
    outpost_control::pki::ensure_cluster_ca(&pki)?;
    let started = api::start(
        store.clone(),
        ServeConfig {
            listen: "127.0.0.1:0".parse()?,
            pki_dir: pki.clone(),
            names: vec!["127.0.0.1".into()],
            token_file: None,
            gateway: Some("127.0.0.1:0".parse()?),
            node_cert_ttl: outpost_control::pki::NODE_CERT_TTL,
            lifecycle: Default::default(),
            event_ttl: outpost_control::controllers::events::TTL,
        },
    )
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = api::bootstrap(&started.api).await {
        anyhow::ensure!(std::time::Instant::now() < deadline, "bootstrap: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Cluster {
        gateway: started.gateway.map(|g| g.to_string()).unwrap_or_default(),
        api: started.api,
        pki,
        _store: store,
        _dir: dir,
    })
}

/// A node identity issued straight from the cluster CA (as `outpost up` does for its own).
fn node_pki(c: &Cluster, root: &std::path::Path, name: &str) -> anyhow::Result<Pki> {
    let pki = Pki::new(&root.join(name));
    let (cert, key) = outpost_control::pki::issue_client(
        &c.pki,
        &format!("system:node:{name}"),
        &["system:nodes"],
    )?;
    let ca = std::fs::read_to_string(c.pki.join("ca.crt"))?;
    link::install(&pki, &ca, &cert, &key)?;
    Ok(pki)
}

async fn token(c: &Cluster, ttl: Duration, uses: u32) -> anyhow::Result<Token> {
    token_of(c, ttl, uses, outpost_control::gateway::Kind::Node).await
}

async fn token_of(
    c: &Cluster,
    ttl: Duration,
    uses: u32,
    kind: outpost_control::gateway::Kind,
) -> anyhow::Result<Token> {
    let t = outpost_control::gateway::create_token(&c.api, ttl, uses, kind)
        .await
        .map_err(anyhow::Error::msg)?;
    Token::parse(&t).map_err(anyhow::Error::msg)
}

fn refused(r: Result<(), LinkError>) -> String {
    match r {
        Err(LinkError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn joins_are_checked() -> anyhow::Result<()> {
    let c = cluster().await?;
    let root = tempfile::tempdir()?;
    let t = token(&c, Duration::from_secs(600), 1).await?;
    let mut unknown = t.clone();
    unknown.secret = "0".repeat(32);
    let why = refused(
        link::join(
            &c.gateway,
            &unknown,
            "n1",
            &Pki::new(&root.path().join("a")),
        )
        .await,
    );
    assert!(why.contains("unknown token"), "{why}");
    let bad_name = refused(
        link::join(
            &c.gateway,
            &t,
            "Not_A_Name",
            &Pki::new(&root.path().join("b")),
        )
        .await,
    );
    assert!(bad_name.contains("not a valid node name"), "{bad_name}");
    // The refusals above did not use the token up.
    let good = Pki::new(&root.path().join("c"));
    link::join(&c.gateway, &t, "n1", &good).await?;
    assert_eq!(good.node_name()?, "n1");
    let (left, whole) = good.cert_lifetime()?;
    assert!(
        whole > 300 * 86_400 && left > 300 * 86_400,
        "{left} {whole}"
    );
    let reused = refused(link::join(&c.gateway, &t, "n2", &Pki::new(&root.path().join("d"))).await);
    assert!(reused.contains("already been used"), "{reused}");
    let expired = token(&c, Duration::from_secs(1), 5).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let why = refused(
        link::join(
            &c.gateway,
            &expired,
            "n3",
            &Pki::new(&root.path().join("e")),
        )
        .await,
    );
    assert!(why.contains("expired"), "{why}");
    // A member token does not join a node, nor a node token a member, and neither is used up.
    let member = token_of(&c, Duration::from_secs(600), 1, Kind::Member).await?;
    let why =
        refused(link::join(&c.gateway, &member, "n4", &Pki::new(&root.path().join("f"))).await);
    assert!(why.contains("this is a member token"), "{why}");
    let node = token(&c, Duration::from_secs(600), 1).await?;
    let why = match link::join_member(&c.gateway, &node, 7).await {
        Err(LinkError::Refused(why)) => why,
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("a node token admitted a member"),
    };
    assert!(why.contains("this is a node token"), "{why}");
    let files = link::join_member(&c.gateway, &member, 7).await?;
    assert_eq!(files.ca_crt, std::fs::read_to_string(c.pki.join("ca.crt"))?);
    assert!(files.peer_ca_key.contains("PRIVATE KEY"));
    link::join(&c.gateway, &node, "n4", &Pki::new(&root.path().join("g"))).await?;
    // The joined node connects with its certificate and works.
    let l = Link::connect(&c.gateway, &good).await?;
    l.renew().await?;
    Ok(())
}

#[tokio::test]
async fn forged_certificates_get_nothing() -> anyhow::Result<()> {
    let c = cluster().await?;
    let root = tempfile::tempdir()?;
    // A certificate that names a node but comes from another CA.
    let other_ca = root.path().join("other-ca");
    outpost_control::pki::ensure_cluster_ca(&other_ca)?;
    let (cert, key) =
        outpost_control::pki::issue_client(&other_ca, "system:node:evil", &["system:nodes"])?;
    let forged = Pki::new(&root.path().join("forged"));
    link::install(
        &forged,
        &std::fs::read_to_string(c.pki.join("ca.crt"))?,
        &cert,
        &key,
    )?;
    let r = async {
        let l = Link::connect(&c.gateway, &forged).await?;
        l.call("GET", "/api/v1/nodes", None).await
    }
    .await;
    assert!(r.is_err(), "a forged certificate was let in");
    // A real certificate from the cluster CA that is not a node's: connected, then closed.
    let (cert, key) = outpost_control::pki::issue_client(&c.pki, "alice", &["system:masters"])?;
    let user = Pki::new(&root.path().join("user"));
    link::install(
        &user,
        &std::fs::read_to_string(c.pki.join("ca.crt"))?,
        &cert,
        &key,
    )?;
    let r = async {
        let l = Link::connect(&c.gateway, &user).await?;
        l.call("GET", "/api/v1/nodes", None).await
    }
    .await;
    assert!(r.is_err(), "a user certificate was let in as a node");
    Ok(())
}

#[tokio::test]
async fn bad_frames_and_foreign_pods_are_refused_without_harm() -> anyhow::Result<()> {
    let c = cluster().await?;
    let root = tempfile::tempdir()?;
    let n1 = Link::connect(&c.gateway, &node_pki(&c, root.path(), "n1")?).await?;
    let n2 = Link::connect(&c.gateway, &node_pki(&c, root.path(), "n2")?).await?;
    // Garbage where a frame should be: a 400 on that stream, the link stays.
    let (mut send, mut recv) = n1.conn.open_bi().await?;
    send.write_all(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .await?;
    send.finish()?;
    let head: Head = read_frame(&mut recv, MAX_FRAME).await?;
    assert_eq!(head.status, 400);
    let body = recv.read_to_end(4096).await?;
    assert!(String::from_utf8_lossy(&body).contains("refused"));
    // A length over the limit: refused before anything is read.
    let (mut send, mut recv) = n1.conn.open_bi().await?;
    send.write_all(&(512u32 << 20).to_be_bytes()).await?;
    let head: Head = read_frame(&mut recv, MAX_FRAME).await?;
    assert_eq!(head.status, 400);
    let body = String::from_utf8_lossy(&recv.read_to_end(4096).await?).into_owned();
    assert!(body.contains("over the limit"), "{body}");
    // Both nodes still work.
    for l in [&n1, &n2] {
        l.renew().await?;
        let a = l.call("GET", "/api/v1/nodes", None).await?;
        assert_eq!(a.status, 200, "{}", a.message());
    }
    // n1 asks for n2's pods, and for every pod: forbidden, with a reason.
    let a = n1
        .call("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn2", None)
        .await?;
    assert_eq!(a.status, 403, "{}", a.message());
    assert!(a.message().contains("its own pods"), "{}", a.message());
    let a = n1.call("GET", "/api/v1/pods", None).await?;
    assert_eq!(a.status, 403);
    // n1 may create its own Node, not n2's.
    let node = |n: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}})
            .to_string()
            .into_bytes()
    };
    let a = n1
        .call(
            "POST",
            "/api/v1/nodes",
            Some(("application/json", node("n2"))),
        )
        .await?;
    assert_eq!(a.status, 403, "{}", a.message());
    let a = n1
        .call(
            "POST",
            "/api/v1/nodes",
            Some(("application/json", node("n1"))),
        )
        .await?;
    assert_eq!(a.status, 201, "{}", a.message());
    let a = n1
        .call(
            "PATCH",
            "/api/v1/nodes/n2/status",
            Some(("application/merge-patch+json", b"{}".to_vec())),
        )
        .await?;
    assert_eq!(a.status, 403);
    // Modules: an unknown digest is a 404 to the node, and nodes may not push.
    let a = n1
        .call(
            "GET",
            &format!("/outpost/v1/modules/sha256:{}", "a".repeat(64)),
            None,
        )
        .await?;
    assert_eq!(a.status, 404, "{}", a.message());
    let a = n1
        .call(
            "POST",
            "/outpost/v1/modules",
            Some(("application/wasm", b"\0asm\x01\0\0\0".to_vec())),
        )
        .await?;
    assert_eq!(a.status, 403, "nodes may not push modules: {}", a.message());
    Ok(())
}

/// Dial the gateway with `tls` as the client's TLS config.
async fn dial(
    c: &Cluster,
    tls: rustls::ClientConfig,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let conn = ep
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            c.gateway.parse()?,
            outpost_api::link::GATEWAY_NAME,
        )?
        .await?;
    Ok((ep, conn))
}

#[tokio::test]
async fn relays_are_for_members_only() -> anyhow::Result<()> {
    use outpost_api::link::{write_frame, Down, LogRequest, Relay};
    let c = cluster().await?;
    // A member asking for a node linked nowhere hears why; garbage gets a 400; the
    // connection stays up through both.
    let (_ep, conn) = dial(&c, outpost_control::pki::relay_client_config(&c.pki, 9)?).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let logs = Down::Logs(LogRequest {
        namespace: "default".into(),
        pod: "p".into(),
        container: "c".into(),
        follow: false,
        previous: false,
        timestamps: false,
        tail_lines: None,
        since_seconds: None,
        limit_bytes: None,
    });
    let relay = Relay {
        node: "nowhere".into(),
        down: logs,
    };
    write_frame(&mut send, &relay, MAX_FRAME).await?;
    send.finish()?;
    let head: Head = read_frame(&mut recv, MAX_FRAME).await?;
    assert_eq!(head.status, 503);
    let body = String::from_utf8_lossy(&recv.read_to_end(4096).await?).into_owned();
    assert!(body.contains("\"nowhere\" is not connected"), "{body}");
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await?;
    send.finish()?;
    let head: Head = read_frame(&mut recv, MAX_FRAME).await?;
    assert_eq!(head.status, 400);
    assert!(
        conn.close_reason().is_none(),
        "the member's connection was closed"
    );
    // A node's certificate (from the same CA, not in the members' group) is turned away.
    let (cert, key) =
        outpost_control::pki::issue_client(&c.pki, "system:node:n1", &["system:nodes"])?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(outpost_control::pki::cluster_ca_der(&c.pki)?)?;
    use rustls::pki_types::pem::PemObject;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![rustls::pki_types::CertificateDer::from_pem_slice(
            cert.as_bytes(),
        )?],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?,
    )?;
    tls.alpn_protocols = vec![outpost_api::link::ALPN_RELAY.to_vec()];
    let (_ep, conn) = dial(&c, tls).await?;
    let why = conn.closed().await.to_string();
    assert!(why.contains("a member certificate is required"), "{why}");
    Ok(())
}
