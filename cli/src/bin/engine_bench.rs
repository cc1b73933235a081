//! `engine-bench`: prefill and batched-decode throughput of the in-process engine on a
//! checkpoint, plus the machine's read bandwidth and the fraction of the batch-1
//! bandwidth limit reached. Prints one line per figure and a final JSON summary.
//!
//! With `--device cuda:N` the same figures come from the GPU engine, the batch-1 fraction is
//! taken against the GPU's nominal HBM bandwidth and prefill against its bf16 peak.
//!
//! On a shared machine the available bandwidth drifts, so for batch 1 each timed decode
//! step is paired with a bandwidth probe run right before it, and the fraction is the ratio
//! of the medians (weight bytes per step / step time vs probe bandwidth).

/// Forward passes allocate and free large activation buffers every step; mimalloc keeps
/// them instead of returning them to the kernel (glibc's munmap/page-fault churn cost ~20%).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use model::args::ModelArgs;
use model::{
    Engine, EngineError, EngineOptions, LoadOptions, ModelConfig, SamplingParams, SeqId, StepOutput, WeightDtype,
    load_model,
};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Engine throughput benchmark")]
struct Args {
    // `--model`, `--dtype`, `--precision`: the engine flags; the cache is sized to the
    // batches measured, not taken from `--cache-tokens`.
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Prompts prefilled together in the batched-prefill figure.
    #[arg(long, default_value_t = 8)]
    prefill_batch: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Do not pair batch-1 steps with bandwidth probes (the probe evicts the caches, which
    /// matters for models small enough to stay cached).
    #[arg(long)]
    no_step_probes: bool,
    /// Bytes read by the bandwidth probe.
    #[arg(long, default_value_t = 1 << 30)]
    bandwidth_bytes: usize,
    /// cpu, or cuda:N. On a GPU the batch-1 fraction is taken against --hbm-gb-s and the
    /// prefill rate against --peak-bf16-tflops (no probe: the GPU's figures are fixed).
    #[arg(long, default_value = "cpu")]
    device: kernels::Device,
    /// The GPU's memory bandwidth (H100 SXM: 3350; H200: 4800).
    #[arg(long, default_value_t = 3350.0)]
    hbm_gb_s: f64,
    /// The GPU's dense bf16 tensor-core peak (H100/H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_bf16_tflops: f64,
}

/// Weight bytes one decoded token reads: every non-expert weight, `top_k` routed experts
/// per MoE layer, the router, and the LM head (one embedding row is negligible).
fn active_bytes_per_token(c: &ModelConfig, weight_size: usize) -> f64 {
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let q = match c.q_lora_rank {
        None => h * heads * c.qk_head_dim(),
        Some(r) => h * r + r * heads * c.qk_head_dim(),
    };
    let attn = q
        + h * c.latent_dim()
        + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
        + heads * c.v_head_dim * h;
    let mlp = |inter: usize| 3 * h * inter;
    let mut params = 0usize;
    let mut router_bytes = 0usize;
    for l in 0..c.num_hidden_layers {
        params += attn;
        if c.is_moe_layer(l) {
            params += mlp(c.moe_intermediate_size) * (c.n_shared_experts + c.router.top_k);
            router_bytes += c.n_routed_experts * h * 4;
        } else {
            params += mlp(c.intermediate_size);
        }
    }
    params += c.vocab_size * h;
    (params * weight_size + router_bytes) as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Fails on the first sequence the step failed (a benchmark step must run every sequence).
fn all_ok(step: Vec<Result<StepOutput, EngineError>>) -> Result<(), EngineError> {
    step.into_iter().try_for_each(|r| r.map(drop))
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32).collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (weight_dtype, precision) = (args.model.weight_dtype(), args.model.precision());
    let dir = model::default_model::resolve_dir(args.model.dir.clone())?;
    args.device.check()?;
    let on_gpu = args.device != kernels::Device::Cpu;
    println!("device: {}; threads: {}", args.device, rayon::current_num_threads());
    let probe = || kernels::cpu::bandwidth::measure_read_bandwidth(args.bandwidth_bytes, 1);
    let mut bw = if on_gpu { args.hbm_gb_s } else { probe() };
    println!("read bandwidth ({}): {bw:.1} GB/s", if on_gpu { "GPU, as given" } else { "one pass" });
    let t = Instant::now();
    let loaded = load_model(&dir, LoadOptions { weight_dtype, local_experts: true }, &|_| {})?;
    println!("load: {:.1} s", t.elapsed().as_secs_f64());
    let mut m = loaded.model;
    m.set_precision(precision);
    let experts = loaded.experts.expect("local experts were requested").with_precision(precision);
    let model = Arc::new(m);
    let experts: Arc<dyn model::ExpertBackend> = Arc::new(experts);
    let c = model.config.clone();
    let weight_size = match weight_dtype {
        WeightDtype::F32 => 4,
        _ => 2,
    };
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let cache_tokens = (max_batch.max(args.prefill_batch) + 1) * (args.prompt_len + args.steps + 8);
    let opts = EngineOptions { cache_tokens, block_size: 16, device: args.device, ..EngineOptions::default() };
    let params = |n: usize| SamplingParams {
        max_new_tokens: n,
        stop_token_ids: vec![c.vocab_size as u32],
        ..Default::default()
    };

    // Prefill: one prompt, after a short warm-up.
    let mut engine = Engine::on_device(model.clone(), experts.clone(), opts)?;
    engine.add_sequence(SeqId(0), prompt(8, c.vocab_size, 0), params(2), 0)?;
    all_ok(engine.prefill(&[SeqId(0)])?)?;
    engine.release(SeqId(0))?;
    engine.add_sequence(SeqId(1), prompt(args.prompt_len, c.vocab_size, 1), params(2), 0)?;
    let t = Instant::now();
    all_ok(engine.prefill(&[SeqId(1)])?)?;
    let prefill_tps = args.prompt_len as f64 / t.elapsed().as_secs_f64();
    engine.release(SeqId(1))?;
    println!("prefill {} tokens: {prefill_tps:.1} tokens/s", args.prompt_len);
    let ids: Vec<SeqId> = (0..args.prefill_batch as u64).map(|i| SeqId(10 + i)).collect();
    for (i, id) in ids.iter().enumerate() {
        engine.add_sequence(*id, prompt(args.prompt_len, c.vocab_size, 50 + i), params(2), 0)?;
    }
    let t = Instant::now();
    all_ok(engine.prefill(&ids)?)?;
    let batched_prefill_tps = (ids.len() * args.prompt_len) as f64 / t.elapsed().as_secs_f64();
    for id in ids {
        engine.release(id)?;
    }
    println!(
        "prefill {} x {} tokens in one batch: {batched_prefill_tps:.1} tokens/s",
        args.prefill_batch, args.prompt_len
    );

    let bytes = active_bytes_per_token(&c, weight_size);
    // Two FLOPs per active weight per token (the attention's own FLOPs are not counted).
    let prefill_tflops = 2.0 * bytes / weight_size as f64 * batched_prefill_tps / 1e12;
    if on_gpu {
        println!(
            "prefill compute: {prefill_tflops:.1} TFLOP/s = {:.0}% of the {:.0} TFLOP/s bf16 peak",
            100.0 * prefill_tflops / args.peak_bf16_tflops,
            args.peak_bf16_tflops
        );
    }
    let mut decode = Vec::new();
    for &b in &args.batches {
        let ids: Vec<SeqId> = (0..b as u64).map(|i| SeqId(100 + i)).collect();
        for (i, id) in ids.iter().enumerate() {
            // Different lengths per sequence, like a real batch.
            let len = 16 + (i * 5) % 32;
            engine.add_sequence(*id, prompt(len, c.vocab_size, i + 2), params(args.steps + 2), 0)?;
        }
        all_ok(engine.prefill(&ids)?)?;
        all_ok(engine.decode_step(&ids)?)?; // warm-up
        let mut step_secs = Vec::with_capacity(args.steps);
        let mut probes = Vec::new();
        for _ in 0..args.steps {
            if b == 1 && !args.no_step_probes && !on_gpu {
                probes.push(probe());
            }
            let t = Instant::now();
            all_ok(engine.decode_step(&ids)?)?;
            step_secs.push(t.elapsed().as_secs_f64());
        }
        let secs: f64 = step_secs.iter().sum();
        let tps = (b * args.steps) as f64 / secs;
        let step_ms = secs * 1e3 / args.steps as f64;
        print!("decode batch {b}: {tps:.1} tokens/s ({step_ms:.1} ms/step)");
        if b == 1 && (on_gpu || !probes.is_empty()) {
            if !on_gpu {
                bw = median(&mut probes);
            }
            let achieved = bytes / median(&mut step_secs) / 1e9;
            let limit = bw * 1e9 / bytes;
            print!(
                ", {:.2} GB/token; median step reads {achieved:.1} GB/s vs probe median {bw:.1} GB/s: {:.0}% (limit {limit:.1} tokens/s)",
                bytes / 1e9,
                100.0 * achieved / bw
            );
        }
        println!();
        decode.push(serde_json::json!({"batch": b, "tokens_per_s": tps, "ms_per_step": step_ms}));
        for id in ids {
            engine.release(id)?;
        }
    }
    let summary = serde_json::json!({
        "device": args.device.to_string(), "dtype": format!("{:?}", args.model.dtype), "precision": format!("{:?}", args.model.precision),
        "prefill_tflops": prefill_tflops,
        "bandwidth_gb_s": bw, "active_gb_per_token": bytes / 1e9,
        "prefill_tokens_per_s": prefill_tps, "batched_prefill_tokens_per_s": batched_prefill_tps, "decode": decode,
    });
    println!("{summary}");
    Ok(())
}
