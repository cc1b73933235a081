//! Per-request records and what is computed from them: latency percentiles (hdrhistogram,
//! microsecond resolution, exact means), throughput, SLO attainment and goodput.
//!
//! Goodput follows DistServe: a request is good when it completed, its TTFT is within the
//! TTFT SLO and its time per output token within the TPOT SLO. At a single load this
//! reports the rate of good requests over the run (good / duration) and the fraction of
//! measured requests that are good; goodput proper is the highest load at which that
//! fraction stays around 90%, found by sweeping `--rate`.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency tracked exactly enough (one hour); longer ones are recorded as one hour.
const MAX_TRACKED_US: u64 = 3_600_000_000;
/// Significant digits of the histograms: values under 2048 us are exact, larger ones
/// within 0.1%.
const SIGFIGS: u8 = 3;

/// Latency targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    /// Time to first token: request sent to first TokenChunk received.
    pub ttft: Duration,
    /// Time per output token after the first.
    pub tpot: Duration,
}

/// Why a request did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call or the stream ended with this gRPC status (client-side timeouts are
    /// `DeadlineExceeded`).
    Status(tonic::Code),
    /// The stream ended cleanly without a Summary.
    IncompleteStream,
    /// A Summary came but no TokenChunk before it.
    NoTokens,
}

impl Failure {
    /// Stable name for reports: the canonical gRPC code name, or a loadgen-specific one.
    pub fn name(self) -> &'static str {
        use tonic::Code;
        match self {
            Self::Status(code) => match code {
                Code::Ok => "OK",
                Code::Cancelled => "CANCELLED",
                Code::Unknown => "UNKNOWN",
                Code::InvalidArgument => "INVALID_ARGUMENT",
                Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
                Code::NotFound => "NOT_FOUND",
                Code::AlreadyExists => "ALREADY_EXISTS",
                Code::PermissionDenied => "PERMISSION_DENIED",
                Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
                Code::FailedPrecondition => "FAILED_PRECONDITION",
                Code::Aborted => "ABORTED",
                Code::OutOfRange => "OUT_OF_RANGE",
                Code::Unimplemented => "UNIMPLEMENTED",
                Code::Internal => "INTERNAL",
                Code::Unavailable => "UNAVAILABLE",
                Code::DataLoss => "DATA_LOSS",
                Code::Unauthenticated => "UNAUTHENTICATED",
            },
            Self::IncompleteStream => "INCOMPLETE_STREAM",
            Self::NoTokens => "NO_TOKENS",
        }
    }
}

/// Client-side timings of a request that completed (Summary received, at least one token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// Sent to first TokenChunk.
    pub ttft: Duration,
    /// Sent to Summary.
    pub e2e: Duration,
    /// TokenChunks received, >= 1.
    pub output_tokens: u32,
    /// First TokenChunk to last TokenChunk.
    pub first_to_last: Duration,
    /// The Summary's speculative decoding counts.
    pub speculation: Speculation,
}

/// Tokens drafted, drafts accepted, and decode steps that drafted (the Summary's
/// `speculative`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Speculation {
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub draft_steps: u64,
}

impl Speculation {
    fn add(&mut self, o: Speculation) {
        self.draft_tokens += o.draft_tokens;
        self.accepted_tokens += o.accepted_tokens;
        self.draft_steps += o.draft_steps;
    }

    /// Accepted over drafted; `None` when nothing was drafted.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_tokens > 0).then(|| self.accepted_tokens as f64 / self.draft_tokens as f64)
    }

    /// Tokens per drafting step: its accepted drafts plus the one token every step makes.
    pub fn mean_accepted_length(&self) -> Option<f64> {
        (self.draft_steps > 0).then(|| 1.0 + self.accepted_tokens as f64 / self.draft_steps as f64)
    }
}

impl Completion {
    /// Time per output token after the first; `None` with a single token.
    pub fn tpot(&self) -> Option<Duration> {
        (self.output_tokens >= 2).then(|| self.first_to_last / (self.output_tokens - 1))
    }

