//! A read-only view of the live placement and load, as `expertmesh placement` prints it.

use std::collections::BTreeMap;

use cluster_core::experts::{CurrentPlacement, DesiredWorkers, LoadReport, PlacementSpec};
use cluster_core::keys::{self, PlacementKey};
use cluster_core::store::decode_json;
use cluster_core::{ClusterName, Role, Store, StoreError, WorkerId};
use serde::Serialize;

/// One expert worker as the placement and its load report see it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub id: WorkerId,
    pub live: bool,
    /// Whether it marked the current version ready.
    pub ready: bool,
    /// Slots (per MoE layer) the current placement gives it.
    pub slots_per_layer: usize,
    /// Measured tokens/s over its report window, and tokens since it started.
    pub tokens_per_s: Option<f64>,
    pub total_tokens: Option<u64>,
    pub placement_version: Option<u64>,
}

/// What `expertmesh placement` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementView {
    pub cluster: String,
    pub leader: Option<String>,
    pub version: Option<u64>,
    pub reason: Option<String>,
    pub ratio_before: Option<f64>,
    pub ratio_after: Option<f64>,
    /// Per MoE layer (model layer index): replicas of each logical expert.
    pub logcnt: BTreeMap<usize, Vec<usize>>,
    /// Per MoE layer: physical slot -> logical expert.
    pub phy2log: BTreeMap<usize, Vec<u32>>,
    pub workers: Vec<WorkerView>,
    /// Max over mean of the measured per-worker rates (live workers with a report).
    pub measured_max_mean_ratio: Option<f64>,
    pub desired: Option<DesiredWorkers>,
}

/// Reads everything the view needs from the store.
pub async fn snapshot(store: &dyn Store, cluster: &ClusterName) -> Result<PlacementView, StoreError> {
    let leader =
        store.get(&keys::controller_leader_key(cluster)).await?.map(|v| String::from_utf8_lossy(&v).into_owned());
    let live: Vec<WorkerId> = store
        .get_prefix(&keys::role_prefix(cluster, Role::Expert))
        .await?
        .iter()
        .filter_map(|kv| keys::parse_worker_key(cluster, &kv.key).ok().map(|(_, w)| w))
        .collect();
    let mut current = None;
    let mut specs = BTreeMap::new();
    let mut ready: BTreeMap<u64, Vec<WorkerId>> = BTreeMap::new();
    for kv in store.get_prefix(&keys::placement_prefix(cluster)).await? {
        match keys::parse_placement_key(cluster, &kv.key) {
            Some(PlacementKey::Current) => {
                current = Some(decode_json::<CurrentPlacement>(&kv.key, &kv.value)?.version.0)
            }
            Some(PlacementKey::Spec(v)) => {
                let spec = decode_json::<PlacementSpec>(&kv.key, &kv.value)?;
                spec.validate().map_err(|e| StoreError::Corrupt { key: kv.key.clone(), reason: e.to_string() })?;
                specs.insert(v.0, spec);
            }
            Some(PlacementKey::Ready(v, w)) => ready.entry(v.0).or_default().push(w),
            None => {}
        }
    }
    let mut reports = BTreeMap::new();
    for kv in store.get_prefix(&keys::load_prefix(cluster)).await? {
        let r: LoadReport = decode_json(&kv.key, &kv.value)?;
        reports.insert(r.worker.clone(), r);
    }
    let desired = match store.get(&keys::desired_expert_workers_key(cluster)).await? {
        Some(v) => Some(decode_json(&keys::desired_expert_workers_key(cluster), &v)?),
        None => None,
    };
    let spec = current.and_then(|v| specs.get(&v));
    let ready_now = current.and_then(|v| ready.get(&v)).cloned().unwrap_or_default();
    let mut ids: Vec<WorkerId> = live.clone();
    if let Some(s) = spec {
        ids.extend(s.workers.iter().cloned());
    }
    ids.sort();
    ids.dedup();
    let workers: Vec<WorkerView> = ids
        .into_iter()
        .map(|id| {
            let report = reports.get(&id);
            WorkerView {
                live: live.contains(&id),
                ready: ready_now.contains(&id),
                slots_per_layer: spec.filter(|s| s.workers.contains(&id)).map_or(0, PlacementSpec::slots_per_worker),
                tokens_per_s: report.map(LoadReport::total_rate),
                total_tokens: report.map(|r| r.total_tokens),
                placement_version: report.and_then(|r| r.placement_version.map(|v| v.0)),
                id,
            }
        })
        .collect();
    let rates: Vec<f64> = workers.iter().filter(|w| w.live).filter_map(|w| w.tokens_per_s).collect();
    let logcnt = spec.map_or_else(BTreeMap::new, |s| s.layers.iter().copied().zip(s.replica_counts()).collect());
    Ok(PlacementView {
        cluster: cluster.to_string(),
        leader,
        version: current,
        reason: spec.map(|s| s.reason.clone()),
        ratio_before: spec.map(|s| s.ratio_before),
        ratio_after: spec.map(|s| s.ratio_after),
        logcnt,
        phy2log: spec.map_or_else(BTreeMap::new, |s| s.layers.iter().copied().zip(s.phy2log.iter().cloned()).collect()),
        workers,
        measured_max_mean_ratio: (!rates.is_empty()).then(|| crate::decide::ratio_of(&rates)),
        desired,
    })
}
