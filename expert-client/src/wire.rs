//! The only module that touches protobuf types: `GetSlots`, and one actor per expert worker
//! that owns its long-lived `Run` stream, numbers requests and matches the in-order replies.

use model::ExpertGroup;
use proto::expert::expert_client::ExpertClient;
use proto::expert::{self as pb, expert_reply};
use std::collections::VecDeque;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Largest Expert message either way; the expert worker's server uses the same limit.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Calls queued for one worker's stream actor. An engine has one MoE call in flight at a
/// time, so this only absorbs short bursts; callers wait when it is full.
const CALL_QUEUE: usize = 8;
/// Requests handed to the transport but not yet written.
const STREAM_BUFFER: usize = 4;

/// Why a call to one worker failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("transport: {0}")]
    Transport(String),
    #[error("worker answered: {0}")]
    Remote(String),
    #[error("malformed reply: {0}")]
    BadReply(String),
    #[error("the worker's stream is closed")]
    Closed,
    #[error("not connected")]
    NotConnected,
    #[error("no reply before the call's deadline")]
    TimedOut,
}

impl CallError {
    /// The worker answered (the stream is fine); its view of the slots may be stale.
    pub fn is_remote(&self) -> bool {
        matches!(self, CallError::Remote(_))
    }
}

type Reply = Result<Vec<f32>, CallError>;

#[derive(Debug)]
struct Call {
    layer: u32,
    hidden: u32,
    groups: Vec<ExpertGroup>,
    inputs: Vec<f32>,
    /// W3C context of the caller's span (empty when not traced).
    traceparent: String,
    reply: oneshot::Sender<Reply>,
}

/// The hosted `(layer, expert)` slots of the worker behind `channel`.
pub async fn get_slots(channel: Channel) -> Result<Vec<(usize, u32)>, CallError> {
    let slots = ExpertClient::new(channel)
        .get_slots(pb::SlotsRequest {})
        .await
        .map_err(|s| CallError::Transport(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    Ok(slots.slots.into_iter().map(|s| (s.layer as usize, s.expert)).collect())
}

/// A handle on one worker's stream actor; the actor stops when every handle is dropped,
/// when `cancel` fires, or when the stream fails (then calls answer [`CallError::Closed`]).
#[derive(Debug, Clone)]
pub struct Conn {
    calls: mpsc::Sender<Call>,
}

impl Conn {
    /// Starts the actor on `tracker` (on `runtime`).
    pub fn open(
        channel: Channel,
        tracker: &tokio_util::task::TaskTracker,
        runtime: &tokio::runtime::Handle,
        cancel: CancellationToken,
    ) -> Conn {
        let (calls, rx) = mpsc::channel(CALL_QUEUE);
        let client = ExpertClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tracker.spawn_on(drive(client, rx, cancel), runtime);
        Conn { calls }
    }

    /// Queues one request; the receiver yields its outputs.
    pub async fn submit(
        &self,
        layer: usize,
        hidden: usize,
        groups: Vec<ExpertGroup>,
        inputs: Vec<f32>,
        traceparent: String,
    ) -> Result<oneshot::Receiver<Reply>, CallError> {
        let (reply, rx) = oneshot::channel();
        let call = Call { layer: layer as u32, hidden: hidden as u32, groups, inputs, traceparent, reply };
        self.calls.send(call).await.map_err(|_| CallError::Closed)?;
        Ok(rx)
    }

    pub fn is_closed(&self) -> bool {
        self.calls.is_closed()
    }
}

async fn drive(mut client: ExpertClient<Channel>, mut calls: mpsc::Receiver<Call>, cancel: CancellationToken) {
    let (requests, rx) = mpsc::channel::<pb::ExpertRequest>(STREAM_BUFFER);
    let opened = tokio::select! {
        r = client.run(ReceiverStream::new(rx)) => r,
        _ = cancel.cancelled() => return,
    };
    let mut replies = match opened {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::warn!(code = ?s.code(), message = s.message(), "expert_stream_open_failed");
            return;
        }
    };
    let mut pending: VecDeque<(u64, oneshot::Sender<Reply>)> = VecDeque::new();
    let mut seq = 0u64;
    let failure = loop {
        tokio::select! {
            _ = cancel.cancelled() => break CallError::Closed,
            call = calls.recv() => {
                let Some(call) = call else { break CallError::Closed };
                seq += 1;
                let request = pb::ExpertRequest {
                    traceparent: call.traceparent,
                    seq,
                    layer: call.layer,
                    hidden: call.hidden,
                    groups: call.groups.iter().map(|g| pb::ExpertGroup { expert: g.expert.0, num_tokens: g.num_tokens as u32 }).collect(),
                    inputs: call.inputs.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                pending.push_back((seq, call.reply));
                if requests.send(request).await.is_err() {
                    break CallError::Transport("request stream closed".into());
                }
            }
            reply = replies.message() => match reply {
                Ok(Some(reply)) => {
                    let Some((want, tx)) = pending.pop_front() else {
                        break CallError::BadReply(format!("reply {} with nothing pending", reply.seq));
                    };
                    if reply.seq != want {
                        let _ = tx.send(Err(CallError::BadReply(format!("reply {} for request {want}", reply.seq))));
                        break CallError::BadReply("replies out of order".into());
                    }
                    let _ = tx.send(decode(reply));
                }
                Ok(None) => break CallError::Transport("the worker ended the stream".into()),
                Err(s) => break CallError::Transport(format!("{:?}: {}", s.code(), s.message())),
            },
        }
    };
    tracing::debug!(error = %failure, pending = pending.len(), "expert_stream_stopped");
    for (_, tx) in pending {
        let _ = tx.send(Err(failure.clone()));
    }
}

fn decode(reply: pb::ExpertReply) -> Reply {
    match reply.result {
        Some(expert_reply::Result::Outputs(bytes)) if bytes.len() % 4 == 0 => {
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        Some(expert_reply::Result::Outputs(bytes)) => Err(CallError::BadReply(format!("{} output bytes", bytes.len()))),
        Some(expert_reply::Result::Error(e)) => Err(CallError::Remote(e)),
        None => Err(CallError::BadReply("no result".into())),
    }
}
