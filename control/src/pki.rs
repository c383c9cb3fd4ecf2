//! Certificates for the control plane's members.
//!
//! Members authenticate each other with mutual TLS under a peer CA of their own, separate from
//! the CA that will sign API and node certificates, so that no node or user certificate can
//! ever pass for a Raft member. Files live in one directory:
//!
//! ```text
//! peer-ca.crt  peer-ca.key      the peer CA (copied to each member that may issue)
//! member.crt   member.key       this member's certificate, SAN `member.outpost`
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The name every member certificate carries and every member connects to.
pub const MEMBER_NAME: &str = "member.outpost";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Bad { path: PathBuf, detail: String },
    #[error("no peer CA in {0}: copy peer-ca.crt and peer-ca.key from a member of the cluster")]
    NoCa(PathBuf),
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// A member's TLS identity and the CA it trusts.
pub struct PeerIdentity {
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

fn write_private(path: &Path, data: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.into(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Create a self-signed CA named `cn` in `dir` as `{stem}.crt` and `{stem}.key`.
fn create_named_ca(dir: &Path, stem: &str, cn: &str) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.into(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.self_signed(&key)?;
    let key_path = dir.join(format!("{stem}.key"));
    let crt_path = dir.join(format!("{stem}.crt"));
    // A crash after the key and before the certificate leaves a key to be replaced next time.
    let _ = fs::remove_file(&key_path);
    write_private(&key_path, &key.serialize_pem())?;
    fs::write(&crt_path, cert.pem()).map_err(|source| PkiError::Io {
        path: crt_path,
        source,
    })
}

/// Create a peer CA in `dir` (which must not have one yet).
pub fn create_ca(dir: &Path) -> Result<(), PkiError> {
    create_named_ca(dir, "peer-ca", "outpost peer CA")
}

/// Load this member's identity from `dir`, issuing its certificate from the CA there if it
/// has none yet. With `create` a missing CA is generated (the first member of a cluster).
pub fn load_or_issue(dir: &Path, create: bool) -> Result<PeerIdentity, PkiError> {
    let ca_crt = dir.join("peer-ca.crt");
    let ca_key = dir.join("peer-ca.key");
    if !ca_crt.exists() {
        if !create {
            return Err(PkiError::NoCa(dir.into()));
        }
        create_ca(dir)?;
    }
    let crt = dir.join("member.crt");
    let key = dir.join("member.key");
    if !crt.exists() || !key.exists() {
        let ca_pem = read(&ca_crt)?;
        let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?).map_err(|e| PkiError::Bad {
            path: ca_key.clone(),
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)?;
        let member_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![MEMBER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, MEMBER_NAME);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&member_key, &issuer)?;
        // Write the key first: a crash between the two leaves no certificate without its key.
        let _ = fs::remove_file(&key);
        write_private(&key, &member_key.serialize_pem())?;
        fs::write(&crt, cert.pem()).map_err(|source| PkiError::Io {
            path: crt.clone(),
            source,
        })?;
    }
    let bad = |path: &Path, e: rustls::pki_types::pem::Error| PkiError::Bad {
        path: path.into(),
        detail: e.to_string(),
    };
    Ok(PeerIdentity {
        ca: CertificateDer::from_pem_slice(read(&ca_crt)?.as_bytes())
            .map_err(|e| bad(&ca_crt, e))?,
        cert: CertificateDer::from_pem_slice(read(&crt)?.as_bytes()).map_err(|e| bad(&crt, e))?,
        key: PrivateKeyDer::from_pem_slice(read(&key)?.as_bytes()).map_err(|e| bad(&key, e))?,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &PeerIdentity) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// Server side: present our certificate, require a client certificate from the peer CA.
pub fn server_config(id: &PeerIdentity, alpn: &[u8]) -> Result<rustls::ServerConfig, PkiError> {
    let tls = |e: rustls::Error| PkiError::Tls(e.to_string());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Client side: trust only the peer CA, present our certificate.
pub fn client_config(id: &PeerIdentity, alpn: &[u8]) -> Result<rustls::ClientConfig, PkiError> {
    let tls = |e: rustls::Error| PkiError::Tls(e.to_string());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The cluster CA (`ca.crt`, `ca.key` in `dir`) signs the API server's certificate and every
/// user and node client certificate. It is created with the first member.
pub fn ensure_cluster_ca(dir: &Path) -> Result<(), PkiError> {
    if dir.join("ca.crt").exists() {
        return Ok(());
    }
    create_named_ca(dir, "ca", "outpost cluster CA")
}

fn cluster_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let ca_key = dir.join("ca.key");
    let key = KeyPair::from_pem(&read(&ca_key)?).map_err(|e| PkiError::Bad {
        path: ca_key.clone(),
        detail: e.to_string(),
    })?;
    Ok(Issuer::from_ca_cert_pem(&read(&dir.join("ca.crt"))?, key)?)
}

/// A client certificate from the cluster CA: `cn` is the user, `orgs` the groups.
/// Returns (certificate PEM, key PEM).
pub fn issue_client(dir: &Path, cn: &str, orgs: &[&str]) -> Result<(String, String), PkiError> {
    let issuer = cluster_issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for o in orgs {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The API server's TLS config: a serving certificate for `names` (DNS names or IPs) from
/// the cluster CA, issued anew at each start; client certificates from the same CA are
/// requested but optional.
pub fn api_server_config(dir: &Path, names: &[String]) -> Result<rustls::ServerConfig, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        params
            .subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e: rcgen::Error| PkiError::Tls(e.to_string()))?,
                ),
            });
    }
    params
        .distinguished_name
        .push(DnType::CommonName, "outpost-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving(
        dir,
        params,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
}

/// A serving config with a fresh key and a certificate from the cluster CA for `params`; the
/// chain includes the CA. Client certificates from the same CA are accepted, not required.
fn serving(
    dir: &Path,
    params: CertificateParams,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, PkiError> {
    let tls = |e: rustls::Error| PkiError::Tls(e.to_string());
    let issuer = cluster_issuer(dir)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let ca = cluster_ca_der(dir)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(tls)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der().clone(), ca], key_der)
        .map_err(tls)?;
    cfg.alpn_protocols = alpn;
    Ok(cfg)
}

/// A kubeconfig for `server` that authenticates with a client certificate.
pub fn kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str, user: &str) -> String {
    use base64::Engine;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: outpost\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: outpost\n  context:\n    cluster: outpost\n    user: {user}\ncurrent-context: outpost\n",
        b(ca_pem),
        b(cert_pem),
        b(key_pem)
    )
}

