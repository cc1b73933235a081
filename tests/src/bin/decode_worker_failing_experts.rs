//! `decode-worker-failing-experts`: the real decode worker whose routed experts panic when
//! first called, so its engine thread dies on its first forward pass through an MoE layer.
//!
//! The fault enters through the engine's expert backend, the seam remote experts use
//! (`decode_worker::run_with_experts`): this test binary is the only thing that installs a
//! failing backend, so the `decode-worker` users run has no fault switch at all, no flag, no
//! variable and no feature. Everything else (model, engine thread, lifecycle, store, gRPC)
//! is the production code.

use std::sync::Arc;

use cluster_core::service::Binary;
use model::{ExpertBackend, ExpertBatch, ExpertError};

/// Routed experts that panic, as a bug in the engine thread would.
#[derive(Debug)]
struct PanickingExperts;

impl ExpertBackend for PanickingExperts {
    fn run(&self, _batch: &ExpertBatch<'_>, _outputs: &mut [f32]) -> Result<(), ExpertError> {
        panic!("injected fault: the routed experts were called")
    }
}

fn main() -> std::process::ExitCode {
    let about = "ExpertMesh decode worker whose routed experts panic (lifecycle tests only)";
    let binary = Binary { name: "decode-worker-failing-experts", about };
    cluster_core::service::main(binary, |config, store, shutdown, ready| {
        decode_worker::run_with_experts(config, Arc::new(PanickingExperts), store, shutdown, ready)
    })
}
