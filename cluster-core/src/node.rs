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
            let host: String =
                host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
            WorkerId::new(format!("{}-{host}-{port}", role.as_str()))
        }
    }
}

/// Cluster name from a flag value.
pub fn cluster_name(name: &str) -> Result<ClusterName, IdError> {
    ClusterName::new(name)
}

/// Flags every serving process takes (also settable through `EXPERTMESH_*` variables).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Cluster name: the key prefix `/expertmesh/<cluster>/` in the store.
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Address to serve gRPC on; port 0 picks a free port.
    #[arg(long, env = "EXPERTMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address other processes dial (host:port); default: the bound address.
    #[arg(long, env = "EXPERTMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Worker id in the store; default `<role>-<hostname>-<port>`.
    #[arg(long, env = "EXPERTMESH_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Lease TTL of the worker's registration: a process that stops renewing leaves
    /// routing within this time.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..))]
    pub lease_ttl_ms: u64,
}

impl NodeArgs {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// The address to register: `--advertise`, else the bound address.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| bound.to_string())
    }
}

/// The `--etcd` flag of the separate binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "EXPERTMESH_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
}

impl EtcdArgs {
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig::Etcd { endpoints: self.etcd.clone() }
    }
}

/// A binary's exit status: success, or the error (with its causes) on stderr and failure.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG`, else by `default`.
pub fn init_logging_default(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// What every serving binary takes besides its role's flags: metrics, trace export, and
/// `--check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    #[command(flatten)]
    pub metrics: crate::telemetry::MetricsArgs,
    #[command(flatten)]
    pub tracing: crate::trace::TracingArgs,
    /// Parse the flags and environment, print the resulting configuration, and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl ProcessArgs {
    /// With `--check-config`, prints `config` (the whole parsed command line) and asks the
    /// caller to exit with success; otherwise installs logging, trace export and metrics
    /// (inside the runtime). `Err` is the exit code to return.
    pub fn start(
        &self,
        role: &str,
        config: &dyn std::fmt::Debug,
    ) -> Result<crate::trace::TracingGuard, std::process::ExitCode> {
        if self.check_config {
            println!("{config:#?}");
            return Err(std::process::ExitCode::SUCCESS);
        }
        let fail = |e: &dyn std::fmt::Display| {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        };
        let guard = self.tracing.init(role).map_err(|e| fail(&e))?;
        self.metrics.install().map_err(|e| fail(&e))?;
        Ok(guard)
    }
}
