//! `kv-bench`: the latent-KV transfer between a prefill and a decode worker on loopback.
//!
//! Starts one decode worker and one prefill worker in this process (real gRPC servers on
//! 127.0.0.1, in-memory store), then:
//! 1. prefills prompts of several lengths through the prefill worker, which streams each
//!    layer's cache to the decode worker, and prints the bytes shipped per token next to
//!    `(kv_lora_rank + qk_rope_head_dim) x layers x 4` (the cache is f32);
//! 2. pushes synthetic caches straight into the decode worker's `PushKv` and prints GB/s.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use cluster_core::node::NodeArgs;
use cluster_core::{MemoryStore, StoreConfig};
use proto::internal::decode_client::DecodeClient;
use proto::internal::prefill_client::PrefillClient;
use proto::internal::{self as pb, kv_chunk};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
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
    };
    let decode_config = decode_worker::DecodeConfig {
        node: node("decode-0"),
        engine: engine.clone(),
        max_batch: 64,
        drain_timeout_ms: 1000,
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
    let formula = latent * layers * 4;
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
    println!("\n== synthetic PushKv into the decode worker (1 MiB chunks)");
    println!("{:>8} {:>12} {:>12} {:>10}", "tokens", "bytes", "median_ms", "GB/s");
    for &n in &args.push_tokens {
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
            let row = latent * 4;
            let per_chunk = ((1 << 20) / row).max(1);
            let layer_bytes: Vec<u8> = (0..n * row).map(|i| (i % 251) as u8 & 0x3f).collect();
            let mut msgs = vec![pb::KvChunk {
                part: Some(kv_chunk::Part::Header(pb::KvHeader {
                    request_id: id,
                    num_tokens: n as u32,
                    latent_dim: latent as u32,
                    num_layers: layers as u32,
                })),
            }];
            for l in 0..layers {
                for (c, chunk) in layer_bytes.chunks(per_chunk * row).enumerate() {
                    msgs.push(pb::KvChunk {
                        part: Some(kv_chunk::Part::Layer(pb::KvLayer {
                            layer: l as u32,
                            first_token: (c * per_chunk) as u32,
                            data: chunk.to_vec(),
                        })),
                    });
                }
            }
            let tokens: Vec<u32> = (0..=n).map(|i| (i % 100) as u32).collect();
            msgs.push(pb::KvChunk {
                part: Some(kv_chunk::Part::Commit(pb::KvCommit {
                    tokens,
                    prompt_len: n as u32,
                    prompt_logits_top: vec![],
                })),
            });
            let t = Instant::now();
            let r = dec.push_kv(tokio_stream::iter(msgs)).await?.into_inner();
            times.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(
                r.bytes_received as usize == n * formula,
                "decode worker received {} bytes",
                r.bytes_received
            );
            drop(events);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = n * formula;
        println!("{n:>8} {bytes:>12} {:>12.2} {:>10.3}", median * 1e3, bytes as f64 / median / 1e9);
    }
    shutdown.cancel();
    decode.await??;
    prefill.await??;
    Ok(())
}
