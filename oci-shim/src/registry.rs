//! Pulling from OCI registries (the distribution API, v2): image references, manifests and
//! indexes (picking the Wasm entry or the node's platform), blobs checked against their
//! digests and streamed to disk with resume, and registry auth (anonymous or basic
//! credentials, answered directly or through the bearer-token handshake). Wasm pods use it
//! for Wasm OCI artifacts (the CNCF layout: a manifest whose layer is `application/wasm` or
//! a `…+wasm` media type), OCI pods for container images.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::Digest as _;

/// Largest manifest or index accepted.
const MAX_MANIFEST: usize = 4 << 20;

/// Largest Wasm layer accepted.
pub const MAX_WASM: usize = 256 << 20;

pub use crate::Error;

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
    /// Basic credentials (from an imagePullSecret) for the registry of the pull.
    auth: Option<(String, String)>,
}

/// Which entry of an image index a pull wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// A Wasm artifact: the `wasm` or `wasi*` entry, else the first.
    Wasm,
    /// A container image for this OS and architecture (Go's names: amd64, arm64, arm) and,
    /// for arm, variant.
    Platform {
        arch: String,
        variant: Option<String>,
    },
}

impl Want {
    /// The machine this runs on.
    pub fn here() -> Want {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7".to_string())),
            other => (other, None),
        };
        Want::Platform {
            arch: arch.into(),
            variant,
        }
    }

    fn accepts(&self, e: &Value) -> bool {
        let p = &e["platform"];
        match self {
            Want::Wasm => {
                p["architecture"] == "wasm"
                    || p["os"].as_str().is_some_and(|o| o.starts_with("wasi"))
            }
            Want::Platform { arch, variant } => {
                let v = p["variant"].as_str();
                p["os"] == "linux"
                    && p["architecture"] == arch.as_str()
                    && match (arch.as_str(), variant.as_deref(), v) {
                        // A v8 board runs arm64 images with or without the variant named.
                        ("arm64", _, v) => v.is_none_or(|v| v == "v8"),
                        (_, Some(want), Some(v)) => v == want,
                        _ => true,
                    }
            }
        }
    }
}

/// Credentials for `registry` in a `.dockerconfigjson` (an imagePullSecret's data):
/// `auths.<registry>` with `username`/`password` or a base64 `auth` of `user:password`.
pub fn docker_auth(config: &Value, registry: &str) -> Option<(String, String)> {
    let auths = config["auths"].as_object()?;
    let names: &[&str] = if registry == "docker.io" {
        &[
            "docker.io",
            "index.docker.io",
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
        ]
    } else {
        &[registry]
    };
    let entry = auths.iter().find_map(|(k, v)| {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        (names.contains(&k.as_str()) || names.contains(&host)).then_some(v)
    })?;
    if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Some((u.into(), p.into()));
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.into(), p.into()))
}

