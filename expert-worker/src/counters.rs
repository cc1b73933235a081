//! Tokens served per (MoE layer, logical expert) since start, for every routed expert of the
//! model (hosted now or not), and requests seen. Written by the compute thread, read by the
//! gRPC service and the load publisher.

use model::{ExpertGroup, ModelConfig};
use placement::SlotKey;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct LoadCounters {
    /// The MoE layers, ascending: row `r` of `tokens` counts layer `layers[r]`.
    layers: Vec<usize>,
    /// Model layer index → row, `None` for dense layers.
    row_of: Vec<Option<usize>>,
    num_experts: usize,
    /// `[layers.len()][num_experts]`, row-major.
    tokens: Vec<AtomicU64>,
    requests: AtomicU64,
}

impl LoadCounters {
    pub fn new(config: &ModelConfig) -> Self {
        let layers = config.moe_layers();
        let mut row_of = vec![None; config.num_layers_with_mtp()];
        for (row, &layer) in layers.iter().enumerate() {
            row_of[layer] = Some(row);
        }
        let num_experts = config.n_routed_experts;
        let tokens = (0..layers.len() * num_experts).map(|_| AtomicU64::new(0)).collect();
        LoadCounters { layers, row_of, num_experts, tokens, requests: AtomicU64::new(0) }
    }

    /// The MoE layers, ascending (the row order of [`LoadCounters::snapshot`]).
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    fn index(&self, slot: SlotKey) -> Option<usize> {
        let row = (*self.row_of.get(slot.layer)?)?;
        let expert = slot.expert as usize;
        (expert < self.num_experts).then_some(row * self.num_experts + expert)
    }

    /// Tokens `slot` served since start (0 for a slot the model does not have).
    pub fn tokens(&self, slot: SlotKey) -> u64 {
        self.index(slot).map_or(0, |i| self.tokens[i].load(Ordering::Relaxed))
    }

    /// Tokens served per counter, `[layers][num_experts]` row-major.
    pub fn snapshot(&self) -> Vec<u64> {
        self.tokens.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts a request, and its tokens when it was served.
    pub fn record(&self, layer: usize, groups: &[ExpertGroup], served: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !served {
            return;
        }
        for g in groups {
            if let Some(i) = self.index(SlotKey { layer, expert: g.expert.0 }) {
                self.tokens[i].fetch_add(g.num_tokens as u64, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::ExpertId;

    #[test]
    fn counts_served_tokens_per_layer_and_expert() {
        let dir = tempfile::tempdir().expect("tempdir");
        model::default_model::ensure(dir.path()).expect("generate");
        let config = ModelConfig::from_dir(dir.path()).expect("config");
        let c = LoadCounters::new(&config);
        let (first, n) = (c.layers()[0], c.num_experts());
        assert_eq!(c.snapshot().len(), c.layers().len() * n);
        let groups =
            [ExpertGroup { expert: ExpertId(2), num_tokens: 5 }, ExpertGroup { expert: ExpertId(0), num_tokens: 1 }];
        c.record(first, &groups, true);
        c.record(first, &groups, false);
        c.record(0, &groups, true); // a dense layer: not counted
        assert_eq!(c.requests(), 3);
        assert_eq!(c.tokens(SlotKey { layer: first, expert: 2 }), 5);
        assert_eq!(c.tokens(SlotKey { layer: first, expert: 0 }), 1);
        assert_eq!(c.tokens(SlotKey { layer: first, expert: n as u32 }), 0);
        assert_eq!(c.snapshot().iter().sum::<u64>(), 6);
        assert_eq!(c.snapshot()[2], 5, "row-major, first MoE layer first");
    }
}
