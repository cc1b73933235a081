#!/usr/bin/env bash
# The main command: builds and starts the whole cluster in one process (router, prefill and
# decode workers on the in-memory store) on the embedded default model, answers the demo
# prompt through the public gRPC API, and keeps serving until Ctrl-C. Extra arguments go to
# `expertmesh up` (e.g. --model DIR, --listen 127.0.0.1:50051, --once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh protoc
args=("$@")
if [[ ! " ${args[*]-} " =~ " --prompt " ]]; then
  args+=(--prompt "def fibonacci(n):" --max-new-tokens 48)
fi
# The CUDA engine is compiled in only when a GPU is asked for (`--device cuda:N`): the CPU
# quickstart does not need it and builds faster without it.
features=(--no-default-features)
if [[ " ${args[*]} " =~ " --device cuda" || " ${args[*]} " =~ " --device=cuda" || ${EXPERTMESH_DEVICE:-cpu} == cuda* ]]; then
  features=()
fi
exec cargo run --release --locked -p cli "${features[@]}" --bin expertmesh -- up "${args[@]}"
