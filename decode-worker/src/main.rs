//! `decode-worker`: the decode role as its own process, pointed at etcd.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use cluster_core::node::EtcdArgs;

#[derive(Debug, Parser)]
#[command(name = "decode-worker", version, about = "ExpertMesh decode worker")]
struct Cli {
    #[command(flatten)]
    config: decode_worker::DecodeConfig,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    process: cluster_core::node::ProcessArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _tracing = match cli.process.start("decode-worker", &cli) {
        Ok(guard) => guard,
        Err(code) => return code,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    cluster_core::serve::cancel_on_signal(shutdown.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<cluster_core::serve::Ready>();
    let announce = async {
        if let Ok(r) = ready_rx.await {
            cluster_core::serve::announce_ready(cluster_core::Role::Decode, &r.worker_id, r.addr);
        }
    };
    let (result, ()) =
        tokio::join!(decode_worker::run(cli.config, cli.etcd.store_config(), shutdown, ready_tx), announce);
    cluster_core::node::exit_code(result)
}
