//! `expertmesh eplb`: the placement the controller would choose for a load table, so an
//! operator can inspect a rebalance before it happens.

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct EplbArgs {
    /// JSON load table: an array of MoE layers, each an array of per-expert loads (tokens).
    #[arg(long)]
    load: PathBuf,
    /// Physical expert slots per layer (experts + redundant slots).
    #[arg(long)]
    replicas: usize,
    /// Routing groups of experts (config.json's n_group).
    #[arg(long)]
    groups: usize,
    /// Nodes the workers are spread over (hierarchical policy when groups divide over them).
    #[arg(long)]
    nodes: usize,
    /// Expert workers; each holds replicas / workers consecutive slots.
    #[arg(long)]
    workers: usize,
}

#[derive(Serialize)]
struct Out {
    policy: eplb::Policy,
    phy2log: Vec<Vec<usize>>,
    log2phy: Vec<Vec<Vec<i64>>>,
    logcnt: Vec<Vec<usize>>,
    /// `[layers][workers]`: load each worker would carry (an expert's load split evenly
    /// over its replicas).
    worker_load: Vec<Vec<f64>>,
    /// Per layer: max over mean worker load, after and with no redundancy (experts in
    /// order, `E / W` per worker; absent when the workers do not divide the experts).
    max_mean_ratio: Vec<f64>,
    max_mean_ratio_before: Option<Vec<f64>>,
}

pub fn run(args: EplbArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.load).with_context(|| format!("reading {}", args.load.display()))?;
    let load: Vec<Vec<f64>> = serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON array of layers, each an array of per-expert loads", args.load.display())
    })?;
    let placement = eplb::rebalance(&load, args.replicas, args.groups, args.nodes, args.workers)?;
    let worker_load = eplb::worker_loads(&load, &placement, args.workers);
    let max_mean_ratio = worker_load.iter().map(|l| eplb::max_mean_ratio(l)).collect();
    let experts = load[0].len();
    let max_mean_ratio_before = experts.is_multiple_of(args.workers).then(|| {
        let identity = eplb::Placement::identity(load.len(), experts);
        eplb::worker_loads(&load, &identity, args.workers).iter().map(|l| eplb::max_mean_ratio(l)).collect()
    });
    let out = Out {
        policy: eplb::Policy::for_topology(args.groups, args.nodes),
        phy2log: placement.phy2log,
        log2phy: placement.log2phy,
        logcnt: placement.logcnt,
        worker_load,
        max_mean_ratio,
        max_mean_ratio_before,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