/// A verified blob on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
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
        Client {
            http,
            insecure,
            auth: None,
        }
    }

    /// The same client, sending `user`/`password` when a registry asks for credentials.
    pub fn with_auth(&self, auth: Option<(String, String)>) -> Client {
        Client {
            auth,
            ..self.clone()
        }
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
        from: u64,
    ) -> Result<reqwest::Response, Error> {
        let url = format!("{}/v2/{}/{path}", self.base(&r.registry), r.repository);
        let what = r.to_string();
        let fail = |e: reqwest::Error| Error::Registry(what.clone(), causes(&e));
        let mut token: Option<String> = None;
        let mut basic = false;
        for _ in 0..2 {
            let mut req = self.http.get(&url).header("accept", accept);
            if from > 0 {
                req = req.header("range", format!("bytes={from}-"));
            }
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            } else if let (true, Some((u, p))) = (basic, &self.auth) {
                req = req.basic_auth(u, Some(p));
            }
            let resp = req.send().await.map_err(fail)?;
            match resp.status().as_u16() {
                200..=299 => return Ok(resp),
                401 if token.is_none() && !basic => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    if challenge.starts_with("Basic") {
                        if self.auth.is_none() {
                            return Err(Error::Denied(
                                what,
                                "the registry wants credentials: name an imagePullSecret".into(),
                            ));
                        }
                        basic = true;
                    } else {
                        token = Some(self.token(&what, &challenge).await?);
                    }
                }
                401 | 403 => {
                    return Err(Error::Denied(
                        what,
                        if self.auth.is_some() {
                            "the credentials of the imagePullSecret were refused".into()
                        } else {
                            "private images need credentials: name an imagePullSecret".into()
                        },
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
        let mut req = self.http.get(&realm).query(&query);
        if let Some((u, p)) = &self.auth {
            req = req.basic_auth(u, Some(p));
        }
        let v: Value = req
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Error::Denied(what.into(), causes(&e)))?
            .json()
            .await
            .map_err(|e| Error::Denied(what.into(), causes(&e)))?;
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
            .map_err(|e| Error::Registry(what.into(), causes(&e)))?
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
    /// The image manifest `r` names and its digest, through an index (picking the entry
    /// `want` accepts) if it names one.
    pub async fn manifest(&self, r: &Reference, want: &Want) -> Result<(Value, String), Error> {
        let what = r.to_string();
        let mut reference = r.reference().to_string();
        for _ in 0..2 {
            let resp = self
                .get(r, &format!("manifests/{reference}"), MANIFEST_TYPES, 0)
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
                return Ok((m, sha256(&body)));
            };
            let pick = match want {
                Want::Wasm => list.iter().find(|e| want.accepts(e)).or(list.first()),
                Want::Platform { .. } => list.iter().find(|e| want.accepts(e)),
            };
            let Some(pick) = pick else {
                let offered: Vec<String> = list
                    .iter()
                    .map(|e| {
                        let p = &e["platform"];
                        let mut s = format!(
                            "{}/{}",
                            p["os"].as_str().unwrap_or("?"),
                            p["architecture"].as_str().unwrap_or("?")
                        );
                        if let Some(v) = p["variant"].as_str() {
                            s = format!("{s}/{v}");
                        }
                        s
                    })
                    .collect();
                let mine = match want {
                    Want::Platform { arch, .. } => format!("linux/{arch}"),
                    Want::Wasm => "wasm".into(),
                };
                return Err(Error::Image(
                    what,
                    format!(
                        "no image for {mine} in the index (it offers {})",
                        offered.join(", ")
                    ),
                ));
            };
            reference = pick["digest"].as_str().unwrap_or_default().to_string();
            if !reference.starts_with("sha256:") {
                return Err(Error::Registry(
                    what,
                    format!("unsupported manifest digest {reference:?}"),
                ));
            }
        }
        Err(Error::Registry(what, "an index of indexes".into()))
    }

    /// A small blob (an image config) in memory, checked against `digest`.
    pub async fn blob(&self, r: &Reference, digest: &str, max: usize) -> Result<Vec<u8>, Error> {
        let what = r.to_string();
        let resp = self.get(r, &format!("blobs/{digest}"), "*/*", 0).await?;
        let bytes = Self::bytes(resp, max, &what).await?;
        if sha256(&bytes) != digest {
            return Err(Error::Registry(
                what,
                format!("blob {digest} arrived with another digest"),
            ));
        }
        Ok(bytes)
    }

    /// Stream blob `digest` of `size` bytes to `dest`, checking the digest as it comes. A
    /// partial download left in `dest.part` by an earlier attempt is resumed where the
    /// registry serves ranges. `dest` appears only once the bytes match.
    pub async fn blob_to(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        dest: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Blob, Error> {
        let what = r.to_string();
        let io = |e: std::io::Error| Error::io(dest.display(), e);
        let part = dest.with_extension("part");
        let mut hash = sha2::Sha256::new();
        let mut have = 0u64;
        if let Ok(mut f) = std::fs::File::open(&part) {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                have += n as u64;
            }
        }
        if have > size {
            let _ = std::fs::remove_file(&part);
            have = 0;
            hash = sha2::Sha256::new();
        }
        let mut resp = self.get(r, &format!("blobs/{digest}"), "*/*", have).await?;
        let mut file = if have > 0 && resp.status().as_u16() == 206 {
            tracing::info!(image = %what, %digest, from = have, "resuming a blob");
            std::fs::OpenOptions::new().append(true).open(&part)
        } else {
            have = 0;
            hash = sha2::Sha256::new();
            std::fs::File::create(&part)
        }
        .map_err(io)?;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::Registry(what.clone(), format!("blob {digest}: {e}")))?
        {
            have += chunk.len() as u64;
            if have > size {
                let _ = std::fs::remove_file(&part);
                return Err(Error::Registry(
                    what,
                    format!("blob {digest} is longer than the {size} bytes its descriptor says"),
                ));
            }
            hash.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
            progress(have);
        }
        file.sync_all().map_err(io)?;
        let got = format!("sha256:{:x}", hash.finalize());
        if got != digest {
            let _ = std::fs::remove_file(&part);
            return Err(Error::Registry(
                what,
                format!("blob {digest} arrived with another digest ({got})"),
            ));
        }
        std::fs::rename(&part, dest).map_err(io)?;
        Ok(Blob {
            digest: got,
            size: have,
        })
    }

    /// Pull the Wasm module or component of a Wasm OCI artifact.
    pub async fn pull_wasm(&self, image: &str) -> Result<Wasm, Error> {
        let r = Reference::parse(image)?;
        let what = r.to_string();
        let (m, _) = self.manifest(&r, &Want::Wasm).await?;
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
        let resp = self.get(&r, &format!("blobs/{digest}"), "*/*", 0).await?;
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

/// An error with what caused it, as containerd reports a failed pull: `error sending request
/// for url (…): client error (Connect): dns error: failed to lookup address information: …`
/// rather than its first line alone.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_says_what_caused_it() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("dns error: no such host"));
        assert_eq!(causes(&e), "error sending request: dns error: no such host");
    }

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
        assert!(c.auth.is_none());
        assert_eq!(c.base("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base("edge-registry:5000"), "http://edge-registry:5000");
        assert_eq!(c.base("ghcr.io"), "https://ghcr.io");
        assert_eq!(c.base("docker.io"), "https://registry-1.docker.io");
    }

    #[test]
    fn platforms_from_an_index() {
        let e = |os: &str, arch: &str, v: Option<&str>| {
            let mut p = serde_json::json!({"os": os, "architecture": arch});
            if let Some(v) = v {
                p["variant"] = v.into();
            }
            serde_json::json!({"platform": p})
        };
        let amd = Want::Platform {
            arch: "amd64".into(),
            variant: None,
        };
        let arm64 = Want::Platform {
            arch: "arm64".into(),
            variant: None,
        };
        let arm7 = Want::Platform {
            arch: "arm".into(),
            variant: Some("v7".into()),
        };
        assert!(amd.accepts(&e("linux", "amd64", None)));
        assert!(!amd.accepts(&e("windows", "amd64", None)));
        assert!(!amd.accepts(&e("unknown", "unknown", None)));
        assert!(arm64.accepts(&e("linux", "arm64", Some("v8"))));
        assert!(arm64.accepts(&e("linux", "arm64", None)));
        assert!(arm7.accepts(&e("linux", "arm", Some("v7"))));
        assert!(!arm7.accepts(&e("linux", "arm", Some("v6"))));
        assert!(Want::Wasm.accepts(&e("wasip1", "wasm", None)));
    }

    #[test]
    fn pull_secret_credentials() {
        let c = serde_json::json!({"auths": {
            "localhost:5000": {"username": "u", "password": "p"},
            "https://index.docker.io/v1/": {"auth": "YWxpY2U6czNjcmV0"}}});
        assert_eq!(
            docker_auth(&c, "localhost:5000"),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(
            docker_auth(&c, "docker.io"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(docker_auth(&c, "ghcr.io"), None);
    }
}
