//! What every serving process shares at start-up: which store it uses (etcd endpoints, or
//! the in-memory store of the one-process quickstart) and how it names itself.

use std::sync::Arc;
use std::time::Duration;

use crate::ids::{ClusterName, IdError, Role, WorkerId};
use crate::{EtcdStore, MemoryStore, Store, StoreError};

/// Where membership lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// A real etcd cluster.
    Etcd { endpoints: Vec<String> },
    /// A store shared by the roles of one process (quickstart).
    Memory(MemoryStore),
}

impl StoreConfig {
    /// Connects (etcd) or clones the handle (memory), retrying etcd for `patience` so that
    /// processes started alongside etcd do not race it.
    pub async fn open(&self, patience: Duration) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            StoreConfig::Memory(m) => Ok(Arc::new(m.clone())),
            StoreConfig::Etcd { endpoints } => {
                let deadline = tokio::time::Instant::now() + patience;
                loop {
                    match EtcdStore::connect(endpoints).await {
                        Ok(s) => return Ok(Arc::new(s)),
                        Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "etcd_connect_retry");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                }
            }
        }
    }
}

/// `given`, or `<role>-<host>-<port>` (unique per process on one host).
pub fn worker_id_or_default(given: Option<&str>, role: Role, port: u16) -> Result<WorkerId, IdError> {
    match given {
        Some(id) => WorkerId::new(id),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "local".into());
            let host: String = host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
            WorkerId::new(format!("{}-{host}-{port}", role.as_str()))
        }
    }
}

/// Cluster name from a flag value.
pub fn cluster_name(name: &str) -> Result<ClusterName, IdError> {
    ClusterName::new(name)
}
