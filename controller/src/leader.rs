//! What the elected controller does: each tick it reads membership, load reports and the
//! placement from the store, publishes the autoscaling target, and carries out the
//! rebalance [`decide`](crate::decide) asks for as a two-phase switch:
//!
//! 1. put `/placement/<N>/spec`;
//! 2. wait until every worker it names has put `/placement/<N>/ready/<worker>` (abandoned
//!    on timeout, lost leadership, or a named worker leaving; the next tick plans anew);
//! 3. put `/placement/current` = N (attention workers switch to N on that watch event);
//! 4. delete versions older than N - 1.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::election::Leadership;
use cluster_core::follow::read_once;
use cluster_core::store::decode_json;
use cluster_core::{ClusterName, LeaseId, Membership, Role, Store, StoreError, WorkerId};
use placement::keys::{self, PlacementVersion};
use placement::{CurrentPlacement, DesiredWorkers, LoadReport, PlacementFold, PlacementSpec, unix_ms};
use tokio_util::sync::CancellationToken;

use crate::decide::{self, ModelShape, Observed, Policy, Rebalance};
use crate::telemetry;

/// How often the switch polls for ready marks.
const READY_POLL: Duration = Duration::from_millis(100);
/// The autoscaling key is rewritten at least this often even when unchanged.
const DESIRED_REFRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub check_period: Duration,
    pub ready_timeout: Duration,
}

/// The placement documents in the store.
#[derive(Debug, Default)]
struct PlacementState {
    current: Option<PlacementSpec>,
    /// Highest version with any key (spec or ready) in the store.
    highest: u64,
    versions: BTreeSet<u64>,
}

/// Why a switch did not complete.
#[derive(Debug, thiserror::Error)]
enum SwitchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("leadership lost")]
    Lost,
    #[error("worker {0} left before loading its slots")]
    WorkerLeft(WorkerId),
    #[error("workers {0:?} were not ready within {1:?}")]
    Timeout(Vec<WorkerId>, Duration),
}

#[derive(Debug)]
pub struct Leader {
    store: Arc<dyn Store>,
    cluster: ClusterName,
    membership: Membership,
    shape: ModelShape,
    policy: Policy,
    timing: Timing,
    last_desired: Option<(DesiredWorkers, Instant)>,
    /// The leadership lease writes are fenced with.
    fence: Option<LeaseId>,
    /// When this leader first saw a live worker while there was no placement (the first
    /// placement's settle time runs from it).
    unplaced_since: Option<Instant>,
}

impl Leader {
    pub fn new(
        store: Arc<dyn Store>,
        cluster: ClusterName,
        membership: Membership,
        shape: ModelShape,
        policy: Policy,
        timing: Timing,
    ) -> Self {
        Leader {
            store,
            cluster,
            membership,
            shape,
            policy,
            timing,
            last_desired: None,
            fence: None,
            unplaced_since: None,
        }
    }

    /// Leads until leadership is lost. Every write is fenced by the election key.
    pub async fn lead(&mut self, leadership: &Leadership) {
        self.fence = Some(leadership.lease());
        self.unplaced_since = None;
        let lost = &leadership.lost();
        let mut members = self.membership.subscribe();
        loop {
            if let Err(error) = self.tick(lost).await {
                tracing::warn!(%error, "controller_tick_failed");
            }
            tokio::select! {
                _ = lost.cancelled() => return,
                _ = tokio::time::sleep(self.timing.check_period) => {}
                changed = members.changed() => if changed.is_err() { return },
            }
        }
    }

    fn live_experts(&self) -> BTreeSet<WorkerId> {
        self.membership.by_role(Role::Expert).into_iter().map(|w| w.id).collect()
    }

