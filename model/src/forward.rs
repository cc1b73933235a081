//! The batched forward pass of DeepSeek-V3/V2 over a paged latent cache.
//!
//! A batch is a list of segments (consecutive tokens of one sequence starting at some
//! position): a prompt being prefilled, or the single newest token of a decoding sequence.
//! All tokens of a layer are written to the cache before any of them attends, so causal
//! attention inside a prompt is just "attend to positions <= mine".

use crate::ModelError;
use crate::cache::LatentCache;
use crate::config::ModelConfig;
use crate::experts::{ExpertBackend, ExpertBatch, ExpertError, ExpertGroup, ExpertId};
use crate::shapes::{self, FfnSpec, LayerSpec, MlpSpec, QSpec};
use crate::weights::{Matrix, WeightReader};
use kernels::cpu::activation::silu_mul;
use kernels::cpu::mla::attend;
use kernels::cpu::norm::rms_norm;
use kernels::cpu::rope::RopeTable;
use kernels::cpu::router::route;
use kernels::cpu::{Precision, matmul};
use rayon::prelude::*;

/// eps of `q_a_layernorm` / `kv_a_layernorm` (fixed in DeepSeek's code, not `rms_norm_eps`).
pub(crate) const LATENT_NORM_EPS: f32 = 1e-6;

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// `gate_proj` then `up_proj` stacked: `[2 * inter, hidden]`, one pass over the input.
    pub(crate) gate_up: Matrix,
    pub(crate) down: Matrix,
}

impl Mlp {
    pub(crate) fn load(r: &WeightReader<'_>, spec: &MlpSpec) -> Result<Self, ModelError> {
        let gate = r.matrix(&spec.gate)?;
        let up = r.matrix(&spec.up)?;
        let down = r.matrix(&spec.down)?;
        Ok(Mlp { gate_up: gate.stacked(&up).packed(), down: down.packed() })
    }

    /// `x: [m, hidden]` → `out: [m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], p: Precision) {
        let (h, i2) = (self.gate_up.cols, self.gate_up.rows);
        let i = i2 / 2;
        let mut gu = vec![0f32; m * i2];
        matmul(x, m, h, self.gate_up.weight(), i2, &mut gu, p);
        let mut act = vec![0f32; m * i];
        for (a, row) in act.chunks_exact_mut(i).zip(gu.chunks_exact(i2)) {
            a.copy_from_slice(&row[..i]);
            silu_mul(a, &row[i..]);
        }
        matmul(&act, m, i, self.down.weight(), h, out, p);
    }
}

#[derive(Debug)]
pub(crate) enum QProj {
    Full(Matrix),
    Lora { a: Matrix, norm: Vec<f32>, b: Matrix },
}

#[derive(Debug)]
pub(crate) struct Attention {
    pub(crate) q: QProj,
    pub(crate) kv_a: Matrix,
    pub(crate) kv_a_norm: Vec<f32>,
    /// Per head `W_UKᵀ`: `[kv_lora_rank, qk_nope_head_dim]` (absorbs the key up-projection).
    pub(crate) w_uk_t: Vec<Matrix>,
    /// Per head `W_UV`: `[v_head_dim, kv_lora_rank]`.
    pub(crate) w_uv: Vec<Matrix>,
    pub(crate) o_proj: Matrix,
}

#[derive(Debug)]
pub(crate) struct Moe {
    /// Router weight `[n_routed_experts, hidden]`, f32.
    pub(crate) gate: Matrix,
    pub(crate) bias: Option<Vec<f32>>,
    pub(crate) shared: Option<Mlp>,
}

#[derive(Debug)]
pub(crate) enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) attn: Attention,
    pub(crate) ffn: Ffn,
}

