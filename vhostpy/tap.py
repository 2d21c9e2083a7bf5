"""A Linux tap device as a port: frames between vhostpy and the host's network stack.

`TapPort.open(name)` attaches to (or creates) tap interface `name` with IFF_TAP |
IFF_NO_PI, non-blocking. `send(frames)` writes frames into the host stack; `read_batch()`
reads what the host sends, and `forward_to(switch)` hands it to a switch: under the compiled
path as one C burst (read by C, `CffiSwitch.forward_burst`, placed by C into each guest's
receive ring), with no Python per frame. vhostpy completes guest checksums itself and negotiates no
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
from typing import Any, Protocol

from vhostpy import _accel
from vhostpy.errors import ConfigurationError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_READ = 65536 + 14
#: Frames one `forward_to` reads at most (one C burst).
READ_BURST = 64


class FrameSwitch(Protocol):
    """The switch a tap hands frames to (`switch.BaseSwitch`; the compiled `CffiSwitch`
    also has `forward_burst(src, burst)`, which `TapPort.forward_to` uses when it is there)."""

    def forward(self, src: Any, frames: Sequence[bytes]) -> None: ...


class TapPort:
    """One tap interface; a port in the `Switch` sense (`name`, `send`)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.sent = 0
        self.received = 0
        self.drops = 0
        #: Frames from the host longer than MAX_READ (cut by read(2)): dropped.
        self.truncated = 0
        self._burst: Any = None   # the compiled path's read buffer, made on first use
        self._burst_keep: Any = None
        self._truncated: Any = None

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
        """Up to `limit` frames the host sent (empty when none are waiting). A frame longer
        than MAX_READ is dropped and counted in `truncated`."""
        frames: list[bytes] = []
        while len(frames) < limit:
            try:
                frame = os.read(self.fd, MAX_READ + 1)
            except (BlockingIOError, InterruptedError):
                break
            if not frame:
                break
            if len(frame) > MAX_READ:
                self.truncated += 1
                continue
            frames.append(frame)
        self.received += len(frames)
        return frames

    def forward_to(self, switch: FrameSwitch, limit: int = READ_BURST) -> int:
        """Read up to `limit` frames the host sent and hand them to `switch` as frames from
        this port; returns how many were read. Under the compiled path (`switch` has
        `forward_burst`) C reads them into one burst buffer and the switch places them into
        guest rings without bytes objects; otherwise `read_batch` then `switch.forward`.
        OSError from the first read (not EAGAIN) propagates, as `read_batch`'s would."""
        forward_burst = getattr(switch, "forward_burst", None)
        if _accel.lib is None or forward_burst is None:
            frames = self.read_batch(limit)
            if frames:
                switch.forward(self, frames)
            return len(frames)
        ffi, lib = _accel.ffi, _accel.lib
        if self._burst is None or self._burst.max < limit:
            burst = ffi.new("struct vp_frames *")
            cap = limit * (16 + MAX_READ + 1)
            buf = ffi.new("uint8_t[]", cap)
            off, lens = ffi.new("uint64_t[]", limit), ffi.new("uint32_t[]", limit)
            burst.buf, burst.cap, burst.max, burst.off, burst.len = buf, cap, limit, off, lens
            self._burst, self._burst_keep = burst, (buf, off, lens)
            self._truncated = ffi.new("uint64_t *")
        n = lib.vp_net_read_frames(self.fd, self._burst, limit, MAX_READ, self._truncated)
        if self._truncated[0]:
            self.truncated += self._truncated[0]
            self._truncated[0] = 0
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        if n:
            self.received += n
            forward_burst(self, self._burst)
        return int(n)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
