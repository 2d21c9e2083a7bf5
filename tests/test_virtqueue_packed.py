"""Packed virtqueues (virtio 1.1+ 2.8), device side: chains, used descriptors, wrap counters,
event suppression, base encoding, hostile rings, and a seeded random run against a driver
model (`PackedDriver`, the packed counterpart of ringbuilder.RingBuilder)."""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from ringbuilder import anon_memory

import vhostpy.virtqueue_packed as packed_mod
from vhostpy.dirtylog import LOG_PAGE, DirtyLog
from vhostpy.errors import RingError
from vhostpy.inflight import RegionError, queue_region_size
from vhostpy.memory import ADDRESS_LIMIT, GuestMemory
from vhostpy.virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    vring_need_event,
)
from vhostpy.virtqueue_packed import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    PackedVirtqueue,
    packed_need_event,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
AVAIL, USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
ENABLE, DISABLE, DESC = RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC
SIZE = 8
OTHER_BASE = 0x80000  # where the second ring of a test lives (memory is 1 MiB at 0)

_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_U16 = struct.Struct("<H")


@dataclass
class PackedLayout:
    desc: int
    driver: int  # driver event suppression area
    device: int  # device event suppression area
    data: int
    data_end: int


def packed_layout(size: int, base: int = 0, data_size: int = 1 << 18) -> PackedLayout:
    desc = base
    driver = (desc + 16 * size + 15) & ~15
    device = driver + 16
    data = (device + 4 + 4095) & ~4095
    return PackedLayout(desc, driver, device, data, data + data_size)


class PackedDriver:
    """Driver side of one packed ring at a `PackedLayout` in `memory`.

    Chains go into consecutive slots with the driver's wrap counter; every descriptor but a
    chain's last carries a junk id (the buffer id is the last one's), and the first
    descriptor's flags are written last, as a driver must. Reading used descriptors frees
    the ids and the slots of their chains. The raw `write_desc` builds hostile rings.
    """

    def __init__(self, memory: GuestMemory, size: int, lay: PackedLayout) -> None:
        self.memory = memory
        self.size = size
        self.lay = lay
        self.next_avail = 0
        self.avail_wrap = True
        self.next_used = 0
        self.used_wrap = True
        self.num_free = size
        self.free_ids = list(range(size))
        self.chain_slots: dict[int, int] = {}
        #: VIRTIO_F_IN_ORDER: a used descriptor may stand for every chain made available
        #: before it too (`get_used` then reports those with length 0)
        self.in_order = False
        self._order: list[int] = []   # ids of add_chain's chains in flight, oldest first
        self._data = lay.data
        memory.write(lay.desc, bytes(16 * size))
        memory.write(lay.driver, bytes(4))
        memory.write(lay.device, bytes(4))

    def attach(self, vq: PackedVirtqueue, base: int | None = None) -> PackedVirtqueue:
        vq.set_size(self.size)
        if base is not None:
            vq.set_base(base)
            self.next_avail, self.avail_wrap = base & 0x7FFF, bool(base & 0x8000)
            used = base >> 16 or base & 0xFFFF
            self.next_used, self.used_wrap = used & 0x7FFF, bool(used & 0x8000)
        vq.set_addresses(self.lay.desc, self.lay.driver, self.lay.device)
        return vq

    def alloc(self, data: bytes | int) -> int:
        n = len(data) if isinstance(data, bytes) else data
        addr = self._data
        if addr + n > self.lay.data_end:
            addr = self._data = self.lay.data
        self._data = (addr + n + 15) & ~15
        self.memory.write(addr, data if isinstance(data, bytes) else bytes(n))
        return addr

    def avail_flags(self, wrap: bool | None = None) -> int:
        wrap = self.avail_wrap if wrap is None else wrap
        return AVAIL if wrap else USED

    def write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int,
                   table: int | None = None) -> None:
        base = self.lay.desc if table is None else table
        self.memory.write(base + 16 * slot, _DESC.pack(addr, length, buf_id, flags))

    def write_flags(self, slot: int, flags: int) -> None:
        self.memory.write(self.lay.desc + 16 * slot + 14, _U16.pack(flags))

    def _advance(self) -> None:
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail, self.avail_wrap = 0, not self.avail_wrap

    def add_raw(self, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """Make (addr, len, id, flags-without-AVAIL/USED) descriptors available in the
        next slots, first flags last; returns the first slot. Bookkeeps nothing."""
        first = self.next_avail
        first_flags = 0
        for k, (addr, length, buf_id, flags) in enumerate(descs):
            full = flags | self.avail_flags()
            self.write_desc(self.next_avail, addr, length, buf_id, 0 if k == 0 else full)
            if k == 0:
                first_flags = full
            self._advance()
        self.write_flags(first, first_flags)
        return first

    def add_chain(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
                  indirect: bool = False) -> tuple[int, list[int]]:
        """Add a chain of readable then writable buffers; returns (buffer id, addresses)."""
        bufs = [(self.alloc(d), len(d), 0) for d in readable]
        bufs += [(self.alloc(n), n, WRITE) for n in writable]
        assert bufs
        buf_id = self.free_ids.pop(0)
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (addr, n, flags) in enumerate(bufs):
                self.write_desc(k, addr, n, 0xBEEF, flags, table=table)  # NEXT not needed
            descs = [(table, 16 * len(bufs), buf_id, INDIRECT)]
        else:
            descs = [(addr, n, buf_id if k + 1 == len(bufs) else 0xBEEF,
                      flags | (NEXT if k + 1 < len(bufs) else 0))
                     for k, (addr, n, flags) in enumerate(bufs)]
        assert len(descs) <= self.num_free, "driver model: ring full"
        self.num_free -= len(descs)
        self.chain_slots[buf_id] = len(descs)
        self._order.append(buf_id)
        self.add_raw(descs)
        return buf_id, [b[0] for b in bufs]

    def get_used(self) -> list[tuple[int, int]]:
        """(id, len) of the used descriptors written since the last call."""
        out = []
        while self.num_free < self.size:
            at = self.lay.desc + 16 * self.next_used
            _addr, length, buf_id, flags = _DESC.unpack(self.memory.read(at, 16))
            if bool(flags & AVAIL) != self.used_wrap or bool(flags & USED) != self.used_wrap:
                break
            skipped: list[int] = []
            if self.in_order and buf_id in self._order:
                skipped = self._order[:self._order.index(buf_id)]
            for done, n in [*((k, 0) for k in skipped), (buf_id, length)]:
                out.append((done, n))
                if done in self._order:
                    self._order.remove(done)
                slots = self.chain_slots.pop(done)
                self.num_free += slots
                self.free_ids.append(done)
                self.next_used += slots
                if self.next_used >= self.size:
                    self.next_used -= self.size
                    self.used_wrap = not self.used_wrap
        return out

    # -------------------------------------------------------------- event areas

    def _u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.memory.read(gpa, 2))[0]
        return value

    @property
    def device_flags(self) -> int:
        return self._u16(self.lay.device + 2)

    @property
    def device_off_wrap(self) -> int:
        return self._u16(self.lay.device)

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self.memory.write(self.lay.driver, _U16.pack(off_wrap) + _U16.pack(flags))

    def arm_next_used(self) -> None:
        """EVENT_IDX: interrupt me when the next used descriptor I will read is written."""
        self.set_driver_event(DESC, self.next_used | self.used_wrap << 15)

    def position(self) -> tuple[int, bool]:
        return self.next_avail, self.avail_wrap

    def should_kick(self, old: tuple[int, bool]) -> bool:
        """What the driver decides after making slots old..now available."""
        flags = self.device_flags
        if flags == DISABLE:
            return False
        if flags != DESC:
            return True
        lap = 2 * self.size

        def frame(idx: int, wrap: bool) -> int:
            return idx + (0 if wrap else self.size)

        added = (frame(*self.position()) - frame(*old)) % lap
        off = self.device_off_wrap
        event = frame(off & 0x7FFF, bool(off >> 15))
        return (event - frame(*old)) % lap < added


