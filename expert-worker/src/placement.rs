//! What the placement follower knows and decides, as plain synchronous code: the view of
//! `/placement/` built from watch events, which slots to load, which ready marks are due and
//! which slots to release. The actor in `follower.rs` only applies these decisions.

use cluster_core::experts::{CurrentPlacement, PlacementSpec, ReadyMark, SlotKey};
use cluster_core::keys::{self, PlacementKey, PlacementVersion};
use cluster_core::store::decode_json;
use cluster_core::{ClusterName, WatchEvent, WorkerId};
use std::collections::{BTreeMap, BTreeSet};

/// The routed experts the model has: a spec naming anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub moe_layers: BTreeSet<usize>,
    pub num_experts: usize,
}

impl ModelShape {
    /// Why `spec` cannot be hosted with this model, if it cannot.
    pub fn check(&self, spec: &PlacementSpec) -> Result<(), String> {
        spec.validate().map_err(|e| e.to_string())?;
        if spec.num_experts != self.num_experts {
            return Err(format!("{} experts per layer, the model has {}", spec.num_experts, self.num_experts));
        }
        match spec.layers.iter().find(|l| !self.moe_layers.contains(l)) {
            Some(layer) => Err(format!("layer {layer} is not a MoE layer of the model")),
            None => Ok(()),
        }
    }
}

/// The placement documents seen so far.
#[derive(Debug, Default)]
pub struct PlacementView {
    /// Valid specs from the current version on (older ones no longer matter), by version.
    pub specs: BTreeMap<PlacementVersion, PlacementSpec>,
    /// The version `/placement/current` names.
    pub current: Option<PlacementVersion>,
    /// The initial contents have been delivered (decisions wait for it).
    pub synced: bool,
}

/// What an applied event means for the worker beyond the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Nothing,
    /// This worker's ready mark of that version vanished (e.g. its lease was lost).
    OwnReadyDeleted(PlacementVersion),
}

/// The versions whose slots a worker hosts: the current one (once its spec is known) and
/// the newest spec seen. Decisions are re-taken when this changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub current: Option<PlacementVersion>,
    pub newest: Option<PlacementVersion>,
}

impl PlacementView {
    /// Applies one watch event. Keys of another shape, corrupt values and invalid specs are
    /// logged and leave the view as if they were absent.
    pub fn apply(&mut self, cluster: &ClusterName, me: &WorkerId, shape: &ModelShape, event: WatchEvent) -> Seen {
        let (key, value) = match event {
            WatchEvent::Synced => {
                self.synced = true;
                return Seen::Nothing;
            }
            WatchEvent::Put { key, value } => (key, Some(value)),
            WatchEvent::Delete { key } => (key, None),
        };
        match (keys::parse_placement_key(cluster, &key), value) {
            (None, _) => tracing::debug!(%key, "placement_key_ignored"),
            (Some(PlacementKey::Current), None) => self.current = None,
            (Some(PlacementKey::Current), Some(value)) => match decode_json::<CurrentPlacement>(&key, &value) {
                Ok(c) => self.set_current(c.version),
                Err(error) => tracing::warn!(%error, "placement_current_invalid"),
            },
            (Some(PlacementKey::Spec(version)), None) => {
                self.specs.remove(&version);
            }
            (Some(PlacementKey::Spec(version)), Some(value)) => {
                self.specs.remove(&version);
                let spec = decode_json::<PlacementSpec>(&key, &value).map_err(|e| e.to_string()).and_then(|spec| {
                    if spec.version != version {
                        return Err(format!("holds version {} under version {version}", spec.version));
                    }
                    shape.check(&spec).map(|()| spec)
                });
                match spec {
                    Ok(_) if self.current.is_some_and(|c| version < c) => {
                        tracing::debug!(%version, "placement_spec_outdated");
                    }
                    Ok(spec) => {
                        self.specs.insert(version, spec);
                    }
                    Err(reason) => tracing::warn!(%key, %reason, "placement_spec_invalid"),
                }
            }
            (Some(PlacementKey::Ready(version, worker)), None) if &worker == me => {
                return Seen::OwnReadyDeleted(version);
            }
            (Some(PlacementKey::Ready(..)), _) => {}
        }
        Seen::Nothing
    }

    fn set_current(&mut self, version: PlacementVersion) {
        self.current = Some(version);
        self.specs.retain(|&v, _| v >= version);
    }

    /// The current version's spec, once known.
    pub fn current_spec(&self) -> Option<&PlacementSpec> {
        self.specs.get(&self.current?)
    }

    /// The newest spec seen.
    pub fn newest(&self) -> Option<&PlacementSpec> {
        self.specs.values().next_back()
    }

    pub fn target(&self) -> Target {
        Target { current: self.current_spec().map(|s| s.version), newest: self.newest().map(|s| s.version) }
    }

    /// Whether any spec seen gives `me` slots (then `me` follows placements, and slots the
    /// placement does not give it are released).
    pub fn names(&self, me: &WorkerId) -> bool {
        self.specs.values().any(|s| s.workers.contains(me))
    }

    /// The specs `me` should host now: the current one and the newest (often the same).
    fn hosted_specs(&self) -> impl Iterator<Item = &PlacementSpec> {
        let newest = self.newest().filter(|n| Some(n.version) != self.current_spec().map(|c| c.version));
        self.current_spec().into_iter().chain(newest)
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
    if !followed || !view.specs.contains_key(&current) {
        return Vec::new();
    }
    let newest = view.specs.last_key_value().map(|(_, s)| s);
    let keep: BTreeSet<SlotKey> =
        view.specs.get(&current).into_iter().chain(newest).flat_map(|s| s.slots_of(me)).collect();
    hosted.difference(&keep).copied().collect()
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
