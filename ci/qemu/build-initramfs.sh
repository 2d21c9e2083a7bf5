#!/usr/bin/env bash
# Build (or reuse) the cached busybox + virtio/ext4-modules initramfs for vhostpy test guests.
# Prints the archive path. Options: --cache-dir D, --kernel-version V, --force, --print-kernel,
# --list-modules. Logic lives in vhostpy/testing/initramfs.py (stdlib Python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/initramfs.py" "$@"
