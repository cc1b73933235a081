//! The store key layout (DESIGN.md §3). Every key the services read or write is built here;
//! nothing else formats key strings.
//!
//! ```text
//! /expertmesh/<cluster>/workers/<role>/<worker-id>     -> WorkerInfo JSON (leased)
//! /expertmesh/<cluster>/load/<worker-id>               -> expert load window (leased)
//! /expertmesh/<cluster>/placement/current              -> current placement version N
//! /expertmesh/<cluster>/placement/<N>/spec             -> placement N (slots per worker)
//! /expertmesh/<cluster>/placement/<N>/ready/<worker>   -> worker loaded version N's slots
//! /expertmesh/<cluster>/controller/leader              -> election key (leased)
//! /expertmesh/<cluster>/controller/desired_expert_workers -> autoscaling target
//! ```

use crate::ids::{ClusterName, IdError, Role, WorkerId};

/// Root of every key of every cluster.
pub const ROOT: &str = "/expertmesh";

/// A placement version (the `N` in `/placement/<N>/...`), increasing by one per switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PlacementVersion(pub u64);

impl std::fmt::Display for PlacementVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A key that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {key:?} is not under {prefix:?}")]
    NotUnderPrefix { key: String, prefix: String },
    #[error("key {key:?} is not <prefix><role>/<worker-id>")]
    Malformed { key: String },
    #[error("key {key:?}: {source}")]
    Id { key: String, source: IdError },
}

/// `/expertmesh/<cluster>/`
pub fn cluster_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/")
}

/// `/expertmesh/<cluster>/workers/`: watch this for membership.
pub fn workers_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/workers/")
}

/// `/expertmesh/<cluster>/workers/<role>/`
pub fn role_prefix(cluster: &ClusterName, role: Role) -> String {
    format!("{ROOT}/{cluster}/workers/{role}/")
}

/// `/expertmesh/<cluster>/workers/<role>/<worker-id>`
pub fn worker_key(cluster: &ClusterName, role: Role, worker: &WorkerId) -> String {
    format!("{ROOT}/{cluster}/workers/{role}/{worker}")
}

/// `/expertmesh/<cluster>/load/<worker-id>`
pub fn load_key(cluster: &ClusterName, worker: &WorkerId) -> String {
    format!("{ROOT}/{cluster}/load/{worker}")
}

/// `/expertmesh/<cluster>/load/`: every worker's load report.
pub fn load_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/load/")
}

/// `/expertmesh/<cluster>/placement/`: watch this to follow placements.
pub fn placement_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/placement/")
}

/// `/expertmesh/<cluster>/placement/<N>/`: everything of version N.
pub fn placement_version_prefix(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{ROOT}/{cluster}/placement/{}/", version.0)
}

/// `/expertmesh/<cluster>/placement/<N>/spec`
pub fn placement_spec_key(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{ROOT}/{cluster}/placement/{}/spec", version.0)
}

