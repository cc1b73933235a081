#!/usr/bin/env python3
"""Train ExpertMesh's embedded default model: a small DeepSeek-V3 with one MTP layer.

Usage:
    python3 tools/train_default_model.py [--work DIR] [--steps N] [--out DIR]
    python3 tools/train_default_model.py --measure 20      # time 20 steps, print the arithmetic
    python3 tools/train_default_model.py --steps 1300 --stop-after 600   # train in parts:
    python3 tools/train_default_model.py --steps 1300                    #   the rerun resumes
    python3 tools/train_default_model.py --report-only     # re-evaluate a finished run

Stages (each cached in --work, so an interrupted run resumes where it stopped):
  1. corpus: `apt-get download` python3.11-doc, libpython3.11-stdlib and libpython3.11-minimal
     from Debian (PSF licence), unpacked with dpkg-deb; documents are the standard library's
     .py files and the documentation's reStructuredText sources. A fixed set of whole files
     (sha256 of the path, 1 in HOLDOUT_MOD) is held out for validation.
  2. tokenizer: byte-level BPE (HF tokenizers, DeepSeek-V3's pre-tokenizer, VOCAB tokens with
     DeepSeek's special tokens first) trained on the training files only.
  3. training: transformers' DeepseekV3ForCausalLM for the main stack plus an MTP module built
     from transformers' own decoder layer and norms (MtpLayer's math: eh_proj(cat(enorm(emb),
     hnorm(h))) -> decoder block -> post norm -> the shared lm_head). Loss = next token +
     0.3 * MTP (depth 1) + a tiny sequence-wise balance loss; DeepSeek-V3's auxiliary-loss-free
     balancing moves every expert's e_score_correction_bias by GAMMA toward balance after each
     step. AdamW, warm-up then cosine decay; fixed seeds; the state is saved every SAVE_EVERY
     steps and training resumes from it.
  4. export: the official checkpoint layout (bf16 weights, f32 correction biases, one tensor
     per expert, the MTP layer as model.layers.{num_hidden_layers}.*), tokenizer.json and
     tokenizer_config.json (DeepSeek-V3's chat template), into --out.
  5. report: held-out loss, MTP top-1 accuracy on held-out code and prose, per-expert load on
     code and prose, bits per byte against gzip -9 on Python code from outside the corpus (the
     `six` and `idna` packages from PyPI), and the loss-curve plot.
"""
import argparse
import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORK = os.path.join(REPO_ROOT, "target", "default-model-train")
DEFAULT_OUT = os.path.join(REPO_ROOT, "model", "default-model")
DOCS = os.path.join(REPO_ROOT, "docs", "default_model")

DEBS = ["python3.11-doc", "libpython3.11-stdlib", "libpython3.11-minimal"]
HOLDOUT_MOD = 40
SEED = 20261207
VOCAB = 6144
SEQ = 256
BATCH = 16
LR = 3e-3
WARMUP = 100
GAMMA = 1e-3  # bias update speed of the auxiliary-loss-free balancing
SEQ_BALANCE_ALPHA = 1e-4  # DeepSeek-V3's "extremely small" sequence-wise balance factor
MTP_WEIGHT = 0.3
SAVE_EVERY = 100
EVAL_EVERY = 250
OUTSIDE_CODE = ["six==1.16.0", "requests==2.32.3"]

SPECIALS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<think>", "</think>",
]
BOS, EOS, PAD = 0, 1, 2

# DeepSeek-V3's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = "
    "message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in "
    "messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    "message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none "
    "%}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + "
    "'```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + "
    "'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if "
    "message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = "
    "false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set "
    "content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set "
    "ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' "
    "+ message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif "
    "%}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt "
    "and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "routed_scaling_factor": 2.5,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "topk_method": "noaux_tc",
    "n_group": 4,
    "topk_group": 2,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "aux_loss_alpha": SEQ_BALANCE_ALPHA,
    "seq_aux": True,
    "ep_size": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}


