//! The node's image store, shared by every pod that runs an image:
//!
//! ```text
//! DIR/blobs/sha256/HEX           layers while they download (HEX.part) and until unpacked
//! DIR/images/HEX/manifest.json   HEX is the manifest's digest
//! DIR/images/HEX/config.json     the image config
//! DIR/images/HEX/rootfs/         every layer applied: the read-only lower dir of containers
//! DIR/images/HEX/used            touched whenever a container starts from it
//! DIR/refs/NAME                  the manifest digest a reference last resolved to
//! ```
//!
//! An image directory appears whole (it is unpacked beside and renamed into place), so a
//! crash mid-pull leaves only temporary files, which the next pull replaces. Unpacked
//! layers are dropped: edge flash is small, and the root file system is what runs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::registry::{Client, Reference, Want};
use crate::unpack::{self, Compression};
use crate::Error;

/// Largest image config accepted.
const MAX_CONFIG: usize = 4 << 20;

/// How often a pull reports progress on a layer.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// What an image asks of the containers that run it (the `config` of its config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: String,
}

impl ImageConfig {
    pub fn parse(v: &Value) -> ImageConfig {
        let c = &v["config"];
        let strings = |k: &str| crate::spec::strings(&c[k]);
        let string = |k: &str| c[k].as_str().unwrap_or("").to_string();
        ImageConfig {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            working_dir: string("WorkingDir"),
            user: string("User"),
            stop_signal: string("StopSignal"),
        }
    }
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest digest (what `imageID` reports).
    pub digest: String,
    pub config: ImageConfig,
    pub rootfs: PathBuf,
    /// Bytes the layers took compressed, as `status.images` reports sizes.
    pub size: u64,
}

