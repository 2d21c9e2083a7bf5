"""The project's own QEMU tests boot guests through `vhostpy.testing` (the package behind the
pytest plugin); this module keeps the names those tests import, plus the one rule of this
repository's suite: `require_qemu` skips a test when QEMU or a guest kernel is missing, and
fails it instead under ``CI=true`` (`tools.unavailable`).

Everything else is the package's: `boot_guest`, `start_guest`, `RunningGuest` (guest),
`GuestResult`, `console_values`, `parse_console` (console), `qemu_command`, `guest_mac`,
`find_qemu` (qemu), `host_binary` (files), `wait_for_socket` (backends), `detect_accel`
(accel), the errors. See ``ci/qemu/README.md`` for the guest contract.

Typical use::

    from qemu_guest import boot_guest, require_qemu
    require_qemu()
    r = boot_guest("cat /sys/block/vda/size", blk_sockets=[sock])
    assert r.exit_code == 0, r.console

Run as a script it is ``ci/qemu/run-guest.sh`` (`vhostpy.testing.run_guest`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools import unavailable

from vhostpy.testing import initramfs as _initramfs
from vhostpy.testing.accel import KVM_PROBE_TIMEOUT, detect_accel
from vhostpy.testing.backends import wait_for_socket
from vhostpy.testing.console import GuestResult, console_values, parse_console
from vhostpy.testing.errors import GuestError, GuestImageError, GuestTimeout
from vhostpy.testing.files import host_binary
from vhostpy.testing.guest import POWEROFF_GRACE, RunningGuest, boot_guest, start_guest
from vhostpy.testing.initramfs import EXIT_MARKER, START_MARKER
from vhostpy.testing.kernel import KernelInfo
from vhostpy.testing.kernel import find_kernel as _find_kernel
from vhostpy.testing.qemu import DEFAULT_APPEND, DeviceSpec, find_qemu, guest_mac, qemu_command
from vhostpy.testing.run_guest import main

__all__ = [
    "DEFAULT_APPEND",
    "EXIT_MARKER",
    "KVM_PROBE_TIMEOUT",
    "POWEROFF_GRACE",
    "REPO_ROOT",
    "START_MARKER",
    "DeviceSpec",
    "Guest",
    "GuestError",
    "GuestImageError",
    "GuestResult",
    "GuestTimeout",
    "KernelInfo",
    "RunningGuest",
    "boot_guest",
    "build_initramfs",
    "console_values",
    "detect_accel",
    "find_kernel",
    "find_qemu",
    "guest_mac",
    "host_binary",
    "main",
    "parse_console",
    "qemu_command",
    "require_qemu",
    "start_guest",
    "wait_for_socket",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The running-guest class under its other name.
Guest = RunningGuest


def find_kernel() -> KernelInfo:
    """The guest kernel (``/boot/vmlinuz-<ver>`` + ``/lib/modules/<ver>``); raises if missing."""
    return _find_kernel()


def build_initramfs(*, force: bool = False) -> Path:
    """Build or reuse the cached base initramfs for `find_kernel`; return its path."""
    return _initramfs.build_initramfs(None, find_kernel(), force=force)


def require_qemu() -> KernelInfo:
    """Skip the calling test when QEMU or a guest kernel is missing; fail instead under CI.

    Under ``CI=true`` (GitHub Actions sets it) a missing prerequisite is a test failure, so a
    broken runner cannot turn the QEMU suite into silent skips.
    """
    try:
        find_qemu()
        kernel = find_kernel()
        _initramfs.find_busybox()
        build_initramfs()
    except (GuestImageError, subprocess.CalledProcessError, OSError) as e:
        unavailable(f"QEMU guest prerequisites missing: {e}")
    return kernel


if __name__ == "__main__":
    sys.exit(main())
