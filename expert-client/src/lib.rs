//! Routed experts run by the cluster's expert workers: [`RemoteExperts`] implements
//! `model::ExpertBackend` for prefill and decode workers. It follows membership (role
//! `expert`), learns each worker's slots, keeps one `Run` stream per worker, and splits each
//! MoE layer's batch by hosting worker.
//!
//! - [`plan`]: which worker runs which group (round-robin over replicas), scatter/gather.
//! - `wire`: the only module that touches protobuf types; one stream actor per worker.
//! - `remote`: the backend itself (blocking bridge from the engine's compute thread).

pub mod plan;
mod remote;
mod wire;

pub use remote::{RemoteExperts, RemoteOptions};
pub use wire::MAX_MESSAGE_BYTES;
