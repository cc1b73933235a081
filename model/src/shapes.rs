//! The tensors a config implies (name, shape, and the config.json fields that size it), and
//! the check of a checkpoint's headers against all of them before any weight is read: a
//! config.json that disagrees with its checkpoint, or claims absurd sizes, is refused in
//! milliseconds with an error naming the field, before anything is allocated from it.

use crate::ModelError;
use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, ModelType};
use crate::experts::ExpertId;
use crate::weights::{WeightDtype, WeightReader};

/// One tensor the model reads.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) name: String,
    /// `[rows, cols]` for a matrix, `[len]` for a vector.
    pub(crate) shape: Vec<usize>,
    /// How config.json gives the shape, for errors.
    pub(crate) fields: &'static str,
}

impl Spec {
    pub(crate) fn matrix(name: String, rows: usize, cols: usize, fields: &'static str) -> Self {
        Spec { name, shape: vec![rows, cols], fields }
    }

    fn vector(name: String, len: usize, fields: &'static str) -> Self {
        Spec { name, shape: vec![len], fields }
    }

    pub(crate) fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct MlpSpec {
    pub(crate) gate: Spec,
    pub(crate) up: Spec,
    pub(crate) down: Spec,
}

impl MlpSpec {
    fn new(prefix: &str, hidden: usize, inter: usize, fields: (&'static str, &'static str)) -> Self {
        MlpSpec {
            gate: Spec::matrix(format!("{prefix}.gate_proj.weight"), inter, hidden, fields.0),
            up: Spec::matrix(format!("{prefix}.up_proj.weight"), inter, hidden, fields.0),
            down: Spec::matrix(format!("{prefix}.down_proj.weight"), hidden, inter, fields.1),
        }
    }

