//! The decode engine's actor (the shape of `cluster_core::actor`): one OS thread owns the
//! [`Engine`] (compute never runs on the async runtime), takes commands from a bounded
//! mailbox, and between commands runs one batched step over every running sequence
//! (continuous batching: sequences join as their caches arrive and leave as they finish).
//! It publishes its [`Load`] after every step, and after every command that changes it
//! before answering that command.
//!
//! Invariants: every sequence's events go to its own channel, made by [`EngineHandle::reserve`]
//! with room for all of them, so sending never blocks the engine; a sequence whose consumer
//! is gone is released at the next iteration, and one whose consumer left its tokens untaken
//! for the stall timeout is failed ([`SeqEvent::Stalled`]) and released; every sequence is
//! released exactly once (finish, failure, stall, cancel or release).

use cluster_core::actor::{self, ActorError};
use cluster_core::stall::StallWatch;
use model::kv::KvCommit;
use model::request::finish_reason;
use model::{Engine, EngineError, FinishReason, LayerRows, SamplingParams, SeqId, SpeculationStats, StepOutput};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Mailbox capacity: commands from gRPC handlers (admissions, cache layers, releases).
pub const MAILBOX_CAPACITY: usize = 1024;
const NAME: &str = "decode engine";

/// What a sequence's consumer receives.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token {
        id: u32,
        prompt_logits_top: Vec<(u32, f32)>,
    },
    /// The sequence is done, with its speculative decoding counts.
    Finished(FinishReason, SpeculationStats),
    /// The engine failed this sequence; it has been released.
    Failed(String),
    /// The consumer took no event for `idle` while some waited; the sequence has been released.
    Stalled {
        idle: Duration,
    },
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

/// A sequence to reserve cache for.
#[derive(Debug)]
pub struct Reservation {
    pub id: SeqId,
    pub prompt_tokens: usize,
    pub params: SamplingParams,
    /// `None`: the cache arrives through [`EngineHandle::import_layer`] and [`EngineHandle::commit`].
    pub local_prefill: Option<LocalPrefill>,
    /// W3C context of the sequence's span (empty when not traced).
    pub trace: String,
}

