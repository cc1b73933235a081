//! AVX-512 path of [`super::matmul::matmul`] (x86_64 only): operand packing, work split and
//! dispatch to the micro-kernels of `matmul_avx512_kernels`. Every entry point checks the
//! CPU features itself and returns `false` when it cannot run, so callers fall back.
//!
//! All kernels use the "dot" form, which suits `x · Wᵀ` with both operands contiguous in `k`:
//! output element `(i, j)` owns one 16-lane f32 accumulator that walks `k` in chunks (16
//! values for f32 weights, 32 for bf16), then one fixed horizontal sum. A register tile of
//! `MB` activation rows × `NB` weight rows reuses each loaded weight vector `MB` times and
//! each activation vector `NB` times.
//!
//! Invariant (batch invariance): the instruction sequence applied to one accumulator depends
//! only on `k` (full chunks in order, then one masked tail chunk), never on `m`, the tile
//! shape, the kernel variant, the thread split or which rows share a call; so every output
//! element has the same bits whatever batch its row is in. Threads split `n` only.
//!
//! Kernels, by weight type and precision:
//! * f32 weights: `f32_block`, `vfmadd` (tails by masked loads).
//! * bf16, `Exact`: one 64-byte load holds 32 bf16; as u32 lanes, `<< 16` gives the even-`k`
//!   weights as f32 and `& 0xFFFF0000` the odd ones, so activations are packed once per call
//!   as `[x0 x2 .. x30 | x1 x3 .. x31]` per 32-chunk (zero-padded); `wide_block` widens in
//!   registers for every activation block. (Widening each weight group once into an f32
//!   scratch buffer and reusing it across blocks was tried and measured slower: the f32
//!   group is twice the bytes and no longer stays in L1.)
//! * bf16, `Bf16Activations`: `dot_block`, `vdpbf16ps` (AVX512-BF16) on activations rounded
//!   to bf16 and packed once per call; without AVX512-BF16 the `Exact` kernels on rounded
//!   activations (same products, exact in f32).
//!
//! Memory: at `m = 1` the kernels stream weights once; the first activation block
//! software-prefetches the next weight group (see `prefetch_lines`). For larger `m` a task
//! keeps its weight rows (<= `TASK_WEIGHT_BYTES`) and a chunk of activation rows
//! (<= `CHUNK_X_BYTES`) in L2.

use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;

use super::matmul::Precision;
use super::matmul_avx512_kernels::{dot_block, f32_block, wide_block};

/// Register tile for `f32_block` and `wide_block`: 16 accumulators + 8 activation vectors
/// + 2 widened weight vectors fit the 32 zmm registers without spills.
const MB_WIDE: usize = 4;
const NB_WIDE: usize = 4;
/// Register tile for `dot_block`: 24 accumulators + 6 activation vectors + 1 weight vector.
const MB_DOT: usize = 6;
const NB_DOT: usize = 4;

/// Whether these kernels run on this CPU (AVX-512 F and BW).
pub(super) fn available() -> bool {
    has_avx512()
}

pub(super) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

pub(super) fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

/// f32 weights `[n, k]`. Returns `false` (and does nothing) without AVX-512.
pub(super) fn matmul_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) -> bool {
    if !has_avx512() {
        return false;
    }
    check(x.len(), m * k, w.len(), n * k, out.len(), m * n);
    run(Kernel::F32 { x, w }, m, k, n, out);
    true
}

/// bf16 weights `[n, k]`. Returns `false` (and does nothing) without AVX-512.
/// `Bf16Activations` uses `vdpbf16ps` where the CPU has it, else the widening kernel on
/// activations rounded to bf16 (the same products, exact in f32).
pub(super) fn matmul_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
    precision: Precision,
) -> bool {
    if !has_avx512() {
        return false;
    }
    check(x.len(), m * k, w.len(), n * k, out.len(), m * n);
    let w: &[u16] = bytemuck::cast_slice(w);
    let kp = k.next_multiple_of(32);
    match precision {
        Precision::Bf16Activations if has_avx512_bf16() => {
            let xp = pack_bf16(x, m, k, kp);
            run(Kernel::Dot { x: &xp, kp, w }, m, k, n, out);
        }
        _ => {
            let round = precision == Precision::Bf16Activations;
            let xp = pack_even_odd(x, m, k, kp, round);
            run(Kernel::Wide { x: &xp, kp, w }, m, k, n, out);
        }
    }
    true
}

