//! RMSNorm: `y = w * x / sqrt(mean(x²) + eps)`, statistics in f32 (as transformers does).

/// Normalizes each `dim`-wide row of `x` in place.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert_eq!(x.len() % dim, 0, "x is not [rows, dim]");
    for row in x.chunks_exact_mut(dim) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// Row-wise reference in f64.
pub fn reference(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    x.chunks_exact(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(weight).map(move |(&v, &w)| (w as f64 * v as f64 * inv) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{Lcg, assert_close};

    #[test]
    fn matches_reference() {
        let mut rng = Lcg::new(1);
        let w: Vec<f32> = rng.vec(48, 0.5).iter().map(|v| v + 1.0).collect();
        let x = rng.vec(48 * 3, 3.0);
        let mut y = x.clone();
        rms_norm(&mut y, &w, 1e-6);
        assert_close(&y, &reference(&x, &w, 1e-6), 1e-6, "rms_norm");
    }
}
