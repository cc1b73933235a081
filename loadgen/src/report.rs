//! The run's report: a table for people, or one JSON object (`--json`) for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::args::{Config, Load};
use crate::stats::{LatencySummary, Stats};

/// What `--json` prints, one object on one line. Field names are stable: fields may be
/// added, never renamed or removed. Times are milliseconds unless the name says `_s`.
///
/// - `addr`, `model_type`: the router and the model it serves.
/// - `load`: `"rate"` (open loop) or `"concurrency"` (closed loop); `rate_rps` or
///   `concurrency` holds its value, the other is null.
/// - `prompt_len`, `output_len`: the length distributions as given (`fixed:N`, ...);
///   `seed`, `temperature`, `ignore_eos`: as given; `vocab`: prompt ids are drawn from
///   `[0, vocab)` minus the EOS ids.
/// - `requests_total`: `--requests`; `requests_sent`: requests started (less than the total
///   only when interrupted); `requests_warmup`: the first `--warmup` requests, left out of
///   everything below; `requests_measured` = `requests_ok` + `requests_failed`.
/// - `failed_by_code`: failures by gRPC code name (`UNAVAILABLE`, `DEADLINE_EXCEEDED` for
///   client timeouts too, ...) or `INCOMPLETE_STREAM` (ended without a Summary) or
///   `NO_TOKENS` (Summary without any token).
/// - `interrupted`: Ctrl-C stopped the run before every request was sent.
/// - `duration_s`: earliest start to latest end among measured requests.
/// - `request_throughput_rps`: completed requests / duration; `input_tokens`,
///   `output_tokens`: prompt tokens sent and tokens received by completed requests;
///   `input_tokens_per_s`, `output_tokens_per_s`: those over the duration.
/// - `ttft_ms` (send to first token), `tpot_ms` ((last token - first token) / (tokens - 1),
///   requests with >= 2 tokens), `e2e_ms` (send to Summary): objects `{p50, p90, p99, mean}`
///   over completed requests, null when there are none.
/// - `ttft_slo_ms`, `tpot_slo_ms`: the SLOs; `slo_met`: completed requests within both
///   (single-token requests on TTFT alone); `slo_attainment`: `slo_met /
///   requests_measured` (failures count as misses); `goodput_rps`: `slo_met / duration_s`.
/// - `draft_tokens`, `accepted_tokens`: speculative decoding over completed requests (the
///   MTP layer's drafts, and those the model accepted); `acceptance_rate`: their ratio;
///   `mean_accepted_length`: tokens per drafting decode step (accepted drafts + 1). Null
///   when nothing was drafted.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub addr: String,
    pub model_type: String,
    pub load: &'static str,
    pub rate_rps: Option<f64>,
    pub concurrency: Option<u32>,
    pub prompt_len: String,
    pub output_len: String,
    pub vocab: u32,
    pub seed: u64,
    pub temperature: f32,
    pub ignore_eos: bool,
    pub requests_total: u64,
    pub requests_sent: u64,
    pub requests_warmup: u64,
    pub requests_measured: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub failed_by_code: BTreeMap<&'static str, u64>,
    pub interrupted: bool,
    pub duration_s: f64,
    pub request_throughput_rps: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Option<LatencyMs>,
    pub tpot_ms: Option<LatencyMs>,
    pub e2e_ms: Option<LatencyMs>,
    pub ttft_slo_ms: f64,
    pub tpot_slo_ms: f64,
    pub slo_met: u64,
    pub slo_attainment: f64,
    pub goodput_rps: f64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub acceptance_rate: Option<f64>,
    pub mean_accepted_length: Option<f64>,
}

/// A latency summary in milliseconds (microsecond precision).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

/// Whole microseconds as milliseconds, so JSON shows `3.795`, not `3.7950000000000004`.
fn to_ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

impl From<LatencySummary> for LatencyMs {
    fn from(s: LatencySummary) -> Self {
        Self { p50: to_ms(s.p50), p90: to_ms(s.p90), p99: to_ms(s.p99), mean: to_ms(s.mean) }
    }
}

