"""Host adapters around `LguestBridge`: where guest memory, notifies and irqs come from.

Two adapters:

* `SharedMemoryHost` -- for embedding and tests. Guest RAM, the device page and the vring area
  live in one memfd (shareable: the same fd can go to a vhost-user back-end in SET_MEM_TABLE),
  mapped into a `GuestMemory`. Notifies arrive by direct call (`notify`), as 8-byte
  little-endian addresses written to a pipe (`post_notify` / `notify_fd`, safe from any
  thread) or on per-queue kick eventfds (`kick_fd`, like LHREQ_EVENTFD); an `EventLoop` can
  watch the last two (`attach`). Irqs go to callbacks (`on_irq`) and per-irq eventfds
  (`irq_fd`).
* `DevLguestHost` -- the Launcher's half of the real /dev/lguest protocol: a write of
  LHREQ_INITIALIZE {guest_base, pfnlimit, start}, LHREQ_IRQ {irq} per interrupt, LHREQ_EVENTFD
  {address, fd} per queue, and the run loop of `pread(fd, word, cpu)` returning the next notify
  address. Words are the Launcher's `unsigned long` (4 bytes on i386; a parameter, default
  native). No kernel since 4.14 has lguest, so CI cannot run it on a real host: it is tested
  against a software model of the device (tests/test_lguest_host.py); by hand it has run a
  real 3.11 i386 lguest host's guest under `vhostpy lguest`.

Neither adapter knows about vhost-user sessions; both leave guest mistakes to the bridge.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .device import Device
from .errors import ConfigurationError
from .lguest_bridge import (
    LHREQ_EVENTFD,
    LHREQ_INITIALIZE,
    LHREQ_IRQ,
    PAGE_SIZE,
    Layout,
    LguestBridge,
    LguestDevice,
)
from .loop import EventLoop
from .memory import GuestMemory

__all__ = ["DEVICE_PAGES", "DevLguestHost", "LguestFile", "RunExit", "SharedMemoryHost"]

log = logging.getLogger(__name__)

#: Pages above RAM for the device page and vrings (the Launcher's DEVICE_PAGES).
DEVICE_PAGES = 256
_ADDR = struct.Struct("<Q")
ERESTART = 85   # Linux: the guest asked to be restarted


class SharedMemoryHost:
    """Guest memory in a memfd, an `LguestBridge` over it, eventfd/pipe notify and irqs."""

    def __init__(self, ram_size: int, *, device_pages: int = DEVICE_PAGES,
                 layout: Layout = "3.x", console_sink: Callable[[bytes], None] | None = None,
                 name: str = "vhostpy-lguest") -> None:
        if device_pages < 1:
            raise ConfigurationError(f"device_pages must be at least 1, not {device_pages}")
        self.ram_size = ram_size
        self.size = ram_size + device_pages * PAGE_SIZE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.memory = GuestMemory()
        self._notify_r, self._notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.memory.map_fd(self.fd, 0, self.size, 0, 0)
            self.bridge = LguestBridge(self.memory, ram_size, layout=layout,
                                       irq_sink=self._raise_irq, console_sink=console_sink)
        except BaseException:
            self.close()
            raise
        self.irq_counts: collections.Counter[int] = collections.Counter()
        self._irq_callbacks: list[Callable[[int], None]] = []
        self._irq_fds: dict[int, int] = {}
        self._kick_fds: dict[int, int] = {}
        self._partial = b""
        self._loop: EventLoop | None = None

    # ---------------------------------------------------------------- devices and memory

    def add_device(self, device: Device, *, queue_size: int | None = None) -> LguestDevice:
        """`LguestBridge.add_device` on this host's bridge."""
        return self.bridge.add_device(device, queue_size=queue_size)

    def regions(self) -> list[tuple[int, int, int, int]]:
        """(guest_phys_addr, size, userspace_addr, mmap_offset) of `fd`, for SET_MEM_TABLE."""
        return [(0, self.size, 0, 0)]

    # ---------------------------------------------------------------- notify

    def notify(self, address: int) -> None:
        """LHCALL_NOTIFY(address), on the caller's thread."""
        self.bridge.notify(address)

    @property
    def notify_fd(self) -> int:
        """Write 8-byte little-endian addresses here; `attach`ed loops dispatch them."""
        return self._notify_w

    def post_notify(self, address: int) -> None:
        """Queue a notify for the loop's thread (callable from any thread)."""
        os.write(self._notify_w, _ADDR.pack(address))

    def drain_notifies(self) -> int:
        """Dispatch every address waiting in the notify pipe; returns how many."""
        count = 0
        while True:
            try:
                chunk = os.read(self._notify_r, 8 * 512)
            except BlockingIOError:
                break
            if not chunk:
                break
            data = self._partial + chunk
            whole = len(data) - len(data) % 8
            self._partial = data[whole:]
            for (address,) in _ADDR.iter_unpack(data[:whole]):
                self.bridge.notify(address)
                count += 1
        return count

    def _drain_for_loop(self) -> None:
        self.drain_notifies()

    def kick_fd(self, address: int) -> int:
        """An eventfd that notifies `address` when written (LHREQ_EVENTFD's equivalent)."""
        fd = self._kick_fds.get(address)
        if fd is None:
            fd = self._kick_fds[address] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if self._loop is not None:
                self._watch_kick(address, fd)
        return fd

    def poll_kicks(self) -> int:
        """Dispatch every kick eventfd that was written; returns how many fired."""
        return sum(self._on_kick(address, fd) for address, fd in list(self._kick_fds.items()))

    def _on_kick(self, address: int, fd: int) -> bool:
        return _notify_from_eventfd(self.bridge, address, fd)

    def _watch_kick(self, address: int, fd: int) -> None:
        assert self._loop is not None
        self._loop.add_reader(fd, _reader(self._on_kick, address, fd))

    def attach(self, loop: EventLoop) -> None:
        """Let `loop` dispatch the notify pipe and every kick eventfd, and run the rings'
        polling and coalescing timers."""
        self._loop = loop
        self.bridge.attach(loop)
        loop.add_reader(self._notify_r, self._drain_for_loop)
        for address, fd in self._kick_fds.items():
            self._watch_kick(address, fd)

    # ---------------------------------------------------------------- irqs

    def on_irq(self, callback: Callable[[int], None]) -> None:
        """Call `callback(irq)` for every interrupt raised."""
        self._irq_callbacks.append(callback)

    def irq_fd(self, irq: int) -> int:
        """An eventfd written each time `irq` is raised (a call fd for that queue)."""
        fd = self._irq_fds.get(irq)
        if fd is None:
            fd = self._irq_fds[irq] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def _raise_irq(self, irq: int) -> None:
        self.irq_counts[irq] += 1
        fd = self._irq_fds.get(irq)
        if fd is not None:
            os.eventfd_write(fd, 1)
        for callback in self._irq_callbacks:
            callback(irq)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Reset every device, stop watching, close every fd and unmap (idempotent)."""
        if self.fd < 0:
            return
        bridge = getattr(self, "bridge", None)   # absent when __init__ failed
        if bridge is not None:
            bridge.reset_all()
        kick_fds = list(getattr(self, "_kick_fds", {}).values())
        irq_fds = list(getattr(self, "_irq_fds", {}).values())
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is not None:
            for fd in [self._notify_r, *kick_fds]:
                loop.remove_reader(fd)
        for fd in [*kick_fds, *irq_fds, self._notify_r, self._notify_w, self.fd]:
            os.close(fd)
        self._kick_fds, self._irq_fds = {}, {}
        self._notify_r = self._notify_w = self.fd = -1
        self.memory.clear()


def _notify_from_eventfd(bridge: LguestBridge, address: int, fd: int) -> bool:
    """A queue's kick eventfd fired: consume it and notify `address`; False if it had not."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    bridge.notify(address)
    return True


