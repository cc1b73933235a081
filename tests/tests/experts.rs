//! Remote experts: with routed experts on three expert workers (`--shard i/3`) and prefill
//! and decode workers started with `--remote-experts`, greedy output is exactly the
//! in-process engine's (`expertmesh generate`, local experts), and every expert worker
//! served tokens.

use cluster_tests::grpc::{Streams, check_all, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, references, secs};
use std::collections::BTreeSet;

const MAX_NEW: u32 = 16;
const EXPERT_WORKERS: usize = 3;

#[tokio::test]
async fn remote_experts_match_local_reference() {
    let prompts = test_prompts(6, 7);
    let expected = references(&prompts, MAX_NEW).await;
    let cluster = Cluster::start("experts", ClusterSpec::new(1, 1).experts(EXPERT_WORKERS)).await;

    // The shards partition the slots: every (layer, expert) is hosted exactly once.
    let mut all = BTreeSet::new();
    let mut total = 0;
    for i in 0..EXPERT_WORKERS {
        let slots = cluster.expert_slots(i).await.expect("GetSlots");
        assert!(!slots.is_empty(), "expert-{i} hosts nothing");
        total += slots.len();
        all.extend(slots);
    }
    assert_eq!(total, all.len(), "a slot is hosted twice");

    let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    let results = streams.finish(secs(120)).await;
    check_all(&results, &expected, MAX_NEW).unwrap_or_else(|e| panic!("{e}"));

    for i in 0..EXPERT_WORKERS {
        let load = cluster.expert_load(i).await.expect("GetLoad");
        let tokens: u64 = load.slots.iter().map(|s| s.tokens).sum();
        let busy = load.slots.iter().filter(|s| s.tokens > 0).count();
        eprintln!("expert-{i}: {} requests, {tokens} tokens over {busy}/{} slots", load.requests, load.slots.len());
        assert!(tokens > 0 && load.requests > 0, "expert-{i} served nothing: {load:?}");
    }
}
