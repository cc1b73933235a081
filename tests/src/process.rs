//! One service process under test: spawned with its stdout watched for the ready line and
//! its output kept in log files, signalled through the `kill` command, SIGKILLed on drop (also
//! when a test panics) so no test leaves a process behind.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wait::wait_for;

/// What a process announces on stdout once it serves and is registered:
/// `{"event":"ready","role":"decode","worker_id":"...","addr":"127.0.0.1:PORT"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub role: String,
    pub worker_id: String,
    pub addr: SocketAddr,
}

impl Ready {
    fn parse(line: &str) -> Option<Ready> {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        if v["event"] != "ready" {
            return None;
        }
        Some(Ready {
            role: v["role"].as_str()?.to_string(),
            worker_id: v["worker_id"].as_str().unwrap_or_default().to_string(),
            addr: v["addr"].as_str()?.parse().ok()?,
        })
    }

    /// `http://ADDR`, for a tonic endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A spawned binary. Dropping it SIGKILLs and reaps it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    pid: u32,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    /// Filled by the stdout reader thread with the first ready line.
    announced: Arc<Mutex<Option<Ready>>>,
    ready: Option<Ready>,
    stopped: bool,
    /// Where it serves Prometheus metrics (`--metrics-listen`), if asked to.
    metrics: Option<SocketAddr>,
}

impl Process {
    /// Spawns `binary` with `args` and `env` (added to the test's environment); stdout goes
    /// to `<log_dir>/<name>.stdout` (and is scanned for the ready line), stderr to
    /// `<log_dir>/<name>.stderr`.
    pub fn spawn(name: &str, binary: &Path, args: &[String], env: &[(String, String)], log_dir: &Path) -> Process {
        let stdout_log = log_dir.join(format!("{name}.stdout"));
        let stderr_log = log_dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_log).unwrap_or_else(|e| panic!("create {}: {e}", stderr_log.display()));
        let mut command = Command::new(binary);
        // Hermetic: the test's own EXPERTMESH_* settings (flags' env fallbacks) never leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("EXPERTMESH_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", binary.display()));
        let pid = child.id();
        let announced = Arc::new(Mutex::new(None));
        let stdout = child.stdout.take().expect("stdout was piped");
        let mut copy = File::create(&stdout_log).unwrap_or_else(|e| panic!("create {}: {e}", stdout_log.display()));
        let slot = Arc::clone(&announced);
        // Ends at EOF, i.e. when the process exits; never joined (nothing to wait for).
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(copy, "{line}");
                    if let Some(ready) = Ready::parse(&line) {
                        let mut slot = slot.lock().expect("ready slot lock");
                        if slot.is_none() {
                            *slot = Some(ready);
                        }
                    }
                }
            })
            .expect("spawn a stdout reader thread");
        Process {
            name: name.to_string(),
            child: Some(child),
            pid,
            stdout_log,
            stderr_log,
            announced,
            ready: None,
            stopped: false,
            metrics: None,
        }
    }

    /// Records that the process was given `--metrics-listen addr`.
    pub fn with_metrics(mut self, addr: Option<SocketAddr>) -> Process {
        self.metrics = addr;
        self
    }

    /// The `--metrics-listen` address it was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Waits for the ready line; panics (with the log tail) when the process exits first or
    /// `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Ready {
        if let Some(r) = &self.ready {
            return r.clone();
        }
        let what = format!("{}'s ready line", self.name);
        let ready = wait_for(&what, timeout, async || {
            if let Some(r) = self.announced.lock().expect("ready slot lock").clone() {
                return Ok(Ok(r));
            }
            match self.try_exit_status() {
                Some(status) => Ok(Err(status)),
                None => Err(format!("no ready line yet; log tail:\n{}", self.log_tail(15))),
            }
        })
        .await;
        match ready {
            Ok(r) => {
                self.ready = Some(r.clone());
                r
            }
            Err(status) => panic!(
                "{} exited with {status} before announcing ready; its log tail:\n{}",
                self.name,
                self.log_tail(60)
            ),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The ready announcement; panics before [`Process::wait_ready`] succeeded.
    pub fn ready(&self) -> &Ready {
        self.ready.as_ref().unwrap_or_else(|| panic!("{} has not announced ready", self.name))
    }

    pub fn addr(&self) -> SocketAddr {
        self.ready().addr
    }

    pub fn url(&self) -> String {
        self.ready().url()
    }

    pub fn worker_id(&self) -> &str {
        &self.ready().worker_id
    }

    /// Whether the process has not exited (or been killed) yet. A stopped process is alive.
    pub fn is_alive(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Whether the process is alive and not SIGSTOPped by the test.
    pub fn is_serving(&mut self) -> bool {
        !self.stopped && self.is_alive()
    }

    fn try_exit_status(&mut self) -> Option<String> {
        match self.child.as_mut() {
            None => Some("SIGKILL (by the test)".into()),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown status ({e})")),
            },
        }
    }

    /// Sends `signal` (a name `kill` knows: KILL, TERM, STOP, CONT, ...) with the `kill`
    /// command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill -{signal} {}`: {e}", self.pid));
        assert!(status.success(), "`kill -{signal} {}` ({}) failed: {status}", self.pid, self.name);
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes (keeps its sockets, answers nothing, renews no lease).
    pub fn stop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`Process::stop`].
    pub fn cont(&mut self) {
        self.signal("CONT");
        self.stopped = false;
    }

    /// SIGTERM: a graceful shutdown request.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit by itself (e.g. after [`Process::terminate`]).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        let child = self.child.as_mut().unwrap_or_else(|| panic!("{} was already killed", self.name));
        wait_for(&what, timeout, async || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        })
        .await
    }

    /// The last `lines` lines of stderr (the logs), and stdout when it holds more than the
    /// ready line.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = tail(&self.stderr_log, lines);
        let stdout = tail(&self.stdout_log, lines);
        if stdout.lines().any(|l| Ready::parse(l).is_none()) {
            out.push_str("--- stdout ---\n");
            out.push_str(&stdout);
        }
        out
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}
