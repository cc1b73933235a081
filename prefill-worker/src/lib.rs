//! Prefill worker: batches queued prompts through `model::Engine` and streams each prompt's
//! latent cache, layer by layer as it is computed, to the decode worker holding its
//! reservation (`Decode.PushKv`), then answers the router with the first token.
//!
//! Public API: [`PrefillConfig`] (the flags), [`run`], and [`Ready`], which `run` sends once
//! the worker serves and is registered (its address and worker id, for the ready line); the
//! PushKv client ([`DecodeClients`], [`KvSink`]) for tools that push caches themselves.
//! Serving, registration, shutdown and the watch on the engine thread are the shared
//! lifecycle's (`cluster_core::service`); the drain here is the prefill-specific part.
//!
//! Code map: `grpc` (the only module touching protobuf: the service, the PushKv client,
//! error-to-status mapping), `engine_thread` (the actor owning the engine), `batch` (batch
//! selection), `transfer` (a task per sequence pushing its cache, with retries),
//! `request` (domain request and admission checks), `config`, `error`.

mod batch;
mod config;
mod engine_thread;
mod error;
mod grpc;
mod request;
mod telemetry;
mod transfer;

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster_core::node::cluster_name;
use cluster_core::service::{Bound, Service, Watched};
use cluster_core::{Capacity, Role, StoreConfig};
use model::LoadProgress;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cluster_core::serve::Ready;
pub use config::{ConfigError, MAX_KV_CHUNK_BYTES, PrefillConfig};
pub use error::{PrefillError, TransferError};
pub use grpc::DecodeClients;
pub use transfer::{KvSink, PushFailure};

use engine_thread::{EngineHandle, EngineSettings};
use request::ModelLimits;
use transfer::TransferSettings;

/// How long queued prompts and their transfers may take to finish once shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// After the drain deadline: how long aborted work may take to wind down.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long to keep trying to reach the store at start-up.
const STORE_PATIENCE: Duration = Duration::from_secs(30);
/// Wait before the first retry of a failed cache push (doubled for each further one).
const TRANSFER_BACKOFF: Duration = Duration::from_millis(100);
/// How often the drain looks at the engine's queue.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Loads the model, serves `Prefill` on `config.node.listen`, registers in `store`, sends
/// [`Ready`], and runs until `shutdown` is cancelled; then drains (not serving,
/// deregistered, no new requests, queued prompts finish within a deadline). The order is the
/// shared lifecycle's (`cluster_core::service`); a dead engine thread or server takes the
/// same path and fails.
pub async fn run(
    config: PrefillConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    config.validate()?;
    let cluster = cluster_name(&config.node.cluster)?;
    let tracker = TaskTracker::new();
    // Stops the expert-placement watches and the load sampler: after the drain, or on an
    // early return.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let Some(store) = shutdown.run_until_cancelled(store.open(STORE_PATIENCE)).await else { return Ok(()) };
    let store = store.context("cannot open the cluster store")?;
    let Some(serving) =
        shutdown.run_until_cancelled(load_engine(&config, store.as_ref(), &cluster, &tracker, &stop)).await
    else {
        tracing::info!("shutdown_during_model_load");
        return Ok(());
    };
    let serving = serving?;
    let model_name = model::serving::model_name(&serving.dir);
    let limits = ModelLimits::of(&serving.engine);

    let bound = Bound::bind(&config.node, Role::Prefill).await?;
    let capacity = Capacity {
        max_sequences: u32::try_from(config.queue_capacity).context("--queue-capacity")?,
        max_batch_tokens: config.max_batch_tokens,
        expert_slots: 0,
    };
    let abort = CancellationToken::new();
    let settings = EngineSettings {
        max_batch_tokens: config.max_batch_tokens as usize,
        queue_capacity: config.queue_capacity,
        transfer: TransferSettings {
            chunk_bytes: config.kv_chunk_bytes,
            retries: config.transfer_retries,
            backoff: TRANSFER_BACKOFF,
        },
    };
    // Cache pushes: waited for by the drain.
    let transfers = TaskTracker::new();
    let (engine, engine_thread) = engine_thread::spawn_engine(
        serving.engine,
        settings,
        tokio::runtime::Handle::current(),
        transfers.clone(),
        abort.clone(),
    )
    .context("cannot start the prefill engine thread")?;
    let decode = Arc::new(grpc::DecodeClients::new(grpc::DECODE_CONNECT_TIMEOUT));
    let service = grpc::PrefillService::new(engine.clone(), limits, decode, bound.worker_id().clone());
    let loads = engine.clone();
    tracker.spawn(telemetry::sample(move || loads.load(), stop.clone()));
    let drain = cluster_core::service::drain(move |deadline| drain(engine, transfers, abort, deadline));
    let service = Service {
        store,
        routes: tonic::service::Routes::new(grpc::server(service)),
        described: grpc::DESCRIBED,
        capacity,
        model: model_name,
        tracker,
        stop,
        watched: vec![Watched::thread(engine_thread)],
        on_registered: None,
        drain,
        drain_timeout: DRAIN_DEADLINE + ABORT_GRACE,
    };
    cluster_core::service::run(bound, service, shutdown, ready).await?;
    Ok(())
}

