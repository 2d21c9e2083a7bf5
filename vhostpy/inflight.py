"""Inflight I/O tracking for split rings (vhost-user INFLIGHT_SHMFD): the shared region's
layout and the bookkeeping that lets a restarted back-end resubmit what its predecessor had
taken from a ring but not completed.

The front-end asks the back-end for the region once (GET_INFLIGHT_FD: the back-end makes a
memfd of `region_size(num_queues, queue_size)` bytes), keeps it, and hands it back at every
start (SET_INFLIGHT_FD), to this process or to the next one. Per queue, at `queue_offset(i)`,
the spec's split layout (docs/interop/vhost-user.rst, "Inflight I/O tracking"), little-endian:

    QueueRegionSplit: u64 features, u16 version (1), u16 desc_num, u16 last_batch_head,
                      u16 used_idx, then desc_num x DescStateSplit
    DescStateSplit:   u8 inflight, 5 bytes padding, u16 next, u64 counter

each queue's part padded to `INFLIGHT_ALIGN` bytes (as libvhost-user lays it out).
`SplitInflight` keeps one queue's part up to date, in the spec's order:

* a chain taken from the ring (`popped`): its head's counter gets the next value of the
  queue's counter, then its inflight flag is set;
* a batch of completions (`completing`, before the used ring's idx moves): each head joins
  the last-batch list (`next` = the old `last_batch_head`, `last_batch_head` = head); then,
  after the used ring's idx was published (`completed`), the heads' inflight flags are
  cleared and `used_idx` becomes the used ring's idx;
* on a new start (`recover`, given the used ring's idx): if `used_idx` differs from it, the
  back-end died after publishing a batch and before clearing it: that many entries of the
  last-batch list are cleared and `used_idx` is set; then every head still in flight is
  returned in the order it was taken (its counter), for the runner to serve again before the
  ring's new chains.

Nothing here maps memory, speaks vhost-user or knows a device: `create_region` makes the
memfd and mapping GET_INFLIGHT_FD answers with, the runner calls the rest. A region that
does not fit (wrong version or desc_num, a head out of range) is a `RegionError`: the
transport then starts the queue afresh instead of trusting it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

__all__ = ["COUNTER_LIMIT", "HEADER", "INFLIGHT_ALIGN", "STATE", "VERSION", "RegionError", "SplitInflight",
           "create_region", "queue_offset", "queue_region_size", "region_size"]

#: QueueRegionSplit without its array: features, version, desc_num, last_batch_head, used_idx.
HEADER = struct.Struct("<QHHHH")
#: DescStateSplit: inflight, padding, next, counter.
STATE = struct.Struct("<B5xHQ")
#: Counters at or above this are refused as garbage (2**63 requests are never taken).
COUNTER_LIMIT = 1 << 63
#: Each queue's part of the region starts on this boundary.
INFLIGHT_ALIGN = 64
VERSION = 1

_VERSION_AT, _DESC_NUM_AT, _LAST_BATCH_AT, _USED_IDX_AT = 8, 10, 12, 14
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_COUNTER_AT = 8     # within a DescStateSplit
_NEXT_AT = 6


class RegionError(ValueError):
    """The region does not describe this queue (version, size, or a head out of range)."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's part: the header and `queue_size` states, aligned."""
    raw = HEADER.size + STATE.size * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


