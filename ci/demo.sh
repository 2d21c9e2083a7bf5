#!/usr/bin/env bash
# The README's first command: install everything, then boot a QEMU guest whose disk
# (`vhostpy blk`) and network card (`vhostpy net`) are served by vhostpy, and print what
# the guest saw: its disk, and ping replies from vhostpy's built-in responder.
#   ci/demo.sh            # TCG by default here; VHOSTPY_QEMU_ACCEL=kvm where KVM works
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh

work="$(mktemp -d /tmp/vhostpy-demo.XXXXXX)"
backend_pid=""
net_pid=""
cleanup() {
    for pid in $backend_pid $net_pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            wait "$pid" || true
        fi
    done
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

netsock="$work/net.sock"
echo "== starting: vhostpy net --socket-path $netsock   (responder on 10.0.2.2)"
.venv/bin/vhostpy net --socket-path "$netsock" --pcap "$work/net.pcap" -v 2> "$work/net.log" &
net_pid=$!
for _ in $(seq 100); do [ -S "$netsock" ] && break; sleep 0.1; done
[ -S "$netsock" ] || { cat "$work/net.log"; echo "demo: net back-end did not start" >&2; exit 1; }

echo "== booting a QEMU guest: vhost-user-blk-pci and virtio-net-pci on those sockets"
PYTHON=.venv/bin/python ci/qemu/run-guest.sh --blk "$sock" --net "$netsock" --timeout 180 \
    --command '
echo "guest kernel:  $(uname -r)"
echo "disk:          /dev/vda, $(cat /sys/block/vda/size) sectors of 512 bytes"
echo "serial:        $(cat /sys/block/vda/serial)"
echo "host wrote:    $(head -n 1 /dev/vda)"
echo "Hello from the guest." > /tmp/msg
dd if=/tmp/msg of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && echo "guest wrote:   sector 1 (with fsync)"
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "network:       eth0 $(cat /sys/class/net/eth0/address), 10.0.2.15/24"
ping -c 3 10.0.2.2
'
kill -TERM "$backend_pid" "$net_pid"
wait "$backend_pid"
wait "$net_pid"
backend_pid=""
net_pid=""
echo "== the back-ends exited cleanly; the host image now holds at sector 1:"
dd if="$img" bs=512 skip=1 count=1 status=none | head -n 1
echo "== vhostpy net's counters at exit:"
grep '"event": "exit"' "$work/net.log" | cut -c1-300
echo "== frames captured in $work/net.pcap: $(.venv/bin/python -c "
from vhostpy.pcap import read_pcap; import sys; print(len(read_pcap(sys.argv[1])))" "$work/net.pcap")"