    fn all(&self) -> [&Spec; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

#[derive(Debug)]
pub(crate) enum QSpec {
    Full(Spec),
    Lora { a: Spec, norm: Spec, b: Spec },
}

#[derive(Debug)]
pub(crate) enum FfnSpec {
    Dense(MlpSpec),
    /// The router and shared experts; routed experts are [`expert`].
    Moe {
        gate: Spec,
        bias: Option<Spec>,
        shared: Option<MlpSpec>,
    },
}

/// The non-routed tensors of one decoder layer.
#[derive(Debug)]
pub(crate) struct LayerSpec {
    pub(crate) input_norm: Spec,
    pub(crate) post_norm: Spec,
    pub(crate) q: QSpec,
    pub(crate) kv_a: Spec,
    pub(crate) kv_a_norm: Spec,
    pub(crate) kv_b: Spec,
    pub(crate) o_proj: Spec,
    pub(crate) ffn: FfnSpec,
}

const HIDDEN: &str = "[hidden_size]";

impl LayerSpec {
    pub(crate) fn new(c: &ModelConfig, l: usize) -> Self {
        let p = format!("model.layers.{l}");
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let (dn, dr, dv, rank) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let q = match c.q_lora_rank {
            None => QSpec::Full(Spec::matrix(
                format!("{p}.self_attn.q_proj.weight"),
                heads * (dn + dr),
                h,
                "[num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size] (q_lora_rank null)",
            )),
            Some(qr) => QSpec::Lora {
                a: Spec::matrix(format!("{p}.self_attn.q_a_proj.weight"), qr, h, "[q_lora_rank, hidden_size]"),
                norm: Spec::vector(format!("{p}.self_attn.q_a_layernorm.weight"), qr, "[q_lora_rank]"),
                b: Spec::matrix(
                    format!("{p}.self_attn.q_b_proj.weight"),
                    heads * (dn + dr),
                    qr,
                    "[num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank]",
                ),
            },
        };
        let ffn = if c.is_moe_layer(l) {
            let e = c.n_routed_experts;
            FfnSpec::Moe {
                gate: Spec::matrix(format!("{p}.mlp.gate.weight"), e, h, "[n_routed_experts, hidden_size]"),
                bias: match c.model_type {
                    ModelType::DeepseekV3 => {
                        Some(Spec::vector(format!("{p}.mlp.gate.e_score_correction_bias"), e, "[n_routed_experts]"))
                    }
                    ModelType::DeepseekV2 => None,
                },
                shared: (c.n_shared_experts > 0).then(|| {
                    MlpSpec::new(
                        &format!("{p}.mlp.shared_experts"),
                        h,
                        c.moe_intermediate_size * c.n_shared_experts,
                        (
                            "[moe_intermediate_size * n_shared_experts, hidden_size]",
                            "[hidden_size, moe_intermediate_size * n_shared_experts]",
                        ),
                    )
                }),
            }
        } else {
            FfnSpec::Dense(MlpSpec::new(
                &format!("{p}.mlp"),
                h,
                c.intermediate_size,
                ("[intermediate_size, hidden_size]", "[hidden_size, intermediate_size]"),
            ))
        };
        LayerSpec {
            input_norm: Spec::vector(format!("{p}.input_layernorm.weight"), h, HIDDEN),
            post_norm: Spec::vector(format!("{p}.post_attention_layernorm.weight"), h, HIDDEN),
            q,
            kv_a: Spec::matrix(
                format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                rank + dr,
                h,
                "[kv_lora_rank + qk_rope_head_dim, hidden_size]",
            ),
            kv_a_norm: Spec::vector(format!("{p}.self_attn.kv_a_layernorm.weight"), rank, "[kv_lora_rank]"),
            kv_b: Spec::matrix(
                format!("{p}.self_attn.kv_b_proj.weight"),
                heads * (dn + dv),
                rank,
                "[num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]",
            ),
            o_proj: Spec::matrix(
                format!("{p}.self_attn.o_proj.weight"),
                h,
                heads * dv,
                "[hidden_size, num_attention_heads * v_head_dim]",
            ),
            ffn,
        }
    }

    /// Every tensor, in checkpoint order.
    fn all(&self) -> Vec<&Spec> {
        let mut all = vec![&self.input_norm];
        match &self.q {
            QSpec::Full(w) => all.push(w),
            QSpec::Lora { a, norm, b } => all.extend([a, norm, b]),
        }
        all.extend([&self.kv_a, &self.kv_a_norm, &self.kv_b, &self.o_proj, &self.post_norm]);
        match &self.ffn {
            FfnSpec::Dense(mlp) => all.extend(mlp.all()),
            FfnSpec::Moe { gate, bias, shared } => {
                all.push(gate);
                all.extend(bias);
                all.extend(shared.iter().flat_map(MlpSpec::all));
            }
        }
        all
    }
}

/// The MTP module at checkpoint layer `L = num_hidden_layers`: `eh_proj(cat(enorm(embed(x)),
/// hnorm(h)))`, a decoder block, `shared_head.norm`, then a head. Its own `shared_head.head`
/// and `embed_tokens` are optional (transformers uses the main model's).
#[derive(Debug)]
pub(crate) struct MtpSpec {
    pub(crate) enorm: Spec,
    pub(crate) hnorm: Spec,
    pub(crate) eh_proj: Spec,
    pub(crate) block: LayerSpec,
    pub(crate) head_norm: Spec,
    pub(crate) head: Spec,
    pub(crate) embed: Spec,
}

impl MtpSpec {
    pub(crate) fn new(c: &ModelConfig, l: usize) -> Self {
        let p = format!("model.layers.{l}");
        let h = c.hidden_size;
        MtpSpec {
            enorm: Spec::vector(format!("{p}.enorm.weight"), h, HIDDEN),
            hnorm: Spec::vector(format!("{p}.hnorm.weight"), h, HIDDEN),
            eh_proj: Spec::matrix(format!("{p}.eh_proj.weight"), h, 2 * h, "[hidden_size, 2 * hidden_size]"),
            block: LayerSpec::new(c, l),
            head_norm: Spec::vector(format!("{p}.shared_head.norm.weight"), h, HIDDEN),
            head: Spec::matrix(format!("{p}.shared_head.head.weight"), c.vocab_size, h, "[vocab_size, hidden_size]"),
            embed: Spec::matrix(format!("{p}.embed_tokens.weight"), c.vocab_size, h, "[vocab_size, hidden_size]"),
        }
    }
}

pub(crate) fn embed(c: &ModelConfig) -> Spec {
    Spec::matrix("model.embed_tokens.weight".into(), c.vocab_size, c.hidden_size, "[vocab_size, hidden_size]")
}

pub(crate) fn final_norm(c: &ModelConfig) -> Spec {
    Spec::vector("model.norm.weight".into(), c.hidden_size, HIDDEN)
}

/// `None` when the head is the embedding (`tie_word_embeddings`).
pub(crate) fn lm_head(c: &ModelConfig) -> Option<Spec> {
    (!c.tie_word_embeddings).then(|| {
        Spec::matrix(
            "lm_head.weight".into(),
            c.vocab_size,
            c.hidden_size,
            "[vocab_size, hidden_size] (tie_word_embeddings false)",
        )
    })
}

/// Routed expert `expert` of MoE layer `layer`.
pub(crate) fn expert(c: &ModelConfig, layer: usize, expert: ExpertId) -> MlpSpec {
    MlpSpec::new(
        &format!("model.layers.{layer}.mlp.experts.{}", expert.0),
        c.hidden_size,
        c.moe_intermediate_size,
        ("[moe_intermediate_size, hidden_size]", "[hidden_size, moe_intermediate_size]"),
    )
}

/// Checks `c` against the headers of `ckpt`: first the counts (layers and routed experts the
/// tensor names hold), so an absurd claim is refused without walking it; then every tensor
/// the model reads (present, shape, dtype, FP8 scale grid). Reads no tensor data.
pub(crate) fn check(c: &ModelConfig, ckpt: &Checkpoint) -> Result<(), ModelError> {
    let config_err = |field: &str, reason: String| ModelError::Config {
        path: ckpt.dir().join("config.json"),
        field: field.into(),
        reason,
    };
    let held = Held::of(ckpt);
    if c.num_hidden_layers > held.layers {
        return Err(config_err(
            "num_hidden_layers",
            format!(
                "{} layers, but the checkpoint in {} holds tensors of {} (model.layers.N for N < {})",
                c.num_hidden_layers,
                ckpt.dir().display(),
                held.layers,
                held.layers
            ),
        ));
    }
    let any_moe = (0..c.num_hidden_layers).any(|l| c.is_moe_layer(l));
    if any_moe && c.n_routed_experts > held.experts {
        return Err(config_err(
            "n_routed_experts",
            format!(
                "{} routed experts, but the checkpoint in {} holds tensors of {} per layer (mlp.experts.N for N < {})",
                c.n_routed_experts,
                ckpt.dir().display(),
                held.experts,
                held.experts
            ),
        ));
    }
    let r = WeightReader { ckpt, dtype: WeightDtype::Auto, fp8_block: c.fp8.map(|f| f.block) };
    r.checked(&embed(c))?;
    for l in 0..c.num_hidden_layers {
        let layer = LayerSpec::new(c, l);
        if let Some((field, reason)) = kind_mismatch(c, ckpt, l, &layer) {
            return Err(config_err(field, reason));
        }
        for spec in layer.all() {
            r.checked(spec)?;
        }
        if c.is_moe_layer(l) {
            for e in 0..c.n_routed_experts {
                for spec in expert(c, l, ExpertId(e as u32)).all() {
                    r.checked(spec)?;
                }
            }
        }
    }
    r.checked(&final_norm(c))?;
    if let Some(head) = lm_head(c) {
        r.checked(&head)?;
    }
    if let Some(l) = c.mtp_layer() {
        if held.layers <= l {
            return Err(config_err(
                "num_nextn_predict_layers",
                format!(
                    "{} asks for an MTP layer, but the checkpoint in {} holds no tensors of layer {l} \
                     (model.layers.{l}.*); set it to 0 to serve without speculative decoding",
                    c.num_nextn_predict_layers,
                    ckpt.dir().display()
                ),
            ));
        }
        let mtp = MtpSpec::new(c, l);
        if let Some((field, reason)) = kind_mismatch(c, ckpt, l, &mtp.block) {
            return Err(config_err(field, reason));
        }
        let optional = [&mtp.head, &mtp.embed].into_iter().filter(|s| ckpt.contains(&s.name));
        for spec in
            [&mtp.enorm, &mtp.hnorm, &mtp.eh_proj, &mtp.head_norm].into_iter().chain(mtp.block.all()).chain(optional)
        {
            r.checked(spec)?;
        }
        if c.is_moe_layer(l) {
            for e in 0..c.n_routed_experts {
                for spec in expert(c, l, ExpertId(e as u32)).all() {
                    r.checked(spec)?;
                }
            }
        }
    }
    Ok(())
}

/// Which query projection and FFN a layer has follows from config fields: when the checkpoint
/// holds the other kind, the field to blame and why.
fn kind_mismatch(c: &ModelConfig, ckpt: &Checkpoint, l: usize, layer: &LayerSpec) -> Option<(&'static str, String)> {
    let p = format!("model.layers.{l}");
    let holds = |suffix: &str| ckpt.contains(&format!("{p}.{suffix}"));
    match &layer.q {
        QSpec::Full(_) if !holds("self_attn.q_proj.weight") && holds("self_attn.q_a_proj.weight") => {
            return Some((
                "q_lora_rank",
                format!(
                    "is null, but the checkpoint holds {p}.self_attn.q_a_proj.weight (a low-rank query projection)"
                ),
            ));
        }
        QSpec::Lora { a, .. } if !ckpt.contains(&a.name) && holds("self_attn.q_proj.weight") => {
            return Some((
                "q_lora_rank",
                format!(
                    "{} asks for a low-rank query projection, but the checkpoint holds {p}.self_attn.q_proj.weight",
                    a.shape[0]
                ),
            ));
        }
        _ => {}
    }
    if let FfnSpec::Moe { shared: None, .. } = &layer.ffn
        && holds("mlp.shared_experts.gate_proj.weight")
    {
        return Some(("n_shared_experts", format!("is 0, but the checkpoint holds {p}.mlp.shared_experts")));
    }
    let (moe_here, dense_here) = (holds("mlp.gate.weight"), holds("mlp.gate_proj.weight"));
    let (wanted, found) = match &layer.ffn {
        FfnSpec::Moe { .. } if !moe_here && dense_here => ("a MoE", "a dense MLP"),
        FfnSpec::Dense(_) if !dense_here && moe_here => ("a dense", "a MoE router"),
        _ => return None,
    };
    let field = if c.n_routed_experts == 0 {
        "n_routed_experts"
    } else if l < c.first_k_dense_replace || c.moe_layer_freq == 1 {
        "first_k_dense_replace"
    } else {
        "moe_layer_freq"
    };
    Some((
        field,
        format!(
            "layer {l} is {wanted} layer by n_routed_experts {}, first_k_dense_replace {} and moe_layer_freq {}, but the checkpoint holds {found} there",
            c.n_routed_experts, c.first_k_dense_replace, c.moe_layer_freq
        ),
    ))
}

/// How many layers and routed experts per layer the checkpoint's tensor names cover.
struct Held {
    layers: usize,
    experts: usize,
}

impl Held {
    fn of(ckpt: &Checkpoint) -> Self {
        let mut held = Held { layers: 0, experts: 0 };
        for name in ckpt.names() {
            let Some((layer, rest)) = name.strip_prefix("model.layers.").and_then(leading_index) else { continue };
            held.layers = held.layers.max(layer + 1);
            if let Some((e, _)) = rest.strip_prefix(".mlp.experts.").and_then(leading_index) {
                held.experts = held.experts.max(e + 1);
            }
        }
        held
    }
}

/// `"12.rest"` → `(12, ".rest")`.
fn leading_index(s: &str) -> Option<(usize, &str)> {
    let end = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok().map(|n| (n, &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_indices_parse() {
        assert_eq!(leading_index("12.mlp"), Some((12, ".mlp")));
        assert_eq!(leading_index("7"), Some((7, "")));
        assert_eq!(leading_index(".x"), None);
    }
}