def log(msg, logf=None):
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    if logf is not None:
        with open(logf, "a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------------------
# 1. corpus
# --------------------------------------------------------------------------------------


def fetch_corpus(work):
    """Downloads and unpacks the Debian packages; returns {relative path: text}."""
    root = os.path.join(work, "debs")
    done = os.path.join(root, ".unpacked")
    if not os.path.exists(done):
        os.makedirs(root, exist_ok=True)
        subprocess.run(["apt-get", "download"] + DEBS, cwd=root, check=True)
        for deb in sorted(glob.glob(os.path.join(root, "*.deb"))):
            subprocess.run(["dpkg-deb", "-x", deb, os.path.join(root, "tree")], check=True)
        open(done, "w").close()
    tree = os.path.join(root, "tree")
    files = {}
    patterns = ["usr/lib/python3.11/**/*.py", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"]
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(tree, pattern), recursive=True)):
            rel = os.path.relpath(path, tree)
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                files[rel] = text
    return files


def versions(work):
    root = os.path.join(work, "debs")
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.deb")))


def is_code(rel):
    return rel.endswith(".py")


def held_out(rel):
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HOLDOUT_MOD == 0


# --------------------------------------------------------------------------------------
# 2. tokenizer
# --------------------------------------------------------------------------------------


def deepseek_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(
            r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
            behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(work, train_texts):
    path = os.path.join(work, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(path)
    from tokenizers import Tokenizer, decoders, models, trainers, pre_tokenizers
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = deepseek_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(train_texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, s
    tok.save(path)
    return tok


def tokenizer_config():
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": SPECIALS[BOS],
        "eos_token": SPECIALS[EOS],
        "pad_token": SPECIALS[PAD],
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------
# 3. data
# --------------------------------------------------------------------------------------


def encode_docs(tok, texts):
    import numpy as np
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(BOS)
        out.extend(enc.ids)
        out.append(EOS)
    return np.array(out, dtype=np.int16)


def build_data(work, files, tok):
    import numpy as np
    path = os.path.join(work, "data.npz")
    if os.path.exists(path):
        d = np.load(path)
        return {k: d[k] for k in d.files}
    train = [files[r] for r in sorted(files) if not held_out(r)]
    val_code = [files[r] for r in sorted(files) if held_out(r) and is_code(r)]
    val_prose = [files[r] for r in sorted(files) if held_out(r) and not is_code(r)]
    data = {"train": encode_docs(tok, train), "val_code": encode_docs(tok, val_code),
            "val_prose": encode_docs(tok, val_prose)}
    np.savez(path, **data)
    return data


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


def hf_config():
    import transformers
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CONFIG, f)
        return transformers.AutoConfig.from_pretrained(d)


class Mtp:
    """The MTP module: transformers' MtpLayer math, the main model's embedding and head."""

    @staticmethod
    def build(config):
        import copy
        import torch.nn as nn
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
        cfg = copy.deepcopy(config)
        cfg.first_k_dense_replace = 0  # as get_mtp_config: the MTP block is a MoE block
        cfg.num_hidden_layers = 1
        mod = nn.Module()
        mod.enorm = m.DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        mod.hnorm = m.DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        mod.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        mod.mtp_block = m.DeepseekV3DecoderLayer(cfg, 0)
        mod.post_norm = m.DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        return mod


def init_weights(model, mtp, config):
    """transformers' own initialisation for both (normal(0, initializer_range), unit norms)."""
    import torch
    model.apply(model._init_weights)
    mtp.apply(model._init_weights)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for mod in list(model.modules()) + list(mtp.modules()):
            if type(mod).__name__ == "DeepseekV3Experts":
                mod.gate_up_proj.normal_(0.0, config.initializer_range, generator=g)
                mod.down_proj.normal_(0.0, config.initializer_range, generator=g)
            if type(mod).__name__ == "DeepseekV3TopkRouter":
                mod.weight.normal_(0.0, config.initializer_range, generator=g)
                mod.e_score_correction_bias.zero_()


def routers(model, mtp):
    """[(name, router module)] for every MoE layer, the MTP layer's last."""
    out = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            out.append((f"layer{i}", layer.mlp.gate))
    out.append(("mtp", mtp.mtp_block.mlp.gate))
    return out


class RouterTap:
    """Collects every router's logits and choices during a forward pass."""

    def __init__(self, gates):
        self.records = {}
        self.hooks = [g.register_forward_hook(self._hook(name)) for name, g in gates]

    def _hook(self, name):
        def hook(mod, inp, out):
            self.records[name] = (out[0], out[2])
        return hook

    def clear(self):
        self.records = {}

    def remove(self):
        for h in self.hooks:
            h.remove()


def forward(model, mtp, ids, main_only=False):
    """ids: [B, T + 2]. Returns (main logits [B, T, V], mtp logits [B, T, V] or None).

    The main model sees x_0..x_{T-1}; at position i the MTP layer sees its last hidden state
    h_i (hidden_states[-1], what transformers' MTP candidate generator feeds) and the
    embedding of x_{i+1}, and predicts x_{i+2}."""
    import torch
    T = ids.shape[1] - 2
    x = ids[:, :T]
    out = model.model(input_ids=x, output_hidden_states=True, use_cache=False)
    h = out.hidden_states[-1]
    logits = model.lm_head(h)
    if main_only:
        return logits, None
    e = model.model.embed_tokens(ids[:, 1:T + 1])
    u = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(h)], dim=-1))
    pos = torch.arange(T).unsqueeze(0).expand(ids.shape[0], -1)
    pe = model.model.rotary_emb(u, position_ids=pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    u = mtp.mtp_block(u, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    if isinstance(u, tuple):
        u = u[0]
    return logits, model.lm_head(mtp.post_norm(u))


def seq_balance_loss(records, config, batch, T):
    """DeepSeek-V3's sequence-wise balance loss, summed over MoE layers."""
    import torch
    E, K = config.n_routed_experts, config.num_experts_per_tok
    total = 0.0
    for logits, idx in records.values():
        s = logits.sigmoid().view(batch, T, E)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
        counts = torch.zeros(batch, E).scatter_add_(1, idx.view(batch, T * K), torch.ones(batch, T * K))
        f = counts * E / (K * T)
        total = total + (f * p).sum(-1).mean()
    return total


def sample_batch(data, step, batch, T):
    import numpy as np
    import torch
    rng = np.random.default_rng([SEED, step])
    starts = rng.integers(0, len(data) - (T + 2), size=batch)
    return torch.from_numpy(np.stack([data[s:s + T + 2] for s in starts]).astype(np.int64))


def lr_at(step, total):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = (step - WARMUP) / max(1, total - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def evaluate(model, mtp, data, tap, config, n_batches=8, T=SEQ):
    """Mean main loss, MTP loss and MTP top-1 accuracy over fixed windows of data, and the
    per-expert load of every router."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    model.eval()
    mtp.eval()
    n = len(data) - (T + 2)
    starts = np.linspace(0, n - 1, n_batches * 4).astype(np.int64)
    loss = mloss = acc = 0.0
    count = 0
    loads = {}
    with torch.no_grad():
        for b in range(n_batches):
            ids = torch.from_numpy(np.stack([data[s:s + T + 2] for s in starts[b * 4:(b + 1) * 4]]).astype(np.int64))
            tap.clear()
            logits, ml = forward(model, mtp, ids)
            V = logits.shape[-1]
            loss += F.cross_entropy(logits.reshape(-1, V), ids[:, 1:T + 1].reshape(-1)).item()
            mloss += F.cross_entropy(ml.reshape(-1, V), ids[:, 2:].reshape(-1)).item()
            acc += (ml.argmax(-1) == ids[:, 2:]).float().mean().item()
            count += 1
            for name, (_, idx) in tap.records.items():
                c = torch.bincount(idx.reshape(-1), minlength=config.n_routed_experts).double()
                loads[name] = loads.get(name, 0) + c
    model.train()
    mtp.train()
    loads = {k: (v / v.sum()).tolist() for k, v in loads.items()}
    return {"loss": loss / count, "mtp_loss": mloss / count, "mtp_top1": acc / count, "load": loads}


def train(work, data, steps, logf, measure=0, stop_after=None):
    """Trains to `steps` (resuming from the saved state), or only to `stop_after` of them."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    torch.manual_seed(SEED)
    config = hf_config()
    config._attn_implementation = "sdpa"
    model = transformers.DeepseekV3ForCausalLM(config)
    mtp = Mtp.build(config)
    init_weights(model, mtp, config)
    params = list(model.parameters()) + list(mtp.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    gates = routers(model, mtp)
    tap = RouterTap(gates)
    state_path = os.path.join(work, "state.pt")
    history = {"train": [], "val": []}
    step, seconds = 0, 0.0
    if os.path.exists(state_path) and not measure:
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        mtp.load_state_dict(st["mtp"])
        opt.load_state_dict(st["opt"])
        step, history, seconds = st["step"], st["history"], st["seconds"]
        log(f"resumed at step {step}", logf)
    train_data = data["train"]
    E, T = config.n_routed_experts, SEQ
    t0 = t_save = time.time()
    window = []
    end = measure or min(steps, stop_after or steps)
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        ids = sample_batch(train_data, step, BATCH, T)
        tap.clear()
        logits, ml = forward(model, mtp, ids)
        V = logits.shape[-1]
        main = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:T + 1].reshape(-1))
        mloss = F.cross_entropy(ml.reshape(-1, V), ids[:, 2:].reshape(-1))
        bal = seq_balance_loss(tap.records, config, BATCH, T)
        loss = main + MTP_WEIGHT * mloss + SEQ_BALANCE_ALPHA * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # auxiliary-loss-free balancing: the bias only steers selection
        with torch.no_grad():
            for name, gate in gates:
                idx = tap.records[name][1]
                load = torch.bincount(idx.reshape(-1), minlength=E).float()
                gate.e_score_correction_bias += GAMMA * torch.sign(load.mean() - load)
        step += 1
        window.append((main.item(), mloss.item()))
        if step % 10 == 0:
            m, mm = np.mean([w[0] for w in window]), np.mean([w[1] for w in window])
            window = []
            rate = (time.time() - t0) / (step if measure else 10)
            history["train"].append((step, float(m), float(mm)))
            log(f"step {step}/{measure or steps} loss {m:.4f} mtp {mm:.4f} lr {lr_at(step, steps):.2e} "
                f"{rate:.2f}s/step", logf)
            if not measure:
                t0 = time.time()
        if measure:
            continue
        if step % EVAL_EVERY == 0 or step == steps:
            ev = {k: evaluate(model, mtp, data[k], tap, config, n_batches=4) for k in ("val_code", "val_prose")}
            history["val"].append((step, ev["val_code"]["loss"], ev["val_prose"]["loss"],
                                   ev["val_code"]["mtp_top1"], ev["val_prose"]["mtp_top1"]))
            log(f"eval step {step}: val loss code {ev['val_code']['loss']:.4f} prose {ev['val_prose']['loss']:.4f} "
                f"mtp top1 code {ev['val_code']['mtp_top1']:.3f} prose {ev['val_prose']['mtp_top1']:.3f}", logf)
            load = ev["val_code"]["load"]["layer1"]
            log("  layer1 load (code): " + " ".join(f"{x:.3f}" for x in load), logf)
        if step % SAVE_EVERY == 0 or step == end:
            seconds += time.time() - t_save
            t_save = time.time()
            tmp = state_path + ".tmp"
            torch.save({"model": model.state_dict(), "mtp": mtp.state_dict(), "opt": opt.state_dict(),
                        "step": step, "history": history, "seconds": seconds}, tmp)
            os.replace(tmp, state_path)
    tap.remove()
    if measure:
        per_step = (time.time() - t0) / measure
        tokens = BATCH * SEQ
        log(f"measure: {per_step:.2f} s/step, {tokens / per_step:.0f} tokens/s; "
            f"{len(train_data)} training tokens = {len(train_data) / tokens:.0f} steps per epoch", logf)
        return None
    return model, mtp, config, history, step


# --------------------------------------------------------------------------------------
# 4. export
# --------------------------------------------------------------------------------------


def official_tensors(model, mtp, config):
    """The official DeepSeek layout: one tensor per expert; MTP layer at index num_hidden_layers."""
    import torch
    out = {}
    L = config.num_hidden_layers

    def put(prefix, sd):
        for k, v in sd.items():
            if k.endswith("experts.gate_up_proj"):
                base = prefix + k[: -len("gate_up_proj")]
                I = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"{base}{e}.gate_proj.weight"] = v[e, :I]
                    out[f"{base}{e}.up_proj.weight"] = v[e, I:]
            elif k.endswith("experts.down_proj"):
                base = prefix + k[: -len("down_proj")]
                for e in range(v.shape[0]):
                    out[f"{base}{e}.down_proj.weight"] = v[e]
            else:
                out[prefix + k] = v

    put("", {k: v for k, v in model.state_dict().items()})
    msd = mtp.state_dict()
    put(f"model.layers.{L}.", {k[len("mtp_block."):]: v for k, v in msd.items() if k.startswith("mtp_block.")})
    out[f"model.layers.{L}.enorm.weight"] = msd["enorm.weight"]
    out[f"model.layers.{L}.hnorm.weight"] = msd["hnorm.weight"]
    out[f"model.layers.{L}.eh_proj.weight"] = msd["eh_proj.weight"]
    out[f"model.layers.{L}.shared_head.norm.weight"] = msd["post_norm.weight"]
    out[f"model.layers.{L}.shared_head.head.weight"] = model.lm_head.weight.detach()
    store = {}
    for k, v in out.items():
        v = v.detach().contiguous()
        store[k] = v.float().clone() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).clone()
    return store