/// The bounds every kernel relies on; `matmul` asserts the same, this keeps the module sound
/// on its own.
fn check(x: usize, xw: usize, w: usize, ww: usize, o: usize, ow: usize) {
    assert!(x == xw && w == ww && o == ow, "matmul_avx512: operand sizes do not match [m,k]·[n,k]ᵀ");
}

/// Rows of `x` as `[x0 x2 .. x30 | x1 x3 .. x31]` per 32-chunk, zero-padded to `kp`;
/// optionally rounded to bf16 first (round-to-nearest-even, as `bf16::from_f32`).
fn pack_even_odd(x: &[f32], m: usize, k: usize, kp: usize, round: bool) -> Vec<f32> {
    let mut p = vec![0f32; m * kp];
    for i in 0..m {
        let (src, dst) = (&x[i * k..(i + 1) * k], &mut p[i * kp..(i + 1) * kp]);
        let full = k / 32;
        for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: AVX-512 F/BW were checked by `matmul_bf16`, the only caller.
            unsafe { deinterleave32(s, d, round) };
        }
        for (kk, &v) in src.iter().enumerate().skip(full * 32) {
            let r = kk - full * 32;
            dst[full * 32 + (r % 2) * 16 + r / 2] = if round { f32::from_bits(round_bf16(v.to_bits())) } else { v };
        }
    }
    p
}

/// One 32-chunk of [`pack_even_odd`] with two permutes.
#[target_feature(enable = "avx512f,avx512bw")]
fn deinterleave32(s: &[f32], d: &mut [f32], round: bool) {
    assert!(s.len() == 32 && d.len() == 32);
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    // SAFETY: both slices hold 32 f32 (asserted); unaligned loads and stores.
    unsafe {
        let (mut a, mut b) = (_mm512_loadu_ps(s.as_ptr()), _mm512_loadu_ps(s.as_ptr().add(16)));
        if round {
            (a, b) = (round_bf16_x16(a), round_bf16_x16(b));
        }
        _mm512_storeu_ps(d.as_mut_ptr(), _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(d.as_mut_ptr().add(16), _mm512_permutex2var_ps(a, odd, b));
    }
}

/// [`round_bf16`] on 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn round_bf16_x16(v: __m512) -> __m512 {
    let x = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    let nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF)), _mm512_set1_epi32(0x7F80_0000));
    let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
    let r = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32)))
}

/// f32 bits rounded to the nearest bf16 (ties to even; NaN kept, made quiet), as f32 bits
/// with the low 16 bits clear: the same value `bf16::from_f32(v).to_f32()` gives.
pub(super) fn round_bf16(x: u32) -> u32 {
    let r = if x & 0x7FFF_FFFF > 0x7F80_0000 { x | 0x0040_0000 } else { x + 0x7FFF + ((x >> 16) & 1) };
    r & 0xFFFF_0000
}

/// Rows of `x` rounded to bf16 bits (round-to-nearest-even), zero-padded to `kp`.
pub(super) fn pack_bf16(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut p = vec![0u16; m * kp];
    for i in 0..m {
        let (src, dst) = (&x[i * k..(i + 1) * k], &mut p[i * kp..i * kp + k]);
        let mut s16 = src.chunks_exact(16);
        let mut d16 = dst.chunks_exact_mut(16);
        for (s, d) in (&mut s16).zip(&mut d16) {
            // SAFETY: AVX-512 F/BW were checked by `matmul_bf16`, the only caller.
            unsafe { to_bf16_x16(s, d) };
        }
        for (d, &v) in d16.into_remainder().iter_mut().zip(s16.remainder()) {
            *d = (round_bf16(v.to_bits()) >> 16) as u16;
        }
    }
    p
}

/// 16 values of [`pack_bf16`].
#[target_feature(enable = "avx512f,avx512bw")]
fn to_bf16_x16(s: &[f32], d: &mut [u16]) {
    assert!(s.len() == 16 && d.len() == 16);
    // SAFETY: 16 f32 in, 16 u16 (32 bytes) out (asserted); unaligned.
    unsafe {
        let r = _mm512_srli_epi32::<16>(_mm512_castps_si512(round_bf16_x16(_mm512_loadu_ps(s.as_ptr()))));
        _mm256_storeu_si256(d.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(r));
    }
}

/// A kernel with its operands. Activation rows have stride `k` (`F32`) or `kp` (packed).
#[derive(Clone, Copy)]
enum Kernel<'a> {
    F32 { x: &'a [f32], w: &'a [f32] },
    Wide { x: &'a [f32], kp: usize, w: &'a [u16] },
    Dot { x: &'a [u16], kp: usize, w: &'a [u16] },
}

