//! Image layers onto a root file system: tar, optionally gzip- or zstd-compressed, applied in
//! order onto one directory with the OCI whiteouts (`.wh.NAME` deletes NAME from the layers
//! below, `.wh..wh..opq` empties its directory of them).
//!
//! A layer is untrusted input. An entry whose path has a `..` component is refused (the whole
//! layer fails, nothing is skipped silently); absolute paths are taken as relative to the
//! root; every entry's parent is resolved and must stay inside the root, so a symlink laid
//! down by one entry cannot carry a later entry (or a whiteout) out of it; a file never
//! replaces a symlink by writing through it. The uncompressed bytes are hashed as they are
//! read and must match the image config's `diff_id`.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

use crate::Error;

/// How a layer's tar is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of media type `t`, or why a node cannot unpack it.
    pub fn of(t: &str) -> Result<Compression, String> {
        match t {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(format!("unsupported layer media type {other:?}")),
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The entry path relative to the root, or why it is refused.
fn relative(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(format!("entry {} climbs out with ..", p.display()));
            }
        }
    }
    Ok(out)
}

/// `root/dir`, checked to resolve inside `root` (which is canonical).
fn inside(root: &Path, dir: &Path) -> Result<Option<PathBuf>, String> {
    let p = root.join(dir);
    match p.canonicalize() {
        Ok(c) if c.starts_with(root) => Ok(Some(c)),
        Ok(c) => Err(format!(
            "{} resolves to {}, outside the root file system",
            dir.display(),
            c.display()
        )),
        Err(_) => Ok(None),
    }
}

/// An error with its causes, which tar keeps apart.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}

