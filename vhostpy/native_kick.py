"""Kicks served in C: a live ring's kick eventfd watched and served by compiled code.

At queue depth 1 every request costs a kick, and a kick that crosses Python (the loop's
select, the ring runner, the device's drain) costs more than the request itself. For a ring
whose device has a compiled data path able to serve a kick alone (a `NativeServer`:
virtio-blk over a raw image, `blk_cffi.BlkFastPath`), the runner (`vring.Vring`) hands the
ring's kick fd to the loop's `KickWaiter`, which waits in the loop's place
(`loop.EventLoop.set_waiter`): one C call (`vp_kick_wait`, `_fastpath_kick.c`) waits on the
selector's own epoll fd and on every such kick fd, and serves kicks as they come -- eventfd
read, requests, used entries, interrupt -- returning to Python only when a Python fd is
ready, a timer is due, a signal came, or a ring hands its kick back.

The contract with the runner (`KickedRing`): before each wait every ring says whether C may
serve its next kick alone and where C signals (`native_target`: the runner would do nothing
but serve it and decide its interrupt -- not polling, not holding interrupts, no completions
pending, not coalescing); after it, each ring learns what C served (`native_served`) and
finishes any kick C handed back (`native_handback`: a request only Python serves, a failed
request to log, an interrupt Python raises, a kick that served enough to start polling or
coalescing, a broken ring, or a kick that came while C was not allowed to serve it). So the
guest sees what the Python kick path would have done, and the runner's counters stay right.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable
from typing import Any, Protocol

from . import _accel
from .virtqueue import Virtqueue

__all__ = ["NOT_SERVED", "KickWaiter", "KickedRing", "NativeKick", "NativeServer", "waiter_for"]

log = logging.getLogger(__name__)

ffi: Any = _accel.ffi
lib: Any = _accel.lib

#: `native_handback`'s rc for a kick C did not serve at all (its ring was not armed).
NOT_SERVED = -1
#: C's call_fd meaning "make no interrupt decision" (the runner has no call endpoint).
NO_SIGNAL = -2


class NativeServer(Protocol):
    """A device's compiled data path that C may run on a kick by itself."""

    def kick_parts(self) -> tuple[Any, Any]:
        """The `struct vp_blk *` and `struct vp_blk_burst *` C serves the ring with."""

    def prepare(self, vq: Virtqueue) -> bool:
        """Make C's view of the device current before C may serve a kick (store fd,
        capacity; counters folded); False: C must not serve now."""

    def fold(self) -> None:
        """Move C's counters into the device's statistics."""

    def resume(self, index: int, vq: Virtqueue, rc: int) -> int:
        """Finish the drain C handed back with `rc` (its burst state left as C left it);
        returns how many more chains were published."""


class KickedRing(Protocol):
    """What the runner of a ring whose kicks C serves offers (`vring.Vring`)."""

    def native_target(self) -> int | None:
        """C's call_fd when C may serve the next kick alone (an eventfd, or NO_SIGNAL),
        or None when the runner must see it."""

    def native_served(self, kicks: int, chains: int) -> None:
        """C served `kicks` kicks to the end, publishing `chains` chains."""

    def native_handback(self, rc: int, served: int, batch: int) -> None:
        """Finish a kick C started (`rc`: what C's drain returned, after publishing
        `served` chains, `batch` of them per interrupt as the runner counts it) or did not
        serve at all (`rc` NOT_SERVED)."""


class NativeKick:
    """One ring whose kicks C may serve: its `struct vp_kick` and the Python on both sides
    of each wait. `max_served`: a kick publishing more chains is handed back (the runner's
    pacing threshold)."""

    def __init__(self, ring: KickedRing, server: NativeServer, vq: Virtqueue, fd: int,
                 max_served: int) -> None:
        if lib is None:
            raise TypeError("kicks served in C need the compiled fast path")
        self.ring = ring
        self.server = server
        self.vq = vq
        self.fd = fd
        c = self.c = ffi.new("struct vp_kick *")
        c.blk, c.bu = server.kick_parts()
        c.kick_fd = fd
        c.max_served = max_served
        self._kicks = 0
        self._chains = 0

    def before_wait(self) -> None:
        """Arm C for this ring's next kick, or not (see `KickedRing.native_target`)."""
        c = self.c
        c.armed = 0
        if c.handback:
            return
        target = self.ring.native_target()
        if target is None:
            return
        native = getattr(self.vq, "native", None)
        q = native() if native is not None else None
        if q is None or not self.server.prepare(self.vq):
            return
        c.q, c.call_fd, c.armed = q, target, 1

    def after_wait(self) -> Callable[[], None] | None:
        """Tell the ring what C did; returns the callback that finishes a handed-back kick."""
        c = self.c
        c.armed = 0
        kicks, chains = c.kicks - self._kicks, c.chains - self._chains
        if kicks:
            self._kicks, self._chains = c.kicks, c.chains
            self.server.fold()
            self.ring.native_served(kicks, chains)
        if not c.handback:
            return None
        rc, served = int(c.rc), int(c.served)
        batch = served if c.waiting >= 2 else served // max(1, int(c.signals))
        c.handback = 0
        self.server.fold()
        return lambda: self.ring.native_handback(rc, served, batch)

    def close(self) -> None:
        """The ring no longer uses C for its kicks: C's counters are folded."""
        self.c.armed = 0
        self.server.fold()


