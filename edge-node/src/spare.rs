//! Pod directories kept when their pod goes and handed to the next pod, with their files.
//!
//! Without a journal (how many boards and VMs format ext4), the kernel's inode allocator
//! skips every inode freed in the last minutes, reading each from the inode table: a node
//! that frees a pod's directory and log and makes the next pod's anew pays more per pod the
//! more pods ended recently (a fifth of the agent's time in a burst of short pods). A
//! retired directory is emptied and renamed under `pods/.spare/N` instead, its files
//! truncated and renamed `.0`, `.1`, … (a container's log never starts with a dot); a new
//! pod's directory and logs are renamed from those. A rename allocates no inode, and on
//! flash every inode not made and freed is metadata not written.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Files a spare directory keeps: a pod's log and its rotated log, twice over.
const FILES: usize = 4;

/// The spare pod directories of one node.
pub struct Spares {
    root: PathBuf,
    free: Mutex<Vec<u64>>,
    next: AtomicU64,
    cap: usize,
    /// Pod directories made from a spare that may hold spare files still: only these are
    /// looked in for one, so a new pod's directory costs no failed renames.
    stocked: Mutex<HashSet<PathBuf>>,
}

impl Spares {
    /// The spares under `pods` (`pods/.spare`), keeping at most `cap` of them.
    pub fn open(pods: &Path, cap: usize) -> Spares {
        let root = pods.join(".spare");
        let free: Vec<u64> = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let next = free.iter().max().map_or(0, |m| m + 1);
        Spares {
            root,
            free: Mutex::new(free),
            next: AtomicU64::new(next),
            cap,
            stocked: Mutex::default(),
        }
    }

    /// Make directory `dir` if it does not exist, from a spare one when there is one.
    pub fn make(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(n) = self.free.lock().ok().and_then(|mut f| f.pop()) {
            match std::fs::rename(self.root.join(n.to_string()), dir) {
                Ok(()) => {
                    if let Ok(mut s) = self.stocked.lock() {
                        s.insert(dir.to_path_buf());
                    }
                    return Ok(());
                }
                // Made meanwhile by the pod's other container: the spare stays one.
                Err(_) if dir.is_dir() => {
                    if let Ok(mut f) = self.free.lock() {
                        f.push(n);
                    }
                    return Ok(());
                }
                Err(_) => {}
            }
        }
        std::fs::create_dir_all(dir)
    }

    /// Retire directory `dir`: its subdirectories and surplus files removed, its files
    /// emptied and kept, itself a spare; removed outright when enough are spare already.
    pub fn retire(&self, dir: &Path) {
        if let Ok(mut s) = self.stocked.lock() {
            s.remove(dir);
        }
        let full = self.free.lock().map_or(true, |f| f.len() >= self.cap);
        if full || self.empty(dir).is_err() {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let to = self.root.join(n.to_string());
        let moved = std::fs::create_dir_all(&self.root).and_then(|()| std::fs::rename(dir, &to));
        match moved {
            Ok(()) => {
                if let Ok(mut f) = self.free.lock() {
                    f.push(n);
                }
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Leave in `dir` only empty files named `.0` … `.3`.
    fn empty(&self, dir: &Path) -> io::Result<()> {
        let entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
        let mut taken = [false; FILES];
        let mut files = Vec::new();
        for e in entries {
            let (path, kind) = (e.path(), e.file_type()?);
            if kind.is_dir() {
                std::fs::remove_dir_all(&path)?;
                continue;
            }
            let spare = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&i| i < FILES);
            match spare {
                Some(i) if kind.is_file() => taken[i] = true,
                _ if kind.is_file() => files.push(path),
                _ => std::fs::remove_file(&path)?,
            }
        }
        for f in files {
            match taken.iter().position(|t| !t) {
                Some(i) => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&f)?
                        .set_len(0)?;
                    std::fs::rename(&f, dir.join(format!(".{i}")))?;
                    taken[i] = true;
                }
                None => std::fs::remove_file(&f)?,
            }
        }
        Ok(())
    }

    /// Make file `f` from a spare file beside it, if its directory came with some (it is
    /// then empty, and replaces any `f` there was); `false` when the caller's open is to
    /// create it.
    pub fn take_file(&self, f: &Path) -> bool {
        let Some(dir) = f.parent() else { return false };
        if !self.stocked.lock().is_ok_and(|s| s.contains(dir)) {
            return false;
        }
        for i in 0..FILES {
            if std::fs::rename(dir.join(format!(".{i}")), f).is_ok() {
                return true;
            }
        }
        if let Ok(mut s) = self.stocked.lock() {
            s.remove(dir);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_retired_directory_and_its_files_serve_the_next_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let pods = tmp.path().join("pods");
        let s = Spares::open(&pods, 8);
        let a = pods.join("a");
        s.make(&a).unwrap();
        std::fs::write(a.join("main.0.log"), "hello").unwrap();
        std::fs::create_dir_all(a.join("volumes/cache")).unwrap();
        std::fs::write(a.join("volumes/cache/x"), "x").unwrap();
        let (dir_ino, log_ino) = (
            std::fs::metadata(&a).unwrap().ino(),
            std::fs::metadata(a.join("main.0.log")).unwrap().ino(),
        );
        s.retire(&a);
        assert!(!a.exists());

        // A new agent over the same directory finds the spare.
        let s = Spares::open(&pods, 8);
        let b = pods.join("b");
        s.make(&b).unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().ino(), dir_ino);
        let names: Vec<_> = std::fs::read_dir(&b)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [".0"], "subdirectories go, files stay as spares");
        let log = b.join("side.0.log");
        assert!(s.take_file(&log));
        assert_eq!(std::fs::metadata(&log).unwrap().ino(), log_ino);
        assert_eq!(std::fs::read(&log).unwrap(), b"", "a spare file is empty");
        // No spare left: the caller creates the next file.
        assert!(!s.take_file(&b.join("side.1.log")));
        assert!(!b.join("side.1.log").exists());
        // A directory made anew has no spare files to look for.
        let c = pods.join("c");
        s.make(&c).unwrap();
        std::fs::write(c.join(".0"), "").unwrap();
        assert!(!s.take_file(&c.join("main.0.log")));
    }

    #[test]
    fn spares_are_bounded_and_surplus_files_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let pods = tmp.path().join("pods");
        let s = Spares::open(&pods, 1);
        for name in ["a", "b"] {
            let d = pods.join(name);
            s.make(&d).unwrap();
            for i in 0..6 {
                std::fs::write(d.join(format!("c.{i}.log")), "x").unwrap();
            }
            s.retire(&d);
            assert!(!d.exists());
        }
        let spares: Vec<_> = std::fs::read_dir(pods.join(".spare"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(spares.len(), 1, "one spare at most");
        let kept = std::fs::read_dir(spares[0].path()).unwrap().count();
        assert_eq!(kept, FILES);
        // A directory made while a spare is held by no one is made plainly.
        let c = pods.join("c");
        s.make(&c).unwrap();
        let d = pods.join("d");
        s.make(&d).unwrap();
        assert!(c.is_dir() && d.is_dir());
    }
}
