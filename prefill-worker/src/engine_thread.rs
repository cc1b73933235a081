//! The engine actor: a dedicated std thread owning the `model::Engine`, fed through a
//! bounded mailbox of prefill jobs. It forms batches (`batch`), runs each with the
//! per-layer hook, and hands every finished layer to the sequence's transfer task.
//!
//! Invariants: the engine holds sequences only while their batch runs (all are released
//! after it), so a batch always starts on an empty cache; the hook never blocks (each
//! transfer's event channel holds all of its events); a job is answered exactly once, by
//! this thread before its batch or by its transfer task after.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use model::{CacheLayout, Engine, EngineError, SeqId};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::WaitingLine;
use crate::error::PrefillError;
use crate::request::{PrefillOutcome, PrefillRequest, invalid_request};
use crate::transfer::{self, KvCommit, KvShape, KvSink, SeqEvent, Transfer, TransferSettings};

/// The reply a job's caller waits for.
pub type Reply = oneshot::Sender<Result<PrefillOutcome, PrefillError>>;

/// One prompt queued for prefill.
#[derive(Debug)]
pub struct Job {
    pub request: PrefillRequest,
    /// The decode worker's PushKv endpoint.
    pub sink: Arc<dyn KvSink>,
    pub reply: Reply,
    pub enqueued: Instant,
    /// The request's span: parent of its transfer, linked from its batch.
    pub span: tracing::Span,
    /// Open from enqueueing until the job's batch starts.
    pub queue_wait: tracing::Span,
}

/// How the engine thread batches and hands off.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub max_batch_tokens: usize,
    /// Mailbox capacity: prompts waiting beyond it are refused.
    pub queue_capacity: usize,
    pub transfer: TransferSettings,
}

/// Counters shared by the engine thread (writer) and `GetLoad` (reader).
#[derive(Debug, Default)]
struct LoadStats {
    /// Sequences in the batch being computed.
    running: AtomicU32,
    /// Prompts queued (mailbox and waiting line).
    waiting: AtomicU32,
    queued_tokens: AtomicU64,
    free_blocks: AtomicU32,
}

impl LoadStats {
    fn enqueue(&self, tokens: usize) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.queued_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    fn dequeue(&self, tokens: usize) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.queued_tokens.fetch_sub(tokens as u64, Ordering::Relaxed);
    }
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

/// Cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    /// `None` once closed: new jobs are refused while queued ones still run.
    mailbox: Mutex<Option<mpsc::Sender<Job>>>,
    capacity: usize,
    stats: Arc<LoadStats>,
    layout: CacheLayout,
}

impl EngineHandle {
    /// Queues `job`, or refuses it at once when the queue is full or closed.
    pub fn submit(&self, job: Job) -> Result<(), PrefillError> {
        let tokens = job.request.prompt.len();
        let mailbox = self.inner.mailbox.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = mailbox.as_ref() else { return Err(PrefillError::ShuttingDown) };
        // Counted before sending so the engine thread never sees it uncounted.
        self.inner.stats.enqueue(tokens);
        tx.try_send(job).map_err(|e| {
            self.inner.stats.dequeue(tokens);
            match e {
                TrySendError::Full(_) => PrefillError::QueueFull { capacity: self.inner.capacity },
                TrySendError::Closed(_) => PrefillError::ShuttingDown,
            }
        })
    }