    /// Both SLOs met; a single-token request has no TPOT and is judged on TTFT alone.
    pub fn meets(&self, slo: &Slo) -> bool {
        self.ttft <= slo.ttft && self.tpot().is_none_or(|t| t <= slo.tpot)
    }
}

/// One request as the client saw it. Times are offsets from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub start: Duration,
    pub end: Duration,
    /// Prompt tokens sent.
    pub input_tokens: u32,
    pub outcome: Result<Completion, Failure>,
}

/// Percentiles and exact mean of one latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

/// A latency histogram at microsecond resolution plus an exact sum for the mean.
#[derive(Debug)]
struct LatencyHist {
    hist: Histogram<u64>,
    sum_us: u128,
}

impl LatencyHist {
    fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_US, SIGFIGS).expect("constant bounds are valid");
        Self { hist, sum_us: 0 }
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).min(MAX_TRACKED_US);
        self.hist.saturating_record(us);
        self.sum_us += u128::from(us);
    }

    /// Percentile q is the ceil(q * n)-th smallest sample (p50 of 1..=10 us is 5, p99 is 10),
    /// reported as the top of its histogram bucket (exact below 2048 us, else within 0.1%).
    fn summary(&self) -> Option<LatencySummary> {
        let n = self.hist.len();
        if n == 0 {
            return None;
        }
        let q = |q: f64| Duration::from_micros(self.hist.value_at_quantile(q));
        let mean_us = u64::try_from(self.sum_us / u128::from(n)).expect("mean of u64 values fits u64");
        Some(LatencySummary { p50: q(0.50), p90: q(0.90), p99: q(0.99), mean: Duration::from_micros(mean_us) })
    }
}

/// Everything the report shows, computed from the measured records.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub measured: u64,
    pub ok: u64,
    pub failed: u64,
    pub failed_by_code: BTreeMap<&'static str, u64>,
    /// From the earliest start to the latest end among measured requests.
    pub duration: Duration,
    /// Prompt tokens of completed requests.
    pub input_tokens: u64,
    /// Tokens received by completed requests.
    pub output_tokens: u64,
    /// Over completed requests.
    pub ttft: Option<LatencySummary>,
    /// Over completed requests with >= 2 tokens.
    pub tpot: Option<LatencySummary>,
    /// Over completed requests.
    pub e2e: Option<LatencySummary>,
    /// Completed requests meeting both SLOs.
    pub slo_met: u64,
    /// Summed over completed requests.
    pub speculation: Speculation,
}

