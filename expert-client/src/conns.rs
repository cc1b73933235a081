//! The expert workers a [`crate::RemoteExperts`] talks to: one stream connection per
//! reachable worker, the slot table in use (built from the current placement, or from each
//! worker's `GetSlots` while no placement is current), and which workers failed recently.
//! [`Workers`] lives under the backend's lock; refreshes run on its runtime.

use crate::plan::{self, Part, Piece, SlotTable};
use crate::table::PlacementWatch;
use crate::wire::{self, CallError, Conn};
use cluster_core::registration::WorkerMap;
use cluster_core::{Membership, Role, WorkerId, WorkerInfo};
use placement::PlacementSpec;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// What opening connections needs: stream actors and connection attempts run on `tracker`
/// (on `runtime`) and stop with `cancel`. An unreachable worker is tried again at most once
/// per `retry_period`.
#[derive(Debug)]
pub struct Dialer {
    pub runtime: Handle,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    pub connect_timeout: Duration,
    pub retry_period: Duration,
}

#[derive(Debug)]
struct Worker {
    address: String,
    /// What the worker reported with `GetSlots` when connected (used without placement).
    slots: Vec<(usize, u32)>,
    conn: Conn,
}

type Probed = Result<(Vec<(usize, u32)>, Channel), CallError>;

/// A connection attempt in flight (a tracked task, bounded by the connect timeout).
#[derive(Debug)]
struct Probe {
    address: String,
    started: Instant,
    task: JoinHandle<Probed>,
}

/// A part of a call and the connection to send it on (`None`: its worker is not connected).
pub type Planned = (Part<WorkerId>, Option<Conn>);

#[derive(Debug)]
pub struct Workers {
    membership: Membership,
    seen: watch::Receiver<WorkerMap>,
    placed: watch::Receiver<Option<Arc<PlacementSpec>>>,
    conns: BTreeMap<WorkerId, Worker>,
    /// Connection attempts; collected by a later refresh, so an unreachable worker never
    /// holds up a call (except the very first, which waits for some connection).
    probes: HashMap<WorkerId, Probe>,
    /// When the last attempt to each worker not connected started or failed.
    last_try: HashMap<WorkerId, Instant>,
    /// When each worker last failed a call; it is skipped for `down_period` after that
    /// while another replica exists.
    failed: HashMap<WorkerId, Instant>,
    /// The placement `table` was built from; `None` while slots are discovered.
    placement: Option<Arc<PlacementSpec>>,
    /// Replaced whole under the lock, so a call plans against one consistent table.
    table: Arc<SlotTable<WorkerId>>,
    /// Some wanted worker is not connected (unreachable, or failed a call).
    incomplete: bool,
    /// A worker answered with an error, or a group had no host: look again before the next
    /// attempt.
    forced: bool,
    last_refresh: Option<Instant>,
}

impl Workers {
    pub fn new(membership: Membership, placement: &PlacementWatch) -> Self {
        Workers {
            seen: membership.subscribe(),
            placed: placement.subscribe(),
            membership,
            conns: BTreeMap::new(),
            probes: HashMap::new(),
            last_try: HashMap::new(),
            failed: HashMap::new(),
            placement: None,
            table: Arc::new(SlotTable::new([])),
            incomplete: true,
            forced: false,
            last_refresh: None,
        }
    }

    /// Whether membership or placement moved, a refresh was asked for, a connection attempt
    /// finished, or unreachable workers are due another try (every `retry_period`).
    pub fn needs_refresh(&self, retry_period: Duration) -> bool {
        self.forced
            || self.last_refresh.is_none()
            || self.seen.has_changed().unwrap_or(false)
            || self.placed.has_changed().unwrap_or(false)
            || self.probes.values().any(|p| p.task.is_finished())
            || (self.incomplete && self.last_refresh.is_some_and(|t| t.elapsed() >= retry_period))
    }

