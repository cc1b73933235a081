//! Speculative decoding inside [`Engine::decode_step`]: the MTP layer drafts, the target's
//! logits verify ([`crate::sampling::Sampler::verify`]), and the MTP layer then runs over
//! every newly cached position so its cache rows and output follow the accepted tokens.

use super::{Engine, Phase, SeqId, Sequence, StepOutput, finite};
use crate::EngineError;
use crate::engine::LayerSink;
use crate::forward::{LogitsWanted, Segment};
use crate::request::finish_reason;
use crate::sampling::Draft;

impl Engine {
    /// How many tokens `s` drafts this step: none without MTP state; never a draft for a
    /// position beyond max_new_tokens (the step then emits at most what is left).
    fn draft_len(&self, s: &Sequence) -> usize {
        if s.mtp_hidden.is_none() {
            return 0;
        }
        let left = s.sampler.params().max_new_tokens.saturating_sub(s.tokens.len() - s.prompt_len);
        self.speculative_tokens.min(left.saturating_sub(1))
    }

    /// The MTP layer's drafts for each sequence: the first from its stored output, each
    /// further one by running the layer on its own output and the previous draft.
    pub(super) fn draft(&mut self, ids: &[SeqId]) -> Result<Vec<Vec<Draft>>, EngineError> {
        let vocab = self.model.config.vocab_size;
        let want: Vec<usize> = ids.iter().map(|id| self.draft_len(&self.seqs[id])).collect();
        let mut drafts: Vec<Vec<Draft>> = vec![Vec::new(); ids.len()];
        // The hidden state each drafting sequence drafts its next token from.
        let mut prev: Vec<Option<Vec<f32>>> =
            ids.iter().zip(&want).map(|(id, &k)| if k > 0 { self.seqs[id].mtp_hidden.clone() } else { None }).collect();
        for round in 0..want.iter().copied().max().unwrap_or(0) {
            let active: Vec<usize> = (0..ids.len()).filter(|&i| want[i] > round).collect();
            if round > 0 {
                // Run the layer over (previous output, last draft) at the draft's position.
                let tokens: Vec<[u32; 1]> = active.iter().map(|&i| [drafts[i][round - 1].token]).collect();
                let segments: Vec<Segment<'_>> = active
                    .iter()
                    .zip(&tokens)
                    .map(|(&i, t)| {
                        let s = &self.seqs[&ids[i]];
                        Segment {
                            tokens: t,
                            start_pos: s.cached + round - 1,
                            block_table: &s.blocks,
                            logits: LogitsWanted::Last,
                        }
                    })
                    .collect();
                let rows: Vec<f32> = active.iter().flat_map(|&i| prev[i].take().expect("drafting")).collect();
                let outs = self.backend.mtp_forward(
                    &self.model,
                    &mut self.cache,
                    &segments,
                    &rows,
                    self.experts.as_ref(),
                    None,
                )?;
                drop(segments);
                for (&i, g) in active.iter().zip(outs) {
                    prev[i] = Some(g);
                }
            }
            let rows: Vec<f32> =
                active.iter().flat_map(|&i| prev[i].as_deref().expect("drafting").iter().copied()).collect();
            let logits = self.model.mtp_logits(&rows, active.len());
            for (j, &i) in active.iter().enumerate() {
                let s = &self.seqs[&ids[i]];
                let index = (s.tokens.len() - s.prompt_len + round) as u64;
                drafts[i].push(s.sampler.draft(&logits[j * vocab..(j + 1) * vocab], index));
            }
        }
        Ok(drafts)
    }

