"""virtio-net (virtio 1.2, section 5.1) with a host-side port that Python code drives.

`NetDevice` serves queue pairs (receiveq 2i, transmitq 2i+1). Frames the driver transmits
are validated, their partial checksums completed (VIRTIO_NET_F_CSUM), and handed to the
device's `NetPort` in batches as plain Ethernet frames; a handler answers by returning
frames, at once or, as a coroutine run on the transport's asyncio loop (`vq.spawn` of the
transmit ring), later on the ring's thread. Frames sent into the port are queued
in a bounded backlog and written to the driver's receive buffers with a `virtio_net_hdr`
(12 bytes with VERSION_1 or MRG_RXBUF, 10 bytes for legacy drivers); with
VIRTIO_NET_F_MRG_RXBUF a frame spreads across several buffers and `num_buffers` says how
many. Nothing here blocks: without receive buffers the backlog fills and then drops, and
every drop is counted by reason.

The control queue and the config space are QEMU's business under vhost-user; `config()`
serves transports that read it from the device (the lguest bridge). This module never
imports the vhost-user layers.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from vhostpy import _accel
from vhostpy.device import BATCH, VIRTIO_ID_NET, Device, batches
from vhostpy.errors import ConfigurationError, FrontendError
from vhostpy.packets import (
    complete_checksum,
    format_mac,
    frame_bytes,
    parse_mac,
    rarp_announcement,
    swap_macs,
    to_scapy,
)
from vhostpy.virtqueue import VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1, DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from vhostpy.net_cffi import NetFastPath
    from vhostpy.netfaults import FaultLane, NetFaults

log = logging.getLogger(__name__)

# Feature bits (5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0

#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (+ num_buffers).
NET_HDR = struct.Struct("<BBHHHH")
NET_HDR_MRG = struct.Struct("<BBHHHHH")
#: mac, status, max_virtqueue_pairs, mtu.
NET_CONFIG = struct.Struct("<6sHHH")

ETH_HLEN = 14
ETH_MIN_FRAME = ETH_HLEN
MAX_FRAME = 65536            # the largest frame (without header) ever accepted
ETH_OVERHEAD = ETH_HLEN + 4  # header and one VLAN tag on top of the MTU
DEFAULT_MTU = 1500
DEFAULT_MAC = "52:54:00:12:34:56"
RX_BACKLOG = 1024            # frames waiting for receive buffers before new ones drop
#: The longest `NetPort.offer(wait=...)` (seconds): the event loop serves nothing else then.
MAX_OFFER_WAIT = 1.0
#: How long `NetPort.offer` with a `wait` goes on without a usable receive buffer (default).
OFFER_IDLE = 50e-6
#: Frames the Python path of `NetPort.offer` places between two looks at its `wait` deadline.
OFFER_STEP = 32

#: handler(port, frames) -> None, frames to send back (an iterable, or one frame), or an
#: awaitable (an `async def` handler) whose result is such frames.
FrameHandler = Callable[["NetPort", list[Any]], Any]
#: monitor(port, direction, frames) with direction "from_guest" or "to_guest".
FrameMonitor = Callable[["NetPort", str, Sequence[bytes]], None]
#: Built-in consumers of the frames a guest sends (`NetPort.set_consumer`).
BUILTINS = ("reflect", "switch")


class FrameCapture(Protocol):
    """Where `NetPort.set_capture` records frames (`pcap.PcapWriter`).

    `write_many` takes frames as bytes; when `native_ok` is true the compiled path may
    instead hand it whole C buffers of pcap records (`write_records(data, frames, nbytes)`:
    `frames` records of `nbytes` frame bytes in all, each after its 16-byte record header).
    """

    def write_many(self, frames: Iterable[bytes]) -> None: ...

    @property
    def native_ok(self) -> bool: ...

    def write_records(self, data: Any, frames: int, nbytes: int) -> None: ...


class FrameSwitch(Protocol):
    """The switch a port hands its frames to (`NetPort.set_consumer("switch", ...)`)."""

    def forward(self, src: Any, frames: Sequence[bytes]) -> None: ...


@dataclass(frozen=True, slots=True)
class NetPathConfig:
    """What a data path needs to know of its device, as negotiated now.

    `NetDevice.path_config` is one of these; the device publishes a new snapshot whenever
    any field changes (features, MTU, a receive ring started or stopped, a reset) and never
    mutates one, so a data path may read it once per burst and compare it by identity.
    """

    #: Size of the virtio_net_hdr in every buffer: 12 with VERSION_1 or MRG_RXBUF, else 10.
    hdr_len: int = NET_HDR.size
    #: VIRTIO_NET_F_CSUM: transmit headers are read and their partial checksums completed.
    csum: bool = False
    #: VIRTIO_NET_F_MRG_RXBUF: a received frame may spread over several buffers.
    mrg: bool = False
    #: The device's MTU; frames to the guest longer than `mtu + ETH_OVERHEAD` are refused.
    mtu: int = DEFAULT_MTU
    #: The receive ring, when exactly one is started (None: none, or several to choose from).
    rx_ring: Virtqueue | None = None

    @property
    def max_frame(self) -> int:
        """The longest frame that may go to the guest: the MTU plus `ETH_OVERHEAD`."""
        return self.mtu + ETH_OVERHEAD


@dataclass
class QueueCounters:
    """Frames and bytes through one virtqueue, and drops by reason."""

    frames: int = 0
    bytes: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Accepted frames from the guest with a partial checksum (NEEDS_CSUM) for vhostpy to
    #: complete (completed whenever the frame goes anywhere but a pure counting sink).
    checksums: int = 0
    #: Frames to the guest spread over more than one receive buffer (MRG_RXBUF).
    merged: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"frames": self.frames, "bytes": self.bytes, "drops": dict(self.drops),
                "checksums": self.checksums, "merged": self.merged}


class NetPort:
    """The host side of one virtio-net device: frames out of the guest, frames into it.

    `add_handler(cb)` registers `cb(port, frames)` for every batch the guest transmits
    (frames as bytes, or scapy packets with `scapy=True`). What `cb` returns is its answer:
    None, frames for the guest (bytes or scapy packets; an iterable, or one frame), sent as
    `send` sends them, or an awaitable (`cb` is an `async def`) run on the transport's
    asyncio loop, whose result, such frames, is sent on the loop's thread when it ends.
    `send(frames)` queues frames for the guest and returns how many were accepted. Handlers
    and `send` run on the thread that runs the device's event loop (not a coroutine's:
    under an `EventLoop` coroutines run on its companion thread, so they return frames
    instead); `send_threadsafe` may be called from any thread once the application set
    `call_soon_threadsafe`, or once the device's rings started (they know their loop).

    Built-in endpoints (`set_capture`, `set_consumer`) behave like a monitor and a handler
    registered first, but the compiled fast path runs them without Python per frame as long
    as no Python handler or monitor is attached.

    `set_faults(faults)` puts a `netfaults.NetFaults` rule set between the guest and
    everything else, both ways: frames from the guest pass its rules before capture,
    monitors, consumers and handlers see them, frames to the guest before the backlog. While
    it has rules, every frame takes the Python path; with none, nothing changes.
    """

    def __init__(self, device: NetDevice, name: str) -> None:
        self.device = device
        self.name = name
        self._handlers: list[tuple[FrameHandler, bool]] = []
        self._monitors: list[FrameMonitor] = []
        self.handler_errors = 0
        #: Async handler calls refused because `max_pending_handlers` were running.
        self.handler_drops = 0
        #: Set by the application (`NetApp` does); else `send_threadsafe` goes through the
        #: ring the device started last (`learn_loop`).
        self.call_soon_threadsafe: Callable[[Callable[[], None]], None] | None = None
        self._ring: Virtqueue | None = None
        #: Async handler calls running: token -> their cancel function (None until known).
        self._pending: dict[int, Callable[[], bool] | None] = {}
        self._tokens = itertools.count()
        self._generation = 0   # bumped by `abandon_pending` (a device reset)
        self.builtin: str | None = None
        self.switch: FrameSwitch | None = None
        self.capture: FrameCapture | None = None
        #: Set by the application (`NetApp` does); else `later` uses the device's ring.
        self.call_later: Callable[[float, Callable[[], None]], None] | None = None
        self.faults: NetFaults | None = None
        #: (to the guest, from the guest): this port's lanes of `faults`.
        self.fault_lanes: tuple[FaultLane, FaultLane] | None = None

    #: Async handler calls one port lets run at once: a guest cannot pile up coroutines
    #: without bound behind a slow handler. Beyond it a batch's coroutine is closed unrun
    #: and counted in `handler_drops` (the guest sees a lost datagram, nothing blocks).
    max_pending_handlers = 1024

    @property
    def python_consumers(self) -> bool:
        """Whether Python code must see the frames this port gets from its guest: a
        handler or monitor is attached, a capture the compiled path cannot write to, or
        fault rules (which see the frames toward the guest too)."""
        capture = self.capture
        faults = self.faults
        return bool(self._handlers or self._monitors) or (
            capture is not None and not capture.native_ok) or (
            faults is not None and faults.active)

    @property
    def python_observers(self) -> bool:
        """Whether Python code must see the frames this port sends to its guest: a monitor
        is attached, a capture the compiled path cannot write to, or fault rules (handlers
        see only frames from the guest: they never keep the compiled path from placing
        frames toward it)."""
        capture = self.capture
        faults = self.faults
        return bool(self._monitors) or (capture is not None and not capture.native_ok) or (
            faults is not None and faults.active)

    def set_faults(self, faults: NetFaults | None) -> None:
        """Apply `faults` (shared with other ports or not; None: none) to this port's frames
        in both directions (see the class docstring and `netfaults`). Loop thread only."""
        self.faults = faults
        self.fault_lanes = None if faults is None else (
            faults.lane(self.name, "rx", self.device.transmit_now, self.later),
            faults.lane(self.name, "tx", self.deliver_now, self.later))

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback()` on the loop's thread in `delay` seconds (from that thread):
        through `call_later` if the application set it, else through the ring the device
        started last (`learn_loop`). RuntimeError or TypeError when there is no timer."""
        if self.call_later is not None:
            self.call_later(delay, callback)
        elif self._ring is not None:
            self._ring.call_later(delay, callback)
        else:
            raise RuntimeError(f"port {self.name}: no event loop attached for timers")

    def set_capture(self, writer: FrameCapture | None) -> None:
        """Record every frame in both directions with `writer.write_many(frames)` (pcap)."""
        self.capture = writer

    def set_consumer(self, kind: str | None, switch: FrameSwitch | None = None) -> None:
        """The built-in consumer of frames from the guest: "reflect" (back to this port with
        MACs swapped), "switch" (`switch.forward(self, frames)`) or None (count and drop)."""
        if kind is not None and kind not in BUILTINS:
            raise ConfigurationError(f"unknown built-in consumer {kind!r}")
        if (kind == "switch") != (switch is not None):
            raise ConfigurationError("a switch consumer needs exactly one switch")
        self.builtin, self.switch = kind, switch

    def add_handler(self, handler: FrameHandler, *, scapy: bool = False) -> None:
        """Call `handler(port, frames)` with each batch of frames the guest sends."""
        self._handlers.append((handler, scapy))

    def remove_handler(self, handler: FrameHandler) -> None:
        # == not `is`: each `obj.method` access is a new bound-method object (equal, not same).
        self._handlers = [(h, s) for h, s in self._handlers if h != handler]

    def add_monitor(self, monitor: FrameMonitor) -> None:
        """See every frame in both directions before handlers or the guest get it (capture)."""
        self._monitors.append(monitor)

    def deliver(self, frames: list[bytes], vq: Virtqueue | None = None) -> None:
        """Hand a batch from the guest to every monitor and handler (called by the device,
        on the loop's thread; `vq` is the transmit ring the batch came from, by default
        the one the device is draining now).

        A handler's answer is sent as the class docstring says. A handler that raises, an
        answer that is not frames and an async handler that raises are logged and counted
        (`handler_errors`); the batch still goes to the other handlers and the device keeps
        serving: user code cannot break a ring. Fault rules (`set_faults`) come first.
        """
        lanes = self.fault_lanes
        if lanes is not None and lanes[1].active:
            frames = lanes[1].process(frames)
            if not frames:
                return
        self.deliver_now(frames, vq)

    def deliver_now(self, frames: list[bytes], vq: Virtqueue | None = None) -> None:
        """`deliver` past the fault rules (where their lane sends what it let through)."""
        self.observe("from_guest", frames)
        if self.builtin == "reflect":
            self.send([swap_macs(f) for f in frames])
        elif self.switch is not None:   # the "switch" consumer
            self.switch.forward(self, frames)
        for handler, scapy in self._handlers:
            try:
                answer = handler(self, [to_scapy(f) for f in frames] if scapy else frames)
                if answer is None:
                    continue
                if inspect.isawaitable(answer):
                    self._spawn(handler, answer, self._ring_for(vq))
                else:
                    self.send(_answer_frames(answer))
            except Exception:
                self.handler_errors += 1
                log.exception("%s: frame handler %r failed", self.name, handler)

    def _spawn(self, handler: FrameHandler, answer: Any, vq: Virtqueue | None) -> None:
        """Run an async handler's awaitable on the transport's asyncio loop (`vq.spawn`)."""
        if len(self._pending) >= self.max_pending_handlers:
            _close(answer)
            self.handler_drops += 1
            if self.handler_drops & (self.handler_drops - 1) == 0:   # 1, 2, 4, ...: no flood
                log.warning("%s: %d async frame handler calls still running: a batch for %r "
                            "is dropped (%d so far)", self.name, len(self._pending), handler,
                            self.handler_drops)
            return
        if vq is None:
            _close(answer)
            raise RuntimeError("an async frame handler needs a started ring to run on")
        token = next(self._tokens)
        generation = self._generation
        self._pending[token] = None

        def done(result: Any, exc: BaseException | None) -> None:   # the loop's thread
            self._pending.pop(token, None)
            self._answered(handler, generation, result, exc)
        try:
            cancel = vq.spawn(answer, done)
        except BaseException:
            self._pending.pop(token, None)
            _close(answer)
            raise
        if token in self._pending:
            self._pending[token] = cancel

    def _answered(self, handler: FrameHandler, generation: int, result: Any,
                  exc: BaseException | None) -> None:
        """An async handler ended: send its frames, unless the device was reset since."""
        if generation != self._generation:
            # Its guest is gone (the device was reset): answers meant for that driver are
            # dropped, as `NetDevice.reset` drops the backlog.
            late = 0
            if exc is None and result is not None:
                with contextlib.suppress(Exception):   # not frames: nothing to drop
                    late = len(_answer_frames(result))
            if late:
                self.device.backlog_counters.drops["device reset"] += late
            log.debug("%s: answer of %r after a device reset dropped (%d frames)",
                      self.name, handler, late)
            return
        if exc is not None:   # CancelledError too: that batch goes unanswered
            self.handler_errors += 1
            log.error("%s: frame handler %r failed: %r", self.name, handler, exc, exc_info=exc)
            return
        try:
            if result is not None:
                self.send(_answer_frames(result))
        except Exception:
            self.handler_errors += 1
            log.exception("%s: frame handler %r answered what cannot be sent", self.name,
                          handler)

    def _ring_for(self, vq: Virtqueue | None) -> Virtqueue | None:
        """The ring an async handler of a batch from `vq` runs on (see `deliver`)."""
        for ring in (vq, self.device.draining, self._ring):
            if ring is not None:
                return ring
        return None

    @property
    def handlers_pending(self) -> int:
        """Async handler calls running now."""
        return len(self._pending)

    def abandon_pending(self) -> int:
        """Cancel every async handler call running (the device reset: the driver that sent
        their frames is gone); their answers, should they still come, are dropped.
        Returns how many there were. Loop thread only."""
        self._generation += 1
        pending = list(self._pending.values())
        self._pending.clear()
        for cancel in pending:
            if cancel is not None:
                cancel()
        if pending:
            log.info("%s: device reset with %d async frame handler calls running: cancelled",
                     self.name, len(pending))
        return len(pending)

    def learn_loop(self, vq: Virtqueue) -> None:
        """Remember a started ring of this device: `send_threadsafe` goes through it (its
        `call_soon_threadsafe`) when the application set no `call_soon_threadsafe`, and an
        async handler runs on it when its batch came from no known ring."""
        self._ring = vq

    def observe(self, direction: str, frames: Sequence[bytes]) -> None:
        """Show frames to the capture and monitors ("from_guest", or "to_guest" once accepted)."""
        if self.capture is not None:
            self.capture.write_many(frames)
        for monitor in self._monitors:
            monitor(self, direction, frames)

    def receive_burst(self, burst: Any, idx: Any, count: int) -> None:
        """Compiled path only (a `switch.CffiSwitch`): frames `idx[:count]` of a C burst buffer
        toward the guest, as `send` would queue them."""
        self.device.receive_burst(burst, idx, count)

    def send(self, frames: Iterable[Any]) -> int:
        """Queue frames (bytes or scapy packets) for the guest; returns how many were taken."""
        return self.device.transmit_to_guest([frame_bytes(f) for f in frames])

    def offer(self, batch: FrameBatch, count: int | None = None, *, wait: float = 0.0,
              idle: float = OFFER_IDLE) -> int:
        """Write frames of `batch` into the guest's receive buffers now, cycling through it
        until `count` frames (default: the batch) are taken or the ring has no buffer left.
        Nothing is queued: unlike `send`, what the ring cannot take now is not taken.
        Returns how many frames were taken (placed, or refused and counted like `send`'s:
        runts, larger than the MTU, larger than a buffer). Frames still in the backlog go
        first; while any remain, nothing is taken.

        `wait` (seconds, 0..`MAX_OFFER_WAIT`): a generator's way to keep up with the driver.
        When the ring runs out of buffers the call goes on placing frames as the driver
        posts more, until `count` frames are taken or `wait` seconds passed, and gives up
        earlier once no usable buffer came for `idle` seconds (default `OFFER_IDLE`, 50 µs:
        a driver that keeps up refills sooner; a slow one gets the loop back). Meanwhile the
        driver's
        kicks for this receive ring are off (back on when the call returns) and the event
        loop serves nothing else: keep `wait` short (a millisecond) to leave other rings and
        fds their turn. Under the compiled path the whole call is one C call placing
        `OFFER_CHUNK` (32) frames at a time, each chunk published and signalled as it is
        done, with no Python per frame or per chunk.

        With fault rules (`set_faults`) frames go through them a few at a time
        (`netfaults.OFFER_CHUNK`), and what the ring cannot take of the last few is
        queued. ValueError for a `wait` outside 0..`MAX_OFFER_WAIT` or a negative `idle`."""
        if not 0.0 <= wait <= MAX_OFFER_WAIT:
            raise ValueError(f"offer: wait must be 0..{MAX_OFFER_WAIT} s, not {wait}")
        if not idle >= 0.0:
            raise ValueError(f"offer: idle must be 0 or more seconds, not {idle}")
        return self.device.offer_to_guest(batch, len(batch) if count is None else count, wait,
                                          idle)

    def send_threadsafe(self, frames: Iterable[Any]) -> None:
        """`send` from any thread: the frames are queued on the loop's thread. The way onto
        it is `call_soon_threadsafe` if the application set one, else the device's rings'
        (`learn_loop`: once a front-end started them; it stays valid between front-ends).
        RuntimeError when there is neither."""
        batch = [frame_bytes(f) for f in frames]

        def send() -> None:
            self.send(batch)
        if self.call_soon_threadsafe is not None:
            self.call_soon_threadsafe(send)
            return
        ring = self._ring
        if ring is None:
            raise RuntimeError(f"port {self.name}: no event loop attached for send_threadsafe "
                               "(set call_soon_threadsafe, or wait for a front-end)")
        try:
            ring.call_soon_threadsafe(send)
        except Exception as exc:
            raise RuntimeError(f"port {self.name}: no event loop attached for send_threadsafe: "
                               f"its ring cannot run callbacks from other threads ({exc})"
                               ) from exc

    # -- counters --------------------------------------------------------------------------
    @property
    def from_guest(self) -> QueueCounters:
        """Totals over the transmit queues (what the guest sent)."""
        return _sum_counters(self.device.tx_counters)

    @property
    def to_guest(self) -> QueueCounters:
        """Totals over the receive queues and the backlog (what was sent to the guest)."""
        return _sum_counters([self.device.backlog_counters, *self.device.rx_counters])

    def counters(self) -> dict[str, object]:
        """Every counter of this port, per direction and per queue."""
        dev = self.device
        return {
            "port": self.name,
            "from_guest": self.from_guest.as_dict(),
            "to_guest": self.to_guest.as_dict(),
            "queues": {
                **{f"rx{i}": c.as_dict() for i, c in enumerate(dev.rx_counters)},
                **{f"tx{i}": c.as_dict() for i, c in enumerate(dev.tx_counters)},
            },
            "backlog": len(dev.backlog),
            "handler_errors": self.handler_errors,
            "handlers_pending": self.handlers_pending,
            "handler_drops": self.handler_drops,
            **({} if self.fault_lanes is None else {"faults": {
                "to_guest": self.fault_lanes[0].counts.as_dict(),
                "from_guest": self.fault_lanes[1].counts.as_dict()}}),
        }


