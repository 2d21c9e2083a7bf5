"""Packed virtqueues (VIRTIO_F_RING_PACKED) with a real Linux driver: ONE TCG boot (``-smp 2``)
with every vhostpy device on packed rings (QEMU 7.2 ``packed=on``), two queues each.

* The guest's sysfs says bit 34 was negotiated on each virtio device, and the back-ends
  acked it (the blk process logs RING_PACKED; the net device had it while frames flowed).
* virtio-blk ``num-queues=2`` (two ``vhostpy blk`` processes): ``vda`` gets an ext4 made by
  the guest, a directory of files (their MD5s printed), unmounted; on the host ``e2fsck -fn``
  is clean and every file read back with debugfs matches. ``vdb`` runs ``rwverify``
  (tests/guestprogs/rwverify.c): four O_DIRECT workers writing and re-reading 4 KiB blocks,
  no error, no mismatch, and its last write on the host's image.
* virtio-net ``queues=2, mq=on`` (an in-process `NetApp`): ping the responder (small and
  1400-byte), a UDP datagram to a Python handler with exact fields, and a 256 KiB TCP
  transfer from the guest's busybox ``nc`` to a TCP end written here in Python
  (`TcpSink`), byte-exact (MD5 against the guest's).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netguest import GUEST_IP, RESPONDER_IP, FrameLog, configure, ping_stats
from qemu_guest import console_values, guest_mac, require_qemu, start_guest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_qemu_blk import _guest_mke2fs
from test_qemu_recovery import build_rwverify
from tools import require_tool

from vhostpy.netapp import RESPONDER_MAC, NetApp
from vhostpy.packets import verify_l4_checksums
from vhostpy.virtqueue_packed import VIRTIO_F_RING_PACKED

MiB = 1 << 20
GUEST_TIMEOUT = 240
GUEST_MAC = guest_mac(0)
FAKE_IP = "10.0.2.9"          # the Python TCP end: the guest gets a permanent ARP entry
FAKE_MAC = "52:54:00:00:00:09"
TCP_PORT = 7001
TCP_KIB = 256
TFTP_PORT = 6969
RRQ = b"\x00\x01hello\x00octet\x00tsize\x000\x00"   # busybox tftp's read request
RW_BLOCKS, RW_SECONDS, RW_WORKERS = 1024, 6, 4
EXT4_FILES = 12
E2FSPROGS = "apt e2fsprogs"

#: Per virtio device: its device id and feature bit 34 (sysfs: one '0'/'1' per bit).
SYSFS = (
    'for d in /sys/bus/virtio/devices/virtio*; do\n'
    f'  echo "VFEAT $(cat $d/device) $(cut -c{VIRTIO_F_RING_PACKED + 1} $d/features)"\n'
    'done\n'
    'echo "BLK-MQ=$(ls /sys/block/vda/mq | wc -l) $(ls /sys/block/vdb/mq | wc -l)"\n'
    'echo "NET-QUEUES=$(ls /sys/class/net/eth0/queues | tr "\\n" " ")"\n'
)


class TcpSink:
    """The far end of one TCP connection the guest opens to FAKE_IP:TCP_PORT, run as a
    port handler on the loop thread: SYN gets a SYN-ACK, every in-order segment is kept and
    acknowledged (cumulatively; others are acknowledged at the point reached, which makes
    the guest retransmit), a FIN gets a FIN-ACK. `done` is set at the FIN."""

    ISS = 0x1000

    def __init__(self) -> None:
        self.data = bytearray()
        self.rcv_nxt: int | None = None
        self.fin = False
        self.done = threading.Event()
        self.segments = 0

    def _reply(self, port: Any, frame: Any, flags: str) -> None:
        seq = self.ISS + 1 + (1 if self.fin and flags == "A" else 0)
        if flags == "SA":
            seq = self.ISS
        assert self.rcv_nxt is not None
        port.send([Ether(dst=GUEST_MAC, src=FAKE_MAC) / IP(src=FAKE_IP, dst=GUEST_IP)
                   / TCP(sport=TCP_PORT, dport=frame[TCP].sport, flags=flags, seq=seq,
                         ack=self.rcv_nxt & 0xFFFFFFFF, window=65535)])

    def __call__(self, port: Any, frames: list[Any]) -> None:
        for f in frames:
            if TCP not in f or f[TCP].dport != TCP_PORT or f[IP].dst != FAKE_IP:
                continue
            t = f[TCP]
            if t.flags.S:
                self.rcv_nxt = (t.seq + 1) & 0xFFFFFFFF
                self._reply(port, f, "SA")
                continue
            if self.rcv_nxt is None:
                continue
            size = f[IP].len - 4 * f[IP].ihl - 4 * t.dataofs
            payload = bytes(t.payload)[:size]
            if payload and t.seq == self.rcv_nxt:
                self.data += payload
                self.rcv_nxt = (self.rcv_nxt + len(payload)) & 0xFFFFFFFF
                self.segments += 1
            if t.flags.F and (t.seq + len(payload)) & 0xFFFFFFFF == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
                self._reply(port, f, "FA")
                self.fin = True
                self.done.set()
            elif payload or t.flags.F:
                self._reply(port, f, "A")


def _guest_script(mke2fs: str) -> str:
    return SYSFS + configure() + f"""
