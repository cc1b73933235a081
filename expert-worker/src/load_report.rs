//! Live load statistics: every `--load-report-ms` the publisher takes each counter's delta
//! since the last tick, keeps the last `--load-window` ticks in a ring buffer, and puts a
//! [`LoadReport`] (tokens per second over the window) at `/load/<worker>`, attached to the
//! registration lease so it vanishes with the worker.

use crate::counters::LoadCounters;
use cluster_core::{ClusterName, Registration, Store, WorkerId};
use placement::keys::{self, PlacementVersion};
use placement::{LoadReport, unix_ms};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// One tick: tokens per counter since the previous tick, and the time it covers.
#[derive(Debug)]
struct Tick {
    delta: Vec<u64>,
    elapsed: Duration,
}

/// A sliding window over the last `capacity` ticks of a set of cumulative counters.
#[derive(Debug)]
pub struct LoadWindow {
    capacity: usize,
    /// Oldest first; never longer than `capacity`.
    ticks: VecDeque<Tick>,
    /// Per counter, the sum of `delta` over `ticks`.
    sums: Vec<u64>,
    /// Sum of `elapsed` over `ticks`.
    covered: Duration,
    /// Counter values at the last tick (all 0 before the first: counters start at 0).
    last: Vec<u64>,
}

impl LoadWindow {
    /// A window over `counters` counters keeping `capacity` ticks (at least 1).
    pub fn new(counters: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        LoadWindow {
            capacity,
            ticks: VecDeque::with_capacity(capacity),
            sums: vec![0; counters],
            covered: Duration::ZERO,
            last: vec![0; counters],
        }
    }

    /// Records the cumulative `counts` observed `elapsed` after the previous tick (or after
    /// the counters started), dropping the oldest tick once the window is full. A counter
    /// that went backwards counts 0; `counts` of another length are ignored past the shorter.
    pub fn tick(&mut self, counts: &[u64], elapsed: Duration) {
        let mut delta = if self.ticks.len() == self.capacity {
            let oldest = self.ticks.pop_front().expect("a full window holds at least one tick");
            for (sum, d) in self.sums.iter_mut().zip(&oldest.delta) {
                *sum -= d;
            }
            self.covered = self.covered.saturating_sub(oldest.elapsed);
            let mut delta = oldest.delta;
            delta.fill(0);
            delta
        } else {
            vec![0; self.sums.len()]
        };
        for (((d, sum), last), &now) in delta.iter_mut().zip(&mut self.sums).zip(&mut self.last).zip(counts) {
            *d = now.saturating_sub(*last);
            *sum += *d;
            *last = now;
        }
        self.covered += elapsed;
        self.ticks.push_back(Tick { delta, elapsed });
    }

    /// The time the window covers now.
    pub fn covered(&self) -> Duration {
        self.covered
    }

    /// Per counter, tokens per second over the window (0 while it covers no time).
    pub fn rates(&self) -> Vec<f64> {
        let secs = self.covered.as_secs_f64();
        self.sums.iter().map(|&n| if secs > 0.0 { n as f64 / secs } else { 0.0 }).collect()
    }
}

/// The report for `window` over `counters`' layout.
pub fn report(
    worker: &WorkerId,
    counters: &LoadCounters,
    window: &LoadWindow,
    total_tokens: u64,
    placement_version: Option<PlacementVersion>,
    updated_unix_ms: u64,
) -> LoadReport {
    let num_experts = counters.num_experts();
    let rates = window.rates();
    let tokens_per_s = if num_experts == 0 {
        vec![Vec::new(); counters.layers().len()]
    } else {
        rates.chunks(num_experts).map(<[f64]>::to_vec).collect()
    };
    LoadReport {
        worker: worker.clone(),
        layers: counters.layers().to_vec(),
        num_experts,
        tokens_per_s,
        window_ms: u64::try_from(window.covered().as_millis()).unwrap_or(u64::MAX),
        total_tokens,
        placement_version,
        updated_unix_ms,
    }
}

/// What the publisher needs.
#[derive(Debug)]
pub struct Publisher {
    pub store: Arc<dyn Store>,
    pub cluster: ClusterName,
    pub me: WorkerId,
    pub registration: Arc<Registration>,
    pub counters: Arc<LoadCounters>,
    /// The placement version the follower follows.
    pub version: watch::Receiver<Option<PlacementVersion>>,
    pub period: Duration,
    pub window: usize,
    /// When the counters started (the first tick's delta covers the time since).
    pub started: Instant,
}

