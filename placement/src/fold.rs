//! The one fold of the placement keys: what `/placement/` holds (the `current` pointer, the
//! usable specs, which workers marked which version ready, which versions have keys at all),
//! built from a watch or a one-off read through `cluster_core::follow`. Expert workers,
//! attention workers and the controller read placements through it; none parses placement
//! keys or decodes placement documents itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use cluster_core::store::decode_json;
use cluster_core::{ClusterName, Fold, WorkerId};

use crate::documents::{CurrentPlacement, PlacementSpec};
use crate::keys::{self, PlacementKey, PlacementVersion};

/// A reader's own requirement on a spec beyond [`PlacementSpec::validate`] (the model it
/// serves); `Err` says why the spec cannot be used.
pub type SpecCheck = Box<dyn Fn(&PlacementSpec) -> Result<(), String> + Send + Sync>;

/// The placement documents of one cluster.
///
/// Specs are kept from version `current - 1` on (the previous version stays for a rollback
/// and for workers still draining it); older ones are dropped, and ignored when they
/// arrive. A spec that does not decode, is filed under another version, fails `validate` or
/// the reader's check is logged (`placement_spec_invalid`) and counts as absent; a
/// `current` that does not decode is logged and leaves the pointer as it was.
pub struct PlacementFold {
    cluster: ClusterName,
    check: Option<SpecCheck>,
    current: Option<PlacementVersion>,
    specs: BTreeMap<PlacementVersion, Arc<PlacementSpec>>,
    /// Versions with a spec key, usable or not (never pruned: the store's garbage
    /// collection removes the keys).
    spec_keys: BTreeSet<PlacementVersion>,
    ready: BTreeMap<PlacementVersion, BTreeSet<WorkerId>>,
    /// Keys whose value was refused, and why (while the value stays and matters).
    rejected: BTreeMap<String, String>,
}

impl fmt::Debug for PlacementFold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlacementFold")
            .field("cluster", &self.cluster)
            .field("current", &self.current)
            .field("specs", &self.specs.keys().collect::<Vec<_>>())
            .field("spec_keys", &self.spec_keys)
            .field("ready", &self.ready)
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

/// What one key changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Not a placement key, or a value refused with nothing to undo.
    Nothing,
    /// The `current` pointer was set or deleted.
    Current,
    /// The spec of that version was put (usable or not) or deleted.
    Spec(PlacementVersion),
    /// A ready mark was put (`present`) or deleted.
    Ready { version: PlacementVersion, worker: WorkerId, present: bool },
}

impl PlacementFold {
    pub fn new(cluster: ClusterName) -> Self {
        PlacementFold {
            cluster,
            check: None,
            current: None,
            specs: BTreeMap::new(),
            spec_keys: BTreeSet::new(),
            ready: BTreeMap::new(),
            rejected: BTreeMap::new(),
        }
    }

    /// Refuses specs `check` refuses, as if they were absent.
    pub fn with_check(mut self, check: impl Fn(&PlacementSpec) -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }

    /// Applies a put (`Some(value)`) or a delete (`None`) of `key`.
    pub fn update(&mut self, key: &str, value: Option<&[u8]>) -> Applied {
        let Some(parsed) = keys::parse_placement_key(&self.cluster, key) else {
            tracing::debug!(%key, "placement_key_ignored");
            return Applied::Nothing;
        };
        self.rejected.remove(key);
        match (parsed, value) {
            (PlacementKey::Current, None) => {
                self.current = None;
                Applied::Current
            }
            (PlacementKey::Current, Some(value)) => match decode_json::<CurrentPlacement>(key, value) {
                Ok(current) => {
                    self.set_current(current.version);
                    Applied::Current
                }
                Err(error) => {
                    tracing::warn!(%error, "placement_current_invalid");
                    self.rejected.insert(key.to_owned(), error.to_string());
                    Applied::Nothing
                }
            },
            (PlacementKey::Spec(version), None) => {
                self.spec_keys.remove(&version);
                self.specs.remove(&version);
                Applied::Spec(version)
            }
            (PlacementKey::Spec(version), Some(value)) => {
                self.spec_keys.insert(version);
                self.specs.remove(&version);
                if self.is_outdated(version) {
                    tracing::debug!(%version, "placement_spec_outdated");
                    return Applied::Spec(version);
                }
                match self.decode_spec(key, version, value) {
                    Ok(spec) => {
                        self.specs.insert(version, Arc::new(spec));
                    }
                    Err(reason) => {
                        tracing::warn!(%key, %reason, "placement_spec_invalid");
                        self.rejected.insert(key.to_owned(), reason);
                    }
                }
                Applied::Spec(version)
            }
            (PlacementKey::Ready(version, worker), value) => {
                let present = value.is_some();
                if present {
                    self.ready.entry(version).or_default().insert(worker.clone());
                } else if let Some(workers) = self.ready.get_mut(&version) {
                    workers.remove(&worker);
                    if workers.is_empty() {
                        self.ready.remove(&version);
                    }
                }
                Applied::Ready { version, worker, present }
            }
        }
    }

