//! One request's life: reserve cache on a decode worker, prefill on a prefill worker (or on
//! the decode worker for short prompts), stream the tokens. If a worker fails, the request
//! runs again on another pair and the tokens the client already has are skipped: sampling
//! is seeded per request and per token, so the second run draws the same tokens.

use crate::grpc::internal::{self, CallError, DecodeEvent, DecodeEvents};
use crate::ids::AttemptId;
use crate::pool::{Picked, Pool};
use crate::request::Job;
use crate::schedule;
use crate::telemetry::RequestOutcome;
use cluster_core::Role;
use cluster_core::stall::StallWatch;
use model::{FinishReason, SpeculationStats, StreamDecoder, Tokenizer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a request waiting for capacity or workers looks again.
const WAIT_POLL: Duration = Duration::from_millis(20);
/// Bound on the admission call (a frozen worker must not hold a request).
const ADMIT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
pub struct DriverConfig {
    pub max_retries: u32,
    /// How long a request waits for a decode worker with room before RESOURCE_EXHAUSTED.
    pub queue_wait: Duration,
    /// Prompts of at most this many tokens are prefilled on the decode worker.
    pub local_prefill_max_tokens: usize,
    /// How long the client may leave delivered tokens unread before the request is dropped.
    pub stall_timeout: Duration,
}

/// What the client receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Token { index: usize, id: u32, text: String, prompt_logits_top: Vec<(u32, f32)> },
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reason: FinishReason,
    /// The speculative decoding counts of the attempt that finished.
    pub speculation: SpeculationStats,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    pub total: Duration,
    pub retries: u32,
}

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("no decode worker had room for {tokens} tokens within {waited:?}")]
    NoCapacity { tokens: usize, waited: Duration },
    #[error("no {0} worker is registered")]
    NoWorkers(&'static str),
    #[error("gave up after {attempts} attempts; last failure: {last}")]
    RetriesExhausted { attempts: u32, last: String },
    #[error("a worker refused the request: {0}")]
    Refused(CallError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(Duration),
    #[error("the router is shutting down")]
    ShuttingDown,
    #[error(
        "the client read no token for {} ms (--stall-timeout-ms): the request was cancelled and its cache released",
        .idle.as_millis()
    )]
    Stalled { idle: Duration },
}

enum AttemptError {
    /// Another pair may succeed.
    Retry(String),
    Fatal(RequestError),
    /// The client went away: stop quietly.
    ClientGone,
}

#[derive(Debug)]
pub struct Driver {
    pub pool: Arc<Pool>,
    pub config: DriverConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The model's EOS ids: the stop set of requests that give none.
    pub eos_token_ids: Vec<u32>,
}

/// Per-request progress that survives a retry.
struct Progress {
    delivered: Vec<u32>,
    decoder: StreamDecoder,
    first_token_at: Option<Instant>,
    /// Whether the client keeps reading what `out` holds.
    stall: StallWatch,
}

/// The client's deliveries. It has room for every token and the outcome, so sending never
/// waits for the client: the driver keeps reading its decode stream (which shares a
/// connection with other requests) and notices a client that stopped reading.
type Out = mpsc::Sender<Result<Delivery, RequestError>>;

/// Room in `Out` for a request of `max_new_tokens`.
pub fn out_capacity(max_new_tokens: usize) -> usize {
    max_new_tokens.saturating_add(2)
}

