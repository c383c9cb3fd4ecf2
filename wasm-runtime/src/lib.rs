//! Wasm pods on wasmtime and wasmtime-wasi: WASI preview 1 modules, preview 2 components and
//! wasi:http servers. Not built yet: see the open issue "Edge nodes over QUIC running Wasm pods".
