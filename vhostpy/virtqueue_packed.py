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

Inflight tracking (INFLIGHT_SHMFD): `attach_inflight(view)` takes this ring's part of the
region in the spec's packed layout (`inflight.PackedInflight`). Every chain taken is copied
there before `pop_many` hands it out, every batch of used descriptors is linked there
before its first flags are stored and committed after, and a chain given back by `rewind`
is returned there. A region left by a back-end that died is recovered at attach: the
chains it held are served again first, rebuilt from the region's copies of their
descriptors (the ring's own slots may hold used descriptors by now) and checked like any
chain, and the ring resumes from the region's used position, its avail position that plus
the ring slots those chains hold -- not from SET_VRING_BASE, which after a crash carries
whatever QEMU last read from GET_VRING_BASE.

Not here yet (later steps): the compiled variant, offering the feature to front-ends and
wiring it into the session.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from .errors import MemoryAccessError, RingError
from .inflight import Descriptor, PackedInflight, RecoveredChain, RegionError
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
        #: Per buffer id in flight: (ring slots its chain used, its writable buffers, the
        #: slot its chain starts at or -1 for a recovered one).
        self._bufs: dict[int, tuple[int, list[tuple[int, int]], int]] = {}
        self._in_flight_slots = 0  # sum of the slots of the ids in flight (or to resubmit)
        self._used_advance = 0  # slots the used index moved since the last signal decision
        #: This ring's part of the inflight region (`attach_inflight`), or None.
        self._tracker: PackedInflight | None = None
        #: Chains a previous back-end left in flight, by buffer id, until completed here.
        self._recovered: dict[int, RecoveredChain] = {}

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
        self._recovered.clear()
        self._in_flight_slots = 0
        self._used_advance = 0

    def reset(self) -> None:
        super().reset()
        self.avail_wrap = self.used_wrap = True
        self._bufs.clear()
        self._recovered.clear()
        self._set_resubmit([])
        self._in_flight_slots = 0
        self._used_advance = 0

    # ---------------------------------------------------------------- inflight tracking

    def attach_inflight(self, view: memoryview | None) -> list[int]:
        """Track this ring's chains in `view` (its part of the INFLIGHT_SHMFD region in the
        packed layout: `inflight.queue_view(..., packed=True)`) from now on, or stop
        tracking (None). Returns the buffer ids to serve again, oldest first.

        Call it on a configured ring when it starts (after SET_VRING_BASE), before anything
        is popped. A fresh region (version 0) is initialised at the ring's used position
        and nothing is recovered. A region a previous back-end left state in is repaired
        and read (`PackedInflight.recover`): the chains it had taken and not completed are
        served by `pop_many` before the ring's new ones, the used position becomes the
        region's and the avail position that plus the ring slots of those chains (whatever
        SET_VRING_BASE said). RegionError when the region does not fit this queue or holds
        an impossible state (then nothing is tracked, nothing in the region is written and
        the ring keeps SET_VRING_BASE's position) or the ring is not configured."""
        self._detach_inflight()
        self._set_resubmit([])
        self._recovered = {}
        if view is None:
            return []
        rings = self._rings()
        if rings is None:
            raise RegionError(f"virtqueue {self.index}: inflight region attached to a ring "
                              "that is not configured")
        tracker = PackedInflight(view, self._size)
        if not tracker.attach(self.used_idx, self.used_wrap):
            self._tracker = tracker
            self._mirror_inflight(tracker, ())
            return []
        found = tracker.recover(rings[0])
        if (found.avail_idx, found.avail_wrap, found.used_idx, found.used_wrap) != (
                self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap):
            log.info("virtqueue %d: resuming from the inflight region at avail %d/%d, used "
                     "%d/%d (SET_VRING_BASE said avail %d/%d, used %d/%d)", self.index,
                     found.avail_idx, found.avail_wrap, found.used_idx, found.used_wrap,
                     self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap)
        self.used_idx, self.used_wrap = found.used_idx, found.used_wrap
        self.last_avail_idx, self.avail_wrap = found.avail_idx, found.avail_wrap
        self._bufs.clear()
        self._taken.clear()
        self._in_flight_slots = found.slots     # the resubmitted chains' slots, reserved
        self._used_advance = 0
        self._recovered = {chain.buf_id: chain for chain in found.chains}
        ids = [chain.buf_id for chain in found.chains]
        self._tracker = tracker
        self._set_resubmit(ids)
        self._mirror_inflight(tracker, found.chains)
        return ids

    def _mirror_inflight(self, tracker: PackedInflight, chains: Sequence[RecoveredChain]
                         ) -> None:
        """The compiled variant mirrors the region's state (attached, or just recovered
        with `chains` to serve again, in resubmit order) into C."""

    @property
    def inflight_tracked(self) -> bool:
        """Whether chains are tracked in an inflight region."""
        return self._tracker is not None

    @property
    def inflight_tracker(self) -> PackedInflight | None:
        """The region part this ring tracks its chains in (what a compiled ring mirrors)."""
        return self._tracker

    def _detach_inflight(self) -> None:
        self._tracker = None
        super()._detach_inflight()

    def _lose_tracking(self, exc: RegionError) -> None:
        """The region changed under the ring (only the front-end can do that): stop
        tracking, keep serving."""
        log.warning("virtqueue %d: inflight tracking stopped: %s", self.index, exc)
        self._tracker = None

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
        if self.resubmit_left:
            return True
        flags: int = _U16.unpack_from(rings[0], DESC_SIZE * self.last_avail_idx + _FLAGS_AT)[0]
        return _is_avail(flags, self.avail_wrap)

    def available(self) -> int:
        """How many chains the driver made available that were not popped yet, plus the
        chains left to resubmit (0 when the ring is not ready)."""
        rings = self._rings()
        return 0 if rings is None else self._scan(rings[0])[2] + self.resubmit_left

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` chains: those left to resubmit first, then available ones (stops
        early if the ring breaks). With a region attached each chain taken from the ring is
        recorded there before it is returned."""
        rings = self._rings()
        if rings is None or limit <= 0:
            return []
        desc, _driver, device = rings
        out = self._pop_resubmitted(limit)
        again = len(out)
        if again == limit or self.error is not None:
            self._took(out, again)
            return out
        tracker = self._tracker
        while len(out) < limit:
            idx, wrap = self.last_avail_idx, self.avail_wrap
            flags: int = _U16.unpack_from(desc, DESC_SIZE * idx + _FLAGS_AT)[0]
            if not _is_avail(flags, wrap):
                break
            try:
                chain, descs = self._walk(desc, idx)
            except _Broken as exc:
                self.fail(f"chain at descriptor {idx} (wrap {int(wrap)}): {exc}")
                break
            if tracker is not None:
                try:
                    tracker.popped(descs)
                except RegionError as exc:
                    self._lose_tracking(exc)
                    tracker = None
            out.append(chain)
            slots = len(descs)
            self._bufs[chain.head] = (slots, chain.writable, idx)
            self._in_flight_slots += slots
            self.last_avail_idx, self.avail_wrap = self._advance(idx, wrap, slots)
        if len(out) > again and self.event_idx and self._notify:
            # Keep kicks coming: ask for one when the driver makes the next descriptor available.
            _store_u16(device, _OFF_WRAP, self.last_avail_idx | self.avail_wrap << 15)
        self._took(out, again)
        return out

    def _pop_resubmitted(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` chains of the resubmit list, rebuilt from the region's copies (their
        ring slots were counted in flight at attach)."""
        out: list[DescriptorChain] = []
        while len(out) < limit and self._resubmit_pos < len(self._resubmit):
            buf_id = self._resubmit[self._resubmit_pos]
            recovered = self._recovered[buf_id]
            try:
                chain = self._build(recovered.descs, None)
            except _Broken as exc:
                self.fail(f"resubmitted chain of buffer id {buf_id}: {exc}")
                break
            self._bufs[buf_id] = (len(recovered.descs), chain.writable, -1)
            self._resubmit_pos += 1
            out.append(chain)
        return out

    def _walk(self, desc: memoryview, start: int) -> tuple[DescriptorChain, list[Descriptor]]:
        """The chain whose first descriptor is at ring slot `start`, and its ring
        descriptors as read (addr, len, id, flags): one per slot it uses."""
        size = self._size
        budget = size - self._in_flight_slots  # slots the driver may have made available
        descs: list[Descriptor] = []
        i = start
        while True:
            if len(descs) >= budget:
                if self._in_flight_slots:
                    raise _Broken(f"chain longer than the {budget} free descriptors "
                                  f"({self._in_flight_slots} in flight, size {size})")
                raise _Broken(f"descriptor loop: chain longer than size {size}")
            one: Descriptor = _PDESC.unpack_from(desc, DESC_SIZE * i)
            descs.append(one)
            flags = one[3]
            if flags & VIRTQ_DESC_F_INDIRECT or not flags & VIRTQ_DESC_F_NEXT:
                break
            i = i + 1 if i + 1 < size else 0
        chain = self._build(descs, start)
        buf_id = chain.head
        if buf_id >= size:
            raise _Broken(f"buffer id {buf_id} >= size {size}")
        if buf_id in self._bufs or buf_id in self._recovered:
            raise _Broken(f"buffer id {buf_id} reused while in flight")
        return chain, descs

    def _build(self, descs: Sequence[Descriptor], start: int | None) -> DescriptorChain:
        """The chain made of `descs` (ring descriptors, in order; at ring slots from
        `start`, or None for a resubmitted chain's copies), every buffer checked."""
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        lens = [0, 0]  # readable, writable bytes
        size = self._size
        for k, (addr, length, _id, flags) in enumerate(descs):
            where = (f"descriptor {(start + k) % size}" if start is not None
                     else f"descriptor {k} of {len(descs)}")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _Broken(f"{where} has both INDIRECT and NEXT (flags {flags:#x})")
                if k:
                    raise _Broken(f"indirect {where} after {k} direct ones")
                self._walk_indirect(addr, length, readable, writable, lens)
                break
            self._buffer(where, addr, length, flags, readable, writable, lens)
        return DescriptorChain(self.memory, descs[-1][2], readable, writable, lens[0], lens[1])

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
        if resubmitted:
            # Back to the resubmit list: its slots stay counted, the region is unchanged.
            if self._resubmit_pos:
                self._resubmit_pos -= 1
            return
        if self._tracker is not None:
            self._tracker.given_back(head)
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
        With a region attached the batch is linked there (and the region's used position
        moved) just before that store, and committed there after it.
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
        advanced = self._in_order_batch(items)
        if advanced:
            # One used descriptor for all: the last id, at the first chain's slot.
            first_at = DESC_SIZE * idx
            first_flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0
            _LEN_ID.pack_into(desc, first_at + 8, 0, items[-1][0])
            idx, wrap = self._advance(idx, wrap, advanced)
        for buf_id, length in items if not advanced else ():
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
        tracker = self._tracker
        if tracker is not None:
            ids = [buf_id for buf_id, _ in items]
            tracker.completing(ids, idx, wrap)
        # The driver polls the first element's flags: publish the batch with that store.
        _store_u16(desc, first_at + _FLAGS_AT, first_flags)
        if tracker is not None:
            tracker.completed(ids)
        if self._recovered:
            for buf_id, _ in items:
                self._recovered.pop(buf_id, None)
        start = self.used_idx
        self.used_idx, self.used_wrap = idx, wrap
        self._unsignalled += len(items)
        self._used_advance += advanced
        self._in_flight_slots -= advanced
        self._completed(items)
        written = [bufs.pop(buf_id)[1] for buf_id, _ in items]
        if self._log is not None:
            self._log_completed(written, start, advanced)

    def _in_order_batch(self, items: Sequence[tuple[int, int]]) -> int:
        """Under VIRTIO_F_IN_ORDER, with neither an inflight region nor a dirty log: the
        slots of a batch (two chains or more) that completes every chain in flight, in the
        order they were taken, with nothing written into any, which then goes out as one
        used descriptor (virtio 1.2 2.8.21: the driver counts the chains up to that id);
        else 0, and each chain gets its own."""
        if not self.in_order or len(items) < 2 or self._tracker is not None \
                or self._log is not None:
            return 0
        at, slots, size, bufs = self.used_idx, 0, self._size, self._bufs
        for buf_id, length in items:
            n, _, start = bufs[buf_id]
            if length or start != at:
                return 0
            slots += n
            at = (at + n) % size
        return slots if slots == self._in_flight_slots else 0

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
