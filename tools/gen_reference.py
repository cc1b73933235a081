#!/usr/bin/env python3
"""Generate tiny DeepSeek V2/V3 reference fixtures with HF transformers.

Usage:  python3 tools/gen_reference.py [--out model/tests/fixtures] [--only NAME ...]

For every fixture this script
  1. builds a deterministic random checkpoint (large init, so mistakes show) in the
     OFFICIAL HuggingFace DeepSeek tensor layout (one tensor per expert), writes
     config.json + safetensors (f32 / bf16 / fp8 block-quantized / sharded),
  2. loads it back with transformers (DeepseekV3ForCausalLM / DeepseekV2ForCausalLM,
     eager attention + eager experts, float32) and records logits, per-position argmax,
     an 8-token greedy continuation (32 for MTP fixtures) through the KV cache and the router choices,
  3. cross-checks: (a) a fresh model whose fused expert tensors are built by hand as
     cat([gate, up]) gives bit-identical logits (checks the fused order), (b) greedy via
     the cache == greedy via full recomputation == model.generate, (c) an independent
     float64 implementation of tools/REFERENCE_NOTES.md reproduces logits and routing.
  4. for checkpoints with an MTP layer (v3_mtp, the trained default model), records the MTP
     logits of transformers' MtpModel, checked against the float64 implementation.

Everything is CPU-only and deterministic (fixed seeds).
"""
import argparse
import copy
import json
import math
import os
import shutil
import struct
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "model", "tests", "fixtures")
FP8_BLOCK = 128
FP8_MAX = 448.0

# --------------------------------------------------------------------------------------
# fixture definitions
# --------------------------------------------------------------------------------------

V3_BASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "qk_nope_head_dim": 16,
    "topk_method": "noaux_tc",
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "ep_size": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "float32",
}

V2_BASE = dict(V3_BASE)
V2_BASE.update({
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "topk_method": "group_limited_greedy",
    "scoring_func": "softmax",
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": False,
    "routed_scaling_factor": 16.0,
})
for _k in ("num_nextn_predict_layers",):
    V2_BASE.pop(_k)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def fx(name, seed, cfg_update, weight_dtype="f32", prompt_lens=(4, 9, 15), shards=0,
       layout="legacy", base=V3_BASE, drop=(), notes=()):
    cfg = copy.deepcopy(base)
    for k in drop:
        cfg.pop(k, None)
    cfg.update(copy.deepcopy(cfg_update))
    return {"name": name, "seed": seed, "config": cfg, "weight_dtype": weight_dtype,
            "prompt_lens": prompt_lens, "shards": shards, "layout": layout, "notes": list(notes)}


