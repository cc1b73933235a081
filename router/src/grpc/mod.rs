//! Everything that touches protobuf types: the public service and the clients of the
//! workers' internal services. The rest of the router works on domain types.

pub mod internal;
pub mod public;
