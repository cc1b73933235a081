//! `RemoteExperts` against fake expert workers (gRPC servers on 127.0.0.1:0 whose expert e
//! multiplies its rows by e + 1): tokens spread over replicas, a killed worker's groups go to
//! the other replicas, "not hosted" answers are retried until the placement moves, and
//! without placement the slots come from `GetSlots`.

use cluster_core::{Capacity, ClusterName, MemoryStore, Role, Store, WorkerId, WorkerInfo};
use expert_client::{RemoteExperts, RemoteOptions};
use model::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, ExpertId};
use placement::keys;
use placement::{CurrentPlacement, PlacementSpec, PlacementVersion};
use proto::expert::expert_server::{Expert, ExpertServer};
use proto::expert::{self as pb, expert_reply};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

const LAYER: usize = 3;
const HIDDEN: usize = 4;

/// One fake expert worker.
#[derive(Debug, Clone)]
struct Fake {
    hosted: Arc<Mutex<BTreeSet<u32>>>,
    tokens: Arc<AtomicU64>,
    /// Cancelled when the worker is "killed": streams fail, the server stops.
    dead: CancellationToken,
    /// Dies on the next request instead of answering it (killed mid-call).
    die_on_request: Arc<AtomicBool>,
    tracker: TaskTracker,
}

impl Fake {
    fn host(&self, experts: &[u32]) {
        *self.hosted.lock().expect("not poisoned") = experts.iter().copied().collect();
    }

    fn answer(&self, req: &pb::ExpertRequest) -> expert_reply::Result {
        let hosted = self.hosted.lock().expect("not poisoned");
        if let Some(g) = req.groups.iter().find(|g| req.layer as usize != LAYER || !hosted.contains(&g.expert)) {
            return expert_reply::Result::Error(format!("layer {} expert {} is not hosted here", req.layer, g.expert));
        }
        let inputs: Vec<f32> =
            req.inputs.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut out = Vec::with_capacity(req.inputs.len());
        let mut at = 0;
        for g in &req.groups {
            let n = g.num_tokens as usize * req.hidden as usize;
            out.extend(inputs[at..at + n].iter().flat_map(|v| (v * (g.expert + 1) as f32).to_le_bytes()));
            at += n;
            self.tokens.fetch_add(u64::from(g.num_tokens), Ordering::Relaxed);
        }
        expert_reply::Result::Outputs(out)
    }
}

#[tonic::async_trait]
impl Expert for Fake {
    type RunStream = ReceiverStream<Result<pb::ExpertReply, Status>>;

    async fn run(&self, request: Request<Streaming<pb::ExpertRequest>>) -> Result<Response<Self::RunStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let fake = self.clone();
        self.tracker.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.message() => next,
                    _ = fake.dead.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("killed"))).await;
                        return;
                    }
                };
                let Ok(Some(req)) = next else { return };
                if fake.die_on_request.load(Ordering::Relaxed) {
                    fake.dead.cancel();
                    let _ = tx.send(Err(Status::unavailable("killed"))).await;
                    return;
                }
                let reply = pb::ExpertReply { seq: req.seq, result: Some(fake.answer(&req)) };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_slots(&self, _: Request<pb::SlotsRequest>) -> Result<Response<pb::Slots>, Status> {
        let hosted = self.hosted.lock().expect("not poisoned");
        Ok(Response::new(pb::Slots {
            slots: hosted.iter().map(|&expert| pb::Slot { layer: LAYER as u32, expert }).collect(),
        }))
    }

    async fn get_load(&self, _: Request<pb::ExpertLoadRequest>) -> Result<Response<pb::ExpertLoad>, Status> {
        Ok(Response::new(pb::ExpertLoad::default()))
    }
}

struct Harness {
    store: MemoryStore,
    cluster: ClusterName,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    fakes: Vec<Fake>,
}

