//! eplb: DeepSeek's expert-parallel load balancer. Given per-layer expert loads, decide how
//! many replicas each expert gets and which worker holds each replica; pure, synchronous
//! decision code with no I/O.
//!
//! This reproduces `rebalance_experts` of deepseek-ai/EPLB `eplb.py` exactly: the same
//! placements for the same loads, ties included (checked against PyTorch outputs in
//! `tests/reference.rs`, fixture made by `tests/reference/gen_reference.py`). What that takes:
//!
//! - Loads are converted to f32 first (the reference does `weight.float()`), and every
//!   division, accumulation and comparison afterwards is f32, as torch's are.
//! - Items are sorted as `torch.sort(descending=True)` sorts them, which is libstdc++'s
//!   unstable introsort, not a stable sort (`introsort.rs`).
//! - Argmax and "lightest pack" pick the first index on ties, as torch's `max(dim)` and
//!   Python's `min` do.
//!
//! One inexactness remains, by design: the hierarchical policy packs groups by their total
//! load, which the reference sums with torch's SIMD reduction (its rounding depends on the
//! CPU's vector width); this crate sums in f64 and rounds once. The totals are equal whenever
//! the exact sum fits f32 (integer token counts below 2^24 per group) and otherwise may differ
//! in the last bits, which changes a placement only if two group totals are that close. The
//! totals matter only with two or more groups per node.
//!
//! Layout of the result: physical slots `[0, R)` per layer, worker `w` holding the `R / W`
//! contiguous slots `[w * R/W, (w + 1) * R/W)`. With the hierarchical policy node `n` holds
//! workers `[n * W/N, (n + 1) * W/N)` and all replicas of the experts of the groups it got.

mod hierarchical;
mod introsort;
mod metrics;
mod packing;
mod replicate;

use serde::{Deserialize, Serialize};

use crate::hierarchical::{Shape, rebalance_layer};

pub use crate::metrics::{balancedness, max_mean_ratio, model_balancedness, worker_loads};

/// Where every expert replica lives, per MoE layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `[layers][R]`: logical expert held by each physical slot.
    pub phy2log: Vec<Vec<usize>>,
    /// `[layers][E][R - E + 1]`: physical slots of each expert's replicas in rank order,
    /// padded with -1 (width fixed by the redundancy, as in the reference, not by the largest
    /// count actually used).
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// `[layers][E]`: replicas per expert, each >= 1, summing to `R` per layer.
    pub logcnt: Vec<Vec<usize>>,
}

impl Placement {
    /// No redundancy, experts in order: slot `e` holds expert `e`. With `W` workers dividing
    /// `E` this is the static placement of `E / W` consecutive experts per worker.
    pub fn identity(num_layers: usize, num_experts: usize) -> Self {
        let phy2log: Vec<usize> = (0..num_experts).collect();
        let log2phy: Vec<Vec<i64>> = (0..num_experts).map(|e| vec![e as i64]).collect();
        Placement {
            phy2log: vec![phy2log; num_layers],
            log2phy: vec![log2phy; num_layers],
            logcnt: vec![vec![1; num_experts]; num_layers],
        }
    }

    /// Number of MoE layers.
    pub fn num_layers(&self) -> usize {
        self.phy2log.len()
    }

    /// Physical slots per layer (`R`).
    pub fn num_replicas(&self) -> usize {
        self.phy2log.first().map_or(0, Vec::len)
    }
}

/// Which of the reference's two policies a rebalance uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Policy {
    /// Groups packed onto nodes, replicas kept on their group's node (`groups % nodes == 0`).
    Hierarchical,
    /// One group, one node: replicas go to any worker.
    Global,
}

impl Policy {
    /// The policy the reference picks: hierarchical iff the groups split evenly over nodes.
    pub fn for_topology(num_groups: usize, num_nodes: usize) -> Self {
        if num_nodes != 0 && num_groups.is_multiple_of(num_nodes) { Policy::Hierarchical } else { Policy::Global }
    }
}

