//! `config.json` of a DeepSeek-V3/V2 checkpoint, parsed and validated once.
//!
//! Accepts both rope layouts: `rope_theta` + `rope_scaling` (official repos) and
//! transformers 5's `rope_parameters`. Unknown fields are ignored (HF configs carry many).

use crate::ModelError;
use kernels::cpu::rope::Yarn;
use kernels::cpu::router::{RouterConfig, RouterKind};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which DeepSeek generation's semantics to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    DeepseekV3,
    DeepseekV2,
}

/// FP8 block quantization declared in `quantization_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Blocks {
    pub block: (usize, usize),
}

/// The validated model shape and semantics.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer from `first_k_dense_replace` on is a MoE layer.
    pub moe_layer_freq: usize,
    pub router: RouterConfig,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub rope_interleave: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub fp8: Option<Fp8Blocks>,
    pub num_nextn_predict_layers: usize,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f64>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_interleave: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    quantization_config: Option<Value>,
    num_nextn_predict_layers: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), err: source })?;
        Self::from_json(&text, &path)
    }

    /// Parses `text`; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ModelError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: Raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let err = e.into_inner();
            if err.is_data() && field != "." {
                // Valid JSON, wrong type: name the field.
                ModelError::Config { path: path.into(), field, reason: err.to_string() }
            } else {
                ModelError::Json { path: path.into(), err }
            }
        })?;
        Parser { path: path.to_path_buf() }.parse(raw)
    }

    /// Whether `layer` (of the main stack, or the MTP layer) has a routed FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        if Some(layer) == self.mtp_layer() {
            return self.n_routed_experts > 0;
        }
        layer >= self.first_k_dense_replace && self.n_routed_experts > 0 && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// The checkpoint layer of the MTP module speculative decoding drafts with: the first of
    /// the `num_nextn_predict_layers` that follow the main stack (DeepSeek ships one; further
    /// ones are not read).
    pub fn mtp_layer(&self) -> Option<usize> {
        (self.num_nextn_predict_layers > 0).then_some(self.num_hidden_layers)
    }

    /// The MoE layers whose routed experts run: the main stack's, then the MTP layer's (a full
    /// decoder block whose FFN is MoE whenever the model routes: transformers builds it with
    /// `first_k_dense_replace = 0`).
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers_with_mtp()).filter(|&l| self.is_moe_layer(l)).collect()
    }

    /// Layers with weights: the main stack and the MTP layer, if any.
    pub fn num_layers_with_mtp(&self) -> usize {
        self.num_hidden_layers + usize::from(self.mtp_layer().is_some())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)²` under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        let m = match &self.yarn {
            Some(y) => match y.mscale_all_dim {
                Some(a) if a != 0.0 => kernels::cpu::rope::yarn_mscale(y.factor, a),
                _ => 1.0,
            },
            None => 1.0,
        };
        (base * m * m) as f32
    }

    /// Values per token per layer in the latent cache (`kv_lora_rank + qk_rope_head_dim`).
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Upper bounds on sizes: far above any DeepSeek model (V3: hidden 7168, 61 layers, 128 heads,
/// 256 experts, vocabulary 129280, context 163840), and low enough that no product the model
/// forms from them overflows. What a checkpoint really holds is checked against its tensors
/// before any weight is read (`crate::shapes`).
pub(crate) mod bounds {
    /// Hidden and intermediate sizes, LoRA ranks, head dimensions, FP8 block sides.
    pub const WIDTH: usize = 1 << 20;
    pub const HEADS: usize = 1 << 12;
    /// Layers, `first_k_dense_replace`, `moe_layer_freq`, MTP layers.
    pub const LAYERS: usize = 1 << 12;
    /// Routed experts per layer (and groups, and experts per token).
    pub const EXPERTS: usize = 1 << 16;
    pub const SHARED_EXPERTS: usize = 1 << 8;
    pub const VOCAB: usize = 1 << 24;
    pub const CONTEXT: usize = 1 << 28;
}

struct Parser {
    path: PathBuf,
}

impl Parser {
    fn err(&self, field: &str, reason: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.clone(), field: field.into(), reason: reason.into() }
    }

    /// A required size in `1..=max`.
    fn req(&self, v: Option<usize>, field: &str, max: usize) -> Result<usize, ModelError> {
        match v {
            None => Err(self.err(field, "is required")),
            Some(n) => self.in_range(n, field, 1, max),
        }
    }

    /// An optional size in `min..=max`, `default` when absent.
    fn opt(&self, v: Option<usize>, field: &str, default: usize, min: usize, max: usize) -> Result<usize, ModelError> {
        self.in_range(v.unwrap_or(default), field, min, max)
    }

    fn in_range(&self, n: usize, field: &str, min: usize, max: usize) -> Result<usize, ModelError> {
        if n < min {
            Err(self.err(field, format!("{n} must be at least {min}")))
        } else if n > max {
            Err(self.err(field, format!("{n} exceeds the supported maximum of {max}")))
        } else {
            Ok(n)
        }
    }

    /// A finite number, in `min..` when given.
    fn finite(&self, v: f64, field: &str, above: Option<f64>) -> Result<f64, ModelError> {
        match above {
            _ if !v.is_finite() => Err(self.err(field, format!("{v} must be a finite number"))),
            Some(min) if v <= min => Err(self.err(field, format!("{v} must be greater than {min}"))),
            _ => Ok(v),
        }
    }

    fn parse(&self, r: Raw) -> Result<ModelConfig, ModelError> {
        use bounds::*;
        let model_type = match r.model_type.as_deref() {
            Some("deepseek_v3") => ModelType::DeepseekV3,
            Some("deepseek_v2") => ModelType::DeepseekV2,
            Some(other) => {
                return Err(ModelError::UnsupportedModelType { path: self.path.clone(), model_type: other.into() });
            }
            None => return Err(self.err("model_type", "is required")),
        };
        let hidden_size = self.req(r.hidden_size, "hidden_size", WIDTH)?;
        let num_hidden_layers = self.req(r.num_hidden_layers, "num_hidden_layers", LAYERS)?;
        let n_routed_experts = self.opt(r.n_routed_experts, "n_routed_experts", 0, 0, EXPERTS)?;
        let top_k =
            if n_routed_experts > 0 { self.req(r.num_experts_per_tok, "num_experts_per_tok", EXPERTS)? } else { 0 };
        if top_k > n_routed_experts {
            return Err(self.err("num_experts_per_tok", format!("{top_k} exceeds n_routed_experts {n_routed_experts}")));
        }
        let n_group = r.n_group.unwrap_or(1).max(1);
        let topk_group = r.topk_group.unwrap_or(1).max(1);
        if n_routed_experts > 0 && !n_routed_experts.is_multiple_of(n_group) {
            return Err(self.err("n_group", format!("{n_group} does not divide n_routed_experts {n_routed_experts}")));
        }
        let n_group = self.in_range(n_group, "n_group", 1, EXPERTS)?;
        if topk_group > n_group {
            return Err(self.err("topk_group", format!("{topk_group} exceeds n_group {n_group}")));
        }
        let kind = match model_type {
            ModelType::DeepseekV3 => RouterKind::SigmoidNoAuxTc,
            ModelType::DeepseekV2 => match r.topk_method.as_deref().unwrap_or("greedy") {
                "greedy" => RouterKind::SoftmaxGreedy,
                "group_limited_greedy" => RouterKind::SoftmaxGroupLimited,
                other => return Err(self.err("topk_method", format!("{other:?} is not supported for deepseek_v2"))),
            },
        };
        let routed_scaling_factor =
            self.finite(r.routed_scaling_factor.unwrap_or(1.0), "routed_scaling_factor", None)?;
        let router = RouterConfig {
            kind,
            n_experts: n_routed_experts,
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: r.norm_topk_prob.unwrap_or(false),
            routed_scaling_factor: routed_scaling_factor as f32,
        };
        let qk_rope_head_dim = self.req(r.qk_rope_head_dim, "qk_rope_head_dim", WIDTH)?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(self.err("qk_rope_head_dim", "must be even"));
        }
        let max_position_embeddings = self.req(r.max_position_embeddings, "max_position_embeddings", CONTEXT)?;
        let (rope_theta, yarn) = self.rope(&r, max_position_embeddings)?;
        let rms_norm_eps = self.finite(r.rms_norm_eps.unwrap_or(1e-6), "rms_norm_eps", Some(0.0))?;
        Ok(ModelConfig {
            model_type,
            vocab_size: self.req(r.vocab_size, "vocab_size", VOCAB)?,
            hidden_size,
            intermediate_size: self.req(r.intermediate_size, "intermediate_size", WIDTH)?,
            moe_intermediate_size: if n_routed_experts > 0 {
                self.req(r.moe_intermediate_size, "moe_intermediate_size", WIDTH)?
            } else {
                0
            },
            num_hidden_layers,
            num_attention_heads: self.req(r.num_attention_heads, "num_attention_heads", HEADS)?,
            n_shared_experts: self.opt(r.n_shared_experts, "n_shared_experts", 0, 0, SHARED_EXPERTS)?,
            n_routed_experts,
            first_k_dense_replace: self.opt(r.first_k_dense_replace, "first_k_dense_replace", 0, 0, LAYERS)?,
            moe_layer_freq: self.opt(r.moe_layer_freq, "moe_layer_freq", 1, 1, LAYERS)?,
            router,
            q_lora_rank: match r.q_lora_rank.filter(|&q| q > 0) {
                Some(q) => Some(self.req(Some(q), "q_lora_rank", WIDTH)?),
                None => None,
            },
            kv_lora_rank: self.req(r.kv_lora_rank, "kv_lora_rank", WIDTH)?,
            qk_nope_head_dim: self.req(r.qk_nope_head_dim, "qk_nope_head_dim", WIDTH)?,
            qk_rope_head_dim,
            v_head_dim: self.req(r.v_head_dim, "v_head_dim", WIDTH)?,
            max_position_embeddings,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            yarn,
            // transformers' V2 always uses interleaved (complex) pairs; V3 defaults to true.
            rope_interleave: match model_type {
                ModelType::DeepseekV2 => true,
                ModelType::DeepseekV3 => r.rope_interleave.unwrap_or(true),
            },
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.token_ids(r.bos_token_id.as_ref(), "bos_token_id")?.first().copied(),
            eos_token_ids: self.token_ids(r.eos_token_id.as_ref(), "eos_token_id")?,
            fp8: self.fp8(r.quantization_config.as_ref())?,
            num_nextn_predict_layers: self.opt(r.num_nextn_predict_layers, "num_nextn_predict_layers", 0, 0, LAYERS)?,
        })
    }

    /// `(rope_theta, yarn)` from either layout.
    fn rope(&self, r: &Raw, max_pos: usize) -> Result<(f64, Option<Yarn>), ModelError> {
        let (params, field) = match (&r.rope_parameters, &r.rope_scaling) {
            (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
            (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
            _ => (None, "rope_scaling"),
        };
        let get = |k: &str| params.and_then(|p| p.get(k)).filter(|v| !v.is_null());
        let num = |k: &str| -> Result<Option<f64>, ModelError> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(&format!("{field}.{k}"), "must be a number")),
            }
        };
        let theta = match (num("rope_theta")?, r.rope_theta) {
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => 10000.0,
        };
        let theta = self.finite(theta, "rope_theta", Some(1.0))?;
        let kind = get("rope_type").or_else(|| get("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => Ok((theta, None)),
            "yarn" => {
                // NaN, infinite or non-positive values would make every rotation NaN.
                let positive = |k: &str, v: Option<f64>| match v {
                    Some(v) => self.finite(v, &format!("{field}.{k}"), Some(0.0)).map(Some),
                    None => Ok(None),
                };
                let finite = |k: &str| match num(k)? {
                    Some(v) => self.finite(v, &format!("{field}.{k}"), None).map(Some),
                    None => Ok(None),
                };
                let original = positive("original_max_position_embeddings", num("original_max_position_embeddings")?)?;
                let factor = match num("factor")? {
                    Some(f) => f,
                    None => match original {
                        Some(o) => max_pos as f64 / o,
                        None => return Err(self.err(&format!("{field}.factor"), "is required for yarn")),
                    },
                };
                let factor = self.finite(factor, &format!("{field}.factor"), Some(0.0))?;
                let nonzero = |v: Option<f64>, d: f64| v.filter(|x| *x != 0.0).unwrap_or(d);
                Ok((
                    theta,
                    Some(Yarn {
                        factor,
                        original_max_position_embeddings: original.unwrap_or(max_pos as f64),
                        beta_fast: self.finite(
                            nonzero(num("beta_fast")?, 32.0),
                            &format!("{field}.beta_fast"),
                            Some(0.0),
                        )?,
                        beta_slow: self.finite(
                            nonzero(num("beta_slow")?, 1.0),
                            &format!("{field}.beta_slow"),
                            Some(0.0),
                        )?,
                        mscale: finite("mscale")?,
                        mscale_all_dim: finite("mscale_all_dim")?,
                        attention_factor: positive("attention_factor", num("attention_factor")?)?,
                        truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
                    }),
                ))
            }
            other => {
                Err(self.err(&format!("{field}.rope_type"), format!("{other:?} is not supported (default, yarn)")))
            }
        }
    }

    fn token_ids(&self, v: Option<&Value>, field: &str) -> Result<Vec<u32>, ModelError> {
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => {
                a.iter().map(|x| as_id(x).ok_or_else(|| self.err(field, "must hold token ids"))).collect()
            }
            Some(x) => as_id(x).map(|id| vec![id]).ok_or_else(|| self.err(field, "must be a token id")),
        }
    }

    fn fp8(&self, q: Option<&Value>) -> Result<Option<Fp8Blocks>, ModelError> {
        let Some(q) = q.filter(|q| !q.is_null()) else { return Ok(None) };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" {
            return Err(self.err("quantization_config.quant_method", format!("{method:?} is not supported (fp8)")));
        }
        if let Some(fmt) = q.get("fmt").and_then(Value::as_str)
            && fmt != "e4m3"
        {
            return Err(self.err("quantization_config.fmt", format!("{fmt:?} is not supported (e4m3)")));
        }
        let block = match q.get("weight_block_size").and_then(Value::as_array) {
            Some(b) if b.len() == 2 => (b[0].as_u64(), b[1].as_u64()),
            None => (Some(128), Some(128)),
            Some(_) => (None, None),
        };
        match block {
            (Some(a), Some(b)) if a > 0 && b > 0 && a.max(b) <= bounds::WIDTH as u64 => {
                Ok(Some(Fp8Blocks { block: (a as usize, b as usize) }))
            }
            _ => Err(self.err(
                "quantization_config.weight_block_size",
                format!("must be two integers from 1 to {}", bounds::WIDTH),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = r#"{"model_type":"deepseek_v3","vocab_size":100,"hidden_size":64,"intermediate_size":128,
      "moe_intermediate_size":32,"num_hidden_layers":3,"num_attention_heads":4,"n_shared_experts":1,
      "n_routed_experts":16,"num_experts_per_tok":4,"first_k_dense_replace":1,"n_group":4,"topk_group":2,
      "norm_topk_prob":true,"routed_scaling_factor":2.5,"q_lora_rank":48,"kv_lora_rank":32,
      "qk_nope_head_dim":16,"qk_rope_head_dim":8,"v_head_dim":16,"max_position_embeddings":256,
      "rope_theta":10000,"rope_scaling":{"type":"yarn","factor":4,"original_max_position_embeddings":64,
      "beta_fast":32,"beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0},"bos_token_id":0,"eos_token_id":1}"#;

    fn parse(s: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json(s, Path::new("config.json"))
    }

    #[test]
    fn parses_official_layout() {
        let c = parse(V3).unwrap();
        assert_eq!(c.model_type, ModelType::DeepseekV3);
        assert_eq!(c.latent_dim(), 40);
        let y = c.yarn.as_ref().unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 64.0));
        let m = 0.1 * 4f64.ln() + 1.0;
        assert!((c.softmax_scale() as f64 - 24f64.powf(-0.5) * m * m).abs() < 1e-6);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn parses_rope_parameters_layout() {
        let s = V3.replace(
            r#""rope_theta":10000,"rope_scaling":{"type":"yarn","#,
            r#""rope_parameters":{"rope_theta":5000,"rope_type":"yarn","#,
        );
        let c = parse(&s).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert!(c.yarn.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(&V3.replace(r#""kv_lora_rank":32,"#, "")).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("kv_lora_rank"), "{e}");
        let e = parse(&V3.replace("deepseek_v3", "llama")).unwrap_err().to_string();
        assert!(e.contains("unsupported model_type \"llama\""), "{e}");
        let e = parse(&V3.replace(r#""n_group":4"#, r#""n_group":3"#)).unwrap_err().to_string();
        assert!(e.contains("n_group"), "{e}");
        let e = parse("{").unwrap_err().to_string();
        assert!(e.contains("invalid JSON"), "{e}");
        let e = parse(&V3.replace(r#""hidden_size":64"#, r#""hidden_size":"64""#)).unwrap_err().to_string();
        assert!(e.contains("field `hidden_size`") && e.contains("invalid type"), "{e}");
    }

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v: Value = serde_json::from_str(V3).expect("json");
        let mut at = &mut v;
        let mut parts = field.split('.').peekable();
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                at[p] = value;
                break;
            }
            at = &mut at[p];
        }
        v.to_string()
    }

    #[test]
    fn absurd_sizes_are_refused_naming_the_field() {
        let huge = serde_json::json!(1u64 << 40);
        for field in [
            "num_hidden_layers",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "n_shared_experts",
            "first_k_dense_replace",
            "moe_layer_freq",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "vocab_size",
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "num_nextn_predict_layers",
        ] {
            let e = parse(&with(field, huge.clone())).expect_err(field).to_string();
            assert!(e.contains(&format!("field `{field}`")), "{field}: {e}");
        }
        let e = parse(&with("num_hidden_layers", serde_json::json!(10_000_000))).unwrap_err().to_string();
        assert!(e.contains("10000000 exceeds the supported maximum of 4096"), "{e}");
        let e = parse(&with("moe_layer_freq", serde_json::json!(0))).unwrap_err().to_string();
        assert!(e.contains("field `moe_layer_freq`") && e.contains("at least 1"), "{e}");
        let e = parse(&with("max_position_embeddings", serde_json::json!(u64::MAX))).unwrap_err().to_string();
        assert!(e.contains("field `max_position_embeddings`"), "{e}");
    }

    #[test]
    fn rope_and_norm_numbers_that_would_make_nan_are_refused() {
        for (field, value) in [
            ("rope_scaling.factor", serde_json::json!(0)),
            ("rope_scaling.factor", serde_json::json!(-4.0)),
            ("rope_scaling.original_max_position_embeddings", serde_json::json!(0)),
            ("rope_scaling.beta_fast", serde_json::json!(-32)),
            ("rope_scaling.beta_slow", serde_json::json!(-1)),
            ("rope_scaling.attention_factor", serde_json::json!(0)),
            ("rope_theta", serde_json::json!(0.5)),
            ("rms_norm_eps", serde_json::json!(0)),
            ("rms_norm_eps", serde_json::json!(-1e-6)),
        ] {
            let e = parse(&with(field, value.clone())).expect_err(field).to_string();
            assert!(e.contains(&format!("field `{field}`")), "{field} = {value}: {e}");
        }
        // Zero betas keep meaning "the default", as in transformers.
        let c = parse(&with("rope_scaling.beta_fast", serde_json::json!(0))).expect("default beta_fast");
        assert_eq!(c.yarn.expect("yarn").beta_fast, 32.0);
    }

    #[test]
    fn moe_layer_freq_picks_the_moe_layers() {
        let c = parse(&with("moe_layer_freq", serde_json::json!(2))).expect("parses");
        let moe: Vec<usize> = (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).collect();
        assert_eq!(moe, vec![2], "layer 0 is dense by first_k_dense_replace, 1 by the frequency");
        assert_eq!(parse(V3).expect("parses").moe_layer_freq, 1, "default");
    }
}
