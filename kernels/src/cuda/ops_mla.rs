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
/// Blocks worth launching before the context is split further: two waves of a 132-SM H100.
const TARGET_BLOCKS: usize = 264;
/// Shortest part of a split context, in rows (shorter parts cost more to merge than they save).
const MIN_SPLIT_ROWS: usize = 256;

/// How many parts to cut each context into: enough blocks to fill the GPU when there are few
/// query tokens, never parts shorter than [`MIN_SPLIT_ROWS`].
pub fn context_splits(tokens: usize, head_blocks: usize, max_ctx: usize) -> usize {
    let blocks = (tokens * head_blocks).max(1);
    if blocks >= TARGET_BLOCKS {
        return 1;
    }
    TARGET_BLOCKS.div_ceil(blocks).min(max_ctx.div_ceil(MIN_SPLIT_ROWS)).max(1)
}

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
    /// The longest of `ctx_lens` (picks how far the context is split over blocks).
    pub max_ctx: usize,
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
        assert!(
            a.q_lat.len() >= a.tokens * a.heads * a.rank && a.out.len() >= a.tokens * a.heads * a.rank,
            "mla q/out"
        );
        if a.tokens == 0 {
            return Ok(());
        }
        assert!(
            (a.tokens - 1) * a.pe_token_stride + (a.heads - 1) * a.pe_head_stride + a.rope_dim <= a.q_pe.len(),
            "mla q_pe"
        );
        let (pts, phs) = (int(a.pe_token_stride, "stride")?, int(a.pe_head_stride, "stride")?);
        let (heads, rank, dr, bs) =
            (int(a.heads, "heads")?, int(a.rank, "rank")?, int(a.rope_dim, "rope")?, int(a.block_size, "block")?);
        let warps = MLA_HEADS_PER_BLOCK.min(a.heads);
        let head_blocks = a.heads.div_ceil(warps);
        let splits = context_splits(a.tokens, head_blocks, a.max_ctx);
        let rows = a.tokens * a.heads;
        // Parts of a split context: unnormalised outputs and (max, sum) per part.
        let parts = if splits > 1 {
            Some((self.scratch::<f32>(rows * splits * a.rank)?, self.scratch::<f32>(rows * splits * 2)?))
        } else {
            None
        };
        let (acc_ptr, ml_ptr) = parts.as_ref().map_or((0u64, 0u64), |(acc, ml)| (acc.dev().ptr, ml.dev().ptr));
        let sp = int(splits, "splits")?;
        let cfg = LaunchConfig {
            grid_dim: (a.tokens as u32, head_blocks as u32, splits as u32),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: (MLA_TILE * width * 4) as u32,
        };
        let mut b = self.stream.launch_builder(self.function("mla_attend_f32"));
        b.arg(&a.cache.ptr).arg(&a.tables.ptr).arg(&a.table_offsets.ptr).arg(&a.ctx_lens.ptr);
        b.arg(&a.q_lat.ptr).arg(&a.q_pe.ptr).arg(&pts).arg(&phs).arg(&a.out.ptr);
        b.arg(&heads).arg(&rank).arg(&dr).arg(&bs).arg(&a.scale).arg(&sp).arg(&acc_ptr).arg(&ml_ptr);
        // SAFETY: argument types match the kernel; ranges checked above, tables owned by the
        // caller, the part buffers sized for `splits` parts of every (token, head).
        unsafe { b.launch(cfg) }.map_err(cuda_err("mla_attend_f32"))?;
        if splits > 1 {
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(rows).map_err(|_| KernelError::UnsupportedShape(format!("{rows} rows")))?,
                    1,
                    1,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.function("mla_combine_f32"));
            b.arg(&acc_ptr).arg(&ml_ptr).arg(&sp).arg(&rank).arg(&a.out.ptr);
            // SAFETY: argument types match the kernel; the parts were written just above.
            unsafe { b.launch(cfg) }.map_err(cuda_err("mla_combine_f32"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::context_splits;

    #[test]
    fn contexts_split_only_when_blocks_are_few_and_contexts_long() {
        assert_eq!(context_splits(1, 1, 100), 1, "short context: one part");
        assert_eq!(context_splits(1, 1, 4096), 16, "batch 1, 4k context: 256-row parts");
        assert_eq!(context_splits(1, 8, 100_000), 33, "enough parts for two waves");
        assert_eq!(context_splits(300, 1, 100_000), 1, "many query tokens fill the GPU already");
        assert_eq!(context_splits(0, 1, 0), 1);
    }
}
