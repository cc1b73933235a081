//! Replication: turn `num_log` logical experts into `num_phy >= num_log` physical slots by
//! giving each extra slot to the expert with the highest load per replica.

/// Result of replicating one row of logical experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replicas {
    /// `[num_phy]`: logical expert held by each physical slot. Slot `i < num_log` holds
    /// expert `i`; the extra slots follow in the order they were handed out.
    pub phy2log: Vec<usize>,
    /// `[num_phy]`: replica rank of each slot among its expert's replicas (0 = original).
    pub rank: Vec<usize>,
    /// `[num_log]`: replicas per logical expert, each >= 1, summing to `num_phy`.
    pub logcnt: Vec<usize>,
}

/// `replicate_experts` of the reference for one row.
///
/// Each extra slot goes to `argmax(weight / logcnt)`, computed in f32 as the reference does
/// (f32 load over the count converted to f32), the first index on ties as torch's
/// `max(dim=-1).indices` returns.
///
/// Precondition (checked by `rebalance`): `num_phy >= weight.len()`.
pub(crate) fn replicate_experts(weight: &[f32], num_phy: usize) -> Replicas {
    let num_log = weight.len();
    debug_assert!(num_phy >= num_log);
    let mut phy2log: Vec<usize> = (0..num_log).collect();
    let mut rank = vec![0usize; num_log];
    let mut logcnt = vec![1usize; num_log];
    phy2log.reserve(num_phy - num_log);
    rank.reserve(num_phy - num_log);
    for _ in num_log..num_phy {
        let mut hottest = 0;
        let mut hottest_load = f32::NEG_INFINITY;
        for (expert, (&w, &cnt)) in weight.iter().zip(&logcnt).enumerate() {
            let per_replica = w / cnt as f32;
            if per_replica > hottest_load {
                hottest = expert;
                hottest_load = per_replica;
            }
        }
        phy2log.push(hottest);
        rank.push(logcnt[hottest]);
        logcnt[hottest] += 1;
    }
    Replicas { phy2log, rank, logcnt }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_slots_go_to_highest_load_per_replica() {
        // 90 -> 45 -> 30; 40 stays. Slots: 90 (->45), 45 > 40 (->30), 40 > 30.
        let r = replicate_experts(&[10.0, 90.0, 40.0], 6);
        assert_eq!(r.phy2log, vec![0, 1, 2, 1, 1, 2]);
        assert_eq!(r.rank, vec![0, 0, 0, 1, 2, 1]);
        assert_eq!(r.logcnt, vec![1, 3, 2]);
    }

    #[test]
    fn ties_go_to_the_lowest_expert_index() {
        // 8/2 == 4: expert 0 (after one replica) ties expert 1 and wins on index.
        let r = replicate_experts(&[8.0, 4.0], 4);
        assert_eq!(r.phy2log, vec![0, 1, 0, 0]);
        assert_eq!(r.logcnt, vec![3, 1]);
        // All zero: every slot ties, so expert 0 takes them all.
        let r = replicate_experts(&[0.0, 0.0, 0.0], 5);
        assert_eq!(r.phy2log, vec![0, 1, 2, 0, 0]);
    }

    #[test]
    fn no_extra_slots_is_identity() {
        let r = replicate_experts(&[3.0, 1.0], 2);
        assert_eq!(r.phy2log, vec![0, 1]);
        assert_eq!(r.rank, vec![0, 0]);
        assert_eq!(r.logcnt, vec![1, 1]);
    }
}
