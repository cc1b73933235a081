#!/usr/bin/env bash
# Installs the Debian packages the build or the tests need, only when missing:
#   protoc  (protobuf-compiler): the proto crate and etcd-client compile .proto files;
#   etcd    (etcd-server): the cluster tests start real etcd servers.
# Usage: bash tools/deps.sh protoc [etcd]
set -euo pipefail
missing=()
for tool in "$@"; do
  case "$tool" in
    protoc) command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler) ;;
    etcd) command -v etcd >/dev/null 2>&1 || missing+=(etcd-server) ;;
    *) echo "tools/deps.sh: unknown tool $tool" >&2; exit 2 ;;
  esac
done
((${#missing[@]})) || exit 0
if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "tools/deps.sh: need ${missing[*]} (apt-get) but not root and no sudo" >&2
  exit 1
fi
echo "installing ${missing[*]}..." >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
