"""Back-end crash recovery with a real guest (QEMU 7.2, TCG), in one boot with three disks,
each on a chardev with ``reconnect=1``:

* vda: ``vhostpy blk --image`` (the compiled data path under VHOSTPY_IMPLEMENTATION=cffi,
  the Python one under python), requests completed in order; packed rings;
* vdb: ``vhostpy blk --store slow_file_store:from_env``: an async store over an image that
  completes requests out of order, which only the inflight region recovers; packed rings
  (the inflight region's packed layout);
* vdc: qemu-storage-daemon exporting an image the same way, killed and restarted the same
  way, for comparison: what happens to it is printed (``-s`` shows it), not asserted;
* vdd: ``vhostpy blk --image`` with ext4 (made on the host) that the guest keeps writing
  and fsyncing files on; after the run it unmounts it, and the host checks the image with
  ``e2fsck -fn`` and every file (read with debugfs) against the guest's MD5s;
* eth0: ``vhostpy net`` (its responder answers ping), also killed and restarted: the guest
  pings through the restarts without doing anything about them (a few pings may be lost),
  and a last round of pings after them must all come back.

The guest runs `rwverify` (tests/guestprogs/rwverify.c, built static here) on each disk: 8
processes writing and reading back 4 KiB blocks with O_DIRECT for 30 s, then checking every
block they wrote. Meanwhile every back-end is SIGKILLed and started again on its socket,
twice. Asserted for both vhostpy disks: no I/O error and no mismatch in the guest, the last
write (block 0's marker, written after the run) is on the image, and (vdb) the restarted
back-end served again requests its predecessor had taken and not completed.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from netguest import RESPONDER_IP, configure, ping_stats
from qemu_guest import require_qemu, start_guest
from tools import require_tool

from vhostpy.testing.backends import BackendProcess, wait_for_socket
from vhostpy.testing.qemu import VhostUserDevice

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
IMAGE_SIZE = 16 * MiB
BLOCKS = 2048            # 8 MiB of each disk is written
SECONDS = 30
WORKERS = 8
KILL_AT = (9.0, 19.0)    # seconds into the run
RECONNECT = {"reconnect": 1}
MAX_FILES = 150
PINGS = 60                 # at 2/s: through both restarts
MAX_LOST = 12

GUEST_SCRIPT = configure() + r"""
for d in vda vdb vdc vdd; do [ -b /dev/$d ] || echo "missing /dev/$d"; done
mkdir -p /mnt && mount -t ext4 /dev/vdd /mnt || echo "ext4-mount-failed"
ping -c 1 -W 5 {responder} > /dev/null
/rwverify /dev/vda {blocks} {seconds} {workers} file > /tmp/vda.out 2>&1 &
a=$!
/rwverify /dev/vdb {blocks} {seconds} {workers} async > /tmp/vdb.out 2>&1 &
b=$!
/rwverify /dev/vdc {blocks} {seconds} {workers} qsd > /tmp/vdc.out 2>&1 &
(
  read up rest < /proc/uptime; end=$(( ${{up%.*}} + {seconds} )); i=0
  while [ $i -lt {max_files} ]; do
    read up rest < /proc/uptime; [ ${{up%.*}} -lt $end ] || break
    i=$((i + 1))
    dd if=/dev/urandom of=/mnt/f$i bs=1k count=$(( i % 48 + 1 )) conv=fsync 2>/dev/null       || echo "ext4-write-error=$i"
  done
  sync; (cd /mnt && md5sum f*) > /tmp/ext4.md5; umount /mnt && echo "ext4-umount=ok"
  echo "ext4-files=$i"
) > /tmp/ext4.out 2>&1 &
e=$!
ping -i 0.5 -c {pings} {responder} > /tmp/ping1.out 2>&1 &
p=$!
echo "rwverify-started"
wait $a; echo "vda-rc=$?"
wait $b; echo "vdb-rc=$?"
wait $e; wait $p
ping -i 0.2 -c 10 {responder} > /tmp/ping2.out 2>&1
cat /tmp/ext4.out; sed 's/^/md5 /' /tmp/ext4.md5
tail -n 2 /tmp/ping1.out; tail -n 2 /tmp/ping2.out
# qemu-storage-daemon's disk: reported, never waited for past a deadline
n=0; while [ ! -s /tmp/vdc.done ] && [ $n -lt 40 ]; do
  grep -q "^rwverify qsd" /tmp/vdc.out && echo 1 > /tmp/vdc.done; sleep 1; n=$((n+1)); done
