//! The model's weights in device memory, copied from the host model once at start-up: bf16
//! matrices for every GEMM (in PyTorch `Linear` layout), f32 norms, the router in f32, and the
//! routed experts when they live in this process.

use crate::experts::LocalExperts;
use crate::forward::{Ffn, Mlp, Model, QProj};
use crate::weights::Matrix;
use half::bf16;
use kernels::KernelError;
use kernels::cuda::{Dev, DeviceBuf, Gpu};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct GpuMlp {
    /// `[2 * inter, hidden]`: gate rows then up rows.
    pub(crate) gate_up: DeviceBuf<bf16>,
    /// `[hidden, inter]`.
    pub(crate) down: DeviceBuf<bf16>,
    pub(crate) inter: usize,
}

#[derive(Debug)]
pub(crate) enum GpuQ {
    Full(DeviceBuf<bf16>),
    Lora { a: DeviceBuf<bf16>, rank: usize, norm: DeviceBuf<f32>, b: DeviceBuf<bf16> },
}

#[derive(Debug)]
pub(crate) struct GpuAttention {
    pub(crate) q: GpuQ,
    /// `[kv_lora_rank + rope_dim, hidden]`.
    pub(crate) kv_a: DeviceBuf<bf16>,
    pub(crate) kv_a_norm: DeviceBuf<f32>,
    /// `[heads, kv_lora_rank, qk_nope_head_dim]`.
    pub(crate) w_uk_t: DeviceBuf<bf16>,
    /// `[heads, v_head_dim, kv_lora_rank]`.
    pub(crate) w_uv: DeviceBuf<bf16>,
    /// `[hidden, heads * v_head_dim]`.
    pub(crate) o_proj: DeviceBuf<bf16>,
}

/// A layer's routed experts stacked by id, so kernels can pick one by the router's id.
#[derive(Debug)]
pub(crate) struct StackedExperts {
    /// `[n_routed_experts, 2 * inter, hidden]`.
    pub(crate) gate_up: DeviceBuf<bf16>,
    /// `[n_routed_experts, hidden, inter]`.
    pub(crate) down: DeviceBuf<bf16>,
    pub(crate) inter: usize,
    pub(crate) hidden: usize,
}

impl StackedExperts {
    /// Expert `e`'s two matrices.
    pub(crate) fn expert(&self, e: usize) -> MlpView {
        let (gu, d) = (2 * self.inter * self.hidden, self.hidden * self.inter);
        MlpView {
            gate_up: self.gate_up.dev().range(e * gu, gu),
            down: self.down.dev().range(e * d, d),
            inter: self.inter,
        }
    }
}

/// The two matrices of one MLP, wherever they are stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpView {
    pub(crate) gate_up: Dev<bf16>,
    pub(crate) down: Dev<bf16>,
    pub(crate) inter: usize,
}

impl GpuMlp {
    pub(crate) fn view(&self) -> MlpView {
        MlpView { gate_up: self.gate_up.dev(), down: self.down.dev(), inter: self.inter }
    }
}

#[derive(Debug)]
pub(crate) struct GpuMoe {
    /// `[n_routed_experts, hidden]` f32.
    pub(crate) gate: DeviceBuf<f32>,
    pub(crate) bias: Option<DeviceBuf<f32>>,
    pub(crate) shared: Option<GpuMlp>,
    /// Routed experts on this GPU; `None` when they are reached through a backend.
    pub(crate) experts: Option<StackedExperts>,
}

#[derive(Debug)]
pub(crate) enum GpuFfn {
    Dense(GpuMlp),
    Moe(Box<GpuMoe>),
}

#[derive(Debug)]
pub(crate) struct GpuLayer {
    pub(crate) input_norm: DeviceBuf<f32>,
    pub(crate) post_norm: DeviceBuf<f32>,
    pub(crate) attn: GpuAttention,
    pub(crate) ffn: GpuFfn,
}

#[derive(Debug)]
pub(crate) struct GpuWeights {
    gpu: Arc<Gpu>,
    /// `[vocab, hidden]`.
    pub(crate) embed: DeviceBuf<bf16>,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) norm: DeviceBuf<f32>,
    /// `None`: tied to `embed`.
    pub(crate) lm_head: Option<DeviceBuf<bf16>>,
    pub(crate) inv_freq: DeviceBuf<f32>,
    pub(crate) attention_factor: f32,
    pub(crate) interleave: bool,
}

fn bf16_matrix(gpu: &Gpu, m: &Matrix) -> Result<DeviceBuf<bf16>, KernelError> {
    gpu.upload(&m.to_bf16())
}

fn stacked(gpu: &Gpu, ms: &[Matrix]) -> Result<DeviceBuf<bf16>, KernelError> {
    let all: Vec<bf16> = ms.iter().flat_map(|m| m.to_bf16()).collect();
    gpu.upload(&all)
}

