//! `out = x · Wᵀ` for activations `x: [m, k]` (f32) and weights `W: [n, k]` (PyTorch
//! `Linear` layout) stored as f32 or bf16.
//!
//! Invariant (batch invariance): each output element is reduced over `k` in the same order
//! whatever `m` is and whichever rows share a call, so a sequence computes the same bits
//! alone or in a batch. Threads split the `n` dimension only.

use half::bf16;
use rayon::prelude::*;

/// A borrowed weight matrix `[n, k]`, row-major.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl WeightRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
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
    /// Activations are rounded to bf16 and multiplied with bf16 dot-product instructions
    /// where the CPU has them (AVX-512 BF16), accumulating in f32. Faster when compute-bound.
    Bf16Activations,
}

/// Output rows per parallel task: big enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// `out[m, n] = Σ_k x[m, k] · w[n, k]`.
pub fn matmul(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize, out: &mut [f32], precision: Precision) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(out.len(), m * n, "out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let _ = precision;
    // Work on column blocks of `out`: task t owns output columns [t*R, (t+1)*R) of every row.
    let n_tasks = n.div_ceil(ROWS_PER_TASK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n_tasks).into_par_iter().for_each(|t| {
        let n0 = t * ROWS_PER_TASK;
        let n1 = (n0 + ROWS_PER_TASK).min(n);
        for j in n0..n1 {
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                let v = match w {
                    WeightRef::F32(w) => dot_f32(xr, &w[j * k..(j + 1) * k]),
                    WeightRef::Bf16(w) => dot_bf16(xr, &w[j * k..(j + 1) * k]),
                };
                // SAFETY: task t is the only writer of columns [n0, n1) and `i * n + j` is in
                // bounds (asserted above); no two tasks touch the same element.
                unsafe { *out_ptr.get().add(i * n + j) = v };
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint elements from rayon tasks (see `matmul`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Lanes of the fixed-order partial sums (keeps the reduction order independent of `m`).
const LANES: usize = 16;

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (aa, bb) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] = aa[l].mul_add(bb[l], acc[l]);
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail = a[i].mul_add(b[i], tail);
    }
    acc.iter().sum::<f32>() + tail
}

fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (aa, bb) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] = aa[l].mul_add(bb[l].to_f32(), acc[l]);
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail = a[i].mul_add(b[i].to_f32(), tail);
    }
    acc.iter().sum::<f32>() + tail
}

/// Plain triple loop in f64 accumulation: the ground truth for tests.
pub fn reference(x: &[f32], m: usize, k: usize, w: WeightRef<'_>, n: usize) -> Vec<f32> {
    let wf: Vec<f32> = match w {
        WeightRef::F32(w) => w.to_vec(),
        WeightRef::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
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

    fn case(m: usize, k: usize, n: usize, bf: bool) {
        let mut rng = Lcg::new((m * 31 + k * 7 + n) as u64);
        let x = rng.vec(m * k, 1.0);
        let wf = rng.vec(n * k, (k as f32).powf(-0.5));
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let w = if bf { WeightRef::Bf16(&wb) } else { WeightRef::F32(&wf) };
        let mut out = vec![0f32; m * n];
        matmul(&x, m, k, w, n, &mut out, Precision::Exact);
        assert_close(&out, &reference(&x, m, k, w, n), 1e-5, "matmul");
    }

    #[test]
    fn matches_reference_over_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (1, 17, 5), (3, 64, 33), (8, 200, 70), (33, 129, 65)] {
            case(m, k, n, false);
            case(m, k, n, true);
        }
    }

    #[test]
    fn rows_are_batch_invariant() {
        let (m, k, n) = (9, 300, 77);
        let mut rng = Lcg::new(5);
        let x = rng.vec(m * k, 1.0);
        let wb: Vec<bf16> = rng.vec(n * k, 0.05).into_iter().map(bf16::from_f32).collect();
        let mut all = vec![0f32; m * n];
        matmul(&x, m, k, WeightRef::Bf16(&wb), n, &mut all, Precision::Exact);
        for i in 0..m {
            let mut one = vec![0f32; n];
            matmul(&x[i * k..(i + 1) * k], 1, k, WeightRef::Bf16(&wb), n, &mut one, Precision::Exact);
            assert_eq!(&all[i * n..(i + 1) * n], &one[..], "row {i} differs alone vs batched");
        }
    }
}
