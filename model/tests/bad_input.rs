//! Bad checkpoints and bad requests: each gives an error (never a panic) that names the file,
//! tensor, field or parameter at fault, and the engine keeps serving after refusing a request.
//! Absurd sizes in config.json are refused before anything is allocated from them, weights
//! holding NaN or infinities are refused as they load, and a sequence whose logits overflow
//! fails alone while its batch goes on.

use kernels::cpu::Precision;
use model::serving::{ExpertCheckpoint, open_experts};
use model::{
    Engine, EngineError, EngineOptions, ExpertId, InvalidRequest, LayerRows, LoadOptions, ModelError, SamplingParams,
    SeqId, SequenceCacheExport, WeightDtype, load_model,
};
use safetensors::{Dtype, SafeTensors};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod common;

use common::{AllOk, Expected, fixture};

const OPTS: LoadOptions = LoadOptions { weight_dtype: WeightDtype::F32, local_experts: true };

/// A copy of fixture `name` in a fresh temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy fixture file");
    }
    tmp
}

/// Loads `dir`, which must fail with an error (a panic fails the test with a clear message).
fn load_err(dir: &Path) -> ModelError {
    match catch_unwind(AssertUnwindSafe(|| load_model(dir, OPTS, &|_| {}))) {
        Err(_) => panic!("load_model panicked on {} instead of returning an error", dir.display()),
        Ok(Ok(_)) => panic!("load_model accepted the broken checkpoint in {}", dir.display()),
        Ok(Err(e)) => e,
    }
}

/// Asserts that `msg` contains every one of `parts`.
fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} does not name {p:?}");
    }
}

struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Rewrites the safetensors file at `path` after `edit` changes its tensor list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<Owned>)) {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let mut tensors: Vec<Owned> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Owned { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() })
        .collect();
    let before = tensors.len();
    edit(&mut tensors);
    assert!(tensors.len() <= before);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let v = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).expect("consistent edit");
            (t.name.clone(), v)
        })
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, out).expect("write safetensors");
}

fn find<'a>(tensors: &'a mut [Owned], name: &str) -> &'a mut Owned {
    tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

// ---------------------------------------------------------------- checkpoint directory

#[test]
fn missing_directory_names_config_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("no_such_model");
    let e = load_err(&dir);
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_names(&e.to_string(), &["no_such_model", "config.json"]);
}

#[test]
fn missing_config_json_is_named() {
    let tmp = copy_fixture("v3_f32");
    std::fs::remove_file(tmp.path().join("config.json")).expect("rm");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_names(&e.to_string(), &["config.json"]);
}

#[test]
fn missing_model_safetensors_is_named() {
    let tmp = copy_fixture("v3_f32");
    std::fs::remove_file(tmp.path().join("model.safetensors")).expect("rm");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_names(&e.to_string(), &[&tmp.path().display().to_string(), "model.safetensors"]);
}

#[test]
fn invalid_json_config_names_the_file() {
    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, &text[..text.len() / 2]).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Json { .. }), "{e:?}");
    assert_names(&e.to_string(), &["config.json", "invalid JSON"]);
}

#[test]
fn unsupported_model_type_is_named() {
    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("\"deepseek_v3\""));
    std::fs::write(&path, text.replace("\"deepseek_v3\"", "\"mixtral\"")).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(&e, ModelError::UnsupportedModelType { model_type, .. } if model_type == "mixtral"), "{e:?}");
    assert_names(&e.to_string(), &["config.json", "mixtral", "model_type"]);
}

#[test]
fn missing_and_zero_config_fields_are_named() {
    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("config.json");
    let original = std::fs::read_to_string(&path).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&original).expect("json");
    v.as_object_mut().expect("object").remove("kv_lora_rank");
    std::fs::write(&path, v.to_string()).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(&e, ModelError::Config { field, .. } if field == "kv_lora_rank"), "{e:?}");
    assert_names(&e.to_string(), &["config.json", "kv_lora_rank"]);

    let mut v: serde_json::Value = serde_json::from_str(&original).expect("json");
    v["num_attention_heads"] = 0.into();
    std::fs::write(&path, v.to_string()).expect("write");
    let e = load_err(tmp.path());
    assert_names(&e.to_string(), &["config.json", "num_attention_heads"]);
}

// ---------------------------------------------------------------- safetensors files

#[test]
fn truncated_safetensors_is_refused_naming_the_file() {
    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("model.safetensors");
    let full = std::fs::read(&path).expect("read");
    for cut in [full.len() / 2, full.len() - 3, 12, 4, 0] {
        std::fs::write(&path, &full[..cut]).expect("write");
        let e = load_err(tmp.path());
        assert!(matches!(e, ModelError::Safetensors { .. } | ModelError::Io { .. }), "cut to {cut} bytes: {e:?}");
        assert_names(&e.to_string(), &["model.safetensors"]);
    }
    // Extra bytes after the last tensor are refused too (the header does not cover them).
    let mut longer = full.clone();
    longer.extend_from_slice(&[0u8; 8]);
    std::fs::write(&path, longer).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
    assert_names(&e.to_string(), &["model.safetensors"]);
}

#[test]
fn garbage_header_is_refused_naming_the_file() {
    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("model.safetensors");
    let full = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(full[..8].try_into().expect("8 bytes")) as usize;
    // Not JSON, right length.
    let mut bad = full.clone();
    bad[8..8 + n].fill(b'#');
    std::fs::write(&path, &bad).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
    assert_names(&e.to_string(), &["model.safetensors", "not a valid safetensors file"]);
    // A header length far beyond the file.
    let mut bad = full.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bad).expect("write");
    let e = load_err(tmp.path());
    assert_names(&e.to_string(), &["model.safetensors"]);
    // Random bytes.
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&path, junk).expect("write");
    let e = load_err(tmp.path());
    assert_names(&e.to_string(), &["model.safetensors"]);
}

