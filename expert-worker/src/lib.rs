//! The expert worker: hosts routed-expert slots (a `--shard` of every MoE layer's experts)
//! and serves batched expert FFNs to attention workers over `expertmesh.expert.v1.Expert`.
//!
//! `run` loads only the hosted experts, runs them on a dedicated compute thread fed by a
//! bounded channel, serves the service (+ health, reflection), registers the worker in the
//! store under `Role::Expert` with `capacity.expert_slots` = slots hosted, and on shutdown
//! deregisters, stops serving and joins the compute thread.

mod compute;
mod grpc;
mod shard;

use anyhow::Context;
use clap::ValueEnum;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::{Capacity, Role, StoreConfig, WorkerInfo};
use model::{ExpertId, WeightDtype};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use compute::{COMPUTE_QUEUE_CAPACITY, Slot};
pub use grpc::MAX_MESSAGE_BYTES;
pub use shard::{Shard, ShardError};

/// How long start-up waits for the store (etcd starting alongside).
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// Weight storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
}

/// Activation precision: exact (f32, matches transformers) or bf16 (faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Exact,
    Bf16,
}

/// The expert worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ExpertConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Checkpoint directory; default: the embedded default model.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    pub precision: PrecisionArg,
    /// Host expert e of MoE layer l iff (l * n_routed_experts + e) % N == I; 0/1 hosts all.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
}

impl ExpertConfig {
    fn weight_dtype(&self) -> WeightDtype {
        match self.dtype {
            DtypeArg::Auto => WeightDtype::Auto,
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::Bf16 => WeightDtype::Bf16,
        }
    }

    fn precision(&self) -> kernels::cpu::Precision {
        match self.precision {
            PrecisionArg::Exact => kernels::cpu::Precision::Exact,
            PrecisionArg::Bf16 => kernels::cpu::Precision::Bf16Activations,
        }
    }
}

/// Runs the expert worker until `shutdown`. `ready` fires once it serves and is registered.
pub async fn run(config: ExpertConfig, store: StoreConfig, shutdown: CancellationToken, ready: oneshot::Sender<Ready>) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let (dir, dtype, precision, shard) = (config.model.clone(), config.weight_dtype(), config.precision(), config.shard);
    tracing::info!(model = ?dir, %shard, "expert_loading");
    let want = move |c: &model::ModelConfig, layer: usize, ExpertId(e): ExpertId| shard.hosts(layer, e, c.n_routed_experts);
    let hosted = tokio::task::spawn_blocking(move || model::serving::open_experts(dir, dtype, precision, &want, &|_| {}))
        .await
        .context("expert loading task")?
        .context("cannot load the experts")?;
    let c = &hosted.config;
    let slots: Vec<Slot> = (0..c.num_hidden_layers)
        .filter(|&l| c.is_moe_layer(l))
        .flat_map(|l| (0..c.n_routed_experts as u32).map(move |e| Slot { layer: l, expert: e }))
        .filter(|s| want(c, s.layer, ExpertId(s.expert)))
        .collect();
    tracing::info!(slots = slots.len(), %shard, "experts_loaded");
    let model_name = model::serving::model_name(&hosted.dir);
    let counters = Arc::new(compute::SlotCounters::new(&slots));
    let (compute, compute_thread) =
        compute::spawn_compute(hosted.experts, counters.clone()).context("cannot start the compute thread")?;

    let (listener, bound) = cluster_core::serve::bind(&config.node.listen).await?;
    let worker_id = cluster_core::node::worker_id_or_default(config.node.worker_id.as_deref(), Role::Expert, bound.port())?;
    let tracker = TaskTracker::new();
    let streams_stop = CancellationToken::new();
    let service = grpc::ExpertService { compute, counters, tracker: tracker.clone(), shutdown: streams_stop.clone() };
    let server_stop = CancellationToken::new();
    let (reporter_tx, reporter_rx) = oneshot::channel();
    let server = tracker.spawn(cluster_core::serve::serve(
        listener,
        tonic::service::Routes::new(grpc::server(service)),
        cluster_core::serve::Described { descriptor_set: proto::FILE_DESCRIPTOR_SET, services: &["expertmesh.expert.v1.Expert"] },
        |r| {
            let _ = reporter_tx.send(r);
        },
        server_stop.clone(),
    ));
    let reporter = reporter_rx.await.context("gRPC server did not start")?;
    reporter.set_serving::<grpc::Server>().await;
    let store = store.open(STORE_PATIENCE).await.context("opening the cluster store")?;
    let info = WorkerInfo {
        id: worker_id.clone(),
        role: Role::Expert,
        address: config.node.advertised(bound),
        capacity: Capacity { max_sequences: 0, max_batch_tokens: 0, expert_slots: u32::try_from(slots.len()).context("slot count")? },
        model: model_name,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let registration = cluster_core::register(store, &cluster, info, config.node.lease_ttl(), &tracker, &shutdown).await?;
    tracing::info!(worker_id = %worker_id, addr = %bound, slots = slots.len(), "expert_worker_ready");
    let _ = ready.send(Ready { addr: bound, worker_id: worker_id.as_str().to_string() });

    shutdown.cancelled().await;
    // Leave membership first so attention workers stop sending here, then stop serving.
    reporter.set_not_serving::<grpc::Server>().await;
    if let Err(e) = registration.deregister().await {
        tracing::warn!(error = %e, "deregister_failed");
    }
    streams_stop.cancel();
    server_stop.cancel();
    tracker.close();
    let served = server.await.context("server task")?;
    tracker.wait().await;
    // The server (and with it the last compute handle) is gone: the thread ends.
    tokio::task::spawn_blocking(move || compute_thread.join()).await.context("compute thread")?.ok();
    served?;
    Ok(())
}