def export(out_dir, work, model, mtp, config, tok):
    from safetensors.torch import save_file
    import transformers
    os.makedirs(out_dir, exist_ok=True)
    store = official_tensors(model, mtp, config)
    save_file(dict(sorted(store.items())), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(CONFIG)
    cfg["transformers_version"] = transformers.__version__
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    shutil.copy(os.path.join(work, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False}, f, indent=2)
        f.write("\n")
    # The files the binary embeds, with the checksums it verifies its cached copy against.
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    with open(os.path.join(out_dir, "SHA256SUMS"), "w") as f:
        for name in names:
            with open(os.path.join(out_dir, name), "rb") as g:
                f.write(f"{hashlib.sha256(g.read()).hexdigest()}  {name}\n")
    return store


def load_exported(out_dir):
    """The exported checkpoint, read back with transformers (f32), plus our MTP module."""
    import torch
    import transformers
    from safetensors.torch import load_file
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                               attn_implementation="eager",
                                                               experts_implementation="eager")
    model.eval()
    config = model.config
    mtp = Mtp.build(config)
    sd = load_file(os.path.join(out_dir, "model.safetensors"))
    L = config.num_hidden_layers
    p = f"model.layers.{L}."
    msd = {}
    E = config.n_routed_experts
    for k, v in sd.items():
        if not k.startswith(p):
            continue
        k = k[len(p):]
        if k in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            msd[k] = v.float()
        elif k == "shared_head.norm.weight":
            msd["post_norm.weight"] = v.float()
        elif k == "shared_head.head.weight" or ".experts." in k:
            continue
        else:
            msd["mtp_block." + k] = v.float()
    ep = "mlp.experts."
    msd["mtp_block.mlp.experts.gate_up_proj"] = torch.stack([
        torch.cat([sd[f"{p}{ep}{e}.gate_proj.weight"], sd[f"{p}{ep}{e}.up_proj.weight"]], 0) for e in range(E)]).float()
    msd["mtp_block.mlp.experts.down_proj"] = torch.stack([sd[f"{p}{ep}{e}.down_proj.weight"] for e in range(E)]).float()
    missing = mtp.load_state_dict(msd, strict=True)
    mtp.eval()
    return model, mtp, config


