//! eplb-sim: how much EPLB evens out worker load on a DeepSeek-V3-shaped model, and how long
//! a rebalance takes. Loads are synthetic and seeded: every token picks `top_k` distinct
//! experts from a Zipf distribution over a per-layer random ranking of the experts.
//!
//! ```text
//! cargo run --release -p eplb --bin eplb-sim -- [--zipf 1.0] [--workers 32,144] [--json]
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use eplb::{Placement, Policy, balancedness, max_mean_ratio, model_balancedness, rebalance, worker_loads};
use serde::Serialize;

const USAGE: &str = "\
usage: eplb-sim [options]
  --zipf S            Zipf exponent of expert popularity (default 1.0)
  --layers N          MoE layers (default 58, DeepSeek-V3)
  --experts N         routed experts per layer (default 256)
  --groups N          expert groups (default 8)
  --top-k N           experts per token (default 8)
  --tokens N          tokens per layer in the load window (default 16384)
  --redundant N       redundant expert slots (default 32)
  --workers LIST      comma-separated worker (GPU) counts (default 32,144)
  --gpus-per-node N   workers per node (default 8)
  --runs N            timed rebalance runs, median reported (default 7)
  --seed N            load generator seed (default 0)
  --json              print JSON instead of a table";

/// The simulation's one config, from flags.
#[derive(Debug, Clone, Serialize)]
struct Config {
    zipf: f64,
    layers: usize,
    experts: usize,
    groups: usize,
    top_k: usize,
    tokens: usize,
    redundant: usize,
    workers: Vec<usize>,
    gpus_per_node: usize,
    runs: usize,
    seed: u64,
    json: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zipf: 1.0,
            layers: 58,
            experts: 256,
            groups: 8,
            top_k: 8,
            tokens: 16384,
            redundant: 32,
            workers: vec![32, 144],
            gpus_per_node: 8,
            runs: 7,
            seed: 0,
            json: false,
        }
    }
}

impl Config {
    fn from_args(args: impl Iterator<Item = String>) -> Result<Self, String> {
        fn value<T: std::str::FromStr>(flag: &str, raw: Option<String>) -> Result<T, String> {
            let raw = raw.ok_or_else(|| format!("{flag} needs a value"))?;
            raw.parse().map_err(|_| format!("{flag}: cannot parse {raw:?}"))
        }
        let mut config = Config::default();
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--zipf" => config.zipf = value(&flag, args.next())?,
                "--layers" => config.layers = value(&flag, args.next())?,
                "--experts" => config.experts = value(&flag, args.next())?,
                "--groups" => config.groups = value(&flag, args.next())?,
                "--top-k" => config.top_k = value(&flag, args.next())?,
                "--tokens" => config.tokens = value(&flag, args.next())?,
                "--redundant" => config.redundant = value(&flag, args.next())?,
                "--gpus-per-node" => config.gpus_per_node = value(&flag, args.next())?,
                "--runs" => config.runs = value(&flag, args.next())?,
                "--seed" => config.seed = value(&flag, args.next())?,
                "--workers" => {
                    let list: String = value(&flag, args.next())?;
                    config.workers = list
                        .split(',')
                        .map(|w| w.trim().parse().map_err(|_| format!("--workers: cannot parse {w:?}")))
                        .collect::<Result<_, _>>()?;
                }
                "--json" => config.json = true,
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown flag {other:?}\n{USAGE}")),
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.zipf.is_finite() && self.zipf >= 0.0) {
            return Err(format!("--zipf {} must be a finite number >= 0", self.zipf));
        }
        for (name, value) in [
            ("--layers", self.layers),
            ("--experts", self.experts),
            ("--tokens", self.tokens),
            ("--top-k", self.top_k),
            ("--runs", self.runs),
            ("--gpus-per-node", self.gpus_per_node),
        ] {
            if value == 0 {
                return Err(format!("{name} must be >= 1"));
            }
        }
        if self.top_k > self.experts {
            return Err(format!("--top-k {} must be <= --experts {}", self.top_k, self.experts));
        }
        if let Some(&w) = self.workers.iter().find(|&&w| w == 0 || !w.is_multiple_of(self.gpus_per_node)) {
            return Err(format!("--workers {w} must be a positive multiple of --gpus-per-node {}", self.gpus_per_node));
        }
        Ok(())
    }
}

