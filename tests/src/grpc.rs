//! Client side of the tests: channels, request builders, a streamed generation collected
//! with every event kept (to find duplicates, gaps, or events after the summary) and checked
//! against the reference, a raw-bytes codec for malformed requests, and the health check.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::bytes::{Buf, BufMut};
use proto::v1::generate_request::Prompt;
use proto::v1::generate_response::Event;
use proto::v1::generation_client::GenerationClient;
use proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, Logit, SamplingParams, Summary, TokenChunk, TokenIds,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::binaries::Reference;

/// Connect timeout of every test client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The default model's beginning-of-sequence id.
pub const BOS: u32 = 0;
/// The default model's end-of-sequence id (the default stop token).
pub const EOS: u32 = 1;
/// The default model's padding id: never in its training text, so it never generates it.
pub const PAD: u32 = 2;

/// A channel to `url` (`http://host:port`), connected now.
pub async fn connect(url: &str) -> Result<Channel, Status> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| Status::invalid_argument(format!("bad url {url}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {url}: {e}")))
}

/// A channel to `url` whose streams get a one-byte HTTP/2 window: a stream the test does not
/// read takes one byte and then stays at a zero window while the connection still answers
/// pings (a client that stopped reading); reading it later reopens the window a byte at a
/// time.
pub async fn connect_stingy(url: &str) -> Result<Channel, Status> {
    let channel = Endpoint::from_shared(url.to_string())
        .map_err(|e| Status::invalid_argument(format!("bad url {url}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(1)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {url}: {e}")))?;
    // A server applies the client's window setting when it acknowledges it; a stream opened
    // before that may be granted the default window. Once one call has completed on the
    // connection, the setting is in force for every later stream.
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?;
    Ok(channel)
}

/// A `Generation` client on `url`.
pub async fn generation_client(url: &str) -> GenerationClient<Channel> {
    let channel = connect(url).await.unwrap_or_else(|e| panic!("router client: {e}"));
    GenerationClient::new(channel)
}

/// Greedy request on token ids (run exactly as given).
pub fn ids_request(ids: &[u32], max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: ids.to_vec() })),
        sampling: Some(SamplingParams { max_new_tokens: Some(max_new_tokens), ..Default::default() }),
        prompt_logits_top: 0,
    }
}

/// Greedy request on token ids that runs to `max_new_tokens`: its only stop id is [`PAD`],
/// which the default model never generates (tests that need a long-running stream).
pub fn endless_request(ids: &[u32], max_new_tokens: u32) -> GenerateRequest {
    let mut request = ids_request(ids, max_new_tokens);
    if let Some(sampling) = request.sampling.as_mut() {
        sampling.stop_token_ids = vec![PAD];
    }
    request
}

/// Greedy request on text (the router prepends BOS).
pub fn text_request(text: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::Text(text.to_string())),
        sampling: Some(SamplingParams { max_new_tokens: Some(max_new_tokens), ..Default::default() }),
        prompt_logits_top: 0,
    }
}

/// `n` different prompts of varied lengths (1 to 61 ids), deterministic in `seed`; ids are
/// ordinary tokens (100..4196) after a BOS.
pub fn test_prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + (next() % 5) as usize) % 61;
            let mut ids = vec![BOS];
            ids.extend((1..len).map(|_| 100 + (next() % 4096) as u32));
            ids
        })
        .collect()
}

/// Everything one streamed `Generate` delivered, in order.
#[derive(Debug, Default, Clone)]
pub struct StreamResult {
    pub chunks: Vec<TokenChunk>,
    pub summary: Option<Summary>,
    /// The status that ended the stream (at the call or mid-stream), if any.
    pub error: Option<Status>,
    /// Events received after the summary (must be none).
    pub after_summary: usize,
    /// Responses without an event (must be none).
    pub empty_events: usize,
}

impl StreamResult {
    pub fn ids(&self) -> Vec<u32> {
        self.chunks.iter().map(|c| c.id).collect()
    }

    pub fn text(&self) -> String {
        self.chunks.iter().map(|c| c.text.as_str()).collect()
    }

