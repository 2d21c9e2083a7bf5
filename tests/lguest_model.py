"""A software model of /dev/lguest (the kernel half, 3.x lguest_user.c), shared by the tests.

`FakeLguest` takes the Launcher's writes (arrays of `unsigned long`: LHREQ_INITIALIZE
{guest_base, pfnlimit, start}, LHREQ_IRQ {irq}, LHREQ_EVENTFD {address, fd}) and answers
`pread(fd, word, cpu)` the way the kernel does:

* a read "runs the guest": it returns the next address the guest notified (LHCALL_NOTIFY),
  blocking until there is one (`blocking=True`) or failing with EAGAIN (`blocking=False`, as
  after 2.6.24's LHREQ_BREAK);
* an address registered with LHREQ_EVENTFD signals that eventfd instead of the read;
* a guest that dies while the read runs gives ENOENT; later reads return the reason string
  (as many bytes as asked); a restart request gives ERESTART;
* reads from any thread but the one that wrote LHREQ_INITIALIZE fail with EPERM, writes after
  the guest died with ENOENT, irqs >= 32 with EINVAL (as in the kernel);
* with `map_guest=True` the model reaches guest memory through guest_base and pfnlimit, as
  the kernel does (`memory`), so those values are checked by use.

It is a model, not the kernel. The launcher it tests has since booted a real 3.11 lguest guest
by hand (the README); the model itself was not compared with the kernel byte by byte.
Run as a script (`python lguest_model.py SCENARIO -- lguest ARGS...`) it runs
`vhostpy lguest` with the model as its /dev/lguest and a scripted guest thread (see
`SCENARIOS`), so tests can drive the real command line with pipes and signals.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import struct
import sys
import threading
import time
from collections.abc import Callable

from vhostpy.memory import GuestMemory

LHREQ_INITIALIZE, LHREQ_GETDMA, LHREQ_IRQ, LHREQ_BREAK, LHREQ_EVENTFD = range(5)
ERESTART = 85
PAGE = 4096


class FakeLguest:
    """A software model of /dev/lguest (see the module docstring)."""

    def __init__(self, word: int | None = None, *, blocking: bool = False,
                 eventfd_errno: int | None = None, map_guest: bool = False) -> None:
        self.word = word or struct.calcsize("L")
        self.fmt = "<I" if self.word == 4 else "<Q"
        self.blocking = blocking
        self.eventfd_errno = eventfd_errno
        self.map_guest = map_guest
        self.requests: list[tuple[int, ...]] = []
        self.notifies: collections.deque[int] = collections.deque()
        self.eventfds: dict[int, int] = {}
        self.irqs: list[int] = []
        self.on_irq: Callable[[int], None] | None = None
        self.dead: str | None = None
        self.reported = False            # ENOENT was returned once
        self.restart = False
        self.closed = False
        self.opened: list[str] = []
        self.owner: int | None = None
        self.initialized = threading.Event()
        self.init: tuple[int, ...] = ()
        self.memory: GuestMemory | None = None
        self.preads = 0
        self.returned: list[int] = []    # notify addresses the reads returned
        self.resumed = 0                 # notifies after which the Launcher read again
        self.cond = threading.Condition()

    # -- the file ------------------------------------------------------------------------
    def open(self, path: str) -> FakeLguest:
        self.opened.append(path)
        return self

    def write(self, data: bytes) -> int:
        if len(data) % self.word or not data:
            raise OSError(errno.EINVAL, "not whole words")
        words = tuple(v for (v,) in struct.iter_unpack(self.fmt, data))
        if self.dead is not None:
            raise OSError(errno.ENOENT, "guest is dead")
        self.requests.append(words)
        if words[0] == LHREQ_INITIALIZE:
            self._initialize(words)
        elif words[0] == LHREQ_IRQ:
            if len(words) != 2 or words[1] >= 32:
                raise OSError(errno.EINVAL, "irq out of range")
            self.irqs.append(words[1])
            if self.on_irq is not None:
                self.on_irq(words[1])
        elif words[0] == LHREQ_EVENTFD:
            if self.eventfd_errno is not None:
                raise OSError(self.eventfd_errno, os.strerror(self.eventfd_errno))
            self.eventfds[words[1]] = words[2]
        elif words[0] != LHREQ_BREAK:
            raise OSError(errno.EINVAL, f"unknown request {words[0]}")
        return 0

    def _initialize(self, words: tuple[int, ...]) -> None:
        self.init = words
        self.owner = threading.get_ident()
        if self.map_guest and len(words) == 4:
            _, base, pfnlimit, _ = words
            buf = (ctypes.c_char * (pfnlimit * PAGE)).from_address(base)
            self.memory = GuestMemory()
            self.memory.add_buffer(buf, 0)
        self.initialized.set()

    def pread(self, size: int, offset: int) -> bytes:
        if not self.initialized.is_set():
            raise OSError(errno.EINVAL, "LHREQ_INITIALIZE first")
        if offset != 0:
            raise OSError(errno.EINVAL, f"no cpu {offset}")
        if self.owner is not None and threading.get_ident() != self.owner:
            raise OSError(errno.EPERM, "not the task that owns the guest")
        self.preads += 1
        with self.cond:
            self.resumed = len(self.returned)    # the guest runs again from here
            self.cond.notify_all()
            while True:
                if self.restart:
                    raise OSError(ERESTART, "restart")
                if self.dead is not None:
                    if not self.reported:
                        self.reported = True
                        raise OSError(errno.ENOENT, "guest dead")
                    reason = self.dead.encode() + b"\0"
                    return reason[:size]
                if self.notifies:
                    address = self.notifies.popleft()
                    self.returned.append(address)
                    return struct.pack(self.fmt, address)
                if not self.blocking:
                    raise OSError(errno.EAGAIN, "nothing to do")
                self.cond.wait(0.05)

    def close(self) -> None:
        self.closed = True

    # -- the guest's side ----------------------------------------------------------------
    def guest_notify(self, address: int) -> None:
        """The guest's LHCALL_NOTIFY, as the kernel routes it.

        Blocking model: like the guest's vCPU, the caller stays stopped until the Launcher
        has taken the address and come back to read again (or the guest died).
        """
        fd = self.eventfds.get(address)
        if fd is not None:
            os.eventfd_write(fd, 1)
            return
        with self.cond:
            self.notifies.append(address)
            ticket = len(self.returned) + len(self.notifies)
            self.cond.notify_all()
            deadline = time.monotonic() + 10
            while (self.blocking and self.resumed < ticket and self.dead is None
                   and not self.restart and time.monotonic() < deadline):
                self.cond.wait(0.05)

    def die(self, reason: str) -> None:
        """kill_guest(reason): the running read returns ENOENT."""
        with self.cond:
            if self.dead is None:
                self.dead = reason
            self.cond.notify_all()

    def request_restart(self) -> None:
        with self.cond:
            self.restart = True
            self.cond.notify_all()


# ---------------------------------------------------------------------------- scripted guests


def _console_guest(model: FakeLguest, ram: int) -> None:
    from vhostpy.lguest_guest import LguestGuestDriver

    assert model.memory is not None
    drv = LguestGuestDriver(model.memory, ram, model.guest_notify, heap=(ram // 2, ram // 4))
    model.on_irq = drv.interrupt
    drv.early_console(b"early boot\n", 0x3000)
    con = drv.console()
    con.write(b"hello from the guest\n")
    got = b""
    deadline = time.monotonic() + 10
    while b"\n" not in got and time.monotonic() < deadline:
        got += con.receive()
        time.sleep(0.005)
    con.write(b"guest read: " + got)
    model.die("CRASH: Power down")


def _idle_guest(model: FakeLguest, ram: int) -> None:
    from vhostpy.lguest_guest import LguestGuestDriver

    assert model.memory is not None
    drv = LguestGuestDriver(model.memory, ram, model.guest_notify)
    drv.early_console(b"idling\n", 0x3000)


def _panic_guest(model: FakeLguest, ram: int) -> None:
    model.die("CRASH: Kernel panic - not syncing: no init found")


def _restart_guest(model: FakeLguest, ram: int) -> None:
    model.request_restart()


SCENARIOS: dict[str, Callable[[FakeLguest, int], None]] = {
    "console": _console_guest, "idle": _idle_guest, "panic": _panic_guest,
    "restart": _restart_guest,
}


def main(argv: list[str]) -> int:
    """SCENARIO -- lguest ARGS: `vhostpy lguest ARGS` with this model and a scripted guest."""
    from vhostpy import cli, lguest_launcher

    scenario, args = argv[0], argv[argv.index("--") + 1:]
    model = FakeLguest(blocking=True, map_guest=True)
    lguest_launcher.DEFAULT_OPENER = model.open

    def guest() -> None:
        if not model.initialized.wait(20):
            return
        ram = struct.unpack_from("<Q", model.memory.read(0x2D0 + 8, 8))[0]  # type: ignore[union-attr]
        try:
            SCENARIOS[scenario](model, ram)
        except BaseException as exc:  # noqa: BLE001 (reported on stderr for the test)
            print(f"scripted guest failed: {exc!r}", file=sys.stderr)
            model.die(f"scripted guest failed: {exc!r}")

    threading.Thread(target=guest, daemon=True).start()
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
