//! Loading a checkpoint directory: config, non-expert weights, local experts, tokenizer.

use crate::ModelError;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::experts::{ExpertId, LocalExperts};
use crate::forward::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{WeightDtype, WeightReader};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to load and how to keep it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub weight_dtype: WeightDtype,
    /// Load every routed expert into this process (false when experts run elsewhere).
    pub local_experts: bool,
}

/// Load progress in steps (one per layer, embedding, head, and routed expert).
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub done: u64,
    pub total: u64,
}

/// A loaded model, its local experts (if asked) and tokenizer (if the directory has one).
#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    pub experts: Option<LocalExperts>,
    pub tokenizer: Option<Tokenizer>,
}

/// Loads `dir`, reporting progress through `on_progress`.
pub fn load_model(dir: &Path, opts: LoadOptions, on_progress: &dyn Fn(LoadProgress)) -> Result<Loaded, ModelError> {
    let (config, ckpt) = open_checked(dir)?;
    let n_moe = config.moe_layers().len();
    let expert_steps = if opts.local_experts { (n_moe * config.n_routed_experts) as u64 } else { 0 };
    let total = config.num_hidden_layers as u64 + 2 + expert_steps;
    let done = AtomicU64::new(0);
    let step = |k: u64| {
        let d = done.fetch_add(k, Ordering::Relaxed) + k;
        on_progress(LoadProgress { done: d, total });
    };
    let reader = WeightReader { ckpt: &ckpt, dtype: opts.weight_dtype, fp8_block: config.fp8.map(|f| f.block) };
    let tokenizer = Tokenizer::from_dir(dir, &config)?;
    let experts = if opts.local_experts {
        Some(LocalExperts::load(&ckpt, &config, opts.weight_dtype, &|_, _: ExpertId| true, &step)?)
    } else {
        None
    };
    let model = Model::load(&reader, config, &step)?;
    Ok(Loaded { model, experts, tokenizer })
}

/// `dir`'s config and checkpoint, the config checked against every tensor header (sizes,
/// counts, dtypes) before any weight is read or anything is sized from the config.
pub(crate) fn open_checked(dir: &Path) -> Result<(ModelConfig, Checkpoint), ModelError> {
    let config = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let started = std::time::Instant::now();
    crate::shapes::check(&config, &ckpt)?;
    tracing::debug!(took_ms = started.elapsed().as_secs_f64() * 1e3, "checkpoint_checked");
    Ok((config, ckpt))
}
