//! Tests of the packed layout and of every path over it (AVX-512 dot / widening kernels
//! where the CPU has them, and the portable path, called directly).

use super::*;
use crate::cpu::matmul::{WeightRef, matmul, reference, round_to_bf16};
use crate::cpu::test_util::{Lcg, assert_close};

const PRECISIONS: [Precision; 2] = [Precision::Exact, Precision::Bf16Activations];

struct Case {
    x: Vec<f32>,
    w: Vec<bf16>,
    p: PackedBf16,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, seed: u64) -> Case {
        let mut rng = Lcg::new(seed);
        let x = rng.vec(m * k, 1.0);
        let w: Vec<bf16> = rng.vec(n * k, (k.max(1) as f32).powf(-0.5)).into_iter().map(bf16::from_f32).collect();
        let p = PackedBf16::pack(&w, n, k);
        Case { x, w, p }
    }

    fn run(&self, m: usize, k: usize, n: usize, p: Precision) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * n];
        matmul(&self.x[..m * k], m, k, WeightRef::Packed(self.p.as_ref()), n, &mut out, p);
        out
    }
}

fn check(m: usize, k: usize, n: usize) {
    let c = Case::new(m, k, n, (m * 31 + k * 7 + n) as u64);
    for p in PRECISIONS {
        let out = c.run(m, k, n, p);
        let what = format!("packed m={m} k={k} n={n} {p:?}");
        if p == Precision::Bf16Activations {
            let want = reference(&round_to_bf16(&c.x), m, k, WeightRef::Bf16(&c.w), n);
            assert_close(&out, &want, 1e-4, &what);
        } else {
            assert_close(&out, &reference(&c.x, m, k, WeightRef::Bf16(&c.w), n), 1e-5, &what);
        }
    }
}

#[test]
fn pack_round_trips() {
    for &(n, k) in &[(1, 1), (5, 3), (16, 2), (17, 33), (48, 64), (50, 7)] {
        let c = Case::new(1, k, n, 3);
        let r = c.p.as_ref();
        for j in 0..n {
            let mut row = vec![0f32; k];
            r.row_f32(j, &mut row);
            for (kk, &v) in row.iter().enumerate() {
                assert_eq!(r.get(j, kk), c.w[j * k + kk], "n={n} k={k} ({j}, {kk})");
                assert_eq!(v, c.w[j * k + kk].to_f32());
            }
        }
        // Padding (rows past n, the odd-k pad) is zero.
        let nonzero = c.p.data.iter().filter(|v| v.to_f32() != 0.0).count();
        assert_eq!(nonzero, c.w.iter().filter(|v| v.to_f32() != 0.0).count(), "padding n={n} k={k}");
    }
}

#[test]
fn matches_reference_across_tiles_and_tails() {
    // n around the 16-row panels and 3-panel groups, odd k, m around the 6/8-row tiles.
    for &k in &[1, 2, 15, 32, 33, 100, 257] {
        for &(m, n) in &[(1, 7), (4, 16), (5, 17), (6, 48), (7, 49), (8, 33), (9, 64), (13, 95), (17, 5)] {
            check(m, k, n);
        }
    }
    check(2, 0, 3);
}

#[test]
fn large_and_k_blocked_shapes_stay_accurate() {
    // k = 2 * 1024 pairs is one k-block; 4099 spans three with an odd tail.
    check(20, 2048, 129);
    check(9, 4099, 50);
    check(33, 1408, 70);
}

#[test]
fn rows_are_batch_invariant() {
    // k = 4099: several k-blocks; n = 77: a partial panel and a partial group.
    for (k, n) in [(300, 77), (4099, 40)] {
        let c = Case::new(40, k, n, 5);
        for p in PRECISIONS {
            for m in [1, 3, 6, 8, 9, 13, 16, 33, 40] {
                let all = c.run(m, k, n, p);
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    let x1 = &c.x[i * k..(i + 1) * k];
                    matmul(x1, 1, k, WeightRef::Packed(c.p.as_ref()), n, &mut one, p);
                    assert_eq!(&all[i * n..(i + 1) * n], &one[..], "k={k} {p:?} m={m}: row {i} alone vs batched");
                }
            }
        }
    }
}

#[test]
fn portable_path_matches_reference() {
    // Called directly: on AVX-512 machines `matmul` never takes this path.
    for &(m, k, n) in &[(5, 70, 9), (3, 33, 40)] {
        let c = Case::new(m, k, n, 12);
        let mut out = vec![f32::NAN; m * n];
        portable(&c.x, m, c.p.as_ref(), &mut out);
        assert_close(&out, &reference(&c.x, m, k, WeightRef::Bf16(&c.w), n), 1e-5, "portable packed");
        let xr = round_to_bf16(&c.x);
        portable(&xr, m, c.p.as_ref(), &mut out);
        assert_close(&out, &reference(&xr, m, k, WeightRef::Bf16(&c.w), n), 1e-5, "portable packed, rounded x");
    }
}
