//! Worker registration (a leased worker key kept alive on a tracked task) and `Membership`
//! (the live worker map, kept from a watch on the workers prefix).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::follow::{Fold, WatchFollower};
use crate::ids::{ClusterName, Role, WorkerId, WorkerInfo};
use crate::keys;
use crate::store::{LeaseId, Store, StoreError, decode_json};

/// Shortest renewal period, whatever the TTL.
const MIN_RENEW_PERIOD: Duration = Duration::from_millis(100);

/// A live registration. Renewal runs every TTL/3 on a task in the caller's tracker. If the
/// lease is lost (expired while the store was unreachable, or the store lost its data) the
/// task grants a new lease and puts the key again.
///
/// Dropping it stops renewal only (the key disappears within the TTL, as after a crash);
/// [`Registration::deregister`] also revokes the lease so the key disappears at once.
#[derive(Debug)]
pub struct Registration {
    key: String,
    store: Arc<dyn Store>,
    lease: watch::Receiver<LeaseId>,
    cancel: CancellationToken,
    /// Taken by the first `deregister`.
    renewal: Mutex<Option<JoinHandle<LeaseId>>>,
}

impl Registration {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the key is attached to now (changes after a re-registration).
    pub fn lease(&self) -> LeaseId {
        *self.lease.borrow()
    }

    /// Waits until the key is attached to a lease other than `old`.
    pub async fn changed_from(&mut self, old: LeaseId) -> Result<LeaseId, StoreError> {
        let lease = self.lease.wait_for(|lease| *lease != old).await.map_err(|_| StoreError::Closed)?;
        Ok(*lease)
    }

    /// Stops renewal and revokes the lease, deleting the key now. It takes `&self` because
    /// tasks that attach their own records to the lease share the registration: they must
    /// not keep the worker registered past its shutdown.
    pub async fn deregister(&self) -> Result<(), StoreError> {
        self.cancel.cancel();
        let renewal = self.renewal.lock().unwrap_or_else(PoisonError::into_inner).take();
        let lease = match renewal {
            Some(task) => task.await.unwrap_or_else(|_| *self.lease.borrow()),
            None => *self.lease.borrow(),
        };
        self.store.revoke(lease).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Puts `info` under its worker key with a lease of `ttl` and keeps it alive on a task in
/// `tracker` until the registration is dropped or `shutdown` is cancelled.
pub async fn register(
    store: Arc<dyn Store>,
    cluster: &ClusterName,
    info: WorkerInfo,
    ttl: Duration,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Registration, StoreError> {
    let key = keys::worker_key(cluster, info.role, &info.id);
    let value = serde_json::to_vec(&info)
        .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: format!("cannot encode: {e}") })?;
    let lease = put_leased(store.as_ref(), &key, &value, ttl).await?;
    let (lease_tx, lease_rx) = watch::channel(lease);
    let cancel = shutdown.child_token();
    let renewal = tracker.spawn(renew(store.clone(), key.clone(), value, ttl, lease_tx, cancel.clone()));
    Ok(Registration { key, store, lease: lease_rx, cancel, renewal: Mutex::new(Some(renewal)) })
}

async fn put_leased(store: &dyn Store, key: &str, value: &[u8], ttl: Duration) -> Result<LeaseId, StoreError> {
    let lease = store.grant_lease(ttl).await?;
    store.put_with_lease(key, value.to_vec(), lease).await?;
    Ok(lease)
}

/// Renewal loop; returns the lease held when it stopped.
async fn renew(
    store: Arc<dyn Store>,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    lease_tx: watch::Sender<LeaseId>,
    cancel: CancellationToken,
) -> LeaseId {
    let period = (ttl / 3).max(MIN_RENEW_PERIOD);
    let mut lease = *lease_tx.borrow();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return lease,
            _ = tokio::time::sleep(period) => {}
        }
        match store.keep_alive(lease).await {
            Ok(_) => {}
            Err(StoreError::LeaseExpired(_)) => match put_leased(store.as_ref(), &key, &value, ttl).await {
                Ok(fresh) => {
                    tracing::info!(%key, old_lease = %lease, lease = %fresh, "worker_reregistered");
                    lease = fresh;
                    lease_tx.send_replace(fresh);
                }
                // The next tick retries: keep_alive on the old lease fails again.
                Err(error) => tracing::warn!(%key, %error, "worker_reregister_failed"),
            },
            Err(error) => tracing::warn!(%key, %error, "worker_keep_alive_failed"),
        }
    }
}

