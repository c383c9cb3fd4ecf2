//! Pulling from OCI registries (the distribution API, v2): image references, manifests and
//! indexes, blobs checked against their digests, and the anonymous bearer-token handshake
//! public registries ask for. Wasm pods use it for Wasm OCI artifacts (the CNCF layout: a
//! manifest whose layer is `application/wasm` or a `…+wasm` media type).

use std::time::Duration;

use serde_json::Value;

/// Largest manifest or index accepted.
const MAX_MANIFEST: usize = 4 << 20;

/// Largest Wasm layer accepted.
pub const MAX_WASM: usize = 256 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}: not found in the registry")]
    NotFound(String),
    #[error("{0}: the registry refused access ({1})")]
    Denied(String, String),
    #[error("{0}: {1}")]
    Registry(String, String),
    #[error("{0} is not a Wasm artifact: {1}")]
    NotWasm(String, String),
}

/// `registry/repository[:tag][@digest]`, with Docker's defaults for the short forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(image: &str) -> Result<Reference, Error> {
        let bad = |why: &str| Error::Reference(image.into(), why.into());
        let (rest, digest) = match image.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("a digest is sha256:HEX"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("a sha256 digest has 64 hex digits"));
                }
                (r, Some(d.to_ascii_lowercase()))
            }
            None => (image, None),
        };
        // The first part is a registry if it looks like a host.
        let (registry, path) = match rest.split_once('/') {
            Some((h, p)) if h.contains(['.', ':']) || h == "localhost" => (h.to_string(), p),
            _ => ("docker.io".to_string(), rest),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
            _ => (path, None),
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'.' | b'_' | b'-' | b'/')
                })
        };
        if !ok(path) || path.starts_with('/') || path.ends_with('/') || path.contains("//") {
            return Err(bad(
                "a repository is lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(bad("a tag is up to 128 letters, digits, '.', '_' and '-'"));
            }
        }
        let repository = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        Ok(Reference {
            registry,
            repository,
            tag: if digest.is_none() && tag.is_none() {
                Some("latest".into())
            } else {
                tag
            },
            digest,
        })
    }

    /// What the manifest is fetched by: the digest when there is one.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A pulled Wasm artifact.
#[derive(Debug, Clone)]
pub struct Wasm {
    /// The digest of the Wasm layer: what the bytes hash to.
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// A registry client. Registries on loopback, and those named as insecure, are spoken to
/// over plain HTTP; all others over HTTPS with the web PKI's roots.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    insecure: Vec<String>,
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", outpost_api::sha256_hex(b))
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

impl Client {
    pub fn new(insecure: Vec<String>) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .user_agent("outpost-node")
            .build()
            .unwrap_or_default();
        Client { http, insecure }
    }

    fn base(&self, registry: &str) -> String {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        let plain = host == "localhost"
            || host.starts_with("127.")
            || host == "[::1]"
            || self.insecure.iter().any(|i| i == registry || i == host);
        let registry = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        format!("{}://{registry}", if plain { "http" } else { "https" })
    }

