//! Leader election over the store: at most one holder of a leased key at a time. A candidate
//! creates the key with its own lease only if the key is absent; the others wait for it to
//! go (resignation, or lease expiry when the leader dies) and try again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{LeaseId, Store, StoreError, WatchEvent};

/// Shortest keep-alive period, whatever the TTL.
const MIN_RENEW_PERIOD: Duration = Duration::from_millis(100);

/// Leadership held. [`Leadership::lost`] fires when it ends for any reason: the lease could
/// not be renewed within its TTL (the store is unreachable, so another candidate may take
/// over), or `shutdown`. The leader must stop acting as leader at once.
#[derive(Debug)]
pub struct Leadership {
    store: Arc<dyn Store>,
    lease: LeaseId,
    lost: CancellationToken,
}

impl Leadership {
    /// Fires when leadership ends.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn is_held(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// The lease the election key is attached to (for [`Store::put_fenced`]).
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Gives leadership up now: revokes the lease, so a standby takes over without waiting
    /// for the TTL.
    pub async fn resign(self) -> Result<(), StoreError> {
        self.lost.cancel();
        self.store.revoke(self.lease).await
    }
}

impl Drop for Leadership {
    /// Dropped without resigning: stop renewing, so the key expires with the lease.
    fn drop(&mut self) {
        self.lost.cancel();
    }
}

/// Campaigns for `key` until elected (or `shutdown`: then `Err(StoreError::Closed)`).
/// Renewal runs on a task in `tracker`. `value` names the candidate (shown to operators).
pub async fn campaign(
    store: Arc<dyn Store>,
    key: &str,
    value: Vec<u8>,
    ttl: Duration,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Leadership, StoreError> {
    let period = (ttl / 3).max(MIN_RENEW_PERIOD);
    let mut watch: Option<mpsc::Receiver<WatchEvent>> = None;
    let mut lease: Option<LeaseId> = None;
    loop {
        if shutdown.is_cancelled() {
            if let Some(l) = lease {
                let _ = store.revoke(l).await;
            }
            return Err(StoreError::Closed);
        }
        // The lease is refreshed (or granted) after this instant.
        let attempt = Instant::now();
        match try_once(store.as_ref(), key, &value, ttl, &mut lease).await {
            Ok(true) => {
                let lease = lease.expect("try_once sets the lease it created the key with");
                let lost = shutdown.child_token();
                tracker.spawn(renew(store.clone(), lease, ttl, period, attempt, lost.clone()));
                return Ok(Leadership { store, lease, lost });
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%key, %error, "election_attempt_failed"),
        }
        if watch.is_none() {
            watch = store.watch_prefix(key).await.ok();
        }
        // Wake on the key's deletion, else retry after a period (which also keeps our
        // standby lease alive).
        let deleted = async {
            match watch.as_mut() {
                Some(rx) => loop {
                    match rx.recv().await {
                        Some(WatchEvent::Delete { key: k }) if k == key => return,
                        Some(_) => {}
                        None => return std::future::pending().await,
                    }
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = deleted => {}
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// One attempt: keeps (or grants) a standby lease and tries to create the key with it.
async fn try_once(
    store: &dyn Store,
    key: &str,
    value: &[u8],
    ttl: Duration,
    lease: &mut Option<LeaseId>,
) -> Result<bool, StoreError> {
    let current = match *lease {
        Some(l) => match store.keep_alive(l).await {
            Ok(_) => l,
            Err(StoreError::LeaseExpired(_)) => store.grant_lease(ttl).await?,
            Err(e) => return Err(e),
        },
        None => store.grant_lease(ttl).await?,
    };
    *lease = Some(current);
    match store.create_with_lease(key, value.to_vec(), current).await {
        Err(StoreError::LeaseExpired(_)) => {
            *lease = None;
            Ok(false)
        }
        other => other,
    }
}

/// Keeps the leader's lease alive. Leadership is trusted only until the lease could have
/// expired: the send time of the last refresh the store answered (`refreshed`), plus the
/// TTL, less a margin. `lost` fires then, whether or not a refresh is still in flight, so a
/// standby that takes over after expiry never overlaps with this leader.
async fn renew(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    period: Duration,
    refreshed: Instant,
    lost: CancellationToken,
) {
    let margin = ttl / 5;
    let mut valid_until = refreshed + ttl - margin;
    let expire = |why: &'static str| {
        tracing::warn!(%lease, why, "leadership_lost");
        lost.cancel();
    };
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(valid_until) => return expire("unrenewed"),
            _ = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        let result = tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(valid_until) => return expire("unrenewed"),
            result = store.keep_alive(lease) => result,
        };
        match result {
            Ok(_) => valid_until = sent + ttl - margin,
            Err(StoreError::LeaseExpired(_)) => return expire("lease_expired"),
            Err(error) => tracing::warn!(%lease, %error, "leadership_keep_alive_failed"),
        }
    }
}