    async fn tick(&mut self, lost: &CancellationToken) -> Result<(), StoreError> {
        let live = self.live_experts();
        let placement = self.read_placement().await?;
        let reports = self.read_reports(&live).await?;
        let load = decide::aggregate(&self.shape, &reports.values().collect::<Vec<_>>());
        let total: f64 = load.iter().flatten().sum();
        self.publish_desired(total, live.len()).await;
        telemetry::set_live(live.len(), total);
        if let Some(current) = &placement.current {
            telemetry::set_placement(current.version, decide::max_mean_ratio(&load, current));
        }
        let settling = if placement.current.is_none() && !live.is_empty() {
            self.unplaced_since.get_or_insert_with(Instant::now).elapsed()
        } else {
            self.unplaced_since = None;
            Duration::ZERO
        };
        let next = PlacementVersion(placement.highest + 1);
        // EPLB runs off the runtime (milliseconds at DeepSeek-V3 scale).
        let (shape, policy, current) = (self.shape.clone(), self.policy.clone(), placement.current.clone());
        let live_count = live.len();
        let decided = tokio::task::spawn_blocking(move || {
            let seen = Observed {
                live: &live,
                current: current.as_ref(),
                load: &load,
                // From the store, not this process: a newly elected leader keeps the schedule.
                since_last: current
                    .as_ref()
                    .map(|c| Duration::from_millis(unix_ms().saturating_sub(c.created_unix_ms))),
                settling,
            };
            decide::decide(&shape, &policy, &seen, next)
        })
        .await;
        let Ok(decided) = decided else {
            tracing::error!("controller_decision_task_failed");
            return Ok(());
        };
        let rebalance = match decided {
            Ok(Some(r)) => r,
            Ok(None) => {
                if placement.current.is_none() {
                    tracing::debug!(live = live_count, settling_ms = settling.as_millis() as u64, "placement_settling");
                }
                return Ok(());
            }
            Err(decide::PlanError::NoWorkers) => {
                tracing::debug!("controller_no_expert_workers");
                return Ok(());
            }
            Err(error) => {
                tracing::error!(%error, "controller_plan_failed");
                return Ok(());
            }
        };
        let measured: Vec<f64> = decide::measured_worker_rates(reports.values()).into_values().collect();
        self.switch(rebalance, &placement, decide::ratio_of(&measured), lost).await;
        Ok(())
    }

    async fn read_placement(&self) -> Result<PlacementState, StoreError> {
        let shape = self.shape.clone();
        // A current spec that is unreadable, inconsistent or of another model counts as no
        // placement: the next decision places anew (`initial`) at a higher version.
        let fold = PlacementFold::new(self.cluster.clone()).with_check(move |spec| {
            if spec.layers == shape.layers && spec.num_experts == shape.num_experts {
                return Ok(());
            }
            Err(format!(
                "placement of {} experts on layers {:?}; the model has {} on {:?}",
                spec.num_experts, spec.layers, shape.num_experts, shape.layers
            ))
        });
        let fold = read_once(self.store.as_ref(), &keys::placement_prefix(&self.cluster), fold).await?;
        if let (Some(version), None) = (fold.current(), fold.current_spec()) {
            tracing::error!(%version, "controller_bad_current_placement");
        }
        let versions: BTreeSet<u64> = fold.versions().into_iter().map(|v| v.0).collect();
        let highest = fold.current().map_or(0, |v| v.0).max(versions.last().copied().unwrap_or(0));
        Ok(PlacementState { current: fold.current_spec().map(|s| PlacementSpec::clone(s)), highest, versions })
    }

    /// Load reports of live workers (stale keys of dead workers vanish with their lease).
    async fn read_reports(&self, live: &BTreeSet<WorkerId>) -> Result<BTreeMap<WorkerId, LoadReport>, StoreError> {
        let mut reports = BTreeMap::new();
        for kv in self.store.get_prefix(&keys::load_prefix(&self.cluster)).await? {
            match decode_json::<LoadReport>(&kv.key, &kv.value) {
                Ok(r) if live.contains(&r.worker) => {
                    reports.insert(r.worker.clone(), r);
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "controller_bad_load_report"),
            }
        }
        Ok(reports)
    }

    async fn publish_desired(&mut self, tokens_per_s: f64, live: usize) {
        let desired = decide::desired_workers(&self.policy, tokens_per_s);
        telemetry::set_desired(desired);
        let doc = DesiredWorkers {
            desired,
            live: u32::try_from(live).unwrap_or(u32::MAX),
            tokens_per_s,
            updated_unix_ms: unix_ms(),
        };
        let unchanged = self
            .last_desired
            .as_ref()
            .is_some_and(|(d, at)| d.desired == doc.desired && d.live == doc.live && at.elapsed() < DESIRED_REFRESH);
        if unchanged {
            return;
        }
        let key = keys::desired_expert_workers_key(&self.cluster);
        match serde_json::to_vec(&doc) {
            Ok(value) => match self.put_as_leader(&key, value).await {
                Ok(()) => {
                    if self.last_desired.as_ref().is_none_or(|(d, _)| d.desired != desired) {
                        tracing::info!(desired, live, tokens_per_s, "expert_workers_desired");
                    }
                    self.last_desired = Some((doc, Instant::now()));
                }
                Err(error) => tracing::warn!(%error, "controller_publish_desired_failed"),
            },
            Err(error) => tracing::error!(%error, "controller_encode_failed"),
        }
    }

