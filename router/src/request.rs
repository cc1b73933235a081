//! A public request turned into a job: prompt resolved to ids (a text only as far as the
//! context allows), sampling defaults filled in, then checked by the model's one request
//! check ([`RequestLimits::check_public`]), each refusal naming the field.

use model::tokenizer::Bounded;
use model::{ChatMessage, InvalidRequest, RequestLimits, SamplingParams, Tokenizer};

/// Defaults for unset sampling fields.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;

/// The prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// Sampling fields as the client gave them (`None` = unset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop_token_ids: Vec<u32>,
}

/// A validated request, ready to schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub prompt: Vec<u32>,
    /// `seed` is always set, so a retried request draws the same tokens.
    pub params: SamplingParams,
    pub prompt_logits_top: usize,
}

fn prompt_error(m: impl Into<String>) -> InvalidRequest {
    InvalidRequest::Prompt(m.into())
}

/// Tokenizes the prompt (text, token ids, or chat messages). A text or chat prompt is
/// tokenized only until it has more than `max_tokens` ids ([`Tokenizer::encode_bounded`]),
/// then refused with `too_long(at_least)`; ids are taken as given. Can be long: never call
/// it on the async runtime.
pub fn prompt_ids(
    prompt: Option<Prompt>,
    tokenizer: Option<&Tokenizer>,
    max_tokens: usize,
    too_long: impl FnOnce(usize) -> InvalidRequest,
) -> Result<Vec<u32>, InvalidRequest> {
    let need_tok = || tokenizer.ok_or_else(|| prompt_error("this model has no tokenizer.json; send token_ids"));
    let bounded = match prompt.ok_or_else(|| prompt_error("one of text, token_ids or chat is required"))? {
        Prompt::Ids(ids) => return Ok(ids),
        Prompt::Text(text) if text.is_empty() => return Err(prompt_error("text is empty")),
        Prompt::Text(text) => need_tok()?.encode_bounded(&text, max_tokens),
        Prompt::Chat(messages) if messages.is_empty() => return Err(prompt_error("chat has no messages")),
        Prompt::Chat(messages) => {
            if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
                return Err(prompt_error(format!("chat role {:?} must be system, user or assistant", m.role)));
            }
            need_tok()?.encode_messages_bounded(&messages, max_tokens)
        }
    };
    match bounded.map_err(|e| prompt_error(e.to_string()))? {
        Bounded::Ids(ids) => Ok(ids),
        Bounded::TooLong { at_least } => Err(too_long(at_least)),
    }
}

/// [`prompt_ids`] for a prompt to run: at most the context is tokenized, and a text found
/// longer is refused naming the prompt and the context.
pub fn prompt_to_run(
    prompt: Option<Prompt>,
    tokenizer: Option<&Tokenizer>,
    limits: &RequestLimits,
) -> Result<Vec<u32>, InvalidRequest> {
    let context = limits.context;
    prompt_ids(prompt, tokenizer, context, |at_least| InvalidRequest::TextTooLong { at_least, context })
}

