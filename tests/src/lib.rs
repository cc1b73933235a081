//! End-to-end test harness: runs a real etcd and the real `router`, `prefill-worker`,
//! `decode-worker` and `expert-worker` binaries as separate processes on 127.0.0.1, talks to them over gRPC, and
//! waits on conditions (never on sleeps). The scenarios live in `tests/*.rs`.
//!
//! - [`etcd::Etcd`]: a single-member etcd on free ports (kill, restart, restart empty).
//! - [`process::Process`]: a spawned binary (ready line, signals, log tail, killed on drop).
//! - [`cluster::Cluster`]: etcd + workers + router from a [`cluster::ClusterSpec`], with
//!   clients, worker loads and the etcd membership view.
//! - [`binaries`]: where the binaries are, the shared model cache, the reference output of
//!   `expertmesh generate --json`.
//! - [`grpc`]: request builders, collected streams checked against the reference, raw
//!   bytes, health checks.
//! - [`otlp`]: an in-test OTLP/gRPC trace receiver.
//! - [`wait`]: `wait_until` / `wait_for` / `within`.

pub mod binaries;
pub mod cluster;
pub mod etcd;
pub mod grpc;
pub mod otlp;
pub mod process;
pub mod wait;

pub use binaries::{Reference, reference, reference_full, references};
pub use cluster::{Cluster, ClusterSpec, Role};
pub use etcd::Etcd;
pub use process::{Process, Ready};
pub use wait::{poll_until, secs, wait_for, wait_until, within};
