//! AVX-512 outer-product GEMM over packed bf16 weights (layout in `packed`): work split,
//! activation packing and the two register-tiled micro-kernels.
//!
//! A micro-kernel owns `MB` activation rows × `NB` panels (16 outputs each) in `MB * NB`
//! zmm accumulators. Per k-pair it loads `NB` weight vectors and, per row, broadcasts the
//! row's pair: `MB + NB` loads feed `MB * NB` multiply-adds, and nothing is reduced
//! horizontally at the end (the dot form of `matmul_avx512` pays a 16-lane sum per output).
//! * `dot_tile` (`Bf16Activations` with AVX512-BF16): activations rounded to bf16, one
//!   32-bit broadcast per row and pair, `vdpbf16ps`.
//! * `exact_tile` (`Exact`, or `Bf16Activations` on rounded activations without
//!   AVX512-BF16): the packed pair widened in registers to even/odd f32 vectors (`<< 16`,
//!   `& 0xFFFF0000`), two f32 broadcasts per row, two `vfmadd` (even first).
//!
//! Invariant (batch invariance): each output lane accumulates its pairs in order from zero
//! whatever `MB`, `NB`, thread split or k-block; k-blocks store the partial sums to `out`
//! and reload them (exact), so the sequence of roundings is the same as without blocks.

// Register tiles read clearest as `acc[i][j]` loops over const bounds (fully unrolled).
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;
use std::arch::x86_64::*;

use super::matmul::Precision;
use super::matmul_avx512::{has_avx512, has_avx512_bf16, pack_bf16, round_bf16};
use super::packed::{PANEL, PackedRef};

/// `dot_tile`: 24 accumulators + 3 weight vectors + broadcasts fit 32 zmm registers.
const MB_DOT: usize = 8;
const NB_DOT: usize = 3;
/// `exact_tile`: 18 accumulators + 6 widened weight vectors + 2 broadcasts.
const MB_EXACT: usize = 6;
const NB_EXACT: usize = 3;
/// k-pairs per k-block: `NB` panels × 1024 pairs × 64 bytes = 192 KiB of weights stay in
/// L2 (1 MiB on the target) while every row block of the call passes over them.
const KC: usize = 1024;
/// Below this many multiply-adds a call runs on the calling thread (a rayon fork/join
/// costs ~10 µs, more than the work).
const INLINE_MACS: usize = 1 << 18;

/// `out = x · Wᵀ` for packed `w`. Returns `false` (doing nothing) without AVX-512 F/BW.
pub(super) fn matmul_packed(x: &[f32], m: usize, w: PackedRef<'_>, out: &mut [f32], precision: Precision) -> bool {
    if !has_avx512() {
        return false;
    }
    let (n, k) = (w.n(), w.k());
    assert!(x.len() == m * k && out.len() == m * n, "matmul_packed: operand sizes");
    let k2 = k.div_ceil(2);
    match precision {
        Precision::Bf16Activations if has_avx512_bf16() => {
            let xp = pack_bf16(x, m, k, 2 * k2);
            run(Kern::Dot { x: &xp }, m, w, out);
        }
        _ => {
            let round = precision == Precision::Bf16Activations;
            // Rows padded to whole pairs (the padding multiplies the zero weight pad; it
            // must be finite, so it is written as 0, never read past the row).
            let padded: Vec<f32>;
            let xs = if round || k % 2 == 1 {
                padded = pad_rows(x, m, k, 2 * k2, round);
                &padded
            } else {
                x
            };
            run(Kern::Exact { x: xs }, m, w, out);
        }
    }
    true
}

/// Rows of `x` with stride `kp` (zero-padded), optionally rounded to bf16.
fn pad_rows(x: &[f32], m: usize, k: usize, kp: usize, round: bool) -> Vec<f32> {
    let mut p = vec![0f32; m * kp];
    for (d, s) in p.chunks_exact_mut(kp.max(1)).zip(x.chunks_exact(k.max(1))) {
        for (d, &v) in d.iter_mut().zip(s) {
            *d = if round { f32::from_bits(round_bf16(v.to_bits())) } else { v };
        }
    }
    p
}

