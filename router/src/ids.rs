//! The ids the router mints: one per request (reported in its summary) and one per attempt
//! (the sequence's id on the workers that run it, new for every retry so a late release of a
//! failed attempt never touches the next). Both come from one id function, never from the
//! seed function: unique within the process by construction, random across routers.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A public request's id; shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// One attempt at a request: the `request_id` of the internal calls, so the sequence's id on
/// its prefill and decode workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptId(u64);

impl RequestId {
    pub fn fresh() -> Self {
        RequestId(next_id())
    }
}

impl AttemptId {
    pub fn fresh() -> Self {
        AttemptId(next_id())
    }

    /// The value on the wire.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Decimal, as the workers log the same number.
impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A counter under a random per-process key, scrambled by a bijection: distinct within the
/// process (distinct counts give distinct ids) and spread over the whole range, so routers
/// sharing a decode worker do not collide in practice.
fn next_id() -> u64 {
    static KEY: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let key = *KEY.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish());
    mix(key ^ COUNT.fetch_add(1, Ordering::Relaxed))
}

/// SplitMix64's finalizer: a bijection on u64 that scatters neighbouring inputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_scattered() {
        let ids: std::collections::HashSet<u64> =
            (0..10_000).map(|i| if i % 2 == 0 { RequestId::fresh().0 } else { AttemptId::fresh().get() }).collect();
        assert_eq!(ids.len(), 10_000);
        // Neighbouring counts land far apart (no shared high bits).
        assert!(ids.iter().filter(|&&id| id >> 48 == 0).count() < 10);
        assert_eq!(RequestId(0xab).to_string(), "00000000000000ab");
        assert_eq!(AttemptId(171).to_string(), "171");
    }
}