impl Harness {
    /// Starts `n` fake workers `e0..` and registers them (without lease: a killed worker
    /// stays a member, as until its lease expires).
    async fn start(n: usize) -> Harness {
        let store = MemoryStore::new();
        let cluster = ClusterName::new("t").expect("valid");
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let mut fakes = Vec::new();
        for i in 0..n {
            let fake = Fake {
                hosted: Arc::default(),
                tokens: Arc::default(),
                dead: shutdown.child_token(),
                die_on_request: Arc::default(),
                tracker: tracker.clone(),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = format!("http://{}", listener.local_addr().expect("bound"));
            let server = tonic::transport::Server::builder()
                .add_service(ExpertServer::new(fake.clone()))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), fake.dead.clone().cancelled_owned());
            tracker.spawn(server);
            let id = worker(i);
            let (model, version) = ("m".into(), "v".into());
            let info = WorkerInfo {
                id: id.clone(),
                role: Role::Expert,
                address,
                capacity: Capacity::default(),
                model,
                version,
            };
            let key = cluster_core::keys::worker_key(&cluster, Role::Expert, &id);
            store.put(&key, serde_json::to_vec(&info).expect("serializes")).await.expect("put");
            fakes.push(fake);
        }
        Harness { store, cluster, tracker, shutdown, fakes }
    }

    /// Writes placement `version` (one row, `phy2log` over `workers`) and makes it current.
    async fn place(&self, version: u64, workers: &[usize], phy2log: Vec<u32>, num_experts: usize) {
        let version = PlacementVersion(version);
        let spec = PlacementSpec {
            version,
            workers: workers.iter().map(|&i| worker(i)).collect(),
            layers: vec![LAYER],
            num_experts,
            phy2log: vec![phy2log],
            reason: "test".into(),
            ratio_before: 1.0,
            ratio_after: 1.0,
            created_unix_ms: 0,
        };
        spec.validate().expect("valid spec");
        let spec_key = keys::placement_spec_key(&self.cluster, version);
        self.store.put(&spec_key, serde_json::to_vec(&spec).expect("serializes")).await.expect("put");
        let current = serde_json::to_vec(&CurrentPlacement { version }).expect("serializes");
        self.store.put(&keys::placement_current_key(&self.cluster), current).await.expect("put");
    }

    async fn remote(&self, call_timeout: Duration) -> Arc<RemoteExperts> {
        let options = RemoteOptions {
            connect_timeout: Duration::from_secs(2),
            call_timeout,
            attempt_timeout: call_timeout,
            retry_period: Duration::from_millis(200),
        };
        let remote = RemoteExperts::from_store(&self.store, &self.cluster, &self.tracker, &self.shutdown, options);
        Arc::new(remote.await.expect("follows the store"))
    }

    fn tokens(&self) -> Vec<u64> {
        self.fakes.iter().map(|f| f.tokens.load(Ordering::Relaxed)).collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        // Servers drain their connections; do not hang the test on a slow one.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.store.shutdown().await;
    }
}

fn worker(i: usize) -> WorkerId {
    WorkerId::new(format!("e{i}")).expect("valid")
}

