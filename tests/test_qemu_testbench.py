"""The block test bench with a real guest (QEMU, TCG), in one boot with three disks:

* vdc, `vhostpy blk --fault none --control`: rules added through the control socket while
  the device runs; the guest's writes to the failing range get EIO and leave the image
  untouched there, other writes land; a delayed range shows in the guest's read latency.
* vdb, `vhostpy blk --log-writes`: the guest writes, fsyncs and deletes files on ext4;
  afterwards every flush point of the log, rebuilt on the starting image with
  `vhostpy.writelog.Replay` (and the last one with `vhostpy replay`), is clean under
  `e2fsck -fy` then `e2fsck -fn`.
* vda, `vhostpy blk --write-cache --control`: ext4 under a write-and-fsync workload, power cut
  at random moments (every other cut torn) for ROUNDS rounds. After each cut the guest
  notices the EIO, unbinds and rebinds its virtio-blk driver (the device reset that brings
  the power back), checks the disk with `e2fsck -fy` then `e2fsck -fn`, mounts it and
  checks every file it had fsynced (file and directory) before the cut, by MD5. `-fy` may
  repair what any crash leaves (orphan inodes, the superblock's free counts, which ext4
  does not journal) and exit 1; `-fn` after it must find nothing.

The stores under test (FaultyStore, LoggedStore, WriteCache) are always served by the
Python data path, whatever VHOSTPY_IMPLEMENTATION says, so ci/test.sh (which runs the suite
once per implementation) boots this guest once: not in its VHOSTPY_IMPLEMENTATION=cffi run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_guest import host_binary, require_qemu, start_guest
from tools import boots_once_per_suite, require_tool

from vhostpy.control import request
from vhostpy.writelog import Replay

MiB = 1 << 20
SECTOR = 512
ROUNDS = 20
E2FSPROGS = "apt e2fsprogs; ci/qemu/install-deps.sh installs it"
FAIL_SECTORS = (2048, 4095)       # vdc: writes there fail
SLOW_SECTORS = (8192, 8199)       # vdc: reads there wait DELAY_MS
DELAY_MS = 300

GUEST_SCRIPT = r"""
uptime_cs() {{ read up rest < /proc/uptime; echo "${{up%.*}}${{up#*.}}"; }}

# -- vdc: faults added through the control socket ----------------------------------------
dd if=/dev/zero of=/dev/vdc bs=512 seek={fail_first} count=8 conv=fsync 2>/tmp/dd.err
echo "fault-write-rc=$?"
echo "fault-write-err=$(grep -c 'Input/output error' /tmp/dd.err)"
dd if=/dev/zero of=/dev/vdc bs=512 seek=0 count=8 conv=fsync 2>/dev/null
echo "plain-write-rc=$?"
t0=$(uptime_cs)
for i in 1 2 3; do dd if=/dev/vdc of=/dev/null bs=512 skip=100 count=1 iflag=direct 2>/dev/null; done
t1=$(uptime_cs)
for i in 1 2 3; do dd if=/dev/vdc of=/dev/null bs=512 skip={slow_first} count=1 iflag=direct 2>/dev/null; done
t2=$(uptime_cs)
echo "plain-read-cs=$((t1 - t0))"
echo "slow-read-cs=$((t2 - t1))"

# -- vdb: an ext4 run with every write logged --------------------------------------------
mkdir -p /mnt/b
mount -t ext4 /dev/vdb /mnt/b && mkdir -p /mnt/b/d || exit 11
for i in $(seq 1 10); do
    dd if=/dev/urandom of=/mnt/b/d/f$i bs=1k count=$((RANDOM % 64 + 1)) conv=fsync 2>/dev/null
    sync /mnt/b/d
done
rm /mnt/b/d/f3 /mnt/b/d/f7 && mv /mnt/b/d/f5 /mnt/b/f5 && sync
umount /mnt/b || exit 12
echo LOG-RUN-DONE

