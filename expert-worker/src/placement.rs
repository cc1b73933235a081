//! What the placement follower knows and decides, as plain synchronous code: its view of
//! `/placement/` (the shared [`PlacementFold`] read from the current version on), which slots
//! to load, which ready marks are due and which slots to release. The actor in `follower.rs`
//! only applies these decisions.

use ::placement::keys::PlacementVersion;
use ::placement::{Applied, PlacementFold, PlacementSpec, ReadyMark, SlotKey};
use cluster_core::{ClusterName, Fold, WorkerId};
use std::collections::BTreeSet;

/// The routed experts the model has: a spec naming anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub moe_layers: BTreeSet<usize>,
    pub num_experts: usize,
}

impl ModelShape {
    /// Why a consistent `spec` cannot be hosted with this model, if it cannot.
    pub fn check(&self, spec: &PlacementSpec) -> Result<(), String> {
        if spec.num_experts != self.num_experts {
            return Err(format!("{} experts per layer, the model has {}", spec.num_experts, self.num_experts));
        }
        match spec.layers.iter().find(|l| !self.moe_layers.contains(l)) {
            Some(layer) => Err(format!("layer {layer} is not a MoE layer of the model")),
            None => Ok(()),
        }
    }
}

/// The placement documents as this worker sees them: specs the model can host, from the
/// current version on (older ones no longer matter here).
#[derive(Debug)]
pub struct PlacementView {
    fold: PlacementFold,
    me: WorkerId,
    /// Versions whose ready mark of `me` vanished (e.g. its lease was lost), not yet taken.
    lost_marks: Vec<PlacementVersion>,
}

/// The versions whose slots a worker hosts: the current one (once its spec is known) and
/// the newest spec seen. Decisions are re-taken when this changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub current: Option<PlacementVersion>,
    pub newest: Option<PlacementVersion>,
}

impl PlacementView {
    pub fn new(cluster: ClusterName, me: WorkerId, shape: ModelShape) -> Self {
        let fold = PlacementFold::new(cluster).with_check(move |spec| shape.check(spec));
        PlacementView { fold, me, lost_marks: Vec::new() }
    }

    /// The version `/placement/current` names.
    pub fn current(&self) -> Option<PlacementVersion> {
        self.fold.current()
    }

    /// Usable specs from the current version on, by version.
    pub fn specs(&self) -> impl DoubleEndedIterator<Item = &PlacementSpec> {
        let from = self.current().unwrap_or(PlacementVersion(0));
        self.fold.specs().range(from..).map(|(_, s)| s.as_ref())
    }

    /// The spec of `version`, if usable and not older than the current version.
    pub fn spec(&self, version: PlacementVersion) -> Option<&PlacementSpec> {
        self.specs().find(|s| s.version == version)
    }

    /// The current version's spec, once known.
    pub fn current_spec(&self) -> Option<&PlacementSpec> {
        self.spec(self.current()?)
    }

    /// The newest spec seen.
    pub fn newest(&self) -> Option<&PlacementSpec> {
        self.specs().next_back()
    }

    pub fn target(&self) -> Target {
        Target { current: self.current_spec().map(|s| s.version), newest: self.newest().map(|s| s.version) }
    }

    /// Whether any spec seen gives `me` slots (then `me` follows placements, and slots the
    /// placement does not give it are released).
    pub fn names(&self, me: &WorkerId) -> bool {
        self.specs().any(|s| s.workers.contains(me))
    }

    /// Versions whose ready mark of this worker vanished since the last call.
    pub fn take_lost_marks(&mut self) -> Vec<PlacementVersion> {
        std::mem::take(&mut self.lost_marks)
    }

    /// The specs `me` should host now: the current one and the newest (often the same).
    fn hosted_specs(&self) -> impl Iterator<Item = &PlacementSpec> {
        let newest = self.newest().filter(|n| Some(n.version) != self.current_spec().map(|c| c.version));
        self.current_spec().into_iter().chain(newest)
    }
}

impl Fold for PlacementView {
    fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        match self.fold.update(key, value) {
            Applied::Nothing => false,
            Applied::Ready { version, worker, present: false } if worker == self.me => {
                self.lost_marks.push(version);
                true
            }
            _ => true,
        }
    }
}

/// Slots `me` should host now that it does not: those the current and the newest spec give
/// it, minus `hosted`. Ascending.
pub fn slots_to_load(hosted: &BTreeSet<SlotKey>, view: &PlacementView, me: &WorkerId) -> Vec<SlotKey> {
    let wanted: BTreeSet<SlotKey> = view.hosted_specs().flat_map(|s| s.slots_of(me)).collect();
    wanted.difference(hosted).copied().collect()
}

/// Ready marks to put: for the current and the newest spec, when it names `me`, `me` hosts
/// every slot it gives `me`, and no mark of that version is already in `marked`.
pub fn marks_due(
    hosted: &BTreeSet<SlotKey>,
    view: &PlacementView,
    me: &WorkerId,
    marked: &BTreeSet<PlacementVersion>,
) -> Vec<(PlacementVersion, ReadyMark)> {
    view.hosted_specs()
        .filter(|s| !marked.contains(&s.version))
        .filter_map(|s| {
            let slots = s.slots_of(me);
            (!slots.is_empty() && slots.is_subset(hosted)).then_some((s.version, ReadyMark { slots: slots.len() }))
        })
        .collect()
}

/// Slots to release once `current` (the version attention workers switched to) has been in
/// force for the release delay: every hosted slot that neither spec `current` nor the newest
/// spec gives `me` (a version between them was abandoned by the controller). Nothing while spec `current` is unknown, or while no placement has named
/// `me` (`followed` false: a `--shard` worker outside placements keeps its slots). Ascending.
pub fn slots_to_release(
    hosted: &BTreeSet<SlotKey>,
    view: &PlacementView,
    current: PlacementVersion,
    me: &WorkerId,
    followed: bool,
) -> Vec<SlotKey> {
    let Some(in_force) = view.spec(current).filter(|_| followed) else { return Vec::new() };
    let keep: BTreeSet<SlotKey> = std::iter::once(in_force).chain(view.newest()).flat_map(|s| s.slots_of(me)).collect();
    hosted.difference(&keep).copied().collect()
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
