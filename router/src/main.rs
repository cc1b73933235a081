//! `router`: the router as its own process, pointed at etcd.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cluster_core::service::Binary;

fn main() -> std::process::ExitCode {
    cluster_core::service::main(
        Binary { name: "router", about: "ExpertMesh router (public gRPC endpoint)" },
        router::run,
    )
}
