//! `expert-controller`: the expert placement controller as its own process, pointed at etcd.
//! Run two or more: one leads, the others stand by.

use cluster_core::service::Binary;

fn main() -> std::process::ExitCode {
    let binary = Binary { name: "expert-controller", about: "ExpertMesh expert placement controller" };
    // It serves no gRPC and prints no ready line: followers wait on the leader key.
    cluster_core::service::main(binary, |config, store, shutdown, _ready| controller::run(config, store, shutdown))
}
