//! `spec-bench`: speculative decoding with the checkpoint's MTP layer, measured against the
//! same engine without it in the same run.
//!
//! Default mode: greedy decode of real text (a code file and a prose file, each cut into
//! prompts) at each batch size and number of speculative tokens; prints decode tokens/s,
//! the ratio to `--speculative-tokens 0`, the acceptance rate and the mean accepted length.
//!
//! `--verify-cost`: on any checkpoint with an MTP layer (random weights do: nothing is
//! accepted there, so only costs are measured), the time of one decode step that verifies
//! 1, 2, 4 ... tokens per sequence, and of one MTP draft, each relative to a plain step;
//! from these and an acceptance rate the speed-up is projected (docs/BENCHMARKS.md shows
//! the arithmetic).

/// As in engine-bench: mimalloc keeps the large per-step buffers instead of unmapping them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, bail};
use clap::Parser;
use model::args::ModelArgs;
use model::{
    CacheLayout, Engine, EngineOptions, ExpertBackend, LatentCache, LoadOptions, LogitsWanted, Model, SamplingParams,
    Segment, SeqId, load_model,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Speculative decoding benchmark (MTP drafts against plain decoding)")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Python source to cut into code prompts.
    #[arg(long, default_value = "tools/train_default_model.py")]
    code: PathBuf,
    /// Text to cut into prose prompts.
    #[arg(long, default_value = "docs/DEFAULT_MODEL.md")]
    prose: PathBuf,
    #[arg(long, default_value_t = 48)]
    prompt_len: usize,
    /// Tokens generated per sequence (greedy, no stop token).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Speculative tokens to compare (0, the baseline, is always run first).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    speculative: Vec<usize>,
    /// Timed repetitions; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Measure the cost of verifying several tokens per sequence and of a draft instead.
    #[arg(long)]
    verify_cost: bool,
    /// With --verify-cost: tokens verified per sequence, relative to the first.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    verify: Vec<usize>,
    /// With --verify-cost: timed steps per figure (the median is reported).
    #[arg(long, default_value_t = 16)]
    steps: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = model::default_model::resolve_dir(args.model.dir.clone())?;
    let t = Instant::now();
    let loaded =
        load_model(&dir, LoadOptions { weight_dtype: args.model.weight_dtype(), local_experts: true }, &|_| {})
            .with_context(|| format!("loading {}", dir.display()))?;
    println!(
        "model: {} (load {:.1} s); threads: {}",
        dir.display(),
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    let precision = args.model.precision();
    let mut m = loaded.model;
    m.set_precision(precision);
    if !m.has_mtp() {
        bail!("{} has no MTP layer (num_nextn_predict_layers): nothing to speculate with", dir.display());
    }
    let model = Arc::new(m);
    let experts: Arc<dyn ExpertBackend> =
        Arc::new(loaded.experts.context("local experts were requested")?.with_precision(precision));
    if args.verify_cost {
        return verify_cost(&args, &model, experts.as_ref());
    }
    let tok = loaded.tokenizer.with_context(|| format!("{} has no tokenizer.json", dir.display()))?;
    let mut rows = Vec::new();
    for (kind, path) in [("code", &args.code), ("prose", &args.prose)] {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let ids = tok.encode_raw(&text)?;
        // BOS (when the model has one) then a window of the text.
        let bos = tok.encode("")?;
        let max_batch = args.batches.iter().copied().max().unwrap_or(1);
        if ids.len() < 2 * args.prompt_len {
            bail!("{}: {} tokens are too few for prompts of {}", path.display(), ids.len(), args.prompt_len);
        }
        // Windows spread evenly over the text.
        let span = ids.len() - args.prompt_len;
        let prompts: Vec<Vec<u32>> = (0..max_batch)
            .map(|i| {
                let at = i * span / max_batch;
                bos.iter().chain(&ids[at..at + args.prompt_len]).copied().collect()
            })
            .collect();
        for &b in &args.batches {
            let mut base = None;
            for k in std::iter::once(0).chain(args.speculative.iter().copied().filter(|&k| k > 0)) {
                let r = run(&args, &model, &experts, &prompts[..b], k)?;
                let ratio = base.map_or(1.0, |b: f64| r.tokens_per_s / b);
                base.get_or_insert(r.tokens_per_s);
                let accept = if r.drafted > 0 {
                    format!(
                        "acceptance {:.1}% ({} of {}), mean accepted length {:.2}",
                        100.0 * r.accepted as f64 / r.drafted as f64,
                        r.accepted,
                        r.drafted,
                        1.0 + r.accepted as f64 / r.draft_steps as f64
                    )
                } else {
                    "no drafts".into()
                };
                println!(
                    "{kind:<5} batch {b:>2} speculative {k}: {:>8.1} tokens/s ({ratio:.2}x), {accept}",
                    r.tokens_per_s
                );
                rows.push(serde_json::json!({
                    "text": kind, "batch": b, "speculative_tokens": k, "tokens_per_s": r.tokens_per_s,
                    "ratio": ratio, "drafted": r.drafted, "accepted": r.accepted, "draft_steps": r.draft_steps,
                }));
            }
        }
    }
    println!("{}", serde_json::json!({ "runs": rows }));
    Ok(())
}

struct Run {
    tokens_per_s: f64,
    drafted: usize,
    accepted: usize,
    draft_steps: usize,
}

/// Greedy decode of every prompt in one batch with `k` speculative tokens, the fastest of
/// `--repeats` (prefill untimed); every run must give the same tokens.
fn run(
    args: &Args,
    model: &Arc<Model>,
    experts: &Arc<dyn ExpertBackend>,
    prompts: &[Vec<u32>],
    k: usize,
) -> anyhow::Result<Run> {
    let cache_tokens = prompts.len() * (args.prompt_len + args.new_tokens + 16);
    let opts = EngineOptions { cache_tokens, block_size: 16, speculative_tokens: k, ..EngineOptions::default() };
    let mut engine = Engine::new(model.clone(), experts.clone(), opts)?;
    let params = SamplingParams {
        max_new_tokens: args.new_tokens,
        stop_token_ids: vec![model.config.vocab_size as u32],
        ..SamplingParams::default()
    };
    let mut best: Option<Run> = None;
    for _ in 0..args.repeats.max(1) {
        let ids: Vec<SeqId> = (0..prompts.len() as u64).map(SeqId).collect();
        for (id, p) in ids.iter().zip(prompts) {
            engine.add_sequence(*id, p.clone(), params.clone(), 0)?;
        }
        for out in engine.prefill(&ids)? {
            out?;
        }
        let (mut drafted, mut accepted, mut draft_steps, mut tokens) = (0, 0, 0, 0);
        let mut running = ids.clone();
        let t = Instant::now();
        while !running.is_empty() {
            let mut next = Vec::new();
            for out in engine.decode_step(&running)? {
                let out = out?;
                drafted += out.draft_tokens;
                accepted += out.accepted_tokens;
                draft_steps += usize::from(out.draft_tokens > 0);
                tokens += out.tokens.len();
                if out.finish.is_none() {
                    next.push(out.seq);
                }
            }
            running = next;
        }
        let tokens_per_s = tokens as f64 / t.elapsed().as_secs_f64();
        for id in ids {
            engine.release(id)?;
        }
        if best.as_ref().is_none_or(|b| tokens_per_s > b.tokens_per_s) {
            best = Some(Run { tokens_per_s, drafted, accepted, draft_steps });
        }
    }
    Ok(best.expect("at least one repeat"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median time of `f` over `steps` calls, after one warm-up call.
fn time(steps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut secs: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut secs)
}

/// Per batch size: a forward over `m` tokens per sequence (the verification of `m - 1`
/// drafts) and one MTP draft (the MTP layer over one token, then its head), against a plain
/// one-token step, at the same positions.
fn verify_cost(args: &Args, model: &Model, experts: &dyn ExpertBackend) -> anyhow::Result<()> {
    let c = &model.config;
    let max_m = args.verify.iter().copied().max().unwrap_or(1);
    let context = args.prompt_len;
    let mut rows = Vec::new();
    for &b in &args.batches {
        let layout = CacheLayout {
            num_layers: c.num_hidden_layers + 1,
            latent_dim: c.latent_dim(),
            block_size: 16,
            num_blocks: b * (context + max_m + 16).div_ceil(16),
        };
        let mut cache = LatentCache::new(layout)?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|_| cache.allocate(layout.blocks_for(context + max_m)).context("blocks"))
            .collect::<Result<_, _>>()?;
        let tokens: Vec<Vec<u32>> = (0..b)
            .map(|s| (0..context + max_m).map(|i| ((i * 7919 + s * 104_729 + 13) % c.vocab_size) as u32).collect())
            .collect();
        // The context every timed step attends over.
        let fill: Vec<Segment<'_>> = (0..b)
            .map(|s| Segment {
                tokens: &tokens[s][..context],
                start_pos: 0,
                block_table: &tables[s],
                logits: LogitsWanted::None,
            })
            .collect();
        model.forward(&mut cache, &fill, experts, None)?;
        let step = |m: usize, cache: &mut LatentCache| {
            let segs: Vec<Segment<'_>> = (0..b)
                .map(|s| Segment {
                    tokens: &tokens[s][context..context + m],
                    start_pos: context,
                    block_table: &tables[s],
                    logits: LogitsWanted::All,
                })
                .collect();
            model.forward(cache, &segs, experts, None).expect("forward");
        };
        let mut verify = Vec::new();
        for &m in &args.verify {
            verify.push((m, time(args.steps, || step(m, &mut cache))));
        }
        let h = c.hidden_size;
        let prev = vec![0.5f32; b * h];
        let draft = time(args.steps, || {
            let segs: Vec<Segment<'_>> = (0..b)
                .map(|s| Segment {
                    tokens: &tokens[s][context..context + 1],
                    start_pos: context,
                    block_table: &tables[s],
                    logits: LogitsWanted::Last,
                })
                .collect();
            let rows = model.mtp_forward(&mut cache, &segs, &prev, experts, None).expect("mtp");
            let all: Vec<f32> = rows.concat();
            std::hint::black_box(model.mtp_logits(&all, b));
        });
        let one = verify[0].1;
        for &(m, secs) in &verify {
            println!(
                "batch {b:>2}: verify {m} tokens/sequence: {:>8.2} ms ({:.2}x of {} token)",
                secs * 1e3,
                secs / one,
                verify[0].0
            );
        }
        println!(
            "batch {b:>2}: one MTP draft:               {:>8.2} ms ({:.2}x of a {}-token step)",
            draft * 1e3,
            draft / one,
            verify[0].0
        );
        rows.push(serde_json::json!({
            "batch": b, "context": context,
            "verify_ms": verify.iter().map(|(m, s)| serde_json::json!({"tokens": m, "ms": s * 1e3, "relative": s / one})).collect::<Vec<_>>(),
            "draft_ms": draft * 1e3, "draft_relative": draft / one,
        }));
    }
    println!("{}", serde_json::json!({ "verify_cost": rows }));
    Ok(())
}
