//! The only module that touches protobuf types: the `Prefill` service, the `Decode.PushKv`
//! client (`decode`), the conversions between wire and domain types, and the mapping of
//! domain errors to `tonic::Status` ([`status`]).

mod decode;

use std::sync::Arc;
use std::time::Duration;

use cluster_core::WorkerId;
use cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES;
use proto::internal::prefill_server::{Prefill, PrefillServer};
use proto::internal::{LoadRequest, PrefillReply, WorkerLoad};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::engine_thread::EngineHandle;
use crate::error::{PrefillError, TransferError};
use crate::request::{ModelLimits, PrefillOutcome, PrefillRequest};

pub use decode::DecodeClients;

/// The server type whose health status the worker reports.
pub type Server = PrefillServer<PrefillService>;

/// The `Prefill` service of one worker.
#[derive(Debug)]
pub struct PrefillService {
    engine: EngineHandle,
    limits: ModelLimits,
    decode: Arc<DecodeClients>,
    worker_id: WorkerId,
}

impl PrefillService {
    pub fn new(engine: EngineHandle, limits: ModelLimits, decode: Arc<DecodeClients>, worker_id: WorkerId) -> Self {
        PrefillService { engine, limits, decode, worker_id }
    }

    /// Checks, queues and waits for one request.
    async fn prefill_one(&self, request: proto::internal::PrefillRequest) -> Result<PrefillOutcome, PrefillError> {
        let request = to_domain(request)?;
        self.limits.check(&request.prompt, &request.params, request.prompt_logits_top)?;
        let sink = self.decode.get(&request.decode_addr)?;
        self.engine.prefill(request, sink).await
    }
}

/// What reflection lists for this worker.
pub const DESCRIBED: cluster_core::serve::Described<'static> = cluster_core::serve::Described {
    descriptor_set: proto::FILE_DESCRIPTOR_SET,
    services: &["expertmesh.internal.v1.Prefill"],
};

/// The `Prefill` service with the cluster's message limits, ready to serve.
pub fn server(service: PrefillService) -> Server {
    PrefillServer::new(service)
        .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
}

#[tonic::async_trait]
impl Prefill for PrefillService {
    async fn prefill(
        &self,
        request: Request<proto::internal::PrefillRequest>,
    ) -> Result<Response<PrefillReply>, Status> {
        let parent = request.metadata().clone();
        let request = request.into_inner();
        let span =
            tracing::info_span!("prefill", request_id = request.request_id, num_tokens = request.prompt_ids.len());
        cluster_core::trace::extract_into(&parent, &span);
        let outcome = self.prefill_one(request).instrument(span).await.map_err(|e| status(&e))?;
        Ok(Response::new(PrefillReply {
            first_token: outcome.first_token,
            kv_bytes: outcome.kv_bytes,
            queue_s: outcome.queue.as_secs_f64(),
            compute_s: outcome.compute.as_secs_f64(),
            transfer_s: outcome.transfer.as_secs_f64(),
        }))
    }

    async fn get_load(&self, _: Request<LoadRequest>) -> Result<Response<WorkerLoad>, Status> {
        let load = self.engine.load();
        Ok(Response::new(WorkerLoad {
            worker_id: self.worker_id.to_string(),
            running_sequences: load.running_sequences,
            waiting_sequences: load.waiting_sequences,
            queued_tokens: load.queued_tokens,
            free_blocks: load.free_blocks,
            total_blocks: load.total_blocks,
            block_size: load.block_size,
        }))
    }
}

/// The wire request as a domain request; refuses missing fields.
fn to_domain(r: proto::internal::PrefillRequest) -> Result<PrefillRequest, PrefillError> {
    let invalid = |field, reason: &str| PrefillError::InvalidRequest { field, reason: reason.to_string() };
    if r.decode_addr.trim().is_empty() {
        return Err(invalid("decode_addr", "must not be empty"));
    }
    let s = r.sampling.ok_or_else(|| invalid("sampling", "is required"))?;
    let params = model::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        // The router always resolves the seed.
        seed: Some(s.seed),
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: s.stop_token_ids,
    };
    Ok(PrefillRequest {
        request_id: r.request_id,
        prompt: r.prompt_ids,
        params,
        prompt_logits_top: r.prompt_logits_top as usize,
        decode_addr: r.decode_addr,
    })
}