class KickWaiter:
    """Waits in an `EventLoop`'s place while rings have their kicks served in C (see the
    module docstring); one per loop (`waiter_for`)."""

    def __init__(self) -> None:
        if lib is None:
            raise TypeError("kicks served in C need the compiled fast path")
        #: The epoll set C waits on: open only while some ring is served (no fd is kept
        #: by a loop whose front-ends are gone).
        self._epoll: select.epoll | None = None
        self._selector_fd: int | None = None
        self._rings: dict[int, NativeKick] = {}
        self._array: Any = ffi.new("struct vp_kick *[]", 1)

    def add(self, kick: NativeKick) -> None:
        """Serve `kick.fd` in C from the next wait (the caller stopped watching it)."""
        if kick.fd in self._rings:
            raise ValueError(f"kick fd {kick.fd} is served in C already")
        if self._epoll is None:
            self._epoll = select.epoll()
            self._selector_fd = None
        self._epoll.register(kick.fd, select.EPOLLIN)
        self._rings[kick.fd] = kick
        self._rebuild()

    def remove(self, fd: int) -> NativeKick | None:
        """Stop serving `fd` (the caller watches it again); the ring's NativeKick, or None."""
        kick = self._rings.pop(fd, None)
        if kick is None or self._epoll is None:
            return kick
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):       # already closed: the epoll set dropped it
            pass
        if not self._rings:
            self._epoll.close()
            self._epoll = None
        self._rebuild()
        return kick

    def _rebuild(self) -> None:
        kicks = [k.c for k in self._rings.values()]
        self._array = ffi.new("struct vp_kick *[]", kicks or 1)

    def active(self) -> bool:
        """Whether any ring's kicks are served in C (else the loop selects as usual)."""
        return bool(self._rings)

    def wait(self, selector_fd: int, timeout: float | None) -> list[Callable[[], None]]:
        """Wait like the loop's selector would for at most `timeout` seconds (None: no
        limit), serving kicks in C meanwhile; returns the rings' callbacks to run now."""
        epoll = self._epoll
        if epoll is None:
            return []
        if self._selector_fd != selector_fd:
            if self._selector_fd is not None:
                epoll.unregister(self._selector_fd)
            epoll.register(selector_fd, select.EPOLLIN)
            self._selector_fd = selector_fd
        rings = list(self._rings.values())
        for kick in rings:
            kick.before_wait()
        ms = -1 if timeout is None else min(math.ceil(timeout * 1000), 2**31 - 1)
        rc = lib.vp_kick_wait(epoll.fileno(), self._array, len(rings), ms)
        if rc < 0:
            log.warning("kicks served in C: epoll_wait failed (errno %d)", -rc)
        callbacks = []
        for kick in rings:
            callback = kick.after_wait()
            if callback is not None:
                callbacks.append(callback)
        return callbacks

    def close(self) -> None:
        """Serve nothing more (the loop is closing)."""
        for fd in list(self._rings):
            self.remove(fd)


def waiter_for(host: object) -> KickWaiter | None:
    """The `KickWaiter` of `host` (made and installed on first use), or None when kicks
    cannot be served in C there: no compiled fast path, or a host that cannot let a waiter
    wait in its place (an asyncio loop)."""
    if lib is None:
        return None
    set_waiter = getattr(host, "set_waiter", None)
    if set_waiter is None:
        return None
    waiter = getattr(host, "waiter", None)
    if isinstance(waiter, KickWaiter):
        return waiter
    if waiter is not None:
        return None
    waiter = KickWaiter()
    set_waiter(waiter)
    return waiter
