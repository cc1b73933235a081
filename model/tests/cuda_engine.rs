//! The engine on an NVIDIA GPU against the CPU engine: logits and greedy tokens on the
//! fixtures, and a sequence's cache moved between the two. The CPU reference runs with bf16
//! weights and `Precision::Bf16Activations`, the rounding the GPU's bf16 GEMMs apply. Runs
//! where a GPU is present; elsewhere each GPU test prints why it was skipped.
#![cfg(feature = "cuda")]

mod common;

use common::{AllOk, expected, fixture};
use kernels::cpu::Precision;
use model::{
    Device, Engine, EngineError, EngineOptions, ExpertBackend, LoadOptions, Model, SamplingParams, SeqId, WeightDtype,
    load_model,
};
use std::io::Write;
use std::sync::Arc;

const OPTS: EngineOptions = EngineOptions {
    cache_tokens: 512,
    block_size: 4,
    device: Device::Cpu,
    speculative_tokens: 0,
    accept_rule: model::AcceptRule::Rejection,
};
const GPU: EngineOptions = EngineOptions { device: Device::Cuda(0), ..OPTS };

fn load(name: &str) -> (Arc<Model>, Arc<dyn ExpertBackend>) {
    let loaded =
        load_model(&fixture(name), LoadOptions { weight_dtype: WeightDtype::Bf16, local_experts: true }, &|_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut model = loaded.model;
    model.set_precision(Precision::Bf16Activations);
    let experts = loaded.experts.expect("local experts").with_precision(Precision::Bf16Activations);
    (Arc::new(model), Arc::new(experts))
}

/// The GPU engine, or `None` (with the reason printed) where this machine has no GPU.
fn gpu_engine(model: &Arc<Model>, experts: &Arc<dyn ExpertBackend>) -> Option<Engine> {
    match Engine::on_device(model.clone(), experts.clone(), GPU) {
        Ok(e) => Some(e),
        Err(EngineError::Device(reason))
            if reason.contains("could not be loaded") || reason.contains("CUDA device(s)") =>
        {
            // Straight to stderr: the test harness captures `println!`/`eprintln!`.
            let _ = writeln!(std::io::stderr(), "skipped: no usable NVIDIA GPU here ({reason})");
            None
        }
        Err(e) => panic!("a GPU is present but the engine could not use it: {e}"),
    }
}

fn greedy(max_new_tokens: usize, vocab: usize) -> SamplingParams {
    SamplingParams { max_new_tokens, stop_token_ids: vec![vocab as u32], ..SamplingParams::default() }
}

/// Prefills `prompt` (top logits of the last position kept) and decodes to the end.
fn run(engine: &mut Engine, prompt: &[u32], n: usize, vocab: usize) -> (Vec<(u32, f32)>, Vec<u32>) {
    let id = SeqId(7);
    engine.add_sequence(id, prompt.to_vec(), greedy(n, vocab), 16).expect("add");
    let mut outs = engine.prefill(&[id]).all_ok("prefill");
    let top = std::mem::take(&mut outs[0].prompt_logits_top);
    while outs[0].finish.is_none() {
        outs = engine.decode_step(&[id]).all_ok("decode");
    }
    let tokens = engine.generated(id).expect("seq").to_vec();
    engine.release(id).expect("release");
    (top, tokens)
}

fn check(name: &str) {
    let (model, experts) = load(name);
    let Some(mut gpu) = gpu_engine(&model, &experts) else { return };
    assert_eq!(gpu.device(), Device::Cuda(0));
    let mut cpu = Engine::new(model.clone(), experts.clone(), OPTS).expect("engine");
    let vocab = model.config.vocab_size;
    for (ci, case) in expected(name).cases.iter().enumerate() {
        let what = format!("{name} case {ci}");
        let (cpu_top, cpu_tokens) = run(&mut cpu, &case.prompt_ids, case.greedy.len(), vocab);
        let (gpu_top, gpu_tokens) = run(&mut gpu, &case.prompt_ids, case.greedy.len(), vocab);
        let scale = cpu_top.iter().map(|(_, v)| v.abs()).fold(1f32, f32::max);
        for ((ct, cv), (gt, gv)) in cpu_top.iter().zip(&gpu_top).take(4) {
            assert_eq!(ct, gt, "{what}: top prompt logits rank differently: cpu {cpu_top:?} gpu {gpu_top:?}");
            assert!((cv - gv).abs() <= 2e-2 * scale, "{what}: logit of {ct}: cpu {cv} gpu {gv}");
        }
        assert_eq!(gpu_tokens, cpu_tokens, "{what}: greedy tokens");
    }
}

#[test]
fn v3_on_the_gpu_matches_the_cpu_engine() {
    check("v3_bf16");
}

#[test]
fn v2lite_shape_on_the_gpu_matches_the_cpu_engine() {
    check("v2lite_f32");
}

#[test]
fn deepseek_v2_router_on_the_gpu_matches_the_cpu_engine() {
    check("v2_f32");
}

#[test]
fn yarn_and_half_rotation_on_the_gpu_match_the_cpu_engine() {
    check("v3_yarn_mscale");
    check("v3_noninterleave");
}

#[test]
fn fp8_checkpoint_on_the_gpu_matches_the_cpu_engine() {
    check("v3_fp8");
}

#[test]
fn long_prompts_and_batches_take_the_grouped_expert_path_and_match() {
    // 48 prompt tokens route more (token, expert) pairs than the device-side expert path
    // takes, so prefill groups tokens by expert on the host; decode steps of one sequence
    // stay on the device; a batch of 12 decoding sequences groups again.
    let (model, experts) = load("v3_bf16");
    let Some(mut gpu) = gpu_engine(&model, &experts) else { return };
    let mut cpu = Engine::new(model.clone(), experts.clone(), OPTS).expect("engine");
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = (0..48).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let (cpu_top, cpu_tokens) = run(&mut cpu, &prompt, 6, vocab);
    let (gpu_top, gpu_tokens) = run(&mut gpu, &prompt, 6, vocab);
    assert_eq!(cpu_top[0].0, gpu_top[0].0, "top prompt logit: cpu {cpu_top:?} gpu {gpu_top:?}");
    assert_eq!(gpu_tokens, cpu_tokens, "long prompt greedy tokens");
    let batch: Vec<SeqId> = (0..12).map(|i| SeqId(100 + i)).collect();
    let mut outputs = Vec::new();
    for engine in [&mut cpu, &mut gpu] {
        for (i, id) in batch.iter().enumerate() {
            let p: Vec<u32> = (0..3 + i as u32).map(|t| (t * 11 + i as u32) % vocab as u32).collect();
            engine.add_sequence(*id, p, greedy(4, vocab), 0).expect("add");
        }
        let mut tokens = vec![engine.prefill(&batch).all_ok("prefill").iter().map(|o| o.tokens[0]).collect::<Vec<_>>()];
        for _ in 0..3 {
            tokens.push(engine.decode_step(&batch).all_ok("decode").iter().map(|o| o.tokens[0]).collect());
        }
        for id in &batch {
            engine.release(*id).expect("release");
        }
        outputs.push(tokens);
    }
    assert_eq!(outputs[1], outputs[0], "batched greedy tokens, gpu vs cpu");
}

#[test]
fn a_cache_prefilled_on_the_gpu_decodes_on_the_cpu_and_back() {
    let (model, experts) = load("v3_bf16");
    let Some(mut gpu) = gpu_engine(&model, &experts) else { return };
    let mut cpu = Engine::new(model.clone(), experts.clone(), OPTS).expect("engine");
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = (1..12).collect();
    let (_, reference) = run(&mut cpu, &prompt, 8, vocab);
    assert_eq!(moved(&mut gpu, &mut cpu, &prompt, vocab), reference, "prefilled on the GPU, decoded on the CPU");
    assert_eq!(moved(&mut cpu, &mut gpu, &prompt, vocab), reference, "prefilled on the CPU, decoded on the GPU");
}

/// Prefills on `from`, moves the cache to `to` and decodes there.
fn moved(from: &mut Engine, to: &mut Engine, prompt: &[u32], vocab: usize) -> Vec<u32> {
    let id = SeqId(3);
    from.add_sequence(id, prompt.to_vec(), greedy(8, vocab), 0).expect("add");
    let first = from.prefill(&[id]).all_ok("prefill")[0].tokens[0];
    let export = from.export_cache(id).expect("export");
    from.release(id).expect("release");
    let mut tokens = prompt.to_vec();
    tokens.push(first);
    to.import_sequence(id, tokens, prompt.len(), greedy(8, vocab), &export).expect("import");
    let mut outs = to.decode_step(&[id]).all_ok("decode");
    while outs[0].finish.is_none() {
        outs = to.decode_step(&[id]).all_ok("decode");
    }
    let generated = to.generated(id).expect("seq").to_vec();
    to.release(id).expect("release");
    generated
}

#[test]
fn an_unusable_gpu_is_a_device_error_naming_it() {
    let (model, experts) = load("v3_bf16");
    let opts = EngineOptions { device: Device::Cuda(4096), ..OPTS };
    match Engine::on_device(model, experts, opts) {
        Err(EngineError::Device(reason)) => assert!(reason.contains("cuda:4096"), "{reason}"),
        other => panic!("expected a device error, got {other:?}"),
    }
}
