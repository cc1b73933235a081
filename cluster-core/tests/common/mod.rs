//! Test harness: a real `etcd` on 127.0.0.1 with free ports and a temporary data dir,
//! started and restarted on demand, killed on drop. Readiness is polled, never slept for.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_core::{EtcdStore, Store};
use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind an ephemeral port").port()
}

/// One single-member etcd cluster.
pub struct Etcd {
    child: Option<Child>,
    data: TempDir,
    client_port: u16,
    peer_port: u16,
    starts: u32,
}

impl Etcd {
    /// Starts etcd and waits until it answers a read. Panics (fails the test) when the
    /// binary is missing: the tests never skip.
    pub async fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            data: tempfile::tempdir().expect("temp dir for etcd data"),
            client_port: free_port(),
            peer_port: free_port(),
            starts: 0,
        };
        etcd.spawn().await;
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A fresh client connection (each test store is independent of the harness's probe).
    pub async fn store(&self) -> EtcdStore {
        EtcdStore::connect(&[self.endpoint()]).await.expect("connect to the test etcd")
    }

    /// SIGKILL, like a crashed server; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill, then start again on the same ports and data dir; waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Kill, then start on the same ports with an EMPTY data dir (a server that lost its
    /// data: every lease and key is gone).
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.data = tempfile::tempdir().expect("temp dir for etcd data");
        self.spawn().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join("member-data")
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.data.path().join(format!("etcd-{}.log", self.starts));
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
                 `.ci/run` (tools/test.sh) installs Debian's `etcd-server`; \
                 or run `apt-get install -y etcd-server`"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        self.child = Some(child);
        self.wait_ready(&log_path).await;
    }

    async fn wait_ready(&mut self, log_path: &std::path::Path) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                panic!("etcd exited with {status} before answering; its log:\n{log}");
            }
            if let Ok(store) = EtcdStore::connect(&[self.endpoint()]).await
                && store.get("/expertmesh-harness-probe").await.is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                panic!("etcd did not answer within {READY_TIMEOUT:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
