//! The expert worker: hosts routed-expert slots and serves batched expert FFNs to attention
//! workers over `expertmesh.expert.v1.Expert`.
//!
//! `run` opens the checkpoint once (memory-mapped, for the worker's lifetime), loads the
//! `--shard` slots if one is given, runs hosted experts on a dedicated compute thread fed by
//! a bounded command channel, serves the service (+ health, reflection) and registers the
//! worker in the store under `Role::Expert`. Two tracked tasks then follow the cluster: the
//! placement follower (loads the slots each placement version gives this worker, marks the
//! version ready, releases slots no longer placed here) and the load publisher (tokens per
//! second per layer and expert at `/load/<worker>`). On shutdown it deregisters, stops
//! serving and joins the compute thread.

mod compute;
mod counters;
mod follower;
mod grpc;
mod load_report;
mod placement;
mod shard;
mod slots;
mod telemetry;

use anyhow::Context;
use clap::ValueEnum;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::{Capacity, Role, StoreConfig, WatchFollower, WorkerInfo};
use model::serving::ExpertCheckpoint;
use model::{LocalExperts, WeightDtype};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use ::placement::SlotKey as Slot;
pub use compute::COMPUTE_QUEUE_CAPACITY;
pub use grpc::MAX_MESSAGE_BYTES;
pub use shard::{Shard, ShardError};

/// How long start-up waits for the store (etcd starting alongside).
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// How long shutdown waits for the follower and the publisher (an expert being loaded, a
/// store call in flight) before deregistering anyway.
const BACKGROUND_DRAIN: Duration = Duration::from_secs(5);

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
    /// Host a fixed shard from the start: expert e of MoE layer l iff
    /// (l * n_routed_experts + e) % N == I; 0/1 hosts all. Without it the worker hosts
    /// nothing until a placement gives it slots.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Once `/placement/current` moves to a version, how long slots that version (and newer
    /// specs) no longer place here stay hosted, so steps still using the previous version
    /// drain.
    #[arg(long, default_value_t = 5000)]
    pub release_delay_ms: u64,
    /// Period of the load report at `/load/<worker>` (each report is a new etcd revision of
    /// a layers x experts table: keep it seconds apart on large models).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub load_report_ms: u64,
    /// Report periods the load report's sliding window covers (default: one minute).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    pub load_window: u32,
}

impl ExpertConfig {
    pub fn release_delay(&self) -> Duration {
        Duration::from_millis(self.release_delay_ms)
    }