/// Runs `groups` (`(expert, num_tokens)`) on a plain thread, as the engine's compute thread
/// does; returns the outputs or the error, and checks outputs against the local reference.
async fn call(remote: &Arc<RemoteExperts>, groups: &[(u32, usize)]) -> Result<(), ExpertError> {
    let groups: Vec<ExpertGroup> =
        groups.iter().map(|&(e, n)| ExpertGroup { expert: ExpertId(e), num_tokens: n }).collect();
    let rows: usize = groups.iter().map(|g| g.num_tokens).sum();
    let inputs: Vec<f32> = (0..rows * HIDDEN).map(|v| v as f32 * 0.5).collect();
    let remote = Arc::clone(remote);
    let (want_groups, want_inputs) = (groups.clone(), inputs.clone());
    let thread = std::thread::spawn(move || {
        let batch = ExpertBatch { layer: LAYER, hidden: HIDDEN, groups: &groups, inputs: &inputs };
        let mut out = vec![f32::NAN; inputs.len()];
        remote.run(&batch, &mut out).map(|()| out)
    });
    let out = tokio::task::spawn_blocking(move || thread.join().expect("no panic")).await.expect("joined")?;
    let mut want = Vec::new();
    let mut row = 0;
    for g in &want_groups {
        let scale = (g.expert.0 + 1) as f32;
        want.extend(want_inputs[row * HIDDEN..(row + g.num_tokens) * HIDDEN].iter().map(|v| v * scale));
        row += g.num_tokens;
    }
    assert_eq!(out, want, "outputs in the caller's row order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_spreads_tokens_and_survives_a_killed_worker() {
    let h = Harness::start(3).await;
    // Two slots per worker: e0 {0, 1}, e1 {1, 2}, e2 {2, 0}; every expert twice.
    h.fakes[0].host(&[0, 1]);
    h.fakes[1].host(&[1, 2]);
    h.fakes[2].host(&[2, 0]);
    h.place(1, &[0, 1, 2], vec![0, 1, 1, 2, 2, 0], 3).await;
    let remote = h.remote(Duration::from_secs(10)).await;

    call(&remote, &[(0, 4), (1, 3), (2, 5)]).await.expect("served");
    assert!(h.tokens().iter().all(|&t| t > 0), "every replica got tokens: {:?}", h.tokens());
    assert_eq!(h.tokens().iter().sum::<u64>(), 12);

    // e1 dies in the middle of the next call but stays a member: its groups go to e0 and
    // e2, no call fails.
    h.fakes[1].die_on_request.store(true, Ordering::Relaxed);
    let before = h.tokens()[1];
    for _ in 0..5 {
        call(&remote, &[(1, 2), (2, 1), (0, 3)]).await.expect("served by the other replicas");
    }
    assert!(h.fakes[1].dead.is_cancelled(), "e1 was sent a part and died");
    assert_eq!(h.tokens()[1], before, "the dead worker served nothing");

    // The controller moves everything onto e0 and e2.
    h.fakes[0].host(&[0, 1, 2]);
    h.fakes[2].host(&[0, 1, 2]);
    h.place(2, &[0, 2], vec![0, 1, 2, 2, 0, 1], 3).await;
    for _ in 0..3 {
        call(&remote, &[(2, 7), (1, 1)]).await.expect("served under placement 2");
    }
    drop(remote);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_hosted_answers_are_retried_until_the_placement_moves() {
    let h = Harness::start(2).await;
    // Placement 1 puts expert 1 on e1, but e1 already dropped it (a rebalance in flight).
    h.fakes[0].host(&[0, 1]);
    h.fakes[1].host(&[0]);
    h.place(1, &[0, 1], vec![0, 1], 2).await;
    let remote = h.remote(Duration::from_secs(10)).await;

    let started = Instant::now();
    let moved = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.place(2, &[0, 1], vec![1, 0], 2).await;
    };
    let (result, ()) = tokio::join!(call(&remote, &[(0, 2), (1, 3)]), moved);
    result.expect("served once placement 2 is current");
    assert!(started.elapsed() >= Duration::from_millis(300), "it had to wait for placement 2");
    drop(remote);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_placement_slots_come_from_get_slots_and_unhosted_experts_time_out() {
    let h = Harness::start(2).await;
    h.fakes[0].host(&[0, 1]);
    h.fakes[1].host(&[1]);
    let remote = h.remote(Duration::from_millis(400)).await;

    call(&remote, &[(0, 2), (1, 4)]).await.expect("served");
    assert_eq!(h.tokens(), vec![4, 2], "expert 1's four tokens split over both workers");

    let started = Instant::now();
    let err = call(&remote, &[(0, 1), (5, 1)]).await.expect_err("expert 5 is hosted nowhere");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let text = err.to_string();
    assert!(
        matches!(err, ExpertError::Unavailable(_)) && text.contains("layer 3") && text.contains("expert 5"),
        "{text}"
    );
    drop(remote);
    h.stop().await;
}
