//! A minimal Kubernetes API client for the `outpost` command: finds the cluster the way
//! kubectl does (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`; then `.outpost/kubeconfig`)
//! and makes one HTTPS request at a time with the kubeconfig's credentials.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

pub struct Client {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

/// The kubeconfig to use: the flag, else `KUBECONFIG` (first file), else `~/.kube/config`,
/// else `.outpost/kubeconfig` (what `outpost up` writes in the current directory).
pub fn kubeconfig_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.into();
    }
    if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        if let Some(first) = std::env::split_paths(&k).next() {
            return first;
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".kube/config");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(".outpost/kubeconfig")
}

fn data(v: &Value, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(d) = v[format!("{key}-data")].as_str() {
        return Ok(Some(
            base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .with_context(|| format!("{key}-data is not base64"))?,
        ));
    }
    if let Some(f) = v[key].as_str() {
        return Ok(Some(
            std::fs::read(f).with_context(|| format!("reading {f}"))?,
        ));
    }
    Ok(None)
}

impl Client {
    pub fn from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
        let cfg: Value = serde_norway::from_str(&text)
            .with_context(|| format!("parsing the kubeconfig {}", path.display()))?;
        let ctx_name = cfg["current-context"].as_str().unwrap_or("");
        let find = |list: &str, name: &str| -> Value {
            cfg[list]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["name"] == name))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let ctx = find("contexts", ctx_name);
        let cluster =
            find("clusters", ctx["context"]["cluster"].as_str().unwrap_or(""))["cluster"].clone();
        let user = find("users", ctx["context"]["user"].as_str().unwrap_or(""))["user"].clone();
        let server = cluster["server"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: the current context has no server", path.display()))?;
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("only https servers are supported (got {server})"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse().context("server port")?,
            ),
            _ => (hostport.trim_matches(['[', ']']).to_string(), 443),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = data(&cluster, "certificate-authority")? {
            for c in CertificateDer::pem_slice_iter(&ca) {
                roots.add(c.context("the kubeconfig's CA")?)?;
            }
        }
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let tls = match (
            data(&user, "client-certificate")?,
            data(&user, "client-key")?,
        ) {
            (Some(cert), Some(key)) => {
                let certs = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>()?;
                b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(&key)?)?
            }
            _ => b.with_no_client_auth(),
        };
        Ok(Client {
            host,
            port,
            tls: Arc::new(tls),
            token: user["token"].as_str().map(String::from),
        })
    }

    /// One request; returns the status and the whole body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
        let name = ServerName::try_from(self.host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .context("TLS handshake with the API server")?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", content_type)
            .header("accept", "application/json")
            .header("user-agent", "outpost");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, body))
    }

    /// A request that must succeed; the API's `Status` message otherwise.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let (status, body) = self.request(method, path, content_type, body).await?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let msg = v["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("{msg} (HTTP {status})");
        }
        Ok(v)
    }
}
