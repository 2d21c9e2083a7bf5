"""`vhostpy lguest`: a Python lguest Launcher (the user half of /dev/lguest, 3.x generation).

This module owns the Launcher's process: guest RAM plus the device pages in one shareable fd
(a memfd; on kernels before 3.17, which have no memfd_create, an O_TMPFILE or unlinked file
in /dev/shm), mapped into a `GuestMemory`; the kernel, initrd and zero page (through
`lguest_boot`); the devices on an `LguestBridge` behind a `DevLguestHost` (console first and
always, then block, net, rng and vhost-user devices in command-line order); LHREQ_INITIALIZE;
and the run loop.

Threads. The run loop (`DevLguestHost.run`: pread "runs the guest" and returns the next
notify address) stays on the thread that wrote LHREQ_INITIALIZE, because the kernel refuses
a read from any other task (EPERM). Every device is served on ONE device thread running an
`EventLoop`: notifies read by the run loop are handed to it with `call_soon_threadsafe`,
queue kicks arrive there on LHREQ_EVENTFD eventfds, and stdin, tap, vhost-user call fds
are watched there too. Device code is therefore single-threaded. Interrupts leave the
device thread as LHREQ_IRQ writes while the run loop blocks in pread (the kernel takes a
write from any thread of the Launcher's mm). The device thread blocks SIGINT and SIGTERM so
that those signals always interrupt the run loop's pread; their handlers (main thread only)
raise, which ends the run loop (PEP 475 would otherwise retry the pread).

Exit. The guest died: the kernel's reason is printed on stderr; "CRASH: Power down" is what
a 3.x guest's power-off hypercall produces (LHCALL_SHUTDOWN with the string "Power down"),
so that reason exits 0 and every other one (a panic message, a host-detected fault) exits 1.
A restart request (ERESTART) is returned to the caller (the command line re-executes itself,
like the 3.x Launcher). SIGINT/SIGTERM stop the guest and exit 0. Three ^C within a second
on the console exits too (the 3.x Launcher's hack: ISIG is off on a raw tty).

Only the 3.x layout boots: a 2.6.24 Launcher also had to build the guest's initial page
tables and pass pgdir in LHREQ_INITIALIZE, which this module does not do, so it refuses that
layout. It uses only the standard library (it must run under a 32-bit Python 3.11 on a
Linux 3.11 i386 host, with 4-byte /dev/lguest words and mappings below 2 GiB). CI drives it
against a software model of /dev/lguest; it has booted a real Linux 3.11.10 i386 lguest guest
by hand (console, blk, rng and net to the responder; see the README), never in CI.
It must never let a guest mistake kill the process (the bridge logs and survives those).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

from vhostpy.blk import BlockDevice
from vhostpy.console import ConsoleDevice, FdOutput
from vhostpy.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG, Device
from vhostpy.errors import BackendError, ConfigurationError
from vhostpy.frontend import BackendFailure, BackendGone, Frontend
from vhostpy.lguest_boot import BootLayout, prepare_boot
from vhostpy.lguest_bridge import LGUEST_QUEUE_SIZE, PAGE_SIZE, LguestBridge
from vhostpy.lguest_host import DEVICE_PAGES, DevLguestHost, LguestFile, RunExit
from vhostpy.loop import EventLoop
from vhostpy.memory import GuestMemory
from vhostpy.net import NetDevice, NetPort
from vhostpy.netapp import DEFAULT_RESPOND_IP, RESPONDER_MAC, ResponderPort
from vhostpy.packets import Responder, swap_macs
from vhostpy.pcap import PcapWriter
from vhostpy.rng import RngDevice
from vhostpy.switch import Switch
from vhostpy.tap import TapPort
from vhostpy.vhost_proxy import VhostUserProxy

__all__ = ["DEFAULT_MEMORY_MIB", "DEFAULT_OPENER", "POWER_OFF_REASON", "LaunchOptions",
           "LaunchResult", "Launcher", "NetOptions", "build", "create_memory_fd", "exit_status",
           "launch", "max_memory_mib", "parse_vhost_user", "terminal_mode"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 64
MIB = 1 << 20
#: A mapping must stay below 2 GiB on a 32-bit host.
MAX_MAPPING = (1 << 31) - PAGE_SIZE
#: The reason a 3.x guest's power-off hypercall leaves (hypercalls.c: "CRASH: %s").
POWER_OFF_REASON = "CRASH: Power down"
READ_CHUNK = 4096
CTRL_C = b"\x03"

#: vhost-user device types: (virtio id, config bytes to ask, queues, VERSION_1 on the
#: guest's behalf). Legacy and 1.0 rings, blk requests and rng buffers are identical on
#: little-endian hosts; the net header is not, so net is passed through as negotiated.
VHOST_USER_TYPES: dict[str, tuple[int, int, int, bool]] = {
    "blk": (VIRTIO_ID_BLOCK, 60, 1, True),
    "net": (VIRTIO_ID_NET, 12, 2, False),
    "rng": (VIRTIO_ID_RNG, 0, 1, True),
}
#: Net features needing a control queue or more queues than the two the page offers:
#: CTRL_VQ, CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR (bits 17..23).
_NET_CTRL_FEATURES = sum(1 << b for b in range(17, 24))

MemfdCreate = Callable[[str, int], int]
#: How `vhostpy lguest` opens /dev/lguest (None: the real device; tests put a model here).
DEFAULT_OPENER: Callable[[str], LguestFile] | None = None


def max_memory_mib() -> int:
    """The most guest RAM (MiB) whose mapping, with the device pages, stays below 2 GiB."""
    return (MAX_MAPPING - DEVICE_PAGES * PAGE_SIZE) // MIB


# ---------------------------------------------------------------------------- guest memory


def create_memory_fd(size: int, *, name: str = "vhostpy-lguest",
                     memfd_create: MemfdCreate | None = None,
                     directory: str = "/dev/shm") -> tuple[int, str]:
    """A shareable fd of `size` zero bytes; returns (fd, "memfd" | "tmpfile" | "unlinked").

    memfd_create first; when the kernel lacks it (ENOSYS before 3.17, or a Python without
    os.memfd_create) an O_TMPFILE file in `directory` (3.11+), then a named file there that
    is unlinked at once. All three can be passed to a vhost-user back-end by fd.
    """
    if size <= 0 or size > MAX_MAPPING:
        raise ConfigurationError(f"guest memory of {size:#x} bytes must be 1..{MAX_MAPPING:#x}")
    create = memfd_create or getattr(os, "memfd_create", None)
    fd, kind = -1, ""
    if create is not None:
        try:
            fd, kind = create(name, getattr(os, "MFD_CLOEXEC", 1)), "memfd"
        except OSError as exc:
            log.info("lguest: memfd_create failed (%s); guest memory goes to a file in %s",
                     exc, directory)
    if fd < 0:
        where = directory if os.path.isdir(directory) else tempfile.gettempdir()
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if tmpfile:
            try:
                fd, kind = os.open(where, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600), "tmpfile"
            except OSError as exc:
                log.info("lguest: O_TMPFILE in %s failed (%s)", where, exc)
        if fd < 0:
            fd, path = tempfile.mkstemp(prefix=name + "-", dir=where)
            os.unlink(path)
            kind = "unlinked"
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise ConfigurationError(f"cannot size guest memory to {size:#x} bytes: "
                                 f"{exc.strerror}") from exc
    return fd, kind


# ---------------------------------------------------------------------------- devices


class _LoopProxy(VhostUserProxy):
    """A `VhostUserProxy` whose call eventfds the device loop watches (added at start,
    removed before the proxy closes them)."""

    def __init__(self, fe: Frontend, loop: EventLoop, mask: int = 0, **kw: object) -> None:
        self.loop = loop
        self.mask = mask
        self._watched: set[int] = set()
        super().__init__(fe, **kw)  # type: ignore[arg-type]

    def features(self) -> int:
        return super().features() & ~self.mask

    def _unwatch(self) -> None:
        for fd in self._watched:
            self.loop.remove_reader(fd)
        self._watched.clear()

    def _on_call(self) -> None:
        self.poll_calls()

    def _watch(self) -> None:
        for fd in self.call_fds():
            self.loop.add_reader(fd, self._on_call)
            self._watched.add(fd)

    def queue_started(self, index: int, vq: object) -> None:
        super().queue_started(index, vq)  # type: ignore[arg-type]
        self._unwatch()
        self._watch()

    def queue_stopped(self, index: int, vq: object) -> None:
        self._unwatch()
        super().queue_stopped(index, vq)  # type: ignore[arg-type]
        self._watch()

    def reset(self) -> None:
        self._unwatch()
        super().reset()


@dataclass
class NetOptions:
    """What `vhostpy net` offers, for the launcher's --net ports."""

    respond_ip: str | None = DEFAULT_RESPOND_IP
    pcap: str | None = None
    tap: str | None = None
    reflect: bool = False