impl Stats {
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Record>, slo: &Slo) -> Self {
        let (mut ttft, mut tpot, mut e2e) = (LatencyHist::new(), LatencyHist::new(), LatencyHist::new());
        let mut s = Stats {
            measured: 0,
            ok: 0,
            failed: 0,
            failed_by_code: BTreeMap::new(),
            duration: Duration::ZERO,
            input_tokens: 0,
            output_tokens: 0,
            ttft: None,
            tpot: None,
            e2e: None,
            slo_met: 0,
            speculation: Speculation::default(),
        };
        let mut window: Option<(Duration, Duration)> = None;
        for r in records {
            s.measured += 1;
            window = Some(match window {
                None => (r.start, r.end),
                Some((a, b)) => (a.min(r.start), b.max(r.end)),
            });
            match &r.outcome {
                Ok(c) => {
                    s.ok += 1;
                    s.input_tokens += u64::from(r.input_tokens);
                    s.output_tokens += u64::from(c.output_tokens);
                    ttft.record(c.ttft);
                    e2e.record(c.e2e);
                    if let Some(t) = c.tpot() {
                        tpot.record(t);
                    }
                    s.slo_met += u64::from(c.meets(slo));
                    s.speculation.add(c.speculation);
                }
                Err(f) => {
                    s.failed += 1;
                    *s.failed_by_code.entry(f.name()).or_default() += 1;
                }
            }
        }
        s.duration = window.map_or(Duration::ZERO, |(a, b)| b.saturating_sub(a));
        s.ttft = ttft.summary();
        s.tpot = tpot.summary();
        s.e2e = e2e.summary();
        s
    }

    fn per_second(&self, n: u64) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }

    /// Completed requests per second.
    pub fn request_throughput(&self) -> f64 {
        self.per_second(self.ok)
    }

    pub fn input_tokens_per_s(&self) -> f64 {
        self.per_second(self.input_tokens)
    }

    pub fn output_tokens_per_s(&self) -> f64 {
        self.per_second(self.output_tokens)
    }

    /// Fraction of measured requests (failures included) meeting both SLOs.
    pub fn slo_attainment(&self) -> f64 {
        if self.measured == 0 { 0.0 } else { self.slo_met as f64 / self.measured as f64 }
    }

    /// Requests per second meeting both SLOs.
    pub fn goodput(&self) -> f64 {
        self.per_second(self.slo_met)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn ok(start_ms: u64, ttft_ms: u64, tokens: u32, first_to_last_ms: u64) -> Record {
        let e2e = ms(ttft_ms + first_to_last_ms);
        Record {
            start: ms(start_ms),
            end: ms(start_ms) + e2e,
            input_tokens: 10,
            outcome: Ok(Completion {
                ttft: ms(ttft_ms),
                e2e,
                output_tokens: tokens,
                first_to_last: ms(first_to_last_ms),
                speculation: Speculation { draft_tokens: 4, accepted_tokens: 3, draft_steps: 2 },
            }),
        }
    }

    fn failed(start_ms: u64, end_ms: u64, f: Failure) -> Record {
        Record { start: ms(start_ms), end: ms(end_ms), input_tokens: 10, outcome: Err(f) }
    }

    const SLO: Slo = Slo { ttft: Duration::from_millis(100), tpot: Duration::from_millis(20) };

    #[test]
    fn speculation_sums_over_completed_requests() {
        let records = [ok(0, 10, 5, 40), ok(5, 10, 5, 40), failed(0, 9, Failure::NoTokens)];
        let s = Stats::from_records(&records, &SLO).speculation;
        assert_eq!(s, Speculation { draft_tokens: 8, accepted_tokens: 6, draft_steps: 4 });
        assert_eq!((s.acceptance_rate(), s.mean_accepted_length()), (Some(0.75), Some(2.5)));
        assert_eq!(Speculation::default().mean_accepted_length(), None);
    }

    #[test]
    fn tpot_and_slo_of_one_request() {
        // 11 tokens over 200 ms after the first: 20 ms each.
        let c = Completion {
            ttft: ms(100),
            e2e: ms(300),
            output_tokens: 11,
            first_to_last: ms(200),
            speculation: Speculation::default(),
        };
        assert_eq!(c.tpot(), Some(ms(20)));
        assert!(c.meets(&SLO), "both SLOs met exactly at the limit");
        assert!(!Completion { ttft: ms(101), ..c }.meets(&SLO));
        assert!(!Completion { first_to_last: ms(201), ..c }.meets(&SLO));
        // One token: no TPOT, judged on TTFT only.
        let one = Completion { output_tokens: 1, first_to_last: Duration::ZERO, e2e: ms(50), ttft: ms(50), ..c };
        assert_eq!(one.tpot(), None);
        assert!(one.meets(&SLO));
    }

    #[test]
    fn percentiles_are_exact_at_microsecond_resolution() {
        let mut h = LatencyHist::new();
        for v in 1..=10 {
            h.record(us(v));
        }
        let s = h.summary().unwrap();
        // ceil(q * 10)-th smallest: 5th, 9th, 10th.
        assert_eq!((s.p50, s.p90, s.p99), (us(5), us(9), us(10)));
        assert_eq!(s.mean, us(5)); // 55 / 10 = 5.5, truncated to whole microseconds

        let mut h = LatencyHist::new();
        for v in 1..=1000 {
            h.record(us(v));
        }
        let s = h.summary().unwrap();
        assert_eq!((s.p50, s.p90, s.p99), (us(500), us(900), us(990)));
        assert_eq!(s.mean, us(500)); // 500.5

        // Above 2048 us the histogram keeps 3 significant digits: within 0.1%.
        let mut h = LatencyHist::new();
        for v in [ms(250), ms(250), ms(1000), ms(4000)] {
            h.record(v);
        }
        let s = h.summary().unwrap();
        let close = |a: Duration, b: Duration| (a.as_secs_f64() / b.as_secs_f64() - 1.0).abs() < 1e-3;
        assert!(close(s.p50, ms(250)), "{:?}", s.p50);
        assert!(close(s.p90, ms(4000)), "{:?}", s.p90);
        assert!(s.p50 >= ms(250), "percentiles round up within their bucket");
        assert_eq!(s.mean, ms(1375)); // exact: (250 + 250 + 1000 + 4000) / 4
        assert_eq!(LatencyHist::new().summary(), None);
    }

    #[test]
    fn stats_on_hand_made_records() {
        let records = vec![
            // start, ttft, tokens, first→last
            ok(0, 50, 11, 100),                                           // tpot 10: good; ends at 150
            ok(100, 80, 5, 80),                                           // tpot 20: good (at the limit); ends at 260
            ok(200, 150, 11, 100),                                        // ttft over: not good; ends at 450
            ok(300, 60, 3, 100),                                          // tpot 50: not good; ends at 460
            ok(400, 90, 1, 0),                                            // one token: good; ends at 490
            failed(500, 1000, Failure::Status(tonic::Code::Unavailable)), // run ends at 1000
            failed(600, 700, Failure::Status(tonic::Code::Unavailable)),
            failed(700, 800, Failure::IncompleteStream),
        ];
        let s = Stats::from_records(&records, &SLO);
        assert_eq!((s.measured, s.ok, s.failed, s.slo_met), (8, 5, 3, 3));
        assert_eq!(s.failed_by_code, BTreeMap::from([("INCOMPLETE_STREAM", 1), ("UNAVAILABLE", 2)]));
        assert_eq!(s.duration, ms(1000));
        assert_eq!(s.input_tokens, 50);
        assert_eq!(s.output_tokens, 31);
        assert_eq!(s.request_throughput(), 5.0);
        assert_eq!(s.input_tokens_per_s(), 50.0);
        assert_eq!(s.output_tokens_per_s(), 31.0);
        assert_eq!(s.slo_attainment(), 3.0 / 8.0);
        assert_eq!(s.goodput(), 3.0);

        // Percentiles above 2048 us are the top of their histogram bucket: within 0.1% above.
        let near = |got: Duration, want: Duration| {
            assert!(got >= want && got.as_secs_f64() <= want.as_secs_f64() * 1.001, "{got:?} is not {want:?}");
        };
        // TTFTs 50, 60, 80, 90, 150 ms: p50 = 3rd, p90 = p99 = 5th; mean 86 ms.
        let ttft = s.ttft.unwrap();
        near(ttft.p50, ms(80));
        near(ttft.p90, ms(150));
        near(ttft.p99, ms(150));
        assert_eq!(ttft.mean, ms(86));
        // TPOTs of the four multi-token requests: 10, 20, 10, 50 ms; mean 22.5 ms.
        let tpot = s.tpot.unwrap();
        near(tpot.p50, ms(10));
        near(tpot.p90, ms(50));
        near(tpot.p99, ms(50));
        assert_eq!(tpot.mean, us(22_500));
        // E2E 150, 160, 250, 160, 90 ms: sorted 90, 150, 160, 160, 250; mean 162 ms.
        let e2e = s.e2e.unwrap();
        near(e2e.p50, ms(160));
        near(e2e.p90, ms(250));
        assert_eq!(e2e.mean, ms(162));
    }

    #[test]
    fn empty_and_all_failed_runs_give_zeros() {
        let s = Stats::from_records(&[], &SLO);
        assert_eq!((s.measured, s.duration, s.goodput(), s.slo_attainment()), (0, Duration::ZERO, 0.0, 0.0));
        let s = Stats::from_records(&[failed(0, 10, Failure::NoTokens)], &SLO);
        assert_eq!((s.ok, s.failed, s.slo_met), (0, 1, 0));
        assert_eq!((s.ttft, s.tpot, s.e2e), (None, None, None));
        assert_eq!(s.request_throughput(), 0.0);
    }
}