impl Driver {
    /// Runs `job`, sending its tokens then its outcome (or an error) to `out`. Returns early
    /// when `out` is closed (the client hung up): dropping the attempt releases its workers.
    pub async fn run(&self, job: Job, out: Out, started: Instant) {
        let mut progress = Progress {
            delivered: Vec::new(),
            decoder: StreamDecoder::default(),
            first_token_at: None,
            stall: StallWatch::new(self.config.stall_timeout, Instant::now()),
        };
        let mut last = String::new();
        for retry in 0..=self.config.max_retries {
            match self.attempt(&job, &out, &mut progress).await {
                Ok((reason, speculation)) => {
                    let now = Instant::now();
                    let outcome = Outcome {
                        reason,
                        speculation,
                        completion_tokens: progress.delivered.len(),
                        time_to_first_token: progress.first_token_at.unwrap_or(now) - started,
                        total: now - started,
                        retries: retry,
                    };
                    crate::telemetry::request_completed(&outcome);
                    let _ = out.send(Ok(Delivery::Done(outcome))).await;
                    return;
                }
                Err(AttemptError::ClientGone) => {
                    crate::telemetry::request_ended(RequestOutcome::Cancelled);
                    return;
                }
                Err(AttemptError::Fatal(e)) => {
                    crate::telemetry::request_ended(RequestOutcome::of(&e));
                    let _ = out.send(Err(e)).await;
                    return;
                }
                Err(AttemptError::Retry(why)) => {
                    tracing::warn!(retry, delivered = progress.delivered.len(), reason = %why, "request_retry");
                    last = why;
                }
            }
        }
        crate::telemetry::request_ended(RequestOutcome::Failed);
        let _ = out.send(Err(RequestError::RetriesExhausted { attempts: self.config.max_retries + 1, last })).await;
    }

    async fn attempt(
        &self,
        job: &Job,
        out: &Out,
        progress: &mut Progress,
    ) -> Result<(FinishReason, SpeculationStats), AttemptError> {
        let attempt_id = AttemptId::fresh();
        let has_prefill = self.pool.has_role(Role::Prefill);
        let local = job.prompt.len() <= self.config.local_prefill_max_tokens || !has_prefill;
        let admission = tracing::info_span!("admission", attempt = attempt_id.get(), local_prefill = local);
        let (decode, mut events) =
            tracing::Instrument::instrument(self.reserve(job, attempt_id, local, out), admission).await?;
        let _decode_guard = self.pool.begin(&decode.id);
        let prefill = if local {
            None
        } else {
            let _schedule = tracing::info_span!("schedule_prefill").entered();
            Some(self.pick_prefill()?)
        };
        let _prefill_guard = prefill.as_ref().map(|p| self.pool.begin(&p.id));
        let prefill_call = async {
            match &prefill {
                Some(p) => {
                    let span = tracing::info_span!("prefill_call", prefill_worker = %p.id, decode_worker = %decode.id);
                    tracing::Instrument::instrument(
                        internal::prefill(p.channel.clone(), attempt_id, job, &decode.address),
                        span,
                    )
                    .await
                    .map(Some)
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(prefill_call);
        let mut prefill_done = local;
        let mut seen = 0usize;
        // A stall is noticed within a quarter of the timeout after it is reached.
        let mut stall_check = tokio::time::interval((self.config.stall_timeout / 4).max(Duration::from_millis(1)));
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = out.closed() => return Err(AttemptError::ClientGone),
                _ = stall_check.tick() => {
                    if let Some(idle) = progress.stall.stalled(out) {
                        tracing::warn!(idle_ms = idle.as_millis() as u64, delivered = progress.delivered.len(), "client_stalled");
                        return Err(AttemptError::Fatal(RequestError::Stalled { idle }));
                    }
                }
                r = &mut prefill_call, if !prefill_done => {
                    prefill_done = true;
                    match r {
                        Ok(_) => {}
                        // The decode worker already has the cache: the reply was lost, not the work.
                        Err(_) if seen > 0 => {}
                        Err(e) if e.retryable() => {
                            let p = prefill.as_ref().expect("a call implies a worker");
                            self.pool.mark_failed(&p.id);
                            return Err(AttemptError::Retry(format!("prefill on {} failed: {e}", p.id)));
                        }
                        Err(e) => return Err(AttemptError::Fatal(RequestError::Refused(e))),
                    }
                }
                ev = events.next() => match ev {
                    Ok(Some(DecodeEvent::Token { id, prompt_logits_top })) => {
                        let index = seen;
                        seen += 1;
                        if let Some(&had) = progress.delivered.get(index) {
                            if had != id {
                                return Err(AttemptError::Fatal(RequestError::Internal(format!(
                                    "the retried run diverged at token {index} ({id} instead of {had})"
                                ))));
                            }
                            continue;
                        }
                        progress.delivered.push(id);
                        let text = match &self.tokenizer {
                            Some(t) => {
                                let mut text = progress.decoder.push(t, id).unwrap_or_default();
                                if self.is_last(job, progress.delivered.len(), id) {
                                    text.push_str(&progress.decoder.finish(t).unwrap_or_default());
                                }
                                text
                            }
                            None => String::new(),
                        };
                        progress.first_token_at.get_or_insert_with(Instant::now);
                        progress.stall.observe(out);
                        match out.try_send(Ok(Delivery::Token { index, id, text, prompt_logits_top })) {
                            Ok(()) => progress.stall.observe(out),
                            Err(mpsc::error::TrySendError::Closed(_)) => return Err(AttemptError::ClientGone),
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                return Err(AttemptError::Fatal(RequestError::Internal(
                                    "the client's buffer is full although it has room for every token".into(),
                                )));
                            }
                        }
                    }
                    Ok(Some(DecodeEvent::Finished(reason, spec))) => return Ok((reason, spec)),
                    Ok(None) => {
                        self.pool.mark_failed(&decode.id);
                        return Err(AttemptError::Retry(format!("decode worker {} ended the stream early", decode.id)));
                    }
                    Err(e) if e.retryable() => {
                        self.pool.mark_failed(&decode.id);
                        return Err(AttemptError::Retry(format!("decode on {} failed: {e}", decode.id)));
                    }
                    Err(e) => return Err(AttemptError::Fatal(RequestError::Refused(e))),
                },
            }
        }
    }