@pytest.fixture
def mem() -> GuestMemory:
    memory, _buf = anon_memory(1 << 20)
    return memory


@pytest.fixture
def drv(mem: GuestMemory) -> PackedDriver:
    return PackedDriver(mem, SIZE, packed_layout(SIZE))


@pytest.fixture
def vq(mem: GuestMemory, drv: PackedDriver) -> PackedVirtqueue:
    return drv.attach(PackedVirtqueue(mem, 0))


def complete(vq: Virtqueue, chains: Sequence[DescriptorChain], length: int = 0) -> None:
    vq.add_used_many([(c.head, length) for c in chains])


# ------------------------------------------------------------------ configuration


def test_is_a_virtqueue_with_packed_parts(mem: GuestMemory) -> None:
    q = PackedVirtqueue(mem, 2)
    assert isinstance(q, Virtqueue) and q.part_lengths(5) == (80, 4, 4)
    assert [name for name, _ in q.RING_PARTS] == ["descriptor ring", "driver area",
                                                   "device area"]
    assert q.driver_depth() is None and q.base == 0x80008000


@pytest.mark.parametrize("size", [1, 3, 8, 100, 256, MAX_QUEUE_SIZE])
def test_any_size_up_to_32768(mem: GuestMemory, size: int) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_size(size)
    assert q.size == size


@pytest.mark.parametrize("size", [0, -1, MAX_QUEUE_SIZE + 1])
def test_set_size_refuses(mem: GuestMemory, size: int) -> None:
    q = PackedVirtqueue(mem, 0)
    with pytest.raises(RingError, match=f"size {size} is not in 1..32768"):
        q.set_size(size)


