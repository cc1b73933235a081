//! Bad input: every invalid request gets a precise error naming the field (streamed and
//! unary), oversized and malformed messages get a clear non-OK status (never a hang), and the
//! router keeps serving; the standard health check answers SERVING. A text prompt far longer
//! than the context is refused without tokenizing it all (the router's peak memory stays
//! bounded), and an undecodable request is the caller's INVALID_ARGUMENT.

use std::time::Duration;

use cluster_tests::grpc::{BOS, expect_code, first_stream_status, ids_request, raw_unary, text_request};
use cluster_tests::{Cluster, ClusterSpec, secs, within};
use proto::v1::generate_request::Prompt;
use proto::v1::{Chat, ChatMessage, GenerateRequest, TokenizeRequest, tokenize_request};
use tonic::{Code, Status};

/// Longest an invalid request may take to be refused.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

async fn serves_a_good_request(cluster: &Cluster) {
    let prompt = [BOS, 71, 111, 111, 100];
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
        ("token id 999999", ids_request(&[BOS, 999_999, 3], 8), &["token_ids", "ids", "prompt", "999999"]),
        ("token id 6144 (= vocab)", ids_request(&[BOS, 6144], 8), &["token_ids", "ids", "prompt", "6144"]),
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

/// A process's resident memory now and at its peak (VmRSS, VmHWM), in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib = |field: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    (kib("VmRSS:") / 1024, kib("VmHWM:") / 1024)
}

/// About `bytes` of prose, code and CJK text: mostly short tokens, many pieces.
fn long_text(bytes: usize) -> String {
    let parts = [
        "The quick brown fox jumps over the lazy dog near the river bank today.\n",
        "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); }\n",
        "深度求索是一家专注于人工智能基础技术研究的公司。下一句话，再来一次。\n",
    ];
    let mut text = String::with_capacity(bytes + 128);
    for part in parts.iter().cycle() {
        if text.len() + part.len() > bytes {
            break;
        }
        text.push_str(part);
    }
    text
}

#[tokio::test]
async fn a_text_far_beyond_the_context_is_refused_without_tokenizing_it_all() {
    let cluster = Cluster::start("long-text", ClusterSpec::new(1, 1)).await;
    let pid = cluster.router.pid();
    let (rss, before) = memory_mib(pid);
    eprintln!("router before: rss {rss} MiB, peak {before} MiB");
    // Just under the 4 MiB message limit: about a million tokens against a context of 4096.
    let text = long_text((4 << 20) - (64 << 10));
    let chat = Prompt::Chat(Chat { messages: vec![ChatMessage { role: "user".into(), content: text.clone() }] });
    let requests = [
        GenerateRequest { prompt: Some(Prompt::Text(text.clone())), ..text_request("", 8) },
        GenerateRequest { prompt: Some(chat), ..text_request("", 8) },
        GenerateRequest { prompt: Some(Prompt::Text(text.clone())), ..text_request("", 8) },
        GenerateRequest { prompt: Some(Prompt::Text(text.clone())), ..text_request("", 8) },
    ];
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for r in requests {
        let url = cluster.router_url();
        calls.spawn(async move { cluster_tests::grpc::generation_client(&url).await.generate_unary(r).await });
    }
    let replies = within("four multi-MiB prompts", REFUSE_TIMEOUT, calls.join_all()).await;
    eprintln!("four {} MiB prompts refused in {:?}", text.len() >> 20, started.elapsed());
    let (rss, peak) = memory_mib(pid);
    eprintln!("router after the prompts: rss {rss} MiB, peak {peak} MiB");
    for reply in replies {
        let status = reply.expect_err("a prompt of a million tokens is refused");
        eprintln!("{:?}: {}", status.code(), status.message());
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        let msg = status.message();
        assert!(msg.starts_with("prompt:") && msg.contains("context of 4096"), "names prompt and context: {msg}");
    }
    // Tokenize takes as much as its reply can hold (far more than the context) and no more.
    let mut client = cluster.client().await;
    let tokenize = TokenizeRequest { input: Some(tokenize_request::Input::Text(text.clone())) };
    let status =
        within("Tokenize of a multi-MiB text", REFUSE_TIMEOUT, client.tokenize(tokenize)).await.expect_err("refused");
    eprintln!("Tokenize: {:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("Tokenize reply"), "{}", status.message());
    // A text that fits its reply is tokenized whole.
    let fits = long_text(256 << 10);
    let tokenize = TokenizeRequest { input: Some(tokenize_request::Input::Text(fits.clone())) };
    let ids =
        within("Tokenize of 256 KiB", REFUSE_TIMEOUT, client.tokenize(tokenize)).await.expect("fits").into_inner().ids;
    let tokenizer = cluster_tests::binaries::default_tokenizer().await;
    assert_eq!(ids, tokenizer.encode(&fits).expect("encode"), "the whole text, BOS first");

    let (rss, after) = memory_mib(pid);
    eprintln!("router after: rss {rss} MiB, peak {after} MiB (+{} MiB)", after.saturating_sub(before));
    // Tokenizing one such prompt whole took about 600 MiB; the messages themselves take a few.
    assert!(after < before + PEAK_GROWTH_MIB, "the router's peak grew from {before} to {after} MiB");
    serves_a_good_request(&cluster).await;
}

/// Bound on the router's peak memory growth over four multi-MiB prompts and the Tokenize calls.
const PEAK_GROWTH_MIB: u64 = 200;

#[tokio::test]
async fn undecodable_requests_are_invalid_arguments_with_the_decode_error() {
    let cluster = Cluster::start("undecodable", ClusterSpec::new(1, 1)).await;
    let url = cluster.router_url();
    // GenerateRequest.text (field 1, length-delimited) and a chat message's content holding
    // bytes that are not UTF-8; Tokenize's text likewise; then bytes that are not protobuf.
    let bad_text = vec![0x0a, 0x04, b'h', 0xc3, 0x28, b'i'];
    let bad_chat = vec![0x1a, 0x08, 0x0a, 0x06, 0x12, 0x04, b'h', 0xff, 0xfe, b'i'];
    let cases: [(&str, &'static str, Vec<u8>, &str); 5] = [
        ("text with invalid UTF-8", "/expertmesh.v1.Generation/GenerateUnary", bad_text.clone(), "UTF-8"),
        ("chat content with invalid UTF-8", "/expertmesh.v1.Generation/GenerateUnary", bad_chat, "UTF-8"),
        ("Tokenize text with invalid UTF-8", "/expertmesh.v1.Generation/Tokenize", bad_text.clone(), "UTF-8"),
        ("a streamed request with invalid UTF-8", "/expertmesh.v1.Generation/Generate", bad_text, "UTF-8"),
        ("garbage", "/expertmesh.v1.Generation/GenerateUnary", vec![0xff, 0xff, 0xff], "decode"),
    ];
    for (what, path, body, names) in cases {
        let reply = within(what, REFUSE_TIMEOUT, raw_unary(&url, path, body)).await;
        let status = reply.expect_err(what);
        eprintln!("{what}: {:?}: {}", status.code(), status.message());
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
        let msg = status.message();
        assert!(msg.contains("could not be decoded") && msg.contains(names), "{what}: {msg}");
    }
    serves_a_good_request(&cluster).await;
}