#[test]
fn missing_tensor_is_named() {
    for name in
        ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.experts.7.up_proj.weight", "model.norm.weight"]
    {
        let tmp = copy_fixture("v3_f32");
        rewrite(&tmp.path().join("model.safetensors"), |t| t.retain(|t| t.name != name));
        let e = load_err(tmp.path());
        assert!(matches!(&e, ModelError::MissingTensor { tensor, .. } if tensor == name), "{e:?}");
        assert_names(&e.to_string(), &[name, &tmp.path().display().to_string()]);
    }
}

#[test]
fn wrong_shape_is_named() {
    let tmp = copy_fixture("v3_f32");
    let name = "model.layers.1.self_attn.q_b_proj.weight"; // [96, 48]
    rewrite(&tmp.path().join("model.safetensors"), |t| {
        let w = find(t, name);
        assert_eq!(w.shape, [96, 48]);
        w.shape = vec![48, 96];
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, ModelError::Shape { tensor, got, expected, .. }
        if tensor == name && got == &[48, 96] && expected == &[96, 48]),
        "{e:?}"
    );
    assert_names(&e.to_string(), &["model.safetensors", name, "[48, 96]", "[96, 48]"]);

    // A vector one element short, and a config whose vocab disagrees with the embedding.
    let tmp = copy_fixture("v3_f32");
    let name = "model.layers.0.input_layernorm.weight";
    rewrite(&tmp.path().join("model.safetensors"), |t| {
        let w = find(t, name);
        w.shape = vec![63];
        w.data.truncate(63 * 4);
    });
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Shape { .. }), "{e:?}");
    assert_names(&e.to_string(), &[name, "[63]", "[64]"]);

    let tmp = copy_fixture("v3_f32");
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("\"vocab_size\": 128", "\"vocab_size\": 500")).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Shape { .. }), "{e:?}");
    assert_names(&e.to_string(), &["model.embed_tokens.weight", "128", "500"]);
}

#[test]
fn unsupported_dtype_is_named() {
    // A matrix stored as I32 (same bytes, relabelled).
    let tmp = copy_fixture("v3_f32");
    let name = "model.layers.0.mlp.down_proj.weight";
    rewrite(&tmp.path().join("model.safetensors"), |t| find(t, name).dtype = Dtype::I32);
    let e = load_err(tmp.path());
    assert!(matches!(&e, ModelError::Dtype { tensor, .. } if tensor == name), "{e:?}");
    assert_names(&e.to_string(), &["model.safetensors", name, "I32"]);

    // A routed expert's matrix and a norm vector stored as F64.
    for name in ["model.layers.1.mlp.experts.3.gate_proj.weight", "model.norm.weight"] {
        let tmp = copy_fixture("v3_f32");
        rewrite(&tmp.path().join("model.safetensors"), |t| {
            let w = find(t, name);
            assert_eq!(w.dtype, Dtype::F32);
            w.data = w
                .data
                .chunks_exact(4)
                .flat_map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
                .collect();
            w.dtype = Dtype::F64;
        });
        let e = load_err(tmp.path());
        assert!(matches!(&e, ModelError::Dtype { tensor, .. } if tensor == name), "{e:?}");
        assert_names(&e.to_string(), &["model.safetensors", name, "F64"]);
    }
}

#[test]
fn fp8_weight_without_scale_names_the_scale() {
    for name in ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight"] {
        let tmp = copy_fixture("v3_fp8");
        let scale = format!("{name}_scale_inv");
        rewrite(&tmp.path().join("model.safetensors"), |t| {
            assert_eq!(find(t, name).dtype, Dtype::F8_E4M3);
            t.retain(|t| t.name != scale);
        });
        let e = load_err(tmp.path());
        assert!(matches!(&e, ModelError::MissingTensor { tensor, .. } if *tensor == scale), "{e:?}");
        assert_names(&e.to_string(), &[&scale]);
    }
    // A scale of the wrong block grid.
    let tmp = copy_fixture("v3_fp8");
    let scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"; // [2, 1]
    rewrite(&tmp.path().join("model.safetensors"), |t| {
        let s = find(t, scale);
        assert_eq!(s.shape, [2, 1]);
        s.shape = vec![1, 2];
    });
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Shape { .. }), "{e:?}");
    assert_names(&e.to_string(), &[scale, "[1, 2]", "[2, 1]"]);
}

#[test]
fn index_naming_a_missing_shard_is_named() {
    let tmp = copy_fixture("v3_sharded");
    let shard = "model-00003-of-00004.safetensors";
    std::fs::remove_file(tmp.path().join(shard)).expect("rm");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_names(&e.to_string(), &[shard]);
}

#[test]
fn bad_index_json_is_named() {
    let tmp = copy_fixture("v3_sharded");
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": ").expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Json { .. }), "{e:?}");
    assert_names(&e.to_string(), &["model.safetensors.index.json"]);

    std::fs::write(&index, "{\"metadata\": {}}").expect("write");
    let e = load_err(tmp.path());
    assert_names(&e.to_string(), &["model.safetensors.index.json", "weight_map"]);

    std::fs::write(&index, r#"{"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}"#).expect("write");
    let e = load_err(tmp.path());
    assert_names(&e.to_string(), &["model.safetensors.index.json", "weight_map", "elsewhere"]);
}

#[test]
fn truncated_shard_is_named() {
    let tmp = copy_fixture("v3_sharded");
    let shard = tmp.path().join("model-00002-of-00004.safetensors");
    let full = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &full[..full.len() - 5]).expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
    assert_names(&e.to_string(), &["model-00002-of-00004.safetensors"]);
}

