"""`vhostpy blk` against real QEMU guests: what a Linux virtio-blk driver sees and does.

Each test boots TCG guests (~6 s each, see ``ci/qemu/README.md``) against a
``python -m vhostpy blk`` process started by the ``backend`` fixture, which on teardown
SIGTERMs it and checks that it exits 0 and removes its socket.  Checks are exact: sizes in
sectors, serial strings, MD5s of regions compared with what the host wrote, and whole-image
comparisons after the guest powered off.

Images live under pytest's ``tmp_path`` (a disk path): O_DIRECT on tmpfs needs host
kernel 6.6 or later.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_guest import boot_guest, console_values, host_binary, require_qemu, start_guest
from tools import require_tool

MiB = 1 << 20
GUEST_TIMEOUT = 120


def _pattern(seed: int, size: int) -> bytes:
    """Deterministic, incompressible bytes (no two seeds alike)."""
    return random.Random(seed).randbytes(size)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _make_image(path: Path, size: int, chunks: dict[int, bytes]) -> bytearray:
    """Write a zero image of `size` bytes holding `chunks` at their offsets; return its bytes."""
    image = bytearray(size)
    for offset, data in chunks.items():
        image[offset:offset + len(data)] = data
    path.write_bytes(image)
    return image


def _md5_cmd(key: str, offset: int, length: int, flags: str = "") -> str:
    """Guest shell line printing ``key=<md5 of length bytes of /dev/vda at offset>``."""
    assert offset % 512 == 0 and length % 512 == 0
    return (f'echo "{key}=$({flags}dd if=/dev/vda bs=512 skip={offset // 512} '
            f'count={length // 512} 2>/dev/null | md5sum | cut -d" " -f1)"')


# --------------------------------------------------------------------------------------------
# 1 + 5: capacity, serial, reads, a 2 MiB write, O_DIRECT re-read; on two queues


#: 48 MiB plus 7 sectors: not a multiple of 4 KiB, so a rounded capacity would show.
RW_IMAGE_SIZE = 48 * MiB + 7 * 512
RW_SERIAL = "VHOSTPY-BLK-SER-0020"  # exactly VIRTIO_BLK_ID_BYTES (20): no NUL terminator
#: Host-written patterns (offset -> bytes), some not 4 KiB aligned; the last ends the disk.
RW_HOST_CHUNKS = {
    0: _pattern(1, 4096),
    1 * MiB + 512: _pattern(2, 4096),
    20 * MiB + 3 * 512: _pattern(3, 8192),
    RW_IMAGE_SIZE - 7 * 512: _pattern(4, 7 * 512),
}
RW_WRITE_OFFSET = 8 * MiB
RW_WRITE_DATA = _pattern(5, 2 * MiB)


@pytest.mark.qemu
def test_guest_io_capacity_serial_multiqueue(tmp_path: Path, backend) -> None:
    require_qemu()
    img = tmp_path / "disk.img"
    expected = _make_image(img, RW_IMAGE_SIZE, RW_HOST_CHUNKS)
    be = backend("blk", "--image", str(img), "--serial", RW_SERIAL, "--num-queues", "2")

    reads = "\n".join(_md5_cmd(f"host{i}", off, len(data))
                      for i, (off, data) in enumerate(RW_HOST_CHUNKS.items()))
    seek_mib = RW_WRITE_OFFSET // MiB
    script = f"""
set -e
echo "size=$(cat /sys/block/vda/size)"
echo "serial=$(cat /sys/block/vda/serial)"
echo "ro=$(cat /sys/block/vda/ro)"
echo "nr_queues=$(ls /sys/block/vda/mq | wc -l)"
echo "cpus_q0=$(cat /sys/block/vda/mq/0/cpu_list)"
echo "cpus_q1=$(cat /sys/block/vda/mq/1/cpu_list)"
echo "head=$(dd if=/dev/vda bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')"
{reads}
dd if=/data.bin of=/dev/vda bs=1M seek={seek_mib} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
# O_DIRECT re-reads pinned to each CPU: blk-mq maps CPU n to hardware queue n.
{_md5_cmd("reread_cpu0", RW_WRITE_OFFSET, len(RW_WRITE_DATA), "taskset -c 0 ")}
{_md5_cmd("reread_cpu1", RW_WRITE_OFFSET, len(RW_WRITE_DATA), "taskset -c 1 ")}
echo "reread_direct=$(dd if=/dev/vda bs=1M skip={seek_mib} count=2 iflag=direct 2>/dev/null \\
    | md5sum | cut -d' ' -f1)"