FIXTURES = [
    fx("v3_f32", 1001, {}, notes=[
        "config.json has no rope_interleave key (like the official DeepSeek-V3 config); transformers defaults it to true.",
    ]),
    fx("v2lite_f32", 1002, {
        "q_lora_rank": None, "norm_topk_prob": False, "v_head_dim": 24, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "n_shared_experts": 2,
    }, notes=[
        "DeepSeek-V2-Lite shapes (no q LoRA: self_attn.q_proj; v_head_dim 24 != qk_nope_head_dim 16; 2 shared experts "
        "-> shared_experts intermediate = 2*moe_intermediate_size) but model_type deepseek_v3: routing is the V3 "
        "sigmoid + e_score_correction_bias + group top-2-sum path (n_group=1, so group selection is a no-op), "
        "no normalisation (norm_topk_prob false), times routed_scaling_factor 1.0.",
    ]),
    fx("v3_yarn", 1003, {"qk_rope_head_dim": 16, "rope_interleave": True, "rope_scaling": dict(YARN)},
       prompt_lens=(4, 15, 80), notes=[
        "rope_scaling uses the legacy key \"type\": \"yarn\" (as the official config). mscale == mscale_all_dim == 1 "
        "-> cos/sin attention_factor 1.0; softmax scale = qk_head_dim^-0.5 * (0.1*ln(4)+1)^2. YaRN inv_freq is used at "
        "all positions (no switching on sequence length); one prompt is 80 tokens > original_max_position_embeddings 64.",
    ]),
    fx("v3_yarn_mscale", 1004, {"qk_rope_head_dim": 16, "rope_interleave": True, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}},
       prompt_lens=(4, 15, 80), notes=[
        "rope_scaling uses the key \"rope_type\": \"yarn\". mscale 0.707 != mscale_all_dim 1.0 -> cos and sin are "
        "multiplied by attention_factor = (0.1*0.707*ln4+1)/(0.1*1.0*ln4+1) = 0.96433 (both q_rot and k_rot, so the rope "
        "part of the score scales by its square); softmax scale = qk_head_dim^-0.5 * (0.1*1.0*ln4+1)^2.",
    ]),
    fx("v3_noninterleave", 1005, {"rope_interleave": False}, notes=[
        "rope_interleave false: NeoX rotate_half on the qk_rope_head_dim dims (pairs (i, i+dr/2)).",
    ]),
    fx("v3_bf16", 1006, {"torch_dtype": "bfloat16"}, weight_dtype="bf16", notes=[
        "All tensors stored as BF16 except mlp.gate.e_score_correction_bias (F32, as in the official checkpoints). "
        "Reference computed in float32 with exactly those bf16 values upcast.",
    ]),
    fx("v3_fp8", 1007, {"hidden_size": 160, "intermediate_size": 144, "torch_dtype": "bfloat16",
                        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                "quant_method": "fp8", "weight_block_size": [128, 128]}},
       weight_dtype="fp8", notes=[
        "Every Linear weight of attention, dense MLP, routed experts and shared experts is F8_E4M3 with "
        "<name>_scale_inv (F32, [ceil(out/128), ceil(in/128)]); dequant W[i,j] = f32(q[i,j]) * scale_inv[i//128, j//128]. "
        "embed_tokens, lm_head, norms and mlp.gate.weight are BF16; e_score_correction_bias F32. hidden 160 and "
        "intermediate 144 give partial blocks in both dims (dense MLP [144, 160] / [160, 144]). Reference = float32 "
        "model on the dequantized weights (transformers' FP8 quantizer not used).",
    ]),
    fx("v3_sharded", 1008, {"rope_interleave": True, "qk_rope_head_dim": 16, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}},
       shards=3, layout="tf5", notes=[
        "Written by transformers' own save_pretrained (max_shard_size small -> several shards + "
        "model.safetensors.index.json). config.json is exactly what transformers 5 writes: rope_parameters "
        "(incl. rope_theta, rope_type and the legacy duplicate \"type\") instead of rope_theta/rope_scaling, \"dtype\" "
        "instead of torch_dtype, and derived keys \"head_dim\" (== qk_rope_head_dim, NOT the attention head dim) and "
        "\"qk_head_dim\". YaRN with mscale 0.707 / mscale_all_dim 1.0.",
    ]),
    fx("v3_mtp", 1010, {"num_nextn_predict_layers": 1}, notes=[
        "One MTP layer in DeepSeek-V3's layout at model.layers.3 (num_hidden_layers 3): enorm, hnorm, eh_proj "
        "[hidden, 2*hidden], a full MLA + MoE block, shared_head.norm and shared_head.head (a copy of lm_head; the "
        "embedding is the main one). mtp: transformers' MtpModel; at position i it sees the main model's last hidden "
        "state (after the final norm) and prompt_ids[i + 1] and predicts prompt_ids[i + 2]; checked against the "
        "float64 implementation.",
    ]),
    fx("v2_f32", 1009, {}, base=V2_BASE, notes=[
        "model_type deepseek_v2 (DeepseekV2ForCausalLM): softmax over all experts (f32), group_limited_greedy: group "
        "score = max softmax score in the group, keep topk_group groups (others masked to 0.0), top-k of the masked "
        "scores; weights = softmax scores (not renormalised) * routed_scaling_factor (16.0). No "
        "e_score_correction_bias. transformers' V2 IGNORES norm_topk_prob (the original DeepSeek V2 remote code "
        "would normalise instead of scaling when it is true); it is false here so both agree. V2 rope is always "
        "interleaved (complex pairs), there is no rope_interleave flag.",
    ]),
]

# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------


def is_v2(cfg):
    return cfg["model_type"] == "deepseek_v2"


