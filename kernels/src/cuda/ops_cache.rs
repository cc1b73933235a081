//! Rows of the paged latent cache in and out (`cache.cu`).

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::{THREADS, fits, int, per_row};
use crate::KernelError;
use cudarc::driver::PushKernelArg;

impl Gpu {
    /// `cache[slots[r]] = src[r * src_stride..][..width]` (rows of the paged cache).
    pub fn scatter_rows(
        &self,
        cache: Dev<f32>,
        slots: Dev<u32>,
        src: Dev<f32>,
        src_stride: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        assert!(fits(src.len(), slots.len(), src_stride, width), "scatter shapes");
        if slots.is_empty() {
            return Ok(());
        }
        let (ss, w) = (int(src_stride, "stride")?, int(width, "width")?);
        let mut b = self.stream.launch_builder(self.function("scatter_rows_f32"));
        b.arg(&cache.ptr).arg(&slots.ptr).arg(&src.ptr).arg(&ss).arg(&w);
        // SAFETY: argument types match the kernel; slots are in range (callers own the tables).
        unsafe { b.launch(per_row(slots.len(), THREADS)?) }.map_err(cuda_err("scatter_rows_f32"))?;
        Ok(())
    }

    /// `out[r] = cache[slots[r]]`.
    pub fn gather_cache_rows(
        &self,
        cache: Dev<f32>,
        slots: Dev<u32>,
        out: Dev<f32>,
        width: usize,
    ) -> Result<(), KernelError> {
        assert!(out.len() >= slots.len() * width, "gather shapes");
        if slots.is_empty() {
            return Ok(());
        }
        let w = int(width, "width")?;
        let mut b = self.stream.launch_builder(self.function("gather_rows_f32"));
        b.arg(&cache.ptr).arg(&slots.ptr).arg(&out.ptr).arg(&w);
        // SAFETY: argument types match the kernel; slots are in range (callers own the tables).
        unsafe { b.launch(per_row(slots.len(), THREADS)?) }.map_err(cuda_err("gather_rows_f32"))?;
        Ok(())
    }
}