#[derive(Debug)]
enum Command {
    Reserve {
        reservation: Reservation,
        events: mpsc::Sender<SeqEvent>,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
    ImportLayer {
        id: SeqId,
        rows: LayerRows,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Commit {
        id: SeqId,
        commit: KvCommit,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Release {
        id: SeqId,
        reply: Option<oneshot::Sender<bool>>,
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

impl Load {
    pub fn is_idle(&self) -> bool {
        self.running + self.waiting == 0
    }
}

/// Why a call to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Actor(#[from] ActorError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How the engine thread batches and when it gives up on a consumer.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Most sequences in one decode step (more run in turn).
    pub max_batch: usize,
    /// How long a sequence's consumer may leave its tokens untaken.
    pub stall_timeout: Duration,
}

/// Cloneable handle on the engine thread: typed calls, and the published load.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    actor: actor::Handle<Command, Load>,
}

impl EngineHandle {
    /// Reserves cache for a sequence (or queues its local prefill); returns the free blocks
    /// left and the sequence's events. Refused at once when the mailbox is full.
    pub async fn reserve(&self, reservation: Reservation) -> Result<(usize, mpsc::Receiver<SeqEvent>), CallError> {
        // Room for every token and the final event: the engine never waits for a consumer.
        let (events, rx) = mpsc::channel(reservation.params.max_new_tokens.saturating_add(2));
        let free = self.actor.try_call(|reply| Command::Reserve { reservation, events, reply }).await??;
        Ok((free, rx))
    }

    /// Imports one complete layer of a reserved sequence's cache.
    pub async fn import_layer(&self, id: SeqId, rows: LayerRows) -> Result<(), CallError> {
        Ok(self.actor.try_call(|reply| Command::ImportLayer { id, rows, reply }).await??)
    }

    /// Finishes an import: the sequence joins the batch with its first token.
    pub async fn commit(&self, id: SeqId, commit: KvCommit) -> Result<(), CallError> {
        Ok(self.actor.try_call(|reply| Command::Commit { id, commit, reply }).await??)
    }

    /// Releases `id`; whether it was known.
    pub async fn release(&self, id: SeqId) -> Result<bool, ActorError> {
        self.actor.try_call(|reply| Command::Release { id, reply: Some(reply) }).await
    }

    /// Releases `id` without waiting (used from `Drop`); false when the mailbox is full,
    /// in which case the engine still notices the closed event channel on its next step.
    pub fn release_now(&self, id: SeqId) -> bool {
        self.actor.try_send(Command::Release { id, reply: None }).is_ok()
    }

    /// The load the engine last published.
    pub fn load(&self) -> Load {
        self.actor.load()
    }

    /// Follows the published load.
    pub fn loads(&self) -> watch::Receiver<Load> {
        self.actor.loads()
    }

    /// Waits until nothing runs or waits, the engine stops, or `deadline`; returns the
    /// load then.
    pub async fn until_idle(&self, deadline: tokio::time::Instant) -> Load {
        let mut loads = self.loads();
        let _ = tokio::time::timeout_at(deadline, loads.wait_for(Load::is_idle)).await;
        *loads.borrow()
    }
}

#[derive(Debug)]
struct Slot {
    events: mpsc::Sender<SeqEvent>,
    /// Whether the consumer keeps taking `events`.
    stall: StallWatch,
    params: SamplingParams,
    state: SlotState,
    /// The sequence's span context, linked from every step that runs it.
    trace: String,
    speculation: SpeculationStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Importing,
    PrefillPending,
    Running,
}

/// Starts the actor on its own thread. The thread ends when every handle is dropped.
pub fn spawn_engine(engine: Engine, settings: EngineSettings) -> std::io::Result<(EngineHandle, actor::Thread)> {
    let layout = engine.cache_layout();
    let idle = Load {
        running: 0,
        waiting: 0,
        free_blocks: engine.free_blocks(),
        total_blocks: layout.num_blocks,
        block_size: layout.block_size,
    };
    let (handle, thread) = actor::spawn(NAME, MAILBOX_CAPACITY, idle, move |rx, load| {
        let actor = Actor {
            engine,
            slots: HashMap::new(),
            max_batch: settings.max_batch.max(1),
            stall_timeout: settings.stall_timeout,
            next_start: 0,
            load,
        };
        actor.run(rx);
    })?;
    Ok((EngineHandle { actor: handle }, thread))
}

struct Actor {
    engine: Engine,
    /// Ordered for deterministic batch order (ids ascending).
    slots: HashMap<SeqId, Slot>,
    max_batch: usize,
    stall_timeout: Duration,
    /// Round-robin start when more sequences run than fit one batch.
    next_start: usize,
    /// Published after every change, before the command that made it is answered: a load
    /// read after a reply reflects it.
    load: watch::Sender<Load>,
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
            self.drop_stalled();
            self.prefill_pending();
            self.decode_step();
            self.publish();
        }
    }

    fn publish(&self) {
        let layout = self.engine.cache_layout();
        let running = self.slots.values().filter(|s| s.state == SlotState::Running).count();
        let now = Load {
            running,
            waiting: self.slots.len() - running,
            free_blocks: self.engine.free_blocks(),
            total_blocks: layout.num_blocks,
            block_size: layout.block_size,
        };
        self.load.send_if_modified(|published| std::mem::replace(published, now) != now);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Reserve { reservation, events, reply } => {
                let Reservation { id, prompt_tokens, params, local_prefill, trace } = reservation;
                let result = match local_prefill {
                    Some(lp) => self
                        .engine
                        .add_sequence(id, lp.prompt, params.clone(), lp.prompt_logits_top)
                        .map(|()| SlotState::PrefillPending),
                    None => self
                        .engine
                        .limits()
                        .check_sized(prompt_tokens, &params, 0)
                        .map_err(EngineError::from)
                        .and_then(|()| self.engine.reserve_import(id, prompt_tokens + params.max_new_tokens))
                        .map(|()| SlotState::Importing),
                };
                let result = result.map(|state| {
                    let stall = StallWatch::new(self.stall_timeout, Instant::now());
                    let speculation = SpeculationStats::default();
                    self.slots.insert(id, Slot { events, stall, params, state, trace, speculation });
                    self.engine.free_blocks()
                });
                self.publish();
                let _ = reply.send(result);
            }
            Command::ImportLayer { id, rows, reply } => {
                let _ = reply.send(self.engine.import_layer(id, &rows));
            }
            Command::Commit { id, commit, reply } => {
                let committed = self.commit(id, commit);
                self.publish();
                let _ = reply.send(committed);
            }
            Command::Release { id, reply } => {
                let released = self.release(id);
                self.publish();
                if let Some(reply) = reply {
                    let _ = reply.send(released);
                }
            }
        }
    }