    fn decode_spec(&self, key: &str, version: PlacementVersion, value: &[u8]) -> Result<PlacementSpec, String> {
        let spec: PlacementSpec = decode_json(key, value).map_err(|e| e.to_string())?;
        if spec.version != version {
            return Err(format!("holds version {} under version {version}", spec.version));
        }
        spec.validate().map_err(|e| e.to_string())?;
        if let Some(check) = &self.check {
            check(&spec)?;
        }
        Ok(spec)
    }

    /// Older than `current - 1`.
    fn is_outdated(&self, version: PlacementVersion) -> bool {
        self.current.is_some_and(|c| version.0.saturating_add(1) < c.0)
    }

    fn set_current(&mut self, version: PlacementVersion) {
        self.current = Some(version);
        let outdated = |v: PlacementVersion| v.0.saturating_add(1) < version.0;
        self.specs.retain(|&v, _| !outdated(v));
        let cluster = &self.cluster;
        self.rejected.retain(
            |key, _| !matches!(keys::parse_placement_key(cluster, key), Some(PlacementKey::Spec(v)) if outdated(v)),
        );
    }

    /// The version `/placement/current` names.
    pub fn current(&self) -> Option<PlacementVersion> {
        self.current
    }

    /// The current version's spec, once known and usable.
    pub fn current_spec(&self) -> Option<&Arc<PlacementSpec>> {
        self.specs.get(&self.current?)
    }

    /// The usable spec of `version`.
    pub fn spec(&self, version: PlacementVersion) -> Option<&Arc<PlacementSpec>> {
        self.specs.get(&version)
    }

    /// Every usable spec kept (from `current - 1` on), by version.
    pub fn specs(&self) -> &BTreeMap<PlacementVersion, Arc<PlacementSpec>> {
        &self.specs
    }

    /// The workers that marked `version` ready.
    pub fn ready(&self, version: PlacementVersion) -> impl Iterator<Item = &WorkerId> {
        self.ready.get(&version).into_iter().flatten()
    }

    /// Every version with a spec or a ready mark in the store, usable or not.
    pub fn versions(&self) -> BTreeSet<PlacementVersion> {
        self.spec_keys.iter().chain(self.ready.keys()).copied().collect()
    }

    /// Values refused and still in the store: (key, why).
    pub fn rejected(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rejected.iter().map(|(k, r)| (k.as_str(), r.as_str()))
    }
}

impl Fold for PlacementFold {
    fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        self.update(key, value) != Applied::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterName {
        ClusterName::new("c").expect("valid")
    }

    fn w(id: &str) -> WorkerId {
        WorkerId::new(id).expect("valid")
    }

    fn spec(version: u64) -> PlacementSpec {
        PlacementSpec {
            version: PlacementVersion(version),
            workers: vec![w("a"), w("b")],
            layers: vec![3],
            num_experts: 2,
            phy2log: vec![vec![0, 1]],
            reason: "test".into(),
            ratio_before: 1.0,
            ratio_after: 1.0,
            created_unix_ms: 0,
        }
    }

    fn put_spec(f: &mut PlacementFold, s: &PlacementSpec) -> Applied {
        let key = keys::placement_spec_key(&cluster(), s.version);
        f.update(&key, Some(&serde_json::to_vec(s).expect("serializes")))
    }

    fn put_current(f: &mut PlacementFold, version: u64) -> Applied {
        let value = serde_json::to_vec(&CurrentPlacement { version: PlacementVersion(version) }).expect("serializes");
        f.update(&keys::placement_current_key(&cluster()), Some(&value))
    }

    fn versions(f: &PlacementFold) -> Vec<u64> {
        f.specs().keys().map(|v| v.0).collect()
    }

