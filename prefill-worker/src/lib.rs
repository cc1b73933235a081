//! Prefill worker: batches queued prompts through `model::Engine` and streams each prompt's
//! latent cache, layer by layer as it is computed, to the decode worker holding its
//! reservation (`Decode.PushKv`), then answers the router with the first token.
//!
//! Public API: [`PrefillConfig`] (the flags), [`run`], and [`Ready`], which `run` sends once
//! the worker serves and is registered (its address and worker id, for the ready line); the
//! PushKv client ([`DecodeClients`], [`KvSink`]) for tools that push caches themselves.
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use cluster_core::node::{cluster_name, worker_id_or_default};
use cluster_core::serve::HealthReporter;
use cluster_core::{Capacity, Registration, Role, StoreConfig, WorkerId, WorkerInfo};
use model::{EngineOptions, LoadProgress};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, DtypeArg, MAX_KV_CHUNK_BYTES, PrecisionArg, PrefillConfig};
pub use error::{PrefillError, TransferError};
pub use grpc::DecodeClients;
pub use transfer::{KvSink, PushFailure};

use engine_thread::EngineSettings;
use request::ModelLimits;
use transfer::TransferSettings;

/// What [`run`] reports once the worker serves and is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The id the worker registered under.
    pub worker_id: WorkerId,
}

/// How long queued prompts and their transfers may take to finish once shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// After the drain deadline: how long aborted work may take to wind down.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long to keep trying to reach the store at start-up.
const STORE_PATIENCE: Duration = Duration::from_secs(30);
/// Bound on deregistering (the store may be gone at shutdown).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before the first retry of a failed cache push (doubled for each further one).
const TRANSFER_BACKOFF: Duration = Duration::from_millis(100);

/// Loads the model, serves `Prefill` on `config.node.listen`, registers in `store`, sends
/// [`Ready`], and runs until `shutdown` is cancelled; then drains (not serving,
/// deregistered, no new requests, queued prompts finish within a deadline).
pub async fn run(
    config: PrefillConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    config.validate()?;
    let cluster = cluster_name(&config.node.cluster)?;
    let tracker = TaskTracker::new();
    let serving = tokio::select! {
        loaded = load_engine(&config, &store, &cluster, &tracker, &shutdown) => loaded?,
        _ = shutdown.cancelled() => {
            tracing::info!("shutdown_during_model_load");
            return Ok(());
        }
    };
    let model_name = model::serving::model_name(&serving.dir);
    let limits = ModelLimits::of(&serving.engine);

    let (listener, bound) = cluster_core::serve::bind(&config.node.listen).await?;
    let worker_id = worker_id_or_default(config.node.worker_id.as_deref(), Role::Prefill, bound.port())?;
    let info = WorkerInfo {
        id: worker_id.clone(),
        role: Role::Prefill,
        address: config.node.advertised(bound),
        capacity: Capacity {
            max_sequences: u32::try_from(config.queue_capacity).context("--queue-capacity")?,
            max_batch_tokens: config.max_batch_tokens,
            expert_slots: 0,
        },
        model: model_name,
        version: env!("CARGO_PKG_VERSION").to_string(),
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
    let (engine, mut engine_thread) = engine_thread::spawn_engine(
        serving.engine,
        settings,
        tokio::runtime::Handle::current(),
        tracker.clone(),
        abort.clone(),
    )
    .context("cannot start the prefill engine thread")?;
    let decode = Arc::new(grpc::DecodeClients::new(grpc::DECODE_CONNECT_TIMEOUT));
    let service = grpc::PrefillService::new(engine.clone(), limits, decode, worker_id.clone());
    let routes = tonic::service::Routes::new(grpc::server(service));
    let stop_serving = CancellationToken::new();
    let loads = engine.clone();
    tracker.spawn(telemetry::sample(move || loads.load(), stop_serving.clone()));
    let (health_tx, health_rx) = oneshot::channel();
    let mut server = tracker.spawn(cluster_core::serve::serve(
        listener,
        routes,
        cluster_core::serve::Described {
            descriptor_set: proto::FILE_DESCRIPTOR_SET,
            services: &["expertmesh.internal.v1.Prefill"],
        },
        move |reporter| {
            let _ = health_tx.send(reporter);
        },
        stop_serving.clone(),
    ));

    let mut reporter: Option<HealthReporter> = None;
    let mut registration: Option<Registration> = None;
    let mut server_exited = false;
    let result: anyhow::Result<()> = async {
        let health = health_rx.await.map_err(|_| anyhow!("the gRPC server stopped before serving"))?;
        health.set_serving::<grpc::Server>().await;
        reporter = Some(health);
        // The store may be slow to answer (etcd starting): a shutdown meanwhile wins.
        let registered = async {
            let store = store.open(STORE_PATIENCE).await.context("cannot open the cluster store")?;
            cluster_core::register(store, &cluster, info, config.node.lease_ttl(), &tracker, &shutdown)
                .await
                .context("cannot register the worker")
        };
        registration = tokio::select! {
            reg = registered => Some(reg?),
            _ = shutdown.cancelled() => return Ok(()),
        };
        tracing::info!(%worker_id, addr = %bound, "prefill_worker_ready");
        let _ = ready.send(Ready { addr: bound, worker_id: worker_id.clone() });
        tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            exit = &mut server => {
                server_exited = true;
                Err(server_error(exit))
            }
            _ = engine_thread.finished() => Err(anyhow!("the prefill engine thread stopped unexpectedly")),
        }
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "prefill_worker_failed");
    }

    tracing::info!("prefill_worker_draining");
    if let Some(health) = &reporter {
        health.set_not_serving::<grpc::Server>().await;
    }
    if let Some(reg) = registration {
        match tokio::time::timeout(DEREGISTER_TIMEOUT, reg.deregister()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "deregister_failed"),
            Err(_) => tracing::warn!("deregister_timed_out"),
        }
    }
    engine.close();
    stop_serving.cancel();
    drain(&tracker, engine_thread, &abort).await;
    if !server_exited && server.is_finished() {
        let exit = server.await;
        if result.is_ok() && !matches!(exit, Ok(Ok(()))) {
            return Err(server_error(exit));
        }
    }
    result
}

