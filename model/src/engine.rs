//! The engine API: sequences are added, prefilled in batches, stepped in batched decode, and
//! released; a sequence's latent cache can be exported and imported (prefill/decode split).
//!
//! Invariants: a sequence's cache blocks for its whole budget (prompt + max_new_tokens) are
//! reserved when it is added, so a running sequence never fails for lack of cache; blocks
//! return to the pool exactly once, on release.

use crate::EngineError;
use crate::backend::Backend;
use crate::cache::{CacheLayout, LatentCache, SequenceCacheExport};
use crate::experts::ExpertBackend;
use crate::forward::{LogitsWanted, Model, Segment};
use crate::kv::LayerRows;
use crate::request::{RequestLimits, finish_reason};
use crate::sampling::{AcceptRule, Sampler, SamplingParams, top_logits};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A sequence's id, chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Receives each finished layer of each sequence during [`Engine::prefill_streaming`].
pub type LayerSink<'a> = dyn FnMut(SeqId, LayerRows) + Send + 'a;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It emitted a stop token.
    Stop,
    /// It reached max_new_tokens.
    Length,
}

/// Engine sizing.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Tokens of latent cache (all sequences together).
    pub cache_tokens: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Where the forward pass and the cache live (see [`Engine::on_device`]).
    pub device: kernels::Device,
    /// Tokens the MTP layer drafts per sequence and decode step (0: no speculation). On a
    /// prefill engine, > 0 runs the MTP layer over prompts so a decode engine can speculate.
    pub speculative_tokens: usize,
    /// How drafts are verified ([`AcceptRule::Rejection`]: lossless).
    pub accept_rule: AcceptRule,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_tokens: 16 * 1024,
            block_size: 16,
            device: kernels::Device::Cpu,
            speculative_tokens: 0,
            accept_rule: AcceptRule::Rejection,
        }
    }
}

/// What one step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub seq: SeqId,
    /// The new tokens, in order: one, or with speculation up to one more than the drafts.
    pub tokens: Vec<u32>,
    pub finish: Option<FinishReason>,
    /// After prefill, when asked: the largest logits at the last prompt position.
    pub prompt_logits_top: Vec<(u32, f32)>,
    /// Tokens the MTP layer drafted for this step, and how many of them were accepted.
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
}

/// A sequence's speculative decoding so far: tokens drafted, drafts accepted, and the steps
/// that drafted (each emits its accepted drafts plus one token).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub draft_steps: u64,
}

impl SpeculationStats {
    /// Counts one step's output.
    pub fn add(&mut self, out: &StepOutput) {
        self.draft_tokens += out.draft_tokens as u64;
        self.accepted_tokens += out.accepted_tokens as u64;
        self.draft_steps += u64::from(out.draft_tokens > 0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Cache reserved; rows arriving from another worker ([`Engine::reserve_import`]).
    Importing,
    Waiting,
    Running,
    Finished,
}

#[derive(Debug)]
struct Sequence {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose latent rows are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    phase: Phase,
    prompt_logits_top: usize,
    /// While importing: tokens received per layer.
    imported_layers: Vec<Option<usize>>,
    /// The MTP layer's cache rows cover every cached position.
    mtp_rows: bool,
    /// The MTP layer's (`shared_head.norm`-ed) output at the last cached position: what the
    /// next step drafts from. `None` until the MTP layer ran (or arrived) for this sequence.
    mtp_hidden: Option<Vec<f32>>,
}

/// Errors (and finishes `s`) when `logits`, those of the input at `position`, are not all
/// finite: its activations overflowed, and no token can be sampled from them.
fn finite(id: SeqId, s: &mut Sequence, logits: &[f32], position: usize) -> Result<(), EngineError> {
    let Some(token) = logits.iter().position(|v| !v.is_finite()) else { return Ok(()) };
    s.phase = Phase::Finished;
    tracing::warn!(seq = %id, position, token, "non_finite_logits");
    Err(EngineError::NonFiniteLogits { seq: id.0, position, token })
}

#[path = "engine_speculation.rs"]
mod speculation;

/// A batch-capable inference engine over one model.
#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    experts: Arc<dyn ExpertBackend>,
    /// The block allocator, and the rows too unless they live on a GPU.
    cache: LatentCache,
    /// Where the forward pass runs and the rows live.
    backend: Backend,
    seqs: HashMap<SeqId, Sequence>,
    /// The MTP layer runs (its cache rows are the cache's last layer).
    mtp: bool,
    speculative_tokens: usize,
    accept_rule: AcceptRule,
    /// Whether the one warning about sequences imported without MTP rows was logged.
    warned_without_mtp_rows: bool,
}

impl Engine {
    /// The CPU engine. Fails with [`EngineError::CacheSize`] when the cache cannot be
    /// allocated.
    pub fn new(model: Arc<Model>, experts: Arc<dyn ExpertBackend>, opts: EngineOptions) -> Result<Self, EngineError> {
        debug_assert_eq!(opts.device, kernels::Device::Cpu, "Engine::new is the CPU engine; use Engine::on_device");
        Self::on_device(model, experts, opts)
    }