pub struct Store {
    dir: PathBuf,
    /// One pull at a time per reference, so two pods starting together share it.
    pulling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// A file name for a reference.
fn ref_name(r: &str) -> String {
    r.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02x}"),
        })
        .collect()
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
            pulling: Mutex::new(HashMap::new()),
        }
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.dir.join("images").join(hex(digest))
    }

    /// The image a reference resolved to when it was last pulled, if it is still here.
    pub fn cached(&self, image: &str) -> Option<Image> {
        let r = Reference::parse(image).ok()?;
        let digest = match &r.digest {
            Some(d) => d.clone(),
            None => std::fs::read_to_string(self.dir.join("refs").join(ref_name(&r.to_string())))
                .ok()?
                .trim()
                .to_string(),
        };
        self.load(&digest)
    }

    fn load(&self, digest: &str) -> Option<Image> {
        let dir = self.image_dir(digest);
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
        let rootfs = dir.join("rootfs");
        rootfs.is_dir().then(|| Image {
            digest: digest.to_string(),
            config: ImageConfig::parse(&config),
            rootfs,
            size: layers_size(&manifest),
        })
    }

    /// Mark `image` as just used, which keeps it from the collector.
    pub fn touch(&self, image: &Image) {
        let _ = std::fs::write(self.image_dir(&image.digest).join("used"), b"");
    }

    /// Pull `image` (unless its manifest digest is already unpacked here) and unpack it.
    /// `progress` hears what a `kubectl describe` reader would want to know: each layer
    /// fetched, and how far along it is every [`PROGRESS_EVERY`].
    pub async fn pull(
        &self,
        client: &Client,
        image: &str,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<Image, Error> {
        let r = Reference::parse(image)?;
        let what = r.to_string();
        let gate = {
            let mut p = self
                .pulling
                .lock()
                .map_err(|_| Error::Create("store lock".into()))?;
            p.entry(what.clone()).or_default().clone()
        };
        let _one = gate.lock().await;
        let (manifest, digest) = client.manifest(&r, &Want::here()).await?;
        let save_ref = || {
            let refs = self.dir.join("refs");
            std::fs::create_dir_all(&refs)
                .and_then(|()| std::fs::write(refs.join(ref_name(&what)), &digest))
                .map_err(|e| Error::io(refs.display(), e))
        };
        if let Some(img) = self.load(&digest) {
            save_ref()?;
            return Ok(img);
        }
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let cfg_type = manifest["config"]["mediaType"].as_str().unwrap_or("");
        if cfg_type.contains("wasm")
            || layers.iter().any(|l| {
                l["mediaType"]
                    .as_str()
                    .is_some_and(|t| t == "application/wasm" || t.ends_with("+wasm"))
            })
        {
            return Err(Error::IsWasm(what));
        }
        let cfg_digest = manifest["config"]["digest"].as_str().unwrap_or("");
        if !cfg_digest.starts_with("sha256:") {
            return Err(Error::Image(
                what,
                "the manifest names no image config".into(),
            ));
        }
        let config_bytes = client.blob(&r, cfg_digest, MAX_CONFIG).await?;
        let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| {
            Error::Image(
                what.clone(),
                format!("an image config that is not JSON: {e}"),
            )
        })?;
        if let Want::Platform { arch, .. } = Want::here() {
            let (os, a) = (config["os"].as_str(), config["architecture"].as_str());
            if os.is_some_and(|o| o != "linux") || a.is_some_and(|a| a != arch) {
                return Err(Error::Image(
                    what,
                    format!(
                        "the image is for {}/{}, and this node is linux/{arch}",
                        os.unwrap_or("?"),
                        a.unwrap_or("?")
                    ),
                ));
            }
        }
        let diff_ids = crate::spec::strings(&config["rootfs"]["diff_ids"]);
        if diff_ids.len() != layers.len() {
            return Err(Error::Image(
                what,
                format!(
                    "{} layers but {} diff_ids in the config",
                    layers.len(),
                    diff_ids.len()
                ),
            ));
        }
        let blobs = self.dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| Error::io(blobs.display(), e))?;
        let mut plan = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let d = l["digest"].as_str().unwrap_or("");
            let size = l["size"].as_u64().unwrap_or(0);
            let h = d.strip_prefix("sha256:").unwrap_or("");
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Image(
                    what,
                    format!("layer {i} has a bad digest {d:?}"),
                ));
            }
            let c = Compression::of(l["mediaType"].as_str().unwrap_or(""))
                .map_err(|e| Error::Image(what.clone(), e))?;
            let path = blobs.join(h);
            if !path.exists() {
                let n = layers.len();
                progress(format!("layer {}/{n} ({size} bytes): {d}", i + 1));
                // At most one word every few seconds, however fast the chunks come.
                let last = std::sync::Mutex::new(std::time::Instant::now());
                let tick = |have: u64| {
                    if let Ok(mut t) = last.lock() {
                        if t.elapsed() >= PROGRESS_EVERY {
                            *t = std::time::Instant::now();
                            progress(format!("layer {}/{n}: {have} of {size} bytes", i + 1));
                        }
                    }
                };
                client.blob_to(&r, d, size, &path, &tick).await?;
            }
            plan.push((d.to_string(), path, c, diff_ids[i].clone()));
        }
        let dir = self.image_dir(&digest);
        let tmp =
            self.dir
                .join("images")
                .join(format!("{}.tmp-{}", hex(&digest), std::process::id()));
        let (m, c) = (
            serde_json::to_vec(&manifest).unwrap_or_default(),
            config_bytes.clone(),
        );
        let (tmp2, dir2) = (tmp.clone(), dir.clone());
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let _ = std::fs::remove_dir_all(&tmp2);
            let rootfs = tmp2.join("rootfs");
            std::fs::create_dir_all(&rootfs).map_err(|e| Error::io(rootfs.display(), e))?;
            for (d, path, c, diff_id) in &plan {
                let f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
                let got =
                    unpack::layer(std::io::BufReader::new(f), *c, &rootfs).map_err(
                        |e| match e {
                            Error::Layer(_, why) => Error::Layer(d.clone(), why),
                            e => e,
                        },
                    )?;
                if &got != diff_id {
                    return Err(Error::Layer(
                        d.clone(),
                        format!("it unpacks to {got}, and the config says {diff_id}"),
                    ));
                }
            }
            std::fs::write(tmp2.join("manifest.json"), m)
                .and_then(|()| std::fs::write(tmp2.join("config.json"), c))
                .map_err(|e| Error::io(tmp2.display(), e))?;
            if dir2.exists() {
                std::fs::remove_dir_all(&tmp2).map_err(|e| Error::io(tmp2.display(), e))?;
            } else {
                std::fs::rename(&tmp2, &dir2).map_err(|e| Error::io(dir2.display(), e))?;
            }
            for (_, path, _, _) in &plan {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Create(e.to_string()))?;
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&tmp);
            // A refused layer is not worth keeping.
            for l in &layers {
                if let Some(h) = l["digest"].as_str().and_then(|d| d.strip_prefix("sha256:")) {
                    let _ = std::fs::remove_file(blobs.join(h));
                }
            }
            return Err(e);
        }
        save_ref()?;
        self.load(&digest)
            .ok_or_else(|| Error::Image(what, "the unpacked image vanished".into()))
    }

    /// Every image here: its references and size, for the node's `status.images`.
    pub fn images(&self) -> Vec<(Vec<String>, u64)> {
        let mut names: HashMap<String, Vec<String>> = HashMap::new();
        for e in std::fs::read_dir(self.dir.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let (Ok(d), Some(n)) = (std::fs::read_to_string(e.path()), e.file_name().to_str()) {
                names
                    .entry(d.trim().to_string())
                    .or_default()
                    .push(unname(n));
            }
        }
        let mut out = Vec::new();
        for h in self.image_dirs() {
            if h.contains('.') {
                continue;
            }
            let digest = format!("sha256:{h}");
            if let Some(img) = self.load(&digest) {
                let mut n = names.remove(&digest).unwrap_or_default();
                n.sort();
                if let Some(first) = n.first().cloned() {
                    let repo = first.split([':', '@']).next().unwrap_or("").to_string();
                    if first.contains(':') && !repo.is_empty() {
                        n.push(format!("{repo}@{digest}"));
                    }
                }
                out.push((n, img.size));
            }
        }
        out
    }

    /// The names under images/: a manifest digest's hex, or a hex with a suffix while it is
    /// unpacked or removed.
    fn image_dirs(&self) -> impl Iterator<Item = String> {
        std::fs::read_dir(self.dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
    }

    /// Remove images no container in `in_use` (manifest digests) runs and none started
    /// from for `idle`; the digests removed.
    pub fn collect(&self, in_use: &HashSet<String>, idle: Duration) -> Vec<String> {
        let now = SystemTime::now();
        let mut gone = Vec::new();
        for h in self.image_dirs() {
            let digest = format!("sha256:{}", h.split('.').next().unwrap_or(""));
            if in_use.contains(&digest) {
                continue;
            }
            let path = self.dir.join("images").join(&h);
            let last = std::fs::metadata(path.join("used"))
                .or_else(|_| std::fs::metadata(&path))
                .and_then(|m| m.modified())
                .unwrap_or(now);
            if now.duration_since(last).unwrap_or_default() >= idle
                && std::fs::remove_dir_all(&path).is_ok()
            {
                gone.push(digest);
            }
        }
        if !gone.is_empty() {
            for e in std::fs::read_dir(self.dir.join("refs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if std::fs::read_to_string(e.path())
                    .is_ok_and(|d| gone.contains(&d.trim().to_string()))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        gone
    }
}

fn unname(n: &str) -> String {
    let mut out = Vec::new();
    let b = n.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            if let Some(v) = n
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn layers_size(manifest: &Value) -> u64 {
    manifest["layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["size"].as_u64()).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_images_are_collected_and_their_names_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for h in [&a, &b] {
            std::fs::create_dir_all(dir.path().join("images").join(h)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("refs")).unwrap();
        std::fs::write(dir.path().join("refs/old"), format!("sha256:{b}")).unwrap();
        std::fs::write(dir.path().join("refs/kept"), format!("sha256:{a}")).unwrap();
        let in_use: HashSet<String> = [format!("sha256:{a}")].into();
        // Recently used: nothing goes.
        assert!(store.collect(&in_use, Duration::from_secs(3600)).is_empty());
        assert_eq!(
            store.collect(&in_use, Duration::ZERO),
            [format!("sha256:{b}")]
        );
        assert!(!dir.path().join("images").join(&b).exists());
        assert!(!dir.path().join("refs/old").exists());
        assert!(dir.path().join("images").join(&a).exists());
        assert!(dir.path().join("refs/kept").exists());
    }

    /// A layer download cut short resumes from what is on disk: a wrong prefix there shows
    /// as a digest mismatch (so it was kept, not fetched again), and is then thrown away.
    #[tokio::test]
    async fn interrupted_downloads_resume() {
        let reg = outpost_tests::Registry::start().unwrap();
        let layer = outpost_tests::busybox_layer().unwrap();
        let image = reg
            .push_image(
                "t/busybox",
                "1",
                std::slice::from_ref(&layer),
                serde_json::json!({}),
            )
            .unwrap();
        let digest = outpost_api::sha256_hex(&layer);
        let client = Client::new(vec![]);
        let part = |dir: &Path| dir.join("blobs/sha256").join(format!("{digest}.part"));
        let half = layer.len() / 2;

        let good = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(good.path().join("blobs/sha256")).unwrap();
        std::fs::write(part(good.path()), &layer[..half]).unwrap();
        let img = Store::new(good.path())
            .pull(&client, &image, &|_| {})
            .await
            .unwrap();
        assert!(img.rootfs.join("bin/busybox").exists());

        let bad = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(bad.path().join("blobs/sha256")).unwrap();
        std::fs::write(part(bad.path()), vec![0u8; half]).unwrap();
        let store = Store::new(bad.path());
        let e = store.pull(&client, &image, &|_| {}).await.unwrap_err();
        assert!(e.to_string().contains(&digest), "{e}");
        assert!(!part(bad.path()).exists());
        store.pull(&client, &image, &|_| {}).await.unwrap();
    }

    #[test]
    fn reference_names_round_trip() {
        for r in [
            "docker.io/library/busybox:1.36",
            "localhost:5000/a/b@sha256:00ff",
        ] {
            assert_eq!(unname(&ref_name(r)), r);
            assert!(!ref_name(r).contains('/'));
        }
    }

    #[test]
    fn image_config_fields() {
        let v = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/bin"],
            "WorkingDir": "/w", "User": "1000:1000", "StopSignal": "SIGQUIT"}});
        let c = ImageConfig::parse(&v);
        assert_eq!(c.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(
            (c.working_dir.as_str(), c.user.as_str()),
            ("/w", "1000:1000")
        );
        assert_eq!(
            ImageConfig::parse(&serde_json::json!({})),
            ImageConfig::default()
        );
    }
}
