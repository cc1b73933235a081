//! Bad input: every invalid request gets a precise error naming the field (streamed and
//! unary), oversized and malformed messages get a clear non-OK status (never a hang), and the
//! router keeps serving; the standard health check answers SERVING.

use std::time::Duration;

use cluster_tests::grpc::{expect_code, first_stream_status, ids_request, raw_unary, text_request};
use cluster_tests::{Cluster, ClusterSpec, secs, within};
use proto::v1::GenerateRequest;
use proto::v1::generate_request::Prompt;
use tonic::{Code, Status};

/// Longest an invalid request may take to be refused.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

async fn serves_a_good_request(cluster: &Cluster) {
    let prompt = [256, 71, 111, 111, 100];
    let expected = cluster_tests::reference(&prompt, 8).await;
    let mut client = cluster.client().await;
    let reply = within("a good request", secs(60), client.generate_unary(ids_request(&prompt, 8)))
        .await
        .expect("a good request after the bad ones");
    assert_eq!(reply.into_inner().generated_ids, expected);
}

fn with_sampling(mut r: GenerateRequest, f: impl FnOnce(&mut proto::v1::SamplingParams)) -> GenerateRequest {
    f(r.sampling.get_or_insert_with(Default::default));
    r
}

/// Checks `status` is InvalidArgument naming one of `fields`.
fn invalid_naming(status: &Status, fields: &[&str]) -> Result<(), String> {
    expect_code(status, &[Code::InvalidArgument])?;
    let msg = status.message();
    if fields.iter().any(|f| msg.contains(f)) {
        Ok(())
    } else {
        Err(format!("InvalidArgument {msg:?} names none of {fields:?}"))
    }
}

#[tokio::test]
async fn invalid_arguments_name_the_field() {
    let cluster = Cluster::start("invalid", ClusterSpec::new(1, 1)).await;
    let ten: Vec<u32> = (0..10).collect();
    let cases: Vec<(&str, GenerateRequest, &[&str])> = vec![
        ("empty token_ids", ids_request(&[], 8), &["prompt", "token_ids", "ids"]),
        ("empty text", text_request("", 8), &["prompt", "text"]),
        ("no prompt at all", GenerateRequest { prompt: None, ..ids_request(&[1], 8) }, &["prompt"]),
        (
            "prompt of 5000 ids (beyond the 4096 context)",
            ids_request(&vec![65; 5000], 8),
            &["prompt", "token_ids", "context"],
        ),
        ("max_new_tokens 0", ids_request(&ten, 0), &["max_new_tokens"]),
        ("prompt 10 + max_new_tokens 5000", ids_request(&ten, 5000), &["max_new_tokens"]),
        ("temperature -1", with_sampling(ids_request(&ten, 8), |s| s.temperature = Some(-1.0)), &["temperature"]),
        ("temperature NaN", with_sampling(ids_request(&ten, 8), |s| s.temperature = Some(f32::NAN)), &["temperature"]),
        ("top_p 0", with_sampling(ids_request(&ten, 8), |s| s.top_p = Some(0.0)), &["top_p"]),
        ("top_p 1.5", with_sampling(ids_request(&ten, 8), |s| s.top_p = Some(1.5)), &["top_p"]),
        ("token id 999999", ids_request(&[256, 999_999, 3], 8), &["token_ids", "ids", "prompt", "999999"]),
        ("token id 260 (= vocab)", ids_request(&[256, 260], 8), &["token_ids", "ids", "prompt", "260"]),
        (
            "prompt_logits_top 1001",
            GenerateRequest { prompt_logits_top: 1001, ..ids_request(&ten, 8) },
            &["prompt_logits_top"],
        ),
    ];

    let mut client = cluster.client().await;
    let mut failures = Vec::new();
    for (name, request, fields) in &cases {
        let unary =
            within(&format!("GenerateUnary({name})"), REFUSE_TIMEOUT, client.generate_unary(request.clone())).await;
        match unary {
            Ok(_) => failures.push(format!("GenerateUnary({name}): accepted")),
            Err(status) => {
                eprintln!("{name}: {:?}: {}", status.code(), status.message());
                if let Err(e) = invalid_naming(&status, fields) {
                    failures.push(format!("GenerateUnary({name}): {e}"));
                }
            }
        }
        let streamed =
            within(&format!("Generate({name})"), REFUSE_TIMEOUT, first_stream_status(&mut client, request.clone()))
                .await;
        match streamed {
            Ok(()) => failures.push(format!("Generate({name}): started streaming")),
            Err(status) => {
                if let Err(e) = invalid_naming(&status, fields) {
                    failures.push(format!("Generate({name}): {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} checks failed:\n{}", failures.len(), cases.len() * 2, failures.join("\n"));
    serves_a_good_request(&cluster).await;
}

#[tokio::test]
async fn oversized_and_malformed_messages_are_refused() {
    let cluster = Cluster::start("malformed", ClusterSpec::new(1, 1)).await;

    // 5 MiB of text: beyond gRPC's usual 4 MiB message limit.
    let mut client = cluster.client().await;
    let big = GenerateRequest { prompt: Some(Prompt::Text("a".repeat(5 << 20))), ..text_request("", 8) };
    let status = within("GenerateUnary with a 5 MiB prompt", REFUSE_TIMEOUT, client.generate_unary(big))
        .await
        .expect_err("a 5 MiB request is refused");
    eprintln!("5 MiB request: {:?}: {}", status.code(), status.message());
    expect_code(&status, &[Code::ResourceExhausted, Code::OutOfRange])
        .unwrap_or_else(|e| panic!("the oversized request's status: {e}"));
    let msg = status.message().to_lowercase();
    assert!(
        ["size", "limit", "large", "bytes"].iter().any(|w| msg.contains(w)),
        "the message should say the message is too large: {:?}",
        status.message()
    );

    // Bytes that are not a protobuf message.
    for body in [vec![0xff, 0xff, 0xff], vec![0x0a, 0x80], vec![0x12, 0x05, 0x0a, 0x03, 0x01]] {
        let reply = within(
            &format!("GenerateUnary with raw bytes {body:02x?}"),
            REFUSE_TIMEOUT,
            raw_unary(&cluster.router_url(), "/expertmesh.v1.Generation/GenerateUnary", body.clone()),
        )
        .await;
        match reply {
            Ok(bytes) => panic!("malformed request {body:02x?} was answered OK ({} bytes)", bytes.len()),
            Err(status) => eprintln!("malformed {body:02x?}: {:?}: {}", status.code(), status.message()),
        }
    }
    serves_a_good_request(&cluster).await;
}

#[tokio::test]
async fn health_check_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let cluster = Cluster::start("health", ClusterSpec::new(1, 1)).await;
    let url = cluster.router_url();
    let status = within("Health/Check", REFUSE_TIMEOUT, cluster_tests::grpc::health_check(&url, ""))
        .await
        .expect("Health/Check");
    assert_eq!(status, ServingStatus::Serving, "the router's overall health");
    let status = within(
        "Health/Check(Generation)",
        REFUSE_TIMEOUT,
        cluster_tests::grpc::health_check(&url, "expertmesh.v1.Generation"),
    )
    .await
    .expect("Health/Check for expertmesh.v1.Generation");
    assert_eq!(status, ServingStatus::Serving, "expertmesh.v1.Generation's health");
}
