"""Split virtqueues: chains, used ring, notifications, and hostile rings."""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable

import pytest
from ringbuilder import CallRunner, Layout, RingBuilder, anon_memory, layout

from vhostpy.device import Device
from vhostpy.errors import GuestError, RingError
from vhostpy.memory import ADDRESS_LIMIT, GuestMemory
from vhostpy.notifier import CallbackNotifier
from vhostpy.virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PythonVirtqueue,
    Virtqueue,
    vring_need_event,
)
from vhostpy.vring import DefaultVirtqueue, Vring

SIZE = 8
OTHER_BASE = 0x80000  # where the second ring of a test lives (memory is 1 MiB at 0)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem() -> GuestMemory:
    memory, _buf = anon_memory(1 << 20)
    return memory


@pytest.fixture
def rb(mem: GuestMemory) -> RingBuilder:
    return RingBuilder(mem, SIZE, layout(SIZE))


#: Every variant of Virtqueue: the pure-Python reference and (when built) the compiled one.
VARIANTS = [PythonVirtqueue] + ([DefaultVirtqueue] if DefaultVirtqueue is not PythonVirtqueue
                                else [])


@pytest.fixture(params=VARIANTS, ids=lambda cls: cls.__name__)
def variant(request: pytest.FixtureRequest) -> type[Virtqueue]:
    cls: type[Virtqueue] = request.param
    return cls


@pytest.fixture
def vq(mem: GuestMemory, rb: RingBuilder, variant: type[Virtqueue]) -> Virtqueue:
    return rb.attach(variant(mem, 0))


def other_queue(mem: GuestMemory, index: int = 1) -> tuple[RingBuilder, Virtqueue]:
    rb = RingBuilder(mem, SIZE, layout(SIZE, OTHER_BASE, 0x10000))
    return rb, rb.attach(DefaultVirtqueue(mem, index))


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("size", [0, 3, 6, 100, MAX_QUEUE_SIZE * 2, -1, 65536])
def test_set_size_refuses(mem: GuestMemory, size: int) -> None:
    q = DefaultVirtqueue(mem, 3)
    with pytest.raises(RingError, match=f"size {size}"):
        q.set_size(size)
    assert q.size == 0 and not q.ready


def test_set_size_accepts_powers_of_two(mem: GuestMemory) -> None:
    q = DefaultVirtqueue(mem, 0)
    for n in (1, 2, 256, MAX_QUEUE_SIZE):
        q.set_size(n)
        assert q.size == n


@pytest.mark.parametrize(
    ("desc", "avail", "used", "match"),
    [
        (0x8, 0x1000, 0x2000, "descriptor table address 0x8"),
        (0x0, 0x1001, 0x2000, "avail ring address 0x1001"),
        (0x0, 0x1000, 0x2002, "used ring address 0x2002"),
        (0x200000, 0x1000, 0x2000, "descriptor table at 0x200000"),
        (0x100000 - 0x70, 0x1000, 0x2000, "descriptor table"),  # last 16 bytes unmapped
        (0x0, 0x100000 - 16, 0x2000, "avail ring"),  # 6 + 2*8 = 22 bytes needed
        (0x0, 0x1000, 0x100000 - 64, "used ring"),  # 6 + 8*8 = 70 bytes needed
        (0x0, 0x1000, ADDRESS_LIMIT, "used ring"),
    ],
)
def test_set_addresses_refuses(
    mem: GuestMemory, desc: int, avail: int, used: int, match: str
) -> None:
    q = DefaultVirtqueue(mem, 0)
    q.set_size(SIZE)
    with pytest.raises(RingError, match=match):
        q.set_addresses(desc, avail, used)
    assert not q.ready


def test_size_after_addresses_rechecks(mem: GuestMemory) -> None:
    q = DefaultVirtqueue(mem, 0)
    q.set_addresses(0x100000 - 0x100, 0x1000, 0x2000)  # size unknown yet: alignment only
    with pytest.raises(RingError, match="descriptor table"):
        q.set_size(32)  # 512 bytes of table do not fit


def test_ring_spanning_two_regions_refused() -> None:
    mem = GuestMemory()
    mem.add_buffer(bytearray(0x1000), 0)
    mem.add_buffer(bytearray(0x1000), 0x1000)
    q = DefaultVirtqueue(mem, 0)
    q.set_size(16)
    with pytest.raises(RingError, match="inside one mapped region"):
        q.set_addresses(0x0F80, 0x1100, 0x1200)


