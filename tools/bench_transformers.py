#!/usr/bin/env python3
"""CPU baseline: prefill and greedy-decode throughput of HF transformers on a checkpoint.

Usage: python3 tools/bench_transformers.py CKPT_DIR [--dtype bf16|f32] [--prompt-len 128]
           [--decode-steps 32] [--batch 1] [--threads 2] [--seed 0] [--repeats 1]
           [--attn-impl sdpa|eager] [--experts-impl eager|grouped_mm|batched_mm]

Loads CKPT_DIR (e.g. from tools/make_bench_checkpoint.py) on CPU with torch threads = --threads,
runs one untimed warm-up (prefill + 2 decode steps), then --repeats times (best reported)
  * prefill: one forward over [batch, prompt_len] random token ids, building the KV cache,
  * decode:  --decode-steps greedy steps of one token per sequence through the KV cache,
and prints one JSON object on stdout (progress goes to stderr):
  prefill_tok_s = batch*prompt_len / prefill_s,  decode_tok_s = batch*decode_steps / decode_s.
Attention defaults to transformers' default (sdpa). Experts default to "eager" (per-expert loop
over the routed tokens): transformers' own default "grouped_mm" gave ~5x slower prefill on a
2-core AVX-512 CPU (28 vs 150 tok/s at 128 tokens, bf16) with similar decode speed, so eager
is the stronger CPU baseline. Pass --experts-impl grouped_mm to measure the default.
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@torch.inference_mode()
def prefill_and_decode(model, ids, steps):
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    past = out.past_key_values
    toks = [nxt]
    for _ in range(steps):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs; the best is reported (use 3+ on a busy machine)")
    ap.add_argument("--attn-impl", default=None)
    ap.add_argument("--experts-impl", default="eager")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass

    kw = {}
    if args.attn_impl:
        kw["attn_implementation"] = args.attn_impl
    if args.experts_impl:
        kw["experts_implementation"] = args.experts_impl
    t0 = time.perf_counter()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=DTYPES[args.dtype],
                                                                    output_loading_info=True, **kw)
    bad = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        sys.exit(f"checkpoint does not match the model: {bad}")
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded in {load_s:.1f}s: {type(model).__name__}, attn={model.config._attn_implementation}, "
        f"experts={getattr(model.config, '_experts_implementation', None)}")

    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    warm = torch.randint(0, vocab, (args.batch, min(16, args.prompt_len)), generator=g)

    log("warm-up ...")
    prefill_and_decode(model, warm, 2)
    runs = []
    for r in range(args.repeats):
        log(f"timed run {r + 1}/{args.repeats} ...")
        runs.append(prefill_and_decode(model, ids, args.decode_steps))
    # best of the repeats (least disturbed by other load on the machine)
    prefill_s = min(r[0] for r in runs)
    decode_s = min(r[1] for r in runs)
    toks = runs[0][2]

    res = {
        "engine": "transformers",
        "ckpt": os.path.abspath(args.ckpt),
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_s": round(args.batch * args.prompt_len / prefill_s, 3),
        "decode_s": round(decode_s, 4),
        "decode_tok_s": round(args.batch * args.decode_steps / decode_s, 3),
        "decode_ms_per_step": round(1000 * decode_s / max(1, args.decode_steps), 2),
        "repeats": args.repeats,
        "prefill_s_all": [round(r[0], 4) for r in runs],
        "decode_s_all": [round(r[1], 4) for r in runs],
        "loadavg_1m": os.getloadavg()[0],
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "first_tokens": toks[0, :8].tolist(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
