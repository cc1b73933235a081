//! Speculative decoding through the cluster (off by default: the other cluster tests run
//! without it): decode workers drafting with the MTP layer give
//! exactly the plain engine's greedy tokens (`expertmesh generate --speculative-tokens 0`),
//! with the MTP layer's routed experts on expert workers too, and report their drafts in the
//! Summary; a prefill worker that ships no MTP rows leaves its sequences unspeculated.

use cluster_tests::binaries::{parse_reference, run_cli};
use cluster_tests::grpc::{Streams, check_all, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, references, secs};

const MAX_NEW: u32 = 24;

/// (drafted, accepted) summed over the results' summaries.
fn drafts(results: &[cluster_tests::grpc::StreamResult]) -> (u64, u64) {
    results.iter().fold((0, 0), |(d, a), r| {
        let spec = r.summary.as_ref().and_then(|s| s.speculative.as_ref());
        let (drafted, accepted) = spec.map(|s| (s.draft_tokens, s.accepted_tokens)).unwrap_or_default();
        assert!(accepted <= drafted, "{spec:?}");
        (d + drafted, a + accepted)
    })
}

#[tokio::test]
async fn speculating_decode_workers_with_remote_experts_match_the_plain_engine() {
    let prompts = test_prompts(6, 11);
    let expected = references(&prompts, MAX_NEW).await;
    let spec = ClusterSpec::new(1, 1)
        .experts(2)
        .prefill_args(&["--speculative-tokens", "1"])
        .decode_args(&["--speculative-tokens", "3"]);
    let cluster = Cluster::start("speculation", spec).await;
    let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(120)).await;
    check_all(&results, &expected, MAX_NEW).unwrap_or_else(|e| panic!("{e}"));
    let (drafted, accepted) = drafts(&results);
    eprintln!("drafted {drafted}, accepted {accepted}");
    assert!(accepted > 0, "the trained MTP layer's drafts are sometimes right");
    // The MTP layer (model layer 4) ran its routed experts on the expert workers.
    let mut mtp_tokens = 0;
    for i in 0..2 {
        let load = cluster.expert_load(i).await.expect("GetLoad");
        mtp_tokens += load.slots.iter().filter(|s| s.layer == 4).map(|s| s.tokens).sum::<u64>();
    }
    assert!(mtp_tokens > 0, "no MTP-layer expert ran remotely");

    // Sampled: the same tokens as the in-process engine with the same seed and drafts (draws
    // are keyed by seed, token index and purpose, wherever the sequence runs).
    for (i, p) in prompts.iter().take(3).enumerate() {
        let seed = 40 + i as u64;
        let mut request = ids_request(p, MAX_NEW);
        let sampling = request.sampling.as_mut().expect("sampling");
        (sampling.temperature, sampling.top_p, sampling.seed) = (Some(0.8), Some(0.95), Some(seed));
        let got = Streams::start(&cluster.router_url(), vec![request]).await.finish(secs(60)).await;
        let got: Vec<u32> = got[0].chunks.iter().map(|t| t.id).collect();
        let ids = p.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let (max_new, seed) = (MAX_NEW.to_string(), seed.to_string());
        let args = [
            "generate",
            "--json",
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            &max_new,
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            &seed,
            "--speculative-tokens",
            "3",
        ];
        let out = run_cli(&args).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want = parse_reference(&String::from_utf8_lossy(&out.stdout)).expect("generate --json");
        assert_eq!(got, want.generated_ids, "prompt {i}: sampled tokens through the cluster");
    }
}

#[tokio::test]
async fn a_prefill_worker_without_the_mtp_layer_leaves_sequences_unspeculated() {
    let prompts = test_prompts(4, 12);
    let expected = references(&prompts, MAX_NEW).await;
    let spec =
        ClusterSpec::new(1, 1).prefill_args(&["--speculative-tokens", "0"]).decode_args(&["--speculative-tokens", "2"]);
    let cluster = Cluster::start("speculation-mixed", spec).await;
    let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(120)).await;
    check_all(&results, &expected, MAX_NEW).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(drafts(&results), (0, 0), "no MTP rows arrived: nothing to draft from");
}
