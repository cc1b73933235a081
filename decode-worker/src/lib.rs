//! The decode worker: receives prefilled latent caches into its paged cache, runs every
//! admitted sequence in one continuous batch, streams tokens back, and reports its load.
//!
//! `run` serves `expertmesh.internal.v1.Decode` (+ health, reflection), registers the worker
//! in the store under a lease, and on shutdown drains: it stops admitting, deregisters,
//! lets running sequences finish (up to `--drain-timeout-ms`) and then stops.

mod engine_thread;
mod grpc;
mod import;
mod telemetry;

use anyhow::Context;
use clap::ValueEnum;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::{Capacity, Role, StoreConfig, WorkerInfo};
use model::serving::{EngineSetup, ExpertPlacement, open_engine_with};
use model::{EngineOptions, WeightDtype};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine_thread::MAILBOX_CAPACITY;

/// Weight storage.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
}

/// Activation precision: exact (f32, matches transformers) or bf16 (faster).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Exact,
    Bf16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DecodeConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Checkpoint directory; default: the embedded default model.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    pub precision: PrecisionArg,
    /// Compute device: cpu, or cuda:N (an NVIDIA GPU; the CUDA engine rounds GEMM inputs to
    /// bf16, as `--precision bf16` does on the CPU).
    #[arg(long, env = "EXPERTMESH_DEVICE", default_value = "cpu")]
    pub device: kernels::Device,
    /// Latent cache size in tokens (all sequences together).
    #[arg(long, env = "EXPERTMESH_CACHE_TOKENS", default_value_t = 32768)]
    pub cache_tokens: usize,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,
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

impl DecodeConfig {
    fn setup(&self) -> EngineSetup {
        EngineSetup {
            weight_dtype: match self.dtype {
                DtypeArg::Auto => WeightDtype::Auto,
                DtypeArg::F32 => WeightDtype::F32,
                DtypeArg::Bf16 => WeightDtype::Bf16,
            },
            precision: match self.precision {
                PrecisionArg::Exact => kernels::cpu::Precision::Exact,
                PrecisionArg::Bf16 => kernels::cpu::Precision::Bf16Activations,
            },
            options: EngineOptions {
                cache_tokens: self.cache_tokens,
                block_size: self.block_size as usize,
                device: self.device,
            },
        }
    }
}

/// Runs the decode worker until `shutdown`, then drains. `ready` fires once it serves and is
/// registered.
pub async fn run(
    config: DecodeConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let setup = config.setup();
    let dir = config.model.clone();
    let tracker = TaskTracker::new();
    // One store connection for the expert membership watch and the registration.
    let store = store.open(Duration::from_secs(30)).await.context("opening the cluster store")?;
    let placement = if config.remote_experts {
        let remote =
            expert_client::RemoteExperts::from_store(store.as_ref(), &cluster, &tracker, &shutdown, Default::default())
                .await
                .context("cannot follow the expert workers")?;
        ExpertPlacement::Remote(Arc::new(remote))
    } else {
        ExpertPlacement::Local
    };
    tracing::info!(model = ?dir, remote_experts = config.remote_experts, "loading_model");
    let serving = tokio::task::spawn_blocking(move || {
        open_engine_with(dir, setup, placement, &|p| {
            if p.done == p.total || p.done % (p.total / 10).max(1) == 0 {
                tracing::info!(done = p.done, total = p.total, "loading_progress");
            }
        })
    })
    .await
    .context("model loading task")??;
    let layout = serving.engine.cache_layout();
    let limits = serving.engine.limits();
    let model_name = model::serving::model_name(&serving.dir);
    let (listener, bound) = cluster_core::serve::bind(&config.node.listen).await?;
    let worker_id =
        cluster_core::node::worker_id_or_default(config.node.worker_id.as_deref(), Role::Decode, bound.port())?;
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
        worker_id: worker_id.as_str().to_string(),
        draining: draining.clone(),
    };
    let server_stop = CancellationToken::new();
    tracker.spawn(telemetry::sample(engine.loads(), server_stop.clone()));
    let (reporter_tx, reporter_rx) = oneshot::channel();
    let routes = tonic::service::Routes::new(
        proto::internal::decode_server::DecodeServer::new(service)
            .max_decoding_message_size(cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES),
    );
    let server = tracker.spawn(cluster_core::serve::serve(
        listener,
        routes,
        cluster_core::serve::Described {
            descriptor_set: proto::FILE_DESCRIPTOR_SET,
            services: &["expertmesh.internal.v1.Decode"],
        },
        |r| {
            let _ = reporter_tx.send(r);
        },
        server_stop.clone(),
    ));
    let reporter = reporter_rx.await.context("gRPC server did not start")?;
    type Svc = proto::internal::decode_server::DecodeServer<grpc::DecodeService>;
    reporter.set_serving::<Svc>().await;
    let info = WorkerInfo {
        id: worker_id.clone(),
        role: Role::Decode,
        address: config.node.advertised(bound),
        capacity: Capacity {
            max_sequences: config.max_batch as u32,
            max_batch_tokens: config.max_batch as u32,
            expert_slots: 0,
        },
        model: model_name,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let registration =
        cluster_core::register(store, &cluster, info, config.node.lease_ttl(), &tracker, &shutdown).await?;
    tracing::info!(worker_id = %worker_id, addr = %bound, "decode_worker_ready");
    let _ = ready.send(Ready { addr: bound, worker_id: worker_id.as_str().to_string() });

    shutdown.cancelled().await;
    // Drain: refuse new sequences, leave routing, let running ones finish.
    draining.store(true, Ordering::Relaxed);
    reporter.set_not_serving::<Svc>().await;
    if let Err(e) = registration.deregister().await {
        tracing::warn!(error = %e, "deregister_failed");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.drain_timeout_ms);
    let left = engine.until_idle(deadline).await;
    tracing::info!(left = left.running + left.waiting, "decode_worker_drained");
    server_stop.cancel();
    tracker.close();
    let served = server.await.context("server task")?;
    tracker.wait().await;
    drop(engine);
    tokio::task::spawn_blocking(move || engine_thread.join()).await.context("engine thread")??;
    served?;
    Ok(())
}
