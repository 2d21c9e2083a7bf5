"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), split and packed rings: the shared
region's layouts and the bookkeeping that lets a restarted back-end resubmit what its
predecessor had taken from a ring but not completed.

The front-end asks the back-end for the region once (GET_INFLIGHT_FD: the back-end makes a
memfd of `region_size(num_queues, queue_size, packed=...)` bytes), keeps it, and hands it back
at every start (SET_INFLIGHT_FD), to this process or to the next one. The layout depends on
the ring format the driver negotiated (VIRTIO_F_RING_PACKED, bit 34): a session sizes and
slices the region with `packed=` set from the features acked by SET_FEATURES (QEMU sends
SET_FEATURES before GET_INFLIGHT_FD and SET_INFLIGHT_FD: hw/virtio/vhost.c,
`vhost_dev_prepare_inflight`). Per queue, at `queue_offset(i, queue_size, packed=False)`,
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

The packed layout and `PackedInflight` (its own section below) follow the same spec section.

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
from dataclasses import dataclass

__all__ = ["COUNTER_LIMIT", "HEADER", "INFLIGHT_ALIGN", "PACKED_HEADER", "PACKED_STATE", "STATE",
           "VERSION", "PackedInflight", "PackedRecovery", "RecoveredChain", "RegionError",
           "SplitInflight", "create_region", "queue_offset", "queue_region_size", "queue_view",
           "region_size"]

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


#: QueueRegionPacked without its array: features, version, desc_num, free_head,
#: old_free_head, used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter, 7 bytes
#: of padding, and the 3 bytes C's alignment adds before the (8-aligned) desc array.
PACKED_HEADER = struct.Struct("<QHHHHHHBB7x3x")
#: DescStatePacked: inflight, padding, next, last, num, counter, id, flags, len, addr.
PACKED_STATE = struct.Struct("<BxHHHQHHIQ")


class RegionError(ValueError):
    """The region does not describe this queue (version, size, or a head out of range)."""


def queue_region_size(queue_size: int, *, packed: bool = False) -> int:
    """Bytes of one queue's part: the header and `queue_size` states (split, or with
    `packed` the packed layout's), aligned to `INFLIGHT_ALIGN`."""
    if packed:
        raw = PACKED_HEADER.size + PACKED_STATE.size * queue_size
    else:
        raw = HEADER.size + STATE.size * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


def region_size(num_queues: int, queue_size: int, *, packed: bool = False) -> int:
    """Bytes of the whole region (what GET_INFLIGHT_FD's mmap_size says, and what
    SET_INFLIGHT_FD's mmap_size must reach); `packed` for VIRTIO_F_RING_PACKED rings."""
    return num_queues * queue_region_size(queue_size, packed=packed)


def queue_offset(index: int, queue_size: int, *, packed: bool = False) -> int:
    """Where queue `index`'s part starts (from the region's mmap_offset)."""
    return index * queue_region_size(queue_size, packed=packed)


def queue_view(region: memoryview | mmap.mmap | bytearray, index: int, queue_size: int, *,
               packed: bool = False, offset: int = 0) -> memoryview:
    """Queue `index`'s part of a region mapped at `region` whose queues start at `offset`
    (SET_INFLIGHT_FD's mmap_offset): what `Virtqueue.attach_inflight` takes. RegionError
    when the region is too small for it."""
    at = offset + queue_offset(index, queue_size, packed=packed)
    end = at + queue_region_size(queue_size, packed=packed)
    view = memoryview(region)
    if offset < 0 or end > len(view):
        raise RegionError(f"inflight region of {len(view)} bytes: queue {index} of "
                          f"{queue_size} ({'packed' if packed else 'split'}) ends at {end}")
    return view[at:end]


def create_region(num_queues: int, queue_size: int, *, packed: bool = False
                  ) -> tuple[int, mmap.mmap]:
    """A zeroed region in a new memfd: (fd, its shared mapping). The caller owns both."""
    if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= 32768:
        raise ValueError(f"inflight region for {num_queues} queues of {queue_size}: out of "
                         "range")
    size = region_size(num_queues, queue_size, packed=packed)
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