#[test]
fn tensor_in_two_shards_is_refused() {
    let tmp = copy_fixture("v3_sharded");
    let (first, second) = ("model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors");
    std::fs::copy(tmp.path().join(first), tmp.path().join(second)).expect("copy shard");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
    assert_names(&e.to_string(), &[first, second, "is also in"]);
}

#[test]
fn broken_tokenizer_json_is_named() {
    let tmp = copy_fixture("v3_f32");
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 42}").expect("write");
    let e = load_err(tmp.path());
    assert!(matches!(e, ModelError::Tokenizer { .. }), "{e:?}");
    assert_names(&e.to_string(), &["tokenizer.json"]);
}

// ---------------------------------------------------------------- engine requests

fn loaded() -> (Arc<model::Model>, Arc<dyn model::ExpertBackend>) {
    common::load("v3_f32", OPTS.weight_dtype)
}

fn engine(cache_tokens: usize) -> Engine {
    let (m, x) = loaded();
    Engine::new(m, x, EngineOptions { cache_tokens, block_size: 4, ..Default::default() }).expect("engine")
}

fn expected() -> Expected {
    common::expected("v3_f32")
}

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams { max_new_tokens, stop_token_ids: vec![128], ..SamplingParams::default() }
}

/// Runs `id` (already added) to completion; returns its generated tokens.
fn run_to_end(e: &mut Engine, id: SeqId) -> Vec<u32> {
    let mut out = e.prefill(&[id]).all_ok("prefill");
    while out[0].finish.is_none() {
        out = e.decode_step(&[id]).all_ok("decode");
    }
    e.generated(id).expect("generated").to_vec()
}

/// `add_sequence` must fail (not panic) and leave the engine unchanged.
fn add_err(e: &mut Engine, id: u64, prompt: Vec<u32>, params: SamplingParams) -> EngineError {
    let (free, n) = (e.free_blocks(), e.num_sequences());
    let r = catch_unwind(AssertUnwindSafe(|| e.add_sequence(SeqId(id), prompt, params, 0)))
        .unwrap_or_else(|_| panic!("add_sequence panicked instead of returning an error"));
    let err = r.expect_err("add_sequence accepted a bad request");
    assert_eq!((e.free_blocks(), e.num_sequences()), (free, n), "a refused request must not hold cache: {err}");
    err
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let mut e = engine(1024);
    let long: Vec<u32> = (0..257).map(|i| i % 128).collect();
    let err = add_err(&mut e, 1, long, greedy(1));
    assert!(
        matches!(err, EngineError::Invalid(InvalidRequest::ContextExceeded { prompt: 257, max_new: 1, context: 256 })),
        "{err:?}"
    );
    // Prompt fits but prompt + max_new_tokens does not.
    let err = add_err(&mut e, 1, vec![0; 250], greedy(7));
    assert!(
        matches!(err, EngineError::Invalid(InvalidRequest::ContextExceeded { prompt: 250, max_new: 7, context: 256 })),
        "{err:?}"
    );
    assert_names(&err.to_string(), &["250", "7", "256"]);
    // Exactly the context is fine.
    e.add_sequence(SeqId(1), vec![0; 250], greedy(6), 0).expect("250 + 6 = 256 fits");
}

#[test]
fn bad_prompts_and_sampling_parameters_are_refused() {
    let mut e = engine(256);
    let err = add_err(&mut e, 1, vec![], greedy(4));
    assert!(matches!(err, EngineError::Invalid(InvalidRequest::EmptyPrompt)), "{err:?}");
    let err = add_err(&mut e, 1, vec![0, 5, 128, 7], greedy(4));
    assert!(
        matches!(err, EngineError::Invalid(InvalidRequest::TokenOutOfVocab { id: 128, vocab: 128, .. })),
        "{err:?}"
    );
    let err = add_err(&mut e, 1, vec![0, u32::MAX], greedy(4));
    assert!(matches!(err, EngineError::Invalid(InvalidRequest::TokenOutOfVocab { id: u32::MAX, .. })), "{err:?}");
    let cases: [(SamplingParams, &str); 7] = [
        (SamplingParams { max_new_tokens: 0, ..greedy(1) }, "max_new_tokens"),
        (SamplingParams { temperature: -0.5, ..greedy(4) }, "temperature"),
        (SamplingParams { temperature: f32::NAN, ..greedy(4) }, "temperature"),
        (SamplingParams { temperature: f32::INFINITY, ..greedy(4) }, "temperature"),
        (SamplingParams { top_p: 0.0, ..greedy(4) }, "top_p"),
        (SamplingParams { top_p: 1.5, ..greedy(4) }, "top_p"),
        (SamplingParams { top_p: f32::NAN, ..greedy(4) }, "top_p"),
    ];
    for (params, field) in cases {
        let what = format!("{params:?}");
        let err = add_err(&mut e, 1, vec![0, 5], params);
        assert!(matches!(err, EngineError::Invalid(_)), "{what}: {err:?}");
        assert_names(&err.to_string(), &[field]);
    }
    assert_eq!(e.num_sequences(), 0);
}

