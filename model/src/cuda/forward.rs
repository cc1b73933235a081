//! The batched forward pass on the GPU: the same segments, cache semantics and results as
//! `crate::forward::Model::forward` (its CPU reference), one stream of kernel launches per
//! layer. The host builds the small per-token index arrays (positions, cache slots, block
//! tables) once per call. MoE layers of small batches run their routed experts on the device
//! from the router's ids; larger batches (and experts behind a backend) read the choices back
//! to group tokens by expert.

use super::cache::{GpuCache, slot};
use super::weights::{GpuFfn, GpuLayer, GpuMoe, GpuQ, GpuWeights, MlpView, StackedExperts};
use crate::config::ModelConfig;
use crate::experts::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, ExpertId};
use crate::forward::{ForwardOutput, LATENT_NORM_EPS, Segment, logit_rows, split_logits};
use half::bf16;
use kernels::KernelError;
use kernels::cuda::{BatchedGemm, Dev, DeviceBuf, Gpu, MlaArgs, WeightLayout};

/// Why a GPU forward pass failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GpuForwardError {
    #[error(transparent)]
    Experts(#[from] ExpertError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Called with a layer index once that layer's latent rows are in the cache.
pub(crate) type GpuLayerHook<'a> = dyn FnMut(usize, &GpuCache) -> Result<(), KernelError> + Send + 'a;

/// One call's shape and its per-token index arrays on the device.
struct Batch<'a> {
    config: &'a ModelConfig,
    /// The softmax scale of attention.
    scale: f32,
    n: usize,
    /// The longest context any token attends to.
    max_ctx: usize,
    ids: DeviceBuf<u32>,
    pos: DeviceBuf<u32>,
    slots: DeviceBuf<u32>,
    tables: DeviceBuf<u32>,
    table_offsets: DeviceBuf<u32>,
    ctx_lens: DeviceBuf<u32>,
}