"""
    result = boot_guest(
        script, blk_sockets=[be.path], blk_options={"num-queues": 2},
        extra_args=["-smp", "2"], files={"data.bin": RW_WRITE_DATA}, timeout=GUEST_TIMEOUT,
    )
    assert result.exit_code == 0, result.raw_console + be.output()
    v = console_values(result.console)

    assert v["size"] == str(RW_IMAGE_SIZE // 512)
    assert v["serial"] == RW_SERIAL
    assert v["ro"] == "0"
    assert v["nr_queues"] == "2"
    assert (v["cpus_q0"], v["cpus_q1"]) == ("0", "1")
    assert v["head"] == RW_HOST_CHUNKS[0][:16].hex()
    for i, data in enumerate(RW_HOST_CHUNKS.values()):
        assert v[f"host{i}"] == _md5(data), f"host pattern {i} read back wrong"
    want = _md5(RW_WRITE_DATA)
    assert v["reread_cpu0"] == want
    assert v["reread_cpu1"] == want
    assert v["reread_direct"] == want

    # The image holds exactly the guest's 2 MiB at its offset and nothing else changed.
    expected[RW_WRITE_OFFSET:RW_WRITE_OFFSET + len(RW_WRITE_DATA)] = RW_WRITE_DATA
    actual = img.read_bytes()
    assert len(actual) == RW_IMAGE_SIZE
    assert actual[RW_WRITE_OFFSET:RW_WRITE_OFFSET + len(RW_WRITE_DATA)] == RW_WRITE_DATA
    assert actual == expected
    assert be.alive()


# --------------------------------------------------------------------------------------------
# 2: the guest makes an ext4 file system; the host's e2fsprogs check and read it

E2FSPROGS = "apt e2fsprogs; ci/qemu/install-deps.sh installs it"


def _guest_mke2fs() -> tuple[dict[str, bytes], str]:
    """The host's mke2fs with its shared libraries, for the guest (busybox mke2fs is ext2-only).

    Returns the ``files=`` entries and the guest command (see `host_binary`).
    """
    files, command = host_binary(require_tool("mke2fs", E2FSPROGS), "e2fs")
    if os.path.exists("/etc/mke2fs.conf"):  # the host's ext4 feature defaults
        files["etc/mke2fs.conf"] = Path("/etc/mke2fs.conf").read_bytes()
    return files, command


EXT4_IMAGE_SIZE = 64 * MiB
EXT4_FILES = {
    "/hello.txt": b"hello from a vhostpy guest\n",
    "/dir/sub/big.bin": _pattern(20, 3 * MiB + 123),
    "/dir/empty": b"",
}


@pytest.mark.qemu
def test_guest_mkfs_ext4_host_fsck_and_read(tmp_path: Path, backend) -> None:
    require_qemu()
    e2fsck, debugfs, dumpe2fs = (require_tool(t, E2FSPROGS)
                                 for t in ("e2fsck", "debugfs", "dumpe2fs"))
    files, mke2fs = _guest_mke2fs()
    files["big.bin"] = EXT4_FILES["/dir/sub/big.bin"]
    img = tmp_path / "fs.img"
    _make_image(img, EXT4_IMAGE_SIZE, {0: _pattern(21, 64 * 1024)})  # old junk to overwrite
    be = backend("blk", "--image", str(img))

    script = f"""
