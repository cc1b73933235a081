//! Cancellation: a client that drops its stream, whose deadline passes, or that stops
//! reading (its HTTP/2 window stays at zero) frees everything the request held on every
//! worker (no sequence running or waiting, every block free).

use std::time::Duration;

use cluster_tests::grpc::{
    BOS, PAD, collect_stream, connect_stingy, endless_request, expect_code, ids_request, test_prompts,
};
use cluster_tests::{Cluster, ClusterSpec, poll_until, secs, within};
use proto::internal::decode_client::DecodeClient;
use proto::internal::{AdmitRequest, Sampling, decode_event};
use proto::v1::generate_response::Event;
use proto::v1::generation_client::GenerationClient;
use tonic::Code;

/// Far more tokens than the test waits for (the context is 4096).
const HUGE: u32 = 2000;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A short request still works and matches the reference.
async fn serves_a_good_request(cluster: &Cluster) {
    let prompt = test_prompts(2, 5).pop().expect("two prompts");
    let expected = cluster_tests::reference(&prompt, 8).await;
    let mut client = cluster.client().await;
    let reply = within("a good request", secs(60), client.generate_unary(ids_request(&prompt, 8)))
        .await
        .expect("a good request after the cancellation");
    assert_eq!(reply.into_inner().generated_ids, expected);
}

#[tokio::test]
async fn dropped_stream_frees_every_worker() {
    let mut cluster = Cluster::start("drop-stream", ClusterSpec::new(1, 2)).await;
    let mut client = cluster.client().await;
    let mut stream =
        within("Generate to answer", secs(60), client.generate(endless_request(&[BOS, 1, 2, 3, 4, 5], HUGE)))
            .await
            .expect("a long request is accepted (prompt + max_new_tokens fit the context)")
            .into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        match within("the next token", secs(60), stream.message()).await {
            Ok(Some(msg)) => {
                if let Some(Event::Token(_)) = msg.event {
                    tokens += 1;
                }
            }
            Ok(None) => panic!("the stream of {HUGE} tokens ended after {tokens}"),
            Err(e) => panic!("the stream failed after {tokens} tokens: {e}"),
        }
    }
    let busy = {
        let c = &cluster;
        poll_until(secs(2), async || {
            let mut any = false;
            for i in 0..c.decode.len() {
                any |= c.decode_load(i).await.is_ok_and(|l| l.running_sequences > 0);
            }
            any
        })
        .await
    };
    eprintln!("a decode worker reported the running sequence: {busy}");
    drop(stream);
    drop(client);

    cluster.wait_idle(IDLE_TIMEOUT).await;
    serves_a_good_request(&cluster).await;
}

async fn prefill_busy(c: &Cluster) -> bool {
    c.prefill_load(0).await.is_ok_and(|l| l.running_sequences + l.waiting_sequences > 0)
}

#[tokio::test]
async fn dropped_before_first_token_frees_every_worker() {
    let mut cluster = Cluster::start("drop-early", ClusterSpec::new(1, 1)).await;
    // A long prompt: the request is still in prefill when the client goes away.
    let prompt: Vec<u32> = (0..3000u32).map(|i| i % 256).collect();
    let mut client = cluster.client().await;
    let c = &cluster;
    // Cancel as soon as the prefill worker holds the prompt (or after a few seconds):
    // dropping the call, or the stream if headers came first, cancels the RPC.
    let mut call = Box::pin(client.generate(ids_request(&prompt, 1000)));
    let seen = tokio::select! {
        answered = &mut call => {
            let seen = poll_until(secs(5), async || prefill_busy(c).await).await;
            drop(answered);
            seen
        }
        seen = poll_until(secs(5), async || prefill_busy(c).await) => seen,
    };
    drop(call);
    eprintln!("prefill-0 held the prompt when the client cancelled: {seen}");
    drop(client);

    cluster.wait_idle(IDLE_TIMEOUT).await;
    serves_a_good_request(&cluster).await;
}

