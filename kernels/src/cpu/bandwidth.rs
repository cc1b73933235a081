//! Measured DRAM read bandwidth: the yardstick for memory-bound kernels (batch-1 decode
//! streams every weight once, so its ceiling is weight bytes / bandwidth).
//!
//! Method: fill a buffer (touching every page), then sum it as u64 words over the rayon
//! pool, one contiguous slice per task so hardware prefetchers see long streams. Integer
//! sums vectorize freely (no float reassociation issue), with AVX-512 loads when the CPU has
//! them. Pass a buffer well beyond the last-level cache (e.g. 1 GiB) to measure DRAM rather
//! than cache.

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Best read bandwidth in GB/s (1e9 bytes/s) over `repeats` passes across a buffer of about
/// `bytes` bytes (rounded down to whole u64 words, at least one).
pub fn measure_read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).into_par_iter().map(|v| v.wrapping_mul(0x9E37_79B9)).collect();
    let tasks = rayon::current_num_threads().max(1) * 4;
    let chunk = words.div_ceil(tasks).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let s: u64 = buf.par_chunks(chunk).map(sum_words).reduce(|| 0, u64::wrapping_add);
        black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best.max(1e-12) / 1e9
}

fn sum_words(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F is present (checked just above).
        return unsafe { sum_words_avx512(v) };
    }
    sum_words_portable(v)
}

/// Eight independent lanes of wrapping sums: no loop-carried dependency on a single adder,
/// and a shape the compiler vectorizes.
fn sum_words_portable(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(x);
        }
    }
    it.remainder().iter().chain(&acc).fold(0, |s, &x| s.wrapping_add(x))
}

/// Same sum as `sum_words_portable` (wrapping addition is associative, so any order gives
/// the same result), four zmm accumulators to cover load latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_words_avx512(v: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut it = v.chunks_exact(32);
    for c in &mut it {
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 32 words, so words [8q, 8q+8) are in bounds; unaligned load.
            let x = unsafe { _mm512_loadu_si512(c.as_ptr().add(8 * q).cast()) };
            *a = _mm512_add_epi64(*a, x);
        }
    }
    let total = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    let lanes = _mm512_reduce_add_epi64(total) as u64;
    it.remainder().iter().fold(lanes, |s, &x| s.wrapping_add(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_finite() {
        let gbs = measure_read_bandwidth(1 << 20, 2);
        assert!(gbs.is_finite() && gbs > 0.0, "{gbs}");
    }

    #[test]
    fn sums_agree() {
        let v: Vec<u64> = (0..1000u64).map(|i| i.wrapping_mul(0xDEAD_BEEF_1234)).collect();
        let want = v.iter().fold(0u64, |s, &x| s.wrapping_add(x));
        assert_eq!(sum_words(&v), want);
        assert_eq!(sum_words_portable(&v), want);
    }
}
