//! The prefill worker binary: [`prefill_worker::run`] under the shared serving `main` (flags,
//! logging, signals, the ready line once serving and registered).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cluster_core::service::Binary;

fn main() -> std::process::ExitCode {
    let about = "ExpertMesh prefill worker: prefills prompts and streams their cache to decode workers";
    cluster_core::service::main(Binary { name: "prefill-worker", about }, prefill_worker::run)
}