#[tokio::test]
async fn stream_deadline_cancels_the_request() {
    let mut cluster = Cluster::start("deadline-stream", ClusterSpec::new(1, 1)).await;
    let mut client = cluster.client().await;
    let mut request = tonic::Request::new(endless_request(&[BOS, 9, 8, 7], HUGE));
    request.set_timeout(Duration::from_millis(300));
    let result = within("a stream with a 300 ms deadline", secs(60), collect_stream(&mut client, request, None)).await;
    let status = result.error.as_ref().unwrap_or_else(|| {
        panic!(
            "a {HUGE}-token stream with a 300 ms deadline ended without error after {} tokens (summary {:?})",
            result.chunks.len(),
            result.summary
        )
    });
    expect_code(status, &[Code::DeadlineExceeded, Code::Cancelled])
        .unwrap_or_else(|e| panic!("the deadline's status: {e}"));
    assert!(result.summary.is_none(), "a cancelled stream has no summary");
    eprintln!("stream ended with {:?} after {} tokens", status.code(), result.chunks.len());

    cluster.wait_idle(IDLE_TIMEOUT).await;
    serves_a_good_request(&cluster).await;
}

#[tokio::test]
async fn unary_deadline_cancels_the_request() {
    let mut cluster = Cluster::start("deadline-unary", ClusterSpec::new(1, 1)).await;
    let mut client = cluster.client().await;
    let mut request = tonic::Request::new(endless_request(&[BOS, 9, 8, 7], HUGE));
    request.set_timeout(Duration::from_millis(300));
    match within("GenerateUnary with a 300 ms deadline", secs(60), client.generate_unary(request)).await {
        Ok(reply) => panic!(
            "a {HUGE}-token GenerateUnary with a 300 ms deadline succeeded ({} tokens)",
            reply.into_inner().generated_ids.len()
        ),
        Err(status) => expect_code(&status, &[Code::DeadlineExceeded, Code::Cancelled])
            .unwrap_or_else(|e| panic!("the deadline's status: {e}")),
    }

    cluster.wait_idle(IDLE_TIMEOUT).await;
    serves_a_good_request(&cluster).await;
}

/// Tokens a stalled request asks for: its cache reservation (with the 4-token prompt) is
/// 251 of the 256 blocks of a 4096-token cache, and generating them all takes longer than
/// the stall timeout (4000 decode steps of the default model are over 300 ms even on a fast
/// idle core; here they take about 2 s).
const STALLED_TOKENS: u32 = 4000;
const STALL_TIMEOUT_MS: &str = "200";