impl<'a> Batch<'a> {
    fn new(
        gpu: &Gpu,
        config: &'a ModelConfig,
        scale: f32,
        segments: &[Segment<'_>],
        block_size: usize,
    ) -> Result<Self, KernelError> {
        let (mut ids, mut pos, mut slots, mut offsets, mut lens, mut tables) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in segments {
            let off = tables.len() as u32;
            tables.extend_from_slice(s.block_table);
            for (j, &t) in s.tokens.iter().enumerate() {
                let p = s.start_pos + j;
                ids.push(t);
                pos.push(p as u32);
                slots.push(slot(s.block_table, block_size, p));
                offsets.push(off);
                lens.push(p as u32 + 1);
            }
        }
        Ok(Batch {
            config,
            scale,
            n: ids.len(),
            max_ctx: lens.iter().copied().max().unwrap_or(0) as usize,
            ids: gpu.upload(&ids)?,
            pos: gpu.upload(&pos)?,
            slots: gpu.upload(&slots)?,
            tables: gpu.upload(&tables)?,
            table_offsets: gpu.upload(&offsets)?,
            ctx_lens: gpu.upload(&lens)?,
        })
    }
}

/// `f32` scratch plus its bf16 copy for the next GEMM.
fn bf16_of(gpu: &Gpu, x: Dev<f32>) -> Result<DeviceBuf<bf16>, KernelError> {
    let b = gpu.scratch::<bf16>(x.len())?;
    gpu.to_bf16(x, b.dev())?;
    Ok(b)
}

impl GpuWeights {
    /// Runs `segments` through the model on the GPU, writing their latent rows into `cache`.
    pub(crate) fn forward(
        &self,
        c: &ModelConfig,
        scale: f32,
        cache: &mut GpuCache,
        segments: &[Segment<'_>],
        experts: &dyn ExpertBackend,
        mut on_layer: Option<&mut GpuLayerHook<'_>>,
    ) -> Result<ForwardOutput, GpuForwardError> {
        let gpu = self.gpu();
        let h = c.hidden_size;
        let b = Batch::new(gpu, c, scale, segments, cache.layout.block_size)?;
        let n = b.n;
        let x = gpu.scratch::<f32>(n * h)?;
        gpu.embed(self.embed.dev(), b.ids.dev(), x.dev(), h)?;
        let hn = gpu.scratch::<f32>(n * h)?;
        let out = gpu.scratch::<f32>(n * h)?;
        for (li, layer) in self.layers.iter().enumerate() {
            gpu.rms_norm(x.dev(), h, layer.input_norm.dev(), hn.dev(), h, n, c.rms_norm_eps)?;
            self.attention(li, layer, &b, hn.dev(), cache, out.dev())?;
            if let Some(hook) = on_layer.as_deref_mut() {
                hook(li, cache)?;
            }
            gpu.add(x.dev(), out.dev())?;
            gpu.rms_norm(x.dev(), h, layer.post_norm.dev(), hn.dev(), h, n, c.rms_norm_eps)?;
            match &layer.ffn {
                GpuFfn::Dense(m) => {
                    let hb = bf16_of(gpu, hn.dev())?;
                    mlp(gpu, m.view(), hb.dev(), n, h, out.dev())?;
                }
                GpuFfn::Moe(moe) => self.moe(li, moe, &b, hn.dev(), experts, out.dev())?,
            }
            gpu.add(x.dev(), out.dev())?;
        }
        Ok(self.logits(c, x.dev(), segments)?)
    }

    fn logits(&self, c: &ModelConfig, x: Dev<f32>, segments: &[Segment<'_>]) -> Result<ForwardOutput, KernelError> {
        let gpu = self.gpu();
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let rows: Vec<u32> = logit_rows(segments).into_iter().map(|r| r as u32).collect();
        let r = rows.len();
        let all = if r == 0 {
            Vec::new()
        } else {
            let idx = gpu.upload(&rows)?;
            let hs = gpu.scratch::<f32>(r * h)?;
            gpu.gather_cache_rows(x, idx.dev(), hs.dev(), h)?;
            gpu.rms_norm(hs.dev(), h, self.norm.dev(), hs.dev(), h, r, c.rms_norm_eps)?;
            let hb = bf16_of(gpu, hs.dev())?;
            let logits = gpu.scratch::<f32>(r * vocab)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            gpu.gemm(hb.dev(), r, h, head.dev(), vocab, logits.dev())?;
            gpu.read(logits.dev())?
        };
        Ok(split_logits(&all, vocab, segments))
    }

    fn attention(
        &self,
        li: usize,
        layer: &GpuLayer,
        b: &Batch<'_>,
        hn: Dev<f32>,
        cache: &mut GpuCache,
        out: Dev<f32>,
    ) -> Result<(), KernelError> {
        let gpu = self.gpu();
        let (c, scale) = (b.config, b.scale);
        let a = &layer.attn;
        let (n, h, heads) = (b.n, c.hidden_size, c.num_attention_heads);
        let (dn, dr, dv, rank) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (dq, lat) = (dn + dr, rank + dr);
        let hb = bf16_of(gpu, hn)?;
        // Queries [n, heads * dq].
        let q = gpu.scratch::<f32>(n * heads * dq)?;
        match &a.q {
            GpuQ::Full(w) => gpu.gemm(hb.dev(), n, h, w.dev(), heads * dq, q.dev())?,
            GpuQ::Lora { a: wa, rank: qr, norm, b: wb } => {
                let qa = gpu.scratch::<f32>(n * qr)?;
                gpu.gemm(hb.dev(), n, h, wa.dev(), *qr, qa.dev())?;
                gpu.rms_norm(qa.dev(), *qr, norm.dev(), qa.dev(), *qr, n, LATENT_NORM_EPS)?;
                let qab = bf16_of(gpu, qa.dev())?;
                gpu.gemm(qab.dev(), n, *qr, wb.dev(), heads * dq, q.dev())?;
            }
        }
        // Latents [n, rank + dr]: normalize c_kv, rope k_pe, store in the cache.
        let kv = gpu.scratch::<f32>(n * lat)?;
        gpu.gemm(hb.dev(), n, h, a.kv_a.dev(), lat, kv.dev())?;
        gpu.rms_norm(kv.dev(), lat, a.kv_a_norm.dev(), kv.dev(), lat, n, LATENT_NORM_EPS)?;
        let (freq, factor, il) = (self.inv_freq.dev(), self.attention_factor, self.interleave);
        gpu.rope(kv.dev().from(rank), lat, 0, 1, b.pos.dev(), freq, factor, il)?;
        gpu.scatter_rows(cache.layers[li].dev(), b.slots.dev(), kv.dev(), lat, lat)?;
        // Rope the rope part of every head; absorb W_UK into the nope part: q_lat [n, heads, rank].
        gpu.rope(q.dev().from(dn), heads * dq, dq, heads, b.pos.dev(), freq, factor, il)?;
        let qb = bf16_of(gpu, q.dev())?;
        let q_lat = gpu.scratch::<f32>(n * heads * rank)?;
        gpu.gemm_batched(&BatchedGemm {
            batch: heads,
            m: n,
            k: dn,
            n: rank,
            x: qb.dev(),
            ldx: heads * dq,
            stride_x: dq,
            w: a.w_uk_t.dev(),
            w_layout: WeightLayout::OutIn,
            stride_w: rank * dn,
            out: q_lat.dev(),
            ldo: heads * rank,
            stride_o: rank,
        })?;
        let o_lat = gpu.scratch::<f32>(n * heads * rank)?;
        gpu.mla_attend(&MlaArgs {
            cache: cache.layers[li].dev(),
            block_size: cache.layout.block_size,
            tables: b.tables.dev(),
            table_offsets: b.table_offsets.dev(),
            ctx_lens: b.ctx_lens.dev(),
            q_lat: q_lat.dev(),
            q_pe: q.dev().from(dn),
            pe_token_stride: heads * dq,
            pe_head_stride: dq,
            out: o_lat.dev(),
            tokens: n,
            heads,
            rank,
            rope_dim: dr,
            scale,
            max_ctx: b.max_ctx,
        })?;
        // Up-project values per head: [n, heads * dv], then o_proj.
        let olb = bf16_of(gpu, o_lat.dev())?;
        let o = gpu.scratch::<f32>(n * heads * dv)?;
        gpu.gemm_batched(&BatchedGemm {
            batch: heads,
            m: n,
            k: rank,
            n: dv,
            x: olb.dev(),
            ldx: heads * rank,
            stride_x: rank,
            w: a.w_uv.dev(),
            w_layout: WeightLayout::OutIn,
            stride_w: dv * rank,
            out: o.dev(),
            ldo: heads * dv,
            stride_o: dv,
        })?;
        let ob = bf16_of(gpu, o.dev())?;
        gpu.gemm(ob.dev(), n, heads * dv, a.o_proj.dev(), h, out)
    }

    fn moe(
        &self,
        layer: usize,
        moe: &GpuMoe,
        b: &Batch<'_>,
        hn: Dev<f32>,
        experts: &dyn ExpertBackend,
        out: Dev<f32>,
    ) -> Result<(), GpuForwardError> {
        let gpu = self.gpu();
        let (c, n) = (b.config, b.n);
        let (h, e, k) = (c.hidden_size, c.n_routed_experts, c.router.top_k);
        let logits = gpu.scratch::<f32>(n * e)?;
        gpu.gemm_f32(hn, n, h, moe.gate.dev(), e, logits.dev())?;
        let routes = Routes { ids: gpu.scratch::<u32>(n * k)?, weights: gpu.scratch::<f32>(n * k)? };
        let bias = moe.bias.as_ref().map(DeviceBuf::dev);
        gpu.route(&c.router, logits.dev(), bias, routes.ids.dev(), routes.weights.dev())?;
        let hb = bf16_of(gpu, hn)?;
        match &moe.experts {
            Some(stacked) if n * k <= DEVICE_MOE_MAX_PAIRS => {
                device_moe(gpu, stacked, &routes, &hb, n, k, out)?;
            }
            _ => {
                let shape = MoeShape { layer, n, k, hidden: h, n_experts: e };
                self.grouped_moe(shape, moe.experts.as_ref(), &routes, hn, experts, out)?;
            }
        }
        if let Some(shared) = &moe.shared {
            let s = gpu.scratch::<f32>(n * h)?;
            mlp(gpu, shared.view(), hb.dev(), n, h, s.dev())?;
            gpu.add(out, s.dev())?;
        }
        Ok(())
    }

    /// Larger batches: tokens grouped by expert on the host (the router's choices are read
    /// back), one GEMM pair per active expert, or one call of the expert backend.
    fn grouped_moe(
        &self,
        shape: MoeShape,
        stacked: Option<&StackedExperts>,
        routes: &Routes,
        hn: Dev<f32>,
        experts: &dyn ExpertBackend,
        out: Dev<f32>,
    ) -> Result<(), GpuForwardError> {
        let gpu = self.gpu();
        let MoeShape { layer, n, k, hidden: h, n_experts: e } = shape;
        let ids = gpu.read(routes.ids.dev())?;
        // Rows in ascending expert order (tokens ascending within an expert), as the CPU
        // engine sums; row_of[token * k + slot] is where that choice's output lands.
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (choice, &x) in ids.iter().enumerate() {
            let Some(list) = by_expert.get_mut(x as usize) else {
                let detail = format!("the router chose expert {x} of {e}");
                return Err(KernelError::Cuda { what: "routing".into(), detail }.into());
            };
            list.push(choice);
        }
        let mut src = Vec::with_capacity(n * k);
        let mut row_of = vec![0u32; n * k];
        let mut groups = Vec::new();
        for (x, choices) in by_expert.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            groups.push(ExpertGroup { expert: ExpertId(x as u32), num_tokens: choices.len() });
            for &choice in choices {
                row_of[choice] = src.len() as u32;
                src.push((choice / k) as u32);
            }
        }
        let rows = src.len();
        let expert_out = gpu.scratch::<f32>(rows * h)?;
        if let Some(stacked) = stacked {
            let src_dev = gpu.upload(&src)?;
            let xin = gpu.scratch::<bf16>(rows * h)?;
            gpu.gather_rows_bf16(hn, src_dev.dev(), xin.dev(), h)?;
            let mut start = 0;
            for g in &groups {
                let m = stacked.expert(g.expert.0 as usize);
                let (at, len) = (start * h, g.num_tokens * h);
                mlp(gpu, m, xin.dev().range(at, len), g.num_tokens, h, expert_out.dev().range(at, len))?;
                start += g.num_tokens;
            }
        } else {
            // Experts elsewhere: their inputs go through the host.
            let hn_host = gpu.read(hn)?;
            let mut inputs = Vec::with_capacity(rows * h);
            for &t in &src {
                inputs.extend_from_slice(&hn_host[t as usize * h..(t as usize + 1) * h]);
            }
            let mut outputs = vec![0f32; rows * h];
            experts.run(&ExpertBatch { layer, hidden: h, groups: &groups, inputs: &inputs }, &mut outputs)?;
            gpu.write(expert_out.dev(), &outputs)?;
        }
        let row_of = gpu.upload(&row_of)?;
        gpu.moe_combine(expert_out.dev(), row_of.dev(), routes.weights.dev(), k, out, h)?;
        Ok(())
    }
}

/// The router's choices on the device: `top_k` expert ids (ascending) and weights per token.
struct Routes {
    ids: DeviceBuf<u32>,
    weights: DeviceBuf<f32>,
}

/// One MoE layer's batch shape.
#[derive(Debug, Clone, Copy)]
struct MoeShape {
    layer: usize,
    /// Tokens.
    n: usize,
    /// Experts per token.
    k: usize,
    hidden: usize,
    n_experts: usize,
}

/// Batches of at most this many (token, expert) pairs run their routed experts on the device
/// from the router's ids (no read-back, no per-expert launches): decode steps, mostly.
const DEVICE_MOE_MAX_PAIRS: usize = 32;

/// Routed experts of a small batch, all on the device: per pair, the gate/up projection of
/// the token's row by its expert, the SiLU gate, the down projection, then the weighted sum
/// per token in slot (ascending expert) order.
fn device_moe(
    gpu: &Gpu,
    x: &StackedExperts,
    routes: &Routes,
    hb: &DeviceBuf<bf16>,
    n: usize,
    k: usize,
    out: Dev<f32>,
) -> Result<(), KernelError> {
    let (h, i, pairs) = (x.hidden, x.inter, n * k);
    let gu = gpu.scratch::<f32>(pairs * 2 * i)?;
    gpu.moe_gemv(x.gate_up.dev(), routes.ids.dev(), hb.dev(), k, gu.dev(), 2 * i, h)?;
    let act = gpu.scratch::<bf16>(pairs * i)?;
    gpu.silu_mul(gu.dev(), act.dev(), pairs, i)?;
    let eo = gpu.scratch::<f32>(pairs * h)?;
    gpu.moe_gemv(x.down.dev(), routes.ids.dev(), act.dev(), 1, eo.dev(), h, i)?;
    let rows: Vec<u32> = (0..pairs as u32).collect();
    let rows = gpu.upload(&rows)?;
    gpu.moe_combine(eo.dev(), rows.dev(), routes.weights.dev(), k, out, h)
}

/// `out[m, h] = down(silu(gate(x)) * up(x))` for bf16 rows `x`.
fn mlp(gpu: &Gpu, m: MlpView, x: Dev<bf16>, rows: usize, h: usize, out: Dev<f32>) -> Result<(), KernelError> {
    let i = m.inter;
    let gu = gpu.scratch::<f32>(rows * 2 * i)?;
    gpu.gemm(x, rows, h, m.gate_up, 2 * i, gu.dev())?;
    let act = gpu.scratch::<bf16>(rows * i)?;
    gpu.silu_mul(gu.dev(), act.dev(), rows, i)?;
    gpu.gemm(act.dev(), rows, i, m.down, h, out)
}
