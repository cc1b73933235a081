//! The expert documents kept in the store (format reference: docs/EXPERT_PLACEMENT.md):
//! a versioned [`PlacementSpec`] (which expert worker hosts which replica of which expert),
//! the [`CurrentPlacement`] pointer, each expert worker's [`LoadReport`] (sliding-window
//! token rates per MoE layer and logical expert), and the controller's [`DesiredWorkers`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use cluster_core::WorkerId;

use crate::keys::PlacementVersion;

/// A routed expert of one MoE layer: `layer` is the model's layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub layer: usize,
    pub expert: u32,
}

/// A placement that contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("placement {version}: {reason}")]
    Invalid { version: PlacementVersion, reason: String },
}

/// `/placement/<N>/spec`: where every replica lives under version N. Physical slot `s` of a
/// layer is held by `workers[s / slots_per_worker]` (EPLB's contiguous layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    pub version: PlacementVersion,
    /// Expert workers in slot order.
    pub workers: Vec<WorkerId>,
    /// Model layer index of each row of `phy2log` (the MoE layers, ascending).
    pub layers: Vec<usize>,
    /// Logical routed experts per layer.
    pub num_experts: usize,
    /// `[layers][R]`: logical expert held by each physical slot; `R` is a multiple of the
    /// worker count and at least `num_experts`.
    pub phy2log: Vec<Vec<u32>>,
    /// Why it was made (`initial`, `skew`, `period`, `membership`), and the worker max/mean
    /// load ratio the controller expected before and after (equal for the first placement).
    pub reason: String,
    pub ratio_before: f64,
    pub ratio_after: f64,
    /// Unix time of the decision, milliseconds.
    pub created_unix_ms: u64,
}

impl PlacementSpec {
    /// Checks the shape: every row `R` long, `R` a multiple of the workers, every expert
    /// present in every layer, no worker twice.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |reason: String| Err(SpecError::Invalid { version: self.version, reason });
        if self.workers.is_empty() {
            return bad("no workers".into());
        }
        if self.workers.iter().collect::<BTreeSet<_>>().len() != self.workers.len() {
            return bad("a worker is listed twice".into());
        }
        if self.layers.len() != self.phy2log.len() {
            return bad(format!("{} layers but {} phy2log rows", self.layers.len(), self.phy2log.len()));
        }
        if !self.layers.windows(2).all(|w| w[0] < w[1]) {
            return bad(format!("layers {:?} are not strictly ascending", self.layers));
        }
        if let Some(first) = self.phy2log.first()
            && let Some(row) = self.phy2log.iter().position(|r| r.len() != first.len())
        {
            return bad(format!("phy2log row {row} has {} slots, row 0 has {}", self.phy2log[row].len(), first.len()));
        }
        for (row, layer) in self.phy2log.iter().zip(&self.layers) {
            if row.len() < self.num_experts || !row.len().is_multiple_of(self.workers.len()) {
                return bad(format!(
                    "layer {layer}: {} slots for {} experts on {} workers",
                    row.len(),
                    self.num_experts,
                    self.workers.len()
                ));
            }
            let present: BTreeSet<u32> = row.iter().copied().collect();
            if present.len() != self.num_experts || row.iter().any(|&e| e as usize >= self.num_experts) {
                return bad(format!("layer {layer}: slots do not hold each of the {} experts", self.num_experts));
            }
        }
        Ok(())
    }

    /// Physical slots per worker per layer.
    pub fn slots_per_worker(&self) -> usize {
        self.phy2log.first().map_or(0, |row| row.len() / self.workers.len().max(1))
    }

    /// The (layer, expert) pairs `worker` hosts (empty if it is not part of this version).
    pub fn slots_of(&self, worker: &WorkerId) -> BTreeSet<SlotKey> {
        let Some(index) = self.workers.iter().position(|w| w == worker) else { return BTreeSet::new() };
        let per = self.slots_per_worker();
        self.layers
            .iter()
            .zip(&self.phy2log)
            .flat_map(|(&layer, row)| {
                row[index * per..(index + 1) * per].iter().map(move |&expert| SlotKey { layer, expert })
            })
            .collect()
    }

    /// `[layers][num_experts]`: replicas of each logical expert (EPLB's `logcnt`).
    pub fn replica_counts(&self) -> Vec<Vec<usize>> {
        self.phy2log
            .iter()
            .map(|row| {
                let mut counts = vec![0; self.num_experts];
                for &e in row {
                    if let Some(c) = counts.get_mut(e as usize) {
                        *c += 1;
                    }
                }
                counts
            })
            .collect()
    }

    /// Hosts of every (layer, expert), one entry per physical slot, in slot order.
    pub fn replicas(&self) -> BTreeMap<SlotKey, Vec<WorkerId>> {
        let per = self.slots_per_worker().max(1);
        let mut hosts: BTreeMap<SlotKey, Vec<WorkerId>> = BTreeMap::new();
        for (&layer, row) in self.layers.iter().zip(&self.phy2log) {
            for (slot, &expert) in row.iter().enumerate() {
                hosts.entry(SlotKey { layer, expert }).or_default().push(self.workers[slot / per].clone());
            }
        }
        hosts
    }
}

