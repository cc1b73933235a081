//! The `Decode.PushKv` client: one lazily connected channel per decode worker address,
//! and the [`KvSink`] that streams domain [`KvPart`]s as `KvChunk`s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cluster_core::BoxFuture;
use cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES;
use proto::internal::decode_client::DecodeClient;
use proto::internal::{KvChunk, KvHeader, KvLayer, kv_chunk};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::PrefillError;
use crate::transfer::{KvSink, PushFailure};
use model::kv::{KvPart, LayerChunk};

/// Most decode addresses with a cached channel; beyond it one is evicted (decode workers
/// are far fewer; this only bounds a caller sending many bogus addresses).
const MAX_CHANNELS: usize = 1024;

/// Channels to decode workers, by address as the router gave it.
#[derive(Debug)]
pub struct DecodeClients {
    connect_timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
}

impl DecodeClients {
    pub fn new(connect_timeout: Duration) -> Self {
        DecodeClients { connect_timeout, channels: Mutex::new(HashMap::new()) }
    }

    /// The PushKv endpoint of `addr`; an address that is not a valid URI is the caller's
    /// mistake. Must run inside the runtime (channels spawn their connection task).
    pub fn get(&self, addr: &str) -> Result<Arc<dyn KvSink>, PrefillError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = cluster_core::serve::channel(addr, self.connect_timeout).map_err(|e| {
                    PrefillError::InvalidRequest {
                        field: "decode_addr",
                        reason: format!("{addr:?} is not a valid address: {e}"),
                    }
                })?;
                if channels.len() >= MAX_CHANNELS
                    && let Some(evict) = channels.keys().next().cloned()
                {
                    channels.remove(&evict);
                }
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        let client = DecodeClient::new(channel)
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
        Ok(Arc::new(DecodeSink { addr: addr.to_string(), client }))
    }
}

#[derive(Debug)]
struct DecodeSink {
    addr: String,
    client: DecodeClient<Channel>,
}

impl KvSink for DecodeSink {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn push(&self, parts: mpsc::Receiver<KvPart>) -> BoxFuture<'static, Result<u64, PushFailure>> {
        let mut client = self.client.clone();
        // Called inside the transfer's span: the decode worker's import joins the trace.
        let span = tracing::Span::current();
        Box::pin(async move {
            let mut request = tonic::Request::new(ReceiverStream::new(parts).map(to_chunk));
            cluster_core::trace::inject(&span, request.metadata_mut());
            match client.push_kv(request).await {
                Ok(reply) => Ok(reply.into_inner().bytes_received),
                Err(status) => Err(classify(&status)),
            }
        })
    }
}

/// Transport trouble (connection refused or broken: UNAVAILABLE, UNKNOWN, CANCELLED) is
/// retried; any other code is the decode worker's answer.
fn classify(status: &Status) -> PushFailure {
    let code = status.code();
    match code {
        Code::Unavailable | Code::Unknown | Code::Cancelled => {
            PushFailure::Transport(format!("{code:?}: {}", status.message()))
        }
        _ => PushFailure::Refused { code, message: status.message().to_string() },
    }
}

fn to_chunk(part: KvPart) -> KvChunk {
    let part = match part {
        KvPart::Header { request_id, shape } => kv_chunk::Part::Header(KvHeader {
            request_id,
            num_tokens: to_u32(shape.num_tokens),
            latent_dim: to_u32(shape.latent_dim),
            num_layers: to_u32(shape.num_layers),
        }),
        KvPart::Layer(LayerChunk { layer, first_token, data }) => {
            kv_chunk::Part::Layer(KvLayer { layer: to_u32(layer), first_token: to_u32(first_token), data })
        }
        KvPart::Commit(c) => kv_chunk::Part::Commit(proto::internal::KvCommit {
            tokens: c.tokens,
            prompt_len: to_u32(c.prompt_len),
            prompt_logits_top: c
                .prompt_logits_top
                .into_iter()
                .map(|(id, logit)| proto::v1::Logit { id, logit })
                .collect(),
            mtp_hidden: model::kv::encode(&c.mtp_hidden),
        }),
    };
    KvChunk { part: Some(part) }
}

/// Layer, token and dimension counts are bounded by the model's config (far below 2^32).
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("model sizes fit in 32 bits")
}
