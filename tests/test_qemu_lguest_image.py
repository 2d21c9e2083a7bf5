"""One image, two transports, one device class: an lguest guest (driver model) and a QEMU
guest each read exactly what the other wrote through `vhostpy.blk.BlockDevice`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import qemu_guest

from vhostpy.blk import BlockDevice
from vhostpy.lguest_guest import BlkDriver, LguestGuestDriver
from vhostpy.lguest_host import SharedMemoryHost

T = TypeVar("T")
RAM = 8 << 20
IMAGE = 16 << 20
LGUEST_SECTOR = 2048      # 1 MiB in
QEMU_SECTOR = 4096        # 2 MiB in


def _lguest_session(image: Path, layout: str, work: Callable[[BlkDriver], T]) -> T:
    """Serve `image` to the lguest driver model through the bridge; returns `work(blk)`."""
    host = SharedMemoryHost(RAM, device_pages=64, layout=layout)  # type: ignore[arg-type]
    device = BlockDevice.open_image(str(image))
    try:
        host.add_device(device)
        drv = LguestGuestDriver(host.memory, RAM, host.notify,
                                layout=layout)  # type: ignore[arg-type]
        host.on_irq(drv.interrupt)
        return work(drv.blk())
    finally:
        host.close()
        device.close()


@pytest.mark.qemu
def test_lguest_and_qemu_guests_share_one_image(backend: Callable[..., object],
                                                tmp_path: Path) -> None:
    qemu_guest.require_qemu()
    image = tmp_path / "shared.img"
    image.write_bytes(bytes(IMAGE))
    from_lguest = hashlib.sha256(b"lguest").digest() * 64          # 2048 bytes = 4 sectors
    from_qemu = hashlib.sha256(b"qemu").digest() * 64

    # 1. the lguest guest writes through the bridge
    _lguest_session(image, "3.x", lambda blk: blk.write(LGUEST_SECTOR, from_lguest))

    # 2. a QEMU guest on `vhostpy blk` (the same class) reads it and writes its own
    (tmp_path / "q.bin").write_bytes(from_qemu)
    b = backend("blk", "--image", str(image))
    result = qemu_guest.boot_guest(
        f"dd if=/dev/vda bs=512 skip={LGUEST_SECTOR} count=4 iflag=direct 2>/dev/null | md5sum\n"
        f"dd if=/q.bin of=/dev/vda bs=512 seek={QEMU_SECTOR} conv=fsync 2>/dev/null\n"
        "echo written\n",
        blk_sockets=[b.path], files={"q.bin": from_qemu}, timeout=120)  # type: ignore[attr-defined]
    assert result.exit_code == 0, result.console
    assert hashlib.md5(from_lguest).hexdigest() in result.console
    assert "written" in result.console
    assert b.stop() == 0    # type: ignore[attr-defined]  # it holds the image's write lock

    # 3. the lguest guest (both page layouts) reads what QEMU's guest wrote
    for layout in ("3.x", "2.6.24"):
        assert _lguest_session(image, layout, lambda blk: blk.read(QEMU_SECTOR, 4)) == from_qemu
    data = image.read_bytes()
    assert data[LGUEST_SECTOR * 512:][:2048] == from_lguest
    assert data[QEMU_SECTOR * 512:][:2048] == from_qemu
