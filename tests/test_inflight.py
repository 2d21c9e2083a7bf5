"""Inflight tracking for split rings (`vhostpy.inflight`): the region byte for byte against
the spec's layout, and recovery from every point of a request's life (taken, completing,
published but not cleared, cleared), out-of-order completion, and regions that do not fit."""

from __future__ import annotations

import os
import struct

import pytest

from vhostpy.inflight import (
    HEADER,
    STATE,
    PackedInflight,
    RegionError,
    SplitInflight,
    create_region,
    queue_offset,
    queue_region_size,
    region_size,
)

QSIZE = 8


def fresh(queue_size: int = QSIZE) -> SplitInflight:
    q = SplitInflight(memoryview(bytearray(queue_region_size(queue_size))), queue_size)
    assert q.attach() is False
    return q


def restarted(q: SplitInflight) -> SplitInflight:
    """The next back-end instance's view of the same bytes."""
    again = SplitInflight(q.view, q.queue_size)
    assert again.attach() is True
    return again


def test_sizes_and_offsets_follow_the_spec_layout() -> None:
    assert (HEADER.size, STATE.size) == (16, 16)
    assert queue_region_size(256) == 16 * 256 + 64 == 4160     # as libvhost-user lays it out
    assert queue_region_size(4) == 128
    assert region_size(2, 256) == 2 * 4160 and queue_offset(1, 256) == 4160


def test_header_and_states_byte_for_byte() -> None:
    q = fresh()
    assert bytes(q.view[:16]) == struct.pack("<QHHHH", 0, 1, QSIZE, 0, 0)
    q.popped(5)
    q.popped(2)
    at5 = 16 + 5 * 16
    assert bytes(q.view[at5:at5 + 16]) == bytes([1, 0, 0, 0, 0, 0]) + struct.pack("<HQ", 0, 0)
    at2 = 16 + 2 * 16
    assert bytes(q.view[at2:at2 + 16]) == bytes([1, 0, 0, 0, 0, 0]) + struct.pack("<HQ", 0, 1)
    q.completing([2])                     # next = the old last_batch_head (0), then head 2
    assert q.state(2) == (1, 0, 1) and q.last_batch_head == 2
    q.completed([2], used_idx=1)
    assert q.state(2) == (0, 0, 1) and q.used_idx == 1
    assert bytes(q.view[:16]) == struct.pack("<QHHHH", 0, 1, QSIZE, 2, 1)


def test_recovery_from_every_point_of_a_requests_life() -> None:
    # taken, not completed: resubmitted, in the order they were taken
    q = fresh()
    for head in (6, 1, 4):
        q.popped(head)
    assert restarted(q).recover(ring_used_idx=0) == [6, 1, 4]
    # completing (list updated) but the used idx never moved: still resubmitted
    q = fresh()
    for head in (6, 1, 4):
        q.popped(head)
    q.completing([1, 4])
    assert restarted(q).recover(ring_used_idx=0) == [6, 1, 4]
    # the used idx moved (the driver saw them) but the flags were not cleared: not again
    q = fresh()
    for head in (6, 1, 4):
        q.popped(head)
    q.completing([1, 4])
    again = restarted(q)
    assert again.recover(ring_used_idx=2) == [6]
    assert again.used_idx == 2 and again.state(1)[0] == again.state(4)[0] == 0
    # cleared: only what is really still in flight
    q = fresh()
    for head in (6, 1, 4):
        q.popped(head)
    q.completing([4])
    q.completed([4], used_idx=1)
    assert restarted(q).recover(ring_used_idx=1) == [6, 1]


def test_counters_go_on_after_a_restart_and_order_resubmissions() -> None:
    q = fresh()
    for head in (3, 7):
        q.popped(head)
    again = restarted(q)
    assert again.recover(0) == [3, 7] and again.counter == 2
    again.completing([7])
    again.completed([7], 1)
    again.popped(0)                       # taken after the restart: newer than head 3
    assert restarted(again).recover(1) == [3, 0]


