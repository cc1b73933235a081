//! Routed experts behind a trait, so the forward pass can run them in this process or send
//! them to expert workers. A call carries one MoE layer's tokens grouped by expert.

use crate::ModelError;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::forward::Mlp;
use crate::weights::{WeightDtype, WeightReader};
use kernels::cpu::Precision;
use rayon::prelude::*;
use std::fmt;

/// A logical routed expert of one MoE layer (0..n_routed_experts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId(pub u32);

/// `num_tokens` consecutive input rows that go to `expert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroup {
    pub expert: ExpertId,
    pub num_tokens: usize,
}

/// One MoE layer's work: `inputs` is `[Σ num_tokens, hidden]`, rows in group order.
#[derive(Debug, Clone, Copy)]
pub struct ExpertBatch<'a> {
    pub layer: usize,
    pub hidden: usize,
    pub groups: &'a [ExpertGroup],
    pub inputs: &'a [f32],
}

impl ExpertBatch<'_> {
    pub fn num_rows(&self) -> usize {
        self.groups.iter().map(|g| g.num_tokens).sum()
    }
}

/// Why routed experts could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("layer {layer} expert {expert} is not hosted here")]
    NotHosted { layer: usize, expert: u32 },
    #[error("expert batch is malformed: {0}")]
    Malformed(String),
    #[error("expert service unavailable: {0}")]
    Unavailable(String),
    #[error("layer {layer} expert {expert} is not a routed expert of this model")]
    NoSuchExpert { layer: usize, expert: u32 },
}

/// Runs routed experts. `outputs` is `[Σ num_tokens, hidden]`, rows in the same order as
/// `batch.inputs`; outputs are unweighted (the caller applies routing weights).
pub trait ExpertBackend: Send + Sync + fmt::Debug {
    fn run(&self, batch: &ExpertBatch<'_>, outputs: &mut [f32]) -> Result<(), ExpertError>;

    /// The experts themselves when they live in this process (a GPU engine then copies them
    /// to the device instead of calling `run`).
    fn as_local(&self) -> Option<&LocalExperts> {
        None
    }
}

/// One routed expert's weights, loaded and ready to be inserted into [`LocalExperts`].
#[derive(Debug)]
pub struct ExpertWeights {
    layer: usize,
    expert: ExpertId,
    mlp: Mlp,
}

impl ExpertWeights {
    pub fn layer(&self) -> usize {
        self.layer
    }

