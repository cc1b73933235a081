//! The expert worker: hosts routed-expert slots and serves batched expert FFNs to attention
//! workers over `expertmesh.expert.v1.Expert`.
//!
//! `run` opens the checkpoint once (memory-mapped, for the worker's lifetime), loads the
//! `--shard` slots if one is given, runs hosted experts on a dedicated compute thread fed by
//! a bounded command channel, serves the service (+ health, reflection) and registers the
//! worker in the store under `Role::Expert` (the shared lifecycle, `cluster_core::service`).
//! Two tracked tasks then follow the cluster: the placement follower (loads the slots each
//! placement version gives this worker, marks the version ready, releases slots no longer
//! placed here) and the load publisher (tokens per second per layer and expert at
//! `/load/<worker>`). On shutdown it deregisters, stops those two, stops serving and joins
//! the compute thread; if the compute thread dies it does the same and fails.

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
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::service::{Bound, Service, Watched};
use cluster_core::{Capacity, Role, StoreConfig, WatchFollower};
use model::LocalExperts;
use model::args::ModelArgs;
use model::serving::ExpertCheckpoint;
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
/// store call in flight) before stopping the server anyway.
const BACKGROUND_DRAIN: Duration = Duration::from_secs(5);

/// The expert worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ExpertConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    // The engine flags an expert worker takes: it computes on the CPU (no `--device`) and
    // holds no latent cache (no `--cache-tokens`, `--block-size`).
    #[command(flatten)]
    pub model: ModelArgs,
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
}

/// Runs the expert worker until `shutdown` (through the shared lifecycle,
/// `cluster_core::service`); fails when its compute thread or server dies. `ready` fires
/// once it serves and is registered.
pub async fn run(
    config: ExpertConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let tracker = TaskTracker::new();
    // Stops the Run streams, the server and (through its child) the placement follower and
    // the load publisher: after the drain, or on an early return.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let Some(store) = shutdown.run_until_cancelled(store.open(STORE_PATIENCE)).await else { return Ok(()) };
    let store = store.context("opening the cluster store")?;
    let (dir, dtype, precision, shard) =
        (config.model.dir.clone(), config.model.weight_dtype(), config.model.precision(), config.shard);
    tracing::info!(model = ?dir, shard = shard.map(|s| s.to_string()), "expert_loading");
    let checkpoint = tokio::task::spawn_blocking(move || ExpertCheckpoint::open(dir, dtype))
        .await
        .context("checkpoint opening task")?
        .context("cannot open the checkpoint")?;
    let checkpoint = Arc::new(checkpoint);
    let mut experts = LocalExperts::empty(checkpoint.config(), precision);
    if let Some(shard) = shard {
        let wanted: Vec<Slot> = slots::shard_slots(checkpoint.config(), shard).into_iter().collect();
        let (ckpt, cancel) = (checkpoint.clone(), shutdown.clone());
        let loaded = tokio::task::spawn_blocking(move || slots::load_slots(&ckpt, &wanted, &cancel))
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

    let bound = Bound::bind(&config.node, Role::Expert).await?;
    let worker_id = bound.worker_id().clone();
    let service = grpc::ExpertService {
        compute: compute.clone(),
        counters: counters.clone(),
        tracker: tracker.clone(),
        shutdown: stop.clone(),
    };
    let shape = placement::ModelShape {
        moe_layers: checkpoint.config().moe_layers().into_iter().collect(),
        num_experts: checkpoint.config().n_routed_experts,
    };
    let view = placement::PlacementView::new(cluster.clone(), worker_id.clone(), shape);
    let prefix = ::placement::keys::placement_prefix(&cluster);
    let placements = WatchFollower::start(store.as_ref(), &prefix, view).await.context("watching the placement")?;

    // The placement follower and the load publisher put records on the registration's
    // lease: they start once it exists, and stop first in the drain.
    let background = TaskTracker::new();
    let background_stop = stop.child_token();
    let on_registered = {
        let (store, background, background_stop) = (store.clone(), background.clone(), background_stop.clone());
        move |registration: Arc<cluster_core::Registration>| {
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
                me: worker_id,
                registration,
                counters,
                version: version_rx,
                period: config.load_report_period(),
                window: config.load_window as usize,
                started,
            };
            background.spawn(load_report::publish(publisher, background_stop));
        }
    };
    let drain = cluster_core::service::drain(move |deadline| async move {
        background_stop.cancel();
        background.close();
        if tokio::time::timeout_at(deadline, background.wait()).await.is_err() {
            tracing::warn!(waited_ms = BACKGROUND_DRAIN.as_millis() as u64, "placement_tasks_slow_to_stop");
        }
    });
    let service = Service {
        store,
        routes: tonic::service::Routes::new(grpc::server(service)),
        described: grpc::DESCRIBED,
        capacity: Capacity {
            max_sequences: 0,
            max_batch_tokens: 0,
            expert_slots: u32::try_from(hosted).context("slot count")?,
        },
        model: model_name,
        tracker,
        stop,
        // The server, the follower and the stream tasks hold the compute handles: once they
        // are stopped the thread ends and is joined.
        watched: vec![Watched::thread(compute_thread)],
        on_registered: Some(Box::new(on_registered)),
        drain,
        drain_timeout: BACKGROUND_DRAIN,
    };
    cluster_core::service::run(bound, service, shutdown, ready).await?;
    Ok(())
}