/// Publishes a report every `period` until `cancel`; a failed put is retried on the next tick.
pub async fn publish(p: Publisher, cancel: CancellationToken) {
    let key = keys::load_key(&p.cluster, &p.me);
    let mut window = LoadWindow::new(p.counters.layers().len() * p.counters.num_experts(), p.window);
    let mut ticks = tokio::time::interval_at(p.started + p.period, p.period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut last, mut failing) = (p.started, false);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = Instant::now();
        let counts = p.counters.snapshot();
        window.tick(&counts, now - last);
        last = now;
        let total = counts.iter().sum();
        crate::telemetry::publish(&p.me, &p.counters, &counts, *p.version.borrow());
        let load = report(&p.me, &p.counters, &window, total, *p.version.borrow(), unix_ms());
        let value = match serde_json::to_vec(&load) {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(%error, "load_report_encode_failed");
                continue;
            }
        };
        let put = tokio::select! {
            _ = cancel.cancelled() => return,
            put = p.store.put_with_lease(&key, value, p.registration.lease()) => put,
        };
        match put {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(%key, "load_report_resumed");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%key, %error, "load_report_failed");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn window_rates_follow_the_last_ticks() {
        let mut w = LoadWindow::new(2, 3);
        assert_eq!(w.rates(), vec![0.0, 0.0]);
        w.tick(&[10, 0], S);
        assert_eq!((w.rates(), w.covered()), (vec![10.0, 0.0], S));
        w.tick(&[30, 4], S);
        w.tick(&[30, 4], 2 * S);
        assert_eq!(w.covered(), 4 * S);
        assert_eq!(w.rates(), vec![7.5, 1.0]);
        // The first tick (10 tokens over 1 s) leaves the window.
        w.tick(&[36, 4], S);
        assert_eq!(w.covered(), 4 * S);
        assert_eq!(w.rates(), vec![26.0 / 4.0, 1.0]);
        // Two idle ticks push out the busy ones.
        w.tick(&[36, 4], S);
        w.tick(&[36, 4], S);
        assert_eq!(w.rates(), vec![6.0 / 3.0, 0.0]);
        w.tick(&[36, 4], S);
        assert_eq!(w.rates(), vec![0.0, 0.0]);
        assert_eq!(w.covered(), 3 * S);
    }

    #[test]
    fn window_of_one_and_counters_that_go_backwards() {
        let mut w = LoadWindow::new(1, 0);
        w.tick(&[5], Duration::from_millis(500));
        assert_eq!(w.rates(), vec![10.0]);
        w.tick(&[3], S);
        assert_eq!(w.rates(), vec![0.0]);
        w.tick(&[4], S);
        assert_eq!(w.rates(), vec![1.0]);
        w.tick(&[], Duration::ZERO);
        assert_eq!((w.rates(), w.covered()), (vec![0.0], Duration::ZERO));
    }

    #[test]
    fn report_rows_follow_the_moe_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        model::default_model::ensure(dir.path()).expect("generate");
        let config = model::ModelConfig::from_dir(dir.path()).expect("config");
        let counters = LoadCounters::new(&config);
        let first = counters.layers()[0];
        let groups = [model::ExpertGroup { expert: model::ExpertId(3), num_tokens: 20 }];
        counters.record(first, &groups, true);
        let mut w = LoadWindow::new(counters.layers().len() * counters.num_experts(), 10);
        w.tick(&counters.snapshot(), 2 * S);
        let me = WorkerId::new("e0").expect("valid");
        let r = report(&me, &counters, &w, 20, Some(PlacementVersion(4)), 7);
        assert_eq!(r.layers, counters.layers());
        assert!(r.layers.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(r.tokens_per_s.len(), r.layers.len());
        assert!(r.tokens_per_s.iter().all(|row| row.len() == config.n_routed_experts));
        assert_eq!(r.tokens_per_s[0][3], 10.0);
        assert_eq!(r.total_rate(), 10.0);
        assert_eq!(
            (r.window_ms, r.total_tokens, r.placement_version, r.updated_unix_ms),
            (2000, 20, Some(PlacementVersion(4)), 7)
        );
    }
}
