//! Routed experts behind a trait, so the forward pass can run them in this process or send
//! them to expert workers. A call carries one MoE layer's tokens grouped by expert.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::forward::Mlp;
use crate::weights::{WeightDtype, WeightReader};
use crate::ModelError;
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
}

/// Runs routed experts. `outputs` is `[Σ num_tokens, hidden]`, rows in the same order as
/// `batch.inputs`; outputs are unweighted (the caller applies routing weights).
pub trait ExpertBackend: Send + Sync + fmt::Debug {
    fn run(&self, batch: &ExpertBatch<'_>, outputs: &mut [f32]) -> Result<(), ExpertError>;
}

/// Experts held in this process: `layers[layer][expert]`, `None` where not loaded.
#[derive(Debug)]
pub struct LocalExperts {
    layers: Vec<Vec<Option<Mlp>>>,
    precision: Precision,
}

impl LocalExperts {
    /// Loads the experts for which `want(layer, expert)` holds.
    pub fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        dtype: WeightDtype,
        want: &dyn Fn(usize, ExpertId) -> bool,
        progress: &dyn Fn(u64),
    ) -> Result<Self, ModelError> {
        let reader = WeightReader { ckpt, dtype, fp8_block: config.fp8.map(|f| f.block) };
        let (h, i) = (config.hidden_size, config.moe_intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let mut experts = Vec::new();
            if config.is_moe_layer(l) {
                for e in 0..config.n_routed_experts {
                    let id = ExpertId(e as u32);
                    experts.push(if want(l, id) {
                        let mlp = Mlp::load(&reader, &format!("model.layers.{l}.mlp.experts.{e}"), h, i)?;
                        progress(1);
                        Some(mlp)
                    } else {
                        None
                    });
                }
            }
            layers.push(experts);
        }
        Ok(LocalExperts { layers, precision: Precision::Exact })
    }

    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }
}

impl ExpertBackend for LocalExperts {
    fn run(&self, batch: &ExpertBatch<'_>, outputs: &mut [f32]) -> Result<(), ExpertError> {
        let h = batch.hidden;
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