    /// GET `path` of the registry, answering a bearer challenge once.
    async fn get(
        &self,
        r: &Reference,
        path: &str,
        accept: &str,
    ) -> Result<reqwest::Response, Error> {
        let url = format!("{}/v2/{}/{path}", self.base(&r.registry), r.repository);
        let what = r.to_string();
        let fail = |e: reqwest::Error| Error::Registry(what.clone(), e.to_string());
        let mut token: Option<String> = None;
        for _ in 0..2 {
            let mut req = self.http.get(&url).header("accept", accept);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.map_err(fail)?;
            match resp.status().as_u16() {
                200..=299 => return Ok(resp),
                401 if token.is_none() => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    token = Some(self.token(&what, &challenge).await?);
                }
                401 | 403 => {
                    return Err(Error::Denied(
                        what,
                        "private images need credentials, which this node does not send yet".into(),
                    ))
                }
                404 => return Err(Error::NotFound(what)),
                s => {
                    let body = resp.text().await.unwrap_or_default();
                    return Err(Error::Registry(
                        what,
                        format!("HTTP {s}: {}", body.chars().take(300).collect::<String>()),
                    ));
                }
            }
        }
        Err(Error::Denied(
            what,
            "the registry refused the token it issued".into(),
        ))
    }

    /// An anonymous token for `Bearer realm=…,service=…,scope=…`.
    async fn token(&self, what: &str, challenge: &str) -> Result<String, Error> {
        let params = challenge.strip_prefix("Bearer ").ok_or_else(|| {
            Error::Denied(what.into(), format!("unsupported challenge {challenge:?}"))
        })?;
        let mut realm = None;
        let mut query = Vec::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                let v = v.trim_matches('"').to_string();
                if k == "realm" {
                    realm = Some(v);
                } else {
                    query.push((k.to_string(), v));
                }
            }
        }
        let realm =
            realm.ok_or_else(|| Error::Denied(what.into(), "no realm in the challenge".into()))?;
        let v: Value = self
            .http
            .get(&realm)
            .query(&query)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Error::Denied(what.into(), e.to_string()))?
            .json()
            .await
            .map_err(|e| Error::Denied(what.into(), e.to_string()))?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(String::from)
            .ok_or_else(|| Error::Denied(what.into(), "no token from the auth server".into()))
    }

    async fn bytes(resp: reqwest::Response, max: usize, what: &str) -> Result<Vec<u8>, Error> {
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(Error::Registry(
                what.into(),
                format!("larger than {max} bytes"),
            ));
        }
        let mut out = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::Registry(what.into(), e.to_string()))?
        {
            if out.len() + chunk.len() > max {
                return Err(Error::Registry(
                    what.into(),
                    format!("larger than {max} bytes"),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// The image manifest `r` names, through an index if it names one.
    pub async fn manifest(&self, r: &Reference) -> Result<Value, Error> {
        let what = r.to_string();
        let mut reference = r.reference().to_string();
        for _ in 0..2 {
            let resp = self
                .get(r, &format!("manifests/{reference}"), MANIFEST_TYPES)
                .await?;
            let body = Self::bytes(resp, MAX_MANIFEST, &what).await?;
            if reference.starts_with("sha256:") && sha256(&body) != reference {
                return Err(Error::Registry(
                    what,
                    format!("the manifest does not match {reference}"),
                ));
            }
            let m: Value = serde_json::from_slice(&body).map_err(|e| {
                Error::Registry(what.clone(), format!("a manifest that is not JSON: {e}"))
            })?;
            let Some(list) = m["manifests"].as_array() else {
                return Ok(m);
            };
            // An index: the Wasm entry if it names one, else the first.
            let wasm = |e: &&Value| {
                let p = &e["platform"];
                p["architecture"] == "wasm"
                    || p["os"].as_str().is_some_and(|o| o.starts_with("wasi"))
            };
            let pick = list
                .iter()
                .find(wasm)
                .or(list.first())
                .ok_or_else(|| Error::NotWasm(what.clone(), "an empty image index".into()))?;
            reference = pick["digest"].as_str().unwrap_or_default().to_string();
        }
        Err(Error::Registry(what, "an index of indexes".into()))
    }

    /// Pull the Wasm module or component of a Wasm OCI artifact.
    pub async fn pull_wasm(&self, image: &str) -> Result<Wasm, Error> {
        let r = Reference::parse(image)?;
        let what = r.to_string();
        let m = self.manifest(&r).await?;
        let layers = m["layers"].as_array().cloned().unwrap_or_default();
        let layer = layers
            .iter()
            .find(|l| {
                l["mediaType"]
                    .as_str()
                    .is_some_and(|t| t == "application/wasm" || t.ends_with("+wasm"))
            })
            .ok_or_else(|| {
                let types: Vec<&str> = layers
                    .iter()
                    .filter_map(|l| l["mediaType"].as_str())
                    .collect();
                Error::NotWasm(
                    what.clone(),
                    format!("no application/wasm layer (layers: {})", types.join(", ")),
                )
            })?;
        let digest = layer["digest"].as_str().unwrap_or_default().to_string();
        if !digest.starts_with("sha256:") {
            return Err(Error::Registry(
                what,
                format!("unsupported layer digest {digest:?}"),
            ));
        }
        let resp = self.get(&r, &format!("blobs/{digest}"), "*/*").await?;
        let bytes = Self::bytes(resp, MAX_WASM, &what).await?;
        if sha256(&bytes) != digest {
            return Err(Error::Registry(
                what,
                format!("layer {digest} arrived with another digest"),
            ));
        }
        Ok(Wasm { digest, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_with_defaults() {
        let r = Reference::parse("hello").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference()),
            ("docker.io", "library/hello", "latest")
        );
        let r = Reference::parse("localhost:5000/wasm/hello:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference()),
            ("localhost:5000", "wasm/hello", "v1")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/x/y@{d}")).unwrap();
        assert_eq!((r.tag.clone(), r.reference()), (None, d.as_str()));
        assert_eq!(r.to_string(), format!("ghcr.io/x/y@{d}"));
        for bad in ["", "UPPER/case", "x@sha256:12", "a//b", "x:bad tag"] {
            assert!(
                matches!(Reference::parse(bad), Err(Error::Reference(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn loopback_is_plain_http() {
        let c = Client::new(vec!["edge-registry:5000".into()]);
        assert_eq!(c.base("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base("edge-registry:5000"), "http://edge-registry:5000");
        assert_eq!(c.base("ghcr.io"), "https://ghcr.io");
        assert_eq!(c.base("docker.io"), "https://registry-1.docker.io");
    }
}
