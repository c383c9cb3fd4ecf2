//! The Outpost control plane.
//!
//! It owns the replicated store ([`store`]: openraft over fjall, members talking QUIC with
//! mutual TLS), the certificates ([`pki`]: the peer CA between members, the cluster CA for
//! the API and its clients), the Kubernetes API server on that store ([`api`]) and a small
//! loopback admin interface to the store ([`admin`]) and the node gateway ([`gateway`]: nodes
//! join and connect over QUIC). The [`scheduler`] binds pods to nodes and the [`controllers`]
//! keep ReplicaSets and Deployments at their desired state, both through the same API. It does not run workloads: that is the node agent's job.

pub mod admin;
pub mod aot;
pub mod api;
pub mod board;
pub mod client;
pub mod controllers;
pub mod gateway;
pub mod pki;
pub mod scheduler;
pub mod store;

pub use outpost_api::sha256_hex;
