//! Balanced packing: put `n` weighted items into `num_packs` packs of exactly `n / num_packs`
//! items each, keeping pack weights as even as the reference's greedy heuristic does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::introsort::argsort_desc;

/// Where one item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Pack the item was put in.
    pub pack: usize,
    /// Position of the item inside its pack, in the order items were added.
    pub rank: usize,
}

/// `balanced_packing` of the reference for one row.
///
/// Items go in weight-descending order (torch's tie order, see `introsort`) each to the
/// lightest pack that still has room, the lowest pack index on equal weights. Pack weights
/// accumulate in f32 in that order, as the reference's 0-d float32 tensors do. With one item
/// per pack the reference skips the greedy and puts item `i` in pack `i`; so does this.
///
/// Preconditions (checked by `rebalance`): `num_packs > 0`, `weight.len() % num_packs == 0`,
/// weights non-negative and not NaN.
pub(crate) fn balanced_packing(weight: &[f32], num_packs: usize) -> Vec<Slot> {
    let num_items = weight.len();
    debug_assert!(num_packs > 0 && num_items.is_multiple_of(num_packs));
    debug_assert!(weight.iter().all(|&w| w >= 0.0));
    let per_pack = num_items / num_packs;
    if per_pack == 1 {
        return (0..num_items).map(|pack| Slot { pack, rank: 0 }).collect();
    }

    // Packs with room, lightest first and the lowest index among equal weights: exactly the
    // pack Python's min() picks. Keys are f32 bit patterns, which order like the values since
    // pack weights are sums of non-negative, non-NaN loads (never -0.0: they start at +0.0).
    let mut open: BinaryHeap<Reverse<(u32, usize)>> =
        (0..num_packs).map(|pack| Reverse((0.0f32.to_bits(), pack))).collect();
    let mut slots = vec![Slot { pack: 0, rank: 0 }; num_items];
    let mut pack_weight = vec![0.0f32; num_packs];
    let mut pack_items = vec![0usize; num_packs];
    for item in argsort_desc(weight) {
        let Reverse((_, pack)) = open.pop().expect("packs hold exactly num_items slots, so one has room");
        slots[item] = Slot { pack, rank: pack_items[pack] };
        pack_weight[pack] += weight[item];
        pack_items[pack] += 1;
        if pack_items[pack] < per_pack {
            open.push(Reverse((pack_weight[pack].to_bits(), pack)));
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packs(slots: &[Slot]) -> Vec<(usize, usize)> {
        slots.iter().map(|s| (s.pack, s.rank)).collect()
    }

    #[test]
    fn greedy_fills_lightest_pack_with_room() {
        // Descending: 8(i0) 7(i1) 6(i3) 5(i2) 4(i4) 0(i5).
        // 8->p0 (8), 7->p1 (7), 6->p1 (13), 5->p0 (13), tie 13/13 -> p0 (17), 0->p1 (13).
        let slots = balanced_packing(&[8.0, 7.0, 5.0, 6.0, 4.0, 0.0], 2);
        assert_eq!(packs(&slots), vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]);
    }

    #[test]
    fn full_pack_is_skipped_even_when_lightest() {
        // Two per pack. 10->p0, 1->p1, 1->p1 (p1 now full at 2), 0->p0 although p1 is lighter.
        let slots = balanced_packing(&[10.0, 1.0, 1.0, 0.0], 2);
        assert_eq!(packs(&slots), vec![(0, 0), (1, 0), (1, 1), (0, 1)]);
    }

    #[test]
    fn equal_weights_fill_packs_round_robin() {
        let slots = balanced_packing(&[3.0; 6], 3);
        assert_eq!(packs(&slots), vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
    }

    /// The reference's loop as written: scan the packs with room for the first minimum.
    fn linear_scan(weight: &[f32], num_packs: usize) -> Vec<Slot> {
        let per_pack = weight.len() / num_packs;
        let mut slots = vec![Slot { pack: 0, rank: 0 }; weight.len()];
        let (mut pack_weight, mut pack_items) = (vec![0.0f32; num_packs], vec![0usize; num_packs]);
        for item in argsort_desc(weight) {
            let pack = (0..num_packs)
                .filter(|&p| pack_items[p] < per_pack)
                .reduce(|best, p| if pack_weight[p] < pack_weight[best] { p } else { best })
                .expect("room left");
            slots[item] = Slot { pack, rank: pack_items[pack] };
            pack_weight[pack] += weight[item];
            pack_items[pack] += 1;
        }
        slots
    }

    #[test]
    fn heap_selection_matches_linear_scan() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..2000 {
            let num_packs = 2 + next(20) as usize;
            let per_pack = 2 + next(6) as usize;
            let scale = [2, 5, 1000][next(3) as usize];
            let weight: Vec<f32> =
                (0..num_packs * per_pack).map(|_| next(scale) as f32 / [1.0, 3.0][next(2) as usize]).collect();
            assert_eq!(balanced_packing(&weight, num_packs), linear_scan(&weight, num_packs), "{weight:?}");
        }
    }

    #[test]
    fn one_item_per_pack_keeps_item_order() {
        // Not sorted: the reference's shortcut maps item i to pack i.
        let slots = balanced_packing(&[1.0, 9.0, 5.0], 3);
        assert_eq!(packs(&slots), vec![(0, 0), (1, 0), (2, 0)]);
    }
}