    fn commit(&mut self, id: SeqId, commit: KvCommit) -> Result<(), EngineError> {
        let slot = self.slots.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        if slot.state != SlotState::Importing {
            return Err(EngineError::WrongState(id.0, "importing"));
        }
        let KvCommit { tokens, prompt_len, prompt_logits_top, mtp_hidden } = commit;
        let first = *tokens.last().ok_or_else(|| EngineError::BadCacheImport("no tokens".into()))?;
        if !mtp_hidden.is_empty() {
            self.engine.import_mtp_hidden(id, mtp_hidden)?;
        }
        self.engine.finish_import(id, tokens, prompt_len, slot.params.clone())?;
        let generated = self.engine.generated(id)?.len();
        let finish = finish_reason(&self.engine.model().config.eos_token_ids, &slot.params, first, generated);
        self.emit(StepOutput {
            seq: id,
            tokens: vec![first],
            finish,
            prompt_logits_top,
            draft_tokens: 0,
            accepted_tokens: 0,
        });
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

    /// Fails and releases sequences whose consumer left their tokens untaken for the stall
    /// timeout (a client that stopped reading): their cache goes back to the others.
    fn drop_stalled(&mut self) {
        let mut stalled = Vec::new();
        for (id, slot) in &mut self.slots {
            if let Some(idle) = slot.stall.stalled(&slot.events) {
                stalled.push((*id, idle));
            }
        }
        for (id, idle) in stalled {
            tracing::warn!(seq = %id, idle_ms = idle.as_millis() as u64, "sequence_consumer_stalled");
            if let Some(slot) = self.slots.get(&id) {
                // The channel keeps room for a final event.
                let _ = slot.events.try_send(SeqEvent::Stalled { idle });
            }
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
        let empty = tracing::field::Empty;
        let span =
            tracing::info_span!("decode_step", batch = ids.len(), tokens = empty, drafted = empty, accepted = empty);
        for id in &ids {
            if let Some(slot) = self.slots.get(id) {
                cluster_core::trace::link_to(&slot.trace, &span);
            }
        }
        let span = span.entered();
        let started = std::time::Instant::now();
        let result = self.engine.decode_step(&ids);
        let mut step = SpeculationStats::default();
        let mut emitted = 0;
        for out in result.iter().flatten().flatten() {
            crate::telemetry::speculation(out);
            step.add(out);
            emitted += out.tokens.len();
        }
        crate::telemetry::decode_step(emitted, started.elapsed());
        span.record("tokens", emitted).record("drafted", step.draft_tokens).record("accepted", step.accepted_tokens);
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

    /// Sends a step's tokens (and the finish, if any) to the sequence's consumer; releases
    /// the sequence when it finished or nobody listens any more.
    fn emit(&mut self, out: StepOutput) {
        let Some(slot) = self.slots.get_mut(&out.seq) else { return };
        slot.speculation.add(&out);
        slot.stall.observe(&slot.events);
        let mut top = Some(out.prompt_logits_top);
        // The channel holds max_new_tokens + 2 events: a step's tokens always fit.
        let sent = out.tokens.iter().try_for_each(|&id| {
            slot.events.try_send(SeqEvent::Token { id, prompt_logits_top: top.take().unwrap_or_default() })
        });
        slot.stall.observe(&slot.events);
        let done = match (sent, out.finish) {
            (Err(_), _) => true,
            (Ok(()), Some(reason)) => {
                let _ = slot.events.try_send(SeqEvent::Finished(reason, slot.speculation));
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

#[cfg(test)]
mod tests {
    use super::*;
    use model::serving::{EngineSetup, ExpertPlacement, open_engine_with};

    fn engine(dir: &std::path::Path) -> Engine {
        model::default_model::ensure(dir).expect("the default model");
        let setup = EngineSetup {
            weight_dtype: model::WeightDtype::Auto,
            precision: kernels::cpu::Precision::Exact,
            options: model::EngineOptions { cache_tokens: 4096, block_size: 16, ..Default::default() },
        };
        open_engine_with(Some(dir.to_path_buf()), setup, ExpertPlacement::Local, &|_| {}).expect("open").engine
    }

    fn local(id: u64, max_new_tokens: usize) -> Reservation {
        Reservation {
            id: SeqId(id),
            prompt_tokens: 4,
            params: SamplingParams { seed: Some(1), max_new_tokens, ..SamplingParams::default() },
            local_prefill: Some(LocalPrefill { prompt: vec![256, 1, 2, 3], prompt_logits_top: 0 }),
            trace: String::new(),
        }
    }

    #[tokio::test]
    async fn a_consumer_that_stops_taking_loses_its_sequence_and_others_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = EngineSettings { max_batch: 8, stall_timeout: Duration::from_millis(100) };
        let (handle, mut thread) = spawn_engine(engine(dir.path()), settings).expect("spawn");
        let (_, mut stalled) = handle.reserve(local(1, 4000)).await.expect("reserved");
        // The load read after the reply already holds the sequence.
        assert_eq!(handle.load().running + handle.load().waiting, 1);
        let (_, mut reader) = handle.reserve(local(2, 50)).await.expect("reserved");
        let mut read = Vec::new();
        while let Some(e) = reader.recv().await {
            read.push(e);
        }
        assert_eq!(read.len(), 51, "50 tokens and the finish");
        assert!(matches!(read.last(), Some(&SeqEvent::Finished(FinishReason::Length, _))), "{read:?}");
        // The stalled sequence is released long before its 4000 tokens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        assert!(handle.until_idle(deadline).await.is_idle(), "the stalled sequence was not released");
        assert_eq!(handle.load().free_blocks, handle.load().total_blocks);
        let mut tokens = 0;
        let last = loop {
            match stalled.recv().await.expect("a final event") {
                SeqEvent::Token { .. } => tokens += 1,
                other => break other,
            }
        };
        assert!(matches!(last, SeqEvent::Stalled { idle } if idle >= Duration::from_millis(100)), "{last:?}");
        assert!(tokens < 4000, "all {tokens} tokens were generated");
        assert!(stalled.recv().await.is_none(), "nothing after the stall");
        drop(handle);
        thread.finished().await;
        thread.join().expect("the engine thread ends cleanly");
    }

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
