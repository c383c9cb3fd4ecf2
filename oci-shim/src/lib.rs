//! OCI images and containers for the node agent. It owns pulling from real registries
//! ([`registry`]: Wasm artifacts and container images), the node's content store of blobs and
//! unpacked images ([`store`], [`unpack`]), the runtime spec a pod's container runs under
//! ([`spec`]), running containers with youki's libcontainer ([`run`]), and the
//! pseudo-terminals of those that ask for one ([`tty`]).
//!
//! ```text
//!  agent (tokio) ── Containers::start ──▶ oci-zygote ── fork ──▶ oci-run helper (one thread)
//!        ▲  stdin socket (signals; its end = exit.json written),  │ overlay mount, libcontainer
//!        └─ stdout/stderr pipes ───────────────────────────────────┘ build+start, waitpid, OOM
//!                                                                    count, report, delete
//! ```
//!
//! libcontainer clones the calling process, which is only safe in a process with one thread,
//! so it never runs inside the agent: each container has its own helper process, forked by a
//! resident single-threaded zygote (the agent's binary started once as `oci-zygote`) rather
//! than executed afresh, and the agent talks to it over a socket and pipes. It does not
//! decide which pods run here or restart them; that is the agent's pod state machine.

pub mod registry;
pub mod run;
pub mod spec;
pub mod store;
pub mod tty;
pub mod unpack;
pub mod zygote;

/// What went wrong, grouped by what the caller does: pull errors are retried with back-off
/// (ErrImagePull), config errors wait for a new spec (CreateContainerConfigError), create
/// errors are retried (CreateContainerError).
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
    #[error("{0}: {1}")]
    Image(String, String),
    /// The image is a Wasm artifact: the Wasm runtime runs it.
    #[error("{0} is a Wasm artifact")]
    IsWasm(String),
    #[error("layer {0} refused: {1}")]
    Layer(String, String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Create(String),
    #[error("{0}: {1}")]
    Io(String, String),
}

impl Error {
    fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
        Error::Io(what.to_string(), e.to_string())
    }
}
