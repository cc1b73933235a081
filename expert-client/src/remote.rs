//! [`RemoteExperts`]: the `ExpertBackend` that sends each MoE layer's groups to the expert
//! workers hosting them. `run` is called on the engine's compute thread (inside rayon), never
//! on a runtime thread: it bridges to async code with `Handle::block_on`.
//!
//! A call never fails because one worker did: the groups of a failed part are split again
//! over the hosts known after a refresh and resent, with back-off, until `call_timeout`.

use crate::conns::{Dialer, Planned, Workers};
use crate::plan::{self, Piece};
use crate::table::PlacementWatch;
use crate::wire::CallError;
use cluster_core::{ClusterName, Membership, Store, StoreError, WorkerId};
use model::{ExpertBackend, ExpertBatch, ExpertError};
use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First pause between attempts of a call; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// A part sent and its worker's answer.
type Replied = (plan::Part<WorkerId>, Result<Vec<f32>, CallError>);

/// Timeouts of remote expert calls.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// Connecting to an expert worker and asking its slots.
    pub connect_timeout: Duration,
    /// One MoE layer, retries included: from planning the first attempt to the last reply.
    pub call_timeout: Duration,
    /// One attempt: a part not answered within it (a worker that accepts but no longer
    /// answers) is retried on the hosts known then.
    pub attempt_timeout: Duration,
    /// Least time between retries of workers that could not be reached; also how long a
    /// worker that failed a call is avoided while another replica exists.
    pub retry_period: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(20),
            retry_period: Duration::from_secs(1),
        }
    }
}

/// Routed experts served by the cluster's expert workers.
#[derive(Debug)]
pub struct RemoteExperts {
    dialer: Dialer,
    options: RemoteOptions,
    workers: Mutex<Workers>,
    /// Rotates the first host of each group over its replicas.
    turn: AtomicUsize,
    /// Stops retrying (the process is shutting down).
    shutdown: CancellationToken,
}

impl RemoteExperts {
    /// Follows `membership`'s expert workers and `placement`; stream actors run on
    /// `runtime`. Calls stop retrying once `shutdown` is cancelled.
    pub fn new(
        membership: Membership,
        placement: PlacementWatch,
        runtime: Handle,
        shutdown: CancellationToken,
        options: RemoteOptions,
    ) -> Self {
        let dialer = Dialer {
            runtime,
            tracker: TaskTracker::new(),
            // Not a child of `shutdown`: streams stay up while the engine drains.
            cancel: CancellationToken::new(),
            connect_timeout: options.connect_timeout,
            retry_period: options.retry_period,
        };
        RemoteExperts {
            dialer,
            options,
            workers: Mutex::new(Workers::new(membership, &placement)),
            turn: AtomicUsize::new(0),
            shutdown,
        }
    }

    /// Follows the expert workers and the placement of `cluster` in `store` (watches on
    /// `tracker`, stopped by `shutdown`); stream actors run on the current runtime. Returns
    /// once both watches have loaded the store's contents.
    pub async fn from_store(
        store: &dyn Store,
        cluster: &ClusterName,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        options: RemoteOptions,
    ) -> Result<Self, StoreError> {
        let membership = Membership::start(store, cluster, tracker, shutdown).await?;
        let placement = PlacementWatch::start(store, cluster, tracker, shutdown).await?;
        Ok(Self::new(membership, placement, Handle::current(), shutdown.clone(), options))
    }

    fn lock(&self) -> MutexGuard<'_, Workers> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refreshes when due, then splits `pending` over one snapshot of the table.
    fn plan(&self, layer: usize, hidden: usize, pending: &[Piece], inputs: &[f32]) -> (Vec<Planned>, Vec<Piece>) {
        let mut workers = self.lock();
        if workers.needs_refresh(self.options.retry_period) {
            self.dialer.runtime.block_on(workers.refresh(&self.dialer));
        }
        workers.plan(layer, hidden, pending, inputs, &self.turn, self.options.retry_period)
    }