#[test]
fn duplicate_unknown_and_wrong_state_sequences_are_refused() {
    let exp = expected();
    let case = &exp.cases[0];
    let mut e = engine(256);
    let initial = e.free_blocks();
    e.add_sequence(SeqId(7), case.prompt_ids.clone(), greedy(case.greedy.len()), 0).expect("add");
    let err = add_err(&mut e, 7, vec![0, 1, 2], greedy(2));
    assert!(matches!(err, EngineError::DuplicateSequence(7)), "{err:?}");
    // Decoding before prefill.
    let err = e.decode_step(&[SeqId(7)]).expect_err("decode of a waiting sequence");
    assert!(matches!(err, EngineError::WrongState(7, _)), "{err:?}");
    // Unknown ids anywhere.
    for err in [
        e.prefill(&[SeqId(8)]).expect_err("prefill unknown"),
        e.decode_step(&[SeqId(8)]).expect_err("decode unknown"),
        e.release(SeqId(8)).expect_err("release unknown"),
        e.export_cache(SeqId(8)).expect_err("export unknown"),
    ] {
        assert!(matches!(err, EngineError::UnknownSequence(8)), "{err:?}");
    }
    assert!(matches!(e.generated(SeqId(8)), Err(EngineError::UnknownSequence(8))));
    // The same id twice in one batch.
    let err = e.prefill(&[SeqId(7), SeqId(7)]).expect_err("duplicate id in a batch");
    assert!(matches!(err, EngineError::RepeatedInBatch(7)), "{err:?}");
    // A refused batch changed nothing: the sequence still runs to the reference tokens.
    let out = e.prefill(&[SeqId(7)]).all_ok("prefill");
    assert_eq!(out[0].tokens[0], case.greedy[0]);
    let err = e.prefill(&[SeqId(7)]).expect_err("prefill twice");
    assert!(matches!(err, EngineError::WrongState(7, _)), "{err:?}");
    let mut last = out;
    while last[0].finish.is_none() {
        last = e.decode_step(&[SeqId(7)]).all_ok("decode");
    }
    assert_eq!(e.generated(SeqId(7)).expect("seq"), &case.greedy[..]);
    let err = e.decode_step(&[SeqId(7)]).expect_err("decode after finish");
    assert!(matches!(err, EngineError::WrongState(7, _)), "{err:?}");
    e.release(SeqId(7)).expect("release");
    assert!(matches!(e.release(SeqId(7)), Err(EngineError::UnknownSequence(7))));
    assert_eq!(e.free_blocks(), initial);
}

#[test]
fn bad_cache_imports_are_refused() {
    let exp = expected();
    let case = &exp.cases[1];
    let mut a = engine(256);
    let params = greedy(case.greedy.len());
    a.add_sequence(SeqId(1), case.prompt_ids.clone(), params.clone(), 0).expect("add");
    let first = a.prefill(&[SeqId(1)]).all_ok("prefill")[0].tokens[0];
    let export = a.export_cache(SeqId(1)).expect("export");
    let n = case.prompt_ids.len();
    assert_eq!(export.num_tokens, n);
    let mut tokens = case.prompt_ids.clone();
    tokens.push(first);

    let mut b = engine(256);
    let initial = b.free_blocks();
    let mut refuse = |what: &str,
                      tokens: Vec<u32>,
                      prompt_len: usize,
                      params: SamplingParams,
                      x: &SequenceCacheExport| {
        let r = catch_unwind(AssertUnwindSafe(|| b.import_sequence(SeqId(2), tokens, prompt_len, params, x)))
            .unwrap_or_else(|_| panic!("{what}: import_sequence panicked"));
        let err = r.expect_err(what);
        assert_eq!((b.free_blocks(), b.num_sequences()), (initial, 0), "{what}: a refused import must not hold cache");
        err
    };
    let wrong = |f: &dyn Fn(&mut SequenceCacheExport)| {
        let mut x = export.clone();
        f(&mut x);
        x
    };
    let bad_layers = wrong(&|x| {
        x.layers.pop();
    });
    let err = refuse("missing layer", tokens.clone(), n, params.clone(), &bad_layers);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    assert_names(&err.to_string(), &["2x40", "3 layers x 40"]);
    let bad_dim = wrong(&|x| x.latent_dim = 24);
    let err = refuse("latent_dim", tokens.clone(), n, params.clone(), &bad_dim);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    // Layer 1 one row short.
    let first_rows = |rows: &LayerRows, n: usize| {
        LayerRows::new(rows.layer(), rows.latent_dim(), rows.data()[..n * rows.latent_dim()].to_vec()).expect("rows")
    };
    let short = wrong(&|x| x.layers[1] = first_rows(&x.layers[1], n - 1));
    let err = refuse("short layer", tokens.clone(), n, params.clone(), &short);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    assert_names(&err.to_string(), &["layer 1"]);
    let narrow = wrong(&|x| x.layers[2] = LayerRows::new(2, 20, x.layers[2].data().to_vec()).expect("rows of 20"));
    let err = refuse("rows of another width", tokens.clone(), n, params.clone(), &narrow);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    assert_names(&err.to_string(), &["layer 2", "rows of 20"]);
    let err = refuse("tokens do not match the cache", case.prompt_ids.clone(), n, params.clone(), &export);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    let err = refuse("prompt_len 0", tokens.clone(), 0, params.clone(), &export);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    let err = refuse("prompt_len beyond the cache", tokens.clone(), n + 1, params.clone(), &export);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    let mut oov = tokens.clone();
    *oov.last_mut().expect("token") = 128;
    let err = refuse("generated token outside the vocab", oov, n, params.clone(), &export);
    assert!(
        matches!(err, EngineError::Invalid(InvalidRequest::TokenOutOfVocab { field: "tokens", id: 128, .. })),
        "{err:?}"
    );
    // More tokens already generated than the request's max_new_tokens leaves room for:
    // the prompt's cache was reserved for prompt + max_new_tokens only.
    let err = refuse("generated beyond max_new_tokens", tokens.clone(), 1, greedy(2), &export);
    assert!(matches!(err, EngineError::BadCacheImport(_)), "{err:?}");
    assert_names(&err.to_string(), &["max_new_tokens"]);
    let err = refuse("bad sampling", tokens.clone(), n, SamplingParams { top_p: 2.0, ..params.clone() }, &export);
    assert!(matches!(err, EngineError::Invalid(InvalidRequest::TopP(_))), "{err:?}");

    // The good import still works after all that, and finishes with the reference tokens.
    b.import_sequence(SeqId(2), tokens, n, params, &export).expect("good import");
    let err = b.import_sequence(
        SeqId(2),
        vec![0, 1],
        1,
        greedy(2),
        &wrong(&|x| {
            x.num_tokens = 1;
            x.layers.iter_mut().for_each(|l| *l = first_rows(l, 1));
        }),
    );
    assert!(matches!(err, Err(EngineError::DuplicateSequence(2))), "{err:?}");
    let mut out = b.decode_step(&[SeqId(2)]).all_ok("decode");
    while out[0].finish.is_none() {
        out = b.decode_step(&[SeqId(2)]).all_ok("decode");
    }
    assert_eq!(b.generated(SeqId(2)).expect("seq"), &case.greedy[..]);
}

