//! FP8 block dequantization (`fp8.cu`); reference `crate::cpu::fp8`.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::{grid_1d, int};
use crate::KernelError;
use cudarc::driver::PushKernelArg;
use half::bf16;

impl Gpu {
    /// FP8 e4m3 `[rows, cols]` with per-`block` scales to bf16.
    pub fn dequant_fp8(
        &self,
        w: Dev<u8>,
        scales: Dev<f32>,
        rows: usize,
        cols: usize,
        block: (usize, usize),
        out: Dev<bf16>,
    ) -> Result<(), KernelError> {
        assert!(w.len() == rows * cols && out.len() == rows * cols, "dequant shapes");
        assert_eq!(scales.len(), rows.div_ceil(block.0) * cols.div_ceil(block.1), "dequant scales");
        if rows * cols == 0 {
            return Ok(());
        }
        let (r, c, br, bc) = (int(rows, "rows")?, int(cols, "cols")?, int(block.0, "block")?, int(block.1, "block")?);
        let mut b = self.stream.launch_builder(self.function("dequant_fp8_bf16"));
        b.arg(&w.ptr).arg(&scales.ptr).arg(&r).arg(&c).arg(&br).arg(&bc).arg(&out.ptr);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(grid_1d(rows * cols)) }.map_err(cuda_err("dequant_fp8_bf16"))?;
        Ok(())
    }
}