def tensor_specs(cfg):
    """(name, shape, kind) in a fixed order, official HF DeepSeek names. kind: linear|embed|norm|bias."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    dq = dn + dr
    C = cfg["kv_lora_rank"]
    ql = cfg["q_lora_rank"]
    E = cfg["n_routed_experts"]
    I = cfg["intermediate_size"]
    Im = cfg["moe_intermediate_size"]
    Is = Im * cfg["n_shared_experts"]
    V = cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (V, H), "embed")]
    M = cfg["num_hidden_layers"]
    mtp_layers = list(range(M, M + (cfg.get("num_nextn_predict_layers") or 0)))
    for L in list(range(M)) + mtp_layers:
        p = f"model.layers.{L}."
        if L >= M:
            # The MTP layer (DeepSeek-V3's layout): its own norms and projection, then a full
            # MLA + MoE block, then its head (a copy of lm_head: random_weights ties them).
            out.append((p + "enorm.weight", (H,), "norm"))
            out.append((p + "hnorm.weight", (H,), "norm"))
            out.append((p + "eh_proj.weight", (H, 2 * H), "linear"))
        a = p + "self_attn."
        out.append((p + "input_layernorm.weight", (H,), "norm"))
        if ql is None:
            out.append((a + "q_proj.weight", (nh * dq, H), "linear"))
        else:
            out.append((a + "q_a_proj.weight", (ql, H), "linear"))
            out.append((a + "q_a_layernorm.weight", (ql,), "norm"))
            out.append((a + "q_b_proj.weight", (nh * dq, ql), "linear"))
        out.append((a + "kv_a_proj_with_mqa.weight", (C + dr, H), "linear"))
        out.append((a + "kv_a_layernorm.weight", (C,), "norm"))
        out.append((a + "kv_b_proj.weight", (nh * (dn + dv), C), "linear"))
        out.append((a + "o_proj.weight", (H, nh * dv), "linear"))
        out.append((p + "post_attention_layernorm.weight", (H,), "norm"))
        m = p + "mlp."
        if L < cfg["first_k_dense_replace"]:
            out.append((m + "gate_proj.weight", (I, H), "linear"))
            out.append((m + "up_proj.weight", (I, H), "linear"))
            out.append((m + "down_proj.weight", (H, I), "linear"))
        else:
            out.append((m + "gate.weight", (E, H), "router"))
            if not is_v2(cfg):
                out.append((m + "gate.e_score_correction_bias", (E,), "bias"))
            for e in range(E):
                out.append((m + f"experts.{e}.gate_proj.weight", (Im, H), "linear"))
                out.append((m + f"experts.{e}.up_proj.weight", (Im, H), "linear"))
                out.append((m + f"experts.{e}.down_proj.weight", (H, Im), "linear"))
            out.append((m + "shared_experts.gate_proj.weight", (Is, H), "linear"))
            out.append((m + "shared_experts.up_proj.weight", (Is, H), "linear"))
            out.append((m + "shared_experts.down_proj.weight", (H, Is), "linear"))
        if L >= M:
            out.append((p + "shared_head.norm.weight", (H,), "norm"))
            out.append((p + "shared_head.head.weight", (V, H), "head"))
    out.append(("model.norm.weight", (H,), "norm"))
    out.append(("lm_head.weight", (V, H), "head"))
    return out


def is_mtp_key(name, cfg):
    """Whether `name` belongs to an MTP layer (index >= num_hidden_layers)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= cfg["num_hidden_layers"]


def random_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape, kind in tensor_specs(cfg):
        if kind == "embed":
            t = torch.randn(shape, generator=g)
        elif kind in ("linear", "router", "head"):
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        elif kind == "norm":
            t = torch.rand(shape, generator=g) + 0.5
        elif kind == "bias":
            t = torch.randn(shape, generator=g) * 0.1
        else:
            raise ValueError(kind)
        w[name] = (t, kind)
    for name in w:
        if name.endswith("shared_head.head.weight"):
            w[name] = (w["lm_head.weight"][0].clone(), "head")  # DeepSeek-V3 shares the head
    return w


def quant_fp8(w):
    """Block-quantize a 2-D f32 tensor to float8_e4m3fn with 128x128 blocks. Returns (q, scale_inv)."""
    out_f, in_f = w.shape
    bo, bi = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    pad = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK, dtype=torch.float32)
    pad[:out_f, :in_f] = w
    blocks = pad.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = (amax / FP8_MAX).to(torch.float32)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(bo * FP8_BLOCK, bi * FP8_BLOCK)[:out_f, :in_f].contiguous()
    return q, scale.contiguous()


def dequant_fp8(q, scale_inv):
    out_f, in_f = q.shape
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out_f, :in_f]
    return q.to(torch.float32) * s


def is_quantized_linear(name, kind):
    return kind == "linear"  # attention, dense MLP, experts, shared experts (not gate/embed/head/norm)