def test_not_configured_pops_nothing(mem: GuestMemory) -> None:
    q = DefaultVirtqueue(mem, 0)
    assert not q.ready and q.pop() is None and q.pop_many(4) == [] and not q.has_available()
    q.add_used(0, 0)  # dropped, no error
    assert not q.signal_used()


# ------------------------------------------------------------------ chains


def test_direct_chain(rb: RingBuilder, vq: Virtqueue) -> None:
    assert vq.ready and not vq.has_available() and vq.pop() is None
    head, addrs = rb.add_chain([b"hello ", b"world"], [4, 8])
    assert vq.has_available()
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [(addrs[0], 6), (addrs[1], 5)]
    assert chain.writable == [(addrs[2], 4), (addrs[3], 8)]
    assert (chain.readable_len, chain.writable_len) == (11, 12)
    assert chain.read() == b"hello world"
    assert chain.read(4, 4) == b"o wo"
    assert chain.read(6) == b"world"
    assert chain.read(10, 100) == b"d" and chain.read(11) == b"" and chain.read(3, 0) == b""
    assert b"".join(v.tobytes() for v in chain.readable_views()) == b"hello world"
    assert chain.write(b"ABCDEFGHIJKLMNOP") == 12
    assert rb.memory.read(addrs[2], 4) == b"ABCD" and rb.memory.read(addrs[3], 8) == b"EFGHIJKL"
    assert chain.write(b"xy", offset=3) == 2
    assert rb.memory.read(addrs[2], 4) == b"ABCx" and rb.memory.read(addrs[3], 1) == b"y"
    assert chain.write(b"z", offset=12) == 0
    assert sum(v.nbytes for v in chain.writable_views()) == 12
    assert vq.pop() is None and vq.last_avail_idx == 1
    vq.add_used(chain.head, 12)
    assert rb.get_used() == [(head, 12)] and vq.used_idx == 1 == rb.used_idx


def test_indirect_chain(rb: RingBuilder, vq: Virtqueue) -> None:
    head, addrs = rb.add_chain([b"req"], [16, 1], indirect=True)
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [(addrs[0], 3)] and chain.writable == [(addrs[1], 16), (addrs[2], 1)]
    assert chain.read() == b"req"


def test_direct_then_indirect(rb: RingBuilder, vq: Virtqueue) -> None:
    a = rb.alloc(b"hdr")
    b = rb.alloc(b"body")
    table = rb.alloc(32)
    rb.write_desc(0, b, 4, NEXT, 1, table=table)
    rb.write_desc(1, rb.alloc(2), 2, WRITE, table=table)
    rb.write_desc(5, a, 3, NEXT, 6)
    rb.write_desc(6, table, 32, INDIRECT)
    rb.publish(5)
    chain = vq.pop()
    assert chain is not None and chain.read() == b"hdrbody" and chain.writable_len == 2


def test_zero_length_descriptor_is_legal(rb: RingBuilder, vq: Virtqueue) -> None:
    rb.write_desc(0, 0xDEAD_0000_0000, 0, NEXT, 1)  # unmapped, but nothing to access
    rb.write_desc(1, rb.alloc(4), 4, WRITE)
    rb.publish(0)
    chain = vq.pop()
    assert chain is not None and chain.readable_len == 0 and chain.read() == b""
    assert vq.error is None


def test_chain_of_exactly_size_descriptors(rb: RingBuilder, vq: Virtqueue) -> None:
    for i in range(SIZE):
        rb.write_desc(i, rb.alloc(1), 1, NEXT if i + 1 < SIZE else 0, i + 1)
    rb.publish(0)
    chain = vq.pop()
    assert chain is not None and chain.readable_len == SIZE


def test_buffer_spanning_regions() -> None:
    mem, _ = anon_memory(0x10000, 0)
    second = mmap.mmap(-1, 0x1000)
    mem.add_buffer(second, 0x10000)
    rb = RingBuilder(mem, 4, layout(4, 0, 0x1000))
    q = rb.attach(DefaultVirtqueue(mem, 0))
    rb.write_desc(0, 0x10000 - 3, 6, 0)
    mem.write(0x10000 - 3, b"abcdef")
    rb.publish(0)
    chain = q.pop()
    assert chain is not None and chain.read() == b"abcdef" and len(chain.readable_views()) == 2