# ------------------------------------------------------------------------------ packed rings
#
# The spec's packed layout (QueueRegionPacked / DescStatePacked, see PACKED_HEADER and
# PACKED_STATE) keeps a *copy* of every descriptor taken from the ring, because a packed
# ring's slots are overwritten by used descriptors written out of order: the entries form a
# free list (`next`), a chain taken from the ring occupies as many entries as it had ring
# descriptors (linked by `next` in order; the first, its head entry, holds inflight, num,
# last and counter), and the `old_*` fields are the state as of the last finished operation.
#
# Which stores, in which order (each field one store, through the `_put*` helpers; a
# SIGKILL between any two leaves a state `PackedInflight.recover` repairs exactly --
# tests/test_recovery_packed.py stops a back-end after every one of them):
#
# * a chain taken (`popped`), H = free_head (== old_free_head): desc[H].num = 0,
#   desc[H].counter = counter++, desc[H].inflight = 1; then per ring descriptor d, with
#   F = free_head: (d last) desc[H].last = F; desc[H].num += 1; desc[F].{id, flags, len,
#   addr} = d; free_head = desc[F].next. Last, old_free_head = free_head: the commit.
# * a batch of completions (`completing`, then the ring publishes, then `completed`): per
#   buffer, with its head entry H and last entry L: desc[L].next = free_head, free_head = H;
#   then used_idx and used_wrap_counter = the ring's used position after the batch; (the
#   ring stores the first used descriptor's flags: published); per buffer desc[H].inflight
#   = 0; then old_free_head = free_head, then old_used_idx, used_wrap_counter and
#   old_used_wrap_counter in ONE 32-bit store (bytes 18-21): a mixed old position (new index,
#   old wrap or the reverse) would make a restart read the wrong descriptor's flags.
# * a chain given back unused (`given_back`, `Virtqueue.rewind`): desc[L].next = free_head,
#   free_head = H, old_free_head = H (the commit), then desc[H].inflight = 0.
#
# Recovery (`recover`), the spec's rules: when (used_idx, used_wrap_counter) differs from the
# old pair, a batch was in progress; it was published iff the ring descriptor at
# old_used_idx no longer shows the avail/used bits of a descriptor made available in lap
# old_used_wrap_counter (AVAIL = wrap, USED = !wrap): then the new state is committed
# (old_* = current), else rolled back (current = old_*), which also drops a chain whose
# `popped` did not finish. The inflight flags of free entries are cleared; the head entries
# still in flight are the chains to serve again, oldest first by counter. (The spec compares
# used_idx alone and "the flags": the wrap counter is compared too, since a batch of a whole
# ring's worth moves the index back where it was, and only the AVAIL and USED bits, since an
# available descriptor also carries NEXT, WRITE or INDIRECT.) A given-back chain whose
# commit did not happen is still in flight and is served again.
#
# DPDK's lib/vhost reads the same structs differently (entries indexed by ring slot, the
# batch decided by desc[old_used_idx].inflight): a region one of its back-ends wrote is
# not this one's to recover, and `recover` refuses what does not partition into a free
# list and chains.

#: Ring descriptor flags the recovery reads (virtio 1.1+ 2.8.1) and checks copies with.
_F_NEXT, _F_INDIRECT, _F_AVAIL, _F_USED = 1, 4, 1 << 7, 1 << 15

# QueueRegionPacked fields
_P_FREE_HEAD, _P_OLD_FREE_HEAD, _P_USED_IDX, _P_OLD_USED_IDX = 12, 14, 16, 18
_P_USED_WRAP, _P_OLD_USED_WRAP = 20, 21
# DescStatePacked fields
_S_NEXT, _S_LAST, _S_NUM, _S_COUNTER, _S_COPY = 2, 4, 6, 8, 16
_COPY = struct.Struct("<HHIQ")          # id, flags, len, addr (the descriptor's copy)

#: One ring descriptor as read: (addr, len, id, flags), the ring's own field order.
Descriptor = tuple[int, int, int, int]


# Every store into a packed region goes through these (one store each; tests stop a
# back-end after any one of them).

def _put8(view: memoryview, at: int, value: int) -> None:
    view[at] = value


def _put16(view: memoryview, at: int, value: int) -> None:
    """One 16-bit store (`struct.pack_into` zeroes its target first: a kill in between would
    leave a 0 no operation ever wrote)."""
    view[at:at + 2].cast("H")[0] = value


