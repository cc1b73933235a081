//! `expertmesh generate` as a user runs it: the real binary, on a transformers fixture and on
//! the embedded default model, and its errors on bad input; and the quickstart's `up`.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use common::{Expected, fixture};
use serde::Deserialize;
use std::path::Path;
use std::process::{Command, Output};

#[derive(Deserialize)]
struct Json {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    text: String,
    last_prompt_logits_top: Vec<(u32, f32)>,
    speculative: Speculative,
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Speculative {
    draft_tokens: u64,
    accepted_tokens: u64,
}

fn expertmesh(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_expertmesh"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("run expertmesh")
}

fn ok_json(out: Output) -> Json {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn fails_with(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(err.contains(needle), "stderr does not mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

#[test]
fn json_output_matches_transformers_on_a_fixture() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fixture("v3_f32");
    let exp: Expected = common::expected("v3_f32");
    let case = &exp.cases[1];
    let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
    let n = case.greedy.len().to_string();
    let dir_s = dir.to_str().expect("utf-8 path");
    let j = ok_json(expertmesh(
        &[
            "generate",
            "--model",
            dir_s,
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &n,
            "--json",
            "--dtype",
            "f32",
        ],
        tmp.path(),
    ));
    assert_eq!(j.prompt_ids, case.prompt_ids, "prompt ids are used exactly as given");
    // Generation may stop early at the model's EOS; what it produced must match.
    assert!(!j.generated_ids.is_empty());
    assert_eq!(j.generated_ids[..], case.greedy[..j.generated_ids.len()]);
    assert_eq!(j.last_prompt_logits_top.len(), 20);
    let mut want: Vec<(u32, f32)> = case.last_logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));
    for ((gi, gl), (wi, wl)) in j.last_prompt_logits_top.iter().zip(&want) {
        assert_eq!(gi, wi);
        assert!((gl - wl).abs() <= 1e-4, "logit of {gi}: {gl} vs {wl}");
    }
}

#[test]
fn default_model_generates_text_and_is_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = || {
        ok_json(expertmesh(&["generate", "--prompt", "Hello, world", "--max-new-tokens", "6", "--json"], tmp.path()))
    };
    let a = run();
    assert_eq!(a.prompt_ids[0], 0, "BOS prepended to a text prompt");
    assert!(a.prompt_ids.len() < 1 + "Hello, world".len(), "BPE merges bytes: {:?}", a.prompt_ids);
    assert!(!a.generated_ids.is_empty() && a.generated_ids.len() <= 6);
    assert_eq!(a.generated_ids, run().generated_ids, "greedy is deterministic");
    let _ = a.text;
    let s = ok_json(expertmesh(
        &[
            "generate",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.9",
            "--top-p",
            "0.8",
            "--seed",
            "7",
            "--json",
        ],
        tmp.path(),
    ));
    let t = ok_json(expertmesh(
        &[
            "generate",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.9",
            "--top-p",
            "0.8",
            "--seed",
            "7",
            "--json",
        ],
        tmp.path(),
    ));
    assert_eq!(s.generated_ids, t.generated_ids, "same seed, same tokens");
    assert_eq!(s.speculative, Speculative { draft_tokens: 0, accepted_tokens: 0 }, "off by default");
    let plain = |k: &str| {
        let args = ["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "24", "--json"];
        ok_json(expertmesh(&[&args[..], &["--speculative-tokens", k]].concat(), tmp.path()))
    };
    let (off, three) = (plain("0"), plain("3"));
    assert_eq!(off.speculative, Speculative { draft_tokens: 0, accepted_tokens: 0 });
    assert_eq!(three.generated_ids, off.generated_ids, "speculation changes no greedy token");
    assert!(three.speculative.accepted_tokens > 0, "{:?}", three.speculative);
    let b = ok_json(expertmesh(
        &["generate", "--prompt", "Hello, world", "--max-new-tokens", "6", "--json", "--precision", "bf16"],
        tmp.path(),
    ));
    assert_eq!(b.prompt_ids, a.prompt_ids);
    assert!(!b.generated_ids.is_empty() && b.generated_ids.len() <= 6);
}

#[test]
fn bad_input_is_a_precise_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fixture("v3_f32");
    let d = dir.to_str().expect("utf-8 path");
    fails_with(
        expertmesh(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "0"], tmp.path()),
        "/nonexistent/model",
    );
    fails_with(expertmesh(&["generate", "--model", d, "--prompt-ids", "0,99999"], tmp.path()), "99999");
    fails_with(
        expertmesh(&["generate", "--model", d, "--prompt-ids", "0", "--max-new-tokens", "0"], tmp.path()),
        "max_new_tokens",
    );
    fails_with(
        expertmesh(&["generate", "--model", d, "--prompt-ids", "0", "--temperature=-1"], tmp.path()),
        "temperature",
    );
    fails_with(expertmesh(&["generate", "--model", d, "--prompt-ids", "0", "--top-p", "1.5"], tmp.path()), "top_p");
    let long: Vec<String> = (0..300).map(|i| (i % 128).to_string()).collect();
    fails_with(expertmesh(&["generate", "--model", d, "--prompt-ids", &long.join(",")], tmp.path()), "context");
    fails_with(expertmesh(&["generate", "--model", d, "--prompt", "text"], tmp.path()), "tokenizer.json");
    fails_with(expertmesh(&["generate", "--prompt", "x", "--device", "cuda:0"], tmp.path()), "cuda");
}

/// The quickstart (`tools/up.sh`): the whole cluster in one process answers the README's demo
/// prompt with Python from the trained default model, with no replacement characters.
#[test]
fn the_quickstart_answers_the_demo_prompt_with_python() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let args = ["up", "--once", "--listen", "127.0.0.1:0", "--prompt", "def fibonacci(n):", "--max-new-tokens", "48"];
    let out = expertmesh(&args, tmp.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let answer =
        stdout.split_once("> def fibonacci(n):\n").map(|(_, a)| a).unwrap_or_else(|| panic!("no answer: {stdout}"));
    assert!(!answer.contains('\u{FFFD}'), "replacement characters in {answer:?}");
    // The body of a function: indented lines, and Python's words.
    let words = ["if ", "return", "for ", "not ", "None", "import ", "self", "# ", "else:", "in "];
    let found = words.iter().filter(|w| answer.contains(*w)).count();
    assert!(answer.contains("\n    ") && found >= 3, "{answer:?} does not read as the body of a Python function");
}
