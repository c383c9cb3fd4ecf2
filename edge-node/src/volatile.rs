//! Where a node agent keeps what it writes for each container start and needs nowhere else:
//! the files of configMap, secret, downwardAPI and projected volumes (service-account tokens
//! among them). As the kubelet keeps secrets and projected volumes, they live in memory: a
//! tmpfs, so that a token or a secret never reaches the board's flash, and a burst of pods
//! costs no inode churn on its disk.
//!
//! The tmpfs is mounted in a mount namespace of the agent's own (a slave of the host's: host
//! mounts still reach the agent, the agent's reach nobody), entered before the agent starts
//! any thread. It goes away with the agent's last process, so nothing is left in the host's
//! mount table, whatever way the agent ends. An agent that is not root keeps the same files
//! in a plain directory.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How [`enter`] went: `Ok` once this process has a mount namespace of its own.
static ENTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Give this process a mount namespace of its own, when it is root. Call it before any
/// thread starts: a process with threads cannot leave its namespace.
pub fn enter() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let entered = outpost_oci_shim::run::own_mount_namespace()
        .map_err(|e| format!("a mount namespace for the agent: {e}"));
    let _ = ENTERED.set(entered);
}

/// The directory of volatile files under `data_dir`, emptied: a tmpfs when [`enter`] gave
/// this process a namespace of its own, else a plain directory (with the reason why).
pub fn dir(data_dir: &Path) -> (PathBuf, Option<String>) {
    let d = data_dir.join("volatile");
    let _ = std::fs::remove_dir_all(&d);
    if let Err(e) = std::fs::create_dir_all(&d) {
        return (d.clone(), Some(format!("{}: {e}", d.display())));
    }
    let why = match ENTERED.get() {
        None => Some("the agent is not root".to_string()),
        Some(Err(e)) => Some(e.clone()),
        Some(Ok(())) => outpost_oci_shim::run::tmpfs(&d)
            .err()
            .map(|e| format!("mounting a tmpfs on {}: {e}", d.display())),
    };
    (d, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_without_a_namespace_of_its_own_gets_a_plain_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("volatile/old")).unwrap();
        let (d, why) = dir(t.path());
        assert_eq!(d, t.path().join("volatile"));
        assert!(why.is_some());
        assert!(d.is_dir() && !d.join("old").exists(), "emptied");
    }
}
