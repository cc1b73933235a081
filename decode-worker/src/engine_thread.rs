//! The decode engine's actor: one OS thread owns the [`Engine`] (compute never runs on the
//! async runtime), takes commands from a bounded mailbox, and between commands runs one
//! batched step over every running sequence (continuous batching: sequences join as their
//! caches arrive and leave as they finish).
//!
//! Invariants: every sequence's events go to its own channel sized for all of its tokens, so
//! sending never blocks the engine; a sequence whose consumer is gone is released at the next
//! iteration; every sequence is released exactly once (finish, failure, cancel or release).

use model::{Engine, EngineError, FinishReason, SamplingParams, SeqId, StepOutput};
use std::collections::{BTreeSet, HashMap};
use tokio::sync::{mpsc, oneshot};

/// Mailbox capacity: commands from gRPC handlers (admissions, cache layers, releases).
pub const MAILBOX_CAPACITY: usize = 1024;

/// What a sequence's consumer receives.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token {
        id: u32,
        prompt_logits_top: Vec<(u32, f32)>,
    },
    Finished(FinishReason),
    /// The engine failed this sequence; it has been released.
    Failed(String),
    /// The engine ended this sequence alone, for a cause a rerun elsewhere would meet again
    /// (its logits were not finite); it has been released.
    Rejected(String),
}

/// A local prefill instead of an imported cache.
#[derive(Debug)]
pub struct LocalPrefill {
    pub prompt: Vec<u32>,
    pub prompt_logits_top: usize,
}

#[derive(Debug)]
pub enum Command {
    Reserve {
        id: SeqId,
        prompt_tokens: usize,
        params: SamplingParams,
        local_prefill: Option<LocalPrefill>,
        events: mpsc::Sender<SeqEvent>,
        /// W3C context of the sequence's span (empty when not traced).
        trace: String,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
    ImportLayer {
        id: SeqId,
        layer: usize,
        num_tokens: usize,
        rows: Vec<u8>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Commit {
        id: SeqId,
        tokens: Vec<u32>,
        prompt_len: usize,
        prompt_logits_top: Vec<(u32, f32)>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Release {
        id: SeqId,
        reply: Option<oneshot::Sender<bool>>,
    },
    Load {
        reply: oneshot::Sender<Load>,
    },
}

/// The worker's load as reported to the router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub running: usize,
    /// Reserved, importing, or waiting for a local prefill.
    pub waiting: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub block_size: usize,
}

/// Cloneable sender side of the actor.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug, thiserror::Error)]
#[error("the decode engine has stopped")]
pub struct EngineStopped;

impl EngineHandle {
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| EngineStopped)?;
        rx.await.map_err(|_| EngineStopped)
    }

    /// Releases `id` without waiting (used from `Drop`); false when the mailbox is full,
    /// in which case the engine still notices the closed event channel on its next step.
    pub fn release_now(&self, id: SeqId) -> bool {
        self.tx.try_send(Command::Release { id, reply: None }).is_ok()
    }
}

#[derive(Debug)]
struct Slot {
    events: mpsc::Sender<SeqEvent>,
    params: SamplingParams,
    state: SlotState,
    /// The sequence's span context, linked from every step that runs it.
    trace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Importing,
    PrefillPending,
    Running,
}

/// Starts the actor on its own thread. The thread ends when every handle is dropped.
pub fn spawn_engine(engine: Engine, max_batch: usize) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(MAILBOX_CAPACITY);
    let thread = std::thread::Builder::new()
        .name("decode-engine".into())
        .spawn(move || Actor { engine, slots: HashMap::new(), max_batch: max_batch.max(1), next_start: 0 }.run(rx))
        .expect("spawning the engine thread");
    (EngineHandle { tx }, thread)
}

struct Actor {
    engine: Engine,
    /// Ordered for deterministic batch order (ids ascending).
    slots: HashMap<SeqId, Slot>,
    max_batch: usize,
    /// Round-robin start when more sequences run than fit one batch.
    next_start: usize,
}

