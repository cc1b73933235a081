//! The AVX-512 micro-kernels of `matmul_avx512`: each computes one `MB × NB` block of
//! `out = x · Wᵀ` in the "dot" form (one 16-lane accumulator per output element, walking
//! `k` in chunks, then a fixed horizontal sum). See `matmul_avx512` for the layouts and the
//! batch-invariance argument; the rule here is that, for a given `k`, every kernel variant
//! (any `MB`, `NB`, prefetch on or off) applies the same instruction sequence to an
//! accumulator.
//!
//! Common contract (`# Safety` of each kernel): the named CPU features are present; `x`
//! points at `MB` activation rows of stride `xs`, `w` at `NB` weight rows of stride `ws`,
//! readable as documented per kernel; `out` is writable at `i * n + j` for `i < MB`,
//! `j < NB`, and no other thread writes those elements.

// Register tiles read clearest as `acc[i][j]` indexed loops over const bounds (fully
// unrolled by the compiler); iterator chains would obscure which register meets which.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

/// Software prefetch for memory-bound calls. Weight rows are only `k` values long (4 KiB
/// for bf16 at k = 2048) and `NB` of them are read side by side, so hardware stream
/// prefetchers, which stop at page boundaries, keep re-training. Instead, while a group of
/// `NB` rows is multiplied, the kernels (first activation block only, `pf`) prefetch the
/// next group in lockstep: `NB` lines per step, one group (`NB * k` contiguous values when
/// `ws == k`) ahead, so the next group is in cache when it starts. `T1` (to L2): on the
/// Zen 4 target it streamed clearly faster than no prefetch, while `T0` and `NTA` were
/// slower than none (they crowd L1).
///
/// Prefetches are hints: they never fault, so addresses past the matrix end are harmless
/// (computed with `wrapping_add`, never dereferenced).
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch_lines<const L: usize>(p: *const u8) {
    for l in 0..L {
        // `_mm_prefetch` is a safe function on current toolchains but was `unsafe` on older
        // ones (the workspace MSRV is 1.89).
        #[allow(unused_unsafe)]
        // SAFETY: a prefetch is a hint: it does not access memory in the language's sense
        // and cannot fault, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * l).cast())
        };
    }
}

/// Sum of the 16 lanes in one fixed order (halving tree), written out with explicit
/// intrinsics so the order cannot depend on the compiler's choice of reduction.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

/// Writes the reduced `MB × NB` accumulators to `out` (row stride `n`).
///
/// # Safety
/// `out` valid for writes at `i * n + j` for all `i < MB`, `j < NB`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const MB: usize, const NB: usize>(acc: &[[__m512; NB]; MB], out: *mut f32, n: usize) {
    for (i, row) in acc.iter().enumerate() {
        for (j, &a) in row.iter().enumerate() {
            // SAFETY: in bounds by the contract.
            unsafe { *out.add(i * n + j) = hsum(a) };
        }
    }
}

