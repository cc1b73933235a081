//! A whole cluster as separate processes: its own etcd, prefill and decode workers, and a
//! router, all on 127.0.0.1 with ports picked by the kernel, under a cluster name no other
//! test uses. On a failing test (panic) the logs' tails are printed and the log directory is
//! kept.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use placement::{CurrentPlacement, LoadReport, PlacementSpec};
use proto::expert::expert_client::ExpertClient;
use proto::expert::{ExpertLoad, ExpertLoadRequest, SlotsRequest};
use proto::internal::decode_client::DecodeClient;
use proto::internal::prefill_client::PrefillClient;
use proto::internal::{LoadRequest, WorkerLoad};
use proto::v1::generation_client::GenerationClient;
use tempfile::TempDir;
use tokio::sync::{Semaphore, SemaphorePermit};
use tonic::transport::Channel;

use crate::binaries::{self, CONTROLLER, DECODE_WORKER, EXPERT_WORKER, PREFILL_WORKER, ROUTER};
use crate::etcd::Etcd;
use crate::grpc::{BOS, connect, generation_client, ids_request};
use crate::process::Process;
use crate::wait::{wait_for, wait_until};

/// Longest a process may take to print its ready line (loads the model on 2 busy cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest one `GetLoad` may take (a frozen worker never answers).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Clusters of one test binary run one at a time: tests of a file run on parallel threads,
/// and two clusters on 2 cores would starve each other's lease renewals and timers.
static CLUSTER_SLOT: Semaphore = Semaphore::const_new(1);

/// Worker role, as in the store's key layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    Expert,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Expert => "expert",
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub prefill: usize,
    pub decode: usize,
    /// Expert workers; when > 0, prefill and decode workers get `--remote-experts`. Without
    /// controllers worker i hosts `--shard i/N`; with them they start empty and follow the
    /// controller's placement.
    pub expert: usize,
    /// Expert placement controllers (`expert-controller`; one leads, the others stand by).
    pub controllers: usize,
    pub controller_args: Vec<String>,
    /// Start the controllers, and wait for a leader, before the expert workers (which then
    /// start together under a running controller); by default they start after them.
    pub controllers_first: bool,
    pub expert_args: Vec<String>,
    /// Extra router flags (e.g. `--max-retries 3`).
    pub router_args: Vec<String>,
    pub prefill_args: Vec<String>,
    pub decode_args: Vec<String>,
    /// `--lease-ttl-ms` of every worker.
    pub lease_ttl: Duration,
    /// Extra environment of every process.
    pub env: Vec<(String, String)>,
    /// Wait until a short request succeeds before returning (off for clusters that
    /// cannot serve, e.g. without workers).
    pub wait_serving: bool,
    /// Give every process `--metrics-listen` on a free port ([`Cluster::metrics_addr`]).
    pub metrics: bool,
}

impl ClusterSpec {
    pub fn new(prefill: usize, decode: usize) -> ClusterSpec {
        ClusterSpec {
            prefill,
            decode,
            expert: 0,
            controllers: 0,
            controller_args: Vec::new(),
            controllers_first: false,
            expert_args: Vec::new(),
            router_args: Vec::new(),
            prefill_args: Vec::new(),
            decode_args: Vec::new(),
            lease_ttl: Duration::from_secs(3),
            env: Vec::new(),
            wait_serving: true,
            metrics: false,
        }
    }

    /// Adds `n` expert workers and runs prefill and decode with remote experts.
    pub fn experts(mut self, n: usize) -> ClusterSpec {
        self.expert = n;
        self
    }

