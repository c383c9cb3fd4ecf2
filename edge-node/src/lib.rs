//! The Outpost node agent (the kubelet).
//!
//! It owns everything on an edge machine: joining the cluster and the QUIC link to the
//! control plane ([`link`]), the local cache that lets pods run with no link at all
//! ([`cache`]), each pod's state machine ([`pod`]), container logs ([`logs`]), and the agent
//! that reconciles the pods bound to this node with what runs here ([`agent`]), and the
//! configuration files its binary and the control plane's read ([`conf`]), and the in-memory
//! files of its pods' volumes ([`volatile`]), and what its containers use ([`usage`], for
//! `kubectl top`). Wasm pods run through `outpost-wasm-runtime`.

pub mod agent;
pub mod cache;
pub mod conf;
pub mod link;
pub mod logs;
pub mod net;
pub mod pod;
pub mod probe;
pub mod services;
pub mod spare;
pub mod usage;
pub mod volatile;

pub use outpost_api::sha256_hex;

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}
