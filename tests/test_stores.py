"""Block stores behind `BlockDevice` (`vhostpy.stores`), served over a real vhost-user socket
to the scripted front-end: synchronous and asynchronous stores, out-of-order completion,
errors, the checks the device does before a store sees a request, and which store gets the
compiled data path (nothing a user overrides is bypassed)."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loopthread import on_loop
from scripted import BLK_HDR, ScriptedGuest
from test_nbd import start  # noqa: F401 (the NBD server fixture)
from tools import wait_until

from vhostpy import _accel
from vhostpy.blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockDevice,
)
from vhostpy.errors import ConfigurationError
from vhostpy.loop import EventLoop
from vhostpy.server import Server
from vhostpy.stores import FileStore, MemoryStore

SECTOR = 512
DISK = 1 << 20


class DictStore:
    """The smallest store a user writes: sectors in a dict, nothing optional."""

    size = DISK

    def __init__(self) -> None:
        self.sectors: dict[int, bytes] = {}
        self.seen: list[tuple[str, int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.seen.append(("read", offset, length))
        return b"".join(self.sectors.get(s, bytes(SECTOR))
                        for s in range(offset // SECTOR, (offset + length) // SECTOR))

    def write(self, offset: int, data: Any) -> None:
        self.seen.append(("write", offset, len(data)))
        data = bytes(data)
        for k in range(0, len(data), SECTOR):
            self.sectors[offset // SECTOR + k // SECTOR] = data[k:k + SECTOR]

    def flush(self) -> None:
        self.seen.append(("flush", 0, 0))


class SlowStore:
    """An async store that delays each request at random, and records completion order."""

    size = DISK

    def __init__(self) -> None:
        self.disk = bytearray(DISK)
        self.finished: list[int] = []
        self.fail_at: int | None = None

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(random.uniform(0, 0.01))
        if offset == self.fail_at:
            raise OSError(5, "the disk fell off")
        self.finished.append(offset)
        return bytes(self.disk[offset:offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        self.disk[offset:offset + len(data)] = data
        self.finished.append(offset)

    async def flush(self) -> None:
        await asyncio.sleep(0)


class Disk:
    """A `BlockDevice` served on `loop`, and the scripted guest driving it."""

    def __init__(self, loop: EventLoop, device: BlockDevice, path: str) -> None:
        self.loop = loop
        self.device = device
        self.server = on_loop(loop, lambda: Server(device, loop, socket_path=path))
        self.guest = ScriptedGuest(path)
        self.guest.start()
        self.ring = self.guest.setup_ring(0, 256)

    def submit(self, rtype: int, sector: int, *, data: bytes = b"", read_len: int = 0
               ) -> tuple[int, int, int | None]:
        """Queue one request (no kick); returns (head, status address, data address)."""
        head, addrs = self.ring.builder.add_chain(
            [BLK_HDR.pack(rtype, 0, sector) + data], [read_len, 1] if read_len else [1])
        return head, addrs[-1], addrs[1] if read_len else None

    def run(self, requests: list[tuple[int, int, int | None]]) -> list[int]:
        """Kick, wait for every request; returns their heads in completion order."""
        self.guest.kick(0)
        used = self.guest.wait_used(0, len(requests), timeout=10)
        return [head for head, _ in used]

    def status(self, request: tuple[int, int, int | None]) -> int:
        return self.guest.memory.read(request[1], 1)[0]

    def data(self, request: tuple[int, int, int | None], length: int) -> bytes:
        assert request[2] is not None
        return self.guest.memory.read(request[2], length)

    def one(self, rtype: int, sector: int, *, data: bytes = b"", read_len: int = 0
            ) -> tuple[int, bytes]:
        req = self.submit(rtype, sector, data=data, read_len=read_len)
        self.run([req])
        return self.status(req), self.data(req, read_len) if read_len else b""

    def close(self) -> None:
        self.guest.close()
        on_loop(self.loop, self.server.close)
        self.device.close()


@pytest.fixture
def serve(tmp_path: Path, loop: EventLoop) -> Iterator[Callable[[BlockDevice], Disk]]:
    disks: list[Disk] = []

    def make(device: BlockDevice) -> Disk:
        disk = Disk(loop, device, str(tmp_path / f"blk{len(disks)}.sock"))
        disks.append(disk)
        return disk
    yield make
    for disk in disks:
        disk.close()


def pattern(sector: int, n: int = 1) -> bytes:
    return b"".join(bytes([(sector + k) & 0xFF, 0x5A]) * (SECTOR // 2) for k in range(n))


def test_a_dict_store_written_and_read_back(serve: Callable[[BlockDevice], Disk]) -> None:
    store = DictStore()
    device = BlockDevice(store, serial="DICT")
    assert not device.uses_compiled_path
    assert not device.features() >> VIRTIO_BLK_F_DISCARD & 1     # the store has no discard
    disk = serve(device)
    assert disk.one(VIRTIO_BLK_T_OUT, 8, data=pattern(8, 4))[0] == VIRTIO_BLK_S_OK
    assert disk.one(VIRTIO_BLK_T_IN, 8, read_len=4 * SECTOR) == (VIRTIO_BLK_S_OK, pattern(8, 4))
    assert disk.one(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    # WRITE_ZEROES on a store without write_zeroes: written as zeros.
    seg = (9).to_bytes(8, "little") + (2).to_bytes(4, "little") + bytes(4)
    assert disk.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, data=seg)[0] == VIRTIO_BLK_S_OK
    assert disk.one(VIRTIO_BLK_T_IN, 8, read_len=4 * SECTOR)[1] == \
        pattern(8) + bytes(2 * SECTOR) + pattern(11)
    assert disk.one(VIRTIO_BLK_T_DISCARD, 0, data=seg)[0] != VIRTIO_BLK_S_OK
    # Out of range: refused before the store sees it.
    before = len(store.seen)
    assert disk.one(VIRTIO_BLK_T_IN, DISK // SECTOR - 1, read_len=2 * SECTOR)[0] == \
        VIRTIO_BLK_S_IOERR
    assert disk.one(VIRTIO_BLK_T_OUT, DISK // SECTOR, data=pattern(0))[0] == VIRTIO_BLK_S_IOERR
    assert len(store.seen) == before
    assert all(0 <= off and off + n <= DISK for _, off, n in store.seen)


def test_a_store_that_raises_fails_only_that_request(serve: Callable[[BlockDevice], Disk],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(DictStore):
        def read(self, offset: int, length: int) -> bytes:
            if offset == 4 * SECTOR:
                raise RuntimeError("bad block")
            return super().read(offset, length)
    device = BlockDevice(Flaky())
    disk = serve(device)
    caplog.set_level(logging.WARNING)
    assert disk.one(VIRTIO_BLK_T_IN, 4, read_len=SECTOR)[0] == VIRTIO_BLK_S_IOERR
    assert "store read of 512 bytes at byte 2048: RuntimeError('bad block')" in caplog.text
    assert disk.one(VIRTIO_BLK_T_IN, 5, read_len=SECTOR)[0] == VIRTIO_BLK_S_OK
    assert device.stats.errors == 1 and device.stats.reads == 1


def test_an_async_store_completes_out_of_order(serve: Callable[[BlockDevice], Disk]) -> None:
    store = SlowStore()
    device = BlockDevice(store)
    disk = serve(device)
    writes = [disk.submit(VIRTIO_BLK_T_OUT, 2 * k, data=pattern(2 * k, 2)) for k in range(48)]
    done = disk.run(writes)
    assert sorted(done) == sorted(w[0] for w in writes)
    assert all(disk.status(w) == VIRTIO_BLK_S_OK for w in writes)
    assert done != [w[0] for w in writes], "48 randomly delayed writes completed in order"
    assert store.disk[:96 * SECTOR] == b"".join(pattern(2 * k, 2) for k in range(48))
    reads = [disk.submit(VIRTIO_BLK_T_IN, 2 * k, read_len=2 * SECTOR) for k in range(48)]
    disk.run(reads)
    assert all(disk.data(r, 2 * SECTOR) == pattern(2 * k, 2) for k, r in enumerate(reads))
    assert device.stats.reads == 48 and device.stats.writes == 48
    store.fail_at = 6 * SECTOR
    failed = disk.submit(VIRTIO_BLK_T_IN, 6, read_len=SECTOR)
    fine = disk.submit(VIRTIO_BLK_T_IN, 7, read_len=SECTOR)
    disk.run([failed, fine])
    assert (disk.status(failed), disk.status(fine)) == (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK)


def test_memory_store(serve: Callable[[BlockDevice], Disk]) -> None:
    store = MemoryStore(DISK, block_size=4096)
    device = BlockDevice(store)
    assert device.features() >> VIRTIO_BLK_F_DISCARD & 1
    assert int.from_bytes(device.config()[20:24], "little") == 4096     # blk_size
    disk = serve(device)
    assert disk.one(VIRTIO_BLK_T_OUT, 1, data=pattern(1, 3))[0] == VIRTIO_BLK_S_OK
    assert bytes(store.data[SECTOR:4 * SECTOR]) == pattern(1, 3)
    seg = (2).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4)
    assert disk.one(VIRTIO_BLK_T_DISCARD, 0, data=seg)[0] == VIRTIO_BLK_S_OK
    assert disk.one(VIRTIO_BLK_T_IN, 1, read_len=3 * SECTOR)[1] == \
        pattern(1) + bytes(SECTOR) + pattern(3)


def test_what_a_subclass_overrides_is_never_bypassed(tmp_path: Path,
                                                     serve: Callable[[BlockDevice], Disk]
                                                     ) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(0, 8))
    plain = BlockDevice(FileStore.open(str(image)))
    assert plain.uses_compiled_path == (_accel.lib is not None)
    plain.close()

    class Counting(FileStore):
        reads = 0

        def readinto(self, offset: int, buffers: Any) -> None:
            Counting.reads += 1
            super().readinto(offset, buffers)
    device = BlockDevice(Counting.open(str(image)))
    assert not device.uses_compiled_path
    disk = serve(device)
    assert disk.one(VIRTIO_BLK_T_IN, 2, read_len=SECTOR) == (VIRTIO_BLK_S_OK, pattern(2))
    assert Counting.reads == 1

    class Audited(BlockDevice):
        def handle_chain(self, index: int, vq: Any, chain: Any) -> Any:
            self.audited = getattr(self, "audited", 0) + 1
            return super().handle_chain(index, vq, chain)
    image2 = tmp_path / "disk2.img"
    image2.write_bytes(pattern(0, 8))
    audited = Audited.open_image(str(image2))
    assert isinstance(audited, Audited) and not audited.uses_compiled_path
    disk2 = serve(audited)
    assert disk2.one(VIRTIO_BLK_T_IN, 3, read_len=SECTOR) == (VIRTIO_BLK_S_OK, pattern(3))
    assert audited.audited == 1


@pytest.mark.parametrize("store, message", [
    (object(), "size must be a positive number of bytes"),
    (type("S", (), {"size": 0})(), "size must be a positive number of bytes"),
    (type("S", (), {"size": 4096, "read": print, "flush": print})(), r"no write\(\) method"),
    (type("S", (), {"size": 4096, "read": print, "write": print})(), r"no flush\(\) method"),
    (type("S", (), {"size": 4096, "read": print, "write": print, "flush": print,
                    "block_size": 1000})(), "block_size must be a power of two"),
])
def test_a_store_missing_what_the_device_needs_is_refused(store: object, message: str
                                                          ) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BlockDevice(store)


def test_a_read_only_store_needs_no_write() -> None:
    store = type("RO", (), {"size": 4096, "read": print, "flush": print, "read_only": True})()
    assert BlockDevice(store).read_only


# ------------------------------------------------------------------ the command line

STORE_MODULE = '''
import asyncio, random

class DictStore:
    size = 1 << 20
    def __init__(self):
        self.blocks = {}
    async def read(self, offset, length):
        await asyncio.sleep(random.uniform(0, 0.005))
        return b"".join(self.blocks.get(s, bytes(512))
                        for s in range(offset // 512, (offset + length) // 512))
    async def write(self, offset, data):
        await asyncio.sleep(random.uniform(0, 0.005))
        for k in range(0, len(data), 512):
            self.blocks[offset // 512 + k // 512] = bytes(data[k:k + 512])
    def flush(self):
        pass

def make():
    return DictStore()

def broken():
    raise ValueError("no disk today")
'''


def _guest(path: str) -> tuple[ScriptedGuest, Any]:
    guest = ScriptedGuest(path)
    guest.start()
    return guest, guest.setup_ring(0, 256)


def _write_read(guest: ScriptedGuest, ring: Any, sectors: range) -> None:
    """Write a pattern to `sectors` (all in flight at once), read it back, check it."""
    reqs = []
    for s in sectors:
        _, addrs = ring.builder.add_chain([BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, s) + pattern(s)],
                                          [1])
        reqs.append(addrs[-1])
    guest.kick(0)
    guest.wait_used(0, len(reqs), timeout=10)
    assert all(guest.memory.read(a, 1)[0] == VIRTIO_BLK_S_OK for a in reqs)
    reads = []
    for s in sectors:
        _, addrs = ring.builder.add_chain([BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, s)], [SECTOR, 1])
        reads.append((s, addrs))
    guest.kick(0)
    guest.wait_used(0, len(reads), timeout=10)
    for s, addrs in reads:
        assert guest.memory.read(addrs[-1], 1)[0] == VIRTIO_BLK_S_OK
        assert guest.memory.read(addrs[1], SECTOR) == pattern(s)


def test_cli_store_from_a_module(tmp_path: Path, backend: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mystores.py").write_text(STORE_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    b = backend("blk", "--store", "mystores:make")
    guest, ring = _guest(b.path)
    try:
        _write_read(guest, ring, range(0, 64, 2))
    finally:
        guest.close()


def test_cli_nbd_against_qemu_nbd(tmp_path: Path, backend: Any, start: Any  # noqa: F811
                                  ) -> None:
    image = tmp_path / "remote.img"
    image.write_bytes(bytes(DISK))
    server = start("qemu-nbd", str(image), export="disk")
    b = backend("blk", "--nbd", server.uri, "--serial", "REMOTE")
    guest, ring = _guest(b.path)
    try:
        _write_read(guest, ring, range(1, 97, 3))
    finally:
        guest.close()
    data = image.read_bytes()   # the host image holds the guest's bytes
    assert all(data[s * SECTOR:(s + 1) * SECTOR] == pattern(s) for s in range(1, 97, 3))


@pytest.mark.parametrize("args, message", [
    (["--store", "no_such_module_here:make"], "cannot import no_such_module_here"),
    (["--store", "mystores:broken"], "calling broken() raised ValueError: no disk today"),
    (["--store", "mystores:DictStore.size"], "not a callable"),
    (["--store", "mystores"], "is not MODULE:CALLABLE"),
    (["--store", "mystores:make", "--image", "x.img"], "--image and --store both say"),
    (["--nbd", "nbd://127.0.0.1:1/disk"], "nbd://127.0.0.1:1/disk"),
    (["--nbd", "nbds://example.com/disk"], "nbds://example.com/disk"),
    (["--store", "mystores:make", "--size", "1M"], "--size is for images"),
])
def test_cli_store_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       args: list[str], message: str) -> None:
    (tmp_path / "mystores.py").write_text(STORE_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sock = tmp_path / "blk.sock"
    proc = subprocess.run([sys.executable, "-m", "vhostpy", "blk", "--socket-path", str(sock),
                           *args], check=False, capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhostpy blk: error: "), proc.stderr
    assert message in lines[0]
    assert not sock.exists()


# ------------------------------------------------------------------ the lguest transport


@pytest.mark.parametrize("kind", ["async", "memory"])
def test_stores_over_the_lguest_bridge(kind: str, loop: EventLoop) -> None:
    """The lguest driver model writes 32 requests at once, then reads them back: an async
    store completes them out of order, under the bridge's lock, with the loop's thread
    publishing; a MemoryStore the same way synchronously."""
    from vhostpy.lguest_bridge import LguestBridge
    from vhostpy.lguest_guest import LguestGuestDriver
    from vhostpy.memory import GuestMemory

    ram, area = 4 << 20, 64 * 4096
    mem = GuestMemory()
    mem.add_buffer(bytearray(ram + area), 0)
    bridge = LguestBridge(mem, ram, irq_sink=lambda line: None)
    bridge.attach(loop)
    store: Any = SlowStore() if kind == "async" else MemoryStore(DISK)
    bridge.add_device(BlockDevice(store))
    ring = LguestGuestDriver(mem, ram, bridge.notify).blk().rings[0]
    try:
        def run(requests: list[tuple[list[bytes], list[int]]]) -> tuple[list[Any], bool]:
            """Submit `requests` at once; their completions in submission order, and
            whether they completed in that order."""
            with bridge.lock:
                tokens = [ring.add(out, ins) for out, ins in requests]
                ring.kick()
            done: list[Any] = []

            def collected() -> bool:
                with bridge.lock:
                    done.extend(ring.collect())
                return len(done) == len(tokens)
            wait_until(collected, 10, f"{len(tokens)} lguest completions")
            by_token = {c.token: c for c in done}
            return [by_token[t] for t in tokens], [c.token for c in done] == tokens

        writes, in_order = run([([BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 2 * k), pattern(2 * k, 2)],
                                 [1]) for k in range(32)])
        assert all(c.data[-1][0] == VIRTIO_BLK_S_OK for c in writes)
        if kind == "async":
            assert not in_order, "32 randomly delayed writes completed in order"
        reads, _ = run([([BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 2 * k)], [2 * SECTOR, 1])
                        for k in range(32)])
        for k, c in enumerate(reads):
            assert c.data[-1][0] == VIRTIO_BLK_S_OK and c.data[0] == pattern(2 * k, 2)
    finally:
        with bridge.lock:
            bridge.reset_all()
