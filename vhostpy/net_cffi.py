"""The compiled virtio-net data path: whole bursts in C, no Python bytecode per frame.

`NetFastPath` belongs to one `NetDevice` (when `_accel.lib` is set). Its `drain_tx` pops a
burst of transmit chains in one C call (`vp_net_tx_burst`: the checks of
`NetDevice._frame_from`, drops counted by reason, NEEDS_CSUM completed, used entries
published; the virtio-net header is read only when VIRTIO_NET_F_CSUM was negotiated) and
then hands the burst on. When the consumer needs no Python at all (count only, a switch the
port is alone on, reflect with an empty backlog; no capture, calls through eventfds) one
`vp_net_tx_poll` call serves up to `POLL_BURSTS` bursts the same way, signals included
(`_fastpath_net.c`; reflecting copies each frame once, transmit buffer straight into receive
buffer: `vp_net_reflect_burst`), with its parameters (`struct vp_net_poll`) built once and
reused while the consumer, header, call fds and receive ring stay the same.
Otherwise, per burst:

* nothing consumes frames (no handler, monitor, capture or built-in consumer): count only;
* only built-in consumers (pcap capture, `reflect`, a `switch.CffiSwitch` between vhostpy
  ports): capture records are written by C into the burst buffer and go to the file in one
  write; frames are written by C (`vp_net_rx_place`) straight into the receive ring of the
  destination port, MACs swapped for reflect;
* Python code attached (a handler or monitor): the burst becomes a list of `bytes` built
  without per-frame bytecode and goes through `NetPort.deliver` as before.

`receive` is the other direction for frames already in a C burst buffer (the switch),
`offer` for `NetPort.offer` (a prebuilt `FrameBatch`, flattened once, placed cyclically by
one `vp_net_rx_offer` call that may keep up with the driver for a while: `_fastpath_net.c`),
and `send_bytes` for `transmit_to_guest` callers (lists of bytes). Frames that are not
swapped are placed through `vp_net_rx_offer`'s one-pass chunks (one avail index read and
one used index update per chunk); reflect's swapped ones through `vp_net_rx_place`. What
the ring cannot take at once goes to the Python backlog path, so ordering and counters are
those of the reference; `stuck` tells "no buffers yet" (wait for a kick) from "buffers, but
not for this frame" (let Python try it). Frames toward the guest take this path whenever
no Python code must see them (`python_observers`: monitors, a capture C cannot write, fault
rules); handlers, which see only frames from the guest, do not count.

This module never imports `net`: the device is passed in, and what this path may use of it
is the narrow interface below (`NetHost`, `NetHostPort`, `PathConfig`, `Counters`), which
`net.NetDevice`, `net.NetPort` and `net.NetPathConfig` satisfy. The device's negotiated
state comes as one immutable snapshot (`path_config`), read once per burst or plan; rings
are signalled through their public `signal_target()` / `interrupt()`. A virtio-net header
length C refuses (anything but 10 or 12) raises ValueError.
"""

from __future__ import annotations

import collections
import operator
import time
from collections.abc import Sequence, Sized
from typing import Any, Protocol, TypeGuard

from . import _accel
from .virtqueue import Virtqueue
from .virtqueue_cffi import CffiVirtqueue

__all__ = ["DROP_REASONS", "Counters", "NetFastPath", "NetHost", "NetHostPort", "PathConfig",
           "frames_to_bytes"]


ffi: Any = _accel.ffi
lib: Any = _accel.lib

#: Drop reasons in the order of `struct vp_net_stats.drops` (names as the Python path uses).
DROP_REASONS = ("empty", "short header", "header only", "oversize", "runt", "gso",
                "bad checksum offsets", "rx buffer too small", "larger than the whole ring",
                "larger than MTU")
