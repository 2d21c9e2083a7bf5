"""A tiny driver-side model of a split virtqueue, for tests (and later a guest driver model).

It owns the driver's half of a ring laid out in a `GuestMemory`: the descriptor table, the
avail ring, a bump allocator for buffers, and reading back the used ring. It never checks what
it is told to write: hostile rings are built with the raw `write_desc` / `set_avail_idx` calls.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vhostpy.memory import GuestMemory
from vhostpy.virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Virtqueue,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")


def anon_memory(size: int = 1 << 20, gpa: int = 0) -> tuple[GuestMemory, mmap.mmap]:
    """GuestMemory with one anonymous mapping of `size` bytes at `gpa`."""
    mem = GuestMemory()
    buf = mmap.mmap(-1, size)
    mem.add_buffer(buf, gpa)
    return mem, buf


@dataclass
class Layout:
    desc: int
    avail: int
    used: int
    data: int  # first byte of the buffer area
    data_end: int


def layout(size: int, base: int = 0, data_size: int = 1 << 18) -> Layout:
    """Place a ring of `size` at `base`: desc, avail, used (4 KiB aligned), then buffers."""
    desc = base
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 4095) & ~4095
    data = (used + 6 + 8 * size + 4095) & ~4095
    return Layout(desc, avail, used, data, data + data_size)


class RingBuilder:
    """Driver side of one split ring at a `Layout` in `memory`."""

    def __init__(self, memory: GuestMemory, size: int, lay: Layout) -> None:
        self.memory = memory
        self.size = size
        self.lay = lay
        self.avail_idx = 0
        self.last_used_idx = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}  # head -> descriptors of chains in flight
        self._reclaim_idx = 0  # used entries up to here have given their descriptors back
        self._data = lay.data
        for addr, n in ((lay.desc, 16 * size), (lay.avail, 6 + 2 * size), (lay.used, 6 + 8 * size)):
            memory.write(addr, bytes(n))

    # -------------------------------------------------------------- set-up

    def attach(self, vq: Virtqueue, base: int | None = None) -> Virtqueue:
        """Configure `vq` for this ring (size, base, addresses)."""
        vq.set_size(self.size)
        if base is not None:
            self.set_base(base)
            vq.set_base(base)
        vq.set_addresses(self.lay.desc, self.lay.avail, self.lay.used)
        return vq

    def set_base(self, idx: int) -> None:
        """Start both indices at `idx` (as after SET_VRING_BASE on a fresh ring)."""
        self.avail_idx = idx
        self.last_used_idx = idx
        self._reclaim_idx = idx
        self.memory.write(self.lay.avail + 2, _U16.pack(idx))
        self.memory.write(self.lay.used + 2, _U16.pack(idx))

    def alloc(self, data: bytes | int) -> int:
        """Bump-allocate a buffer (contents, or a zeroed length) and return its address."""
        n = len(data) if isinstance(data, bytes) else data
        addr = self._data
        if addr + n > self.lay.data_end:
            addr = self._data = self.lay.data  # wrap; tests never hold that many buffers
        self._data = (addr + n + 15) & ~15
        self.memory.write(addr, data if isinstance(data, bytes) else bytes(n))
        return addr

    def alloc_desc(self) -> int:
        """A free descriptor index, reclaiming those of chains the device has used."""
        if not self._free:
            self.reclaim()
        if not self._free:
            raise RuntimeError("ring builder: no free descriptors")
        return self._free.pop(0)

    def reclaim(self) -> None:
        idx = self.used_idx
        while self._reclaim_idx != idx:
            slot = self._reclaim_idx % self.size
            head = _ELEM.unpack(self.memory.read(self.lay.used + 4 + 8 * slot, 8))[0]
            self._free.extend(self._chains.pop(head, ()))
            self._reclaim_idx = (self._reclaim_idx + 1) & 0xFFFF

    # -------------------------------------------------------------- raw writes

    def write_desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None
    ) -> None:
        base = self.lay.desc if table is None else table
        self.memory.write(base + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.memory.write(self.lay.avail + 2, _U16.pack(self.avail_idx))

    def publish(self, head: int, *, update_idx: bool = True) -> None:
        """Put `head` in the next avail slot and (by default) bump avail->idx."""
        slot = self.avail_idx % self.size
        self.memory.write(self.lay.avail + 4 + 2 * slot, _U16.pack(head))
        if update_idx:
            self.set_avail_idx(self.avail_idx + 1)

    # -------------------------------------------------------------- chains

    def add_chain(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> tuple[int, list[int]]:
        """Add a chain of readable then writable buffers; returns (head, buffer addresses)."""
        bufs: list[tuple[int, int, int]] = []
        for data in readable:
            bufs.append((self.alloc(data), len(data), 0))
        for n in writable:
            bufs.append((self.alloc(n), n, VIRTQ_DESC_F_WRITE))
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        head = self.add_chain_at(bufs, indirect=indirect, publish=publish)
        return head, [b[0] for b in bufs]

    def add_chain_at(self, bufs: Sequence[tuple[int, int, int]], *, indirect: bool = False,
                     publish: bool = True) -> int:
        """Add a chain of the buffers given as (address, length, flags), in the descriptor
        table or through an indirect table; returns its head."""
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (addr, n, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.write_desc(k, addr, n, flags | more, k + 1, table=table)
            head = self.alloc_desc()
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            self._chains[head] = [head]
        else:
            ids = [self.alloc_desc() for _ in bufs]
            for k, (addr, n, flags) in enumerate(bufs):
                last = k + 1 == len(bufs)
                more = 0 if last else VIRTQ_DESC_F_NEXT
                self.write_desc(ids[k], addr, n, flags | more, 0 if last else ids[k + 1])
            head = ids[0]
            self._chains[head] = ids
        if publish:
            self.publish(head)
        return head

    # -------------------------------------------------------------- used ring and events

    def _u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.memory.read(gpa, 2))[0]
        return value

    @property
    def used_idx(self) -> int:
        return self._u16(self.lay.used + 2)

    @property
    def used_flags(self) -> int:
        return self._u16(self.lay.used)

    @property
    def no_notify(self) -> bool:
        return bool(self.used_flags & VIRTQ_USED_F_NO_NOTIFY)

    @property
    def avail_event(self) -> int:
        return self._u16(self.lay.used + 4 + 8 * self.size)

    def get_used(self) -> list[tuple[int, int]]:
        """Used elements (id, len) published since the last call."""
        out = []
        idx = self.used_idx
        while self.last_used_idx != idx:
            slot = self.last_used_idx % self.size
            out.append(_ELEM.unpack(self.memory.read(self.lay.used + 4 + 8 * slot, 8)))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    def set_no_interrupt(self, on: bool = True) -> None:
        self.memory.write(self.lay.avail, _U16.pack(VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0))

    def set_used_event(self, idx: int) -> None:
        self.memory.write(self.lay.avail + 4 + 2 * self.size, _U16.pack(idx & 0xFFFF))

    def device_wants_kicks(self, event_idx: bool) -> bool:
        """Whether the device asks for a kick at the next entry the driver adds: it is not
        polling this ring (avail_event at avail->idx, or NO_NOTIFY clear)."""
        if event_idx:
            return self.avail_event == self.avail_idx
        return not self.no_notify

    def should_kick(self, old_avail: int, event_idx: bool) -> bool:
        """What a driver decides after publishing entries old_avail..avail_idx."""
        if event_idx:
            event = self.avail_event
            return ((self.avail_idx - event - 1) & 0xFFFF) < ((self.avail_idx - old_avail) & 0xFFFF)
        return not self.no_notify


class CallRunner:
    """A stand-in for `vring.Vring` in ring and device unit tests (`Virtqueue.runner`).

    The test sets what a runner would decide: `call` (a Python callable) and `call_fd` (an
    eventfd the compiled paths may write; `call` must then write the same fd), `polling`
    and `held`. The interrupt decision itself is the ring's (`Virtqueue.decide_signal`).
    The real runner's own behaviour is tested in tests/test_vring.py.
    """

    def __init__(self, vq: Virtqueue, call: Callable[[], None] | None = None,
                 call_fd: int | None = None) -> None:
        self.call = call
        self.call_fd = call_fd
        self.polling = False
        self.held = False
        self.vq = vq
        vq.runner = self

    def signal_used(self, vq: Virtqueue) -> bool:
        if self.call is None or self.held:
            return False
        need = vq.decide_signal()
        if need:
            self.call()
        return need

    def signal_target(self) -> tuple[int, int] | None:
        if self.call is None or self.held:
            return 0, -1
        return None if self.call_fd is None else (1, self.call_fd)

    def interrupt(self) -> None:
        if self.call is not None:
            self.call()

    def publish(self, items: list[tuple[int, int]]) -> None:
        self.vq.add_used_many(items)

    def defer(self, chain: Any) -> Any:
        raise AssertionError("this stand-in runner completes nothing later")

    def later(self, chain: Any, result: object) -> None:
        raise AssertionError("this stand-in runner completes nothing later")

    def spawn(self, awaitable: object, done: Any) -> Any:
        raise AssertionError("this stand-in runner runs no coroutines")

    def call_soon_threadsafe(self, callback: Any) -> None:
        raise AssertionError("this stand-in runner has no loop")