def _reader(handler: Callable[[int, int], bool], address: int, fd: int) -> Callable[[], None]:
    """An EventLoop reader calling `handler(address, fd)`."""
    def read() -> None:
        handler(address, fd)
    return read


class LguestFile(Protocol):
    """What DevLguestHost needs of /dev/lguest: write a request, pread the next notify."""

    def write(self, data: bytes) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


class _DevFile:
    """The real device: one fd, O_RDWR."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class RunExit:
    """Why `DevLguestHost.run` returned: "died" (with the kernel's reason), "restart",
    "error" (an unexpected errno) or "limit" (max_exits reached)."""

    kind: str
    detail: str = ""


class DevLguestHost:
    """The Launcher's run loop over /dev/lguest (or `opener(path)`), feeding an `LguestBridge`.

    In CI (no kernel since 4.14 has lguest) checked against a software model of /dev/lguest;
    it has also driven a real 3.11 lguest host, by hand. With `eventfds=True`, each queue of
    a started device gets an eventfd registered with LHREQ_EVENTFD (the kernel then signals
    it instead of returning the notify from pread); `poll_eventfds()` or an `attach`ed
    EventLoop serves them. `dispatch(address)` receives the notifies the run loop reads
    (default `bridge.notify` on the run loop's thread; a Launcher hands them to its device
    thread instead).
    """

    def __init__(self, memory: GuestMemory, ram_size: int, *, layout: Layout = "3.x",
                 console_sink: Callable[[bytes], None] | None = None,
                 path: str = "/dev/lguest", opener: Callable[[str], LguestFile] | None = None,
                 word_size: int | None = None, cpu: int = 0, eventfds: bool = False,
                 dispatch: Callable[[int], None] | None = None) -> None:
        self.word_size = struct.calcsize("L") if word_size is None else word_size
        if self.word_size not in (4, 8):
            raise ConfigurationError(f"/dev/lguest word size must be 4 or 8, not {word_size}")
        self._word = "<I" if self.word_size == 4 else "<Q"
        self.memory = memory
        self.path = path
        self.opener: Callable[[str], LguestFile] = opener or _DevFile
        self.cpu = cpu
        self.file: LguestFile | None = None
        self.bridge = LguestBridge(memory, ram_size, layout=layout, irq_sink=self.trigger_irq,
                                   console_sink=console_sink)
        self.eventfds: dict[int, int] = {}     # queue address -> eventfd
        #: The kernel refused LHREQ_EVENTFD (EINVAL/ENOSYS): every notify stays on pread.
        self.eventfds_refused = False
        self._loop: EventLoop | None = None
        #: Where notifies read by the run loop go (default: the bridge, on the run-loop thread).
        self.dispatch: Callable[[int], None] = dispatch or self.bridge.notify
        if eventfds:
            self.bridge.on_device_started = self._register_queues

    def _words(self, *values: int) -> bytes:
        return b"".join(struct.pack(self._word, v & (1 << 8 * self.word_size) - 1)
                        for v in values)

    def _request(self, *values: int) -> None:
        if self.file is None:
            raise ConfigurationError("/dev/lguest is not open: call initialize() first")
        self.file.write(self._words(*values))

    # ---------------------------------------------------------------- requests

    def initialize(self, start: int, *, guest_base: int | None = None,
                   pfnlimit: int | None = None, pgdir: int | None = None) -> None:
        """Open the device and write LHREQ_INITIALIZE {guest_base, pfnlimit, start}.

        `guest_base` defaults to where guest-physical 0 is mapped in this process, `pfnlimit`
        to the pages in use (RAM, device page, vrings): the Launcher's guest_limit / pagesize.
        With `pgdir` the 2.6.24 form is written instead: {guest_base, pfnlimit, pgdir, start}.
        """
        if guest_base is None:
            region = self.memory.find(0)
            if region is None:
                raise ConfigurationError("no guest memory at guest-physical 0")
            holder = ctypes.c_char.from_buffer(region.mapping)
            guest_base = ctypes.addressof(holder)
            del holder
        if pfnlimit is None:
            pfnlimit = self.bridge.guest_limit // PAGE_SIZE
        if self.file is None:
            self.file = self.opener(self.path)
        if pgdir is None:
            self._request(LHREQ_INITIALIZE, guest_base, pfnlimit, start)
        else:
            self._request(LHREQ_INITIALIZE, guest_base, pfnlimit, pgdir, start)

    def trigger_irq(self, irq: int) -> None:
        """LHREQ_IRQ {irq} (the bridge's irq sink); a failing write is logged, not raised."""
        try:
            self._request(LHREQ_IRQ, irq)
        except (OSError, ConfigurationError) as exc:
            log.warning("lguest: LHREQ_IRQ %d failed: %s", irq, exc)

    def register_eventfd(self, address: int, fd: int) -> None:
        """LHREQ_EVENTFD {address, fd}: notifies of `address` signal `fd` in the kernel."""
        self._request(LHREQ_EVENTFD, address, fd)

    def _register_queues(self, lg: LguestDevice) -> None:
        for q in lg.queues:
            if q.address in self.eventfds or self.eventfds_refused:
                continue        # the kernel keeps a registration across device resets
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.register_eventfd(q.address, fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EINVAL, errno.ENOSYS):   # a kernel without it
                    self.eventfds_refused = True
                log.warning("lguest: LHREQ_EVENTFD for %#x failed: %s; notifies stay on "
                            "pread", q.address, exc)
                continue
            self.eventfds[q.address] = fd
            if self._loop is not None:
                self._watch(q.address, fd)

    def _on_eventfd(self, address: int, fd: int) -> bool:
        return _notify_from_eventfd(self.bridge, address, fd)

    def _watch(self, address: int, fd: int) -> None:
        assert self._loop is not None
        self._loop.add_reader(fd, _reader(self._on_eventfd, address, fd))

    def poll_eventfds(self) -> int:
        """Serve every signalled queue eventfd; returns how many fired."""
        return sum(self._on_eventfd(a, fd) for a, fd in list(self.eventfds.items()))

    def attach(self, loop: EventLoop) -> None:
        """Serve the queue eventfds from `loop` (a thread other than the run loop's), which
        also runs the rings' polling and coalescing timers."""
        self._loop = loop
        self.bridge.attach(loop)
        for address, fd in self.eventfds.items():
            self._watch(address, fd)

    # ---------------------------------------------------------------- running

    def step(self) -> RunExit | None:
        """One pread: dispatch the notify it returns (None) or say why the guest stopped."""
        assert self.file is not None, "initialize() first"
        try:
            data = self.file.pread(self.word_size, self.cpu)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                try:
                    reason = self.file.pread(1023, self.cpu).split(b"\0", 1)[0]
                except OSError:
                    reason = b""
                return RunExit("died", reason.decode(errors="replace"))
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return None     # 2.6.24's LHREQ_BREAK, or a signal: just run again
            if exc.errno == ERESTART:
                return RunExit("restart")
            return RunExit("error", f"{exc}")
        if len(data) != self.word_size:
            return RunExit("error", f"pread returned {len(data)} bytes, not {self.word_size}")
        (address,) = struct.unpack(self._word, data)
        self.dispatch(address)
        return None

    def run(self, max_exits: int | None = None) -> RunExit:
        """Run the guest until it dies, asks for a restart or `max_exits` preads were served."""
        served = 0
        while max_exits is None or served < max_exits:
            result = self.step()
            if result is not None:
                return result
            served += 1
        return RunExit("limit")

    def close(self) -> None:
        """Reset devices, close eventfds and the device (idempotent)."""
        self.bridge.reset_all()
        for fd in self.eventfds.values():
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)
        self.eventfds = {}
        if self.file is not None:
            self.file.close()
            self.file = None
