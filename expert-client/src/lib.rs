//! Routed experts run by the cluster's expert workers: [`RemoteExperts`] implements
//! `model::ExpertBackend` for prefill and decode workers.
//!
//! It follows membership (role `expert`) and the cluster's versioned placement
//! (`/placement/current` and `/placement/<N>/spec`): while a placement is current its
//! replicas are the slot table, swapped whole when the version moves; while none is (workers
//! started with `--shard`, no controller) each worker's slots are learnt with `GetSlots`. It
//! keeps one `Run` stream per worker and splits each MoE layer's groups over their experts'
//! replicas, skipping workers known to be down. A part that fails (dead worker, closed
//! stream, "not hosted" after a rebalance) is split again over the hosts known after a
//! refresh and resent with back-off until the call timeout, so a killed expert worker or a
//! placement switch does not fail requests.
//!
//! - [`plan`]: the slot table, splitting groups over replicas, scatter/gather (plain code).
//! - [`table`]: the placement follower (a watch on `/placement/`).
//! - `conns`: connections to the workers and the slot table in use (under the backend's lock).
//! - `wire`: the only module that touches protobuf types; one stream actor per worker.
//! - `remote`: the backend itself (blocking bridge from the engine's compute thread, retries).

mod conns;
pub mod plan;
mod remote;
pub mod table;
mod wire;

pub use remote::{RemoteExperts, RemoteOptions};
pub use table::PlacementWatch;
pub use wire::MAX_MESSAGE_BYTES;
