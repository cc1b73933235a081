//! etcd restarts under load: routing uses the cached membership while etcd is down, and the
//! workers' registrations come back after etcd returns (with its data, or empty).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_tests::grpc::{generation_client, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, Role, references, secs, wait_until};
use tonic::Status;

const MAX_NEW: u32 = 8;
/// Bound on one request of the loop (a hang is a failure, not a stuck test).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One request of the loop: the phase it was issued in, its prompt, its outcome.
#[derive(Debug)]
struct Record {
    phase: u8,
    prompt: usize,
    outcome: Result<Vec<u32>, Status>,
}

/// Sequential requests, one after the other, until stopped; each tagged with the phase
/// current when it was issued.
struct Load {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(cluster: &Cluster, prompts: Vec<Vec<u32>>) -> Load {
        let phase = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut client = generation_client(&cluster.router_url()).await;
        let (p, s, r) = (Arc::clone(&phase), Arc::clone(&stop), Arc::clone(&records));
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                let prompt = n % prompts.len();
                n += 1;
                let issued = p.load(Ordering::SeqCst);
                let mut request = tonic::Request::new(ids_request(&prompts[prompt], MAX_NEW));
                request.set_timeout(REQUEST_TIMEOUT);
                let outcome =
                    match tokio::time::timeout(REQUEST_TIMEOUT + secs(5), client.generate_unary(request)).await {
                        Ok(reply) => reply.map(|r| r.into_inner().generated_ids),
                        Err(_) => Err(Status::deadline_exceeded("no answer (test-side timeout)")),
                    };
                r.lock().expect("records lock").push(Record { phase: issued, prompt, outcome });
            }
        });
        Load { phase, stop, records, task }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn done_in(&self, phase: u8) -> usize {
        self.records.lock().expect("records lock").iter().filter(|r| r.phase == phase).count()
    }

    async fn wait_done_in(&self, phase: u8, n: usize, what: &str) {
        wait_until(&format!("{n} requests issued {what} to complete"), secs(90), async || self.done_in(phase) >= n)
            .await;
    }

    async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the load task");
        std::mem::take(&mut *self.records.lock().expect("records lock"))
    }
}

/// Failed or wrong requests among `records` issued in one of `phases`, one line each.
fn wrong(records: &[Record], phases: &[u8], expected: &[Vec<u32>]) -> Vec<String> {
    records
        .iter()
        .filter(|r| phases.contains(&r.phase))
        .filter_map(|r| match &r.outcome {
            Ok(ids) if *ids == expected[r.prompt] => None,
            Ok(ids) => {
                Some(format!("phase {}: prompt {}: got {ids:?}, want {:?}", r.phase, r.prompt, expected[r.prompt]))
            }
            Err(e) => Some(format!("phase {}: prompt {}: {:?}: {}", r.phase, r.prompt, e.code(), e.message())),
        })
        .collect()
}

fn counts(records: &[Record]) -> String {
    (0..4)
        .map(|p| format!("phase {p}: {}", records.iter().filter(|r| r.phase == p).count()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn etcd_restart_keeps_serving_and_membership_recovers() {
    let prompts = test_prompts(4, 51);
    let expected: Vec<Vec<u32>> = references(&prompts, MAX_NEW).await.into_iter().map(|r| r.generated_ids).collect();
    let mut cluster = Cluster::start("etcd-restart", ClusterSpec::new(1, 1)).await;

    let load = Load::start(&cluster, prompts).await;
    load.wait_done_in(0, 2, "before the kill").await;

    cluster.etcd.kill();
    load.set_phase(1);
    load.wait_done_in(1, 3, "while etcd is down").await;

    cluster.etcd.start_again().await;
    load.set_phase(2);
    cluster.wait_registered(Role::Prefill, cluster.worker_ids(Role::Prefill), secs(30)).await;
    cluster.wait_registered(Role::Decode, cluster.worker_ids(Role::Decode), secs(30)).await;
    load.set_phase(3);
    load.wait_done_in(3, 3, "after the keys are back").await;

    let records = load.stop().await;
    eprintln!("requests per phase: {}", counts(&records));
    let bad = wrong(&records, &[0, 1, 2, 3], &expected);
    assert!(bad.is_empty(), "{} requests failed around the etcd restart:\n{}", bad.len(), bad.join("\n"));
}

#[tokio::test]
async fn etcd_restart_with_empty_data_dir_workers_reregister() {
    let prompts = test_prompts(4, 61);
    let expected: Vec<Vec<u32>> = references(&prompts, MAX_NEW).await.into_iter().map(|r| r.generated_ids).collect();
    let mut cluster = Cluster::start("etcd-empty", ClusterSpec::new(1, 1)).await;

    let load = Load::start(&cluster, prompts).await;
    load.wait_done_in(0, 2, "before the kill").await;

    cluster.etcd.kill();
    load.set_phase(1);
    load.wait_done_in(1, 3, "while etcd is down").await;

    cluster.etcd.restart_empty().await;
    load.set_phase(2);
    // Every lease and key is gone: the workers must notice and register again.
    cluster.wait_registered(Role::Prefill, cluster.worker_ids(Role::Prefill), secs(30)).await;
    cluster.wait_registered(Role::Decode, cluster.worker_ids(Role::Decode), secs(30)).await;
    // The router's view converges through its watch.
    cluster.wait_serving(secs(30)).await;
    load.set_phase(3);
    load.wait_done_in(3, 3, "after the workers re-registered").await;

    let records = load.stop().await;
    eprintln!("requests per phase: {}", counts(&records));
    // While the keys were gone, the router may briefly have known no worker: reported only.
    let transition = wrong(&records, &[2], &expected);
    if !transition.is_empty() {
        eprintln!(
            "{} requests failed between the empty restart and re-registration:\n{}",
            transition.len(),
            transition.join("\n")
        );
    }
    let bad = wrong(&records, &[0, 1, 3], &expected);
    assert!(
        bad.is_empty(),
        "{} requests failed (before, while down, or after re-registration):\n{}",
        bad.len(),
        bad.join("\n")
    );
}
