//! Expert placement under a controller: live load reaches etcd, skew triggers an EPLB
//! rebalance that gives the hottest experts more replicas and evens the measured load over
//! the expert workers, while requests keep flowing with unchanged tokens; a killed
//! controller leader is replaced by a standby, which re-places a killed expert worker's
//! experts while every request completes and gives a new expert worker a share at once;
//! expert workers starting together under a running controller all get slots in the first
//! placement.

use cluster_tests::binaries::run_cli;
use cluster_tests::grpc::{Streams, check_all, ids_request};
use cluster_tests::{Cluster, ClusterSpec, Reference, Role, references, secs};
use placement::{DesiredWorkers, LoadReport, PlacementSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

const MAX_NEW: u32 = 12;
const EXPERT_WORKERS: usize = 3;
/// Reports every 250 ms over a 2 s window; old slots released 1 s after a switch.
const EXPERT_ARGS: &[&str] = &["--load-report-ms", "250", "--load-window", "8", "--release-delay-ms", "1000"];
const CONTROLLER_ARGS: &[&str] = &[
    "--check-period-ms",
    "250",
    "--lease-ttl-ms",
    "2000",
    "--redundant-slots",
    "8",
    "--min-rebalance-interval-ms",
    "8000",
];

/// Prompts of few distinct tokens: every position routes to nearly the same experts.
fn skewed_prompts() -> Vec<Vec<u32>> {
    let run = |t: u32, n: usize| std::iter::repeat_n(t, n);
    vec![
        std::iter::once(0).chain(run(101, 40)).collect(),
        std::iter::once(0).chain(run(101, 30)).chain(run(102, 10)).collect(),
        std::iter::once(0).chain(run(102, 40)).collect(),
    ]
}

/// Waves of concurrent streams, each checked against the in-process engine's tokens, until
/// stopped. Counts waves and streams; the first wrong or failed stream is kept.
struct Workload {
    stop: Arc<AtomicBool>,
    waves: Arc<AtomicUsize>,
    task: JoinHandle<Result<usize, String>>,
}

impl Workload {
    fn start(url: String, prompts: Vec<Vec<u32>>, expected: Vec<Reference>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let waves = Arc::new(AtomicUsize::new(0));
        let (s, w) = (stop.clone(), waves.clone());
        let task = tokio::spawn(async move {
            let mut streams = 0;
            while !s.load(Ordering::SeqCst) {
                let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
                let results = Streams::start(&url, requests).await.finish(secs(120)).await;
                check_all(&results, &expected, MAX_NEW)?;
                streams += results.len();
                w.fetch_add(1, Ordering::SeqCst);
            }
            Ok(streams)
        });
        Workload { stop, waves, task }
    }

    fn waves(&self) -> usize {
        self.waves.load(Ordering::SeqCst)
    }

    async fn wait_waves(&self, n: usize, what: &str) {
        let target = self.waves() + n;
        cluster_tests::wait_until(what, secs(180), async || self.task.is_finished() || self.waves() >= target).await;
    }

    /// Stops after the running wave; the number of streams served, all correct.
    async fn finish(self) -> Result<usize, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.map_err(|e| format!("workload task: {e}"))?
    }
}

/// Measured per-layer load over the expert workers: Σ_layer max_worker / Σ_layer mean_worker
/// of the reported tokens/s (each layer waits for its slowest worker).
fn measured_ratio(reports: &[LoadReport]) -> f64 {
    let layers = reports.first().map_or(0, |r| r.layers.len());
    let (mut sum_max, mut sum_mean) = (0.0, 0.0);
    for l in 0..layers {
        let per_worker: Vec<f64> = reports.iter().map(|r| r.tokens_per_s[l].iter().sum()).collect();
        sum_max += per_worker.iter().copied().fold(0.0, f64::max);
        sum_mean += per_worker.iter().sum::<f64>() / per_worker.len() as f64;
    }
    if sum_mean > 0.0 { sum_max / sum_mean } else { 1.0 }
}

