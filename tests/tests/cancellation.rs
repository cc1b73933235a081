//! Cancellation: a client that drops its stream, or whose deadline passes, frees everything
//! the request held on every worker (no sequence running or waiting, every block free).

use std::time::Duration;

use cluster_tests::grpc::{collect_stream, expect_code, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, poll_until, secs, within};
use proto::v1::generate_response::Event;
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
    let mut stream = within("Generate to answer", secs(60), client.generate(ids_request(&[256, 1, 2, 3, 4, 5], HUGE)))
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
    let mut request = tonic::Request::new(ids_request(&[256, 9, 8, 7], HUGE));
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
    let mut request = tonic::Request::new(ids_request(&[256, 9, 8, 7], HUGE));
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
