//! The public `Generation` service: requests in, tokens and summaries out, errors mapped to
//! status codes in one place.

use crate::driver::{Delivery, Driver, Outcome, RequestError};
use crate::ids::RequestId;
use crate::request::{self, Prompt, SamplingRequest};
use model::{ChatMessage, FinishReason, InvalidRequest, ModelConfig, ModelType, RequestLimits, Tokenizer};
use proto::v1::generation_server::Generation;
use proto::v1::{self as pb, generate_request, generate_response, tokenize_request};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

/// Most ids a `Tokenize` reply holds within the encoding limit whatever their values: packed
/// varints of at most 5 bytes, after a tag and a length of at most 6.
const MAX_REPLY_IDS: usize = (cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES - 6) / 5;

/// What reflection lists for the router.
pub const DESCRIBED: cluster_core::serve::Described<'static> = cluster_core::serve::Described {
    descriptor_set: proto::FILE_DESCRIPTOR_SET,
    services: &["expertmesh.v1.Generation"],
};

/// The public service's routes: requests up to `max_request_bytes`, replies up to the
/// cluster's message limit.
pub fn routes(service: GenerationService, max_request_bytes: usize) -> tonic::service::Routes {
    tonic::service::Routes::new(
        proto::v1::generation_server::GenerationServer::new(service)
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES),
    )
}

#[derive(Debug)]
pub struct GenerationService {
    pub driver: Arc<Driver>,
    pub config: Arc<ModelConfig>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// One permit per request in flight (admission control).
    pub inflight: Arc<Semaphore>,
    pub max_inflight: usize,
    pub tracker: TaskTracker,
    pub draining: Arc<AtomicBool>,
}

fn status(e: RequestError) -> Status {
    match &e {
        RequestError::NoCapacity { .. } | RequestError::Stalled { .. } => Status::resource_exhausted(e.to_string()),
        RequestError::NoWorkers(_) | RequestError::RetriesExhausted { .. } | RequestError::ShuttingDown => {
            Status::unavailable(e.to_string())
        }
        RequestError::Refused(c) => Status::new(c.code, e.to_string()),
        RequestError::Internal(_) => Status::internal(e.to_string()),
        RequestError::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
    }
}

fn invalid(e: InvalidRequest) -> Status {
    crate::telemetry::request_ended(crate::telemetry::RequestOutcome::Invalid);
    Status::invalid_argument(e.to_string())
}

fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

fn logits(top: Vec<(u32, f32)>) -> Vec<pb::Logit> {
    top.into_iter().map(|(id, logit)| pb::Logit { id, logit }).collect()
}

fn chat(c: pb::Chat) -> Vec<ChatMessage> {
    c.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect()
}

/// The client's deadline from the `grpc-timeout` header (e.g. `300m`), if any.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What the summary of a started request reports besides its outcome.
struct Started {
    prompt_ids: Vec<u32>,
    request_id: RequestId,
    /// Empty when traces are not exported.
    trace_id: String,
}

impl Started {
    fn summary(&mut self, o: &Outcome) -> pb::Summary {
        summary(o, std::mem::take(&mut self.prompt_ids), self.request_id, self.trace_id.clone())
    }
}

/// The trace id as a response header, so a client sees it before the first token.
fn with_trace_id<T>(mut response: Response<T>, trace_id: &str) -> Response<T> {
    if !trace_id.is_empty()
        && let Ok(v) = trace_id.parse()
    {
        response.metadata_mut().insert("x-trace-id", v);
    }
    response
}

fn summary(o: &Outcome, prompt_ids: Vec<u32>, request_id: RequestId, trace_id: String) -> pb::Summary {
    pb::Summary {
        finish_reason: finish_reason(o.reason) as i32,
        prompt_tokens: prompt_ids.len() as u32,
        completion_tokens: o.completion_tokens as u32,
        time_to_first_token_s: o.time_to_first_token.as_secs_f64(),
        total_time_s: o.total.as_secs_f64(),
        request_id: request_id.to_string(),
        prompt_ids,
        retries: o.retries,
        trace_id,
        speculative: Some(pb::Speculative {
            draft_tokens: o.speculation.draft_tokens,
            accepted_tokens: o.speculation.accepted_tokens,
            draft_steps: o.speculation.draft_steps,
        }),
    }
}

type Deliveries = mpsc::Receiver<Result<Delivery, RequestError>>;