    /// Adds `n` expert placement controllers with `args`.
    pub fn controllers(mut self, n: usize, args: &[&str]) -> ClusterSpec {
        self.controllers = n;
        self.controller_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn controller_args(mut self, args: &[&str]) -> ClusterSpec {
        self.controller_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Starts the controllers (and waits for a leader) before the expert workers.
    pub fn controllers_first(mut self) -> ClusterSpec {
        self.controllers_first = true;
        self
    }

    /// Serves Prometheus metrics from every process.
    pub fn with_metrics(mut self) -> ClusterSpec {
        self.metrics = true;
        self
    }

    pub fn expert_args(mut self, args: &[&str]) -> ClusterSpec {
        self.expert_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn lease_ttl(mut self, ttl: Duration) -> ClusterSpec {
        self.lease_ttl = ttl;
        self
    }

    pub fn router_args(mut self, args: &[&str]) -> ClusterSpec {
        self.router_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn decode_args(mut self, args: &[&str]) -> ClusterSpec {
        self.decode_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn prefill_args(mut self, args: &[&str]) -> ClusterSpec {
        self.prefill_args.extend(args.iter().map(|a| a.to_string()));
        self
    }
}

/// A running cluster. Dropping it kills every process and etcd.
#[derive(Debug)]
pub struct Cluster {
    // Processes are declared (so dropped) before the directory holding their logs.
    pub router: Process,
    pub prefill: Vec<Process>,
    pub decode: Vec<Process>,
    pub expert: Vec<Process>,
    /// Controllers print no ready line: wait on [`Cluster::wait_leader`].
    pub controllers: Vec<Process>,
    pub etcd: Etcd,
    name: String,
    spec: ClusterSpec,
    dir: Option<TempDir>,
    _slot: SemaphorePermit<'static>,
}

impl Cluster {
    /// Starts etcd, the workers (in parallel), then the router; waits until every worker is
    /// in etcd and (unless `spec.wait_serving` is off) a short request succeeds.
    /// `test` names the cluster (made unique).
    pub async fn start(test: &str, spec: ClusterSpec) -> Cluster {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        let slot = CLUSTER_SLOT.acquire().await.expect("the cluster semaphore is never closed");
        binaries::ensure_model().await;
        let name = format!("{test}-{}-{}", std::process::id(), SERIAL.fetch_add(1, Ordering::SeqCst));
        let dir =
            tempfile::Builder::new().prefix(&format!("cluster-tests-{test}-")).tempdir().expect("cluster temp dir");
        let etcd = Etcd::start().await;
        let env = env(&spec);
        let endpoint = etcd.endpoint();
        let spawn = |role: Role, index: usize| {
            let launch = Launch { role, index, binary: role_binary(role), args: &[] };
            spawn_worker(&name, &endpoint, &spec, &env, dir.path(), launch)
        };
        let spawn_controllers = || -> Vec<Process> {
            (0..spec.controllers).map(|i| spawn_controller(&name, &endpoint, &spec, &env, dir.path(), i)).collect()
        };
        let mut controllers = Vec::new();
        if spec.controllers_first {
            controllers = spawn_controllers();
            wait_for_leader(&etcd, &name, READY_TIMEOUT).await;
        }
        // Expert workers before attention workers: those look them up on their first batch.
        let mut expert: Vec<Process> = (0..spec.expert).map(|i| spawn(Role::Expert, i)).collect();
        for p in expert.iter_mut() {
            p.wait_ready(READY_TIMEOUT).await;
        }
        if !spec.controllers_first {
            controllers = spawn_controllers();
        }
        let mut prefill: Vec<Process> = (0..spec.prefill).map(|i| spawn(Role::Prefill, i)).collect();
        let mut decode: Vec<Process> = (0..spec.decode).map(|i| spawn(Role::Decode, i)).collect();
        for p in prefill.iter_mut().chain(decode.iter_mut()) {
            p.wait_ready(READY_TIMEOUT).await;
        }
        let mut args = common_args(&name, &endpoint);
        args.extend(spec.router_args.iter().cloned());
        let metrics = metrics_args(&spec, &mut args);
        let mut router =
            Process::spawn("router", &binaries::binary(ROUTER), &args, &env, dir.path()).with_metrics(metrics);
        router.wait_ready(READY_TIMEOUT).await;
        let cluster =
            Cluster { router, prefill, decode, expert, controllers, etcd, name, spec, dir: Some(dir), _slot: slot };
        cluster.wait_registered(Role::Prefill, cluster.worker_ids(Role::Prefill), READY_TIMEOUT).await;
        cluster.wait_registered(Role::Decode, cluster.worker_ids(Role::Decode), READY_TIMEOUT).await;
        cluster.wait_registered(Role::Expert, cluster.worker_ids(Role::Expert), READY_TIMEOUT).await;
        if cluster.spec.controllers > 0 {
            cluster.wait_leader(READY_TIMEOUT).await;
        }
        if cluster.spec.wait_serving {
            cluster.wait_serving(READY_TIMEOUT).await;
        }
        cluster
    }

    fn log_dir(&self) -> &Path {
        self.dir.as_ref().expect("the directory is kept until drop").path()
    }

    /// Starts one more worker of `role` and waits for its ready line; returns its index.
    pub async fn add_worker(&mut self, role: Role) -> usize {
        self.add_worker_from(role, role_binary(role), &[]).await
    }

    /// Like [`Cluster::add_worker`], from `binary` (the role's binary or a variant that takes
    /// the same flags) with `args` added to the role's flags.
    pub async fn add_worker_from(&mut self, role: Role, binary: &str, args: &[&str]) -> usize {
        let index = self.workers(role).len();
        let endpoint = self.etcd.endpoint();
        let (spec, env) = (&self.spec, env(&self.spec));
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let launch = Launch { role, index, binary, args: &args };
        let mut p = spawn_worker(&self.name, &endpoint, spec, &env, self.log_dir(), launch);
        p.wait_ready(READY_TIMEOUT).await;
        let list = match role {
            Role::Prefill => &mut self.prefill,
            Role::Decode => &mut self.decode,
            Role::Expert => &mut self.expert,
        };
        list.push(p);
        list.len() - 1
    }

    /// The cluster name (`--cluster`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn router_url(&self) -> String {
        self.router.url()
    }

    /// A new client of the router's public API.
    pub async fn client(&self) -> GenerationClient<Channel> {
        generation_client(&self.router_url()).await
    }

    /// The processes the test started for `role` (killed ones included).
    pub fn workers(&self, role: Role) -> &[Process] {
        match role {
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
            Role::Expert => &self.expert,
        }
    }

    /// Worker ids the test started for `role` (killed ones included).
    pub fn worker_ids(&self, role: Role) -> BTreeSet<String> {
        self.workers(role).iter().map(|p| p.name().to_string()).collect()
    }

    /// A client of expert worker `i`'s Expert service.
    pub async fn expert_client(&self, i: usize) -> Result<ExpertClient<Channel>, String> {
        Ok(ExpertClient::new(connect(&self.expert[i].url()).await.map_err(|e| e.to_string())?))
    }

    /// `GetLoad` of expert worker `i` (bounded by [`LOAD_TIMEOUT`]).
    pub async fn expert_load(&self, i: usize) -> Result<ExpertLoad, String> {
        let call = async {
            let mut client = self.expert_client(i).await?;
            client.get_load(ExpertLoadRequest {}).await.map(tonic::Response::into_inner).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(LOAD_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("GetLoad did not answer within {LOAD_TIMEOUT:?}")),
        }
    }

    /// `GetSlots` of expert worker `i`: its hosted (layer, expert) pairs.
    pub async fn expert_slots(&self, i: usize) -> Result<Vec<(u32, u32)>, String> {
        let mut client = self.expert_client(i).await?;
        let slots = client.get_slots(SlotsRequest {}).await.map_err(|e| e.to_string())?.into_inner();
        Ok(slots.slots.into_iter().map(|s| (s.layer, s.expert)).collect())
    }

    /// `/expertmesh/<cluster>/workers/<role>/`
    pub fn role_prefix(&self, role: Role) -> String {
        format!("/expertmesh/{}/workers/{}/", self.name, role.as_str())
    }

    /// Worker ids registered in etcd under `role` (an error while etcd is down).
    pub async fn registered(&self, role: Role) -> Result<BTreeSet<String>, String> {
        let prefix = self.role_prefix(role);
        let kvs = self.etcd.get_prefix(&prefix).await?;
        Ok(kvs.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect())
    }

    /// Waits until exactly `ids` are registered under `role`.
    pub async fn wait_registered(&self, role: Role, ids: BTreeSet<String>, timeout: Duration) {
        let what = format!("etcd to list exactly {ids:?} under {}", self.role_prefix(role));
        wait_for(&what, timeout, async || match self.registered(role).await {
            Ok(now) if now == ids => Ok(()),
            Ok(now) => Err(format!("registered: {now:?}")),
            Err(e) => Err(e),
        })
        .await;
    }

    /// Waits until a two-token request through the router succeeds (the router sees a
    /// prefill and a decode worker).
    pub async fn wait_serving(&self, timeout: Duration) {
        let url = self.router_url();
        wait_for("the router to serve a two-token request", timeout, async || {
            let channel = connect(&url).await.map_err(|e| e.to_string())?;
            let mut client = GenerationClient::new(channel);
            // Two tokens: the smallest request that does not depend on max_new_tokens 1
            // (an edge case tested on its own).
            let mut request = tonic::Request::new(ids_request(&[BOS, 72, 105], 2));
            request.set_timeout(Duration::from_secs(10));
            client.generate_unary(request).await.map(|_| ()).map_err(|e| format!("{:?}: {}", e.code(), e.message()))
        })
        .await;
    }

    /// A client of prefill worker `i`'s internal service.
    pub async fn prefill_client(&self, i: usize) -> Result<PrefillClient<Channel>, String> {
        Ok(PrefillClient::new(connect(&self.prefill[i].url()).await.map_err(|e| e.to_string())?))
    }

    /// A client of decode worker `i`'s internal service.
    pub async fn decode_client(&self, i: usize) -> Result<DecodeClient<Channel>, String> {
        Ok(DecodeClient::new(connect(&self.decode[i].url()).await.map_err(|e| e.to_string())?))
    }

    /// `GetLoad` of prefill worker `i` (bounded by [`LOAD_TIMEOUT`]).
    pub async fn prefill_load(&self, i: usize) -> Result<WorkerLoad, String> {
        bounded_load(async {
            let mut client = self.prefill_client(i).await?;
            client.get_load(LoadRequest {}).await.map(tonic::Response::into_inner).map_err(|e| e.to_string())
        })
        .await
    }

    /// `GetLoad` of decode worker `i` (bounded by [`LOAD_TIMEOUT`]).
    pub async fn decode_load(&self, i: usize) -> Result<WorkerLoad, String> {
        bounded_load(async {
            let mut client = self.decode_client(i).await?;
            client.get_load(LoadRequest {}).await.map(tonic::Response::into_inner).map_err(|e| e.to_string())
        })
        .await
    }

    /// A line per worker with its load (for logs and failure messages).
    pub async fn describe_loads(&mut self) -> String {
        let mut out = Vec::new();
        for i in 0..self.prefill.len() {
            let load =
                if self.prefill[i].is_serving() { self.prefill_load(i).await } else { Err("not serving".into()) };
            out.push(format!("prefill-{i}: {}", fmt_load(&load)));
        }
        for i in 0..self.decode.len() {
            let load = if self.decode[i].is_serving() { self.decode_load(i).await } else { Err("not serving".into()) };
            out.push(format!("decode-{i}: {}", fmt_load(&load)));
        }
        out.join("\n")
    }

    /// Waits until every serving worker is idle: decode workers run and hold nothing
    /// (running 0, waiting 0, every block free), prefill workers have nothing queued or
    /// running and every block free.
    pub async fn wait_idle(&mut self, timeout: Duration) {
        let prefill: Vec<usize> = (0..self.prefill.len()).filter(|&i| self.prefill[i].is_serving()).collect();
        let decode: Vec<usize> = (0..self.decode.len()).filter(|&i| self.decode[i].is_serving()).collect();
        let this = &*self;
        wait_for("every worker to be idle (nothing running or waiting, every block free)", timeout, async || {
            let mut busy = Vec::new();
            for &i in &prefill {
                match this.prefill_load(i).await {
                    Ok(l) if is_idle(&l) => {}
                    other => busy.push(format!("prefill-{i}: {}", fmt_load(&other))),
                }
            }
            for &i in &decode {
                match this.decode_load(i).await {
                    Ok(l) if is_idle(&l) => {}
                    other => busy.push(format!("decode-{i}: {}", fmt_load(&other))),
                }
            }
            if busy.is_empty() { Ok(()) } else { Err(busy.join("; ")) }
        })
        .await;
    }

    /// Waits until worker `worker_id` of `role` is no longer registered in etcd.
    pub async fn wait_deregistered(&self, role: Role, worker_id: &str, timeout: Duration) {
        let what = format!("{worker_id}'s key to leave {}", self.role_prefix(role));
        wait_until(&what, timeout, async || self.registered(role).await.is_ok_and(|ids| !ids.contains(worker_id)))
            .await;
    }

    /// The controller holding leadership (the election key's value).
    pub async fn leader(&self) -> Result<Option<String>, String> {
        leader(&self.etcd, &self.name).await
    }

    /// Waits until some controller leads; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> String {
        wait_for_leader(&self.etcd, &self.name, timeout).await
    }

    /// The current placement spec, if any.
    pub async fn placement(&self) -> Result<Option<PlacementSpec>, String> {
        let prefix = format!("/expertmesh/{}/placement/", self.name);
        let kvs = self.etcd.get_prefix(&prefix).await?;
        let get = |key: String| kvs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
        let Some(current) = get(format!("{prefix}current")) else { return Ok(None) };
        let current: CurrentPlacement =
            serde_json::from_slice(&current).map_err(|e| format!("placement/current: {e}"))?;
        let spec = get(format!("{prefix}{}/spec", current.version.0))
            .ok_or_else(|| format!("placement {} has no spec", current.version.0))?;
        let spec: PlacementSpec = serde_json::from_slice(&spec).map_err(|e| format!("spec: {e}"))?;
        Ok(Some(spec))
    }

    /// Waits until the current placement satisfies `pred`; returns it.
    pub async fn wait_placement(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&PlacementSpec) -> bool,
    ) -> PlacementSpec {
        wait_for(what, timeout, async || match self.placement().await {
            Ok(Some(spec)) if pred(&spec) => Ok(spec),
            Ok(Some(spec)) => Err(format!("current: version {} ({})", spec.version.0, spec.reason)),
            Ok(None) => Err("no placement".into()),
            Err(e) => Err(e),
        })
        .await
    }

    /// Every expert worker's load report in etcd.
    pub async fn load_reports(&self) -> Result<Vec<LoadReport>, String> {
        let kvs = self.etcd.get_prefix(&format!("/expertmesh/{}/load/", self.name)).await?;
        kvs.iter().map(|(k, v)| serde_json::from_slice(v).map_err(|e| format!("{k}: {e}"))).collect()
    }

    /// Log tails of every process and of etcd.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in std::iter::once(&self.router)
            .chain(&self.prefill)
            .chain(&self.decode)
            .chain(&self.expert)
            .chain(&self.controllers)
        {
            out.push_str(&format!("===== {} (pid {}) =====\n{}", p.name(), p.pid(), p.log_tail(lines)));
        }
        out.push_str(&format!("===== etcd =====\n{}", self.etcd.log_tail(lines / 2)));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- cluster {} failed; log tails ----\n{}", self.name, self.log_tails(30));
            if let Some(dir) = self.dir.take() {
                eprintln!("---- full logs kept in {} ----", dir.keep().display());
            }
        }
    }
}