/// Remove whatever is at `p` without following a symlink there.
fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apply one layer read from `r` onto `root`; the sha256 of its uncompressed tar
/// (`sha256:HEX`, what a `diff_id` names).
pub fn layer(r: impl Read, compression: Compression, root: &Path) -> Result<String, Error> {
    let name = "layer".to_string();
    let bad = |why: String| Error::Layer(name.clone(), why);
    let root = root
        .canonicalize()
        .map_err(|e| bad(format!("{}: {e}", root.display())))?;
    let tar: Box<dyn Read> = match compression {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(r).map_err(|e| bad(format!("zstd: {e}")))?,
        ),
    };
    let mut hashing = Hashing {
        inner: tar,
        hash: sha2::Sha256::new(),
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        // Paths this layer wrote: an opaque directory keeps them.
        let mut written: HashSet<PathBuf> = HashSet::new();
        let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("a broken tar: {e}")))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
            let rel = relative(&path).map_err(&bad)?;
            let Some(file) = rel.file_name().and_then(|f| f.to_str()).map(String::from) else {
                continue; // the root itself
            };
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if file == ".wh..wh..opq" {
                if let Some(d) = inside(&root, &dir).map_err(&bad)? {
                    for child in std::fs::read_dir(&d).map_err(|e| bad(e.to_string()))? {
                        let child = child.map_err(|e| bad(e.to_string()))?;
                        if !written.contains(&dir.join(child.file_name())) {
                            remove(&child.path()).map_err(|e| bad(e.to_string()))?;
                        }
                    }
                }
                continue;
            }
            if let Some(gone) = file.strip_prefix(".wh.") {
                if gone.is_empty() || gone == "." || gone == ".." || gone.contains('/') {
                    return Err(bad(format!("a bad whiteout {}", path.display())));
                }
                if let Some(d) = inside(&root, &dir).map_err(&bad)? {
                    remove(&d.join(gone)).map_err(|e| bad(e.to_string()))?;
                }
                continue;
            }
            // Checked before anything is created for it: the parent stays inside the root.
            // (tar checks again after creating missing parents.)
            let mut probe = dir.clone();
            while inside(&root, &probe).map_err(&bad)?.is_none() {
                if !probe.pop() {
                    break;
                }
            }
            let kind = entry.header().entry_type();
            let target = root.join(&rel);
            if let Ok(m) = std::fs::symlink_metadata(&target) {
                // A directory over a directory merges; anything else replaces what is there.
                if !(m.is_dir() && kind.is_dir()) {
                    remove(&target).map_err(|e| bad(e.to_string()))?;
                }
            }
            let done = entry
                .unpack_in(&root)
                .map_err(|e| bad(format!("{}: {}", path.display(), chain(&e))))?;
            if !done {
                return Err(bad(format!("entry {} was refused", path.display())));
            }
            written.insert(rel);
        }
    }
    // The tar's trailing blocks count towards the digest.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
    Ok(format!("sha256:{:x}", hashing.hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            // Set the raw name so tests can write paths `append_data` would refuse.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType as T;

    #[test]
    fn layers_with_whiteouts_and_opaque_directories() {
        let dir = tempdir();
        let root = dir.join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let l1 = tar_of(&[
            ("etc/", T::Directory, b"", ""),
            ("etc/a", T::Regular, b"one", ""),
            ("etc/b", T::Regular, b"two", ""),
            ("opt/", T::Directory, b"", ""),
            ("opt/x", T::Regular, b"x", ""),
            ("bin/", T::Directory, b"", ""),
            ("bin/sh", T::Regular, b"#!", ""),
            ("usr/", T::Directory, b"", ""),
            ("usr/sh", T::Symlink, b"", "/bin/sh"),
        ]);
        let d1 = layer(&l1[..], Compression::None, &root).unwrap();
        assert_eq!(d1, format!("sha256:{}", outpost_api::sha256_hex(&l1)));
        let l2 = tar_of(&[
            ("etc/.wh.a", T::Regular, b"", ""),
            ("opt/new", T::Regular, b"n", ""),
            ("opt/.wh..wh..opq", T::Regular, b"", ""),
            ("etc/b", T::Regular, b"changed", ""),
            ("usr/sh", T::Regular, b"file now", ""),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &l2).unwrap();
        let d2 = layer(&gz.finish().unwrap()[..], Compression::Gzip, &root).unwrap();
        assert_eq!(d2, format!("sha256:{}", outpost_api::sha256_hex(&l2)));
        assert!(!root.join("etc/a").exists());
        assert_eq!(std::fs::read(root.join("etc/b")).unwrap(), b"changed");
        assert!(root.join("opt/new").exists());
        assert!(!root.join("opt/x").exists());
        // The symlink was replaced, not written through.
        assert_eq!(std::fs::read(root.join("usr/sh")).unwrap(), b"file now");
        assert_eq!(std::fs::read(root.join("bin/sh")).unwrap(), b"#!");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn escapes_are_refused() {
        let dir = tempdir();
        let root = dir.join("rootfs");
        let outside = dir.join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let evil: Vec<Vec<u8>> = vec![
            tar_of(&[("../outside/x", T::Regular, b"x", "")]),
            tar_of(&[
                ("link", T::Symlink, b"", outside.to_str().unwrap()),
                ("link/x", T::Regular, b"x", ""),
            ]),
            tar_of(&[
                ("up", T::Symlink, b"", "../outside"),
                ("up/.wh.keep", T::Regular, b"", ""),
            ]),
            tar_of(&[("hard", T::Link, b"", "../outside/keep")]),
        ];
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        for (i, l) in evil.iter().enumerate() {
            let r = layer(&l[..], Compression::None, &root);
            assert!(matches!(r, Err(Error::Layer(..))), "layer {i}: {r:?}");
        }
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        assert!(!outside.join("x").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zstd_layers_unpack_and_hash_the_tar() {
        let dir = tempdir();
        let tar = tar_of(&[
            ("bin/", T::Directory, b"", ""),
            ("bin/tool", T::Regular, b"zstd content", ""),
        ]);
        let z = ruzstd::encoding::compress_to_vec(
            &tar[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_ne!(z, tar);
        let d = layer(&z[..], Compression::Zstd, &dir).unwrap();
        assert_eq!(d, format!("sha256:{}", outpost_api::sha256_hex(&tar)));
        assert_eq!(
            std::fs::read(dir.join("bin/tool")).unwrap(),
            b"zstd content"
        );
        // Cut short: an error, not a partial success.
        let short = layer(&z[..z.len() / 2], Compression::Zstd, &tempdir());
        assert!(short.is_err(), "{short:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempdir();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let r = layer(&b"not a layer at all, just text"[..], c, &dir);
            assert!(r.is_err() || c == Compression::None, "{c:?}: {r:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "outpost-unpack-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
