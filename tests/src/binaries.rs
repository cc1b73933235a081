//! The binaries under test (found next to the test executable), the shared model cache every
//! process of a test run uses, and the in-process reference output (`expertmesh generate`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::OnceCell;

/// The service binaries a cluster runs, plus the reference CLI.
pub const ROUTER: &str = "router";
pub const PREFILL_WORKER: &str = "prefill-worker";
pub const DECODE_WORKER: &str = "decode-worker";
pub const EXPERT_WORKER: &str = "expert-worker";
pub const CONTROLLER: &str = "expert-controller";
pub const CLI: &str = "expertmesh";
/// The decode worker with routed experts that panic (`src/bin/decode_worker_failing_experts.rs`).
pub const DECODE_WORKER_FAILING_EXPERTS: &str = "decode-worker-failing-experts";

/// Longest a reference generation may take (it loads the model each time).
const REFERENCE_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/<profile>`: the test executable is `target/<profile>/deps/<test>-<hash>`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable lies in a directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary; panics with how to build it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --release --workspace --bins` \
         (tools/test.sh does this before `cargo test`)",
        path.display()
    );
    path
}

/// `XDG_CACHE_HOME` of every process the tests start: the default model is generated there
/// once (`<target>/<profile>/cluster-tests-cache/expertmesh/default-model-vN`, rebuilt when
/// its version changes) and shared by every test of every run.
pub fn cache_home() -> PathBuf {
    bin_dir().join("cluster-tests-cache")
}

/// Environment every spawned process gets.
pub fn base_env() -> Vec<(String, String)> {
    vec![
        ("XDG_CACHE_HOME".into(), cache_home().display().to_string()),
        ("RUST_BACKTRACE".into(), "1".into()),
        // Plain log files (no colour escapes).
        ("NO_COLOR".into(), "1".into()),
    ]
}

/// Creates the default model once per test binary, before any cluster starts, so that
/// several processes never write it at the same time.
pub async fn ensure_model() {
    static MODEL: OnceCell<()> = OnceCell::const_new();
    MODEL
        .get_or_init(|| async {
            let out = run_cli(&["generate", "--prompt-ids", "1", "--max-new-tokens", "1"]).await;
            assert!(
                out.status.success(),
                "`expertmesh generate` could not create the default model in {}:\n{}",
                cache_home().display(),
                String::from_utf8_lossy(&out.stderr)
            );
        })
        .await;
}

/// The default model's directory under [`cache_home`], written there first if needed.
pub async fn default_model_dir() -> PathBuf {
    ensure_model().await;
    cache_home().join("expertmesh").join(format!("default-model-v{}", model::default_model::VERSION))
}

/// The default model's tokenizer (what the router tokenizes text prompts with).
pub async fn default_tokenizer() -> model::Tokenizer {
    let dir = default_model_dir().await;
    let config = model::ModelConfig::from_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    model::Tokenizer::from_dir(&dir, &config)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .unwrap_or_else(|| panic!("the default model in {} has no tokenizer", dir.display()))
}

/// Runs `expertmesh` with `args` (bounded by the reference timeout).
pub async fn run_cli(args: &[&str]) -> std::process::Output {
    let cli = binary(CLI);
    let mut cmd = tokio::process::Command::new(&cli);
    cmd.args(args).envs(base_env()).stdin(std::process::Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(REFERENCE_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {} {args:?}: {e}", cli.display()),
        Err(_) => panic!("{} {args:?} did not finish within {REFERENCE_TIMEOUT:?}", cli.display()),
    }
}

/// `expertmesh generate --json` on a prompt: greedy, no sampling options.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    /// The 20 largest logits at the last prompt position, largest first.
    pub last_prompt_logits_top: Vec<(u32, f32)>,
}

/// Greedy continuation of `prompt_ids` by the in-process engine (see [`reference_full`]).
pub async fn reference(prompt_ids: &[u32], max_new_tokens: u32) -> Vec<u32> {
    reference_full(prompt_ids, max_new_tokens).await.generated_ids
}

