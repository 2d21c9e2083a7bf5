"""One exception tree for vhostpy, organised by whose fault an error is.

* `FrontendError`: the vhost-user front-end (QEMU, DPDK, a test) sent something wrong.
* `GuestError`: the guest driver put something wrong in its rings or memory.
* `BackendError`: vhostpy itself cannot do what was asked (unsupported, out of resources).
* `ConfigurationError`: the user gave a bad value (command line, API arguments).

Errors never do I/O and never log; the layer that catches them decides what to do.
"""

from __future__ import annotations


class VhostError(Exception):
    """Base of every error vhostpy raises on purpose."""

    whose = "vhostpy"


class FrontendError(VhostError):
    """The front-end broke the vhost-user protocol."""

    whose = "front-end"


class ProtocolError(FrontendError):
    """A message that cannot be decoded or is not allowed.

    `request` is the request (an enum member, or the raw int when unknown, or None when the
    header itself was unreadable); `field` and `value` name the offending part. `fatal` means
    the byte stream cannot be resynchronised and the connection must be dropped. `fds` are
    descriptors that arrived with the rejected message: the caller owns them and must close them.
    """

    def __init__(
        self,
        message: str,
        *,
        request: object = None,
        flags: int = 0,
        field: str | None = None,
        value: object = None,
        fatal: bool = False,
        fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.request = request
        self.flags = flags
        self.field = field
        self.value = value
        self.fatal = fatal
        self.fds = fds


class GuestError(VhostError):
    """The guest driver's rings or buffers are invalid."""

    whose = "guest"


class MemoryAccessError(GuestError):
    """A guest address (or range) is not backed by any mapped region."""


class RingError(GuestError):
    """A virtqueue's ring is malformed (loops, bad indices, bad descriptor chains)."""


class BackendError(VhostError):
    """vhostpy cannot do what was asked."""

    whose = "back-end"


class UnsupportedError(BackendError):
    """A request or feature that this back-end does not implement."""


class ConfigurationError(VhostError):
    """A bad value from the user: command-line options or API arguments."""

    whose = "configuration"
