//! `expert-controller`: the expert placement controller as its own process, pointed at etcd.
//! Run two or more: one leads, the others stand by.

use clap::Parser;
use cluster_core::node::EtcdArgs;

#[derive(Debug, Parser)]
#[command(name = "expert-controller", version, about = "ExpertMesh expert placement controller")]
struct Cli {
    #[command(flatten)]
    config: controller::ControllerConfig,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    process: cluster_core::node::ProcessArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _tracing = match cli.process.start("expert-controller", &cli) {
        Ok(guard) => guard,
        Err(code) => return code,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    cluster_core::serve::cancel_on_signal(shutdown.clone());
    cluster_core::node::exit_code(controller::run(cli.config, cli.etcd.store_config(), shutdown).await)
}