    #[test]
    fn keeps_current_usable_specs_and_ready_marks() {
        let c = cluster();
        let mut f = PlacementFold::new(c.clone());
        assert_eq!(put_current(&mut f, 1), Applied::Current);
        assert_eq!(f.current(), Some(PlacementVersion(1)));
        assert!(f.current_spec().is_none(), "the spec is not known yet");
        assert_eq!(put_spec(&mut f, &spec(1)), Applied::Spec(PlacementVersion(1)));
        assert_eq!(f.current_spec().map(|s| s.version), Some(PlacementVersion(1)));

        let mark = keys::placement_ready_key(&c, PlacementVersion(2), &w("a"));
        let applied = f.update(&mark, Some(b"{\"slots\":1}"));
        assert_eq!(applied, Applied::Ready { version: PlacementVersion(2), worker: w("a"), present: true });
        assert_eq!(f.ready(PlacementVersion(2)).collect::<Vec<_>>(), vec![&w("a")]);
        assert_eq!(f.versions(), [1, 2].map(PlacementVersion).into_iter().collect());
        let applied = f.update(&mark, None);
        assert_eq!(applied, Applied::Ready { version: PlacementVersion(2), worker: w("a"), present: false });
        assert_eq!(f.ready(PlacementVersion(2)).count(), 0);
        assert_eq!(f.versions(), [PlacementVersion(1)].into_iter().collect());

        assert_eq!(f.update(&keys::placement_current_key(&c), None), Applied::Current);
        assert_eq!(f.current(), None);
        assert_eq!(
            f.update(&keys::placement_spec_key(&c, PlacementVersion(1)), None),
            Applied::Spec(PlacementVersion(1))
        );
        assert!(f.specs().is_empty() && f.versions().is_empty());
        assert_eq!(f.update("/expertmesh/c/placement/x", Some(b"")), Applied::Nothing);
        assert_eq!(f.update("/expertmesh/c/load/a", Some(b"")), Applied::Nothing);
    }

    #[test]
    fn specs_older_than_the_previous_version_are_dropped_and_ignored() {
        let mut f = PlacementFold::new(cluster());
        for v in 1..=3 {
            put_spec(&mut f, &spec(v));
        }
        put_current(&mut f, 3);
        assert_eq!(versions(&f), vec![2, 3]);
        put_spec(&mut f, &spec(1));
        assert_eq!(versions(&f), vec![2, 3], "a spec older than current - 1 is not kept");
        assert_eq!(f.versions().len(), 3, "its key still counts as a version");
        // Rolling back to the previous version works: its spec is still held.
        put_current(&mut f, 2);
        assert_eq!(f.current_spec().map(|s| s.version), Some(PlacementVersion(2)));
    }

    #[test]
    fn refused_values_count_as_absent_and_are_reported() {
        let c = cluster();
        let mut f = PlacementFold::new(c.clone()).with_check(|s| {
            if s.layers == [3] { Ok(()) } else { Err(format!("layers {:?} are not the model's", s.layers)) }
        });
        let mut inconsistent = spec(1);
        inconsistent.phy2log = vec![vec![0, 0]];
        put_spec(&mut f, &inconsistent);
        let mut misfiled = spec(4);
        misfiled.version = PlacementVersion(1);
        let value = serde_json::to_vec(&misfiled).expect("serializes");
        f.update(&keys::placement_spec_key(&c, PlacementVersion(4)), Some(&value));
        f.update(&keys::placement_spec_key(&c, PlacementVersion(5)), Some(b"{"));
        let mut other_model = spec(6);
        other_model.layers = vec![1];
        put_spec(&mut f, &other_model);
        assert!(f.specs().is_empty());
        assert_eq!(f.versions().len(), 4);
        let rejected: Vec<&str> = f.rejected().map(|(k, _)| k).collect();
        assert_eq!(rejected.len(), 4, "{rejected:?}");
        assert!(f.rejected().any(|(_, why)| why.contains("under version 4")));
        assert!(f.rejected().any(|(_, why)| why.contains("not the model's")));

        // A good value replaces a refused one, and a refused one a good one.
        put_spec(&mut f, &spec(6));
        assert_eq!(versions(&f), vec![6]);
        put_spec(&mut f, &other_model);
        assert!(f.specs().is_empty(), "a spec replaced by an unusable one is dropped");

        put_current(&mut f, 5);
        let key = keys::placement_current_key(&c);
        assert_eq!(f.update(&key, Some(b"7")), Applied::Nothing);
        assert_eq!(f.current(), Some(PlacementVersion(5)), "a bad pointer leaves the pointer as it was");
        assert!(f.rejected().any(|(k, _)| k == key));
        // Moving on past the refused specs forgets them.
        put_current(&mut f, 9);
        assert_eq!(f.rejected().count(), 0, "{f:?}");
    }
}
