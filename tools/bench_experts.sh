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
results=$(mktemp)
trap 'rm -f "$results"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "== machine"; uptime; echo "cores: $(nproc)"
for experts in 0 "${EXPERT_WORKERS:-3}"; do
  port=$(free_port)
  $bin/expertmesh up --listen "127.0.0.1:$port" --expert-workers "$experts" "${model_args[@]}" >/dev/null 2>&1 &
  up=$!
  for _ in $(seq 600); do $bin/expertmesh client --addr "127.0.0.1:$port" --prompt-ids 1 --max-new-tokens 1 >/dev/null 2>&1 && break; sleep 0.2; done
  label=local; [[ $experts != 0 ]] && label="remote ($experts expert workers)"
  for c in 1 32; do
    requests=$((c * 3 > 12 ? c * 3 : 12))
    $bin/loadgen --addr "127.0.0.1:$port" --concurrency "$c" --requests "$requests" --warmup "$c" \
      --prompt-len fixed:32 --output-len "fixed:$out_len" --ignore-eos --json 2>/dev/null |
      python3 -c "
import json, sys
r = json.load(sys.stdin); c = $c
t = r['tpot_ms']['mean']
print(f'$label, concurrency {c}: ok {r[\"requests_ok\"]}/{r[\"requests_measured\"]}, TPOT mean {t:.2f} ms -> decode {c * 1000 / t:.1f} tokens/s')
print(f'$experts {c} {t}', file=open('$results', 'a'))"
  done
  kill "$up"; wait "$up" 2>/dev/null || true
done
python3 - "$results" <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1])]
tpot = {(e == "0", int(c)): float(t) for e, c, t in rows}
for c in sorted({c for _, c in tpot}):
    local, remote = tpot[(True, c)], tpot[(False, c)]
    print(f"concurrency {c}: remote/local decode tokens/s = {local / remote:.2f}, +{remote - local:.2f} ms per token")
PY
echo "== after"; uptime
