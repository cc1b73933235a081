//! Handing one sequence's latent cache to its decode worker: a tracked task per sequence
//! that pushes the header, each layer as soon as the engine hands it over (in chunks of
//! whole rows), then the commit, retrying the whole push after transport failures.
//!
//! The wire is behind [`KvSink`] (implemented in `grpc`), so this module sees only domain
//! types; the model's KV codec (`model::kv`) cuts the chunks. Invariants: the task answers
//! its caller exactly once unless the caller went away; it keeps every layer it received,
//! so a retry resends everything; it never blocks the engine thread (its event channel
//! holds every event of the sequence).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::BoxFuture;
use model::LayerRows;
use model::kv::{KvCommit, KvPart, KvShape, chunk_layer};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{PrefillError, TransferError};
use crate::request::PrefillOutcome;

/// Parts queued towards one push call; small, the network sets the pace.
const OUTBOUND_PARTS: usize = 4;

/// Why one push call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum PushFailure {
    /// The connection could not be made or broke: worth retrying.
    Transport(String),
    /// The decode worker answered with an error: retrying would not change it.
    Refused { code: tonic::Code, message: String },
}

/// A decode worker's PushKv endpoint.
pub trait KvSink: Send + Sync + fmt::Debug {
    /// The address pushed to, for errors and logs.
    fn addr(&self) -> &str;
    /// One PushKv call streaming `parts` until the sender side closes; resolves with the
    /// bytes the decode worker acknowledged. Dropping the future cancels the call.
    fn push(&self, parts: mpsc::Receiver<KvPart>) -> BoxFuture<'static, Result<u64, PushFailure>>;
}

/// What the engine thread tells a sequence's transfer task.
#[derive(Debug)]
pub enum SeqEvent {
    /// One layer's rows for the whole prompt.
    Layer(LayerRows),
    /// The prefill finished (after every layer): the commit to send.
    Done { commit: KvCommit, first_token: u32, compute: Duration },
    /// The prefill failed: nothing more comes.
    Failed(PrefillError),
}

/// The events one sequence can produce: every layer plus the final event. A channel of
/// this capacity never refuses the engine thread.
pub fn event_capacity(num_layers: usize) -> usize {
    num_layers + 1
}

/// How pushes are sent and retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferSettings {
    /// Most bytes per layer chunk (at least one row is always sent).
    pub chunk_bytes: usize,
    /// Retries after transport failures (attempts = retries + 1).
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
}

/// One sequence's transfer, started by the engine thread when the sequence joins a batch.
#[derive(Debug)]
pub struct Transfer {
    pub request_id: u64,
    pub sink: Arc<dyn KvSink>,
    pub shape: KvShape,
    pub settings: TransferSettings,
    /// Time the request waited in the queue.
    pub queue: Duration,
    pub events: mpsc::Receiver<SeqEvent>,
    pub reply: oneshot::Sender<Result<PrefillOutcome, PrefillError>>,
    /// Cancelled when the worker's drain deadline passes.
    pub abort: CancellationToken,
    /// The request's span, parent of this transfer's.
    pub parent: tracing::Span,
}

/// Runs the transfer to its end: answers the caller, or stops silently once the caller is
/// gone (the decode worker then sees the push cancelled).
pub async fn run(t: Transfer) {
    let Transfer { request_id, sink, shape, settings, queue, events, mut reply, abort, parent } = t;
    let span = tracing::info_span!(parent: &parent, "kv_transfer", request_id, bytes = shape.total_bytes());
    async move {
        let mut state = PushState::new(shape, events);
        let result = tokio::select! {
            _ = reply.closed() => {
                tracing::debug!(decode = sink.addr(), "kv_transfer_abandoned_caller_gone");
                return;
            }
            _ = abort.cancelled() => Err(PrefillError::ShuttingDown),
            r = push_with_retries(request_id, sink.as_ref(), &settings, &mut state) => r,
        };
        let result = result.map(|(first_token, kv_bytes, compute, transfer)| PrefillOutcome {
            first_token,
            kv_bytes,
            queue,
            compute,
            transfer,
        });
        match &result {
            Ok(o) => {
                crate::telemetry::kv_transferred(o.kv_bytes, o.transfer);
                tracing::debug!(kv_bytes = o.kv_bytes, transfer_s = o.transfer.as_secs_f64(), "kv_transfer_done");
            }
            Err(error) => {
                crate::telemetry::kv_transfer_failed();
                tracing::warn!(decode = sink.addr(), %error, "prefill_failed");
            }
        }
        if reply.send(result).is_err() {
            tracing::debug!("prefill_reply_dropped_caller_gone");
        }
    }
    .instrument(span)
    .await
}

/// The sequence's cache as received so far, kept for retries.
#[derive(Debug)]
struct PushState {
    shape: KvShape,
    events: mpsc::Receiver<SeqEvent>,
    layers: Vec<Option<LayerRows>>,
    received: usize,
    last_layer_at: Option<Instant>,
    done: Option<(KvCommit, u32, Duration)>,
}

/// Why one attempt ended without an acknowledgement.
#[derive(Debug)]
enum AttemptError {
    Transport(String),
    Fatal(PrefillError),
}

impl PushState {
    fn new(shape: KvShape, events: mpsc::Receiver<SeqEvent>) -> Self {
        PushState { shape, events, layers: vec![None; shape.num_layers], received: 0, last_layer_at: None, done: None }
    }