@pytest.mark.parametrize(
    ("desc", "driver", "device", "match"),
    [
        (0x8, 0x1000, 0x2000, "descriptor ring address 0x8"),
        (0x0, 0x1002, 0x2000, "driver area address 0x1002"),
        (0x0, 0x1000, 0x2001, "device area address 0x2001"),
        (0x100000 - 0x70, 0x1000, 0x2000, "descriptor ring at"),
        (0x0, 0x200000 - 4, 0x2000, "driver area at"),
        (0x0, 0x1000, 0x100000, "device area at"),
    ],
)
def test_set_addresses_refuses(mem: GuestMemory, desc: int, driver: int, device: int,
                               match: str) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_size(SIZE)
    with pytest.raises(RingError, match=match):
        q.set_addresses(desc, driver, device)
    assert not q.ready


def test_event_areas_need_only_4_byte_alignment(mem: GuestMemory) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_size(3)
    q.set_addresses(0x1000, 0x1034, 0x1038)
    assert q.ready


@pytest.mark.parametrize(
    ("value", "state"),
    [
        (0x80008000, (0, True, 0, True)),
        (0x8000, (0, True, 0, True)),            # only the avail half: used follows it
        (0x0005, (5, False, 5, False)),
        (0x00038005, (5, True, 3, False)),
        (0x80020006, (6, False, 2, True)),
        (0xFFFFFFFF & (7 | 1 << 15 | 1 << 16 | 1 << 31), (7, True, 1, True)),
    ],
)
def test_base_round_trip(mem: GuestMemory, value: int,
                         state: tuple[int, bool, int, bool]) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_size(SIZE)
    q.set_base(value)
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == state
    assert q.base == (state[0] | state[1] << 15 | state[2] << 16 | state[3] << 31)
    q.set_base(q.base)
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == state


@pytest.mark.parametrize("value", [-1, 1 << 32, 8, 0x8008, 0x00088000])
def test_set_base_refuses(mem: GuestMemory, value: int) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_size(SIZE)
    with pytest.raises(RingError, match="base"):
        q.set_base(value)


def test_size_must_hold_a_base_set_first(mem: GuestMemory) -> None:
    q = PackedVirtqueue(mem, 0)
    q.set_base(0x00058006)
    with pytest.raises(RingError, match="does not hold"):
        q.set_size(4)
    q.set_size(7)
    assert q.base == 0x00058006


def test_split_base_is_last_avail_idx(mem: GuestMemory) -> None:
    from vhostpy.virtqueue import PythonVirtqueue

    q = PythonVirtqueue(mem, 0)
    q.set_base(0x1234)
    assert q.base == 0x1234


def test_inflight_region_in_the_packed_layout(vq: PackedVirtqueue) -> None:
    """(tests/test_recovery_packed.py tests tracking and recovery in depth.)"""
    with pytest.raises(RegionError, match="needs"):
        vq.attach_inflight(memoryview(bytearray(queue_region_size(SIZE))))   # split-sized
    assert not vq.inflight_tracked
    assert vq.attach_inflight(memoryview(bytearray(queue_region_size(SIZE, packed=True)))) == []
    assert vq.inflight_tracked
    assert vq.attach_inflight(None) == [] and not vq.inflight_tracked


def test_not_configured_pops_nothing(mem: GuestMemory) -> None:
    q = PackedVirtqueue(mem, 0)
    assert q.pop() is None and not q.has_available() and q.available() == 0
    q.add_used_many([(0, 0)])  # dropped, no error
    assert q.enable_notifications() is False


# ------------------------------------------------------------------ chains


