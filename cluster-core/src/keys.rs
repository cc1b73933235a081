//! The store key layout (DESIGN.md §3): the cluster prefix, membership and the controller's
//! election key are built here; the placement, load and autoscaling keys under the same
//! cluster prefix in the `placement` crate. Nothing else formats key strings.
//!
//! ```text
//! /expertmesh/<cluster>/workers/<role>/<worker-id>     -> WorkerInfo JSON (leased)
//! /expertmesh/<cluster>/controller/leader              -> election key (leased)
//! /expertmesh/<cluster>/load/..., placement/..., controller/desired_expert_workers
//!                                                      -> the `placement` crate
//! ```

use crate::ids::{ClusterName, IdError, Role, WorkerId};

/// Root of every key of every cluster.
pub const ROOT: &str = "/expertmesh";

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
        assert_eq!(controller_leader_key(&c), "/expertmesh/prod/controller/leader");
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
