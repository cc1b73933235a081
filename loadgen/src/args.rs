//! Command line (clap) and the validated `Config` the rest of the binary runs on. Flags and
//! env are read here only; `Args::into_config` checks them once.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::{ArgGroup, Parser};

use crate::stats::Slo;
use crate::workload::LenDist;

/// Drives the router's public `Generation/Generate` API and reports TTFT, time per output
/// token, throughput and goodput (the rate of requests meeting both latency SLOs).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
#[command(group(ArgGroup::new("load").required(true).args(["rate", "concurrency"])))]
pub struct Args {
    /// Router address, HOST:PORT (or an http:// URL).
    #[arg(long, env = "EXPERTMESH_ROUTER_ADDR")]
    pub addr: String,

    /// Requests to send in total, warmup included.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Open loop: requests per second, Poisson arrivals (sent on schedule whatever the
    /// number in flight).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Closed loop: this many requests in flight, each sending the next when it completes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Option<u32>,

    /// Prompt length in tokens: fixed:N, uniform:A-B (inclusive) or normal:MEAN,STD
    /// (rounded, clamped to >= 1).
    #[arg(long, default_value = "fixed:256")]
    pub prompt_len: LenDist,

    /// Tokens to generate (max_new_tokens), same forms as --prompt-len.
    #[arg(long, default_value = "fixed:64")]
    pub output_len: LenDist,

    /// Prompt ids are drawn uniformly from [0, VOCAB), EOS ids excluded. Default: the
    /// model's vocab_size from GetModelInfo.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    pub vocab: Option<u32>,

    /// Seed of the workload (lengths, prompt ids, arrival times, per-request sampler seeds).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Time-to-first-token SLO in milliseconds.
    #[arg(long, default_value_t = 1000.0)]
    pub ttft_slo_ms: f64,

    /// Time-per-output-token SLO in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub tpot_slo_ms: f64,

    /// The first N requests (in send order) run normally but are left out of the statistics.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,

    /// Print one JSON object (field names in report.rs) instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Make output lengths exact: stop_token_ids is set to the largest non-EOS id below
    /// vocab_size, so generation runs to max_new_tokens unless that one token is sampled.
    #[arg(long)]
    pub ignore_eos: bool,

    /// HTTP/2 connections to the router, used round-robin. One carries many concurrent
    /// streams, but servers cap streams per connection (often 100-200): raise this when
    /// more requests than that are in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,

    /// Seconds a request may take end to end before it counts as DEADLINE_EXCEEDED (also
    /// sent to the router as the gRPC deadline).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,

    /// Seconds to wait for the connection and GetModelInfo at start.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_s: f64,
}

/// Closed set of load shapes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Open loop, Poisson arrivals at this many requests per second.
    Rate(f64),
    /// Closed loop with this many requests in flight.
    Concurrency(u32),
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: String,
    pub requests: u64,
    pub load: Load,
    pub prompt_len: LenDist,
    pub output_len: LenDist,
    pub vocab: Option<u32>,
    pub seed: u64,
    pub temperature: f32,
    pub slo: Slo,
    pub warmup: u64,
    pub json: bool,
    pub ignore_eos: bool,
    pub connections: u32,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Args {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let load = match (self.rate, self.concurrency) {
            (Some(rate), None) => {
                ensure!(rate.is_finite() && rate > 0.0, "--rate {rate} must be a positive number of requests/s");
                Load::Rate(rate)
            }
            (None, Some(c)) => Load::Concurrency(c),
            // clap's "load" group makes exactly one of them present.
            _ => bail!("give exactly one of --rate and --concurrency"),
        };
        ensure!(
            self.warmup < self.requests,
            "--warmup {} must be below --requests {} (at least one request must be measured)",
            self.warmup,
            self.requests
        );
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature {} must be >= 0",
            self.temperature
        );
        let ms = |name: &str, v: f64| -> anyhow::Result<Duration> {
            ensure!(v.is_finite() && v > 0.0, "--{name} {v} must be a positive number of milliseconds");
            Ok(Duration::from_secs_f64(v / 1e3))
        };
        let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{name} {v} must be a positive number of seconds"))
        };
        let slo = Slo { ttft: ms("ttft-slo-ms", self.ttft_slo_ms)?, tpot: ms("tpot-slo-ms", self.tpot_slo_ms)? };
        Ok(Config {
            addr: self.addr,
            requests: self.requests,
            load,
            prompt_len: self.prompt_len,
            output_len: self.output_len,
            vocab: self.vocab,
            seed: self.seed,
            temperature: self.temperature,
            slo,
            warmup: self.warmup,
            json: self.json,
            ignore_eos: self.ignore_eos,
            connections: self.connections,
            request_timeout: secs("request-timeout-s", self.request_timeout_s)?,
            connect_timeout: secs("connect-timeout-s", self.connect_timeout_s)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["loadgen", "--addr", "127.0.0.1:1"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn needs_exactly_one_load_shape() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--rate", "2", "--concurrency", "4"]).is_err());
        let c = parse(&["--rate", "2.5"]).unwrap().into_config().unwrap();
        assert_eq!(c.load, Load::Rate(2.5));
        let c = parse(&["--concurrency", "4", "--prompt-len", "uniform:8-16"]).unwrap().into_config().unwrap();
        assert_eq!(c.load, Load::Concurrency(4));
        assert_eq!(c.prompt_len, LenDist::Uniform { lo: 8, hi: 16 });
        assert_eq!(c.slo.ttft, Duration::from_secs(1));
        assert_eq!(c.slo.tpot, Duration::from_millis(100));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--rate", "0"]).unwrap().into_config().is_err());
        assert!(parse(&["--rate", "nan"]).unwrap().into_config().is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--concurrency", "1", "--requests", "5", "--warmup", "5"]).unwrap().into_config().is_err());
        assert!(parse(&["--concurrency", "1", "--tpot-slo-ms=-1"]).unwrap().into_config().is_err());
        assert!(parse(&["--concurrency", "1", "--output-len", "fixed:0"]).is_err());
    }
}
