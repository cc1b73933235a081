//! Cluster plumbing shared by the services: ids, the membership/config store (trait + etcd +
//! in-memory), and the key layout.

pub mod etcd;
pub mod ids;
pub mod keys;
pub mod memory;
pub mod registration;
pub mod store;
mod sync;

pub use etcd::EtcdStore;
pub use ids::{Capacity, ClusterName, IdError, Role, WorkerId, WorkerInfo};
pub use memory::MemoryStore;
pub use registration::{Membership, Registration, register};
pub use store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, WATCH_CHANNEL_CAPACITY, WatchEvent};
