//! The service lifecycle (`cluster_core::service::run`) on a real gRPC server, a real health
//! service and the in-memory store: the order of the shutdown steps, and a watched thread
//! whose death takes the service down instead of leaving it registered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_core::actor;
use cluster_core::node::NodeArgs;
use cluster_core::serve::{Described, Ready};
use cluster_core::service::{Bound, Service, ServiceError, Watched};
use cluster_core::{Capacity, ClusterName, MemoryStore, Role, Store, WorkerId, keys};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICE: &str = "expertmesh.test.v1.Lifecycle";
const WAIT: Duration = Duration::from_secs(20);

fn node(id: &str) -> NodeArgs {
    NodeArgs {
        cluster: "lifecycle".into(),
        listen: "127.0.0.1:0".into(),
        advertise: None,
        worker_id: Some(id.into()),
        // Longer than any test: a key that goes away was deregistered, not expired.
        lease_ttl_ms: 600_000,
    }
}

fn worker_key(id: &str) -> String {
    let cluster = ClusterName::new("lifecycle").expect("valid");
    keys::worker_key(&cluster, Role::Decode, &WorkerId::new(id).expect("valid"))
}

/// What the drain saw when it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AtDrain {
    registered: bool,
    health: Option<ServingStatus>,
}

async fn health(addr: std::net::SocketAddr) -> Option<ServingStatus> {
    let channel = cluster_core::serve::channel(&addr.to_string(), Duration::from_secs(5)).ok()?;
    let mut client = HealthClient::new(channel);
    let reply = client.check(HealthCheckRequest { service: SERVICE.into() }).await.ok()?.into_inner();
    ServingStatus::try_from(reply.status).ok()
}

/// A service whose drain records what it sees into `seen`.
fn service(
    store: &MemoryStore,
    id: &str,
    watched: Vec<Watched>,
    seen: Arc<Mutex<Vec<AtDrain>>>,
    addr: std::net::SocketAddr,
) -> Service {
    let (store_view, key) = (store.clone(), worker_key(id));
    let drain = cluster_core::service::drain(move |_deadline| async move {
        let registered = store_view.get(&key).await.expect("the memory store answers").is_some();
        let health = health(addr).await;
        seen.lock().expect("not poisoned").push(AtDrain { registered, health });
    });
    Service {
        store: Arc::new(store.clone()),
        routes: tonic::service::Routes::default(),
        described: Described { descriptor_set: tonic_health::pb::FILE_DESCRIPTOR_SET, services: &[SERVICE] },
        capacity: Capacity::default(),
        model: "test-model".into(),
        tracker: TaskTracker::new(),
        stop: CancellationToken::new(),
        watched,
        on_registered: None,
        drain,
        drain_timeout: WAIT,
    }
}

type Running = tokio::task::JoinHandle<Result<(), ServiceError>>;

async fn start(
    store: &MemoryStore,
    id: &str,
    watched: Vec<Watched>,
    shutdown: &CancellationToken,
) -> (Running, Ready, Arc<Mutex<Vec<AtDrain>>>) {
    let bound = Bound::bind(&node(id), Role::Decode).await.expect("binds");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = service(store, id, watched, seen.clone(), bound.addr());
    let (ready_tx, ready_rx) = oneshot::channel();
    let running = tokio::spawn(cluster_core::service::run(bound, service, shutdown.clone(), ready_tx));
    let ready = tokio::time::timeout(WAIT, ready_rx).await.expect("ready in time").expect("ready sent");
    (running, ready, seen)
}

#[tokio::test]
async fn shutdown_is_not_serving_and_deregistered_before_the_drain() {
    let store = MemoryStore::new();
    let shutdown = CancellationToken::new();
    let (running, ready, seen) = start(&store, "w-shutdown", Vec::new(), &shutdown).await;
    assert_eq!(ready.role, Role::Decode);
    assert_eq!(ready.worker_id.as_str(), "w-shutdown");
    assert!(store.get(&worker_key("w-shutdown")).await.expect("get").is_some(), "registered once ready");
    assert_eq!(health(ready.addr).await, Some(ServingStatus::Serving));

    shutdown.cancel();
    let result = tokio::time::timeout(WAIT, running).await.expect("stops in time").expect("run task");
    assert!(result.is_ok(), "a requested shutdown ends well: {result:?}");
    let seen = seen.lock().expect("not poisoned").clone();
    assert_eq!(seen, vec![AtDrain { registered: false, health: Some(ServingStatus::NotServing) }]);
    assert!(store.get(&worker_key("w-shutdown")).await.expect("get").is_none());
    assert!(health(ready.addr).await.is_none(), "the server has stopped");
}

