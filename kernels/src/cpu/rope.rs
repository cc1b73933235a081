//! Rotary position embedding for the `qk_rope_head_dim` part of MLA heads, with YaRN.
//!
//! Frequencies follow transformers: `inv_freq` in f32, `angle = inv_freq * pos` in f32,
//! `cos/sin(angle) * attention_factor`. Interleaved mode rotates pairs `(x[2i], x[2i+1])` and
//! writes the result de-interleaved (`[rotated evens | rotated odds]`), exactly as
//! transformers' `apply_rotary_pos_emb_interleave`; half mode rotates `(x[i], x[i + d/2])`.
//! Queries and keys use the same layout, so attention scores are unaffected by it.

/// YaRN parameters (`rope_scaling` with `type: yarn`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Explicit `attention_factor`; derived from `mscale`s when absent.
    pub attention_factor: Option<f64>,
    /// Round the correction range to integers (transformers' default `truncate: true`).
    pub truncate: bool,
}

/// `0.1 * mscale * ln(scale) + 1` for `scale > 1`, else 1 (DeepSeek's `yarn_get_mscale`).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

/// Precomputed inverse frequencies for one rope head.
#[derive(Debug, Clone)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleave: bool,
}

impl RopeTable {
    /// `dim` is the rotary head size (even), `theta` the base.
    pub fn new(dim: usize, theta: f64, yarn: Option<&Yarn>, interleave: bool) -> Self {
        assert!(dim.is_multiple_of(2) && dim > 0, "rope dim must be even and positive");
        // transformers: base ** (arange(0, dim, 2).float() / dim), in f32.
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| (theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let Some(y) = yarn else {
            let inv_freq = pos_freqs.iter().map(|p| 1.0 / p).collect();
            return RopeTable { inv_freq, attention_factor: 1.0, interleave };
        };
        let correction_dim = |rot: f64| {
            dim as f64 * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0) as f32;
        let high = high.min(dim as f64 - 1.0) as f32;
        let high = if low == high { high + 0.001 } else { high };
        let factor = y.factor as f32;
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extra = 1.0 / p;
                let inter = 1.0 / (factor * p);
                inter * (1.0 - extrapolation_factor) + extra * extrapolation_factor
            })
            .collect();
        let attention_factor = y.attention_factor.unwrap_or_else(|| match (y.mscale, y.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, a),
            _ => yarn_mscale(y.factor, 1.0),
        });
        RopeTable { inv_freq, attention_factor: attention_factor as f32, interleave }
    }

    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// The (YaRN-adjusted) inverse frequencies, `dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor `cos` and `sin` are multiplied by (YaRN's mscale ratio; 1 without YaRN).
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    pub fn interleave(&self) -> bool {
        self.interleave
    }

    /// Fills `cos` and `sin` (each `dim / 2` long) for position `pos`.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, f) in self.inv_freq.iter().enumerate() {
            let angle = f * pos as f32;
            cos[i] = angle.cos() * self.attention_factor;
            sin[i] = angle.sin() * self.attention_factor;
        }
    }

    /// Rotates one head `x` (`dim` values) in place with precomputed `cos`/`sin`.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.inv_freq.len();
        debug_assert_eq!(x.len(), 2 * half);
        if self.interleave {
            let mut tmp = [0f32; 512];
            let tmp = &mut tmp[..2 * half];
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                tmp[i] = a * cos[i] - b * sin[i];
                tmp[i + half] = b * cos[i] + a * sin[i];
            }
            x.copy_from_slice(tmp);
        } else {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Reference: rotation computed in f64 from scratch for one head.
pub fn reference(x: &[f32], pos: usize, inv_freq_theta: f64, interleave: bool) -> Vec<f32> {
    let d = x.len();
    let half = d / 2;
    let mut out = vec![0f32; d];
    for i in 0..half {
        let inv = 1.0 / inv_freq_theta.powf((2 * i) as f64 / d as f64);
        let (c, s) = ((inv * pos as f64).cos(), (inv * pos as f64).sin());
        let (a, b) = if interleave { (x[2 * i], x[2 * i + 1]) } else { (x[i], x[i + half]) };
        let (a, b) = (a as f64, b as f64);
        out[i] = (a * c - b * s) as f32;
        out[i + half] = (b * c + a * s) as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{Lcg, assert_close};

    #[test]
    fn plain_rope_matches_reference_both_layouts() {
        let mut rng = Lcg::new(4);
        let x = rng.vec(64, 1.0);
        for interleave in [true, false] {
            let t = RopeTable::new(64, 10000.0, None, interleave);
            for pos in [0, 1, 37, 500] {
                let (mut c, mut s) = (vec![0f32; 32], vec![0f32; 32]);
                t.cos_sin(pos, &mut c, &mut s);
                let mut y = x.clone();
                t.apply(&mut y, &c, &s);
                assert_close(&y, &reference(&x, pos, 10000.0, interleave), 2e-4, "rope");
            }
        }
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let y = Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            attention_factor: None,
            truncate: true,
        };
        let plain = RopeTable::new(64, 10000.0, None, true);
        let t = RopeTable::new(64, 10000.0, Some(&y), true);
        assert_eq!(t.inv_freq[0], plain.inv_freq[0]);
        let last = t.inv_freq.len() - 1;
        assert!((t.inv_freq[last] * 40.0 - plain.inv_freq[last]).abs() < 1e-9);
        assert_eq!(t.attention_factor, 1.0);
    }
}