set -e
{mke2fs} -t ext4 -F -q -L vhostpy-guest /dev/vda
mount -t ext4 /dev/vda /mnt
echo "fstype=$(awk '$1 == "/dev/vda" {{print $3}}' /proc/mounts)"
printf 'hello from a vhostpy guest\\n' > /mnt/hello.txt
mkdir -p /mnt/dir/sub
cp /big.bin /mnt/dir/sub/big.bin
: > /mnt/dir/empty
sync
echo "big=$(md5sum < /mnt/dir/sub/big.bin | cut -d' ' -f1)"
umount /mnt
echo unmounted
"""
    result = boot_guest(script, blk_sockets=[be.path], files=files, timeout=GUEST_TIMEOUT)
    assert result.exit_code == 0, result.raw_console + be.output()
    v = console_values(result.console)
    assert v["fstype"] == "ext4"
    assert v["big"] == _md5(EXT4_FILES["/dir/sub/big.bin"])
    assert "unmounted" in result.lines

    fsck = subprocess.run([e2fsck, "-fn", str(img)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run([dumpe2fs, "-h", str(img)], capture_output=True, text=True,
                            check=True).stdout
    features = re.search(r"^Filesystem features:\s*(.*)$", header, re.MULTILINE)
    assert features is not None, header
    for feature in ("has_journal", "extent", "64bit", "metadata_csum"):
        assert feature in features.group(1).split(), header  # ext4, not ext2
    label = re.search(r"^Filesystem volume name:\s*(.*)$", header, re.MULTILINE)
    assert label is not None and label.group(1) == "vhostpy-guest", header
    for path, data in EXT4_FILES.items():
        out = subprocess.run([debugfs, "-R", f"cat {path}", str(img)], capture_output=True,
                             check=True)
        assert out.stdout == data, f"{path}: {len(out.stdout)} bytes, want {len(data)}"
    assert be.alive()


# --------------------------------------------------------------------------------------------
# 3: --read-only


RO_IMAGE_SIZE = 16 * MiB


@pytest.mark.qemu
def test_read_only_guest_cannot_write(tmp_path: Path, backend) -> None:
    require_qemu()
    img = tmp_path / "ro.img"
    chunk = _pattern(30, 64 * 1024)
    _make_image(img, RO_IMAGE_SIZE, {MiB: chunk})
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    stat_before = img.stat()
    be = backend("blk", "--image", str(img), "--read-only")

    script = f"""
echo "ro=$(cat /sys/block/vda/ro)"
echo "getro=$(blockdev --getro /dev/vda)"
echo "size=$(cat /sys/block/vda/size)"
{_md5_cmd("read", MiB, len(chunk))}
dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null; echo "dd_rc=$?"
dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=256 oflag=direct 2>/dev/null
echo "dd_direct_rc=$?"
# Clearing the block layer's flag does not help: the disk itself stays read-only.
blockdev --setrw /dev/vda 2>/dev/null
dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=256 conv=fsync 2>/dev/null
echo "dd_setrw_rc=$?"
mke2fs -F /dev/vda >/dev/null 2>&1; echo "mkfs_rc=$?"
echo 3 > /proc/sys/vm/drop_caches
{_md5_cmd("reread", MiB, len(chunk), "")}
"""
    result = boot_guest(script, blk_sockets=[be.path], timeout=GUEST_TIMEOUT)
    assert result.exit_code == 0, result.raw_console + be.output()
    v = console_values(result.console)
    assert v["ro"] == "1"
    assert v["getro"] == "1"
    assert v["size"] == str(RO_IMAGE_SIZE // 512)
    assert v["read"] == v["reread"] == _md5(chunk)
    for key in ("dd_rc", "dd_direct_rc", "dd_setrw_rc", "mkfs_rc"):
        assert v[key] != "0", f"{key}: a write to a read-only disk succeeded"

    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    assert img.stat().st_size == stat_before.st_size
    assert img.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert be.alive()


# --------------------------------------------------------------------------------------------
# 4: one back-end process, three guests in a row, the second one SIGKILLed mid-write


SEQ_IMAGE_SIZE = 32 * MiB
SEQ_A_OFFSET, SEQ_A = 4 * MiB, _pattern(40, MiB)           # guest 1, clean power-off
SEQ_B_OFFSET, SEQ_B = 16 * MiB, _pattern(41, 256 * 1024)   # guest 2, fsynced before the marker
SEQ_LOOP_START, SEQ_LOOP_END = 24 * MiB, 30 * MiB           # guest 2's endless writes
SEQ_C_OFFSET, SEQ_C = 8 * MiB, _pattern(42, 512 * 1024)    # guest 3, after the crash
SEQ_MARKER = "VHOSTPY-WRITE-LOOP-RUNNING"


@pytest.mark.qemu
def test_one_backend_serves_three_guests_across_a_crash(tmp_path: Path, backend) -> None:
    require_qemu()
    img = tmp_path / "seq.img"
    expected = _make_image(img, SEQ_IMAGE_SIZE, {})
    be = backend("blk", "--image", str(img))
    pid = be.proc.pid

    # Guest 1 writes A and powers off normally.
    r1 = boot_guest(
        f"set -e\ndd if=/a.bin of=/dev/vda bs=64k seek={SEQ_A_OFFSET // 65536} conv=fsync "
        "2>/dev/null\necho wrote-a\n",
        blk_sockets=[be.path], files={"a.bin": SEQ_A}, timeout=GUEST_TIMEOUT,
    )
    assert r1.exit_code == 0 and "wrote-a" in r1.lines, r1.raw_console + be.output()
    assert be.alive() and be.proc.pid == pid, be.output()
    expected[SEQ_A_OFFSET:SEQ_A_OFFSET + len(SEQ_A)] = SEQ_A
    assert img.read_bytes() == expected

    # Guest 2 writes B (fsynced), announces its write loop, and is SIGKILLed inside it.
    loop_blocks = (SEQ_LOOP_END - SEQ_LOOP_START) // 65536 - 16
    script2 = f"""
