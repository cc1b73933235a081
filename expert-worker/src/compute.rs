//! The compute thread (the actor shape of `cluster_core::actor`): owns the hosted experts,
//! runs batches off the async runtime, and installs or releases experts between batches.
//! Everything reaches it through one bounded mailbox, so a slot never changes while a batch
//! that uses it runs; it publishes the slots it hosts after every change.

use crate::counters::LoadCounters;
use cluster_core::actor::{self, ActorError};
use model::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, ExpertId, ExpertWeights, LocalExperts};
use placement::SlotKey;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Commands waiting for the compute thread. Each attention worker's stream has one batch in
/// flight at a time (one per MoE layer step) and placement changes add one command at a
/// time, so a small queue suffices: batches beyond it are refused as busy (the attention
/// worker tries another replica), placement changes wait.
pub const COMPUTE_QUEUE_CAPACITY: usize = 16;
const NAME: &str = "expert compute";

/// The slots hosted now, ascending; published by the compute thread after each change.
pub type HostedSlots = BTreeSet<SlotKey>;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Expert(#[from] ExpertError),
    /// Busy (the queue is full) or stopped.
    #[error(transparent)]
    Actor(#[from] ActorError),
}

/// One batch for the compute thread; outputs come back on `reply`.
#[derive(Debug)]
struct Job {
    layer: usize,
    hidden: usize,
    groups: Vec<ExpertGroup>,
    inputs: Vec<f32>,
    reply: oneshot::Sender<Result<Vec<f32>, ExpertError>>,
}

/// What the compute thread does, in the order received.
#[derive(Debug)]
enum Command {
    Run(Job),
    /// Host these experts from now on; replies with the number of slots hosted afterwards.
    Install {
        weights: Vec<ExpertWeights>,
        reply: oneshot::Sender<Result<usize, ExpertError>>,
    },
    /// Stop hosting these slots (their weights are freed); replies with how many were hosted.
    Release {
        slots: Vec<SlotKey>,
        reply: oneshot::Sender<usize>,
    },
}

/// Sends commands to the compute thread and sees what it hosts.
#[derive(Debug, Clone)]
pub struct ComputeHandle {
    actor: actor::Handle<Command, HostedSlots>,
}

impl ComputeHandle {
    /// Ingress: queues a batch (refused as busy when the queue is full) and waits for its
    /// outputs.
    pub async fn run(
        &self,
        layer: usize,
        hidden: usize,
        groups: Vec<ExpertGroup>,
        inputs: Vec<f32>,
    ) -> Result<Vec<f32>, ComputeError> {
        Ok(self.actor.try_call(|reply| Command::Run(Job { layer, hidden, groups, inputs, reply })).await??)
    }

    /// Installs loaded experts after the batches queued before them (waiting while the
    /// queue is full); returns the number of slots hosted afterwards.
    pub async fn install(&self, weights: Vec<ExpertWeights>) -> Result<usize, ComputeError> {
        Ok(self.actor.call(|reply| Command::Install { weights, reply }).await??)
    }

    /// Releases slots after the batches queued before them (waiting while the queue is
    /// full); returns how many were hosted.
    pub async fn release(&self, slots: Vec<SlotKey>) -> Result<usize, ComputeError> {
        Ok(self.actor.call(|reply| Command::Release { slots, reply }).await?)
    }

    /// The slots hosted now.
    pub fn hosted(&self) -> HostedSlots {
        self.actor.load()
    }
}

/// Starts the compute thread with `experts` hosted; it stops once every handle is dropped.
pub fn spawn_compute(
    experts: LocalExperts,
    counters: Arc<LoadCounters>,
) -> std::io::Result<(ComputeHandle, actor::Thread)> {
    let mut experts = experts;
    // A pool of its own: in a one-process cluster (`expertmesh up`) the attention workers'
    // forward passes block rayon's global pool threads while they wait for these replies,
    // so expert compute on that pool would deadlock.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("expert-pool-{i}"))
        .build()
        .map_err(std::io::Error::other)?;
    let (actor, thread) =
        actor::spawn(NAME, COMPUTE_QUEUE_CAPACITY, hosted_of(&experts), move |mut mailbox, hosted| {
            while let Some(command) = mailbox.blocking_recv() {
                match command {
                    Command::Run(job) => {
                        let outputs = pool.install(|| compute(&experts, &counters, &job));
                        let _ = job.reply.send(outputs);
                    }
                    Command::Install { weights, reply } => {
                        let result = install(&mut experts, weights);
                        hosted.send_replace(hosted_of(&experts));
                        let _ = reply.send(result.map(|()| hosted.borrow().len()));
                    }
                    Command::Release { slots, reply } => {
                        let released =
                            slots.iter().filter(|s| experts.remove(s.layer, ExpertId(s.expert)).is_some()).count();
                        hosted.send_replace(hosted_of(&experts));
                        let _ = reply.send(released);
                    }
                }
            }
        })?;
    Ok((ComputeHandle { actor }, thread))
}

/// Inserts every expert it can; the first refusal is returned after the others are in.
fn install(experts: &mut LocalExperts, weights: Vec<ExpertWeights>) -> Result<(), ExpertError> {
    let mut first_error = None;
    for w in weights {
        if let Err(e) = experts.insert(w) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn hosted_of(experts: &LocalExperts) -> HostedSlots {
    experts.hosted().into_iter().map(|(layer, ExpertId(expert))| SlotKey { layer, expert }).collect()
}

fn compute(experts: &LocalExperts, counters: &LoadCounters, job: &Job) -> Result<Vec<f32>, ExpertError> {
    let batch = ExpertBatch { layer: job.layer, hidden: job.hidden, groups: &job.groups, inputs: &job.inputs };
    let mut outputs = vec![0f32; job.inputs.len()];
    let result = experts.run(&batch, &mut outputs);
    counters.record(job.layer, &job.groups, result.is_ok());
    result.map(|()| outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::serving::ExpertCheckpoint;

    #[tokio::test]
    async fn installs_and_releases_between_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        model::default_model::ensure(dir.path()).expect("generate");
        let ckpt = ExpertCheckpoint::open(Some(dir.path().to_path_buf()), model::WeightDtype::Auto).expect("open");
        let config = ckpt.config().clone();
        let layer = config.moe_layers()[0];
        let h = config.hidden_size;
        let counters = Arc::new(LoadCounters::new(&config));
        let (compute, thread) =
            spawn_compute(LocalExperts::empty(&config, kernels::cpu::Precision::Exact), counters.clone())
                .expect("spawn");
        let groups = vec![ExpertGroup { expert: ExpertId(1), num_tokens: 3 }];
        let run = || compute.run(layer, h, groups.clone(), vec![0.5; 3 * h]);
        assert!(matches!(run().await, Err(ComputeError::Expert(ExpertError::NotHosted { expert: 1, .. }))));

        let w = ckpt.load(layer, ExpertId(1)).expect("load");
        assert_eq!(compute.install(vec![w]).await.expect("installs"), 1);
        assert_eq!(compute.hosted(), [SlotKey { layer, expert: 1 }].into_iter().collect());
        assert_eq!(run().await.expect("runs").len(), 3 * h);
        assert_eq!(counters.tokens(SlotKey { layer, expert: 1 }), 3);

        let slots = vec![SlotKey { layer, expert: 1 }, SlotKey { layer, expert: 2 }];
        assert_eq!(compute.release(slots).await.expect("releases"), 1);
        assert!(compute.hosted().is_empty());
        assert!(run().await.is_err());
        drop(compute);
        let mut thread = thread;
        thread.finished().await;
        thread.join().expect("compute thread ends");
    }
}
