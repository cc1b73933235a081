//! A real single-member etcd on free loopback ports with its own data dir: started, killed
//! (SIGKILL, like a crash), restarted on the same ports with the same or an empty data dir,
//! killed on drop. Readiness is polled (a read answers), never slept for.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster_core::{EtcdStore, Store};
use tempfile::TempDir;

use crate::process::tail;
use crate::wait::wait_for;

/// Longest etcd may take to answer after a (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A free loopback port (bound and released: the usual small race is accepted).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind an ephemeral port").port()
}

/// One single-member etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    /// Starts so far (names the log file of each).
    starts: u32,
    /// Data dirs used so far (a new one per [`Etcd::restart_empty`]).
    data_dirs: u32,
}

impl Etcd {
    /// Starts etcd and waits until it answers a read. Panics (fails the test) when the
    /// binary is missing: the tests never skip.
    pub async fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::Builder::new().prefix("cluster-tests-etcd-").tempdir().expect("temp dir for etcd"),
            client_port: free_port(),
            peer_port: free_port(),
            starts: 0,
            data_dirs: 1,
        };
        etcd.spawn().await;
        etcd
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A fresh client (each call its own connection).
    pub async fn store(&self) -> Result<EtcdStore, String> {
        EtcdStore::connect(&[self.endpoint()]).await.map_err(|e| e.to_string())
    }

    /// Every key under `prefix` with its value, read through a fresh connection.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let store = self.store().await?;
        let kvs = store.get_prefix(prefix).await.map_err(|e| e.to_string())?;
        Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, like a crashed server; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data dir (after [`Etcd::kill`]); waits until it
    /// answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running: kill it first");
        self.spawn().await;
    }

    /// Kill, then start on the same ports and data dir; waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Kill, then start on the same ports with an EMPTY data dir (a server that lost its
    /// data: every lease and key is gone).
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.data_dirs += 1;
        self.spawn().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join(format!("data-{}", self.data_dirs))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    /// The last `lines` lines of the current (or last) run's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.log_path();
        let log = File::create(&log_path).expect("create etcd log file");
        let err_log = log.try_clone().expect("clone etcd log handle");
        let spawned = Command::new("etcd")
            .arg("--name=default")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the `etcd` binary is not on PATH: these tests need a real etcd. \
                 tools/test.sh installs Debian's `etcd-server`; or run `apt-get install -y etcd-server`"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        self.child = Some(child);
        self.wait_ready(&log_path).await;
    }

    async fn wait_ready(&mut self, log_path: &Path) {
        let endpoint = self.endpoint();
        let exited = wait_for("etcd to answer a read", READY_TIMEOUT, async || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Ok(Some(status));
            }
            let store = EtcdStore::connect(std::slice::from_ref(&endpoint)).await.map_err(|e| e.to_string())?;
            store.get("/expertmesh-harness-probe").await.map_err(|e| e.to_string())?;
            Ok(None)
        })
        .await;
        if let Some(status) = exited {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            panic!("etcd exited with {status} before answering; its log:\n{log}");
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
