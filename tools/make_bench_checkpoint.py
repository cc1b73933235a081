#!/usr/bin/env python3
"""Write a random DeepSeek-V2-Lite-shaped benchmark checkpoint (4 layers) in the official
HuggingFace DeepSeek layout (model_type deepseek_v3, one tensor per expert), sharded
into ~2 GB safetensors files with model.safetensors.index.json.

Usage: python3 tools/make_bench_checkpoint.py OUT_DIR [--dtype bf16|f32] [--seed N]
                                              [--layers 4] [--shard-gb 2.0] [--mtp]

Shape: hidden 2048, vocab 102400, 16 heads, qk_nope 128, qk_rope 64, v_head 128,
kv_lora_rank 512, no q LoRA, first_k_dense_replace 1 (layer 0 dense, intermediate 10944),
64 routed experts top-6, 2 shared experts, moe_intermediate 1408, n_group 1, topk_group 1,
norm_topk_prob false, routed_scaling_factor 1.0. About 2.27 G parameters
(4.5 GB bf16, 9.1 GB f32). `--mtp` adds one MTP layer in DeepSeek-V3's layout at
model.layers.{layers} (num_nextn_predict_layers 1: its norms and eh_proj, an MLA + MoE block,
shared_head; +0.8 G parameters), for the speculative decoding benchmark.

Tensors are generated one at a time and written shard by shard (no transformers model
is instantiated), so peak RAM is about one shard plus the largest tensor in f32 (~3.5 GB).
Init as in tools/gen_reference.py: Linear ~ N(0, fan_in^-0.5), embeddings N(0, 1),
RMSNorm weights U[0.5, 1.5], e_score_correction_bias N(0, 0.1).
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import tensor_specs  # noqa: E402

DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "f32": (torch.float32, "float32")}


def bench_config(layers, torch_dtype, mtp=False):
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 6,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "scoring_func": "sigmoid",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "ep_size": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        # as in DeepSeek-V2-Lite's config.json
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "torch_dtype": torch_dtype,
    }


def gen_tensor(shape, kind, g):
    if kind == "embed":
        return torch.randn(shape, generator=g)
    if kind in ("linear", "router", "head"):
        return torch.randn(shape, generator=g).mul_(shape[1] ** -0.5)
    if kind == "norm":
        return torch.rand(shape, generator=g).add_(0.5)
    if kind == "bias":
        return torch.randn(shape, generator=g).mul_(0.1)
    raise ValueError(kind)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--mtp", action="store_true", help="add one MTP layer (num_nextn_predict_layers 1)")
    args = ap.parse_args()

    dtype, dtype_name = DTYPES[args.dtype]
    cfg = bench_config(args.layers, dtype_name, args.mtp)
    specs = tensor_specs(cfg)
    esize = torch.empty((), dtype=dtype).element_size()

    def nbytes(shape, kind):
        n = 1
        for s in shape:
            n *= s
        return n * (4 if kind == "bias" else esize)  # e_score_correction_bias stays f32

    # plan shards up front so the file names (…-of-N) are known
    limit = int(args.shard_gb * 1e9)
    shards, cur, cur_bytes = [], [], 0
    for name, shape, kind in specs:
        b = nbytes(shape, kind)
        if cur and cur_bytes + b > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, kind))
        cur_bytes += b
    if cur:
        shards.append(cur)

    os.makedirs(args.out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    weight_map, total = {}, 0
    t0 = time.time()
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            t = gen_tensor(shape, kind, g)
            if kind != "bias":
                t = t.to(dtype)
            tensors[name] = t.contiguous()
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(args.out_dir, fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname} ({len(shard)} tensors) t={time.time() - t0:.1f}s", flush=True)

    with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    nparams = sum(int(torch.Size(s).numel()) for _, s, _ in specs)
    print(json.dumps({"out_dir": args.out_dir, "dtype": args.dtype, "params": nparams, "bytes": total,
                      "shards": n, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
