//! Cluster plumbing shared by the services: ids, the membership/config store (trait + etcd +
//! in-memory), the key layout, how a process serves gRPC, names itself and shuts down (one
//! service lifecycle for every role: `service`), and the shape of its compute-thread actors.

pub mod actor;
pub mod election;
pub mod etcd;
pub mod follow;
pub mod ids;
pub mod keys;
pub mod memory;
pub mod node;
pub mod registration;
pub mod serve;
pub mod service;
pub mod stall;
pub mod store;
mod sync;
pub mod telemetry;
pub mod trace;

pub use etcd::EtcdStore;
pub use follow::{Fold, WatchFollower};
pub use ids::{Capacity, ClusterName, IdError, Role, WorkerId, WorkerInfo};
pub use memory::MemoryStore;
pub use node::StoreConfig;
pub use registration::{Membership, Registration, register};
pub use store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, WATCH_CHANNEL_CAPACITY, WatchEvent};