/// Bytes of weights one task owns at most: its rows are re-read once per activation chunk
/// (`chunk_rows`), so they should stay in L2 (1 MiB per core on the target) next to the chunk.
const TASK_WEIGHT_BYTES: usize = 256 << 10;
/// Bytes of packed activations one chunk holds: reused by every weight group of the task,
/// so also sized for L2.
const CHUNK_X_BYTES: usize = 256 << 10;
/// Below this many multiply-adds a call runs on the calling thread: handing work to the
/// rayon pool and waking its workers costs ~10 µs, more than the work.
const INLINE_MACS: usize = 1 << 18;

/// Weight rows per rayon task: about 8 tasks per thread so stealing evens out, a multiple of
/// the register group, at most `TASK_WEIGHT_BYTES`.
fn rows_per_task(n: usize, nb: usize, row_bytes: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    let cap = (TASK_WEIGHT_BYTES / row_bytes.max(1)).max(nb) / nb * nb;
    n.div_ceil(tasks).next_multiple_of(nb).clamp(nb, cap)
}

/// Activation rows per chunk: a multiple of the register tile height, at most
/// `CHUNK_X_BYTES` (but at least one tile).
fn chunk_rows(mb: usize, row_bytes: usize) -> usize {
    (CHUNK_X_BYTES / row_bytes.max(1)).max(mb) / mb * mb
}

/// All activation-row blocks of one chunk against one group of `nb` weight rows.
/// Arguments: kernel, register tile `MB × NB`, activations (pointer to the chunk's first
/// row, row stride), weights (pointer to the group's first row, row stride), `k`, rows in
/// the chunk, `nb`, output pointer at (chunk row, group column), output row stride, whether
/// this chunk is the first (its first block prefetches, see `prefetch_lines`). Full groups
/// use the `NB`-column kernel, narrower ones the 1-column kernel `nb` times (the
/// per-element instruction sequence is the same). Expands to unsafe calls: the caller's
/// SAFETY comment covers the bounds.
macro_rules! tile {
    ($f:ident, $mbx:expr, $nbx:expr, $x:expr, $xs:expr, $w:expr, $ws:expr, $k:expr, $m:expr, $nb:expr, $o:expr, $n:expr, $first:expr) => {{
        let (x, w, o) = ($x, $w, $o);
        let mut ib = 0;
        while ib < $m {
            let mb = ($mbx).min($m - ib);
            let (xi, oi, pf) = (x.add(ib * $xs), o.add(ib * $n), $first && ib == 0);
            if $nb == $nbx {
                by_mb!($f, mb, $nbx, xi, $xs, w, $ws, $k, oi, $n, pf)
            } else {
                for j in 0..$nb {
                    by_mb!($f, mb, 1, xi, $xs, w.add(j * $ws), $ws, $k, oi.add(j), $n, pf)
                }
            }
            ib += mb;
        }
    }};
}

/// `f::<mb, NB>(args)` for a runtime `mb` in 1..=6 (the largest register tile height).
macro_rules! by_mb {
    ($f:ident, $mb:expr, $nbc:expr, $($a:expr),*) => {
        match $mb {
            1 => $f::<1, $nbc>($($a),*),
            2 => $f::<2, $nbc>($($a),*),
            3 => $f::<3, $nbc>($($a),*),
            4 => $f::<4, $nbc>($($a),*),
            5 => $f::<5, $nbc>($($a),*),
            _ => $f::<6, $nbc>($($a),*),
        }
    };
}

