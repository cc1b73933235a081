//! Serving: a router with two prefill and two decode workers gives exactly the in-process
//! engine's greedy output, streamed or unary; tokenizer, model info and prompt logits.

use cluster_tests::grpc::{
    Streams, check_all, check_all_text, check_logits, check_summary, ids_request, test_prompts, text_request,
};
use std::collections::BTreeSet;

use cluster_tests::{Cluster, ClusterSpec, poll_until, references, secs, within};
use proto::v1::tokenize_request::Input;
use proto::v1::{ModelInfoRequest, TokenizeRequest};

const MAX_NEW: u32 = 32;

#[tokio::test]
async fn concurrent_streams_match_reference() {
    let prompts = test_prompts(16, 1);
    let expected = references(&prompts, MAX_NEW).await;
    let mut cluster = Cluster::start("serving", ClusterSpec::new(2, 2)).await;

    let requests = prompts.iter().map(|p| ids_request(p, MAX_NEW)).collect();
    let streams = Streams::start(&cluster.router_url(), requests).await;
    // Where the work went: GetLoad has no history, so workers are sampled while the streams
    // run. Timing-dependent, hence printed for the log, never asserted.
    let mut seen_busy = BTreeSet::new();
    let want_tokens: Vec<usize> = expected.iter().map(|e| e.generated_ids.len()).collect();
    poll_until(secs(30), async || {
        for i in 0..2 {
            if cluster.prefill_load(i).await.is_ok_and(|l| l.running_sequences + l.waiting_sequences > 0) {
                seen_busy.insert(format!("prefill-{i}"));
            }
            if cluster.decode_load(i).await.is_ok_and(|l| l.running_sequences + l.waiting_sequences > 0) {
                seen_busy.insert(format!("decode-{i}"));
            }
        }
        seen_busy.len() == 4 || streams.tokens().iter().zip(&want_tokens).all(|(got, want)| got >= want)
    })
    .await;
    eprintln!("workers seen busy while the streams ran: {seen_busy:?}");
    let results = streams.finish(secs(120)).await;
    let verdict = check_all(&results, &expected, MAX_NEW);
    eprintln!("loads after the run:\n{}", cluster.describe_loads().await);
    if let Err(e) = verdict {
        panic!("{e}");
    }
    // Tokens are right; now the text the chunks carry.
    check_all_text(&results, &expected).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn unary_tokenize_and_model_info() {
    let cluster = Cluster::start("unary", ClusterSpec::new(1, 1)).await;
    let mut client = cluster.client().await;

    let info = client.get_model_info(ModelInfoRequest {}).await.expect("GetModelInfo").into_inner();
    assert_eq!(info.model_type, "deepseek_v3", "{info:?}");
    assert_eq!(info.vocab_size, 6144, "{info:?}");
    assert_eq!(info.context_length, 4096, "{info:?}");
    assert_eq!(info.num_layers, 4, "{info:?}");
    assert_eq!(info.hidden_size, 256, "{info:?}");
    assert_eq!(info.num_routed_experts, 16, "{info:?}");
    assert_eq!(info.experts_per_token, 4, "{info:?}");
    assert_eq!(info.latent_dim, 64 + 16, "kv_lora_rank + qk_rope_head_dim: {info:?}");
    assert_eq!(info.eos_token_ids, vec![1], "{info:?}");
    assert!(info.has_tokenizer, "{info:?}");

    // BOS, then the default model's BPE tokens.
    let text = "Hello, mesh!";
    let ids = client
        .tokenize(TokenizeRequest { input: Some(Input::Text(text.into())) })
        .await
        .expect("Tokenize")
        .into_inner()
        .ids;
    let want = cluster_tests::binaries::default_tokenizer().await.encode(text).expect("encode");
    assert_eq!(want[0], 0, "BOS first");
    assert_eq!(ids, want, "Tokenize({text:?})");

    // Unary on token ids.
    let prompt = test_prompts(3, 7).pop().expect("three prompts");
    let expected = cluster_tests::reference_full(&prompt, MAX_NEW).await;
    let reply = client.generate_unary(ids_request(&prompt, MAX_NEW)).await.expect("GenerateUnary").into_inner();
    assert_eq!(reply.generated_ids, expected.generated_ids, "GenerateUnary on ids {prompt:?}");
    let unary_text = (reply.text.clone(), expected.text.clone());
    assert!(reply.last_prompt_logits_top.is_empty(), "logits were not asked for: {:?}", reply.last_prompt_logits_top);
    let summary = reply.summary.expect("GenerateUnary has a summary");
    check_summary(&summary, &prompt, &reply.generated_ids, MAX_NEW).unwrap_or_else(|e| panic!("unary summary: {e}"));

    // Unary on text: runs the tokenized prompt.
    let expected = cluster_tests::reference_full(&want, MAX_NEW).await;
    let reply = client.generate_unary(text_request(text, MAX_NEW)).await.expect("GenerateUnary(text)").into_inner();
    assert_eq!(reply.generated_ids, expected.generated_ids, "GenerateUnary on text {text:?}");
    let summary = reply.summary.expect("GenerateUnary has a summary");
    assert_eq!(summary.prompt_ids, want, "the text prompt as run");
    check_summary(&summary, &want, &reply.generated_ids, MAX_NEW).unwrap_or_else(|e| panic!("unary text summary: {e}"));

    // Last (so the checks above run whatever happens here): the reply's text is the
    // decoded continuation, as `expertmesh generate` decodes it.
    assert_eq!(unary_text.0, unary_text.1, "GenerateUnary text (ids identical)");
}

#[tokio::test]
async fn prompt_logits_top_match_reference() {
    let prompt = test_prompts(5, 3).pop().expect("five prompts");
    let expected = cluster_tests::reference_full(&prompt, 8).await;
    assert_eq!(expected.last_prompt_logits_top.len(), 20, "the reference reports 20 logits");
    let cluster = Cluster::start("logits", ClusterSpec::new(1, 1)).await;
    let mut client = cluster.client().await;

    let mut request = ids_request(&prompt, 8);
    request.prompt_logits_top = 20;
    let result = within(
        "a stream with prompt logits",
        secs(60),
        cluster_tests::grpc::collect_stream(&mut client, request.clone(), None),
    )
    .await;
    result.check(&expected, 8).unwrap_or_else(|e| panic!("the stream with prompt_logits_top: {e}"));
    let first = result.chunks.first().expect("at least one chunk");
    check_logits(&first.prompt_logits_top, &expected.last_prompt_logits_top, 1e-5)
        .unwrap_or_else(|e| panic!("first chunk's prompt logits: {e}"));
    for c in &result.chunks[1..] {
        assert!(c.prompt_logits_top.is_empty(), "chunk {} carries prompt logits", c.index);
    }

    let reply = within("GenerateUnary with prompt logits", secs(60), client.generate_unary(request))
        .await
        .expect("GenerateUnary")
        .into_inner();
    assert_eq!(reply.generated_ids, expected.generated_ids);
    check_logits(&reply.last_prompt_logits_top, &expected.last_prompt_logits_top, 1e-5)
        .unwrap_or_else(|e| panic!("unary prompt logits: {e}"));
}

/// The smallest generation: the prefill's token is the whole answer.
#[tokio::test]
async fn max_new_tokens_one() {
    let prompt = test_prompts(4, 9).pop().expect("four prompts");
    let expected = cluster_tests::reference_full(&prompt, 1).await;
    let cluster = Cluster::start("one-token", ClusterSpec::new(1, 1)).await;
    let mut client = cluster.client().await;

    let result = within(
        "a one-token stream",
        secs(60),
        cluster_tests::grpc::collect_stream(&mut client, ids_request(&prompt, 1), None),
    )
    .await;
    result.check(&expected, 1).unwrap_or_else(|e| panic!("a stream with max_new_tokens 1: {e}"));
    let reply = within("a one-token GenerateUnary", secs(60), client.generate_unary(ids_request(&prompt, 1)))
        .await
        .expect("GenerateUnary with max_new_tokens 1")
        .into_inner();
    assert_eq!(reply.generated_ids, expected.generated_ids);
}