/// SplitMix64: a tiny seeded generator, enough for synthetic loads.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)` (modulo bias negligible for n this small).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `[layers][experts]` routed-token counts: per layer a random ranking of the experts, then
/// each token picks `top_k` distinct experts, drawing ranks with P(rank r) proportional to
/// 1 / r^zipf and redrawing repeats (sampling without replacement, as top-k routing is).
fn zipf_loads(config: &Config) -> Vec<Vec<f64>> {
    let mut rng = SplitMix64(config.seed);
    let mut cdf: Vec<f64> = (1..=config.experts)
        .scan(0.0, |acc, rank| {
            *acc += (rank as f64).powf(-config.zipf);
            Some(*acc)
        })
        .collect();
    let total = *cdf.last().expect("experts >= 1");
    cdf.iter_mut().for_each(|c| *c /= total);

    let mut chosen: Vec<usize> = Vec::with_capacity(config.top_k);
    (0..config.layers)
        .map(|_| {
            let mut ranking: Vec<usize> = (0..config.experts).collect();
            for i in (1..ranking.len()).rev() {
                ranking.swap(i, rng.below(i + 1));
            }
            let mut counts = vec![0.0; config.experts];
            for _ in 0..config.tokens {
                chosen.clear();
                while chosen.len() < config.top_k {
                    let u = rng.unit();
                    let rank = cdf.partition_point(|&c| c <= u).min(config.experts - 1);
                    if !chosen.contains(&rank) {
                        chosen.push(rank);
                    }
                }
                for &rank in &chosen {
                    counts[ranking[rank]] += 1.0;
                }
            }
            counts
        })
        .collect()
}

/// The placement without redundancy: `E / W` consecutive experts per worker when `W` divides
/// `E`, otherwise expert `e` on worker `e % W` (round-robin, uneven expert counts).
fn static_loads(load: &[Vec<f64>], num_workers: usize) -> (Vec<Vec<f64>>, &'static str) {
    let num_experts = load[0].len();
    let contiguous = num_experts.is_multiple_of(num_workers);
    let per_worker = load
        .iter()
        .map(|layer| {
            let mut loads = vec![0.0; num_workers];
            for (expert, &w) in layer.iter().enumerate() {
                let worker = if contiguous { expert / (num_experts / num_workers) } else { expert % num_workers };
                loads[worker] += w;
            }
            loads
        })
        .collect();
    (per_worker, if contiguous { "contiguous" } else { "round-robin" })
}

/// How even one placement's worker loads are.
#[derive(Debug, Serialize)]
struct Balance {
    /// Sum over layers of mean worker load / sum over layers of max (ideal time / actual).
    model_balancedness: f64,
    /// Mean over layers of per-layer mean / max.
    mean_layer_balancedness: f64,
    /// Largest per-layer max / mean.
    worst_layer_max_mean: f64,
}

impl Balance {
    fn of(worker_loads: &[Vec<f64>]) -> Self {
        let layers = worker_loads.len() as f64;
        Balance {
            model_balancedness: model_balancedness(worker_loads),
            mean_layer_balancedness: worker_loads.iter().map(|l| balancedness(l)).sum::<f64>() / layers,
            worst_layer_max_mean: worker_loads.iter().map(|l| max_mean_ratio(l)).fold(0.0, f64::max),
        }
    }
}

#[derive(Debug, Serialize)]
struct Scenario {
    workers: usize,
    nodes: usize,
    slots: usize,
    slots_per_worker: usize,
    policy: Policy,
    before_layout: &'static str,
    before: Balance,
    after: Balance,
    rebalance_median_us: f64,
    rebalance_min_us: f64,
}

