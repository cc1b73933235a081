//! The engine against transformers: every fixture under `tests/fixtures` (made by
//! `tools/gen_reference.py`) must give the same last-position logits (1e-4), per-position
//! argmax, router choices and greedy continuation.

mod common;

use common::{AllOk, Expected, expected, load};
use model::{
    CacheLayout, Engine, EngineOptions, LatentCache, LogitsWanted, RouterTrace, SamplingParams, Segment, SeqId,
    WeightDtype,
};

fn argmax(v: &[f32]) -> u32 {
    model::sampling::argmax(v)
}

fn check(name: &str, dtype: WeightDtype) {
    let expected: Expected = expected(name);
    let (model, experts) = load(name, dtype);
    let c = &model.config;
    for (ci, case) in expected.cases.iter().enumerate() {
        let what = format!("{name} ({dtype:?}) case {ci}");
        // All-position logits and router choices from one prefill.
        let layout =
            CacheLayout { num_layers: c.num_hidden_layers, latent_dim: c.latent_dim(), block_size: 4, num_blocks: 64 };
        let mut cache = LatentCache::new(layout).expect("cache");
        let mut table = cache.allocate(layout.blocks_for(case.prompt_ids.len())).expect("blocks");
        table.reverse(); // out-of-order blocks exercise the paging
        let seg = Segment { tokens: &case.prompt_ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
        let mut trace = RouterTrace::default();
        let out = model.forward(&mut cache, &[seg], experts.as_ref(), Some(&mut trace)).expect("forward");
        let logits = &out.logits[0];
        let vocab = c.vocab_size;
        let n = case.prompt_ids.len();
        let last = &logits[(n - 1) * vocab..];
        let max_err = last.iter().zip(&case.last_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_err <= 1e-4, "{what}: last-position logits differ by {max_err}");
        let am: Vec<u32> = (0..n).map(|i| argmax(&logits[i * vocab..(i + 1) * vocab])).collect();
        assert_eq!(am, case.argmax, "{what}: per-position argmax");
        for r in &case.router {
            let (_, ids) =
                trace.layers.iter().find(|(l, _)| *l == r.layer).unwrap_or_else(|| panic!("{what}: layer {}", r.layer));
            let got: Vec<Vec<u32>> = ids.chunks(c.router.top_k).map(|x| x.to_vec()).collect();
            assert_eq!(got, r.experts, "{what}: router choices of layer {}", r.layer);
        }
        // Greedy continuation through the engine (prefill, then decode steps on the cache).
        let mut engine = Engine::new(
            model.clone(),
            experts.clone(),
            EngineOptions { cache_tokens: 512, block_size: 4, ..Default::default() },
        )
        .expect("engine");
        let params = SamplingParams {
            max_new_tokens: case.greedy.len(),
            stop_token_ids: vec![vocab as u32], // never sampled: run the full length
            ..SamplingParams::default()
        };
        let id = SeqId(1);
        engine.add_sequence(id, case.prompt_ids.clone(), params, 0).expect("add");
        let mut outs = engine.prefill(&[id]).all_ok("prefill");
        while outs[0].finish.is_none() {
            outs = engine.decode_step(&[id]).all_ok("decode");
        }
        assert_eq!(engine.generated(id).expect("seq"), &case.greedy[..], "{what}: greedy tokens");
    }
}

/// The embedded default model (trained, bf16 weights) computed in f32 like the reference.
#[test]
fn the_default_model_matches_transformers() {
    check("default_model", WeightDtype::F32);
}

/// A checkpoint with an MTP layer (model.layers.3.*): the main stack is unchanged by it.
#[test]
fn a_checkpoint_with_an_mtp_layer_matches_transformers() {
    check("v3_mtp", WeightDtype::F32);
}

#[test]
fn v3_f32_matches_transformers() {
    check("v3_f32", WeightDtype::F32);
}

#[test]
fn v2lite_shape_matches_transformers() {
    check("v2lite_f32", WeightDtype::F32);
}

#[test]
fn deepseek_v2_model_type_matches_transformers() {
    check("v2_f32", WeightDtype::F32);
}

#[test]
fn yarn_matches_transformers() {
    check("v3_yarn", WeightDtype::F32);
    check("v3_yarn_mscale", WeightDtype::F32);
}

#[test]
fn half_rotation_rope_matches_transformers() {
    check("v3_noninterleave", WeightDtype::F32);
}

#[test]
fn sharded_checkpoint_with_rope_parameters_matches_transformers() {
    check("v3_sharded", WeightDtype::F32);
}

#[test]
fn bf16_weights_match_the_upcast_reference() {
    // Kept in bf16 (widened inside the matmul) and upcast at load: both are exact.
    check("v3_bf16", WeightDtype::Auto);
    check("v3_bf16", WeightDtype::F32);
}

#[test]
fn fp8_block_quantized_matches_the_dequantized_reference() {
    check("v3_fp8", WeightDtype::F32);
}
