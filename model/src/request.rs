//! The request vocabulary every role shares: the limits a prompt and its sampling are checked
//! against (one check, run by the router after it fills in defaults, again by each worker at
//! its trust boundary, and by the engine when a sequence is added), the refusal naming the
//! field, and the one rule for when a sequence stops.

use crate::config::ModelConfig;
use crate::engine::FinishReason;
use crate::sampling::SamplingParams;

/// Most prompt logits a request may ask for.
pub const MAX_PROMPT_LOGITS_TOP: usize = 1000;

/// What a request is checked against, taken from the model's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub vocab_size: usize,
    /// Tokens a sequence may hold, prompt and generated together (`max_position_embeddings`).
    pub context: usize,
    pub max_prompt_logits_top: usize,
}

/// A request refused before it runs; the message starts with the field it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    /// The prompt could not be turned into token ids (missing, empty text, no tokenizer, a
    /// bad chat message, ...): the reason.
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("prompt: empty; at least one token is required")]
    EmptyPrompt,
    /// A text prompt found to be longer than the context before it was tokenized to the end.
    #[error("prompt: the text is at least {at_least} tokens, more than the model's context of {context} tokens")]
    TextTooLong { at_least: usize, context: usize },
    #[error("{field}: token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { field: &'static str, id: u32, vocab: usize },
    /// Prompt plus max_new_tokens do not fit the context (the prompt alone may not).
    #[error("{}", context_exceeded(*.prompt, *.max_new, *.context))]
    ContextExceeded { prompt: usize, max_new: usize, context: usize },
    #[error("max_new_tokens 0 must be >= 1")]
    NoNewTokens,
    #[error("temperature {0} must be >= 0")]
    Temperature(f32),
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
    #[error("prompt_logits_top {got} must be <= {max}")]
    PromptLogitsTop { got: usize, max: usize },
}

fn context_exceeded(prompt: usize, max_new: usize, context: usize) -> String {
    if prompt >= context {
        format!("prompt: {prompt} tokens leave no room in the model's context of {context} tokens")
    } else {
        format!(
            "max_new_tokens {max_new}: prompt of {prompt} tokens plus max_new_tokens exceeds the model's context of {context} tokens"
        )
    }
}

impl InvalidRequest {
    /// The request field the refusal is about (the message starts with it).
    pub fn field(&self) -> &'static str {
        match self {
            InvalidRequest::Prompt(_) | InvalidRequest::EmptyPrompt | InvalidRequest::TextTooLong { .. } => "prompt",
            InvalidRequest::TokenOutOfVocab { field, .. } => field,
            InvalidRequest::ContextExceeded { prompt, context, .. } if prompt >= context => "prompt",
            InvalidRequest::ContextExceeded { .. } | InvalidRequest::NoNewTokens => "max_new_tokens",
            InvalidRequest::Temperature(_) => "temperature",
            InvalidRequest::TopP(_) => "top_p",
            InvalidRequest::PromptLogitsTop { .. } => "prompt_logits_top",
        }
    }
}

impl RequestLimits {
    pub fn of(config: &ModelConfig) -> Self {
        RequestLimits {
            vocab_size: config.vocab_size,
            context: config.max_position_embeddings,
            max_prompt_logits_top: MAX_PROMPT_LOGITS_TOP,
        }
    }

    /// Checks a prompt, its sampling and the prompt logits it asks for; the first problem
    /// found, in the order of the public request's fields.
    pub fn check(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        prompt_logits_top: usize,
    ) -> Result<(), InvalidRequest> {
        self.check_ids("prompt", prompt)?;
        self.check_sized(prompt.len(), params, prompt_logits_top)
    }

    /// [`RequestLimits::check`], and what only the public API refuses: stop ids outside the
    /// vocabulary, which can never match (the engine's callers use one to mean "run to
    /// max_new_tokens").
    pub fn check_public(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        prompt_logits_top: usize,
    ) -> Result<(), InvalidRequest> {
        self.check(prompt, params, prompt_logits_top)?;
        self.check_ids("stop_token_ids", &params.stop_token_ids)
    }

    /// [`RequestLimits::check`] for a sequence whose prompt is elsewhere and only its length
    /// is known (a cache reserved for a prompt prefilled on another worker).
    pub fn check_sized(
        &self,
        prompt_tokens: usize,
        params: &SamplingParams,
        prompt_logits_top: usize,
    ) -> Result<(), InvalidRequest> {
        let context = self.context;
        let exceeded =
            || InvalidRequest::ContextExceeded { prompt: prompt_tokens, max_new: params.max_new_tokens, context };
        if prompt_tokens == 0 {
            return Err(InvalidRequest::EmptyPrompt);
        }
        if prompt_tokens >= context {
            return Err(exceeded());
        }
        if params.max_new_tokens == 0 {
            return Err(InvalidRequest::NoNewTokens);
        }
        if params.max_new_tokens > context - prompt_tokens {
            return Err(exceeded());
        }
        if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
            return Err(InvalidRequest::Temperature(params.temperature));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(InvalidRequest::TopP(params.top_p));
        }
        if prompt_logits_top > self.max_prompt_logits_top {
            return Err(InvalidRequest::PromptLogitsTop { got: prompt_logits_top, max: self.max_prompt_logits_top });
        }
        Ok(())
    }

    /// Every id of `field` is inside the vocabulary.
    pub fn check_ids(&self, field: &'static str, ids: &[u32]) -> Result<(), InvalidRequest> {
        match ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&id) => Err(InvalidRequest::TokenOutOfVocab { field, id, vocab: self.vocab_size }),
            None => Ok(()),
        }
    }
}

