//! `expertmesh up`: the whole cluster in one process (router, prefill and decode workers, and
//! optionally expert workers, as actors on an in-memory store), on the embedded default
//! model unless `--model` is given. Each role runs its own `run`, so the one-process cluster
//! goes through the same service lifecycle (`cluster_core::service`) as the separate
//! binaries; the first role to stop takes the others down.

use crate::client::{self, ClientArgs};
use crate::sampling_args::SamplingArgs;
use anyhow::Context;
use clap::Args;
use cluster_core::node::NodeArgs;
use cluster_core::serve::Ready;
use cluster_core::{MemoryStore, StoreConfig};
use model::args::EngineArgs;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct UpArgs {
    // The engine flags of every prefill and decode worker (`--cache-tokens` sizes the decode
    // workers' caches; prefill workers keep their default).
    #[command(flatten)]
    engine: EngineArgs,
    /// Address of the public gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=16))]
    prefill_workers: u32,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    decode_workers: u32,
    /// Expert workers, placed and rebalanced by an in-process expert controller; with N > 0
    /// prefill and decode workers load no routed experts and call these instead.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    expert_workers: u32,
    /// Prompts of at most this many tokens are prefilled on the decode worker.
    #[arg(long, default_value_t = 0)]
    local_prefill_max_tokens: usize,
    /// Once the cluster is up, send this prompt through the public API and print the answer.
    #[arg(long)]
    prompt: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    metrics: cluster_core::telemetry::MetricsArgs,
    /// Exit after answering --prompt instead of serving until interrupted.
    #[arg(long, requires = "prompt")]
    once: bool,
}

fn node(listen: &str, id: String) -> NodeArgs {
    NodeArgs {
        cluster: "local".into(),
        listen: listen.into(),
        advertise: None,
        worker_id: Some(id),
        lease_ttl_ms: 5000,
    }
}

type RoleFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(up(args))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    // One recorder for every role of this process.
    args.metrics.install()?;
    let store = StoreConfig::Memory(MemoryStore::new());
    let shutdown = CancellationToken::new();
    cluster_core::serve::cancel_on_signal(shutdown.clone());
    let mut roles: Vec<(String, RoleFuture, oneshot::Receiver<Ready>)> = Vec::new();
    args.engine.validate()?;
    // Resolved once here, so the roles do not all create the default model at once.
    let model = Some(crate::model_dir::resolve(args.engine.model.dir.clone())?);
    let mut engine = args.engine.clone();
    engine.model.dir = model.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let remote_experts = args.expert_workers > 0;
    if remote_experts {
        // Experts first: attention workers find them in the store when their first batch runs.
        eprintln!("starting {} expert workers...", args.expert_workers);
        let mut readies = Vec::new();
        for i in 0..args.expert_workers {
            let (tx, rx) = oneshot::channel();
            // No shard: the controller places the experts once the workers registered.
            let mut config: expert_worker::ExpertConfig = defaults()?;
            config.node = node("127.0.0.1:0", format!("expert-{i}"));
            config.model = engine.model.clone();
            let run = expert_worker::run(config, store.clone(), shutdown.clone(), tx);
            tasks.spawn(async move { run.await.with_context(|| format!("expert-{i} failed")) });
            readies.push(rx);
        }
        for r in readies {
            if r.await.is_err() {
                shutdown.cancel();
                return first_error(&mut tasks).await;
            }
        }
        let mut config = controller_config(model.clone())?;
        config.expected_expert_workers = Some(u64::from(args.expert_workers));
        let run = controller::run(config, store.clone(), shutdown.clone());
        tasks.spawn(async move { run.await.context("expert controller failed") });
    }
    eprintln!("starting {} prefill and {} decode workers...", args.prefill_workers, args.decode_workers);
    for i in 0..args.decode_workers {
        let (tx, rx) = oneshot::channel();
        let mut config: decode_worker::DecodeConfig = defaults()?;
        config.node = node("127.0.0.1:0", format!("decode-{i}"));
        config.engine = engine.clone();
        config.remote_experts = remote_experts;
        roles.push((
            format!("decode-{i}"),
            Box::pin(decode_worker::run(config, store.clone(), shutdown.clone(), tx)),
            rx,
        ));
    }
    for i in 0..args.prefill_workers {
        let (tx, rx) = oneshot::channel();
        let mut config: prefill_worker::PrefillConfig = defaults()?;
        config.node = node("127.0.0.1:0", format!("prefill-{i}"));
        config.engine = EngineArgs { cache_tokens: config.engine.cache_tokens, ..engine.clone() };
        config.remote_experts = remote_experts;
        roles.push((
            format!("prefill-{i}"),
            Box::pin(prefill_worker::run(config, store.clone(), shutdown.clone(), tx)),
            rx,
        ));
    }
    let (tx, router_ready) = oneshot::channel();
    let mut router_config: router::RouterConfig = defaults()?;
    router_config.node = node(&args.listen, "router-0".into());
    router_config.model = model.clone();
    router_config.local_prefill_max_tokens = args.local_prefill_max_tokens;
    let mut readies = Vec::new();
    for (name, fut, ready) in roles {
        tasks.spawn(async move { fut.await.with_context(|| format!("{name} failed")) });
        readies.push(ready);
    }
    for r in readies {
        if r.await.is_err() {
            shutdown.cancel();
            return first_error(&mut tasks).await;
        }
    }
    let router_fut: RoleFuture = Box::pin(router::run(router_config, store.clone(), shutdown.clone(), tx));
    tasks.spawn(async move { router_fut.await.context("router failed") });
    let addr = match router_ready.await {
        Ok(r) => r.addr,
        Err(_) => return first_error(&mut tasks).await,
    };
    println!("expertmesh cluster listening on {addr}");
    if let Some(prompt) = &args.prompt {
        let client_args = ClientArgs {
            addr: addr.to_string(),
            prompt: Some(prompt.clone()),
            prompt_ids: None,
            chat: false,
            sampling: args.sampling.clone(),
            json: false,
        };
        println!("> {prompt}");
        client::stream(&client_args, &mut std::io::stdout()).await?;
        if args.once {
            shutdown.cancel();
        }
    }
    if !args.once {
        eprintln!("serving; try: expertmesh client --addr {addr} --prompt \"Hello\" (Ctrl-C stops)");
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        // The first role to stop takes the others down.
        shutdown.cancel();
        if let Ok(Err(e)) = r
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    result
}

/// The controller's defaults, on the quickstart's cluster.
fn controller_config(model: Option<PathBuf>) -> anyhow::Result<controller::ControllerConfig> {
    let mut config: controller::ControllerConfig = defaults()?;
    config.cluster = "local".into();
    config.model = model;
    config.controller_id = Some("controller-0".into());
    Ok(config)
}

/// A role's flags at their defaults, as its own binary would parse an empty command line.
fn defaults<T: clap::Args>() -> anyhow::Result<T> {
    let command = T::augment_args(clap::Command::new("role"));
    let matches = command.try_get_matches_from(["role"])?;
    Ok(T::from_arg_matches(&matches)?)
}

async fn first_error(tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            return Err(e);
        }
    }
    anyhow::bail!("a role stopped before it was ready")
}
