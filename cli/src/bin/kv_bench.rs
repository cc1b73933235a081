//! `kv-bench`: the latent-KV transfer between a prefill and a decode worker on loopback.
//!
//! Starts one decode worker and one prefill worker in this process (real gRPC servers on
//! 127.0.0.1, in-memory store), then:
//! 1. prefills prompts of several lengths through the prefill worker, which streams each
//!    layer's cache to the decode worker, and prints the bytes shipped per token next to
//!    `(kv_lora_rank + qk_rope_head_dim) x layers x 4` (the cache is f32);
//! 2. pushes synthetic caches straight into the decode worker's `PushKv` (through the prefill
//!    worker's client, cut by the model's KV codec) and prints GB/s;
//! 3. times the codec alone (chunking and reassembly, no network).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use cluster_core::node::NodeArgs;
use cluster_core::{MemoryStore, StoreConfig};
use model::kv::{KvCommit, KvPart, KvShape, LayerRows, Reassembly, VALUE_BYTES, chunk_layer};
use proto::internal as pb;
use proto::internal::decode_client::DecodeClient;
use proto::internal::prefill_client::PrefillClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Checkpoint directory; default: the embedded default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths prefilled through the prefill worker.
    #[arg(long, value_delimiter = ',', default_value = "16,128,512")]
    prompt_lens: Vec<usize>,
    /// Tokens per synthetic push.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    push_tokens: Vec<usize>,
    /// Timed repetitions of each synthetic push (the median is printed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

fn node(id: &str) -> NodeArgs {
    NodeArgs {
        cluster: "bench".into(),
        listen: "127.0.0.1:0".into(),
        advertise: None,
        worker_id: Some(id.into()),
        lease_ttl_ms: 5000,
    }
}

/// Chunks of the synthetic pushes, as the prefill worker's default `--kv-chunk-bytes`.
const CHUNK_BYTES: usize = 1 << 20;

/// A whole push of `shape` with made-up (finite) rows, for request `request_id`.
fn synthetic_push(request_id: u64, shape: KvShape) -> anyhow::Result<Vec<KvPart>> {
    let values: Vec<f32> = (0..shape.num_tokens * shape.latent_dim).map(|i| (i % 251) as f32 / 256.0).collect();
    let mut parts = vec![KvPart::Header { request_id, shape }];
    for layer in 0..shape.num_layers {
        let rows = LayerRows::new(layer, shape.latent_dim, values.clone())?;
        parts.extend(chunk_layer(&rows, CHUNK_BYTES).map(KvPart::Layer));
    }
    let tokens = (0..=shape.num_tokens).map(|i| (i % 100) as u32).collect();
    parts.push(KvPart::Commit(KvCommit {
        tokens,
        prompt_len: shape.num_tokens,
        prompt_logits_top: Vec::new(),
        mtp_hidden: Vec::new(),
    }));
    Ok(parts)
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
}

