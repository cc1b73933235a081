//! Invariants of `rebalance` over many random requests (fixed seeds, so failures reproduce):
//! slot accounting, `log2phy` as the inverse of `phy2log`, node locality of the hierarchical
//! policy, optimality of the replica counts, and the load win over a static placement.

use eplb::{Placement, Policy, model_balancedness, rebalance, worker_loads};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// A rebalance request.
#[derive(Debug, Clone)]
struct Request {
    load: Vec<Vec<f64>>,
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_workers: usize,
}

impl Request {
    fn run(&self) -> Placement {
        rebalance(&self.load, self.num_replicas, self.num_groups, self.num_nodes, self.num_workers)
            .unwrap_or_else(|e| panic!("valid request rejected: {e}: {self:?}"))
    }

    fn num_experts(&self) -> usize {
        self.load[0].len()
    }

    fn policy(&self) -> Policy {
        Policy::for_topology(self.num_groups, self.num_nodes)
    }

    /// Node of a physical slot under the hierarchical policy.
    fn node_of_slot(&self, slot: usize) -> usize {
        slot / (self.num_replicas / self.num_nodes)
    }
}

struct Gen(ChaCha8Rng);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in `[0, n)`; the modulo bias is irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One expert load from a distribution picked per request: floats, heavy ties, skewed
    /// integer counts, one hot expert among cold ones, powers of two (exact ratio ties), zeros.
    fn load(&mut self, dist: usize) -> f64 {
        match dist {
            0 => self.unit() * 100.0,
            1 => self.below(4) as f64,
            2 => (50.0 / (self.unit() + 0.01).powf(1.2)).floor(),
            3 => {
                if self.below(8) == 0 {
                    1000.0
                } else {
                    1.0
                }
            }
            4 => (1u64 << self.below(7)) as f64,
            _ => 0.0,
        }
    }

    fn loads(&mut self, layers: usize, experts: usize) -> Vec<Vec<f64>> {
        let dist = self.below(6);
        (0..layers).map(|_| (0..experts).map(|_| self.load(dist)).collect()).collect()
    }

    /// A small random request: 1-4 nodes of 1-4 workers, 1-8 groups of 1-6 experts, up to
    /// two spare slots per worker. About half the shapes take the global policy.
    fn small_request(&mut self) -> Request {
        let num_nodes = 1 + self.below(4);
        let num_workers = num_nodes * (1 + self.below(4));
        let num_groups = 1 + self.below(8);
        let num_experts = num_groups * (1 + self.below(6));
        let slots_per_worker = num_experts.div_ceil(num_workers) + self.below(3);
        let layers = 1 + self.below(3);
        Request {
            load: self.loads(layers, num_experts),
            num_replicas: num_workers * slots_per_worker,
            num_groups,
            num_nodes,
            num_workers,
        }
    }
}

fn small_requests(seed: u64, count: usize) -> impl Iterator<Item = Request> {
    let mut generator = Gen::new(seed);
    (0..count).map(move |_| generator.small_request())
}

/// Slot accounting and `log2phy` as the exact inverse of `phy2log`.
fn check_structure(req: &Request, p: &Placement) {
    let (num_experts, num_replicas) = (req.num_experts(), req.num_replicas);
    let slots_per_worker = num_replicas / req.num_workers;
    assert_eq!(p.num_layers(), req.load.len());
    for layer in 0..p.num_layers() {
        let (phy2log, log2phy, logcnt) = (&p.phy2log[layer], &p.log2phy[layer], &p.logcnt[layer]);
        assert_eq!(phy2log.len(), num_replicas, "{req:?}");
        assert_eq!(logcnt.len(), num_experts);
        assert_eq!(logcnt.iter().sum::<usize>(), num_replicas, "replica counts must sum to R");
        assert!(logcnt.iter().all(|&c| c >= 1), "every expert needs a replica: {logcnt:?}");
        for (expert, &cnt) in logcnt.iter().enumerate() {
            assert_eq!(phy2log.iter().filter(|&&e| e == expert).count(), cnt);
        }

        assert_eq!(log2phy.len(), num_experts);
        let mut seen = vec![false; num_replicas];
        let mut per_worker = vec![0usize; req.num_workers];
        for (expert, row) in log2phy.iter().enumerate() {
            assert_eq!(row.len(), num_replicas - num_experts + 1, "log2phy width");
            let (live, padding) = row.split_at(logcnt[expert]);
            assert!(padding.iter().all(|&s| s == -1), "padding must be -1: {row:?}");
            for &slot in live {
                let slot = usize::try_from(slot).expect("live entries are slot indices");
                assert_eq!(phy2log[slot], expert, "log2phy points at a slot of another expert");
                assert!(!std::mem::replace(&mut seen[slot], true), "slot {slot} listed twice");
                per_worker[slot / slots_per_worker] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s), "every physical slot appears in log2phy");
        assert!(per_worker.iter().all(|&n| n == slots_per_worker), "{per_worker:?}");
    }
}

/// Hierarchical policy: an expert's replicas, and all experts of a group, share one node,
/// and every node gets the same number of groups.
fn check_locality(req: &Request, p: &Placement) {
    let group_size = req.num_experts() / req.num_groups;
    for layer in 0..p.num_layers() {
        let mut group_node = vec![None; req.num_groups];
        for (slot, &expert) in p.phy2log[layer].iter().enumerate() {
            let node = req.node_of_slot(slot);
            let first = *group_node[expert / group_size].get_or_insert(node);
            assert_eq!(first, node, "group {} spans nodes: {req:?}", expert / group_size);
        }
        for node in 0..req.num_nodes {
            let groups = group_node.iter().filter(|&&n| n == Some(node)).count();
            assert_eq!(groups, req.num_groups / req.num_nodes);
        }
    }
}