    /// Stops accepting jobs; the engine thread finishes those queued, then exits.
    pub fn close(&self) {
        self.inner.mailbox.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    pub fn load(&self) -> Load {
        let s = &self.inner.stats;
        Load {
            running_sequences: s.running.load(Ordering::Relaxed),
            waiting_sequences: s.waiting.load(Ordering::Relaxed),
            queued_tokens: s.queued_tokens.load(Ordering::Relaxed),
            free_blocks: s.free_blocks.load(Ordering::Relaxed),
            total_blocks: saturate(self.inner.layout.num_blocks),
            block_size: saturate(self.inner.layout.block_size),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The running engine thread.
#[derive(Debug)]
pub struct EngineThread {
    join: std::thread::JoinHandle<()>,
    /// `None` once the thread was seen to finish.
    done: Option<oneshot::Receiver<()>>,
}

impl EngineThread {
    /// Resolves once the thread has left its loop (mailbox closed and drained, or panic).
    pub async fn finished(&mut self) {
        // The sender is dropped when the thread ends, however it ends.
        if let Some(done) = &mut self.done {
            let _ = done.await;
            self.done = None;
        }
    }

    /// Joins the thread; call after [`EngineThread::finished`] so it does not block.
    pub fn join(self) {
        if self.join.join().is_err() {
            tracing::error!("prefill engine thread panicked");
        }
    }
}

/// Starts the engine thread. Transfer tasks it starts run on `runtime` in `tracker`;
/// `abort` (the drain deadline) makes it answer queued jobs with `ShuttingDown`.
pub fn spawn_engine(
    engine: Engine,
    settings: EngineSettings,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
    abort: CancellationToken,
) -> std::io::Result<(EngineHandle, EngineThread)> {
    let layout = engine.cache_layout();
    let stats = Arc::new(LoadStats::default());
    stats.free_blocks.store(saturate(engine.free_blocks()), Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
    let (done_tx, done) = oneshot::channel();
    let actor = EngineActor {
        engine,
        mailbox: rx,
        line: WaitingLine::new(settings.max_batch_tokens),
        settings,
        stats: stats.clone(),
        runtime,
        tracker,
        abort,
    };
    let join = std::thread::Builder::new().name("prefill-engine".into()).spawn(move || {
        let _done = done_tx;
        actor.run();
    })?;
    let handle = EngineHandle {
        inner: Arc::new(HandleInner {
            mailbox: Mutex::new(Some(tx)),
            capacity: settings.queue_capacity,
            stats,
            layout,
        }),
    };
    Ok((handle, EngineThread { join, done: Some(done) }))
}

struct EngineActor {
    engine: Engine,
    mailbox: mpsc::Receiver<Job>,
    line: WaitingLine<Job>,
    settings: EngineSettings,
    stats: Arc<LoadStats>,
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
    fn run(mut self) {
        loop {
            if self.line.is_empty() {
                match self.mailbox.blocking_recv() {
                    Some(job) => self.line.push_back(job.request.prompt.len(), job),
                    None => break,
                }
            }
            while self.line.wants_more() {
                match self.mailbox.try_recv() {
                    Ok(job) => self.line.push_back(job.request.prompt.len(), job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // A caller that went away while its prompt waited: skip the prompt.
            for (tokens, _) in self.line.remove_where(|job| job.reply.is_closed()) {
                self.stats.dequeue(tokens);
            }
            if self.abort.is_cancelled() {
                for (tokens, job) in self.line.take_all() {
                    self.stats.dequeue(tokens);
                    let _ = job.reply.send(Err(PrefillError::ShuttingDown));
                }
                continue;
            }
            let batch = self.line.take_batch();
            if !batch.is_empty() {
                self.run_batch(batch);
            }
        }
        tracing::info!("prefill_engine_stopped");
    }

    /// Admits what fits the cache (the rest waits for the next batch), starts their
    /// transfers, runs the prefill and hands each layer and the commit over.
    fn run_batch(&mut self, batch: Vec<(usize, Job)>) {
        let layout = self.engine.cache_layout();
        let mut admitted = Vec::with_capacity(batch.len());
        let mut carried = Vec::new();
        let mut links = Vec::with_capacity(batch.len());
        for (tokens, job) in batch {
            if job.reply.is_closed() {
                self.stats.dequeue(tokens);
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
                    self.stats.dequeue(tokens);
                    links.push(job.span.clone());
                    admitted.push(self.start_transfer(job, layout));
                }
                // The cache is empty when a batch starts, so the first prompt always fits.
                Err(EngineError::CacheFull { .. }) if !admitted.is_empty() => carried.push((tokens, job)),
                Err(e) => {
                    self.stats.dequeue(tokens);
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
        self.stats.running.store(saturate(admitted.len()), Ordering::Relaxed);
        self.stats.free_blocks.store(saturate(self.engine.free_blocks()), Ordering::Relaxed);
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
            engine.prefill_streaming(&ids, &mut |layer, seq, rows| {
                if let Some(tx) = senders.get(&seq) {
                    forward(tx, SeqEvent::Layer { layer, rows });
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
                    let mut tokens = a.prompt.clone();
                    tokens.push(out.token);
                    let commit = KvCommit {
                        tokens,
                        prompt_len: u32::try_from(a.prompt.len()).expect("prompts fit the context, far below 2^32"),
                        prompt_logits_top: out.prompt_logits_top,
                    };
                    forward(&a.events, SeqEvent::Done { commit, first_token: out.token, compute });
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
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
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
        self.stats.running.store(0, Ordering::Relaxed);
        self.stats.free_blocks.store(saturate(self.engine.free_blocks()), Ordering::Relaxed);
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