impl Layer {
    fn load(r: &WeightReader<'_>, c: &ModelConfig, t: &LayerSpec) -> Result<Self, ModelError> {
        let (heads, dn, dv) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim);
        let q = match &t.q {
            QSpec::Full(w) => QProj::Full(r.matrix(w)?.packed()),
            QSpec::Lora { a, norm, b } => {
                QProj::Lora { a: r.matrix(a)?.packed(), norm: r.vector(norm)?, b: r.matrix(b)?.packed() }
            }
        };
        let kv_b = r.matrix(&t.kv_b)?;
        let per = dn + dv;
        let w_uk_t = (0..heads).map(|hd| kv_b.rows_range(hd * per..hd * per + dn).transposed().packed()).collect();
        let w_uv = (0..heads).map(|hd| kv_b.rows_range(hd * per + dn..(hd + 1) * per).packed()).collect();
        let attn = Attention {
            q,
            kv_a: r.matrix(&t.kv_a)?.packed(),
            kv_a_norm: r.vector(&t.kv_a_norm)?,
            w_uk_t,
            w_uv,
            o_proj: r.matrix(&t.o_proj)?.packed(),
        };
        let ffn = match &t.ffn {
            FfnSpec::Moe { gate, bias, shared } => {
                let f32_reader = WeightReader { dtype: crate::WeightDtype::F32, ..*r };
                Ffn::Moe(Moe {
                    gate: f32_reader.matrix(gate)?,
                    bias: bias.as_ref().map(|b| r.vector(b)).transpose()?,
                    shared: shared.as_ref().map(|s| Mlp::load(r, s)).transpose()?,
                })
            }
            FfnSpec::Dense(mlp) => Ffn::Dense(Mlp::load(r, mlp)?),
        };
        Ok(Layer { input_norm: r.vector(&t.input_norm)?, post_norm: r.vector(&t.post_norm)?, attn, ffn })
    }
}

/// DeepSeek's multi-token prediction module (checkpoint layer `index`): at position i it
/// combines the main model's final-normed hidden state h_i with the embedding of token
/// x_{i+1}, runs one decoder block over its own latent cache layer, and its `shared_head`
/// gives the distribution of x_{i+2}. Drafts further ahead feed its own output back as h.
#[derive(Debug)]
pub(crate) struct Mtp {
    pub(crate) index: usize,
    pub(crate) enorm: Vec<f32>,
    pub(crate) hnorm: Vec<f32>,
    /// `[hidden, 2 * hidden]`: embeddings first, then the hidden state.
    pub(crate) eh_proj: Matrix,
    pub(crate) block: Layer,
    pub(crate) head_norm: Vec<f32>,
    /// `shared_head.head` when the checkpoint has its own; the main head otherwise.
    pub(crate) head: Option<Matrix>,
    /// The layer's own `embed_tokens` when the checkpoint has one; the main embedding otherwise.
    pub(crate) embed: Option<Matrix>,
}

impl Mtp {
    fn load(r: &WeightReader<'_>, c: &ModelConfig, index: usize) -> Result<Self, ModelError> {
        let t = shapes::MtpSpec::new(c, index);
        let optional = |spec: &shapes::Spec| r.ckpt.contains(&spec.name).then(|| r.matrix(spec)).transpose();
        Ok(Mtp {
            index,
            enorm: r.vector(&t.enorm)?,
            hnorm: r.vector(&t.hnorm)?,
            eh_proj: r.matrix(&t.eh_proj)?.packed(),
            block: Layer::load(r, c, &t.block)?,
            head_norm: r.vector(&t.head_norm)?,
            head: optional(&t.head)?.map(Matrix::packed),
            embed: optional(&t.embed)?,
        })
    }
}

/// Called with a layer index once that layer's latent rows are in the cache.
pub type LayerHook<'a> = dyn FnMut(usize, &LatentCache) + Send + 'a;

impl std::fmt::Debug for Pass<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pass")
            .field("trace", &self.trace.is_some())
            .field("on_layer", &self.on_layer.is_some())
            .field("hidden", &self.hidden)
            .finish()
    }
}

/// What a forward pass does besides computing logits (see [`Model::forward_with`]).
#[derive(Default)]
pub struct Pass<'t, 'h> {
    pub trace: Option<&'t mut RouterTrace>,
    pub on_layer: Option<&'h mut LayerHook<'h>>,
    /// Return every token's final-normed hidden state ([`ForwardOutput::hidden`]).
    pub hidden: bool,
}

