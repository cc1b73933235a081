//! The `Store` trait: the membership/config store every service talks to (etcd in a cluster,
//! [`crate::MemoryStore`] in the single-process quickstart), its error and watch event types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// Boxed future so `Store` stays object-safe (`Arc<dyn Store>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Capacity of the channel `watch_prefix` returns. A consumer that falls this far behind
/// applies back-pressure to the watch task (etcd buffers server-side; the memory store
/// resyncs from a snapshot), it never loses the final state.
pub const WATCH_CHANNEL_CAPACITY: usize = 256;

/// A lease: keys put with it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
}

/// What a prefix watch delivers.
///
/// The stream starts with a `Put` for every key present when the watch starts, then
/// `Synced`. After a lost connection (server restart, compaction, lag) the watch re-reads the
/// prefix, emits the difference to what it delivered before (`Put` for new or changed keys,
/// `Delete` for vanished ones) and `Synced` again, then resumes live events. So a consumer that
/// applies events in order always converges to the store's contents; it may see a `Put` of an
/// unchanged value again, and intermediate states lost while disconnected are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// The consumer's view now equals the store's contents at some recent revision.
    Synced,
}

/// Errors at the store boundary. Callers decide on the variant: `Unavailable` is worth a
/// retry, `LeaseExpired` means re-grant and re-put, the others are bugs or bad data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable during {op}: {reason}")]
    Unavailable { op: &'static str, reason: String },
    #[error("lease {0} expired or was revoked")]
    LeaseExpired(LeaseId),
    #[error("store rejected {op}: {reason}")]
    Rejected { op: &'static str, reason: String },
    #[error("value under {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the store was shut down")]
    Closed,
}

/// The membership/config store. Keys are UTF-8 (built by [`crate::keys`]); values are bytes,
/// JSON by convention (see [`decode_json`]).
pub trait Store: Send + Sync + fmt::Debug {
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>>;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;

    /// Every key starting with `prefix`, sorted by key.
    fn get_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<KeyValue>, StoreError>>;

    /// Returns whether the key existed.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// A new lease living `ttl` (whole seconds, at least 1) unless kept alive.
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>>;

    /// Puts `key` attached to `lease`; `LeaseExpired` if the lease is gone.
    fn put_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Puts `key` attached to `lease` only if the key does not exist (an etcd transaction on
    /// its create revision); returns whether the key is now held with `lease` (created, or
    /// already attached to it by an earlier attempt whose answer was lost). Leader election
    /// is built on it.
    fn create_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Puts `key` (no lease) only while `guard` exists attached to `lease` (an etcd
    /// transaction on the guard's lease); returns whether it was put. A leader fences its
    /// writes with its election key, so a deposed leader cannot overwrite its successor's.
    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        guard: &'a str,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// One refresh: resets the lease to its full TTL and returns that TTL;
    /// `LeaseExpired` if it is gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>>;

    /// Ends the lease now, deleting its keys. Revoking a gone lease is not an error.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Watches every key under `prefix` (see [`WatchEvent`] for the guarantees). The watch
    /// runs on a task tracked by the store and ends when the receiver is dropped or the store
    /// shuts down (the channel then closes). It survives the server restarting: it retries
    /// with back-off and resyncs.
    fn watch_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<mpsc::Receiver<WatchEvent>, StoreError>>;
}

/// Decodes a JSON value read from `key`, mapping failures to `StoreError::Corrupt`.
pub fn decode_json<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

/// Lease TTL in whole seconds as the store counts it (rounded up, at least 1).
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}