    /// Checks the whole stream against `expected` (the greedy reference for the same
    /// prompt): no error, chunks indexed 0..n with no gap or duplicate, the same ids, then
    /// exactly one summary that agrees. Lists every problem found. (Text: [`Self::check_text`].)
    pub fn check(&self, expected: &Reference, max_new_tokens: u32) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Some(e) = &self.error {
            problems.push(format!("stream ended with {:?}: {}", e.code(), e.message()));
        }
        let indices: Vec<u32> = self.chunks.iter().map(|c| c.index).collect();
        let want_indices: Vec<u32> = (0..u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)).collect();
        if indices != want_indices {
            problems.push(format!("chunk indices are not 0..{}: {indices:?}", self.chunks.len()));
        }
        let ids = self.ids();
        if ids != expected.generated_ids {
            problems.push(format!(
                "generated ids differ from the reference ({} vs {} tokens; first difference at {}):\n  got  {ids:?}\n  want {:?}",
                ids.len(),
                expected.generated_ids.len(),
                first_difference(&ids, &expected.generated_ids),
                expected.generated_ids
            ));
        }
        if self.after_summary > 0 {
            problems.push(format!("{} events after the summary", self.after_summary));
        }
        if self.empty_events > 0 {
            problems.push(format!("{} responses without an event", self.empty_events));
        }
        match &self.summary {
            None => problems.push("no summary at the end of the stream".into()),
            Some(s) => {
                if let Err(e) = check_summary(s, &expected.prompt_ids, &expected.generated_ids, max_new_tokens) {
                    problems.push(e);
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
    }
}

impl StreamResult {
    /// The concatenated chunk text is the reference's decoded continuation (the proto's
    /// promise for `TokenChunk.text`).
    pub fn check_text(&self, expected: &Reference) -> Result<(), String> {
        if self.text() == expected.text {
            Ok(())
        } else {
            Err(format!(
                "concatenated chunk text differs from the reference's decoded text (ids {}):\n  got  {:?}\n  want {:?}",
                if self.ids() == expected.generated_ids { "identical" } else { "differ too" },
                self.text(),
                expected.text
            ))
        }
    }
}

/// Checks a summary against the prompt and the tokens that were generated.
pub fn check_summary(s: &Summary, prompt: &[u32], generated: &[u32], max_new_tokens: u32) -> Result<(), String> {
    let mut problems = Vec::new();
    let n = u32::try_from(generated.len()).unwrap_or(u32::MAX);
    if s.completion_tokens != n {
        problems.push(format!("summary.completion_tokens {} but {n} tokens", s.completion_tokens));
    }
    if s.prompt_tokens as usize != prompt.len() {
        problems.push(format!("summary.prompt_tokens {} but the prompt has {}", s.prompt_tokens, prompt.len()));
    }
    if s.prompt_ids != prompt {
        problems.push(format!("summary.prompt_ids {:?} differ from the prompt {prompt:?}", s.prompt_ids));
    }
    let last_is_stop = generated.last() == Some(&EOS);
    let reason = FinishReason::try_from(s.finish_reason).unwrap_or(FinishReason::Unspecified);
    let ok = match reason {
        FinishReason::Stop => last_is_stop,
        FinishReason::Length => n == max_new_tokens,
        FinishReason::Unspecified => false,
    };
    if !ok {
        problems.push(format!(
            "summary.finish_reason {reason:?} does not fit {n} of {max_new_tokens} tokens (last {:?})",
            generated.last()
        ));
    }
    if s.time_to_first_token_s.is_nan() || s.time_to_first_token_s <= 0.0 {
        problems.push(format!("summary.time_to_first_token_s {} is not > 0", s.time_to_first_token_s));
    }
    if s.total_time_s < s.time_to_first_token_s {
        problems.push(format!(
            "summary.total_time_s {} < time_to_first_token_s {}",
            s.total_time_s, s.time_to_first_token_s
        ));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Compares logits with the reference: same ids in the same order, values within `tol`.
pub fn check_logits(got: &[Logit], want: &[(u32, f32)], tol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} logits, want {}: got {got:?}", got.len(), want.len()));
    }
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.id != w.0 || (g.logit - w.1).abs() > tol)
        .map(|(i, (g, w))| format!("#{i}: got ({}, {}) want ({}, {})", g.id, g.logit, w.0, w.1))
        .collect();
    if bad.is_empty() { Ok(()) } else { Err(format!("logits differ (tolerance {tol}): {}", bad.join(", "))) }
}

