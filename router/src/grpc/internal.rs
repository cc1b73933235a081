//! Clients of the workers' internal services, speaking domain types.

use crate::ids::AttemptId;
use crate::request::Job;
use model::{FinishReason, SpeculationStats};
use proto::internal::decode_client::DecodeClient;
use proto::internal::prefill_client::PrefillClient;
use proto::internal::{self as pb, decode_event};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A failed call to a worker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CallError {
    pub code: Code,
    pub message: String,
}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        CallError { code: s.code(), message: s.message().to_string() }
    }
}

impl CallError {
    /// Whether another worker pair may succeed: the worker or the link failed, or it was
    /// full. Refusals of the request itself are not retried.
    pub fn retryable(&self) -> bool {
        !matches!(self.code, Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::Unimplemented)
    }
}

/// One event of a sequence on its decode worker.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeEvent {
    Token { id: u32, prompt_logits_top: Vec<(u32, f32)> },
    Finished(FinishReason, SpeculationStats),
}

/// A worker's reported load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    pub queued_tokens: u64,
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub block_size: usize,
}

fn sampling(job: &Job) -> pb::Sampling {
    let p = &job.params;
    pb::Sampling {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        seed: p.seed.unwrap_or_default(),
        max_new_tokens: p.max_new_tokens as u32,
        stop_token_ids: p.stop_token_ids.clone(),
    }
}

/// The events of one admitted sequence. Dropping it releases the sequence on the worker.
#[derive(Debug)]
pub struct DecodeEvents {
    stream: tonic::Streaming<pb::DecodeEvent>,
}

impl DecodeEvents {
    /// The next event; `Ok(None)` if the stream ended without Finished (the worker left).
    pub async fn next(&mut self) -> Result<Option<DecodeEvent>, CallError> {
        loop {
            let Some(e) = self.stream.message().await? else { return Ok(None) };
            match e.event {
                Some(decode_event::Event::Token(t)) => {
                    let top = t.prompt_logits_top.into_iter().map(|l| (l.id, l.logit)).collect();
                    return Ok(Some(DecodeEvent::Token { id: t.id, prompt_logits_top: top }));
                }
                Some(decode_event::Event::Finished(f)) => {
                    let reason = match proto::v1::FinishReason::try_from(f.reason) {
                        Ok(proto::v1::FinishReason::Stop) => FinishReason::Stop,
                        _ => FinishReason::Length,
                    };
                    let spec = f.speculative.map_or_else(SpeculationStats::default, |s| SpeculationStats {
                        draft_tokens: s.draft_tokens,
                        accepted_tokens: s.accepted_tokens,
                        draft_steps: s.draft_steps,
                    });
                    return Ok(Some(DecodeEvent::Finished(reason, spec)));
                }
                Some(decode_event::Event::Admitted(_)) | None => continue,
            }
        }
    }
}

/// Reserves the sequence on a decode worker (`local_prefill`: the worker prefills it
/// itself) and returns its event stream once admitted.
pub async fn admit(
    channel: Channel,
    attempt: AttemptId,
    job: &Job,
    local_prefill: bool,
) -> Result<(usize, DecodeEvents), CallError> {
    let req = pb::AdmitRequest {
        request_id: attempt.get(),
        prompt_tokens: job.prompt.len() as u32,
        sampling: Some(sampling(job)),
        local_prefill_prompt_ids: if local_prefill { job.prompt.clone() } else { Vec::new() },
        prompt_logits_top: job.prompt_logits_top as u32,
    };
    let mut req = tonic::Request::new(req);
    cluster_core::trace::inject(&tracing::Span::current(), req.metadata_mut());
    let mut stream = DecodeClient::new(channel).admit(req).await?.into_inner();
    match stream.message().await? {
        Some(pb::DecodeEvent { event: Some(decode_event::Event::Admitted(a)) }) => {
            Ok((a.free_blocks as usize, DecodeEvents { stream }))
        }
        other => Err(CallError {
            code: Code::Internal,
            message: format!("decode worker answered {other:?} before Admitted"),
        }),
    }
}

/// What a prefill worker reports once the decode worker holds the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillDone {
    pub first_token: u32,
    pub kv_bytes: u64,
}

/// Prefills `job` on a prefill worker, which ships the cache to `decode_addr`.
pub async fn prefill(
    channel: Channel,
    attempt: AttemptId,
    job: &Job,
    decode_addr: &str,
) -> Result<PrefillDone, CallError> {
    let req = pb::PrefillRequest {
        request_id: attempt.get(),
        prompt_ids: job.prompt.clone(),
        sampling: Some(sampling(job)),
        prompt_logits_top: job.prompt_logits_top as u32,
        decode_addr: decode_addr.to_string(),
    };
    let mut req = tonic::Request::new(req);
    cluster_core::trace::inject(&tracing::Span::current(), req.metadata_mut());
    let r = PrefillClient::new(channel).max_encoding_message_size(usize::MAX).prefill(req).await?.into_inner();
    Ok(PrefillDone { first_token: r.first_token, kv_bytes: r.kv_bytes })
}

fn load(l: pb::WorkerLoad) -> Load {
    Load {
        running: l.running_sequences as usize,
        waiting: l.waiting_sequences as usize,
        queued_tokens: l.queued_tokens,
        free_blocks: l.free_blocks as usize,
        total_blocks: l.total_blocks as usize,
        block_size: l.block_size as usize,
    }
}

pub async fn decode_load(channel: Channel) -> Result<Load, CallError> {
    Ok(load(DecodeClient::new(channel).get_load(pb::LoadRequest {}).await?.into_inner()))
}

pub async fn prefill_load(channel: Channel) -> Result<Load, CallError> {
    Ok(load(PrefillClient::new(channel).get_load(pb::LoadRequest {}).await?.into_inner()))
}