/// Reads what is left of a stream: the token count, whether a summary came, and the status
/// that ended it.
async fn read_to_end<T>(
    stream: &mut tonic::Streaming<T>,
    is_token: impl Fn(&T) -> bool,
) -> (usize, bool, Option<tonic::Status>) {
    let (mut tokens, mut other) = (0, false);
    loop {
        match stream.message().await {
            Ok(Some(m)) if is_token(&m) => tokens += 1,
            Ok(Some(_)) => other = true,
            Ok(None) => return (tokens, other, None),
            Err(status) => return (tokens, other, Some(status)),
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_request_and_never_starves_others() {
    let spec = ClusterSpec::new(1, 1).decode_args(&["--cache-tokens", "4096"]).router_args(&[
        "--stall-timeout-ms",
        STALL_TIMEOUT_MS,
        "--queue-wait-ms",
        "30000",
    ]);
    let mut cluster = Cluster::start("stalled-client", spec).await;
    let channel = connect_stingy(&cluster.router_url()).await.expect("a channel to the router");
    let mut stingy = GenerationClient::new(channel);
    let mut stalled =
        within("Generate to answer", secs(60), stingy.generate(endless_request(&[BOS, 1, 2, 3], STALLED_TOKENS)))
            .await
            .expect("the stalled request is accepted")
            .into_inner();
    let held = {
        let c = &cluster;
        poll_until(secs(5), async || c.decode_load(0).await.is_ok_and(|l| l.running_sequences == 1)).await
    };
    eprintln!("decode-0 reported the stalled request running: {held}");

    // Each needs more than the 5 blocks the stalled request leaves: they wait for its cache.
    let mut normal = tokio::task::JoinSet::new();
    for prompt in test_prompts(3, 11) {
        let mut client = cluster.client().await;
        normal.spawn(async move {
            let reply = client.generate_unary(ids_request(&prompt, 100)).await;
            (prompt, reply)
        });
    }
    for (prompt, reply) in within("the normal requests", secs(120), normal.join_all()).await {
        let reply = reply.unwrap_or_else(|status| {
            panic!("a normal request failed while a client stalled: {:?}: {}", status.code(), status.message())
        });
        assert_eq!(reply.into_inner().generated_ids, cluster_tests::reference(&prompt, 100).await);
    }
    // The stalled stream is still open, and none of its cache is held.
    cluster.wait_idle(IDLE_TIMEOUT).await;

    let (tokens, summary, status) = within(
        "reading the stalled stream",
        secs(120),
        read_to_end(&mut stalled, |m| matches!(m.event, Some(Event::Token(_)))),
    )
    .await;
    let status = status
        .unwrap_or_else(|| panic!("the stalled stream ended without error after {tokens} tokens (summary: {summary})"));
    expect_code(&status, &[Code::ResourceExhausted]).unwrap_or_else(|e| panic!("the stalled stream's status: {e}"));
    assert!(status.message().contains("--stall-timeout-ms"), "{}", status.message());
    assert!(!summary, "a stalled request has no summary");
    assert!((tokens as u32) < STALLED_TOKENS, "the stalled request ran to its end ({tokens} tokens)");
    eprintln!("the stalled stream had {tokens} tokens, then {:?}: {}", status.code(), status.message());
    serves_a_good_request(&cluster).await;
}

#[tokio::test]
async fn a_decode_consumer_that_stops_reading_loses_its_sequence() {
    let spec = ClusterSpec::new(1, 1).decode_args(&["--stall-timeout-ms", STALL_TIMEOUT_MS]);
    let mut cluster = Cluster::start("stalled-decode-consumer", spec).await;
    let channel = connect_stingy(&cluster.decode[0].url()).await.expect("a channel to decode-0");
    let admit = AdmitRequest {
        request_id: 7,
        prompt_tokens: 4,
        sampling: Some(Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
            max_new_tokens: STALLED_TOKENS,
            stop_token_ids: vec![PAD],
        }),
        local_prefill_prompt_ids: vec![BOS, 1, 2, 3],
        prompt_logits_top: 0,
    };
    let mut events = within("Admit to answer", secs(60), DecodeClient::new(channel).admit(admit))
        .await
        .expect("admitted")
        .into_inner();
    // The stream is still open, and the engine has released the sequence.
    cluster.wait_idle(IDLE_TIMEOUT).await;

    let (tokens, _, status) = within(
        "reading the stalled sequence's events",
        secs(120),
        read_to_end(&mut events, |e| matches!(e.event, Some(decode_event::Event::Token(_)))),
    )
    .await;
    let status = status.unwrap_or_else(|| panic!("the stalled sequence ended without error after {tokens} tokens"));
    expect_code(&status, &[Code::ResourceExhausted]).unwrap_or_else(|e| panic!("the stalled sequence's status: {e}"));
    assert!(status.message().contains("--stall-timeout-ms"), "{}", status.message());
    assert!((tokens as u32) < STALLED_TOKENS, "the stalled sequence ran to its end ({tokens} tokens)");
    eprintln!("the stalled sequence had {tokens} tokens, then {:?}: {}", status.code(), status.message());
    serves_a_good_request(&cluster).await;
}
