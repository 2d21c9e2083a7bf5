"""`vhostpy blk --image`: what it refuses to serve, and QEMU's image locks, against the real tools.

* Formats: images made by `qemu-img create` in every non-raw format it writes are refused in
  one line naming the format (the name `qemu-img info` gives too), and `--format raw` serves
  them anyway; signatures qemu-img cannot write are checked on synthetic headers.
* Sizes: empty images and partial sectors are refused.
* Locks: vhostpy takes QEMU's file-posix OFD locks (the exact bytes are read back from
  /proc/locks), so qemu-storage-daemon, qemu-io and vhostpy refuse each other's images;
  read-only users share, `--share-rw` lets writers share, and the locks go with the process.

The QEMU tools come from ci/install.sh: missing, they fail the test under CI and skip it elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tools

from vhostpy.images import LOCK_PERM_BASE, LOCK_SHARED_BASE, PROBE_BYTES, probe_format

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
PROG = [sys.executable, "-m", "vhostpy", "blk"]
MiB = 1 << 20


def require_tool(name: str) -> str:
    """The QEMU tool `name` (tools.require_tool: fails under CI, skips elsewhere)."""
    return tools.require_tool(name, "ci/install.sh installs the QEMU tools")


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROG, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, check=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhostpy blk: error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    return r.stderr


def wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen[str],
               timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: " \
                                    f"{proc.communicate()}"
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


@pytest.fixture
def procs() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """start(argv, ready_path) -> a running process whose `ready_path` exists; each is
    SIGTERMed at the end and must exit 0 (vhostpy and qemu-storage-daemon both do)."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: list[str], ready: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        wait_until(f"listened on {ready}", ready.exists, proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            assert proc.returncode == 0, (proc.args, proc.returncode)


def vhostpy_serving(start: Callable[..., subprocess.Popen[str]], tmp_path: Path, image: Path,
                    *args: str, name: str = "vhostpy.sock") -> subprocess.Popen[str]:
    sock = tmp_path / name
    return start([*PROG, "--socket-path", str(sock), "--image", str(image), *args], sock)