def test_pop_many_and_batch_used(rb: RingBuilder, vq: Virtqueue) -> None:
    heads = [rb.add_chain([bytes([i])])[0] for i in range(5)]
    chains = vq.pop_many(3)
    assert [c.head for c in chains] == heads[:3]
    assert [c.read() for c in chains] == [b"\0", b"\1", b"\2"]
    chains += vq.pop_many(10)
    assert [c.head for c in chains] == heads and vq.pop_many(10) == []
    vq.add_used_many([(c.head, 1) for c in chains])
    assert rb.used_idx == 5 and rb.get_used() == [(h, 1) for h in heads]
    vq.add_used_many([])
    assert rb.used_idx == 5


def test_add_used_rejects_bad_values(vq: Virtqueue) -> None:
    for head, length in [(SIZE, 0), (-1, 0), (0, -1), (0, 1 << 32)]:
        with pytest.raises(ValueError):
            vq.add_used(head, length)
    assert vq.used_idx == 0


@pytest.mark.parametrize("base", [65530, 65535, 0xFFF8])
def test_index_wraparound(rb: RingBuilder, vq: Virtqueue, base: int) -> None:
    rb.set_base(base)
    vq.set_base(base)
    assert vq.last_avail_idx == base == vq.used_idx
    seen = []
    for round_ in range(3):
        heads = [rb.add_chain([bytes([round_, k])])[0] for k in range(SIZE)]
        assert vq.has_available()
        chains = vq.pop_many(SIZE + 1)
        assert [c.head for c in chains] == heads
        assert [c.read() for c in chains] == [bytes([round_, k]) for k in range(SIZE)]
        for c in chains:
            vq.add_used(c.head, 0)
        seen += rb.get_used()
    assert len(seen) == 3 * SIZE
    assert vq.last_avail_idx == (base + 3 * SIZE) & 0xFFFF == vq.used_idx == rb.used_idx
    assert vq.error is None


def test_set_base_out_of_range(vq: Virtqueue) -> None:
    with pytest.raises(RingError, match="65536"):
        vq.set_base(65536)


def test_reset_forgets_everything(rb: RingBuilder, vq: Virtqueue) -> None:
    rb.set_avail_idx(SIZE + 1)
    assert vq.pop() is None
    assert vq.error is not None
    vq.reset()
    assert (vq.size, vq.desc_addr, vq.last_avail_idx, vq.used_idx) == (0, 0, 0, 0)
    assert vq.error is None
    assert not vq.ready
    rb.set_base(0)
    rb.attach(vq)
    rb.add_chain([b"x"])
    assert vq.pop() is not None


def test_memory_table_change(mem: GuestMemory, rb: RingBuilder, vq: Virtqueue) -> None:
    rb.add_chain([b"one"])
    assert vq.pop() is not None
    rb.add_chain([b"two"])
    mem.clear()
    assert vq.pop() is None and vq.error is not None and "no longer mapped" in vq.error


# ------------------------------------------------------------------ notifications


def add_and_complete(rb: RingBuilder, vq: Virtqueue, n: int) -> None:
    for _ in range(n):
        rb.add_chain([b"."])
    for chain in vq.pop_many(n):
        vq.add_used(chain.head, 0)


def test_vring_need_event() -> None:
    assert vring_need_event(5, 6, 5)
    assert not vring_need_event(6, 6, 5)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not vring_need_event(2, 1, 0xFFFE)
    assert not vring_need_event(7, 7, 7)


def test_interrupt_flags_without_event_idx(rb: RingBuilder, vq: Virtqueue) -> None:
    calls: list[int] = []
    assert not vq.needs_notification()  # nothing added yet
    add_and_complete(rb, vq, 1)
    assert vq.needs_notification()
    assert not vq.signal_used()  # no call installed: the entry stays pending
    CallRunner(vq, lambda: calls.append(1))
    assert vq.signal_used() and calls == [1]
    assert not vq.needs_notification() and not vq.signal_used()  # nothing new
    rb.set_no_interrupt(True)
    add_and_complete(rb, vq, 2)
    assert not vq.needs_notification() and not vq.signal_used() and calls == [1]
    rb.set_no_interrupt(False)
    add_and_complete(rb, vq, 1)
    assert vq.signal_used() and calls == [1, 1]


