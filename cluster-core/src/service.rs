//! One service lifecycle for every serving role, and the `main` of every serving binary.
//!
//! [`run`]: serve the role's routes with health and reflection, register the worker, send
//! [`Ready`], then wait for shutdown *or* for the server or a watched worker thread to die;
//! then NOT_SERVING, deregister (bounded), the role's drain (bounded), stop (server, the
//! role's tasks), join the watched threads. A death takes the same path and ends in
//! [`ServiceError::Died`], so a worker whose engine is gone never stays registered.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::StoreConfig;
use crate::actor::Thread;
use crate::ids::{Capacity, ClusterName, IdError, Role, WorkerId, WorkerInfo};
use crate::node::{EtcdArgs, NodeArgs, ProcessArgs};
use crate::registration::{Registration, register};
use crate::serve::{Described, HealthReporter, Ready, ServeError};
use crate::store::{BoxFuture, Store, StoreError};

/// Bound on deregistering at shutdown (the store may be gone by then).
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the server's in-flight calls once it is told to stop, and then on the role's
/// tasks and watched threads finishing.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// After `run` returns, how long `main` lets stray tasks and blocking calls (a model load
/// cut short by a signal) finish before the process exits anyway.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

/// Why a service stopped other than by a requested shutdown, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("worker identity: {0}")]
    Id(#[from] IdError),
    #[error("cannot register the worker: {0}")]
    Register(StoreError),
    #[error("the gRPC server stopped unexpectedly")]
    ServerStopped,
    #[error("the gRPC server task failed: {0}")]
    ServerTask(String),
    /// A watched thread or task ended while the service was serving.
    #[error("{what} {how}")]
    Died { what: String, how: String },
}

/// The listening socket and the identity that follows from it (the default worker id has
/// the bound port in it), known before the role builds its services.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    role: Role,
    worker_id: WorkerId,
    cluster: ClusterName,
    advertise: String,
    lease_ttl: Duration,
}

