//! The placement follower: an actor that watches `/placement/`, loads the slots a new spec
//! gives this worker (on a blocking thread), installs them through the compute thread, marks
//! the version ready (leased), and releases slots no longer placed here once the current
//! version has been in force for the release delay. Decisions live in `placement.rs`.

use crate::compute::ComputeHandle;
use crate::placement::{self, PlacementView, Target};
use crate::slots::{self, LoadError};
use ::placement::keys::{self, PlacementVersion};
use ::placement::{ReadyMark, SlotKey};
use cluster_core::{ClusterName, Registration, Store, WatchFollower, WorkerId};
use model::serving::ExpertCheckpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How soon a ready mark that could not be put is tried again.
const MARK_RETRY: Duration = Duration::from_secs(1);

/// What the follower works with.
#[derive(Debug)]
pub struct Follower {
    pub store: Arc<dyn Store>,
    pub cluster: ClusterName,
    pub me: WorkerId,
    pub registration: Arc<Registration>,
    pub compute: ComputeHandle,
    pub checkpoint: Arc<ExpertCheckpoint>,
    pub release_delay: Duration,
    /// Tells the load publisher which version this worker follows.
    pub version: watch::Sender<Option<PlacementVersion>>,
    /// Tracks the blocking loading tasks.
    pub loads: TaskTracker,
}

/// The actor's own state besides the view.
#[derive(Debug, Default)]
struct State {
    /// The target the last loading round was for; a failed load is retried only when the
    /// target changes.
    loaded_for: Option<Target>,
    /// Some spec named this worker: from then on it releases slots placements do not give it.
    followed: bool,
    /// Ready marks put, and ready marks still to put (retried every `MARK_RETRY`).
    marked: BTreeSet<PlacementVersion>,
    pending: BTreeMap<PlacementVersion, ReadyMark>,
    /// The current version acted on, and when its releases are due.
    current: Option<PlacementVersion>,
    release: Option<(Instant, PlacementVersion)>,
}

/// Follows `placements` (started on the placement prefix, so it holds the store's contents)
/// until `cancel` or the watch ends. Each batch of changes leads to one decision on the latest
/// state.
pub async fn follow(f: Follower, mut placements: WatchFollower<PlacementView>, cancel: CancellationToken) {
    let mut state = State::default();
    if !f.step(&mut state, placements.fold(), &cancel).await {
        return;
    }
    loop {
        let release_at = state.release.map(|(at, _)| at);
        let retry = !state.pending.is_empty();
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = placements.next() => {
                if changed.is_none() {
                    tracing::warn!("placement_watch_closed");
                    return;
                }
                f.forget_lost_marks(&mut state, placements.fold_mut());
                if !f.step(&mut state, placements.fold(), &cancel).await {
                    return;
                }
            }
            _ = tokio::time::sleep_until(release_at.unwrap_or_else(Instant::now)), if release_at.is_some() => {
                f.release(&mut state, placements.fold()).await;
            }
            _ = tokio::time::sleep(MARK_RETRY), if retry => f.put_marks(&mut state).await,
        }
    }
}

impl Follower {
    fn forget_lost_marks(&self, state: &mut State, view: &mut PlacementView) {
        for version in view.take_lost_marks() {
            if state.marked.remove(&version) {
                tracing::info!(%version, "placement_ready_mark_lost");
            }
        }
    }

    /// Acts on the view: load and install, put due ready marks, follow the current version.
    /// Returns false once cancelled.
    async fn step(&self, state: &mut State, view: &PlacementView, cancel: &CancellationToken) -> bool {
        let target = view.target();
        if state.loaded_for != Some(target) {
            state.followed |= view.names(&self.me);
            let missing = placement::slots_to_load(&self.compute.hosted(), view, &self.me);
            if !missing.is_empty() && !self.load(target, missing, cancel).await {
                return false;
            }
            state.loaded_for = Some(target);
        }

        let mut done = state.marked.clone();
        done.extend(state.pending.keys());
        let due = placement::marks_due(&self.compute.hosted(), view, &self.me, &done);
        state.pending.extend(due);
        if !state.pending.is_empty() {
            self.put_marks(state).await;
        }

        if let Some(current) = target.current
            && state.current != Some(current)
        {
            state.current = Some(current);
            state.marked.retain(|&v| v >= current);
            state.pending.retain(|&v, _| v >= current);
            self.version.send_replace(Some(current));
            state.release = Some((Instant::now() + self.release_delay, current));
            tracing::info!(version = %current, release_delay_ms = self.release_delay.as_millis() as u64, "placement_followed");
        }
        true
    }

    /// Loads `missing` on a blocking thread and installs it. Returns false once cancelled.
    async fn load(&self, target: Target, missing: Vec<SlotKey>, cancel: &CancellationToken) -> bool {
        let version = target.newest.or(target.current);
        let count = missing.len();
        tracing::info!(version = version.map(|v| v.0), slots = count, "placement_loading");
        let started = Instant::now();
        let (ckpt, stop) = (self.checkpoint.clone(), cancel.clone());
        let task = self.loads.spawn_blocking(move || slots::load_slots(&ckpt, &missing, &stop));
        let loaded = tokio::select! {
            _ = cancel.cancelled() => return false,
            loaded = task => loaded,
        };
        let weights = match loaded {
            Ok(Ok(weights)) => weights,
            Ok(Err(LoadError::Cancelled)) => return false,
            Ok(Err(error)) => {
                tracing::error!(version = version.map(|v| v.0), %error, "placement_load_failed");
                return true;
            }
            Err(error) => {
                tracing::error!(version = version.map(|v| v.0), %error, "placement_load_task_failed");
                return true;
            }
        };
        match self.compute.install(weights).await {
            Ok(hosted) => tracing::info!(
                version = version.map(|v| v.0),
                slots = count,
                hosted,
                load_ms = started.elapsed().as_millis() as u64,
                "slots_installed"
            ),
            Err(error) => tracing::error!(version = version.map(|v| v.0), %error, "slots_install_failed"),
        }
        true
    }

    /// Puts every pending ready mark, attached to the registration lease; failures stay
    /// pending.
    async fn put_marks(&self, state: &mut State) {
        for (version, mark) in std::mem::take(&mut state.pending) {
            let key = keys::placement_ready_key(&self.cluster, version, &self.me);
            let put = match serde_json::to_vec(&mark) {
                Ok(value) => {
                    self.store.put_with_lease(&key, value, self.registration.lease()).await.map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match put {
                Ok(()) => {
                    state.marked.insert(version);
                    tracing::info!(%version, slots = mark.slots, "placement_ready");
                }
                Err(error) => {
                    tracing::warn!(%version, %error, "placement_ready_failed");
                    state.pending.insert(version, mark);
                }
            }
        }
    }

    /// Releases the slots the version in force (and newer specs) no longer give this worker.
    async fn release(&self, state: &mut State, view: &PlacementView) {
        let Some((_, version)) = state.release.take() else { return };
        let slots = placement::slots_to_release(&self.compute.hosted(), view, version, &self.me, state.followed);
        if slots.is_empty() {
            return;
        }
        let count = slots.len();
        match self.compute.release(slots).await {
            Ok(released) => {
                tracing::info!(%version, slots = released, hosted = self.compute.hosted().len(), "slots_released");
                debug_assert!(released <= count);
            }
            Err(error) => tracing::error!(%version, %error, "slots_release_failed"),
        }
    }
}

#[cfg(test)]
#[path = "follower_tests.rs"]
mod tests;
