#!/usr/bin/env bash
# Install what vhostpy's block benchmark (bench/blk.py) needs on top of ci/qemu/install-deps.sh:
# fio (the host's binary is shipped into the busybox guest with its shared libraries).
# Idempotent: does nothing (no apt-get update) when fio is already installed.
# Runs as root or through sudo; non-interactive.
#   ci/bench/install-deps.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

case "${1:-}" in
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    "") ;;
    *) echo "install-deps.sh: unknown argument $1" >&2; exit 2 ;;
esac

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() { sudo env DEBIAN_FRONTEND=noninteractive "$@"; }
fi

if command -v fio >/dev/null 2>&1; then
    echo "ci/bench/install-deps.sh: fio present ($(fio --version))"
    exit 0
fi

echo "ci/bench/install-deps.sh: installing fio"
if ! as_root apt-get install -y --no-install-recommends fio; then
    as_root apt-get update
    as_root apt-get install -y --no-install-recommends fio
fi
fio --version