class FrameBatch:
    """Frames prepared once for `NetPort.offer`, to be offered to the guest again and again
    (a generator's template). The compiled path keeps them in one flat C buffer."""

    def __init__(self, frames: Iterable[Any]) -> None:
        self.frames: tuple[bytes, ...] = tuple(frame_bytes(f) for f in frames)
        self.native: Any = None   # the compiled path's flat copy, made on first use

    def __len__(self) -> int:
        return len(self.frames)


def _answer_frames(answer: Any) -> list[bytes]:
    """A handler's answer as frames: one frame (bytes-like or a scapy packet) or an iterable
    of them. TypeError for anything else (the handler is counted as failed)."""
    if isinstance(answer, (bytes, bytearray, memoryview)) or hasattr(answer, "build"):
        return [frame_bytes(answer)]
    if isinstance(answer, str) or not isinstance(answer, Iterable):
        raise TypeError(f"a frame handler returned {type(answer).__name__}: expected None, "
                        "frames (bytes or scapy packets) or an awaitable of them")
    return [frame_bytes(f) for f in answer]


def _close(awaitable: Any) -> None:
    """Close a coroutine that will never run (no "never awaited" warning)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _cycle_from(frames: Sequence[bytes], start: int, count: int) -> Iterator[bytes]:
    """`count` frames of `frames` taken cyclically, from the one at position `start`."""
    n = len(frames)
    return itertools.islice(itertools.cycle(frames), start % n, start % n + count)


def _heads(queue: collections.deque[bytes]) -> Iterator[bytes]:
    """The frame at the head of `queue`, again after each time the consumer pops it, until
    `queue` is empty (the consumer pops; iterating the deque itself would forbid that)."""
    while queue:
        yield queue[0]


def _sum_counters(items: Sequence[QueueCounters]) -> QueueCounters:
    total = QueueCounters()
    for c in items:
        total.frames += c.frames
        total.bytes += c.bytes
        total.drops.update(c.drops)
        total.checksums += c.checksums
        total.merged += c.merged
    return total


class NetDevice(Device):
    """A virtio-net device with `queue_pairs` rx/tx pairs and a `NetPort` on the host side."""

    device_id = VIRTIO_ID_NET
    name = "virtio-net"
    supports_mtu = True
    supports_announce = True
    #: QEMU's virtio-net builds its own config space: offering CONFIG only makes it warn.
    config_via_frontend = False

    def __init__(self, *, mac: str = DEFAULT_MAC, mtu: int | None = None, queue_pairs: int = 1,
                 queue_size: int = 1024, name: str = "net0", rx_backlog: int = RX_BACKLOG) -> None:
        super().__init__()
        if not 1 <= queue_pairs <= 64:
            raise ConfigurationError(f"--num-queues must be 1..64 queue pairs, not {queue_pairs}")
        if mtu is not None and not 68 <= mtu <= MAX_FRAME - ETH_OVERHEAD:
            raise ConfigurationError(f"MTU must be 68..{MAX_FRAME - ETH_OVERHEAD}, not {mtu}")
        self.mac = parse_mac(mac)
        self.configured_mtu = mtu
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.max_queue_size = queue_size
        self.rx_backlog = rx_backlog
        self.port = NetPort(self, name)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_counters = QueueCounters()
        self.rx_counters = [QueueCounters() for _ in range(queue_pairs)]
        self.tx_counters = [QueueCounters() for _ in range(queue_pairs)]
        self._rx_queues: dict[int, Virtqueue] = {}
        #: The transmit ring being drained now (its batches' async handlers run on it).
        self.draining: Virtqueue | None = None
        self._path_config = NetPathConfig(mtu=mtu or DEFAULT_MTU)
        self._fast: NetFastPath | None = None
        if _accel.lib is not None:
            from vhostpy.net_cffi import NetFastPath
            self._fast = NetFastPath(self)

    @property
    def path_config(self) -> NetPathConfig:
        """The data path's view of this device now (replaced on every change, see
        `NetPathConfig`)."""
        return self._path_config

    @property
    def mtu(self) -> int:
        """The MTU: the configured one until the front-end sets another (`set_mtu`)."""
        return self._path_config.mtu

    def _publish(self, **changes: Any) -> None:
        self._path_config = replace(self._path_config, **changes)

    def _rings_changed(self) -> None:
        queues = self._rx_queues
        self._publish(rx_ring=next(iter(queues.values())) if len(queues) == 1 else None)

    # -- negotiation and config ------------------------------------------------------------
    def device_features(self) -> int:
        bits = [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
                VIRTIO_NET_F_MTU]
        if self.queue_pairs > 1:
            bits.append(VIRTIO_NET_F_MQ)
        # Transmit chains are completed, and receive buffers filled, strictly in ring order
        # on every path (C and Python; a receive buffer too small for a frame is left for
        # the next one, never skipped), so a driver may take its in-order fast paths.
        bits.append(VIRTIO_F_IN_ORDER)
        return sum(1 << b for b in bits)

    def set_features(self, features: int) -> None:
        super().set_features(features)
        mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        modern = self.has_feature(VIRTIO_F_VERSION_1)
        self._publish(mrg=mrg, csum=self.has_feature(VIRTIO_NET_F_CSUM),
                      hdr_len=NET_HDR_MRG.size if (mrg or modern) else NET_HDR.size)

    @property
    def hdr_len(self) -> int:
        """Size of the virtio_net_hdr the driver negotiated (10 or 12)."""
        return self._path_config.hdr_len

    def config(self) -> bytes:
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.queue_pairs, self.mtu)

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= MAX_FRAME - ETH_OVERHEAD:
            raise FrontendError(f"MTU {mtu} is outside 68..{MAX_FRAME - ETH_OVERHEAD}")
        self._publish(mtu=mtu)
        log.info("%s: MTU %d", self.port.name, mtu)

    def announce(self, mac: bytes) -> None:
        """SEND_RARP (a migrated guest without GUEST_ANNOUNCE): a broadcast RARP from `mac`
        goes to the port's consumers as if the guest had sent it, so a switch, a tap's
        bridge or a capture learns the guest is behind this port now."""
        frame = rarp_announcement(mac)
        log.info("%s: announcing %s after a migration (RARP)", self.port.name,
                 format_mac(mac))
        self.port.deliver([frame])

    def reset(self) -> None:
        super().reset()
        if self.backlog:   # frames meant for the previous driver
            self.backlog_counters.drops["device reset"] += len(self.backlog)
            self.backlog.clear()
        self._rx_queues.clear()
        self._publish(mrg=False, csum=False, hdr_len=NET_HDR.size, rx_ring=None)
        self.port.abandon_pending()

    # -- queues ----------------------------------------------------------------------------
    def queue_started(self, index: int, vq: Virtqueue) -> None:
        self.port.learn_loop(vq)
        if index % 2 == 0:
            self._rx_queues[index] = vq
            self._rings_changed()
        self.process_queue(index, vq)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        if self._rx_queues.pop(index, None) is not None:
            self._rings_changed()

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        if index % 2:
            self._drain_tx(index // 2, vq)
        else:
            self._flush_rx()

    def wants_kicks(self, index: int) -> bool:
        """Transmit rings always; a receive ring only while frames wait in the backlog for
        its buffers. Otherwise a driver refilling buffers nobody waits for would kick for
        each refill (a syscall or VM exit on its side, a wake-up here), as DPDK's back-end
        never has it do; generators (`NetPort.offer`) look for buffers themselves."""
        return index % 2 == 1 or bool(self.backlog)

    def _settle_rx(self) -> bool:
        """Kicks on the receive rings on while frames wait in the backlog, off otherwise
        (rings the runner polls are left to it). Returns True when buffers came in past
        those there already while kicks were being turned on: place again."""
        want = bool(self.backlog)
        came = False
        for vq in self._rx_queues.values():
            if not vq.ready or vq.polling:
                continue
            if want:
                came = vq.enable_notifications(after_available=True) or came
            else:
                vq.disable_notifications()
        return came

    # -- guest -> host ---------------------------------------------------------------------
    def _drain_tx(self, pair: int, vq: Virtqueue) -> None:
        self.draining = vq
        try:
            if self._fast is not None and self._fast.serves(vq):
                self._fast.drain_tx(pair, vq)
            else:
                self._drain_tx_python(pair, vq)
        finally:
            self.draining = None

    def _drain_tx_python(self, pair: int, vq: Virtqueue) -> None:
        counters = self.tx_counters[pair]
        for chains in batches(vq):
            frames = []
            for chain in chains:
                frame = self._frame_from(chain, counters)
                if frame is not None:
                    frames.append(frame)
                    counters.frames += 1
                    counters.bytes += len(frame)
            vq.add_used_many([(chain.head, 0) for chain in chains])
            vq.signal_used()
            if frames:
                self.port.deliver(frames, vq)

    def _frame_from(self, chain: DescriptorChain, counters: QueueCounters) -> bytes | None:
        """The Ethernet frame in a transmit chain, or None (counted) when it cannot be valid."""
        config = self._path_config
        hdr_len = config.hdr_len
        total = chain.readable_len
        reason = None
        if total == 0:
            reason = "empty"
        elif total < hdr_len:
            reason = "short header"
        elif total == hdr_len:
            reason = "header only"
        elif total - hdr_len > MAX_FRAME:
            reason = "oversize"
        elif total - hdr_len < ETH_MIN_FRAME:
            reason = "runt"
        if reason is not None:
            counters.drops[reason] += 1
            log.debug("%s: dropped a %d-byte transmit chain: %s", self.port.name, total, reason)
            return None
        data = chain.read()
        if not config.csum:
            # Without VIRTIO_NET_F_CSUM (and vhostpy offers no GSO) the driver must send
            # flags 0 and GSO_NONE (virtio 1.2 5.1.6.2.1): the header says nothing; unread.
            return data[hdr_len:]
        flags, gso_type, _, _, csum_start, csum_offset = NET_HDR.unpack_from(data)
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            counters.drops["gso"] += 1
            return None
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            frame = bytearray(data[hdr_len:])
            try:
                complete_checksum(frame, csum_start, csum_offset)
            except ValueError:
                counters.drops["bad checksum offsets"] += 1
                return None
            counters.checksums += 1
            return bytes(frame)
        return data[hdr_len:]

    # -- host -> guest ---------------------------------------------------------------------
    def receive_burst(self, burst: Any, idx: Any, count: int) -> None:
        """Compiled path only: frames `idx[:count]` of a C burst buffer (`struct vp_frames`)
        toward the guest, as `transmit_to_guest` would queue them."""
        if self._fast is None:
            raise RuntimeError(f"{self.port.name}: C bursts need the compiled fast path")
        self._fast.receive(burst, idx, count)

    def transmit_to_guest(self, frames: Sequence[bytes]) -> int:
        """Queue frames for the driver's receive buffers; returns how many were accepted
        (those the port's fault rules dropped or hold count as accepted)."""
        lanes = self.port.fault_lanes
        if lanes is not None and lanes[0].active:
            return lanes[0].send(frames)
        return self.transmit_now(frames)

    def transmit_now(self, frames: Sequence[bytes]) -> int:
        """`transmit_to_guest` past the port's fault rules (where their lane sends)."""
        accepted_now = 0
        placed_all_it_could = False
        fast = self._fast
        if fast is not None and frames and not self.backlog:
            taken = fast.send_bytes(frames)   # straight into the ring, in C
            if taken is not None:
                accepted_now = taken - fast.rejected
                frames = frames[taken:]
                # C stopped for want of buffers (not at a frame only Python places): the
                # rest waits in the backlog for the driver's next buffers and kick.
                placed_all_it_could = not fast.stuck
        accepted: list[bytes] = []
        for frame in frames:
            if self._refused(frame):
                continue
            if len(self.backlog) + len(accepted) >= self.rx_backlog:
                self.backlog_counters.drops["no rx buffers"] += 1
            else:
                accepted.append(frame)
        if accepted:
            self.port.observe("to_guest", accepted)
            self.backlog.extend(accepted)
            if not placed_all_it_could or self._settle_rx():
                self._flush_rx()
        return accepted_now + len(accepted)

    def offer_to_guest(self, batch: FrameBatch, count: int, wait: float = 0.0,
                       idle: float = OFFER_IDLE) -> int:
        """`NetPort.offer`: frames of `batch` (cyclically) straight into receive buffers,
        for up to `wait` seconds while the driver posts more (giving up after `idle`
        seconds without a usable buffer)."""
        frames = batch.frames
        if not frames or count <= 0:
            return 0
        if self.backlog:
            self._flush_rx()
            if self.backlog:
                return 0
        lanes = self.port.fault_lanes
        faults = lanes is not None and lanes[0].active
        if self._fast is not None and not faults:
            taken = self._fast.offer(batch, count, wait, idle)
            if taken is not None:
                if self._fast.stuck:
                    # Buffers were there, yet C placed nothing more: too few for the next
                    # frame yet, or more than C takes at once: Python tries that frame.
                    taken += self._place_frames(_cycle_from(frames, taken, 1), fresh=True)
                return taken
        deadline = time.monotonic() + wait
        rings = [vq for vq in self._rx_queues.values() if not vq.polling] if wait > 0 else []
        for vq in rings:   # kicks off while we keep up (as the compiled path does)
            vq.disable_notifications()
        taken = 0
        idle_since: float | None = None
        try:
            while True:
                # With a wait, a few frames per pass: a driver that keeps up must not hold
                # the call past its deadline (C checks its budget per chunk the same way).
                step = count - taken if wait <= 0 else min(count - taken, OFFER_STEP)
                if lanes is not None and faults:
                    n = lanes[0].offer(_cycle_from(frames, taken, step), step,
                                       lambda out: self._place_frames(out, fresh=True))
                else:
                    n = self._place_frames(_cycle_from(frames, taken, step), fresh=True)
                taken += n
                if taken >= count or wait <= 0 or self.backlog or any(
                        vq.error is not None for vq in self._rx_queues.values()):
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                if n:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= idle:
                    break
        finally:
            if self._settle_rx():
                self._flush_rx()
        return taken

    def _refused(self, frame: bytes) -> bool:
        """Whether `frame` may never go to the driver: a runt, or longer than the MTU plus
        `ETH_OVERHEAD`. A refused frame is counted as a drop in `backlog_counters`."""
        if len(frame) < ETH_MIN_FRAME:
            self.backlog_counters.drops["runt"] += 1
        elif len(frame) > self._path_config.max_frame:
            self.backlog_counters.drops["larger than MTU"] += 1
        else:
            return False
        return True

    def _pick_rx(self, frame: bytes) -> tuple[int, Virtqueue] | None:
        queues = self._rx_queues
        if not queues:
            return None
        if len(queues) == 1:
            index = next(iter(queues))
        else:
            live = sorted(queues)
            index = live[zlib.crc32(frame[:34]) % len(live)]
        return index, queues[index]

    def _flush_rx(self) -> None:
        """Move backlog frames into receive buffers until either runs out; the receive
        rings then ask for kicks only if frames still wait (`_settle_rx`)."""
        self._place_backlog()
        while self._settle_rx():
            self._place_backlog()

    def _place_backlog(self) -> None:
        ring = self._path_config.rx_ring
        if self._fast is not None and self.backlog and ring is not None:
            # No ring takes more frames than it has buffers: copy no more than that to C.
            frames = list(itertools.islice(self.backlog, max(1, ring.size)))
            taken = self._fast.send_bytes(frames, backlog=True)
            if taken is not None:
                for _ in range(taken):
                    self.backlog.popleft()
                if not self._fast.stuck:
                    return   # the ring has no buffers for the next frame yet
        backlog = self.backlog
        self._place_frames(_heads(backlog), fresh=False, on_taken=backlog.popleft)

    def _place_frames(self, frames: Iterable[bytes], *, fresh: bool,
                      on_taken: Callable[[], object] | None = None) -> int:
        """Write `frames`, in order, into the driver's receive buffers (the pure-Python path
        of `_flush_rx` and `offer_to_guest`); returns how many were taken, a prefix of them.

        * Each frame goes to the receive queue `_pick_rx` picks and is written by `_place`,
          which counts it in that pair's `rx_counters`: placed, or dropped because no buffer
          can hold it. Both count as taken.
        * Placement stops at the first frame with no receive queue or no buffers yet: it and
          the frames after it are not taken (nothing after it is read from `frames`).
        * `fresh=True` (frames not from the backlog): each frame is first checked as
          `transmit_to_guest` checks it (`_refused`: counted, taken, never placed), and the
          placed and dropped ones are shown to the port ("to_guest") after the signals.
          `fresh=False`: backlog frames, already checked and shown when they were queued.
        * `on_taken()`, if given, runs right after each frame `_place` placed or dropped,
          before its used entry can be published (`_flush_rx` pops its backlog there).
        * Used entries are published per queue every `BATCH` entries and at the end; then
          each queue a frame was offered to is signalled once (`signal_used`).
        """
        touched: dict[int, tuple[Virtqueue, list[tuple[int, int]]]] = {}
        shown: list[bytes] = []
        taken = 0
        for frame in frames:
            if fresh and self._refused(frame):
                taken += 1
                continue
            picked = self._pick_rx(frame)
            if picked is None:
                break
            index, vq = picked
            used = touched.setdefault(index, (vq, []))[1]
            if self._place(frame, vq, used, self.rx_counters[index // 2]) == "wait":
                break
            taken += 1
            if on_taken is not None:
                on_taken()
            if fresh:
                shown.append(frame)
            if len(used) >= BATCH:
                vq.add_used_many(used)
                used.clear()
        for vq, used in touched.values():
            vq.add_used_many(used)
            vq.signal_used()
        if shown:
            self.port.observe("to_guest", shown)
        return taken

    def _place(self, frame: bytes, vq: Virtqueue, used: list[tuple[int, int]],
               counters: QueueCounters) -> str:
        """Write one frame into receive buffers: "done", "dropped" or "wait" (no buffers)."""
        config = self._path_config
        mrg = config.mrg
        need = config.hdr_len + len(frame)
        chains: list[DescriptorChain] = []
        room = 0
        while room < need and len(chains) < vq.size:
            chain = vq.pop()
            if chain is None:
                break
            chains.append(chain)
            room += chain.writable_len
            if not mrg:
                break
        if room < need:
            if not mrg and chains:
                vq.rewind(1)   # the buffer stays for a smaller frame
                counters.drops["rx buffer too small"] += 1
                return "dropped"
            vq.rewind(len(chains))
            if len(chains) >= vq.size:
                counters.drops["larger than the whole ring"] += 1
                return "dropped"
            return "wait"
        if mrg:
            header = NET_HDR_MRG.pack(0, 0, 0, 0, 0, 0, len(chains))
        else:
            header = NET_HDR_MRG.pack(0, 0, 0, 0, 0, 0, 1)[: config.hdr_len]
        data = memoryview(header + frame)
        offset = 0
        for chain in chains:
            n = chain.write(data[offset:])
            used.append((chain.head, n))
            offset += n
        counters.frames += 1
        counters.bytes += len(frame)
        if len(chains) > 1:
            counters.merged += 1
        return "done"
