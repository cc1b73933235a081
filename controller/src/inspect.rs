//! A read-only view of the live placement and load, as `expertmesh placement` prints it.

use std::collections::BTreeMap;

use cluster_core::follow::read_once;
use cluster_core::keys;
use cluster_core::store::decode_json;
use cluster_core::{ClusterName, Role, Store, StoreError, WorkerId};
use placement::{DesiredWorkers, LoadReport, PlacementFold, PlacementSpec};
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
    let placement =
        read_once(store, &placement::keys::placement_prefix(cluster), PlacementFold::new(cluster.clone())).await?;
    if let Some((key, reason)) = placement.rejected().next() {
        return Err(StoreError::Corrupt { key: key.to_owned(), reason: reason.to_owned() });
    }
    let mut reports = BTreeMap::new();
    for kv in store.get_prefix(&placement::keys::load_prefix(cluster)).await? {
        let r: LoadReport = decode_json(&kv.key, &kv.value)?;
        reports.insert(r.worker.clone(), r);
    }
    let desired_key = placement::keys::desired_expert_workers_key(cluster);
    let desired = match store.get(&desired_key).await? {
        Some(v) => Some(decode_json(&desired_key, &v)?),
        None => None,
    };
    let current = placement.current();
    let spec = placement.current_spec().map(|s| s.as_ref());
    let ready_now: Vec<&WorkerId> = current.map(|v| placement.ready(v).collect()).unwrap_or_default();
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
                ready: ready_now.contains(&&id),
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
        version: current.map(|v| v.0),
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
