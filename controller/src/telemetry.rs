//! The controller's Prometheus metrics (reference: docs/METRICS.md).

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use placement::PlacementVersion;

pub fn set_leader(leader: bool) {
    gauge!("expertmesh_controller_leader").set(if leader { 1.0 } else { 0.0 });
}

pub fn set_desired(desired: u32) {
    gauge!("expertmesh_expert_workers_desired").set(f64::from(desired));
}

pub fn set_live(live: usize, tokens_per_s: f64) {
    gauge!("expertmesh_expert_workers_live").set(live as f64);
    gauge!("expertmesh_expert_tokens_per_second").set(tokens_per_s);
}

pub fn set_placement(version: PlacementVersion, ratio: f64) {
    gauge!("expertmesh_placement_version").set(version.0 as f64);
    gauge!("expertmesh_expert_load_max_mean_ratio").set(ratio);
}

pub fn rebalanced(reason: &'static str, took: Duration) {
    counter!("expertmesh_rebalances_total", "reason" => reason).increment(1);
    histogram!("expertmesh_rebalance_duration_seconds").record(took.as_secs_f64());
}