/// The non-expert weights of a model (routed experts live behind [`ExpertBackend`]).
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    pub(crate) embed: Matrix,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Option<Matrix>,
    /// The MTP module, when the config names one (`num_nextn_predict_layers`).
    pub(crate) mtp: Option<Mtp>,
    pub(crate) rope: RopeTable,
    pub(crate) scale: f32,
    precision: Precision,
}

/// Which positions of a segment need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// Consecutive tokens of one sequence, starting at `start_pos`, whose cache rows live in the
/// blocks of `block_table` (which must cover `start_pos + tokens.len()` positions).
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    pub logits: LogitsWanted,
}

/// Logits per segment: one row (`Last`), one per token (`All`) or none; and, when asked, the
/// final-normed hidden state of every token per segment (what the MTP layer reads).
#[derive(Debug, Default)]
pub struct ForwardOutput {
    pub logits: Vec<Vec<f32>>,
    pub hidden: Vec<Vec<f32>>,
}

/// Router choices recorded during a forward: `layers[i] = (layer, ids)` where `ids` holds
/// `top_k` ascending expert ids per token of the batch, in batch order.
#[derive(Debug, Default, Clone)]
pub struct RouterTrace {
    pub layers: Vec<(usize, Vec<u32>)>,
}

impl Model {
    pub(crate) fn load(r: &WeightReader<'_>, config: ModelConfig, progress: &dyn Fn(u64)) -> Result<Self, ModelError> {
        let c = &config;
        let embed = r.matrix(&shapes::embed(c))?;
        progress(1);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let layer = Layer::load(r, c, &LayerSpec::new(c, l))?;
            progress(1);
            layers.push(layer);
        }
        let norm = r.vector(&shapes::final_norm(c))?;
        let lm_head = shapes::lm_head(c).map(|head| r.matrix(&head).map(Matrix::packed)).transpose()?;
        // A tied head is the embedding: packed too (embedding rows are then read through the
        // packed layout, one row per token).
        let embed = if c.tie_word_embeddings { embed.packed() } else { embed };
        let mtp = c.mtp_layer().map(|l| Mtp::load(r, c, l)).transpose()?;
        progress(1);
        let rope = RopeTable::new(c.qk_rope_head_dim, c.rope_theta, c.yarn.as_ref(), c.rope_interleave);
        let scale = c.softmax_scale();
        Ok(Model { config, embed, layers, norm, lm_head, mtp, rope, scale, precision: Precision::Exact })
    }

    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Runs `segments` through the model, writing their latent rows into `cache`.
    ///
    /// Runs on a rayon worker so the many kernel calls inside fork from the pool instead of
    /// paying a cross-thread hand-off each. Callers validate token ids and block tables
    /// (the [`crate::Engine`] does).
    pub fn forward(
        &self,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        experts: &dyn ExpertBackend,
        trace: Option<&mut RouterTrace>,
    ) -> Result<ForwardOutput, ExpertError> {
        self.forward_with(cache, segments, experts, Pass { trace, on_layer: None, hidden: false })
    }

    /// [`Model::forward`] with what `pass` asks besides: router choices recorded, each layer's
    /// rows handed to a hook as soon as they are in the cache (before its FFN runs, so they
    /// can be shipped while later layers compute), the final-normed hidden states returned.
    pub fn forward_with(
        &self,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        experts: &dyn ExpertBackend,
        pass: Pass<'_, '_>,
    ) -> Result<ForwardOutput, ExpertError> {
        // The caller's span (a decode step, a prefill batch) follows onto the pool thread, so
        // expert calls made there are its children.
        let span = tracing::Span::current();
        rayon::scope(|_| span.in_scope(|| self.forward_on_pool(cache, segments, experts, pass)))
    }

    fn forward_on_pool(
        &self,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        experts: &dyn ExpertBackend,
        mut pass: Pass<'_, '_>,
    ) -> Result<ForwardOutput, ExpertError> {
        let h = self.config.hidden_size;
        let mut b = Batch::new(segments, experts, pass.trace.take());
        let mut x = vec![0f32; b.len() * h];
        for (i, &t) in b.tokens.iter().enumerate() {
            self.embed.row_f32(t as usize, &mut x[i * h..(i + 1) * h]);
        }
        let mut scratch = Scratch::new(x.len());
        for (li, layer) in self.layers.iter().enumerate() {
            self.block(li, layer, &mut b, &mut x, &mut scratch, cache, pass.on_layer.as_deref_mut())?;
        }
        let mut out = self.logits(&x, segments);
        if pass.hidden {
            rms_norm(&mut x, &self.norm, self.config.rms_norm_eps);
            out.hidden = split_rows(&x, h, segments);
        }
        Ok(out)
    }

    /// One decoder layer over the batch's rows `x`, in place; `scratch` is sized like `x`
    /// and reused across layers (a prefill's activations are too large to allocate per layer).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        li: usize,
        layer: &Layer,
        b: &mut Batch<'_>,
        x: &mut [f32],
        scratch: &mut Scratch,
        cache: &mut LatentCache,
        on_layer: Option<&mut LayerHook<'_>>,
    ) -> Result<(), ExpertError> {
        let c = &self.config;
        let n = b.len();
        let Scratch { hn, out } = scratch;
        hn.copy_from_slice(x);
        rms_norm(hn, &layer.input_norm, c.rms_norm_eps);
        self.attention(li, &layer.attn, b, hn, cache, out);
        if let Some(hook) = on_layer {
            hook(li, cache);
        }
        add(x, out);
        hn.copy_from_slice(x);
        rms_norm(hn, &layer.post_norm, c.rms_norm_eps);
        match &layer.ffn {
            Ffn::Dense(mlp) => mlp.forward(hn, n, out, self.precision),
            Ffn::Moe(moe) => self.moe(li, moe, b, hn, out)?,
        }
        add(x, out);
        Ok(())
    }

    /// Whether the checkpoint's MTP layer was loaded.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// The MTP layer over `segments`: token i of a segment is x_{p+1} at position p, `prev`
    /// holds the hidden state it is combined with (`[tokens, hidden]` in batch order: the main
    /// model's final-normed h_p, or the MTP layer's own output when drafting further). Writes
    /// the MTP layer's latent rows (cache layer `num_hidden_layers`) and returns, per segment,
    /// the `shared_head.norm`-ed outputs of the rows its `logits` asks for: what
    /// [`Model::mtp_logits`] turns into the distribution of x_{p+2}, and what a further
    /// draft takes as its hidden state. Calls `on_layer` once the rows are in the cache.
    ///
    /// The model must have an MTP layer ([`Model::has_mtp`]).
    pub fn mtp_forward(
        &self,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        prev: &[f32],
        experts: &dyn ExpertBackend,
        on_layer: Option<&mut LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>, ExpertError> {
        let span = tracing::Span::current();
        rayon::scope(|_| {
            span.in_scope(|| {
                let mtp = self.mtp.as_ref().expect("callers check has_mtp");
                let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps);
                let mut b = Batch::new(segments, experts, None);
                let n = b.len();
                debug_assert_eq!(prev.len(), n * h);
                let embed = mtp.embed.as_ref().unwrap_or(&self.embed);
                let mut e = vec![0f32; n * h];
                for (i, &t) in b.tokens.iter().enumerate() {
                    embed.row_f32(t as usize, &mut e[i * h..(i + 1) * h]);
                }
                rms_norm(&mut e, &mtp.enorm, eps);
                let mut hp = prev.to_vec();
                rms_norm(&mut hp, &mtp.hnorm, eps);
                let cat: Vec<f32> =
                    e.chunks_exact(h).zip(hp.chunks_exact(h)).flat_map(|(a, b)| a.iter().chain(b)).copied().collect();
                let mut x = vec![0f32; n * h];
                matmul(&cat, n, 2 * h, mtp.eh_proj.weight(), h, &mut x, self.precision);
                self.block(mtp.index, &mtp.block, &mut b, &mut x, &mut Scratch::new(n * h), cache, on_layer)?;
                let rows = logit_rows(segments);
                let mut hs: Vec<f32> = rows.iter().flat_map(|&r| x[r * h..(r + 1) * h].iter().copied()).collect();
                rms_norm(&mut hs, &mtp.head_norm, eps);
                Ok(split_logits(&hs, h, segments).logits)
            })
        })
    }

    /// The MTP head over `m` rows of [`Model::mtp_forward`]'s outputs: `[m, vocab]` logits.
    pub fn mtp_logits(&self, rows: &[f32], m: usize) -> Vec<f32> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let head = self.mtp.as_ref().and_then(|t| t.head.as_ref()).or(self.lm_head.as_ref()).unwrap_or(&self.embed);
        let mut out = vec![0f32; m * vocab];
        matmul(rows, m, h, head.weight(), vocab, &mut out, self.precision);
        out
    }

    fn logits(&self, x: &[f32], segments: &[Segment<'_>]) -> ForwardOutput {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let rows = logit_rows(segments);
        let mut hs: Vec<f32> = rows.iter().flat_map(|&r| x[r * h..(r + 1) * h].iter().copied()).collect();
        rms_norm(&mut hs, &self.norm, self.config.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut all = vec![0f32; rows.len() * vocab];
        matmul(&hs, rows.len(), h, head.weight(), vocab, &mut all, self.precision);
        split_logits(&all, vocab, segments)
    }

    /// Layer `layer`'s attention of the batch's normalized rows `hn`, into `out`; writes
    /// their latent rows into `cache` first.
    fn attention(
        &self,
        layer: usize,
        a: &Attention,
        b: &Batch<'_>,
        hn: &[f32],
        cache: &mut LatentCache,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let p = self.precision;
        let (n, h, heads) = (b.len(), c.hidden_size, c.num_attention_heads);
        let pos = &b.pos;
        let (dn, dr, dv, rank) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let dq = dn + dr;
        // Queries: [n, heads * (dn + dr)].
        let mut q = vec![0f32; n * heads * dq];
        match &a.q {
            QProj::Full(w) => matmul(hn, n, h, w.weight(), heads * dq, &mut q, p),
            QProj::Lora { a: wa, norm, b } => {
                let mut qa = vec![0f32; n * wa.rows];
                matmul(hn, n, h, wa.weight(), wa.rows, &mut qa, p);
                rms_norm(&mut qa, norm, LATENT_NORM_EPS);
                matmul(&qa, n, wa.rows, b.weight(), heads * dq, &mut q, p);
            }
        }
        // Latents: [n, rank + dr] → normalize c_kv, rope k_pe, store in the cache.
        let lat = rank + dr;
        let mut kv = vec![0f32; n * lat];
        matmul(hn, n, h, a.kv_a.weight(), lat, &mut kv, p);
        let half = dr / 2;
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        for i in 0..n {
            self.rope.cos_sin(pos[i], &mut cos[i * half..(i + 1) * half], &mut sin[i * half..(i + 1) * half]);
        }
        for i in 0..n {
            let row = &mut kv[i * lat..(i + 1) * lat];
            let (ckv, kpe) = row.split_at_mut(rank);
            rms_norm(ckv, &a.kv_a_norm, LATENT_NORM_EPS);
            self.rope.apply(kpe, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            cache.write_row(layer, b.table(i), pos[i], row);
        }
        // Split queries per head; rope the rope part; absorb W_UK into the nope part.
        let mut q_pe = vec![0f32; n * heads * dr];
        let mut q_lat = vec![0f32; n * heads * rank];
        let mut q_nope_h = vec![0f32; n * dn];
        let mut q_lat_h = vec![0f32; n * rank];
        for hd in 0..heads {
            for i in 0..n {
                let src = &q[(i * heads + hd) * dq..(i * heads + hd + 1) * dq];
                q_nope_h[i * dn..(i + 1) * dn].copy_from_slice(&src[..dn]);
                let pe = &mut q_pe[(i * heads + hd) * dr..(i * heads + hd + 1) * dr];
                pe.copy_from_slice(&src[dn..]);
                self.rope.apply(pe, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            }
            matmul(&q_nope_h, n, dn, a.w_uk_t[hd].weight(), rank, &mut q_lat_h, p);
            for i in 0..n {
                q_lat[(i * heads + hd) * rank..(i * heads + hd + 1) * rank]
                    .copy_from_slice(&q_lat_h[i * rank..(i + 1) * rank]);
            }
        }
        // Attention per token (parallel over tokens), in latent space: o_lat [n, heads, rank].
        let view = cache.view(layer, rank, dr);
        let mut o_lat = vec![0f32; n * heads * rank];
        o_lat.par_chunks_mut(heads * rank).enumerate().for_each_init(Vec::new, |scores, (i, o)| {
            attend(
                view,
                b.table(i),
                pos[i] + 1,
                &q_lat[i * heads * rank..(i + 1) * heads * rank],
                &q_pe[i * heads * dr..(i + 1) * heads * dr],
                self.scale,
                heads,
                scores,
                o,
            );
        });
        // Up-project values per head: [n, heads * dv], then o_proj.
        let mut o = vec![0f32; n * heads * dv];
        let mut o_lat_h = vec![0f32; n * rank];
        let mut o_h = vec![0f32; n * dv];
        for hd in 0..heads {
            for i in 0..n {
                o_lat_h[i * rank..(i + 1) * rank]
                    .copy_from_slice(&o_lat[(i * heads + hd) * rank..(i * heads + hd + 1) * rank]);
            }
            matmul(&o_lat_h, n, rank, a.w_uv[hd].weight(), dv, &mut o_h, p);
            for i in 0..n {
                o[(i * heads + hd) * dv..(i * heads + hd + 1) * dv].copy_from_slice(&o_h[i * dv..(i + 1) * dv]);
            }
        }
        matmul(&o, n, heads * dv, a.o_proj.weight(), h, out, p);
    }

    /// Layer `layer`'s MoE of the batch's normalized rows `hn`, into `out`: routed experts
    /// through the batch's backend (choices recorded in its trace), shared ones here.
    fn moe(&self, layer: usize, moe: &Moe, b: &mut Batch<'_>, hn: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let (n, experts) = (b.len(), b.experts);
        let c = &self.config;
        let (h, e, k) = (c.hidden_size, c.n_routed_experts, c.router.top_k);
        let mut logits = vec![0f32; n * e];
        matmul(hn, n, h, moe.gate.weight(), e, &mut logits, Precision::Exact);
        let mut ids = vec![0u32; n * k];
        let mut weights = vec![0f32; n * k];
        for i in 0..n {
            route(
                &c.router,
                &logits[i * e..(i + 1) * e],
                moe.bias.as_deref(),
                &mut ids[i * k..(i + 1) * k],
                &mut weights[i * k..(i + 1) * k],
            );
        }
        if let Some(t) = b.trace.as_deref_mut() {
            t.layers.push((layer, ids.clone()));
        }
        // Group (token, slot) pairs by expert, ascending: the order transformers sums in.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for i in 0..n {
            for j in 0..k {
                by_expert[ids[i * k + j] as usize].push((i, weights[i * k + j]));
            }
        }
        let mut groups = Vec::new();
        let mut inputs = Vec::with_capacity(n * k * h);
        for (x, rows) in by_expert.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            groups.push(ExpertGroup { expert: ExpertId(x as u32), num_tokens: rows.len() });
            for &(i, _) in rows {
                inputs.extend_from_slice(&hn[i * h..(i + 1) * h]);
            }
        }
        let mut outputs = vec![0f32; inputs.len()];
        // The shared expert needs no routing: run it beside the routed ones (which mostly
        // stream weights) instead of after them.
        let batch = ExpertBatch { layer, hidden: h, groups: &groups, inputs: &inputs };
        let (routed, shared) = rayon::join(
            || experts.run(&batch, &mut outputs),
            || {
                moe.shared.as_ref().map(|mlp| {
                    let mut s = vec![0f32; n * h];
                    mlp.forward(hn, n, &mut s, self.precision);
                    s
                })
            },
        );
        routed?;
        out.iter_mut().for_each(|v| *v = 0.0);
        let mut row = 0;
        for rows in by_expert.iter().filter(|r| !r.is_empty()) {
            for &(i, w) in rows {
                for (o, v) in out[i * h..(i + 1) * h].iter_mut().zip(&outputs[row * h..(row + 1) * h]) {
                    *o += v * w;
                }
                row += 1;
            }
        }
        if let Some(s) = shared {
            add(out, &s);
        }
        Ok(())
    }
}

/// A block's normalized input and sublayer output, `[tokens, hidden]` each.
struct Scratch {
    hn: Vec<f32>,
    out: Vec<f32>,
}

impl Scratch {
    fn new(len: usize) -> Self {
        Scratch { hn: vec![0f32; len], out: vec![0f32; len] }
    }
}

/// One forward call: its segments' tokens flattened (token `i` is `tokens[i]`, at position
/// `pos[i]` of segment `seg_of[i]`), where its routed experts run and what records them.
struct Batch<'a> {
    segments: &'a [Segment<'a>],
    tokens: Vec<u32>,
    pos: Vec<usize>,
    seg_of: Vec<usize>,
    experts: &'a dyn ExpertBackend,
    trace: Option<&'a mut RouterTrace>,
}

