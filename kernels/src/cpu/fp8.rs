//! FP8 (e4m3fn) block dequantization as in DeepSeek-V3 checkpoints: `weight` is `[out, in]`
//! e4m3 bytes, `weight_scale_inv` is `[ceil(out/B), ceil(in/B)]` f32; each `B x B` block is
//! multiplied by its scale (the name says "inv", the math multiplies).

use half::bf16;

/// The value of an e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
/// `S.1111.111` is NaN.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 { sign * man / 8.0 * 2f32.powi(-6) } else { sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7) }
}

fn table() -> [f32; 256] {
    std::array::from_fn(|i| e4m3_to_f32(i as u8))
}

/// Output element type of a dequantization.
pub trait DequantTarget: Copy {
    fn from_f32(v: f32) -> Self;
}
impl DequantTarget for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl DequantTarget for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Dequantizes `[rows, cols]` e4m3 `weight` with per-block `scales` into `out`.
pub fn dequantize_blocks<T: DequantTarget>(
    weight: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: (usize, usize),
    out: &mut [T],
) {
    assert_eq!(weight.len(), rows * cols);
    assert_eq!(out.len(), rows * cols);
    let scale_cols = cols.div_ceil(block.1);
    assert_eq!(scales.len(), rows.div_ceil(block.0) * scale_cols);
    let lut = table();
    for r in 0..rows {
        let srow = &scales[(r / block.0) * scale_cols..][..scale_cols];
        let (wrow, orow) = (&weight[r * cols..][..cols], &mut out[r * cols..][..cols]);
        for (c, (o, &b)) in orow.iter_mut().zip(wrow).enumerate() {
            *o = T::from_f32(lut[b as usize] * srow[c / block.1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0, "largest finite");
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9), "smallest subnormal");
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn blocks_multiply_by_their_own_scale() {
        let (rows, cols) = (3, 5);
        let weight = vec![0x38u8; rows * cols]; // all 1.0
        let scales = [1.0, 2.0, 3.0, 4.0]; // [ceil(3/2), ceil(5/4)] = [2, 2]
        let mut out = vec![0f32; rows * cols];
        dequantize_blocks(&weight, &scales, rows, cols, (2, 4), &mut out);
        assert_eq!(&out[0..5], &[1.0, 1.0, 1.0, 1.0, 2.0]);
        assert_eq!(&out[10..15], &[3.0, 3.0, 3.0, 3.0, 4.0]);
    }
}
