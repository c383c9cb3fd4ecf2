//! The node's side of the link: joining with a bootstrap token, connecting with mutual TLS,
//! API calls as the node, and the streams the control plane opens toward us.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_api::link::{
    read_frame, write_frame, Head, JoinReply, JoinRequest, Token, Up, ALPN_JOIN, ALPN_NODE,
    GATEWAY_NAME, IDLE_TIMEOUT, KEEP_ALIVE, MAX_FRAME,
};
use quinn::{Connection, Endpoint, RecvStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Connect(String),
    #[error("the control plane refused: {0}")]
    Refused(String),
    #[error("link: {0}")]
    Stream(String),
    #[error("{path}: {detail}")]
    Files { path: PathBuf, detail: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Files of the node's identity under `DATA_DIR/pki`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(data_dir: &Path) -> Pki {
        Pki {
            dir: data_dir.join("pki"),
        }
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    pub fn joined(&self) -> bool {
        self.ca().exists() && self.cert().exists() && self.key().exists()
    }

    fn read(&self, p: &Path) -> Result<String, LinkError> {
        std::fs::read_to_string(p).map_err(|e| LinkError::Files {
            path: p.into(),
            detail: e.to_string(),
        })
    }

    fn write(&self, p: &Path, data: &str, private: bool) -> Result<(), LinkError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| LinkError::Files {
            path: p.into(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(err)?;
        f.write_all(data.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, p).map_err(err)
    }

    /// The node's name, from its certificate.
    pub fn node_name(&self) -> Result<String, LinkError> {
        let pem = self.read(&self.cert())?;
        let bad = |d: String| LinkError::Files {
            path: self.cert(),
            detail: d,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or("");
        cn.strip_prefix("system:node:")
            .map(String::from)
            .ok_or_else(|| bad(format!("not a node certificate (CN {cn:?})")))
    }

    /// Seconds the certificate is still valid for, and its whole validity.
    pub fn cert_lifetime(&self) -> Result<(i64, i64), LinkError> {
        let pem = self.read(&self.cert())?;
        let bad = |d: String| LinkError::Files {
            path: self.cert(),
            detail: d,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        let v = cert.validity();
        let now = jiff::Timestamp::now().as_second();
        Ok((
            v.not_after.timestamp() - now,
            v.not_after.timestamp() - v.not_before.timestamp(),
        ))
    }

    /// Put a renewed key and certificate in place: both pending files, or the certificate
    /// left pending when the key was already moved.
    pub fn finish_renewal(&self) -> Result<(), LinkError> {
        let mv = |a: PathBuf, b: PathBuf| {
            std::fs::rename(&a, &b).map_err(|e| LinkError::Files {
                path: b,
                detail: e.to_string(),
            })
        };
        let (key, cert) = (pending(&self.key()), pending(&self.cert()));
        if !cert.exists() {
            // Nothing pending, or only a key whose certificate never arrived: keep the old pair.
            let _ = std::fs::remove_file(&key);
            return Ok(());
        }
        if key.exists() {
            mv(key, self.key())?;
        }
        mv(cert, self.cert())
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, LinkError> {
        self.finish_renewal()?;
        let bad = |p: PathBuf, e: String| LinkError::Files { path: p, detail: e };
        let ca = CertificateDer::from_pem_slice(self.read(&self.ca())?.as_bytes())
            .map_err(|e| bad(self.ca(), e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(self.read(&self.cert())?.as_bytes())
            .map_err(|e| bad(self.cert(), e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.read(&self.key())?.as_bytes())
            .map_err(|e| bad(self.key(), e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| bad(self.ca(), e.to_string()))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Connect(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| LinkError::Connect(format!("node certificate: {e}")))?;
        cfg.alpn_protocols = vec![ALPN_NODE.to_vec()];
        Ok(cfg)
    }

    fn new_key_and_csr(&self, node: &str) -> Result<(rcgen::KeyPair, String), LinkError> {
        let e = |e: rcgen::Error| LinkError::Connect(format!("making a key: {e}"));
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
        let csr = params.serialize_request(&key).map_err(e)?;
        Ok((key, csr.pem().map_err(e)?))
    }
}

const PIN_MISMATCH: &str = "the server's CA does not match the token's CA hash";

/// Accepts the gateway's certificate only if its chain holds the CA the token pins, and the
/// certificate is valid under that CA.
#[derive(Debug)]
struct PinnedCa {
    hash: String,
}

use crate::sha256_hex;

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.hash)
            .ok_or_else(|| {
                rustls::Error::General("the server's CA does not match the token's CA hash".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn resolve(server: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| LinkError::Connect(format!("resolving {server}: {e}")))?
        .next()
        .ok_or_else(|| LinkError::Connect(format!("{server} has no address")))
}

fn endpoint(to: SocketAddr) -> Result<Endpoint, LinkError> {
    let local: SocketAddr = if to.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| LinkError::Connect("address".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| LinkError::Connect("address".into()))?
    };
    Endpoint::client(local).map_err(|e| LinkError::Connect(format!("opening a UDP socket: {e}")))
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

async fn dial(
    server: &str,
    tls: rustls::ClientConfig,
) -> Result<(Endpoint, Connection), LinkError> {
    let to = resolve(server).await?;
    let ep = endpoint(to)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect_with(cfg, to, GATEWAY_NAME)
            .map_err(|e| LinkError::Connect(e.to_string()))?,
    )
    .await
    .map_err(|_| LinkError::Connect(format!("{server}: no answer within 10 s")))?
    .map_err(|e| LinkError::Connect(format!("{server}: {e}")))?;
    Ok((ep, conn))
}

/// One request and its reply with the gateway at `server`, on a connection with `alpn`
/// that trusts the gateway through `token`'s CA pin (there is no client certificate yet).
async fn ask_pinned<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    server: &str,
    token: &Token,
    alpn: &[u8],
    req: &Q,
) -> Result<R, LinkError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Connect(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            hash: token.ca_hash.clone(),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let (_ep, conn) = dial(server, tls).await.map_err(|e| match e {
        // Retrying cannot make a different CA the pinned one.
        LinkError::Connect(m) if m.contains(PIN_MISMATCH) => LinkError::Refused(m),
        e => e,
    })?;
    let stream = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(&e))?;
    write_frame(&mut send, req, MAX_FRAME)
        .await
        .map_err(|e| stream(&e))?;
    let _ = send.finish();
    let reply = read_frame(&mut recv, MAX_FRAME)
        .await
        .map_err(|e| stream(&e))?;
    conn.close(0u32.into(), b"done");
    Ok(reply)
}

/// Join the cluster at `server` with `token` as `node`: the gateway checks the token and
/// signs our key; the certificate and the cluster CA are stored in `pki`.
pub async fn join(server: &str, token: &Token, node: &str, pki: &Pki) -> Result<(), LinkError> {
    let (key, csr) = pki.new_key_and_csr(node)?;
    let req = JoinRequest {
        id: token.id.clone(),
        secret: token.secret.clone(),
        node: node.to_string(),
        csr,
    };
    let reply: JoinReply = ask_pinned(server, token, ALPN_JOIN, &req).await?;
    let stream = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
    match reply {
        JoinReply::Issued { cert, ca } => {
            if sha256_hex(
                CertificateDer::from_pem_slice(ca.as_bytes())
                    .map_err(|e| stream(&e))?
                    .as_ref(),
            ) != token.ca_hash
            {
                return Err(LinkError::Refused(
                    "the CA sent does not match the token's CA hash".into(),
                ));
            }
            // Key first: a crash between the writes leaves a key without a certificate,
            // which reads as "not joined", never a certificate without its key.
            pki.write(&pki.key(), &key.serialize_pem(), true)?;
            pki.write(&pki.ca(), &ca, false)?;
            pki.write(&pki.cert(), &cert, false)?;
            Ok(())
        }
        JoinReply::Refused(why) => Err(LinkError::Refused(why)),
    }
}

/// The cluster's CAs and a member's peer address, as a new control-plane member receives
/// them for a member token.
pub struct MemberFiles {
    pub peer_ca_crt: String,
    pub peer_ca_key: String,
    pub ca_crt: String,
    pub ca_key: String,
    /// A member's peer (Raft) address to join through.
    pub join: String,
}

/// Ask the gateway at `server` to admit a new control-plane member `member` with the member
/// `token`; the gateway is trusted through the token's CA pin, as in [`join`].
pub async fn join_member(
    server: &str,
    token: &Token,
    member: u64,
) -> Result<MemberFiles, LinkError> {
    use outpost_api::link::{MemberReply, MemberRequest, ALPN_MEMBER};
    let req = MemberRequest {
        id: token.id.clone(),
        secret: token.secret.clone(),
        member,
    };
    let reply: MemberReply = ask_pinned(server, token, ALPN_MEMBER, &req).await?;
    let stream = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
    match reply {
        MemberReply::Admitted {
            peer_ca_crt,
            peer_ca_key,
            ca_crt,
            ca_key,
            join,
        } => {
            let ca = CertificateDer::from_pem_slice(ca_crt.as_bytes()).map_err(|e| stream(&e))?;
            if sha256_hex(ca.as_ref()) != token.ca_hash {
                return Err(LinkError::Refused(
                    "the CA sent does not match the token's CA hash".into(),
                ));
            }
            Ok(MemberFiles {
                peer_ca_crt,
                peer_ca_key,
                ca_crt,
                ca_key,
                join,
            })
        }
        MemberReply::Refused(why) => Err(LinkError::Refused(why)),
    }
}

/// Write a node identity issued some other way (by `outpost up` for its own node).
/// Where a renewed `path` waits until it is put in place.
fn pending(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

pub fn install(pki: &Pki, ca: &str, cert: &str, key: &str) -> Result<(), LinkError> {
    pki.write(&pki.key(), key, true)?;
    pki.write(&pki.ca(), ca, false)?;
    pki.write(&pki.cert(), cert, false)
}

/// A live connection to the gateway, as the node.
#[derive(Clone)]
pub struct Link {
    pub conn: Connection,
    _endpoint: Endpoint,
}

/// One step of [`Link::list_watch`].
pub enum Change {
    /// The whole collection, at the start and after a compacted watch.
    Listed(Vec<serde_json::Value>),
    Upsert(serde_json::Value),
    Deleted(serde_json::Value),
}

/// The answer to an API call.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn message(&self) -> String {
        let j = self.json();
        j["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl Link {
    pub async fn connect(server: &str, pki: &Pki) -> Result<Link, LinkError> {
        let (ep, conn) = dial(server, pki.client_config()?).await?;
        Ok(Link {
            conn,
            _endpoint: ep,
        })
    }

    async fn exchange(&self, up: &Up) -> Result<(Head, RecvStream), LinkError> {
        let err = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| err(&e))?;
        write_frame(&mut send, up, MAX_FRAME)
            .await
            .map_err(|e| err(&e))?;
        let _ = send.finish();
        let head: Head = read_frame(&mut recv, MAX_FRAME)
            .await
            .map_err(|e| err(&e))?;
        Ok((head, recv))
    }

    /// An API request whose whole answer fits in `limit` bytes.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer, LinkError> {
        let limit = 128 << 20;
        let (content_type, body) = match body {
            Some((ct, b)) => (Some(ct.to_string()), b),
            None => (None, Vec::new()),
        };
        let up = Up::Call {
            method: method.into(),
            path: path.into(),
            content_type,
            body,
        };
        let fut = async {
            let (head, mut recv) = self.exchange(&up).await?;
            let body = recv
                .read_to_end(limit)
                .await
                .map_err(|e| LinkError::Stream(e.to_string()))?;
            Ok(Answer {
                status: head.status,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .map_err(|_| LinkError::Stream(format!("{method} {path}: no answer within 60 s")))?
    }

    /// An API request whose answer is read as it comes (a watch).
    pub async fn stream(&self, path: &str) -> Result<(u16, RecvStream), LinkError> {
        let up = Up::Call {
            method: "GET".into(),
            path: path.into(),
            content_type: None,
            body: Vec::new(),
        };
        let (head, recv) = self.exchange(&up).await?;
        Ok((head.status, recv))
    }

    /// List `path` (a collection, with its query), then watch it from the list's revision,
    /// telling `on` of every change, until the link fails (the reason is returned). A watch
    /// whose revision was compacted (410) lists again.
    pub async fn list_watch(&self, path: &str, mut on: impl FnMut(Change)) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut rv: Option<String> = None;
        loop {
            let from = match &rv {
                Some(r) => r.clone(),
                None => {
                    let a = match self.call("GET", path, None).await {
                        Ok(a) if a.ok() => a,
                        Ok(a) => return format!("listing {path}: {}", a.message()),
                        Err(e) => return format!("listing {path}: {e}"),
                    };
                    let mut list = a.json();
                    let items = match list["items"].take() {
                        serde_json::Value::Array(items) => items,
                        _ => Vec::new(),
                    };
                    on(Change::Listed(items));
                    list["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("0")
                        .to_string()
                }
            };
            rv = Some(from.clone());
            let watch =
                format!("{path}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={from}");
            let (status, recv) = match self.stream(&watch).await {
                Ok(s) => s,
                Err(e) => return format!("watching {path}: {e}"),
            };
            if status == 410 {
                rv = None;
                continue;
            }
            if status != 200 {
                return format!("watching {path}: status {status}");
            }
            let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(recv));
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    Ok(None) => break,
                    Err(e) => return format!("watching {path}: {e}"),
                };
                let Ok(mut ev) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let obj = ev["object"].take();
                if let Some(r) = obj["metadata"]["resourceVersion"].as_str() {
                    rv = Some(r.to_string());
                }
                match ev["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => on(Change::Upsert(obj)),
                    Some("DELETED") => on(Change::Deleted(obj)),
                    Some("ERROR") => {
                        // 410: the revision was compacted; list again.
                        rv = None;
                        break;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Renew the node's lease (kept in memory by the control plane).
    pub async fn renew(&self) -> Result<(), LinkError> {
        let (head, _) = self.exchange(&Up::Renew).await?;
        if head.status == 200 {
            Ok(())
        } else {
            Err(LinkError::Refused(format!(
                "lease renewal: {}",
                head.status
            )))
        }
    }

    /// Get a new certificate for a new key and store both.
    pub async fn recertify(&self, pki: &Pki, node: &str) -> Result<(), LinkError> {
        let (key, csr) = pki.new_key_and_csr(node)?;
        let (head, mut recv) = self.exchange(&Up::Certify { csr }).await?;
        let body = recv
            .read_to_end(64 << 10)
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if head.status != 200 {
            return Err(LinkError::Refused(text));
        }
        // Both new files first; then the renames, which `finish_renewal` completes if the
        // agent dies between them (a new key beside the old certificate would lock it out).
        pki.write(&pending(&pki.key()), &key.serialize_pem(), true)?;
        pki.write(&pending(&pki.cert()), &text, false)?;
        pki.finish_renewal()
    }
}
