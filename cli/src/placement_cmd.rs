//! `expertmesh placement`: the live expert placement and load of a cluster, read from etcd.

use anyhow::Context;
use clap::Args;
use cluster_core::node::EtcdArgs;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct PlacementArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Cluster name (the key prefix `/expertmesh/<cluster>/`).
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    cluster: String,
    /// Print the whole view as JSON (placement per layer included).
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlacementArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let cluster = cluster_core::node::cluster_name(&args.cluster)?;
        let store = args.etcd.store_config().open(Duration::from_secs(5)).await.context("connecting to etcd")?;
        let view = controller::inspect::snapshot(store.as_ref(), &cluster).await.context("reading the placement")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            print_table(&view);
        }
        Ok(())
    })
}

fn print_table(view: &controller::inspect::PlacementView) {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    println!("cluster {}  leader {}", view.cluster, view.leader.as_deref().unwrap_or("(none)"));
    match view.version {
        Some(v) => println!(
            "placement version {v} ({}), predicted max/mean {} -> {}",
            view.reason.as_deref().unwrap_or("?"),
            opt(view.ratio_before),
            opt(view.ratio_after)
        ),
        None => println!("no placement yet"),
    }
    if let Some(d) = &view.desired {
        println!("expert workers: {} live, {} desired for {:.1} tokens/s", d.live, d.desired, d.tokens_per_s);
    }
    println!(
        "{:<24} {:>5} {:>5} {:>11} {:>12} {:>14}",
        "worker", "live", "ready", "slots/layer", "tokens/s", "tokens total"
    );
    for w in &view.workers {
        println!(
            "{:<24} {:>5} {:>5} {:>11} {:>12} {:>14}",
            w.id.as_str(),
            if w.live { "yes" } else { "no" },
            if w.ready { "yes" } else { "no" },
            w.slots_per_layer,
            opt(w.tokens_per_s),
            w.total_tokens.map_or("-".into(), |t| t.to_string())
        );
    }
    println!("measured max/mean over workers: {}", opt(view.measured_max_mean_ratio));
    for (layer, cnt) in &view.logcnt {
        println!("layer {layer}: replicas per expert {cnt:?}");
    }
}