    pub fn load_report_period(&self) -> Duration {
        Duration::from_millis(self.load_report_ms.max(1))
    }

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
pub async fn run(
    config: ExpertConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let (dir, dtype, precision, shard) =
        (config.model.clone(), config.weight_dtype(), config.precision(), config.shard);
    tracing::info!(model = ?dir, shard = shard.map(|s| s.to_string()), "expert_loading");
    let checkpoint = tokio::task::spawn_blocking(move || ExpertCheckpoint::open(dir, dtype))
        .await
        .context("checkpoint opening task")?
        .context("cannot open the checkpoint")?;
    let checkpoint = Arc::new(checkpoint);
    let mut experts = LocalExperts::empty(checkpoint.config(), precision);
    if let Some(shard) = shard {
        let wanted: Vec<Slot> = slots::shard_slots(checkpoint.config(), shard).into_iter().collect();
        let (ckpt, stop) = (checkpoint.clone(), shutdown.clone());
        let loaded = tokio::task::spawn_blocking(move || slots::load_slots(&ckpt, &wanted, &stop))
            .await
            .context("expert loading task")?;
        let weights = match loaded {
            Ok(weights) => weights,
            Err(slots::LoadError::Cancelled) => return Ok(()),
            Err(e) => return Err(e).context("cannot load the experts"),
        };
        for w in weights {
            experts.insert(w).context("installing a loaded expert")?;
        }
    }
    let hosted = experts.hosted().len();
    tracing::info!(slots = hosted, shard = shard.map(|s| s.to_string()), "experts_loaded");
    let model_name = model::serving::model_name(checkpoint.dir());
    let counters = Arc::new(counters::LoadCounters::new(checkpoint.config()));
    let started = tokio::time::Instant::now();
    let (compute, compute_thread) =
        compute::spawn_compute(experts, counters.clone()).context("cannot start the compute thread")?;

    let (listener, bound) = cluster_core::serve::bind(&config.node.listen).await?;
    let worker_id =
        cluster_core::node::worker_id_or_default(config.node.worker_id.as_deref(), Role::Expert, bound.port())?;
    let tracker = TaskTracker::new();
    let streams_stop = CancellationToken::new();
    let service = grpc::ExpertService {
        compute: compute.clone(),
        counters: counters.clone(),
        tracker: tracker.clone(),
        shutdown: streams_stop.clone(),
    };
    let server_stop = CancellationToken::new();
    let (reporter_tx, reporter_rx) = oneshot::channel();
    let server = tracker.spawn(cluster_core::serve::serve(
        listener,
        tonic::service::Routes::new(grpc::server(service)),
        cluster_core::serve::Described {
            descriptor_set: proto::FILE_DESCRIPTOR_SET,
            services: &["expertmesh.expert.v1.Expert"],
        },
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
        capacity: Capacity {
            max_sequences: 0,
            max_batch_tokens: 0,
            expert_slots: u32::try_from(hosted).context("slot count")?,
        },
        model: model_name,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let registration = Arc::new(
        cluster_core::register(store.clone(), &cluster, info, config.node.lease_ttl(), &tracker, &shutdown).await?,
    );

    // The placement follower and the load publisher; stopped before deregistering.
    let background = TaskTracker::new();
    let background_stop = shutdown.child_token();
    let shape = placement::ModelShape {
        moe_layers: slots::moe_layers(checkpoint.config()).into_iter().collect(),
        num_experts: checkpoint.config().n_routed_experts,
    };
    let view = placement::PlacementView::new(cluster.clone(), worker_id.clone(), shape);
    let prefix = ::placement::keys::placement_prefix(&cluster);
    let placements = WatchFollower::start(store.as_ref(), &prefix, view).await.context("watching the placement")?;
    let (version_tx, version_rx) = watch::channel(None);
    let follower = follower::Follower {
        store: store.clone(),
        cluster: cluster.clone(),
        me: worker_id.clone(),
        registration: registration.clone(),
        compute,
        checkpoint,
        release_delay: config.release_delay(),
        version: version_tx,
        loads: background.clone(),
    };
    background.spawn(follower::follow(follower, placements, background_stop.clone()));
    let publisher = load_report::Publisher {
        store,
        cluster,
        me: worker_id.clone(),
        registration: registration.clone(),
        counters,
        version: version_rx,
        period: config.load_report_period(),
        window: config.load_window as usize,
        started,
    };
    background.spawn(load_report::publish(publisher, background_stop.clone()));
    tracing::info!(worker_id = %worker_id, addr = %bound, slots = hosted, "expert_worker_ready");
    let _ = ready.send(Ready { addr: bound, worker_id: worker_id.as_str().to_string() });

    shutdown.cancelled().await;
    // Leave membership first so attention workers stop sending here, then stop serving.
    reporter.set_not_serving::<grpc::Server>().await;
    background_stop.cancel();
    background.close();
    if tokio::time::timeout(BACKGROUND_DRAIN, background.wait()).await.is_err() {
        tracing::warn!(waited_ms = BACKGROUND_DRAIN.as_millis() as u64, "placement_tasks_slow_to_stop");
    }
    match Arc::try_unwrap(registration) {
        Ok(registration) => {
            if let Err(e) = registration.deregister().await {
                tracing::warn!(error = %e, "deregister_failed");
            }
        }
        // A background task still holds it: dropping ours lets the key expire within the TTL.
        Err(_) => tracing::warn!("deregister_skipped"),
    }
    streams_stop.cancel();
    server_stop.cancel();
    tracker.close();
    let served = server.await.context("server task")?;
    tracker.wait().await;
    // The server and the follower (and with them every compute handle) are gone: the
    // thread ends.
    tokio::task::spawn_blocking(move || compute_thread.join()).await.context("compute thread")??;
    served?;
    Ok(())
}