/// Cluster-wide tokens/s per (layer row, expert).
fn aggregate(reports: &[LoadReport]) -> Vec<Vec<f64>> {
    let mut total = reports[0].tokens_per_s.iter().map(|row| vec![0.0; row.len()]).collect::<Vec<_>>();
    for r in reports {
        for (t, row) in total.iter_mut().zip(&r.tokens_per_s) {
            t.iter_mut().zip(row).for_each(|(t, v)| *t += v);
        }
    }
    total
}

/// Reports of all expert workers, once each covers a full window of load.
async fn full_reports(cluster: &Cluster) -> Result<Vec<LoadReport>, String> {
    let reports = cluster.load_reports().await?;
    if reports.len() != EXPERT_WORKERS {
        return Err(format!("{} load reports", reports.len()));
    }
    if reports.iter().any(|r| r.total_rate() <= 0.0 || r.window_ms < 2000) {
        return Err("a worker has no load or a partial window yet".into());
    }
    Ok(reports)
}

#[tokio::test]
async fn skewed_load_rebalances_and_evens_the_expert_workers() {
    let prompts = skewed_prompts();
    let expected = references(&prompts, MAX_NEW).await;
    let spec = ClusterSpec::new(1, 1)
        .experts(EXPERT_WORKERS)
        .controllers(1, CONTROLLER_ARGS)
        .controller_args(&["--skew-threshold", "1.1"])
        .expert_args(EXPERT_ARGS);
    let cluster = Cluster::start("rebalance", spec).await;
    let initial = cluster.wait_placement("the initial placement", secs(60), |_| true).await;
    assert_eq!(initial.reason, "initial");
    eprintln!("initial placement v{}: replicas {:?}", initial.version.0, initial.replica_counts()[0]);

    let workload = Workload::start(cluster.router_url(), prompts, expected);
    // The skew shows in etcd; keep the last measurement taken under the initial placement.
    let mut before = None;
    let switched =
        cluster_tests::wait_for("a load-driven rebalance", secs(180), async || match cluster.placement().await? {
            Some(s) if s.version > initial.version => Ok(s),
            _ => {
                if let Ok(reports) = full_reports(&cluster).await {
                    before = Some((measured_ratio(&reports), aggregate(&reports)));
                }
                Err("still on the initial placement".into())
            }
        })
        .await;
    let (before, load) = before.expect("load was measured under the initial placement");
    assert_eq!(switched.reason, "skew", "{switched:?}");
    eprintln!(
        "rebalanced to v{} ({}): predicted max/mean {:.3} -> {:.3}",
        switched.version.0, switched.reason, switched.ratio_before, switched.ratio_after
    );

    // The hottest expert of every layer that served tokens gained replicas (the MTP layer's
    // experts serve none: these workers do not speculate).
    let counts = switched.replica_counts();
    for (l, row) in load.iter().enumerate() {
        let hottest = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).expect("experts");
        eprintln!("layer row {l}: hottest expert {hottest} ({:.1} tokens/s), replicas {:?}", row[hottest], counts[l]);
        if row[hottest] == 0.0 {
            continue;
        }
        assert!(
            counts[l][hottest] > 1,
            "layer row {l}: hottest expert {hottest} has {} replica(s)",
            counts[l][hottest]
        );
    }

    // Measured again once every report covers a window wholly after the switch.
    let switch_ms = placement::unix_ms();
    let after = cluster_tests::wait_for("a full load window under the new placement", secs(120), async || {
        let reports = full_reports(&cluster).await?;
        let fresh = reports.iter().all(|r| {
            r.placement_version == Some(switched.version) && r.updated_unix_ms >= switch_ms + r.window_ms + 500
        });
        if fresh { Ok(measured_ratio(&reports)) } else { Err("reports still cover the switch".into()) }
    })
    .await;
    eprintln!("measured max/mean over expert workers: before {before:.3}, after {after:.3}");
    assert!(after < before, "measured max/mean did not drop: before {before:.3}, after {after:.3}");

    workload.wait_waves(1, "one more wave after the switch").await;
    let served = workload.finish().await.unwrap_or_else(|e| panic!("a request failed or changed: {e}"));
    eprintln!("{served} streams served, every one identical to the in-process engine");

    // The autoscaling target is in etcd, and `expertmesh placement` shows the live state.
    let desired =
        cluster.etcd.get_prefix(&format!("/expertmesh/{}/controller/desired_expert_workers", cluster.name())).await;
    let (_, desired) =
        desired.expect("etcd").into_iter().next().expect("the controller wrote the desired worker count");
    let desired: DesiredWorkers = serde_json::from_slice(&desired).expect("DesiredWorkers JSON");
    assert_eq!(desired.live, EXPERT_WORKERS as u32);
    assert!(desired.desired >= 1 && desired.tokens_per_s > 0.0, "{desired:?}");
    let out = run_cli(&["placement", "--etcd", &cluster.etcd.endpoint(), "--cluster", cluster.name(), "--json"]).await;
    assert!(out.status.success(), "expertmesh placement: {}", String::from_utf8_lossy(&out.stderr));
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("placement JSON");
    assert_eq!(view["version"], switched.version.0);
    assert_eq!(view["workers"].as_array().map(Vec::len), Some(EXPERT_WORKERS));
    assert!(
        view["workers"].as_array().expect("workers").iter().all(|w| w["live"] == true && w["ready"] == true),
        "{view}"
    );
    let table = run_cli(&["placement", "--etcd", &cluster.etcd.endpoint(), "--cluster", cluster.name()]).await;
    eprintln!("{}", String::from_utf8_lossy(&table.stdout));
}

