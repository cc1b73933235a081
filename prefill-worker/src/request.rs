//! A prefill request and its outcome as domain types, and the admission checks the gRPC
//! layer runs before queueing (the model's request check, done without the engine thread).

use std::time::Duration;

use model::{CacheLayout, Engine, EngineError, InvalidRequest, RequestLimits, SamplingParams};

use crate::error::PrefillError;

/// One prompt to prefill and where its cache goes.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillRequest {
    /// Also the sequence id in the engine and the decode worker's reservation id.
    pub request_id: u64,
    pub prompt: Vec<u32>,
    /// The request's sampling, as the decode worker will continue it.
    pub params: SamplingParams,
    /// How many of the largest last-position logits to report (0: none).
    pub prompt_logits_top: usize,
    /// The decode worker holding the reservation.
    pub decode_addr: String,
}

impl PrefillRequest {
    /// The parameters the prefill engine runs with: the request's, but a budget of one new
    /// token. Prefill samples only the first token and releases the sequence, so reserving
    /// cache for `max_new_tokens` here would only shrink the batches; sampling does not
    /// depend on the budget, so the first token is the same.
    pub fn engine_params(&self) -> SamplingParams {
        SamplingParams { max_new_tokens: 1, ..self.params.clone() }
    }
}

/// What a successful prefill reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillOutcome {
    pub first_token: u32,
    /// Cache bytes the decode worker accepted (all layers).
    pub kv_bytes: u64,
    /// Waiting in the queue.
    pub queue: Duration,
    /// Running the batch.
    pub compute: Duration,
    /// From the last layer being ready to the decode worker's acknowledgement.
    pub transfer: Duration,
}

/// What admission needs to know about the model, copied out of the engine before it moves
/// to its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    pub request: RequestLimits,
    pub layout: CacheLayout,
}

impl ModelLimits {
    pub fn of(engine: &Engine) -> Self {
        ModelLimits { request: engine.limits(), layout: engine.cache_layout() }
    }

    /// The model's request check (with the request's real `max_new_tokens`, which the decode
    /// worker will use), plus that the prompt can fit this worker's cache at all, so a prompt
    /// that never could does not wait forever.
    pub fn check(&self, prompt: &[u32], params: &SamplingParams, prompt_logits_top: usize) -> Result<(), PrefillError> {
        self.request.check(prompt, params, prompt_logits_top).map_err(refused)?;
        let needed = self.layout.blocks_for(prompt.len() + 1);
        if needed > self.layout.num_blocks {
            return Err(PrefillError::PromptTooLarge {
                prompt_tokens: prompt.len(),
                needed,
                total: self.layout.num_blocks,
            });
        }
        Ok(())
    }
}

/// An invalid request, naming the field of the wire request it concerns.
fn refused(e: InvalidRequest) -> PrefillError {
    let field = match &e {
        InvalidRequest::Prompt(_)
        | InvalidRequest::EmptyPrompt
        | InvalidRequest::TextTooLong { .. }
        | InvalidRequest::TokenOutOfVocab { field: "prompt", .. }
        | InvalidRequest::ContextExceeded { .. } => "prompt_ids",
        InvalidRequest::PromptLogitsTop { .. } => "prompt_logits_top",
        _ => "sampling",
    };
    PrefillError::InvalidRequest { field, reason: e.to_string() }
}

/// An engine error about a request: a refusal of the request names its field
/// ([`PrefillError::InvalidRequest`]); a duplicate id is [`PrefillError::Duplicate`];
/// anything else is an engine failure.
pub fn invalid_request(e: EngineError) -> PrefillError {
    match e {
        EngineError::Invalid(e) => refused(e),
        EngineError::DuplicateSequence(id) => PrefillError::Duplicate(id),
        e => PrefillError::Engine(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ModelLimits {
        ModelLimits {
            request: RequestLimits { vocab_size: 10, context: 64, max_prompt_logits_top: 1000 },
            layout: CacheLayout { num_layers: 2, latent_dim: 4, block_size: 4, num_blocks: 8 },
        }
    }

    fn params() -> SamplingParams {
        SamplingParams { seed: Some(1), max_new_tokens: 4, ..SamplingParams::default() }
    }

    fn field(r: Result<(), PrefillError>) -> &'static str {
        match r {
            Err(PrefillError::InvalidRequest { field, .. }) => field,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn checks_name_the_field() {
        let l = limits();
        l.check(&[1, 2, 3], &params(), 0).expect("valid");
        assert_eq!(field(l.check(&[], &params(), 0)), "prompt_ids");
        assert_eq!(field(l.check(&[1, 10], &params(), 0)), "prompt_ids");
        assert_eq!(field(l.check(&[1; 61], &params(), 0)), "prompt_ids");
        let e = l.check(&[1], &SamplingParams { top_p: 0.0, ..params() }, 0).unwrap_err();
        assert!(matches!(e, PrefillError::InvalidRequest { field: "sampling", .. }));
        assert!(e.to_string().contains("top_p 0 must be in (0, 1]"), "{e}");
    }

    #[test]
    fn a_prompt_larger_than_the_whole_cache_is_refused() {
        // 8 blocks of 4 tokens: a prompt of 31 (+1 sampled) fits, 32 does not.
        let l = limits();
        let p = SamplingParams { max_new_tokens: 1, ..params() };
        l.check(&[1; 31], &p, 0).expect("fits");
        assert!(matches!(l.check(&[1; 32], &p, 0), Err(PrefillError::PromptTooLarge { needed: 9, total: 8, .. })));
    }

    #[test]
    fn engine_params_reserve_one_new_token_only() {
        let r = PrefillRequest {
            request_id: 1,
            prompt: vec![1],
            params: params(),
            prompt_logits_top: 0,
            decode_addr: "x".into(),
        };
        let p = r.engine_params();
        assert_eq!(p.max_new_tokens, 1);
        assert_eq!(SamplingParams { max_new_tokens: 4, ..p }, r.params);
    }
}
