#!/usr/bin/env bash
# Speculative decoding benchmark (docs/BENCHMARKS.md): `spec-bench` on the embedded default
# model (acceptance and decode tokens/s, code and prose prompts, batch 1/8/32, against
# --speculative-tokens 0 in the same run), then on a DeepSeek-V2-Lite-shaped 4-layer
# checkpoint with an MTP layer added (random bf16 weights): the cost of verifying 1-4 tokens
# per sequence and of one MTP draft.
#
#   bash tools/bench_speculation.sh
#   BENCH_DIR=/big/disk bash tools/bench_speculation.sh
#   BENCH_CKPT=DIR bash tools/bench_speculation.sh   # reuse a `make_bench_checkpoint.py --mtp` checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_DIR:-bench-out}
ckpt=${BENCH_CKPT:-$out/v2lite-4l-mtp-bf16}
mkdir -p "$out"

echo "== machine"
uptime
echo "cores: $(nproc)"
lscpu | grep -E 'Model name' || true

cargo build --release --locked -p cli --bin spec-bench
echo "== default model: greedy decode of code and prose prompts"
./target/release/spec-bench --new-tokens 192 --repeats 5 --batches 1,8,32 --speculative 1,2,3
if [ ! -f "$ckpt/config.json" ]; then
  python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-bench.txt
  python3 tools/make_bench_checkpoint.py "$ckpt" --dtype bf16 --mtp
fi
echo "== V2-Lite shape, 4 layers + MTP layer: verification and draft costs"
./target/release/spec-bench --model "$ckpt" --verify-cost --batches 1,8,32 --verify 1,2,3,4 --prompt-len 128
echo "== after"
uptime