arp -s {FAKE_IP} {FAKE_MAC}
/rwverify /dev/vdb {RW_BLOCKS} {RW_SECONDS} {RW_WORKERS} packed > /tmp/rw.out 2>&1 &
rw=$!
{mke2fs} -t ext4 -F -q -L packed /dev/vda && echo mkfs-ok
mount -t ext4 /dev/vda /mnt && echo "fstype=$(awk '$1 == "/dev/vda" {{print $3}}' /proc/mounts)"
mkdir -p /mnt/d
i=0
while [ $i -lt {EXT4_FILES} ]; do
  i=$((i + 1))
  dd if=/dev/urandom of=/mnt/d/f$i bs=1k count=$((i * 37 % 300 + 1)) 2>/dev/null
done
sync; (cd /mnt/d && md5sum f*) | sed 's/^/md5 /'
umount /mnt && echo ext4-umount=ok
ping -c 3 {RESPONDER_IP}
ping -c 2 -s 1400 {RESPONDER_IP}
tftp -g -r hello {RESPONDER_IP} {TFTP_PORT} & t=$!
dd if=/dev/urandom of=/tmp/data bs=1024 count={TCP_KIB} 2>/dev/null
echo "TCP-MD5=$(md5sum < /tmp/data | cut -d' ' -f1)"
nc {FAKE_IP} {TCP_PORT} < /tmp/data > /dev/null; echo "nc-rc=$?"
kill $t 2>/dev/null
wait $rw; echo "rw-rc=$?"
cat /tmp/rw.out
"""


@pytest.mark.qemu
def test_packed_rings_blk_and_net_one_boot(tmp_path: Path, backend: Any) -> None:
    require_qemu()
    e2fsck = require_tool("e2fsck", E2FSPROGS)
    debugfs = require_tool("debugfs", E2FSPROGS)
    files, mke2fs = _guest_mke2fs()
    files["rwverify"] = build_rwverify(tmp_path).read_bytes()
    fs_img, rw_img = tmp_path / "fs.img", tmp_path / "rw.img"
    for img in (fs_img, rw_img):
        img.write_bytes(bytes(64 * MiB))
    fs_be = backend("blk", "--image", str(fs_img), "--num-queues", "2", name="fs.sock")
    rw_be = backend("blk", "--image", str(rw_img), "--num-queues", "2", name="rw.sock")

    app = NetApp(socket_paths=[str(tmp_path / "net.sock")], num_queues=2)
    try:
        port = app.ports[0]
        udp = FrameLog()
        sink = TcpSink()
        features: list[int] = []

        def on_frames(p: Any, frames: list[Any]) -> None:
            features.append(p.device.acked_features)
            udp(p, [f for f in frames if UDP in f and f[UDP].dport == TFTP_PORT])
            sink(p, frames)
        port.add_handler(on_frames, scapy=True)
        app.start_thread()
        net_path = app.servers[0].socket_path
        assert net_path is not None
        with start_guest(_guest_script(mke2fs), blk_sockets=[fs_be.path, rw_be.path],
                         blk_options={"num-queues": 2, "packed": "on"},
                         net_sockets=[str(net_path)],
                         net_options={"mq": "on", "vectors": 0, "packed": "on"},
                         netdev_options={"queues": 2}, extra_args=["-smp", "2"],
                         files=files, timeout=GUEST_TIMEOUT) as guest:
            result = guest.wait()
        console = result.console
        assert result.exit_code == 0, result.raw_console + fs_be.output() + rw_be.output()
        assert sink.done.wait(5), (len(sink.data), console)
        acked = list(features)
        got_udp = udp.matching(lambda f: True)
    finally:
        app.stop()
        app.close()

    # -- negotiation: bit 34 on the three devices, two queues each --------------------------
    vfeat = sorted(re.findall(r"^VFEAT (0x[0-9a-f]+) ([01])$", console, re.MULTILINE))
    assert vfeat == [("0x0001", "1"), ("0x0002", "1"), ("0x0002", "1")], console
    values = console_values(console)
    assert values["BLK-MQ"] == "2 2", console
    assert "NET-QUEUES=rx-0 rx-1 tx-0 tx-1 " in console, console
    assert acked and all(f >> VIRTIO_F_RING_PACKED & 1 for f in acked)
    for be in (fs_be, rw_be):
        assert re.search(r"driver features 0x[0-9a-f]+ \([^)]*RING_PACKED", be.output()), \
            be.output()

    # -- blk: rwverify on vdb, ext4 on vda --------------------------------------------------
    summary = re.search(r"^rwverify packed writes=(\d+) reads=(\d+) errors=(\d+) "
                        r"mismatches=(\d+)$", console, re.MULTILINE)
    assert summary is not None, console
    writes, reads, errors, mismatches = map(int, summary.groups())
    assert writes > 0 and reads >= writes and errors == mismatches == 0, summary.group(0)
    assert values["rw-rc"] == "0", console
    with open(rw_img, "rb") as f:
        assert f.read(64).rstrip(b"\0") == b"LAST-WRITE packed %d" % writes

    assert "mkfs-ok" in result.lines and values["fstype"] == "ext4", console
    assert values["ext4-umount"] == "ok", console
    fsck = subprocess.run([e2fsck, "-fn", str(fs_img)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = {name: digest for digest, name in
            re.findall(r"^md5 ([0-9a-f]{32})  (f\d+)$", console, re.MULTILINE)}
    assert len(sums) == EXT4_FILES, console
    for name, digest in sums.items():
        out = subprocess.run([debugfs, "-R", f"cat /d/{name}", str(fs_img)],
                             capture_output=True, check=True)
        assert hashlib.md5(out.stdout).hexdigest() == digest, name

    # -- net: pings, UDP to the handler, TCP byte-exact ------------------------------------
    assert ping_stats(console) == [(3, 3), (2, 2)], console
    assert "1408 bytes from 10.0.2.2" in console, console
    assert got_udp, "no UDP datagram reached the handler"
    for frame in got_udp:       # tftp may have retransmitted; every copy is the request
        assert (frame[Ether].src, frame[Ether].dst) == (GUEST_MAC, RESPONDER_MAC)
        assert (frame[IP].src, frame[IP].dst) == (GUEST_IP, RESPONDER_IP)
        assert bytes(frame[UDP].payload) == RRQ
        assert verify_l4_checksums(bytes(frame)) is True
    assert values["nc-rc"] == "0", console
    assert len(sink.data) == TCP_KIB * 1024, len(sink.data)
    assert hashlib.md5(sink.data).hexdigest() == values["TCP-MD5"]
    print(f"packed rings: rwverify {writes} writes {reads} reads; {len(sums)} ext4 files; "
          f"TCP {TCP_KIB} KiB in {sink.segments} segments")
