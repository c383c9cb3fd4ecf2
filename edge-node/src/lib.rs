//! The Outpost node agent (the kubelet): reaches the control plane over QUIC, keeps its pods
//! running from a local cache while offline, and runs them through the Wasm runtime or the
//! OCI shim. Not built yet: see the open issue "Edge nodes over QUIC running Wasm pods".
