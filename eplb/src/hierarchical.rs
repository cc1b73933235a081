//! The hierarchical policy for one layer: groups onto nodes, replicas within each node,
//! replicas onto that node's workers. The global policy is the same with one group and one
//! node.

use crate::packing::balanced_packing;
use crate::replicate::replicate_experts;

/// One layer's placement before `log2phy` is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerPlacement {
    /// `[num_replicas]`: logical expert in each physical slot.
    pub phy2log: Vec<usize>,
    /// `[num_replicas]`: replica rank of each slot among its expert's replicas.
    pub phyrank: Vec<usize>,
    /// `[num_experts]`: replicas per logical expert.
    pub logcnt: Vec<usize>,
}

/// Counts for one rebalance, validated by `rebalance`: every division below is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub num_replicas: usize,
    pub num_groups: usize,
    pub num_nodes: usize,
    pub num_workers: usize,
}

/// `rebalance_experts_hierarchical` of the reference for one layer (`weight`: f32 loads).
///
/// Physical slots come out node-major: node `n` owns slots `[n * R/N, (n + 1) * R/N)` and,
/// inside it, worker `k` of the node owns the `R/W` slots starting at `k * R/W`.
pub(crate) fn rebalance_layer(weight: &[f32], shape: Shape) -> LayerPlacement {
    let Shape { num_replicas, num_groups, num_nodes, num_workers } = shape;
    let num_experts = weight.len();
    let group_size = num_experts / num_groups;
    let groups_per_node = num_groups / num_nodes;
    let experts_per_node = num_experts / num_nodes;
    let slots_per_node = num_replicas / num_nodes;
    let workers_per_node = num_workers / num_nodes;
    let slots_per_worker = num_replicas / num_workers;

    // Step 1: pack groups onto nodes by total load. The reference sums each group in f32 with
    // torch's SIMD reduction; summing in f64 and rounding once gives the same f32 whenever the
    // exact total is representable (integer token counts below 2^24) and otherwise may differ
    // in the last bits, which matters only to two group totals that close (see the crate docs).
    let group_load: Vec<f32> =
        weight.chunks_exact(group_size).map(|group| group.iter().map(|&w| f64::from(w)).sum::<f64>() as f32).collect();
    // mlog ("node-major logical" index): node n's experts are mlog [n * E/N, (n + 1) * E/N),
    // its groups in the order they were packed, each group's experts in their own order.
    let mut mlog2log = vec![0usize; num_experts];
    for (group, slot) in balanced_packing(&group_load, num_nodes).into_iter().enumerate() {
        let base = (slot.pack * groups_per_node + slot.rank) * group_size;
        for offset in 0..group_size {
            mlog2log[base + offset] = group * group_size + offset;
        }
    }

    let mut placement =
        LayerPlacement { phy2log: vec![0; num_replicas], phyrank: vec![0; num_replicas], logcnt: vec![0; num_experts] };
    for (node, node_experts) in mlog2log.chunks_exact(experts_per_node).enumerate() {
        // Step 2: replicate this node's experts into its slots.
        let node_weight: Vec<f32> = node_experts.iter().map(|&expert| weight[expert]).collect();
        let replicas = replicate_experts(&node_weight, slots_per_node);
        for (local, &cnt) in replicas.logcnt.iter().enumerate() {
            placement.logcnt[node_experts[local]] = cnt;
        }

        // Step 3: pack the node's replicas (each carrying load / replica count) onto its workers.
        let replica_load: Vec<f32> =
            replicas.phy2log.iter().map(|&local| node_weight[local] / replicas.logcnt[local] as f32).collect();
        let node_base = node * slots_per_node;
        for (phy, slot) in balanced_packing(&replica_load, workers_per_node).into_iter().enumerate() {
            let dst = node_base + slot.pack * slots_per_worker + slot.rank;
            placement.phy2log[dst] = node_experts[replicas.phy2log[phy]];
            placement.phyrank[dst] = replicas.rank[phy];
        }
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchical_worked_example() {
        // 8 experts in 4 groups of 2, 2 nodes of 2 workers, 12 slots (3 per worker).
        let weight = [90.0, 10.0, 20.0, 20.0, 5.0, 5.0, 30.0, 60.0];
        let shape = Shape { num_replicas: 12, num_groups: 4, num_nodes: 2, num_workers: 4 };
        let p = rebalance_layer(&weight, shape);
        // Group loads 100, 40, 10, 90 -> packing (2 per node): g0->n0, g3->n1, g1->n1, g2->n0.
        // Node 0 holds experts [0, 1, 4, 5] (loads 90 10 5 5), node 1 [6, 7, 2, 3]
        // (30 60 20 20). Node 0's 2 extra slots: 90 -> 45 -> 30, both to expert 0.
        // Node 1's: 60 -> 30, then 30 (expert 6) ties 30 (expert 7) -> expert 6 (first).
        assert_eq!(p.logcnt, vec![3, 1, 1, 1, 1, 1, 2, 2]);
        // Node 0 replicas (local order) carry e0 30, e1 10, e4 5, e5 5, e0 30, e0 30; sorted
        // 30(p0) 30(p4) 30(p5) 10(p1) 5(p2) 5(p3) onto 2 workers of 3 slots:
        // p0->w0, p4->w1, p5->w0 (tie), p1->w1, p2->w1 (w1 now full), p3->w0.
        assert_eq!(&p.phy2log[..6], &[0, 0, 5, 0, 1, 4]);
        assert_eq!(&p.phyrank[..6], &[0, 2, 0, 1, 0, 0]);
        // Node 1 replicas carry e6 15, e7 30, e2 20, e3 20, e7 30, e6 15; sorted
        // 30(p1) 30(p4) 20(p2) 20(p3) 15(p0) 15(p5):
        // p1->w0, p4->w1, p2->w0 (tie), p3->w1, p0->w0 (tie at 50, w0 now full), p5->w1.
        assert_eq!(&p.phy2log[6..], &[7, 2, 6, 7, 3, 6]);
        assert_eq!(&p.phyrank[6..], &[0, 0, 0, 1, 0, 1]);
    }
}
