//! Distributed tracing: with OTLP export on, one request yields one trace spanning router,
//! prefill, decode and expert workers, parents and links right, the KV transfer with its byte
//! count; the trace id the client gets (header and summary) is that trace's.

use std::collections::{BTreeMap, BTreeSet};

use cluster_tests::grpc::{generation_client, ids_request};
use cluster_tests::otlp::{Received, Receiver};
use cluster_tests::{Cluster, ClusterSpec, secs};
use proto::v1::generate_response::Event;

const MAX_NEW: u32 = 6;
const SERVICES: [&str; 4] = ["router", "prefill-worker", "decode-worker", "expert-worker"];

#[tokio::test]
async fn one_request_is_one_trace_across_every_process() {
    let receiver = Receiver::start().await;
    let mut spec = ClusterSpec::new(1, 1).experts(2);
    spec.env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ]);
    let cluster = Cluster::start("tracing", spec).await;

    let mut client = generation_client(&cluster.router_url()).await;
    let response = client.generate(ids_request(&[0, 72, 101, 108, 108, 111], MAX_NEW)).await.expect("Generate");
    let header = response.metadata().get("x-trace-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut stream = response.into_inner();
    let mut summary = None;
    while let Some(msg) = stream.message().await.expect("stream") {
        if let Some(Event::Summary(s)) = msg.event {
            summary = Some(s);
        }
    }
    let summary = summary.expect("a summary");
    let trace_id = summary.trace_id.clone();
    assert_eq!(trace_id.len(), 32, "summary trace id {trace_id:?}");
    assert_eq!(header.as_deref(), Some(trace_id.as_str()), "x-trace-id header and summary differ");

    // Every process has exported its spans of this trace.
    let spans: Vec<Received> = cluster_tests::wait_for("spans of the trace from every service", secs(30), async || {
        let spans: Vec<Received> = receiver.spans().into_iter().filter(|s| s.trace_id() == trace_id).collect();
        let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let missing: Vec<&str> = SERVICES.iter().copied().filter(|s| !services.contains(s)).collect();
        let names: BTreeSet<&str> = spans.iter().map(|s| s.span.name.as_str()).collect();
        let wanted = ["request", "prefill", "kv_transfer", "kv_import", "decode", "expert_call", "expert_compute"];
        let absent: Vec<&str> = wanted.iter().copied().filter(|n| !names.contains(n)).collect();
        if missing.is_empty() && absent.is_empty() {
            Ok(spans)
        } else {
            Err(format!("missing services {missing:?}, spans {absent:?}"))
        }
    })
    .await;
    let by_id: BTreeMap<String, &Received> = spans.iter().map(|s| (s.span_id(), s)).collect();
    let named = |name: &str| spans.iter().filter(|s| s.span.name == name).collect::<Vec<_>>();
    let parent_of = |s: &Received| by_id.get(&s.parent_id()).copied();

    // One root, the router's request span; every other span's parent is in the trace.
    let roots: Vec<_> =
        spans.iter().filter(|s| s.parent_id().chars().all(|c| c == '0') || s.parent_id().is_empty()).collect();
    assert_eq!(roots.len(), 1, "roots: {:?}", roots.iter().map(|s| (&s.service, &s.span.name)).collect::<Vec<_>>());
    assert_eq!((roots[0].service.as_str(), roots[0].span.name.as_str()), ("router", "request"));
    for s in &spans {
        if s.span_id() != roots[0].span_id() {
            assert!(parent_of(s).is_some(), "{} {} has a parent outside the trace", s.service, s.span.name);
        }
    }
    let ancestors = |s: &Received| {
        let mut chain = Vec::new();
        let mut at = parent_of(s);
        while let Some(p) = at {
            chain.push((p.service.clone(), p.span.name.clone()));
            at = parent_of(p);
        }
        chain
    };
    // Hops: router -> prefill -> kv_transfer -> decode's import; router -> decode.
    let prefill = named("prefill");
    assert!(
        prefill.iter().all(|p| parent_of(p).is_some_and(|r| r.service == "router")),
        "prefill's parent is the router's"
    );
    let transfer = named("kv_transfer");
    assert!(transfer.iter().all(|t| ancestors(t).contains(&("prefill-worker".into(), "prefill".into()))));
    let bytes = transfer[0]
        .int("bytes")
        .unwrap_or_else(|| panic!("kv_transfer carries bytes: {:?}", transfer[0].span.attributes));
    assert!(bytes > 0, "kv_transfer bytes {bytes}");
    assert!(named("kv_send_layer").len() >= 3, "one send span per layer");
    assert!(named("kv_import").iter().all(|i| parent_of(i).is_some_and(|p| p.span.name == "kv_transfer")));
    assert!(named("decode").iter().all(|d| parent_of(d).is_some_and(|r| r.service == "router")));
    // Expert calls (from the prefill batch) have the expert workers' compute as children.
    for c in named("expert_compute") {
        let p = parent_of(c).expect("expert_compute has a parent");
        assert_eq!((p.service.as_str(), p.span.name.as_str()), ("prefill-worker", "expert_call"));
    }

    // Decode steps are their own traces, linked to the sequence's decode span.
    let decode_span = named("decode")[0].span_id();
    let linked = receiver
        .spans()
        .into_iter()
        .filter(|s| s.span.name == "decode_step")
        .filter(|s| {
            s.span.links.iter().any(|l| {
                cluster_tests::otlp::hex(&l.trace_id) == trace_id && cluster_tests::otlp::hex(&l.span_id) == decode_span
            })
        })
        .count();
    assert!(linked >= 1, "no decode_step links to the sequence's decode span");
    eprintln!("trace {trace_id}: {} spans, {linked} linked decode steps", spans.len());
    eprintln!("{}", render(&spans, &roots[0].span_id(), 0));
    drop(cluster);
}

/// The span tree under `id`, one line per span: service, name, duration, integer fields.
fn render(spans: &[Received], id: &str, depth: usize) -> String {
    let Some(s) = spans.iter().find(|s| s.span_id() == id) else { return String::new() };
    let ms = s.span.end_time_unix_nano.saturating_sub(s.span.start_time_unix_nano) as f64 / 1e6;
    let fields: Vec<String> = ["layer", "bytes", "rows", "groups", "num_tokens", "batch"]
        .iter()
        .filter_map(|k| s.int(k).map(|v| format!("{k}={v}")))
        .collect();
    let mut out = format!("{}{} {} ({ms:.2} ms) {}\n", "  ".repeat(depth), s.service, s.span.name, fields.join(" "));
    let mut children: Vec<&Received> = spans.iter().filter(|c| c.parent_id() == id).collect();
    children.sort_by_key(|c| c.span.start_time_unix_nano);
    for c in children {
        out.push_str(&render(spans, &c.span_id(), depth + 1));
    }
    out
}