    /// Reserves the sequence on the best decode worker with room, waiting up to
    /// `queue_wait` for one.
    async fn reserve(
        &self,
        job: &Job,
        attempt_id: AttemptId,
        local: bool,
        out: &Out,
    ) -> Result<(Picked, DecodeEvents), AttemptError> {
        let tokens = job.prompt.len() + job.params.max_new_tokens;
        let waited_from = Instant::now();
        loop {
            let (cands, picks) = self.pool.candidates(Role::Decode);
            for i in schedule::decode_order(&cands, tokens) {
                let d = &picks[i];
                match tokio::time::timeout(ADMIT_TIMEOUT, internal::admit(d.channel.clone(), attempt_id, job, local))
                    .await
                {
                    Ok(Ok((free, events))) => {
                        self.pool.record_free_blocks(&d.id, free);
                        return Ok((d.clone(), events));
                    }
                    Ok(Err(e)) if e.code == tonic::Code::ResourceExhausted => {
                        self.pool.record_free_blocks(&d.id, 0);
                    }
                    Ok(Err(e)) if e.retryable() => {
                        tracing::warn!(worker = %d.id, error = %e, "admit_failed");
                        self.pool.mark_failed(&d.id);
                    }
                    Ok(Err(e)) => return Err(AttemptError::Fatal(RequestError::Refused(e))),
                    Err(_) => {
                        tracing::warn!(worker = %d.id, "admit_timed_out");
                        self.pool.mark_failed(&d.id);
                    }
                }
            }
            let waited = waited_from.elapsed();
            if waited >= self.config.queue_wait {
                return Err(AttemptError::Fatal(if cands.is_empty() {
                    RequestError::NoWorkers("decode")
                } else {
                    RequestError::NoCapacity { tokens, waited }
                }));
            }
            tokio::select! {
                _ = out.closed() => return Err(AttemptError::ClientGone),
                _ = tokio::time::sleep(WAIT_POLL) => {}
            }
        }
    }

    /// Whether the `n`-th token `id` ends the request (then its text carries what the
    /// detokenizer still holds back).
    fn is_last(&self, job: &Job, n: usize, id: u32) -> bool {
        model::request::finish_reason(&self.eos_token_ids, &job.params, id, n).is_some()
    }

    fn pick_prefill(&self) -> Result<Picked, AttemptError> {
        let (cands, picks) = self.pool.candidates(Role::Prefill);
        match schedule::prefill_order(&cands).first() {
            Some(&i) => Ok(picks[i].clone()),
            None => Err(AttemptError::Retry("no prefill worker is registered".into())),
        }
    }
}
