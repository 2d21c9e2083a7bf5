"""What every test guest of this host boots from, found and built once per process.

`guest_image()` finds QEMU and the guest kernel, builds (or reuses) the cached base
initramfs and picks the accelerator, or raises `GuestImageError` with one line naming what to
install. The host needs: QEMU (``qemu-system-x86``), a kernel with its modules readable by
this user (``/boot/vmlinuz-*``; Ubuntu installs it mode 0600), a static busybox
(``busybox-static``), ``modinfo`` (``kmod``) and, for Ubuntu's .ko.zst modules, ``zstd``.
Stdlib only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from vhostpy.testing.accel import detect_accel
from vhostpy.testing.initramfs import build_initramfs
from vhostpy.testing.kernel import KernelInfo, find_kernel
from vhostpy.testing.qemu import find_qemu

__all__ = ["HOST_PACKAGES", "GuestImage", "guest_image"]

#: Debian/Ubuntu packages a host needs to boot test guests (plus a kernel image).
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "zstd")


@dataclass(frozen=True)
class GuestImage:
    """A guest kernel, the base initramfs built for it, QEMU, and the accelerator."""

    qemu: str
    kernel: KernelInfo
    initramfs: Path
    accel: str


_lock = threading.Lock()
_image: GuestImage | None = None


def guest_image() -> GuestImage:
    """The host's `GuestImage`, prepared on the first call of the process (later calls
    return it again, unless its archive has gone from the cache); raises
    `GuestImageError` when a prerequisite is missing."""
    global _image
    with _lock:
        if _image is None or not _image.initramfs.is_file():
            qemu = find_qemu()
            kernel = find_kernel()
            initramfs = build_initramfs(None, kernel)
            _image = GuestImage(qemu, kernel, initramfs, detect_accel())
        return _image
