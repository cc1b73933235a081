//! The compute thread: runs hosted experts off the async runtime, fed by a bounded channel,
//! and counts the tokens each slot served.

use model::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, LocalExperts};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Batches waiting for the compute thread. Each attention worker has at most a few in
/// flight (one per MoE layer step), so a small queue suffices; senders wait when it is full.
pub const COMPUTE_QUEUE_CAPACITY: usize = 16;

/// A hosted slot: logical expert `expert` of MoE layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot {
    pub layer: usize,
    pub expert: u32,
}

/// Why a batch was not computed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Expert(#[from] ExpertError),
    #[error("the compute thread has stopped")]
    Stopped,
}

/// One batch for the compute thread; outputs come back on `reply`.
#[derive(Debug)]
pub struct Job {
    pub layer: usize,
    pub hidden: usize,
    pub groups: Vec<ExpertGroup>,
    pub inputs: Vec<f32>,
    pub reply: oneshot::Sender<Result<Vec<f32>, ExpertError>>,
}

/// Tokens served per hosted slot, and requests seen; shared with the gRPC service.
#[derive(Debug)]
pub struct SlotCounters {
    tokens: BTreeMap<Slot, AtomicU64>,
    requests: AtomicU64,
}

impl SlotCounters {
    pub fn new(slots: &[Slot]) -> Self {
        SlotCounters { tokens: slots.iter().map(|&s| (s, AtomicU64::new(0))).collect(), requests: AtomicU64::new(0) }
    }

    /// The hosted slots, ascending.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.tokens.keys().copied()
    }

    /// `(slot, tokens served)` per hosted slot, ascending.
    pub fn snapshot(&self) -> Vec<(Slot, u64)> {
        self.tokens.iter().map(|(&s, n)| (s, n.load(Ordering::Relaxed))).collect()
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts a request, and its tokens when it was served.
    fn record(&self, layer: usize, groups: &[ExpertGroup], served: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        for g in groups.iter().filter(|_| served) {
            if let Some(n) = self.tokens.get(&Slot { layer, expert: g.expert.0 }) {
                n.fetch_add(g.num_tokens as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Sends jobs to the compute thread.
#[derive(Debug, Clone)]
pub struct ComputeHandle {
    tx: mpsc::Sender<Job>,
}

impl ComputeHandle {
    /// Queues a batch (waiting while the queue is full) and waits for its outputs.
    pub async fn run(
        &self,
        layer: usize,
        hidden: usize,
        groups: Vec<ExpertGroup>,
        inputs: Vec<f32>,
    ) -> Result<Vec<f32>, ComputeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { layer, hidden, groups, inputs, reply }).await.map_err(|_| ComputeError::Stopped)?;
        Ok(rx.await.map_err(|_| ComputeError::Stopped)??)
    }
}

/// Starts the compute thread; it stops once every handle is dropped.
pub fn spawn_compute(
    experts: LocalExperts,
    counters: Arc<SlotCounters>,
) -> std::io::Result<(ComputeHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Job>(COMPUTE_QUEUE_CAPACITY);
    let thread = std::thread::Builder::new().name("expert-compute".into()).spawn(move || {
        while let Some(job) = rx.blocking_recv() {
            let outputs = compute(&experts, &counters, &job);
            let _ = job.reply.send(outputs);
        }
    })?;
    Ok((ComputeHandle { tx }, thread))
}

fn compute(experts: &LocalExperts, counters: &SlotCounters, job: &Job) -> Result<Vec<f32>, ExpertError> {
    let batch = ExpertBatch { layer: job.layer, hidden: job.hidden, groups: &job.groups, inputs: &job.inputs };
    let mut outputs = vec![0f32; job.inputs.len()];
    let result = experts.run(&batch, &mut outputs);
    counters.record(job.layer, &job.groups, result.is_ok());
    result.map(|()| outputs)
}
