//! The DeepSeek-V3/V2 model: reads HuggingFace checkpoints, runs the batched forward pass
//! over a paged latent (MLA) cache, and exposes the engine API that serving roles build on
//! (add / prefill / decode / release sequences, export and import a sequence's cache) and
//! the codec that moves a cache between workers (`kv`).
//!
//! Routed experts are reached through [`ExpertBackend`], so they can run in this process
//! ([`LocalExperts`]) or elsewhere.

#[cfg(feature = "clap")]
pub mod args;
mod backend;
pub mod cache;
pub mod checkpoint;
pub mod config;
/// The model on a GPU; without the `cuda` feature, a stand-in that refuses every GPU.
#[cfg_attr(not(feature = "cuda"), path = "cuda_off.rs")]
mod cuda;
pub mod default_model;
mod engine;
mod error;
mod experts;
mod forward;
pub mod kv;
mod load;
pub mod request;
pub mod sampling;
pub mod serving;
mod shapes;
pub mod tokenizer;
mod weights;

pub use cache::{CacheLayout, LatentCache, SequenceCacheExport};
pub use config::{ModelConfig, ModelType};
pub use engine::{Engine, EngineOptions, FinishReason, LayerSink, SeqId, SpeculationStats, StepOutput};
pub use error::{EngineError, ModelError};
pub use experts::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, ExpertId, ExpertWeights, LocalExperts};
pub use forward::Segment;
pub use forward::{ForwardOutput, LayerHook, LogitsWanted, Model, Pass, RouterTrace};
pub use kernels::Device;
pub use kv::{KvError, LayerRows};
pub use load::Loaded;
pub use load::{LoadOptions, LoadProgress, load_model};
pub use request::{InvalidRequest, RequestLimits};
pub use sampling::{AcceptRule, SamplingParams};
pub use tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
pub use weights::WeightDtype;
