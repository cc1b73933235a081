//! The decode worker's Prometheus metrics (reference: docs/METRICS.md): load gauges sampled
//! from the load the engine publishes, and every decode step.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine_thread::Load;

/// Refreshes the load gauges until `stop` (or the engine stops publishing).
pub async fn sample(loads: watch::Receiver<Load>, stop: CancellationToken) {
    cluster_core::telemetry::sample_every(stop, || {
        let l = *loads.borrow();
        gauge!("expertmesh_decode_running_sequences").set(l.running as f64);
        gauge!("expertmesh_decode_waiting_sequences").set(l.waiting as f64);
        cluster_core::telemetry::cache_blocks(l.free_blocks as u64, l.total_blocks as u64);
        std::future::ready(loads.has_changed().is_ok())
    })
    .await;
}

/// One continuous-batching step that emitted `tokens` (one per sequence, more with
/// speculation).
pub fn decode_step(tokens: usize, took: Duration) {
    counter!("expertmesh_decode_steps_total").increment(1);
    counter!("expertmesh_decode_tokens_total").increment(tokens as u64);
    histogram!("expertmesh_decode_step_duration_seconds").record(took.as_secs_f64());
}

/// One sequence's step: the drafts it verified and how many were accepted.
pub fn speculation(out: &model::StepOutput) {
    if out.draft_tokens == 0 {
        return;
    }
    counter!("expertmesh_speculative_draft_tokens_total").increment(out.draft_tokens as u64);
    counter!("expertmesh_speculative_accepted_tokens_total").increment(out.accepted_tokens as u64);
    histogram!("expertmesh_speculative_accepted_per_step").record(out.accepted_tokens as f64);
}