MAX_FRAME = 65536
BURST = 64
#: Bursts one `vp_net_tx_poll` call may serve before Python gets control back: at most
#: 256 * BURST frames, about 1 ms of 64-byte frames. Returning to Python costs ~10 us; at 32
#: bursts that was 8% of the 64 B loop against DPDK's virtio-user (256: +15% Mpps, split and
#: packed, 9 alternating runs each).
POLL_BURSTS = 256
#: While a ring is polled (kicks off), how long one `vp_net_tx_poll` call re-checks it once
#: empty before returning: a loop whose frames come back within this long stays in C.
POLL_SPIN_NS = 20_000
RECORD = 16  # the pcap record header C leaves room for before each frame
#: Frames per placement of `NetFastPath.offer` (each publishes its used entries and is
#: signalled): the front-end's own burst, so it finds buffers as soon as a chunk is done.
OFFER_CHUNK = 32
#: Capture records one `vp_net_rx_offer` call may collect before Python writes them.
OFFER_CAPTURE_FRAMES = 8 * OFFER_CHUNK


class Counters(Protocol):
    """One queue's counters (`net.QueueCounters`), which this path adds C's counts to."""

    frames: int
    bytes: int
    drops: collections.Counter[str]
    checksums: int
    merged: int


class PathConfig(Protocol):
    """The device's negotiated state (`net.NetPathConfig`): an immutable snapshot."""

    @property
    def hdr_len(self) -> int: ...
    @property
    def csum(self) -> bool: ...
    @property
    def mrg(self) -> bool: ...
    @property
    def rx_ring(self) -> Virtqueue | None: ...
    @property
    def max_frame(self) -> int: ...


class Capture(Protocol):
    """A pcap capture (`pcap.PcapWriter`); `write_records` only when `native_ok`."""

    @property
    def native_ok(self) -> bool: ...
    def write_records(self, data: Any, frames: int, nbytes: int) -> None: ...


class FrameSwitch(Protocol):
    """A port's switch (`switch.Switch`); the compiled variant also has `forward_burst`
    and `solo`, which this path uses when they are there."""

    def forward(self, src: NetHostPort, frames: Sequence[bytes]) -> None: ...


class NetHostPort(Protocol):
    """What this path uses of the device's port (`net.NetPort`)."""

    @property
    def builtin(self) -> str | None: ...
    @property
    def switch(self) -> FrameSwitch | None: ...
    @property
    def capture(self) -> Capture | None: ...
    @property
    def python_consumers(self) -> bool: ...
    @property
    def python_observers(self) -> bool: ...
    def deliver(self, frames: list[bytes]) -> None: ...


class NetHost(Protocol):
    """What this path uses of its device (`net.NetDevice`)."""

    @property
    def port(self) -> NetHostPort: ...
    @property
    def path_config(self) -> PathConfig: ...
    @property
    def queue_pairs(self) -> int: ...
    @property
    def tx_counters(self) -> Sequence[Counters]: ...
    @property
    def rx_counters(self) -> Sequence[Counters]: ...
    @property
    def backlog_counters(self) -> Counters: ...
    @property
    def backlog(self) -> Sized: ...
    def transmit_to_guest(self, frames: Sequence[bytes]) -> int: ...


def _refused(rc: int, config: PathConfig) -> ValueError:
    """The error for a C call that refused its arguments (`VP_ERR_HDR_LEN`)."""
    if rc == lib.VP_ERR_HDR_LEN:
        return ValueError(f"virtio-net header length {config.hdr_len} refused by the compiled "
                          f"path (only 10 and 12 exist)")
    if rc == lib.VP_ERR_OFFER_ARGS:
        return ValueError("vp_net_rx_offer refused its arguments (no frames, a bad chunk or "
                          "position)")
    return ValueError(f"the compiled net path refused its arguments (error {rc})")


