#!/usr/bin/env bash
# Writes docs/CONFIGURATION.md from the binaries' own --help (build them first:
# cargo build --release --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}
{
  cat <<'MD'
# Configuration reference

Every setting is a flag; most can also be set through the environment variable shown as
`[env: …]` (the Kubernetes manifests use a ConfigMap of these, see docs/KUBERNETES.md). A flag
given on the command line wins over the environment. `--check-config` parses the flags and
environment, prints the resulting configuration and exits: use it to check a configuration
before deploying (`tools/check_deploy.py` runs it on every container of the manifests).

Durations are in milliseconds (`*_ms`), sizes in bytes or tokens as named. This page is
generated from the binaries' `--help` by `tools/gen_config_doc.sh`.
MD
  for b in router prefill-worker decode-worker expert-worker expert-controller; do
    printf '\n## `%s`\n\n```text\n' "$b"
    NO_COLOR=1 COLUMNS=100 "$bin/$b" --help | sed -e 's/[[:space:]]*$//'
    printf '```\n'
  done
} > docs/CONFIGURATION.md
