//! `MemoryStore`: the in-process `Store` for the single-process quickstart and for tests.
//! Leases expire on a timer task; watches are fed from one broadcast channel and forwarded
//! to bounded per-watch channels.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, WATCH_CHANNEL_CAPACITY, WatchEvent, ttl_secs};
use crate::sync::Delivered;

/// How often the reaper looks for expired leases; bounds how late a lease can expire.
const REAP_INTERVAL: Duration = Duration::from_millis(50);
/// Events buffered for slow watches before they lag and resync from a snapshot.
const BROADCAST_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    lease: Option<LeaseId>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: i64,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Sent while `state` is locked, so a snapshot taken under the lock plus a subscription
    /// made under the same lock see every change exactly once.
    events: broadcast::Sender<WatchEvent>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// In-memory store. Cloning shares the same data. Must be created inside a tokio runtime
/// (it spawns the lease reaper); call [`MemoryStore::shutdown`] to stop its tasks.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let inner = Arc::new(Inner {
            state: Mutex::new(State { next_lease: 1, ..State::default() }),
            events,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        inner.tasks.spawn(reap_leases(Arc::downgrade(&inner), inner.cancel.clone()));
        Self { inner }
    }

    /// Stops the reaper and every watch (their channels close) and waits for them.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still consistent per operation.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: WatchEvent) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    fn put_locked(&self, state: &mut State, key: &str, value: Vec<u8>, lease: Option<LeaseId>) {
        if let Some(old) = state.kvs.get(key).and_then(|e| e.lease)
            && let Some(l) = state.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if let Some(id) = lease
            && let Some(l) = state.leases.get_mut(&id)
        {
            l.keys.insert(key.to_owned());
        }
        state.kvs.insert(key.to_owned(), Entry { value: value.clone(), lease });
        self.emit(WatchEvent::Put { key: key.to_owned(), value });
    }

    fn delete_locked(&self, state: &mut State, key: &str) -> bool {
        let Some(entry) = state.kvs.remove(key) else { return false };
        if let Some(id) = entry.lease
            && let Some(l) = state.leases.get_mut(&id)
        {
            l.keys.remove(key);
        }
        self.emit(WatchEvent::Delete { key: key.to_owned() });
        true
    }

    fn end_lease_locked(&self, state: &mut State, id: LeaseId) {
        if let Some(lease) = state.leases.remove(&id) {
            for key in lease.keys {
                self.delete_locked(state, &key);
            }
        }
    }

    /// The live lease `id`, expiring it first if its deadline passed between reaper ticks.
    fn live_lease<'s>(&self, state: &'s mut State, id: LeaseId) -> Result<&'s mut Lease, StoreError> {
        let expired = state.leases.get(&id).is_none_or(|l| l.deadline <= Instant::now());
        if expired {
            self.end_lease_locked(state, id);
            return Err(StoreError::LeaseExpired(id));
        }
        state.leases.get_mut(&id).ok_or(StoreError::LeaseExpired(id))
    }

    fn prefix_locked(state: &State, prefix: &str) -> Vec<KeyValue> {
        state
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue { key: k.clone(), value: e.value.clone() })
            .collect()
    }
}

async fn reap_leases(inner: Weak<Inner>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner.lock();
        let now = Instant::now();
        let expired: Vec<LeaseId> = state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            inner.end_lease_locked(&mut state, id);
        }
    }
}

/// Forwards matching broadcast events into one bounded watch channel; resyncs from a
/// snapshot when it lagged behind the broadcast buffer.
async fn forward_watch(
    inner: Weak<Inner>,
    prefix: String,
    snapshot: Vec<KeyValue>,
    mut events: broadcast::Receiver<WatchEvent>,
    tx: mpsc::Sender<WatchEvent>,
    cancel: CancellationToken,
) {
    let mut delivered = Delivered::default();
    let mut pending = delivered.resync(snapshot);
    loop {
        for event in pending.drain(..) {
            tokio::select! {
                sent = tx.send(event) => if sent.is_err() { return },
                _ = cancel.cancelled() => return,
            }
        }
        let received = tokio::select! {
            received = events.recv() => received,
            _ = tx.closed() => return,
            _ = cancel.cancelled() => return,
        };
        match received {
            Ok(event) => {
                let key = match &event {
                    WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
                    WatchEvent::Synced => continue,
                };
                if key.starts_with(&prefix) {
                    delivered.apply(&event);
                    pending.push(event);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let Some(inner) = inner.upgrade() else { return };
                let state = inner.lock();
                events = events.resubscribe();
                pending = delivered.resync(Inner::prefix_locked(&state, &prefix));
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Store for MemoryStore {
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            self.inner.put_locked(&mut state, key, value, None);
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { Ok(self.inner.lock().kvs.get(key).map(|e| e.value.clone())) })
    }

    fn get_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<KeyValue>, StoreError>> {
        Box::pin(async move { Ok(Inner::prefix_locked(&self.inner.lock(), prefix)) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            Ok(self.inner.delete_locked(&mut state, key))
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let ttl = Duration::from_secs(ttl_secs(ttl).unsigned_abs());
            let mut state = self.inner.lock();
            let id = LeaseId(state.next_lease);
            state.next_lease += 1;
            state.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
            Ok(id)
        })
    }

    fn put_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            self.inner.live_lease(&mut state, lease)?;
            self.inner.put_locked(&mut state, key, value, Some(lease));
            Ok(())
        })
    }

    fn create_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            self.inner.live_lease(&mut state, lease)?;
            if let Some(entry) = state.kvs.get(key) {
                return Ok(entry.lease == Some(lease));
            }
            self.inner.put_locked(&mut state, key, value, Some(lease));
            Ok(true)
        })
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        guard: &'a str,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            let held = state.leases.get(&lease).is_some_and(|l| l.deadline > Instant::now())
                && state.kvs.get(guard).is_some_and(|e| e.lease == Some(lease));
            if held {
                self.inner.put_locked(&mut state, key, value, None);
            }
            Ok(held)
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            let l = self.inner.live_lease(&mut state, lease)?;
            l.deadline = Instant::now() + l.ttl;
            Ok(l.ttl)
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            self.inner.end_lease_locked(&mut state, lease);
            Ok(())
        })
    }

    fn watch_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<mpsc::Receiver<WatchEvent>, StoreError>> {
        Box::pin(async move {
            if self.inner.cancel.is_cancelled() {
                return Err(StoreError::Closed);
            }
            let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
            let (snapshot, events) = {
                let state = self.inner.lock();
                (Inner::prefix_locked(&state, prefix), self.inner.events.subscribe())
            };
            self.inner.tasks.spawn(forward_watch(
                Arc::downgrade(&self.inner),
                prefix.to_owned(),
                snapshot,
                events,
                tx,
                self.inner.cancel.clone(),
            ));
            Ok(rx)
        })
    }
}