fn sampling(max_new: u32) -> pb::Sampling {
    pb::Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 1, max_new_tokens: max_new, stop_token_ids: vec![] }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = model::default_model::resolve_dir(args.model.clone())?;
    let config = model::ModelConfig::from_dir(&dir)?;
    let (latent, layers) = (config.latent_dim(), config.num_hidden_layers);
    let cache_tokens = 4 * args.push_tokens.iter().chain(&args.prompt_lens).max().copied().unwrap_or(1024) + 64;
    let store = StoreConfig::Memory(MemoryStore::new());
    let shutdown = CancellationToken::new();
    let (dtx, drx) = oneshot::channel();
    let engine = model::args::EngineArgs {
        model: model::args::ModelArgs {
            dir: Some(dir.clone()),
            dtype: model::args::DtypeArg::Auto,
            precision: model::args::PrecisionArg::Exact,
        },
        device: kernels::Device::Cpu,
        cache_tokens,
        block_size: 16,
        speculation: model::args::SpeculationArgs { speculative_tokens: 0 },
    };
    let decode_config = decode_worker::DecodeConfig {
        node: node("decode-0"),
        engine: engine.clone(),
        max_batch: 64,
        drain_timeout_ms: 1000,
        stall_timeout_ms: 30_000,
        remote_experts: false,
    };
    let decode = tokio::spawn(decode_worker::run(decode_config, store.clone(), shutdown.clone(), dtx));
    let (ptx, prx) = oneshot::channel();
    let prefill_config = prefill_worker::PrefillConfig {
        node: node("prefill-0"),
        engine,
        max_batch_tokens: 8192,
        queue_capacity: 16,
        kv_chunk_bytes: 1024 * 1024,
        transfer_retries: 0,
        remote_experts: false,
    };
    let prefill = tokio::spawn(prefill_worker::run(prefill_config, store, shutdown.clone(), ptx));
    let d_addr = drx.await.context("decode worker failed to start")?.addr;
    let p_addr = prx.await.context("prefill worker failed to start")?.addr;
    let channel = |a: std::net::SocketAddr| cluster_core::serve::channel(&a.to_string(), Duration::from_secs(5));
    let mut dec = DecodeClient::new(channel(d_addr)?);
    let mut pre = PrefillClient::new(channel(p_addr)?);
    let formula = latent * layers * VALUE_BYTES;
    println!("model {} : {layers} layers x latent {latent} (kv_lora_rank + qk_rope_head_dim), f32 rows", dir.display());
    println!("expected bytes/token = {latent} x {layers} x 4 = {formula}");
    println!("\n== prefill worker -> decode worker (real prefill, layer-by-layer streaming)");
    println!(
        "{:>8} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "prompt", "kv_bytes", "bytes/tok", "compute_s", "tail_s", "total_s"
    );
    let mut id = 1u64;
    for &n in &args.prompt_lens {
        id += 1;
        let prompt: Vec<u32> = (0..n).map(|i| (i * 7 % (config.vocab_size - 10)) as u32).collect();
        let admit = pb::AdmitRequest {
            request_id: id,
            prompt_tokens: n as u32,
            sampling: Some(sampling(2)),
            local_prefill_prompt_ids: vec![],
            prompt_logits_top: 0,
        };
        let events = dec.admit(admit).await?.into_inner();
        let t = Instant::now();
        let r = pre
            .prefill(pb::PrefillRequest {
                request_id: id,
                prompt_ids: prompt,
                sampling: Some(sampling(2)),
                prompt_logits_top: 0,
                decode_addr: d_addr.to_string(),
            })
            .await?
            .into_inner();
        let total = t.elapsed().as_secs_f64();
        drop(events);
        println!(
            "{n:>8} {:>12} {:>12} {:>10.4} {:>10.4} {total:>10.4}{}",
            r.kv_bytes,
            r.kv_bytes / n as u64,
            r.compute_s,
            r.transfer_s,
            if r.kv_bytes as usize == n * formula { "" } else { "  MISMATCH" }
        );
    }
    println!("\n== synthetic PushKv into the decode worker (1 MiB chunks, the prefill worker's client)");
    println!("{:>8} {:>12} {:>12} {:>10}", "tokens", "bytes", "median_ms", "GB/s");
    let clients = prefill_worker::DecodeClients::new(Duration::from_secs(5));
    let sink = clients.get(&d_addr.to_string())?;
    for &n in &args.push_tokens {
        let shape = KvShape { num_tokens: n, latent_dim: latent, num_layers: layers };
        let mut times = Vec::new();
        for _ in 0..args.reps {
            id += 1;
            let admit = pb::AdmitRequest {
                request_id: id,
                prompt_tokens: n as u32,
                sampling: Some(sampling(2)),
                local_prefill_prompt_ids: vec![],
                prompt_logits_top: 0,
            };
            let events = dec.admit(admit).await?.into_inner();
            let parts = synthetic_push(id, shape)?;
            // Every part queued before the clock starts: the push alone is timed.
            let (tx, rx) = mpsc::channel(parts.len());
            for part in parts {
                tx.try_send(part).map_err(|_| anyhow::anyhow!("the channel holds every part"))?;
            }
            drop(tx);
            let t = Instant::now();
            let acked = sink.push(rx).await.map_err(|f| anyhow::anyhow!("PushKv failed: {f:?}"))?;
            times.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(acked == shape.total_bytes(), "decode worker received {acked} bytes");
            drop(events);
        }
        let median = median(times);
        let bytes = n * formula;
        println!("{n:>8} {bytes:>12} {:>12.2} {:>10.3}", median * 1e3, bytes as f64 / median / 1e9);
    }
    println!("\n== the codec alone: chunk and reassemble in this process (1 MiB chunks)");
    println!("{:>8} {:>12} {:>12} {:>10}", "tokens", "bytes", "median_ms", "GB/s");
    for &n in &args.push_tokens {
        let shape = KvShape { num_tokens: n, latent_dim: latent, num_layers: layers };
        let cache = model::CacheLayout { num_layers: layers, latent_dim: latent, block_size: 1, num_blocks: n };
        let mut times = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            let mut reassembly = Reassembly::new(cache);
            for part in synthetic_push(1, shape)? {
                reassembly.accept(part)?;
            }
            let bytes = reassembly.finish()?;
            times.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(bytes == shape.total_bytes(), "reassembled {bytes} bytes");
        }
        let median = median(times);
        let bytes = n * formula;
        println!("{n:>8} {bytes:>12} {:>12.2} {:>10.3}", median * 1e3, bytes as f64 / median / 1e9);
    }
    shutdown.cancel();
    decode.await??;
    prefill.await??;
    Ok(())
}
