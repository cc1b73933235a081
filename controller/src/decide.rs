//! The controller's decisions as plain code: aggregating load reports, judging the current
//! placement, whether to rebalance and why, the new placement, and the autoscaling target.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cluster_core::WorkerId;
use placement::{LoadReport, PlacementSpec, PlacementVersion};

/// What the model looks like to the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Model layer index of each MoE layer, ascending.
    pub layers: Vec<usize>,
    pub num_experts: usize,
    /// Routing groups (`n_group`).
    pub num_groups: usize,
}

/// Tunables of the decision (see the controller's flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Extra physical slots per layer beyond one per expert (rounded up so the workers
    /// divide the slots).
    pub redundant_slots: usize,
    /// Nodes the workers spread over (EPLB's hierarchical policy); 1 when they do not
    /// divide the live workers.
    pub nodes: usize,
    /// Rebalance at least this often while there is load.
    pub period: Duration,
    /// Rebalance early when the worker max/mean load ratio passes this.
    pub skew_threshold: f64,
    /// Least time between two load-driven rebalances.
    pub min_interval: Duration,
    /// A load-driven rebalance must lower the ratio by at least this fraction.
    pub min_improvement: f64,
    /// Below this cluster-wide expert tokens/s the load is noise: no load-driven rebalance.
    pub min_tokens_per_s: f64,
    /// Autoscaling: tokens/s one expert worker serves at full use, and the use to aim for.
    pub worker_tokens_per_s: f64,
    pub target_utilization: f64,
    /// The first placement waits this long after the first live worker is seen, so workers
    /// starting together are all in it ...
    pub initial_settle: Duration,
    /// ... unless this many workers are live already.
    pub expected_workers: Option<usize>,
}

/// Why a placement is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// No placement yet.
    Initial,
    /// A worker of the current placement is gone: its experts must move now.
    WorkerLeft,
    /// A live worker is not in the current placement: it takes a share now.
    WorkerJoined,
    /// The worker max/mean load ratio passed the threshold.
    Skew,
    /// The rebalance period elapsed.
    Period,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::WorkerLeft => "worker_left",
            Reason::WorkerJoined => "worker_joined",
            Reason::Skew => "skew",
            Reason::Period => "period",
        }
    }
}

/// Cluster-wide load: `[moe layer][expert]` tokens/s summed over live workers' reports.
pub fn aggregate(shape: &ModelShape, reports: &[&LoadReport]) -> Vec<Vec<f64>> {
    let mut total = vec![vec![0.0; shape.num_experts]; shape.layers.len()];
    for report in reports {
        if report.num_experts != shape.num_experts {
            continue;
        }
        for (layer, row) in report.layers.iter().zip(&report.tokens_per_s) {
            if let Some(i) = shape.layers.iter().position(|l| l == layer) {
                for (t, v) in total[i].iter_mut().zip(row) {
                    *t += v.max(0.0);
                }
            }
        }
    }
    total
}

/// `spec` as EPLB's placement (for its metrics).
fn as_placement(spec: &PlacementSpec) -> eplb::Placement {
    let phy2log = spec.phy2log.iter().map(|row| row.iter().map(|&e| e as usize).collect()).collect();
    eplb::Placement { phy2log, log2phy: Vec::new(), logcnt: spec.replica_counts() }
}

/// Max over mean worker load of a whole forward pass (each layer waits for its slowest
/// worker): Σ layer max / Σ layer mean. 1.0 when idle.
pub fn max_mean_ratio(load: &[Vec<f64>], spec: &PlacementSpec) -> f64 {
    let per_layer = eplb::worker_loads(load, &as_placement(spec), spec.workers.len());
    1.0 / eplb::model_balancedness(&per_layer)
}

/// Per-worker share of the load under `spec` (summed over layers).
pub fn worker_totals(load: &[Vec<f64>], spec: &PlacementSpec) -> Vec<f64> {
    let per_layer = eplb::worker_loads(load, &as_placement(spec), spec.workers.len());
    (0..spec.workers.len()).map(|w| per_layer.iter().map(|l| l[w]).sum()).collect()
}

/// Physical slots per layer: experts + redundancy, rounded up to a multiple of the workers.
pub fn num_slots(num_experts: usize, redundant: usize, workers: usize) -> usize {
    (num_experts + redundant).div_ceil(workers) * workers
}

/// Why no placement could be computed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no live expert worker")]
    NoWorkers,
    #[error(transparent)]
    Eplb(#[from] eplb::EplbError),
}

/// `policy.nodes` if it divides the workers, else 1.
fn effective_nodes(policy: &Policy, workers: usize) -> usize {
    let nodes = policy.nodes.max(1);
    if workers.is_multiple_of(nodes) { nodes } else { 1 }
}