    /// Verifies each sequence's drafts against the target's logits (one row per input
    /// token), emits the accepted drafts and one more token, and advances its state. A
    /// sequence whose logits are not all finite is finished with an error instead.
    pub(super) fn accept(
        &mut self,
        ids: &[SeqId],
        drafts: &[Vec<Draft>],
        logits: &[Vec<f32>],
    ) -> Vec<Result<StepOutput, EngineError>> {
        let vocab = self.model.config.vocab_size;
        let eos = &self.model.config.eos_token_ids;
        let mut results = Vec::with_capacity(ids.len());
        for ((id, drafts), logits) in ids.iter().zip(drafts).zip(logits) {
            let s = self.seqs.get_mut(id).expect("checked above");
            let generated = s.tokens.len() - s.prompt_len;
            let (mut tokens, mut finish, mut failed, mut accepted) = (Vec::new(), None, None, 0);
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                if let Err(e) = finite(*id, s, row, s.cached + j) {
                    failed = Some(e);
                    break;
                }
                let index = (generated + j) as u64;
                let token = match drafts.get(j) {
                    Some(d) => match s.sampler.verify(row, d, index, self.accept_rule) {
                        Ok(()) => {
                            accepted += 1;
                            d.token
                        }
                        Err(t) => t,
                    },
                    None => s.sampler.sample(row, index),
                };
                tokens.push(token);
                finish = finish_reason(eos, s.sampler.params(), token, generated + tokens.len());
                if finish.is_some() || tokens.len() > accepted {
                    break;
                }
            }
            if let Some(e) = failed.filter(|_| tokens.is_empty()) {
                results.push(Err(e));
                continue;
            }
            // Rows of rejected drafts stay behind the cached length, to be overwritten.
            s.cached = s.tokens.len() + tokens.len() - 1;
            s.tokens.extend_from_slice(&tokens);
            s.phase = if finish.is_some() { Phase::Finished } else { Phase::Running };
            results.push(Ok(StepOutput {
                seq: *id,
                tokens,
                finish,
                prompt_logits_top: Vec::new(),
                draft_tokens: drafts.len(),
                accepted_tokens: accepted,
            }));
        }
        results
    }

    /// Runs the MTP layer over the positions each sequence just cached, `[starts[i], cached)`
    /// (h_p from `hidden`, whose rows start at `starts[i]`, and the token after p), so its MTP
    /// rows cover every cached position and its output at the last one drafts the next step.
    /// Skips sequences without MTP rows, failed ones and (`skip_finished`) finished ones.
    pub(super) fn advance_mtp(
        &mut self,
        ids: &[SeqId],
        starts: &[usize],
        results: &[Result<StepOutput, EngineError>],
        hidden: &[Vec<f32>],
        skip_finished: bool,
        on_layer: Option<&mut LayerSink<'_>>,
    ) -> Result<(), EngineError> {
        if !self.mtp {
            return Ok(());
        }
        let h = self.model.config.hidden_size;
        let mut picked = Vec::new();
        let mut prev = Vec::new();
        for (((id, &start), r), hid) in ids.iter().zip(starts).zip(results).zip(hidden) {
            let Ok(out) = r else { continue };
            let s = &self.seqs[id];
            if !s.mtp_rows || (skip_finished && out.finish.is_some()) {
                continue;
            }
            prev.extend_from_slice(&hid[..(s.cached - start) * h]);
            picked.push((*id, start));
        }
        if picked.is_empty() {
            return Ok(());
        }
        let seqs = &self.seqs;
        let segments: Vec<Segment<'_>> = picked
            .iter()
            .map(|(id, start)| {
                let s = &seqs[id];
                Segment {
                    tokens: &s.tokens[start + 1..=s.cached],
                    start_pos: *start,
                    block_table: &s.blocks,
                    logits: LogitsWanted::Last,
                }
            })
            .collect();
        let tables: Vec<(SeqId, &[u32], usize)> = match on_layer {
            Some(_) => picked.iter().map(|(id, _)| (*id, &seqs[id].blocks[..], seqs[id].cached)).collect(),
            None => Vec::new(),
        };
        let exports = on_layer.map(|f| (&tables[..], f));
        let outs =
            self.backend.mtp_forward(&self.model, &mut self.cache, &segments, &prev, self.experts.as_ref(), exports)?;
        drop(segments);
        drop(tables);
        for ((id, _), g) in picked.iter().zip(outs) {
            self.seqs.get_mut(id).expect("picked above").mtp_hidden = Some(g);
        }
        Ok(())
    }
}
