//! `expertmesh`: the operator's command line.

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