/// Splits `n` into tasks (rayon, or inline for small calls). A task walks chunks of
/// activation rows (L2-sized); per chunk, its weight rows `NB` at a time; per group, every
/// `MB`-row block of the chunk (the group's weights stay in L1/L2 meanwhile).
///
/// The traversal order decides only which elements are computed when, never any element's
/// own reduction, so it is free to follow the caches.
fn run(kern: Kernel<'_>, m: usize, k: usize, n: usize, out: &mut [f32]) {
    let (nb_max, mb_max, w_row, x_row) = match kern {
        Kernel::F32 { .. } => (NB_WIDE, MB_WIDE, 4 * k, 4 * k),
        Kernel::Wide { kp, .. } => (NB_WIDE, MB_WIDE, 2 * k, 4 * kp),
        Kernel::Dot { kp, .. } => (NB_DOT, MB_DOT, 2 * k, 2 * kp),
    };
    let per_task = rows_per_task(n, nb_max, w_row);
    let m_chunk = chunk_rows(mb_max, x_row);
    let out = super::out_ptr::OutPtr::new(out);
    let task = |t: usize| {
        let (j0, j1) = (t * per_task, ((t + 1) * per_task).min(n));
        let mut m0 = 0;
        while m0 < m {
            let mc = m_chunk.min(m - m0);
            let mut jb = j0;
            while jb < j1 {
                let nb = nb_max.min(j1 - jb);
                let o = out.get().wrapping_add(m0 * n + jb);
                // SAFETY: features were checked by the public entry points; weight rows
                // [jb, jb+nb) and activation rows [m0, m0+mc) are in bounds (`check`),
                // packed rows hold `kp` values; the task owns output columns [j0, j1)
                // exclusively.
                unsafe {
                    match kern {
                        Kernel::F32 { x, w } => {
                            let (x, w) = (x.as_ptr().add(m0 * k), w.as_ptr().add(jb * k));
                            tile!(f32_block, MB_WIDE, NB_WIDE, x, k, w, k, k, mc, nb, o, n, m0 == 0)
                        }
                        Kernel::Wide { x, kp, w } => {
                            let (x, w) = (x.as_ptr().add(m0 * kp), w.as_ptr().add(jb * k));
                            tile!(wide_block, MB_WIDE, NB_WIDE, x, kp, w, k, k, mc, nb, o, n, m0 == 0)
                        }
                        Kernel::Dot { x, kp, w } => {
                            let (x, w) = (x.as_ptr().add(m0 * kp), w.as_ptr().add(jb * k));
                            tile!(dot_block, MB_DOT, NB_DOT, x, kp, w, k, k, mc, nb, o, n, m0 == 0)
                        }
                    }
                }
                jb += nb;
            }
            m0 += mc;
        }
    };
    let tasks = n.div_ceil(per_task);
    if m * n * k <= INLINE_MACS || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::{WeightRef, reference, round_to_bf16};
    use crate::cpu::test_util::{Lcg, assert_close};

    /// The vector and scalar roundings agree with `half` on specials, ties and a sweep of bit
    /// patterns (every exponent, many mantissas, both signs).
    #[test]
    fn bf16_rounding_matches_half() {
        let mut bits: Vec<u32> = vec![0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0x7F80_0001, 0xFFBF_FFFF];
        bits.extend([0x3F80_8000, 0x3F81_8000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_FFFF, 0x0000_8000, 0x0001_8000]);
        let mut s = 12345u64;
        for _ in 0..100_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            bits.push((s >> 32) as u32);
        }
        bits.resize(bits.len().next_multiple_of(32), 0);
        let vals: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let want: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        for (&b, &w) in bits.iter().zip(&want) {
            assert_eq!(round_bf16(b) >> 16, w as u32, "scalar {b:#x}");
        }
        if !has_avx512() {
            return;
        }
        // A length off the 16/32-value chunks exercises the scalar tails too.
        let k = vals.len() - 7;
        let kp = k.next_multiple_of(32);
        let pb = pack_bf16(&vals[..k], 1, k, kp);
        assert_eq!(&pb[..k], &want[..k], "bf16 pack");
        assert!(pb[k..].iter().all(|&v| v == 0), "bf16 pack padding");
        let p = pack_even_odd(&vals[..k], 1, k, kp, true);
        for (kk, &w) in want[..k].iter().enumerate() {
            let (c, r) = (kk / 32, kk % 32);
            let got = p[c * 32 + (r % 2) * 16 + r / 2].to_bits();
            assert_eq!(got, (w as u32) << 16, "even/odd pack at {kk}");
        }
    }

    /// The kernel used for `Bf16Activations` on CPUs without AVX512-BF16 (this test calls it
    /// directly, so it runs wherever AVX-512 F/BW do).
    #[test]
    fn widening_kernel_on_rounded_activations_matches_reference() {
        if !has_avx512() {
            return;
        }
        for &(m, k, n) in &[(1, 40, 5), (7, 100, 13), (13, 2048, 9)] {
            let mut rng = Lcg::new(77);
            let x = rng.vec(m * k, 1.0);
            let wb: Vec<bf16> = rng.vec(n * k, 0.1).into_iter().map(bf16::from_f32).collect();
            let kp = k.next_multiple_of(32);
            let xp = pack_even_odd(&x, m, k, kp, true);
            let mut out = vec![f32::NAN; m * n];
            run(Kernel::Wide { x: &xp, kp, w: bytemuck::cast_slice(&wb) }, m, k, n, &mut out);
            let want = reference(&round_to_bf16(&x), m, k, WeightRef::Bf16(&wb), n);
            assert_close(&out, &want, 1e-5, "widening kernel, rounded activations");
        }
    }
}
