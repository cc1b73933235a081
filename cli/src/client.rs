//! `expertmesh client`: send one prompt to a router's public API and stream the answer.

use crate::sampling_args::{JsonOut, LOGITS_TOP, SamplingArgs, Speculative};
use anyhow::{Context, bail};
use clap::Args;
use proto::v1::generation_client::GenerationClient;
use proto::v1::{self as pb, generate_request, generate_response};
use std::io::Write;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Router address, host:port.
    #[arg(long, env = "EXPERTMESH_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Prompt text (the router prepends BOS).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt token ids, used exactly as given, e.g. 0,15,27.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Send the prompt as a user turn, rendered with the model's chat template.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (as `expertmesh generate --json`) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    pub fn request(&self) -> anyhow::Result<pb::GenerateRequest> {
        let prompt = match (&self.prompt_ids, &self.prompt) {
            (Some(ids), _) => generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() }),
            (None, Some(text)) if self.chat => generate_request::Prompt::Chat(pb::Chat {
                messages: vec![pb::ChatMessage { role: "user".into(), content: text.clone() }],
            }),
            (None, Some(text)) => generate_request::Prompt::Text(text.clone()),
            (None, None) => bail!("one of --prompt or --prompt-ids is required"),
        };
        let s = &self.sampling;
        Ok(pb::GenerateRequest {
            prompt: Some(prompt),
            sampling: Some(pb::SamplingParams {
                max_new_tokens: Some(u32::try_from(s.max_new_tokens).context("--max-new-tokens is too large")?),
                temperature: Some(s.temperature),
                top_p: Some(s.top_p),
                top_k: u32::try_from(s.top_k).context("--top-k is too large")?,
                seed: s.seed,
                stop_token_ids: Vec::new(),
            }),
            prompt_logits_top: if self.json { LOGITS_TOP as u32 } else { 0 },
        })
    }
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(stream(&args, &mut std::io::stdout().lock()))
}

/// Sends the request and writes the answer to `w` (text as it streams, or the JSON object).
pub async fn stream(args: &ClientArgs, w: &mut dyn Write) -> anyhow::Result<()> {
    let channel = cluster_core::serve::channel(&args.addr, std::time::Duration::from_secs(5))?;
    let mut client = GenerationClient::new(channel);
    let mut responses = client
        .generate(args.request()?)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))
        .with_context(|| format!("request to {}", args.addr))?
        .into_inner();
    let mut out = JsonOut {
        prompt_ids: Vec::new(),
        generated_ids: Vec::new(),
        text: String::new(),
        last_prompt_logits_top: Vec::new(),
        speculative: Speculative::default(),
    };
    loop {
        let msg = responses
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))
            .with_context(|| format!("stream from {}", args.addr))?;
        match msg.and_then(|m| m.event) {
            Some(generate_response::Event::Token(t)) => {
                out.generated_ids.push(t.id);
                out.text.push_str(&t.text);
                if !t.prompt_logits_top.is_empty() {
                    out.last_prompt_logits_top = t.prompt_logits_top.iter().map(|l| (l.id, l.logit)).collect();
                }
                if !args.json {
                    write!(w, "{}", t.text)?;
                    w.flush()?;
                }
            }
            Some(generate_response::Event::Summary(s)) => {
                out.prompt_ids = s.prompt_ids;
                if let Some(spec) = s.speculative {
                    out.speculative =
                        Speculative { draft_tokens: spec.draft_tokens, accepted_tokens: spec.accepted_tokens };
                }
                // On stderr, so stdout stays the answer (and --json the same object as generate's).
                if !s.trace_id.is_empty() {
                    eprintln!("trace id: {}", s.trace_id);
                }
                if args.json {
                    writeln!(w, "{}", serde_json::to_string(&out)?)?;
                } else {
                    writeln!(w)?;
                }
                return Ok(());
            }
            None => bail!("the stream from {} ended without a summary", args.addr),
        }
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}
