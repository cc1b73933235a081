//! The engine actor (the shape of `cluster_core::actor`): a dedicated std thread owning the
//! `model::Engine`, fed through a bounded mailbox of prefill jobs. It forms batches
//! (`batch`), runs each with the per-layer hook, hands every finished layer to the
//! sequence's transfer task, and publishes its load after every batch.
//!
//! Invariants: the engine holds sequences only while their batch runs (all are released
//! after it), so a batch always starts on an empty cache; the hook never blocks (each
//! transfer's event channel holds all of its events); a job is answered exactly once, by
//! this thread before its batch or by its transfer task after.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use cluster_core::actor::{self, ActorError};
use model::kv::{KvCommit, KvShape};
use model::{CacheLayout, Engine, EngineError, SeqId};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::WaitingLine;
use crate::error::PrefillError;
use crate::request::{PrefillOutcome, PrefillRequest, invalid_request};
use crate::transfer::{self, KvSink, SeqEvent, Transfer, TransferSettings};

const NAME: &str = "prefill engine";

/// The reply a job's caller waits for.
type Reply = oneshot::Sender<Result<PrefillOutcome, PrefillError>>;

/// One prompt queued for prefill: the mailbox's only command.
#[derive(Debug)]
struct Job {
    request: PrefillRequest,
    /// The decode worker's PushKv endpoint.
    sink: Arc<dyn KvSink>,
    reply: Reply,
    enqueued: Instant,
    /// The request's span: parent of its transfer, linked from its batch.
    span: tracing::Span,
    /// Open from enqueueing until the job's batch starts.
    queue_wait: tracing::Span,
}

/// How the engine thread batches and hands off.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub max_batch_tokens: usize,
    /// Mailbox capacity: prompts waiting beyond it are refused.
    pub queue_capacity: usize,
    pub transfer: TransferSettings,
}

/// Prompts submitted and not yet in a batch (mailbox and waiting line). They cross the
/// mailbox, so the handle counts them in and the engine thread counts them out.
#[derive(Debug, Default)]
struct Queued {
    waiting: AtomicU32,
    tokens: AtomicU64,
}

impl Queued {
    fn add(&self, tokens: usize) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    fn remove(&self, tokens: usize) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.tokens.fetch_sub(tokens as u64, Ordering::Relaxed);
    }
}

/// What the engine thread publishes after every batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Computing {
    /// Sequences in the batch being computed.
    running: u32,
    free_blocks: u32,
}

/// A snapshot for `GetLoad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub running_sequences: u32,
    pub waiting_sequences: u32,
    pub queued_tokens: u64,
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub block_size: u32,
}

/// Cloneable handle on the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    actor: actor::Handle<Job, Computing>,
    queued: Arc<Queued>,
    layout: CacheLayout,
}

impl EngineHandle {
    /// Queues `request` (refused at once when the queue is full or closed) and waits for
    /// its outcome. The current span is the request's. Dropping the future (the caller
    /// cancelled) skips a queued prompt and abandons a running transfer.
    pub async fn prefill(
        &self,
        request: PrefillRequest,
        sink: Arc<dyn KvSink>,
    ) -> Result<PrefillOutcome, PrefillError> {
        let tokens = request.prompt.len();
        let queue_wait = tracing::info_span!("queue_wait");
        let span = tracing::Span::current();
        let (reply, answer) = oneshot::channel();
        // Counted before sending so the engine thread never sees it uncounted.
        self.queued.add(tokens);
        let job = Job { request, sink, reply, enqueued: Instant::now(), span, queue_wait };
        if let Err(e) = self.actor.try_send(job) {
            self.queued.remove(tokens);
            return Err(match e {
                ActorError::Busy { capacity, .. } => PrefillError::QueueFull { capacity },
                ActorError::Stopped { .. } => PrefillError::ShuttingDown,
            });
        }
        // Dropped unanswered: the engine stopped (shutdown).
        answer.await.map_err(|_| PrefillError::ShuttingDown)?
    }

    /// Stops accepting jobs; the engine thread finishes those queued, then exits.
    pub fn close(&self) {
        self.actor.close();
    }