/// Waits for queued prompts, their transfers and open calls to finish; past the deadline,
/// aborts them and waits a little longer.
async fn drain(tracker: &TaskTracker, mut engine_thread: cluster_core::actor::Thread, abort: &CancellationToken) {
    tracker.close();
    let mut finished = async || {
        engine_thread.finished().await;
        tracker.wait().await;
    };
    if tokio::time::timeout(DRAIN_DEADLINE, finished()).await.is_err() {
        tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "drain_deadline_passed_aborting");
        abort.cancel();
        if tokio::time::timeout(ABORT_GRACE, finished()).await.is_err() {
            tracing::error!("prefill work still running after abort; leaving it");
            return;
        }
    }
    if let Err(error) = engine_thread.join() {
        tracing::error!(%error, "prefill_engine_thread_failed");
    }
    tracing::info!("prefill_worker_stopped");
}

fn server_error(exit: Result<Result<(), cluster_core::serve::ServeError>, tokio::task::JoinError>) -> anyhow::Error {
    match exit {
        Ok(Ok(())) => anyhow!("the gRPC server stopped unexpectedly"),
        Ok(Err(e)) => anyhow::Error::new(e).context("gRPC server"),
        Err(e) => anyhow::Error::new(e).context("gRPC server task"),
    }
}

/// Opens the checkpoint on a blocking thread, logging progress every 10%. With
/// `--remote-experts`, routed experts are not loaded: they run on the store's expert workers.
async fn load_engine(
    config: &PrefillConfig,
    store: &StoreConfig,
    cluster: &cluster_core::ClusterName,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<model::serving::ServingModel> {
    let placement = if config.remote_experts {
        let store = store.open(STORE_PATIENCE).await.context("cannot open the cluster store")?;
        let remote =
            expert_client::RemoteExperts::from_store(store.as_ref(), cluster, tracker, shutdown, Default::default())
                .await
                .context("cannot follow the expert workers")?;
        model::serving::ExpertPlacement::Remote(Arc::new(remote))
    } else {
        model::serving::ExpertPlacement::Local
    };
    let dir = config.model.clone();
    let setup = model::serving::EngineSetup {
        weight_dtype: config.dtype.into(),
        precision: config.precision.into(),
        options: EngineOptions {
            cache_tokens: config.cache_tokens,
            block_size: config.block_size,
            device: config.device,
        },
    };
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