fn mlp(gpu: &Gpu, m: &Mlp) -> Result<GpuMlp, KernelError> {
    Ok(GpuMlp { gate_up: bf16_matrix(gpu, &m.gate_up)?, down: bf16_matrix(gpu, &m.down)?, inter: m.down.cols })
}

/// Copies one layer's experts into stacked device buffers, one expert at a time (a V3
/// layer's experts are 15 GB: never staged whole on the host). Every expert must be present.
fn stack(gpu: &Gpu, experts: &[Option<Mlp>], hidden: usize, inter: usize) -> Result<StackedExperts, KernelError> {
    let (gu, d) = (2 * inter * hidden, hidden * inter);
    let stacked = StackedExperts {
        gate_up: gpu.zeros::<bf16>(experts.len() * gu)?,
        down: gpu.zeros::<bf16>(experts.len() * d)?,
        inter,
        hidden,
    };
    for (e, m) in experts.iter().enumerate() {
        let m = m.as_ref().ok_or_else(|| KernelError::UnsupportedShape(format!("expert {e} is not loaded")))?;
        let view = stacked.expert(e);
        gpu.write(view.gate_up, &m.gate_up.to_bf16())?;
        gpu.write(view.down, &m.down.to_bf16())?;
    }
    Ok(stacked)
}

impl GpuWeights {
    pub(crate) fn upload(gpu: &Arc<Gpu>, model: &Model, experts: Option<&LocalExperts>) -> Result<Self, KernelError> {
        let c = &model.config;
        // Resident only when every routed expert is here: a partial set is served through the
        // backend (a placement-driven process hosts some experts only).
        let resident = experts.filter(|x| {
            (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).all(|l| {
                x.layers.get(l).is_some_and(|ex| ex.len() == c.n_routed_experts && ex.iter().all(Option::is_some))
            })
        });
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            let a = &layer.attn;
            let q = match &a.q {
                QProj::Full(w) => GpuQ::Full(bf16_matrix(gpu, w)?),
                QProj::Lora { a: wa, norm, b } => GpuQ::Lora {
                    a: bf16_matrix(gpu, wa)?,
                    rank: wa.rows,
                    norm: gpu.upload(norm)?,
                    b: bf16_matrix(gpu, b)?,
                },
            };
            let attn = GpuAttention {
                q,
                kv_a: bf16_matrix(gpu, &a.kv_a)?,
                kv_a_norm: gpu.upload(&a.kv_a_norm)?,
                w_uk_t: stacked(gpu, &a.w_uk_t)?,
                w_uv: stacked(gpu, &a.w_uv)?,
                o_proj: bf16_matrix(gpu, &a.o_proj)?,
            };
            let ffn = match &layer.ffn {
                Ffn::Dense(m) => GpuFfn::Dense(mlp(gpu, m)?),
                Ffn::Moe(moe) => GpuFfn::Moe(Box::new(GpuMoe {
                    gate: gpu.upload(&moe.gate.to_f32())?,
                    bias: moe.bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
                    shared: moe.shared.as_ref().map(|m| mlp(gpu, m)).transpose()?,
                    experts: resident
                        .map(|x| stack(gpu, &x.layers[l], c.hidden_size, c.moe_intermediate_size))
                        .transpose()?,
                })),
            };
            layers.push(GpuLayer {
                input_norm: gpu.upload(&layer.input_norm)?,
                post_norm: gpu.upload(&layer.post_norm)?,
                attn,
                ffn,
            });
        }
        Ok(GpuWeights {
            gpu: gpu.clone(),
            embed: bf16_matrix(gpu, &model.embed)?,
            layers,
            norm: gpu.upload(&model.norm)?,
            lm_head: model.lm_head.as_ref().map(|m| bf16_matrix(gpu, m)).transpose()?,
            inv_freq: gpu.upload(model.rope.inv_freq())?,
            attention_factor: model.rope.attention_factor(),
            interleave: model.rope.interleave(),
        })
    }

    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Device bytes held by the weights.
    pub(crate) fn bytes(&self) -> usize {
        let mlp = |m: &GpuMlp| (m.gate_up.len() + m.down.len()) * 2;
        let mut b = self.embed.len() * 2 + self.lm_head.as_ref().map_or(0, |h| h.len() * 2);
        for l in &self.layers {
            let a = &l.attn;
            b += (a.kv_a.len() + a.w_uk_t.len() + a.w_uv.len() + a.o_proj.len()) * 2;
            b += match &a.q {
                GpuQ::Full(w) => w.len() * 2,
                GpuQ::Lora { a, b: wb, .. } => (a.len() + wb.len()) * 2,
            };
            b += match &l.ffn {
                GpuFfn::Dense(m) => mlp(m),
                GpuFfn::Moe(m) => {
                    m.gate.len() * 4
                        + m.shared.as_ref().map_or(0, mlp)
                        + m.experts.as_ref().map_or(0, |x| (x.gate_up.len() + x.down.len()) * 2)
                }
            };
        }
        b
    }
}