/// The live workers of one cluster, by id.
pub type WorkerMap = BTreeMap<WorkerId, WorkerInfo>;

/// Live view of `/expertmesh/<cluster>/workers/`, kept current by a watch on a tracked task.
#[derive(Debug, Clone)]
pub struct Membership {
    view: watch::Receiver<WorkerMap>,
}

impl Membership {
    /// Starts watching and returns once the initial contents are loaded. While the store is
    /// unreachable this waits (the watch retries); wrap it in a timeout where that matters.
    pub async fn start(
        store: &dyn Store,
        cluster: &ClusterName,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Self, StoreError> {
        let members = Members { cluster: cluster.clone(), map: WorkerMap::new() };
        let follower = WatchFollower::start(store, &keys::workers_prefix(cluster), members).await?;
        Ok(Self { view: follower.publish(tracker, shutdown, |m| m.map.clone()) })
    }

    /// A copy of the current map.
    pub fn workers(&self) -> WorkerMap {
        self.view.borrow().clone()
    }

    pub fn get(&self, id: &WorkerId) -> Option<WorkerInfo> {
        self.view.borrow().get(id).cloned()
    }

    pub fn by_role(&self, role: Role) -> Vec<WorkerInfo> {
        self.view.borrow().values().filter(|w| w.role == role).cloned().collect()
    }

    /// A receiver notified on every change (for `wait_for`).
    pub fn subscribe(&self) -> watch::Receiver<WorkerMap> {
        self.view.clone()
    }
}

/// The workers under the workers prefix. A key that does not parse, or a value that is not a
/// `WorkerInfo` matching its key, is logged and leaves that worker absent.
#[derive(Debug)]
struct Members {
    cluster: ClusterName,
    map: WorkerMap,
}

impl Fold for Members {
    fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        let (role, id) = match keys::parse_worker_key(&self.cluster, key) {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::warn!(%error, "membership_bad_key");
                return false;
            }
        };
        let Some(value) = value else { return self.map.remove(&id).is_some() };
        match decode_json::<WorkerInfo>(key, value) {
            Ok(info) if info.id == id && info.role == role => {
                self.map.insert(id, info);
            }
            Ok(_) => {
                tracing::warn!(%key, "membership_value_does_not_match_key");
                self.map.remove(&id);
            }
            Err(error) => {
                tracing::warn!(%error, "membership_bad_value");
                self.map.remove(&id);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Capacity;

    fn info(id: &str, role: Role) -> WorkerInfo {
        WorkerInfo {
            id: WorkerId::new(id).expect("valid"),
            role,
            address: format!("http://{id}:1"),
            capacity: Capacity::default(),
            model: "m".into(),
            version: "v".into(),
        }
    }

    fn put(m: &mut Members, info: &WorkerInfo) {
        let key = keys::worker_key(&m.cluster, info.role, &info.id);
        m.apply(&key, Some(&serde_json::to_vec(info).expect("serializes")));
    }

    #[test]
    fn apply_tracks_puts_deletes_and_ignores_bad_data() {
        let c = ClusterName::new("c").expect("valid");
        let mut m = Members { cluster: c.clone(), map: WorkerMap::new() };
        let a = info("a", Role::Decode);
        put(&mut m, &a);
        assert_eq!(m.map.get(&a.id), Some(&a));

        // Corrupt value for a known worker: it is dropped, not kept stale.
        let key = keys::worker_key(&c, Role::Decode, &a.id);
        m.apply(&key, Some(b"{"));
        assert!(m.map.is_empty());

        // Value whose id disagrees with its key.
        let b = info("b", Role::Expert);
        m.apply(&keys::worker_key(&c, Role::Expert, &a.id), Some(&serde_json::to_vec(&b).expect("serializes")));
        assert!(m.map.is_empty());

        put(&mut m, &a);
        assert!(!m.apply("/elsewhere", Some(b"")));
        assert_eq!(m.map.len(), 1);
        assert!(m.apply(&key, None));
        assert!(m.map.is_empty());
    }
}