    /// The two-phase switch to `rebalance.spec`; logs the outcome either way.
    async fn switch(
        &mut self,
        rebalance: Rebalance,
        placement: &PlacementState,
        measured_before: f64,
        lost: &CancellationToken,
    ) {
        let started = Instant::now();
        let spec = rebalance.spec;
        let version = spec.version;
        let reason = rebalance.reason.as_str();
        let replicas = spec.replica_counts().into_iter().next().unwrap_or_default();
        let loads = crate::assign::slots_to_load(&spec, placement.current.as_ref());
        tracing::info!(version = version.0, reason, workers = spec.workers.len(), slots_per_worker = spec.slots_per_worker(), expert_loads = loads,
            ratio_before = spec.ratio_before, ratio_after = spec.ratio_after, measured_ratio_before = measured_before,
            first_layer_replicas = ?replicas, "rebalance_started");
        match self.two_phase(&spec, lost).await {
            Ok(()) => {
                let took = started.elapsed();
                telemetry::rebalanced(reason, took);
                tracing::info!(
                    version = version.0,
                    reason,
                    ratio_before = spec.ratio_before,
                    ratio_after = spec.ratio_after,
                    measured_ratio_before = measured_before,
                    duration_ms = took.as_millis() as u64,
                    "rebalance_done"
                );
                self.collect_garbage(placement, version).await;
            }
            // The spec stays (so its version is never reused for other contents); the next
            // placement supersedes it and garbage collection removes it later.
            Err(error) => tracing::warn!(version = version.0, reason, %error, "rebalance_abandoned"),
        }
    }

    async fn two_phase(&self, spec: &PlacementSpec, lost: &CancellationToken) -> Result<(), SwitchError> {
        let key = keys::placement_spec_key(&self.cluster, spec.version);
        let value =
            serde_json::to_vec(spec).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
        self.put_as_leader(&key, value).await?;
        let ready_prefix = keys::placement_ready_prefix(&self.cluster, spec.version);
        let deadline = Instant::now() + self.timing.ready_timeout;
        loop {
            if lost.is_cancelled() {
                return Err(SwitchError::Lost);
            }
            let live = self.live_experts();
            if let Some(gone) = spec.workers.iter().find(|w| !live.contains(*w)) {
                return Err(SwitchError::WorkerLeft(gone.clone()));
            }
            let marks = read_once(self.store.as_ref(), &ready_prefix, PlacementFold::new(self.cluster.clone())).await?;
            let ready: BTreeSet<&WorkerId> = marks.ready(spec.version).collect();
            let waiting: Vec<WorkerId> = spec.workers.iter().filter(|w| !ready.contains(w)).cloned().collect();
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(SwitchError::Timeout(waiting, self.timing.ready_timeout));
            }
            tokio::select! {
                _ = lost.cancelled() => return Err(SwitchError::Lost),
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
        if lost.is_cancelled() {
            return Err(SwitchError::Lost);
        }
        let current = serde_json::to_vec(&CurrentPlacement { version: spec.version })
            .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
        self.put_as_leader(&keys::placement_current_key(&self.cluster), current).await
    }

    /// Puts `key` only while this process holds the election key.
    async fn put_as_leader(&self, key: &str, value: Vec<u8>) -> Result<(), SwitchError> {
        let lease = self.fence.ok_or(SwitchError::Lost)?;
        let guard = cluster_core::keys::controller_leader_key(&self.cluster);
        match self.store.put_fenced(key, value, &guard, lease).await? {
            true => Ok(()),
            false => Err(SwitchError::Lost),
        }
    }

    /// Deletes every version older than `current - 1` (the previous one stays for workers
    /// still draining it).
    async fn collect_garbage(&self, placement: &PlacementState, current: PlacementVersion) {
        for &v in placement.versions.iter().filter(|&&v| v + 1 < current.0) {
            self.delete_version(PlacementVersion(v)).await;
        }
    }

    async fn delete_version(&self, version: PlacementVersion) {
        let prefix = keys::placement_version_prefix(&self.cluster, version);
        match self.store.get_prefix(&prefix).await {
            Ok(kvs) => {
                for kv in kvs {
                    if let Err(error) = self.store.delete(&kv.key).await {
                        tracing::warn!(key = %kv.key, %error, "controller_delete_failed");
                    }
                }
            }
            Err(error) => tracing::warn!(%prefix, %error, "controller_delete_failed"),
        }
    }
}