#[tokio::test]
async fn a_watched_thread_that_dies_takes_the_service_down() {
    let store = MemoryStore::new();
    let shutdown = CancellationToken::new();
    let (die, dying) = std::sync::mpsc::channel::<()>();
    let (_handle, thread) = actor::spawn::<(), (), _>("test engine", 1, (), move |_mailbox, _load| {
        let _ = dying.recv();
        panic!("the engine broke");
    })
    .expect("the thread starts");
    let watched = vec![Watched::thread(thread)];
    let (running, ready, seen) = start(&store, "w-death", watched, &shutdown).await;
    assert!(store.get(&worker_key("w-death")).await.expect("get").is_some());

    die.send(()).expect("the thread waits");
    let result = tokio::time::timeout(WAIT, running).await.expect("stops in time").expect("run task");
    match result {
        Err(ServiceError::Died { what, how }) => {
            assert_eq!(what, "the test engine thread");
            assert_eq!(how, "panicked: the engine broke");
        }
        other => panic!("expected Died, got {other:?}"),
    }
    assert!(!shutdown.is_cancelled(), "nobody asked for a shutdown");
    let seen = seen.lock().expect("not poisoned").clone();
    assert_eq!(seen, vec![AtDrain { registered: false, health: Some(ServingStatus::NotServing) }]);
    assert!(store.get(&worker_key("w-death")).await.expect("get").is_none(), "deregistered");
    assert!(health(ready.addr).await.is_none(), "the server has stopped");
}

#[tokio::test]
async fn a_watched_future_that_ends_is_a_death_too() {
    let store = MemoryStore::new();
    let shutdown = CancellationToken::new();
    let (end, ended) = oneshot::channel::<()>();
    let watched = vec![Watched::ended("the test task", async move {
        let _ = ended.await;
        Ok(())
    })];
    let (running, _ready, _seen) = start(&store, "w-ended", watched, &shutdown).await;
    end.send(()).expect("the task waits");
    let result = tokio::time::timeout(WAIT, running).await.expect("stops in time").expect("run task");
    let error = result.expect_err("a watched task ending is a failure");
    assert_eq!(error.to_string(), "the test task stopped unexpectedly");
    assert!(store.get(&worker_key("w-ended")).await.expect("get").is_none(), "deregistered");
}

#[tokio::test]
async fn registration_and_threads_are_left_alone_when_shutdown_comes_first() {
    // Shut down before `run` starts: nothing registers, no ready line, and the watched
    // thread, which ends during the stop, is not reported as a death.
    let store = MemoryStore::new();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (stop_thread, stopping) = std::sync::mpsc::channel::<()>();
    let (_handle, thread) = actor::spawn::<(), (), _>("test thread", 1, (), move |_mailbox, _load| {
        let _ = stopping.recv();
    })
    .expect("the thread starts");
    let bound = Bound::bind(&node("w-early"), Role::Decode).await.expect("binds");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut service = service(&store, "w-early", vec![Watched::thread(thread)], seen, bound.addr());
    // The role's drain is what ends its threads (as dropping an engine's handles does).
    service.drain = cluster_core::service::drain(move |_deadline| async move {
        let _ = stop_thread.send(());
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    let result = tokio::time::timeout(WAIT, cluster_core::service::run(bound, service, shutdown, ready_tx))
        .await
        .expect("stops in time");
    assert!(result.is_ok(), "{result:?}");
    assert!(ready_rx.await.is_err(), "no ready line without a registration");
    assert!(store.get(&worker_key("w-early")).await.expect("get").is_none());
}
