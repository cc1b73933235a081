//! The SiLU gate, casts, residual adds, embedding and MoE gather/combine (`elementwise.cu`).

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::{THREADS, grid_1d, int, per_row};
use crate::KernelError;
use cudarc::driver::PushKernelArg;
use half::bf16;

impl Gpu {
    /// `act[r, j] = silu(gu[r, j]) * gu[r, inter + j]` as bf16; `gu: [rows, 2 * inter]`.
    pub fn silu_mul(&self, gu: Dev<f32>, act: Dev<bf16>, rows: usize, inter: usize) -> Result<(), KernelError> {
        assert!(gu.len() >= rows * 2 * inter && act.len() >= rows * inter, "silu_mul shapes");
        if rows * inter == 0 {
            return Ok(());
        }
        let (r, i) = (int(rows, "rows")?, int(inter, "inter")?);
        let mut b = self.stream.launch_builder(self.function("silu_mul_bf16"));
        b.arg(&gu.ptr).arg(&act.ptr).arg(&r).arg(&i);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(grid_1d(rows * inter)) }.map_err(cuda_err("silu_mul_bf16"))?;
        Ok(())
    }

    /// `out = bf16(x)` (nearest, ties to even).
    pub fn to_bf16(&self, x: Dev<f32>, out: Dev<bf16>) -> Result<(), KernelError> {
        assert_eq!(x.len(), out.len(), "to_bf16 shapes");
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(self.function("f32_to_bf16_n"));
        b.arg(&x.ptr).arg(&out.ptr).arg(&n);
        // SAFETY: argument types match the kernel (size_t is usize); ranges checked above.
        unsafe { b.launch(grid_1d(n)) }.map_err(cuda_err("f32_to_bf16_n"))?;
        Ok(())
    }

    /// `x += y`.
    pub fn add(&self, x: Dev<f32>, y: Dev<f32>) -> Result<(), KernelError> {
        assert_eq!(x.len(), y.len(), "add shapes");
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(self.function("add_f32"));
        b.arg(&x.ptr).arg(&y.ptr).arg(&n);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(grid_1d(n)) }.map_err(cuda_err("add_f32"))?;
        Ok(())
    }

    /// `out[t] = table[ids[t]]` widened to f32 (`table: [vocab, hidden]`). Ids must be
    /// below the vocabulary (callers validate them).
    pub fn embed(&self, table: Dev<bf16>, ids: Dev<u32>, out: Dev<f32>, hidden: usize) -> Result<(), KernelError> {
        assert!(out.len() >= ids.len() * hidden && table.len().is_multiple_of(hidden.max(1)), "embed shapes");
        if ids.is_empty() {
            return Ok(());
        }
        let h = int(hidden, "hidden")?;
        let mut b = self.stream.launch_builder(self.function("embed_bf16"));
        b.arg(&table.ptr).arg(&ids.ptr).arg(&out.ptr).arg(&h);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(per_row(ids.len(), THREADS)?) }.map_err(cuda_err("embed_bf16"))?;
        Ok(())
    }

    /// `out[r] = bf16(x[src[r]])`: rows of `hidden` values gathered (tokens in expert order).
    pub fn gather_rows_bf16(
        &self,
        x: Dev<f32>,
        src: Dev<u32>,
        out: Dev<bf16>,
        hidden: usize,
    ) -> Result<(), KernelError> {
        assert!(out.len() >= src.len() * hidden, "gather shapes");
        if src.is_empty() {
            return Ok(());
        }
        let h = int(hidden, "hidden")?;
        let mut b = self.stream.launch_builder(self.function("gather_rows_bf16"));
        b.arg(&x.ptr).arg(&src.ptr).arg(&out.ptr).arg(&h);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(per_row(src.len(), THREADS)?) }.map_err(cuda_err("gather_rows_bf16"))?;
        Ok(())
    }

    /// `out[t] = Σ_s weights[t, s] · expert_out[rows[t, s]]`, summed in `s` order.
    pub fn moe_combine(
        &self,
        expert_out: Dev<f32>,
        rows: Dev<u32>,
        weights: Dev<f32>,
        k: usize,
        out: Dev<f32>,
        hidden: usize,
    ) -> Result<(), KernelError> {
        assert!(k > 0 && rows.len() == weights.len() && rows.len().is_multiple_of(k), "combine shapes");
        let tokens = rows.len() / k;
        assert!(out.len() >= tokens * hidden, "combine output");
        if tokens == 0 {
            return Ok(());
        }
        let (kk, h) = (int(k, "k")?, int(hidden, "hidden")?);
        let mut b = self.stream.launch_builder(self.function("moe_combine_f32"));
        b.arg(&expert_out.ptr).arg(&rows.ptr).arg(&weights.ptr).arg(&kk).arg(&out.ptr).arg(&h);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(per_row(tokens, THREADS)?) }.map_err(cuda_err("moe_combine_f32"))?;
        Ok(())
    }
}
