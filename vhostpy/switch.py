"""A learning Ethernet switch (IEEE 802.1D transparent bridging, minus spanning tree).

`Switch` connects ports: whatever pushes frames *out of* a port (a guest's TX queue, a
tap, a `Responder`) calls `Switch.forward(port, frames)`; the switch delivers them with
`Port.send()` to the other ports. It learns source MAC -> port, floods broadcast,
multicast and unknown unicast to every other port, sends known unicast to one port, and
never hairpins a frame back to the port it came from. Work is batched: one `send()` per
destination port per `forward()` call, frames kept in order.

It owns only the forwarding database; it never parses past the Ethernet header, never
copies frames, does no I/O of its own and imports nothing from the rest of vhostpy but the
compiled fast path (`_accel`).

Variants: two sibling classes with one behaviour, both built on `BaseSwitch`:
`PythonSwitch`, the pure-Python reference, and `CffiSwitch`, whose forwarding database and
per-frame decisions are in C and which also forwards whole C bursts (`forward_burst`)
between vhostpy ports without Python per frame. The visible rule:
`Switch = CffiSwitch if _accel.lib is not None else PythonSwitch` (annotate with
`BaseSwitch`). Either may be built directly; `CffiSwitch` needs the compiled extension.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vhostpy import _accel

__all__ = ["MAX_ENTRIES", "BaseSwitch", "CffiSwitch", "Port", "PythonSwitch", "Switch"]

log = logging.getLogger(__name__)

_ZERO_MAC = bytes(6)
#: The largest `max_entries` a switch takes (the C table's limit, `VP_SWITCH_MAX_ENTRIES`:
#: twice as many slots, rounded up to a power of two, must fit 32-bit indices).
MAX_ENTRIES = (1 << 30) - 1


class Port(Protocol):
    """Anything that can take Ethernet frames (no FCS, no virtio_net_hdr) toward its peer.

    `send()` returns how many of `frames` it accepted; the rest are dropped and counted by
    the port. It may call `Switch.forward()` again from inside (a port that answers at
    once); the switch tolerates that.
    """

    name: str

    def send(self, frames: Sequence[bytes]) -> int: ...


class BaseSwitch:
    """A learning L2 switch between attached `Port` objects (what both variants share).

    Ports are identified by object identity. Entries of the forwarding database (MAC ->
    port, last seen) older than `aging` seconds of `clock` are ignored and swept. Frames
    shorter than an Ethernet header, with a multicast or all-zero source MAC, or from a port
    that is not attached are dropped. At most `max_entries` MACs are learned (a guest
    inventing source addresses cannot grow memory); beyond that, frames from new MACs
    are still forwarded, only not learned.

    Counters: `forwarded` (known-unicast frames sent to one port), `flooded` (frames sent
    to every other port, counted once per frame), `filtered` (known unicast whose port is
    the source port: not sent), `dropped` (invalid or from a detached port).

    Raises ValueError for an `aging` that is not positive or a `max_entries` outside
    0..`MAX_ENTRIES`.
    """

    forwarded: int
    flooded: int
    filtered: int
    dropped: int

    def __init__(
        self,
        aging: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = 4096,
    ) -> None:
        if aging <= 0:
            raise ValueError(f"aging must be positive, not {aging}")
        if not 0 <= max_entries <= MAX_ENTRIES:
            raise ValueError(f"max_entries must be 0..{MAX_ENTRIES}, not {max_entries}")
        self.aging = aging
        self.clock = clock
        self.max_entries = max_entries
        self._ports: dict[int, Port] = {}  # id(port) -> port, in attach order
        self._next_sweep = clock() + aging

    def counters(self) -> dict[str, int]:
        """All counters by name, plus `macs`: the size of the forwarding database."""
        return {"forwarded": self.forwarded, "flooded": self.flooded,
                "filtered": self.filtered, "dropped": self.dropped, "macs": self._macs()}

    def _macs(self) -> int:
        raise NotImplementedError

    @property
    def ports(self) -> list[Port]:
        """Attached ports, in attach order."""
        return list(self._ports.values())

    def attach(self, port: Port) -> None:
        """Connect `port`; raises ValueError if it is already attached."""
        if id(port) in self._ports:
            raise ValueError(f"port {port.name!r} is already attached")
        self._ports[id(port)] = port
        log.debug("switch: attached port %s", port.name)

    def detach(self, port: Port) -> None:
        """Disconnect `port` and forget every MAC learned on it; unknown ports are ignored."""
        raise NotImplementedError

    def forward(self, src: Port, frames: Sequence[bytes]) -> None:
        """Switch `frames` that arrived from `src` to the other ports.

        Learns each valid frame's source MAC on `src`, then queues it for its destination:
        every other port for group addresses and unknown unicast, the learned port for
        known unicast (nothing if that is `src`). Finally calls `send()` once per
        destination port that has frames, in attach order. Exceptions from `send()`
        propagate after earlier ports got their frames.
        """
        raise NotImplementedError

    def lookup(self, mac: bytes) -> Port | None:
        """The port `mac` was last seen on, or None if unknown or aged out."""
        raise NotImplementedError

    def table(self) -> dict[str, tuple[str, float]]:
        """The live forwarding database: 'xx:..:xx' -> (port name, seconds since last seen)."""
        raise NotImplementedError


class PythonSwitch(BaseSwitch):
    """The pure-Python reference: the forwarding database is a dict."""

    def __init__(self, aging: float = 300.0, clock: Callable[[], float] = time.monotonic, *,
                 max_entries: int = 4096) -> None:
        super().__init__(aging, clock, max_entries=max_entries)
        self._fdb: dict[bytes, tuple[Port, float]] = {}
        self.forwarded = 0
        self.flooded = 0
        self.filtered = 0
        self.dropped = 0

    def _macs(self) -> int:
        return len(self._fdb)

    def detach(self, port: Port) -> None:
        if self._ports.pop(id(port), None) is None:
            return
        for mac in [m for m, (p, _) in self._fdb.items() if p is port]:
            del self._fdb[mac]
        log.debug("switch: detached port %s", port.name)

    def forward(self, src: Port, frames: Sequence[bytes]) -> None:
        if id(src) not in self._ports:
            self.dropped += len(frames)
            return
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        fdb = self._fdb
        horizon = now - self.aging
        others = [p for p in self._ports.values() if p is not src]
        batches: dict[int, list[bytes]] = {id(p): [] for p in others}
        flood = [batches[id(p)] for p in others]
        forwarded = flooded = filtered = dropped = 0
        for frame in frames:
            if len(frame) < 14:
                dropped += 1
                continue
            smac = bytes(frame[6:12])
            if smac[0] & 1 or smac == _ZERO_MAC:
                dropped += 1
                continue
            entry = fdb.get(smac)
            if entry is None and len(fdb) >= self.max_entries:
                pass  # table full: forward, do not learn
            elif entry is None or entry[0] is not src or entry[1] != now:
                fdb[smac] = (src, now)  # new, refreshed, or moved to this port
            dmac = bytes(frame[0:6])
            if not dmac[0] & 1:
                entry = fdb.get(dmac)
                if entry is not None and entry[1] >= horizon:
                    out = entry[0]
                    if out is src:
                        filtered += 1
                    else:
                        batches[id(out)].append(frame)
                        forwarded += 1
                    continue
            for batch in flood:
                batch.append(frame)
            flooded += 1
        self.forwarded += forwarded
        self.flooded += flooded
        self.filtered += filtered
        self.dropped += dropped
        for port in others:
            batch = batches[id(port)]
            # A port detached by an earlier send() (re-entrancy) gets nothing more.
            if batch and id(port) in self._ports:
                port.send(batch)

    def _sweep(self, now: float) -> None:
        horizon = now - self.aging
        for mac in [m for m, (_, seen) in self._fdb.items() if seen < horizon]:
            del self._fdb[mac]
        self._next_sweep = now + self.aging / 2

    def lookup(self, mac: bytes) -> Port | None:
        entry = self._fdb.get(bytes(mac))
        if entry is None or entry[1] < self.clock() - self.aging:
            return None
        return entry[0]

    def table(self) -> dict[str, tuple[str, float]]:
        now = self.clock()
        self._sweep(now)
        return {mac.hex(":"): (port.name, now - seen) for mac, (port, seen) in self._fdb.items()}


def _c_counter(name: str) -> property:
    def get(self: CffiSwitch) -> int:
        return int(getattr(self._sw, name))

    def set_(self: CffiSwitch, value: int) -> None:
        setattr(self._sw, name, value)

    return property(get, set_)


class CffiSwitch(BaseSwitch):
    """The switch with its forwarding database and per-frame decisions in C.

    Ports get small numbers in attach order (the C table stores those). `forward()` takes
    frames as bytes like the reference; `forward_burst(src, burst)` takes a C burst of the
    compiled net path and hands frames to ports that have `receive_burst` (vhostpy ports)
    without making bytes, and to the others (responder, tap) as bytes.
    """

    forwarded = _c_counter("forwarded")
    flooded = _c_counter("flooded")
    filtered = _c_counter("filtered")
    dropped = _c_counter("dropped")

    def __init__(self, aging: float = 300.0, clock: Callable[[], float] = time.monotonic, *,
                 max_entries: int = 4096) -> None:
        super().__init__(aging, clock, max_entries=max_entries)
        ffi, lib = _accel.ffi, _accel.lib
        if lib is None:
            raise RuntimeError("CffiSwitch needs the compiled fast path (vhostpy._native)")
        sw = ffi.new("struct vp_switch *")
        rc = lib.vp_switch_init(sw, max_entries)
        if rc == lib.VP_ERR_TOO_LARGE:   # not reached: the base class checked max_entries
            raise ValueError(f"max_entries {max_entries} refused by the compiled switch")
        if rc != 0:
            raise MemoryError(f"switch forwarding database for {max_entries} entries")
        self._sw: Any = ffi.gc(sw, lib.vp_switch_free)
        self._number: dict[int, int] = {}   # id(port) -> its number in the C table
        self._by_number: dict[int, Port] = {}
        self._next_number = 0

    def _macs(self) -> int:
        return int(self._sw.count)

    def attach(self, port: Port) -> None:
        super().attach(port)
        self._number[id(port)] = self._next_number
        self._by_number[self._next_number] = port
        self._next_number += 1

    def detach(self, port: Port) -> None:
        if self._ports.pop(id(port), None) is None:
            return
        number = self._number.pop(id(port))
        del self._by_number[number]
        _accel.lib.vp_switch_prune(self._sw, number, float("-inf"))
        log.debug("switch: detached port %s", port.name)

    def forward(self, src: Port, frames: Sequence[bytes]) -> None:
        if id(src) not in self._ports:
            self.dropped += len(frames)
            return
        ffi, lib = _accel.ffi, _accel.lib
        n = len(frames)
        burst = ffi.new("struct vp_frames *")
        offs, lens = ffi.new("uint64_t[]", max(n, 1)), ffi.new("uint32_t[]", max(n, 1))
        burst.off, burst.len, burst.max = offs, lens, n
        data = b"".join(frames)
        pin = ffi.from_buffer("uint8_t[]", data)
        lib.vp_frames_from_flat(burst, pin, ffi.new("uint32_t[]", list(map(len, frames))), n)
        self._switch(src, burst, frames)

    def forward_burst(self, src: Port, burst: Any) -> None:
        """Switch the frames of a C burst (`struct vp_frames *`) that arrived from `src`."""
        if id(src) not in self._ports:
            self.dropped += burst.n
            return
        self._switch(src, burst, None)

    def solo(self, src: Port) -> tuple[Any, int, float, float] | None:
        """When `src` is the only attached port (its frames are learned and flooded to no
        one): what a C loop needs to switch its bursts without Python, `vp_switch_classify`'s
        (switch, src, now, horizon), after the sweep `forward_burst` would make. Else None."""
        if len(self._ports) != 1 or id(src) not in self._ports:
            return None
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return self._sw, self._number[id(src)], now, now - self.aging

    def _switch(self, src: Port, burst: Any, frames: Sequence[bytes] | None) -> None:
        ffi, lib = _accel.ffi, _accel.lib
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        n = burst.n
        dest = ffi.new("int32_t[]", max(n, 1))
        lib.vp_switch_classify(self._sw, burst, self._number[id(src)], now, now - self.aging, dest)
        idx = ffi.new("uint32_t[]", max(n, 1))
        for port in [p for p in self._ports.values() if p is not src]:
            number = self._number.get(id(port))
            if number is None:   # detached by an earlier send() (re-entrancy)
                continue
            k = lib.vp_switch_select(dest, n, number, idx)
            if not k:
                continue
            if frames is not None:
                port.send(list(map(frames.__getitem__, ffi.unpack(idx, k))))
            else:
                receive = getattr(port, "receive_burst", None)
                if receive is not None:
                    receive(burst, idx, k)
                else:
                    port.send(_burst_bytes(burst, idx, k))

    def _sweep(self, now: float) -> None:
        _accel.lib.vp_switch_prune(self._sw, -1, now - self.aging)
        self._next_sweep = now + self.aging / 2

    def lookup(self, mac: bytes) -> Port | None:
        number = _accel.lib.vp_switch_lookup(self._sw, int.from_bytes(bytes(mac), "big"),
                                             self.clock() - self.aging)
        return self._by_number.get(number) if number >= 0 else None

    def table(self) -> dict[str, tuple[str, float]]:
        now = self.clock()
        self._sweep(now)
        ffi = _accel.ffi
        count = self._sw.count
        macs = ffi.new("uint64_t[]", max(count, 1))
        ports = ffi.new("int32_t[]", max(count, 1))
        seen = ffi.new("double[]", max(count, 1))
        n = _accel.lib.vp_switch_dump(self._sw, macs, ports, seen, count)
        out: dict[str, tuple[str, float]] = {}
        for k in range(n):
            port = self._by_number.get(ports[k])
            if port is not None:
                out[macs[k].to_bytes(6, "big").hex(":")] = (port.name, now - seen[k])
        return out


def _burst_bytes(burst: Any, idx: Any, k: int) -> list[bytes]:
    ffi = _accel.ffi
    blob = ffi.buffer(burst.buf, burst.used)[:]
    offs = ffi.unpack(burst.off, burst.n)
    lens = ffi.unpack(burst.len, burst.n)
    return [blob[offs[i]:offs[i] + lens[i]] for i in ffi.unpack(idx, k)]


#: The variant `vhostpy` builds: the compiled one when the extension is in use.
Switch: type[BaseSwitch] = CffiSwitch if _accel.lib is not None else PythonSwitch