    /// An engine on `opts.device`: the CPU engine for `Device::Cpu`; for `Device::Cuda(n)`
    /// the model's weights (and its routed experts, when they are local) are copied to GPU
    /// `n` and the latent cache is allocated there. Fails with [`EngineError::Device`] when
    /// the GPU cannot be used (no driver, no such device, a build without CUDA), and with
    /// [`EngineError::CacheSize`] when the cache cannot be allocated.
    pub fn on_device(
        model: Arc<Model>,
        experts: Arc<dyn ExpertBackend>,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let mtp = opts.speculative_tokens > 0 && model.has_mtp() && opts.device == kernels::Device::Cpu;
        if opts.speculative_tokens > 0 && !mtp {
            let why = if model.has_mtp() { "the GPU engine runs no MTP layer" } else { "the model has no MTP layer" };
            tracing::warn!(speculative_tokens = opts.speculative_tokens, why, "speculative_decoding_off");
        }
        let layout = Self::layout_for(&model.config, opts, mtp);
        let (backend, cache) = Backend::open(opts.device, &model, experts.as_ref(), layout)?;
        let speculative_tokens = if mtp { opts.speculative_tokens } else { 0 };
        Ok(Engine {
            model,
            experts,
            cache,
            backend,
            seqs: HashMap::new(),
            mtp,
            speculative_tokens,
            accept_rule: opts.accept_rule,
            warned_without_mtp_rows: false,
        })
    }

    /// Main layers, then the MTP layer when it runs.
    fn layout_for(c: &crate::ModelConfig, opts: EngineOptions, mtp: bool) -> CacheLayout {
        let block_size = opts.block_size.max(1);
        CacheLayout {
            num_layers: c.num_hidden_layers + usize::from(mtp),
            latent_dim: c.latent_dim(),
            block_size,
            num_blocks: opts.cache_tokens.div_ceil(block_size),
        }
    }

    /// The device the forward pass runs on.
    pub fn device(&self) -> kernels::Device {
        self.backend.device()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn cache_layout(&self) -> CacheLayout {
        self.cache.layout()
    }

    /// Tokens drafted per sequence and step (0 when the engine does not speculate).
    pub fn speculative_tokens(&self) -> usize {
        self.speculative_tokens
    }

    pub fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// What requests are checked against on this engine's model.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits::of(&self.model.config)
    }

