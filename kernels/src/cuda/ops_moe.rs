//! Routed experts for small batches on the device (`moe.cu`): the router's ids pick each
//! pair's expert weight without a round trip to the host.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::int;
use crate::KernelError;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

/// Output rows per block (one warp each).
const ROWS_PER_BLOCK: usize = 8;

impl Gpu {
    /// `out[p, j] = Σ_c w[ids[p]][j][c] · x[p / x_div][c]` for every pair `p < ids.len()`:
    /// `w` stacks one `[n, k]` matrix per expert, `x` holds `ids.len() / x_div` rows of `k`.
    /// Every id must be below the number of stacked experts (the router's are).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gemv(
        &self,
        w: Dev<bf16>,
        ids: Dev<u32>,
        x: Dev<bf16>,
        x_div: usize,
        out: Dev<f32>,
        n: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        let pairs = ids.len();
        assert!(n > 0 && k > 0 && w.len().is_multiple_of(n * k), "moe_gemv weights");
        assert!(x_div > 0 && pairs.is_multiple_of(x_div) && x.len() >= pairs / x_div * k, "moe_gemv inputs");
        assert!(out.len() >= pairs * n, "moe_gemv output");
        if pairs == 0 {
            return Ok(());
        }
        let (xd, nn, kk) = (int(x_div, "x_div")?, int(n, "n")?, int(k, "k")?);
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(ROWS_PER_BLOCK) as u32,
                u32::try_from(pairs).map_err(|_| KernelError::UnsupportedShape(format!("{pairs} pairs")))?,
                1,
            ),
            block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.function("moe_gemv_bf16"));
        b.arg(&w.ptr).arg(&ids.ptr).arg(&x.ptr).arg(&xd).arg(&out.ptr).arg(&nn).arg(&kk);
        // SAFETY: argument types match the kernel; ranges checked above, ids below the experts.
        unsafe { b.launch(cfg) }.map_err(cuda_err("moe_gemv_bf16"))?;
        Ok(())
    }
}
