//! Rotary embedding with YaRN (`rope.cu`); reference `crate::cpu::rope`.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::int;
use crate::KernelError;
use cudarc::driver::{LaunchConfig, PushKernelArg};

impl Gpu {
    /// Rotates `heads` vectors of `inv_freq.len() * 2` values per token in place (token `t`,
    /// head `h` at `t * token_stride + h * head_stride`) for positions `pos`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: Dev<f32>,
        token_stride: usize,
        head_stride: usize,
        heads: usize,
        pos: Dev<u32>,
        inv_freq: Dev<f32>,
        attention_factor: f32,
        interleave: bool,
    ) -> Result<(), KernelError> {
        let (tokens, half) = (pos.len(), inv_freq.len());
        if tokens == 0 || heads == 0 {
            return Ok(());
        }
        assert!((tokens - 1) * token_stride + (heads - 1) * head_stride + 2 * half <= x.len(), "rope shapes");
        if half > 1024 {
            return Err(KernelError::UnsupportedShape(format!("rope dim {}", 2 * half)));
        }
        let (ts, hs, hf, il) =
            (int(token_stride, "stride")?, int(head_stride, "stride")?, int(half, "half")?, i32::from(interleave));
        let threads = (half.div_ceil(32) * 32) as u32;
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.function("rope_f32"));
        b.arg(&x.ptr).arg(&ts).arg(&hs).arg(&pos.ptr).arg(&inv_freq.ptr).arg(&attention_factor).arg(&hf).arg(&il);
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("rope_f32"))?;
        Ok(())
    }
}