@pytest.mark.parametrize(
    ("base", "event_offset", "added", "expected"),
    [
        (0, 0, 1, True),  # driver wants a notification at the very next entry
        (0, 3, 1, False),  # ... only after the 4th entry
        (0, 3, 3, False),
        (0, 3, 4, True),
        (0, -1, 4, False),  # event behind the window: already passed
        (65534, 1, 3, True),  # window 65534..0 wraps and includes 65535
        (65534, 3, 3, False),  # event 1 is just outside [65534, 1)
        (65534, 2, 3, True),  # event 0 is the last entry of the window
    ],
)
def test_event_idx_used_notification(
    rb: RingBuilder, vq: Virtqueue, base: int, event_offset: int, added: int, expected: bool
) -> None:
    calls: list[int] = []
    vq.event_idx = True
    CallRunner(vq, lambda: calls.append(1))
    rb.set_base(base)
    vq.set_base(base)
    # first signal after set_base is unconditional: establish the "last signalled" mark
    add_and_complete(rb, vq, 1)
    assert vq.signal_used() and calls == [1]
    old = vq.used_idx
    rb.set_used_event(old + event_offset)
    add_and_complete(rb, vq, added)
    assert vq.needs_notification() is expected
    assert vq.signal_used() is expected
    assert not vq.needs_notification()  # the window was consumed either way


def test_event_idx_windows_are_consumed(rb: RingBuilder, vq: Virtqueue) -> None:
    calls: list[int] = []
    vq.event_idx = True
    CallRunner(vq, lambda: calls.append(1))
    add_and_complete(rb, vq, 1)
    vq.signal_used()
    rb.set_used_event(3)  # the driver wants an interrupt once used->idx passes 3
    add_and_complete(rb, vq, 1)  # used idx 2: window [1, 2)
    assert not vq.signal_used()
    add_and_complete(rb, vq, 1)  # [2, 3)
    assert not vq.signal_used()
    add_and_complete(rb, vq, 2)  # [3, 5) contains 3
    assert vq.signal_used() and len(calls) == 2
    add_and_complete(rb, vq, 2)  # [5, 7): event 3 is behind
    assert not vq.signal_used() and len(calls) == 2


def test_held_signals_wait_for_one_decision_over_the_whole_window(
        rb: RingBuilder, vq: Virtqueue) -> None:
    """A runner holding interrupts (coalescing): no decision while held, entries stay
    pending, and the one decision after it covers them all, EVENT_IDX window included."""
    calls: list[int] = []
    vq.event_idx = True
    ring = Vring(Device(), vq)
    ring.set_call(CallbackNotifier(lambda: calls.append(1)))
    add_and_complete(rb, vq, 1)
    assert vq.signal_used() and calls == [1]
    rb.set_used_event(vq.used_idx)   # the driver consumed entry 0; wants the next one
    ring.hold_interrupts()
    for k in range(1, 4):
        add_and_complete(rb, vq, 1)
        assert not vq.signal_used() and vq.unsignalled == k and calls == [1]
    ring.release_interrupts()
    assert calls == [1, 1]   # one interrupt for the three held
    assert vq.unsignalled == 0
    # Held entries the driver did not ask about (used_event behind them) stay quiet.
    ring.hold_interrupts()
    add_and_complete(rb, vq, 2)
    ring.release_interrupts()
    assert calls == [1, 1] and vq.unsignalled == 0
    ring.reset()
    assert vq.signal_target() == (0, -1)   # no call endpoint after a reset


def test_kick_suppression_flags(rb: RingBuilder, vq: Virtqueue) -> None:
    assert not rb.no_notify
    vq.disable_notifications()
    assert rb.no_notify
    old = rb.avail_idx
    rb.add_chain([b"a"])
    assert not rb.should_kick(old, event_idx=False)
    assert vq.enable_notifications() is True  # arrived while disabled: caller must re-poll
    assert not rb.no_notify
    assert vq.pop() is not None
    assert vq.enable_notifications() is False
    old = rb.avail_idx
    rb.add_chain([b"b"])
    assert rb.should_kick(old, event_idx=False)


