//! Following a prefix of the store: a [`Fold`] of a prefix watch's events into a view, brought
//! up to date before first use, then either driven by its owner ([`WatchFollower::next`], for
//! actors that decide on every change) or kept on a tracked task that publishes a view on a
//! `watch` channel ([`WatchFollower::publish`]). [`read_once`] folds a one-off read of the
//! same prefix, so a snapshot and a watch are read by the same code.

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Store, StoreError, WatchEvent};

/// State built from the keys under a prefix.
pub trait Fold {
    /// Applies a put (`Some(value)`) or a delete (`None`) of `key`; returns whether the state
    /// changed in a way followers care about. Bad keys and values are the fold's to log and
    /// ignore: a watch never stops on them.
    fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool;
}

/// A fold kept in step with a prefix watch.
#[derive(Debug)]
pub struct WatchFollower<F> {
    fold: F,
    events: mpsc::Receiver<WatchEvent>,
}

impl<F: Fold> WatchFollower<F> {
    /// Starts watching `prefix` and returns once `fold` holds the store's contents. While the
    /// store is unreachable this waits (the watch retries); wrap it in a timeout where that
    /// matters.
    pub async fn start(store: &dyn Store, prefix: &str, mut fold: F) -> Result<Self, StoreError> {
        let mut events = store.watch_prefix(prefix).await?;
        loop {
            match events.recv().await {
                Some(WatchEvent::Synced) => return Ok(WatchFollower { fold, events }),
                Some(event) => {
                    apply(&mut fold, event);
                }
                None => return Err(StoreError::Closed),
            }
        }
    }

    pub fn fold(&self) -> &F {
        &self.fold
    }

    pub fn fold_mut(&mut self) -> &mut F {
        &mut self.fold
    }

    /// Waits for the next change and applies it together with every event already queued, so
    /// a burst (a resync after a reconnection) leads to one decision on the latest state.
    /// Returns whether the fold changed, or `None` once the watch has ended (the store shut
    /// down). Cancel-safe: nothing is applied before the first event is taken.
    pub async fn next(&mut self) -> Option<bool> {
        let first = self.events.recv().await?;
        let mut changed = apply(&mut self.fold, first);
        while let Ok(event) = self.events.try_recv() {
            changed |= apply(&mut self.fold, event);
        }
        Some(changed)
    }

    /// Follows on a task in `tracker` until `shutdown` or the end of the watch, publishing
    /// `view` of the fold now and after every change.
    pub fn publish<T>(
        mut self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        view: impl Fn(&F) -> T + Send + 'static,
    ) -> watch::Receiver<T>
    where
        F: Send + 'static,
        T: Send + Sync + 'static,
    {
        let (tx, rx) = watch::channel(view(&self.fold));
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            loop {
                let changed = tokio::select! {
                    changed = self.next() => changed,
                    _ = shutdown.cancelled() => return,
                };
                match changed {
                    Some(true) => {
                        tx.send_replace(view(&self.fold));
                    }
                    Some(false) => {}
                    None => return,
                }
            }
        });
        rx
    }
}

/// `fold` with every key now under `prefix` applied (one read, no watch).
pub async fn read_once<F: Fold>(store: &dyn Store, prefix: &str, mut fold: F) -> Result<F, StoreError> {
    for kv in store.get_prefix(prefix).await? {
        fold.apply(&kv.key, Some(&kv.value));
    }
    Ok(fold)
}

fn apply<F: Fold>(fold: &mut F, event: WatchEvent) -> bool {
    match event {
        WatchEvent::Put { key, value } => fold.apply(&key, Some(&value)),
        WatchEvent::Delete { key } => fold.apply(&key, None),
        WatchEvent::Synced => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::MemoryStore;

    /// Every key and its value as text; `changed` is false for a put of the same value.
    #[derive(Debug, Default)]
    struct Texts(BTreeMap<String, String>);

    impl Fold for Texts {
        fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
            match value {
                Some(v) => {
                    let v = String::from_utf8_lossy(v).into_owned();
                    self.0.insert(key.to_owned(), v.clone()) != Some(v)
                }
                None => self.0.remove(key).is_some(),
            }
        }
    }

    #[tokio::test]
    async fn starts_synced_then_follows_and_publishes() {
        let store = MemoryStore::new();
        store.put("/p/a", b"1".to_vec()).await.expect("put");
        store.put("/q/x", b"0".to_vec()).await.expect("put");
        let mut follower = WatchFollower::start(&store, "/p/", Texts::default()).await.expect("start");
        assert_eq!(follower.fold().0, BTreeMap::from([("/p/a".into(), "1".into())]));

        store.put("/p/b", b"2".to_vec()).await.expect("put");
        assert_eq!(follower.next().await, Some(true));
        assert_eq!(follower.fold().0.get("/p/b").map(String::as_str), Some("2"));
        store.put("/p/b", b"2".to_vec()).await.expect("put");
        assert_eq!(follower.next().await, Some(false), "the same value again changes nothing");

        let snapshot = read_once(&store, "/p/", Texts::default()).await.expect("read");
        assert_eq!(snapshot.0, follower.fold().0);

        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let mut keys = follower.publish(&tracker, &shutdown, |f| f.0.len());
        assert_eq!(*keys.borrow_and_update(), 2);
        store.delete("/p/a").await.expect("delete");
        assert_eq!(*keys.wait_for(|&n| n == 1).await.expect("published"), 1);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_closed_store_ends_the_follower() {
        let store = MemoryStore::new();
        let mut follower = WatchFollower::start(&store, "/p/", Texts::default()).await.expect("start");
        store.shutdown().await;
        assert_eq!(follower.next().await, None);
        assert!(matches!(WatchFollower::start(&store, "/p/", Texts::default()).await, Err(StoreError::Closed)));
    }
}