/// f32 weights: `out[i, j] = Σ x[i, :] · w[j, :]` for an `MB × NB` block.
///
/// # Safety
/// `x`: `MB` rows of stride `xs`, each readable for `k` values; `w`: `NB` rows of stride
/// `ws`, each readable for `k` values; `out` as in [`store`].
#[allow(clippy::too_many_arguments)] // one call shape for all kernels (see `tile!`)
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn f32_block<const MB: usize, const NB: usize>(
    x: *const f32,
    xs: usize,
    w: *const f32,
    ws: usize,
    k: usize,
    out: *mut f32,
    n: usize,
    pf: bool,
) {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn step<const MB: usize, const NB: usize>(
        acc: &mut [[__m512; NB]; MB],
        x: *const f32,
        xs: usize,
        w: *const f32,
        ws: usize,
        mask: __mmask16,
    ) {
        // SAFETY: masked lanes are not accessed; enabled lanes are in bounds (caller).
        unsafe {
            let mut xv = [_mm512_setzero_ps(); MB];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, x.add(i * xs));
            }
            for j in 0..NB {
                let wv = _mm512_maskz_loadu_ps(mask, w.add(j * ws));
                for i in 0..MB {
                    acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    let full = k / 16;
    // SAFETY: chunk `c` covers k-offsets [16c, 16c+16) ⊂ [0, k); the tail mask enables only
    // offsets below `k`.
    unsafe {
        for c in 0..full {
            if pf {
                prefetch_lines::<NB>(w.wrapping_add(NB * ws + c * 16 * NB).cast());
            }
            step(&mut acc, x.add(c * 16), xs, w.add(c * 16), ws, !0);
        }
        if !k.is_multiple_of(16) {
            let mask = (1u16 << (k % 16)) - 1;
            step(&mut acc, x.add(full * 16), xs, w.add(full * 16), ws, mask);
        }
        store(&acc, out, n);
    }
}

/// bf16 weights widened in registers, activations packed by `pack_even_odd` (in `matmul_avx512`).
///
/// # Safety
/// `x`: `MB` packed rows of stride `xs` (a multiple of 32, at least `k`); `w`: `NB` rows of
/// stride `ws`, `k` bf16 values each; `out` as in [`store`].
#[allow(clippy::too_many_arguments)] // one call shape for all kernels (see `tile!`)
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn wide_block<const MB: usize, const NB: usize>(
    x: *const f32,
    xs: usize,
    w: *const u16,
    ws: usize,
    k: usize,
    out: *mut f32,
    n: usize,
    pf: bool,
) {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn step<const MB: usize, const NB: usize>(
        acc: &mut [[__m512; NB]; MB],
        x: *const f32,
        xs: usize,
        w: *const u16,
        ws: usize,
        mask: __mmask32,
    ) {
        let odd = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // SAFETY: packed activation rows are padded to whole chunks; masked weight lanes are
        // not accessed and enabled ones are in bounds (caller).
        unsafe {
            let (mut xe, mut xo) = ([_mm512_setzero_ps(); MB], [_mm512_setzero_ps(); MB]);
            for i in 0..MB {
                xe[i] = _mm512_loadu_ps(x.add(i * xs));
                xo[i] = _mm512_loadu_ps(x.add(i * xs + 16));
            }
            for j in 0..NB {
                let v = _mm512_maskz_loadu_epi16(mask, w.add(j * ws).cast());
                let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                let wo = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
                for i in 0..MB {
                    acc[i][j] = _mm512_fmadd_ps(xe[i], we, acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(xo[i], wo, acc[i][j]);
                }
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    let full = k / 32;
    // SAFETY: as in `f32_block`, with 32-value chunks.
    unsafe {
        for c in 0..full {
            if pf {
                prefetch_lines::<NB>(w.wrapping_add(NB * ws + c * 32 * NB).cast());
            }
            step(&mut acc, x.add(c * 32), xs, w.add(c * 32), ws, !0);
        }
        if !k.is_multiple_of(32) {
            let mask = (1u32 << (k % 32)) - 1;
            step(&mut acc, x.add(full * 32), xs, w.add(full * 32), ws, mask);
        }
        store(&acc, out, n);
    }
}

/// bf16 weights × bf16 activations (packed by `pack_bf16` (in `matmul_avx512`)) with `vdpbf16ps`.
///
/// # Safety
/// As [`wide_block`] with `x` holding bf16 bits, plus AVX512-BF16 available.
#[allow(clippy::too_many_arguments)] // one call shape for all kernels (see `tile!`)
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn dot_block<const MB: usize, const NB: usize>(
    x: *const u16,
    xs: usize,
    w: *const u16,
    ws: usize,
    k: usize,
    out: *mut f32,
    n: usize,
    pf: bool,
) {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn step<const MB: usize, const NB: usize>(
        acc: &mut [[__m512; NB]; MB],
        x: *const u16,
        xs: usize,
        w: *const u16,
        ws: usize,
        mask: __mmask32,
    ) {
        // SAFETY: as in `wide_block`'s step.
        unsafe {
            let mut xv: [__m512bh; MB] = [as_bh(_mm512_setzero_si512()); MB];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = as_bh(_mm512_loadu_si512(x.add(i * xs).cast()));
            }
            for j in 0..NB {
                let wv = as_bh(_mm512_maskz_loadu_epi16(mask, w.add(j * ws).cast()));
                for i in 0..MB {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
                }
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    let full = k / 32;
    // SAFETY: as in `wide_block`.
    unsafe {
        for c in 0..full {
            if pf {
                prefetch_lines::<NB>(w.wrapping_add(NB * ws + c * 32 * NB).cast());
            }
            step(&mut acc, x.add(c * 32), xs, w.add(c * 32), ws, !0);
        }
        if !k.is_multiple_of(32) {
            let mask = (1u32 << (k % 32)) - 1;
            step(&mut acc, x.add(full * 32), xs, w.add(full * 32), ws, mask);
        }
        store(&acc, out, n);
    }
}

/// 64 bytes as 32 bf16 lanes (the intrinsics have no cast for `__m512bh`).
#[inline]
#[target_feature(enable = "avx512f")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 64-byte SIMD vectors; every bit pattern is a valid value of each.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