/// The placement EPLB chooses for `load` over `workers` (sorted), as version `version`.
/// An idle cluster is balanced for uniform load.
pub fn plan(
    shape: &ModelShape,
    policy: &Policy,
    load: &[Vec<f64>],
    workers: &[WorkerId],
    version: PlacementVersion,
) -> Result<PlacementSpec, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let idle = load.iter().flatten().all(|&v| v <= 0.0);
    let weights: Vec<Vec<f64>> =
        if idle { vec![vec![1.0; shape.num_experts]; shape.layers.len()] } else { load.to_vec() };
    let nodes = effective_nodes(policy, workers.len());
    let slots = num_slots(shape.num_experts, policy.redundant_slots, workers.len());
    let placement = eplb::rebalance(&weights, slots, shape.num_groups, nodes, workers.len())?;
    Ok(PlacementSpec {
        version,
        workers: workers.to_vec(),
        layers: shape.layers.clone(),
        num_experts: shape.num_experts,
        phy2log: placement.phy2log.iter().map(|row| row.iter().map(|&e| e as u32).collect()).collect(),
        reason: String::new(),
        ratio_before: 1.0,
        ratio_after: 1.0,
        created_unix_ms: placement::unix_ms(),
    })
}

/// What the controller sees at one tick.
#[derive(Debug)]
pub struct Observed<'a> {
    pub live: &'a BTreeSet<WorkerId>,
    pub current: Option<&'a PlacementSpec>,
    pub load: &'a [Vec<f64>],
    /// Age of the current placement (`None`: there is none).
    pub since_last: Option<Duration>,
    /// While there is no placement: how long live workers have been seen (the settle time
    /// runs from the first).
    pub settling: Duration,
}

/// A rebalance to carry out: the new spec (version, reason and ratios filled in).
#[derive(Debug, Clone, PartialEq)]
pub struct Rebalance {
    pub reason: Reason,
    pub spec: PlacementSpec,
}

/// Decides whether to place experts anew. `next` is the version a new placement gets.
///
/// Membership changes are acted on whatever the load: the first placement once the settle
/// time has passed or the expected workers are live, a placement without a worker that left
/// at once, and one giving a worker that joined a share at once. Every placement after the
/// first keeps each worker's chunk with the worker already hosting most of it.
pub fn decide(
    shape: &ModelShape,
    policy: &Policy,
    seen: &Observed<'_>,
    next: PlacementVersion,
) -> Result<Option<Rebalance>, PlanError> {
    let workers: Vec<WorkerId> = seen.live.iter().cloned().collect();
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let make = |reason: Reason| -> Result<Rebalance, PlanError> {
        let mut spec = plan(shape, policy, seen.load, &workers, next)?;
        // With nodes, worker order is node order: only a single node may be reordered.
        if let Some(current) = seen.current
            && effective_nodes(policy, workers.len()) == 1
        {
            spec = crate::assign::keep_slots_in_place(spec, current);
        }
        spec.reason = reason.as_str().to_string();
        spec.ratio_after = max_mean_ratio(seen.load, &spec);
        // No previous placement: nothing to compare with (JSON has no NaN).
        spec.ratio_before = seen.current.map_or(spec.ratio_after, |c| max_mean_ratio(seen.load, c));
        Ok(Rebalance { reason, spec })
    };
    let Some(current) = seen.current else {
        let expected = policy.expected_workers.is_some_and(|n| workers.len() >= n);
        if !expected && seen.settling < policy.initial_settle {
            return Ok(None);
        }
        return make(Reason::Initial).map(Some);
    };
    if current.workers.iter().any(|w| !seen.live.contains(w)) {
        return make(Reason::WorkerLeft).map(Some);
    }
    if workers.iter().any(|w| !current.workers.contains(w)) {
        return make(Reason::WorkerJoined).map(Some);
    }
    let total: f64 = seen.load.iter().flatten().sum();
    if total < policy.min_tokens_per_s {
        return Ok(None);
    }
    let ratio = max_mean_ratio(seen.load, current);
    let elapsed = |d: Duration| seen.since_last.is_none_or(|s| s >= d);
    let reason = if elapsed(policy.period) {
        Reason::Period
    } else if ratio > policy.skew_threshold && elapsed(policy.min_interval) {
        Reason::Skew
    } else {
        return Ok(None);
    };
    let candidate = make(reason)?;
    if candidate.spec.ratio_after <= ratio * (1.0 - policy.min_improvement) { Ok(Some(candidate)) } else { Ok(None) }
}

/// Expert workers the load needs: total tokens/s over what one worker should carry.
pub fn desired_workers(policy: &Policy, tokens_per_s: f64) -> u32 {
    let per_worker = (policy.worker_tokens_per_s * policy.target_utilization).max(f64::MIN_POSITIVE);
    let n = (tokens_per_s.max(0.0) / per_worker).ceil();
    if n >= f64::from(u32::MAX) { u32::MAX } else { (n as u32).max(1) }
}

/// Measured load per worker from the reports (tokens/s), for logs and metrics.
pub fn measured_worker_rates<'a>(reports: impl IntoIterator<Item = &'a LoadReport>) -> BTreeMap<WorkerId, f64> {
    reports.into_iter().map(|r| (r.worker.clone(), r.total_rate())).collect()
}

/// Max over mean of a set of rates (1.0 when idle or empty).
pub fn ratio_of(rates: &[f64]) -> f64 {
    eplb::max_mean_ratio(rates)
}

#[cfg(test)]
mod tests;
