//! Failover: a decode worker killed mid-stream (speculating), a prefill worker killed with prompts in
//! flight, a worker frozen (SIGSTOP) until its lease expires, a decode worker whose engine
//! thread dies. Every request still completes with exactly the reference tokens: no
//! duplicate, no gap.

use std::time::Duration;

use cluster_tests::binaries::DECODE_WORKER_FAILING_EXPERTS;
use cluster_tests::grpc::{Streams, check_all, ids_request, retries, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, Role, poll_until, references, secs, wait_until};

/// Short leases so that a frozen worker leaves membership quickly.
const LEASE_TTL: Duration = Duration::from_millis(1500);
/// Long enough that streams are still running when a worker dies.
const LONG: u32 = 160;

/// Index of the decode worker running the most sequences now (0 when none reports).
async fn busiest_decode(cluster: &Cluster) -> usize {
    let mut best = (0, 0);
    for i in 0..cluster.decode.len() {
        if let Ok(load) = cluster.decode_load(i).await
            && load.running_sequences + load.waiting_sequences > best.1
        {
            best = (i, load.running_sequences + load.waiting_sequences);
        }
    }
    best.0
}

#[tokio::test]
async fn decode_worker_killed_mid_stream() {
    let prompts = test_prompts(8, 11);
    let expected = references(&prompts, LONG).await;
    // Speculating: the rerun on the survivor drafts and verifies afresh, token-identical.
    let spec = ClusterSpec::new(1, 2)
        .lease_ttl(LEASE_TTL)
        .prefill_args(&["--speculative-tokens", "1"])
        .decode_args(&["--speculative-tokens", "2"]);
    let mut cluster = Cluster::start("kill-decode", spec).await;

    let requests = prompts.iter().map(|p| ids_request(p, LONG)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    wait_until("every stream to receive its first token", secs(60), async || streams.all_have(1)).await;
    let victim = busiest_decode(&cluster).await;
    eprintln!("loads before the kill:\n{}", cluster.describe_loads().await);
    eprintln!("tokens per stream at the kill: {:?}; killing decode-{victim}", streams.tokens());
    cluster.decode[victim].kill();

    let results = streams.finish(secs(180)).await;
    eprintln!("retries per stream: {:?}", retries(&results));
    check_all(&results, &expected, LONG).unwrap_or_else(|e| panic!("after killing decode-{victim}: {e}"));
    cluster.wait_deregistered(Role::Decode, &format!("decode-{victim}"), secs(20)).await;

    // The survivors serve new requests.
    let results = Streams::start(&cluster.router_url(), prompts[..4].iter().map(|p| ids_request(p, LONG)).collect())
        .await
        .finish(secs(120))
        .await;
    check_all(&results, &expected[..4], LONG).unwrap_or_else(|e| panic!("new requests after the kill: {e}"));
}

#[tokio::test]
async fn prefill_worker_killed_with_requests_in_flight() {
    // Long prompts so that prefill takes a while and the kill finds work queued or running.
    let prompts: Vec<Vec<u32>> = test_prompts(8, 21)
        .into_iter()
        .enumerate()
        .map(|(i, p)| p.iter().copied().cycle().take(900 + 40 * i).collect())
        .collect();
    let expected = references(&prompts, 16).await;
    let mut cluster = Cluster::start("kill-prefill", ClusterSpec::new(2, 1).lease_ttl(LEASE_TTL)).await;

    let requests = prompts.iter().map(|p| ids_request(p, 16)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    let caught = {
        let c = &cluster;
        poll_until(secs(10), async || {
            c.prefill_load(0).await.is_ok_and(|l| l.running_sequences + l.waiting_sequences > 0)
        })
        .await
    };
    eprintln!("prefill-0 had work at the kill: {caught}; tokens per stream: {:?}", streams.tokens());
    cluster.prefill[0].kill();

    let results = streams.finish(secs(180)).await;
    eprintln!("retries per stream: {:?}", retries(&results));
    check_all(&results, &expected, 16).unwrap_or_else(|e| panic!("after killing prefill-0: {e}"));
    cluster.wait_deregistered(Role::Prefill, "prefill-0", secs(20)).await;
}

#[tokio::test]
async fn frozen_workers_leave_membership_then_return() {
    let prompts = test_prompts(8, 31);
    let expected = references(&prompts, 24).await;
    let mut cluster = Cluster::start("freeze", ClusterSpec::new(2, 2).lease_ttl(LEASE_TTL)).await;

    cluster.decode[1].stop();
    cluster.prefill[1].stop();
    // Lease TTL (rounded up to whole seconds by etcd) plus etcd's expiry tick.
    cluster.wait_deregistered(Role::Decode, "decode-1", secs(20)).await;
    cluster.wait_deregistered(Role::Prefill, "prefill-1", secs(20)).await;

    let requests = prompts.iter().map(|p| ids_request(p, 24)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(90)).await;
    eprintln!("retries per stream: {:?}", retries(&results));
    check_all(&results, &expected, 24)
        .unwrap_or_else(|e| panic!("with decode-1 and prefill-1 frozen and expired: {e}"));

    cluster.decode[1].cont();
    cluster.prefill[1].cont();
    let all_decode = cluster.worker_ids(Role::Decode);
    let all_prefill = cluster.worker_ids(Role::Prefill);
    cluster.wait_registered(Role::Decode, all_decode, secs(30)).await;
    cluster.wait_registered(Role::Prefill, all_prefill, secs(30)).await;

    let requests = prompts.iter().map(|p| ids_request(p, 24)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(90)).await;
    check_all(&results, &expected, 24).unwrap_or_else(|e| panic!("after the frozen workers resumed: {e}"));
}

#[tokio::test]
async fn streams_on_a_frozen_decode_worker_complete() {
    let prompts = test_prompts(6, 41);
    let expected = references(&prompts, LONG).await;
    let mut cluster = Cluster::start("freeze-mid-stream", ClusterSpec::new(1, 2).lease_ttl(LEASE_TTL)).await;

    let requests = prompts.iter().map(|p| ids_request(p, LONG)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    wait_until("every stream to receive its first token", secs(60), async || streams.all_have(1)).await;
    let victim = busiest_decode(&cluster).await;
    eprintln!("tokens per stream at the freeze: {:?}; freezing decode-{victim}", streams.tokens());
    cluster.decode[victim].stop();

    // The frozen worker answers nothing and renews no lease: the router must notice (lease
    // expiry or HTTP/2 keepalive) and move its sequences.
    let results = streams.finish(secs(120)).await;
    eprintln!("retries per stream: {:?}", retries(&results));
    check_all(&results, &expected, LONG).unwrap_or_else(|e| panic!("with decode-{victim} frozen mid-stream: {e}"));
    cluster.decode[victim].cont();
}

/// Graceful shutdown under load: SIGTERM makes a decode worker stop admitting, leave
/// membership and finish the sequences it runs before exiting; no request fails, new ones go
/// to the other decode worker.
#[tokio::test]
async fn decode_worker_sigterm_drains_under_load() {
    let prompts = test_prompts(8, 31);
    let expected = references(&prompts, LONG).await;
    let mut cluster = Cluster::start("drain-decode", ClusterSpec::new(1, 2).lease_ttl(LEASE_TTL)).await;

    let requests = prompts.iter().map(|p| ids_request(p, LONG)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    wait_until("every stream to receive its first token", secs(60), async || streams.all_have(1)).await;
    let victim = busiest_decode(&cluster).await;
    eprintln!("loads before SIGTERM:\n{}", cluster.describe_loads().await);
    cluster.decode[victim].terminate();
    // New requests during the drain are served elsewhere.
    let during = Streams::start(&cluster.router_url(), prompts[..2].iter().map(|p| ids_request(p, 8)).collect()).await;

    let results = streams.finish(secs(180)).await;
    check_all(&results, &expected, LONG).unwrap_or_else(|e| panic!("after SIGTERM to decode-{victim}: {e}"));
    let short = references(&prompts[..2], 8).await;
    check_all(&during.finish(secs(120)).await, &short, 8)
        .unwrap_or_else(|e| panic!("requests sent during the drain: {e}"));
    eprintln!("retries per stream: {:?}", retries(&results));
    let decode = &mut cluster.decode[victim];
    assert!(poll_until(secs(60), async || !decode.is_alive()).await, "decode-{victim} did not exit after draining");
}

/// A decode worker whose engine thread dies (a panic in its forward pass; here its routed
/// experts panic) leaves the cluster instead of staying registered and SERVING: it
/// deregisters, stops, and exits with an error naming the thread, while the request it held
/// completes on the other decode worker.
#[tokio::test]
async fn decode_worker_whose_engine_thread_dies_deregisters_and_exits() {
    let prompts = test_prompts(1, 51);
    let expected = references(&prompts, 8).await;
    // Leases far longer than the test: a key that goes away was deregistered, not expired.
    let mut cluster = Cluster::start("engine-death", ClusterSpec::new(1, 1).lease_ttl(secs(300))).await;
    // Twice decode-0's cache: the router gives it the next request (the most free blocks).
    let victim =
        cluster.add_worker_from(Role::Decode, DECODE_WORKER_FAILING_EXPERTS, &["--cache-tokens", "65536"]).await;
    let name = format!("decode-{victim}");
    cluster.wait_registered(Role::Decode, cluster.worker_ids(Role::Decode), secs(30)).await;

    // Requests the router sends elsewhere until it has seen the new worker complete too.
    let url = cluster.router_url();
    let process = &mut cluster.decode[victim];
    let mut sent = 0;
    wait_until(&format!("{name} to exit after its engine thread died"), secs(120), async || {
        let results = Streams::start(&url, vec![ids_request(&prompts[0], 8)]).await.finish(secs(60)).await;
        check_all(&results, &expected, 8).unwrap_or_else(|e| panic!("request {sent}: {e}"));
        sent += 1;
        !process.is_alive()
    })
    .await;
    eprintln!("{name} exited after {sent} requests");

    let status = cluster.decode[victim].wait_exit(secs(1)).await;
    assert_eq!(status.code(), Some(1), "{name} should exit with an error (not a signal): {status}");
    let registered = cluster.registered(Role::Decode).await.expect("etcd answers");
    assert!(!registered.contains(&name), "{name} exited but is still registered: {registered:?}");
    let log = std::fs::read_to_string(cluster.decode[victim].stderr_path()).expect("the worker's log");
    assert!(
        log.contains("the decode engine thread panicked: injected fault"),
        "{name}'s log does not name the dead thread:\n{}",
        cluster.decode[victim].log_tail(30)
    );

    // The survivor serves.
    let results = Streams::start(&url, vec![ids_request(&prompts[0], 8)]).await.finish(secs(60)).await;
    check_all(&results, &expected, 8).unwrap_or_else(|e| panic!("after {name} exited: {e}"));
}
