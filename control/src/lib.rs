//! The Outpost control plane.
//!
//! It owns the replicated store ([`store`]: openraft over fjall, members talking QUIC with
//! mutual TLS), the certificates ([`pki`]: the peer CA between members, the cluster CA for
//! the API and its clients), the Kubernetes API server on that store ([`api`]) and a small
//! loopback admin interface to the store ([`admin`]) and the node gateway ([`gateway`]: nodes
//! join and connect over QUIC). A first [`scheduler`] binds pods to nodes through
//! the same API; the controllers will stand on it too. It does not run workloads: that is the node agent's job.

pub mod admin;
pub mod api;
pub mod client;
pub mod gateway;
pub mod pki;
pub mod scheduler;
pub mod store;

pub use outpost_api::sha256_hex;
