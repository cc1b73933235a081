//! Elementwise activations: the SiLU gate of the DeepSeek MLP and a numerically safe softmax.

/// `gate[i] = silu(gate[i]) * up[i]`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// In-place softmax over the whole slice (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn silu_mul_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32).collect()
}

pub fn softmax_reference(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{Lcg, assert_close};

    #[test]
    fn silu_mul_matches_reference() {
        let mut rng = Lcg::new(2);
        let g = rng.vec(100, 8.0);
        let u = rng.vec(100, 2.0);
        let mut y = g.clone();
        silu_mul(&mut y, &u);
        assert_close(&y, &silu_mul_reference(&g, &u), 1e-6, "silu_mul");
    }

    #[test]
    fn softmax_matches_reference_and_survives_large_inputs() {
        let mut rng = Lcg::new(3);
        let x: Vec<f32> = rng.vec(50, 100.0);
        let mut y = x.clone();
        softmax(&mut y);
        assert_close(&y, &softmax_reference(&x), 1e-6, "softmax");
        assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}