def _put32(view: memoryview, at: int, value: int) -> None:
    view[at:at + 4].cast("I")[0] = value


def _put64(view: memoryview, at: int, value: int) -> None:
    view[at:at + 8].cast("Q")[0] = value


def _put_copy(view: memoryview, at: int, desc: Descriptor) -> None:
    """An entry's copy of ring descriptor `desc` (addr, len, id, flags): not yet part of any
    committed state when it is written, so its four fields need not be one store."""
    addr, length, buf_id, flags = desc
    _COPY.pack_into(view, at + _S_COPY, buf_id, flags, length, addr)




@dataclass(frozen=True)
class RecoveredChain:
    """A chain a previous back-end took and never completed: its buffer id (the id of its
    last descriptor), its head entry in the region, its counter and its ring descriptors
    as copied when it was taken (addr, len, id, flags). Only the region's structure was
    checked (see `PackedInflight.recover`); the buffers must be checked like a ring's."""

    buf_id: int
    entry: int
    counter: int
    descs: tuple[Descriptor, ...]


@dataclass(frozen=True)
class PackedRecovery:
    """What a restarted packed ring resumes from: `chains` to serve again (oldest first,
    before anything new), the used position (`used_idx`, `used_wrap`) its next used
    descriptor goes to, and the avail position (`avail_idx`, `avail_wrap`) its next chain
    is read from: the used position advanced by `slots`, the ring descriptors the chains
    in flight hold. Whatever SET_VRING_BASE said is superseded: after a crash QEMU has no
    packed ring position but the one of its last successful GET_VRING_BASE."""

    chains: tuple[RecoveredChain, ...]
    used_idx: int
    used_wrap: bool
    avail_idx: int
    avail_wrap: bool
    slots: int