/// `token` ends generation: one of the request's stop ids, or the model's EOS (`eos`) when it
/// gave none.
pub fn is_stop(eos: &[u32], params: &SamplingParams, token: u32) -> bool {
    if params.stop_token_ids.is_empty() { eos.contains(&token) } else { params.stop_token_ids.contains(&token) }
}

/// Why a sequence ends after emitting `token` as its `generated`-th token (counted from 1),
/// if it does: a stop token wins over the length limit.
pub fn finish_reason(eos: &[u32], params: &SamplingParams, token: u32, generated: usize) -> Option<FinishReason> {
    if is_stop(eos, params, token) {
        Some(FinishReason::Stop)
    } else if generated >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { vocab_size: 260, context: 4096, max_prompt_logits_top: 1000 };

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { max_new_tokens: 8, seed: Some(1), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    fn refusal(prompt: &[u32], p: SamplingParams, logits_top: usize) -> InvalidRequest {
        LIMITS.check_public(prompt, &p, logits_top).expect_err("should be refused")
    }

    #[test]
    fn every_bad_field_is_named_first() {
        let ok = params(|_| {});
        LIMITS.check_public(&[1, 2], &ok, 1000).expect("valid");
        let never_stops = params(|p| p.stop_token_ids = vec![260]);
        LIMITS.check(&[1, 2], &never_stops, 0).expect("a stop id that never matches is fine inside");
        let cases: Vec<(InvalidRequest, &str)> = vec![
            (refusal(&[], ok.clone(), 0), "prompt: empty"),
            (refusal(&[1, 260], ok.clone(), 0), "prompt: token id 260 is outside the vocabulary (size 260)"),
            (refusal(&[1; 4096], ok.clone(), 0), "prompt: 4096 tokens leave no room"),
            (refusal(&[1], params(|p| p.max_new_tokens = 0), 0), "max_new_tokens 0 must be >= 1"),
            (refusal(&[1; 10], params(|p| p.max_new_tokens = 5000), 0), "max_new_tokens 5000: prompt of 10 tokens"),
            (refusal(&[1], params(|p| p.temperature = -1.0), 0), "temperature -1 must be >= 0"),
            (refusal(&[1], params(|p| p.temperature = f32::NAN), 0), "temperature NaN"),
            (refusal(&[1], params(|p| p.temperature = f32::INFINITY), 0), "temperature inf"),
            (refusal(&[1], params(|p| p.top_p = 0.0), 0), "top_p 0 must be in (0, 1]"),
            (refusal(&[1], params(|p| p.top_p = 1.5), 0), "top_p 1.5"),
            (refusal(&[1], params(|p| p.top_p = f32::NAN), 0), "top_p NaN"),
            (refusal(&[1], params(|p| p.stop_token_ids = vec![5000]), 0), "stop_token_ids: token id 5000"),
            (refusal(&[1], ok.clone(), 1001), "prompt_logits_top 1001 must be <= 1000"),
        ];
        for (e, want) in cases {
            let msg = e.to_string();
            assert!(msg.starts_with(want), "{msg:?} should start with {want:?}");
            assert!(msg.starts_with(e.field()), "{msg:?} should start with its field {:?}", e.field());
        }
    }

    #[test]
    fn the_context_holds_prompt_and_generation_exactly() {
        LIMITS.check(&[1; 4088], &params(|_| {}), 0).expect("4088 + 8 = 4096 fits");
        let e = refusal(&[1; 4089], params(|_| {}), 0);
        assert_eq!(e, InvalidRequest::ContextExceeded { prompt: 4089, max_new: 8, context: 4096 });
        assert_eq!(e.field(), "max_new_tokens");
        // A reservation checks the same rules from the length alone.
        assert_eq!(LIMITS.check_sized(4089, &params(|_| {}), 0), Err(e));
        assert_eq!(LIMITS.check_sized(0, &params(|_| {}), 0), Err(InvalidRequest::EmptyPrompt));
        let huge = params(|p| p.max_new_tokens = usize::MAX);
        assert!(matches!(LIMITS.check_sized(1, &huge, 0), Err(InvalidRequest::ContextExceeded { .. })));
    }

    #[test]
    fn stop_ids_replace_eos_and_stop_wins_over_length() {
        let eos = [257];
        let own = params(|p| p.stop_token_ids = vec![7]);
        assert!(is_stop(&eos, &params(|_| {}), 257));
        assert!(!is_stop(&eos, &own, 257));
        assert!(is_stop(&eos, &own, 7));
        assert_eq!(finish_reason(&eos, &own, 7, 8), Some(FinishReason::Stop));
        assert_eq!(finish_reason(&eos, &own, 3, 8), Some(FinishReason::Length));
        assert_eq!(finish_reason(&eos, &own, 3, 7), None);
    }
}
