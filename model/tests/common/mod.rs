//! What the integration tests share: the transformers fixtures (`tests/fixtures/<name>`,
//! made by `tools/gen_reference.py`), their `expected.json`, and loading one as an engine.
//! Also included by the CLI's tests (`#[path]`), hence the manifest-relative lookup.
#![allow(dead_code)] // each test crate uses a different part

use model::{
    Engine, EngineError, EngineOptions, ExpertBackend, LoadOptions, Model, StepOutput, WeightDtype, load_model,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Deserialize)]
pub struct Expected {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub argmax: Vec<u32>,
    pub greedy: Vec<u32>,
    pub router: Vec<RouterLayer>,
    /// transformers' MtpModel, for checkpoints with an MTP layer.
    #[serde(default)]
    pub mtp: Option<MtpCase>,
}

#[derive(Deserialize)]
pub struct MtpCase {
    /// At every prompt position i: the argmax of the MTP layer's prediction of token i + 2.
    pub argmax: Vec<u32>,
    pub logits: Vec<PositionLogits>,
    /// `argmax` over the prompt followed by `greedy` (teacher-forced).
    pub argmax_over_greedy: Vec<u32>,
}

#[derive(Deserialize)]
pub struct PositionLogits {
    pub position: usize,
    pub values: Vec<f32>,
}

#[derive(Deserialize)]
pub struct RouterLayer {
    pub layer: usize,
    pub experts: Vec<Vec<u32>>,
}

/// The model crate's directory, from the model crate or a sibling crate.
fn model_crate() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if crate_dir.ends_with("model") { crate_dir.to_path_buf() } else { crate_dir.join("../model") }
}

/// The directory of fixture `name` (its `expected.json`).
pub fn fixture(name: &str) -> PathBuf {
    model_crate().join("tests/fixtures").join(name)
}

/// Fixture `name`'s checkpoint: its own directory, except `default_model`, whose checkpoint is
/// the embedded default model's source (`model/default-model`).
pub fn checkpoint(name: &str) -> PathBuf {
    if name == "default_model" { model_crate().join("default-model") } else { fixture(name) }
}

pub fn expected(name: &str) -> Expected {
    let path = fixture(name).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fixture `name` loaded with weights as `dtype` and every routed expert in process.
pub fn load(name: &str, dtype: WeightDtype) -> (Arc<Model>, Arc<dyn ExpertBackend>) {
    let loaded = load_model(&checkpoint(name), LoadOptions { weight_dtype: dtype, local_experts: true }, &|_| {})
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (Arc::new(loaded.model), Arc::new(loaded.experts.expect("local experts")))
}

pub fn engine(model: &Arc<Model>, experts: &Arc<dyn ExpertBackend>, opts: EngineOptions) -> Engine {
    Engine::new(model.clone(), experts.clone(), opts).expect("engine")
}

/// A step (prefill or decode) every sequence of which must succeed.
pub trait AllOk {
    /// Each sequence's output; panics naming `what` on any error.
    fn all_ok(self, what: &str) -> Vec<StepOutput>;
}

impl AllOk for Result<Vec<Result<StepOutput, EngineError>>, EngineError> {
    fn all_ok(self, what: &str) -> Vec<StepOutput> {
        let outs = self.unwrap_or_else(|e| panic!("{what}: {e}"));
        outs.into_iter().map(|o| o.unwrap_or_else(|e| panic!("{what}: {e}"))).collect()
    }
}