class PackedInflight:
    """One packed queue's part of the region (`view`: a writable buffer of at least
    `queue_region_size(queue_size, packed=True)` bytes).

    Life: `attach(used_idx, used_wrap)` -- False for a fresh region (version 0: initialised
    now, empty, at the ring's used position), True for one holding a previous instance's
    state, which `recover(desc_ring)` must then repair and read before anything else; then
    per chain `popped`, per batch `completing` / (the ring publishes) / `completed`, and
    `given_back` for a chain returned unused. The module's section comment says which
    stores each makes, in which order. Single-threaded: the ring's thread calls them.

    After `attach` or `recover` the region is consistent (free_head == old_free_head, the
    used position == its old copy): a compiled ring mirroring this state takes free_head and
    the used position from the header, `counter`, and `in_flight` (buffer id -> head and
    last entry), and must then make the same stores in the same order.

    The header fields this instance writes (free_head, the used position) and the chains in
    flight (buffer id -> head and last entry) are kept here too and never read back from the
    region while it runs; the one thing read back is an entry's `next` when a chain is
    taken, checked to be inside the queue (RegionError otherwise: the front-end wrote into
    the region while the ring ran, and tracking must stop).
    """

    def __init__(self, view: memoryview, queue_size: int) -> None:
        need = queue_region_size(queue_size, packed=True)
        if len(view) < need:
            raise RegionError(f"inflight region of {len(view)} bytes for a packed queue of "
                              f"{queue_size}: needs {need}")
        if not 1 <= queue_size <= 32768:
            raise RegionError(f"inflight region for a packed queue of {queue_size}: not in "
                              "1..32768")
        self.view = memoryview(view).cast("B")     # (the single stores cast slices of it)
        self.queue_size = queue_size
        self.counter = 0          # the next chain's counter
        self._free_head = 0
        self._used = (0, True)
        self._chains: dict[int, tuple[int, int]] = {}

    # -- fields ----------------------------------------------------------------------------
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
    def free_head(self) -> int:
        return self._u16(_P_FREE_HEAD)

    @property
    def old_free_head(self) -> int:
        return self._u16(_P_OLD_FREE_HEAD)

    @property
    def used_idx(self) -> int:
        return self._u16(_P_USED_IDX)

    @property
    def old_used_idx(self) -> int:
        return self._u16(_P_OLD_USED_IDX)

    @property
    def used_wrap_counter(self) -> int:
        return self.view[_P_USED_WRAP]

    @property
    def old_used_wrap_counter(self) -> int:
        return self.view[_P_OLD_USED_WRAP]

    def state(self, entry: int) -> tuple[int, int, int, int, int, int, int, int, int]:
        """DescStatePacked `entry`: (inflight, next, last, num, counter, id, flags, len,
        addr)."""
        fields: tuple[int, int, int, int, int, int, int, int, int] = PACKED_STATE.unpack_from(
            self.view, self._at(self._check(entry)))
        return fields

    def entry_of(self, buf_id: int) -> tuple[int, int]:
        """(head entry, last entry) of the chain in flight with buffer id `buf_id`
        (KeyError if none): what a compiled ring mirroring this state needs."""
        return self._chains[buf_id]

    @property
    def in_flight(self) -> dict[int, tuple[int, int]]:
        """Buffer id -> (head entry, last entry) of every chain in flight (a copy)."""
        return dict(self._chains)

    def _at(self, entry: int) -> int:
        return PACKED_HEADER.size + PACKED_STATE.size * entry

    def _check(self, entry: int) -> int:
        if not 0 <= entry < self.queue_size:
            raise RegionError(f"inflight region: entry {entry} outside a packed queue of "
                              f"{self.queue_size}")
        return entry

    # -- starting --------------------------------------------------------------------------
    def attach(self, used_idx: int, used_wrap: bool) -> bool:
        """Take the region as it is. Fresh (version 0): initialised -- every entry free
        (entry j's next is j + 1, the last one's the queue size: the end of the list), the
        used position and its old copy (`used_idx`, `used_wrap`: the ring's, from
        SET_VRING_BASE), the version written last -- and False. A region in use: its
        version and desc_num checked (RegionError, nothing written), and True: `recover`
        next."""
        version = self.version
        n = self.queue_size
        if version == 0:
            if not 0 <= used_idx < n:
                raise RegionError(f"inflight region: used index {used_idx} outside a packed "
                                  f"queue of {n}")
            view = self.view
            for entry in range(n):
                PACKED_STATE.pack_into(view, self._at(entry), 0, entry + 1, 0, 0, 0, 0, 0, 0, 0)
            end = queue_region_size(n, packed=True)
            view[self._at(n):end] = bytes(end - self._at(n))      # the alignment padding
            PACKED_HEADER.pack_into(view, 0, 0, 0, n, 0, 0, used_idx, used_idx, used_wrap,
                                    used_wrap)
            _put16(view, _VERSION_AT, VERSION)      # last: a kill before it leaves version 0
            self.counter = 0
            self._free_head = 0
            self._used = (used_idx, bool(used_wrap))
            self._chains = {}
            return False
        if version != VERSION:
            raise RegionError(f"inflight region version {version}; vhostpy knows {VERSION}")
        if self.desc_num != n:
            raise RegionError(f"inflight region for {self.desc_num} descriptors; the packed "
                              f"queue has {n}")
        return True

    def recover(self, desc_ring: memoryview) -> PackedRecovery:
        """Repair and read a region a previous instance left (after `attach` returned True).

        `desc_ring` is the ring's descriptor ring (queue_size x 16 bytes): the descriptor at
        old_used_idx says whether a batch in progress was published. Everything is checked
        before anything is written; RegionError (the region untouched) for a header whose
        positions leave the ring or whose wrap counters are not 0 or 1, a free list that
        loops or leaves the queue, a chain whose num, links or last entry do not fit, whose
        copied NEXT / INDIRECT flags do not make one chain, whose buffer id is outside the
        queue or shared with another chain, entries neither free nor in a chain (or in two),
        and counters no back-end reaches. Then the spec's repair is written (commit or roll
        back the operation in progress; clear the inflight flags of free entries)."""
        n = self.queue_size
        view = self.view
        if len(desc_ring) < 16 * n:
            raise RegionError(f"descriptor ring of {len(desc_ring)} bytes for {n} descriptors")
        (_features, _version, _num, free_head, old_free_head, used, old_used, wrap,
         old_wrap) = PACKED_HEADER.unpack_from(view, 0)
        for name, value in (("used_idx", used), ("old_used_idx", old_used)):
            if value >= n:
                raise RegionError(f"inflight region: {name} {value} outside a packed queue "
                                  f"of {n}")
        for name, value in (("used_wrap_counter", wrap), ("old_used_wrap_counter", old_wrap)):
            if value > 1:
                raise RegionError(f"inflight region: {name} {value} is not 0 or 1")
        published = False
        if (used, wrap) != (old_used, old_wrap):
            flags: int = _U16.unpack_from(desc_ring, 16 * old_used + 14)[0]
            made_available = _F_AVAIL if old_wrap else _F_USED
            published = flags & (_F_AVAIL | _F_USED) != made_available
        if published:
            start_free, start_used, start_wrap = free_head, used, wrap
        else:
            start_free, start_used, start_wrap = old_free_head, old_used, old_wrap

        states = [PACKED_STATE.unpack_from(view, self._at(e)) for e in range(n)]
        owner = [-2] * n        # -2: not seen yet, -1: free, else the head entry of its chain
        entry = start_free
        while entry < n:
            if owner[entry] != -2:
                raise RegionError(f"inflight region: the free list loops at entry {entry}")
            owner[entry] = -1
            entry = states[entry][1]
        chains: list[RecoveredChain] = []
        ids: set[int] = set()
        slots = 0
        highest = max(state[4] for state in states)
        if highest >= COUNTER_LIMIT:
            raise RegionError(f"inflight region: a counter of {highest:#x}, which no "
                              "back-end reaches (a counter is one per request taken)")
        for head in range(n):
            if owner[head] != -2 or not states[head][0]:
                continue
            chain = self._recovered_chain(states, owner, head)
            if chain.buf_id in ids:
                raise RegionError(f"inflight region: buffer id {chain.buf_id} in flight twice")
            ids.add(chain.buf_id)
            slots += len(chain.descs)
            chains.append(chain)
        if -2 in owner:
            raise RegionError(f"inflight region: entry {owner.index(-2)} is neither free nor "
                              "in a chain in flight")
        chains.sort(key=lambda c: (c.counter, c.entry))

        # The repair: commit or roll back, then the free entries are not in flight.
        if published:
            _put16(view, _P_OLD_FREE_HEAD, free_head)
            _put32(view, _P_OLD_USED_IDX, used | wrap << 16 | wrap << 24)
        else:
            _put16(view, _P_FREE_HEAD, old_free_head)
            _put16(view, _P_USED_IDX, old_used)
            _put8(view, _P_USED_WRAP, old_wrap)
        for entry in range(n):
            if owner[entry] == -1 and states[entry][0]:
                _put8(view, self._at(entry), 0)
        self.counter = highest + 1
        self._free_head = start_free
        self._used = (start_used, bool(start_wrap))
        self._chains = {c.buf_id: (c.entry, states[c.entry][2]) for c in chains}
        avail = start_used + slots
        avail_wrap = bool(start_wrap)
        if avail >= n:
            avail, avail_wrap = avail - n, not avail_wrap
        return PackedRecovery(tuple(chains), start_used, bool(start_wrap), avail, avail_wrap,
                              slots)

    def _recovered_chain(self, states: list[tuple[int, ...]], owner: list[int],
                         head: int) -> RecoveredChain:
        """The chain whose head entry is `head` (marked in `owner`), checked to be one."""
        n = self.queue_size
        _inflight, _next, last, num, counter = states[head][:5]
        if not 1 <= num <= n:
            raise RegionError(f"inflight region: entry {head} heads a chain of {num} "
                              f"descriptors (queue of {n})")
        entries = [head]
        for _ in range(num - 1):
            nxt = states[entries[-1]][1]
            if nxt >= n:
                raise RegionError(f"inflight region: the chain at entry {head} links to "
                                  f"entry {nxt}, outside the queue")
            entries.append(nxt)
        if last != entries[-1]:
            raise RegionError(f"inflight region: the chain at entry {head} ends at entry "
                              f"{entries[-1]}; its last says {last}")
        descs: list[Descriptor] = []
        for k, entry in enumerate(entries):
            if owner[entry] != -2:
                raise RegionError(f"inflight region: entry {entry} of the chain at entry "
                                  f"{head} is also "
                                  f"{'free' if owner[entry] == -1 else 'in another chain'}")
            owner[entry] = head
            buf_id, flags, length, addr = states[entry][5:9]
            if bool(flags & _F_NEXT) != (k < num - 1) or (flags & _F_INDIRECT and num > 1):
                raise RegionError(f"inflight region: descriptor {k} of the chain at entry "
                                  f"{head} has flags {flags:#x} in a chain of {num}")
            descs.append((addr, length, buf_id, flags))
        buf_id = descs[-1][2]
        if buf_id >= n:
            raise RegionError(f"inflight region: the chain at entry {head} has buffer id "
                              f"{buf_id}, outside a queue of {n}")
        return RecoveredChain(buf_id, head, counter, tuple(descs))

    # -- a chain's life --------------------------------------------------------------------
    def popped(self, descs: Sequence[Descriptor]) -> None:
        """A chain was taken from the ring: `descs` are its ring descriptors (addr, len, id,
        flags) in order (one for an indirect chain); its buffer id is the last one's.
        RegionError when the free list ends or leaves the queue before the chain fits (the
        region was written by someone else meanwhile); the chain is then not recorded."""
        n = self.queue_size
        view = self.view
        head = self._free_head
        if head >= n or not descs:
            raise RegionError(f"inflight region: no free entry for a chain of {len(descs)} "
                              f"(free_head {head}, queue of {n})")
        at = self._at(head)
        _put16(view, at + _S_NUM, 0)
        _put64(view, at + _S_COUNTER, self.counter)
        self.counter += 1
        _put8(view, at, 1)
        free = head
        last = len(descs) - 1
        for k, one in enumerate(descs):
            if free >= n:
                raise RegionError(f"inflight region: the free list ends after {k} entries "
                                  f"of a chain of {len(descs)} (entry {free})")
            if k == last:
                _put16(view, at + _S_LAST, free)
            _put16(view, at + _S_NUM, k + 1)
            entry_at = self._at(free)
            _put_copy(view, entry_at, one)
            last_entry = free
            free = _U16.unpack_from(view, entry_at + _S_NEXT)[0]
            _put16(view, _P_FREE_HEAD, free)
        _put16(view, _P_OLD_FREE_HEAD, free)      # the commit
        self._free_head = free
        self._chains[descs[-1][2]] = (head, last_entry)

    def completing(self, buf_ids: Sequence[int], used_idx: int, used_wrap: bool) -> None:
        """These chains are about to be published as used descriptors, after which the
        ring's used position is (`used_idx`, `used_wrap`): call it before the ring stores
        the first used descriptor's flags. KeyError (nothing written) for an id not in
        flight."""
        chains = self._chains
        entries = [chains[buf_id] for buf_id in buf_ids]
        view = self.view
        free = self._free_head
        for head, last in entries:
            _put16(view, self._at(last) + _S_NEXT, free)
            free = head
            _put16(view, _P_FREE_HEAD, free)
        self._free_head = free
        _put16(view, _P_USED_IDX, used_idx)
        _put8(view, _P_USED_WRAP, int(used_wrap))
        self._used = (used_idx, bool(used_wrap))

    def completed(self, buf_ids: Sequence[int]) -> None:
        """The ring published the batch `completing` announced: clear the chains' inflight
        flags, then commit (old_free_head, then the old used position in one store)."""
        view = self.view
        for buf_id in buf_ids:
            head, _last = self._chains.pop(buf_id)
            _put8(view, self._at(head), 0)
        _put16(view, _P_OLD_FREE_HEAD, self._free_head)
        used_idx, used_wrap = self._used
        _put32(view, _P_OLD_USED_IDX, used_idx | used_wrap << 16 | used_wrap << 24)

    def given_back(self, buf_id: int) -> None:
        """The chain `buf_id`, taken from the ring, was given back unused (`rewind`): its
        entries return to the free list (committed), then it is no longer in flight."""
        head, last = self._chains.pop(buf_id)
        view = self.view
        _put16(view, self._at(last) + _S_NEXT, self._free_head)
        self._free_head = head
        _put16(view, _P_FREE_HEAD, head)
        _put16(view, _P_OLD_FREE_HEAD, head)      # the commit
        _put8(view, self._at(head), 0)
