//! `expertmesh generate`: load a checkpoint, run one prompt, print the continuation.

use crate::sampling_args::{JsonOut, LOGITS_TOP, SamplingArgs, Speculative};
use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::args::{ModelArgs, SpeculationArgs};
use model::{
    Engine, EngineError, EngineOptions, LoadOptions, SamplingParams, SeqId, SpeculationStats, StepOutput, load_model,
};
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    // `--model`, `--dtype`, `--precision`: the engine flags, without the serving cache (the
    // cache here is sized to the prompt and `--max-new-tokens`).
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Prompt text (BOS is prepended).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, used exactly as given (no BOS added), e.g. 0,15,27.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Render the prompt as a user turn with the checkpoint's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Compute device: cpu, or cuda:N (an NVIDIA GPU; GEMM inputs are rounded to bf16 there,
    /// as `--precision bf16` does on the CPU).
    #[arg(long, default_value = "cpu")]
    device: kernels::Device,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.device;
    device.check()?;
    let dir = crate::model_dir::resolve(args.model.dir.clone())?;
    let weight_dtype = args.model.weight_dtype();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let loaded = load_model(&dir, LoadOptions { weight_dtype, local_experts: true }, &|p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    })
    .with_context(|| format!("loading {}", dir.display()))?;
    bar.finish_and_clear();
    let prompt_ids = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = loaded.tokenizer.as_ref().with_context(|| format!("{} has no tokenizer.json", dir.display()))?;
            if args.chat { tok.encode_chat(text)? } else { tok.encode(text)? }
        }
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    let precision = args.model.precision();
    let experts = loaded.experts.context("local experts were requested")?.with_precision(precision);
    let mut model = loaded.model;
    model.set_precision(precision);
    let model = Arc::new(model);
    let s = &args.sampling;
    let cache_tokens = prompt_ids.len() + s.max_new_tokens;
    let opts = EngineOptions {
        cache_tokens,
        block_size: 16,
        device,
        speculative_tokens: args.speculation.speculative_tokens as usize,
        ..EngineOptions::default()
    };
    let mut engine = Engine::on_device(model, Arc::new(experts), opts)?;
    let params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        max_new_tokens: s.max_new_tokens,
        stop_token_ids: Vec::new(),
    };
    let id = SeqId(0);
    engine.add_sequence(id, prompt_ids.clone(), params, LOGITS_TOP)?;
    let mut out = only(engine.prefill(&[id])?)?;
    let top = std::mem::take(&mut out.prompt_logits_top);
    let mut spec = SpeculationStats::default();
    let tokenizer = loaded.tokenizer.as_ref();
    let mut stdout = std::io::stdout().lock();
    let mut printed = String::new();
    loop {
        if !args.json
            && let Some(tok) = tokenizer
        {
            // Stream: print what the decoded text gained since last time.
            // Hold back while the last character is an incomplete UTF-8 sequence.
            let text = tok.decode(engine.generated(id)?)?;
            if let Some(new) = text.strip_prefix(printed.as_str()).filter(|n| !n.ends_with('\u{FFFD}')) {
                write!(stdout, "{new}")?;
                stdout.flush()?;
                printed = text;
            }
        }
        if out.finish.is_some() {
            break;
        }
        out = only(engine.decode_step(&[id])?)?;
        spec.add(&out);
    }
    let generated_ids = engine.generated(id)?.to_vec();
    let text = match tokenizer {
        Some(t) => t.decode(&generated_ids)?,
        None => String::new(),
    };
    if args.json {
        let speculative = Speculative { draft_tokens: spec.draft_tokens, accepted_tokens: spec.accepted_tokens };
        let json = JsonOut { prompt_ids, generated_ids, text, last_prompt_logits_top: top, speculative };
        writeln!(stdout, "{}", serde_json::to_string(&json)?)?;
    } else if tokenizer.is_none() {
        writeln!(stdout, "{generated_ids:?}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

/// The one sequence's result of a step: its token, or the error that ended it (non-finite
/// logits).
fn only(step: Vec<Result<StepOutput, EngineError>>) -> anyhow::Result<StepOutput> {
    Ok(step.into_iter().next().context("the engine returns one result per sequence")??)
}
