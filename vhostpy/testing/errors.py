"""The errors of `vhostpy.testing`: what the host lacks, and what a guest did wrong.

* `GuestImageError`: this machine cannot boot a test guest (no QEMU, no readable guest
  kernel, no static busybox, a library of a host binary missing). Its message is one line
  that says what to install or set. A configuration problem of the host, never of the test.
* `GuestError`: QEMU failed to start, or the guest ended without reporting an exit status;
  the message carries QEMU's output and the tail of the guest's console.
* `GuestTimeout`: a guest (or a wait on one) outlived its timeout.

Not to be confused with `vhostpy.errors.GuestError`, a guest driver's malformed rings: these
are the test harness's own failures. Errors never do I/O; stdlib only.
"""

from __future__ import annotations

__all__ = ["GuestError", "GuestImageError", "GuestTimeout"]

#: How much of QEMU's output and of the console an error message keeps (their tails).
DETAIL_CHARS = 4000


class GuestImageError(RuntimeError):
    """A prerequisite of test guests is missing on this machine; the message says which and
    what to install (one line)."""


class GuestError(RuntimeError):
    """QEMU failed to start, or the guest ended without reporting an exit status.

    `console` is the guest's serial console and `qemu_log` QEMU's own output, whole; the
    message holds the tail of each.
    """

    def __init__(self, message: str, console: str = "", qemu_log: str = "") -> None:
        details = message
        if qemu_log.strip():
            details += f"\n--- qemu output ---\n{qemu_log.strip()[-DETAIL_CHARS:]}"
        if console.strip():
            details += f"\n--- guest console (tail) ---\n{console.strip()[-DETAIL_CHARS:]}"
        super().__init__(details)
        self.console = console
        self.qemu_log = qemu_log


class GuestTimeout(GuestError):
    """The guest (or a wait) outlived its timeout; QEMU was killed if it was the guest."""