/// Runs `expertmesh generate --json --prompt-ids .. --max-new-tokens .. --speculative-tokens 0`
/// (memoized per test binary: the same prompt is run once). Without speculation: the workers
/// speculate by default, and must give exactly what plain decoding gives.
pub async fn reference_full(prompt_ids: &[u32], max_new_tokens: u32) -> Reference {
    type Memo = Mutex<HashMap<(Vec<u32>, u32), Reference>>;
    static MEMO: OnceLock<Memo> = OnceLock::new();
    let memo = MEMO.get_or_init(Memo::default);
    let key = (prompt_ids.to_vec(), max_new_tokens);
    if let Some(hit) = memo.lock().expect("memo lock").get(&key) {
        return hit.clone();
    }
    ensure_model().await;
    let ids = prompt_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let max_new = max_new_tokens.to_string();
    let args = ["generate", "--json", "--prompt-ids", &ids, "--max-new-tokens", &max_new, "--speculative-tokens", "0"];
    let out = run_cli(&args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reference `expertmesh {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = parse_reference(&stdout)
        .unwrap_or_else(|e| panic!("cannot parse `expertmesh generate --json` output ({e}): {stdout}"));
    assert_eq!(reference.prompt_ids, prompt_ids, "generate ran other prompt ids than asked");
    memo.lock().expect("memo lock").insert(key, reference.clone());
    reference
}

/// References of several prompts, two at a time (the test machines have 2 cores).
pub async fn references(prompts: &[Vec<u32>], max_new_tokens: u32) -> Vec<Reference> {
    ensure_model().await;
    let mut out = Vec::with_capacity(prompts.len());
    for pair in prompts.chunks(2) {
        match pair {
            [a, b] => {
                let (ra, rb) = tokio::join!(reference_full(a, max_new_tokens), reference_full(b, max_new_tokens));
                out.push(ra);
                out.push(rb);
            }
            [a] => out.push(reference_full(a, max_new_tokens).await),
            _ => unreachable!("chunks(2) yields one or two"),
        }
    }
    out
}

/// Parses the one JSON line `expertmesh generate --json` prints.
pub fn parse_reference(stdout: &str) -> Result<Reference, String> {
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or("no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let ids = |field: &str| -> Result<Vec<u32>, String> {
        v[field]
            .as_array()
            .ok_or(format!("{field} is not an array"))?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or(format!("{field}: {x} is not a u32")))
            .collect()
    };
    let top = v["last_prompt_logits_top"]
        .as_array()
        .ok_or("last_prompt_logits_top is not an array")?
        .iter()
        .map(|pair| {
            let id = pair[0].as_u64().and_then(|x| u32::try_from(x).ok());
            let logit = pair[1].as_f64();
            match (id, logit) {
                #[allow(clippy::cast_possible_truncation)]
                (Some(id), Some(logit)) => Ok((id, logit as f32)),
                _ => Err(format!("last_prompt_logits_top entry {pair} is not [id, logit]")),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Reference {
        prompt_ids: ids("prompt_ids")?,
        generated_ids: ids("generated_ids")?,
        text: v["text"].as_str().ok_or("text is not a string")?.to_string(),
        last_prompt_logits_top: top,
    })
}

/// `expertmesh generate --json` on `device` (`cuda:0`, say): the reference of a cluster whose
/// workers run there. `Err` carries the command's stderr when it fails (no such device).
pub async fn reference_on(prompt_ids: &[u32], max_new_tokens: u32, device: &str) -> Result<Reference, String> {
    ensure_model().await;
    let ids = prompt_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let max_new = max_new_tokens.to_string();
    let out =
        run_cli(&["generate", "--json", "--prompt-ids", &ids, "--max-new-tokens", &max_new, "--device", device]).await;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    parse_reference(&String::from_utf8_lossy(&out.stdout))
}
