//! The follower and the load publisher against the in-memory store: a two-phase switch, a
//! lost ready mark put again, and load reports at `/load/<worker>`.

use super::*;
use crate::counters::LoadCounters;
use crate::load_report::{self, Publisher};
use crate::placement::ModelShape;
use ::placement::{CurrentPlacement, LoadReport, PlacementSpec};
use cluster_core::{Capacity, MemoryStore, Role, WorkerInfo};
use model::{ExpertGroup, ExpertId, LocalExperts};
use std::future::Future;

const PATIENCE: Duration = Duration::from_secs(20);

async fn wait_for<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let waited = tokio::time::timeout(PATIENCE, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    waited.await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn spec(version: u64, layers: &[usize], row: &[u32]) -> PlacementSpec {
    PlacementSpec {
        version: PlacementVersion(version),
        workers: vec![WorkerId::new("e0").expect("valid"), WorkerId::new("e1").expect("valid")],
        layers: layers.to_vec(),
        num_experts: row.len(),
        phy2log: layers.iter().map(|_| row.to_vec()).collect(),
        reason: "test".into(),
        ratio_before: 1.0,
        ratio_after: 1.0,
        created_unix_ms: 0,
    }
}

async fn put<T: serde::Serialize>(store: &dyn Store, key: &str, value: &T) {
    store.put(key, serde_json::to_vec(value).expect("serializes")).await.expect("put");
}

async fn get<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str) -> Option<T> {
    let value = store.get(key).await.expect("get")?;
    Some(serde_json::from_slice(&value).expect("parses"))
}

#[tokio::test]
async fn follows_a_two_phase_switch_and_publishes_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    model::default_model::ensure(dir.path()).expect("generate");
    let ckpt =
        Arc::new(ExpertCheckpoint::open(Some(dir.path().to_path_buf()), model::WeightDtype::Auto).expect("open"));
    let config = ckpt.config().clone();
    let layers = config.moe_layers();
    let n = config.n_routed_experts as u32;
    let counters = Arc::new(LoadCounters::new(&config));
    let started = Instant::now();
    let (compute, thread) =
        crate::compute::spawn_compute(LocalExperts::empty(&config, kernels::cpu::Precision::Exact), counters.clone())
            .expect("spawn");

    let memory = MemoryStore::new();
    let store: Arc<dyn Store> = Arc::new(memory.clone());
    let cluster = ClusterName::new("t").expect("valid");
    let me = WorkerId::new("e0").expect("valid");
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let info = WorkerInfo {
        id: me.clone(),
        role: Role::Expert,
        address: "http://127.0.0.1:1".into(),
        capacity: Capacity::default(),
        model: "m".into(),
        version: "v".into(),
    };
    let registration = Arc::new(
        cluster_core::register(store.clone(), &cluster, info, Duration::from_secs(1), &tracker, &stop)
            .await
            .expect("register"),
    );
    let shape = ModelShape { moe_layers: layers.iter().copied().collect(), num_experts: n as usize };
    let view = PlacementView::new(cluster.clone(), me.clone(), shape);
    let placements =
        WatchFollower::start(store.as_ref(), &keys::placement_prefix(&cluster), view).await.expect("watch");
    let (version_tx, version_rx) = watch::channel(None);
    let follower = Follower {
        store: store.clone(),
        cluster: cluster.clone(),
        me: me.clone(),
        registration: registration.clone(),
        compute: compute.clone(),
        checkpoint: ckpt,
        release_delay: Duration::from_millis(50),
        version: version_tx,
        loads: tracker.clone(),
    };
    tracker.spawn(follow(follower, placements, stop.clone()));
    let publisher = Publisher {
        store: store.clone(),
        cluster: cluster.clone(),
        me: me.clone(),
        registration: registration.clone(),
        counters,
        version: version_rx.clone(),
        period: Duration::from_millis(20),
        window: 5,
        started,
    };
    tracker.spawn(load_report::publish(publisher, stop.clone()));

    // Phase 1 of version 1: e0 gets experts 0..n/2 of every MoE layer and marks ready.
    let identity: Vec<u32> = (0..n).collect();
    let s1 = spec(1, &layers, &identity);
    put(store.as_ref(), &keys::placement_spec_key(&cluster, s1.version), &s1).await;
    let ready1 = keys::placement_ready_key(&cluster, s1.version, &me);
    wait_for("ready mark 1", || async { get::<ReadyMark>(store.as_ref(), &ready1).await.is_some() }).await;
    assert_eq!(get::<ReadyMark>(store.as_ref(), &ready1).await, Some(ReadyMark { slots: s1.slots_of(&me).len() }));
    assert_eq!(compute.hosted(), s1.slots_of(&me));
    put(store.as_ref(), &keys::placement_current_key(&cluster), &CurrentPlacement { version: s1.version }).await;
    let mut followed = version_rx.clone();
    followed.wait_for(|v| *v == Some(s1.version)).await.expect("follows version 1");

    // Version 2 moves e0 to experts n/4..3n/4; it hosts both sets until current moves.
    let shifted: Vec<u32> = (0..n).map(|i| (i + n - n / 4) % n).collect();
    let s2 = spec(2, &layers, &shifted);
    put(store.as_ref(), &keys::placement_spec_key(&cluster, s2.version), &s2).await;
    let ready2 = keys::placement_ready_key(&cluster, s2.version, &me);
    wait_for("ready mark 2", || async { get::<ReadyMark>(store.as_ref(), &ready2).await.is_some() }).await;
    let both: BTreeSet<_> = s1.slots_of(&me).union(&s2.slots_of(&me)).copied().collect();
    assert_eq!(compute.hosted(), both);
    put(store.as_ref(), &keys::placement_current_key(&cluster), &CurrentPlacement { version: s2.version }).await;
    wait_for("release of version 1's slots", || async { compute.hosted() == s2.slots_of(&me) }).await;

    // The mark lives on the registration lease: when it is lost, the follower puts the mark
    // again once the registration holds a new lease.
    let old = registration.lease();
    store.revoke(old).await.expect("revoke");
    wait_for("ready mark 2 again", || async {
        registration.lease() != old && get::<ReadyMark>(store.as_ref(), &ready2).await.is_some()
    })
    .await;

    // Served tokens show up in the load report.
    let layer = layers[0];
    let expert = s2.slots_of(&me).iter().find(|s| s.layer == layer).expect("a slot of the first MoE layer").expert;
    let groups = vec![ExpertGroup { expert: ExpertId(expert), num_tokens: 7 }];
    compute.run(layer, config.hidden_size, groups, vec![0.1; 7 * config.hidden_size]).await.expect("runs");
    let load_key = keys::load_key(&cluster, &me);
    wait_for("a load report with the tokens", || async {
        get::<LoadReport>(store.as_ref(), &load_key).await.is_some_and(|r| r.total_tokens == 7)
    })
    .await;
    let report: LoadReport = get(store.as_ref(), &load_key).await.expect("report");
    assert_eq!(
        (report.worker.clone(), report.layers.clone(), report.num_experts),
        (me.clone(), layers.clone(), n as usize)
    );
    assert_eq!(report.placement_version, Some(s2.version));
    assert!(report.window_ms > 0 && report.tokens_per_s.len() == layers.len(), "{report:?}");

    stop.cancel();
    tracker.close();
    tracker.wait().await;
    drop(registration);
    drop(compute);
    thread.join().expect("compute thread ends");
    memory.shutdown().await;
}