/// Every domain error's status, in one place. The router retries on codes: UNAVAILABLE
/// means "try another worker"; RESOURCE_EXHAUSTED "busy"; a decode worker's refusal keeps
/// its code where the router can act on it (NOT_FOUND: the reservation is gone).
pub fn status(e: &PrefillError) -> Status {
    let code = match e {
        PrefillError::InvalidRequest { .. } => Code::InvalidArgument,
        PrefillError::QueueFull { .. } | PrefillError::PromptTooLarge { .. } => Code::ResourceExhausted,
        PrefillError::Duplicate(_) => Code::AlreadyExists,
        PrefillError::ShuttingDown => Code::Unavailable,
        PrefillError::Engine(_) => Code::Internal,
        // Deterministic: the router must not retry it on another worker.
        PrefillError::Rejected(_) => Code::FailedPrecondition,
        PrefillError::Transfer(TransferError::Unreachable { .. }) => Code::Unavailable,
        PrefillError::Transfer(TransferError::Refused { code, .. }) => match code {
            Code::NotFound
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::DeadlineExceeded => *code,
            // The decode worker rejected data this worker produced (INVALID_ARGUMENT) or
            // failed otherwise: not the caller's fault.
            _ => Code::Internal,
        },
        PrefillError::Transfer(TransferError::EarlyReply { .. }) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// How long to wait for a decode worker's TCP connection.
pub const DECODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use proto::internal::Sampling;

    fn wire() -> proto::internal::PrefillRequest {
        proto::internal::PrefillRequest {
            request_id: 7,
            prompt_ids: vec![1, 2],
            sampling: Some(Sampling {
                temperature: 0.5,
                top_p: 0.9,
                top_k: 40,
                seed: 11,
                max_new_tokens: 8,
                stop_token_ids: vec![3],
            }),
            prompt_logits_top: 2,
            decode_addr: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn sampling_converts_field_by_field() {
        let r = to_domain(wire()).expect("valid");
        assert_eq!(
            r.params,
            model::SamplingParams {
                temperature: 0.5,
                top_k: 40,
                top_p: 0.9,
                seed: Some(11),
                max_new_tokens: 8,
                stop_token_ids: vec![3]
            }
        );
        assert_eq!((r.request_id, r.prompt_logits_top, r.prompt), (7, 2, vec![1, 2]));
    }

    #[test]
    fn missing_fields_are_invalid_arguments_naming_them() {
        let s = status(&to_domain(proto::internal::PrefillRequest { decode_addr: " ".into(), ..wire() }).unwrap_err());
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("decode_addr"), "{}", s.message());
        let s = status(&to_domain(proto::internal::PrefillRequest { sampling: None, ..wire() }).unwrap_err());
        assert!(s.message().starts_with("sampling"), "{}", s.message());
    }

    #[test]
    fn refusals_keep_actionable_codes() {
        let refused = |code| {
            status(&PrefillError::Transfer(TransferError::Refused {
                addr: "d:1".into(),
                request_id: 1,
                code,
                message: "m".into(),
            }))
        };
        assert_eq!(refused(Code::NotFound).code(), Code::NotFound);
        assert!(refused(Code::NotFound).message().contains("d:1"));
        assert_eq!(refused(Code::InvalidArgument).code(), Code::Internal);
        let unreachable =
            PrefillError::Transfer(TransferError::Unreachable { addr: "d:1".into(), attempts: 4, reason: "r".into() });
        assert_eq!(status(&unreachable).code(), Code::Unavailable);
        assert_eq!(status(&PrefillError::QueueFull { capacity: 3 }).message(), "prefill queue full (3)");
    }
}
