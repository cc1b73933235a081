//! Which workers a request goes to: pure decisions over a snapshot of the pool, so they can
//! be tested without a cluster.

use cluster_core::WorkerId;

/// What the router knows of one worker when it schedules.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: WorkerId,
    /// Free cache blocks at the last load report (None before the first).
    pub free_blocks: Option<usize>,
    pub block_size: usize,
    /// Requests this router has sent there and not seen finish.
    pub outstanding: usize,
    /// Prompt tokens queued there at the last report (prefill).
    pub queued_tokens: u64,
    /// Failed recently: used only when nothing else is left.
    pub suspect: bool,
}

impl Candidate {
    /// Whether `tokens` fit its cache as last reported (unknown counts as fitting: the
    /// worker's own reservation is the real check).
    fn fits(&self, tokens: usize) -> bool {
        self.free_blocks.is_none_or(|free| tokens.div_ceil(self.block_size.max(1)) <= free)
    }
}

/// Decode workers to try, best first: healthy before suspect, those with room before those
/// without, then the most free blocks, the fewest outstanding requests, and the id.
pub fn decode_order(cands: &[Candidate], tokens: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..cands.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (&cands[a], &cands[b]);
        (x.suspect, !x.fits(tokens), std::cmp::Reverse(x.free_blocks.unwrap_or(usize::MAX)), x.outstanding, &x.id).cmp(
            &(y.suspect, !y.fits(tokens), std::cmp::Reverse(y.free_blocks.unwrap_or(usize::MAX)), y.outstanding, &y.id),
        )
    });
    idx
}

/// Prefill workers to try, best first: healthy before suspect, then least loaded (requests
/// outstanding from this router, then queued tokens), then the id.
pub fn prefill_order(cands: &[Candidate]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..cands.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (&cands[a], &cands[b]);
        (x.suspect, x.outstanding, x.queued_tokens, &x.id).cmp(&(y.suspect, y.outstanding, y.queued_tokens, &y.id))
    });
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, free: Option<usize>, outstanding: usize, suspect: bool) -> Candidate {
        let id = WorkerId::new(id).expect("a valid worker id");
        Candidate { id, free_blocks: free, block_size: 16, outstanding, queued_tokens: 0, suspect }
    }

    #[test]
    fn decode_prefers_room_then_health() {
        let cands = vec![c("a", Some(1), 0, false), c("b", Some(100), 5, false), c("c", Some(500), 0, true)];
        // 32 tokens need 2 blocks: a lacks room, c is suspect.
        assert_eq!(decode_order(&cands, 32), vec![1, 0, 2]);
        let cands = vec![c("a", Some(10), 3, false), c("b", Some(10), 1, false)];
        assert_eq!(decode_order(&cands, 16), vec![1, 0]);
    }

    #[test]
    fn prefill_takes_least_loaded_healthy() {
        let mut cands = vec![c("a", None, 2, false), c("b", None, 1, false), c("c", None, 0, true)];
        assert_eq!(prefill_order(&cands), vec![1, 0, 2]);
        cands[0].outstanding = 1;
        cands[0].queued_tokens = 5;
        assert_eq!(prefill_order(&cands), vec![1, 0, 2]);
    }
}