@pytest.mark.parametrize("event_idx", [True, False])
def test_kicks_for_entries_after_those_left_available(rb: RingBuilder, vq: Virtqueue,
                                                      event_idx: bool) -> None:
    """A device leaving available entries unused (receive buffers too few for a waiting
    frame) asks for a kick on the next entry the driver adds, not on those already there."""
    vq.event_idx = event_idx
    for _ in range(3):
        rb.add_chain(writable=[64])
    assert vq.pop() is not None
    assert vq.enable_notifications(after_available=True) is False   # none added since
    if event_idx:
        assert rb.avail_event == rb.avail_idx == 3
    old = rb.avail_idx
    rb.add_chain(writable=[64])
    assert rb.should_kick(old, event_idx=event_idx)
    # Added before the device asked: it is told so (it must look again).
    rb.add_chain(writable=[64])
    assert vq.enable_notifications() is True                      # 4 entries left unused
    assert vq.enable_notifications(after_available=True) is False
    assert vq.last_avail_idx == 1 and len(vq.pop_many(8)) == 4


def test_kick_suppression_event_idx(rb: RingBuilder, vq: Virtqueue) -> None:
    vq.event_idx = True
    assert vq.enable_notifications() is False and rb.avail_event == 0
    old = rb.avail_idx
    rb.add_chain([b"a"])
    assert rb.should_kick(old, event_idx=True)  # entry 0 is the one we asked for
    old = rb.avail_idx
    rb.add_chain([b"b"])
    assert not rb.should_kick(old, event_idx=True)  # device has not caught up: no kick
    popped = vq.pop_many(4)
    assert len(popped) == 2
    assert rb.avail_event == 2  # pop keeps asking for the next entry
    old = rb.avail_idx
    rb.add_chain([b"c"])
    assert rb.should_kick(old, event_idx=True)
    vq.disable_notifications()
    third = vq.pop()
    assert third is not None
    vq.add_used_many([(c.head, 0) for c in [*popped, third]])
    for _ in range(5):  # whatever the driver publishes now, it does not kick
        old = rb.avail_idx
        rb.add_chain([b"d"])
        assert not rb.should_kick(old, event_idx=True)
    assert rb.avail_event != vq.last_avail_idx
    assert vq.enable_notifications() is True
    assert rb.avail_event == vq.last_avail_idx
    popped = vq.pop_many(8)
    assert len(popped) == 5 and vq.enable_notifications() is False
    vq.add_used_many([(c.head, 0) for c in popped])
    old = rb.avail_idx
    rb.add_chain([b"e"])
    assert rb.should_kick(old, event_idx=True)
    assert not rb.no_notify  # flags are not used under EVENT_IDX


# ------------------------------------------------------------------ hostile rings


def _avail_too_far(rb: RingBuilder) -> None:
    rb.add_chain([b"x"], publish=False)
    rb.set_avail_idx(rb.avail_idx + SIZE + 1)


def _head_out_of_range(rb: RingBuilder) -> None:
    rb.publish(SIZE)


def _loop_two(rb: RingBuilder) -> None:
    rb.write_desc(0, rb.alloc(1), 1, NEXT, 1)
    rb.write_desc(1, rb.alloc(1), 1, NEXT, 0)
    rb.publish(0)


def _self_loop(rb: RingBuilder) -> None:
    rb.write_desc(3, rb.alloc(1), 1, NEXT, 3)
    rb.publish(3)


def _next_out_of_range(rb: RingBuilder) -> None:
    rb.write_desc(0, rb.alloc(1), 1, NEXT, SIZE + 3)
    rb.publish(0)


def _indirect_loop(rb: RingBuilder) -> None:
    table = rb.alloc(32)
    rb.write_desc(0, rb.alloc(1), 1, NEXT, 1, table=table)
    rb.write_desc(1, rb.alloc(1), 1, NEXT, 0, table=table)
    rb.write_desc(0, table, 32, INDIRECT)
    rb.publish(0)


def _indirect_next_out_of_range(rb: RingBuilder) -> None:
    table = rb.alloc(32)
    rb.write_desc(0, rb.alloc(1), 1, NEXT, 2, table=table)
    rb.write_desc(0, table, 32, INDIRECT)
    rb.publish(0)


def _unmapped_buffer(rb: RingBuilder) -> None:
    rb.write_desc(0, 0x10_0000_0000, 16, 0)
    rb.publish(0)