def storage_tensors(weights, weight_dtype):
    """Returns (tensors to store, effective f32 tensors the reference must use)."""
    store, eff = {}, {}
    for name, (t, kind) in weights.items():
        if weight_dtype == "f32":
            store[name] = t.contiguous()
            eff[name] = t
        elif weight_dtype == "bf16" or (weight_dtype == "fp8" and not is_quantized_linear(name, kind)):
            if kind == "bias":
                store[name] = t.contiguous()
                eff[name] = t
            else:
                b = t.to(torch.bfloat16).contiguous()
                store[name] = b
                eff[name] = b.to(torch.float32)
        elif weight_dtype == "fp8":
            q, s = quant_fp8(t)
            store[name] = q
            store[name + "_scale_inv"] = s
            eff[name] = dequant_fp8(q, s)
        else:
            raise ValueError(weight_dtype)
    return store, eff


# --------------------------------------------------------------------------------------
# transformers side
# --------------------------------------------------------------------------------------


def model_class(cfg):
    if is_v2(cfg):
        return transformers.DeepseekV2ForCausalLM
    return transformers.DeepseekV3ForCausalLM


def load_hf(path, cfg):
    m = model_class(cfg).from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                         experts_implementation="eager")
    m.eval()
    return m


def fused_state_dict(eff, cfg):
    """Build the transformers-internal (fused experts) state dict by hand: gate_up = cat([gate, up])."""
    sd = {}
    E = cfg["n_routed_experts"]
    for L in range(cfg["num_hidden_layers"]):
        if L < cfg["first_k_dense_replace"]:
            continue
        p = f"model.layers.{L}.mlp.experts."
        sd[p + "gate_up_proj"] = torch.stack(
            [torch.cat([eff[p + f"{e}.gate_proj.weight"], eff[p + f"{e}.up_proj.weight"]], 0) for e in range(E)])
        sd[p + "down_proj"] = torch.stack([eff[p + f"{e}.down_proj.weight"] for e in range(E)])
    for k, v in eff.items():
        if ".mlp.experts." not in k and not is_mtp_key(k, cfg):
            sd[k] = v
    return sd


@torch.no_grad()
def run_case(model, ids, moe_layers, n_new=8):
    captured = {}
    hooks = []
    for L in moe_layers:
        def hook(mod, inp, out, L=L):
            captured[L] = (out[1].detach().clone(), out[2].detach().clone())
        hooks.append(model.model.layers[L].mlp.gate.register_forward_hook(hook))
    x = torch.tensor([ids])
    out = model(x, use_cache=True)
    for h in hooks:
        h.remove()
    logits = out.logits[0].float()
    router = []
    for L in moe_layers:
        w, idx = captured[L]
        order = torch.argsort(idx, dim=-1)
        router.append({"layer": L,
                       "experts": torch.gather(idx, 1, order).tolist(),
                       "weights": [[f32(v) for v in row] for row in torch.gather(w, 1, order).tolist()]})
    # greedy through the KV cache
    past = out.past_key_values
    nxt = int(logits[-1].argmax())
    greedy = [nxt]
    for _ in range(n_new - 1):
        o = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
        greedy.append(nxt)
    # cross-check: full recomputation without cache
    seq = list(ids)
    greedy_nocache = []
    for _ in range(n_new):
        o = model(torch.tensor([seq]), use_cache=False)
        t = int(o.logits[0, -1].argmax())
        greedy_nocache.append(t)
        seq.append(t)
    # explicit attention_mask: the BOS id 0 must not be mistaken for padding
    gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, use_cache=True, eos_token_id=None,
                         pad_token_id=cfg_pad(model))[0, len(ids):].tolist()
    return logits, router, greedy, greedy_nocache, gen, captured


def cfg_pad(model):
    return model.config.vocab_size - 1


def f32(v):
    """The shortest decimal that reads back as the same float32 (v is a float32 value)."""
    x = struct.unpack("<f", struct.pack("<f", v))[0]
    for p in range(6, 10):
        r = float("%.*g" % (p, x))
        if struct.unpack("<f", struct.pack("<f", r))[0] == x:
            return r
    return float("%.9g" % x)


# --------------------------------------------------------------------------------------
# independent float64 implementation of tools/REFERENCE_NOTES.md
# --------------------------------------------------------------------------------------


