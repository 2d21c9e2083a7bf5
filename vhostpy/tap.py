"""A Linux tap device as a port: frames between vhostpy and the host's network stack.

`TapPort.open(name)` attaches to (or creates) tap interface `name` with IFF_TAP |
IFF_NO_PI, non-blocking. `send(frames)` writes frames into the host stack; `read_batch()`
reads what the host sends. vhostpy completes guest checksums itself and negotiates no
segmentation offloads, so frames cross as plain Ethernet frames and IFF_VNET_HDR is not
needed. The caller (the application) watches `fd` in its event loop. Creating a tap device
needs CAP_NET_ADMIN; the error says so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence

from vhostpy.errors import ConfigurationError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_READ = 65536 + 14


class TapPort:
    """One tap interface; a port in the `Switch` sense (`name`, `send`)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.sent = 0
        self.received = 0
        self.drops = 0

    @classmethod
    def open(cls, ifname: str) -> TapPort:
        """Attach to tap interface `ifname`, creating it if needed."""
        raw = ifname.encode()
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw:
            raise ConfigurationError(f"--tap: invalid interface name {ifname!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigurationError(f"--tap {ifname}: cannot open /dev/net/tun: "
                                     f"{exc.strerror}") from exc
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw, IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
            raise ConfigurationError(f"--tap {ifname}: TUNSETIFF failed: {exc.strerror}{hint}") \
                from exc
        return cls(fd, ifname)

    def send(self, frames: Sequence[bytes]) -> int:
        """Write frames to the host stack; frames it cannot take now are dropped and counted."""
        done = 0
        for frame in frames:
            try:
                os.write(self.fd, frame)
                done += 1
            except OSError:   # EAGAIN when the host is not reading, EIO while the link is down
                self.drops += 1
        self.sent += done
        return done

    def read_batch(self, limit: int = 64) -> list[bytes]:
        """Up to `limit` frames the host sent (empty when none are waiting)."""
        frames = []
        for _ in range(limit):
            try:
                frame = os.read(self.fd, MAX_READ)
            except (BlockingIOError, InterruptedError):
                break
            if not frame:
                break
            frames.append(frame)
        self.received += len(frames)
        return frames

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