impl GenerationService {
    /// Validates, admits and starts a request; returns its deliveries.
    async fn start(&self, req: Request<pb::GenerateRequest>) -> Result<(Deliveries, Started), Status> {
        let started = Instant::now();
        // The request's root span (the client's, if it sent a traceparent).
        let span =
            tracing::info_span!("request", request_id = tracing::field::Empty, prompt_tokens = tracing::field::Empty);
        cluster_core::trace::extract_into(req.metadata(), &span);
        if self.draining.load(Ordering::Relaxed) {
            return Err(status(RequestError::ShuttingDown));
        }
        let timeout = deadline(&req);
        let r = req.into_inner();
        let prompt = r.prompt.map(|p| match p {
            generate_request::Prompt::Text(t) => Prompt::Text(t),
            generate_request::Prompt::TokenIds(ids) => Prompt::Ids(ids.ids),
            generate_request::Prompt::Chat(c) => Prompt::Chat(chat(c)),
        });
        let s = r.sampling.unwrap_or_default();
        let sampling = SamplingRequest {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: s.seed,
            stop_token_ids: s.stop_token_ids,
        };
        let tokenizer = self.tokenizer.clone();
        let limits = RequestLimits::of(&self.config);
        // Tokenizing a long text is compute: keep it off the runtime.
        let ids = tokio::task::spawn_blocking(move || request::prompt_to_run(prompt, tokenizer.as_deref(), &limits))
            .await
            .map_err(|e| Status::internal(format!("tokenizer task: {e}")))?
            .map_err(invalid)?;
        let job =
            request::job(ids, sampling, r.prompt_logits_top, &limits, model::sampling::random_seed).map_err(invalid)?;
        let permit = self.inflight.clone().try_acquire_owned().map_err(|_| {
            crate::telemetry::request_ended(crate::telemetry::RequestOutcome::Rejected);
            Status::resource_exhausted(format!(
                "the router is at its limit of {} requests in flight",
                self.max_inflight
            ))
        })?;
        let request_id = RequestId::fresh();
        let prompt_ids = job.prompt.clone();
        let (tx, rx) = mpsc::channel(crate::driver::out_capacity(job.params.max_new_tokens));
        let driver = self.driver.clone();
        span.record("request_id", request_id.to_string());
        span.record("prompt_tokens", job.prompt.len());
        let trace_id = cluster_core::trace::trace_id(&span).unwrap_or_default();
        self.tracker.spawn(tracing::Instrument::instrument(
            async move {
                let _permit = permit;
                crate::telemetry::inflight(1.0);
                match timeout {
                    None => driver.run(job, tx, started).await,
                    Some(t) => {
                        if tokio::time::timeout(t, driver.run(job, tx.clone(), started)).await.is_err() {
                            crate::telemetry::request_ended(crate::telemetry::RequestOutcome::DeadlineExceeded);
                            let _ = tx.send(Err(RequestError::DeadlineExceeded(t))).await;
                        }
                    }
                }
                crate::telemetry::inflight(-1.0);
            },
            span,
        ));
        Ok((rx, Started { prompt_ids, request_id, trace_id }))
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let (rx, mut started) = self.start(req).await?;
        let trace_id = started.trace_id.clone();
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |d| {
            let event = match d.map_err(status)? {
                Delivery::Token { index, id, text, prompt_logits_top } => {
                    generate_response::Event::Token(pb::TokenChunk {
                        index: index as u32,
                        id,
                        text,
                        prompt_logits_top: logits(prompt_logits_top),
                    })
                }
                Delivery::Done(o) => generate_response::Event::Summary(started.summary(&o)),
            };
            Ok(pb::GenerateResponse { event: Some(event) })
        });
        Ok(with_trace_id(Response::new(Box::pin(stream)), &trace_id))
    }

    async fn generate_unary(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateUnaryResponse>, Status> {
        let (mut rx, mut started) = self.start(req).await?;
        let mut reply = pb::GenerateUnaryResponse::default();
        while let Some(d) = rx.recv().await {
            match d.map_err(status)? {
                Delivery::Token { id, text, prompt_logits_top, .. } => {
                    reply.generated_ids.push(id);
                    reply.text.push_str(&text);
                    if !prompt_logits_top.is_empty() {
                        reply.last_prompt_logits_top = logits(prompt_logits_top);
                    }
                }
                Delivery::Done(o) => {
                    reply.summary = Some(started.summary(&o));
                    return Ok(with_trace_id(Response::new(reply), &started.trace_id));
                }
            }
        }
        Err(Status::internal("the request ended without an outcome"))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let prompt = req.into_inner().input.map(|i| match i {
            tokenize_request::Input::Text(t) => Prompt::Text(t),
            tokenize_request::Input::Chat(c) => Prompt::Chat(chat(c)),
        });
        let tokenizer = self.tokenizer.clone();
        // Only as much text as the reply can hold is tokenized.
        let too_long = |at_least| {
            InvalidRequest::Prompt(format!(
                "the text is at least {at_least} tokens, more than the {MAX_REPLY_IDS} ids a Tokenize reply holds"
            ))
        };
        let ids = tokio::task::spawn_blocking(move || {
            request::prompt_ids(prompt, tokenizer.as_deref(), MAX_REPLY_IDS, too_long)
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizer task: {e}")))?
        .map_err(invalid)?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn get_model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let c = &self.config;
        Ok(Response::new(pb::ModelInfo {
            model_type: match c.model_type {
                ModelType::DeepseekV3 => "deepseek_v3",
                ModelType::DeepseekV2 => "deepseek_v2",
            }
            .into(),
            vocab_size: c.vocab_size as u32,
            context_length: c.max_position_embeddings as u32,
            num_layers: c.num_hidden_layers as u32,
            hidden_size: c.hidden_size as u32,
            num_routed_experts: c.n_routed_experts as u32,
            experts_per_token: c.router.top_k as u32,
            latent_dim: c.latent_dim() as u32,
            eos_token_ids: c.eos_token_ids.clone(),
            has_tokenizer: self.tokenizer.is_some(),
            has_chat_template: self.tokenizer.as_ref().is_some_and(|t| t.has_chat_template()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        let mut r = Request::new(());
        r.metadata_mut().insert("grpc-timeout", "300m".parse().expect("ascii"));
        assert_eq!(deadline(&r), Some(Duration::from_millis(300)));
        r.metadata_mut().insert("grpc-timeout", "2S".parse().expect("ascii"));
        assert_eq!(deadline(&r), Some(Duration::from_secs(2)));
        r.metadata_mut().insert("grpc-timeout", "x".parse().expect("ascii"));
        assert_eq!(deadline(&r), None);
    }
}