class _Network:
    """The endpoints of `vhostpy net` (switch, responder, pcap, tap, reflect) for lguest ports.

    The same pieces `NetApp` wires, without its vhost-user servers.
    """

    def __init__(self, loop: EventLoop, options: NetOptions) -> None:
        self.loop = loop
        self.options = options
        self.switch = Switch()
        self.ports: list[NetPort] = []
        self.pcap: PcapWriter | None = None
        self.tap: TapPort | None = None
        self.responder: Responder | None = None
        if options.respond_ip is not None:
            self.responder = Responder(ip=options.respond_ip, mac=RESPONDER_MAC)
            self.switch.attach(ResponderPort(self.responder, self.switch))
        try:
            if options.pcap is not None:
                try:
                    self.pcap = PcapWriter(options.pcap)
                except OSError as exc:
                    raise ConfigurationError(f"--pcap {options.pcap}: {exc.strerror}") from exc
            if options.tap is not None:
                tap = self.tap = TapPort.open(options.tap)
                self.switch.attach(tap)
                loop.add_reader(tap.fd, lambda: self._from_tap(tap))
        except BaseException:
            self.close()
            raise

    def add_port(self, device: NetDevice) -> None:
        port = device.port
        port.call_soon_threadsafe = self.loop.call_soon_threadsafe
        if self.pcap is not None:
            pcap = self.pcap
            port.add_monitor(lambda p, direction, frames: pcap.write_many(frames))
        port.add_handler(self._from_guest)
        if not self.options.reflect:
            self.switch.attach(port)
        self.ports.append(port)

    def _from_guest(self, port: NetPort, frames: list[bytes]) -> None:
        if self.options.reflect:
            port.send([swap_macs(f) for f in frames])
        else:
            self.switch.forward(port, frames)

    def _from_tap(self, tap: TapPort) -> None:
        frames = tap.read_batch()
        if frames:
            self.switch.forward(tap, frames)

    def counters(self) -> dict[str, object]:
        out: dict[str, object] = {"ports": [p.counters() for p in self.ports],
                                  "switch": self.switch.counters()}
        if self.responder is not None:
            out["responder"] = self.responder.counters()
        return out

    def close(self) -> None:
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
        if self.tap is not None:
            self.loop.remove_reader(self.tap.fd)
            self.tap.close()
            self.tap = None


