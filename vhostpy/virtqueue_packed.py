"""Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1+ section 2.8): the device side.

This module owns the pure-Python reference of one packed ring: walking descriptor chains
(consecutive ring slots, or one indirect table) into `DescriptorChain`s, writing used
descriptors back into the same ring, event suppression in both directions (the driver and
device event areas, with the EVENT_IDX "DESC" form) and the GET/SET_VRING_BASE state (both
indices with their wrap counters). Configuration, `fail()`, `taken`, `rewind` and the runner
hooks come from `virtqueue.Virtqueue`, the layout through its hooks.

It must never trust the guest, exactly like the split ring: every descriptor, id, length
and address is checked, and a hostile ring puts only its own queue into the error state (one
WARNING line) -- `pop_many()` never raises, never loops unboundedly and never touches memory
outside a mapped region. Beyond the split ring's guards, a packed ring refuses buffer ids
out of range or reused while in flight, and more descriptors in flight than the ring holds
(so the used index never overtakes the next descriptor to consume).

Ring parts (SET_VRING_ADDR's desc/avail/used): the descriptor ring of `size` 16-byte
descriptors {le64 addr, le32 len, le16 id, le16 flags}, the driver event suppression area
and the device event suppression area, each {le16 off_wrap, le16 flags}.

Memory ordering: a descriptor's flags are what the driver writes last, so they are read
first and the rest after (loads are not reordered with older loads on x86). Used
descriptors are published as a batch: every id and len, then every element's flags but the
first, then the first element's flags, each flag as one 16-bit store (`_store_u16`); the
driver, reading from its last used position, sees the whole batch or none of it. Where a
store must precede a load (asking for kicks then re-checking the ring, publishing used
descriptors then reading the driver's event area), `full_fence()` sits between them.

Not here yet (later steps): the compiled variant, offering the feature to front-ends and
wiring it into the session, and the inflight region's packed layout (`attach_inflight`
refuses a region).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from .errors import MemoryAccessError, RingError
from .inflight import RegionError
from .memory import ADDRESS_LIMIT, GuestMemory
from .virtqueue import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    _store_u16,
    check_fence_support,
    full_fence,
)

__all__ = [
    "EVENT_AREA_SIZE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "VIRTIO_F_RING_PACKED",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_USED",
    "PackedVirtqueue",
    "packed_need_event",
]

log = logging.getLogger(__name__)

VIRTIO_F_RING_PACKED = 34

VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15

#: desc_event_flags values (virtio 1.1+ 2.8.10): the other side's wish for notifications.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2  # only with VIRTIO_F_EVENT_IDX: at the descriptor in off_wrap

#: Each event suppression area: {le16 desc_event_off_wrap, le16 desc_event_flags}.
EVENT_AREA_SIZE = 4
_OFF_WRAP, _EVENT_FLAGS = 0, 2
DESC_ALIGN, EVENT_ALIGN = 16, 4

_PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
_LEN_ID = struct.Struct("<IH")  # a used descriptor's len and id (offset 8)
_U16 = struct.Struct("<H")
_FLAGS_AT = 14
_WRAP_BIT = 1 << 15
_MAX_CHAIN_BYTES = 0xFFFFFFFF


class _Broken(Exception):
    """Internal: the ring is hostile; carries the reason for `Virtqueue.fail()`."""


def _is_avail(flags: int, wrap: bool) -> bool:
    """A descriptor is available when AVAIL equals the wrap counter and USED does not."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap


def packed_need_event(off_wrap: int, new: int, new_wrap: bool, advanced: int,
                      size: int) -> bool:
    """Whether a used index that moved `advanced` descriptor slots, ending at (`new`,
    `new_wrap`), passed the position (`off_wrap`: bits 0-14 the index, bit 15 its wrap
    counter) the driver asked to be interrupted at.

    Positions are counted in a frame of two laps (index plus `size` when the wrap counter
    is 0) where the window [old, new) is unambiguous for `advanced` < 2 * `size`; a longer
    window always wants an interrupt. For `advanced` <= `size` this is the spec's rule
    (move the event back a lap when its wrap bit differs from the used wrap counter, then
    the 16-bit `vring_need_event`).
    """
    lap = 2 * size
    if advanced >= lap:
        return True
    event = (off_wrap & 0x7FFF) + (0 if off_wrap & _WRAP_BIT else size)
    end = new + (0 if new_wrap else size)
    old = (end - advanced) % lap
    return (event - old) % lap < advanced