    /// Sends every part (queued first, so the workers run concurrently) and collects the
    /// replies; a part without reply by `deadline` fails with `TimedOut`.
    async fn send(
        &self,
        layer: usize,
        hidden: usize,
        parts: Vec<Planned>,
        deadline: Instant,
        traceparent: &str,
    ) -> Vec<Replied> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut waiting = Vec::with_capacity(parts.len());
        for (mut part, conn) in parts {
            let rx = match conn {
                None => Err(CallError::NotConnected),
                Some(conn) => {
                    let inputs = std::mem::take(&mut part.inputs);
                    let submit = conn.submit(layer, hidden, part.groups.clone(), inputs, traceparent.to_owned());
                    tokio::time::timeout_at(deadline, submit).await.unwrap_or(Err(CallError::TimedOut))
                }
            };
            waiting.push((part, rx));
        }
        let mut done = Vec::with_capacity(waiting.len());
        for (part, rx) in waiting {
            let reply = match rx {
                Ok(rx) => match tokio::time::timeout_at(deadline, rx).await {
                    Ok(reply) => reply.unwrap_or(Err(CallError::Closed)),
                    Err(_) => Err(CallError::TimedOut),
                },
                Err(error) => Err(error),
            };
            done.push((part, reply));
        }
        done
    }

    /// Waits `pause` unless shutdown comes first; returns whether the full pause passed.
    fn pause(&self, pause: Duration) -> bool {
        self.dialer.runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(pause) => true,
                _ = self.shutdown.cancelled() => false,
            }
        })
    }
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        // Stream actors stop; in-flight calls (there are none once the engine is gone) fail.
        self.dialer.cancel.cancel();
        self.dialer.tracker.close();
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
        let (layer, hidden) = (batch.layer, batch.hidden);
        // A child of the step's (or prefill batch's) span; its context rides on each request.
        let span = tracing::info_span!("expert_call", layer, groups = batch.groups.len(), rows = batch.num_rows());
        let _entered = span.enter();
        let traceparent = cluster_core::trace::traceparent(&span);
        let mut pending = plan::pieces(batch, outputs.len())?;
        let deadline = Instant::now() + self.options.call_timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let (parts, unhosted) = self.plan(layer, hidden, &pending, batch.inputs);
            let attempt_deadline = deadline.min(Instant::now() + self.options.attempt_timeout);
            let results = self.dialer.runtime.block_on(self.send(layer, hidden, parts, attempt_deadline, &traceparent));

            // (worker, error) of each failed part; `None` for groups nobody hosts.
            let mut failures: Vec<(Option<WorkerId>, String)> = Vec::new();
            if let Some(first) = unhosted.first() {
                let error = ExpertError::NotHosted { layer, expert: first.group.expert.0 };
                failures.push((None, format!("{error} ({} groups without host)", unhosted.len())));
                self.lock().force_refresh();
            }
            pending = unhosted;
            for (part, reply) in results {
                let gathered = reply.and_then(|got| {
                    plan::gather_part(&part, &got, hidden, outputs).map_err(|e| CallError::BadReply(e.to_string()))
                });
                if let Err(error) = gathered {
                    self.lock().mark_failed(&part.worker, &error);
                    pending.extend(part.pieces());
                    failures.push((Some(part.worker), error.to_string()));
                }
            }
            if pending.is_empty() {
                return Ok(());
            }

            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.shutdown.is_cancelled() {
                return Err(self.give_up(layer, attempt, pending.len(), failures));
            }
            for (worker, error) in &failures {
                let worker = worker.as_ref().map_or("none", WorkerId::as_str);
                tracing::info!(worker_id = worker, layer, attempt, %error, "expert_call_retry");
            }
            if !self.pause(backoff.min(left)) || Instant::now() >= deadline {
                return Err(self.give_up(layer, attempt, pending.len(), failures));
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl RemoteExperts {
    /// The error of a call that ran out of time (or was stopped by shutdown).
    fn give_up(
        &self,
        layer: usize,
        attempts: u32,
        groups: usize,
        mut failures: Vec<(Option<WorkerId>, String)>,
    ) -> ExpertError {
        let (worker, error) = failures.pop().unwrap_or((None, "no attempt failed".into()));
        let worker = worker.map_or_else(|| "none".to_owned(), |w| w.to_string());
        let why = if self.shutdown.is_cancelled() { "shutting down" } else { "out of time" };
        tracing::warn!(layer, attempts, worker_id = %worker, %error, why, "expert_call_failed");
        ExpertError::Unavailable(format!(
            "layer {layer}: {groups} groups still failing after {attempts} attempts ({why}, call timeout {:?}); \
             last error, from expert worker {worker}: {error}",
            self.options.call_timeout
        ))
    }
}