def test_single_and_multi_descriptor_chains(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    one, _ = drv.add_chain([b"hello"])
    three, addrs = drv.add_chain([b"ab", b"cd"], [6])
    assert vq.has_available() and vq.available() == 2
    a, b = vq.pop_many(4)
    assert (a.head, a.read(), a.writable_len) == (one, b"hello", 0)
    assert (b.head, b.read(), b.readable_len, b.writable) == (three, b"abcd", 4, [(addrs[2], 6)])
    assert b.write(b"xyzxyz") == 6 and drv.memory.read(addrs[2], 6) == b"xyzxyz"
    assert vq.last_avail_idx == 4 and vq.taken == (one, three)
    assert not vq.has_available() and vq.pop() is None
    complete(vq, [a, b], 0)
    assert drv.get_used() == [(one, 0), (three, 0)] and vq.used_idx == 4


@pytest.mark.parametrize(("flags", "available"),
                         [(AVAIL, True), (AVAIL | USED, False), (USED, False), (0, False)])
def test_availability_by_wrap_counter(drv: PackedDriver, vq: PackedVirtqueue, flags: int,
                                      available: bool) -> None:
    drv.write_desc(0, drv.alloc(1), 1, 0, flags)
    assert vq.has_available() is available and vq.available() == int(available)
    assert len(vq.pop_many(4)) == int(available) and vq.error is None
    vq.set_base(0x0000)                              # wrap 0: the meanings flip
    assert vq.has_available() is (flags == USED)


def test_buffer_id_is_the_last_descriptors(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    a = drv.alloc(4)
    drv.add_raw([(a, 4, 7, NEXT), (a, 4, 2, NEXT), (a, 4, 5, WRITE)])
    chain = vq.pop()
    assert chain is not None and chain.head == 5 and chain.readable_len == 8


def test_indirect_chain(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    buf_id, addrs = drv.add_chain([b"in", b"direct"], [3, 5], indirect=True)
    chain = vq.pop()
    assert chain is not None and chain.head == buf_id and chain.read() == b"indirect"
    assert chain.writable == [(addrs[2], 3), (addrs[3], 5)] and vq.last_avail_idx == 1
    vq.add_used(buf_id, 8)
    assert drv.get_used() == [(buf_id, 8)] and vq.used_idx == 1


def test_zero_length_and_full_ring_chain(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    drv.add_chain([b""] * SIZE)
    chain = vq.pop()
    assert chain is not None and len(chain.readable) == SIZE
    assert (vq.last_avail_idx, vq.avail_wrap) == (0, False)
    complete(vq, [chain])
    assert (vq.used_idx, vq.used_wrap) == (0, False) and len(drv.get_used()) == 1


@pytest.mark.parametrize("size", [1, 3, 8, 256])
def test_wrap_counters_over_many_rounds(mem: GuestMemory, size: int) -> None:
    drv = PackedDriver(mem, size, packed_layout(size))
    vq = drv.attach(PackedVirtqueue(mem, 0))
    rng = random.Random(size)
    wraps = 0
    for rnd in range(12 * max(1, 64 // size) if size < 256 else 12):
        batch = []
        while drv.num_free and len(batch) < size:
            n = min(rng.randint(1, 3), drv.num_free)
            data = bytes([rnd & 0xFF]) * 3
            batch.append(drv.add_chain([data] * n)[0])
        before = vq.avail_wrap
        chains = vq.pop_many(size)
        assert [c.head for c in chains] == batch
        wraps += vq.avail_wrap != before
        complete(vq, chains, 1)
        assert drv.get_used() == [(h, 1) for h in batch]
        assert (vq.used_idx, vq.used_wrap) == (vq.last_avail_idx, vq.avail_wrap)
        assert (vq.used_idx, vq.used_wrap) == (drv.next_avail, drv.avail_wrap)
    assert wraps >= 5


def test_out_of_order_completion_moves_by_descriptor_count(
        drv: PackedDriver, vq: PackedVirtqueue) -> None:
    a = drv.add_chain([b"a"] * 3)[0]
    b = drv.add_chain([b"b"])[0]
    c = drv.add_chain([b"c"] * 2)[0]
    chains = {ch.head: ch for ch in vq.pop_many(8)}
    vq.add_used(c, 0)                          # 2 descriptors: used index 0 -> 2
    assert vq.used_idx == 2
    vq.add_used_many([(b, 5), (a, 6)])           # 1 then 3: 2 -> 3 -> 6
    assert vq.used_idx == 6 and vq.taken == ()
    assert drv.get_used() == [(c, 0), (b, 5), (a, 6)]
    assert drv.num_free == SIZE and set(chains) == {a, b, c}
    # the slots come back in a different order than they went out: the next chains wrap
    d = drv.add_chain([b"d"] * 3)[0]
    chain = vq.pop()
    assert chain is not None and chain.head == d and chain.read() == b"ddd"
    assert (vq.last_avail_idx, vq.avail_wrap) == (1, False)


def test_batch_publication_first_flags_last(drv: PackedDriver, vq: PackedVirtqueue,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for n in (2, 1, 3):
        drv.add_chain([b"x"] * n)
    chains = vq.pop_many(8)
    stores: list[int] = []
    real = packed_mod._store_u16

    def spy(view: memoryview, offset: int, value: int) -> None:
        stores.append(offset)
        # until the last store, the driver sees nothing of the batch
        if len(stores) < 3:
            probe = PackedDriver.__new__(PackedDriver)
            probe.__dict__.update(drv.__dict__, chain_slots=dict(drv.chain_slots),
                                  free_ids=list(drv.free_ids))
            assert probe.get_used() == []
        real(view, offset, value)

    monkeypatch.setattr(packed_mod, "_store_u16", spy)
    vq.add_used_many([(c.head, k) for k, c in enumerate(reversed(chains))])
    assert stores == [16 * 3 + 14, 16 * 4 + 14, 16 * 0 + 14]  # slots 3 and 4, then slot 0
    assert drv.get_used() == [(chains[2].head, 0), (chains[1].head, 1), (chains[0].head, 2)]


def test_add_used_refuses(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    a = drv.add_chain([b"a"])[0]
    b = drv.add_chain([b"b"])[0]
    vq.pop_many(2)
    for items in ([(5, 0)], [(a, 0), (a, 0)], [(SIZE, 0)], [(a, 1 << 32)], [(b, -1)]):
        with pytest.raises(ValueError, match="add_used"):
            vq.add_used_many(items)
    assert drv.get_used() == [] and vq.taken == (a, b) and vq.used_idx == 0


def test_rewind_gives_chains_back(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    drv.add_chain([b"a"] * 2)
    vq.pop()
    heads = [drv.add_chain([bytes([k])] * 3)[0] for k in range(2)]
    # slots 2..4 and 5..7: the third chain would wrap; pop both and rewind
    chains = vq.pop_many(8)
    assert [c.head for c in chains] == heads and (vq.last_avail_idx, vq.avail_wrap) == (0, False)
    vq.rewind(2)
    assert (vq.last_avail_idx, vq.avail_wrap) == (2, True) and len(vq.taken) == 1
    assert [c.read() for c in vq.pop_many(8)] == [b"\0\0\0", b"\1\1\1"]
    vq.rewind(1)
    assert vq.last_avail_idx == 5 and vq.available() == 1
    again = vq.pop()
    assert again is not None and again.head == heads[1]


def test_rewind_across_the_wrap(mem: GuestMemory) -> None:
    drv = PackedDriver(mem, 3, packed_layout(3))
    vq = drv.attach(PackedVirtqueue(mem, 0), base=0x80028002)
    head = drv.add_chain([b"x", b"y"])[0]
    assert vq.pop() is not None and (vq.last_avail_idx, vq.avail_wrap) == (1, False)
    vq.rewind(1)
    assert (vq.last_avail_idx, vq.avail_wrap) == (2, True)
    chain = vq.pop()
    assert chain is not None and chain.head == head and chain.read() == b"xy"


def test_taken_reset_and_set_base_forget(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    heads = [drv.add_chain([b"q"])[0] for _ in range(3)]
    vq.pop_many(8)
    assert vq.taken == tuple(heads)
    vq.set_base(vq.base)
    assert vq.taken == () and vq.base == 0x80008003  # avail 3, used 0
    vq.set_base(0x80008000)
    assert [c.head for c in vq.pop_many(8)] == heads  # the same ids again: none in flight
    vq.reset()
    assert vq.base == 0x80008000 and not vq.ready and vq.available() == 0
    # configured again on a fresh ring: the ids the old one had in flight are free
    fresh = PackedDriver(drv.memory, SIZE, drv.lay)
    fresh.attach(vq)
    again = [fresh.add_chain([b"r"])[0] for _ in range(3)]
    assert again == heads and [c.head for c in vq.pop_many(8)] == heads
    vq.add_used_many([(h, 0) for h in heads])
    assert fresh.get_used() == [(h, 0) for h in heads] and vq.error is None


def test_memory_table_change(mem: GuestMemory, drv: PackedDriver, vq: PackedVirtqueue) -> None:
    drv.add_chain([b"a"])
    mem.clear()
    assert vq.pop() is None and vq.error is not None and "no longer mapped" in vq.error


# ------------------------------------------------------------------ notifications


def test_kick_suppression_flags(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    assert vq.enable_notifications() is False and drv.device_flags == ENABLE
    old = drv.position()
    drv.add_chain([b"a"])
    assert drv.should_kick(old)
    vq.disable_notifications()
    assert drv.device_flags == DISABLE
    old = drv.position()
    drv.add_chain([b"b"])
    assert not drv.should_kick(old)
    assert vq.enable_notifications() is True and drv.device_flags == ENABLE
    assert len(vq.pop_many(8)) == 2 and vq.enable_notifications() is False


def test_kicks_after_those_left_available(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    vq.event_idx = True
    drv.add_chain([b"a"] * 2)
    assert vq.enable_notifications(after_available=True) is False
    assert drv.device_off_wrap == 2 | 1 << 15 and drv.device_flags == DESC
    old = drv.position()
    drv.add_chain([b"b"])
    assert drv.should_kick(old)
    assert vq.enable_notifications(after_available=True) is False
    assert vq.enable_notifications() is True  # from last_avail_idx: there are some


def test_kick_suppression_event_idx_across_the_wrap(drv: PackedDriver,
                                                    vq: PackedVirtqueue) -> None:
    vq.event_idx = True
    for lap in range(3):
        wrap = lap % 2 == 0
        assert vq.enable_notifications() is False
        assert drv.device_off_wrap == vq.last_avail_idx | wrap << 15
        old = drv.position()
        drv.add_chain([b"a"] * 3)
        assert drv.should_kick(old)
        old = drv.position()
        drv.add_chain([b"b"] * 3)
        assert not drv.should_kick(old)          # the device has not caught up: no kick
        first, second = vq.pop_many(8)
        assert drv.device_off_wrap == 6 | wrap << 15  # pop keeps asking for the next
        old = drv.position()
        drv.add_chain([b"c"] * 2)                  # slots 6, 7: ends the lap
        assert drv.should_kick(old)
        vq.disable_notifications()
        third = vq.pop()
        assert third is not None and drv.device_flags == DISABLE
        assert (vq.last_avail_idx, vq.avail_wrap) == (0, not wrap)
        complete(vq, [first, second, third])
        drv.get_used()


def test_interrupt_flags_without_event_idx(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    assert not vq.decide_signal()                   # nothing published
    for flags, want in ((ENABLE, True), (DISABLE, False), (DESC, True), (3, True)):
        drv.set_driver_event(flags, 0x8000)
        drv.add_chain([b"a"])
        complete(vq, vq.pop_many(1))
        assert vq.needs_notification() is want
        assert vq.decide_signal() is want and vq.unsignalled == 0
        drv.get_used()


def test_event_idx_interrupts_across_the_wrap(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    vq.event_idx = True
    drv.arm_next_used()
    drv.add_chain([b"a"] * 3)
    complete(vq, vq.pop_many(1))
    assert vq.decide_signal()                       # the first decision always signals
    drv.get_used()
    # ask for an interrupt at slot 1 of the next lap (wrap 0): used index is 3 now
    drv.set_driver_event(DESC, 1)
    # used index: 3 -> 6 -> 7 -> 0 (wrap 0) -> 1 -> 2 (passes slot 1: yes) -> 4
    for n, want in ((3, False), (1, False), (1, False), (1, False), (1, True), (2, False)):
        drv.add_chain([b"b"] * n)
        complete(vq, vq.pop_many(1))
        assert vq.decide_signal() is want, (vq.used_idx, vq.used_wrap)
        drv.get_used()
    assert (vq.used_idx, vq.used_wrap) == (4, False)
    drv.set_driver_event(DISABLE)
    drv.add_chain([b"c"])
    complete(vq, vq.pop_many(1))
    assert not vq.decide_signal()


def test_event_idx_first_decision_after_set_base(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    vq.event_idx = True
    drv.set_driver_event(DESC, 5)                   # a position far from here
    drv.add_chain([b"a"])
    complete(vq, vq.pop_many(1))
    assert vq.decide_signal()
    drv.add_chain([b"b"])
    complete(vq, vq.pop_many(1))
    assert not vq.decide_signal()


def _reference_need_event(off_wrap: int, new: int, new_wrap: bool, old: int,
                          size: int) -> bool:
    """The spec's/Linux's packed rule, as the brief states it, for comparison."""
    event = off_wrap & 0x7FFF
    if bool(off_wrap >> 15) != new_wrap:
        event -= size
    if new <= old:
        old -= size
    return vring_need_event(event, new, old)


def test_packed_need_event_matches_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        size = rng.choice([1, 2, 3, 8, 100, 256, MAX_QUEUE_SIZE])
        new, new_wrap = rng.randrange(size), rng.random() < 0.5
        advanced = rng.randint(1, size)
        off_wrap = rng.randrange(size) | rng.randrange(2) << 15
        old = (new - advanced) % size
        assert packed_need_event(off_wrap, new, new_wrap, advanced, size) == \
            _reference_need_event(off_wrap, new, new_wrap, old, size), \
            (off_wrap, new, new_wrap, advanced, size)
    assert packed_need_event(0, 0, True, 16, 8)  # more than two laps: always


def test_fences_where_x86_reorders(drv: PackedDriver, vq: PackedVirtqueue,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fences: list[str] = []
    monkeypatch.setattr(packed_mod, "full_fence", lambda: fences.append("fence"))
    vq.enable_notifications()
    assert fences == ["fence"]
    drv.add_chain([b"a"])
    complete(vq, vq.pop_many(1))
    vq.needs_notification()
    assert fences == ["fence", "fence"]


# ------------------------------------------------------------------ dirty log


def test_dirty_log_marks_buffers_and_the_descriptor_ring(drv: PackedDriver,
                                                         vq: PackedVirtqueue) -> None:
    bitmap = bytearray(64)
    log = DirtyLog(memoryview(bitmap))
    vq.set_dirty_log(log, drv.lay.device)
    drv.add_chain([b"r"], [LOG_PAGE * 2])
    chain = vq.pop()
    assert chain is not None
    vq.add_used(chain.head, 4)
    (addr, n), = chain.writable
    pages = set(range(addr // LOG_PAGE, (addr + n - 1) // LOG_PAGE + 1)) | {drv.lay.desc // LOG_PAGE}
    assert set(log.dirty_pages()) == pages
    bitmap[:] = bytes(64)
    vq.log_used_ring()
    assert set(log.dirty_pages()) == {drv.lay.desc // LOG_PAGE, drv.lay.device // LOG_PAGE}


# ------------------------------------------------------------------ hostile rings


def _over_long(drv: PackedDriver) -> None:
    a = drv.alloc(1)
    drv.add_raw([(a, 1, 0, NEXT)] * (SIZE - 1))      # after one chain in flight: 7 free


def _into_the_slot_in_flight(drv: PackedDriver) -> None:
    # the whole ring says NEXT, including the in-flight chain's slot the driver rewrote
    a = drv.alloc(1)
    drv.add_raw([(a, 1, 0, NEXT)] * (SIZE - 1))
    drv.write_desc(0, a, 1, 0, NEXT | drv.avail_flags())


def _readable_after_writable(drv: PackedDriver) -> None:
    a = drv.alloc(4)
    drv.add_raw([(a, 4, 0, WRITE | NEXT), (a, 4, 0, NEXT), (a, 4, 1, WRITE)])


def _readable_after_writable_indirect(drv: PackedDriver) -> None:
    table, a = drv.alloc(32), drv.alloc(4)
    drv.write_desc(0, a, 4, 0, WRITE, table=table)
    drv.write_desc(1, a, 4, 0, 0, table=table)
    drv.add_raw([(table, 32, 1, INDIRECT)])


def _unmapped_buffer(drv: PackedDriver) -> None:
    drv.add_raw([(0x10_0000_0000, 16, 1, 0)])


def _buffer_past_region_end(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(1), 1, 0, NEXT), ((1 << 20) - 8, 16, 1, WRITE)])


def _addr_len_overflow(drv: PackedDriver) -> None:
    drv.add_raw([(ADDRESS_LIMIT - 4, 8, 1, 0)])


def _nested_indirect(drv: PackedDriver) -> None:
    inner, outer = drv.alloc(16), drv.alloc(16)
    drv.write_desc(0, drv.alloc(1), 1, 0, 0, table=inner)
    drv.write_desc(0, inner, 16, 0, INDIRECT, table=outer)
    drv.add_raw([(outer, 16, 1, INDIRECT)])


def _indirect_with_next(drv: PackedDriver) -> None:
    table = drv.alloc(16)
    drv.write_desc(0, drv.alloc(1), 1, 0, 0, table=table)
    drv.add_raw([(table, 16, 0, INDIRECT | NEXT), (drv.alloc(1), 1, 1, 0)])


def _indirect_after_direct(drv: PackedDriver) -> None:
    table = drv.alloc(16)
    drv.write_desc(0, drv.alloc(1), 1, 0, 0, table=table)
    drv.add_raw([(drv.alloc(1), 1, 0, NEXT), (table, 16, 1, INDIRECT)])


def _indirect_len(length: int) -> Callable[[PackedDriver], None]:
    def build(drv: PackedDriver) -> None:
        drv.add_raw([(drv.lay.data, length, 1, INDIRECT)])

    return build


def _indirect_unmapped(drv: PackedDriver) -> None:
    drv.add_raw([((1 << 20) - 16, 32, 1, INDIRECT)])


def _indirect_addr_overflow(drv: PackedDriver) -> None:
    drv.add_raw([(ADDRESS_LIMIT - 16, 32, 1, INDIRECT)])


def _total_length_overflow(drv: PackedDriver) -> None:
    n = 4097  # mapped descriptors of 1 MiB each (all the same memory): more than 2**32 bytes
    table = drv.alloc(16 * n)
    drv.memory.write(table, _DESC.pack(0, 1 << 20, 0, 0) * n)
    drv.add_raw([(table, 16 * n, 1, INDIRECT)])


def _id_out_of_range(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(1), 1, 0, NEXT), (drv.alloc(1), 1, SIZE, 0)])


def _id_reused(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(1), 1, 0, 0)])             # id 0 is the healthy chain's, in flight


HOSTILE = {
    "over-long-chain": (_over_long, "chain longer than the 7 free descriptors (1 in flight"),
    "into-the-slot-in-flight": (_into_the_slot_in_flight, "chain longer than the 7 free"),
    "readable-after-writable": (_readable_after_writable, "after a device-writable"),
    "readable-after-writable-indirect": (_readable_after_writable_indirect,
                                         "device-readable indirect descriptor 1"),
    "unmapped-buffer": (_unmapped_buffer, "0x1000000000"),
    "buffer-past-region-end": (_buffer_past_region_end, "descriptor 2 buffer"),
    "addr-len-overflow": (_addr_len_overflow, "overflows 64 bits"),
    "nested-indirect": (_nested_indirect, "nested indirect"),
    "indirect-with-next": (_indirect_with_next, "both INDIRECT and NEXT"),
    "indirect-after-direct": (_indirect_after_direct, "after 1 direct ones"),
    "indirect-len-0": (_indirect_len(0), "bad length 0x0"),
    "indirect-len-17": (_indirect_len(17), "bad length 0x11"),
    "indirect-len-huge": (_indirect_len(16 * (MAX_QUEUE_SIZE + 1)), "bad length 0x80010"),
    "indirect-unmapped": (_indirect_unmapped, "indirect table"),
    "indirect-addr-overflow": (_indirect_addr_overflow, "overflows 64 bits"),
    "total-length-overflow": (_total_length_overflow, "overflows 32 bits"),
    "id-out-of-range": (_id_out_of_range, f"buffer id {SIZE} >= size {SIZE}"),
    "id-reused-in-flight": (_id_reused, "buffer id 0 reused while in flight"),
}


def other_queue(mem: GuestMemory, index: int = 1) -> tuple[PackedDriver, PackedVirtqueue]:
    drv = PackedDriver(mem, SIZE, packed_layout(SIZE, OTHER_BASE, 0x10000))
    return drv, drv.attach(PackedVirtqueue(mem, index))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_ring(mem: GuestMemory, drv: PackedDriver, vq: PackedVirtqueue, case: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    build, reason = HOSTILE[case]
    drv2, vq2 = other_queue(mem)
    drv2.add_chain([b"before"])
    good = drv.add_chain([b"good"])[0]
    assert good == 0
    assert vq.pop() is not None  # a healthy chain first: the break is per chain
    build(drv)
    with caplog.at_level(logging.WARNING):
        assert vq.pop() is None
        assert vq.pop() is None and vq.pop_many(4) == []  # stays broken, logs once
        vq.fail("again")
    assert vq.error is not None and reason in vq.error, vq.error
    assert not vq.ready and vq.last_avail_idx == 1 and not vq.has_available()
    records = [r for r in caplog.records if r.name.startswith("vhostpy")]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert message.startswith("virtqueue 0: ring broken: chain at descriptor 1")
    assert reason in message
    vq.add_used(good, 4)  # completions for a broken queue are dropped, not written
    assert drv.get_used() == [] and not vq.signal_used()
    chain = vq2.pop()  # the other queue on the same memory goes on
    assert chain is not None and chain.read() == b"before" and vq2.error is None
    vq2.add_used(chain.head, 0)
    assert drv2.get_used() == [(chain.head, 0)]


def test_chain_longer_than_the_ring(drv: PackedDriver, vq: PackedVirtqueue) -> None:
    a = drv.alloc(1)
    drv.add_raw([(a, 1, 0, NEXT)] * SIZE)
    assert vq.pop_many(4) == [] and vq.error is not None
    assert "descriptor loop: chain longer than size 8" in vq.error


def test_available_descriptor_under_an_in_flight_one_is_refused(
        drv: PackedDriver, vq: PackedVirtqueue) -> None:
    """A driver rewriting the flags of a slot it handed over cannot make the device take
    more descriptors than the ring holds (the used index would overtake)."""
    heads = [drv.add_chain([b"x"] * 4)[0] for _ in range(2)]
    assert [c.head for c in vq.pop_many(8)] == heads
    drv.write_desc(0, drv.alloc(1), 1, 5, drv.avail_flags())  # slot 0 is in flight
    assert vq.pop() is None and vq.error is not None and "0 free descriptors" in vq.error


# ------------------------------------------------------------------ random run against the model


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_driver_and_device(mem: GuestMemory, seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([5, 16])
    drv = PackedDriver(mem, size, packed_layout(size))
    vq = drv.attach(PackedVirtqueue(mem, 0), base=rng.choice([0x8000, 0x00030003, 0x80028002]))
    vq.event_idx = event_idx = seed % 2 == 0
    expected: dict[int, tuple[bytes, int]] = {}   # id -> (readable bytes, writable length)
    published: list[int] = []                     # ids made available, not popped yet
    held: dict[int, DescriptorChain] = {}
    completed: list[tuple[int, int]] = []
    device_idle = False
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 and drv.num_free and drv.free_ids:
            n = rng.randint(1, 3)
            indirect = rng.random() < 0.2
            n = n if indirect else min(n, drv.num_free)
            readable = [rng.randbytes(rng.randint(0, 9)) for _ in range(rng.randint(0, n))]
            writable = [rng.randint(1, 9) for _ in range(n - len(readable))]
            old = drv.position()
            buf_id = drv.add_chain(readable, writable, indirect=indirect)[0]
            expected[buf_id] = (b"".join(readable), sum(writable))
            published.append(buf_id)
            kick = drv.should_kick(old)
            if device_idle:
                assert kick, "lost kick"
            device_idle = device_idle and not kick
        elif op < 0.6:
            device_idle = False
            got = vq.pop_many(rng.randint(1, 4))
            assert [c.head for c in got] == published[:len(got)]
            del published[:len(got)]
            for c in got:
                assert (c.read(), c.writable_len) == expected[c.head]
                held[c.head] = c
            if got and rng.random() < 0.2:
                k = rng.randint(1, len(got))
                vq.rewind(k)
                published[:0] = [c.head for c in got[-k:]]
                for c in got[-k:]:
                    del held[c.head]
        elif op < 0.85 and held:
            batch = rng.sample(sorted(held), rng.randint(1, len(held)))
            items = [(h, rng.randint(0, held[h].writable_len)) for h in batch]
            armed = event_idx and rng.random() < 0.5
            if armed:  # a driver re-arms after reading everything used
                assert drv.get_used() == completed
                completed.clear()
                drv.arm_next_used()
            else:  # DESC a lap away from the driver's position
                far = drv.next_used | (not drv.used_wrap) << 15
                drv.set_driver_event(rng.choice([ENABLE, DISABLE, DESC]), far)
            flags = drv._u16(drv.lay.driver + 2)
            vq.add_used_many(items)
            for h in batch:
                del held[h]
            completed += items
            signal = vq.decide_signal()
            if armed or flags == ENABLE:
                assert signal, "lost interrupt"
            if flags == DISABLE:
                assert not signal
        elif op < 0.95:
            assert drv.get_used() == completed
            completed.clear()
        else:
            device_idle = not vq.enable_notifications()
            if device_idle:
                assert vq.available() == 0 and not published
        assert vq.error is None
        assert set(vq.taken) == set(held)
    assert drv.get_used() == completed