/// What the run knew besides the records.
#[derive(Debug, Clone)]
pub struct RunFacts {
    pub model_type: String,
    pub vocab: u32,
    pub requests_sent: u64,
    pub interrupted: bool,
}

impl Report {
    pub fn new(config: &Config, facts: RunFacts, stats: &Stats) -> Self {
        let (load, rate_rps, concurrency) = match config.load {
            Load::Rate(r) => ("rate", Some(r), None),
            Load::Concurrency(c) => ("concurrency", None, Some(c)),
        };
        Self {
            addr: config.addr.clone(),
            model_type: facts.model_type,
            load,
            rate_rps,
            concurrency,
            prompt_len: config.prompt_len.to_string(),
            output_len: config.output_len.to_string(),
            vocab: facts.vocab,
            seed: config.seed,
            temperature: config.temperature,
            ignore_eos: config.ignore_eos,
            requests_total: config.requests,
            requests_sent: facts.requests_sent,
            requests_warmup: config.warmup.min(facts.requests_sent),
            requests_measured: stats.measured,
            requests_ok: stats.ok,
            requests_failed: stats.failed,
            failed_by_code: stats.failed_by_code.clone(),
            interrupted: facts.interrupted,
            duration_s: stats.duration.as_micros() as f64 / 1e6,
            request_throughput_rps: stats.request_throughput(),
            input_tokens: stats.input_tokens,
            output_tokens: stats.output_tokens,
            input_tokens_per_s: stats.input_tokens_per_s(),
            output_tokens_per_s: stats.output_tokens_per_s(),
            ttft_ms: stats.ttft.map(Into::into),
            tpot_ms: stats.tpot.map(Into::into),
            e2e_ms: stats.e2e.map(Into::into),
            ttft_slo_ms: to_ms(config.slo.ttft),
            tpot_slo_ms: to_ms(config.slo.tpot),
            slo_met: stats.slo_met,
            slo_attainment: stats.slo_attainment(),
            goodput_rps: stats.goodput(),
            draft_tokens: stats.speculation.draft_tokens,
            accepted_tokens: stats.speculation.accepted_tokens,
            acceptance_rate: stats.speculation.acceptance_rate(),
            mean_accepted_length: stats.speculation.mean_accepted_length(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of numbers, strings and string-keyed maps serializes")
    }

    pub fn to_table(&self) -> String {
        let mut t = String::new();
        // Writing to a String cannot fail.
        let mut line = |label: &str, value: String| {
            let _ = writeln!(t, "{label:<28}{value}");
        };
        let load = match (self.rate_rps, self.concurrency) {
            (Some(r), _) => format!("{r} req/s, Poisson arrivals (open loop)"),
            (_, Some(c)) => format!("concurrency {c} (closed loop)"),
            _ => String::new(),
        };
        line("Router", format!("{} ({})", self.addr, self.model_type));
        line("Load", load);
        line(
            "Workload",
            format!(
                "prompt {}, output {}{}, temperature {}, seed {}",
                self.prompt_len,
                self.output_len,
                if self.ignore_eos { " (ignore EOS)" } else { "" },
                self.temperature,
                self.seed
            ),
        );
        let mut sent =
            format!("{} sent of {}, {} warmup", self.requests_sent, self.requests_total, self.requests_warmup);
        if self.interrupted {
            sent.push_str(", interrupted");
        }
        line("Requests", sent);
        line("Measured ok / failed", format!("{} / {}", self.requests_ok, self.requests_failed));
        if !self.failed_by_code.is_empty() {
            let codes: Vec<String> = self.failed_by_code.iter().map(|(c, n)| format!("{c} {n}")).collect();
            line("Failed by code", codes.join(", "));
        }
        line("Duration", format!("{:.2} s", self.duration_s));
        line("Request throughput", format!("{:.2} req/s", self.request_throughput_rps));
        line("Input tokens", format!("{} ({:.1} tokens/s)", self.input_tokens, self.input_tokens_per_s));
        line("Output tokens", format!("{} ({:.1} tokens/s)", self.output_tokens, self.output_tokens_per_s));
        let _ = writeln!(t, "{:<28}{:>10}{:>10}{:>10}{:>10}", "Latency (ms)", "p50", "p90", "p99", "mean");
        for (name, l) in [("  TTFT", self.ttft_ms), ("  TPOT", self.tpot_ms), ("  E2E", self.e2e_ms)] {
            match l {
                Some(l) => {
                    let _ = writeln!(t, "{name:<28}{:>10.2}{:>10.2}{:>10.2}{:>10.2}", l.p50, l.p90, l.p99, l.mean);
                }
                None => {
                    let _ = writeln!(t, "{name:<28}{:>10}{:>10}{:>10}{:>10}", "-", "-", "-", "-");
                }
            }
        }
        let _ = writeln!(
            t,
            "{:<28}{} of {} ({:.1}%) within TTFT <= {} ms and TPOT <= {} ms",
            "SLO attainment",
            self.slo_met,
            self.requests_measured,
            self.slo_attainment * 100.0,
            self.ttft_slo_ms,
            self.tpot_slo_ms
        );
        let _ = writeln!(t, "{:<28}{:.2} req/s", "Goodput", self.goodput_rps);
        if let (Some(rate), Some(len)) = (self.acceptance_rate, self.mean_accepted_length) {
            let _ = writeln!(
                t,
                "{:<28}{:.1}% of {} drafts accepted, mean accepted length {len:.2} tokens/step",
                "Speculative decoding",
                rate * 100.0,
                self.draft_tokens
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::stats::{Completion, Record, Speculation};
    use clap::Parser;

    #[test]
    fn json_has_the_documented_fields() {
        let config =
            Args::parse_from(["loadgen", "--addr", "h:1", "--rate", "2", "--warmup", "1"]).into_config().unwrap();
        let rec = Record {
            start: Duration::ZERO,
            end: Duration::from_secs(2),
            input_tokens: 7,
            outcome: Ok(Completion {
                ttft: Duration::from_millis(500),
                e2e: Duration::from_secs(2),
                output_tokens: 4,
                first_to_last: Duration::from_millis(1500),
                speculation: Speculation { draft_tokens: 3, accepted_tokens: 2, draft_steps: 2 },
            }),
        };
        let stats = Stats::from_records(&[rec], &config.slo);
        let facts = RunFacts { model_type: "deepseek_v3".into(), vocab: 100, requests_sent: 100, interrupted: false };
        let report = Report::new(&config, facts, &stats);
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["load"], "rate");
        assert_eq!(v["rate_rps"], 2.0);
        assert!(v["concurrency"].is_null());
        assert_eq!(v["requests_measured"], 1);
        assert_eq!(v["requests_warmup"], 1);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["output_tokens_per_s"], 2.0);
        assert_eq!(v["input_tokens_per_s"], 3.5);
        assert_eq!(v["tpot_ms"]["mean"], 500.0);
        assert_eq!(v["slo_met"], 0); // TPOT 500 ms > 100 ms
        assert_eq!(v["goodput_rps"], 0.0);
        assert_eq!(v["failed_by_code"], serde_json::json!({}));
        assert_eq!((v["draft_tokens"].as_u64(), v["accepted_tokens"].as_u64()), (Some(3), Some(2)));
        assert_eq!(v["mean_accepted_length"], 2.0);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "addr",
            "model_type",
            "requests_ok",
            "requests_failed",
            "request_throughput_rps",
            "ttft_ms",
            "e2e_ms",
            "ttft_slo_ms",
            "tpot_slo_ms",
            "slo_attainment",
            "interrupted",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert!(report.to_table().contains("Goodput"));
        assert!(report.to_table().contains("mean accepted length 2.00"), "{}", report.to_table());
    }
}