/// Closes the queue and waits for queued prompts and their transfers to finish; past the
/// drain deadline (`ABORT_GRACE` before `deadline`), aborts them and waits for the rest.
async fn drain(engine: EngineHandle, transfers: TaskTracker, abort: CancellationToken, deadline: tokio::time::Instant) {
    engine.close();
    transfers.close();
    let finished = async || {
        loop {
            let load = engine.load();
            if load.running_sequences == 0 && load.waiting_sequences == 0 {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        transfers.wait().await;
    };
    if tokio::time::timeout_at(deadline - ABORT_GRACE, finished()).await.is_err() {
        tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "drain_deadline_passed_aborting");
        abort.cancel();
        if tokio::time::timeout_at(deadline, finished()).await.is_err() {
            tracing::error!("prefill work still running after abort; leaving it");
            return;
        }
    }
    tracing::info!("prefill_worker_drained");
}

/// Opens the checkpoint on a blocking thread, logging progress every 10%. With
/// `--remote-experts`, routed experts are not loaded: they run on the store's expert workers.
async fn load_engine(
    config: &PrefillConfig,
    store: &dyn cluster_core::Store,
    cluster: &cluster_core::ClusterName,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> anyhow::Result<model::serving::ServingModel> {
    let placement = if config.remote_experts {
        let remote = expert_client::RemoteExperts::from_store(store, cluster, tracker, stop, Default::default())
            .await
            .context("cannot follow the expert workers")?;
        model::serving::ExpertPlacement::Remote(Arc::new(remote))
    } else {
        model::serving::ExpertPlacement::Local
    };
    let (dir, setup) = (config.engine.model.dir.clone(), config.engine.setup());
    tracing::info!(model = ?dir.as_deref().map_or("default".into(), |d| d.display().to_string()), "model_loading");
    let started = std::time::Instant::now();
    let serving = tracker
        .spawn_blocking(move || {
            let logged_tenths = Cell::new(0u64);
            model::serving::open_engine_with(dir, setup, placement, &|p: LoadProgress| {
                let tenths = (p.done * 10).checked_div(p.total).unwrap_or(10);
                if tenths > logged_tenths.get() {
                    logged_tenths.set(tenths);
                    tracing::info!(percent = tenths * 10, done = p.done, total = p.total, "model_loading_progress");
                }
            })
        })
        .await
        .context("the model loading thread failed")?
        .context("cannot load the model")?;
    tracing::info!(dir = %serving.dir.display(), load_s = started.elapsed().as_secs_f64(), "model_loaded");
    Ok(serving)
}