    pub fn expert(&self) -> ExpertId {
        self.expert
    }
}

/// Experts held in this process: `layers[layer][expert]`, `None` where not loaded. Every
/// MoE layer (the MTP layer's included) has `n_routed_experts` entries, every dense layer none.
#[derive(Debug)]
pub struct LocalExperts {
    pub(crate) layers: Vec<Vec<Option<Mlp>>>,
    /// Row width every batch must have (the model's hidden size).
    hidden: usize,
    precision: Precision,
}

impl LocalExperts {
    /// Hosts nothing yet; experts arrive through [`LocalExperts::insert`].
    pub fn empty(config: &ModelConfig, precision: Precision) -> Self {
        let layers =
            (0..config.num_layers_with_mtp())
                .map(|l| {
                    if config.is_moe_layer(l) {
                        (0..config.n_routed_experts).map(|_| None).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect();
        LocalExperts { layers, hidden: config.hidden_size, precision }
    }

    /// Loads the experts for which `want(layer, expert)` holds.
    pub fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        dtype: WeightDtype,
        want: &dyn Fn(usize, ExpertId) -> bool,
        progress: &dyn Fn(u64),
    ) -> Result<Self, ModelError> {
        let mut experts = LocalExperts::empty(config, Precision::Exact);
        for l in config.moe_layers() {
            for id in (0..config.n_routed_experts as u32).map(ExpertId).filter(|&id| want(l, id)) {
                let w = LocalExperts::load_expert(ckpt, config, dtype, l, id)?;
                experts.layers[l][id.0 as usize] = Some(w.mlp);
                progress(1);
            }
        }
        Ok(experts)
    }

    /// Loads one routed expert's weights from `ckpt` (the checkpoint of `config`); refuses a
    /// layer that is not a MoE layer or an expert id beyond `n_routed_experts`.
    pub fn load_expert(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        dtype: WeightDtype,
        layer: usize,
        expert: ExpertId,
    ) -> Result<ExpertWeights, ModelError> {
        let routed = layer < config.num_layers_with_mtp() && config.is_moe_layer(layer);
        if !routed || expert.0 as usize >= config.n_routed_experts {
            return Err(ModelError::Config {
                path: ckpt.dir().join("config.json"),
                field: "n_routed_experts".into(),
                reason: format!("layer {layer} expert {} is not a routed expert of this model", expert.0),
            });
        }
        let reader = WeightReader { ckpt, dtype, fp8_block: config.fp8.map(|f| f.block) };
        let mlp = Mlp::load(&reader, &crate::shapes::expert(config, layer, expert))?;
        Ok(ExpertWeights { layer, expert, mlp })
    }

    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    fn entry(&mut self, layer: usize, expert: ExpertId) -> Option<&mut Option<Mlp>> {
        self.layers.get_mut(layer).and_then(|l| l.get_mut(expert.0 as usize))
    }

    /// Hosts `weights` from now on, replacing (and returning) what was hosted in its place.
    /// `NoSuchExpert` if this model has no such (layer, expert).
    pub fn insert(&mut self, weights: ExpertWeights) -> Result<Option<ExpertWeights>, ExpertError> {
        let ExpertWeights { layer, expert, mlp } = weights;
        let entry = self.entry(layer, expert).ok_or(ExpertError::NoSuchExpert { layer, expert: expert.0 })?;
        Ok(entry.replace(mlp).map(|mlp| ExpertWeights { layer, expert, mlp }))
    }

    /// Stops hosting (layer, expert); returns its weights if it was hosted.
    pub fn remove(&mut self, layer: usize, expert: ExpertId) -> Option<ExpertWeights> {
        self.entry(layer, expert)?.take().map(|mlp| ExpertWeights { layer, expert, mlp })
    }

    pub fn is_hosted(&self, layer: usize, expert: ExpertId) -> bool {
        self.layers.get(layer).and_then(|l| l.get(expert.0 as usize)).is_some_and(Option::is_some)
    }

    /// The hosted (layer, expert) pairs, ascending.
    pub fn hosted(&self) -> Vec<(usize, ExpertId)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, experts)| {
                experts.iter().enumerate().filter(|(_, m)| m.is_some()).map(move |(e, _)| (l, ExpertId(e as u32)))
            })
            .collect()
    }
}

impl ExpertBackend for LocalExperts {
    fn as_local(&self) -> Option<&LocalExperts> {
        Some(self)
    }

