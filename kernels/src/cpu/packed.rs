//! bf16 weights packed once (at load time) for the outer-product GEMM of
//! `packed_avx512`, plus the portable path over the same layout.
//!
//! Layout: output rows (`n`) in panels of [`PANEL`] = 16; inside a panel, for each k-pair
//! `(2p, 2p+1)`, 16 rows × 2 values = 32 bf16 (one zmm): row `r`'s pair is lane `r` as a
//! u32 (even `k` in the low half). That is the operand layout of `vdpbf16ps`, so one load
//! gives 16 outputs' next pair and a 32-bit broadcast of an activation pair multiplies all
//! of them: no horizontal sums, and the weight stream of a panel is one contiguous run
//! (friendly to the hardware prefetchers, unlike `n` separate 4 KiB rows). The last panel is
//! padded with zero rows, an odd `k` with a zero last value.
//!
//! Invariant (batch invariance): an output element lives in one f32 lane and accumulates
//! its k-pairs strictly in order, from zero, on every path (any tile height, any thread
//! split, k-blocks resume from the stored partial sum, which is exact); so a row gets the
//! same bits alone or in any batch.

use half::bf16;
use rayon::prelude::*;

use super::matmul::Precision;

/// Output rows per panel (one zmm of f32 accumulators).
pub const PANEL: usize = 16;

/// Values of the packed form of an `[n, k]` matrix.
pub fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(PANEL) * k.div_ceil(2) * 2 * PANEL
}

/// Index of element `(j, kk)` of the `[n, k]` matrix in the packed form.
#[inline]
fn packed_index(k: usize, j: usize, kk: usize) -> usize {
    ((j / PANEL * k.div_ceil(2) + kk / 2) * PANEL + j % PANEL) * 2 + kk % 2
}

/// Packs `w: [n, k]` (row-major) into `dst` (`packed_len(n, k)` values; padding zeroed).
pub fn pack_into(w: &[bf16], n: usize, k: usize, dst: &mut [bf16]) {
    assert_eq!(w.len(), n * k, "pack: w is not [n, k]");
    assert_eq!(dst.len(), packed_len(n, k), "pack: dst has the wrong length");
    let panel_len = k.div_ceil(2) * 2 * PANEL;
    // Panels are independent and each is written contiguously: parallel over panels.
    dst.par_chunks_mut(panel_len.max(1)).enumerate().for_each(|(pi, panel)| {
        panel.fill(bf16::ZERO);
        for r in 0..PANEL.min(n.saturating_sub(pi * PANEL)) {
            let row = &w[(pi * PANEL + r) * k..(pi * PANEL + r + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                panel[(kk / 2 * PANEL + r) * 2 + kk % 2] = v;
            }
        }
    });
}

/// A packed `[n, k]` bf16 matrix, borrowed (the storage may live anywhere, e.g. huge pages).
#[derive(Debug, Clone, Copy)]
pub struct PackedRef<'a> {
    n: usize,
    k: usize,
    data: &'a [bf16],
}

impl<'a> PackedRef<'a> {
    /// Wraps `data` laid out by [`pack_into`] for an `[n, k]` matrix.
    pub fn new(data: &'a [bf16], n: usize, k: usize) -> Self {
        assert_eq!(data.len(), packed_len(n, k), "PackedRef: data has the wrong length");
        PackedRef { n, k, data }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn data(&self) -> &'a [bf16] {
        self.data
    }

    /// Element `(j, kk)` of the original matrix.
    pub fn get(&self, j: usize, kk: usize) -> bf16 {
        assert!(j < self.n && kk < self.k, "PackedRef::get out of bounds");
        self.data[packed_index(self.k, j, kk)]
    }

    /// Row `j` of the original matrix widened to f32 (embeddings of a tied `lm_head`).
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k, "row_f32: out is not one row");
        for (kk, o) in out.iter_mut().enumerate() {
            *o = self.get(j, kk).to_f32();
        }
    }
}

/// An owned packed matrix (tests, benchmarks; the model keeps its own storage).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    pub data: Vec<bf16>,
}

impl PackedBf16 {
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Self {
        let mut data = vec![bf16::ZERO; packed_len(n, k)];
        pack_into(w, n, k, &mut data);
        PackedBf16 { n, k, data }
    }

    pub fn as_ref(&self) -> PackedRef<'_> {
        PackedRef::new(&self.data, self.n, self.k)
    }
}

/// `out[m, n] = x[m, k] · Wᵀ` for packed `W`; sizes checked by `matmul`.
pub(super) fn matmul_packed(x: &[f32], m: usize, w: PackedRef<'_>, out: &mut [f32], precision: Precision) {
    if w.k == 0 {
        // No pairs: the kernels would never store their (zero) accumulators.
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::packed_avx512::matmul_packed(x, m, w, out, precision) {
        return;
    }
    let x = super::matmul::activations(x, precision);
    portable(&x, m, w, out);
}

/// Portable path: rayon over panels; per element, pairs in order, even then odd product
/// (the same order as the AVX-512 kernels, though not fused, so not the same bits).
pub(super) fn portable(x: &[f32], m: usize, w: PackedRef<'_>, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    let k2 = k.div_ceil(2);
    let panels = n.div_ceil(PANEL);
    let cols: Vec<Vec<f32>> = (0..panels)
        .into_par_iter()
        .map(|pi| {
            let panel = &w.data[pi * k2 * 2 * PANEL..(pi + 1) * k2 * 2 * PANEL];
            let mut acc = vec![0f32; m * PANEL];
            for (i, a) in acc.chunks_exact_mut(PANEL).enumerate() {
                let xr = &x[i * k..(i + 1) * k];
                for p in 0..k2 {
                    let (x0, x1) = (xr[2 * p], xr.get(2 * p + 1).copied().unwrap_or(0.0));
                    let wp = &panel[p * 2 * PANEL..(p + 1) * 2 * PANEL];
                    for (r, s) in a.iter_mut().enumerate() {
                        *s += x0 * wp[2 * r].to_f32();
                        *s += x1 * wp[2 * r + 1].to_f32();
                    }
                }
            }
            acc
        })
        .collect();
    for (pi, acc) in cols.iter().enumerate() {
        let c = PANEL.min(n - pi * PANEL);
        for i in 0..m {
            out[i * n + pi * PANEL..i * n + pi * PANEL + c].copy_from_slice(&acc[i * PANEL..i * PANEL + c]);
        }
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