impl Actor {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let busy = self.slots.values().any(|s| s.state != SlotState::Importing);
            if !busy {
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            self.drop_abandoned();
            self.prefill_pending();
            self.decode_step();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Reserve { id, prompt_tokens, params, local_prefill, events, trace, reply } => {
                let result = match local_prefill {
                    Some(lp) => self
                        .engine
                        .add_sequence(id, lp.prompt, params.clone(), lp.prompt_logits_top)
                        .map(|()| SlotState::PrefillPending),
                    None => params
                        .validate()
                        .and_then(|()| self.engine.reserve_import(id, prompt_tokens + params.max_new_tokens))
                        .map(|()| SlotState::Importing),
                };
                let result = result.map(|state| {
                    self.slots.insert(id, Slot { events, params, state, trace });
                    self.engine.free_blocks()
                });
                let _ = reply.send(result);
            }
            Command::ImportLayer { id, layer, num_tokens, rows, reply } => {
                let _ = reply.send(self.engine.import_layer(id, layer, num_tokens, &rows));
            }
            Command::Commit { id, tokens, prompt_len, prompt_logits_top, reply } => {
                let _ = reply.send(self.commit(id, tokens, prompt_len, prompt_logits_top));
            }
            Command::Release { id, reply } => {
                let released = self.release(id);
                if let Some(reply) = reply {
                    let _ = reply.send(released);
                }
            }
            Command::Load { reply } => {
                let layout = self.engine.cache_layout();
                let running = self.slots.values().filter(|s| s.state == SlotState::Running).count();
                let _ = reply.send(Load {
                    running,
                    waiting: self.slots.len() - running,
                    free_blocks: self.engine.free_blocks(),
                    total_blocks: layout.num_blocks,
                    block_size: layout.block_size,
                });
            }
        }
    }

    fn commit(
        &mut self,
        id: SeqId,
        tokens: Vec<u32>,
        prompt_len: usize,
        top: Vec<(u32, f32)>,
    ) -> Result<(), EngineError> {
        let slot = self.slots.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        if slot.state != SlotState::Importing {
            return Err(EngineError::WrongState(id.0, "importing"));
        }
        let first = *tokens.last().ok_or_else(|| EngineError::BadCacheImport("no tokens".into()))?;
        self.engine.finish_import(id, tokens, prompt_len, slot.params.clone())?;
        let generated = self.engine.generated(id)?.len();
        let finish = finish_of(&self.engine, id, first, generated, &slot.params);
        self.emit(StepOutput { seq: id, token: first, finish, prompt_logits_top: top });
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.state = SlotState::Running;
        }
        Ok(())
    }

    fn release(&mut self, id: SeqId) -> bool {
        let known = self.slots.remove(&id).is_some();
        known && self.engine.release(id).is_ok()
    }

    /// Releases sequences whose consumer hung up (client cancel, router gone).
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self.slots.iter().filter(|(_, s)| s.events.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            tracing::debug!(seq = %id, "sequence_abandoned");
            self.release(id);
        }
    }

    fn prefill_pending(&mut self) {
        let ids: Vec<SeqId> =
            sorted(self.slots.iter().filter(|(_, s)| s.state == SlotState::PrefillPending).map(|(id, _)| *id));
        if ids.is_empty() {
            return;
        }
        let _span = tracing::info_span!("local_prefill", num_seqs = ids.len()).entered();
        match self.engine.prefill(&ids) {
            Ok(outs) => {
                for id in &ids {
                    if let Some(s) = self.slots.get_mut(id) {
                        s.state = SlotState::Running;
                    }
                }
                self.emit_all(&ids, outs);
            }
            Err(e) => self.fail(&ids, &e),
        }
    }

    fn decode_step(&mut self) {
        let running = sorted(self.slots.iter().filter(|(_, s)| s.state == SlotState::Running).map(|(id, _)| *id));
        if running.is_empty() {
            return;
        }
        let ids = round_robin(&running, self.max_batch, &mut self.next_start);
        // One span per step (not per token), linked to every sequence it advances.
        let span = tracing::info_span!("decode_step", batch = ids.len());
        for id in &ids {
            if let Some(slot) = self.slots.get(id) {
                cluster_core::trace::link_to(&slot.trace, &span);
            }
        }
        let _span = span.entered();
        let started = std::time::Instant::now();
        let result = self.engine.decode_step(&ids);
        crate::telemetry::decode_step(ids.len(), started.elapsed());
        match result {
            Ok(outs) => self.emit_all(&ids, outs),
            Err(e) => self.fail(&ids, &e),
        }
    }

    /// A step's results, one per id: tokens go to their consumers; a sequence the engine
    /// ended alone is released with its error while the others go on.
    fn emit_all(&mut self, ids: &[SeqId], outs: Vec<Result<StepOutput, EngineError>>) {
        for (id, out) in ids.iter().zip(outs) {
            match out {
                Ok(out) => self.emit(out),
                Err(e) => {
                    tracing::error!(seq = %id, error = %e, "sequence_failed");
                    if let Some(slot) = self.slots.get(id) {
                        let _ = slot.events.try_send(SeqEvent::Rejected(e.to_string()));
                    }
                    self.release(*id);
                }
            }
        }
    }

    /// Sends a token (and the finish, if any) to the sequence's consumer; releases the
    /// sequence when it finished or nobody listens any more.
    fn emit(&mut self, out: StepOutput) {
        let Some(slot) = self.slots.get(&out.seq) else { return };
        let sent = slot.events.try_send(SeqEvent::Token { id: out.token, prompt_logits_top: out.prompt_logits_top });
        let done = match (sent, out.finish) {
            (Err(_), _) => true,
            (Ok(()), Some(reason)) => {
                let _ = slot.events.try_send(SeqEvent::Finished(reason));
                true
            }
            (Ok(()), None) => false,
        };
        if done {
            self.release(out.seq);
        }
    }

    fn fail(&mut self, ids: &[SeqId], e: &EngineError) {
        tracing::error!(error = %e, num_seqs = ids.len(), "decode_batch_failed");
        for id in ids {
            if let Some(slot) = self.slots.get(id) {
                let _ = slot.events.try_send(SeqEvent::Failed(e.to_string()));
            }
            self.release(*id);
        }
    }
}

