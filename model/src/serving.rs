//! Opening a checkpoint as a serving role does: weights in the chosen dtype, routed experts
//! in this process or behind a remote backend, the precision of activations, and an engine
//! sized for the role; or, for an expert worker, only the experts it hosts (all at once, or one
//! at a time from a checkpoint kept open).

use crate::checkpoint::Checkpoint;
use crate::{
    Engine, EngineOptions, ExpertBackend, ExpertId, ExpertWeights, LoadOptions, LoadProgress, LocalExperts,
    ModelConfig, ModelError, Tokenizer, WeightDtype, load_model,
};
use kernels::cpu::Precision;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a role runs the model.
#[derive(Debug, Clone, Copy)]
pub struct EngineSetup {
    pub weight_dtype: WeightDtype,
    pub precision: Precision,
    pub options: EngineOptions,
}

/// An engine ready to serve, and what else the checkpoint holds.
#[derive(Debug)]
pub struct ServingModel {
    pub engine: Engine,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
}

/// Where an engine's routed experts run.
#[derive(Debug, Clone)]
pub enum ExpertPlacement {
    /// Every routed expert loaded into this process.
    Local,
    /// No routed expert loaded here; the backend (e.g. expert workers) runs them.
    Remote(Arc<dyn ExpertBackend>),
}

/// Loads `dir` (the default model when `None`) with every routed expert in this process.
pub fn open_engine(
    dir: Option<PathBuf>,
    setup: EngineSetup,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<ServingModel, ModelError> {
    open_engine_with(dir, setup, ExpertPlacement::Local, on_progress)
}

/// Loads `dir` (the default model when `None`) with routed experts where `placement` says.
pub fn open_engine_with(
    dir: Option<PathBuf>,
    setup: EngineSetup,
    placement: ExpertPlacement,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<ServingModel, ModelError> {
    // Refuse an unusable device before spending minutes loading a checkpoint for it.
    setup.options.device.check().map_err(|e| ModelError::Device(e.to_string()))?;
    let dir = crate::default_model::resolve_dir(dir)?;
    let local_experts = matches!(placement, ExpertPlacement::Local);
    let loaded = load_model(&dir, LoadOptions { weight_dtype: setup.weight_dtype, local_experts }, on_progress)?;
    let experts: Arc<dyn ExpertBackend> = match placement {
        ExpertPlacement::Local => {
            Arc::new(loaded.experts.expect("local experts were requested").with_precision(setup.precision))
        }
        ExpertPlacement::Remote(backend) => backend,
    };
    let mut model = loaded.model;
    model.set_precision(setup.precision);
    let engine =
        Engine::on_device(Arc::new(model), experts, setup.options).map_err(|e| ModelError::Device(e.to_string()))?;
    Ok(ServingModel { engine, tokenizer: loaded.tokenizer, dir })
}

/// The routed experts an expert worker hosts, and the model they belong to.
#[derive(Debug)]
pub struct HostedExperts {
    pub experts: LocalExperts,
    pub config: ModelConfig,
    pub dir: PathBuf,
}

/// Loads only the routed experts of `dir` (the default model when `None`) for which
/// `want(config, layer, expert)` holds; no attention or dense weights. Progress counts
/// experts.
pub fn open_experts(
    dir: Option<PathBuf>,
    weight_dtype: WeightDtype,
    precision: Precision,
    want: &dyn Fn(&ModelConfig, usize, ExpertId) -> bool,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<HostedExperts, ModelError> {
    let dir = crate::default_model::resolve_dir(dir)?;
    let (config, ckpt) = crate::load::open_checked(&dir)?;
    let total = config
        .moe_layers()
        .into_iter()
        .map(|l| (0..config.n_routed_experts).filter(|&e| want(&config, l, ExpertId(e as u32))).count() as u64)
        .sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    let step = |k: u64| {
        let d = done.fetch_add(k, std::sync::atomic::Ordering::Relaxed) + k;
        on_progress(LoadProgress { done: d, total });
    };
    let experts =
        LocalExperts::load(&ckpt, &config, weight_dtype, &|l, e| want(&config, l, e), &step)?.with_precision(precision);
    Ok(HostedExperts { experts, config, dir })
}

/// A checkpoint kept open (memory-mapped) to load routed experts one at a time, as an
/// expert worker does when its placement changes. Loading is blocking work: call it off the
/// async runtime.
#[derive(Debug)]
pub struct ExpertCheckpoint {
    ckpt: Checkpoint,
    config: ModelConfig,
    dir: PathBuf,
    dtype: WeightDtype,
}

impl ExpertCheckpoint {
    /// Opens `dir` (the default model when `None`): its config and the safetensors index,
    /// no weights yet.
    pub fn open(dir: Option<PathBuf>, dtype: WeightDtype) -> Result<Self, ModelError> {
        let dir = crate::default_model::resolve_dir(dir)?;
        let (config, ckpt) = crate::load::open_checked(&dir)?;
        Ok(ExpertCheckpoint { ckpt, config, dir, dtype })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads routed expert `expert` of MoE layer `layer` (see [`LocalExperts::load_expert`]).
    pub fn load(&self, layer: usize, expert: ExpertId) -> Result<ExpertWeights, ModelError> {
        LocalExperts::load_expert(&self.ckpt, &self.config, self.dtype, layer, expert)
    }
}

/// The model's identity for worker records: the checkpoint directory's last component.
pub fn model_name(dir: &Path) -> String {
    dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}
