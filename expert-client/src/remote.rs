//! [`RemoteExperts`]: the `ExpertBackend` that sends each MoE layer's groups to the expert
//! workers hosting them. `run` is called on the engine's compute thread (inside rayon), never
//! on a runtime thread: it bridges to async code with `Handle::block_on`.
//!
//! A worker that fails a call is dropped from the slot table and the batch fails with
//! `ExpertError::Unavailable`; retrying its groups on another replica is a later step.

use crate::plan::{self, SlotTable};
use crate::wire::{self, CallError, Conn};
use cluster_core::registration::WorkerMap;
use cluster_core::{ClusterName, Membership, Role, Store, StoreError, WorkerId};
use model::{ExpertBackend, ExpertBatch, ExpertError};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Timeouts of remote expert calls.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// Connecting to an expert worker and asking its slots.
    pub connect_timeout: Duration,
    /// One MoE layer: from sending the first part to the last reply.
    pub call_timeout: Duration,
    /// Least time between retries of members that could not be reached.
    pub retry_period: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(60),
            retry_period: Duration::from_secs(1),
        }
    }
}

/// Routed experts served by the cluster's expert workers.
#[derive(Debug)]
pub struct RemoteExperts {
    runtime: Handle,
    membership: Membership,
    options: RemoteOptions,
    state: Mutex<State>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Worker {
    address: String,
    slots: Vec<(usize, u32)>,
    conn: Conn,
}

#[derive(Debug)]
struct State {
    seen: watch::Receiver<WorkerMap>,
    workers: BTreeMap<WorkerId, Worker>,
    table: SlotTable<WorkerId>,
    /// Some member is not connected (unreachable, or failed a call).
    incomplete: bool,
    last_refresh: Option<Instant>,
}

impl RemoteExperts {
    /// Follows `membership`'s expert workers; stream actors run on `runtime`.
    pub fn new(membership: Membership, runtime: Handle, options: RemoteOptions) -> Self {
        let seen = membership.subscribe();
        let state = State { seen, workers: BTreeMap::new(), table: SlotTable::new([]), incomplete: true, last_refresh: None };
        RemoteExperts {
            runtime,
            membership,
            options,
            state: Mutex::new(state),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Follows the expert workers of `cluster` in `store` (a membership watch on `tracker`,
    /// stopped by `shutdown`); stream actors run on the current runtime.
    pub async fn from_store(
        store: &dyn Store,
        cluster: &ClusterName,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        options: RemoteOptions,
    ) -> Result<Self, StoreError> {
        let membership = Membership::start(store, cluster, tracker, shutdown).await?;
        Ok(Self::new(membership, Handle::current(), options))
    }

    /// Brings connections and the slot table in line with membership.
    async fn refresh_locked(&self, state: &mut State) {
        state.seen.borrow_and_update();
        state.last_refresh = Some(Instant::now());
        let members = self.membership.by_role(Role::Expert);
        state.workers.retain(|id, w| !w.conn.is_closed() && members.iter().any(|m| &m.id == id && m.address == w.address));
        let mut incomplete = false;
        let missing: Vec<_> = members.into_iter().filter(|m| !state.workers.contains_key(&m.id)).collect();
        for m in &missing {
            match self.connect(&m.address).await {
                Ok((slots, conn)) => {
                    tracing::info!(worker_id = %m.id, slots = slots.len(), "expert_worker_connected");
                    state.workers.insert(m.id.clone(), Worker { address: m.address.clone(), slots, conn });
                }
                Err(error) => {
                    tracing::warn!(worker_id = %m.id, %error, "expert_worker_unreachable");
                    incomplete = true;
                }
            }
        }
        state.incomplete = incomplete;
        state.table = SlotTable::new(state.workers.iter().map(|(id, w)| (id, &w.slots[..])));
    }

    async fn connect(&self, address: &str) -> Result<(Vec<(usize, u32)>, Conn), CallError> {
        let channel = cluster_core::serve::channel(address, self.options.connect_timeout)
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let slots = tokio::time::timeout(self.options.connect_timeout, wire::get_slots(channel.clone()))
            .await
            .map_err(|_| CallError::Transport("GetSlots timed out".into()))??;
        Ok((slots, Conn::open(channel, &self.tracker, &self.runtime, self.cancel.child_token())))
    }

    fn needs_refresh(&self, state: &State) -> bool {
        state.seen.has_changed().unwrap_or(false)
            || state.last_refresh.is_none()
            || (state.incomplete && state.last_refresh.is_some_and(|t| t.elapsed() >= self.options.retry_period))
    }
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        // Stream actors stop; in-flight calls (there are none once the engine is gone) fail.
        self.cancel.cancel();
        self.tracker.close();
    }
}

impl ExpertBackend for RemoteExperts {
    fn run(&self, batch: &ExpertBatch<'_>, outputs: &mut [f32]) -> Result<(), ExpertError> {
        if batch.groups.is_empty() {
            return Ok(());
        }
        if Handle::try_current().is_ok() {
            // block_on would panic (or stall a worker thread) on a runtime thread.
            return Err(ExpertError::Unavailable("RemoteExperts::run called on an async runtime thread".into()));
        }
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.needs_refresh(&state) {
            self.runtime.block_on(self.refresh_locked(&mut state));
        }
        let parts = plan::split(batch, |e| state.table.pick(batch.layer, e))?;
        let conns: Vec<Conn> = parts
            .iter()
            .map(|p| state.workers.get(&p.worker).map(|w| w.conn.clone()))
            .collect::<Option<_>>()
            .ok_or_else(|| ExpertError::Unavailable("slot table names an unknown worker".into()))?;
        drop(state);

        let (layer, hidden) = (batch.layer, batch.hidden);
        let result = self.runtime.block_on(async {
            let calls = async {
                // Queue every part first so the workers run concurrently, then collect.
                let mut receivers = Vec::with_capacity(parts.len());
                for (part, conn) in parts.iter().zip(&conns) {
                    let rx = conn.submit(layer, hidden, part.groups.clone(), part.inputs.clone()).await;
                    receivers.push(rx.map_err(|e| (part.worker.clone(), e))?);
                }
                let mut got = Vec::with_capacity(parts.len());
                for (part, rx) in parts.iter().zip(receivers) {
                    let reply = rx.await.unwrap_or(Err(CallError::Closed));
                    got.push(reply.map_err(|e| (part.worker.clone(), e))?);
                }
                Ok(got)
            };
            tokio::time::timeout(self.options.call_timeout, calls).await
        });
        let got = match result {
            Ok(Ok(got)) => got,
            Ok(Err((worker, error))) => {
                tracing::warn!(worker_id = %worker, %error, layer, "expert_call_failed");
                if !matches!(error, CallError::Remote(_)) {
                    self.forget(&worker);
                }
                return Err(ExpertError::Unavailable(format!("expert worker {worker}: {error}")));
            }
            Err(_) => {
                return Err(ExpertError::Unavailable(format!(
                    "layer {layer}: expert workers did not answer within {:?}",
                    self.options.call_timeout
                )));
            }
        };
        plan::gather(&parts, &got, hidden, outputs)
    }
}

impl RemoteExperts {
    /// Drops a failed worker from the table; it is reconnected on a later refresh.
    fn forget(&self, worker: &WorkerId) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.workers.remove(worker);
        state.incomplete = true;
        state.table = SlotTable::new(state.workers.iter().map(|(id, w)| (id, &w.slots[..])));
    }
}