class PackedVirtqueue(Virtqueue):
    """The pure-Python reference of a packed ring's device side.

    State: `last_avail_idx` (in [0, size)) with `avail_wrap`, and `used_idx` (in [0, size))
    with `used_wrap`, both wrap counters starting at 1 and toggling each time their index
    wraps. `DescriptorChain.head` is the buffer id (the id of the chain's last descriptor);
    per id in flight the ring keeps how many ring slots the chain used, which is how far the
    used index moves when that id is returned.

    Sizes 1..32768 need not be powers of two. `set_base` takes the 32-bit packed form
    (see there), `base` gives it back.
    """

    RING_PARTS = (("descriptor ring", DESC_ALIGN), ("driver area", EVENT_ALIGN),
                  ("device area", EVENT_ALIGN))

    def __init__(self, memory: GuestMemory, index: int) -> None:
        check_fence_support()
        super().__init__(memory, index)
        self.avail_wrap = True
        self.used_wrap = True
        #: Per buffer id in flight: (ring slots its chain used, its writable buffers).
        self._bufs: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self._in_flight_slots = 0  # sum of the slots of the ids in flight
        self._used_advance = 0  # slots the used index moved since the last signal decision

    # ---------------------------------------------------------------- layout and state

    def part_lengths(self, size: int) -> tuple[int, int, int]:
        """Descriptor ring, driver area, device area."""
        return DESC_SIZE * size, EVENT_AREA_SIZE, EVENT_AREA_SIZE

    def _size_problem(self, size: int) -> str | None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            return f"size {size} is not in 1..{MAX_QUEUE_SIZE}"
        if self.last_avail_idx >= size or self.used_idx >= size:
            return (f"size {size} does not hold the base's indices (avail {self.last_avail_idx}"
                    f", used {self.used_idx})")
        return None

    def set_base(self, idx: int) -> None:
        """Set the ring's state (SET_VRING_BASE, packed form): bits 0-14 `last_avail_idx`,
        bit 15 its wrap counter, bits 16-30 `used_idx`, bit 31 its wrap counter. When bits
        16-31 are all 0 the used index and wrap counter follow the avail ones (a fresh start
        as a front-end that sends only the avail half means it). RingError for a value that
        is not 32-bit or an index outside a known size."""
        if not 0 <= idx <= 0xFFFFFFFF:
            raise RingError(f"virtqueue {self.index}: base {idx:#x} is not a 32-bit value")
        avail = idx & 0xFFFF
        used = idx >> 16 or avail
        last, used_idx = avail & 0x7FFF, used & 0x7FFF
        if self._size and (last >= self._size or used_idx >= self._size):
            raise RingError(f"virtqueue {self.index}: base {idx:#x} (avail {last}, used "
                            f"{used_idx}) does not fit size {self._size}")
        self.last_avail_idx, self.avail_wrap = last, bool(avail & _WRAP_BIT)
        self.used_idx, self.used_wrap = used_idx, bool(used & _WRAP_BIT)
        self._restart()

    @property
    def base(self) -> int:
        """The state in GET_VRING_BASE's packed form (see `set_base`)."""
        return (self.last_avail_idx | self.avail_wrap << 15
                | self.used_idx << 16 | self.used_wrap << 31)

    def _restart(self) -> None:
        super()._restart()
        self._bufs.clear()
        self._in_flight_slots = 0
        self._used_advance = 0

    def reset(self) -> None:
        super().reset()
        self.avail_wrap = self.used_wrap = True
        self._bufs.clear()
        self._in_flight_slots = 0
        self._used_advance = 0

    def attach_inflight(self, view: memoryview | None) -> list[int]:
        """Inflight tracking of packed rings is a later step: RegionError for a region."""
        if view is not None:
            raise RegionError(f"virtqueue {self.index}: packed rings: inflight tracking not "
                              "supported yet")
        return super().attach_inflight(None)

    def driver_depth(self) -> int | None:
        """None: a packed driver publishes no index the depth could be read from."""
        return None

    # ---------------------------------------------------------------- popping chains

    def _advance(self, idx: int, wrap: bool, slots: int) -> tuple[int, bool]:
        idx += slots
        if idx >= self._size:
            return idx - self._size, not wrap
        return idx, wrap

    def _scan(self, desc: memoryview) -> tuple[int, bool, int]:
        """Walk the available descriptors from `last_avail_idx` without taking them:
        (the position after them, its wrap counter, how many chains end among them)."""
        idx, wrap = self.last_avail_idx, self.avail_wrap
        chains = 0
        for _ in range(self._size - self._in_flight_slots):
            flags: int = _U16.unpack_from(desc, DESC_SIZE * idx + _FLAGS_AT)[0]
            if not _is_avail(flags, wrap):
                break
            if not flags & VIRTQ_DESC_F_NEXT:
                chains += 1
            idx, wrap = self._advance(idx, wrap, 1)
        return idx, wrap, chains

    def has_available(self) -> bool:
        """Whether the descriptor at `last_avail_idx` is available (False when not ready)."""
        rings = self._rings()
        if rings is None:
            return False
        flags: int = _U16.unpack_from(rings[0], DESC_SIZE * self.last_avail_idx + _FLAGS_AT)[0]
        return _is_avail(flags, self.avail_wrap)

    def available(self) -> int:
        """How many chains the driver made available that were not popped yet (0 when the
        ring is not ready)."""
        rings = self._rings()
        return 0 if rings is None else self._scan(rings[0])[2]

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains (stops early if the ring breaks)."""
        rings = self._rings()
        if rings is None or limit <= 0:
            return []
        desc, _driver, device = rings
        out: list[DescriptorChain] = []
        while len(out) < limit:
            idx, wrap = self.last_avail_idx, self.avail_wrap
            flags: int = _U16.unpack_from(desc, DESC_SIZE * idx + _FLAGS_AT)[0]
            if not _is_avail(flags, wrap):
                break
            try:
                chain, slots = self._walk(desc, idx)
            except _Broken as exc:
                self.fail(f"chain at descriptor {idx} (wrap {int(wrap)}): {exc}")
                break
            out.append(chain)
            self._bufs[chain.head] = (slots, chain.writable)
            self._in_flight_slots += slots
            self.last_avail_idx, self.avail_wrap = self._advance(idx, wrap, slots)
        if out and self.event_idx and self._notify:
            # Keep kicks coming: ask for one when the driver makes the next descriptor available.
            _store_u16(device, _OFF_WRAP, self.last_avail_idx | self.avail_wrap << 15)
        self._took(out)
        return out

    def _walk(self, desc: memoryview, start: int) -> tuple[DescriptorChain, int]:
        """The chain whose first descriptor is at ring slot `start`, and its slot count."""
        size = self._size
        memory = self.memory
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        lens = [0, 0]  # readable, writable bytes
        budget = size - self._in_flight_slots  # slots the driver may have made available
        i = start
        slots = 0
        while True:
            if slots >= budget:
                if self._in_flight_slots:
                    raise _Broken(f"chain longer than the {budget} free descriptors "
                                  f"({self._in_flight_slots} in flight, size {size})")
                raise _Broken(f"descriptor loop: chain longer than size {size}")
            addr, length, buf_id, flags = _PDESC.unpack_from(desc, DESC_SIZE * i)
            slots += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _Broken(f"descriptor {i} has both INDIRECT and NEXT (flags {flags:#x})")
                if slots > 1:
                    raise _Broken(f"indirect descriptor {i} after {slots - 1} direct ones")
                self._walk_indirect(addr, length, readable, writable, lens)
                break
            self._buffer(f"descriptor {i}", addr, length, flags, readable, writable, lens)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            i = i + 1 if i + 1 < size else 0
        if buf_id >= size:
            raise _Broken(f"buffer id {buf_id} >= size {size}")
        if buf_id in self._bufs:
            raise _Broken(f"buffer id {buf_id} reused while in flight")
        chain = DescriptorChain(memory, buf_id, readable, writable, lens[0], lens[1])
        return chain, slots

    def _walk_indirect(self, addr: int, length: int, readable: list[tuple[int, int]],
                       writable: list[tuple[int, int]], lens: list[int]) -> None:
        """Every entry of the indirect table at `addr`, in order (NEXT means nothing there)."""
        if length == 0 or length % DESC_SIZE or length > DESC_SIZE * MAX_QUEUE_SIZE:
            raise _Broken(f"indirect table at {addr:#x} has bad length {length:#x}")
        if addr + length > ADDRESS_LIMIT:
            raise _Broken(f"indirect table addr {addr:#x} + len {length:#x} overflows 64 bits")
        try:
            parts = self.memory.views(addr, length)
        except MemoryAccessError as exc:
            raise _Broken(f"indirect table: {exc}") from None
        # A table spanning regions is copied; the copy also pins what we walk.
        table = parts[0] if len(parts) == 1 else b"".join(parts)
        for k in range(length // DESC_SIZE):
            baddr, blen, _id, flags = _PDESC.unpack_from(table, DESC_SIZE * k)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise _Broken(f"nested indirect descriptor {k} at addr {baddr:#x}")
            self._buffer(f"indirect descriptor {k}", baddr, blen, flags, readable, writable,
                         lens)

    def _buffer(self, where: str, addr: int, length: int, flags: int,
                readable: list[tuple[int, int]], writable: list[tuple[int, int]],
                lens: list[int]) -> None:
        """Check one buffer and add it to the chain being walked."""
        if addr + length > ADDRESS_LIMIT:
            raise _Broken(f"{where} addr {addr:#x} + len {length:#x} overflows 64 bits")
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append((addr, length))
            lens[1] += length
        elif writable:
            raise _Broken(f"device-readable {where} (addr {addr:#x} len {length:#x}) "
                          "after a device-writable one")
        else:
            readable.append((addr, length))
            lens[0] += length
        if lens[0] + lens[1] > _MAX_CHAIN_BYTES:
            raise _Broken(f"chain length {lens[0] + lens[1]:#x} overflows 32 bits at {where}")
        if length:
            try:
                self.memory.check(addr, length)
            except MemoryAccessError as exc:
                raise _Broken(f"{where} buffer: {exc}") from None

    def _unpop(self, head: int, resubmitted: bool) -> None:
        entry = self._bufs.pop(head, None)
        if entry is None:
            return
        slots = entry[0]
        self._in_flight_slots -= slots
        idx = self.last_avail_idx - slots
        if idx < 0:
            self.last_avail_idx, self.avail_wrap = idx + self._size, not self.avail_wrap
        else:
            self.last_avail_idx = idx

    # ---------------------------------------------------------------- used descriptors

    def add_used_many(self, items: Sequence[tuple[int, int]]) -> None:
        """Return several buffers (id, bytes written) as one batch of used descriptors.

        ValueError (a device bug; nothing written) for an id not in flight, one given twice,
        or a length beyond 32 bits. Each used descriptor goes at the used index, which then
        moves by the slots that id's chain used; the first element's flags are stored last.
        """
        if not items:
            return
        rings = self._rings()
        if rings is None:
            log.debug("virtqueue %d: add_used on a queue that is not ready: dropped", self.index)
            return
        desc = rings[0]
        self._check_used(items)
        bufs = self._bufs
        seen: set[int] = set()
        for buf_id, _ in items:
            if buf_id not in bufs or buf_id in seen:
                raise ValueError(f"virtqueue {self.index}: add_used id {buf_id} is not in flight")
            seen.add(buf_id)
        idx, wrap = self.used_idx, self.used_wrap
        first_at = first_flags = -1
        advanced = 0
        for buf_id, length in items:
            at = DESC_SIZE * idx
            _LEN_ID.pack_into(desc, at + 8, length, buf_id)
            flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0
            if first_at < 0:
                first_at, first_flags = at, flags
            else:
                _store_u16(desc, at + _FLAGS_AT, flags)
            slots = bufs[buf_id][0]
            advanced += slots
            idx, wrap = self._advance(idx, wrap, slots)
        # The driver polls the first element's flags: publish the batch with that store.
        _store_u16(desc, first_at + _FLAGS_AT, first_flags)
        start = self.used_idx
        self.used_idx, self.used_wrap = idx, wrap
        self._unsignalled += len(items)
        self._used_advance += advanced
        self._in_flight_slots -= advanced
        self._completed(items)
        written = [bufs.pop(buf_id)[1] for buf_id, _ in items]
        if self._log is not None:
            self._log_completed(written, start, advanced)

    def _log_completed(self, written: list[list[tuple[int, int]]], start: int,
                       advanced: int) -> None:
        """Mark the completed chains' writable buffers, then (when the ring is logged) the
        descriptor ring slots the used descriptors went to."""
        for buffers in written:
            for addr, length in buffers:
                self._log_mark(addr, length)
        if self._log_used is None:
            return
        end = min(start + advanced, self._size)
        self._log_mark(self._desc_addr + DESC_SIZE * start, DESC_SIZE * (end - start))
        if start + advanced > self._size:
            self._log_mark(self._desc_addr, DESC_SIZE * (start + advanced - self._size))

    def log_used_ring(self) -> None:
        """Mark everything the device writes: the whole descriptor ring (at its
        guest-physical address) and the device area (at `used_addr`, the ring's log
        address, which for a packed ring is the device area's)."""
        if self._log_used is not None and self._size:
            self._log_mark(self._desc_addr, DESC_SIZE * self._size)
            self._log_mark(self._log_used, EVENT_AREA_SIZE)

    # ---------------------------------------------------------------- notifications

    def needs_notification(self) -> bool:
        """Should the driver be interrupted for used descriptors written since the last
        decision? From the driver area: ENABLE yes, DISABLE no, DESC (with EVENT_IDX)
        whether the used index passed its off_wrap (always yes for the first decision
        after a (re)start). A query only; `decide_signal()` records the decision."""
        if self._unsignalled == 0:
            return False
        rings = self._rings()
        if rings is None:
            return False
        driver = rings[1]
        full_fence()  # used flags were stored; the driver's event area is loaded next
        flags: int = _U16.unpack_from(driver, _EVENT_FLAGS)[0] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True  # ENABLE; DESC without EVENT_IDX and the reserved 3 read as ENABLE
        if not self._signal_valid:
            return True
        off_wrap: int = _U16.unpack_from(driver, _OFF_WRAP)[0]
        return packed_need_event(off_wrap, self.used_idx, self.used_wrap, self._used_advance,
                                 self._size)

    def _signal_decided(self) -> None:
        self._used_advance = 0

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (device area flags DISABLE)."""
        self._notify = False
        rings = self._rings()
        if rings is not None:
            _store_u16(rings[2], _EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE)

    def enable_notifications(self, after_available: bool = False) -> bool:
        """Ask for kicks again (ENABLE, or with EVENT_IDX DESC at the next descriptor to
        consume); True if a descriptor became available meanwhile (the caller must re-poll).

        With `after_available`, the position asked for is the one after the descriptors
        available now, and True means the driver made that one available (see
        `PythonVirtqueue.enable_notifications`).
        """
        self._notify = True
        rings = self._rings()
        if rings is None:
            return False
        desc, _driver, device = rings
        if after_available:
            idx, wrap, _chains = self._scan(desc)
        else:
            idx, wrap = self.last_avail_idx, self.avail_wrap
        if self.event_idx:
            _store_u16(device, _OFF_WRAP, idx | wrap << 15)  # before the flags that point at it
            _store_u16(device, _EVENT_FLAGS, RING_EVENT_FLAGS_DESC)
        else:
            _store_u16(device, _EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE)
        # The driver may have made descriptors available after our last look without
        # kicking; re-reading after the store (fenced) closes that window.
        full_fence()
        flags: int = _U16.unpack_from(desc, DESC_SIZE * idx + _FLAGS_AT)[0]
        return _is_avail(flags, wrap)

    def __repr__(self) -> str:
        state = "broken" if self.error else ("ready" if self.ready else "unconfigured")
        return (f"<PackedVirtqueue {self.index} {state} size={self._size} "
                f"avail={self.last_avail_idx}/{int(self.avail_wrap)} "
                f"used={self.used_idx}/{int(self.used_wrap)}>")