echo "qsd-finished=$([ -s /tmp/vdc.done ] && echo yes || echo no)"
cat /tmp/vda.out /tmp/vdb.out /tmp/vdc.out | tail -n 40
"""


def build_rwverify(out: Path) -> Path:
    gcc = require_tool("gcc", "apt build-essential")
    exe = out / "rwverify"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(exe),
                    str(HERE / "guestprogs" / "rwverify.c")], check=True)
    return exe


class Qsd:
    """qemu-storage-daemon exporting `image` as vhost-user-blk at `sock`."""

    def __init__(self, image: Path, sock: Path, log: Path) -> None:
        self.argv = [require_tool("qemu-storage-daemon", "apt qemu-utils"),
                     "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
                     "--export", ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                                  f"addr.path={sock},writable=on")]
        self.sock, self.log = sock, log
        self.start()

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for_socket(str(self.sock), 10, self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def check_ext4(image: Path, console: str, out: Path) -> int:
    """e2fsck -fn is clean and every file the guest listed matches its MD5; returns the
    number of files."""
    e2fsck = require_tool("e2fsck", "apt e2fsprogs")
    debugfs = require_tool("debugfs", "apt e2fsprogs")
    fsck = subprocess.run([e2fsck, "-fn", str(image)], check=False, capture_output=True,
                          text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = {name: digest for digest, name in
            re.findall(r"^md5 ([0-9a-f]{32})  (f\d+)$", console, re.MULTILINE)}
    assert sums, console
    out.mkdir()
    commands = out / "dump.cmds"
    commands.write_text("".join(f"dump /{name} {out / name}\n" for name in sums))
    subprocess.run([debugfs, "-f", str(commands), str(image)], check=True,
                   capture_output=True)
    for name, digest in sums.items():
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == digest, name
    return len(sums)


def marker(image: Path) -> bytes:
    with open(image, "rb") as f:
        return f.read(64).rstrip(b"\0")


#: The disks whose rings are packed (`packed=on`).
PACKED = ("file", "async")


def test_blk_backends_killed_and_restarted_under_io(tmp_path: Path) -> None:
    require_qemu()
    exe = build_rwverify(tmp_path)
    images = {name: tmp_path / f"{name}.img" for name in ("file", "async", "qsd", "ext4")}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE if image != images["ext4"] else 64 * MiB)
    subprocess.run([require_tool("mkfs.ext4", "apt e2fsprogs"), "-q", "-F",
                    str(images["ext4"])], check=True)
    socks = {name: tmp_path / f"{name}.sock" for name in (*images, "net")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
           "VHOSTPY_TEST_STORE_IMAGE": str(images["async"])}

    def start(name: str, generation: int) -> BackendProcess:
        log = tmp_path / f"{name}-{generation}.log"
        if name == "net":
            return BackendProcess("net", ["-v"], [str(socks[name])], log, env=env)
        args = ["-v", "--store", "slow_file_store:from_env"] if name == "async" else \
            ["-v", "--image", str(images[name])]
        return BackendProcess("blk", args, [str(socks[name])], log, env=env)

    backends = {name: start(name, 0) for name in ("file", "async", "ext4", "net")}
    qsd = Qsd(images["qsd"], socks["qsd"], tmp_path / "qsd.log")
    # vda and vdb use packed rings (the packed inflight layout, compiled and Python paths);
    # qemu-storage-daemon does not offer them, vdd keeps split rings.
    devices = [VhostUserDevice(str(socks[name]), "blk", chardev_properties=RECONNECT,
                               properties={"packed": "on"} if name in PACKED else {})
               for name in ("file", "async", "qsd", "ext4")]
    devices.append(VhostUserDevice(str(socks["net"]), "net", chardev_properties=RECONNECT))
    script = GUEST_SCRIPT.format(blocks=BLOCKS, seconds=SECONDS, workers=WORKERS,
                                 responder=RESPONDER_IP, max_files=MAX_FILES, pings=PINGS)
    try:
        with start_guest(script, devices=devices, files={"rwverify": exe.read_bytes()},
                         timeout=300) as guest:
            guest.wait_for_text("rwverify-started", timeout=120)
            began = time.monotonic()
            for generation, at in enumerate(KILL_AT, start=1):
                time.sleep(max(0.0, began + at - time.monotonic()))
                for name, proc in backends.items():
                    proc.stop(signal.SIGKILL)
                qsd.kill()
                for name in backends:
                    backends[name] = start(name, generation)
                qsd.start()
            result = guest.wait()
    finally:
        for proc in backends.values():
            proc.stop()
        qsd.kill()
    console = result.console
    print(console)
    values = result.values
    assert "missing" not in console, console
    for name, disk in (("file", "vda"), ("async", "vdb")):
        summary = re.search(rf"^rwverify {name} writes=(\d+) reads=(\d+) errors=(\d+) "
                            r"mismatches=(\d+)", console, re.MULTILINE)
        assert summary, (name, console)
        writes, _, errors, mismatches = map(int, summary.groups())
        assert (errors, mismatches) == (0, 0), (name, console)
        assert values.get(f"{disk}-rc") == "0", (name, console)
        assert writes > 200, (name, writes)   # the disk kept working through both kills
        assert marker(images[name]) == f"LAST-WRITE {name} {writes}".encode(), name
    for name in PACKED:      # every generation of their back-ends served packed rings
        for generation in range(len(KILL_AT) + 1):
            text = (tmp_path / f"{name}-{generation}.log").read_text()
            assert re.search(r"driver features \S+ \([^)]*RING_PACKED", text), (name, text)
    restarted = [(tmp_path / f"async-{g}.log").read_text() for g in (1, 2)]
    resubmitted = sum(int(n) for log in restarted
                      for n in re.findall(r"serving again (\d+) requests", log))
    assert resubmitted > 0, restarted
    print(f"vdb: {resubmitted} requests served again after the two restarts")
    # ext4 on vdd: written and fsynced through both restarts, clean and byte-exact.
    assert values.get("ext4-umount") == "ok" and "ext4-write-error" not in console, console
    files = check_ext4(images["ext4"], console, tmp_path / "ext4-files")
    assert files >= 20, files
    print(f"vdd: {files} files on ext4, e2fsck -fn clean, every file byte-exact")
    # eth0: the link came back by itself after each restart; nothing lost at the end.
    stats = ping_stats(console)
    assert len(stats) == 2, console
    (sent1, got1), (sent2, got2) = stats
    assert sent1 == PINGS and sent1 - got1 <= MAX_LOST, stats
    assert (sent2, got2) == (10, 10), stats
    print(f"eth0: {sent1 - got1} of {sent1} pings lost across the restarts, none after")
    print(f"qemu-storage-daemon: finished={values.get('qsd-finished')}")
