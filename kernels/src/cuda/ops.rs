//! Launch wrappers of the NVRTC kernels: shapes checked against the ranges, then one launch
//! on the GPU's stream. Each mirrors a CPU op of `crate::cpu` (its reference).

use super::gpu::{Dev, Gpu, cuda_err};
use crate::KernelError;
use crate::cpu::router::{RouterConfig, RouterKind};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

const THREADS: u32 = 256;
/// Grid-stride kernels never need more blocks than this to fill a GPU.
const MAX_BLOCKS: usize = 8192;
/// Limits compiled into the kernels (router.cu, mla.cu).
pub const MAX_ROUTED_EXPERTS: usize = 512;
pub const MAX_EXPERT_GROUPS: usize = 64;
pub const MAX_KV_LORA_RANK: usize = 512;
pub const MAX_ROPE_DIM: usize = 64;
/// Context rows per shared-memory tile of the attention kernel (`MLA_TILE`).
const MLA_TILE: usize = 16;
/// Heads per attention block (one warp each).
const MLA_HEADS_PER_BLOCK: usize = 16;

fn int(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::UnsupportedShape(format!("{what} = {v} does not fit a 32-bit int")))
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn per_row(rows: usize, threads: u32) -> Result<LaunchConfig, KernelError> {
    let rows = u32::try_from(rows).map_err(|_| KernelError::UnsupportedShape(format!("{rows} rows")))?;
    Ok(LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// `rows` rows of `width` values every `stride` fit in `len` values.
fn fits(len: usize, rows: usize, stride: usize, width: usize) -> bool {
    rows == 0 || ((rows - 1) * stride + width <= len && width <= stride)
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
}

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
        let (ts, hs, hf, il) = (int(token_stride, "stride")?, int(head_stride, "stride")?, int(half, "half")?, i32::from(interleave));
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
    pub fn gather_rows_bf16(&self, x: Dev<f32>, src: Dev<u32>, out: Dev<bf16>, hidden: usize) -> Result<(), KernelError> {
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

    /// Routes `logits: [tokens, n_experts]` as [`crate::cpu::router::route`] does, writing
    /// `top_k` ascending ids and weights per token.
    pub fn route(
        &self,
        cfg: &RouterConfig,
        logits: Dev<f32>,
        bias: Option<Dev<f32>>,
        ids: Dev<u32>,
        weights: Dev<f32>,
    ) -> Result<(), KernelError> {
        let e = cfg.n_experts;
        if e > MAX_ROUTED_EXPERTS || cfg.n_group > MAX_EXPERT_GROUPS {
            return Err(KernelError::UnsupportedShape(format!(
                "{e} routed experts in {} groups (the router kernel takes at most {MAX_ROUTED_EXPERTS} in {MAX_EXPERT_GROUPS})",
                cfg.n_group
            )));
        }
        assert!(e > 0 && logits.len().is_multiple_of(e), "route logits");
        let tokens = logits.len() / e;
        assert!(ids.len() == tokens * cfg.top_k && weights.len() == ids.len(), "route outputs");
        if tokens == 0 {
            return Ok(());
        }
        let kind: i32 = match cfg.kind {
            RouterKind::SigmoidNoAuxTc => 0,
            RouterKind::SoftmaxGreedy => 1,
            RouterKind::SoftmaxGroupLimited => 2,
        };
        let bias_ptr = bias.map_or(0, |b| {
            assert_eq!(b.len(), e, "route bias");
            b.ptr
        });
        let (t, ee, k, g, kg) = (
            int(tokens, "tokens")?,
            int(e, "experts")?,
            int(cfg.top_k, "top_k")?,
            int(cfg.n_group, "n_group")?,
            int(cfg.topk_group, "topk_group")?,
        );
        let norm = i32::from(cfg.norm_topk_prob);
        let scaling = cfg.routed_scaling_factor;
        let mut b = self.stream.launch_builder(self.function("route_tokens"));
        b.arg(&logits.ptr).arg(&bias_ptr).arg(&t).arg(&ee).arg(&kind).arg(&k).arg(&g).arg(&kg).arg(&norm).arg(&scaling);
        b.arg(&ids.ptr).arg(&weights.ptr);
        let threads = 64u32;
        let cfg = LaunchConfig {
            grid_dim: (tokens.div_ceil(threads as usize) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("route_tokens"))?;
        Ok(())
    }

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

    /// `cache[slots[r]] = src[r * src_stride..][..width]` (rows of the paged cache).
    pub fn scatter_rows(&self, cache: Dev<f32>, slots: Dev<u32>, src: Dev<f32>, src_stride: usize, width: usize) -> Result<(), KernelError> {
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
    pub fn gather_cache_rows(&self, cache: Dev<f32>, slots: Dev<u32>, out: Dev<f32>, width: usize) -> Result<(), KernelError> {
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
