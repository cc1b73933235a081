//! controller: the expert placement controller. One leader per cluster (elected through the
//! store, standbys take over when it dies) reads the expert workers' live load reports,
//! rebalances expert replicas with EPLB through a two-phase placement switch, and computes
//! how many expert workers the load needs.
//!
//! - [`decide`]: the decisions as plain code (aggregate, judge, when and what to place);
//!   `assign`: which worker fills each position of a new placement (least movement).
//! - `leader`: what the leader does each tick, and the two-phase switch.
//! - [`inspect`]: a read-only view of placement and load (`expertmesh placement`).
//! - `telemetry`: the Prometheus metrics.

mod assign;
pub mod decide;
pub mod inspect;
mod leader;
mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cluster_core::{Membership, StoreConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::decide::{ModelShape, Policy};

/// How long start-up waits for the store.
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// The controller's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerConfig {
    /// Cluster name: the key prefix `/expertmesh/<cluster>/` in the store.
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Checkpoint directory (only config.json is read); default: the embedded default model.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// Name in the election key; default `controller-<pid>`.
    #[arg(long, env = "EXPERTMESH_CONTROLLER_ID")]
    pub controller_id: Option<String>,
    /// Lease TTL of the leadership: a dead leader is replaced within about this time.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub lease_ttl_ms: u64,
    /// Redundant expert slots per MoE layer (replicas of heavy experts); default: experts / 8.
    #[arg(long)]
    pub redundant_slots: Option<usize>,
    /// Nodes the expert workers spread over (EPLB's hierarchical policy).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub nodes: u64,
    /// Rebalance at least this often while there is load (DeepSeek: about 10 minutes).
    #[arg(long, default_value_t = 600_000)]
    pub rebalance_period_ms: u64,
    /// Rebalance early when max/mean expert-worker load (predicted from live load) passes this.
    #[arg(long, default_value_t = 1.3)]
    pub skew_threshold: f64,
    /// Least time between two load-driven rebalances.
    #[arg(long, default_value_t = 60_000)]
    pub min_rebalance_interval_ms: u64,
    /// A load-driven rebalance must lower max/mean by at least this fraction.
    #[arg(long, default_value_t = 0.05)]
    pub min_improvement: f64,
    /// Below this many expert tokens/s (cluster-wide) load is not acted on.
    #[arg(long, default_value_t = 1.0)]
    pub min_tokens_per_s: f64,
    /// How often the leader looks at load and membership.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    pub check_period_ms: u64,
    /// How long the named workers get to load a new placement's slots before it is abandoned.
    #[arg(long, default_value_t = 60_000)]
    pub ready_timeout_ms: u64,
    /// The first placement waits this long after the first expert worker registers, so
    /// workers starting together all get slots in it (workers registering later are given
    /// slots as they join).
    #[arg(long, default_value_t = 3000)]
    pub initial_settle_ms: u64,
    /// Expert workers the cluster is started with: the first placement is made as soon as
    /// this many are registered, without waiting out the settle time.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub expected_expert_workers: Option<u64>,
    /// Autoscaling: expert tokens/s one expert worker serves at full use.
    #[arg(long, default_value_t = 20_000.0)]
    pub worker_tokens_per_s: f64,
    /// Autoscaling: the utilization to size the expert workers for.
    #[arg(long, default_value_t = 0.7)]
    pub target_utilization: f64,
}

impl ControllerConfig {
    fn policy(&self, num_experts: usize) -> anyhow::Result<Policy> {
        anyhow::ensure!(self.skew_threshold >= 1.0, "--skew-threshold {} must be >= 1", self.skew_threshold);
        anyhow::ensure!(
            (0.0..1.0).contains(&self.min_improvement),
            "--min-improvement {} must be in [0, 1)",
            self.min_improvement
        );
        anyhow::ensure!(self.worker_tokens_per_s > 0.0, "--worker-tokens-per-s must be > 0");
        anyhow::ensure!(
            self.target_utilization > 0.0 && self.target_utilization <= 1.0,
            "--target-utilization {} must be in (0, 1]",
            self.target_utilization
        );
        Ok(Policy {
            redundant_slots: self.redundant_slots.unwrap_or(num_experts / 8),
            nodes: usize::try_from(self.nodes).context("--nodes")?,
            period: Duration::from_millis(self.rebalance_period_ms),
            skew_threshold: self.skew_threshold,
            min_interval: Duration::from_millis(self.min_rebalance_interval_ms),
            min_improvement: self.min_improvement,
            min_tokens_per_s: self.min_tokens_per_s,
            worker_tokens_per_s: self.worker_tokens_per_s,
            target_utilization: self.target_utilization,
            initial_settle: Duration::from_millis(self.initial_settle_ms),
            expected_workers: self
                .expected_expert_workers
                .map(usize::try_from)
                .transpose()
                .context("--expected-expert-workers")?,
        })
    }
}

/// The balancer's view of the model in `dir` (the default model when `None`).
pub fn model_shape(dir: Option<PathBuf>) -> anyhow::Result<ModelShape> {
    let dir = model::default_model::resolve_dir(dir).context("resolving the model directory")?;
    let config = model::ModelConfig::from_dir(&dir)?;
    let layers = config.moe_layers();
    anyhow::ensure!(!layers.is_empty(), "{}: the model has no MoE layer; there is nothing to place", dir.display());
    Ok(ModelShape { layers, num_experts: config.n_routed_experts, num_groups: config.router.n_group.max(1) })
}

/// Runs the controller until `shutdown`: campaigns, leads while elected, campaigns again
/// when leadership is lost.
pub async fn run(config: ControllerConfig, store: StoreConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.cluster)?;
    let shape = tokio::task::spawn_blocking({
        let dir = config.model.clone();
        move || model_shape(dir)
    })
    .await
    .context("model config task")??;
    let policy = config.policy(shape.num_experts)?;
    let id = config.controller_id.clone().unwrap_or_else(|| format!("controller-{}", std::process::id()));
    let store = store.open(STORE_PATIENCE).await.context("opening the cluster store")?;
    let tracker = TaskTracker::new();
    let membership = Membership::start(store.as_ref(), &cluster, &tracker, &shutdown).await?;
    tracing::info!(%id, layers = shape.layers.len(), experts = shape.num_experts, groups = shape.num_groups,
        redundant_slots = policy.redundant_slots, "controller_started");
    let ttl = Duration::from_millis(config.lease_ttl_ms);
    let key = cluster_core::keys::controller_leader_key(&cluster);
    let mut leader = leader::Leader::new(
        store.clone(),
        cluster.clone(),
        membership,
        shape,
        policy,
        leader::Timing {
            check_period: Duration::from_millis(config.check_period_ms),
            ready_timeout: Duration::from_millis(config.ready_timeout_ms),
        },
    );
    while !shutdown.is_cancelled() {
        telemetry::set_leader(false);
        let leadership = match cluster_core::election::campaign(
            store.clone(),
            &key,
            id.clone().into_bytes(),
            ttl,
            &tracker,
            &shutdown,
        )
        .await
        {
            Ok(l) => l,
            Err(cluster_core::StoreError::Closed) => break,
            Err(e) => return Err(e).context("campaigning for leadership"),
        };
        tracing::info!(%id, "controller_elected");
        telemetry::set_leader(true);
        leader.lead(&leadership).await;
        if shutdown.is_cancelled() {
            if let Err(e) = leadership.resign().await {
                tracing::warn!(error = %e, "controller_resign_failed");
            }
            break;
        }
        tracing::warn!(%id, "controller_leadership_lost");
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