#[tokio::test]
async fn standby_controller_takes_over_and_replaces_a_dead_expert_worker() {
    let prompts = skewed_prompts();
    let expected = references(&prompts, MAX_NEW).await;
    let spec = ClusterSpec::new(1, 1)
        .experts(EXPERT_WORKERS)
        .controllers(2, CONTROLLER_ARGS)
        .controller_args(&["--skew-threshold", "1000", "--rebalance-period-ms", "4000"])
        .expert_args(EXPERT_ARGS)
        .lease_ttl(Duration::from_millis(1500));
    let mut cluster = Cluster::start("failover-experts", spec).await;
    let initial = cluster.wait_placement("the initial placement", secs(60), |_| true).await;

    // Kill the leading controller: the standby takes over within the lease TTL.
    let leader = cluster.wait_leader(secs(10)).await;
    let index: usize = leader.strip_prefix("controller-").and_then(|i| i.parse().ok()).expect("controller-<i>");
    cluster.controllers[index].kill();
    let standby = cluster_tests::wait_for("the standby to lead", secs(30), async || match cluster.leader().await? {
        Some(id) if id != leader => Ok(id),
        other => Err(format!("leader: {other:?}")),
    })
    .await;
    eprintln!("{leader} killed; {standby} leads");

    let workload = Workload::start(cluster.router_url(), prompts, expected);
    workload.wait_waves(1, "a wave before the kill").await;
    let victim = cluster.expert[1].worker_id().to_string();
    cluster.expert[1].kill();
    eprintln!("{victim} killed under load");
    let replaced = cluster
        .wait_placement("a placement without the dead worker", secs(60), |s| {
            s.version > initial.version && !s.workers.iter().any(|w| w.as_str() == victim)
        })
        .await;
    assert_eq!(replaced.reason, "worker_left");
    replaced.validate().expect("every expert has a live replica");
    let hosts: BTreeMap<_, _> = replaced.replicas();
    assert!(hosts.values().all(|h| h.iter().all(|w| w.as_str() != victim)));
    eprintln!("v{} places {} experts on {:?}", replaced.version.0, hosts.len(), replaced.workers);

    workload.wait_waves(1, "a wave after the re-placement").await;

    // A new expert worker gets a share at once.
    let added = cluster.add_worker(Role::Expert).await;
    let newcomer = cluster.expert[added].worker_id().to_string();
    let grown = cluster
        .wait_placement("a placement including the new worker", secs(60), |s| {
            s.workers.iter().any(|w| w.as_str() == newcomer)
        })
        .await;
    assert_eq!(grown.reason, "worker_joined");
    eprintln!("v{} ({}) includes {newcomer}: {:?}", grown.version.0, grown.reason, grown.workers);
    workload.wait_waves(1, "a wave on the grown placement").await;
    let served = workload.finish().await.unwrap_or_else(|e| panic!("a request failed or changed: {e}"));
    eprintln!("{served} streams served across the controller and expert worker failures");
    drop(cluster);
}

