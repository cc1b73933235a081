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
    metrics: cluster_core::telemetry::MetricsArgs,
    #[command(flatten)]
    tracing: cluster_core::trace::TracingArgs,
    /// Parse the flags and environment, print the resulting configuration, and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        println!("{cli:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    let _tracing = match cli.tracing.init("expert-controller") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = cli.metrics.install() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    cluster_core::serve::cancel_on_signal(shutdown.clone());
    match controller::run(cli.config, cli.etcd.store_config(), shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
