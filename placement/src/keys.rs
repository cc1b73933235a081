//! The keys of the expert documents, under the cluster prefix of `cluster_core::keys`. Every
//! placement, load and autoscaling key is built and parsed here.
//!
//! ```text
//! /expertmesh/<cluster>/load/<worker-id>               -> LoadReport (leased)
//! /expertmesh/<cluster>/placement/current              -> CurrentPlacement: version N
//! /expertmesh/<cluster>/placement/<N>/spec             -> PlacementSpec of version N
//! /expertmesh/<cluster>/placement/<N>/ready/<worker>   -> ReadyMark (leased)
//! /expertmesh/<cluster>/controller/desired_expert_workers -> DesiredWorkers
//! ```

use cluster_core::keys::cluster_prefix;
use cluster_core::{ClusterName, WorkerId};

/// A placement version (the `N` in `/placement/<N>/...`), increasing by one per switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PlacementVersion(pub u64);

impl std::fmt::Display for PlacementVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `/expertmesh/<cluster>/load/<worker-id>`
pub fn load_key(cluster: &ClusterName, worker: &WorkerId) -> String {
    format!("{}{worker}", load_prefix(cluster))
}

/// `/expertmesh/<cluster>/load/`: every worker's load report.
pub fn load_prefix(cluster: &ClusterName) -> String {
    format!("{}load/", cluster_prefix(cluster))
}

/// `/expertmesh/<cluster>/placement/`: watch this to follow placements.
pub fn placement_prefix(cluster: &ClusterName) -> String {
    format!("{}placement/", cluster_prefix(cluster))
}

/// `/expertmesh/<cluster>/placement/current`
pub fn placement_current_key(cluster: &ClusterName) -> String {
    format!("{}current", placement_prefix(cluster))
}

/// `/expertmesh/<cluster>/placement/<N>/`: everything of version N.
pub fn placement_version_prefix(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{}{}/", placement_prefix(cluster), version.0)
}

/// `/expertmesh/<cluster>/placement/<N>/spec`
pub fn placement_spec_key(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{}spec", placement_version_prefix(cluster, version))
}

/// `/expertmesh/<cluster>/placement/<N>/ready/`: the ready marks of version N.
pub fn placement_ready_prefix(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{}ready/", placement_version_prefix(cluster, version))
}

/// `/expertmesh/<cluster>/placement/<N>/ready/<worker>`
pub fn placement_ready_key(cluster: &ClusterName, version: PlacementVersion, worker: &WorkerId) -> String {
    format!("{}{worker}", placement_ready_prefix(cluster, version))
}

/// `/expertmesh/<cluster>/controller/desired_expert_workers`
pub fn desired_expert_workers_key(cluster: &ClusterName) -> String {
    format!("{}controller/desired_expert_workers", cluster_prefix(cluster))
}

/// A key under [`placement_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementKey {
    Current,
    Spec(PlacementVersion),
    Ready(PlacementVersion, WorkerId),
}

/// Splits a key under [`placement_prefix`]; `None` for keys of another shape.
pub fn parse_placement_key(cluster: &ClusterName, key: &str) -> Option<PlacementKey> {
    let rest = key.strip_prefix(&placement_prefix(cluster))?;
    if rest == "current" {
        return Some(PlacementKey::Current);
    }
    let (version, rest) = rest.split_once('/')?;
    let version = PlacementVersion(version.parse().ok()?);
    match rest.split_once('/') {
        None if rest == "spec" => Some(PlacementKey::Spec(version)),
        Some(("ready", worker)) => WorkerId::new(worker).ok().map(|w| PlacementKey::Ready(version, w)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterName {
        ClusterName::new("prod").expect("valid")
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let c = cluster();
        let w = WorkerId::new("e-7").expect("valid");
        let v = PlacementVersion(3);
        assert_eq!(load_key(&c, &w), "/expertmesh/prod/load/e-7");
        assert_eq!(load_prefix(&c), "/expertmesh/prod/load/");
        assert_eq!(placement_prefix(&c), "/expertmesh/prod/placement/");
        assert_eq!(placement_current_key(&c), "/expertmesh/prod/placement/current");
        assert_eq!(placement_version_prefix(&c, v), "/expertmesh/prod/placement/3/");
        assert_eq!(placement_spec_key(&c, v), "/expertmesh/prod/placement/3/spec");
        assert_eq!(placement_ready_prefix(&c, v), "/expertmesh/prod/placement/3/ready/");
        assert_eq!(placement_ready_key(&c, v, &w), "/expertmesh/prod/placement/3/ready/e-7");
        assert_eq!(desired_expert_workers_key(&c), "/expertmesh/prod/controller/desired_expert_workers");
    }

    #[test]
    fn placement_keys_round_trip() {
        let c = cluster();
        let w = WorkerId::new("e-7").expect("valid");
        let v = PlacementVersion(12);
        assert_eq!(parse_placement_key(&c, &placement_current_key(&c)), Some(PlacementKey::Current));
        assert_eq!(parse_placement_key(&c, &placement_spec_key(&c, v)), Some(PlacementKey::Spec(v)));
        assert_eq!(parse_placement_key(&c, &placement_ready_key(&c, v, &w)), Some(PlacementKey::Ready(v, w)));
        for bad in [
            "/expertmesh/prod/placement/x/spec",
            "/expertmesh/prod/placement/3/other",
            "/expertmesh/prod/load/a",
            "/expertmesh/prod2/placement/current",
        ] {
            assert_eq!(parse_placement_key(&c, bad), None, "{bad}");
        }
    }
}
