//! Sampling flags shared by `generate` and `client` (same names, same defaults).

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
}

/// What `--json` prints, for `generate` and `client` alike.
#[derive(Debug, serde::Serialize)]
pub struct JsonOut {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub last_prompt_logits_top: Vec<(u32, f32)>,
    pub speculative: Speculative,
}

/// Speculative decoding of the request: tokens the MTP layer drafted, and those accepted.
#[derive(Debug, Default, serde::Serialize)]
pub struct Speculative {
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
}

/// How many of the largest last-prompt-position logits `--json` reports.
pub const LOGITS_TOP: usize = 20;
