//! `--shard I/N`: which (layer, expert) slots a worker hosts. Logical expert `e` of MoE layer
//! `l` belongs to shard `(l * n_routed_experts + e) % N`, which spreads every layer's experts
//! over all shards.

use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (`0/1` hosts everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// A `--shard` value that is not `I/N` with `I < N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--shard {value}: {reason}")]
pub struct ShardError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(value: &str) -> Result<Self, ShardError> {
        let bad = |reason| ShardError { value: value.to_string(), reason };
        let (i, n) = value.split_once('/').ok_or_else(|| bad("expected I/N, e.g. 0/3"))?;
        let index: u32 = i.trim().parse().map_err(|_| bad("I is not a number"))?;
        let count: u32 = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        if count == 0 {
            return Err(bad("N must be >= 1"));
        }
        if index >= count {
            return Err(bad("I must be < N"));
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether this shard hosts logical expert `expert` of layer `layer`.
    pub fn hosts(&self, layer: usize, expert: u32, n_routed_experts: usize) -> bool {
        let slot = layer as u64 * n_routed_experts as u64 + u64::from(expert);
        slot % u64::from(self.count) == u64::from(self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(Shard::default().to_string(), "0/1");
        for bad in ["3/3", "1", "a/2", "0/0", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_partition_every_slot() {
        let (layers, experts, n) = (4, 16, 3);
        for l in 0..layers {
            for e in 0..experts {
                let owners = (0..n).filter(|&i| Shard { index: i, count: n }.hosts(l, e, experts as usize)).count();
                assert_eq!(owners, 1, "layer {l} expert {e}");
            }
        }
        assert!((0..16).all(|e| Shard::default().hosts(3, e, 16)));
    }
}
