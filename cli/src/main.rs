//! `expertmesh`: the operator's command line.

/// Forward passes allocate and free large activation buffers every step; mimalloc keeps
/// them instead of returning them to the kernel (glibc's munmap/page-fault churn cost ~20%).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod generate;
mod model_dir;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