class _Signalled(Exception):
    """Raised by the run loop's signal handlers to break out of pread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------------- the launcher


class Launcher:
    """Guest memory, devices, boot and the two threads of one lguest guest.

    Use: construct (console added first), `add_*` devices, `boot()`, then `run()` on the
    thread that will own the guest (it writes LHREQ_INITIALIZE, starts the device thread and
    reads /dev/lguest until the guest stops), then `close()`. `opener(path)` replaces
    opening /dev/lguest (tests use a software model); `word_size` the Launcher's
    `unsigned long` (default: this Python's).
    """

    def __init__(self, memory_mib: int = DEFAULT_MEMORY_MIB, *, console_in: int | None = 0,
                 console_out: int = 1, opener: Callable[[str], LguestFile] | None = None,
                 word_size: int | None = None, eventfds: bool = True,
                 memfd_create: MemfdCreate | None = None, net: NetOptions | None = None,
                 path: str = "/dev/lguest") -> None:
        if memory_mib < 1:
            raise ConfigurationError(f"guest memory must be at least 1 MiB, not {memory_mib}")
        self.ram_size = memory_mib * MIB
        self.size = self.ram_size + DEVICE_PAGES * PAGE_SIZE
        if self.size > MAX_MAPPING:
            raise ConfigurationError(f"-m {memory_mib}: guest memory plus {DEVICE_PAGES} device "
                                     f"pages must stay below 2 GiB (at most "
                                     f"{max_memory_mib()} MiB)")
        self.memory_fd, self.memory_kind = create_memory_fd(self.size,
                                                            memfd_create=memfd_create)
        self.memory = GuestMemory()
        self.loop = EventLoop()
        self.devices: list[Device] = []
        self.closers: list[Callable[[], None]] = []
        self.network: _Network | None = None
        self.net_options = net or NetOptions()
        self.layout: BootLayout | None = None
        self.thread: threading.Thread | None = None
        self.result: RunExit | None = None
        self._ctrl_c: list[float] = []
        self._run_thread: int | None = None
        self._signals_installed = False
        self._closed = False
        try:
            self.memory.map_fd(self.memory_fd, 0, self.size, 0, 0)
            self.output = FdOutput(console_out)
            self.host = DevLguestHost(self.memory, self.ram_size, console_sink=self.output,
                                      opener=opener, word_size=word_size, eventfds=eventfds,
                                      dispatch=self._post_notify, path=path)
            self.console = ConsoleDevice(on_output=self.output)
            self._add(self.console)
            self.console_in = console_in
            if console_in is not None:
                self._watch_console_input(console_in)
        except BaseException:
            self.close()
            raise

    @property
    def bridge(self) -> LguestBridge:
        return self.host.bridge

    def _add(self, device: Device) -> None:
        self.host.bridge.add_device(device, queue_size=min(device.max_queue_size,
                                                           LGUEST_QUEUE_SIZE))
        self.devices.append(device)

    # -- devices ---------------------------------------------------------------------------
    def _adopt(self, device: Device, close: Callable[[], None]) -> None:
        """Add `device` to the page and close it with the Launcher (at once if adding fails)."""
        try:
            self._add(device)
        except BaseException:
            close()
            raise
        self.closers.append(close)

    def add_block(self, path: str, *, read_only: bool = False) -> BlockDevice:
        """A virtio-blk device over the raw image `path`."""
        dev = BlockDevice.open_image(path, read_only=read_only, queue_size=LGUEST_QUEUE_SIZE)
        self._adopt(dev, dev.close)
        return dev

    def add_net(self) -> NetDevice:
        """A virtio-net port on the switch shared by every --net port."""
        if self.network is None:
            self.network = _Network(self.loop, self.net_options)
            self.closers.append(self.network.close)
        index = len(self.network.ports)
        if self.net_options.reflect and index:
            raise ConfigurationError("--reflect sends frames back to their own port; it needs "
                                     "exactly one --net")
        dev = NetDevice(mac=f"52:54:00:12:34:{0x56 + index:02x}", name=f"net{index}",
                        queue_size=LGUEST_QUEUE_SIZE)
        self._add(dev)
        self.network.add_port(dev)
        return dev

    def add_rng(self) -> RngDevice:
        """A virtio-rng device fed by os.urandom."""
        dev = RngDevice(queue_size=LGUEST_QUEUE_SIZE)
        self._add(dev)
        return dev

    def add_vhost_user(self, kind: str, socket_path: str) -> VhostUserProxy:
        """A device of `kind` (blk, net, rng) served by the vhost-user back-end at the socket."""
        if kind not in VHOST_USER_TYPES:
            raise ConfigurationError(f"--vhost-user {kind}:{socket_path}: unknown type "
                                     f"{kind!r} (one of {', '.join(VHOST_USER_TYPES)})")
        device_id, config_size, queues, version_1 = VHOST_USER_TYPES[kind]
        try:
            fe = Frontend.connect(socket_path)
        except OSError as exc:
            raise ConfigurationError(f"--vhost-user {kind}:{socket_path}: cannot connect: "
                                     f"{exc.strerror or exc}") from exc
        try:
            proxy = _LoopProxy(fe, self.loop, _NET_CTRL_FEATURES if kind == "net" else 0,
                               device_id=device_id, memory_fd=self.memory_fd,
                               memory_size=self.size, num_queues=queues,
                               queue_size=LGUEST_QUEUE_SIZE, config_size=config_size,
                               assume_version_1=version_1, name=f"vhost-user-{kind}")
        except (BackendFailure, BackendGone, BackendError, OSError) as exc:
            fe.close()
            raise ConfigurationError(f"--vhost-user {kind}:{socket_path}: the back-end "
                                     f"refused: {exc}") from exc
        self._adopt(proxy, proxy.close)
        return proxy

    # -- boot and run ----------------------------------------------------------------------
    def boot(self, kernel: bytes, cmdline: str = "", initrd: bytes | None = None) -> BootLayout:
        """Kernel, initrd and zero page into guest RAM."""
        self.layout = prepare_boot(self.memory, self.ram_size, kernel, cmdline, initrd)
        return self.layout

    def _post_notify(self, address: int) -> None:
        """From the run loop: serve the notify on the device thread.

        A queue kick is handed over and the guest runs on. Anything else (a status change,
        early console text) is waited for, because the guest resumes as soon as we read
        again: the 3.x Launcher had reset a device, or copied the console text out of the
        guest's scratch buffer, before that next read, and the guest relies on it.
        """
        bridge = self.host.bridge
        if bridge.queue_at(address) is not None:
            self.loop.call_soon_threadsafe(lambda: bridge.notify(address))
            return
        done = threading.Event()

        def serve() -> None:
            try:
                bridge.notify(address)
            finally:
                done.set()
        self.loop.call_soon_threadsafe(serve)
        while not done.wait(1.0):
            if self.thread is None or not self.thread.is_alive():
                log.error("lguest: the device thread is gone; notify %#x not served", address)
                return

    def _device_thread(self) -> None:
        # Process-directed SIGINT/SIGTERM must interrupt the run loop's pread, not us.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.loop.run()

    def start(self) -> None:
        """LHREQ_INITIALIZE (on this thread, which must then call `run`) and the devices."""
        if self.layout is None:
            raise ConfigurationError("boot() the kernel before starting the guest")
        try:
            self.host.initialize(self.layout.entry)
        except OSError as exc:
            raise ConfigurationError(f"cannot start the guest on {self.host.path}: "
                                     f"{exc.strerror or exc} (is the lg module loaded, and "
                                     "is this an i386 lguest host?)") from exc
        self.host.attach(self.loop)
        self._run_thread = threading.get_ident()
        self.thread = threading.Thread(target=self._device_thread, name="lguest-devices",
                                       daemon=True)
        self.thread.start()

    def run(self, *, handle_signals: bool = True) -> RunExit:
        """Start if needed, then run the guest until it dies, restarts or a signal arrives.

        Returns the `RunExit`: "died" (detail: the kernel's reason), "restart", "error",
        "signal" (detail: the signal's name) or "stopped" (`stop()` was called).
        """
        previous: dict[signal.Signals, object] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, _raise_signalled)
            self._signals_installed = True
        try:
            if self.thread is None:
                self.start()
            while True:
                if self.result is not None:
                    break
                result = self.host.step()
                if result is not None:
                    self.result = result
        except _Signalled as exc:
            if self.result is None:     # not a stop() that woke us with a signal
                self.result = RunExit("signal", signal.Signals(exc.signum).name)
        finally:
            self._signals_installed = False
            for signo, handler in previous.items():
                signal.signal(signo, handler)  # type: ignore[arg-type]
        log.info("lguest: guest stopped: %s %s", self.result.kind, self.result.detail)
        return self.result

    def stop(self, reason: str = "") -> None:
        """Make `run()` return (any thread).

        When `run()` handles signals on the main thread, that thread is woken out of pread
        with a SIGINT aimed at it alone; otherwise `run()` returns after its current pread.
        """
        if self.result is None:
            self.result = RunExit("stopped", reason)
        if self._signals_installed and self._run_thread != threading.get_ident():
            assert self._run_thread is not None
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self._run_thread, signal.SIGINT)

    def _watch_console_input(self, fd: int) -> None:
        try:
            self.loop.add_reader(fd, self._on_console_input)
        except (PermissionError, ValueError, OSError) as exc:
            # epoll refuses regular files and /dev/null (EPERM): nothing to wait for.
            log.info("lguest: console input fd %d cannot be watched (%s); the guest gets "
                     "no console input", fd, exc)
            self.console_in = None

    def _on_console_input(self) -> None:
        assert self.console_in is not None
        try:
            data = os.read(self.console_in, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("lguest: console input fd %d: %s; no longer read", self.console_in, exc)
            data = b""
        if not data:                  # EOF: the guest just gets no more input
            self.loop.remove_reader(self.console_in)
            return
        self.console.feed(data)
        if data != CTRL_C:
            self._ctrl_c.clear()
            return
        now = time.monotonic()
        self._ctrl_c = [t for t in self._ctrl_c if now - t <= 1.0] + [now]
        if len(self._ctrl_c) >= 3:
            log.warning("lguest: three ^C within a second: stopping the guest")
            self.stop("three ^C on the console")

    def counters(self) -> dict[str, object]:
        out: dict[str, object] = {"console": self.console.counters()}
        if self.network is not None:
            out["net"] = self.network.counters()
        return out

    def close(self) -> None:
        """Stop the device thread, reset and release every device, unmap (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if self.thread.is_alive():
                log.error("lguest: the device thread did not stop within 10 s")
            self.thread = None
        host = getattr(self, "host", None)
        if host is not None:
            host.close()
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception:
                log.exception("lguest: closing %r failed", closer)
        self.loop.close()
        self.memory.clear()
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
            self.memory_fd = -1


def _raise_signalled(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signum)


# ---------------------------------------------------------------------------- front door


@dataclass
class LaunchOptions:
    """Everything `vhostpy lguest` was asked for (the command line, parsed)."""

    kernel: str
    cmdline: str = ""
    memory_mib: int = DEFAULT_MEMORY_MIB
    initrd: str | None = None
    #: In command-line order: ("block", path), ("block-ro", path), ("net", ""), ("rng", ""),
    #: ("vhost-user", "TYPE:SOCKET").
    devices: list[tuple[str, str]] = field(default_factory=list)
    net: NetOptions = field(default_factory=NetOptions)
    eventfds: bool = True


@dataclass(frozen=True)
class LaunchResult:
    """How the guest ended and the exit status the command line should use."""

    exit: RunExit
    status: int


@contextlib.contextmanager
def terminal_mode(fd: int | None) -> Iterator[None]:
    """On a tty: no echo, no line editing, no signals from keys (the 3.x Launcher's
    settings); restored on exit. Anything else is left alone."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _read_file(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigurationError(f"{what} {path!r} is not a regular file")
            return f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


def build(options: LaunchOptions, **kw: object) -> Launcher:
    """A Launcher with every device and the kernel loaded (nothing started)."""
    kernel = _read_file("kernel", options.kernel)
    initrd = _read_file("initrd", options.initrd) if options.initrd is not None else None
    launcher = Launcher(options.memory_mib, net=options.net, eventfds=options.eventfds,
                        **kw)  # type: ignore[arg-type]
    try:
        for kind, value in options.devices:
            if kind in ("block", "block-ro"):
                launcher.add_block(value, read_only=kind == "block-ro")
            elif kind == "net":
                launcher.add_net()
            elif kind == "rng":
                launcher.add_rng()
            elif kind == "vhost-user":
                vtype, _, sock = value.partition(":")
                launcher.add_vhost_user(vtype, sock)
            else:
                raise ConfigurationError(f"unknown device kind {kind!r}")
        launcher.boot(kernel, options.cmdline, initrd)
    except BaseException:
        launcher.close()
        raise
    return launcher


def exit_status(result: RunExit) -> int:
    """0 for a power-off, a signal or a stop; 1 for any other death or an error."""
    if result.kind == "died":
        return 0 if result.detail == POWER_OFF_REASON else 1
    return 1 if result.kind == "error" else 0


def launch(options: LaunchOptions, *, stdin_fd: int | None = 0, stdout_fd: int = 1,
           stderr: TextIO | None = None, handle_signals: bool = True,
           **kw: object) -> LaunchResult:
    """Build, boot and run one guest on this thread; report how it ended on `stderr`."""
    err = stderr if stderr is not None else sys.stderr
    launcher = build(options, console_in=stdin_fd, console_out=stdout_fd, **kw)
    try:
        with terminal_mode(stdin_fd):
            result = launcher.run(handle_signals=handle_signals)
    finally:
        launcher.close()
    status = exit_status(result)
    if result.kind == "died":
        message = f"guest died: {result.detail}"
    elif result.kind == "error":
        message = f"running the guest failed: {result.detail}"
    elif result.kind == "restart":
        message = "the guest asked for a restart"
    else:
        message = f"stopped ({result.kind}: {result.detail})"
    print(f"vhostpy lguest: {message}", file=err)
    return LaunchResult(result, status)


def parse_vhost_user(text: str) -> tuple[str, str]:
    """'blk:/path.sock' -> ('blk', '/path.sock'); ConfigurationError naming the value."""
    kind, sep, path = text.partition(":")
    if not sep or not path:
        raise ConfigurationError(f"--vhost-user {text!r}: expected TYPE:SOCKET (e.g. "
                                 "blk:/run/blk.sock)")
    if kind not in VHOST_USER_TYPES:
        raise ConfigurationError(f"--vhost-user {text!r}: unknown type {kind!r} (one of "
                                 f"{', '.join(VHOST_USER_TYPES)})")
    return kind, path