/// Write `data` to `path` readable by its owner only, replacing what was there.
pub fn write_secret(path: &Path, data: &str) -> Result<(), PkiError> {
    let _ = fs::remove_file(path);
    write_private(path, data)
}

/// The cluster CA certificate in DER.
pub fn cluster_ca_der(dir: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let path = dir.join("ca.crt");
    CertificateDer::from_pem_slice(read(&path)?.as_bytes()).map_err(|e| PkiError::Bad {
        path,
        detail: e.to_string(),
    })
}

/// The hex SHA-256 of the cluster CA's DER: what a bootstrap token pins.
pub fn ca_hash(dir: &Path) -> Result<String, PkiError> {
    Ok(crate::sha256_hex(cluster_ca_der(dir)?.as_ref()))
}

/// How long a node certificate is valid. Far longer than any autonomy window, so a node that
/// was offline for all of it can still reconnect; nodes renew when a third is left.
pub const NODE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// Sign a node's CSR as `system:node:<node>` in group `system:nodes`, whatever the CSR's
/// subject says: the name comes from the join (or the connection), never from the CSR.
pub fn sign_node(
    dir: &Path,
    csr_pem: &str,
    node: &str,
    ttl: std::time::Duration,
) -> Result<String, PkiError> {
    let issuer = cluster_issuer(dir)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("system:node:{node}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time_now();
    // Backdated for clocks a little behind ours, by no more than a quarter of the validity
    // (the node renews when a third of the whole is left).
    params.not_before = now - std::time::Duration::from_secs(300).min(ttl / 4);
    params.not_after = now + ttl;
    csr.params = params;
    Ok(csr.signed_by(&issuer)?.pem())
}

/// Sign a user's CSR for the `kubernetes.io/kube-apiserver-client` signer: the subject it
/// asks for (CN the user, O its groups), client authentication only, valid for `ttl`.
pub fn sign_client(
    dir: &Path,
    csr_pem: &str,
    ttl: std::time::Duration,
) -> Result<String, PkiError> {
    let issuer = cluster_issuer(dir)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    // Identities this CA also stands for on the node gateway are never a user's.
    for (t, v) in csr.params.distinguished_name.iter() {
        let v = match v {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
            rcgen::DnValue::Ia5String(s) => s.as_str().to_string(),
            _ => String::new(),
        };
        let node = *t == DnType::CommonName && v.starts_with("system:node:");
        let group = *t == DnType::OrganizationName
            && (v == "system:nodes" || v == outpost_api::link::MEMBERS_GROUP);
        if node || group {
            return Err(PkiError::Tls(format!(
                "this signer does not issue node or member identities ({v})"
            )));
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = csr.params.distinguished_name.clone();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let now = time_now();
    params.not_before = now - std::time::Duration::from_secs(300);
    params.not_after = now + ttl;
    csr.params = params;
    Ok(csr.signed_by(&issuer)?.pem())
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The node gateway's TLS config: a certificate for [`outpost_api::link::GATEWAY_NAME`]
/// from the cluster CA (issued at each start, chain includes the CA so a joining node can
/// check its pin), client certificates from the cluster CA accepted but not required (a
/// joining node has none yet; node connections are checked for one by the gateway).
pub fn gateway_server_config(dir: &Path) -> Result<rustls::ServerConfig, PkiError> {
    use outpost_api::link::{ALPN_JOIN, ALPN_MEMBER, ALPN_NODE, ALPN_RELAY, GATEWAY_NAME};
    let mut params = CertificateParams::new(vec![GATEWAY_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, GATEWAY_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving(
        dir,
        params,
        &[&rustls::version::TLS13],
        vec![
            ALPN_NODE.to_vec(),
            ALPN_JOIN.to_vec(),
            ALPN_MEMBER.to_vec(),
            ALPN_RELAY.to_vec(),
        ],
    )
}

/// A member's side of a relay connection to another member's gateway: trust the cluster CA,
/// present a certificate from it in the members' group (only a member, which holds the CA's
/// key, can make one).
pub fn relay_client_config(dir: &Path, member: u64) -> Result<rustls::ClientConfig, PkiError> {
    use outpost_api::link::{ALPN_RELAY, MEMBERS_GROUP};
    let tls = |e: rustls::Error| PkiError::Tls(e.to_string());
    let (cert, key) = issue_client(dir, &format!("system:member:{member}"), &[MEMBERS_GROUP])?;
    let cert = CertificateDer::from_pem_slice(cert.as_bytes())
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cluster_ca_der(dir)?).map_err(tls)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN_RELAY.to_vec()];
    Ok(cfg)
}
