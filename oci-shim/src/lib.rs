//! OCI images for the node: pulling from real registries ([`registry`]) — today the Wasm OCI
//! artifacts that Wasm pods name as their image. Running OCI containers through youki's
//! libcontainer is the open issue "OCI pods through libcontainer".

pub mod registry;
