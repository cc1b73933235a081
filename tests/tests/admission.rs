//! Admission control: a router at its in-flight limit, or with no decode worker that has room
//! within the admission wait, refuses with RESOURCE_EXHAUSTED, and serves again afterwards.

use cluster_tests::grpc::{BOS, endless_request, expect_code, ids_request};
use cluster_tests::{Cluster, ClusterSpec, secs, within};
use proto::v1::generate_response::Event;
use tonic::Code;

#[tokio::test]
async fn router_at_its_inflight_limit_refuses_then_recovers() {
    let mut cluster =
        Cluster::start("inflight-limit", ClusterSpec::new(1, 1).router_args(&["--max-inflight", "1"])).await;
    let mut client = cluster.client().await;
    let mut long = within("Generate to answer", secs(60), client.generate(endless_request(&[BOS, 1, 2, 3], 2000)))
        .await
        .expect("the first request is admitted")
        .into_inner();
    loop {
        let msg = within("the first token", secs(60), long.message()).await.expect("stream").expect("a message");
        if let Some(Event::Token(_)) = msg.event {
            break;
        }
    }
    let refused = within("the second request", secs(30), client.generate_unary(ids_request(&[BOS, 9], 4)))
        .await
        .expect_err("the router holds one request already");
    expect_code(&refused, &[Code::ResourceExhausted]).expect("RESOURCE_EXHAUSTED");
    assert!(refused.message().contains("limit of 1"), "{}", refused.message());
    drop(long);
    cluster.wait_idle(secs(30)).await;
    let reply = within("a request after the first ended", secs(60), client.generate_unary(ids_request(&[BOS, 9], 4)))
        .await
        .expect("served once the slot is free");
    assert_eq!(reply.into_inner().generated_ids, cluster_tests::reference(&[BOS, 9], 4).await);
}

#[tokio::test]
async fn no_decode_room_within_the_wait_is_resource_exhausted() {
    let spec = ClusterSpec::new(1, 1).decode_args(&["--cache-tokens", "256"]).router_args(&["--queue-wait-ms", "300"]);
    let cluster = Cluster::start("no-decode-room", spec).await;
    let mut client = cluster.client().await;
    // 10 + 990 tokens never fit a 256-token cache.
    let refused = within("the oversized request", secs(30), client.generate_unary(ids_request(&[BOS; 10], 990)))
        .await
        .expect_err("no decode worker can hold 1000 tokens");
    expect_code(&refused, &[Code::ResourceExhausted]).expect("RESOURCE_EXHAUSTED");
    assert!(refused.message().contains("no decode worker had room"), "{}", refused.message());
    let reply = within("a request that fits", secs(60), client.generate_unary(ids_request(&[BOS, 9], 8)))
        .await
        .expect("a request that fits is served");
    assert_eq!(reply.into_inner().generated_ids, cluster_tests::reference(&[BOS, 9], 8).await);
}