def new_frames(count: int, data_bytes: int) -> tuple[Any, Any]:
    """A `struct vp_frames *` with room for `count` frames and `data_bytes` of data."""
    f = ffi.new("struct vp_frames *")
    buf = ffi.new("uint8_t[]", max(1, data_bytes)) if data_bytes else ffi.NULL
    off = ffi.new("uint64_t[]", count)
    lens = ffi.new("uint32_t[]", count)
    f.buf, f.cap, f.max, f.off, f.len = buf, data_bytes, count, off, lens
    return f, (buf, off, lens)


def frames_to_bytes(f: Any, idx: Any = None, n: int | None = None, swap: bool = False
                    ) -> list[bytes]:
    """The frames of `f` (or those at `idx[:n]`) as bytes, without per-frame bytecode."""
    count = f.n if n is None else n
    if not count:
        return []
    blob = ffi.buffer(f.buf, f.used)[:]
    offs = ffi.unpack(f.off, f.n)
    lens = ffi.unpack(f.len, f.n)
    if idx is not None:
        pick = ffi.unpack(idx, count)
        offs = list(map(offs.__getitem__, pick))
        lens = list(map(lens.__getitem__, pick))
    frames = list(map(blob.__getitem__, map(slice, offs, map(operator.add, offs, lens))))
    if swap:
        frames = list(map(_swap, frames))
    return frames


