"""Ring endpoints: kick (driver -> device), call and err (device -> driver).

A `Notifier` is an eventfd the notifier owns (`EventFdNotifier`; the compiled data paths
write it directly, hosts watch it) or a Python callable (`CallbackNotifier`, for in-process
transports such as an lguest interrupt line). `eventfd_notifier` is how a transport adopts
an fd a front-end sent: only eventfds are accepted, made non-blocking. Writing one never
blocks; a notifier that cannot be written raises `NotifierError`, and the ring runner
(`vring.Vring`, which owns a ring's three notifiers) breaks that ring.

It must never know about rings, devices or transports.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from .errors import FrontendError

__all__ = ["CallbackNotifier", "EventFdNotifier", "Notifier", "NotifierError",
           "eventfd_notifier"]


class NotifierError(OSError):
    """A notifier could not be written (its ring breaks)."""


class Notifier:
    """One endpoint of a ring: kick (driver -> device), call or err (device -> driver).

    `fd` is the eventfd behind it (compiled paths write it directly, hosts watch it), or None
    for a Python callable. `notify()` raises `NotifierError` when it cannot be delivered;
    it never blocks.
    """

    fd: int | None = None

    def notify(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the notifier owns (an eventfd is closed)."""


class EventFdNotifier(Notifier):
    """An eventfd the notifier owns, non-blocking (see `eventfd_notifier`)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def notify(self) -> None:
        fd = self.fd
        if fd is None:
            raise NotifierError(errno.EBADF, "eventfd already closed")
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass    # the counter is saturated: the other side has a wake-up pending anyway
        except OSError as exc:
            raise NotifierError(exc.errno, f"eventfd {fd}: {exc.strerror or exc}") from exc

    def drain(self) -> bool:
        """Read (reset) the counter; False when nothing was pending."""
        fd = self.fd
        if fd is None:
            return False
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise NotifierError(exc.errno, f"eventfd {fd}: {exc.strerror or exc}") from exc
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<EventFdNotifier fd={self.fd}>"


class CallbackNotifier(Notifier):
    """A Python callable (an lguest interrupt, a test's counter); owns nothing."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def notify(self) -> None:
        try:
            self.callback()
        except Exception as exc:
            raise NotifierError(errno.EIO, f"notifier callback failed: {exc!r}") from exc

    def __repr__(self) -> str:
        return f"<CallbackNotifier {self.callback!r}>"


def eventfd_notifier(fd: int, what: str) -> EventFdNotifier:
    """Adopt `fd` as a ring endpoint: it must be an eventfd (FrontendError otherwise: a pipe
    nobody reads would block a write forever, a socket never signals a kick); it is made
    non-blocking. On success the notifier owns `fd`; on failure the caller still does."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise FrontendError(f"{what} fd {fd}: {exc.strerror or exc}") from exc
    if target != "anon_inode:[eventfd]":
        raise FrontendError(f"{what} fd {fd} is not an eventfd ({target}); only eventfds "
                            "are accepted for kick, call and err")
    os.set_blocking(fd, False)
    return EventFdNotifier(fd)
