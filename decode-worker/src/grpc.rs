//! The Decode gRPC service: the only module that touches protobuf types. Admission streams
//! a sequence's events, PushKv reassembles layers from chunks, and every engine error maps
//! to a status here.

use crate::engine_thread::{Command, EngineHandle, LocalPrefill, SeqEvent};
use model::{CacheLayout, EngineError, FinishReason, SamplingParams, SeqId};
use proto::internal::decode_server::Decode;
use proto::internal::{self as pb, decode_event, kv_chunk};
use proto::v1 as pub_pb;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug)]
pub struct DecodeService {
    pub engine: EngineHandle,
    pub layout: CacheLayout,
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

fn stopped(e: crate::engine_thread::EngineStopped) -> Status {
    Status::unavailable(e.to_string())
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
        SeqEvent::Finished(reason) => decode_event::Event::Finished(pb::Finished {
            reason: match reason {
                FinishReason::Stop => pub_pb::FinishReason::Stop,
                FinishReason::Length => pub_pb::FinishReason::Length,
            } as i32,
        }),
        SeqEvent::Failed(m) => return Err(Status::internal(format!("decode failed: {m}"))),
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

/// Partial layers of one incoming cache.
struct Incoming {
    id: SeqId,
    num_tokens: usize,
    row_bytes: usize,
    layers: Vec<Vec<u8>>,
    complete: Vec<bool>,
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
        params.validate().map_err(status_of)?;
        let id = SeqId(r.request_id);
        // Decode steps link to this sequence's span.
        let trace = cluster_core::trace::traceparent(&span);
        let local_prefill = (!r.local_prefill_prompt_ids.is_empty()).then_some(LocalPrefill {
            prompt: r.local_prefill_prompt_ids,
            prompt_logits_top: r.prompt_logits_top as usize,
        });
        if local_prefill.is_none() && r.prompt_tokens == 0 {
            return Err(Status::invalid_argument("prompt_tokens 0 must be >= 1"));
        }
        // Room for every token of the sequence: the engine never blocks on this channel.
        let (events, rx) = mpsc::channel(params.max_new_tokens + 2);
        let prompt_tokens = r.prompt_tokens as usize;
        let admission = tracing::info_span!(parent: &span, "admission", prompt_tokens);
        let free = tracing::Instrument::instrument(
            self.engine.call(|reply| Command::Reserve {
                id,
                prompt_tokens,
                params,
                local_prefill,
                events,
                trace,
                reply,
            }),
            admission,
        )
        .await
        .map_err(stopped)?
        .map_err(status_of)?;
        let first =
            pb::DecodeEvent { event: Some(decode_event::Event::Admitted(pb::Admitted { free_blocks: free as u32 })) };
        let stream =
            AdmitStream { first: Some(first), events: rx, id, engine: self.engine.clone(), done: false, _span: span };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn push_kv(&self, request: Request<Streaming<pb::KvChunk>>) -> Result<Response<pb::PushKvReply>, Status> {
        let span = tracing::info_span!("kv_import", request_id = tracing::field::Empty, bytes = tracing::field::Empty);
        cluster_core::trace::extract_into(request.metadata(), &span);
        tracing::Instrument::instrument(self.import(request.into_inner(), span.clone()), span).await
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseReply>, Status> {
        let id = SeqId(request.into_inner().request_id);
        let released = self.engine.call(|reply| Command::Release { id, reply: Some(reply) }).await.map_err(stopped)?;
        Ok(Response::new(pb::ReleaseReply { released }))
    }

    async fn get_load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::WorkerLoad>, Status> {
        let l = self.engine.call(|reply| Command::Load { reply }).await.map_err(stopped)?;
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

impl DecodeService {
    fn header(&self, h: pb::KvHeader) -> Result<Incoming, Status> {
        let l = self.layout;
        if h.latent_dim as usize != l.latent_dim || h.num_layers as usize != l.num_layers {
            return Err(Status::invalid_argument(format!(
                "cache shape {} layers x {} does not match this model's {} x {}",
                h.num_layers, h.latent_dim, l.num_layers, l.latent_dim
            )));
        }
        if h.num_tokens == 0 {
            return Err(Status::invalid_argument("num_tokens 0 must be >= 1"));
        }
        Ok(Incoming {
            id: SeqId(h.request_id),
            num_tokens: h.num_tokens as usize,
            row_bytes: l.latent_dim * 4,
            layers: vec![Vec::new(); l.num_layers],
            complete: vec![false; l.num_layers],
        })
    }
}

impl Incoming {
    /// Appends a chunk; returns the layer's rows once it is complete.
    fn add(&mut self, l: pb::KvLayer) -> Result<Option<(usize, Vec<u8>)>, Status> {
        let layer = l.layer as usize;
        let bad = |m: String| Err(Status::invalid_argument(m));
        if layer >= self.layers.len() {
            return bad(format!("layer {layer} does not exist (the model has {})", self.layers.len()));
        }
        if self.complete[layer] {
            return bad(format!("layer {layer} sent twice"));
        }
        let have = self.layers[layer].len() / self.row_bytes;
        if l.first_token as usize != have {
            return bad(format!("layer {layer}: chunk starts at token {}, expected {have}", l.first_token));
        }
        if !l.data.len().is_multiple_of(self.row_bytes) {
            return bad(format!(
                "layer {layer}: {} bytes is not a whole number of {}-byte rows",
                l.data.len(),
                self.row_bytes
            ));
        }
        if have + l.data.len() / self.row_bytes > self.num_tokens {
            return bad(format!("layer {layer}: more than the {} announced tokens", self.num_tokens));
        }
        let buf = &mut self.layers[layer];
        if buf.is_empty() {
            buf.reserve_exact(self.num_tokens * self.row_bytes);
        }
        buf.extend_from_slice(&l.data);
        if buf.len() == self.num_tokens * self.row_bytes {
            self.complete[layer] = true;
            return Ok(Some((layer, std::mem::take(buf))));
        }
        Ok(None)
    }
}

impl DecodeService {
    /// One `PushKv` stream: header, layers, commit. `span` gets the request id and bytes.
    async fn import(
        &self,
        mut chunks: Streaming<pb::KvChunk>,
        span: tracing::Span,
    ) -> Result<Response<pb::PushKvReply>, Status> {
        let mut incoming: Option<Incoming> = None;
        let mut received = 0u64;
        while let Some(chunk) = chunks.message().await? {
            match (chunk.part, incoming.as_mut()) {
                (Some(kv_chunk::Part::Header(h)), None) => {
                    span.record("request_id", h.request_id);
                    incoming = Some(self.header(h)?);
                }
                (Some(kv_chunk::Part::Header(_)), Some(_)) => {
                    return Err(Status::invalid_argument("second KvHeader in one stream"));
                }
                (Some(kv_chunk::Part::Layer(l)), Some(inc)) => {
                    received += l.data.len() as u64;
                    if let Some((layer, rows)) = inc.add(l)? {
                        let (id, num_tokens) = (inc.id, inc.num_tokens);
                        self.engine
                            .call(|reply| Command::ImportLayer { id, layer, num_tokens, rows, reply })
                            .await
                            .map_err(stopped)?
                            .map_err(status_of)?;
                    }
                }
                (Some(kv_chunk::Part::Commit(c)), Some(inc)) => {
                    if let Some(l) = inc.complete.iter().position(|c| !c) {
                        return Err(Status::invalid_argument(format!("KvCommit before layer {l} was complete")));
                    }
                    let id = inc.id;
                    let top = c.prompt_logits_top.into_iter().map(|l| (l.id, l.logit)).collect();
                    let (tokens, prompt_len) = (c.tokens, c.prompt_len as usize);
                    self.engine
                        .call(|reply| Command::Commit { id, tokens, prompt_len, prompt_logits_top: top, reply })
                        .await
                        .map_err(stopped)?
                        .map_err(status_of)?;
                    span.record("bytes", received);
                    return Ok(Response::new(pb::PushKvReply { bytes_received: received }));
                }
                (Some(_), None) => return Err(Status::invalid_argument("the stream must start with a KvHeader")),
                (None, _) => return Err(Status::invalid_argument("empty KvChunk")),
            }
        }
        Err(Status::invalid_argument("stream ended before KvCommit"))
    }
}