#[test]
fn cache_full_is_refused_and_the_engine_keeps_serving() {
    let exp = expected();
    let (a, b) = (&exp.cases[2], &exp.cases[1]);
    // 15 + 8 = 23 tokens → 6 blocks of 4; the cache has 8 blocks.
    let mut e = engine(32);
    let initial = e.free_blocks();
    assert_eq!(initial, 8);
    e.add_sequence(SeqId(1), a.prompt_ids.clone(), greedy(a.greedy.len()), 0).expect("first fits");
    let out = e.prefill(&[SeqId(1)]).all_ok("prefill");
    assert_eq!(out[0].tokens[0], a.greedy[0]);
    // 9 + 8 = 17 tokens → 5 blocks; 2 are free.
    let err = add_err(&mut e, 2, b.prompt_ids.clone(), greedy(b.greedy.len()));
    assert!(matches!(err, EngineError::CacheFull { needed: 5, free: 2 }), "{err:?}");
    assert_names(&err.to_string(), &["5", "2"]);
    assert!(matches!(e.prefill(&[SeqId(2)]), Err(EngineError::UnknownSequence(2))));
    let mut out = out;
    while out[0].finish.is_none() {
        out = e.decode_step(&[SeqId(1)]).all_ok("decode");
    }
    assert_eq!(e.generated(SeqId(1)).expect("seq"), &a.greedy[..], "the admitted sequence is unharmed");
    e.release(SeqId(1)).expect("release");
    assert_eq!(e.free_blocks(), initial);
    // Now the refused one fits and runs correctly.
    e.add_sequence(SeqId(2), b.prompt_ids.clone(), greedy(b.greedy.len()), 0).expect("fits after release");
    assert_eq!(run_to_end(&mut e, SeqId(2)), b.greedy);
    e.release(SeqId(2)).expect("release");
    assert_eq!(e.free_blocks(), initial);
    // A cache of zero tokens refuses everything without panicking.
    let mut z = engine(0);
    let err = add_err(&mut z, 1, vec![0], greedy(1));
    assert!(matches!(err, EngineError::CacheFull { needed: 1, free: 0 }), "{err:?}");
}

// ---------------------------------------------------------------- sizes in config.json

/// Sets `field` of `dir/config.json` to `value`.
fn set_config(dir: &Path, field: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    v[field] = value;
    std::fs::write(&path, v.to_string()).expect("write");
}

