//! Absorbed MLA attention over the paged cache (`mla.cu`); reference `crate::cpu::mla`.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::int;
use crate::KernelError;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Limits compiled into `mla.cu`.
pub const MAX_KV_LORA_RANK: usize = 512;
pub const MAX_ROPE_DIM: usize = 64;
/// Context rows per shared-memory tile (`MLA_TILE`).
const MLA_TILE: usize = 16;
/// Heads per block (one warp each).
const MLA_HEADS_PER_BLOCK: usize = 16;

/// Arguments of [`Gpu::mla_attend`]: `tokens` query tokens, each attending to the first
/// `ctx_lens[i]` rows of the sequence whose block table starts at `tables[table_offsets[i]]`.
#[derive(Debug, Clone, Copy)]
pub struct MlaArgs {
    /// The layer's paged cache `[num_blocks * block_size, rank + rope_dim]`.
    pub cache: Dev<f32>,
    pub block_size: usize,
    pub tables: Dev<u32>,
    pub table_offsets: Dev<u32>,
    pub ctx_lens: Dev<u32>,
    /// `[tokens, heads, rank]`.
    pub q_lat: Dev<f32>,
    /// Head `h` of token `i` at `i * pe_token_stride + h * pe_head_stride`.
    pub q_pe: Dev<f32>,
    pub pe_token_stride: usize,
    pub pe_head_stride: usize,
    /// `[tokens, heads, rank]`.
    pub out: Dev<f32>,
    pub tokens: usize,
    pub heads: usize,
    pub rank: usize,
    pub rope_dim: usize,
    pub scale: f32,
}

impl Gpu {
    /// Absorbed MLA attention over the paged cache (decode and prefill alike).
    pub fn mla_attend(&self, a: &MlaArgs) -> Result<(), KernelError> {
        if a.rank > MAX_KV_LORA_RANK || a.rope_dim > MAX_ROPE_DIM {
            return Err(KernelError::UnsupportedShape(format!(
                "kv_lora_rank {} / qk_rope_head_dim {} (the attention kernel takes at most {MAX_KV_LORA_RANK} / {MAX_ROPE_DIM})",
                a.rank, a.rope_dim
            )));
        }
        let width = a.rank + a.rope_dim;
        assert!(a.cache.len().is_multiple_of(width * a.block_size), "mla cache");
        assert!(a.table_offsets.len() == a.tokens && a.ctx_lens.len() == a.tokens, "mla per-token arrays");
        assert!(a.q_lat.len() >= a.tokens * a.heads * a.rank && a.out.len() >= a.tokens * a.heads * a.rank, "mla q/out");
        if a.tokens == 0 {
            return Ok(());
        }
        assert!(
            (a.tokens - 1) * a.pe_token_stride + (a.heads - 1) * a.pe_head_stride + a.rope_dim <= a.q_pe.len(),
            "mla q_pe"
        );
        let (pts, phs) = (int(a.pe_token_stride, "stride")?, int(a.pe_head_stride, "stride")?);
        let (heads, rank, dr, bs) = (int(a.heads, "heads")?, int(a.rank, "rank")?, int(a.rope_dim, "rope")?, int(a.block_size, "block")?);
        let warps = MLA_HEADS_PER_BLOCK.min(a.heads);
        let cfg = LaunchConfig {
            grid_dim: (a.tokens as u32, a.heads.div_ceil(warps) as u32, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: (MLA_TILE * width * 4) as u32,
        };
        let mut b = self.stream.launch_builder(self.function("mla_attend_f32"));
        b.arg(&a.cache.ptr).arg(&a.tables.ptr).arg(&a.table_offsets.ptr).arg(&a.ctx_lens.ptr);
        b.arg(&a.q_lat.ptr).arg(&a.q_pe.ptr).arg(&pts).arg(&phs).arg(&a.out.ptr);
        b.arg(&heads).arg(&rank).arg(&dr).arg(&bs).arg(&a.scale);
        // SAFETY: argument types match the kernel; ranges checked above, tables owned by the caller.
        unsafe { b.launch(cfg) }.map_err(cuda_err("mla_attend_f32"))?;
        Ok(())
    }
}
