#!/usr/bin/env bash
# The README's first command: install everything, then boot a QEMU guest whose disk is
# served by vhostpy (`vhostpy blk`), and print what the guest saw.
#   ci/demo.sh            # TCG by default here; VHOSTPY_QEMU_ACCEL=kvm where KVM works
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh

work="$(mktemp -d /tmp/vhostpy-demo.XXXXXX)"
backend_pid=""
cleanup() {
    if [ -n "$backend_pid" ] && kill -0 "$backend_pid" 2>/dev/null; then
        kill -TERM "$backend_pid"
        wait "$backend_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

img="$work/disk.img"
sock="$work/blk.sock"
truncate -s 64M "$img"
printf 'Hello from the host, written before the guest booted.\n' |
    dd of="$img" conv=notrunc status=none

echo "== starting: vhostpy blk --socket-path $sock --image $img --serial vhostpy-demo"
.venv/bin/vhostpy blk --socket-path "$sock" --image "$img" --serial vhostpy-demo -v \
    2> "$work/backend.log" &
backend_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$work/backend.log"; echo "demo: back-end did not start" >&2; exit 1; }

echo "== booting a QEMU guest with -device vhost-user-blk-pci on that socket"
PYTHON=.venv/bin/python ci/qemu/run-guest.sh --blk "$sock" --timeout 180 --command '
echo "guest kernel:  $(uname -r)"
echo "disk:          /dev/vda, $(cat /sys/block/vda/size) sectors of 512 bytes"
echo "serial:        $(cat /sys/block/vda/serial)"
echo "host wrote:    $(head -n 1 /dev/vda)"
echo "Hello from the guest." > /tmp/msg
dd if=/tmp/msg of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && echo "guest wrote:   sector 1 (with fsync)"
'
kill -TERM "$backend_pid"
wait "$backend_pid"
backend_pid=""
echo "== the back-end exited cleanly; the host image now holds at sector 1:"
dd if="$img" bs=512 skip=1 count=1 status=none | head -n 1