fn sorted(ids: impl Iterator<Item = SeqId>) -> Vec<SeqId> {
    ids.collect::<BTreeSet<_>>().into_iter().collect()
}

/// At most `max` of `ids`, starting at `*start` and wrapping, so that when more sequences
/// run than fit one batch every one of them advances in turn.
fn round_robin(ids: &[SeqId], max: usize, start: &mut usize) -> Vec<SeqId> {
    if ids.len() <= max {
        return ids.to_vec();
    }
    let from = *start % ids.len();
    *start = from + max;
    ids.iter().cycle().skip(from).take(max).copied().collect()
}

/// Whether the first token (already appended) ends the sequence.
fn finish_of(engine: &Engine, _id: SeqId, token: u32, generated: usize, p: &SamplingParams) -> Option<FinishReason> {
    let stop = if p.stop_token_ids.is_empty() {
        engine.model().config.eos_token_ids.contains(&token)
    } else {
        p.stop_token_ids.contains(&token)
    };
    if stop {
        Some(FinishReason::Stop)
    } else if generated >= p.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_covers_everyone_in_turn() {
        let ids: Vec<SeqId> = (0..5).map(SeqId).collect();
        let mut start = 0;
        assert_eq!(round_robin(&ids, 8, &mut start), ids);
        let a = round_robin(&ids, 2, &mut start);
        let b = round_robin(&ids, 2, &mut start);
        let c = round_robin(&ids, 2, &mut start);
        assert_eq!(a, vec![SeqId(0), SeqId(1)]);
        assert_eq!(b, vec![SeqId(2), SeqId(3)]);
        assert_eq!(c, vec![SeqId(4), SeqId(0)]);
    }
}