dd if=/b.bin of=/dev/vda bs=64k seek={SEQ_B_OFFSET // 65536} conv=fsync 2>/dev/null || exit 1
i=0
while :; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=16 \\
        seek=$(({SEQ_LOOP_START // 65536} + i % {loop_blocks})) conv=fsync 2>/dev/null
    i=$((i + 1))
    [ "$i" = 2 ] && echo "{SEQ_MARKER}"
done
"""
    with start_guest(script2, blk_sockets=[be.path], files={"b.bin": SEQ_B},
                     timeout=GUEST_TIMEOUT) as g2:
        g2.wait_for_text(SEQ_MARKER, timeout=90)
        g2.kill()
        assert not g2.is_running()
    assert be.alive() and be.proc.pid == pid, be.output()

    # Guest 3 reads A and B back (O_DIRECT) and writes C.
    script3 = f"""
set -e
{_md5_cmd("a", SEQ_A_OFFSET, len(SEQ_A), "")}
echo "a_direct=$(dd if=/dev/vda bs=64k skip={SEQ_A_OFFSET // 65536} count={len(SEQ_A) // 65536} \\
    iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
{_md5_cmd("b", SEQ_B_OFFSET, len(SEQ_B), "")}
dd if=/c.bin of=/dev/vda bs=64k seek={SEQ_C_OFFSET // 65536} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
{_md5_cmd("c", SEQ_C_OFFSET, len(SEQ_C), "")}
"""
    r3 = boot_guest(script3, blk_sockets=[be.path], files={"c.bin": SEQ_C},
                    timeout=GUEST_TIMEOUT)
    assert r3.exit_code == 0, r3.raw_console + be.output()
    v = console_values(r3.console)
    assert v["a"] == v["a_direct"] == _md5(SEQ_A)
    assert v["b"] == _md5(SEQ_B)
    assert v["c"] == _md5(SEQ_C)
    assert be.alive() and be.proc.pid == pid, be.output()

    # Outside guest 2's loop region the image is exactly A, B, C and zeros.
    expected[SEQ_B_OFFSET:SEQ_B_OFFSET + len(SEQ_B)] = SEQ_B
    expected[SEQ_C_OFFSET:SEQ_C_OFFSET + len(SEQ_C)] = SEQ_C
    actual = img.read_bytes()
    assert len(actual) == SEQ_IMAGE_SIZE
    assert actual[:SEQ_LOOP_START] == expected[:SEQ_LOOP_START]
    assert actual[SEQ_LOOP_END:] == expected[SEQ_LOOP_END:]
    assert actual[SEQ_LOOP_START:SEQ_LOOP_END] != expected[SEQ_LOOP_START:SEQ_LOOP_END], \
        "guest 2's write loop never reached the image"
