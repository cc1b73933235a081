//! `out = x · Wᵀ` for activations `x: [m, k]` (f32) and weights `W: [n, k]` (PyTorch
//! `Linear` layout) stored as f32 or bf16.
//!
//! Paths, chosen per call:
//! * x86_64 with AVX-512 F/BW (runtime detection): the register-tiled kernels of
//!   `matmul_avx512` for every `m` — bf16 weights widened to f32 (`Exact`), `vdpbf16ps` on
//!   bf16-rounded activations (`Bf16Activations`; needs AVX512-BF16, otherwise the widening
//!   kernel on rounded activations), f32 weights with `vfmadd`.
//! * Elsewhere: the portable dot products below (rayon over `n`), except f32 weights with
//!   `m >= GEMM_MIN_M`, which go to the `gemm` crate.
//!
//! Invariant (batch invariance): each output element is reduced over `k` in the same order
//! whatever `m` is and whichever rows share a call, so a sequence computes the same bits
//! alone or in a batch. Threads split the `n` dimension only. The one exception is the
//! `gemm` fallback (f32 weights, `m >= GEMM_MIN_M`, no AVX-512): gemm's blocking makes its
//! reduction order depend on `m` (measured: a row alone differs in the last bits from the
//! same row in a batch of 16+), so there a row matches itself only across batches below
//! `GEMM_MIN_M` rows. On AVX-512 machines gemm is not used: our f32 kernel is invariant and
//! was measured as fast or faster (gemm 0.19 without its `x86-v4` feature runs AVX2 code).
//!
//! `Precision::Bf16Activations` rounds activations to bf16 (nearest-even, as
//! `bf16::from_f32`) once per call; products of two bf16 values are exact in f32, so every
//! path computes the same mathematical sum and differs only in f32 summation rounding.

use half::bf16;
use rayon::prelude::*;

use super::packed::PackedRef;

/// A borrowed weight matrix `[n, k]`, row-major.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    /// bf16 packed by `packed::pack_into` (the fast layout; see `packed`).
    Packed(PackedRef<'a>),
}

impl WeightRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
            WeightRef::Packed(w) => w.n() * w.k(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How activations meet bf16 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Weights are widened to f32 and multiplied with f32 activations: the result equals
    /// "bf16 weights upcast to f32" up to summation order.
    #[default]
    Exact,
    /// Activations are rounded to bf16 (nearest, ties to even, once per call) and multiplied
    /// with bf16 dot-product instructions where the CPU has them (AVX-512 BF16), accumulating
    /// in f32. About twice the FLOP rate of `Exact` when compute-bound. f32 weights ignore
    /// this (always exact).
    Bf16Activations,
}

/// Without AVX-512, f32 weights with this many activation rows or more go through `gemm`
/// (see the module docs).
pub const GEMM_MIN_M: usize = 16;