def test_batches_across_the_used_index_wrap() -> None:
    q = fresh()
    used = 0xFFFE
    q.completed([], used)                 # a ring that has been used 65534 times
    for head in range(4):
        q.popped(head)
    q.completing([0, 1, 2])
    again = restarted(q)
    assert again.recover(ring_used_idx=(used + 3) & 0xFFFF) == [3]
    assert again.used_idx == 1


@pytest.mark.parametrize("damage, message", [
    (lambda v: struct.pack_into("<H", v, 8, 2), "version 2"),
    (lambda v: struct.pack_into("<H", v, 10, 16), "for 16 descriptors"),
    # a counter no back-end reaches (the next one would not fit the 64-bit field)
    (lambda v: struct.pack_into("<Q", v, 16 + 16 * 3 + 8, (1 << 64) - 1), "a counter of"),
])
def test_regions_that_do_not_fit_are_refused(damage: object, message: str) -> None:
    q = fresh()
    damage(q.view)  # type: ignore[operator]
    with pytest.raises(RegionError, match=message):
        SplitInflight(q.view, QSIZE).attach()


def test_a_last_batch_list_that_leaves_the_ring_is_refused() -> None:
    q = fresh()
    q.popped(1)
    q.completing([1])
    struct.pack_into("<H", q.view, 12, 200)          # last_batch_head out of range
    with pytest.raises(RegionError, match="head 200 outside"):
        restarted(q).recover(ring_used_idx=1)
    with pytest.raises(RegionError, match="more than the queue"):
        restarted(q).recover(ring_used_idx=40)
    with pytest.raises(RegionError, match="head 9 outside"):
        q.popped(9)
    with pytest.raises(RegionError, match="needs"):
        SplitInflight(memoryview(bytearray(32)), QSIZE)


def test_create_region_is_a_shared_zeroed_memfd() -> None:
    fd, region = create_region(2, 16)
    try:
        assert os.fstat(fd).st_size == len(region) == region_size(2, 16)
        q = SplitInflight(memoryview(region)[queue_offset(1, 16):], 16)
        assert q.attach() is False
        q.popped(3)
        other = os.pread(fd, 16, queue_offset(1, 16) + 16 + 3 * 16)
        assert other[0] == 1                                  # the same bytes through the fd
    finally:
        q.view.release()
        region.close()
        os.close(fd)
    with pytest.raises(ValueError, match="out of range"):
        create_region(0, 16)


# ------------------------------------------------------------------ packed: the API's edges


def packed_fresh(size: int = QSIZE) -> PackedInflight:
    q = PackedInflight(memoryview(bytearray(queue_region_size(size, packed=True))), size)
    assert q.attach(0, True) is False
    return q


def test_packed_operations_on_chains_not_in_flight_write_nothing() -> None:
    q = packed_fresh()
    q.popped([(0x1000, 8, 3, 0x80)])
    assert q.entry_of(3) == (0, 0) and q.in_flight == {3: (0, 0)} and q.counter == 1
    region = bytes(q.view)
    with pytest.raises(KeyError):
        q.completing([3, 5], 1, True)           # 5 is not in flight: nothing linked
    with pytest.raises(KeyError):
        q.given_back(5)
    with pytest.raises(RegionError, match="no free entry for a chain of 0"):
        q.popped([])
    assert bytes(q.view) == region
    q.completing([3], 1, True)
    q.completed([3])
    assert (q.free_head, q.old_free_head, q.used_idx, q.old_used_idx) == (0, 0, 1, 1)
    assert q.state(0)[0] == 0 and q.in_flight == {}


def test_packed_recover_needs_the_whole_descriptor_ring() -> None:
    q = packed_fresh()
    again = PackedInflight(q.view, QSIZE)
    assert again.attach(0, True) is True
    with pytest.raises(RegionError, match="descriptor ring of 16 bytes"):
        again.recover(memoryview(bytearray(16)))
    found = again.recover(memoryview(bytearray(16 * QSIZE)))
    assert found.chains == () and (found.used_idx, found.used_wrap, found.slots) == (0, True, 0)
    with pytest.raises(RegionError, match="entry 8 outside"):
        again.state(QSIZE)
