//! The expert placement and load documents kept in the cluster store, their keys, and the one
//! fold of the placement keys every reader (expert workers, attention workers, the
//! controller, `expertmesh placement`) goes through. Store plumbing comes from
//! `cluster-core`; no service code lives here.
//!
//! - [`documents`]: `PlacementSpec`, `CurrentPlacement`, `ReadyMark`, `LoadReport`,
//!   `DesiredWorkers` (format reference: docs/EXPERT_PLACEMENT.md).
//! - [`keys`]: `/placement/...`, `/load/...` and the autoscaling key, built and parsed.
//! - [`fold`]: [`PlacementFold`], what `/placement/` holds, from a watch or a one-off read.

pub mod documents;
pub mod fold;
pub mod keys;

pub use documents::{
    CurrentPlacement, DesiredWorkers, LoadReport, PlacementSpec, ReadyMark, SlotKey, SpecError, unix_ms,
};
pub use fold::{Applied, PlacementFold};
pub use keys::PlacementVersion;