/// Activations packed for a kernel: rows of stride `2 * k2` (bf16 bits or f32).
#[derive(Clone, Copy)]
enum Kern<'a> {
    Dot { x: &'a [u16] },
    Exact { x: &'a [f32] },
}

/// `f::<mb, np>(args)` for runtime `mb` in 1..=8 and `np` in 1..=3.
macro_rules! dispatch {
    ($f:ident, $mb:expr, $np:expr, $($a:expr),*) => {
        match $np {
            1 => dispatch!(@mb $f, $mb, 1, $($a),*),
            2 => dispatch!(@mb $f, $mb, 2, $($a),*),
            _ => dispatch!(@mb $f, $mb, 3, $($a),*),
        }
    };
    (@mb $f:ident, $mb:expr, $np:literal, $($a:expr),*) => {
        match $mb {
            1 => $f::<1, $np>($($a),*),
            2 => $f::<2, $np>($($a),*),
            3 => $f::<3, $np>($($a),*),
            4 => $f::<4, $np>($($a),*),
            5 => $f::<5, $np>($($a),*),
            6 => $f::<6, $np>($($a),*),
            7 => $f::<7, $np>($($a),*),
            _ => $f::<8, $np>($($a),*),
        }
    };
}

/// Splits the panel groups into tasks (rayon, or inline for small calls). A task walks its
/// groups; per group, k-blocks; per k-block, every `MB`-row block (the group's k-block of
/// weights stays in L2 meanwhile). Traversal order never changes an element's reduction.
fn run(kern: Kern<'_>, m: usize, w: PackedRef<'_>, out: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    let k2 = k.div_ceil(2);
    let (mb_max, nb) = match kern {
        Kern::Dot { .. } => (MB_DOT, NB_DOT),
        Kern::Exact { .. } => (MB_EXACT, NB_EXACT),
    };
    let panel_len = 2 * PANEL * k2;
    let groups = n.div_ceil(PANEL * nb);
    // About 8 tasks per thread so stealing evens out.
    let per_task = groups.div_ceil(rayon::current_num_threads().max(1) * 8).max(1);
    let out = super::out_ptr::OutPtr::new(out);
    let wd = w.data();
    let task = |t: usize| {
        for g in t * per_task..((t + 1) * per_task).min(groups) {
            let c0 = g * nb * PANEL;
            let cols = (nb * PANEL).min(n - c0);
            let np = cols.div_ceil(PANEL);
            let mut masks = [0u16; NB_DOT];
            for (j, mk) in masks.iter_mut().enumerate().take(np) {
                let valid = PANEL.min(cols - j * PANEL);
                *mk = if valid == PANEL { !0 } else { (1u16 << valid) - 1 };
            }
            let mut p0 = 0;
            while p0 < k2 {
                let pairs = KC.min(k2 - p0);
                let mut i0 = 0;
                while i0 < m {
                    let mb = mb_max.min(m - i0);
                    let o = out.get().wrapping_add(i0 * n + c0);
                    let wg = wd.as_ptr().cast::<u16>().wrapping_add(g * nb * panel_len + p0 * 2 * PANEL);
                    // SAFETY: features checked by `matmul_packed`; activation rows
                    // [i0, i0+mb) hold pairs [p0, p0+pairs) (stride 2*k2); panels
                    // [g*nb, g*nb+np) exist in `w` (np computed from n) and hold those
                    // pairs; output columns [c0, c0+cols) of rows [i0, i0+mb) are in
                    // `out` (masks cover only valid columns) and this task owns them.
                    unsafe {
                        match kern {
                            Kern::Dot { x } => {
                                let xb = x.as_ptr().add(i0 * 2 * k2 + 2 * p0);
                                dispatch!(dot_tile, mb, np, xb, 2 * k2, wg, panel_len, pairs, o, n, &masks, p0 > 0)
                            }
                            Kern::Exact { x } => {
                                let xb = x.as_ptr().add(i0 * 2 * k2 + 2 * p0);
                                dispatch!(exact_tile, mb, np, xb, 2 * k2, wg, panel_len, pairs, o, n, &masks, p0 > 0)
                            }
                        }
                    }
                    i0 += mb;
                }
                p0 += pairs;
            }
        }
    };
    let tasks = groups.div_ceil(per_task);
    if m * n * k <= INLINE_MACS || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Accumulators initialised to zero, or (`resume`, a later k-block) to the partial sums
/// stored in `out`.
///
/// # Safety
/// `out` readable at `i * os + 16 * j + lane` for the lanes enabled in `masks[j]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn init<const MB: usize, const NB: usize>(
    out: *const f32,
    os: usize,
    masks: &[u16; 3],
    resume: bool,
) -> [[__m512; NB]; MB] {
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    if resume {
        for i in 0..MB {
            for j in 0..NB {
                // SAFETY: masked lanes are not accessed; enabled ones are in bounds (caller).
                acc[i][j] = unsafe { _mm512_maskz_loadu_ps(masks[j], out.add(i * os + PANEL * j)) };
            }
        }
    }
    acc
}

/// Stores the accumulators (only the lanes enabled in `masks`).
///
/// # Safety
/// `out` writable at the enabled lanes, as in [`init`].
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const MB: usize, const NB: usize>(
    acc: &[[__m512; NB]; MB],
    out: *mut f32,
    os: usize,
    masks: &[u16; 3],
) {
    for i in 0..MB {
        for j in 0..NB {
            // SAFETY: as in `init`.
            unsafe { _mm512_mask_storeu_ps(out.add(i * os + PANEL * j), masks[j], acc[i][j]) };
        }
    }
}

/// bf16 activations (rows of stride `xs` u16, at the block's first pair) × `NB` packed
/// panels (stride `ps` u16, at the block's first pair) for `pairs` pairs with `vdpbf16ps`.
///
/// # Safety
/// AVX-512 F/BW/BF16 present; `x` readable for `MB` rows × `2 * pairs` values, `w` for
/// `NB` panels × `32 * pairs` values; `out` as in [`init`] / [`store`].
#[allow(clippy::too_many_arguments)] // one call shape for both kernels (see `dispatch!`)
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_tile<const MB: usize, const NB: usize>(
    x: *const u16,
    xs: usize,
    w: *const u16,
    ps: usize,
    pairs: usize,
    out: *mut f32,
    os: usize,
    masks: &[u16; 3],
    resume: bool,
) {
    // SAFETY: every access is within the ranges of the contract.
    unsafe {
        let mut acc = init::<MB, NB>(out, os, masks, resume);
        for p in 0..pairs {
            let mut wv = [_mm512_setzero_si512(); NB];
            for j in 0..NB {
                wv[j] = _mm512_loadu_si512(w.add(j * ps + p * 2 * PANEL).cast());
            }
            for i in 0..MB {
                let b = _mm512_set1_epi32(x.add(i * xs + 2 * p).cast::<i32>().read_unaligned());
                for j in 0..NB {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(b), as_bh(wv[j]));
                }
            }
        }
        store(&acc, out, os, masks);
    }
}