/// Every way a role opens a checkpoint: `load_model` with and without local experts, an
/// expert worker's `open_experts` and `ExpertCheckpoint` (slot by slot). Each must fail (no
/// panic, no abort); the errors are returned with the time each took.
fn open_errs(dir: &Path) -> Vec<(ModelError, std::time::Duration)> {
    type Open<'a> = &'a dyn Fn() -> Result<(), ModelError>;
    let opens: [(&str, Open<'_>); 4] = [
        ("load_model", &|| load_model(dir, OPTS, &|_| {}).map(drop)),
        ("load_model without experts", &|| {
            load_model(dir, LoadOptions { local_experts: false, ..OPTS }, &|_| {}).map(drop)
        }),
        ("open_experts", &|| {
            let all = |_: &model::ModelConfig, _: usize, _: ExpertId| true;
            open_experts(Some(dir.into()), WeightDtype::Auto, Precision::Exact, &all, &|_| {}).map(drop)
        }),
        ("ExpertCheckpoint", &|| {
            let ckpt = ExpertCheckpoint::open(Some(dir.into()), WeightDtype::Auto)?;
            let c = ckpt.config();
            let layer = (0..c.num_hidden_layers).find(|&l| c.is_moe_layer(l)).unwrap_or(0);
            ckpt.load(layer, ExpertId(0)).map(drop)
        }),
    ];
    opens
        .into_iter()
        .map(|(what, open)| {
            let started = Instant::now();
            match catch_unwind(AssertUnwindSafe(open)) {
                Err(_) => panic!("{what} panicked on {} instead of returning an error", dir.display()),
                Ok(Ok(())) => panic!("{what} accepted the broken checkpoint in {}", dir.display()),
                Ok(Err(e)) => (e, started.elapsed()),
            }
        })
        .collect()
}

#[test]
fn absurd_config_sizes_are_refused_naming_the_field_before_anything_is_allocated() {
    // What the probe found: allocation aborts, or 8 s and 2 GB before failing. Beyond the
    // bounds, config.json alone is refused; within them, the tensor names are.
    let cases: [(&str, serde_json::Value); 8] = [
        ("num_hidden_layers", 10_000_000.into()),
        ("num_hidden_layers", 1_000_000.into()),
        ("num_hidden_layers", 4096.into()),
        ("n_routed_experts", 1_000_000_000.into()),
        ("n_routed_experts", 65536.into()),
        ("vocab_size", (1u64 << 40).into()),
        ("hidden_size", (1u64 << 50).into()),
        ("max_position_embeddings", u64::MAX.into()),
    ];
    for (field, value) in cases {
        let tmp = copy_fixture("v3_f32");
        set_config(tmp.path(), field, value.clone());
        for (e, took) in open_errs(tmp.path()) {
            // The bound is shown, not asserted (timing depends on the machine).
            eprintln!("{field} = {value}: refused in {:.2} ms: {e}", took.as_secs_f64() * 1e3);
            assert!(matches!(&e, ModelError::Config { field: f, .. } if f == field), "{field} = {value}: {e:?}");
            assert_names(&e.to_string(), &["config.json", field]);
        }
    }
}

#[test]
fn config_sizes_the_checkpoint_disagrees_with_are_refused_naming_the_field() {
    // Within the bounds, but not what the tensors hold: each error names the field (and,
    // for a shape, the tensor and both shapes).
    let cases: [(&str, serde_json::Value, &[&str]); 18] = [
        ("num_hidden_layers", 4.into(), &["num_hidden_layers", "holds tensors of 3"]),
        ("n_routed_experts", 32.into(), &["n_routed_experts", "32 routed experts", "of 16 per layer"]),
        ("hidden_size", 72.into(), &["model.embed_tokens.weight", "hidden_size", "[128, 64]", "[128, 72]"]),
        ("vocab_size", 256.into(), &["model.embed_tokens.weight", "vocab_size", "[256, 64]"]),
        ("num_attention_heads", 8.into(), &["q_b_proj", "num_attention_heads"]),
        ("kv_lora_rank", 16.into(), &["kv_a_proj_with_mqa", "kv_lora_rank"]),
        ("q_lora_rank", 24.into(), &["q_a_proj", "q_lora_rank"]),
        ("q_lora_rank", serde_json::Value::Null, &["q_lora_rank", "q_a_proj"]),
        ("qk_nope_head_dim", 8.into(), &["q_b_proj", "qk_nope_head_dim"]),
        ("qk_rope_head_dim", 4.into(), &["q_b_proj", "qk_rope_head_dim"]),
        ("v_head_dim", 8.into(), &["kv_b_proj", "v_head_dim"]),
        ("intermediate_size", 64.into(), &["model.layers.0.mlp.gate_proj.weight", "intermediate_size"]),
        ("moe_intermediate_size", 16.into(), &["shared_experts", "moe_intermediate_size"]),
        ("n_shared_experts", 2.into(), &["shared_experts", "n_shared_experts"]),
        ("n_shared_experts", 0.into(), &["n_shared_experts", "shared_experts"]),
        ("first_k_dense_replace", 0.into(), &["first_k_dense_replace", "layer 0", "dense MLP"]),
        ("first_k_dense_replace", 2.into(), &["first_k_dense_replace", "layer 1", "MoE router"]),
        ("moe_layer_freq", 2.into(), &["moe_layer_freq", "layer 1", "MoE router"]),
    ];
    for (field, value, parts) in cases {
        let tmp = copy_fixture("v3_f32");
        set_config(tmp.path(), field, value.clone());
        let e = load_err(tmp.path());
        eprintln!("{field} = {value}: {e}");
        match &e {
            ModelError::Config { field: f, .. } => assert_eq!(f, field, "{e}"),
            ModelError::Shape { fields, .. } => assert!(fields.contains(field), "{e}"),
            _ => panic!("{field} = {value}: {e:?}"),
        }
        assert_names(&e.to_string(), parts);
    }
}

#[test]
fn an_mtp_layer_the_checkpoint_lacks_is_refused_naming_the_field_or_tensor() {
    // Asked for, but the checkpoint holds no layer 3.
    let tmp = copy_fixture("v3_f32");
    set_config(tmp.path(), "num_nextn_predict_layers", 1.into());
    let e = load_err(tmp.path());
    assert!(matches!(&e, ModelError::Config { field, .. } if field == "num_nextn_predict_layers"), "{e:?}");
    assert_names(&e.to_string(), &["config.json", "model.layers.3", "set it to 0"]);
    // Two main layers: layer 2 is then read as the MTP layer, which lacks its projection.
    let tmp = copy_fixture("v3_mtp");
    set_config(tmp.path(), "num_hidden_layers", 2.into());
    let e = load_err(tmp.path()).to_string();
    assert_names(&e, &["model.layers.2.enorm.weight"]);
}

#[test]
fn a_cache_too_large_to_address_or_allocate_is_refused() {
    let (m, x) = loaded();
    // Block ids are u32; the size of all layers overflows; the allocation itself fails
    // (petabytes per layer: beyond any address space).
    let cases = [(usize::MAX, 16, "2^32 blocks"), (1 << 62, 1 << 31, "overflows"), (1 << 50, 1 << 26, "GiB")];
    for (cache_tokens, block_size, why) in cases {
        let opts = EngineOptions { cache_tokens, block_size, ..Default::default() };
        let r = catch_unwind(AssertUnwindSafe(|| Engine::new(m.clone(), x.clone(), opts)))
            .unwrap_or_else(|_| panic!("Engine::new panicked on a cache of {cache_tokens} tokens"));
        let e = r.expect_err("a cache that cannot exist");
        assert!(matches!(e, EngineError::CacheSize { .. }), "{e:?}");
        assert_names(&e.to_string(), &["cache", why]);
        let r = Engine::on_device(m.clone(), x.clone(), opts);
        assert!(matches!(r, Err(EngineError::CacheSize { .. })), "on_device: {r:?}");
    }
}

// ---------------------------------------------------------------- non-finite weights

/// Writes `value` over element `index` of tensor `name` (F32, BF16 or F16; F8_E4M3 takes a
/// raw byte, 0x7f being its NaN).
fn poke(t: &mut [Owned], name: &str, index: usize, value: f32) {
    let w = find(t, name);
    match w.dtype {
        Dtype::F32 => w.data[index * 4..][..4].copy_from_slice(&value.to_le_bytes()),
        Dtype::BF16 => w.data[index * 2..][..2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        Dtype::F16 => w.data[index * 2..][..2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
        Dtype::F8_E4M3 => w.data[index] = if value.is_nan() { 0x7f } else { panic!("FP8 has no infinity") },
        other => panic!("{name} is {other:?}"),
    }
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    // (fixture, weight dtype asked, tensor, element, value): each copy and conversion path.
    let cases: [(&str, WeightDtype, &str, usize, f32); 11] = [
        ("v3_f32", WeightDtype::F32, "model.layers.0.self_attn.o_proj.weight", 100, f32::NAN),
        ("v3_f32", WeightDtype::Bf16, "model.layers.2.self_attn.kv_b_proj.weight", 7, f32::INFINITY),
        ("v3_f32", WeightDtype::F32, "model.layers.1.post_attention_layernorm.weight", 3, f32::NEG_INFINITY),
        ("v3_f32", WeightDtype::Bf16, "model.layers.1.mlp.gate.weight", 5, f32::NAN),
        ("v3_f32", WeightDtype::F32, "model.layers.2.mlp.gate.e_score_correction_bias", 15, f32::NAN),
        ("v3_f32", WeightDtype::F32, "model.layers.2.mlp.experts.5.up_proj.weight", 0, f32::NAN),
        ("v3_bf16", WeightDtype::Auto, "model.layers.0.mlp.down_proj.weight", 31, f32::NAN),
        ("v3_bf16", WeightDtype::F32, "lm_head.weight", 64 * 127 + 63, f32::INFINITY),
        ("v3_fp8", WeightDtype::Auto, "model.layers.1.self_attn.o_proj.weight", 161, f32::NAN),
        ("v3_fp8", WeightDtype::F32, "model.layers.2.mlp.experts.0.down_proj.weight", 2, f32::NAN),
        ("v3_fp8", WeightDtype::Auto, "model.layers.1.self_attn.o_proj.weight_scale_inv", 1, f32::NAN),
    ];
    for (fixture, dtype, name, index, value) in cases {
        let what = format!("{fixture} as {dtype:?}: {name}[{index}] = {value}");
        let tmp = copy_fixture(fixture);
        rewrite(&tmp.path().join("model.safetensors"), |t| poke(t, name, index, value));
        let opts = LoadOptions { weight_dtype: dtype, local_experts: true };
        let e = match catch_unwind(AssertUnwindSafe(|| load_model(tmp.path(), opts, &|_| {}))) {
            Err(_) => panic!("{what}: load_model panicked"),
            Ok(Ok(_)) => panic!("{what}: loaded"),
            Ok(Err(e)) => e,
        };
        assert!(
            matches!(&e, ModelError::NonFinite { tensor, index: i, .. } if tensor == name && *i == index),
            "{what}: {e:?}"
        );
        assert_names(&e.to_string(), &["model.safetensors", name, "non-finite", &format!("element {index}")]);
    }
}

#[test]
fn all_nan_embeddings_are_refused_by_every_role() {
    // The probe's checkpoint: every embedding NaN gave tokens with null logits, exit 0.
    let tmp = copy_fixture("v3_bf16");
    let name = "model.embed_tokens.weight";
    rewrite(&tmp.path().join("model.safetensors"), |t| {
        let w = find(t, name);
        w.data.chunks_exact_mut(2).for_each(|b| b.copy_from_slice(&half::bf16::NAN.to_le_bytes()));
    });
    for opts in [OPTS, LoadOptions { weight_dtype: WeightDtype::Auto, local_experts: false }] {
        let e = load_model(tmp.path(), opts, &|_| {}).expect_err("NaN embeddings");
        assert!(matches!(&e, ModelError::NonFinite { tensor, index: 0, .. } if tensor == name), "{e:?}");
    }
    // An expert worker loads its experts through the same reader.
    let expert = "model.layers.1.mlp.experts.9.gate_proj.weight";
    rewrite(&tmp.path().join("model.safetensors"), |t| poke(t, expert, 40, f32::NAN));
    let ckpt = ExpertCheckpoint::open(Some(tmp.path().into()), WeightDtype::Auto).expect("headers are fine");
    ckpt.load(1, ExpertId(8)).expect("a healthy expert loads");
    let e = ckpt.load(1, ExpertId(9)).expect_err("a NaN expert");
    assert!(matches!(&e, ModelError::NonFinite { tensor, index: 40, .. } if tensor == expert), "{e:?}");
    let all = |_: &model::ModelConfig, _: usize, _: ExpertId| true;
    let e = open_experts(Some(tmp.path().into()), WeightDtype::Auto, Precision::Exact, &all, &|_| {})
        .expect_err("a NaN expert");
    assert!(matches!(&e, ModelError::NonFinite { tensor, .. } if tensor == expert), "{e:?}");
}

// ---------------------------------------------------------------- non-finite logits

/// The token whose activations overflow in [`poisoned`].
const POISON: u32 = 77;

/// Fixture v3_f32 changed so that only [`POISON`] overflows: it is the one token with a
/// nonzero first hidden coordinate (column 0 of the embedding is zero elsewhere, and layer 0's
/// attention writes nothing there), and layer 0's post-attention norm scales that coordinate
/// by 1e30, so its dense MLP overflows to infinities. Every other token computes finite
/// values. POISON's head row is zero, so greedy decoding never picks it.
fn poisoned() -> tempfile::TempDir {
    let tmp = copy_fixture("v3_f32");
    rewrite(&tmp.path().join("model.safetensors"), |t| {
        let h = 64;
        for row in 0..128 {
            poke(t, "model.embed_tokens.weight", row * h, if row == POISON as usize { 1.0 } else { 0.0 });
        }
        for col in 0..h {
            poke(t, "model.layers.0.self_attn.o_proj.weight", col, 0.0);
            poke(t, "lm_head.weight", POISON as usize * h + col, 0.0);
        }
        poke(t, "model.layers.0.post_attention_layernorm.weight", 0, 1e30);
    });
    tmp
}

fn poisoned_engine(dir: &Path) -> Engine {
    let loaded = load_model(dir, OPTS, &|_| {}).expect("finite weights load");
    let experts = Arc::new(loaded.experts.expect("local experts"));
    Engine::new(
        Arc::new(loaded.model),
        experts,
        EngineOptions { cache_tokens: 256, block_size: 4, ..Default::default() },
    )
    .expect("engine")
}

fn healthy_prompts() -> [Vec<u32>; 2] {
    [vec![0, 5, 9, 12, 40, 3], vec![0, 100, 7, 7, 64]]
}

/// Greedy run of `prompt` alone; the reference for the same prompt in a batch.
fn alone(dir: &Path, prompt: &[u32]) -> Vec<u32> {
    let mut e = poisoned_engine(dir);
    e.add_sequence(SeqId(1), prompt.to_vec(), greedy(6), 0).expect("add");
    let out = run_to_end(&mut e, SeqId(1));
    assert!(!out.contains(&POISON));
    out
}

#[test]
fn non_finite_logits_fail_that_sequence_and_the_batch_goes_on() {
    let tmp = poisoned();
    let [a, b] = healthy_prompts();
    let (want_a, want_b) = (alone(tmp.path(), &a), alone(tmp.path(), &b));
    let mut e = poisoned_engine(tmp.path());
    let initial = e.free_blocks();
    // In prefill: the poisoned prompt between two healthy ones.
    e.add_sequence(SeqId(1), a.clone(), greedy(6), 0).expect("add");
    e.add_sequence(SeqId(2), vec![0, 3, POISON, 4], greedy(6), 0).expect("add");
    e.add_sequence(SeqId(3), b.clone(), greedy(6), 0).expect("add");
    let started = Instant::now();
    let mut out = e.prefill(&[SeqId(1), SeqId(2), SeqId(3)]).expect("the batch runs");
    eprintln!("prefill of 3 took {:?}", started.elapsed());
    let err = out.remove(1).expect_err("the poisoned sequence fails");
    assert!(matches!(err, EngineError::NonFiniteLogits { seq: 2, position: 3, .. }), "{err:?}");
    assert_names(&err.to_string(), &["sequence 2", "not finite", "position 3"]);
    for o in out {
        o.expect("healthy sequences go on");
    }
    // It is finished: it takes no more steps, and its cache is released once.
    assert!(matches!(e.decode_step(&[SeqId(2)]), Err(EngineError::WrongState(2, _))));
    e.release(SeqId(2)).expect("release the failed sequence");
    let ids = [SeqId(1), SeqId(3)];
    loop {
        let live: Vec<SeqId> = ids.iter().copied().filter(|id| e.generated(*id).expect("seq").len() < 6).collect();
        if live.is_empty() {
            break;
        }
        e.decode_step(&live).all_ok("decode");
    }
    assert_eq!(e.generated(SeqId(1)).expect("seq"), &want_a[..]);
    assert_eq!(e.generated(SeqId(3)).expect("seq"), &want_b[..]);
    for id in ids {
        e.release(id).expect("release");
    }
    assert_eq!(e.free_blocks(), initial);
}

#[test]
fn non_finite_logits_in_a_decode_step_fail_only_that_sequence() {
    let tmp = poisoned();
    let [a, b] = healthy_prompts();
    let want_b = alone(tmp.path(), &b);
    // A sequence prefilled elsewhere whose first generated token is the poison: its first
    // decode step overflows.
    let mut elsewhere = poisoned_engine(tmp.path());
    elsewhere.add_sequence(SeqId(5), a.clone(), greedy(6), 0).expect("add");
    elsewhere.prefill(&[SeqId(5)]).all_ok("prefill");
    let export = elsewhere.export_cache(SeqId(5)).expect("export");
    let mut e = poisoned_engine(tmp.path());
    let mut tokens = a.clone();
    tokens.push(POISON);
    e.import_sequence(SeqId(5), tokens, a.len(), greedy(6), &export).expect("import");
    e.add_sequence(SeqId(6), b.clone(), greedy(6), 0).expect("add");
    e.prefill(&[SeqId(6)]).all_ok("prefill");
    let mut out = e.decode_step(&[SeqId(5), SeqId(6)]).expect("the step runs");
    let err = out.remove(0).expect_err("the poisoned sequence fails");
    assert!(matches!(err, EngineError::NonFiniteLogits { seq: 5, .. }), "{err:?}");
    assert!(out.remove(0).is_ok(), "the other sequence goes on");
    e.release(SeqId(5)).expect("release");
    while e.generated(SeqId(6)).expect("seq").len() < 6 {
        e.decode_step(&[SeqId(6)]).all_ok("decode");
    }
    assert_eq!(e.generated(SeqId(6)).expect("seq"), &want_b[..]);
}