def region_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole region (what GET_INFLIGHT_FD's mmap_size says)."""
    return num_queues * queue_region_size(queue_size)


def queue_offset(index: int, queue_size: int) -> int:
    """Where queue `index`'s part starts."""
    return index * queue_region_size(queue_size)


def create_region(num_queues: int, queue_size: int) -> tuple[int, mmap.mmap]:
    """A zeroed region in a new memfd: (fd, its shared mapping). The caller owns both."""
    if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= 32768:
        raise ValueError(f"inflight region for {num_queues} queues of {queue_size}: out of "
                         "range")
    size = region_size(num_queues, queue_size)
    fd = os.memfd_create("vhostpy-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


class SplitInflight:
    """One queue's part of the region (`view`: a writable buffer of at least
    `queue_region_size(queue_size)` bytes, e.g. a slice of the mapping at `queue_offset`).

    `attach` checks or (for a fresh region: version 0) initialises the header; the other
    methods follow the module docstring. Single-threaded: the ring's thread calls them."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < queue_region_size(queue_size):
            raise RegionError(f"inflight region of {len(view)} bytes for a queue of "
                              f"{queue_size}: needs {queue_region_size(queue_size)}")
        self.view = view
        self.queue_size = queue_size
        self.counter = 0          # the next chain's counter

    # -- header fields -------------------------------------------------------------------------
    def _u16(self, at: int) -> int:
        value: int = _U16.unpack_from(self.view, at)[0]
        return value

    @property
    def version(self) -> int:
        return self._u16(_VERSION_AT)

    @property
    def desc_num(self) -> int:
        return self._u16(_DESC_NUM_AT)

    @property
    def last_batch_head(self) -> int:
        return self._u16(_LAST_BATCH_AT)

    @property
    def used_idx(self) -> int:
        return self._u16(_USED_IDX_AT)

    def state(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter) of descriptor `head`."""
        inflight, nxt, counter = STATE.unpack_from(self.view, self._at(head))
        return inflight, nxt, counter

    def _at(self, head: int) -> int:
        return HEADER.size + STATE.size * head

    # -- starting ------------------------------------------------------------------------------
    def attach(self) -> bool:
        """Take the region as it is: False when it was fresh (version 0: now initialised,
        nothing to recover), True when it holds a previous instance's state (checked:
        RegionError if it belongs to another queue size or version)."""
        version = self.version
        if version == 0:
            HEADER.pack_into(self.view, 0, 0, VERSION, self.queue_size, 0, 0)
            self.counter = 0
            return False
        if version != VERSION:
            raise RegionError(f"inflight region version {version}; vhostpy knows {VERSION}")
        if self.desc_num != self.queue_size:
            raise RegionError(f"inflight region for {self.desc_num} descriptors; the queue "
                              f"has {self.queue_size}")
        highest = max((self.state(h)[2] for h in range(self.queue_size)), default=0)
        if highest >= COUNTER_LIMIT:
            raise RegionError(f"inflight region: a counter of {highest:#x}, which no "
                              "back-end reaches (a counter is one per request taken)")
        self.counter = 1 + highest
        return True

    # -- a chain's life ------------------------------------------------------------------------
    def popped(self, head: int) -> None:
        """The chain at `head` was taken from the available ring."""
        at = self._at(self._check(head))
        _U64.pack_into(self.view, at + _COUNTER_AT, self.counter)
        self.counter += 1
        self.view[at] = 1

    def completing(self, heads: Sequence[int]) -> None:
        """These chains are about to be published as used (before the used idx moves)."""
        last = self.last_batch_head
        for head in heads:
            _U16.pack_into(self.view, self._at(self._check(head)) + _NEXT_AT, last)
            last = head
        _U16.pack_into(self.view, _LAST_BATCH_AT, last)

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """The used ring's idx is now `used_idx`, covering `heads`."""
        for head in heads:
            self.view[self._at(head)] = 0
        _U16.pack_into(self.view, _USED_IDX_AT, used_idx & 0xFFFF)

    def given_back(self, head: int) -> None:
        """The chain at `head`, just taken, was given back unused (`Virtqueue.rewind`)."""
        self.view[self._at(self._check(head))] = 0

    # -- after a restart -----------------------------------------------------------------------
    def recover(self, ring_used_idx: int) -> list[int]:
        """Fix the last batch if the previous instance died while publishing it, then the
        heads still in flight, oldest first (by counter). RegionError for a last-batch list
        that leaves the ring."""
        ring_used_idx &= 0xFFFF
        batch = (ring_used_idx - self.used_idx) & 0xFFFF
        if batch:
            if batch > self.queue_size:
                raise RegionError(f"inflight region: used_idx {self.used_idx} is {batch} "
                                  f"behind the used ring's {ring_used_idx}, more than the "
                                  f"queue's {self.queue_size}")
            head = self.last_batch_head
            for _ in range(batch):
                at = self._at(self._check(head))
                self.view[at] = 0
                head = _U16.unpack_from(self.view, at + _NEXT_AT)[0]
            _U16.pack_into(self.view, _USED_IDX_AT, ring_used_idx)
        return self.in_flight()

    def in_flight(self) -> list[int]:
        """Heads marked in flight now, oldest first."""
        return [h for _, h in sorted((self.state(h)[2], h) for h in range(self.queue_size)
                                     if self.view[self._at(h)])]

    def _check(self, head: int) -> int:
        if not 0 <= head < self.queue_size:
            raise RegionError(f"inflight region: head {head} outside a queue of "
                              f"{self.queue_size}")
        return head
