//! `decode-worker`: the decode role as its own process, pointed at etcd.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cluster_core::service::Binary;

fn main() -> std::process::ExitCode {
    cluster_core::service::main(Binary { name: "decode-worker", about: "ExpertMesh decode worker" }, decode_worker::run)
}