fn run_scenario(config: &Config, load: &[Vec<f64>], num_workers: usize) -> Result<Scenario, String> {
    let num_nodes = num_workers / config.gpus_per_node;
    let num_replicas = config.experts + config.redundant;
    let solve = || {
        rebalance(load, num_replicas, config.groups, num_nodes, num_workers)
            .map_err(|e| format!("{num_workers} workers: {e}"))
    };
    let placement: Placement = solve()?;
    let mut times: Vec<Duration> = Vec::with_capacity(config.runs);
    for _ in 0..config.runs {
        let start = Instant::now();
        let again = solve()?;
        times.push(start.elapsed());
        if again != placement {
            return Err("rebalance is not deterministic".to_string());
        }
    }
    times.sort_unstable();
    let (before, before_layout) = static_loads(load, num_workers);
    Ok(Scenario {
        workers: num_workers,
        nodes: num_nodes,
        slots: num_replicas,
        slots_per_worker: num_replicas / num_workers,
        policy: Policy::for_topology(config.groups, num_nodes),
        before_layout,
        before: Balance::of(&before),
        after: Balance::of(&worker_loads(load, &placement, num_workers)),
        rebalance_median_us: times[times.len() / 2].as_secs_f64() * 1e6,
        rebalance_min_us: times[0].as_secs_f64() * 1e6,
    })
}

fn print_table(config: &Config, load: &[Vec<f64>], scenarios: &[Scenario]) {
    let hottest_share =
        load.iter().map(|layer| layer.iter().copied().fold(0.0, f64::max) / layer.iter().sum::<f64>()).sum::<f64>()
            / load.len() as f64;
    println!(
        "eplb-sim: {} layers x {} experts ({} groups), top-{} x {} tokens/layer, zipf {}, seed {}",
        config.layers, config.experts, config.groups, config.top_k, config.tokens, config.zipf, config.seed
    );
    println!(
        "hottest expert: {:.2}% of a layer's routed tokens on average (uniform {:.2}%, top-{} cap {:.2}%)",
        100.0 * hottest_share,
        100.0 / config.experts as f64,
        config.top_k,
        100.0 / config.top_k as f64
    );
    println!("balancedness = mean/max worker load (1.0 is perfect); model = sum of means / sum of maxes");
    for s in scenarios {
        println!();
        println!(
            "{} workers, {} nodes, {} slots ({} per worker), {:?} policy",
            s.workers, s.nodes, s.slots, s.slots_per_worker, s.policy
        );
        for (label, b) in [
            (format!("before ({}, no redundancy)", s.before_layout), &s.before),
            ("after (eplb)".to_string(), &s.after),
        ] {
            println!(
                "  {label:<36} model {:.4}  mean layer {:.4}  worst layer max/mean {:.3}",
                b.model_balancedness, b.mean_layer_balancedness, b.worst_layer_max_mean
            );
        }
        println!(
            "  sum of per-layer max loads before/after {:.2}x; rebalance of all {} layers: median {:.2} ms, min {:.2} ms ({} runs)",
            s.after.model_balancedness / s.before.model_balancedness,
            config.layers,
            s.rebalance_median_us / 1e3,
            s.rebalance_min_us / 1e3,
            config.runs
        );
    }
}

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let load = zipf_loads(&config);
    let scenarios: Result<Vec<Scenario>, String> =
        config.workers.iter().map(|&w| run_scenario(&config, &load, w)).collect();
    let scenarios = match scenarios {
        Ok(s) => s,
        Err(message) => {
            eprintln!("eplb-sim: {message}");
            return ExitCode::FAILURE;
        }
    };
    if config.json {
        let report = serde_json::json!({ "config": config, "scenarios": scenarios });
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("eplb-sim: cannot encode report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print_table(&config, &load, &scenarios);
    }
    ExitCode::SUCCESS
}