/// `/placement/current`: the version attention workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentPlacement {
    pub version: PlacementVersion,
}

/// `/placement/<N>/ready/<worker>`: the worker hosts every slot version N gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyMark {
    pub slots: usize,
}

/// `/load/<worker>` (leased): tokens an expert worker served per (layer, logical expert),
/// as a rate averaged over a sliding window of the last `window_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    pub worker: WorkerId,
    /// Model layer index of each row of `tokens_per_s` (the MoE layers, ascending).
    pub layers: Vec<usize>,
    pub num_experts: usize,
    /// `[layers][num_experts]`: tokens per second over the window.
    pub tokens_per_s: Vec<Vec<f64>>,
    /// Length of the window the rates average over (the worker's first reports cover less:
    /// the time since it started).
    pub window_ms: u64,
    /// Tokens served since the worker started, all slots.
    pub total_tokens: u64,
    /// Placement version the worker follows (`None` before the first).
    pub placement_version: Option<PlacementVersion>,
    pub updated_unix_ms: u64,
}

impl LoadReport {
    /// Tokens per second over every slot.
    pub fn total_rate(&self) -> f64 {
        self.tokens_per_s.iter().flatten().sum()
    }
}

/// `/controller/desired_expert_workers`: the controller's autoscaling target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredWorkers {
    pub desired: u32,
    pub live: u32,
    /// Cluster-wide expert tokens per second it was computed from.
    pub tokens_per_s: f64,
    pub updated_unix_ms: u64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str) -> WorkerId {
        WorkerId::new(id).expect("valid")
    }

    fn spec() -> PlacementSpec {
        PlacementSpec {
            version: PlacementVersion(2),
            workers: vec![w("a"), w("b")],
            layers: vec![1, 3],
            num_experts: 3,
            phy2log: vec![vec![0, 2, 1, 2], vec![1, 0, 2, 1]],
            reason: "test".into(),
            ratio_before: 1.5,
            ratio_after: 1.0,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn slots_and_replicas_follow_the_contiguous_layout() {
        let s = spec();
        s.validate().expect("valid");
        let k = |layer, expert| SlotKey { layer, expert };
        assert_eq!(s.slots_of(&w("a")), [k(1, 0), k(1, 2), k(3, 1), k(3, 0)].into_iter().collect());
        assert_eq!(s.slots_of(&w("b")), [k(1, 1), k(1, 2), k(3, 2), k(3, 1)].into_iter().collect());
        assert!(s.slots_of(&w("c")).is_empty());
        let r = s.replicas();
        assert_eq!(r[&k(1, 2)], vec![w("a"), w("b")]);
        assert_eq!(r[&k(3, 1)], vec![w("a"), w("b")]);
        assert_eq!(r[&k(3, 0)], vec![w("a")]);
        let json = serde_json::to_vec(&s).expect("serializes");
        assert_eq!(serde_json::from_slice::<PlacementSpec>(&json).expect("parses"), s);
    }

    #[test]
    fn validate_rejects_inconsistent_specs() {
        let mut s = spec();
        s.phy2log[1] = vec![1, 0, 1, 1];
        assert!(s.validate().is_err(), "expert 2 missing");
        let mut s = spec();
        s.phy2log[0].push(0);
        assert!(s.validate().is_err(), "5 slots on 2 workers");
        let mut s = spec();
        s.workers[1] = w("a");
        assert!(s.validate().is_err(), "duplicate worker");
        let mut s = spec();
        s.phy2log[0][0] = 7;
        assert!(s.validate().is_err(), "expert out of range");
        let mut s = spec();
        s.phy2log[1] = vec![0, 1, 2, 0, 1, 2];
        assert!(s.validate().is_err(), "rows of different lengths");
        let mut s = spec();
        s.layers = vec![3, 1];
        assert!(s.validate().is_err(), "layers out of order");
    }
}