impl<'a> Batch<'a> {
    fn new(segments: &'a [Segment<'a>], experts: &'a dyn ExpertBackend, trace: Option<&'a mut RouterTrace>) -> Self {
        let (mut tokens, mut pos, mut seg_of) = (Vec::new(), Vec::new(), Vec::new());
        for (si, s) in segments.iter().enumerate() {
            for (j, &t) in s.tokens.iter().enumerate() {
                tokens.push(t);
                pos.push(s.start_pos + j);
                seg_of.push(si);
            }
        }
        Batch { segments, tokens, pos, seg_of, experts, trace }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The block table of token `i`'s sequence.
    fn table(&self, i: usize) -> &'a [u32] {
        self.segments[self.seg_of[i]].block_table
    }
}

/// `rows` (`[tokens, width]` in batch order) handed out per segment, every token.
fn split_rows(rows: &[f32], width: usize, segments: &[Segment<'_>]) -> Vec<Vec<f32>> {
    let mut start = 0;
    segments
        .iter()
        .map(|s| {
            let end = start + s.tokens.len() * width;
            let seg = rows[start..end].to_vec();
            start = end;
            seg
        })
        .collect()
}

/// Rows of the flattened batch whose logits the segments want, in segment order.
pub(crate) fn logit_rows(segments: &[Segment<'_>]) -> Vec<usize> {
    let mut rows = Vec::new();
    let mut start = 0;
    for s in segments {
        match s.logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => rows.push(start + s.tokens.len() - 1),
            LogitsWanted::All => rows.extend(start..start + s.tokens.len()),
        }
        start += s.tokens.len();
    }
    rows
}

/// `all` (the rows of [`logit_rows`], `vocab` wide) handed out per segment.
pub(crate) fn split_logits(all: &[f32], vocab: usize, segments: &[Segment<'_>]) -> ForwardOutput {
    let mut logits = Vec::with_capacity(segments.len());
    let mut row = 0;
    for s in segments {
        let k = match s.logits {
            LogitsWanted::None => 0,
            LogitsWanted::Last => 1,
            LogitsWanted::All => s.tokens.len(),
        };
        logits.push(all[row * vocab..(row + k) * vocab].to_vec());
        row += k;
    }
    ForwardOutput { logits, hidden: Vec::new() }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
