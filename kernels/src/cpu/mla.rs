//! MLA attention in the absorbed form over a paged latent cache.
//!
//! Cache layout: one `[num_blocks * block_size, r + dr]` f32 buffer per layer; a row holds a
//! token's normalized `c_kv` (`r` values) then its roped `k_pe` (`dr` values). A sequence's
//! block table lists its blocks in order; token `t` lives in row
//! `table[t / block_size] * block_size + t % block_size`.
//!
//! For one query token and all heads: `score[h, t] = (q_lat[h]·c_kv[t] + q_pe[h]·k_pe[t]) *
//! scale`, softmax over `t < n_ctx`, `o_lat[h] = Σ_t p[h, t] c_kv[t]`. Each cache row is read
//! once per pass for all heads.

/// A read-only view of one layer of a paged latent cache.
#[derive(Debug, Clone, Copy)]
pub struct PagedLatent<'a> {
    pub data: &'a [f32],
    pub block_size: usize,
    /// `kv_lora_rank` (r).
    pub rank: usize,
    /// `qk_rope_head_dim` (dr).
    pub rope_dim: usize,
}

impl PagedLatent<'_> {
    pub fn row_width(&self) -> usize {
        self.rank + self.rope_dim
    }

    /// The cache row of token `t` of the sequence with `table`.
    pub fn row(&self, table: &[u32], t: usize) -> &[f32] {
        let block = table[t / self.block_size] as usize;
        let row = block * self.block_size + t % self.block_size;
        let w = self.row_width();
        &self.data[row * w..(row + 1) * w]
    }
}

/// Attention of one query token over its first `n_ctx` cached tokens.
/// `q_lat: [heads, r]`, `q_pe: [heads, dr]`, `o_lat: [heads, r]`; `scores` is scratch of at
/// least `heads * n_ctx` values.
///
/// The same Rust body is compiled twice: for the baseline target and with AVX-512 enabled
/// (picked at run time). Float operations are never reassociated or fused by the compiler,
/// so both give identical bits; AVX-512 only widens the vectors.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cache: PagedLatent<'_>,
    table: &[u32],
    n_ctx: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    scale: f32,
    heads: usize,
    scores: &mut Vec<f32>,
    o_lat: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F is present (checked just above).
        return unsafe { attend_avx512(cache, table, n_ctx, q_lat, q_pe, scale, heads, scores, o_lat) };
    }
    attend_body(cache, table, n_ctx, q_lat, q_pe, scale, heads, scores, o_lat)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn attend_avx512(
    cache: PagedLatent<'_>,
    table: &[u32],
    n_ctx: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    scale: f32,
    heads: usize,
    scores: &mut Vec<f32>,
    o_lat: &mut [f32],
) {
    attend_body(cache, table, n_ctx, q_lat, q_pe, scale, heads, scores, o_lat)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    cache: PagedLatent<'_>,
    table: &[u32],
    n_ctx: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    scale: f32,
    heads: usize,
    scores: &mut Vec<f32>,
    o_lat: &mut [f32],
) {
    let (r, dr) = (cache.rank, cache.rope_dim);
    debug_assert_eq!(q_lat.len(), heads * r);
    debug_assert_eq!(q_pe.len(), heads * dr);
    scores.clear();
    scores.resize(heads * n_ctx, 0.0);
    for t in 0..n_ctx {
        let row = cache.row(table, t);
        let (c, k) = row.split_at(r);
        for h in 0..heads {
            let s = dot(&q_lat[h * r..(h + 1) * r], c) + dot(&q_pe[h * dr..(h + 1) * dr], k);
            scores[h * n_ctx + t] = s * scale;
        }
    }
    for h in 0..heads {
        super::activation::softmax(&mut scores[h * n_ctx..(h + 1) * n_ctx]);
    }
    o_lat.iter_mut().for_each(|v| *v = 0.0);
    for t in 0..n_ctx {
        let c = &cache.row(table, t)[..r];
        for h in 0..heads {
            let p = scores[h * n_ctx + t];
            for (o, cv) in o_lat[h * r..(h + 1) * r].iter_mut().zip(c) {
                *o += p * *cv;
            }
        }
    }
}

/// Sixteen fixed partial sums (one zmm register when AVX-512 is on), then their sum.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// Reference: contiguous cache rows `[n_ctx, r + dr]`, f64 math, one head at a time.
pub fn reference(rows: &[f32], r: usize, dr: usize, q_lat: &[f32], q_pe: &[f32], scale: f32, heads: usize) -> Vec<f32> {
    let w = r + dr;
    let n = rows.len() / w;
    let mut out = vec![0f32; heads * r];
    for h in 0..heads {
        let s: Vec<f64> = (0..n)
            .map(|t| {
                let row = &rows[t * w..(t + 1) * w];
                let a: f64 = (0..r).map(|i| q_lat[h * r + i] as f64 * row[i] as f64).sum();
                let b: f64 = (0..dr).map(|i| q_pe[h * dr + i] as f64 * row[r + i] as f64).sum();
                (a + b) * scale as f64
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..r {
            out[h * r + i] = (0..n).map(|t| e[t] / z * rows[t * w + i] as f64).sum::<f64>() as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{Lcg, assert_close};

    #[test]
    fn paged_attention_matches_contiguous_reference() {
        let (r, dr, heads, bs, n_ctx) = (32, 8, 3, 4, 11);
        let w = r + dr;
        let mut rng = Lcg::new(9);
        let rows = rng.vec(n_ctx * w, 1.0);
        // Scatter the rows into blocks 5, 2, 7 (out of 8) in that order.
        let table = [5u32, 2, 7];
        let mut data = vec![f32::NAN; 8 * bs * w];
        for t in 0..n_ctx {
            let row = table[t / bs] as usize * bs + t % bs;
            data[row * w..(row + 1) * w].copy_from_slice(&rows[t * w..(t + 1) * w]);
        }
        let cache = PagedLatent { data: &data, block_size: bs, rank: r, rope_dim: dr };
        let q_lat = rng.vec(heads * r, 0.5);
        let q_pe = rng.vec(heads * dr, 0.5);
        let mut o = vec![0f32; heads * r];
        let mut scratch = Vec::new();
        attend(cache, &table, n_ctx, &q_lat, &q_pe, 0.3, heads, &mut scratch, &mut o);
        assert_close(&o, &reference(&rows, r, dr, &q_lat, &q_pe, 0.3, heads), 1e-5, "mla");
        let mut portable = vec![0f32; heads * r];
        attend_body(cache, &table, n_ctx, &q_lat, &q_pe, 0.3, heads, &mut scratch, &mut portable);
        assert_eq!(o, portable, "the AVX-512 build of the body gives the portable bits");
    }
}
