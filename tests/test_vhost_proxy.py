"""`VhostUserProxy`: a legacy driver's rings handed to another vhost-user back-end.

The driver side is a RingBuilder over guest RAM in a memfd (as the lguest host keeps it);
the back-ends are `vhostpy blk` and qemu-storage-daemon (a back-end no one here wrote, which
requires VIRTIO_F_VERSION_1 and so exercises negotiating it on a legacy driver's behalf).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ringbuilder import CallRunner, RingBuilder, layout
from test_qemu_harness import _start_qsd

from vhostpy.blk import VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhostpy.device import VIRTIO_ID_BLOCK
from vhostpy.frontend import BackendGone, Frontend
from vhostpy.memory import GuestMemory
from vhostpy.vhost_proxy import VhostUserProxy
from vhostpy.virtqueue import VIRTIO_F_VERSION_1
from vhostpy.vring import DefaultVirtqueue

RAM = 4 << 20
IMAGE = 8 << 20
HDR = struct.Struct("<IIQ")


class LegacyDriver:
    """Guest RAM in a memfd and one ring, driven like a legacy (lguest) virtio-blk driver."""

    def __init__(self, socket_path: str) -> None:
        self.fd = os.memfd_create("proxy-test-ram", os.MFD_CLOEXEC)
        self.memory = GuestMemory()
        self.started = False
        self.irqs = 0
        fe = None
        try:
            os.ftruncate(self.fd, RAM)
            self.memory.map_fd(self.fd, 0, RAM, 0, 0)
            fe = Frontend.connect(socket_path)
            self.proxy = VhostUserProxy(fe, device_id=VIRTIO_ID_BLOCK, memory_fd=self.fd,
                                        memory_size=RAM, config_size=60,
                                        assume_version_1=True)
        except BaseException:
            # as the lguest launcher does: the proxy owns `fe` only once it exists
            if fe is not None:
                fe.close()
            self.memory.clear()
            os.close(self.fd)
            raise

    def start(self) -> None:
        legacy = self.proxy.features() & ((1 << 32) - 1)     # a legacy driver sees 32 bits
        self.proxy.set_features(legacy)
        self.vq = DefaultVirtqueue(self.memory, 0)
        self.ring = RingBuilder(self.memory, 64, layout(64, base=1 << 20))
        self.ring.attach(self.vq)

        def irq() -> None:
            self.irqs += 1
        CallRunner(self.vq, irq)
        self.proxy.queue_started(0, self.vq)
        self.started = True

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
        if self.started:
            self.proxy.queue_stopped(0, self.vq)
        self.proxy.close()
        self.memory.clear()
        os.close(self.fd)


def _exercise(sock: str, image: Path) -> None:
    drv = LegacyDriver(sock)
    try:
        capacity = struct.unpack_from("<Q", drv.proxy.config())[0]
        assert capacity == IMAGE // 512
        assert not drv.proxy.features() >> 30 & 1      # the vhost-user bits never leak
        assert not drv.proxy.features() >> 26 & 1      # (VHOST_F_LOG_ALL: vhostpy offers it)
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


def _open_fds() -> dict[int, str]:
    """This process's fds and what each one is (a readlink of /proc/self/fd/N)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:     # the directory's own fd, closed by now
            pass
    return fds


def test_failed_handshake_leaks_nothing(tmp_path: Path) -> None:
    """A back-end that hangs up during the handshake: the driver releases its RAM and socket
    (the autouse fixture below checks that every fd is closed)."""
    path = str(tmp_path / "rude.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        hang_up = threading.Thread(target=lambda: listener.accept()[0].close())
        hang_up.start()
        # BackendGone when the hang-up is seen reading a reply; the raw OSError (EPIPE) when
        # it is seen sending SET_OWNER (Frontend does not wrap send errors)
        with pytest.raises((BackendGone, OSError)):
            LegacyDriver(path)
        hang_up.join(10)
        assert not hang_up.is_alive()
    finally:
        listener.close()


@pytest.fixture(autouse=True)
def _no_leaked_fds() -> Iterator[None]:
    """Every test ends with exactly the fds it started with (the same numbers, the same
    files): nothing the proxy, the driver or the back-ends' sockets opened stays open."""
    before = _open_fds()
    yield
    after = _open_fds()
    assert after == before, (f"leaked: { {fd: after[fd] for fd in after.keys() - before.keys()} }"
                             f" closed: { {fd: before[fd] for fd in before.keys() - after.keys()} }")


def test_a_proxy_whose_backend_is_gone_raises_backend_gone_and_closes_its_frontend() -> None:
    """Sending into a closed connection is BackendGone (not a raw EPIPE), and a proxy that
    cannot finish its handshake closes the front-end it was given."""
    ours, theirs = socket.socketpair()
    theirs.close()
    fe = Frontend(ours, timeout=1.0)
    memfd = os.memfd_create("ram")
    try:
        with pytest.raises(BackendGone, match="connection error"):
            fe.get_features()
        fe2_ours, fe2_theirs = socket.socketpair()
        fe2_theirs.close()
        fe2 = Frontend(fe2_ours, timeout=1.0)
        with pytest.raises(BackendGone):
            VhostUserProxy(fe2, device_id=VIRTIO_ID_BLOCK, memory_fd=memfd, memory_size=4096)
        assert fe2.sock.fileno() == -1
    finally:
        fe.close()
        os.close(memfd)