# -- vda: power cuts ------------------------------------------------------------------------
DEV=$(basename "$(readlink /sys/block/vda/device)")
DRV=/sys/bus/virtio/drivers/virtio_blk
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a && mkdir -p /mnt/a/d && sync || exit 13
: > /tmp/manifest
# Dirty pages go to the disk within 0.1 s, without a flush: the cache is rarely empty.
echo 10 > /proc/sys/vm/dirty_writeback_centisecs
echo 10 > /proc/sys/vm/dirty_expire_centisecs
round=0
while [ $round -lt {rounds} ]; do
    echo "ROUND-START $round $(uptime_cs)"
    rm -f /tmp/stop
    (while [ ! -e /tmp/stop ] && dd if=/dev/urandom of=/mnt/a/scratch bs=64k count=8 \
        2>/dev/null; do :; done) &
    scratch=$!
    k=0
    while :; do
        f=r$round-$k
        dd if=/dev/urandom of=/mnt/a/d/$f bs=1k count=$((RANDOM % 48 + 1)) conv=fsync \
            2>/dev/null || break
        sync /mnt/a/d 2>/dev/null || break
        echo "$(md5sum /mnt/a/d/$f | cut -d' ' -f1)  $f" >> /tmp/manifest
        k=$((k + 1))
        [ $k -lt 5000 ] || {{ echo "no power cut came"; exit 14; }}
    done
    echo "ROUND-CUT $round $k $(uptime_cs)"
    touch /tmp/stop; wait $scratch
    umount /mnt/a || exit 18
    echo $DEV > $DRV/unbind
    echo $DEV > $DRV/bind
    n=0
    while ! disk=/dev/$(ls /sys/bus/virtio/devices/$DEV/block 2>/dev/null) || \
            [ ! -b $disk ]; do
        n=$((n + 1)); [ $n -lt 100 ] || exit 19; sleep 0.1
    done
    {e2fsck} -fy $disk > /tmp/fy.out 2>&1; fy=$?
    {e2fsck} -fn $disk > /tmp/fn.out 2>&1; fn=$?
    echo "FSCK $round $fy $fn"
    [ $fy -le 1 ] && [ $fn = 0 ] || {{ cat /tmp/fy.out /tmp/fn.out; exit 15; }}
    mount -t ext4 $disk /mnt/a || exit 16
    (cd /mnt/a/d && md5sum -c /tmp/manifest > /tmp/md5.out 2>&1); md5=$?
    echo "MD5 $round $md5 $(wc -l < /tmp/manifest) $(uptime_cs)"
    [ $md5 = 0 ] || {{ grep -v ': OK$' /tmp/md5.out | head; exit 17; }}
    round=$((round + 1))
