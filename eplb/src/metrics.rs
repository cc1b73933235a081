//! Judging a placement: the load each worker ends up with, and how even that is.
//!
//! Everything here is f64 on the caller's loads; only the placement decision mimics the
//! reference's f32 arithmetic.

use crate::Placement;

/// `[layers][workers]`: load each worker carries, assuming tokens for an expert split evenly
/// over its replicas (each slot carries `load / logcnt` of its expert). Worker `w` holds the
/// contiguous slots `[w * R/W, (w + 1) * R/W)`.
///
/// # Panics
/// If `placement` does not describe `load` (layer or expert counts differ, an expert index is
/// out of range) or `num_workers` does not divide the slots: the caller mixed up inputs.
pub fn worker_loads(load: &[Vec<f64>], placement: &Placement, num_workers: usize) -> Vec<Vec<f64>> {
    assert_eq!(load.len(), placement.num_layers(), "load and placement differ in layer count");
    assert!(num_workers > 0, "num_workers must be >= 1");
    load.iter()
        .zip(&placement.phy2log)
        .zip(&placement.logcnt)
        .map(|((layer_load, phy2log), logcnt)| {
            assert_eq!(layer_load.len(), logcnt.len(), "load and placement differ in expert count");
            assert!(
                phy2log.len().is_multiple_of(num_workers),
                "{} slots do not split over {num_workers} workers",
                phy2log.len()
            );
            let slots_per_worker = phy2log.len() / num_workers;
            phy2log
                .chunks_exact(slots_per_worker)
                .map(|slots| slots.iter().map(|&e| layer_load[e] / logcnt[e] as f64).sum())
                .collect()
        })
        .collect()
}

/// Mean over max of one layer's worker loads: 1.0 is perfect balance, `1 / W` is everything on
/// one worker. An idle layer (all zero, or no workers) counts as balanced.
pub fn balancedness(worker_loads: &[f64]) -> f64 {
    let (mean, max) = mean_max(worker_loads);
    if max > 0.0 { mean / max } else { 1.0 }
}

/// Max over mean of one layer's worker loads (the inverse of [`balancedness`]): how much longer
/// the slowest worker takes than a perfectly balanced one. 1.0 for an idle layer.
pub fn max_mean_ratio(worker_loads: &[f64]) -> f64 {
    let (mean, max) = mean_max(worker_loads);
    if mean > 0.0 { max / mean } else { 1.0 }
}

/// Balancedness of a whole forward pass: the sum over layers of mean worker load over the sum
/// over layers of max worker load. Layers run one after another and each waits for its
/// slowest worker, so this is ideal time over actual time. 1.0 if every layer is idle.
pub fn model_balancedness(worker_loads: &[Vec<f64>]) -> f64 {
    let (sum_mean, sum_max) =
        worker_loads.iter().map(|layer| mean_max(layer)).fold((0.0, 0.0), |(a, b), (mean, max)| (a + mean, b + max));
    if sum_max > 0.0 { sum_mean / sum_max } else { 1.0 }
}

fn mean_max(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (values.iter().sum::<f64>() / values.len() as f64, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_split_their_expert_load() {
        // Expert 0 has 3 replicas (slots 2, 3, 4), so each carries 12 / 3 = 4.
        let load = vec![vec![12.0, 1.0, 2.0, 6.0]];
        let placement = Placement {
            phy2log: vec![vec![3, 1, 0, 0, 0, 2]],
            log2phy: vec![vec![vec![2, 4, 3], vec![1, -1, -1], vec![5, -1, -1], vec![0, -1, -1]]],
            logcnt: vec![vec![3, 1, 1, 1]],
        };
        assert_eq!(worker_loads(&load, &placement, 3), vec![vec![7.0, 8.0, 6.0]]);
        assert_eq!(worker_loads(&load, &placement, 1), vec![vec![21.0]]);
    }

    #[test]
    fn balance_ratios() {
        assert_eq!(balancedness(&[2.0, 2.0]), 1.0);
        assert_eq!(balancedness(&[4.0, 0.0, 0.0, 0.0]), 0.25);
        assert_eq!(max_mean_ratio(&[4.0, 0.0, 0.0, 0.0]), 4.0);
        assert_eq!(balancedness(&[0.0, 0.0]), 1.0);
        assert_eq!(max_mean_ratio(&[]), 1.0);
        // Layer means 2 and 1, maxes 4 and 1: (2 + 1) / (4 + 1).
        assert_eq!(model_balancedness(&[vec![4.0, 0.0], vec![1.0, 1.0]]), 0.6);
    }

    #[test]
    #[should_panic(expected = "do not split")]
    fn uneven_worker_split_panics() {
        worker_loads(&[vec![1.0; 4]], &Placement::identity(1, 4), 3);
    }
}
