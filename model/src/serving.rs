//! Opening a checkpoint as a serving role does: weights in the chosen dtype, local experts,
//! the precision of activations, and an engine sized for the role.

use crate::{Engine, EngineOptions, LoadOptions, LoadProgress, ModelError, Tokenizer, WeightDtype, load_model};
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

/// Loads `dir` (the default model when `None`) with every routed expert in this process.
pub fn open_engine(
    dir: Option<PathBuf>,
    setup: EngineSetup,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<ServingModel, ModelError> {
    let dir = crate::default_model::resolve_dir(dir)?;
    let loaded = load_model(&dir, LoadOptions { weight_dtype: setup.weight_dtype, local_experts: true }, on_progress)?;
    let experts = loaded.experts.expect("local experts were requested").with_precision(setup.precision);
    let mut model = loaded.model;
    model.set_precision(setup.precision);
    let engine = Engine::new(Arc::new(model), Arc::new(experts), setup.options);
    Ok(ServingModel { engine, tokenizer: loaded.tokenizer, dir })
}

/// The model's identity for worker records: the checkpoint directory's last component.
pub fn model_name(dir: &Path) -> String {
    dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}
