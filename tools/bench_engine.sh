#!/usr/bin/env bash
# Engine benchmark (docs/BENCHMARKS.md): a DeepSeek-V2-Lite-shaped checkpoint cut to 4 layers
# with random bf16 weights, run by engine-bench (bf16 and f32 weights) and, as the baseline
# in the same run, by HuggingFace transformers on the same checkpoint.
#
#   bash tools/bench_engine.sh            # everything (~15 min on 2 cores)
#   BENCH_DIR=/big/disk bash tools/bench_engine.sh
#   BENCH_CKPT=DIR bash tools/bench_engine.sh   # reuse a checkpoint made by make_bench_checkpoint.py
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_DIR:-bench-out}
ckpt=${BENCH_CKPT:-$out/v2lite-4l-bf16}
mkdir -p "$out"

echo "== machine"
uptime
echo "cores: $(nproc)"
lscpu | grep -E 'Model name' || true

python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-bench.txt
[ -f "$ckpt/config.json" ] || python3 tools/make_bench_checkpoint.py "$ckpt" --dtype bf16
cargo build --release --locked -p cli --bin engine-bench

for dtype in bf16 f32; do
  echo "== engine-bench, $dtype weights, exact f32 activations"
  ./target/release/engine-bench --model "$ckpt" --dtype "$dtype" --batches 1,8,32 --steps 16
done
echo "== engine-bench, bf16 weights, bf16 activations (AVX-512 BF16 dot products)"
./target/release/engine-bench --model "$ckpt" --dtype bf16 --precision bf16 --batches 1,8,32 --steps 16

for dtype in bf16 f32; do
  for batch in 1 8 32; do
    echo "== transformers baseline, $dtype, batch $batch"
    python3 tools/bench_transformers.py "$ckpt" --dtype "$dtype" --batch "$batch" --decode-steps 16
  done
done
echo "== after"
uptime
