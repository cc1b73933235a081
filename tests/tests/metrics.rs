//! Every process serves Prometheus metrics (`--metrics-listen`): after traffic through
//! router, prefill, decode and expert workers placed by a controller, each endpoint has its
//! named series, with values that reflect the traffic.

use cluster_tests::cluster::scrape;
use cluster_tests::grpc::{Streams, check_all, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, Process, references, secs};

const MAX_NEW: u32 = 8;

/// The value of the first sample of `series` (a name with its labels, as exposed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A series (name and labels, as exposed) and the test its value must pass.
type Expect<'a> = (&'a str, fn(f64) -> bool);

/// Waits until `process`'s endpoint has every series of `want` with a value passing its test.
async fn expect_series(process: &Process, want: &[Expect<'_>]) -> String {
    let addr = process.metrics_addr().expect("started with --metrics-listen");
    let what = format!("{}'s metrics at {addr}", process.name());
    cluster_tests::wait_for(&what, secs(30), async || {
        let text = scrape(addr).await?;
        let missing: Vec<String> = want
            .iter()
            .filter(|(s, ok)| !value(&text, s).is_some_and(*ok))
            .map(|(s, _)| format!("{s} = {:?}", value(&text, s)))
            .collect();
        if missing.is_empty() { Ok(text) } else { Err(format!("not yet: {missing:?}")) }
    })
    .await
}

fn positive(v: f64) -> bool {
    v > 0.0
}

fn present(v: f64) -> bool {
    v >= 0.0
}

#[tokio::test]
async fn every_process_exposes_its_metrics() {
    let prompts = test_prompts(4, 11);
    let expected = references(&prompts, MAX_NEW).await;
    let spec = ClusterSpec::new(1, 1)
        .experts(2)
        .controllers(1, &["--check-period-ms", "250"])
        .expert_args(&["--load-report-ms", "250"])
        // Speculating, for the speculative decoding series.
        .prefill_args(&["--speculative-tokens", "1"])
        .decode_args(&["--speculative-tokens", "2"])
        .with_metrics();
    let cluster = Cluster::start("metrics", spec).await;
    let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(120)).await;
    check_all(&results, &expected, MAX_NEW).unwrap_or_else(|e| panic!("{e}"));

    let router = expect_series(
        &cluster.router,
        &[
            ("expertmesh_requests_total{outcome=\"ok\"}", |v| v >= 5.0), // 4 + the readiness probe
            ("expertmesh_time_to_first_token_seconds_count", positive),
            ("expertmesh_time_to_first_token_seconds_bucket", present),
            ("expertmesh_time_per_output_token_seconds_count", positive),
            ("expertmesh_generated_tokens_total", positive),
            ("expertmesh_router_inflight_requests", present),
        ],
    )
    .await;
    assert!(router.contains("# TYPE expertmesh_time_to_first_token_seconds histogram"), "{router}");
    expect_series(
        &cluster.prefill[0],
        &[
            ("expertmesh_kv_transfers_total{outcome=\"ok\"}", positive),
            ("expertmesh_kv_transfer_bytes_total", positive),
            ("expertmesh_kv_transfer_duration_seconds_count", positive),
            ("expertmesh_prefill_queued_tokens", present),
            ("expertmesh_prefill_running_sequences", present),
            ("expertmesh_cache_blocks{state=\"free\"}", positive),
            ("expertmesh_cache_blocks{state=\"used\"}", present),
        ],
    )
    .await;
    expect_series(
        &cluster.decode[0],
        &[
            ("expertmesh_decode_steps_total", positive),
            ("expertmesh_decode_tokens_total", positive),
            ("expertmesh_decode_step_duration_seconds_count", positive),
            ("expertmesh_speculative_draft_tokens_total", positive),
            ("expertmesh_speculative_accepted_tokens_total", present),
            ("expertmesh_speculative_accepted_per_step_count", positive),
            ("expertmesh_decode_running_sequences", present),
            ("expertmesh_decode_waiting_sequences", present),
            ("expertmesh_cache_blocks{state=\"free\"}", positive),
        ],
    )
    .await;
    for expert in &cluster.expert {
        let text = expect_series(
            expert,
            &[
                ("expertmesh_expert_tokens_total", positive),
                ("expertmesh_expert_requests_total", positive),
                ("expertmesh_expert_placement_version", positive),
            ],
        )
        .await;
        let slot = format!("expertmesh_expert_tokens_total{{worker=\"{}\",layer=\"", expert.worker_id());
        assert!(text.contains(&slot), "per-slot series {slot}...: {text}");
    }
    expect_series(
        &cluster.controllers[0],
        &[
            ("expertmesh_controller_leader", |v| v == 1.0),
            ("expertmesh_expert_workers_desired", |v| v >= 1.0),
            ("expertmesh_expert_workers_live", |v| v == 2.0),
            ("expertmesh_placement_version", positive),
            ("expertmesh_rebalances_total{reason=\"initial\"}", |v| v == 1.0),
            ("expertmesh_rebalance_duration_seconds_count", positive),
            ("expertmesh_expert_load_max_mean_ratio", |v| v >= 1.0),
        ],
    )
    .await;
}
