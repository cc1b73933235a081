//! Domain ids of the cluster (cluster name, worker id, role) and the worker record stored
//! under a worker key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name or id that cannot appear as one segment of a store key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} must not contain '/'")]
    Slash { kind: &'static str, value: String },
    #[error("unknown role {0:?} (expected router, prefill, decode, expert or controller)")]
    UnknownRole(String),
}

fn check_segment(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.contains('/') {
        return Err(IdError::Slash { kind, value: value.to_owned() });
    }
    Ok(())
}

macro_rules! segment_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        /// Invariant: non-empty and free of `/`, so it is exactly one key segment.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_segment($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

segment_newtype!(
    /// The name of one ExpertMesh cluster; every key lives under `/expertmesh/<cluster>/`.
    ClusterName,
    "cluster name"
);
segment_newtype!(
    /// A worker's id, unique within its cluster.
    WorkerId,
    "worker id"
);

/// What a process does in the cluster; also the `<role>` segment of its worker key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Router,
    Prefill,
    Decode,
    Expert,
    Controller,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Router, Role::Prefill, Role::Decode, Role::Expert, Role::Controller];

    /// The key segment (lowercase), identical to the serde name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Expert => "expert",
            Role::Controller => "controller",
        }
    }
}

impl FromStr for Role {
    type Err = IdError;
    fn from_str(value: &str) -> Result<Self, IdError> {
        Role::ALL.into_iter().find(|role| role.as_str() == value).ok_or_else(|| IdError::UnknownRole(value.to_owned()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much work a worker accepts; fields a role does not use stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Most sequences in flight at once (prefill/decode/router).
    pub max_sequences: u32,
    /// Most tokens in one batch step (prefill/decode).
    pub max_batch_tokens: u32,
    /// Expert slots this worker can hold (expert workers).
    pub expert_slots: u32,
}

/// The JSON value under `/expertmesh/<cluster>/workers/<role>/<worker-id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub role: Role,
    /// gRPC address other processes dial, e.g. `http://10.0.0.5:50051`.
    pub address: String,
    pub capacity: Capacity,
    /// Model served, e.g. `deepseek-ai/DeepSeek-V3`.
    pub model: String,
    /// Software version of the worker binary.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_and_slash() {
        assert_eq!(WorkerId::new(""), Err(IdError::Empty { kind: "worker id" }));
        assert!(matches!(ClusterName::new("a/b"), Err(IdError::Slash { .. })));
        assert!(serde_json::from_str::<WorkerId>("\"x/y\"").is_err());
        assert_eq!(WorkerId::new("w-1").expect("valid").as_str(), "w-1");
    }

    #[test]
    fn role_round_trips_through_str_and_serde() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            let json = serde_json::to_string(&role).expect("serializes");
            assert_eq!(json, format!("\"{}\"", role.as_str()));
        }
        assert!(matches!("gpu".parse::<Role>(), Err(IdError::UnknownRole(_))));
    }

    #[test]
    fn worker_info_json_round_trip() {
        let info = WorkerInfo {
            id: WorkerId::new("e0").expect("valid"),
            role: Role::Expert,
            address: "http://127.0.0.1:1".into(),
            capacity: Capacity { expert_slots: 32, ..Capacity::default() },
            model: "m".into(),
            version: "0.1.0".into(),
        };
        let json = serde_json::to_vec(&info).expect("serializes");
        assert_eq!(serde_json::from_slice::<WorkerInfo>(&json).expect("parses"), info);
    }
}
