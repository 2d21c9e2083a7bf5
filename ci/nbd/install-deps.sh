#!/usr/bin/env bash
# Install what vhostpy's NBD tests (tests/test_nbd.py) need on top of ci/qemu/install-deps.sh:
# nbdkit (its memory and file plugins, error/delay/nozero/blocksize-policy filters), and check
# that qemu-nbd (qemu-utils) is there. Idempotent: no apt-get update when all is installed.
# Runs as root or through sudo; non-interactive.
#   ci/nbd/install-deps.sh
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

need=()
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    echo "ci/nbd/install-deps.sh: installing ${need[*]}"
    if ! as_root apt-get install -y --no-install-recommends "${need[@]}"; then
        as_root apt-get update
        as_root apt-get install -y --no-install-recommends "${need[@]}"
    fi
fi

command -v qemu-nbd >/dev/null 2>&1 || { echo "ci/nbd/install-deps.sh: qemu-nbd missing" >&2; exit 1; }
echo "ci/nbd/install-deps.sh: $(nbdkit --version), $(qemu-nbd --version | head -1)"