/// Whether f32 weights with `m` activation rows take the (not batch-invariant) gemm path.
pub fn f32_uses_gemm(m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::matmul_avx512::available() {
        return false;
    }
    m >= GEMM_MIN_M
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]`.
pub fn matmul(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize, out: &mut [f32], precision: Precision) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(out.len(), m * n, "out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    match w {
        WeightRef::F32(w) => {
            #[cfg(target_arch = "x86_64")]
            if super::matmul_avx512::matmul_f32(x, m, k, w, n, out) {
                return;
            }
            if f32_uses_gemm(m) && k > 0 {
                gemm_f32(x, m, k, w, n, out);
            } else {
                portable(x, m, k, n, out, |xr, j| dot_f32(xr, &w[j * k..(j + 1) * k]));
            }
        }
        WeightRef::Bf16(w) => {
            #[cfg(target_arch = "x86_64")]
            if super::matmul_avx512::matmul_bf16(x, m, k, w, n, out, precision) {
                return;
            }
            let x = activations(x, precision);
            portable(&x, m, k, n, out, |xr, j| dot_bf16(xr, &w[j * k..(j + 1) * k]));
        }
        WeightRef::Packed(w) => {
            assert!(w.n() == n && w.k() == k, "packed w is not [n, k]");
            super::packed::matmul_packed(x, m, w, out, precision);
        }
    }
}

/// `x` as the portable paths see it: rounded to bf16 under `Bf16Activations`.
pub(super) fn activations(x: &[f32], precision: Precision) -> std::borrow::Cow<'_, [f32]> {
    match precision {
        Precision::Exact => std::borrow::Cow::Borrowed(x),
        Precision::Bf16Activations => std::borrow::Cow::Owned(round_to_bf16(x)),
    }
}

/// Activations rounded to the nearest bf16 (ties to even), kept as f32.
pub fn round_to_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// f32 weights through `gemm`: `out (m×n, row-major) = x (m×k) · Wᵀ`, with `Wᵀ` described by
/// strides over `w` (`Wᵀ[kk, j] = w[j·k + kk]`), so nothing is copied.
fn gemm_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n, "gemm_f32: operand sizes");
    let threads = rayon::current_num_threads().max(1);
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the three matrices are exactly the slices asserted above (m·k, n·k, m·n
    // elements) and the strides describe them in bounds; `read_dst = false` so `out` is only
    // written; `dst = alpha·dst + beta·lhs·rhs` with alpha ignored and beta = 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// Output rows per parallel task in the portable path: big enough to amortize scheduling,
/// small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// The portable path: rayon over blocks of output columns, `dot(x_row, j)` per element.
fn portable(x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32], dot: impl Fn(&[f32], usize) -> f32 + Sync) {
    // Task t owns output columns [t*R, (t+1)*R) of every row.
    let n_tasks = n.div_ceil(ROWS_PER_TASK);
    let out_ptr = super::out_ptr::OutPtr::new(out);
    (0..n_tasks).into_par_iter().for_each(|t| {
        let n0 = t * ROWS_PER_TASK;
        let n1 = (n0 + ROWS_PER_TASK).min(n);
        for j in n0..n1 {
            for i in 0..m {
                let v = dot(&x[i * k..(i + 1) * k], j);
                // SAFETY: task t is the only writer of columns [n0, n1) and `i * n + j` is in
                // bounds (asserted in `matmul`); no two tasks touch the same element.
                unsafe { *out_ptr.get().add(i * n + j) = v };
            }
        }
    });
}

/// Lanes of the fixed-order partial sums (keeps the reduction order independent of `m`).
const LANES: usize = 16;

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (aa, bb) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] += aa[l] * bb[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}

fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (aa, bb) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] += aa[l] * bb[l].to_f32();
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i].to_f32();
    }
    acc.iter().sum::<f32>() + tail
}

/// Plain triple loop in f64 accumulation: the ground truth for tests.
pub fn reference(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize) -> Vec<f32> {
    let wf: Vec<f32> = match w {
        WeightRef::F32(w) => w.to_vec(),
        WeightRef::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
        WeightRef::Packed(w) => (0..n * k).map(|x| w.get(x / k, x % k).to_f32()).collect(),
    };
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for kk in 0..k {
                s += x[i * k + kk] as f64 * wf[j * k + kk] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{Lcg, assert_close};

    /// Every (weight dtype, precision) combination the dispatcher distinguishes.
    const PATHS: [(bool, Precision); 3] =
        [(false, Precision::Exact), (true, Precision::Exact), (true, Precision::Bf16Activations)];

    struct Case {
        x: Vec<f32>,
        wf: Vec<f32>,
        wb: Vec<bf16>,
    }

    impl Case {
        fn new(m: usize, k: usize, n: usize, seed: u64) -> Case {
            let mut rng = Lcg::new(seed);
            let x = rng.vec(m * k, 1.0);
            let wf = rng.vec(n * k, (k.max(1) as f32).powf(-0.5));
            let wb = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            Case { x, wf, wb }
        }

        fn w(&self, bf: bool) -> WeightRef<'_> {
            if bf { WeightRef::Bf16(&self.wb) } else { WeightRef::F32(&self.wf) }
        }
    }

    fn check(m: usize, k: usize, n: usize) {
        let c = Case::new(m, k, n, (m * 31 + k * 7 + n) as u64);
        for (bf, p) in PATHS {
            let mut out = vec![f32::NAN; m * n];
            matmul(&c.x, m, k, c.w(bf), n, &mut out, p);
            let what = format!("matmul m={m} k={k} n={n} bf16={bf} {p:?}");
            if p == Precision::Bf16Activations {
                // The reference sees the same rounded activations; only summation differs.
                let want = reference(&round_to_bf16(&c.x), m, k, c.w(bf), n);
                assert_close(&out, &want, 1e-4, &what);
            } else {
                assert_close(&out, &reference(&c.x, m, k, c.w(bf), n), 1e-5, &what);
            }
        }
    }

    #[test]
    fn matches_reference_over_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (1, 17, 5), (3, 64, 33), (8, 200, 70), (33, 129, 65), (2, 0, 3)] {
            check(m, k, n);
        }
    }

    #[test]
    fn matches_reference_across_tiles_and_tails() {
        // k around the 16/32-value chunks, n around the 4-row groups and task splits, m
        // around the 4/6-row register tiles and the gemm threshold.
        for &k in &[15, 16, 31, 32, 33, 63, 100, 257] {
            for &(m, n) in &[(1, 7), (4, 9), (5, 13), (6, 4), (7, 3), (13, 31), (16, 5), (19, 70)] {
                check(m, k, n);
            }
        }
    }

    #[test]
    fn large_k_and_n_stay_accurate() {
        check(2, 2048, 300);
        check(20, 1408, 129);
    }

    #[test]
    fn rows_are_batch_invariant() {
        let (k, n) = (300, 77);
        let c = Case::new(40, k, n, 5);
        for (bf, p) in PATHS {
            for m in [1, 3, 6, 8, 13, 15, 33, 40] {
                // The documented exception: f32 weights through `gemm` (no AVX-512).
                if !bf && f32_uses_gemm(m) {
                    continue;
                }
                let mut all = vec![0f32; m * n];
                matmul(&c.x[..m * k], m, k, c.w(bf), n, &mut all, p);
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    matmul(&c.x[i * k..(i + 1) * k], 1, k, c.w(bf), n, &mut one, p);
                    let what = format!("bf16={bf} {p:?} m={m}: row {i} differs alone vs batched");
                    assert_eq!(&all[i * n..(i + 1) * n], &one[..], "{what}");
                }
            }
        }
    }

    #[test]
    fn rows_are_batch_invariant_across_activation_chunks() {
        // With k = 8192 an L2-sized chunk of packed activations holds only 8 (f32) or 12
        // (bf16) rows, so these batches span several chunks.
        let (k, n) = (8192, 9);
        let c = Case::new(33, k, n, 6);
        for (bf, p) in PATHS {
            for m in [13, 33] {
                if !bf && f32_uses_gemm(m) {
                    continue;
                }
                let mut all = vec![0f32; m * n];
                matmul(&c.x[..m * k], m, k, c.w(bf), n, &mut all, p);
                for i in [0, 7, 8, 12, m - 1] {
                    let mut one = vec![0f32; n];
                    matmul(&c.x[i * k..(i + 1) * k], 1, k, c.w(bf), n, &mut one, p);
                    assert_eq!(&all[i * n..(i + 1) * n], &one[..], "bf16={bf} {p:?} m={m} row {i}");
                }
            }
        }
    }

    #[test]
    fn rows_are_invariant_to_column_slicing() {
        // Thread tiling splits `n`; a column's value must not depend on where the split falls.
        let (m, k, n) = (5, 96, 200);
        let c = Case::new(m, k, n, 9);
        for (bf, p) in PATHS {
            let mut all = vec![0f32; m * n];
            matmul(&c.x, m, k, c.w(bf), n, &mut all, p);
            let (j0, j1) = (37, 41);
            let ws = &c.wb[j0 * k..j1 * k];
            let wf = &c.wf[j0 * k..j1 * k];
            let w = if bf { WeightRef::Bf16(ws) } else { WeightRef::F32(wf) };
            let mut part = vec![0f32; m * (j1 - j0)];
            matmul(&c.x, m, k, w, j1 - j0, &mut part, p);
            for i in 0..m {
                assert_eq!(&all[i * n + j0..i * n + j1], &part[i * (j1 - j0)..(i + 1) * (j1 - j0)]);
            }
        }
    }

    #[test]
    fn gemm_fallback_matches_reference() {
        // Called directly: on AVX-512 machines `matmul` never takes this path.
        for &(m, k, n) in &[(16, 33, 7), (40, 257, 70)] {
            let c = Case::new(m, k, n, 11);
            let mut out = vec![f32::NAN; m * n];
            gemm_f32(&c.x, m, k, &c.wf, n, &mut out);
            assert_close(&out, &reference(&c.x, m, k, c.w(false), n), 1e-5, "gemm");
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        // Called directly: on AVX-512 machines `matmul` never takes this path.
        let (m, k, n) = (5, 70, 9);
        let c = Case::new(m, k, n, 12);
        let mut out = vec![f32::NAN; m * n];
        portable(&c.x, m, k, n, &mut out, |xr, j| dot_bf16(xr, &c.wb[j * k..(j + 1) * k]));
        assert_close(&out, &reference(&c.x, m, k, c.w(true), n), 1e-5, "portable bf16");
        portable(&c.x, m, k, n, &mut out, |xr, j| dot_f32(xr, &c.wf[j * k..(j + 1) * k]));
        assert_close(&out, &reference(&c.x, m, k, c.w(false), n), 1e-5, "portable f32");
        let xr = round_to_bf16(&c.x);
        portable(&xr, m, k, n, &mut out, |xr, j| dot_bf16(xr, &c.wb[j * k..(j + 1) * k]));
        assert_close(&out, &reference(&xr, m, k, c.w(true), n), 1e-5, "portable bf16, rounded x");
    }
}