/// A rebalance request that cannot be satisfied, with the offending numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EplbError {
    #[error("load has no layers")]
    NoLayers,
    #[error("load has no experts (layer 0 is empty)")]
    NoExperts,
    #[error("ragged load: layer {layer} has {len} experts but layer 0 has {expected}")]
    RaggedLayers { layer: usize, len: usize, expected: usize },
    #[error("{name} must be >= 1, got 0")]
    ZeroCount { name: &'static str },
    #[error("num_experts {num_experts} is not divisible by num_groups {num_groups}")]
    ExpertsNotDivisibleByGroups { num_experts: usize, num_groups: usize },
    #[error("num_workers {num_workers} is not divisible by num_nodes {num_nodes}")]
    WorkersNotDivisibleByNodes { num_workers: usize, num_nodes: usize },
    #[error("num_replicas {num_replicas} is not divisible by num_workers {num_workers}")]
    ReplicasNotDivisibleByWorkers { num_replicas: usize, num_workers: usize },
    #[error("num_replicas {num_replicas} must be >= num_experts {num_experts} (every expert needs a slot)")]
    TooFewReplicas { num_replicas: usize, num_experts: usize },
    #[error("load[{layer}][{expert}] = {value} is negative")]
    NegativeLoad { layer: usize, expert: usize, value: f64 },
    #[error("load[{layer}][{expert}] = {value} is not a finite f32 (NaN, infinite or out of range)")]
    NonFiniteLoad { layer: usize, expert: usize, value: f64 },
}

/// Rebalance every layer: `load[layer][expert]` (for example a moving average of routed
/// tokens) onto `num_replicas` physical slots spread over `num_workers` workers in
/// `num_nodes` nodes, experts forming `num_groups` routing groups.
///
/// Uses the hierarchical policy when `num_groups % num_nodes == 0` and the global one
/// otherwise, as the reference does. Unlike the reference, which only asserts what the chosen
/// policy needs, this rejects `num_experts % num_groups != 0` and
/// `num_workers % num_nodes != 0` under either policy: both mean a misdescribed model or
/// cluster.
pub fn rebalance(
    load: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_workers: usize,
) -> Result<Placement, EplbError> {
    let weight = validate(load, num_replicas, num_groups, num_nodes, num_workers)?;
    let num_experts = load[0].len();
    let shape = match Policy::for_topology(num_groups, num_nodes) {
        Policy::Hierarchical => Shape { num_replicas, num_groups, num_nodes, num_workers },
        Policy::Global => Shape { num_replicas, num_groups: 1, num_nodes: 1, num_workers },
    };
    let width = num_replicas - num_experts + 1;

    let mut placement = Placement {
        phy2log: Vec::with_capacity(load.len()),
        log2phy: Vec::with_capacity(load.len()),
        logcnt: Vec::with_capacity(load.len()),
    };
    for layer_weight in &weight {
        let layer = rebalance_layer(layer_weight, shape);
        let mut log2phy = vec![vec![-1i64; width]; num_experts];
        for (slot, (&expert, &rank)) in layer.phy2log.iter().zip(&layer.phyrank).enumerate() {
            log2phy[expert][rank] = slot as i64;
        }
        placement.phy2log.push(layer.phy2log);
        placement.log2phy.push(log2phy);
        placement.logcnt.push(layer.logcnt);
    }
    Ok(placement)
}