def _buffer_past_region_end(rb: RingBuilder) -> None:
    rb.write_desc(0, rb.alloc(1), 1, NEXT, 1)
    rb.write_desc(1, (1 << 20) - 8, 16, WRITE)
    rb.publish(0)


def _addr_len_overflow(rb: RingBuilder) -> None:
    rb.write_desc(0, ADDRESS_LIMIT - 4, 8, 0)
    rb.publish(0)


def _nested_indirect(rb: RingBuilder) -> None:
    inner = rb.alloc(16)
    rb.write_desc(0, rb.alloc(1), 1, 0, table=inner)
    outer = rb.alloc(16)
    rb.write_desc(0, inner, 16, INDIRECT, table=outer)
    rb.write_desc(0, outer, 16, INDIRECT)
    rb.publish(0)


def _indirect_with_next(rb: RingBuilder) -> None:
    table = rb.alloc(16)
    rb.write_desc(0, rb.alloc(1), 1, 0, table=table)
    rb.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    rb.write_desc(1, rb.alloc(1), 1, 0)
    rb.publish(0)


def _indirect_len(length: int) -> Callable[[RingBuilder], None]:
    def build(rb: RingBuilder) -> None:
        rb.write_desc(0, rb.lay.data, length, INDIRECT)
        rb.publish(0)

    return build


def _indirect_unmapped(rb: RingBuilder) -> None:
    rb.write_desc(0, (1 << 20) - 16, 32, INDIRECT)
    rb.publish(0)


def _readable_after_writable(rb: RingBuilder) -> None:
    rb.write_desc(0, rb.alloc(4), 4, WRITE | NEXT, 1)
    rb.write_desc(1, rb.alloc(4), 4, NEXT, 2)
    rb.write_desc(2, rb.alloc(4), 4, WRITE)
    rb.publish(0)


def _readable_after_writable_indirect(rb: RingBuilder) -> None:
    table = rb.alloc(32)
    rb.write_desc(0, rb.alloc(4), 4, WRITE | NEXT, 1, table=table)
    rb.write_desc(1, rb.alloc(4), 4, 0, table=table)
    rb.write_desc(0, table, 32, INDIRECT)
    rb.publish(0)


def _total_length_overflow(rb: RingBuilder) -> None:
    # 4097 mapped descriptors of 1 MiB each (all the same memory): more than 2**32 bytes.
    n = 4097
    table = rb.alloc(16 * n)
    rb.memory.write(
        table,
        b"".join(
            (0).to_bytes(8, "little")
            + (1 << 20).to_bytes(4, "little")
            + NEXT.to_bytes(2, "little")
            + (k + 1).to_bytes(2, "little")
            for k in range(n)
        ),
    )
    rb.write_desc(0, table, 16 * n, INDIRECT)
    rb.publish(0)