impl Bound {
    /// Binds `node.listen` (port 0 picks a free port) and names the worker.
    pub async fn bind(node: &NodeArgs, role: Role) -> Result<Bound, ServiceError> {
        let cluster = ClusterName::new(&node.cluster)?;
        let (listener, addr) = crate::serve::bind(&node.listen).await?;
        let worker_id = crate::node::worker_id_or_default(node.worker_id.as_deref(), role, addr.port())?;
        Ok(Bound {
            listener,
            addr,
            role,
            worker_id,
            cluster,
            advertise: node.advertised(addr),
            lease_ttl: node.lease_ttl(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn worker_id(&self) -> &WorkerId {
        &self.worker_id
    }
}

/// The role's drain: lets admitted work finish, returning by the deadline it is given (the
/// lifecycle stops waiting for it then).
pub type Drain = Box<dyn FnOnce(Instant) -> BoxFuture<'static, ()> + Send>;

/// Wraps an async closure as a [`Drain`].
pub fn drain<F, Fut>(f: F) -> Drain
where
    F: FnOnce(Instant) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Box::new(move |deadline| Box::pin(f(deadline)))
}

/// Called once the worker is registered, before the ready line: starts what needs the
/// registration (records attached to its lease).
pub type OnRegistered = Box<dyn FnOnce(Arc<Registration>) + Send>;

/// A thread or task the service cannot work without: if it ends while the service serves,
/// the service shuts down and [`run`] fails naming it.
pub struct Watched {
    what: String,
    /// Resolves when it has ended: `Err` says how (a panic's message).
    ended: BoxFuture<'static, Result<(), String>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("what", &self.what).finish_non_exhaustive()
    }
}

impl Watched {
    /// A compute thread (an actor's, named after it): its end is signalled, then it is
    /// joined, which no longer blocks.
    pub fn thread(mut thread: Thread) -> Watched {
        let what = format!("the {} thread", thread.actor());
        let ended = async move {
            thread.finished().await;
            thread.join().map_err(|panic| format!("panicked: {}", panic.message))
        };
        Watched { what, ended: Box::pin(ended) }
    }

    /// Anything with a completion signal: `ended` resolves when it has ended.
    pub fn ended<F>(what: impl Into<String>, ended: F) -> Watched
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        Watched { what: what.into(), ended: Box::pin(ended) }
    }
}

/// What differs between roles. The role creates `tracker` and `stop` before it starts its
/// tasks (model loading, store watches, samplers); the lifecycle cancels `stop` after the
/// drain and then waits for `tracker`.
pub struct Service {
    pub store: Arc<dyn Store>,
    pub routes: Routes,
    pub described: Described<'static>,
    pub capacity: Capacity,
    /// The model name registered with the worker.
    pub model: String,
    pub tracker: TaskTracker,
    pub stop: CancellationToken,
    pub watched: Vec<Watched>,
    pub on_registered: Option<OnRegistered>,
    pub drain: Drain,
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("services", &self.described.services)
            .field("watched", &self.watched)
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

/// How serving ended, before the teardown.
enum Ended {
    Shutdown,
    Failed(ServiceError),
}

/// Runs one service from the bound socket to the end: see the module docs for the order.
/// Returns `Ok` after a requested shutdown (`shutdown` cancelled), an error when the server
/// or a watched thread died (after the same teardown) or the worker could not register.
pub async fn run(
    bound: Bound,
    service: Service,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Ready>,
) -> Result<(), ServiceError> {
    let Bound { listener, addr, role, worker_id, cluster, advertise, lease_ttl } = bound;
    let Service {
        store,
        routes,
        described,
        capacity,
        model,
        tracker,
        stop,
        watched,
        on_registered,
        drain,
        drain_timeout,
    } = service;
    let (health_tx, health_rx) = oneshot::channel();
    let mut server = tracker.spawn(crate::serve::serve(
        listener,
        routes,
        described,
        move |reporter| {
            let _ = health_tx.send(reporter);
        },
        stop.clone(),
    ));
    let mut deaths = JoinSet::new();
    for Watched { what, ended } in watched {
        deaths.spawn(async move { (what, ended.await) });
    }

    let mut health: Option<HealthReporter> = None;
    let mut registration: Option<Arc<Registration>> = None;
    let mut server_done = false;
    let ended = async {
        let Ok(reporter) = health_rx.await else {
            server_done = true;
            return Ended::Failed(server_exit((&mut server).await));
        };
        set_status(&reporter, described.services, ServingStatus::Serving).await;
        health = Some(reporter);
        let info = WorkerInfo {
            id: worker_id.clone(),
            role,
            address: advertise,
            capacity,
            model,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // The store may be slow to answer (etcd starting): a shutdown or a death meanwhile wins.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ended::Shutdown,
            registered = register(store, &cluster, info, lease_ttl, &tracker, &stop) => match registered {
                Ok(r) => registration = Some(Arc::new(r)),
                Err(e) => return Ended::Failed(ServiceError::Register(e)),
            },
            exit = &mut server => {
                server_done = true;
                return Ended::Failed(server_exit(exit));
            }
            Some(death) = deaths.join_next() => return Ended::Failed(died(death)),
        }
        if let (Some(hook), Some(r)) = (on_registered, &registration) {
            hook(r.clone());
        }
        tracing::info!(role = role.as_str(), %worker_id, %addr, "service_ready");
        let _ = ready.send(Ready { role, worker_id: worker_id.clone(), addr });
        tokio::select! {
            _ = shutdown.cancelled() => Ended::Shutdown,
            exit = &mut server => {
                server_done = true;
                Ended::Failed(server_exit(exit))
            }
            Some(death) = deaths.join_next() => Ended::Failed(died(death)),
        }
    }
    .await;

    let mut result = match ended {
        Ended::Shutdown => {
            tracing::info!(role = role.as_str(), "service_draining");
            Ok(())
        }
        Ended::Failed(error) => {
            tracing::error!(role = role.as_str(), %error, "service_failed");
            Err(error)
        }
    };
    if let Some(reporter) = &health {
        set_status(reporter, described.services, ServingStatus::NotServing).await;
    }
    if let Some(registration) = registration {
        match tokio::time::timeout(DEREGISTER_TIMEOUT, registration.deregister()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "deregister_failed"),
            Err(_) => tracing::warn!(timeout_ms = DEREGISTER_TIMEOUT.as_millis() as u64, "deregister_timed_out"),
        }
    }
    let deadline = Instant::now() + drain_timeout;
    if tokio::time::timeout_at(deadline, drain(deadline)).await.is_err() {
        tracing::warn!(timeout_ms = drain_timeout.as_millis() as u64, "drain_deadline_passed");
    }
    stop.cancel();
    if !server_done {
        // In-flight calls finish first; one that never ends does not hold the process.
        match tokio::time::timeout(JOIN_TIMEOUT, &mut server).await {
            Ok(exit) if result.is_ok() && !matches!(exit, Ok(Ok(()))) => result = Err(server_exit(exit)),
            Ok(_) => {}
            Err(_) => {
                tracing::error!(timeout_ms = JOIN_TIMEOUT.as_millis() as u64, "server_stop_timed_out");
                server.abort();
            }
        }
    }
    tracker.close();
    let joined = async {
        tracker.wait().await;
        // While stopping, a watched thread ending is expected; a panic is still worth a line.
        while let Some(ended) = deaths.join_next().await {
            if let ServiceError::Died { what, how } = died(ended)
                && how.starts_with("panicked")
            {
                tracing::error!(%what, %how, "watched_thread_panicked_while_stopping");
            }
        }
    };
    if tokio::time::timeout(JOIN_TIMEOUT, joined).await.is_err() {
        // A task or thread that ignores the stop: the process exits without it.
        tracing::error!(tasks = tracker.len(), threads = deaths.len(), "service_stop_timed_out");
    }
    tracing::info!(role = role.as_str(), "service_stopped");
    result
}

/// Marks every described service (the whole-server entry `""` stays as it is, so liveness
/// probes on it are not failed by a drain).
async fn set_status(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    for name in services {
        reporter.set_service_status(*name, status).await;
    }
}

fn server_exit(exit: Result<Result<(), ServeError>, tokio::task::JoinError>) -> ServiceError {
    match exit {
        Ok(Ok(())) => ServiceError::ServerStopped,
        Ok(Err(e)) => ServiceError::Serve(e),
        Err(e) => ServiceError::ServerTask(e.to_string()),
    }
}

/// A watched item that ended: always an error while serving, whatever its result.
fn died(ended: Result<(String, Result<(), String>), tokio::task::JoinError>) -> ServiceError {
    match ended {
        Ok((what, Ok(()))) => ServiceError::Died { what, how: "stopped unexpectedly".into() },
        Ok((what, Err(how))) => ServiceError::Died { what, how },
        Err(e) => ServiceError::Died { what: "a watched task".into(), how: e.to_string() },
    }
}

/// How a serving binary names itself in `--help`.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    pub name: &'static str,
    pub about: &'static str,
}

