//! Errors of the prefill worker's boundary: why a prefill request was refused or failed.
//! They become `tonic::Status` in one place (`grpc::status`).

/// Why a prefill request did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    /// The request is malformed; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    /// The bounded queue of waiting prompts is full.
    #[error("prefill queue full ({capacity})")]
    QueueFull { capacity: usize },
    /// The prompt alone needs more cache than this worker has, so it can never run here.
    #[error("prompt of {prompt_tokens} tokens needs {needed} cache blocks but this prefill worker has {total}")]
    PromptTooLarge { prompt_tokens: usize, needed: usize, total: usize },
    /// Another prompt with the same request id is being prefilled here.
    #[error("request {0} is already being prefilled on this worker")]
    Duplicate(u64),
    /// The worker stopped accepting or abandoned the request while draining.
    #[error("prefill worker is shutting down")]
    ShuttingDown,
    /// The engine failed while running the batch holding this request.
    #[error("prefill failed: {0}")]
    Engine(String),
    /// The engine ended this request alone, for a cause a rerun elsewhere would meet again
    /// (its logits were not finite).
    #[error("prefill failed: {0}")]
    Rejected(String),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// Why the cache could not be handed to the decode worker.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Connection refused or lost on every attempt.
    #[error("decode worker {addr} unreachable after {attempts} attempt(s): {reason}")]
    Unreachable { addr: String, attempts: u32, reason: String },
    /// The decode worker answered with an error that retrying would not change (its
    /// reservation is gone, it rejected the data, ...).
    #[error("decode worker {addr} refused the cache of request {request_id}: {code:?}: {message}")]
    Refused { addr: String, request_id: u64, code: tonic::Code, message: String },
    /// The decode worker acknowledged before the commit was sent: it cannot hold the cache.
    #[error("decode worker {addr} answered PushKv of request {request_id} before the commit was sent")]
    EarlyReply { addr: String, request_id: u64 },
}