async fn leader(etcd: &Etcd, cluster: &str) -> Result<Option<String>, String> {
    let key = format!("/expertmesh/{cluster}/controller/leader");
    let kvs = etcd.get_prefix(&key).await?;
    Ok(kvs.into_iter().find(|(k, _)| *k == key).map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
}

async fn wait_for_leader(etcd: &Etcd, cluster: &str, timeout: Duration) -> String {
    wait_for("a controller to lead", timeout, async || match leader(etcd, cluster).await {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err("no leader key".into()),
        Err(e) => Err(e),
    })
    .await
}

fn env(spec: &ClusterSpec) -> Vec<(String, String)> {
    let mut env = binaries::base_env();
    env.extend(spec.env.iter().cloned());
    env
}

fn common_args(cluster: &str, etcd: &str) -> Vec<String> {
    ["--etcd", etcd, "--cluster", cluster, "--listen", "127.0.0.1:0"].map(String::from).to_vec()
}

/// The binary a worker of `role` runs.
fn role_binary(role: Role) -> &'static str {
    match role {
        Role::Prefill => PREFILL_WORKER,
        Role::Decode => DECODE_WORKER,
        Role::Expert => EXPERT_WORKER,
    }
}

/// Which worker to start: `<role>-<index>`, from `binary`, with `args` after the spec's
/// flags for the role.
struct Launch<'a> {
    role: Role,
    index: usize,
    binary: &'a str,
    args: &'a [String],
}