/// Every serving binary's command line: the role's flags, `--etcd`, and the process flags.
#[derive(Debug, clap::Parser)]
struct Cli<C: clap::Args> {
    #[command(flatten)]
    config: C,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    process: ProcessArgs,
}

/// The whole `main` of a serving binary: parses its flags (`--check-config` prints them and
/// exits), installs logging, trace export and metrics, cancels on SIGINT/SIGTERM, prints
/// the ready line once `run` sends [`Ready`], and turns `run`'s result into the exit status
/// (an error and its causes on stderr).
pub fn main<C, F, Fut, E>(binary: Binary, run: F) -> std::process::ExitCode
where
    C: clap::Args + std::fmt::Debug,
    F: FnOnce(C, StoreConfig, CancellationToken, oneshot::Sender<Ready>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use clap::{CommandFactory, FromArgMatches};
    // Every crate of the workspace shares one version.
    let command = Cli::<C>::command().name(binary.name).about(binary.about).version(env!("CARGO_PKG_VERSION"));
    let cli = match Cli::<C>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return crate::node::exit_code(Err(format!("cannot start the async runtime: {e}"))),
    };
    let code = runtime.block_on(async {
        let _tracing = match cli.process.start(binary.name, &cli) {
            Ok(guard) => guard,
            Err(code) => return code,
        };
        let shutdown = CancellationToken::new();
        crate::serve::cancel_on_signal(shutdown.clone());
        let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
        let announce = async {
            if let Ok(ready) = ready_rx.await {
                crate::serve::announce_ready(&ready);
            }
        };
        let Cli { config, etcd, .. } = cli;
        let (result, ()) = tokio::join!(run(config, etcd.store_config(), shutdown, ready_tx), announce);
        crate::node::exit_code(result)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}