    fn run(&self, batch: &ExpertBatch<'_>, outputs: &mut [f32]) -> Result<(), ExpertError> {
        let h = batch.hidden;
        if h != self.hidden {
            return Err(ExpertError::Malformed(format!(
                "rows of width {h}, but the model's hidden size is {}",
                self.hidden
            )));
        }
        let rows = batch.num_rows();
        if batch.inputs.len() != rows * h || outputs.len() != rows * h {
            return Err(ExpertError::Malformed(format!("{rows} rows of width {h} expected")));
        }
        let layer = self.layers.get(batch.layer);
        let mut jobs = Vec::with_capacity(batch.groups.len());
        let (mut rest, mut start) = (&mut outputs[..], 0);
        for g in batch.groups {
            let mlp = layer
                .and_then(|l| l.get(g.expert.0 as usize))
                .and_then(Option::as_ref)
                .ok_or(ExpertError::NotHosted { layer: batch.layer, expert: g.expert.0 })?;
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(g.num_tokens * h);
            rest = tail;
            jobs.push((mlp, &batch.inputs[start * h..(start + g.num_tokens) * h], g.num_tokens, out));
            start += g.num_tokens;
        }
        // Experts in parallel: each streams its own weights; small per-expert batches would
        // otherwise pay a fork/join per matmul.
        jobs.into_par_iter().for_each(|(mlp, x, m, out)| mlp.forward(x, m, out, self.precision));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::ExpertCheckpoint;

    fn batch_output(experts: &LocalExperts, layer: usize, expert: u32, hidden: usize) -> Result<Vec<f32>, ExpertError> {
        let groups = [ExpertGroup { expert: ExpertId(expert), num_tokens: 2 }];
        let inputs: Vec<f32> = (0..2 * hidden).map(|i| (i as f32 * 0.013).sin()).collect();
        let mut out = vec![0f32; inputs.len()];
        experts.run(&ExpertBatch { layer, hidden, groups: &groups, inputs: &inputs }, &mut out).map(|()| out)
    }

    #[test]
    fn experts_inserted_one_by_one_match_a_full_load_and_can_be_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::default_model::ensure(dir.path()).expect("generate");
        let ckpt = ExpertCheckpoint::open(Some(dir.path().to_path_buf()), WeightDtype::Auto).expect("open");
        let config = ckpt.config().clone();
        let layer = (0..config.num_hidden_layers).find(|&l| config.is_moe_layer(l)).expect("a MoE layer");
        let h = config.hidden_size;

        let full = Checkpoint::open(dir.path()).expect("open");
        let all = LocalExperts::load(&full, &config, WeightDtype::Auto, &|_, _| true, &|_| {}).expect("load");
        let mut some = LocalExperts::empty(&config, Precision::Exact);
        assert!(some.hosted().is_empty());
        assert!(matches!(batch_output(&some, layer, 3, h), Err(ExpertError::NotHosted { expert: 3, .. })));

        let w = ckpt.load(layer, ExpertId(3)).expect("load one");
        assert_eq!((w.layer(), w.expert()), (layer, ExpertId(3)));
        assert!(some.insert(w).expect("in range").is_none());
        assert_eq!(some.hosted(), vec![(layer, ExpertId(3))]);
        assert!(some.is_hosted(layer, ExpertId(3)));
        let want = batch_output(&all, layer, 3, h).expect("runs");
        assert_eq!(batch_output(&some, layer, 3, h).expect("runs"), want);

        let again = ckpt.load(layer, ExpertId(3)).expect("load again");
        assert!(some.insert(again).expect("in range").is_some(), "replacing returns the old weights");
        assert!(some.remove(layer, ExpertId(3)).is_some());
        assert!(some.remove(layer, ExpertId(3)).is_none());
        assert!(some.hosted().is_empty());
        assert!(matches!(batch_output(&some, layer, 3, h), Err(ExpertError::NotHosted { .. })));
    }

    #[test]
    fn load_expert_refuses_what_is_not_a_routed_expert() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::default_model::ensure(dir.path()).expect("generate");
        let ckpt = ExpertCheckpoint::open(Some(dir.path().to_path_buf()), WeightDtype::Auto).expect("open");
        let c = ckpt.config().clone();
        let dense = (0..c.num_hidden_layers).find(|&l| !c.is_moe_layer(l)).expect("a dense layer");
        let moe = (0..c.num_hidden_layers).find(|&l| c.is_moe_layer(l)).expect("a MoE layer");
        for (layer, expert) in [(dense, 0), (moe, c.n_routed_experts as u32), (c.num_layers_with_mtp(), 0)] {
            let e = ckpt.load(layer, ExpertId(expert)).expect_err("not an expert").to_string();
            assert!(e.contains("config.json") && e.contains(&format!("layer {layer} expert {expert}")), "{e}");
        }
        let mut experts = LocalExperts::empty(&c, Precision::Exact);
        let w = ckpt.load(moe, ExpertId(0)).expect("load");
        let other = ModelConfig { n_routed_experts: 0, ..c };
        assert!(matches!(
            LocalExperts::empty(&other, Precision::Exact).insert(w),
            Err(ExpertError::NoSuchExpert { .. })
        ));
        assert!(experts.remove(dense, ExpertId(0)).is_none());
    }
}