HOSTILE = {
    "avail-too-far": (_avail_too_far, "9 ahead of last_avail_idx 1"),
    "head-out-of-range": (_head_out_of_range, f"head index {SIZE} >= size {SIZE}"),
    "loop": (_loop_two, "descriptor loop"),
    "self-loop": (_self_loop, "descriptor loop"),
    "next-out-of-range": (_next_out_of_range, f"next index {SIZE + 3}"),
    "indirect-loop": (_indirect_loop, "longer than indirect table of 2"),
    "indirect-next-out-of-range": (_indirect_next_out_of_range, "next index 2 >= indirect"),
    "unmapped-buffer": (_unmapped_buffer, "0x1000000000"),
    "buffer-past-region-end": (_buffer_past_region_end, "descriptor 1 buffer"),
    "addr-len-overflow": (_addr_len_overflow, "overflows 64 bits"),
    "nested-indirect": (_nested_indirect, "nested indirect"),
    "indirect-with-next": (_indirect_with_next, "both INDIRECT and NEXT"),
    "indirect-len-0": (_indirect_len(0), "bad length 0x0"),
    "indirect-len-17": (_indirect_len(17), "bad length 0x11"),
    "indirect-len-huge": (_indirect_len(16 * (MAX_QUEUE_SIZE + 1)), "bad length 0x80010"),
    "indirect-unmapped": (_indirect_unmapped, "indirect table"),
    "readable-after-writable": (_readable_after_writable, "after a device-writable"),
    "readable-after-writable-indirect": (_readable_after_writable_indirect, "device-writable"),
    "total-length-overflow": (_total_length_overflow, "overflows 32 bits"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_ring(
    mem: GuestMemory, rb: RingBuilder, vq: Virtqueue, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, reason = HOSTILE[case]
    rb2, vq2 = other_queue(mem)
    rb2.add_chain([b"before"])
    good = rb.add_chain([b"good"])[0]
    assert vq.pop() is not None  # a healthy chain first: the break is per chain, not at start
    build(rb)
    with caplog.at_level(logging.WARNING, logger="vhostpy.virtqueue"):
        assert vq.pop() is None
        assert vq.pop() is None and vq.pop_many(4) == []  # stays broken, logs once
        vq.fail("again")
    assert vq.error is not None and reason in vq.error, vq.error
    assert not vq.ready and vq.last_avail_idx == 1
    records = [r for r in caplog.records if r.name == "vhostpy.virtqueue"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert message.startswith("virtqueue 0:") and reason in message
    # completions for a broken queue are dropped, not written
    used_before = rb.used_idx
    vq.add_used(good, 4)
    assert rb.used_idx == used_before and not vq.signal_used()
    # the other queue on the same memory goes on
    chain = vq2.pop()
    assert chain is not None and chain.read() == b"before" and vq2.error is None
    vq2.add_used(chain.head, 0)
    assert rb2.get_used() == [(chain.head, 0)]


def test_ring_error_is_guest_error() -> None:
    assert issubclass(RingError, GuestError)


def test_layout_helper_is_sane() -> None:
    lay = layout(SIZE)
    assert isinstance(lay, Layout) and lay.desc % 16 == 0 and lay.avail % 2 == 0
    assert lay.used % 4 == 0 and lay.data >= lay.used + 6 + 8 * SIZE


def test_pure_python_ring_fences_where_x86_reorders(
        rb: RingBuilder, mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store -> load ordering: asking for kicks then re-reading avail->idx, and publishing
    used->idx then reading used_event / flags, each have a full fence between them."""
    import vhostpy.virtqueue as vqmod

    fences: list[str] = []
    monkeypatch.setattr(vqmod, "full_fence", lambda: fences.append("fence"))
    vq = rb.attach(PythonVirtqueue(mem, 0))
    vq.enable_notifications()
    assert fences == ["fence"]
    add_and_complete(rb, vq, 1)
    vq.needs_notification()
    assert fences == ["fence", "fence"]


def test_pure_python_ring_refuses_architectures_it_cannot_fence() -> None:
    from vhostpy.virtqueue import check_fence_support

    for machine in ("x86_64", "aarch64", "AMD64"):
        check_fence_support(machine)
    for machine in ("riscv64", "ppc64le", "s390x", "armv7l"):
        with pytest.raises(RingError, match=f"cannot order its stores and loads on {machine}"):
            check_fence_support(machine)


@pytest.mark.parametrize("machine", ["i386", "i486", "i586", "i686"])
def test_pure_python_ring_runs_on_32_bit_x86(machine: str, mem: GuestMemory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A real Linux 3.11 i386 lguest host reports "i686"; x86-32 orders memory as x86-64 does
    # and its lock is a locked read-modify-write, so the fence holds there too.
    import platform

    from vhostpy.virtqueue import check_fence_support

    check_fence_support(machine)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert PythonVirtqueue(mem, 0).index == 0


def test_the_abstract_ring_is_not_a_variant(mem: GuestMemory) -> None:
    with pytest.raises(TypeError, match="abstract"):
        Virtqueue(mem, 0)  # type: ignore[abstract]


def test_taken_follows_pops_completions_rewinds_and_resets(
        rb: RingBuilder, vq: Virtqueue) -> None:
    heads = [rb.add_chain([bytes([k])], [4])[0] for k in range(3)]
    assert vq.taken == ()
    chains = vq.pop_many(8)
    assert vq.taken == tuple(heads) == tuple(c.head for c in chains)
    vq.rewind(1)                                   # the last chain goes back unused
    assert vq.taken == (heads[0], heads[1])
    assert [c.head for c in vq.pop_many(8)] == [heads[2]]
    vq.add_used_many([(heads[1], 0)])              # completions may come out of order
    assert vq.taken == (heads[0], heads[2])
    vq.set_base(vq.last_avail_idx)
    assert vq.taken == ()