/// `/expertmesh/<cluster>/controller/desired_expert_workers`
pub fn desired_expert_workers_key(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/controller/desired_expert_workers")
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

/// `/expertmesh/<cluster>/placement/current`
pub fn placement_current_key(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/placement/current")
}

/// `/expertmesh/<cluster>/placement/<N>/ready/`: watch this during a placement switch.
pub fn placement_ready_prefix(cluster: &ClusterName, version: PlacementVersion) -> String {
    format!("{ROOT}/{cluster}/placement/{}/ready/", version.0)
}

/// `/expertmesh/<cluster>/placement/<N>/ready/<worker>`
pub fn placement_ready_key(cluster: &ClusterName, version: PlacementVersion, worker: &WorkerId) -> String {
    format!("{ROOT}/{cluster}/placement/{}/ready/{worker}", version.0)
}

/// `/expertmesh/<cluster>/controller/leader`
pub fn controller_leader_key(cluster: &ClusterName) -> String {
    format!("{ROOT}/{cluster}/controller/leader")
}

/// Splits a key under [`workers_prefix`] back into its role and worker id.
pub fn parse_worker_key(cluster: &ClusterName, key: &str) -> Result<(Role, WorkerId), KeyError> {
    let prefix = workers_prefix(cluster);
    let rest = key
        .strip_prefix(&prefix)
        .ok_or_else(|| KeyError::NotUnderPrefix { key: key.to_owned(), prefix: prefix.clone() })?;
    let (role, worker) = rest.split_once('/').ok_or_else(|| KeyError::Malformed { key: key.to_owned() })?;
    let id_err = |source| KeyError::Id { key: key.to_owned(), source };
    let role = role.parse::<Role>().map_err(id_err)?;
    let worker = WorkerId::new(worker).map_err(id_err)?;
    Ok((role, worker))
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
        assert_eq!(cluster_prefix(&c), "/expertmesh/prod/");
        assert_eq!(workers_prefix(&c), "/expertmesh/prod/workers/");
        assert_eq!(role_prefix(&c, Role::Decode), "/expertmesh/prod/workers/decode/");
        assert_eq!(worker_key(&c, Role::Expert, &w), "/expertmesh/prod/workers/expert/e-7");
        assert_eq!(load_key(&c, &w), "/expertmesh/prod/load/e-7");
        assert_eq!(placement_current_key(&c), "/expertmesh/prod/placement/current");
        assert_eq!(placement_ready_prefix(&c, PlacementVersion(3)), "/expertmesh/prod/placement/3/ready/");
        assert_eq!(placement_ready_key(&c, PlacementVersion(3), &w), "/expertmesh/prod/placement/3/ready/e-7");
        assert_eq!(controller_leader_key(&c), "/expertmesh/prod/controller/leader");
        assert_eq!(placement_spec_key(&c, PlacementVersion(3)), "/expertmesh/prod/placement/3/spec");
        assert_eq!(load_prefix(&c), "/expertmesh/prod/load/");
    }

    #[test]
    fn placement_keys_round_trip() {
        let c = cluster();
        let w = WorkerId::new("e-7").expect("valid");
        let v = PlacementVersion(12);
        assert_eq!(parse_placement_key(&c, &placement_current_key(&c)), Some(PlacementKey::Current));
        assert_eq!(parse_placement_key(&c, &placement_spec_key(&c, v)), Some(PlacementKey::Spec(v)));
        assert_eq!(parse_placement_key(&c, &placement_ready_key(&c, v, &w)), Some(PlacementKey::Ready(v, w)));
        for bad in
            ["/expertmesh/prod/placement/x/spec", "/expertmesh/prod/placement/3/other", "/expertmesh/prod/load/a"]
        {
            assert_eq!(parse_placement_key(&c, bad), None, "{bad}");
        }
    }

    #[test]
    fn worker_key_round_trips() {
        let c = cluster();
        for role in Role::ALL {
            let w = WorkerId::new(format!("{role}-0")).expect("valid");
            assert_eq!(parse_worker_key(&c, &worker_key(&c, role, &w)), Ok((role, w)));
        }
    }

    #[test]
    fn parse_rejects_foreign_and_malformed_keys() {
        let c = cluster();
        let other = ClusterName::new("staging").expect("valid");
        let w = WorkerId::new("w").expect("valid");
        assert!(matches!(
            parse_worker_key(&c, &worker_key(&other, Role::Router, &w)),
            Err(KeyError::NotUnderPrefix { .. })
        ));
        assert!(matches!(parse_worker_key(&c, "/expertmesh/prod/workers/router"), Err(KeyError::Malformed { .. })));
        assert!(matches!(
            parse_worker_key(&c, "/expertmesh/prod/workers/gpu/w"),
            Err(KeyError::Id { source: IdError::UnknownRole(_), .. })
        ));
        assert!(matches!(
            parse_worker_key(&c, "/expertmesh/prod/workers/router/a/b"),
            Err(KeyError::Id { source: IdError::Slash { .. }, .. })
        ));
        assert!(matches!(
            parse_worker_key(&c, "/expertmesh/prod/workers/router/"),
            Err(KeyError::Id { source: IdError::Empty { .. }, .. })
        ));
        // A sibling cluster whose name extends ours is not ours.
        assert!(parse_worker_key(&c, "/expertmesh/prod2/workers/router/w").is_err());
    }
}
