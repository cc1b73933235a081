//! The router: the cluster's public gRPC endpoint. It validates and admits requests, picks a
//! decode worker with room (reserving its cache first) and the least-loaded prefill worker,
//! streams tokens back, and moves a request to another pair when a worker fails.
//!
//! It loads only the checkpoint's config and tokenizer, never weights.

mod driver;
mod grpc;
mod ids;
mod pool;
mod request;
mod schedule;
mod telemetry;

use anyhow::Context;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::service::{Bound, Service};
use cluster_core::{Capacity, Membership, Role, StoreConfig};
use driver::{Driver, DriverConfig};
use model::{ModelConfig, Tokenizer};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, clap::Args)]
pub struct RouterConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Checkpoint directory (only config.json and the tokenizer are read); default: the
    /// embedded default model.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// Requests in flight at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "EXPERTMESH_MAX_INFLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight: u32,
    /// How long an admitted request waits for a decode worker with room.
    #[arg(long, default_value_t = 10_000)]
    pub queue_wait_ms: u64,
    /// Prompts of at most this many tokens are prefilled on the decode worker itself
    /// (0: always use a prefill worker while one is registered).
    #[arg(long, env = "EXPERTMESH_LOCAL_PREFILL_MAX_TOKENS", default_value_t = 0)]
    pub local_prefill_max_tokens: usize,
    /// Times a request is moved to another worker pair after a failure.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// Largest request message accepted, in bytes.
    #[arg(long, default_value_t = cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// How often workers are asked for their load.
    #[arg(long, default_value_t = 100)]
    pub load_poll_ms: u64,
    /// How long a draining router lets requests in flight finish.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// How long a client may leave its stream's tokens unread before the request is
    /// cancelled with RESOURCE_EXHAUSTED (its decode cache is released).
    #[arg(long, env = "EXPERTMESH_STALL_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout_ms: u64,
}

/// How long start-up waits for the store (etcd starting alongside) and the membership.
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// Runs the router until `shutdown`, then drains (through the shared lifecycle,
/// `cluster_core::service`). `ready` fires once it serves and is registered.
pub async fn run(
    config: RouterConfig,
    store: StoreConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> anyhow::Result<()> {
    let cluster = cluster_core::node::cluster_name(&config.node.cluster)?;
    let dir = model::default_model::resolve_dir(config.model.clone())?;
    let model_config = ModelConfig::from_dir(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir, &model_config)?.map(Arc::new);
    let tracker = TaskTracker::new();
    // Stops the membership watch and the load polling: after the drain (requests still in
    // flight may retry elsewhere), or on an early return.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let Some(store) = shutdown.run_until_cancelled(store.open(STORE_PATIENCE)).await else { return Ok(()) };
    let store = store.context("opening the cluster store")?;
    let membership = tokio::time::timeout(STORE_PATIENCE, Membership::start(store.as_ref(), &cluster, &tracker, &stop))
        .await
        .context("timed out loading cluster membership")??;
    let pool = Arc::new(pool::Pool::new(membership));
    tracker.spawn(pool.clone().poll_loads(Duration::from_millis(config.load_poll_ms), stop.clone()));
    let driver = Arc::new(Driver {
        pool,
        config: DriverConfig {
            max_retries: config.max_retries,
            queue_wait: Duration::from_millis(config.queue_wait_ms),
            local_prefill_max_tokens: config.local_prefill_max_tokens,
            stall_timeout: Duration::from_millis(config.stall_timeout_ms),
        },
        tokenizer: tokenizer.clone(),
        eos_token_ids: model_config.eos_token_ids.clone(),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let inflight = Arc::new(Semaphore::new(config.max_inflight as usize));
    let requests = TaskTracker::new();
    let service = grpc::public::GenerationService {
        driver,
        config: Arc::new(model_config),
        tokenizer,
        inflight: inflight.clone(),
        max_inflight: config.max_inflight as usize,
        tracker: requests.clone(),
        draining: draining.clone(),
    };
    let routes = grpc::public::routes(service, config.max_message_bytes);
    let bound = Bound::bind(&config.node, Role::Router).await?;
    // Refuse new requests, let those in flight finish.
    let drain = cluster_core::service::drain(move |deadline| async move {
        draining.store(true, Ordering::Relaxed);
        requests.close();
        if tokio::time::timeout_at(deadline, requests.wait()).await.is_err() {
            tracing::warn!(left = requests.len(), "router_drain_timed_out");
        }
    });
    let service = Service {
        store,
        routes,
        described: grpc::public::DESCRIBED,
        capacity: Capacity { max_sequences: config.max_inflight, max_batch_tokens: 0, expert_slots: 0 },
        model: model::serving::model_name(&dir),
        tracker,
        stop,
        watched: Vec::new(),
        on_registered: None,
        drain,
        drain_timeout: Duration::from_millis(config.drain_timeout_ms),
    };
    cluster_core::service::run(bound, service, shutdown, ready).await?;
    Ok(())
}
