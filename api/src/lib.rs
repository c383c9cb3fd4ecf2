//! Types shared by the Outpost control plane and the node agent.
//!
//! This crate owns the shapes that cross a process boundary: the commands the replicated store
//! applies, the key-value records and watch events it hands back. It holds data and the small
//! pure rules that go with it (prefix matching, precondition checks), never IO: it does not
//! depend on tokio, quinn, axum or wasmtime, so both sides can use it without pulling in the
//! other's runtime.

pub mod store;