def qsd_argv(image: Path, sock: Path, *, writable: bool = True) -> list[str]:
    return [require_tool("qemu-storage-daemon"),
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--export", (f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                         f"addr.path={sock},writable={'on' if writable else 'off'}")]


def qemu_io(image: Path, command: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-io"), "-f", "raw", *flags, "-c", command,
                           str(image)], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xeb\x63\x90" + bytes(MiB - 3))   # raw: a boot sector's first bytes
    return path


# ------------------------------------------------------------------------------------------
# formats

#: qemu-img create's format name -> extra arguments. (LUKS is checked on a synthetic header
#: below: `qemu-img create -f luks` times PBKDF2 on the CPU and fails on a busy machine with
#: "Unable to get accurate CPU usage".)
QEMU_IMG_FORMATS: dict[str, list[str]] = {
    "qcow2": [], "qcow": [], "qed": [], "vmdk": [], "vdi": [], "vhdx": [], "vpc": [],
    "parallels": [],
}


@pytest.mark.parametrize("fmt", list(QEMU_IMG_FORMATS))
def test_qemu_img_formats_refused_unless_forced_raw(
        tmp_path: Path, fmt: str, procs: Callable[..., subprocess.Popen[str]]) -> None:
    qemu_img = require_tool("qemu-img")
    path = tmp_path / f"disk.{fmt}"
    made = subprocess.run([qemu_img, "create", *QEMU_IMG_FORMATS[fmt], "-f", fmt, str(path),
                           "4M"], capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    info = subprocess.run([qemu_img, "info", "--output=json", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert f'"format": "{fmt}"' in info.stdout, info.stdout   # QEMU's probe agrees
    if path.stat().st_size % 512:    # so that only the format can be the reason
        with open(path, "ab") as f:
            f.write(bytes(512 - path.stat().st_size % 512))
    before = sha(path)
    sock = tmp_path / "vhost.sock"
    one_line_error(run("--socket-path", str(sock), "--image", str(path)), f"a {fmt} image",
                   "--format raw")
    assert not sock.exists()
    assert probe_format(path.read_bytes()[:PROBE_BYTES]) == fmt
    proc = vhostpy_serving(procs, tmp_path, path, "--format", "raw")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert sha(path) == before


def _synthetic(fmt: str) -> bytes:
    head = {
        "qcow": b"QFI\xfb" + struct.pack(">I", 1),
        "qcow2": b"QFI\xfb" + struct.pack(">I", 3),
        "luks": b"LUKS\xba\xbe\x00\x02",          # LUKS2 (LUKS1 below)
        "luks1": b"LUKS\xba\xbe\x00\x01aes\0",
        "bochs": b"Bochs Virtual HD Image\x00",
        "cloop": b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
                 b"/dev/cloop $1\n",
        "vmdk": b"# Disk DescriptorFile\nversion=1\n",
        "vdi": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
               + struct.pack("<I", 0xBEDA107F),
    }[fmt]
    return head + bytes(4096 - len(head))


@pytest.mark.parametrize("fmt", ["qcow", "qcow2", "luks", "luks1", "bochs", "cloop", "vmdk",
                                 "vdi"])
def test_signatures_on_synthetic_headers(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(_synthetic(fmt))
    name = fmt.rstrip("1")
    assert probe_format(path.read_bytes()) == name
    one_line_error(run("--socket-path", str(tmp_path / "s.sock"), "--image", str(path)),
                   f"a {name} image")


@pytest.mark.parametrize("head", [
    bytes(4096),                                   # zeros
    b"QFI\xfb" + bytes(4092),                      # qcow magic, version 0: neither driver
    b"LUKS\xba\xbe\x00\x03" + bytes(4088),         # no such LUKS version
    b"\x55\xaa" * 2048,                            # anything else
    b"QFI",                                        # shorter than any header
], ids=["zeros", "qcow-v0", "luks-v3", "pattern", "short"])
def test_raw_data_is_raw(head: bytes) -> None:
    assert probe_format(head) is None


def test_format_option(tmp_path: Path, image: Path) -> None:
    sock = str(tmp_path / "s.sock")
    one_line_error(run("--socket-path", sock, "--image", str(image), "--format", "qcow2"),
                   "'qcow2'", "raw")
    one_line_error(run("--socket-path", sock, "--format", "raw"), "--format is for --image")
    one_line_error(run("--socket-path", sock, "--share-rw"), "--share-rw is for --image")
    assert not Path(sock).exists()


# ------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(("size", "needle"), [(0, "empty (0 bytes)"), (3, "3 bytes"),
                                              (512 * 3 + 100, "1636 bytes")])
def test_empty_or_partial_sector_images_refused(tmp_path: Path, size: int, needle: str) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x01" * size)
    for extra in ([], ["--format", "raw"], ["--read-only"]):
        one_line_error(run("--socket-path", str(tmp_path / "s.sock"), "--image", str(path),
                           *extra), needle)
    assert path.read_bytes() == b"\x01" * size


# ------------------------------------------------------------------------------------------
# locks


def lock_bytes(path: Path) -> set[int]:
    """The bytes of `path` under OFD locks (any process), from /proc/locks."""
    ino = path.stat().st_ino
    held: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()   # "3: OFDLCK ADVISORY READ -1 fe:00:2148633 100 101"
        if "OFDLCK" not in fields or "->" in fields:   # (a waiter, not a lock held)
            continue
        k = fields.index("OFDLCK")
        if fields[k + 2] != "READ" or int(fields[k + 4].rsplit(":", 1)[1]) != ino:
            continue
        start, end = int(fields[k + 5]), fields[k + 6]
        held.update(range(start, (int(end) if end != "EOF" else start) + 1))
    return held


def test_the_lock_bytes_are_qemus(tmp_path: Path, image: Path,
                                  procs: Callable[..., subprocess.Popen[str]]) -> None:
    # file-posix: permission i held -> byte 100 + i; permission i not shared -> 200 + i.
    # read (0) and write (1) held; write (1) and resize (3) not shared
    assert LOCK_PERM_BASE == 100 and LOCK_SHARED_BASE == 200
    rw = vhostpy_serving(procs, tmp_path, image)
    assert lock_bytes(image) == {100, 101, 201, 203}
    rw.send_signal(signal.SIGTERM)
    assert rw.wait(15) == 0
    assert lock_bytes(image) == set()          # gone with the process
    ro = vhostpy_serving(procs, tmp_path, image, "--read-only")
    assert lock_bytes(image) == {100, 201, 203}
    ro.send_signal(signal.SIGTERM)
    assert ro.wait(15) == 0
    vhostpy_serving(procs, tmp_path, image, "--share-rw")
    assert lock_bytes(image) == {100, 101, 203}


def test_vhostpy_refuses_an_image_qsd_exports_writable(
        tmp_path: Path, image: Path, procs: Callable[..., subprocess.Popen[str]]) -> None:
    qsd_sock = tmp_path / "qsd.sock"
    qsd = procs(qsd_argv(image, qsd_sock), qsd_sock)
    sock = str(tmp_path / "v.sock")
    for extra in ([], ["--read-only"]):
        one_line_error(run("--socket-path", sock, "--image", str(image), *extra),
                       "in use by another process", "'write'")
    assert not Path(sock).exists() and qsd.poll() is None
    # qemu-storage-daemon's exports share every permission: with --share-rw we do too
    vhostpy_serving(procs, tmp_path, image, "--share-rw")
    assert qsd.poll() is None


def test_qemu_refuses_an_image_vhostpy_serves(
        tmp_path: Path, image: Path, procs: Callable[..., subprocess.Popen[str]]) -> None:
    before = sha(image)
    vh = vhostpy_serving(procs, tmp_path, image)
    qsd = subprocess.run(qsd_argv(image, tmp_path / "qsd.sock"), capture_output=True,
                         text=True, timeout=30, check=False)
    assert qsd.returncode != 0 and 'Failed to get "write" lock' in qsd.stderr, qsd.stderr
    assert not (tmp_path / "qsd.sock").exists()
    r = qemu_io(image, "read 0 512")           # a writer
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
    # the locks are the only reason: qemu-io -r shares every permission, so it gets in
    r = qemu_io(image, "read -v 0 4", "-r")
    assert r.returncode == 0 and "eb 63 90 00" in r.stdout, r.stdout + r.stderr
    # and a second vhostpy is refused like QEMU
    one_line_error(run("--socket-path", str(tmp_path / "second.sock"), "--image", str(image)),
                   "in use")
    vh.send_signal(signal.SIGTERM)
    assert vh.wait(15) == 0
    assert sha(image) == before
    r = qemu_io(image, "write -P 0xab 0 512")   # unlocked once vhostpy is gone
    assert r.returncode == 0, r.stderr


def test_read_only_users_share(tmp_path: Path, image: Path,
                               procs: Callable[..., subprocess.Popen[str]]) -> None:
    vhostpy_serving(procs, tmp_path, image, "--read-only")
    vhostpy_serving(procs, tmp_path, image, "--read-only", name="second.sock")
    r = qemu_io(image, "read 0 512", "-r")
    assert r.returncode == 0, r.stderr
    r = qemu_io(image, "write 0 512")
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
    one_line_error(run("--socket-path", str(tmp_path / "w.sock"), "--image", str(image)),
                   "in use")


def test_share_rw_lets_writers_share(tmp_path: Path, image: Path,
                                     procs: Callable[..., subprocess.Popen[str]]) -> None:
    vhostpy_serving(procs, tmp_path, image, "--share-rw")
    vhostpy_serving(procs, tmp_path, image, "--share-rw", name="second.sock")
    qsd_sock = tmp_path / "qsd.sock"
    procs(qsd_argv(image, qsd_sock), qsd_sock)   # an export shares everything: it fits in
    # a writer that does not share writing is refused, whoever it is
    one_line_error(run("--socket-path", str(tmp_path / "w.sock"), "--image", str(image)),
                   "in use", "'write'")
    # qemu-io shares every permission too: with writing shared by everyone, it may write
    r = qemu_io(image, "write -P 0xab 0 512")
    assert r.returncode == 0, r.stderr
