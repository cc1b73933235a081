#!/usr/bin/env bash
# Remote vs local routed experts (docs/BENCHMARKS.md): decode tokens/s through the one-process
# cluster (`expertmesh up`) with experts in the attention workers, then on N expert workers
# (loopback gRPC), at concurrency 1 and 32.
#
#   bash tools/bench_experts.sh                   # embedded default model, 3 expert workers
#   BENCH_MODEL=DIR EXPERT_WORKERS=2 bash tools/bench_experts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh protoc
cargo build --release --locked -p cli -p loadgen --bins
bin=target/release
model_args=()
[[ -n ${BENCH_MODEL:-} ]] && model_args=(--model "$BENCH_MODEL")
out_len=${BENCH_OUTPUT:-64}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "== machine"; uptime; echo "cores: $(nproc)"
for experts in 0 "${EXPERT_WORKERS:-3}"; do
  port=$(free_port)
  $bin/expertmesh up --listen "127.0.0.1:$port" --expert-workers "$experts" "${model_args[@]}" >/dev/null 2>&1 &
  up=$!
  for _ in $(seq 600); do $bin/expertmesh client --addr "127.0.0.1:$port" --prompt-ids 1 --max-new-tokens 1 >/dev/null 2>&1 && break; sleep 0.2; done
  label=local; [[ $experts != 0 ]] && label="remote ($experts expert workers)"
  for c in 1 32; do
    $bin/loadgen --addr "127.0.0.1:$port" --concurrency "$c" --requests $((c * 3)) --warmup "$c" \
      --prompt-len fixed:32 --output-len "fixed:$out_len" --ignore-eos --json 2>/dev/null |
      python3 -c "
import json, sys
r = json.load(sys.stdin); c = $c
t = r['tpot_ms']['mean']
print(f'$label, concurrency {c}: ok {r[\"requests_ok\"]}/{r[\"requests_measured\"]}, TPOT mean {t:.2f} ms -> decode {c * 1000 / t:.1f} tokens/s')"
  done
  kill "$up"; wait "$up" 2>/dev/null || true
done
echo "== after"; uptime
