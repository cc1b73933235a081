//! The decode worker: receives prefilled latent caches into its paged cache, runs every
//! admitted sequence in one continuous batch, streams tokens back, and reports its load.
//!
//! `run` loads the model and hands the `expertmesh.internal.v1.Decode` service to the shared
//! lifecycle (`cluster_core::service`): served with health and reflection, registered under
//! a lease; on shutdown it deregisters, stops admitting, lets running sequences finish (up
//! to `--drain-timeout-ms`) and stops. If the engine thread dies, the worker takes the same
//! path and exits with an error instead of staying registered.

mod engine_thread;
mod grpc;
mod import;
mod telemetry;

use anyhow::Context;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::service::{Bound, Service, Watched};
use cluster_core::{Capacity, Role, StoreConfig};
use model::ExpertBackend;
use model::args::EngineArgs;
use model::serving::{ExpertPlacement, open_engine_with};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine_thread::MAILBOX_CAPACITY;

/// How long start-up waits for the store (etcd starting alongside).
const STORE_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct DecodeConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Most sequences in one decode step (more run in turn).
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// How long a draining worker lets running sequences finish.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// How long a sequence's consumer (the router) may leave its tokens untaken before the
    /// sequence fails with RESOURCE_EXHAUSTED and its cache is released.
    #[arg(long, env = "EXPERTMESH_STALL_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout_ms: u64,
    /// Run routed experts on the cluster's expert workers instead of loading them here.
    #[arg(long, env = "EXPERTMESH_REMOTE_EXPERTS")]
    pub remote_experts: bool,
}

/// Runs the decode worker until `shutdown`, then drains; fails (after the same teardown)
/// when its engine thread or its server dies. `ready` fires once it serves and is
/// registered.
pub async fn run(
    config: DecodeConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    run_with(config, None, store, shutdown, ready).await
}

/// [`run`] with routed experts on `experts`, whatever `--remote-experts` says: for a process
/// that embeds the decode worker with an expert backend of its own.
pub async fn run_with_experts(
    config: DecodeConfig,
    experts: Arc<dyn ExpertBackend>,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    run_with(config, Some(experts), store, shutdown, ready).await
}

async fn run_with(
    config: DecodeConfig,
    experts: Option<Arc<dyn ExpertBackend>>,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    config.engine.validate()?;
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let tracker = TaskTracker::new();
    // Stops the expert-placement watches and the load sampler: after the drain, or on an
    // early return.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    // One store connection for the expert membership watch and the registration.
    let Some(store) = shutdown.run_until_cancelled(store.open(STORE_PATIENCE)).await else { return Ok(()) };
    let store = store.context("opening the cluster store")?;
    let placement = match experts {
        Some(backend) => ExpertPlacement::Remote(backend),
        None if config.remote_experts => {
            let remote =
                expert_client::RemoteExperts::from_store(store.as_ref(), &cluster, &tracker, &stop, Default::default())
                    .await
                    .context("cannot follow the expert workers")?;
            ExpertPlacement::Remote(Arc::new(remote))
        }
        None => ExpertPlacement::Local,
    };
    let (dir, setup) = (config.engine.model.dir.clone(), config.engine.setup());
    tracing::info!(model = ?dir, remote_experts = config.remote_experts, "loading_model");
    let loading = tokio::task::spawn_blocking(move || {
        open_engine_with(dir, setup, placement, &|p| {
            if p.done == p.total || p.done % (p.total / 10).max(1) == 0 {
                tracing::info!(done = p.done, total = p.total, "loading_progress");
            }
        })
    });
    let Some(serving) = shutdown.run_until_cancelled(loading).await else {
        tracing::info!("shutdown_during_model_load");
        return Ok(());
    };
    let serving = serving.context("model loading task")??;
    let layout = serving.engine.cache_layout();
    let limits = serving.engine.limits();
    let model_name = model::serving::model_name(&serving.dir);
    let bound = Bound::bind(&config.node, Role::Decode).await?;
    let settings = engine_thread::EngineSettings {
        max_batch: config.max_batch,
        stall_timeout: Duration::from_millis(config.stall_timeout_ms),
    };
    let (engine, engine_thread) =
        engine_thread::spawn_engine(serving.engine, settings).context("cannot start the decode engine thread")?;
    let draining = Arc::new(AtomicBool::new(false));
    let service = grpc::DecodeService {
        engine: engine.clone(),
        layout,
        limits,
        worker_id: bound.worker_id().as_str().to_string(),
        draining: draining.clone(),
    };
    tracker.spawn(telemetry::sample(engine.loads(), stop.clone()));
    let routes = grpc::routes(service);
    // Refuse new sequences, let running ones finish.
    let drain = cluster_core::service::drain(move |deadline| async move {
        draining.store(true, Ordering::Relaxed);
        let left = engine.until_idle(deadline).await;
        tracing::info!(left = left.running + left.waiting, "decode_worker_drained");
    });
    let service = Service {
        store,
        routes,
        described: grpc::DESCRIBED,
        capacity: Capacity {
            max_sequences: config.max_batch as u32,
            max_batch_tokens: config.max_batch as u32,
            expert_slots: 0,
        },
        model: model_name,
        tracker,
        stop,
        watched: vec![Watched::thread(engine_thread)],
        on_registered: None,
        drain,
        drain_timeout: Duration::from_millis(config.drain_timeout_ms),
    };
    cluster_core::service::run(bound, service, shutdown, ready).await?;
    Ok(())
}
