//! Errors at the model boundary: loading (naming the file, tensor or field) and running.

use std::path::PathBuf;

/// A checkpoint or tokenizer could not be loaded. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {err}")]
    Json { path: PathBuf, err: serde_json::Error },
    #[error("{path}: field `{field}`: {reason}")]
    Config { path: PathBuf, field: String, reason: String },
    #[error("{path}: unsupported model_type {model_type:?} (supported: deepseek_v3, deepseek_v2)")]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor `{tensor}` is missing from the checkpoint in {dir}")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?} ({fields} in config.json)")]
    Shape { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize>, fields: &'static str },
    #[error(
        "{path}: tensor `{tensor}` has unsupported dtype {dtype} (supported: F32, BF16, F16, F8_E4M3 with weight_scale_inv)"
    )]
    Dtype { path: PathBuf, tensor: String, dtype: String },
    /// A weight holds NaN or an infinity (found while it was copied or converted).
    #[error("{path}: tensor `{tensor}` holds a non-finite value (NaN or infinity) at element {index}")]
    NonFinite { path: PathBuf, tensor: String, index: usize },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// The model loaded but the compute device could not take it.
    #[error("{0}")]
    Device(String),
}

/// A request the engine refuses, or a failure while running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("sequence {0} already exists")]
    DuplicateSequence(u64),
    #[error("sequence {0} appears twice in one batch")]
    RepeatedInBatch(u64),
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// The request itself is invalid (checked by [`crate::RequestLimits::check`]).
    #[error(transparent)]
    Invalid(#[from] crate::InvalidRequest),
    #[error("a latent cache of {tokens} tokens cannot be allocated: {reason}")]
    CacheSize { tokens: usize, reason: String },
    #[error("not enough cache: {needed} blocks needed, {free} free")]
    CacheFull { needed: usize, free: usize },
    #[error("sequence {0} is not in the expected state: {1}")]
    WrongState(u64, &'static str),
    /// The sequence's logits held NaN or an infinity (its activations overflowed): it cannot
    /// go on, and rerunning it elsewhere would end the same way.
    #[error(
        "sequence {seq}: the logits at position {position} are not finite (token {token}'s is NaN or infinite): the model's activations overflowed"
    )]
    NonFiniteLogits { seq: u64, position: usize, token: usize },
    #[error("cache import rejected: {0}")]
    BadCacheImport(String),
    #[error(transparent)]
    Experts(#[from] crate::ExpertError),
    /// The compute device failed (a CUDA error) or could not be opened.
    #[error("device error: {0}")]
    Device(String),
}