def rope_params(cfg):
    """Returns (inv_freq[dr/2] float64, attention_factor, softmax_scale), from the config dict."""
    dr = cfg["qk_rope_head_dim"]
    dq = cfg["qk_nope_head_dim"] + dr
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    i2 = torch.arange(0, dr, 2, dtype=torch.float64)
    base_inv = 1.0 / theta ** (i2 / dr)
    scale = dq ** -0.5
    if rtype == "default":
        return base_inv, 1.0, scale
    assert rtype == "yarn"
    factor = rp["factor"]
    omax = rp["original_max_position_embeddings"]

    def gm(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
    af = rp.get("attention_factor")
    if af is None:
        af = gm(factor, ms) / gm(factor, msa) if (ms and msa) else gm(factor)
    bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def cd(nr):
        return dr * math.log(omax / (nr * 2 * math.pi)) / (2 * math.log(theta))

    low, high = cd(bf), cd(bs)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dr - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dr // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv = (base_inv / factor) * ramp + base_inv * (1 - ramp)
    if msa:
        scale = scale * gm(factor, msa) ** 2
    return inv, af, scale


def ind_forward(cfg, eff, ids, mtp=False):
    """(logits, routes), and with mtp=True the MTP layer's logits at positions 0..T-2 (it sees
    the final-normed hidden state at i and ids[i + 1])."""
    W = {k: v.to(torch.float64) for k, v in eff.items()}
    v2 = is_v2(cfg)
    T = len(ids)
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    C = cfg["kv_lora_rank"]
    eps = cfg["rms_norm_eps"]
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    interleave = True if v2 else cfg.get("rope_interleave", True)
    inv, af, scale = rope_params(cfg)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos() * af, ang.sin() * af  # [T, dr/2]

    def rms(x, w, e):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e))

    def lin(x, name):
        return x @ W[name].T

    def rope(x):  # x [..., T, dr]
        if interleave:
            a, b = x[..., 0::2], x[..., 1::2]
            y = torch.empty_like(x)
            y[..., 0::2] = a * cos - b * sin
            y[..., 1::2] = b * cos + a * sin
            return y
        a, b = x[..., : dr // 2], x[..., dr // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def mlp(x, p):
        return lin(torch.nn.functional.silu(lin(x, p + "gate_proj.weight")) * lin(x, p + "up_proj.weight"),
                   p + "down_proj.weight")

    mask_all = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    routes = {}
    cos_all, sin_all = cos, sin

    def block(x, L):
        nonlocal cos, sin
        T = x.shape[0]
        cos, sin, mask = cos_all[:T], sin_all[:T], mask_all[:T, :T]
        p = f"model.layers.{L}."
        a = p + "self_attn."
        h = rms(x, W[p + "input_layernorm.weight"], eps)
        if cfg["q_lora_rank"] is None:
            q = lin(h, a + "q_proj.weight")
        else:
            q = lin(rms(lin(h, a + "q_a_proj.weight"), W[a + "q_a_layernorm.weight"], 1e-6), a + "q_b_proj.weight")
        q = q.view(T, nh, dn + dr).transpose(0, 1)  # [nh, T, dq]
        ckv = lin(h, a + "kv_a_proj_with_mqa.weight")
        lat = rms(ckv[:, :C], W[a + "kv_a_layernorm.weight"], 1e-6)
        krot = rope(ckv[:, C:])  # [T, dr]
        qrot = rope(q[..., dn:])
        kv = lin(lat, a + "kv_b_proj.weight").view(T, nh, dn + dv).transpose(0, 1)
        knope, val = kv[..., :dn], kv[..., dn:]
        s = (q[..., :dn] @ knope.transpose(1, 2) + qrot @ krot.T[None]) * scale + mask
        o = torch.softmax(s, -1) @ val  # [nh, T, dv]
        x = x + lin(o.transpose(0, 1).reshape(T, nh * dv), a + "o_proj.weight")
        h = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if L < cfg["first_k_dense_replace"]:
            return x + mlp(h, m)
        logits = lin(h, m + "gate.weight")
        G, TG = cfg["n_group"] or 1, cfg["topk_group"] or 1
        if not v2:
            sc = torch.sigmoid(logits)
            sfc = sc + W[m + "gate.e_score_correction_bias"]
            gs = sfc.view(T, G, E // G).topk(2, -1).values.sum(-1)
            gsel = gs.topk(TG, -1).indices
            gm_ = torch.zeros(T, G, dtype=torch.bool).scatter_(1, gsel, True)
            sfc = sfc.masked_fill(~gm_.repeat_interleave(E // G, 1), float("-inf"))
            idx = sfc.topk(K, -1).indices
            w = sc.gather(1, idx)
            if cfg["norm_topk_prob"]:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            w = w * cfg["routed_scaling_factor"]
        else:
            sc = torch.softmax(logits, -1)
            if cfg["topk_method"] == "group_limited_greedy":
                gs = sc.view(T, G, E // G).max(-1).values
                gsel = gs.topk(TG, -1).indices
                gm_ = torch.zeros(T, G, dtype=torch.bool).scatter_(1, gsel, True)
                sc = sc.masked_fill(~gm_.repeat_interleave(E // G, 1), 0.0)
            w, idx = sc.topk(K, -1)
            w = w * cfg["routed_scaling_factor"]
        routes[L] = (idx, w)
        y = mlp(h, m + "shared_experts.")
        for t in range(T):
            for k in range(K):
                y[t] = y[t] + w[t, k] * mlp(h[t:t + 1], m + f"experts.{int(idx[t, k])}.")[0]
        return x + y

    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    for L in range(cfg["num_hidden_layers"]):
        x = block(x, L)
    x = rms(x, W["model.norm.weight"], eps)
    if not mtp:
        return lin(x, "lm_head.weight"), routes
    M = cfg["num_hidden_layers"]
    p = f"model.layers.{M}."
    e = W["model.embed_tokens.weight"][torch.tensor(ids[1:])]
    u = lin(torch.cat([rms(e, W[p + "enorm.weight"], eps), rms(x[: T - 1], W[p + "hnorm.weight"], eps)], -1),
            p + "eh_proj.weight")
    u = rms(block(u, M), W[p + "shared_head.norm.weight"], eps)
    return lin(x, "lm_head.weight"), routes, lin(u, p + "shared_head.head.weight")


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def write_json(path, obj, indent=2):
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, separators=None if indent is not None else (",", ":"))
        f.write("\n")


def official_config(cfg):
    c = dict(cfg)
    c["transformers_version"] = transformers.__version__
    return c


def build_fixture(spec, out_root):
    name = spec["name"]
    cfg = spec["config"]
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    weights = random_weights(cfg, spec["seed"])
    store, eff = storage_tensors(weights, spec["weight_dtype"])
    notes = list(spec["notes"])
    tmp = tempfile.mkdtemp(prefix="genref_")
    try:
        # f32 copy of the effective weights (what the reference computes with)
        ref_cfg = official_config(cfg)
        ref_cfg.pop("quantization_config", None)
        ref_cfg["torch_dtype"] = "float32"
        write_json(os.path.join(tmp, "config.json"), ref_cfg)
        save_file({k: v.contiguous() for k, v in eff.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})

        if spec["layout"] == "tf5":
            # let transformers write config + shards itself
            hf_cfg_cls = transformers.DeepseekV2Config if is_v2(cfg) else transformers.DeepseekV3Config
            c = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                         "rope_scaling", "rope_theta")}
            rp = dict(cfg["rope_scaling"] or {"rope_type": "default"})
            rp["rope_theta"] = cfg["rope_theta"]
            c["rope_parameters"] = rp
            hcfg = hf_cfg_cls(**c)
            hcfg.architectures = cfg["architectures"]
            m = model_class(cfg)(hcfg)
            missing = m.load_state_dict(fused_state_dict(eff, cfg), strict=False)
            assert not missing.missing_keys and not missing.unexpected_keys, missing
            total = sum(v.numel() * v.element_size() for v in eff.values())
            m.save_pretrained(d, max_shard_size=total // spec["shards"] + 1024)
            for extra in ("generation_config.json",):
                if os.path.exists(os.path.join(d, extra)):
                    os.remove(os.path.join(d, extra))
            load_dir = d
            with open(os.path.join(d, "config.json")) as f:
                written_cfg = json.load(f)
            idx_path = os.path.join(d, "model.safetensors.index.json")
            assert os.path.exists(idx_path), "expected a sharded checkpoint"
            # compare the stored tensors with ours
            with open(idx_path) as f:
                wm = json.load(f)["weight_map"]
            assert set(wm) == set(store), set(wm) ^ set(store)
            for shard in sorted(set(wm.values())):
                for k, v in load_file(os.path.join(d, shard)).items():
                    assert torch.equal(v, store[k]), k
            cfg_for_ind = written_cfg
        else:
            write_json(os.path.join(d, "config.json"), official_config(cfg))
            save_file(store, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
            load_dir = tmp if spec["weight_dtype"] == "fp8" else d
            cfg_for_ind = cfg

        model = load_hf(load_dir, cfg)
        # (a) the loaded model really holds our weights, fused as cat([gate, up])
        fsd = fused_state_dict(eff, cfg)
        msd = model.state_dict()
        for k, v in fsd.items():
            assert torch.equal(msd[k], v), f"weight mismatch after load: {k}"
        fresh = model_class(cfg)(model.config)
        fresh.load_state_dict(fsd, strict=False)
        fresh.eval()

        moe_layers = list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
        g = torch.Generator().manual_seed(spec["seed"] + 7)
        cases = []
        argmax_sets = set()
        for n in spec["prompt_lens"]:
            ids = [0] + torch.randint(2, cfg["vocab_size"], (n - 1,), generator=g).tolist()
            # MTP fixtures: a longer continuation, for the speculative draft/accept counts.
            n_new = 32 if cfg.get("num_nextn_predict_layers") else 8
            logits, router, greedy, greedy_nc, gen, captured = run_case(model, ids, moe_layers, n_new)
            with torch.no_grad():
                lf = fresh(torch.tensor([ids])).logits[0]
            assert torch.equal(lf, logits), "fresh hand-fused model differs from from_pretrained model"
            if greedy != greedy_nc:
                notes.append(f"prompt len {n}: greedy via cache {greedy} != via recomputation {greedy_nc}")
            if greedy != gen:
                notes.append(f"prompt len {n}: explicit cache loop {greedy} != model.generate {gen}")
            # (c) independent float64 implementation
            ref_logits, ref_routes = ind_forward(cfg_for_ind, eff, ids)
            err = (ref_logits.float() - logits).abs().max().item()
            spread = logits.std().item()
            assert err < 1e-3 * max(1.0, spread), f"{name}: independent impl max err {err}"
            for L in moe_layers:
                hw, hidx = captured[L]
                ri, rw = ref_routes[L]
                same = torch.equal(hidx.sort(-1).values, ri.sort(-1).values)
                assert same, f"{name}: routing mismatch layer {L}"
                ws = torch.gather(hw, 1, hidx.argsort(-1)) - torch.gather(rw, 1, ri.argsort(-1)).float()
                assert ws.abs().max() < 1e-4, f"{name}: routing weight mismatch layer {L}"
            am = logits.argmax(-1).tolist()
            argmax_sets.update(am)
            assert spread > 0.1, f"{name}: logits not spread ({spread})"
            print(f"  {name} len={n}: logits std {spread:.3f} max|hf-f64| {err:.2e} greedy {greedy}")
            case = {
                "prompt_ids": ids,
                "last_logits": [f32(v) for v in logits[-1].tolist()],
                "argmax": am,
                "greedy": greedy,
                "router": router,
            }
            if cfg.get("num_nextn_predict_layers"):
                case["mtp"] = mtp_case(model, cfg_for_ind, eff, ids, name, greedy)
            cases.append(case)
        assert len(argmax_sets) > 3, f"{name}: argmax not varied"
        expected = {
            "name": name,
            "weight_dtype": spec["weight_dtype"],
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "notes": notes,
            "cases": cases,
        }
        write_json(os.path.join(d, "expected.json"), expected, indent=None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "model", "default-model")
DEFAULT_MODEL_PROMPTS = [
    "def fibonacci(n):",
    "The Python standard library contains built-in modules",
    "<｜User｜>How do I read a file line by line?<｜Assistant｜>",
]


@torch.no_grad()
def mtp_reference(model, ids):
    """transformers' MtpModel over a prompt: at position i it sees the main model's last hidden
    state h_i and token ids[i + 1], and gives the logits of ids[i + 2]."""
    from transformers.modeling_layers import MtpModel
    L = model.config.num_hidden_layers
    # DeepseekV3ForCausalLM names the official checkpoint's MTP layer (61) only; ours is at L.
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    mtp = MtpModel.from_pretrained(model)
    mtp.eval()
    x = torch.tensor([ids])
    n = len(ids)
    h = model.model(input_ids=x, output_hidden_states=True).hidden_states[-1][:, : n - 1]
    pos = torch.arange(n - 1)[None]
    hidden = mtp.forward_layer(0, h, pos, None, input_ids=x[:, 1:])
    return mtp._project_to_logits(hidden)[0].float()


def mtp_case(model, cfg, eff, ids, what, greedy):
    """transformers' MtpModel logits over `ids`, checked against the float64 implementation:
    the argmax at every position and the logits at three; and the argmax at every position of
    `ids + greedy` (teacher-forced over the greedy continuation: what speculative decoding's
    draft/accept counts follow)."""
    mtp_logits = mtp_reference(model, ids)
    ref = ind_forward(cfg, eff, ids, mtp=True)[2].float()
    err = (ref - mtp_logits).abs().max().item()
    assert err < 1e-3 * max(1.0, mtp_logits.std().item()), f"{what}: MTP max|MtpModel-f64| {err}"
    assert torch.equal(mtp_logits.argmax(-1), ref.argmax(-1)), f"{what}: MTP argmax differs from f64"
    positions = sorted({0, (len(ids) - 2) // 2, len(ids) - 2})
    print(f"  {what} len={len(ids)}: MTP max|MtpModel-f64| {err:.2e}")
    return {"argmax": mtp_logits.argmax(-1).tolist(),
            "logits": [{"position": i, "values": [f32(v) for v in mtp_logits[i].tolist()]} for i in positions],
            "argmax_over_greedy": mtp_reference(model, ids + greedy).argmax(-1).tolist()}


def build_default_model_fixture(out_root):
    """The trained default model (model/default-model) against transformers: logits, argmax,
    router choices and greedy tokens of the main stack, and the MTP layer's logits from
    transformers' MtpModel, cross-checked with the training script's MTP module."""
    from tokenizers import Tokenizer
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_default_model as train
    d = os.path.join(out_root, "default_model")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(DEFAULT_MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    model = load_hf(DEFAULT_MODEL_DIR, cfg)
    sd = load_file(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"))
    eff = {k: v.to(torch.float32) for k, v in sd.items()}
    _, own_mtp, _ = train.load_exported(DEFAULT_MODEL_DIR)
    tok = Tokenizer.from_file(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"))
    moe_layers = list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
    notes = ["The checkpoint is model/default-model (bf16 weights, f32 correction biases); the reference "
             "computes in f32 from the same bf16 values.",
             "mtp: transformers' MtpModel (MtpModel.from_pretrained on the main model); at position i it sees the "
             "main model's last hidden state (after the final norm) and prompt_ids[i + 1] and predicts "
             "prompt_ids[i + 2]. `argmax` covers every position, `logits` the listed ones."]
    cases = []
    for text in DEFAULT_MODEL_PROMPTS:
        ids = [train.BOS] + tok.encode(text, add_special_tokens=False).ids
        logits, router, greedy, greedy_nc, gen, captured = run_case(model, ids, moe_layers, 32)
        assert greedy == greedy_nc == gen, (greedy, greedy_nc, gen)
        ref_logits, ref_routes = ind_forward(cfg, eff, ids)
        err = (ref_logits.float() - logits).abs().max().item()
        assert err < 1e-3 * max(1.0, logits.std().item()), f"independent impl max err {err}"
        for L in moe_layers:
            hw, hidx = captured[L]
            assert torch.equal(hidx.sort(-1).values, ref_routes[L][0].sort(-1).values), f"routing layer {L}"
        mtp = mtp_case(model, cfg, eff, ids, "default_model", greedy)
        mtp_logits = mtp_reference(model, ids)
        with torch.no_grad():
            x = torch.tensor([ids + [0]])  # forward() wants T + 2 ids; the last is never read
            _, own = train.forward(model, own_mtp, x)
        own_err = (own[0, : len(ids) - 1] - mtp_logits).abs().max().item()
        assert own_err < 1e-4, f"the training script's MTP module differs from MtpModel by {own_err}"
        print(f"  default_model {text!r}: {len(ids)} ids, max|hf-f64| {err:.2e}, mtp max|train-MtpModel| "
              f"{own_err:.2e}, greedy {tok.decode(greedy)!r}")
        cases.append({
            "text": text,
            "prompt_ids": ids,
            "last_logits": [f32(v) for v in logits[-1].tolist()],
            "argmax": logits.argmax(-1).tolist(),
            "greedy": greedy,
            "router": router,
            "mtp": mtp,
        })
    write_json(os.path.join(d, "expected.json"), {
        "name": "default_model",
        "weight_dtype": "bf16",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "notes": notes,
        "cases": cases,
    }, indent=None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    if not args.only or "default_model" in args.only:
        print("== default_model")
        build_default_model_fixture(args.out)
    for spec in FIXTURES:
        if args.only and spec["name"] not in args.only:
            continue
        if is_v2(spec["config"]) and not hasattr(transformers, "DeepseekV2ForCausalLM"):
            print(f"skip {spec['name']}: transformers has no DeepseekV2ForCausalLM")
            continue
        print(f"== {spec['name']}")
        build_fixture(spec, args.out)


if __name__ == "__main__":
    sys.exit(main())