/// Replica counts minimize the largest load per replica within each replication domain (a
/// node, or everything under the global policy): taking a replica from any expert with two or
/// more would leave it at least as hot as the hottest replica now. Exact in f32, the
/// arithmetic the replicator uses (ratios only fall as counts grow).
fn check_replication_optimal(req: &Request, p: &Placement) {
    let domains = match req.policy() {
        Policy::Hierarchical => req.num_nodes,
        Policy::Global => 1,
    };
    let slots_per_domain = req.num_replicas / domains;
    for layer in 0..p.num_layers() {
        let weight: Vec<f32> = req.load[layer].iter().map(|&w| w as f32).collect();
        let cnt = &p.logcnt[layer];
        for domain in 0..domains {
            let mut experts: Vec<usize> =
                p.phy2log[layer][domain * slots_per_domain..(domain + 1) * slots_per_domain].to_vec();
            experts.sort_unstable();
            experts.dedup();
            let hottest = experts.iter().map(|&e| weight[e] / cnt[e] as f32).fold(0.0f32, f32::max);
            for &e in experts.iter().filter(|&&e| cnt[e] >= 2) {
                assert!(weight[e] / (cnt[e] - 1) as f32 >= hottest, "expert {e} has a replica to spare: {req:?}");
            }
        }
    }
}

#[test]
fn structure_holds_for_random_requests() {
    for req in small_requests(1, 3000) {
        let p = req.run();
        check_structure(&req, &p);
    }
}

#[test]
fn hierarchical_policy_keeps_groups_on_their_node() {
    let mut hierarchical = 0;
    for req in small_requests(2, 3000).filter(|r| r.policy() == Policy::Hierarchical) {
        check_locality(&req, &req.run());
        hierarchical += 1;
    }
    assert!(hierarchical > 1000, "generator produced only {hierarchical} hierarchical requests");
}

#[test]
fn replica_counts_are_optimal() {
    for req in small_requests(3, 3000) {
        check_replication_optimal(&req, &req.run());
    }
}

#[test]
fn layers_are_independent_and_results_deterministic() {
    for req in small_requests(4, 300) {
        let all = req.run();
        assert_eq!(all, req.run());
        for (layer, load) in req.load.iter().enumerate() {
            let one = Request { load: vec![load.clone()], ..req.clone() }.run();
            assert_eq!(one.phy2log[0], all.phy2log[layer]);
            assert_eq!(one.log2phy[0], all.log2phy[layer]);
        }
    }
}

/// The static placement without redundancy: `E / W` consecutive experts per worker, or
/// expert `e` on worker `e % W` when `W` does not divide `E`.
fn static_worker_loads(load: &[Vec<f64>], num_workers: usize) -> Vec<Vec<f64>> {
    load.iter()
        .map(|layer| {
            let mut per_worker = vec![0.0; num_workers];
            let contiguous = layer.len().is_multiple_of(num_workers);
            for (expert, &w) in layer.iter().enumerate() {
                let worker = if contiguous { expert / (layer.len() / num_workers) } else { expert % num_workers };
                per_worker[worker] += w;
            }
            per_worker
        })
        .collect()
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// At V3's shape (256 experts in 8 groups) EPLB's hottest worker is never hotter than under
/// the static placement, layer by layer, for every load distribution and cluster tried.
/// Not a theorem: see `a_lucky_static_placement_can_win`.
#[test]
fn never_worse_than_static_placement_at_v3_shape() {
    let mut generator = Gen::new(5);
    // (workers, nodes, slots): hierarchical 16/32/64 GPUs, global 144 and 1-node 8.
    let clusters = [(16, 2, 288), (32, 4, 288), (32, 4, 256), (64, 8, 320), (144, 18, 288), (8, 1, 256)];
    let mut layers_checked = 0;
    for (num_workers, num_nodes, num_replicas) in clusters {
        for _ in 0..60 {
            let req = Request { load: generator.loads(4, 256), num_replicas, num_groups: 8, num_nodes, num_workers };
            let after = worker_loads(&req.load, &req.run(), num_workers);
            let before = static_worker_loads(&req.load, num_workers);
            for (layer, (a, b)) in after.iter().zip(&before).enumerate() {
                assert!(
                    max(a) <= max(b) * (1.0 + 1e-12),
                    "layer {layer}: eplb max {} > static max {}: {req:?}",
                    max(a),
                    max(b)
                );
                layers_checked += 1;
            }
            assert!(model_balancedness(&after) >= model_balancedness(&before) - 1e-12);
        }
    }
    assert_eq!(layers_checked, 6 * 60 * 4);
}

/// The greedy packing is a heuristic: on tiny inputs a static placement can happen to be
/// perfectly balanced where the greedy is not, even with spare slots. Layers of random tiny
/// requests (`small_requests`) hit this about 0.4% of the time (158 of 39,865, seed 9).
#[test]
fn a_lucky_static_placement_can_win() {
    // Global, 6 experts, 2 workers of 4 slots. Static 3 + 3: {8, 7, 0} and {6, 5, 4}, 15 each.
    // EPLB replicates 8 and 7 (4 4 3.5 3.5 0 6 5 4) and packs them 13.5 / 16.5.
    let load = vec![vec![8.0, 7.0, 0.0, 6.0, 5.0, 4.0]];
    let p = rebalance(&load, 8, 1, 1, 2).expect("valid request");
    assert_eq!(worker_loads(&load, &p, 2), vec![vec![13.5, 16.5]]);
    assert_eq!(static_worker_loads(&load, 2), vec![vec![15.0, 15.0]]);
}