    pub fn load(&self) -> Load {
        let computing = self.actor.load();
        Load {
            running_sequences: computing.running,
            waiting_sequences: self.queued.waiting.load(Ordering::Relaxed),
            queued_tokens: self.queued.tokens.load(Ordering::Relaxed),
            free_blocks: computing.free_blocks,
            total_blocks: saturate(self.layout.num_blocks),
            block_size: saturate(self.layout.block_size),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Starts the engine thread. Transfer tasks it starts run on `runtime` in `tracker`;
/// `abort` (the drain deadline) makes it answer queued jobs with `ShuttingDown`.
pub fn spawn_engine(
    engine: Engine,
    settings: EngineSettings,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
    abort: CancellationToken,
) -> std::io::Result<(EngineHandle, actor::Thread)> {
    let layout = engine.cache_layout();
    let queued = Arc::new(Queued::default());
    let computing = Computing { running: 0, free_blocks: saturate(engine.free_blocks()) };
    let actor = EngineActor {
        engine,
        line: WaitingLine::new(settings.max_batch_tokens),
        settings,
        queued: queued.clone(),
        runtime,
        tracker,
        abort,
    };
    let (handle, thread) =
        actor::spawn(NAME, settings.queue_capacity, computing, move |mailbox, load| actor.run(mailbox, load))?;
    Ok((EngineHandle { actor: handle, queued, layout }, thread))
}

struct EngineActor {
    engine: Engine,
    line: WaitingLine<Job>,
    settings: EngineSettings,
    queued: Arc<Queued>,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
    abort: CancellationToken,
}

/// A sequence of the running batch.
struct Admitted {
    id: SeqId,
    prompt: Vec<u32>,
    events: mpsc::Sender<SeqEvent>,
}

impl EngineActor {
    fn run(mut self, mut mailbox: mpsc::Receiver<Job>, load: watch::Sender<Computing>) {
        loop {
            if self.line.is_empty() {
                match mailbox.blocking_recv() {
                    Some(job) => self.line.push_back(job.request.prompt.len(), job),
                    None => break,
                }
            }
            while self.line.wants_more() {
                match mailbox.try_recv() {
                    Ok(job) => self.line.push_back(job.request.prompt.len(), job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // A caller that went away while its prompt waited: skip the prompt.
            for (tokens, _) in self.line.remove_where(|job| job.reply.is_closed()) {
                self.queued.remove(tokens);
            }
            if self.abort.is_cancelled() {
                for (tokens, job) in self.line.take_all() {
                    self.queued.remove(tokens);
                    let _ = job.reply.send(Err(PrefillError::ShuttingDown));
                }
                continue;
            }
            let batch = self.line.take_batch();
            if !batch.is_empty() {
                self.run_batch(batch, &load);
            }
        }
        tracing::info!("prefill_engine_stopped");
    }

    /// Admits what fits the cache (the rest waits for the next batch), starts their
    /// transfers, runs the prefill and hands each layer and the commit over.
    fn run_batch(&mut self, batch: Vec<(usize, Job)>, load: &watch::Sender<Computing>) {
        let layout = self.engine.cache_layout();
        let mut admitted = Vec::with_capacity(batch.len());
        let mut carried = Vec::new();
        let mut links = Vec::with_capacity(batch.len());
        for (tokens, job) in batch {
            if job.reply.is_closed() {
                self.queued.remove(tokens);
                continue;
            }
            // Once one prompt waits for cache, the ones behind it wait too (no overtaking).
            if !carried.is_empty() {
                carried.push((tokens, job));
                continue;
            }
            let r = &job.request;
            let added =
                self.engine.add_sequence(SeqId(r.request_id), r.prompt.clone(), r.engine_params(), r.prompt_logits_top);
            match added {
                Ok(()) => {
                    self.queued.remove(tokens);
                    links.push(job.span.clone());
                    admitted.push(self.start_transfer(job, layout));
                }
                // The cache is empty when a batch starts, so the first prompt always fits.
                Err(EngineError::CacheFull { .. }) if !admitted.is_empty() => carried.push((tokens, job)),
                Err(e) => {
                    self.queued.remove(tokens);
                    let error = match e {
                        EngineError::CacheFull { needed, free } => {
                            PrefillError::PromptTooLarge { prompt_tokens: tokens, needed, total: free }
                        }
                        e => invalid_request(e),
                    };
                    let _ = job.reply.send(Err(error));
                }
            }
        }
        self.line.requeue_front(carried);
        if admitted.is_empty() {
            return;
        }
        let num_tokens: usize = admitted.iter().map(|a| a.prompt.len()).sum();
        load.send_replace(Computing {
            running: saturate(admitted.len()),
            free_blocks: saturate(self.engine.free_blocks()),
        });
        // Child of its first request (so a lone request's trace holds its expert calls),
        // linked to every request it serves.
        let span = match links.first() {
            Some(first) => tracing::info_span!(parent: first, "prefill_batch", num_seqs = admitted.len(), num_tokens),
            None => tracing::info_span!("prefill_batch", num_seqs = admitted.len(), num_tokens),
        };
        for request in &links {
            span.follows_from(request);
        }
        let _entered = span.enter();

        let ids: Vec<SeqId> = admitted.iter().map(|a| a.id).collect();
        let senders: HashMap<SeqId, &mpsc::Sender<SeqEvent>> = admitted.iter().map(|a| (a.id, &a.events)).collect();
        let started = Instant::now();
        let engine = &mut self.engine;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.prefill_streaming(&ids, &mut |seq, rows| {
                if let Some(tx) = senders.get(&seq) {
                    forward(tx, SeqEvent::Layer(rows));
                }
            })
        }));
        let compute = started.elapsed();
        match result {
            Ok(Ok(outputs)) => {
                // One result per id, in the order of `ids`, which is `admitted`'s.
                for (a, out) in admitted.iter().zip(outputs) {
                    let out = match out {
                        Ok(out) => out,
                        Err(e) => {
                            tracing::error!(seq = %a.id, error = %e, "prefill_sequence_failed");
                            forward(&a.events, SeqEvent::Failed(PrefillError::Rejected(e.to_string())));
                            continue;
                        }
                    };
                    let first_token = out.tokens[0];
                    let mut tokens = a.prompt.clone();
                    tokens.push(first_token);
                    let commit = KvCommit {
                        tokens,
                        prompt_len: a.prompt.len(),
                        prompt_logits_top: out.prompt_logits_top,
                        mtp_hidden: engine.mtp_hidden(a.id).unwrap_or_default(),
                    };
                    forward(&a.events, SeqEvent::Done { commit, first_token, compute });
                }
                tracing::debug!(compute_s = compute.as_secs_f64(), "prefill_batch_done");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "prefill_batch_failed");
                for a in &admitted {
                    forward(&a.events, SeqEvent::Failed(PrefillError::Engine(e.to_string())));
                }
            }
            Err(panic) => {
                let what = actor::panic_message(panic.as_ref());
                tracing::error!(panic = %what, "prefill_batch_panicked");
                for a in &admitted {
                    forward(&a.events, SeqEvent::Failed(PrefillError::Engine(format!("engine panicked: {what}"))));
                }
            }
        }
        for id in ids {
            if let Err(e) = self.engine.release(id) {
                tracing::error!(seq = %id, error = %e, "prefill_release_failed");
            }
        }
        load.send_replace(Computing { running: 0, free_blocks: saturate(self.engine.free_blocks()) });
    }

    /// Starts the job's transfer task, which now owns its reply.
    fn start_transfer(&self, job: Job, layout: CacheLayout) -> Admitted {
        let Job { request, sink, reply, enqueued, span, queue_wait } = job;
        drop(queue_wait);
        let (events, rx) = mpsc::channel(transfer::event_capacity(layout.num_layers));
        let shape =
            KvShape { num_tokens: request.prompt.len(), latent_dim: layout.latent_dim, num_layers: layout.num_layers };
        let task = Transfer {
            request_id: request.request_id,
            sink,
            shape,
            settings: self.settings.transfer,
            queue: enqueued.elapsed(),
            events: rx,
            reply,
            abort: self.abort.clone(),
            parent: span,
        };
        self.tracker.spawn_on(transfer::run(task), &self.runtime);
        Admitted { id: SeqId(request.request_id), prompt: request.prompt, events }
    }
}

/// Hands an event to a transfer task without blocking the compute: the channel holds all
/// of a sequence's events. A closed channel means the transfer gave up (caller gone).
fn forward(tx: &mpsc::Sender<SeqEvent>, event: SeqEvent) {
    match tx.try_send(event) {
        Ok(()) | Err(TrySendError::Closed(_)) => {}
        Err(TrySendError::Full(event)) => {
            tracing::error!("transfer event channel full; it is sized for every event of a sequence");
            let _ = tx.blocking_send(event);
        }
    }
}
