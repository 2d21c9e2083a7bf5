"""Block storage written in Python, in one QEMU guest (TCG): seven vhost-user disks, each
served another way, each written by four parallel O_DIRECT writers and read back.

* vda: `vhostpy blk --store` with a synchronous dict-backed store (examples/block_stores.py);
* vdb: `vhostpy blk --store` with an async store that delays every request at random (the
  back-end reports how many requests finished before an older one: they must have);
* vdc: the same async store under ext4, made in the guest and checked with `e2fsck -fn`;
* vdd: `vhostpy serve MODULE:CALLABLE` (a BlockDevice over a MemoryStore);
* vde: `vhostpy.serve(...)` from a script (examples/block_stores.py run as a program);
* vdf, vdg: `vhostpy blk --nbd` against qemu-nbd and against nbdkit: the host images hold
  the guest's bytes afterwards.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from procs import terminate
from qemu_guest import boot_guest, console_values, host_binary, require_qemu, wait_for_socket
from test_nbd import start  # noqa: F401 (the NBD server fixture)
from tools import boots_once_per_suite, require_tool

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
DISK = 64 * MiB            # examples/block_stores.py SIZE
WRITERS = 4
CHUNK = 1 * MiB            # each writer's share, written in 16 KiB O_DIRECT requests
E2FSPROGS = "apt e2fsprogs; ci/qemu/install-deps.sh installs it"
DISKS = ["vda", "vdb", "vdd", "vde", "vdf", "vdg"]     # vdc carries ext4


def _data(w: int) -> bytes:
    return random.Random(1000 + w).randbytes(CHUNK)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


GUEST_SCRIPT = """
set -e
for d in {disks}; do
    pids=""
    for w in {writers}; do
        dd if=/w$w.bin of=/dev/$d bs=16k seek=$((w * 64)) oflag=direct 2>/dev/null &
        pids="$pids $!"
    done
    rc=0
    for p in $pids; do wait $p || rc=1; done
    echo "$d-writers=$rc"
    for w in {writers}; do
        echo "$d-$w=$(dd if=/dev/$d bs=16k skip=$((w * 64)) count=64 iflag=direct \\
            2>/dev/null | md5sum | cut -d' ' -f1)"
    done
done
echo "serial-vdd=$(cat /sys/block/vdd/serial)"
echo "serial-vde=$(cat /sys/block/vde/serial)"
{mke2fs} -t ext4 -F -q /dev/vdc
mount -t ext4 /dev/vdc /mnt
mkdir -p /mnt/dir
cp /w0.bin /mnt/dir/a.bin
cp /w1.bin /mnt/b.bin
sync
echo "ext4-a=$(md5sum < /mnt/dir/a.bin | cut -d' ' -f1)"
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
set +e
{e2fsck} -fn /dev/vdc > /tmp/fsck.out 2>&1
echo "fsck=$?"
cat /tmp/fsck.out
"""


@pytest.mark.qemu
def test_python_block_stores_in_one_guest(tmp_path: Path, backend: Any,
                                         start: Any,  # noqa: F811
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    boots_once_per_suite("block stores written in Python and NBD disks")
    require_qemu()
    files, mke2fs = host_binary(require_tool("mke2fs", E2FSPROGS), "e2fs")
    fsck_files, e2fsck = host_binary(require_tool("e2fsck", E2FSPROGS), "fsck")
    files.update(fsck_files)
    if os.path.exists("/etc/mke2fs.conf"):
        files["etc/mke2fs.conf"] = Path("/etc/mke2fs.conf").read_bytes()
    for w in range(WRITERS):
        files[f"w{w}.bin"] = _data(w)
    monkeypatch.setenv("PYTHONPATH", str(REPO))    # examples.block_stores
    monkeypatch.chdir(REPO)

    dict_be = backend("blk", "--store", "examples.block_stores:dict_store", name="dict.sock")
    slow_be = backend("blk", "--store", "examples.block_stores:slow_store", name="slow.sock")
    ext4_be = backend("blk", "--store", "examples.block_stores:slow_store", name="ext4.sock")
    serve_be = backend("serve", "examples.block_stores:make_device", name="serve.sock")
    script_sock = str(tmp_path / "script.sock")
    script_log = open(tmp_path / "script.log", "wb")  # noqa: SIM115 (closed below)
    script = subprocess.Popen([sys.executable, str(REPO / "examples" / "block_stores.py"),
                               script_sock], stdout=script_log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    images = {}
    nbd_bes = []
    for kind in ("qemu-nbd", "nbdkit"):
        image = tmp_path / f"{kind}.img"
        image.write_bytes(bytes(DISK))
        images[kind] = image
        server = (start("qemu-nbd", str(image), export="disk") if kind == "qemu-nbd"
                  else start("nbdkit", "file", str(image)))
        nbd_bes.append(backend("blk", "--nbd", server.uri, name=f"{kind}.sock"))
    try:
        wait_for_socket(script_sock, proc=script)
        sockets = [dict_be.path, slow_be.path, ext4_be.path, serve_be.path, script_sock,
                   nbd_bes[0].path, nbd_bes[1].path]
        result = boot_guest(
            GUEST_SCRIPT.format(disks=" ".join(DISKS),
                                writers=" ".join(str(w) for w in range(WRITERS)),
                                mke2fs=mke2fs, e2fsck=e2fsck),
            blk_sockets=sockets, files=files, timeout=300)
    finally:
        terminate(script)
        script_log.close()
    outputs = "".join(b.output() for b in (dict_be, slow_be, ext4_be, serve_be, *nbd_bes))
    assert result.exit_code == 0, result.raw_console + outputs
    assert script.returncode == 0, (tmp_path / "script.log").read_text()
    assert not os.path.exists(script_sock), "vhostpy.serve() left its socket behind"
    v = console_values(result.console)
    for d in DISKS:
        assert v[f"{d}-writers"] == "0", f"{d}: a writer failed\n{result.console}"
        for w in range(WRITERS):
            assert v[f"{d}-{w}"] == _md5(_data(w)), f"{d}: writer {w}'s bytes read back wrong"
    assert v["serial-vdd"] == "VHOSTPY-SDK" and v["serial-vde"] == "VHOSTPY-SCRIPT"
    assert v["ext4-a"] == _md5(_data(0))
    assert v["fsck"] == "0", result.console
    # The host images of the NBD exports hold what the guest wrote.
    for image in images.values():
        data = image.read_bytes()
        for w in range(WRITERS):
            assert data[w * CHUNK:(w + 1) * CHUNK] == _data(w), f"{image.name}: writer {w}"
    # The async store really had requests overlapping and completing out of order.
    assert slow_be.stop() == 0
    summary = re.search(r"SlowStore: (\d+) requests, (\d+) finished before an older one, at "
                        r"most (\d+) in flight", slow_be.output())
    assert summary is not None, slow_be.output()
    requests, overtaken, most = map(int, summary.groups())
    assert requests >= WRITERS * 2 * CHUNK // (16 * 1024)
    assert overtaken > 0 and most >= 2, summary.group(0)
