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
  args+=(--prompt "Hello, world" --max-new-tokens 16)
fi
exec cargo run --release --locked -p cli --bin expertmesh -- up "${args[@]}"