done
umount /mnt/a
echo ALL-ROUNDS-DONE
"""


def _mkfs(image: Path, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([require_tool("mke2fs", E2FSPROGS), "-q", "-t", "ext4", "-F", str(image)],
                   check=True)


def _fsck(image: Path) -> tuple[int, int, str]:
    """(`e2fsck -fy` status, `e2fsck -fn` status, their output) of an image."""
    e2fsck = require_tool("e2fsck", E2FSPROGS)
    fy = subprocess.run([e2fsck, "-fy", str(image)], capture_output=True, text=True,
                        check=False)
    fn = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True,
                        check=False)
    return fy.returncode, fn.returncode, fy.stdout + fn.stdout


@pytest.mark.qemu
def test_faults_write_log_and_power_cuts_in_one_guest(tmp_path: Path, backend: Any) -> None:
    boots_once_per_suite("FaultyStore, LoggedStore and WriteCache")
    require_qemu()
    files, e2fsck = host_binary(require_tool("e2fsck", E2FSPROGS), "fsck")
    rng = random.Random(int(os.environ.get("VHOSTPY_TESTBENCH_SEED", "20261202")))

    raw = tmp_path / "faults.img"
    original = rng.randbytes(8 * MiB)
    raw.write_bytes(original)
    logged, base, wlog = tmp_path / "logged.img", tmp_path / "base.img", tmp_path / "w.log"
    _mkfs(logged, 8 * MiB)
    shutil.copy(logged, base)
    cut_image = tmp_path / "cut.img"
    _mkfs(cut_image, 32 * MiB)
    ctl_c, ctl_a = str(tmp_path / "ctl-c"), str(tmp_path / "ctl-a")
    vda = backend("blk", "--image", str(cut_image), "--write-cache", "--control", ctl_a,
                  name="a.sock")
    vdb = backend("blk", "--image", str(logged), "--log-writes", str(wlog), name="b.sock")
    vdc = backend("blk", "--image", str(raw), "--fault", "none", "--control", ctl_c,
                  name="c.sock")
    fail = "ioerr,op=write,sectors={}-{}".format(*FAIL_SECTORS)
    slow = "delay,op=read,ms={},sectors={}-{}".format(DELAY_MS, *SLOW_SECTORS)
    for rule in (fail, slow):
        request(ctl_c, "fault", ["add", rule])
    script = GUEST_SCRIPT.format(e2fsck=e2fsck, rounds=ROUNDS, fail_first=FAIL_SECTORS[0],
                                 slow_first=SLOW_SECTORS[0])
    cuts: list[dict[str, Any]] = []
    with start_guest(script, blk_sockets=[vda.path, vdb.path, vdc.path], files=files,
                     timeout=600) as guest:
        for n in range(ROUNDS):
            guest.wait_for_text(f"ROUND-START {n} ", timeout=120)
            time.sleep(rng.uniform(0.2, 0.8))
            cuts.append(request(ctl_a, "power-cut", ["torn"] if n % 2 else []))
        result = guest.wait()
    outputs = vda.output() + vdb.output() + vdc.output()
    assert result.exit_code == 0, result.raw_console + outputs
    console = result.console

    # vdc: the failing range failed and is untouched; the rest was written; delays showed.
    values = dict(re.findall(r"^([\w-]+)=(\S+)$", console, re.MULTILINE))
    assert values["fault-write-rc"] != "0" and values["fault-write-err"] != "0", console
    assert values["plain-write-rc"] == "0", console
    slow, plain = int(values["slow-read-cs"]), int(values["plain-read-cs"])
    assert slow >= 3 * DELAY_MS // 10 - 5 and slow - plain >= 3 * DELAY_MS // 10 - 10, \
        (slow, plain)
    counters = request(ctl_c, "status", [])["counters"]["faults"]
    assert counters["errors"] >= 1 and counters["delays"] == 3, counters
    image = raw.read_bytes()
    first, last = FAIL_SECTORS[0] * SECTOR, (FAIL_SECTORS[1] + 1) * SECTOR
    assert image[first:last] == original[first:last]
    assert image[:8 * SECTOR] == bytes(8 * SECTOR)
    assert image[8 * SECTOR:first] == original[8 * SECTOR:first]

    # vda: every round's checks passed in the guest, and the cuts really lost writes.
    rounds = re.findall(r"^FSCK (\d+) (\d) (\d)$", console, re.MULTILINE)
    md5s = re.findall(r"^MD5 (\d+) (\d+) (\d+) \d+$", console, re.MULTILINE)
    assert len(rounds) == len(md5s) == ROUNDS, console
    assert all(fn == "0" for _, _, fn in rounds) and all(m == "0" for _, m, _ in md5s)
    assert int(md5s[-1][2]) >= ROUNDS, "too few files were fsynced to check anything"
    assert sum(c["dropped_writes"] for c in cuts) > 0, cuts
    assert any(c["torn"] for c in cuts), cuts
    assert vda.stop() == 0 and vdb.stop() == 0
    fy, fn, out = _fsck(cut_image)
    assert (fy, fn) == (0, 0), out

    # vdb: every flush point of the log is a clean file system.
    work = tmp_path / "replay.img"
    shutil.copy(base, work)
    check = tmp_path / "check.img"
    replay = Replay(str(wlog), str(work))
    try:
        while (point := replay.step()) is not None:
            replay.store.flush()
            shutil.copy(work, check)
            fy, fn, out = _fsck(check)
            assert fy <= 1 and fn == 0, f"flush point {point}:\n{out}"
        points = replay.flush
    finally:
        replay.close()
    assert points >= 10, f"only {points} flush points in the log"
    cli_copy = tmp_path / "cli.img"
    shutil.copy(base, cli_copy)
    done = subprocess.run([sys.executable, "-m", "vhostpy", "replay", str(wlog), str(cli_copy)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert cli_copy.read_bytes() == work.read_bytes() == logged.read_bytes()
