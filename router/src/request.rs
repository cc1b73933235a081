//! A public request turned into a job: prompt resolved to ids, sampling defaults filled in,
//! and every field validated against the model, each error naming the field.

use model::{ChatMessage, ModelConfig, SamplingParams, Tokenizer};

/// Defaults for unset sampling fields.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;
/// Most prompt logits a request may ask for.
pub const MAX_PROMPT_LOGITS_TOP: usize = 1000;

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

/// A request the router refuses; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

fn invalid(m: impl Into<String>) -> InvalidRequest {
    InvalidRequest(m.into())
}

/// Tokenizes the prompt (text, token ids, or chat messages).
pub fn prompt_ids(prompt: Option<Prompt>, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, InvalidRequest> {
    let need_tok = || tokenizer.ok_or_else(|| invalid("prompt: this model has no tokenizer.json; send token_ids"));
    match prompt.ok_or_else(|| invalid("prompt: one of text, token_ids or chat is required"))? {
        Prompt::Ids(ids) => Ok(ids),
        Prompt::Text(text) if text.is_empty() => Err(invalid("prompt: text is empty")),
        Prompt::Text(text) => need_tok()?.encode(&text).map_err(|e| invalid(format!("prompt: {e}"))),
        Prompt::Chat(messages) if messages.is_empty() => Err(invalid("prompt: chat has no messages")),
        Prompt::Chat(messages) => {
            if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
                return Err(invalid(format!("prompt: chat role {:?} must be system, user or assistant", m.role)));
            }
            need_tok()?.encode_messages(&messages).map_err(|e| invalid(format!("prompt: {e}")))
        }
    }
}

/// Checks `prompt` and the sampling fields against the model and fills in defaults.
pub fn job(
    prompt: Vec<u32>,
    s: SamplingRequest,
    prompt_logits_top: u32,
    config: &ModelConfig,
    fresh_seed: impl FnOnce() -> u64,
) -> Result<Job, InvalidRequest> {
    let context = config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(invalid("prompt: empty; at least one token is required"));
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(invalid(format!("prompt: token id {id} is outside the vocabulary (size {})", config.vocab_size)));
    }
    if prompt.len() >= context {
        return Err(invalid(format!(
            "prompt: {} tokens leave no room in the model's context of {context} tokens",
            prompt.len()
        )));
    }
    let max_new = s.max_new_tokens.map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize);
    if max_new == 0 {
        return Err(invalid("max_new_tokens 0 must be >= 1"));
    }
    if prompt.len() + max_new > context {
        return Err(invalid(format!(
            "max_new_tokens {max_new}: prompt of {} tokens plus max_new_tokens exceeds the model's context of {context} tokens",
            prompt.len()
        )));
    }
    let temperature = s.temperature.unwrap_or(0.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(invalid(format!("temperature {temperature} must be >= 0")));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("top_p {top_p} must be in (0, 1]")));
    }
    if let Some(&id) = s.stop_token_ids.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(invalid(format!("stop_token_ids: {id} is outside the vocabulary (size {})", config.vocab_size)));
    }
    if prompt_logits_top as usize > MAX_PROMPT_LOGITS_TOP {
        return Err(invalid(format!("prompt_logits_top {prompt_logits_top} must be <= {MAX_PROMPT_LOGITS_TOP}")));
    }
    Ok(Job {
        prompt,
        params: SamplingParams {
            temperature,
            top_k: s.top_k as usize,
            top_p,
            seed: Some(s.seed.unwrap_or_else(fresh_seed)),
            max_new_tokens: max_new,
            stop_token_ids: s.stop_token_ids,
        },
        prompt_logits_top: prompt_logits_top as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let dir = model::default_model::resolve_dir(None).expect("default model");
        ModelConfig::from_dir(&dir).expect("config")
    }

    fn err(prompt: Vec<u32>, s: SamplingRequest) -> String {
        job(prompt, s, 0, &config(), || 1).expect_err("should be refused").0
    }

    #[test]
    fn every_bad_field_is_named() {
        let ok = SamplingRequest::default();
        assert!(err(vec![], ok.clone()).starts_with("prompt: empty"));
        assert!(err(vec![1; 4096], ok.clone()).contains("context"));
        assert!(err(vec![999], ok.clone()).contains("token id 999"));
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
        assert!(err(vec![1], s(&|s| s.stop_token_ids = vec![5000])).starts_with("stop_token_ids"));
    }

    #[test]
    fn defaults_fill_unset_fields_and_seed_is_fixed() {
        let j = job(vec![1, 2], SamplingRequest::default(), 3, &config(), || 42).expect("valid");
        assert_eq!(j.params.max_new_tokens, DEFAULT_MAX_NEW_TOKENS);
        assert_eq!(j.params.temperature, 0.0);
        assert_eq!(j.params.top_p, 1.0);
        assert_eq!(j.params.seed, Some(42));
        assert_eq!(j.prompt_logits_top, 3);
    }

    #[test]
    fn prompts_resolve_or_name_the_problem() {
        assert_eq!(prompt_ids(Some(Prompt::Ids(vec![3])), None), Ok(vec![3]));
        assert!(prompt_ids(None, None).unwrap_err().0.starts_with("prompt:"));
        assert!(prompt_ids(Some(Prompt::Text(String::new())), None).unwrap_err().0.contains("empty"));
        assert!(prompt_ids(Some(Prompt::Text("hi".into())), None).unwrap_err().0.contains("no tokenizer"));
    }
}
