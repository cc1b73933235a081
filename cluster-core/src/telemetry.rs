//! The process's Prometheus endpoint. Roles record through the `metrics` macros; without an
//! installed recorder (no `--metrics-listen`) those are no-ops. One recorder per process:
//! binaries install it in `main`, `expertmesh up` once for all its roles.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Histogram buckets of every `*_seconds` metric: 1 ms to 2 minutes.
const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Histogram buckets of every `*_bytes` metric: 1 KiB to 4 GiB.
const BYTES_BUCKETS: &[f64] = &[1024.0, 16384.0, 262_144.0, 1_048_576.0, 16_777_216.0, 268_435_456.0, 4_294_967_296.0];

/// The `--metrics-listen` flag every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off when unset.
    #[arg(long, env = "EXPERTMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// The endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub reason: String,
}

impl MetricsArgs {
    /// Installs the recorder and serves it when `--metrics-listen` is set. Must run inside a
    /// tokio runtime (the listener is a task on it).
    pub fn install(&self) -> Result<(), MetricsError> {
        let Some(addr) = self.metrics_listen else { return Ok(()) };
        let err = |reason: String| MetricsError { addr, reason };
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS))
            .map_err(|e| err(e.to_string()))?
            .install()
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(%addr, "metrics_listening");
        Ok(())
    }
}

/// How often the serving workers refresh their load gauges.
pub const SAMPLE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Calls `sample` every [`SAMPLE_PERIOD`] until `stop` is cancelled or `sample` returns
/// false (its source is gone).
pub async fn sample_every<F, Fut>(stop: tokio_util::sync::CancellationToken, mut sample: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !sample().await {
            return;
        }
    }
}

/// The latent-cache gauges every attention worker exports.
pub fn cache_blocks(free: u64, total: u64) {
    metrics::gauge!("expertmesh_cache_blocks", "state" => "free").set(free as f64);
    metrics::gauge!("expertmesh_cache_blocks", "state" => "used").set(total.saturating_sub(free) as f64);
}