/// f32 activations × `NB` packed panels widened to f32 (even then odd product per pair).
///
/// # Safety
/// As [`dot_tile`] (AVX512-BF16 not needed), with `x` holding f32.
#[allow(clippy::too_many_arguments)] // one call shape for both kernels (see `dispatch!`)
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn exact_tile<const MB: usize, const NB: usize>(
    x: *const f32,
    xs: usize,
    w: *const u16,
    ps: usize,
    pairs: usize,
    out: *mut f32,
    os: usize,
    masks: &[u16; 3],
    resume: bool,
) {
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // SAFETY: every access is within the ranges of the contract.
    unsafe {
        let mut acc = init::<MB, NB>(out, os, masks, resume);
        for p in 0..pairs {
            let (mut we, mut wo) = ([_mm512_setzero_ps(); NB], [_mm512_setzero_ps(); NB]);
            for j in 0..NB {
                let v = _mm512_loadu_si512(w.add(j * ps + p * 2 * PANEL).cast());
                we[j] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            }
            for i in 0..MB {
                let xe = _mm512_set1_ps(*x.add(i * xs + 2 * p));
                let xo = _mm512_set1_ps(*x.add(i * xs + 2 * p + 1));
                for j in 0..NB {
                    acc[i][j] = _mm512_fmadd_ps(xe, we[j], acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(xo, wo[j], acc[i][j]);
                }
            }
        }
        store(&acc, out, os, masks);
    }
}

/// 64 bytes as 32 bf16 lanes (the intrinsics have no cast for `__m512bh`).
#[inline]
#[target_feature(enable = "avx512f")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 64-byte SIMD vectors; every bit pattern is a valid value of each.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::{WeightRef, reference, round_to_bf16};
    use crate::cpu::packed::PackedBf16;
    use crate::cpu::test_util::{Lcg, assert_close};
    use half::bf16;

    /// The kernel used for `Bf16Activations` on CPUs without AVX512-BF16 (called directly,
    /// so it runs wherever AVX-512 F/BW do).
    #[test]
    fn widening_kernel_on_rounded_activations_matches_reference() {
        if !has_avx512() {
            return;
        }
        for &(m, k, n) in &[(1, 40, 5), (7, 101, 50), (13, 2048, 9)] {
            let mut rng = Lcg::new(78);
            let x = rng.vec(m * k, 1.0);
            let wb: Vec<bf16> = rng.vec(n * k, 0.1).into_iter().map(bf16::from_f32).collect();
            let p = PackedBf16::pack(&wb, n, k);
            let xp = pad_rows(&x, m, k, k.next_multiple_of(2), true);
            let mut out = vec![f32::NAN; m * n];
            run(Kern::Exact { x: &xp }, m, p.as_ref(), &mut out);
            let want = reference(&round_to_bf16(&x), m, k, WeightRef::Bf16(&wb), n);
            assert_close(&out, &want, 1e-5, "widening kernel, rounded activations");
        }
    }
}
