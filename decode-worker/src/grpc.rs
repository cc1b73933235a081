//! The Decode gRPC service: the only module that touches protobuf types. Admission streams
//! a sequence's events, PushKv hands its chunks to the import as a [`KvSource`], and every
//! engine or import error maps to a status here.

use crate::engine_thread::{CallError, EngineHandle, LocalPrefill, Reservation, SeqEvent};
use crate::import::{ImportError, KvSource};
use cluster_core::BoxFuture;
use cluster_core::serve::{DEFAULT_MAX_MESSAGE_BYTES, Described};
use model::kv::{KvCommit, KvPart, KvShape, LayerChunk};
use model::{CacheLayout, EngineError, FinishReason, RequestLimits, SamplingParams, SeqId};
use proto::internal::decode_server::{self, Decode};
use proto::internal::{self as pb, decode_event, kv_chunk};
use proto::v1 as pub_pb;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

/// What reflection lists for this worker.
pub const DESCRIBED: Described<'static> =
    Described { descriptor_set: proto::FILE_DESCRIPTOR_SET, services: &["expertmesh.internal.v1.Decode"] };

/// The worker's gRPC routes, with the cluster's message limits.
pub fn routes(service: DecodeService) -> Routes {
    Routes::new(
        decode_server::DecodeServer::new(service)
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
    )
}

#[derive(Debug)]
pub struct DecodeService {
    pub engine: EngineHandle,
    pub layout: CacheLayout,
    pub limits: RequestLimits,
    pub worker_id: String,
    /// Set while draining: new admissions are refused with UNAVAILABLE.
    pub draining: Arc<AtomicBool>,
}

fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::UnknownSequence(_) => Status::not_found(e.to_string()),
        EngineError::CacheFull { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::WrongState(..) | EngineError::DuplicateSequence(_) => Status::failed_precondition(e.to_string()),
        EngineError::Experts(_) => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn call_status(e: CallError) -> Status {
    match e {
        // Busy: RESOURCE_EXHAUSTED; stopped: UNAVAILABLE.
        CallError::Actor(e) => e.into(),
        CallError::Engine(e) => status_of(e),
    }
}

/// A push that breaks the transfer format is the sender's fault: INVALID_ARGUMENT.
fn import_status(e: ImportError) -> Status {
    match e {
        ImportError::Source(status) => status,
        ImportError::Kv(e) => Status::invalid_argument(e.to_string()),
        ImportError::Call(e) => call_status(e),
    }
}

fn sampling(s: Option<pb::Sampling>) -> Result<SamplingParams, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("sampling is required"))?;
    Ok(SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        seed: Some(s.seed),
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: s.stop_token_ids,
    })
}

fn logits(top: Vec<(u32, f32)>) -> Vec<pub_pb::Logit> {
    top.into_iter().map(|(id, logit)| pub_pb::Logit { id, logit }).collect()
}

fn event(e: SeqEvent) -> Result<pb::DecodeEvent, Status> {
    let event = match e {
        SeqEvent::Token { id, prompt_logits_top } => {
            decode_event::Event::Token(pb::Token { id, prompt_logits_top: logits(prompt_logits_top) })
        }
        SeqEvent::Finished(reason, spec) => decode_event::Event::Finished(pb::Finished {
            reason: match reason {
                FinishReason::Stop => pub_pb::FinishReason::Stop,
                FinishReason::Length => pub_pb::FinishReason::Length,
            } as i32,
            speculative: Some(pub_pb::Speculative {
                draft_tokens: spec.draft_tokens,
                accepted_tokens: spec.accepted_tokens,
                draft_steps: spec.draft_steps,
            }),
        }),
        SeqEvent::Failed(m) => return Err(Status::internal(format!("decode failed: {m}"))),
        SeqEvent::Stalled { idle } => {
            return Err(Status::resource_exhausted(format!(
                "the sequence was cancelled and its cache released: its consumer took no token for {} ms \
                 (--stall-timeout-ms)",
                idle.as_millis()
            )));
        }
        // Deterministic: the router must not retry it on another worker.
        SeqEvent::Rejected(m) => return Err(Status::failed_precondition(format!("decode failed: {m}"))),
    };
    Ok(pb::DecodeEvent { event: Some(event) })
}

/// The Admit response stream. Dropping it (the router hung up, cancelled, or the stream
/// ended) releases the sequence.
struct AdmitStream {
    first: Option<pb::DecodeEvent>,
    events: mpsc::Receiver<SeqEvent>,
    id: SeqId,
    engine: EngineHandle,
    done: bool,
    /// The sequence's `decode` span, open while its tokens stream.
    _span: tracing::Span,
}

