//! The prefill worker binary: flags, logging, signals, then [`prefill_worker::run`]; prints
//! the ready line once serving and registered.

use clap::Parser;
use cluster_core::Role;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ExpertMesh prefill worker: prefills prompts and streams their cache to decode workers.
#[derive(Debug, Parser)]
#[command(name = "prefill-worker", version)]
struct Cli {
    #[command(flatten)]
    config: prefill_worker::PrefillConfig,
    #[command(flatten)]
    etcd: cluster_core::node::EtcdArgs,
    #[command(flatten)]
    process: cluster_core::node::ProcessArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _tracing = match cli.process.start("prefill-worker", &cli) {
        Ok(guard) => guard,
        Err(code) => return code,
    };
    let token = CancellationToken::new();
    cluster_core::serve::cancel_on_signal(token.clone());
    let (ready_tx, ready_rx) = oneshot::channel::<prefill_worker::Ready>();
    let announce = async {
        if let Ok(ready) = ready_rx.await {
            cluster_core::serve::announce_ready(Role::Prefill, ready.worker_id.as_str(), ready.addr);
        }
    };
    let (result, ()) =
        tokio::join!(prefill_worker::run(cli.config, cli.etcd.store_config(), token, ready_tx), announce);
    cluster_core::node::exit_code(result)
}