    /// Brings connections and the slot table in line with membership and placement.
    pub async fn refresh(&mut self, dialer: &Dialer) {
        self.seen.borrow_and_update();
        let spec = self.placed.borrow_and_update().clone();
        self.last_refresh = Some(Instant::now());
        self.forced = false;
        let members = self.membership.by_role(Role::Expert);
        // Under a placement only its workers matter; without one, every expert worker.
        let wanted: Vec<WorkerInfo> = match &spec {
            Some(spec) => members.into_iter().filter(|m| spec.workers.contains(&m.id)).collect(),
            None => members,
        };
        let is_wanted = |id: &WorkerId, address: &str| wanted.iter().any(|m| &m.id == id && m.address == address);
        self.conns.retain(|id, w| !w.conn.is_closed() && is_wanted(id, &w.address));
        self.probes.retain(|id, p| is_wanted(id, &p.address));
        self.failed.retain(|id, _| wanted.iter().any(|m| &m.id == id));
        self.last_try.retain(|id, _| wanted.iter().any(|m| &m.id == id));

        for m in &wanted {
            let busy = self.conns.contains_key(&m.id) || self.probes.contains_key(&m.id);
            if busy || self.last_try.get(&m.id).is_some_and(|t| t.elapsed() < dialer.retry_period) {
                continue;
            }
            let task = dialer.tracker.spawn_on(probe(m.address.clone(), dialer.connect_timeout), &dialer.runtime);
            self.probes.insert(m.id.clone(), Probe { address: m.address.clone(), started: Instant::now(), task });
            self.last_try.insert(m.id.clone(), Instant::now());
        }
        // Attempts run concurrently; only with no connection at all is there nothing better
        // to do than wait for them (each is bounded by the connect timeout).
        let wait = self.conns.is_empty();
        let ids: Vec<WorkerId> =
            self.probes.iter().filter(|(_, p)| wait || p.task.is_finished()).map(|(id, _)| id.clone()).collect();
        for id in ids {
            let Some(p) = self.probes.remove(&id) else { continue };
            match p.task.await.unwrap_or_else(|e| Err(CallError::Transport(format!("connect task: {e}")))) {
                Ok((slots, channel)) => {
                    tracing::info!(worker_id = %id, slots = slots.len(), "expert_worker_connected");
                    let conn = Conn::open(channel, &dialer.tracker, &dialer.runtime, dialer.cancel.child_token());
                    self.last_try.remove(&id);
                    self.conns.insert(id, Worker { address: p.address, slots, conn });
                }
                Err(error) => {
                    let waited_ms = p.started.elapsed().as_millis();
                    tracing::warn!(worker_id = %id, %error, waited_ms, "expert_worker_unreachable");
                    self.last_try.insert(id, Instant::now());
                }
            }
        }
        self.incomplete = wanted.iter().any(|m| !self.conns.contains_key(&m.id));
        self.rebuild(spec);
    }

    /// Swaps in the table of `spec` (or of the connected workers' slots without one).
    fn rebuild(&mut self, spec: Option<Arc<PlacementSpec>>) {
        let from = self.placement.as_ref().map(|s| s.version.0);
        match &spec {
            Some(spec) => {
                if self.placement.as_ref().is_some_and(|old| Arc::ptr_eq(old, spec)) {
                    return;
                }
                let replicas = spec.replicas().into_iter().map(|(k, hosts)| ((k.layer, k.expert), hosts));
                self.table = Arc::new(SlotTable::from_replicas(replicas));
                tracing::info!(from, to = spec.version.0, workers = spec.workers.len(), reason = %spec.reason, "placement_switched");
            }
            None => {
                self.table = Arc::new(SlotTable::new(self.conns.iter().map(|(id, w)| (id, &w.slots[..]))));
                if from.is_some() {
                    tracing::info!(from, "placement_switched_to_discovery");
                }
            }
        }
        self.placement = spec;
    }

    /// Splits `pieces` of `inputs` over the current table (one snapshot), skipping workers
    /// that are not connected or failed within `down_period` while another host exists.
    /// Returns the parts with their connections, and the pieces no worker hosts.
    pub fn plan(
        &self,
        layer: usize,
        hidden: usize,
        pieces: &[Piece],
        inputs: &[f32],
        turn: &AtomicUsize,
        down_period: Duration,
    ) -> (Vec<Planned>, Vec<Piece>) {
        let table = Arc::clone(&self.table);
        let usable = |w: &WorkerId| {
            self.conns.get(w).is_some_and(|c| !c.conn.is_closed())
                && self.failed.get(w).is_none_or(|t| t.elapsed() >= down_period)
        };
        let split = plan::split(pieces, inputs, hidden, |e| table.hosts(layer, e), usable, turn);
        let parts = split
            .parts
            .into_iter()
            .map(|p| {
                let conn = self.conns.get(&p.worker).filter(|w| !w.conn.is_closed()).map(|w| w.conn.clone());
                (p, conn)
            })
            .collect();
        (parts, split.unhosted)
    }

    /// Records that `worker` failed a call. A worker that answered with an error keeps its
    /// stream (without placement its slots are asked again); otherwise it is forgotten until
    /// a later refresh reconnects it. Either way the next attempt refreshes first when the
    /// error suggests the table is stale.
    pub fn mark_failed(&mut self, worker: &WorkerId, error: &CallError) {
        self.failed.insert(worker.clone(), Instant::now());
        if error.is_remote() {
            self.forced = true;
            if self.placement.is_none() {
                self.conns.remove(worker);
            }
        } else {
            self.conns.remove(worker);
            self.incomplete = true;
        }
    }

    /// Some groups have no host: look again before the next attempt.
    pub fn force_refresh(&mut self) {
        self.forced = true;
    }
}

/// Opens a channel to `address` and asks its slots (which also proves it answers).
async fn probe(address: String, timeout: Duration) -> Probed {
    let channel = cluster_core::serve::channel(&address, timeout).map_err(|e| CallError::Transport(e.to_string()))?;
    let slots = tokio::time::timeout(timeout, wire::get_slots(channel.clone()))
        .await
        .map_err(|_| CallError::Transport("GetSlots timed out".into()))??;
    Ok((slots, channel))
}
