//! The prefill worker's Prometheus metrics (reference: docs/METRICS.md): load gauges sampled
//! from the engine's published load, and the KV transfer of every finished prefill.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tokio_util::sync::CancellationToken;

use crate::engine_thread::Load;

/// Refreshes the load gauges from `load` until `stop`.
pub async fn sample(load: impl Fn() -> Load, stop: CancellationToken) {
    cluster_core::telemetry::sample_every(stop, || {
        let l = load();
        gauge!("expertmesh_prefill_queued_tokens").set(f64::from(u32::try_from(l.queued_tokens).unwrap_or(u32::MAX)));
        gauge!("expertmesh_prefill_waiting_sequences").set(f64::from(l.waiting_sequences));
        gauge!("expertmesh_prefill_running_sequences").set(f64::from(l.running_sequences));
        cluster_core::telemetry::cache_blocks(u64::from(l.free_blocks), u64::from(l.total_blocks));
        std::future::ready(true)
    })
    .await;
}

/// One finished latent-cache transfer to a decode worker.
pub fn kv_transferred(bytes: u64, took: Duration) {
    counter!("expertmesh_kv_transfers_total", "outcome" => "ok").increment(1);
    counter!("expertmesh_kv_transfer_bytes_total").increment(bytes);
    histogram!("expertmesh_kv_transfer_duration_seconds").record(took.as_secs_f64());
}

/// A prefill whose transfer (or compute) failed.
pub fn kv_transfer_failed() {
    counter!("expertmesh_kv_transfers_total", "outcome" => "failed").increment(1);
}
