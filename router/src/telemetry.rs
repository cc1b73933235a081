//! The router's Prometheus metrics (reference: docs/METRICS.md): requests by outcome, time
//! to first token, time per output token, requests in flight.

use metrics::{counter, gauge, histogram};

use crate::driver::{Outcome, RequestError};

/// Why a request ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Ok,
    /// The client hung up.
    Cancelled,
    /// A field failed validation.
    Invalid,
    /// Admission refused it (router in-flight limit, or no decode worker with room).
    Rejected,
    DeadlineExceeded,
    /// The client left its tokens unread for the stall timeout.
    Stalled,
    /// Workers failed it (retries exhausted, no workers, refused, shutting down).
    Failed,
}

impl RequestOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::Cancelled => "cancelled",
            RequestOutcome::Invalid => "invalid",
            RequestOutcome::Rejected => "rejected",
            RequestOutcome::DeadlineExceeded => "deadline_exceeded",
            RequestOutcome::Stalled => "stalled",
            RequestOutcome::Failed => "failed",
        }
    }

    pub fn of(error: &RequestError) -> Self {
        match error {
            RequestError::NoCapacity { .. } => RequestOutcome::Rejected,
            RequestError::DeadlineExceeded(_) => RequestOutcome::DeadlineExceeded,
            RequestError::Stalled { .. } => RequestOutcome::Stalled,
            RequestError::NoWorkers(_)
            | RequestError::RetriesExhausted { .. }
            | RequestError::Refused(_)
            | RequestError::Internal(_)
            | RequestError::ShuttingDown => RequestOutcome::Failed,
        }
    }
}

pub fn request_ended(outcome: RequestOutcome) {
    counter!("expertmesh_requests_total", "outcome" => outcome.as_str()).increment(1);
}

/// A completed request: TTFT, and the mean time per output token after the first.
pub fn request_completed(o: &Outcome) {
    request_ended(RequestOutcome::Ok);
    histogram!("expertmesh_time_to_first_token_seconds").record(o.time_to_first_token.as_secs_f64());
    if o.completion_tokens > 1 {
        let decode = o.total.saturating_sub(o.time_to_first_token);
        histogram!("expertmesh_time_per_output_token_seconds")
            .record(decode.as_secs_f64() / (o.completion_tokens - 1) as f64);
    }
    counter!("expertmesh_generated_tokens_total").increment(o.completion_tokens as u64);
}

/// Requests admitted and not finished.
pub fn inflight(delta: f64) {
    gauge!("expertmesh_router_inflight_requests").increment(delta);
}
