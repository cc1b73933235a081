//! The placement follower: a watch on `/placement/` (the shared [`PlacementFold`]) and the
//! placement attention workers should use now (the spec `current` names, once that spec is
//! known). [`PlacementView`] is the plain state machine; [`PlacementWatch`] publishes it from
//! a tracked task.

use cluster_core::{ClusterName, Fold, Store, StoreError, WatchFollower};
use placement::keys;
use placement::{PlacementFold, PlacementSpec};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The placement keys seen so far, and the spec in use.
#[derive(Debug)]
pub struct PlacementView {
    fold: PlacementFold,
    /// The spec in use: the current version's once both are known; the previous one
    /// meanwhile; `None` while no placement is current (then slots are discovered with
    /// `GetSlots`).
    effective: Option<Arc<PlacementSpec>>,
}

impl PlacementView {
    pub fn new(cluster: ClusterName) -> Self {
        PlacementView { fold: PlacementFold::new(cluster), effective: None }
    }

    /// The spec in use (see the field).
    pub fn effective(&self) -> Option<&Arc<PlacementSpec>> {
        self.effective.as_ref()
    }
}

impl Fold for PlacementView {
    /// Applies one key; returns whether the effective placement changed.
    fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        self.fold.update(key, value);
        if self.fold.current().is_none() {
            let cleared = self.effective.take().is_some();
            if cleared {
                tracing::info!("placement_cleared");
            }
            return cleared;
        }
        let Some(spec) = self.fold.current_spec() else { return false };
        if self.effective.as_ref() == Some(spec) {
            return false;
        }
        self.effective = Some(spec.clone());
        true
    }
}

/// The effective placement of a cluster, kept current by a watch on a tracked task.
#[derive(Debug, Clone)]
pub struct PlacementWatch {
    view: watch::Receiver<Option<Arc<PlacementSpec>>>,
}

impl PlacementWatch {
    /// Starts watching `cluster`'s placement prefix and returns once the initial contents
    /// are loaded; the task stops with `shutdown`. While the store is unreachable this waits
    /// (the watch retries).
    pub async fn start(
        store: &dyn Store,
        cluster: &ClusterName,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Self, StoreError> {
        let view = PlacementView::new(cluster.clone());
        let follower = WatchFollower::start(store, &keys::placement_prefix(cluster), view).await?;
        Ok(PlacementWatch { view: follower.publish(tracker, shutdown, |v| v.effective().cloned()) })
    }

    /// A watch that never names a placement: slots are always discovered with `GetSlots`.
    pub fn none() -> Self {
        let (_, rx) = watch::channel(None);
        PlacementWatch { view: rx }
    }

    /// A receiver notified whenever the effective placement changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<PlacementSpec>>> {
        self.view.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_core::WorkerId;
    use placement::{CurrentPlacement, PlacementVersion};

    fn cluster() -> ClusterName {
        ClusterName::new("c").expect("valid")
    }

    fn spec(version: u64) -> PlacementSpec {
        PlacementSpec {
            version: PlacementVersion(version),
            workers: vec![WorkerId::new("a").expect("valid"), WorkerId::new("b").expect("valid")],
            layers: vec![3],
            num_experts: 2,
            phy2log: vec![vec![0, 1]],
            reason: "test".into(),
            ratio_before: 1.0,
            ratio_after: 1.0,
            created_unix_ms: 0,
        }
    }

    fn put_spec(view: &mut PlacementView, spec: &PlacementSpec) -> bool {
        let key = keys::placement_spec_key(&cluster(), spec.version);
        view.apply(&key, Some(&serde_json::to_vec(spec).expect("serializes")))
    }

    fn put_current(view: &mut PlacementView, version: u64) -> bool {
        let current = CurrentPlacement { version: PlacementVersion(version) };
        view.apply(&keys::placement_current_key(&cluster()), Some(&serde_json::to_vec(&current).expect("serializes")))
    }

    fn version(view: &PlacementView) -> Option<u64> {
        view.effective().map(|s| s.version.0)
    }

    #[test]
    fn current_takes_effect_once_its_spec_is_known() {
        let c = cluster();
        let mut view = PlacementView::new(c.clone());
        assert!(!put_current(&mut view, 1));
        assert_eq!(version(&view), None);
        assert!(put_spec(&mut view, &spec(1)));
        assert_eq!(version(&view), Some(1));
        // The next spec is written before the pointer moves.
        assert!(!put_spec(&mut view, &spec(2)));
        assert_eq!(version(&view), Some(1));
        assert!(put_current(&mut view, 2));
        assert_eq!(version(&view), Some(2));
        // The same pointer again (a resync) changes nothing.
        assert!(!put_current(&mut view, 2));
        let ready = keys::placement_ready_key(&c, PlacementVersion(2), &WorkerId::new("a").expect("valid"));
        assert!(!view.apply(&ready, Some(b"{\"slots\":1}")));
    }

    #[test]
    fn old_specs_are_dropped_and_the_previous_one_kept_for_a_rollback() {
        let mut view = PlacementView::new(cluster());
        for v in 1..=3 {
            put_spec(&mut view, &spec(v));
        }
        put_current(&mut view, 3);
        assert_eq!(view.fold.specs().keys().map(|v| v.0).collect::<Vec<_>>(), vec![2, 3]);
        put_spec(&mut view, &spec(1));
        assert_eq!(view.fold.specs().len(), 2, "a spec older than current - 1 is not kept");
        // Rolling back to the previous version works: its spec is still held.
        assert!(put_current(&mut view, 2));
        assert_eq!(version(&view), Some(2));
    }

    #[test]
    fn bad_specs_are_ignored_and_deleting_current_falls_back_to_discovery() {
        let c = cluster();
        let mut view = PlacementView::new(c.clone());
        let mut bad = spec(1);
        bad.phy2log = vec![vec![0, 0]];
        put_spec(&mut view, &bad);
        view.apply(&keys::placement_current_key(&c), Some(b"7"));
        assert!(!put_current(&mut view, 1));
        assert!(view.fold.specs().is_empty());
        assert!(put_spec(&mut view, &spec(1)));
        assert!(view.apply(&keys::placement_current_key(&c), None));
        assert_eq!(version(&view), None);
    }

    #[tokio::test]
    async fn watch_follows_the_store() {
        let store = cluster_core::MemoryStore::new();
        let (c, tracker, shutdown) = (cluster(), TaskTracker::new(), CancellationToken::new());
        let value = serde_json::to_vec(&spec(1)).expect("serializes");
        store.put(&keys::placement_spec_key(&c, PlacementVersion(1)), value).await.expect("put");
        let watch = PlacementWatch::start(&store, &c, &tracker, &shutdown).await.expect("watch");
        let mut rx = watch.subscribe();
        assert!(rx.borrow_and_update().is_none());
        let current = serde_json::to_vec(&CurrentPlacement { version: PlacementVersion(1) }).expect("serializes");
        store.put(&keys::placement_current_key(&c), current).await.expect("put");
        let got = rx.wait_for(Option::is_some).await.expect("open").as_ref().map(|s| s.version);
        assert_eq!(got, Some(PlacementVersion(1)));
        assert!(PlacementWatch::none().subscribe().borrow().is_none());
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        store.shutdown().await;
    }
}
