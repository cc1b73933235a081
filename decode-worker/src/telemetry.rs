//! The decode worker's Prometheus metrics (reference: docs/METRICS.md): load gauges sampled
//! from the engine actor, and every decode step.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tokio_util::sync::CancellationToken;

use crate::engine_thread::{Command, EngineHandle};

/// Refreshes the load gauges until `stop` (or the engine stops).
pub async fn sample(engine: EngineHandle, stop: CancellationToken) {
    cluster_core::telemetry::sample_every(stop, || async {
        let Ok(l) = engine.call(|reply| Command::Load { reply }).await else { return false };
        gauge!("expertmesh_decode_running_sequences").set(l.running as f64);
        gauge!("expertmesh_decode_waiting_sequences").set(l.waiting as f64);
        cluster_core::telemetry::cache_blocks(l.free_blocks as u64, l.total_blocks as u64);
        true
    })
    .await;
}

/// One continuous-batching step of `batch` sequences.
pub fn decode_step(batch: usize, took: Duration) {
    counter!("expertmesh_decode_steps_total").increment(1);
    counter!("expertmesh_decode_tokens_total").increment(batch as u64);
    histogram!("expertmesh_decode_step_duration_seconds").record(took.as_secs_f64());
}