def _swap(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


def pcap_time(ts: float) -> tuple[int, int]:
    """(seconds, microseconds) exactly as `PcapWriter` rounds a timestamp."""
    usec = round(ts * 1_000_000)
    sec, usec = divmod(usec, 1_000_000)
    return sec, usec


class NetFastPath:
    """The compiled data path of one `NetDevice` (see the module docstring)."""

    def __init__(self, device: NetHost) -> None:
        self.device = device
        self.port = device.port
        self.tx_stats = [ffi.new("struct vp_net_stats *") for _ in range(device.queue_pairs)]
        self.rx_stats = [ffi.new("struct vp_net_stats *") for _ in range(device.queue_pairs)]
        self.backlog_stats = ffi.new("struct vp_net_stats *")
        self.burst, self._burst_keep = new_frames(BURST, BURST * (RECORD + MAX_FRAME))
        self._cap: Any = None
        self._cap_keep: Any = None
        self._flat, self._flat_keep = new_frames(0, 0)
        self._flat_max = 0
        self.rejected = 0
        self._plans: dict[int, tuple[tuple[object, ...], Any]] = {}   # pair -> (key, plan)
        self._plan_rxq: CffiVirtqueue | None = None
        self._offer_args = ffi.new("struct vp_net_offer *")
        self._place_args = ffi.new("struct vp_net_offer *")
        self._ident: Any = None
        self._ident_n = 0
        self.stuck = False

    @staticmethod
    def serves(vq: Virtqueue | None) -> TypeGuard[CffiVirtqueue]:
        """Whether `vq` is a ring this path can drive (the compiled `Virtqueue` variant)."""
        return isinstance(vq, CffiVirtqueue)

    # -- who consumes what -------------------------------------------------------------------
    def _rx_queue(self, config: PathConfig) -> CffiVirtqueue | None:
        """The receive ring C may fill: the only one, if it is the compiled variant (None:
        several rings or a pure-Python one, so Python places the frames)."""
        vq = config.rx_ring
        return vq if self.serves(vq) else None

    # -- guest -> host -----------------------------------------------------------------------
    def drain_tx(self, pair: int, vq: CffiVirtqueue) -> None:
        """Serve every transmit chain of `vq`: many bursts per C call when a built-in
        consumer needs no Python (`vp_net_tx_poll`), else a burst per C call (as `batches()`
        does)."""
        st = self.tx_stats[pair]
        counters = self.device.tx_counters[pair]
        port = self.port
        out = self.burst
        while vq.ready:
            q = vq.native()
            if q is None:
                break
            if q.notify:   # a polled ring has them off already: skip the C call
                vq.disable_notifications()
            config = self.device.path_config
            plan = self._plan(pair, vq, q, config)
            if plan is not None:
                plan.spin_ns = POLL_SPIN_NS if vq.polling else 0
                rc = lib.vp_net_tx_poll(q, st, out, plan)
                if rc < 0:
                    raise _refused(rc, config)
                if plan.bursts or rc == lib.VP_POLL_BROKEN:
                    vq.check_broken()
                    _fold(st, counters)
                    if plan.mode == lib.VP_TX_REFLECT:
                        self._after_reflect(plan, rc, out)
                if rc == lib.VP_POLL_EMPTY:
                    if vq.polling or not vq.ready or not vq.enable_notifications():
                        break
                elif rc == lib.VP_POLL_BROKEN:
                    break
                continue
            consume = port.builtin is not None or port.capture is not None or \
                port.python_consumers
            out.n = out.used = 0
            n = lib.vp_net_tx_burst(q, config.hdr_len, config.csum, BURST, st,
                                    out if consume else ffi.NULL)
            if n < 0:
                raise _refused(n, config)
            vq.check_broken()
            if n == 0:
                if not vq.ready or vq.polling or not vq.enable_notifications():
                    break
                continue
            _fold(st, counters)
            vq.signal_used()
            if out.n and consume:
                self._consume(out)

    def _plan(self, pair: int, vq: CffiVirtqueue, q: Any, config: PathConfig) -> Any:
        """The `struct vp_net_poll` for serving `vq` in C with a built-in consumer, or None
        when some burst needs Python (handlers, monitors, a capture, a switch with other
        ports, a receive backlog, a call only Python can make). Built once and reused while
        what it depends on (consumer, the device's config snapshot, how each ring is
        signalled, the receive ring) stays the same."""
        port = self.port
        if port.capture is not None or port.python_consumers:
            return None
        builtin = port.builtin
        rxq = rq = None
        key: tuple[object, ...]
        if builtin == "reflect":
            rxq = self._rx_queue(config)
            if rxq is None or self.device.backlog:
                return None
            rq = rxq.native()
            if rq is None:
                return None
            key = (builtin, q, vq.signal_target(), config, rq, rxq.signal_target())
        else:
            key = (builtin, q, vq.signal_target(), config, port.switch)
        cached = self._plans.get(pair)
        if cached is not None and cached[0] == key:
            plan = cached[1]
            if plan is None or builtin != "switch":
                return plan
            args = _solo(port)
            if args is None:
                return None
            plan.now, plan.horizon = args[2], args[3]
            return plan
        plan = self._build_plan(vq, rxq, rq, config)
        self._plans[pair] = (key, plan)
        if plan is not None and builtin == "switch":
            # the switch's state is checked on every call
            return self._plan(pair, vq, q, config)
        return plan

    def _build_plan(self, vq: CffiVirtqueue, rxq: CffiVirtqueue | None, rq: Any,
                    config: PathConfig) -> Any:
        port = self.port
        signal = vq.signal_target()
        if signal is None:
            return None
        plan = ffi.new("struct vp_net_poll *")
        plan.burst = BURST
        plan.max_bursts = POLL_BURSTS
        plan.hdr_len = config.hdr_len
        plan.csum = config.csum
        plan.signal, plan.call_fd = signal
        builtin = port.builtin
        if builtin is None:
            plan.mode = lib.VP_TX_SINK
        elif builtin == "switch":
            args = _solo(port)
            if args is None:
                return None
            plan.mode = lib.VP_TX_CLASSIFY
            plan.sw, plan.src = args[0], args[1]
        elif builtin == "reflect" and rxq is not None:
            rx_signal = rxq.signal_target()
            if rx_signal is None:
                return None
            plan.mode = lib.VP_TX_REFLECT
            plan.rxq = rq
            plan.rx_signal, plan.rx_call_fd = rx_signal
            plan.mrg = config.mrg
            plan.max_len = config.max_frame
            plan.rx_st = self.rx_stats[rxq.index // 2]
            plan.backlog = self.backlog_stats
            self._plan_rxq = rxq
        else:
            return None
        return plan

    def _after_reflect(self, plan: Any, rc: int, out: Any) -> None:
        """Fold the receive side of a reflecting `vp_net_tx_poll`; queue what did not fit."""
        dev = self.device
        rxq = self._plan_rxq
        if rxq is None:   # not reached: a reflecting plan names its receive ring
            return
        rxq.check_broken()
        _fold(plan.rx_st, dev.rx_counters[rxq.index // 2])
        _fold(self.backlog_stats, dev.backlog_counters, frames=False)
        if rc == lib.VP_POLL_STALLED:
            dev.transmit_to_guest(frames_to_bytes(out, None, int(out.n), True))

    def _consume(self, out: Any) -> None:
        port = self.port
        if port.python_consumers:
            port.deliver(frames_to_bytes(out))
            return
        capture = port.capture
        if capture is not None:
            sec, usec = pcap_time(time.time())
            if lib.vp_pcap_headers(out, sec, usec) < 0:   # a burst always has the slots
                raise ValueError("a transmit burst without pcap record slots")
            capture.write_records(ffi.buffer(out.buf, out.used), out.n,
                                  out.used - RECORD * out.n)
        if port.builtin == "reflect":
            self.receive(out, None, out.n, swap=True)
        elif port.builtin == "switch":
            switch = port.switch
            forward_burst = getattr(switch, "forward_burst", None)
            if forward_burst is not None:
                forward_burst(port, out)
            elif switch is not None:
                switch.forward(port, frames_to_bytes(out))

    # -- host -> guest -----------------------------------------------------------------------
    def receive(self, src: Any, idx: Any, n: int, *, swap: bool = False) -> None:
        """Frames of the C burst `src` (those at `idx[:n]`, or the first `n`) toward the guest."""
        config = self.device.path_config
        vq = self._rx_queue(config)
        q = None
        if vq is not None and not self.device.backlog and not self.port.python_observers:
            q = vq.native()
        if vq is None or q is None:
            self.device.transmit_to_guest(frames_to_bytes(src, idx, n, swap))
            return
        done = self._place(vq, q, config, src, idx, n, swap)
        if done < n:
            if idx is None:
                idx = ffi.new("uint32_t[]", list(range(n)))
            self.device.transmit_to_guest(frames_to_bytes(src, idx + done, n - done, swap))

    def send_bytes(self, frames: Sequence[bytes], *, backlog: bool = False) -> int | None:
        """Place as many of `frames` as the receive ring takes now, in one C call; returns
        how many were taken (placed, or dropped and counted; `rejected` says how many of
        those were refused before placement: runts, larger than the MTU), or None when
        Python must place them (no single compiled receive ring, a backlog to go first,
        Python code to see them). The caller queues the rest; `stuck` says whether C
        stopped at a frame while the ring had buffers (Python may try it) rather than for
        want of buffers. `backlog=True`: the frames are the backlog's head (already checked
        and captured)."""
        self.rejected = 0
        self.stuck = False
        config = self.device.path_config
        vq = self._rx_queue(config)
        if vq is None or (self.device.backlog and not backlog) or self.port.python_observers:
            return None
        q = vq.native()
        if q is None:
            return None
        n = len(frames)
        if n > self._flat_max:
            self._flat, self._flat_keep = new_frames(n, 0)
            self._flat_max = n
        data = b"".join(frames)
        lens = ffi.new("uint32_t[]", list(map(len, frames)))
        pin = ffi.from_buffer("uint8_t[]", data)
        lib.vp_frames_from_flat(self._flat, pin, lens, n)
        done = self._place(vq, q, config, self._flat, None, n, False, record=not backlog)
        self.stuck = done < n and not q.broken and bool(lib.vp_has_available(q))
        return done

    def offer(self, batch: Any, count: int, wait: float = 0.0, idle: float = 50e-6
              ) -> int | None:
        """`NetPort.offer` in C: frames of `batch` (cyclically, `count` at most) into the
        receive ring, `OFFER_CHUNK` per placement, each chunk's used entries published and
        signalled at once (`vp_net_rx_offer`). With `wait` > 0 C keeps placing while the
        driver posts buffers, for up to `wait` seconds in all, giving up after `idle` seconds
        with no usable buffer; the driver's kicks are off meanwhile. Returns how many frames
        were taken (placed, or refused or dropped and counted), or None when Python must do
        it (no single compiled receive ring, or Python code must see the frames).
        Afterwards `stuck` says whether placement stopped at a frame while buffers were
        there (too few for it yet, or too many for C: Python may try that frame)."""
        self.stuck = False
        config = self.device.path_config
        vq = self._rx_queue(config)
        if vq is None or self.port.python_observers:
            return None
        q = vq.native()
        if q is None:
            return None
        native = batch.native
        if not isinstance(native, _NativeBatch):
            native = batch.native = _NativeBatch(batch.frames)
        o = self._offer_args
        o.src, o.idx, o.nsrc, o.pos = native.frames, native.idx, native.n, 0
        o.chunk, o.hdr_len, o.mrg, o.max_len = OFFER_CHUNK, config.hdr_len, config.mrg, \
            config.max_frame
        st = self.rx_stats[vq.index // 2]
        o.st, o.backlog = st, self.backlog_stats
        target = vq.signal_target()
        # A call only Python can make: one pass per C call, signalled between them.
        o.signal, o.call_fd = (0, -1) if target is None else target
        capture = self.port.capture
        counters = self.device.rx_counters[vq.index // 2]
        deadline = time.monotonic() + wait if wait > 0 else 0.0
        idle_since: float | None = None
        idle_ns = int(idle * 1e9)
        taken = 0
        while True:
            o.count = count - taken
            if capture is not None:
                cap = self._capture_buffer(OFFER_CAPTURE_FRAMES, config.max_frame)
                cap.n = cap.used = 0
                o.cap = cap
            else:
                o.cap = ffi.NULL
            left = deadline - time.monotonic() if wait > 0 else 0.0
            o.budget_ns = max(1, int(left * 1e9)) if left > 0 and target is not None else 0
            o.idle_ns = min(idle_ns, o.budget_ns)
            rc = lib.vp_net_rx_offer(q, o)
            if rc < 0:
                raise _refused(rc, config)
            vq.check_broken()
            taken += o.taken
            _fold(st, counters)
            _fold(self.backlog_stats, self.device.backlog_counters, frames=False)
            vq.signal_used()
            if capture is not None and o.cap.n:
                cap = o.cap
                capture.write_records(ffi.buffer(cap.buf, cap.used), cap.n,
                                      cap.used - RECORD * cap.n)
            if taken >= count or rc in (lib.VP_OFFER_BROKEN, lib.VP_OFFER_TIME):
                break
            if rc == lib.VP_OFFER_CAPTURE:
                continue
            # VP_OFFER_EMPTY: C waited already, unless only Python can signal the ring
            if target is not None or wait <= 0 or o.stuck:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if o.taken:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= idle:
                break
        self.stuck = bool(o.stuck) and taken < count and not q.broken
        return taken

    def _place(self, vq: CffiVirtqueue, q: Any, config: PathConfig, src: Any, idx: Any, n: int,
               swap: bool, *, record: bool = True) -> int:
        dev = self.device
        index = vq.index
        capture = self.port.capture if record else None
        cap = ffi.NULL
        sec = usec = 0
        if capture is not None:
            cap = self._capture_buffer(n, config.max_frame)
            cap.n = cap.used = 0
            sec, usec = pcap_time(time.time())
        st, bl = self.rx_stats[index // 2], self.backlog_stats
        if swap or n == 0:
            done = lib.vp_net_rx_place(q, config.hdr_len, config.mrg, config.max_frame, src,
                                       idx if idx is not None else ffi.NULL, n, swap, st, bl,
                                       cap, sec, usec)
            if done < 0:
                raise _refused(done, config)
        else:
            # The same placement through vp_net_rx_offer's one-pass chunks (one avail index
            # read and one used index update per chunk of frames that each fit one buffer),
            # once through the frames, no waiting; signalled below as before.
            o = self._place_args
            o.src, o.idx, o.nsrc, o.pos, o.count = src, \
                idx if idx is not None else self._identity(n), n, 0, n
            o.chunk, o.hdr_len, o.mrg, o.max_len = OFFER_CHUNK, config.hdr_len, config.mrg, \
                config.max_frame
            o.signal, o.call_fd, o.budget_ns, o.idle_ns = 0, -1, 0, 0
            o.st, o.backlog, o.cap = st, bl, cap
            rc = lib.vp_net_rx_offer(q, o)
            if rc < 0:
                raise _refused(rc, config)
            done = o.taken
        vq.check_broken()
        self.rejected = int(bl.dropped)
        _fold(st, dev.rx_counters[index // 2])
        _fold(bl, dev.backlog_counters, frames=False)
        vq.signal_used()
        if capture is not None and cap.n:
            capture.write_records(ffi.buffer(cap.buf, cap.used), cap.n, cap.used - RECORD * cap.n)
        return int(done)

    def _identity(self, n: int) -> Any:
        """An index array 0 .. n-1 (at least): frames of a burst in their order."""
        if self._ident_n < n:
            size = max(n, 2 * self._ident_n, BURST)
            self._ident = ffi.new("uint32_t[]", list(range(size)))
            self._ident_n = size
        return self._ident

    def _capture_buffer(self, n: int, max_len: int) -> Any:
        need = n * (RECORD + max_len)
        if self._cap is None or self._cap.max < n or self._cap.cap < need:
            self._cap, self._cap_keep = new_frames(n, need)
        return self._cap


class _NativeBatch:
    """A `FrameBatch` as C offers it: its frames laid end to end in one buffer, and the
    cyclic index table `vp_net_rx_offer` reads (`idx[j] = j % n`, n + `OFFER_CHUNK` long)."""

    def __init__(self, frames: Sequence[bytes]) -> None:
        n = len(frames)
        self.n = n
        self.frames, self._keep = new_frames(n, 0)
        self._data = ffi.new("uint8_t[]", b"".join(frames) or b"\0")
        self._lens = ffi.new("uint32_t[]", [len(f) for f in frames])
        lib.vp_frames_from_flat(self.frames, self._data, self._lens, n)
        self.idx = ffi.new("uint32_t[]", [j % n for j in range(n + OFFER_CHUNK)])


def _solo(port: NetHostPort) -> tuple[Any, int, float, float] | None:
    """`switch.solo(port)` of the port's switch when it is the compiled variant and the
    port is alone on it (see `switch.CffiSwitch.solo`); else None."""
    solo = getattr(port.switch, "solo", None)
    if solo is None:
        return None
    args: tuple[Any, int, float, float] | None = solo(port)
    return args


def _fold(st: Any, counters: Any, *, frames: bool = True) -> None:
    """Move the C counters into a `QueueCounters` and zero them."""
    if frames and st.frames:
        counters.frames += st.frames
        counters.bytes += st.bytes
        st.frames = st.bytes = 0
    if st.checksums or st.merged:
        counters.checksums += st.checksums
        counters.merged += st.merged
        st.checksums = st.merged = 0
    if st.dropped:
        for k, reason in enumerate(DROP_REASONS):
            if st.drops[k]:
                counters.drops[reason] += st.drops[k]
                st.drops[k] = 0
        st.dropped = 0
