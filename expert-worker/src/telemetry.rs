//! The expert worker's Prometheus metrics (reference: docs/METRICS.md), refreshed with every
//! load report: tokens served per (layer, expert) slot, the placement version followed.

use metrics::{counter, gauge};

use crate::counters::LoadCounters;
use cluster_core::WorkerId;
use placement::PlacementVersion;

/// `counts` is [`LoadCounters::snapshot`] (cumulative, `[layers][experts]` row-major). The
/// `worker` label keeps the workers of one process (`expertmesh up`) apart.
pub fn publish(me: &WorkerId, counters: &LoadCounters, counts: &[u64], version: Option<PlacementVersion>) {
    let worker = me.as_str().to_owned();
    let experts = counters.num_experts().max(1);
    for (i, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        let layer = counters.layers().get(i / experts).copied().unwrap_or_default();
        let (layer, expert) = (layer.to_string(), (i % experts).to_string());
        counter!("expertmesh_expert_tokens_total", "worker" => worker.clone(), "layer" => layer, "expert" => expert)
            .absolute(n);
    }
    counter!("expertmesh_expert_requests_total", "worker" => worker.clone()).absolute(counters.requests());
    if let Some(v) = version {
        gauge!("expertmesh_expert_placement_version", "worker" => worker).set(v.0 as f64);
    }
}
