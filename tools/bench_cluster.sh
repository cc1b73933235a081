#!/usr/bin/env bash
# Cluster benchmarks (docs/BENCHMARKS.md), on loopback with real processes and a real etcd:
#  (a) overhead: decode tokens/s through router + prefill + decode vs the in-process engine
#      (engine-bench) on the same model and batch;
#  (b) latent-KV transfer: bytes per token and GB/s (kv-bench);
#  (c) disaggregated vs colocated (prefill on the decode worker) goodput at the same load.
#
#   bash tools/bench_cluster.sh                  # embedded default model, parts a b c
#   BENCH_MODEL=DIR BENCH_PARTS="a b" bash tools/bench_cluster.sh  # a checkpoint directory
# Knobs: BENCH_OUTPUT (tokens per request in (a), default 128), BENCH_RATE (req/s in (c)),
# BENCH_TTFT_SLO_MS / BENCH_TPOT_SLO_MS (SLOs in (c)).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh protoc etcd
cargo build --release --locked --workspace --bins
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
model_args=()
[[ -n ${BENCH_MODEL:-} ]] && model_args=(--model "$BENCH_MODEL")
model_dir=${BENCH_MODEL:-$($bin/expertmesh generate --prompt-ids 1 --max-new-tokens 1 --json >/dev/null && echo "${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh/default-model-v2")}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# start NAME CMD... : runs CMD in the background, waits for its ready line, prints its addr.
start() {
  local name=$1; shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 600); do
    if grep -q '"event":"ready"' "$work/$name.out" 2>/dev/null; then
      python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["addr"])' "$work/$name.out"
      return
    fi
    sleep 0.1
  done
  echo "$name did not become ready:" >&2; tail "$work/$name.err" >&2; exit 1
}

echo "== machine"; uptime; echo "cores: $(nproc)"; lscpu | grep -E 'Model name' || true

parts=${BENCH_PARTS:-a b c}
out_len=${BENCH_OUTPUT:-128}
has() { [[ " $parts " == *" $1 "* ]]; }
if has a; then
  echo; echo "== (a) in-process engine (engine-bench), same model, decode steps only"
  $bin/engine-bench --model "$model_dir" --prompt-len 32 --batches 1,8 --steps "$out_len" --no-step-probes --bandwidth-bytes 268435456
fi

cp=$(free_port); pp=$(free_port)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
  --listen-peer-urls "http://127.0.0.1:$pp" >"$work/etcd.log" 2>&1 &
pids+=($!)
E="http://127.0.0.1:$cp"
start prefill $bin/prefill-worker --etcd "$E" --worker-id p0 "${model_args[@]}" >/dev/null
start decode $bin/decode-worker --etcd "$E" --worker-id d0 "${model_args[@]}" >/dev/null
start router $bin/router --etcd "$E" --worker-id r0 "${model_args[@]}" >"$work/router.addr"
router=$(cat "$work/router.addr"); router_pid=${pids[-1]}

has a && echo && echo "== (a) through router + prefill + decode (loadgen, closed loop)"
for c in 1 8; do
  has a || break
  echo "-- concurrency $c"
  $bin/loadgen --addr "$router" --concurrency "$c" --requests $((c * 6)) --warmup "$c" \
    --prompt-len fixed:32 --output-len "fixed:$out_len" --ignore-eos --json >"$work/a$c.json"
  python3 - "$work/a$c.json" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); c = int(sys.argv[2])
tpot = r["tpot_ms"]["mean"]
print(f"requests ok {r['requests_ok']}/{r['requests_measured']}, TTFT p50 {r['ttft_ms']['p50']:.1f} ms, "
      f"TPOT mean {tpot:.2f} ms -> decode {c * 1000 / tpot:.1f} tokens/s (batch {c}); output tokens/s {r['output_tokens_per_s']:.1f}")
PY
done

if has b; then
  echo; echo "== (b) latent-KV transfer (kv-bench, in-process workers on loopback gRPC)"
  $bin/kv-bench "${model_args[@]}" --prompt-lens 16,128,512 --push-tokens 512,2048,4096 2>/dev/null
fi

if has c; then
  echo; echo "== (c) disaggregated vs colocated: the same open-loop load at several rates"
  ttft=${BENCH_TTFT_SLO_MS:-300}; tpot=${BENCH_TPOT_SLO_MS:-5}
  echo "SLOs: TTFT <= $ttft ms, TPOT <= $tpot ms; goodput = highest rate with >= 90% of requests within both"
  for mode in disaggregated colocated; do
    kill "$router_pid"; wait "$router_pid" 2>/dev/null || true
    local_max=0; [[ $mode == colocated ]] && local_max=100000
    start "router-$mode" $bin/router --etcd "$E" --worker-id "r-$mode" --local-prefill-max-tokens "$local_max" "${model_args[@]}" >"$work/router.addr"
    router=$(cat "$work/router.addr"); router_pid=${pids[-1]}
    for rate in ${BENCH_RATES:-4 8 12 16}; do
      $bin/loadgen --addr "$router" --rate "$rate" --requests $((rate * 12)) --warmup 4 --seed 7 \
        --prompt-len uniform:64-512 --output-len uniform:32-96 --ignore-eos \
        --ttft-slo-ms "$ttft" --tpot-slo-ms "$tpot" --json >"$work/c.json" 2>/dev/null
      python3 - "$work/c.json" "$mode" "$rate" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:>14} rate {sys.argv[3]:>3} req/s: ok {r['requests_ok']}/{r['requests_measured']}, "
      f"TTFT p50/p90 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p90']:.0f} ms, TPOT p50/p90 {r['tpot_ms']['p50']:.2f}/{r['tpot_ms']['p90']:.2f} ms, "
      f"within SLOs {100 * r['slo_attainment']:.0f}%, goodput {r['goodput_rps']:.2f} req/s")
PY
    done
  done
fi
echo; echo "== after"; uptime