/// Spawns a worker (not waited for).
fn spawn_worker(
    cluster: &str,
    etcd: &str,
    spec: &ClusterSpec,
    env: &[(String, String)],
    log_dir: &Path,
    launch: Launch<'_>,
) -> Process {
    let Launch { role, index, binary, args: more } = launch;
    let id = format!("{}-{index}", role.as_str());
    let mut args = common_args(cluster, etcd);
    args.extend(["--worker-id".into(), id.clone(), "--lease-ttl-ms".into(), spec.lease_ttl.as_millis().to_string()]);
    let extra = match role {
        Role::Prefill => &spec.prefill_args,
        Role::Decode => &spec.decode_args,
        Role::Expert => &Vec::new(),
    };
    args.extend(extra.iter().cloned());
    args.extend(more.iter().cloned());
    match role {
        Role::Expert => {
            args.extend(spec.expert_args.iter().cloned());
            if spec.controllers == 0 {
                args.extend(["--shard".into(), format!("{index}/{}", spec.expert)]);
            }
        }
        Role::Prefill | Role::Decode if spec.expert > 0 => args.push("--remote-experts".into()),
        Role::Prefill | Role::Decode => {}
    }
    let metrics = metrics_args(spec, &mut args);
    Process::spawn(&id, &binaries::binary(binary), &args, env, log_dir).with_metrics(metrics)
}

