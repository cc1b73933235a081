//! RMSNorm (`norm.cu`); reference `crate::cpu::norm`.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::{THREADS, fits, int, per_row};
use crate::KernelError;
use cudarc::driver::PushKernelArg;

impl Gpu {
    /// RMSNorm of `rows` rows of `dim` values (rows `x_stride` apart) into `out` (rows
    /// `out_stride` apart); `out` may be `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        x: Dev<f32>,
        x_stride: usize,
        w: Dev<f32>,
        out: Dev<f32>,
        out_stride: usize,
        rows: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        let dim = w.len();
        assert!(fits(x.len(), rows, x_stride, dim) && fits(out.len(), rows, out_stride, dim), "rms_norm shapes");
        if rows == 0 {
            return Ok(());
        }
        let (xs, os, d) = (int(x_stride, "stride")?, int(out_stride, "stride")?, int(dim, "dim")?);
        let mut b = self.stream.launch_builder(self.function("rms_norm_f32"));
        b.arg(&x.ptr).arg(&xs).arg(&w.ptr).arg(&out.ptr).arg(&os).arg(&d).arg(&eps);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(per_row(rows, THREADS)?) }.map_err(cuda_err("rms_norm_f32"))?;
        Ok(())
    }
}
