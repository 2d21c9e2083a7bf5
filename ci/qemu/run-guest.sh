#!/usr/bin/env bash
# Boot a throw-away QEMU guest against vhost-user sockets and print its console.
#   ci/qemu/run-guest.sh --blk SOCK [--blk SOCK2] [--net SOCK] --script FILE | --command "sh cmds"
#   [--blk-opt K=V] [--net-opt K=V] [--netdev-opt K=V] [--memory MB] [--timeout S]
#   [--accel tcg|kvm] [--quiet] [--print-command] [-- extra QEMU args]
# Exits with the guest script's status (124 on timeout, 125 if QEMU/guest failed, 2 if the
# kernel/QEMU are missing). Logic lives in vhostpy/testing/run_guest.py (stdlib only).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m vhostpy.testing.run_guest "$@"
