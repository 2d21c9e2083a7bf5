"""`VhostUserProxy`: a legacy driver's rings handed to another vhost-user back-end.

The driver side is a RingBuilder over guest RAM in a memfd (as the lguest host keeps it);
the back-ends are `vhostpy blk` and qemu-storage-daemon (a back-end no one here wrote, which
requires VIRTIO_F_VERSION_1 and so exercises negotiating it on a legacy driver's behalf).
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ringbuilder import RingBuilder, layout
from test_qemu_harness import _start_qsd

from vhostpy.blk import VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhostpy.device import VIRTIO_ID_BLOCK
from vhostpy.frontend import Frontend
from vhostpy.memory import GuestMemory
from vhostpy.vhost_proxy import VhostUserProxy
from vhostpy.virtqueue import VIRTIO_F_VERSION_1, Virtqueue

RAM = 4 << 20
IMAGE = 8 << 20
HDR = struct.Struct("<IIQ")


class LegacyDriver:
    """Guest RAM in a memfd and one ring, driven like a legacy (lguest) virtio-blk driver."""

    def __init__(self, socket_path: str) -> None:
        self.fd = os.memfd_create("proxy-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM)
        self.memory = GuestMemory()
        self.memory.map_fd(self.fd, 0, RAM, 0, 0)
        self.proxy = VhostUserProxy(Frontend.connect(socket_path), device_id=VIRTIO_ID_BLOCK,
                                    memory_fd=self.fd, memory_size=RAM, config_size=60,
                                    assume_version_1=True)
        self.irqs = 0

    def start(self) -> None:
        legacy = self.proxy.features() & ((1 << 32) - 1)     # a legacy driver sees 32 bits
        self.proxy.set_features(legacy)
        self.vq = Virtqueue(self.memory, 0)
        self.ring = RingBuilder(self.memory, 64, layout(64, base=1 << 20))
        self.ring.attach(self.vq)

        def irq() -> None:
            self.irqs += 1
        self.vq.call = irq
        self.proxy.queue_started(0, self.vq)

    def request(self, rtype: int, sector: int, data: bytes = b"", read_len: int = 0
                ) -> tuple[int, bytes]:
        head, addrs = self.ring.add_chain([HDR.pack(rtype, 0, sector) + data],
                                          [read_len, 1] if read_len else [1])
        # as a driver re-enabling callbacks under EVENT_IDX: interrupt me at the next used entry
        self.ring.set_used_event(self.ring.last_used_idx)
        self.proxy.process_queue(0, self.vq)           # the guest's notify
        deadline = time.monotonic() + 10
        used: list[tuple[int, int]] = []
        while not used:
            assert time.monotonic() < deadline, "no completion from the back-end"
            select.select(self.proxy.call_fds(), [], [], 0.5)
            self.proxy.poll_calls()
            used = self.ring.get_used()
        assert used[0][0] == head
        status = self.memory.read(addrs[-1], 1)[0]
        return status, self.memory.read(addrs[1], read_len) if read_len else b""

    def close(self) -> None:
        self.proxy.queue_stopped(0, self.vq)
        self.proxy.close()
        self.memory.clear()
        os.close(self.fd)


def _exercise(sock: str, image: Path) -> None:
    drv = LegacyDriver(sock)
    try:
        capacity = struct.unpack_from("<Q", drv.proxy.config())[0]
        assert capacity == IMAGE // 512
        assert not drv.proxy.features() >> 30 & 1      # the vhost-user bit never leaks
        drv.start()
        assert drv.proxy.features() >> VIRTIO_F_VERSION_1 & 1   # the back-end wants 1.0 …
        assert not drv.proxy.acked_features >> VIRTIO_F_VERSION_1 & 1  # … the driver is legacy
        payload = bytes(range(256)) * 4
        assert drv.request(VIRTIO_BLK_T_OUT, 16, payload) == (0, b"")
        assert drv.request(VIRTIO_BLK_T_IN, 16, read_len=1024) == (0, payload)
        assert drv.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1][:8] == b"IMAGEHDR"
        assert drv.irqs >= 3                           # completions became interrupts
        status, _ = drv.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
        assert status in (0, 2)
    finally:
        drv.close()
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(1024) == payload


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"IMAGEHDR" + bytes(IMAGE - 8))
    return path


def test_proxy_to_vhostpy_blk(backend: Callable[..., object], image: Path) -> None:
    b = backend("blk", "--image", str(image))
    _exercise(b.path, image)  # type: ignore[attr-defined]


def test_proxy_to_qemu_storage_daemon(tmp_path: Path, image: Path) -> None:
    proc, sockets = _start_qsd(tmp_path, [image])
    try:
        _exercise(sockets[0], image)
        assert proc.poll() is None, "qemu-storage-daemon died"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def _no_leaked_fds() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert len(leaked) <= 1, f"leaked fds: {leaked}"   # pytest's own log file may appear
