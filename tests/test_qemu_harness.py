"""Prove the QEMU guest harness (vhostpy.testing, through tests/qemu_guest.py) against a real
vhost-user back-end.

The peer is qemu-storage-daemon's vhost-user-blk export, so a failure here is the harness's
fault, never vhostpy's.  The first tests need no QEMU (command line, console parsing, cpio);
the ``qemu`` ones boot guests (5–20 s each under TCG).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_guest import (
    EXIT_MARKER,
    START_MARKER,
    GuestError,
    GuestTimeout,
    boot_guest,
    guest_mac,
    host_binary,
    parse_console,
    qemu_command,
    require_qemu,
    start_guest,
    wait_for_socket,
)
from tools import boots_once_per_suite, require_tool

from vhostpy.testing import GuestLauncher, VhostUserDevice, guest_image

PATTERN = bytes(range(0xA0, 0xB0))  # 16 bytes the host writes at offset 0
GUEST_WRITE = b"VHOSTPY-GUEST-WR"  # 16 bytes the guest writes at 1 MiB
IMAGE_SIZE = 64 << 20
E2FSPROGS = "apt e2fsprogs; ci/qemu/install-deps.sh installs it"


# --------------------------------------------------------------------------------------------
# no QEMU needed


def test_parse_console_strips_kernel_lines_and_reads_status() -> None:
    raw = (
        "SeaBIOS noise\n[    0.5] kernel line\n"
        f"{START_MARKER}\nhello\n[    1.234567] virtio_blk virtio1: [vda] 2048 blocks\nworld\n"
        f"\n{EXIT_MARKER}3\n[    2.2] reboot: Power down\n"
    )
    assert parse_console(raw) == (3, "hello\nworld\n")
    assert parse_console("no markers at all") == (None, "")
    assert parse_console(f"{START_MARKER}\npartial") == (None, "partial")


def test_qemu_command_devices(tmp_path: Path) -> None:
    argv = qemu_command(
        kernel=Path("/k"), initrd=Path("/i"), console_path=tmp_path / "c", accel="tcg",
        blk_sockets=["/a.sock", ("/b,c.sock", {"num-queues": 2, "serial": "X"})],
        net_sockets=["/n0.sock", "/n1.sock"], net_options={"host_mtu": 9000, "mrg_rxbuf": False},
        netdev_options={"queues": 1}, memory_mb=512, extra_args=["-smp", "2"],
        qemu="qemu-system-x86_64",
    )
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in joined
    assert "q35,memory-backend=mem" in joined
    assert "socket,id=blk0,path=/a.sock" in argv
    assert "vhost-user-blk-pci,chardev=blk0,num-queues=1" in argv
    assert "socket,id=blk1,path=/b,,c.sock" in argv  # commas doubled for QEMU
    assert "vhost-user-blk-pci,chardev=blk1,num-queues=2,serial=X" in argv
    assert "vhost-user,id=hn1,chardev=net1,queues=1" in argv
    assert (f"virtio-net-pci,netdev=hn0,mac={guest_mac(0)},vectors=0,host_mtu=9000,mrg_rxbuf=off"
            in argv)
    assert guest_mac(1) == "52:54:00:12:34:51" and guest_mac(12) == "52:54:00:12:34:5c"
    assert argv[-2:] == ["-smp", "2"]


def test_overlay_archive_is_valid_cpio(tmp_path: Path) -> None:
    require_tool("cpio", "apt cpio; ci/qemu/install-deps.sh installs it")
    from qemu_guest import _initramfs

    gz = _initramfs.overlay_archive({"test.sh": "echo hi\n", "sub/data.bin": b"\0\1"})
    (tmp_path / "a.gz").write_bytes(gz)
    out = subprocess.run(
        f"zcat {tmp_path / 'a.gz'} | cpio -t 2>/dev/null", shell=True, capture_output=True,
        text=True, check=True,
    ).stdout.split()
    assert out == ["test.sh", "sub", "sub/data.bin"]


# --------------------------------------------------------------------------------------------
# real guests


@pytest.fixture
def qemu_ready() -> None:
    """Skip (or fail under CI) when QEMU or a guest kernel is missing. The harness is Python
    code that runs the same under every implementation, and its peer is qemu-storage-daemon:
    ci/test.sh boots these guests once, in its python run."""
    require_qemu()
    boots_once_per_suite("the guest harness (vhostpy.testing)")


def _start_qsd(tmp_path: Path, images: list[Path]) -> tuple[subprocess.Popen[bytes], list[str]]:
    """qemu-storage-daemon exporting each image (raw) as a vhost-user-blk socket."""
    qsd = require_tool("qemu-storage-daemon", "apt qemu-utils; ci/qemu/install-deps.sh")
    argv = [qsd]
    sockets = []
    for i, img in enumerate(images):
        sock = str(tmp_path / f"blk{i}.sock")
        sockets.append(sock)
        argv += [
            "--blockdev", f"driver=file,node-name=file{i},filename={img}",
            "--blockdev", f"driver=raw,node-name=raw{i},file=file{i}",
            "--export", (f"type=vhost-user-blk,id=exp{i},node-name=raw{i},"
                         f"addr.type=unix,addr.path={sock},writable=on"),
        ]
    with open(tmp_path / "qsd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        for s in sockets:
            wait_for_socket(s, timeout=10, proc=proc)
    except (RuntimeError, TimeoutError):
        proc.kill()
        proc.wait()
        raise RuntimeError((tmp_path / "qsd.log").read_text()) from None
    return proc, sockets


@pytest.fixture
def qsd_two_disks(tmp_path: Path, qemu_ready: None) -> Iterator[tuple[list[Path], list[str],
                                                                  subprocess.Popen[bytes]]]:
    """vda: raw image with PATTERN at 0; vdb: an ext4 image made on the host."""
    raw = tmp_path / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(PATTERN)
    ext4 = tmp_path / "ext4.img"
    with open(ext4, "wb") as f:
        f.truncate(IMAGE_SIZE)
    subprocess.run([require_tool("mkfs.ext4", E2FSPROGS), "-q", "-F", str(ext4)], check=True)
    proc, sockets = _start_qsd(tmp_path, [raw, ext4])
    yield [raw, ext4], sockets, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


GUEST_BLK_SCRIPT = r"""
set -e
echo "size=$(cat /sys/block/vda/size)"
echo "head=$(dd if=/dev/vda bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
printf 'VHOSTPY-GUEST-WR' | dd of=/dev/vda bs=16 seek=65536 conv=fsync 2>/dev/null
mount -t ext4 /dev/vdb /mnt
echo 'hello from the guest' > /mnt/hello.txt
echo "ext4=$(cat /mnt/hello.txt)"
umount /mnt
set +e
echo before; false; echo after
exit 7
"""


@pytest.mark.qemu
def test_blk_read_write_against_qemu_storage_daemon(
    qsd_two_disks: tuple[list[Path], list[str], subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    """Disks read and written, and the script's own exit status reported (one boot, through
    GuestLauncher.boot with another back-end's sockets)."""
    (raw, ext4), sockets, qsd = qsd_two_disks
    debugfs = require_tool("debugfs", E2FSPROGS)
    launcher = GuestLauncher(guest_image(), tmp_path)
    try:
        result = launcher.boot(GUEST_BLK_SCRIPT, *(VhostUserDevice(s, "blk") for s in sockets),
                               timeout=120)
    finally:
        launcher.close()
    assert result.exit_code == 7, result.raw_console
    assert result.console.endswith("ext4=hello from the guest\nbefore\nafter\n")
    with pytest.raises(GuestError, match="exited with 7"):
        result.check()
    assert f"size={IMAGE_SIZE // 512}" in result.lines
    assert f"head={PATTERN.hex()}" in result.lines
    assert "ext4=hello from the guest" in result.lines
    with open(raw, "rb") as f:
        f.seek(1 << 20)
        assert f.read(16) == GUEST_WRITE
    out = subprocess.run([debugfs, "-R", "cat /hello.txt", str(ext4)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "hello from the guest\n"
    assert qsd.poll() is None, "qemu-storage-daemon died"


@pytest.mark.qemu
def test_shell_guest_runs_commands_until_one_hangs(tmp_path: Path, qemu_ready: None) -> None:
    """vhostpy.testing's guest shell: several commands in one boot, each with its status and
    output; one that outlives its timeout kills the guest. And a guest whose whole script
    outlives its timeout is killed too."""
    launcher = GuestLauncher(guest_image(), tmp_path)
    echo_files, echo = host_binary(require_tool("echo", "coreutils"), "opt/host")
    try:
        guest = launcher.start(files={**echo_files, "opt/note.txt": "a file from the host\n"})
        r = guest.run("echo out; echo err >&2; echo on-the-console > /dev/console; exit 3")
        assert (r.exit_code, r.output) == (3, "out\nerr\n")
        r = guest.run(f"cat /opt/note.txt; {echo} host echo runs")
        assert r.check().output == "a file from the host\nhost echo runs\n"
        guest.running.wait_for_text("on-the-console", timeout=30)
        r = guest.run("head -c 20000 /dev/zero | tr '\\0' x; printf '\\001\\377'")
        assert r.check().output_bytes == b"x" * 20000 + b"\x01\xff"
        with pytest.raises(GuestTimeout, match="sleep 1000") as info:
            guest.run("echo sleeping > /dev/console; sleep 1000", timeout=1)
        assert "sleeping" in info.value.console
        assert not guest.running.is_running()
        with pytest.raises(GuestError):
            guest.run("true")
    finally:
        launcher.close()
    assert (tmp_path / "guest0.console.log").read_text().count("sleeping") >= 1
    with pytest.raises(GuestTimeout, match="did not finish"):
        boot_guest("true", timeout=1)


@pytest.mark.qemu
def test_qemu_start_failure_is_a_clear_error(tmp_path: Path, qemu_ready: None) -> None:
    with pytest.raises(GuestError, match="blk0") as info:
        boot_guest("true", blk_sockets=[str(tmp_path / "nobody-listens.sock")], timeout=30)
    assert "nobody-listens.sock" in str(info.value)


@pytest.mark.qemu
def test_kill_guest_mid_io_backend_survives(
    qsd_two_disks: tuple[list[Path], list[str], subprocess.Popen[bytes]],
) -> None:
    _, sockets, qsd = qsd_two_disks
    script = "echo writing; while :; do dd if=/dev/zero of=/dev/vda bs=64k count=16 " \
             "conv=fsync 2>/dev/null; done"
    with start_guest(script, blk_sockets=sockets[:1], timeout=120) as guest:
        guest.wait_for_text("writing", timeout=90)
        guest.kill()
        assert not guest.is_running()
        assert "writing" in guest.console_so_far()
    assert qsd.poll() is None, "qemu-storage-daemon died when its front-end was killed"