impl Stream for AdmitStream {
    type Item = Result<pb::DecodeEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(e)) => {
                let end = !matches!(e, SeqEvent::Token { .. });
                self.done = end;
                Poll::Ready(Some(event(e)))
            }
            Poll::Ready(None) => {
                // The engine dropped the sender without a final event: it stopped.
                self.done = true;
                Poll::Ready(Some(Err(Status::unavailable("decode engine stopped"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for AdmitStream {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: a full mailbox is fine, the engine sees the closed channel.
            self.engine.release_now(self.id);
        }
    }
}

/// A PushKv request stream, read part by part by the import.
struct ChunkSource(Streaming<pb::KvChunk>);

impl KvSource for ChunkSource {
    fn next_part(&mut self) -> BoxFuture<'_, Result<Option<KvPart>, Status>> {
        Box::pin(async move {
            let Some(chunk) = self.0.message().await? else { return Ok(None) };
            part_of(chunk).map(Some)
        })
    }
}

fn part_of(chunk: pb::KvChunk) -> Result<KvPart, Status> {
    Ok(match chunk.part.ok_or_else(|| Status::invalid_argument("empty KvChunk"))? {
        kv_chunk::Part::Header(h) => KvPart::Header {
            request_id: h.request_id,
            shape: KvShape {
                num_tokens: h.num_tokens as usize,
                latent_dim: h.latent_dim as usize,
                num_layers: h.num_layers as usize,
            },
        },
        kv_chunk::Part::Layer(l) => {
            KvPart::Layer(LayerChunk { layer: l.layer as usize, first_token: l.first_token as usize, data: l.data })
        }
        kv_chunk::Part::Commit(c) => KvPart::Commit(KvCommit {
            tokens: c.tokens,
            prompt_len: c.prompt_len as usize,
            prompt_logits_top: c.prompt_logits_top.into_iter().map(|l| (l.id, l.logit)).collect(),
            mtp_hidden: model::kv::decode("KvCommit.mtp_hidden", &c.mtp_hidden)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        }),
    })
}

#[tonic::async_trait]
impl Decode for DecodeService {
    type AdmitStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeEvent, Status>> + Send>>;

    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<Self::AdmitStream>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable(format!("decode worker {} is draining", self.worker_id)));
        }
        let span = tracing::info_span!("decode", request_id = tracing::field::Empty);
        cluster_core::trace::extract_into(request.metadata(), &span);
        let r = request.into_inner();
        span.record("request_id", r.request_id);
        let params = sampling(r.sampling)?;
        let local = &r.local_prefill_prompt_ids;
        let checked = if local.is_empty() {
            self.limits.check_sized(r.prompt_tokens as usize, &params, r.prompt_logits_top as usize)
        } else {
            self.limits.check(local, &params, r.prompt_logits_top as usize)
        };
        checked.map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = SeqId(r.request_id);
        // Decode steps link to this sequence's span.
        let trace = cluster_core::trace::traceparent(&span);
        let local_prefill = (!r.local_prefill_prompt_ids.is_empty()).then_some(LocalPrefill {
            prompt: r.local_prefill_prompt_ids,
            prompt_logits_top: r.prompt_logits_top as usize,
        });
        let prompt_tokens = r.prompt_tokens as usize;
        let admission = tracing::info_span!(parent: &span, "admission", prompt_tokens);
        let reservation = Reservation { id, prompt_tokens, params, local_prefill, trace };
        let (free, rx) =
            tracing::Instrument::instrument(self.engine.reserve(reservation), admission).await.map_err(call_status)?;
        let first =
            pb::DecodeEvent { event: Some(decode_event::Event::Admitted(pb::Admitted { free_blocks: free as u32 })) };
        let stream =
            AdmitStream { first: Some(first), events: rx, id, engine: self.engine.clone(), done: false, _span: span };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn push_kv(&self, request: Request<Streaming<pb::KvChunk>>) -> Result<Response<pb::PushKvReply>, Status> {
        let span = tracing::info_span!("kv_import", request_id = tracing::field::Empty, bytes = tracing::field::Empty);
        cluster_core::trace::extract_into(request.metadata(), &span);
        let mut source = ChunkSource(request.into_inner());
        let import = crate::import::import(&mut source, self.layout, &self.engine, &span);
        let bytes_received = tracing::Instrument::instrument(import, span.clone()).await.map_err(import_status)?;
        Ok(Response::new(pb::PushKvReply { bytes_received }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseReply>, Status> {
        let id = SeqId(request.into_inner().request_id);
        let released = self.engine.release(id).await.map_err(Status::from)?;
        Ok(Response::new(pb::ReleaseReply { released }))
    }

    async fn get_load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::WorkerLoad>, Status> {
        let l = self.engine.load();
        Ok(Response::new(pb::WorkerLoad {
            worker_id: self.worker_id.clone(),
            running_sequences: l.running as u32,
            waiting_sequences: l.waiting as u32,
            queued_tokens: 0,
            free_blocks: l.free_blocks as u32,
            total_blocks: l.total_blocks as u32,
            block_size: l.block_size as u32,
        }))
    }
}
