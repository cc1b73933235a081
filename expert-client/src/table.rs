//! The placement follower: a watch on `/placement/` keeping the validated specs and the
//! `current` pointer, and publishing the placement attention workers should use now (the
//! spec `current` names, once that spec is known). [`PlacementView`] is the plain state
//! machine; [`PlacementWatch`] runs it on a tracked task.

use cluster_core::experts::{CurrentPlacement, PlacementSpec};
use cluster_core::keys::{self, PlacementKey, PlacementVersion};
use cluster_core::store::decode_json;
use cluster_core::{ClusterName, Store, StoreError, WatchEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The placement keys seen so far. Specs older than `current - 1` are dropped.
#[derive(Debug, Default)]
pub struct PlacementView {
    specs: BTreeMap<PlacementVersion, Arc<PlacementSpec>>,
    current: Option<PlacementVersion>,
    /// The spec in use: `specs[current]` once both are known; the previous one meanwhile;
    /// `None` while no placement is current (then slots are discovered with `GetSlots`).
    effective: Option<Arc<PlacementSpec>>,
}

impl PlacementView {
    /// Applies one watch event; returns whether the effective placement changed. Bad keys
    /// and values are logged and ignored.
    pub fn apply(&mut self, cluster: &ClusterName, event: WatchEvent) -> bool {
        let (key, value) = match event {
            WatchEvent::Put { key, value } => (key, Some(value)),
            WatchEvent::Delete { key } => (key, None),
            WatchEvent::Synced => return false,
        };
        match (keys::parse_placement_key(cluster, &key), value) {
            (Some(PlacementKey::Current), Some(value)) => match decode_json::<CurrentPlacement>(&key, &value) {
                Ok(current) => {
                    self.current = Some(current.version);
                    let keep = PlacementVersion(current.version.0.saturating_sub(1));
                    self.specs.retain(|v, _| *v >= keep);
                }
                Err(error) => tracing::warn!(%error, "placement_bad_current"),
            },
            (Some(PlacementKey::Current), None) => {
                self.current = None;
                let changed = self.effective.take().is_some();
                if changed {
                    tracing::info!("placement_cleared");
                }
                return changed;
            }
            (Some(PlacementKey::Spec(version)), Some(value)) => match decode_spec(&key, version, &value) {
                Ok(spec) if self.current.is_some_and(|c| version.0.saturating_add(1) < c.0) => {
                    tracing::debug!(version = spec.version.0, "placement_spec_outdated");
                }
                Ok(spec) => {
                    self.specs.insert(version, Arc::new(spec));
                }
                Err(error) => tracing::warn!(%error, "placement_bad_spec"),
            },
            (Some(PlacementKey::Spec(version)), None) => {
                self.specs.remove(&version);
            }
            (Some(PlacementKey::Ready(..)), _) => {}
            (None, _) => tracing::debug!(%key, "placement_unknown_key"),
        }
        self.update()
    }

    /// The spec in use (see the field).
    pub fn effective(&self) -> Option<&Arc<PlacementSpec>> {
        self.effective.as_ref()
    }

    fn update(&mut self) -> bool {
        let Some(spec) = self.current.and_then(|c| self.specs.get(&c)) else { return false };
        if self.effective.as_deref() == Some(spec.as_ref()) {
            return false;
        }
        self.effective = Some(spec.clone());
        true
    }
}

fn decode_spec(key: &str, version: PlacementVersion, value: &[u8]) -> Result<PlacementSpec, StoreError> {
    let spec: PlacementSpec = decode_json(key, value)?;
    let corrupt = |reason: String| StoreError::Corrupt { key: key.to_owned(), reason };
    if spec.version != version {
        return Err(corrupt(format!("spec of version {} under version {version}", spec.version)));
    }
    spec.validate().map_err(|e| corrupt(e.to_string()))?;
    Ok(spec)
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
        let mut view = PlacementView::default();
        let events = cluster_core::watch_synced(store, &keys::placement_prefix(cluster), |e| {
            view.apply(cluster, e);
        })
        .await?;
        let (tx, rx) = watch::channel(view.effective().cloned());
        tracker.spawn(follow(cluster.clone(), events, view, tx, shutdown.clone()));
        Ok(PlacementWatch { view: rx })
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

async fn follow(
    cluster: ClusterName,
    mut events: mpsc::Receiver<WatchEvent>,
    mut view: PlacementView,
    tx: watch::Sender<Option<Arc<PlacementSpec>>>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = shutdown.cancelled() => return,
        };
        let Some(event) = event else { return };
        if view.apply(&cluster, event) {
            tx.send_replace(view.effective().cloned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_core::WorkerId;

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

    fn put_spec(spec: &PlacementSpec) -> WatchEvent {
        let key = keys::placement_spec_key(&cluster(), spec.version);
        WatchEvent::Put { key, value: serde_json::to_vec(spec).expect("serializes") }
    }

    fn put_current(version: u64) -> WatchEvent {
        let current = CurrentPlacement { version: PlacementVersion(version) };
        WatchEvent::Put {
            key: keys::placement_current_key(&cluster()),
            value: serde_json::to_vec(&current).expect("serializes"),
        }
    }

    fn version(view: &PlacementView) -> Option<u64> {
        view.effective().map(|s| s.version.0)
    }

    #[test]
    fn current_takes_effect_once_its_spec_is_known() {
        let c = cluster();
        let mut view = PlacementView::default();
        assert!(!view.apply(&c, put_current(1)));
        assert_eq!(version(&view), None);
        assert!(view.apply(&c, put_spec(&spec(1))));
        assert_eq!(version(&view), Some(1));
        // The next spec is written before the pointer moves.
        assert!(!view.apply(&c, put_spec(&spec(2))));
        assert_eq!(version(&view), Some(1));
        assert!(view.apply(&c, put_current(2)));
        assert_eq!(version(&view), Some(2));
        // The same pointer again (a resync) changes nothing.
        assert!(!view.apply(&c, put_current(2)));
        let ready = keys::placement_ready_key(&c, PlacementVersion(2), &WorkerId::new("a").expect("valid"));
        assert!(!view.apply(&c, WatchEvent::Put { key: ready, value: b"{\"slots\":1}".to_vec() }));
    }

    #[test]
    fn old_specs_are_dropped_and_ignored() {
        let c = cluster();
        let mut view = PlacementView::default();
        for v in 1..=3 {
            view.apply(&c, put_spec(&spec(v)));
        }
        view.apply(&c, put_current(3));
        assert_eq!(view.specs.keys().map(|v| v.0).collect::<Vec<_>>(), vec![2, 3]);
        view.apply(&c, put_spec(&spec(1)));
        assert_eq!(view.specs.len(), 2, "a spec older than current - 1 is not kept");
        // Rolling back to the previous version works: its spec is still held.
        assert!(view.apply(&c, put_current(2)));
        assert_eq!(version(&view), Some(2));
    }

    #[test]
    fn bad_specs_are_ignored_and_deleting_current_falls_back_to_discovery() {
        let c = cluster();
        let mut view = PlacementView::default();
        let mut bad = spec(1);
        bad.phy2log = vec![vec![0, 0]];
        view.apply(&c, put_spec(&bad));
        let mut misfiled = spec(4);
        misfiled.version = PlacementVersion(1);
        let value = serde_json::to_vec(&misfiled).expect("serializes");
        view.apply(&c, WatchEvent::Put { key: keys::placement_spec_key(&c, PlacementVersion(4)), value });
        view.apply(
            &c,
            WatchEvent::Put { key: keys::placement_spec_key(&c, PlacementVersion(5)), value: b"{".to_vec() },
        );
        view.apply(&c, WatchEvent::Put { key: keys::placement_current_key(&c), value: b"7".to_vec() });
        assert!(!view.apply(&c, put_current(1)));
        assert!(view.specs.is_empty());
        assert!(view.apply(&c, put_spec(&spec(1))));
        assert!(view.apply(&c, WatchEvent::Delete { key: keys::placement_current_key(&c) }));
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
