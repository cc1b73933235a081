//! The workers the router can use: membership from the store, a gRPC channel per worker,
//! the load each last reported, the requests this router has outstanding on each, and
//! which failed recently.

use crate::grpc::internal::{self, Load};
use crate::schedule::Candidate;
use cluster_core::{Membership, Role, WorkerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a worker that failed a call is tried only as a last resort.
const SUSPECT_FOR: Duration = Duration::from_secs(3);
/// Bound on one load report call.
const LOAD_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct WorkerState {
    role: Role,
    address: String,
    channel: Channel,
    load: Option<Load>,
    outstanding: usize,
    suspect_until: Option<Instant>,
}

/// A worker chosen for one request.
#[derive(Debug, Clone)]
pub struct Picked {
    pub id: WorkerId,
    pub address: String,
    pub channel: Channel,
}

#[derive(Debug)]
pub struct Pool {
    membership: Membership,
    workers: Mutex<HashMap<WorkerId, WorkerState>>,
}

impl Pool {
    pub fn new(membership: Membership) -> Self {
        Pool { membership, workers: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, WorkerState>> {
        // A panic while holding this lock cannot leave the map inconsistent (plain field
        // updates), so a poisoned lock is still usable.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the map in line with membership: new workers get a channel, departed ones go.
    fn sync(&self) {
        let live = self.membership.workers();
        let mut w = self.lock();
        w.retain(|id, s| live.values().any(|i| &i.id == id && i.address == s.address));
        for info in live.values() {
            if !matches!(info.role, Role::Prefill | Role::Decode) || w.contains_key(&info.id) {
                continue;
            }
            match cluster_core::serve::channel(&info.address, CONNECT_TIMEOUT) {
                Ok(channel) => {
                    w.insert(
                        info.id.clone(),
                        WorkerState {
                            role: info.role,
                            address: info.address.clone(),
                            channel,
                            load: None,
                            outstanding: 0,
                            suspect_until: None,
                        },
                    );
                }
                Err(e) => tracing::warn!(worker = %info.id, address = %info.address, error = %e, "bad_worker_address"),
            }
        }
    }

    /// The live workers of `role`, as scheduling candidates.
    pub fn candidates(&self, role: Role) -> (Vec<Candidate>, Vec<Picked>) {
        self.sync();
        let now = Instant::now();
        let w = self.lock();
        let mut pairs: Vec<(Candidate, Picked)> = w
            .iter()
            .filter(|(_, s)| s.role == role)
            .map(|(id, s)| {
                let cand = Candidate {
                    id: id.clone(),
                    free_blocks: s.load.map(|l| l.free_blocks),
                    block_size: s.load.map_or(1, |l| l.block_size),
                    outstanding: s.outstanding,
                    queued_tokens: s.load.map_or(0, |l| l.queued_tokens),
                    suspect: s.suspect_until.is_some_and(|t| t > now),
                };
                (cand, Picked { id: id.clone(), address: s.address.clone(), channel: s.channel.clone() })
            })
            .collect();
        pairs.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        pairs.into_iter().unzip()
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.sync();
        self.lock().values().any(|s| s.role == role)
    }

    /// Counts a request on `id` until the guard drops.
    pub fn begin(self: &Arc<Self>, id: &WorkerId) -> Outstanding {
        if let Some(s) = self.lock().get_mut(id) {
            s.outstanding += 1;
        }
        Outstanding { pool: self.clone(), id: id.clone() }
    }

    pub fn mark_failed(&self, id: &WorkerId) {
        if let Some(s) = self.lock().get_mut(id) {
            s.suspect_until = Some(Instant::now() + SUSPECT_FOR);
        }
    }

    pub fn record_free_blocks(&self, id: &WorkerId, free: usize) {
        if let Some(Load { free_blocks, .. }) = self.lock().get_mut(id).and_then(|s| s.load.as_mut()) {
            *free_blocks = free;
        }
    }

    /// Asks every worker for its load every `period` until `shutdown`.
    pub async fn poll_loads(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        loop {
            self.sync();
            let targets: Vec<(WorkerId, Role, Channel)> =
                self.lock().iter().map(|(id, s)| (id.clone(), s.role, s.channel.clone())).collect();
            // Concurrent, so a slow worker does not delay the others' reports; the set
            // aborts its calls if this task is dropped.
            let mut calls = tokio::task::JoinSet::new();
            for (id, role, channel) in targets {
                calls.spawn(async move {
                    let call = async {
                        match role {
                            Role::Decode => internal::decode_load(channel).await,
                            _ => internal::prefill_load(channel).await,
                        }
                    };
                    (id, tokio::time::timeout(LOAD_TIMEOUT, call).await)
                });
            }
            let results = calls.join_all().await;
            {
                let mut w = self.lock();
                for (id, r) in results {
                    let Some(s) = w.get_mut(&id) else { continue };
                    match r {
                        Ok(Ok(load)) => s.load = Some(load),
                        _ => s.suspect_until = Some(Instant::now() + SUSPECT_FOR),
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

/// A request counted against a worker.
#[derive(Debug)]
pub struct Outstanding {
    pool: Arc<Pool>,
    id: WorkerId,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if let Some(s) = self.pool.lock().get_mut(&self.id) {
            s.outstanding = s.outstanding.saturating_sub(1);
        }
    }
}