/// Worker ids a placement names.
fn named(spec: &PlacementSpec) -> BTreeSet<String> {
    spec.workers.iter().map(|w| w.as_str().to_owned()).collect()
}

/// Waits until expert worker `i` hosts exactly the slots `spec` gives it.
async fn wait_hosting(cluster: &Cluster, i: usize, spec: &PlacementSpec) {
    let id = cluster.expert[i].worker_id().to_string();
    let worker = spec.workers.iter().find(|w| w.as_str() == id).unwrap_or_else(|| panic!("{id} is not placed"));
    let want: BTreeSet<(u32, u32)> =
        spec.slots_of(worker).iter().map(|s| (u32::try_from(s.layer).expect("layer"), s.expert)).collect();
    assert!(!want.is_empty(), "{id} has no slot in v{}", spec.version.0);
    cluster_tests::wait_for(&format!("{id} to host its slots of v{}", spec.version.0), secs(30), async || {
        let hosted: BTreeSet<(u32, u32)> = cluster.expert_slots(i).await?.into_iter().collect();
        if hosted == want {
            Ok(())
        } else {
            Err(format!("hosts {} slots, v{} gives {}", hosted.len(), spec.version.0, want.len()))
        }
    })
    .await;
}

#[tokio::test]
async fn expert_workers_starting_together_share_the_first_placement_and_a_late_one_joins_at_once() {
    const TOGETHER: usize = 2;
    let prompts = skewed_prompts();
    let expected = references(&prompts, MAX_NEW).await;
    // The controller leads before the workers start; the settle time outlasts their start-up
    // on a busy machine, the period (default ten minutes) any test.
    let spec = ClusterSpec::new(1, 1)
        .experts(TOGETHER)
        .controllers(1, &["--check-period-ms", "250", "--initial-settle-ms", "10000"])
        .controllers_first()
        .expert_args(EXPERT_ARGS);
    let mut cluster = Cluster::start("first-placement", spec).await;
    let first = cluster.wait_placement("the first placement", secs(60), |_| true).await;
    assert_eq!(first.reason, "initial", "{first:?}");
    assert_eq!(named(&first), cluster.worker_ids(Role::Expert), "every worker started together is placed");
    for i in 0..TOGETHER {
        wait_hosting(&cluster, i, &first).await;
    }
    eprintln!("v{} places experts on {:?}", first.version.0, first.workers);

    // A worker registering later is given slots within seconds, without load or the period.
    let added = cluster.add_worker(Role::Expert).await;
    let newcomer = cluster.expert[added].worker_id().to_string();
    let joined_at = std::time::Instant::now();
    let grown = cluster
        .wait_placement("a placement including the new worker", secs(30), |s| named(s).contains(&newcomer))
        .await;
    assert_eq!(grown.reason, "worker_joined", "{grown:?}");
    assert_eq!(named(&grown), cluster.worker_ids(Role::Expert));
    eprintln!("v{} includes {newcomer} {:?} after it registered", grown.version.0, joined_at.elapsed());
    for i in 0..=added {
        wait_hosting(&cluster, i, &grown).await;
    }

    let results = Streams::start(&cluster.router_url(), prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect())
        .await
        .finish(secs(120))
        .await;
    check_all(&results, &expected, MAX_NEW).unwrap_or_else(|e| panic!("{e}"));
}
