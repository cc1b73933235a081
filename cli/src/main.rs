//! `expertmesh`: the operator's command line.

/// Forward passes allocate and free large activation buffers every step; mimalloc keeps
/// them instead of returning them to the kernel (glibc's munmap/page-fault churn cost ~20%).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod eplb_cmd;
mod generate;
mod model_dir;
mod placement_cmd;
mod sampling_args;
mod up;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "expertmesh", version, about = "Serve DeepSeek-V3-architecture MoE models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a continuation of one prompt in this process.
    Generate(generate::GenerateArgs),
    /// Run the whole cluster (router, prefill and decode workers) in this process.
    Up(up::UpArgs),
    /// Send a prompt to a running cluster's router and stream the answer.
    Client(client::ClientArgs),
    /// Print the expert placement EPLB chooses for a load table (JSON).
    Eplb(eplb_cmd::EplbArgs),
    /// Print a running cluster's live expert placement and load (from etcd).
    Placement(placement_cmd::PlacementArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Up(args) => {
            cluster_core::node::init_logging_default("warn");
            up::run(args)
        }
        Command::Client(args) => client::run(args),
        Command::Eplb(args) => eplb_cmd::run(args),
        Command::Placement(args) => placement_cmd::run(args),
    };
    cluster_core::node::exit_code(result)
}