    fn kv_bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|l| l.wire_bytes() as u64).sum()
    }
}

/// Pushes until acknowledged, retrying transport failures; returns (first token, bytes,
/// compute time, transfer time).
async fn push_with_retries(
    request_id: u64,
    sink: &dyn KvSink,
    settings: &TransferSettings,
    state: &mut PushState,
) -> Result<(u32, u64, Duration, Duration), PrefillError> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match push_once(request_id, sink, settings, state).await {
            Ok(acked) => {
                let (_, first_token, compute) = state.done.as_ref().expect("an acknowledged push sent the commit");
                let sent = state.kv_bytes();
                if acked != sent {
                    tracing::warn!(decode = sink.addr(), acked, sent, "kv_transfer_ack_mismatch");
                }
                let transfer = state.last_layer_at.map_or(Duration::ZERO, |t| t.elapsed());
                return Ok((*first_token, sent, *compute, transfer));
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Transport(reason)) if attempt <= settings.retries => {
                let wait = settings.backoff.saturating_mul(1 << (attempt - 1).min(16));
                tracing::warn!(decode = sink.addr(), attempt, %reason, retry_in_ms = wait.as_millis() as u64, "kv_transfer_retry");
                tokio::time::sleep(wait).await;
            }
            Err(AttemptError::Transport(reason)) => {
                return Err(
                    TransferError::Unreachable { addr: sink.addr().to_string(), attempts: attempt, reason }.into()
                );
            }
        }
    }
}

/// One PushKv call: header, every layer held or arriving, commit; then the acknowledgement.
async fn push_once(
    request_id: u64,
    sink: &dyn KvSink,
    settings: &TransferSettings,
    state: &mut PushState,
) -> Result<u64, AttemptError> {
    let (tx, rx) = mpsc::channel(OUTBOUND_PARTS);
    let mut call = sink.push(rx);
    let refused = |f: PushFailure| match f {
        PushFailure::Transport(reason) => AttemptError::Transport(reason),
        PushFailure::Refused { code, message } => AttemptError::Fatal(
            TransferError::Refused { addr: sink.addr().to_string(), request_id, code, message }.into(),
        ),
    };
    tokio::select! {
        r = &mut call => {
            // The call ended before the commit went out: an error, or a reply too early.
            return Err(match r {
                Ok(_) => AttemptError::Fatal(TransferError::EarlyReply { addr: sink.addr().to_string(), request_id }.into()),
                Err(f) => refused(f),
            });
        }
        r = feed(request_id, settings, state, tx) => match r {
            Ok(()) | Err(FeedError::StreamClosed) => {}
            // Dropping `call` cancels the push; the decode worker drops what it received.
            Err(FeedError::Engine(e)) => return Err(AttemptError::Fatal(e)),
        },
    }
    // Commit sent (or the stream closed under us): the call's result says which.
    call.await.map_err(refused)
}

#[derive(Debug)]
enum FeedError {
    /// The call dropped its stream; its result tells why.
    StreamClosed,
    Engine(PrefillError),
}

/// Sends the header, the layers held, then layers as they arrive, then the commit.
async fn feed(
    request_id: u64,
    settings: &TransferSettings,
    state: &mut PushState,
    tx: mpsc::Sender<KvPart>,
) -> Result<(), FeedError> {
    let shape = state.shape;
    tx.send(KvPart::Header { request_id, shape }).await.map_err(|_| FeedError::StreamClosed)?;
    for rows in state.layers.iter().flatten() {
        send_layer(&tx, rows, settings).await?;
    }
    loop {
        if let Some((commit, ..)) = &state.done {
            if state.received < shape.num_layers {
                let missing = state.layers.iter().position(Option::is_none).unwrap_or(0);
                return Err(FeedError::Engine(PrefillError::Engine(format!(
                    "the engine finished without handing over layer {missing}"
                ))));
            }
            return tx.send(KvPart::Commit(commit.clone())).await.map_err(|_| FeedError::StreamClosed);
        }
        match state.events.recv().await {
            Some(SeqEvent::Layer(rows)) => {
                if let Err(e) = shape.check(&rows) {
                    return Err(FeedError::Engine(PrefillError::Engine(format!(
                        "the engine handed over a bad layer: {e}"
                    ))));
                }
                let layer = rows.layer();
                if state.layers[layer].is_none() {
                    state.received += 1;
                    if state.received == shape.num_layers {
                        state.last_layer_at = Some(Instant::now());
                    }
                }
                let rows = state.layers[layer].insert(rows);
                let span = tracing::info_span!("kv_send_layer", layer, bytes = rows.wire_bytes() as u64);
                send_layer(&tx, rows, settings).instrument(span).await?;
            }
            Some(SeqEvent::Done { commit, first_token, compute }) => state.done = Some((commit, first_token, compute)),
            Some(SeqEvent::Failed(e)) => return Err(FeedError::Engine(e)),
            None => {
                return Err(FeedError::Engine(PrefillError::Engine(
                    "the engine stopped before finishing the prompt".into(),
                )));
            }
        }
    }
}

async fn send_layer(tx: &mpsc::Sender<KvPart>, rows: &LayerRows, settings: &TransferSettings) -> Result<(), FeedError> {
    for chunk in chunk_layer(rows, settings.chunk_bytes) {
        tx.send(KvPart::Layer(chunk)).await.map_err(|_| FeedError::StreamClosed)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "transfer_tests.rs"]
mod tests;
