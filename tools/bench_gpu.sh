#!/usr/bin/env bash
# GPU engine benchmark (docs/BENCHMARKS.md): a DeepSeek-V2-Lite-shaped checkpoint (27 layers,
# random bf16 weights) on the CUDA engine: prefill tokens/s with the fraction of the bf16
# tensor-core peak, decode tokens/s at batch 1, 16, 64, 256 with the batch-1 fraction of HBM
# bandwidth. Needs an NVIDIA GPU with CUDA 12 (driver, cuBLAS, NVRTC) and ~70 GB of disk.
#
#   bash tools/bench_gpu.sh                                   # H100 figures
#   HBM_GB_S=4800 bash tools/bench_gpu.sh                     # H200
#   BENCH_CKPT=DIR bash tools/bench_gpu.sh                    # reuse a checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_DIR:-bench-out}
ckpt=${BENCH_CKPT:-$out/v2lite-27l-bf16}
mkdir -p "$out"

echo "== machine"
uptime
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-bench.txt \
  nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cublas-cu12
for pkg in cuda_nvrtc cublas; do
  lib=$(python3 -c "import nvidia.$pkg as m; print(list(m.__path__)[0] + '/lib')")
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
[ -f "$ckpt/config.json" ] || python3 tools/make_bench_checkpoint.py "$ckpt" --dtype bf16 --layers 27
cargo build --release --locked -p cli --bin engine-bench

echo "== engine-bench on cuda:0, bf16 weights"
./target/release/engine-bench --model "$ckpt" --dtype bf16 --device cuda:0 \
  --prompt-len 512 --prefill-batch 8 --batches 1,16,64,256 --steps 32 \
  --hbm-gb-s "${HBM_GB_S:-3350}" --peak-bf16-tflops "${PEAK_TFLOPS:-989}"
echo "== after"
uptime