/// Spawns controller `controller-<index>` (not waited for).
fn spawn_controller(
    cluster: &str,
    etcd: &str,
    spec: &ClusterSpec,
    env: &[(String, String)],
    log_dir: &Path,
    index: usize,
) -> Process {
    let id = format!("controller-{index}");
    let mut args: Vec<String> =
        ["--etcd", etcd, "--cluster", cluster, "--controller-id", &id].map(String::from).to_vec();
    args.extend(spec.controller_args.iter().cloned());
    let metrics = metrics_args(spec, &mut args);
    Process::spawn(&id, &binaries::binary(CONTROLLER), &args, env, log_dir).with_metrics(metrics)
}

/// With `spec.metrics`, adds `--metrics-listen` on a free loopback port to `args`.
fn metrics_args(spec: &ClusterSpec, args: &mut Vec<String>) -> Option<SocketAddr> {
    if !spec.metrics {
        return None;
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port");
    args.extend(["--metrics-listen".into(), addr.to_string()]);
    Some(addr)
}

/// `GET /metrics` of a process's Prometheus endpoint.
pub async fn scrape(addr: SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.map_err(|e| e.to_string())?;
        match body.split_once("\r\n\r\n") {
            Some((head, text)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => Ok(text.to_string()),
            _ => Err(format!("unexpected answer from {addr}: {}", body.lines().next().unwrap_or(""))),
        }
    };
    tokio::time::timeout(LOAD_TIMEOUT, call).await.unwrap_or_else(|_| Err(format!("{addr} did not answer")))
}

async fn bounded_load(call: impl Future<Output = Result<WorkerLoad, String>>) -> Result<WorkerLoad, String> {
    match tokio::time::timeout(LOAD_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("GetLoad did not answer within {LOAD_TIMEOUT:?}")),
    }
}

/// Nothing running or waiting and every block free.
pub fn is_idle(l: &WorkerLoad) -> bool {
    l.running_sequences == 0 && l.waiting_sequences == 0 && l.free_blocks == l.total_blocks
}

fn fmt_load(load: &Result<WorkerLoad, String>) -> String {
    match load {
        Ok(l) => format!(
            "running {} waiting {} queued_tokens {} free {}/{} blocks",
            l.running_sequences, l.waiting_sequences, l.queued_tokens, l.free_blocks, l.total_blocks
        ),
        Err(e) => format!("error: {e}"),
    }
}
