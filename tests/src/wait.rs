//! Waiting on conditions instead of sleeping: poll a probe every [`POLL_INTERVAL`] until it
//! holds, and fail the test with what was awaited (and the last observation) on timeout.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Time between two probes of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true; panics after `timeout` naming `what`.
///
/// ```text
/// wait_until("decode-0 idle", secs(10), async || cluster.decode_load(0).await.is_ok_and(|l| l.running_sequences == 0)).await;
/// ```
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    wait_for(what, timeout, async || if cond().await { Ok(()) } else { Err("condition false".to_string()) }).await
}

/// Polls `probe` until it returns `Ok(value)` and returns the value. `Err(observation)`
/// says why it does not hold yet; the last one is in the panic message after `timeout`.
/// One probe call is itself bounded by the time left.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut last = String::from("never probed");
    loop {
        let left = timeout.saturating_sub(start.elapsed()).max(POLL_INTERVAL);
        match tokio::time::timeout(left, probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(observed)) => last = observed,
            Err(_) => last = format!("{last} (then a probe did not answer within {left:?})"),
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `cond` until it returns true or `timeout` passes; returns whether it held. For
/// transient states a test would like to catch but must not depend on.
pub async fn poll_until(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed()).max(POLL_INTERVAL);
        if tokio::time::timeout(left, cond()).await == Ok(true) {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Awaits `fut`, failing the test when it takes longer than `timeout` (a hang is a failure
/// with a message, never a stuck test).
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// `Duration::from_secs`, short for test code.
pub const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
