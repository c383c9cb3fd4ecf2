//! OCI containers through youki's libcontainer, with images pulled from real registries.
//! Not built yet: see the open issue "OCI pods through libcontainer".