# --------------------------------------------------------------------------------------
# 5. report
# --------------------------------------------------------------------------------------


def outside_code(work):
    """Python sources of well-known packages that are not in the corpus (from PyPI wheels)."""
    root = os.path.join(work, "outside")
    if not os.path.isdir(root):
        os.makedirs(root + ".tmp", exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", root + ".tmp"] + OUTSIDE_CODE, check=True)
        os.replace(root + ".tmp", root)
    texts = {}
    for whl in sorted(glob.glob(os.path.join(root, "*.whl"))):
        with zipfile.ZipFile(whl) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".py"):
                    texts[f"{os.path.basename(whl)}:{name}"] = z.read(name).decode("utf-8")
    return texts


def bits_per_byte(model, tok, text, T=SEQ):
    """The model's code length for text (BOS + text + EOS) in bits per UTF-8 byte, scored in
    non-overlapping windows of T tokens, each seeing up to T tokens of context."""
    import torch
    import torch.nn.functional as F
    ids = [BOS] + tok.encode(text, add_special_tokens=False).ids + [EOS]
    nll = 0.0
    with torch.no_grad():
        pos = 1
        while pos < len(ids):
            end = min(len(ids), pos + T // 2)
            start = max(0, end - T)
            x = torch.tensor([ids[start:end]])
            logits = model(x).logits[0].float()
            lp = F.log_softmax(logits, -1)
            for j in range(pos, end):
                nll -= lp[j - 1 - start, ids[j]].item()
            pos = end
    return nll / math.log(2) / len(text.encode("utf-8"))


def report(work, out_dir, docs, data, tok, history, logf, train_seconds):
    import numpy as np
    import torch
    import torch.nn.functional as F
    model, mtp, config = load_exported(out_dir)
    tap = RouterTap(routers(model, mtp))
    res = {}
    for k in ("val_code", "val_prose"):
        ev = evaluate(model, mtp, data[k], tap, config, n_batches=16)
        res[k] = ev
        log(f"held-out {k}: loss {ev['loss']:.4f} mtp loss {ev['mtp_loss']:.4f} mtp top-1 {ev['mtp_top1']:.4f}", logf)
        for name, load in ev["load"].items():
            log(f"  load {name}: " + " ".join(f"{x:.3f}" for x in load), logf)
    tap.remove()
    texts = outside_code(work)
    joined = "\n".join(texts[k] for k in sorted(texts))
    raw = joined.encode("utf-8")
    gz = len(gzip.compress(raw, compresslevel=9, mtime=0)) * 8 / len(raw)
    bpb = bits_per_byte(model, tok, joined)
    log(f"outside code ({', '.join(OUTSIDE_CODE)}; {len(texts)} files, {len(raw)} bytes): "
        f"model {bpb:.3f} bits/byte, gzip -9 {gz:.3f} bits/byte", logf)
    counts = param_counts(config)
    res.update({"outside_code": {"packages": OUTSIDE_CODE, "files": len(texts), "bytes": len(raw),
                                 "model_bits_per_byte": bpb, "gzip9_bits_per_byte": gz},
                "params": counts, "train_seconds": train_seconds,
                "tokens": {k: int(len(v)) for k, v in data.items()}})
    with open(os.path.join(docs, "report.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    plot(history, os.path.join(docs, "loss.png"))
    return res


def param_counts(config):
    H, V = config.hidden_size, config.vocab_size
    nh, dn, dr, dv = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    attn = (H * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * nh * (dn + dr)
            + H * (config.kv_lora_rank + dr) + config.kv_lora_rank + config.kv_lora_rank * nh * (dn + dv)
            + nh * dv * H + 2 * H)
    expert = 3 * H * config.moe_intermediate_size
    E, K = config.n_routed_experts, config.num_experts_per_tok
    moe_total = E * expert + config.n_shared_experts * expert + E * H + E
    moe_active = K * expert + config.n_shared_experts * expert + E * H
    dense = 3 * H * config.intermediate_size
    L, first = config.num_hidden_layers, config.first_k_dense_replace
    main_total = V * H * 2 + H + first * (attn + dense) + (L - first) * (attn + moe_total)
    main_active = V * H + H + first * (attn + dense) + (L - first) * (attn + moe_active)  # one embedding row is a lookup
    mtp_own = 2 * H + 2 * H * H + attn + moe_total + H
    mtp_active = 2 * H + 2 * H * H + attn + moe_active + H + V * H
    return {"main_total": main_total, "main_active_per_token": main_active, "mtp_layer_own": mtp_own,
            "mtp_shared_head_copy": V * H, "mtp_active_per_token": mtp_active,
            "checkpoint_total": main_total + mtp_own + V * H}


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    tr = history["train"]
    ax[0].plot([s for s, _, _ in tr], [m for _, m, _ in tr], label="train: next token", lw=0.8)
    ax[0].plot([s for s, _, _ in tr], [m for _, _, m in tr], label="train: MTP (token after next)", lw=0.8)
    va = history["val"]
    ax[0].plot([v[0] for v in va], [v[1] for v in va], "o-", label="held-out code", ms=3)
    ax[0].plot([v[0] for v in va], [v[2] for v in va], "s-", label="held-out prose", ms=3)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy (nats/token)")
    ax[0].set_ylim(0, 9)
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].plot([v[0] for v in va], [v[3] for v in va], "o-", label="held-out code", ms=3)
    ax[1].plot([v[0] for v in va], [v[4] for v in va], "s-", label="held-out prose", ms=3)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("MTP top-1 accuracy")
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# --------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=DEFAULT_WORK)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--docs", default=DOCS, help="where the log, plot, report and held-out list go")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--measure", type=int, default=0, help="time this many steps and stop")
    ap.add_argument("--stop-after", type=int, help="save the state after this many steps and exit (train in parts)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.docs, exist_ok=True)
    logf = None if args.measure else os.path.join(args.docs, "train.log")
    files = fetch_corpus(args.work)
    train_files = [r for r in sorted(files) if not held_out(r)]
    held = [r for r in sorted(files) if held_out(r)]
    if not args.report_only and not args.measure and not os.path.exists(os.path.join(args.work, "state.pt")):
        log(f"corpus: {', '.join(versions(args.work))}", logf)
        log(f"corpus: {len(files)} files, {sum(len(t.encode()) for t in files.values())} bytes; "
            f"{len(train_files)} training files, {len(held)} held out", logf)
        with open(os.path.join(args.docs, "held_out.txt"), "w") as f:
            f.write("\n".join(held) + "\n")
    tok = train_tokenizer(args.work, [files[r] for r in train_files])
    data = build_data(args.work, files, tok)
    if args.measure:
        train(args.work, data, args.steps, None, measure=args.measure)
        return
    log(f"tokens: train {len(data['train'])}, held-out code {len(data['val_code'])}, "
        f"prose {len(data['val_prose'])}; {args.threads} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}", logf)
    if not args.report_only:
        model, mtp, config, history, step = train(args.work, data, args.steps, logf, stop_after=args.stop_after)
        if step < args.steps:
            log(f"stopped at step {step} of {args.steps}; the same command without --stop-after resumes", logf)
            return
        export(args.out, args.work, model, mtp, config, tok)
        log(f"exported {os.path.relpath(args.out, REPO_ROOT)}", logf)
    st = torch.load(os.path.join(args.work, "state.pt"), weights_only=False)
    report(args.work, args.out, args.docs, data, tok, st["history"], logf, st["seconds"])


if __name__ == "__main__":
    sys.exit(main())