fn first_difference(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

/// Runs a streamed `Generate` to its end, keeping every event. `progress`, when given,
/// counts the token chunks as they arrive (for tests that act mid-stream).
pub async fn collect_stream(
    client: &mut GenerationClient<Channel>,
    request: impl tonic::IntoRequest<GenerateRequest>,
    progress: Option<Arc<AtomicUsize>>,
) -> StreamResult {
    let mut result = StreamResult::default();
    let mut stream = match client.generate(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            result.error = Some(status);
            return result;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(GenerateResponse { event: Some(Event::Token(chunk)) })) => {
                if result.summary.is_some() {
                    result.after_summary += 1;
                }
                result.chunks.push(chunk);
                if let Some(p) = &progress {
                    p.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(Some(GenerateResponse { event: Some(Event::Summary(summary)) })) => {
                if result.summary.is_some() {
                    result.after_summary += 1;
                } else {
                    result.summary = Some(summary);
                }
            }
            Ok(Some(GenerateResponse { event: None })) => result.empty_events += 1,
            Ok(None) => break,
            Err(status) => {
                result.error = Some(status);
                break;
            }
        }
    }
    result
}

/// The first status of a streamed `Generate` (at the call or from its first message);
/// `Ok` when it starts streaming tokens.
pub async fn first_stream_status(
    client: &mut GenerationClient<Channel>,
    request: impl tonic::IntoRequest<GenerateRequest>,
) -> Result<(), Status> {
    let mut stream = client.generate(request).await?.into_inner();
    match stream.message().await? {
        Some(_) => Ok(()),
        None => Err(Status::unknown("stream ended with no event and no status")),
    }
}

/// A codec that sends and receives raw message bytes: for requests that are not valid
/// protobuf.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// Sends `body` as the message of the unary method `path` (e.g.
/// `/expertmesh.v1.Generation/GenerateUnary`) and returns the raw reply bytes.
pub async fn raw_unary(url: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let channel = connect(url).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(tonic::Response::into_inner)
}

/// `grpc.health.v1.Health/Check` for `service` ("" is the whole server).
pub async fn health_check(
    url: &str,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, Status> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = connect(url).await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = client.check(tonic_health::pb::HealthCheckRequest { service: service.to_string() }).await?.into_inner();
    ServingStatus::try_from(reply.status)
        .map_err(|_| Status::unknown(format!("unknown serving status {}", reply.status)))
}

/// Whether `code` is one of `codes`, with the status in the error message otherwise.
pub fn expect_code(status: &Status, codes: &[Code]) -> Result<(), String> {
    if codes.contains(&status.code()) {
        Ok(())
    } else {
        Err(format!("got {:?} ({:?}), want one of {codes:?}", status.code(), status.message()))
    }
}

/// Several streamed `Generate`s running at once, each on its own connection, with a live
/// token count per stream.
#[derive(Debug)]
pub struct Streams {
    tasks: tokio::task::JoinSet<(usize, StreamResult)>,
    progress: Vec<Arc<AtomicUsize>>,
}

impl Streams {
    /// Starts one stream per request against the router at `url`.
    pub async fn start(url: &str, requests: Vec<GenerateRequest>) -> Streams {
        let mut tasks = tokio::task::JoinSet::new();
        let mut progress = Vec::with_capacity(requests.len());
        for (i, request) in requests.into_iter().enumerate() {
            let mut client = generation_client(url).await;
            let count = Arc::new(AtomicUsize::new(0));
            progress.push(Arc::clone(&count));
            tasks.spawn(async move { (i, collect_stream(&mut client, request, Some(count)).await) });
        }
        Streams { tasks, progress }
    }

    /// Tokens received so far, per stream.
    pub fn tokens(&self) -> Vec<usize> {
        self.progress.iter().map(|p| p.load(Ordering::SeqCst)).collect()
    }

    /// Whether every stream has received at least `n` tokens.
    pub fn all_have(&self, n: usize) -> bool {
        self.tokens().iter().all(|&t| t >= n)
    }

    /// Waits for every stream to end (panics after `timeout`, naming the unfinished ones).
    pub async fn finish(mut self, timeout: Duration) -> Vec<StreamResult> {
        let mut results: Vec<Option<StreamResult>> = vec![None; self.progress.len()];
        let deadline = tokio::time::Instant::now() + timeout;
        while let Some(joined) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await.unwrap_or_else(|_| {
            let open: Vec<String> = results
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(|(i, _)| format!("#{i} ({} tokens so far)", self.progress[i].load(Ordering::SeqCst)))
                .collect();
            panic!("streams still open after {timeout:?}: {}", open.join(", "))
        }) {
            let (i, result) = joined.expect("a stream task panicked");
            results[i] = Some(result);
        }
        results.into_iter().map(|r| r.expect("every stream task reported")).collect()
    }
}

/// Checks every stream's text against its reference; one message listing every wrong one.
pub fn check_all_text(results: &[StreamResult], expected: &[Reference]) -> Result<(), String> {
    let failures: Vec<String> = results
        .iter()
        .zip(expected)
        .enumerate()
        .filter_map(|(i, (r, e))| r.check_text(e).err().map(|why| format!("stream {i}: {why}")))
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} streams have the wrong text:\n{}", failures.len(), results.len(), failures.join("\n")))
    }
}

/// Checks every stream against its reference (ids, indices, summary; not the text); one
/// message listing every wrong stream.
pub fn check_all(results: &[StreamResult], expected: &[Reference], max_new_tokens: u32) -> Result<(), String> {
    let failures: Vec<String> = results
        .iter()
        .zip(expected)
        .enumerate()
        .filter_map(|(i, (r, e))| {
            r.check(e, max_new_tokens)
                .err()
                .map(|why| format!("stream {i} (prompt of {} ids):\n{why}", e.prompt_ids.len()))
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} streams are wrong:\n{}", failures.len(), results.len(), failures.join("\n\n")))
    }
}

/// `retries` of each stream's summary (for logs).
pub fn retries(results: &[StreamResult]) -> Vec<Option<u32>> {
    results.iter().map(|r| r.summary.as_ref().map(|s| s.retries)).collect()
}