    /// Admits a sequence, reserving cache for prompt + max_new_tokens. `prompt_logits_top` > 0
    /// asks prefill to report that many of the largest last-prompt-position logits.
    pub fn add_sequence(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        prompt_logits_top: usize,
    ) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id.0));
        }
        self.limits().check(&prompt, &params, prompt_logits_top)?;
        let needed = self.cache.layout().blocks_for(prompt.len() + params.max_new_tokens);
        let blocks =
            self.cache.allocate(needed).ok_or(EngineError::CacheFull { needed, free: self.cache.free_blocks() })?;
        let seq = Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            cached: 0,
            blocks,
            sampler: Sampler::new(params),
            phase: Phase::Waiting,
            prompt_logits_top,
            imported_layers: Vec::new(),
            mtp_rows: false,
            mtp_hidden: None,
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Runs the prompts of `ids` (all waiting) in one batch and samples each first token;
    /// with speculation, then runs the MTP layer over every prompt position.
    ///
    /// One result per id, in order: the sequence's token, or the error that ended it alone
    /// ([`EngineError::NonFiniteLogits`]; it is then finished, to be released) while the rest
    /// of the batch goes on. The outer error fails the whole batch.
    pub fn prefill(&mut self, ids: &[SeqId]) -> Result<Vec<Result<StepOutput, EngineError>>, EngineError> {
        self.prefill_with(ids, None)
    }

    /// [`Engine::prefill`], handing each sequence's finished layer to `on_layer(seq, rows)`
    /// as soon as the layer is done (rows as in [`SequenceCacheExport::layers`]; the MTP
    /// layer's last, once the first tokens are sampled).
    pub fn prefill_streaming(
        &mut self,
        ids: &[SeqId],
        on_layer: &mut LayerSink<'_>,
    ) -> Result<Vec<Result<StepOutput, EngineError>>, EngineError> {
        self.prefill_with(ids, Some(on_layer))
    }

    /// One decode step for every sequence in `ids` (all running): each speculating sequence
    /// drafts up to `speculative_tokens` with the MTP layer, the target model verifies every
    /// draft in the same batch, and each sequence advances by its accepted drafts plus one
    /// token. Results as for [`Engine::prefill`].
    pub fn decode_step(&mut self, ids: &[SeqId]) -> Result<Vec<Result<StepOutput, EngineError>>, EngineError> {
        self.check_batch(ids, Phase::Running)?;
        let drafts = self.draft(ids)?;
        let inputs: Vec<Vec<u32>> = ids
            .iter()
            .zip(&drafts)
            .map(|(id, d)| {
                let s = &self.seqs[id];
                s.tokens[s.cached..].iter().copied().chain(d.iter().map(|d| d.token)).collect()
            })
            .collect();
        let segments: Vec<Segment<'_>> = ids
            .iter()
            .zip(&inputs)
            .map(|(id, tokens)| {
                let s = &self.seqs[id];
                Segment { tokens, start_pos: s.cached, block_table: &s.blocks, logits: LogitsWanted::All }
            })
            .collect();
        let starts: Vec<usize> = ids.iter().map(|id| self.seqs[id].cached).collect();
        let out =
            self.backend.forward(&self.model, &mut self.cache, &segments, self.experts.as_ref(), None, self.mtp)?;
        drop(segments);
        let results = self.accept(ids, &drafts, &out.logits);
        self.advance_mtp(ids, &starts, &results, &out.hidden, true, None)?;
        Ok(results)
    }

    /// Errors unless every id is a distinct sequence in `phase`.
    fn check_batch(&self, ids: &[SeqId], phase: Phase) -> Result<(), EngineError> {
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            let s = self.seqs.get(id).ok_or(EngineError::UnknownSequence(id.0))?;
            if !seen.insert(*id) {
                return Err(EngineError::RepeatedInBatch(id.0));
            }
            if s.phase != phase {
                let what = if phase == Phase::Waiting { "waiting for prefill" } else { "running" };
                return Err(EngineError::WrongState(id.0, what));
            }
        }
        Ok(())
    }

    fn prefill_with(
        &mut self,
        ids: &[SeqId],
        mut on_layer: Option<&mut LayerSink<'_>>,
    ) -> Result<Vec<Result<StepOutput, EngineError>>, EngineError> {
        self.check_batch(ids, Phase::Waiting)?;
        let segments: Vec<Segment<'_>> = ids
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                Segment { tokens: &s.tokens, start_pos: 0, block_table: &s.blocks, logits: LogitsWanted::Last }
            })
            .collect();
        // What a layer hook exports: only built when there is one.
        let tables: Vec<(SeqId, &[u32], usize)> = match on_layer {
            Some(_) => ids.iter().map(|id| (*id, &self.seqs[id].blocks[..], self.seqs[id].tokens.len())).collect(),
            None => Vec::new(),
        };
        let exports = on_layer.as_deref_mut().map(|f| (&tables[..], f));
        let out =
            self.backend.forward(&self.model, &mut self.cache, &segments, self.experts.as_ref(), exports, self.mtp)?;
        drop(segments);
        drop(tables);
        let mut results = Vec::with_capacity(ids.len());
        for (id, logits) in ids.iter().zip(&out.logits) {
            let s = self.seqs.get_mut(id).expect("checked above");
            s.cached = s.tokens.len();
            if let Err(e) = finite(*id, s, logits, s.tokens.len() - 1) {
                results.push(Err(e));
                continue;
            }
            let token = s.sampler.sample(logits, 0);
            let prompt_logits_top = top_logits(logits, s.prompt_logits_top);
            s.tokens.push(token);
            let finish = finish_reason(&self.model.config.eos_token_ids, s.sampler.params(), token, 1);
            s.phase = if finish.is_some() { Phase::Finished } else { Phase::Running };
            s.mtp_rows = self.mtp;
            results.push(Ok(StepOutput {
                seq: *id,
                tokens: vec![token],
                finish,
                prompt_logits_top,
                draft_tokens: 0,
                accepted_tokens: 0,
            }));
        }
        // Every prefilled sequence gets its MTP rows, finished ones too: a push announces
        // every layer of the cache.
        self.advance_mtp(ids, &vec![0; ids.len()], &results, &out.hidden, false, on_layer)?;
        Ok(results)
    }

    /// Tokens generated so far by `id`.
    pub fn generated(&self, id: SeqId) -> Result<&[u32], EngineError> {
        let s = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        Ok(&s.tokens[s.prompt_len..])
    }

    /// The MTP layer's output at the sequence's last cached position (empty when it has
    /// none): what a prefill worker ships with the cache ([`crate::kv::KvCommit::mtp_hidden`]).
    pub fn mtp_hidden(&self, id: SeqId) -> Result<Vec<f32>, EngineError> {
        let s = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        Ok(s.mtp_hidden.clone().unwrap_or_default())
    }

    /// Frees the sequence and its cache blocks.
    pub fn release(&mut self, id: SeqId) -> Result<(), EngineError> {
        let s = self.seqs.remove(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        self.cache.free(&s.blocks);
        Ok(())
    }

    /// The sequence's cached latent rows, layer by layer.
    pub fn export_cache(&self, id: SeqId) -> Result<SequenceCacheExport, EngineError> {
        let s = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        let layout = self.cache.layout();
        let layers = if s.mtp_rows { layout.num_layers } else { self.model.config.num_hidden_layers };
        Ok(SequenceCacheExport {
            num_tokens: s.cached,
            latent_dim: layout.latent_dim,
            layers: (0..layers).map(|l| self.export_layer(l, &s.blocks, s.cached)).collect::<Result<_, _>>()?,
            mtp_hidden: s.mtp_hidden.clone().unwrap_or_default(),
        })
    }

    /// Admits a sequence whose prompt was prefilled elsewhere: `tokens` is the prompt plus
    /// the tokens generated there (at least the first), `export` the prompt's cache.
    pub fn import_sequence(
        &mut self,
        id: SeqId,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        export: &SequenceCacheExport,
    ) -> Result<(), EngineError> {
        let layout = self.cache.layout();
        let main = self.model.config.num_hidden_layers;
        if export.latent_dim != layout.latent_dim || !(main..=layout.num_layers).contains(&export.layers.len()) {
            return Err(EngineError::BadCacheImport(format!(
                "shape {}x{} does not match this model's {} layers x {}",
                export.layers.len(),
                export.latent_dim,
                layout.num_layers,
                layout.latent_dim
            )));
        }
        self.check_import(&tokens, prompt_len, &params, export.num_tokens)?;
        self.reserve_import(id, prompt_len + params.max_new_tokens)?;
        let staged = (|| {
            for rows in &export.layers {
                self.import_layer(id, rows)?;
            }
            if !export.mtp_hidden.is_empty() {
                self.import_mtp_hidden(id, export.mtp_hidden.clone())?;
            }
            self.finish_import(id, tokens, prompt_len, params)
        })();
        if staged.is_err() {
            self.release(id).expect("reserved above");
        }
        staged
    }

    /// Reserves cache for `total_tokens` (prompt + max_new_tokens) of a sequence whose prompt
    /// cache will arrive layer by layer ([`Engine::import_layer`], then
    /// [`Engine::finish_import`]). [`Engine::release`] frees it at any stage.
    pub fn reserve_import(&mut self, id: SeqId, total_tokens: usize) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id.0));
        }
        let context = self.model.config.max_position_embeddings;
        if total_tokens == 0 || total_tokens > context {
            return Err(EngineError::BadCacheImport(format!(
                "reservation of {total_tokens} tokens must be between 1 and the context of {context}"
            )));
        }
        let needed = self.cache.layout().blocks_for(total_tokens);
        let blocks =
            self.cache.allocate(needed).ok_or(EngineError::CacheFull { needed, free: self.cache.free_blocks() })?;
        let seq = Sequence {
            tokens: Vec::new(),
            prompt_len: 0,
            cached: 0,
            blocks,
            sampler: Sampler::new(SamplingParams::default()),
            phase: Phase::Importing,
            prompt_logits_top: 0,
            imported_layers: vec![None; self.cache.layout().num_layers],
            mtp_rows: false,
            mtp_hidden: None,
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Writes one layer of an importing sequence's prompt rows.
    pub fn import_layer(&mut self, id: SeqId, rows: &LayerRows) -> Result<(), EngineError> {
        let layout = self.cache.layout();
        let s = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        let bad = |m: String| Err(EngineError::BadCacheImport(m));
        if s.phase != Phase::Importing {
            return Err(EngineError::WrongState(id.0, "importing"));
        }
        let (layer, num_tokens) = (rows.layer(), rows.num_tokens());
        if layer >= layout.num_layers {
            return bad(format!("layer {layer} does not exist (the model has {})", layout.num_layers));
        }
        if rows.latent_dim() != layout.latent_dim {
            return bad(format!("layer {layer} has rows of {}, expected {}", rows.latent_dim(), layout.latent_dim));
        }
        if num_tokens > s.blocks.len() * layout.block_size {
            return bad(format!(
                "{num_tokens} tokens exceed the reservation of {}",
                s.blocks.len() * layout.block_size
            ));
        }
        self.backend.import_layer(&mut self.cache, &s.blocks, rows)?;
        s.imported_layers[layer] = Some(num_tokens);
        Ok(())
    }

    /// Takes the MTP layer's output at the last prompt position of an importing sequence (what
    /// its first step drafts from; [`SequenceCacheExport::mtp_hidden`]). Ignored by an engine
    /// that does not speculate.
    pub fn import_mtp_hidden(&mut self, id: SeqId, hidden: Vec<f32>) -> Result<(), EngineError> {
        let h = self.model.config.hidden_size;
        let s = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        if s.phase != Phase::Importing {
            return Err(EngineError::WrongState(id.0, "importing"));
        }
        if hidden.len() != h || hidden.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::BadCacheImport(format!(
                "the MTP state must be {h} finite values, got {} values",
                hidden.len()
            )));
        }
        if self.mtp {
            s.mtp_hidden = Some(hidden);
        }
        Ok(())
    }

    /// Makes an importing sequence runnable once every layer has arrived (the MTP layer's
    /// rows are optional: without them the sequence decodes without speculation). `tokens` is
    /// the prompt plus the tokens generated where it was prefilled (at least the first).
    pub fn finish_import(
        &mut self,
        id: SeqId,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        let s = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        if s.phase != Phase::Importing {
            return Err(EngineError::WrongState(id.0, "importing"));
        }
        let num_tokens = tokens.len().saturating_sub(1);
        let main = self.model.config.num_hidden_layers;
        let missing = |l: usize, n: Option<usize>| n != Some(num_tokens) && (l < main || n.is_some());
        if let Some(l) = s.imported_layers.iter().enumerate().position(|(l, n)| missing(l, *n)) {
            return Err(EngineError::BadCacheImport(match s.imported_layers[l] {
                None => format!("layer {l} never arrived"),
                Some(n) => format!("layer {l} holds {n} tokens, expected {num_tokens}"),
            }));
        }
        let mtp_rows = self.mtp && s.imported_layers.get(main).is_some_and(Option::is_some);
        self.check_import(&tokens, prompt_len, &params, num_tokens)?;
        let layout = self.cache.layout();
        let s = self.seqs.get_mut(&id).expect("checked above");
        let reserved = s.blocks.len() * layout.block_size;
        if prompt_len + params.max_new_tokens > reserved {
            return Err(EngineError::BadCacheImport(format!(
                "prompt {prompt_len} + max_new_tokens {} exceed the reservation of {reserved} tokens",
                params.max_new_tokens
            )));
        }
        s.sampler = Sampler::new(params);
        s.prompt_len = prompt_len;
        s.tokens = tokens;
        s.cached = num_tokens;
        s.imported_layers.clear();
        s.mtp_rows = mtp_rows;
        if !mtp_rows {
            s.mtp_hidden = None;
            if self.mtp && !std::mem::replace(&mut self.warned_without_mtp_rows, true) {
                tracing::warn!(
                    seq = %id,
                    "a sequence arrived without the MTP layer's rows (--speculative-tokens 0 where it was \
                     prefilled?): such sequences decode without speculation"
                );
            }
        }
        // A sequence whose last token was a stop token, or that has all its tokens, is
        // already finished.
        let last = *s.tokens.last().expect("checked: at least one generated token");
        let generated = s.tokens.len() - s.prompt_len;
        let done = finish_reason(&self.model.config.eos_token_ids, s.sampler.params(), last, generated).is_some();
        s.phase = if done { Phase::Finished } else { Phase::Running };
        Ok(())
    }

    /// One layer of a sequence's rows, from wherever the cache lives.
    fn export_layer(&self, layer: usize, blocks: &[u32], num_tokens: usize) -> Result<LayerRows, EngineError> {
        self.backend.export_layer(&self.cache, layer, blocks, num_tokens)
    }

    fn check_import(
        &self,
        tokens: &[u32],
        prompt_len: usize,
        params: &SamplingParams,
        cached: usize,
    ) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::BadCacheImport(m));
        if cached + 1 != tokens.len() || prompt_len == 0 || prompt_len > cached {
            return bad(format!("{cached} cached tokens do not fit {} tokens (prompt {prompt_len})", tokens.len()));
        }
        let limits = self.limits();
        limits.check(&tokens[..prompt_len], params, 0)?;
        // Generated tokens are embedded by the next decode step and the cache is reserved for
        // prompt + max_new_tokens: both must hold for them too, not only for the prompt.
        limits.check_ids("tokens", &tokens[prompt_len..])?;
        if tokens.len() - prompt_len > params.max_new_tokens {
            return bad(format!(
                "{} tokens already generated exceed max_new_tokens {}",
                tokens.len() - prompt_len,
                params.max_new_tokens
            ));
        }
        Ok(())
    }
}
