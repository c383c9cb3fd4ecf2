//! The Outpost control plane.
//!
//! It owns the replicated store ([`store`]: openraft over fjall, members talking QUIC with
//! mutual TLS), the member certificates ([`pki`]) and, for now, a small loopback admin
//! interface ([`admin`]) to drive the store from outside. The Kubernetes API server, the
//! scheduler and the controllers will stand on the same store. It does not run workloads:
//! that is the node agent's job.

pub mod admin;
pub mod pki;
pub mod store;
