//! Types shared by the Outpost control plane and the node agent.
//!
//! This crate owns the shapes that cross a process boundary: the commands the replicated store
//! applies, the key-value records and watch events it hands back, and the node link's messages
//! and frames ([`link`]). It holds data and the small pure rules that go with it (prefix
//! matching, precondition checks, token syntax, digests). It does no IO of its own and does not depend
//! on quinn, axum or wasmtime, so both sides can use it without pulling in the other's
//! runtime; the `io` feature adds frame reading and writing over tokio's IO traits.

pub mod link;

/// On a Node: the directory where the node keeps local PersistentVolumes.
pub const STORAGE_DIR_ANNOTATION: &str = "outpost.dev/storage-dir";

pub mod quantity;

/// The Kubernetes minor version the API server answers to and its nodes report as their
/// kubelet's: one number for both, as the version-skew policy lets no kubelet be newer
/// than its API server (and kubectl's dispatcher picks its client by the server's minor).
pub const KUBE_MINOR: u32 = 32;

pub mod store;

/// Lowercase hex of the SHA-256 of `b`: module and layer digests, token secrets, the CA pin.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The service account a pod spec runs as: `serviceAccountName`, else its old name
/// `serviceAccount`, else `default` (admission fills in the first, and the node agent reads it).
pub fn service_account(spec: &serde_json::Value) -> &str {
    spec["serviceAccountName"]
        .as_str()
        .or(spec["serviceAccount"].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Wasm code compiled ahead of time for one architecture, as the control plane serves it to a
/// node without a compiler (`POST /outpost/v1/aot`, CBOR). The node loads `code` only if its
/// SHA-256 is `sha256` and it is the `module` and `arch` it asked for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Artifact {
    /// `sha256:HEX` of the Wasm bytes compiled.
    pub module: String,
    /// Rust's name of the architecture (`aarch64`, `x86_64`).
    pub arch: String,
    /// Lowercase hex SHA-256 of `code`.
    pub sha256: String,
    /// wasmtime's serialized module or component.
    #[serde(with = "serde_bytes")]
    pub code: Vec<u8>,
}

/// How a program ends: with its error's whole chain on one line (the alternate form, as
/// anyhow gives it), and never with a backtrace, which `RUST_BACKTRACE` set for other
/// programs would add to an error returned from `main`.
pub fn exit<E: std::fmt::Display>(r: Result<(), E>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
