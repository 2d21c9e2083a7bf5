"""vhostpy.testing: real QEMU guests with vhostpy devices, for tests of guest software.

A pytest plugin (`vhostpy.testing.plugin`, registered as ``vhostpy`` under ``pytest11``)
gives a test the ``vhostpy_guest`` fixture: it serves devices (your own
`vhostpy.device.Device` in the test process, or ``vhostpy blk|net|rng|serve`` processes),
boots a throw-away guest on them (the host's kernel with a busybox initramfs, KVM when it
works, TCG otherwise) and runs shell commands there, returning exit status and output.

The modules, one job each (everything below ``launcher`` is stdlib only):

* `errors`: GuestImageError (the host lacks something), GuestError, GuestTimeout;
* `kernel`: the guest kernel and its modules; `cpio`: the archive format;
* `initramfs`: the guest's /init, the cached base archive, per-run overlays;
* `qemu`: the QEMU command line, `VhostUserDevice`; `accel`: KVM or TCG;
* `console`: reading the serial console, `GuestResult`; `files`: `host_binary`;
* `guest`: `RunningGuest`, `start_guest`, `boot_guest` (one script per boot);
* `shell`: many commands in one boot over the guest's second serial port;
* `image`: `guest_image()`, what this host's guests boot, found once;
* `backends`: devices served in-process or by the command line;
* `launcher`: `GuestLauncher` and `Guest`, what the fixture hands a test;
* `plugin`: the fixtures.

Host requirements: QEMU (``qemu-system-x86``), a guest kernel readable by the test user
(``/boot/vmlinuz-*`` with its ``/lib/modules``), ``busybox-static``, ``kmod`` and ``zstd``.
Archives are cached in ``$VHOSTPY_CACHE/qemu`` (default ``~/.cache/vhostpy/qemu``).
The names below are loaded on first use, so importing this package (and loading the
plugin) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhostpy.testing.backends import BackendProcess, ServedDevice
    from vhostpy.testing.console import GuestResult, console_values
    from vhostpy.testing.errors import GuestError, GuestImageError, GuestTimeout
    from vhostpy.testing.files import host_binary
    from vhostpy.testing.guest import RunningGuest, boot_guest, start_guest
    from vhostpy.testing.image import GuestImage, guest_image
    from vhostpy.testing.launcher import Guest, GuestLauncher
    from vhostpy.testing.qemu import VhostUserDevice
    from vhostpy.testing.shell import CommandResult

#: Public name -> the module that defines it.
_EXPORTS = {
    "BackendProcess": "backends",
    "CommandResult": "shell",
    "Guest": "launcher",
    "GuestError": "errors",
    "GuestImage": "image",
    "GuestImageError": "errors",
    "GuestLauncher": "launcher",
    "GuestResult": "console",
    "GuestTimeout": "errors",
    "RunningGuest": "guest",
    "ServedDevice": "backends",
    "VhostUserDevice": "qemu",
    "boot_guest": "guest",
    "console_values": "console",
    "guest_image": "image",
    "host_binary": "files",
    "start_guest": "guest",
}

__all__ = [
    "BackendProcess",
    "CommandResult",
    "Guest",
    "GuestError",
    "GuestImage",
    "GuestImageError",
    "GuestLauncher",
    "GuestResult",
    "GuestTimeout",
    "RunningGuest",
    "ServedDevice",
    "VhostUserDevice",
    "boot_guest",
    "console_values",
    "guest_image",
    "host_binary",
    "start_guest",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'vhostpy.testing' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"vhostpy.testing.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_EXPORTS))
