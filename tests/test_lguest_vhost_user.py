"""An lguest device page served by ANY vhost-user back-end: page -> frontend -> back-end.

The lguest guest driver model scans the page, negotiates (legacy, 32 feature bits), and
reads and writes sectors; the device behind the entry is a `VhostUserProxy` whose rings live
in the lguest host's shareable memfd and are served by another process: qemu-storage-daemon
(a back-end no one here wrote) or `vhostpy blk`. The host image holds what the guest wrote.
"""

from __future__ import annotations

import select
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from test_qemu_harness import _start_qsd
from tools import wait_until

from vhostpy.device import VIRTIO_ID_BLOCK
from vhostpy.frontend import Frontend
from vhostpy.lguest_bridge import LGUEST_QUEUE_SIZE
from vhostpy.lguest_guest import LguestGuestDriver
from vhostpy.lguest_host import SharedMemoryHost
from vhostpy.vhost_proxy import VhostUserProxy
from vhostpy.virtqueue import VIRTIO_F_VERSION_1

RAM = 8 << 20
IMAGE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 + bytes(IMAGE - 512))
    return path


def _serve_lguest_guest(socket_path: str, image: Path, layout: str) -> None:
    host = SharedMemoryHost(RAM, device_pages=64, layout=layout)  # type: ignore[arg-type]
    proxy = VhostUserProxy(Frontend.connect(socket_path), device_id=VIRTIO_ID_BLOCK,
                           memory_fd=host.fd, memory_size=host.size, config_size=60,
                           queue_size=LGUEST_QUEUE_SIZE, assume_version_1=True,
                           name="qsd-proxy")
    try:
        lg = host.add_device(proxy)
        # the page offers the back-end's features to a legacy guest: 32 bits, no VERSION_1
        assert not lg.offered >> VIRTIO_F_VERSION_1 & 1
        # ... and the back-end's config space, so the guest sees the image's capacity
        assert struct.unpack_from("<Q", proxy.config())[0] == IMAGE // 512

        def pump() -> None:   # the back-end's call eventfds become lguest interrupts
            fds = proxy.call_fds()
            if fds:
                select.select(fds, [], [], 0.05)
            proxy.poll_calls()

        drv = LguestGuestDriver(host.memory, RAM, host.notify, layout=layout,  # type: ignore[arg-type]
                                pump=pump, timeout=10)
        host.on_irq(drv.interrupt)
        blk = drv.blk()
        assert blk.capacity == IMAGE // 512
        assert blk.read(0, 1) == bytes(range(256)) * 2        # what the host wrote
        data = (b"lguest->vhost-user " * 27)[:512]            # one sector
        blk.write(100, data * 3)
        assert blk.read(100, 3) == data * 3
        # Completions arrived as interrupts too: the driver finds them by polling the used
        # ring, so the back-end's call may still be on its way (pump until it lands).
        def interrupted() -> bool:
            pump()
            return host.irq_counts.get(lg.queues[0].irq, 0) > 0
        wait_until(interrupted, 10, "an lguest interrupt for the completions")
    finally:
        proxy.close()
        host.close()
    with open(image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(3 * 512) == data * 3


LAYOUTS = pytest.mark.parametrize("layout", ["3.x", "2.6.24"])


@LAYOUTS
def test_lguest_page_served_by_qemu_storage_daemon(tmp_path: Path, image: Path,
                                                   layout: str) -> None:
    proc, sockets = _start_qsd(tmp_path, [image])
    try:
        _serve_lguest_guest(sockets[0], image, layout)
        assert proc.poll() is None, "qemu-storage-daemon died"
    finally:
        proc.terminate()
        proc.wait(10)


@LAYOUTS
def test_lguest_page_served_by_vhostpy_blk(backend: Callable[..., object], image: Path,
                                           layout: str) -> None:
    b = backend("blk", "--image", str(image))
    _serve_lguest_guest(b.path, image, layout)  # type: ignore[attr-defined]
