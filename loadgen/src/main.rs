//! `loadgen`: load generator for the router's public Generation API (see run.rs).

mod args;
mod report;
mod run;
mod stats;
mod workload;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    run::main(<args::Args as clap::Parser>::parse()).await
}