/// Check the request and convert the loads to f32.
fn validate(
    load: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_workers: usize,
) -> Result<Vec<Vec<f32>>, EplbError> {
    let num_experts = load.first().ok_or(EplbError::NoLayers)?.len();
    if num_experts == 0 {
        return Err(EplbError::NoExperts);
    }
    if let Some((layer, row)) = load.iter().enumerate().find(|(_, row)| row.len() != num_experts) {
        return Err(EplbError::RaggedLayers { layer, len: row.len(), expected: num_experts });
    }
    for (name, value) in [
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_workers", num_workers),
    ] {
        if value == 0 {
            return Err(EplbError::ZeroCount { name });
        }
    }
    if !num_experts.is_multiple_of(num_groups) {
        return Err(EplbError::ExpertsNotDivisibleByGroups { num_experts, num_groups });
    }
    if !num_workers.is_multiple_of(num_nodes) {
        return Err(EplbError::WorkersNotDivisibleByNodes { num_workers, num_nodes });
    }
    if !num_replicas.is_multiple_of(num_workers) {
        return Err(EplbError::ReplicasNotDivisibleByWorkers { num_replicas, num_workers });
    }
    if num_replicas < num_experts {
        return Err(EplbError::TooFewReplicas { num_replicas, num_experts });
    }

    let mut weight = Vec::with_capacity(load.len());
    for (layer, row) in load.iter().enumerate() {
        let mut converted = Vec::with_capacity(num_experts);
        for (expert, &value) in row.iter().enumerate() {
            let w = value as f32;
            if !w.is_finite() {
                return Err(EplbError::NonFiniteLoad { layer, expert, value });
            }
            if w < 0.0 {
                return Err(EplbError::NegativeLoad { layer, expert, value });
            }
            converted.push(w);
        }
        weight.push(converted);
    }
    Ok(weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_policy_small_case() {
        // 4 experts, 2 groups, 3 nodes (2 % 3 != 0: global), 3 workers, 6 slots (2 per worker).
        // Replicate: e0 12 -> 6, then e0 (6) ties e3 (6) and wins on index -> 4.
        // Slots e0 e1 e2 e3 e0 e0 carry 4 1 2 6 4 4.
        let load = vec![vec![12.0, 1.0, 2.0, 6.0]];
        let p = rebalance(&load, 6, 2, 3, 3).expect("valid request");
        assert_eq!(p.logcnt, vec![vec![3, 1, 1, 1]]);
        // Sorted: 6(p3) 4(p0) 4(p4) 4(p5) 2(p2) 1(p1); 3 workers of 2:
        // p3->w0 (6), p0->w1 (4), p4->w2 (4), p5->w1 (8), p2->w2 (6), p1->w0 (7).
        // Worker 1 got replica ranks 0 and 2 of e0 (slots 2, 3), worker 2 rank 1 (slot 4).
        assert_eq!(p.phy2log, vec![vec![3, 1, 0, 0, 0, 2]]);
        assert_eq!(p.log2phy, vec![vec![vec![2, 4, 3], vec![1, -1, -1], vec![5, -1, -1], vec![0, -1, -1]]]);
    }

    #[test]
    fn identity_placement_is_consistent() {
        let p = Placement::identity(2, 3);
        assert_eq!(p.num_layers(), 2);
        assert_eq!(p.num_replicas(), 3);
        assert_eq!(p.log2phy[1], vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn policy_follows_groups_over_nodes() {
        assert_eq!(Policy::for_topology(8, 4), Policy::Hierarchical);
        assert_eq!(Policy::for_topology(8, 18), Policy::Global);
        assert_eq!(Policy::for_topology(8, 0), Policy::Global);
    }

    #[test]
    fn rejects_bad_requests_precisely() {
        let ok = vec![vec![1.0; 8]; 2];
        let err = |load: &[Vec<f64>], r, g, n, w| rebalance(load, r, g, n, w).expect_err("invalid");
        assert_eq!(err(&[], 8, 1, 1, 1), EplbError::NoLayers);
        assert_eq!(err(&[vec![]], 8, 1, 1, 1), EplbError::NoExperts);
        assert_eq!(
            err(&[vec![1.0; 8], vec![1.0; 7]], 8, 1, 1, 1),
            EplbError::RaggedLayers { layer: 1, len: 7, expected: 8 }
        );
        assert_eq!(err(&ok, 8, 1, 1, 0), EplbError::ZeroCount { name: "num_workers" });
        assert_eq!(err(&ok, 0, 1, 1, 1), EplbError::ZeroCount { name: "num_replicas" });
        assert_eq!(err(&ok, 8, 3, 1, 1), EplbError::ExpertsNotDivisibleByGroups { num_experts: 8, num_groups: 3 });
        assert_eq!(err(&ok, 12, 4, 3, 4), EplbError::WorkersNotDivisibleByNodes { num_workers: 4, num_nodes: 3 });
        assert_eq!(
            err(&ok, 10, 4, 2, 4),
            EplbError::ReplicasNotDivisibleByWorkers { num_replicas: 10, num_workers: 4 }
        );
        assert_eq!(err(&ok, 4, 4, 2, 4), EplbError::TooFewReplicas { num_replicas: 4, num_experts: 8 });
        let mut bad = ok.clone();
        bad[1][5] = -1.0;
        assert_eq!(err(&bad, 8, 1, 1, 1), EplbError::NegativeLoad { layer: 1, expert: 5, value: -1.0 });
        bad[1][5] = 1e39; // beyond f32::MAX
        assert_eq!(err(&bad, 8, 1, 1, 1), EplbError::NonFiniteLoad { layer: 1, expert: 5, value: 1e39 });
        bad[1][5] = f64::NAN;
        assert!(matches!(err(&bad, 8, 1, 1, 1), EplbError::NonFiniteLoad { layer: 1, expert: 5, .. }));
        assert_eq!(
            EplbError::TooFewReplicas { num_replicas: 4, num_experts: 8 }.to_string(),
            "num_replicas 4 must be >= num_experts 8 (every expert needs a slot)"
        );
    }
}