/// Fills in the unset sampling fields, then checks the request against `limits`.
pub fn job(
    prompt: Vec<u32>,
    s: SamplingRequest,
    prompt_logits_top: u32,
    limits: &RequestLimits,
    fresh_seed: impl FnOnce() -> u64,
) -> Result<Job, InvalidRequest> {
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(0.0),
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(1.0),
        seed: None,
        max_new_tokens: s.max_new_tokens.map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize),
        stop_token_ids: s.stop_token_ids,
    };
    let prompt_logits_top = prompt_logits_top as usize;
    limits.check_public(&prompt, &params, prompt_logits_top)?;
    Ok(Job {
        prompt,
        params: SamplingParams { seed: Some(s.seed.unwrap_or_else(fresh_seed)), ..params },
        prompt_logits_top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        let dir = model::default_model::resolve_dir(None).expect("default model");
        RequestLimits::of(&model::ModelConfig::from_dir(&dir).expect("config"))
    }

    fn tokenizer() -> Tokenizer {
        let dir = model::default_model::resolve_dir(None).expect("default model");
        let config = model::ModelConfig::from_dir(&dir).expect("config");
        Tokenizer::from_dir(&dir, &config).expect("tokenizer").expect("the default model has one")
    }

    fn err(prompt: Vec<u32>, s: SamplingRequest) -> String {
        job(prompt, s, 0, &limits(), || 1).expect_err("should be refused").to_string()
    }

    #[test]
    fn every_bad_field_is_named() {
        let ok = SamplingRequest::default();
        assert!(err(vec![], ok.clone()).starts_with("prompt: empty"));
        assert!(err(vec![1; 4096], ok.clone()).contains("context"));
        assert!(err(vec![99_999], ok.clone()).contains("token id 99999"));
        let s = |f: &dyn Fn(&mut SamplingRequest)| {
            let mut s = SamplingRequest::default();
            f(&mut s);
            s
        };
        assert_eq!(err(vec![1], s(&|s| s.max_new_tokens = Some(0))), "max_new_tokens 0 must be >= 1");
        assert!(err(vec![1; 10], s(&|s| s.max_new_tokens = Some(5000))).starts_with("max_new_tokens 5000"));
        assert!(err(vec![1], s(&|s| s.temperature = Some(-1.0))).starts_with("temperature -1"));
        assert!(err(vec![1], s(&|s| s.top_p = Some(0.0))).starts_with("top_p 0"));
        assert!(err(vec![1], s(&|s| s.top_p = Some(1.5))).starts_with("top_p 1.5"));
        assert!(err(vec![1], s(&|s| s.stop_token_ids = vec![99_999])).starts_with("stop_token_ids"));
        let e = job(vec![1], SamplingRequest::default(), 1001, &limits(), || 1).expect_err("too many logits");
        assert!(e.to_string().starts_with("prompt_logits_top 1001"));
    }

    #[test]
    fn defaults_fill_unset_fields_and_seed_is_fixed() {
        let j = job(vec![1, 2], SamplingRequest::default(), 3, &limits(), || 42).expect("valid");
        assert_eq!(j.params.max_new_tokens, DEFAULT_MAX_NEW_TOKENS);
        assert_eq!(j.params.temperature, 0.0);
        assert_eq!(j.params.top_p, 1.0);
        assert_eq!(j.params.seed, Some(42));
        assert_eq!(j.prompt_logits_top, 3);
    }

    #[test]
    fn prompts_resolve_or_name_the_problem() {
        let l = limits();
        let message = |r: Result<Vec<u32>, InvalidRequest>| r.unwrap_err().to_string();
        assert_eq!(prompt_to_run(Some(Prompt::Ids(vec![3])), None, &l), Ok(vec![3]));
        assert!(message(prompt_to_run(None, None, &l)).starts_with("prompt:"));
        assert!(message(prompt_to_run(Some(Prompt::Text(String::new())), None, &l)).contains("empty"));
        assert!(message(prompt_to_run(Some(Prompt::Text("hi".into())), None, &l)).contains("no tokenizer"));
    }

    #[test]
    fn a_text_longer_than_the_context_is_refused_naming_both() {
        let (t, limits) = (tokenizer(), limits());
        // " a" is one token of the default model's BPE: BOS, "a", then context - 2 of them.
        let fits = format!("a{}", " a".repeat(limits.context - 2));
        assert_eq!(prompt_to_run(Some(Prompt::Text(fits)), Some(&t), &limits).expect("fits").len(), limits.context);
        let e = prompt_to_run(Some(Prompt::Text("a".repeat(4 << 20))), Some(&t), &limits).expect_err("too long");
        assert!(matches!(e, InvalidRequest::TextTooLong { at_least, context } if at_least > context), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("prompt:") && msg.contains("context of 4096"), "{msg}");
    }
}
