//! Whether the consumer of a stream keeps taking what is sent to it, seen from the one
//! sender of the bounded channel that feeds it: a client whose HTTP/2 window stays at zero
//! never polls its stream, so what is sent waits untaken. The sender gives up on such a
//! consumer after a timeout instead of holding the request's resources for it.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// The stall clock of one channel. The clock runs only while something waits untaken; it
/// restarts whenever the consumer takes anything. Observe the channel around every send and
/// when checking; the channel must have no other sender.
#[derive(Debug, Clone)]
pub struct StallWatch {
    timeout: Duration,
    /// Free slots after the last observation: more later means the consumer took some.
    left: Option<usize>,
    /// Since when the consumer has taken nothing while something waited.
    since: Instant,
}

impl StallWatch {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        StallWatch { timeout, left: None, since: now }
    }

    /// Records the channel's free slots (`capacity` of `max_capacity`) at `now`.
    pub fn observe_at(&mut self, capacity: usize, max_capacity: usize, now: Instant) {
        if capacity >= max_capacity || self.left.is_none_or(|left| capacity > left) {
            self.since = now;
        }
        self.left = Some(capacity);
    }

    /// Records `tx`'s state now; call before and after every send.
    pub fn observe<T>(&mut self, tx: &mpsc::Sender<T>) {
        self.observe_at(tx.capacity(), tx.max_capacity(), Instant::now());
    }

    /// How long the consumer has left something untaken, once that reaches the timeout.
    pub fn stalled_at(&mut self, capacity: usize, max_capacity: usize, now: Instant) -> Option<Duration> {
        self.observe_at(capacity, max_capacity, now);
        let idle = now.saturating_duration_since(self.since);
        (capacity < max_capacity && idle >= self.timeout).then_some(idle)
    }

    /// [`StallWatch::stalled_at`] for `tx` now.
    pub fn stalled<T>(&mut self, tx: &mpsc::Sender<T>) -> Option<Duration> {
        self.stalled_at(tx.capacity(), tx.max_capacity(), Instant::now())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn an_empty_channel_never_stalls() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(T, t0);
        assert_eq!(w.stalled_at(4, 4, at(t0, 100)), None);
    }

    #[test]
    fn the_clock_starts_with_the_first_untaken_item() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(T, t0);
        // Idle for a long time with nothing to take, then one item is sent at 50 s.
        w.observe_at(4, 4, at(t0, 50));
        w.observe_at(3, 4, at(t0, 50));
        assert_eq!(w.stalled_at(3, 4, at(t0, 59)), None);
        assert_eq!(w.stalled_at(3, 4, at(t0, 60)), Some(T));
    }

    #[test]
    fn taking_anything_restarts_the_clock() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(T, t0);
        w.observe_at(4, 4, t0);
        w.observe_at(2, 4, t0);
        // The consumer took one item (3 free) just before the next send at 8 s.
        w.observe_at(3, 4, at(t0, 8));
        w.observe_at(2, 4, at(t0, 8));
        assert_eq!(w.stalled_at(2, 4, at(t0, 17)), None);
        assert_eq!(w.stalled_at(2, 4, at(t0, 18)), Some(T));
    }

    #[test]
    fn sends_alone_do_not_restart_the_clock() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(T, t0);
        w.observe_at(8, 8, t0);
        for (i, free) in (1..8).rev().enumerate() {
            let now = at(t0, i as u64 * 2);
            w.observe_at(free + 1, 8, now);
            w.observe_at(free, 8, now);
        }
        assert_eq!(w.stalled_at(1, 8, at(t0, 20)), Some(Duration::from_secs(20)));
    }

    #[tokio::test]
    async fn follows_a_real_channel() {
        let (tx, mut rx) = mpsc::channel::<u32>(4);
        let mut w = StallWatch::new(Duration::ZERO, Instant::now());
        assert_eq!(w.stalled(&tx), None);
        w.observe(&tx);
        tx.try_send(1).expect("room");
        w.observe(&tx);
        assert!(w.stalled(&tx).is_some(), "an untaken item with a zero timeout is a stall");
        rx.recv().await.expect("sent");
        assert_eq!(w.stalled(&tx), None);
    }
}
