//! `expert-worker`: the expert role as its own process, pointed at etcd.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cluster_core::service::Binary;

fn main() -> std::process::ExitCode {
    cluster_core::service::main(Binary { name: "expert-worker", about: "ExpertMesh expert worker" }, expert_worker::run)
}
