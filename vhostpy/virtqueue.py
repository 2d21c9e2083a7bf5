"""Split virtqueues (virtio 1.x section 2.7; legacy rings share the layout on little-endian).

This module owns the device side of one split ring: validating its configuration, walking
descriptor chains (direct and indirect) into `DescriptorChain`s, publishing used entries, and
notification suppression in both directions (flags and EVENT_IDX).

It must never trust the guest: every index, length and address read from the ring is checked,
and a hostile ring puts only its own queue into the error state (`Virtqueue.error`, one WARNING
line) -- it never raises out of `pop()`, never loops unboundedly, and never touches memory
outside a mapped region. It must never do I/O or decide when to interrupt the driver: what
serves the ring (`vring.Vring`, attached as `runner`) owns the notifiers, polling and
coalescing; `signal_used()` only asks it. It never knows about vhost-user messages or devices.

Memory ordering: the guest runs concurrently. We read avail->idx before the ring entries it
publishes, and write used elements before used->idx, each as a separate store (loads are not
reordered with older loads, nor stores with older stores, on x86, 64- or 32-bit; CPython's
interpreter adds its own dependencies elsewhere). Where a store must be ordered before a later
load -- asking for kicks then re-reading avail->idx, publishing used->idx then reading the
driver's used_event or flags -- x86 does reorder, so `full_fence()` sits between them: an
uncontended lock acquire and release, whose locked read-modify-write is a full barrier on
x86-64 and i386 (and acquire/release pairs order store->load on AArch64, where pthread locks
use LDAXR/STLR). The fallback refuses to run on other architectures (`check_fence_support`).

Variants: `Virtqueue` is the abstract split ring (configuration, state, failure); its two
implementations are siblings: `PythonVirtqueue` here, the reference, and
`virtqueue_cffi.CffiVirtqueue`, with the ring state in a C struct and the walks in C. Which
one a transport builds is the visible alias `vring.DefaultVirtqueue`. Both pass the same
tests.
"""

from __future__ import annotations

import abc
import logging
import platform
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .dirtylog import DirtyLog
from .errors import MemoryAccessError, RingError
from .inflight import RegionError, SplitInflight
from .memory import ADDRESS_LIMIT, GuestMemory

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "DescriptorChain",
    "PythonVirtqueue",
    "RingRunner",
    "Virtqueue",
    "check_fence_support",
    "full_fence",
    "vring_need_event",
]

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
#: The device uses buffers in the order they were made available (virtio 1.2 2.7.9); a
#: device offers it only when every path of it does (vhostpy's net device does).
VIRTIO_F_IN_ORDER = 35

MAX_QUEUE_SIZE = 32768

DESC_SIZE = 16
USED_ELEM_SIZE = 8
# Alignment required of each part of a split ring (virtio 1.x 2.7 table "Virtqueue Part").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_MAX_CHAIN_BYTES = 0xFFFFFFFF  # used->len and our totals are 32-bit


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size  # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + USED_ELEM_SIZE * size  # flags, idx, ring[size], avail_event


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if `event` lies in the 16-bit window [old, new): the other side asked to be told."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _store_u16(view: memoryview, offset: int, value: int) -> None:
    """Store a ring field the driver polls (used->idx, used->flags, avail_event) in ONE
    16-bit write. `struct.pack_into` is not one: CPython's s_pack_internal memsets its
    target to zero before packing, so a driver polling used->idx could read 0 in between
    (DPDK virtio-user then reclaims ~64k stale used entries and corrupts its free list)."""
    view[offset : offset + 2].cast("H")[0] = value


class _Broken(Exception):
    """Internal: the ring is hostile; carries the reason for `Virtqueue.fail()`."""


class DescriptorChain:
    """One available descriptor chain, flattened into device-readable and -writable buffers.

    Buffers are (guest-physical address, length) pairs checked to be mapped when the chain was
    popped; every access re-checks them, so a memory table change afterwards raises
    MemoryAccessError instead of touching unmapped memory.
    """

    __slots__ = ("head", "memory", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        memory: GuestMemory,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.memory = memory
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def readable_views(self) -> list[memoryview]:
        out: list[memoryview] = []
        for gpa, length in self.readable:
            out.extend(self.memory.views(gpa, length))
        return out

    def writable_views(self) -> list[memoryview]:
        out: list[memoryview] = []
        for gpa, length in self.writable:
            out.extend(self.memory.views(gpa, length))
        return out

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Gather readable bytes [offset, offset+length); shorter if the chain ends first."""
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        end = self.readable_len if length is None else min(self.readable_len, offset + length)
        if end <= offset:
            return b""
        parts: list[memoryview] = []
        pos = 0
        for gpa, blen in self.readable:
            if pos + blen > offset:
                lo = max(offset - pos, 0)
                hi = min(blen, end - pos)
                parts.extend(self.memory.views(gpa + lo, hi - lo))
            pos += blen
            if pos >= end:
                break
        return b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the writable buffers from `offset`; returns bytes written.

        Writes what fits when `data` is longer than the writable space left.
        """
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        src = memoryview(data).cast("B")
        total = src.nbytes
        done = 0
        pos = 0
        for gpa, blen in self.writable:
            if done >= total:
                break
            if pos + blen > offset:
                lo = max(offset - pos, 0)
                n = min(blen - lo, total - done)
                for part in self.memory.views(gpa + lo, n):
                    k = part.nbytes
                    part[:] = src[done : done + k]
                    done += k
            pos += blen
        return done

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.readable_len}B"
            f"/{len(self.readable)} writable={self.writable_len}B/{len(self.writable)}>"
        )


class RingRunner(Protocol):
    """What serves a ring and decides its interrupts (`vring.Vring` implements it)."""

    @property
    def polling(self) -> bool:
        """True while the ring is busy-polled with kicks off."""

    def signal_used(self, vq: Virtqueue) -> bool:
        """Decide whether to interrupt the driver for `vq`'s new used entries, and do it."""

    def signal_target(self) -> tuple[int, int] | None:
        """See `Virtqueue.signal_target`."""

    def interrupt(self) -> None:
        """Interrupt the driver now."""

    def defer(self, chain: DescriptorChain) -> Any:
        """A handle to complete `chain` later (a `completion.Completion`)."""

    def later(self, chain: DescriptorChain, result: object) -> None:
        """`handle_chain` returned a deferred handle or an awaitable for `chain`."""

    def publish(self, items: list[tuple[int, int]]) -> None:
        """Used entries for chains completed now, in the order the runner requires."""

    def spawn(self, awaitable: object, done: Callable[[Any, BaseException | None], None]
              ) -> Callable[[], bool]:
        """Run `awaitable` on the host's asyncio loop; `done` on the ring's thread."""

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback()` on the ring's thread soon (from any thread)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback()` on the ring's thread in `delay` seconds (from that thread)."""


_FENCE = threading.Lock()
#: x86 (64- and 32-bit: an i386 lguest host reports i686) and AArch64.
FENCE_ARCHITECTURES = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm64")


def full_fence() -> None:
    """A full memory barrier from pure Python (see the module docstring)."""
    _FENCE.acquire()
    _FENCE.release()


def check_fence_support(machine: str | None = None) -> None:
    """RingError unless `full_fence()` is a real barrier on this machine's architecture."""
    machine = (machine or platform.machine()).lower()
    if machine not in FENCE_ARCHITECTURES:
        raise RingError(f"the pure-Python ring cannot order its stores and loads on {machine} "
                        "(only x86 and AArch64 are known): use the compiled fast path")


class Virtqueue(abc.ABC):
    """The device side of one virtqueue: configuration, state and failure.

    The layout is the split ring's unless a subclass overrides the layout hooks
    (`RING_PARTS`, `part_lengths`, `_size_problem`, `set_base`/`base`; the packed ring,
    `virtqueue_packed.PackedVirtqueue`, does).

    Configuration order (any order works; checks run when enough is known): `set_size`,
    `set_base`, `set_addresses`. Processing: `pop()` / `pop_many()`, then `add_used()` /
    `add_used_many()`, then `signal_used()`. To batch kicks: `disable_notifications()`, drain,
    and loop while `enable_notifications()` returns True.

    `add_used*()` and `signal_used()` on a queue that is not ready do nothing: a device finishing
    a request after a reset or a ring failure must not write into a ring nobody owns any more.

    `runner` is what serves the ring (set by `vring.Vring`): `signal_used()`, `polling`,
    `signal_target()` and `interrupt()` ask it. A ring without a runner never interrupts.
    """

    def __init__(self, memory: GuestMemory, index: int) -> None:
        self.memory = memory
        self.index = index
        self.runner: RingRunner | None = None
        self.event_idx = False
        #: VIRTIO_F_IN_ORDER negotiated (packed rings publish some batches as one used
        #: descriptor: `PackedVirtqueue.add_used_many`).
        self.in_order = False
        self.error: str | None = None
        self._size = 0
        self._desc_addr = 0
        self._avail_addr = 0
        self._used_addr = 0
        self._addresses_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self._notify = True  # whether we currently want kicks
        self._unsignalled = 0  # used entries added since the last signal decision
        self._signal_valid = False  # False until the first signal decision after (re)start
        self._signals = 0  # interrupt decisions that wanted an interrupt, ever
        #: Heads popped through `pop_many` and not yet returned by `add_used_many`, in pop
        #: order (compiled paths that pop and complete inside one C call never show here).
        #: (The value: whether the chain came from the resubmit list.)
        self._taken: dict[int, bool] = {}
        self._chains_popped = 0  # see `chains_popped`
        #: Inflight tracking (`attach_inflight`): this queue's part of the shared region,
        #: and the heads a previous back-end left in flight, served before the avail ring.
        self._inflight: SplitInflight | None = None
        self._resubmit: list[int] = []
        self._resubmit_pos = 0
        #: The migration dirty log (`set_dirty_log`) and the used ring's address in it.
        self._log: DirtyLog | None = None
        self._log_used: int | None = None
        self._cache_gen = -1
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None


    #: The three parts SET_VRING_ADDR places, in its order (desc, avail, used): the name
    #: each has in messages and the alignment it needs (split: virtio 1.x 2.7).
    RING_PARTS: tuple[tuple[str, int], tuple[str, int], tuple[str, int]] = (
        ("descriptor table", DESC_ALIGN), ("avail ring", AVAIL_ALIGN), ("used ring", USED_ALIGN))

    def part_lengths(self, size: int) -> tuple[int, int, int]:
        """Bytes of the three parts (`RING_PARTS`' order) of a ring of `size` descriptors."""
        return desc_table_size(size), avail_ring_size(size), used_ring_size(size)

    def _size_problem(self, size: int) -> str | None:
        """Why `size` cannot be this ring's size (split: a power of two), or None."""
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            return f"size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}"
        return None

    @property
    def size(self) -> int:
        """Number of descriptors; 0 means not configured."""
        return self._size

    @property
    def desc_addr(self) -> int:
        return self._desc_addr

    @property
    def avail_addr(self) -> int:
        return self._avail_addr

    @property
    def used_addr(self) -> int:
        return self._used_addr

    def set_size(self, size: int) -> None:
        """Set the ring size (SET_VRING_NUM): a power of two in 1..MAX_QUEUE_SIZE (split)."""
        problem = self._size_problem(size)
        if problem is not None:
            raise RingError(f"virtqueue {self.index}: {problem}")
        self._size = size
        self._drop_views()
        if self._addresses_set:
            self._check_mapped(self._desc_addr, self._avail_addr, self._used_addr)

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """Set the guest-physical addresses of the three ring parts (SET_VRING_ADDR).

        Each part must be aligned (`RING_PARTS`; split: 16/2/4) and, once the size is known,
        lie wholly inside one mapped region (as QEMU's vhost requires too), else RingError
        naming the values.
        """
        for (name, align), addr in zip(self.RING_PARTS, (desc, avail, used), strict=True):
            if addr < 0 or addr >= ADDRESS_LIMIT or addr % align:
                raise RingError(
                    f"virtqueue {self.index}: {name} address {addr:#x} is not a "
                    f"{align}-byte aligned 64-bit address"
                )
        if self._size:
            self._check_mapped(desc, avail, used)
        self._desc_addr, self._avail_addr, self._used_addr = desc, avail, used
        self._addresses_set = True
        self._drop_views()

    def _check_mapped(self, desc: int, avail: int, used: int) -> None:
        size = self._size
        for (name, _align), addr, length in zip(
            self.RING_PARTS, (desc, avail, used), self.part_lengths(size), strict=True
        ):
            try:
                self.memory.view(addr, length)
            except MemoryAccessError as exc:
                raise RingError(
                    f"virtqueue {self.index}: {name} at {addr:#x} length {length:#x} "
                    f"(size {size}) is not inside one mapped region"
                ) from exc

    def set_base(self, idx: int) -> None:
        """Set the next avail index to consume (SET_VRING_BASE); used_idx follows it."""
        if not 0 <= idx <= 0xFFFF:
            raise RingError(f"virtqueue {self.index}: base {idx} is not a 16-bit index")
        self.last_avail_idx = idx
        self.used_idx = idx
        self._restart()

    def _restart(self) -> None:
        """Forget what the indices' previous owner left: SET_VRING_BASE's second half."""
        self._unsignalled = 0
        self._signal_valid = False
        self._notify = True
        self._taken.clear()
        self._set_resubmit([])

    @property
    def base(self) -> int:
        """The ring's state as GET_VRING_BASE carries it (split: `last_avail_idx`)."""
        return self.last_avail_idx

    def reset(self) -> None:
        """Forget size, addresses, indices and error (device reset, ring stop)."""
        self._size = 0
        self._desc_addr = self._avail_addr = self._used_addr = 0
        self._addresses_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.error = None
        self._notify = True
        self._unsignalled = 0
        self._signal_valid = False
        self._taken.clear()
        self._detach_inflight()
        self._drop_views()

    @property
    def taken(self) -> tuple[int, ...]:
        """Heads of the chains taken (`pop_many`) and not yet completed (`add_used_many`),
        oldest first: what a device still holds."""
        return tuple(self._taken)

    @property
    def chains_popped(self) -> int:
        """Chains handed out so far (resubmitted ones too), less those given back
        (`rewind`): a running count whose difference across a drain says how many chains
        it took, in either layout."""
        return self._chains_popped

    def _took(self, chains: Sequence[DescriptorChain], resubmitted: int = 0) -> None:
        """Record chains just popped; the first `resubmitted` came from the resubmit list."""
        self._chains_popped += len(chains)
        for k, chain in enumerate(chains):
            self._taken[chain.head] = k < resubmitted

    def _completed(self, items: Sequence[tuple[int, int]]) -> None:
        taken = self._taken
        if taken:
            for head, _ in items:
                taken.pop(head, None)

    @property
    def signals(self) -> int:
        """How many interrupt decisions wanted an interrupt (a running count): what the
        runner divides completions by to learn how many each interrupt covered."""
        return self._signals

    @property
    def addresses_set(self) -> bool:
        """Whether `set_addresses` was called since the last reset."""
        return self._addresses_set

    @property
    def unsignalled(self) -> int:
        """Used entries published since the last signal decision."""
        return self._unsignalled

    @property
    def ready(self) -> bool:
        """Configured (size and addresses set) and not broken."""
        return self._size != 0 and self._addresses_set and self.error is None

    def fail(self, reason: str) -> None:
        """Put the queue into the error state; logs one WARNING the first time."""
        if self.error is None:
            self.error = reason
            log.warning("virtqueue %d: ring broken: %s", self.index, reason)
        self._drop_views()

    # ---------------------------------------------------------------- ring access

    def _drop_views(self) -> None:
        self._desc = self._avail = self._used = None
        self._cache_gen = -1

    def _rings(self) -> tuple[memoryview, memoryview, memoryview] | None:
        """The three ring views, re-resolved when the memory table changed; None if unusable."""
        if not self.ready:
            return None
        desc, avail, used = self._desc, self._avail, self._used
        if self._cache_gen == self.memory.generation and desc is not None:
            assert avail is not None and used is not None
            return desc, avail, used
        desc_len, avail_len, used_len = self.part_lengths(self._size)
        try:
            desc = self.memory.view(self._desc_addr, desc_len)
            avail = self.memory.view(self._avail_addr, avail_len)
            used = self.memory.view(self._used_addr, used_len)
        except MemoryAccessError as exc:
            self.fail(f"ring no longer mapped: {exc}")
            return None
        self._desc, self._avail, self._used = desc, avail, used
        self._cache_gen = self.memory.generation
        return desc, avail, used


    def available(self) -> int:
        """How many entries the driver published that were not popped yet, plus the heads
        left to resubmit (0 when the ring is not ready; a count the ring could not hold
        reads as 0: `pop_many` reports it)."""
        rings = self._rings()
        if rings is None:
            return 0
        avail_idx: int = _U16.unpack_from(rings[1], 2)[0]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        return (pending if pending <= self._size else 0) + self.resubmit_left

    def driver_depth(self) -> int | None:
        """With EVENT_IDX: how many requests the driver has published and not yet taken
        back (avail->idx minus the used_event it re-armed after its last look at the used
        ring), i.e. its queue depth as seen from here; None without EVENT_IDX, when the ring
        is not ready, or when used_event is not a position behind avail->idx (a driver
        asking for a later interrupt on purpose)."""
        if not self.event_idx:
            return None
        rings = self._rings()
        if rings is None:
            return None
        avail = rings[1]
        avail_idx: int = _U16.unpack_from(avail, 2)[0]
        used_event: int = _U16.unpack_from(avail, 4 + 2 * self._size)[0]
        depth = (avail_idx - used_event) & 0xFFFF
        return depth if depth <= self._size else None

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (empty, not ready, or the ring just broke)."""
        chains = self.pop_many(1)
        return chains[0] if chains else None


    def rewind(self, count: int) -> None:
        """Give back the last `count` popped chains, unused, so the next pop returns them again.

        Safe because popping writes nothing the driver reads except the avail event, which
        the next pop rewrites. A device uses it when buffers turn out too few for a frame.
        A chain served again from the resubmit list goes back to it; one from the avail ring
        is no longer in flight in the inflight region.
        """
        if not 0 <= count <= self._size:
            raise ValueError(f"virtqueue {self.index}: cannot rewind {count} chains")
        for _ in range(count):
            head, resubmitted = self._taken.popitem() if self._taken else (-1, False)
            self._unpop(head, resubmitted)
            self._chains_popped -= 1

    @abc.abstractmethod
    def _unpop(self, head: int, resubmitted: bool) -> None:
        """Give back the most recently popped chain (see `rewind`)."""

    # ---------------------------------------------------------------- crash recovery, migration

    def attach_inflight(self, view: memoryview | None) -> list[int]:
        """Track this ring's chains in `view` (its part of the INFLIGHT_SHMFD region,
        `inflight`) from now on, or stop tracking (None).

        Call it on a configured ring when it starts, before anything is popped. A region
        a previous back-end left state in is recovered (`SplitInflight.recover` against the
        used ring's idx): the heads it had taken and not completed are returned, oldest
        first, and `pop_many` serves them again before the avail ring; the ring's indices
        become the used ring's idx and that plus the heads in flight (whatever
        SET_VRING_BASE said). RegionError when the region does not fit this queue (then
        nothing is tracked) or the ring is not configured."""
        self._detach_inflight()
        self._set_resubmit([])
        if view is None:
            return []
        rings = self._rings()
        if rings is None:
            raise RegionError(f"virtqueue {self.index}: inflight region attached to a ring "
                              "that is not configured")
        split = SplitInflight(view, self._size)
        heads: list[int] = []
        ring_used: int = _U16.unpack_from(rings[2], 2)[0]
        if not split.attach():
            split.completed((), ring_used)      # a fresh region starts where the ring is
        else:
            heads = split.recover(ring_used)
            self.used_idx = ring_used
            self.last_avail_idx = (ring_used + len(heads)) & 0xFFFF
            self._taken.clear()
        self._inflight = split
        self._set_resubmit(heads)
        self._native_inflight(split)
        return heads

    @property
    def inflight_tracked(self) -> bool:
        """Whether chains are tracked in an inflight region."""
        return self._inflight is not None

    @property
    def resubmit_left(self) -> int:
        """Heads of the resubmit list not served again yet."""
        return len(self._resubmit) - self._resubmit_pos

    def _detach_inflight(self) -> None:
        self._inflight = None
        self._native_inflight(None)

    def _set_resubmit(self, heads: list[int]) -> None:
        self._resubmit = heads
        self._resubmit_pos = 0

    def _native_inflight(self, split: SplitInflight | None) -> None:
        """The compiled variant mirrors the tracking state into C."""

    def set_dirty_log(self, log: DirtyLog | None, used_addr: int | None = None) -> None:
        """Mark every page this ring writes in `log` (migration, VHOST_F_LOG_ALL): the
        writable buffers of each chain as it is completed (after its data), and, unless
        `used_addr` is None, the used ring at guest-physical `used_addr` (its
        `log_guest_addr`). None: no logging. Kept across ring stops and resets."""
        self._log = log
        self._log_used = used_addr if log is not None else None

    @property
    def dirty_log(self) -> DirtyLog | None:
        return self._log

    @property
    def pages_logged(self) -> int:
        """Pages this ring marked in its log that the log itself did not count (the
        compiled ring marks in C); `DirtyLog.pages_marked` counts the Python marks."""
        return 0

    def log_used_ring(self) -> None:
        """Mark the whole used ring dirty (a ring stopping for migration: its flags and
        avail event were written after the last completion)."""
        if self._log_used is not None and self._size:
            self._log_mark(self._log_used, self.part_lengths(self._size)[2])

    def _log_mark(self, gpa: int, length: int) -> None:
        if self._log is not None:
            self._log.mark(gpa, length)

    def add_used(self, head: int, length: int) -> None:
        """Return one chain to the driver: write the used element, then publish used->idx."""
        self.add_used_many(((head, length),))


    def _check_used(self, items: Sequence[tuple[int, int]]) -> None:
        """Refuse (ValueError) a used entry the driver could not make sense of: a device bug."""
        size = self._size
        for head, length in items:
            if not 0 <= head < size or not 0 <= length <= _MAX_CHAIN_BYTES:
                raise ValueError(
                    f"virtqueue {self.index}: add_used head {head} length {length} "
                    f"invalid for size {size}"
                )

    # ---------------------------------------------------------------- notifications


    # ---------------------------------------------------------------- the runner's part

    @property
    def polling(self) -> bool:
        """True while the runner polls this ring: a device finding it empty leaves kicks off
        (the runner asks for them again before it stops polling)."""
        runner = self.runner
        return runner is not None and runner.polling

    def signal_used(self) -> bool:
        """Call after each batch of add_used: the runner interrupts the driver if it asked
        for it (or holds the interrupt while it coalesces); returns whether it did."""
        runner = self.runner
        return runner is not None and runner.signal_used(self)

    def signal_target(self) -> tuple[int, int] | None:
        """How a compiled data path signals this ring as `signal_used` would.

        `(1, fd)`: decide in C and write eventfd `fd` when the driver wants an interrupt;
        `(0, -1)`: make no decision (no interrupt installed, or the host holds this ring's
        interrupts: the entries stay pending for the host's decision); None: only Python
        can interrupt (the call is a Python callable): decide in C, then `interrupt()`.
        """
        runner = self.runner
        return (0, -1) if runner is None else runner.signal_target()

    def interrupt(self) -> None:
        """Interrupt the driver now: a compiled path decided it wants one (see
        `signal_target`); does nothing when no interrupt is installed."""
        if self.runner is not None:
            self.runner.interrupt()

    def defer(self, chain: DescriptorChain) -> Any:
        """Complete `chain` later: returns a `completion.Completion` the device returns from
        `handle_chain` and completes (`complete(written)`, from any thread) when done.
        RuntimeError on a ring no runner serves."""
        if self.runner is None:
            raise RuntimeError(f"virtqueue {self.index}: no runner serves it; chains cannot "
                               "be completed later")
        return self.runner.defer(chain)

    def later(self, chain: DescriptorChain, result: object) -> None:
        """`handle_chain` returned `result` for `chain` instead of a byte count: a handle
        from `defer`, or an awaitable the runner runs (`device.drain` calls this)."""
        if self.runner is None:
            raise RuntimeError(f"virtqueue {self.index}: no runner serves it; chains cannot "
                               "be completed later")
        self.runner.later(chain, result)

    def spawn(self, awaitable: object, done: Callable[[Any, BaseException | None], None]
              ) -> Callable[[], bool]:
        """Run `awaitable` (work that is not a chain: a net handler's late answer) on the
        transport's asyncio loop; `done(result, exc)` is called on the ring's thread.
        Returns a function that cancels it. RuntimeError without a runner, TypeError when
        the transport runs no asyncio loop."""
        if self.runner is None:
            raise RuntimeError(f"virtqueue {self.index}: no runner serves it")
        return self.runner.spawn(awaitable, done)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback()` on the ring's thread soon; callable from any thread (RuntimeError
        without a runner, TypeError when the transport cannot)."""
        if self.runner is None:
            raise RuntimeError(f"virtqueue {self.index}: no runner serves it")
        self.runner.call_soon_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback()` on the ring's thread in `delay` seconds; call it on that thread
        (RuntimeError without a runner, TypeError when the transport has no timers)."""
        if self.runner is None:
            raise RuntimeError(f"virtqueue {self.index}: no runner serves it")
        self.runner.call_later(delay, callback)

    def publish(self, items: list[tuple[int, int]]) -> None:
        """`add_used_many` for chains completed now, through the runner, which keeps them
        behind older chains still in flight under VIRTIO_F_IN_ORDER (`device.drain`)."""
        if self.runner is None:
            self.add_used_many(items)
        else:
            self.runner.publish(items)

    # ---------------------------------------------------------------- ring mechanics

    @abc.abstractmethod
    def has_available(self) -> bool:
        """Whether the driver published entries we have not popped (False when not ready)."""

    @abc.abstractmethod
    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains (stops early if the ring breaks)."""

    @abc.abstractmethod
    def add_used_many(self, items: Sequence[tuple[int, int]]) -> None:
        """Return several chains with a single used->idx update (elements first)."""

    @abc.abstractmethod
    def needs_notification(self) -> bool:
        """Should the driver be interrupted for used entries added since the last decision?
        A query only; `decide_signal()` records that a decision was made."""

    def decide_signal(self) -> bool:
        """Make the interrupt decision for the entries published since the last one: returns
        whether the driver wants an interrupt, and counts them as handled either way."""
        need = self.needs_notification()
        if need:
            self._signals += 1
        if self._unsignalled:
            self._unsignalled = 0
            self._signal_valid = True
            self._signal_decided()
        return need

    def _signal_decided(self) -> None:
        """A decision covered the entries published so far (the packed ring forgets how
        far its used index moved)."""

    @abc.abstractmethod
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (used->flags NO_NOTIFY, or avail_event under EVENT_IDX)."""

    @abc.abstractmethod
    def enable_notifications(self, after_available: bool = False) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (the caller must re-poll).
        See `PythonVirtqueue.enable_notifications` for `after_available`."""

    def __repr__(self) -> str:
        state = "broken" if self.error else ("ready" if self.ready else "unconfigured")
        return (
            f"<Virtqueue {self.index} {state} size={self._size} "
            f"last_avail={self.last_avail_idx} used={self.used_idx}>"
        )




class PythonVirtqueue(Virtqueue):
    """The pure-Python reference implementation of the ring mechanics."""

    def __init__(self, memory: GuestMemory, index: int) -> None:
        check_fence_support()
        super().__init__(memory, index)


    def _pending(self, avail: memoryview) -> int | None:
        """Number of entries published and not yet popped; None (and fail) if impossible."""
        avail_idx: int = _U16.unpack_from(avail, 2)[0]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self._size:
            self.fail(
                f"avail idx {avail_idx} is {pending} ahead of last_avail_idx "
                f"{self.last_avail_idx} (size {self._size})"
            )
            return None
        return pending

    def has_available(self) -> bool:
        """Whether the driver published entries we have not popped (False when not ready)."""
        rings = self._rings()
        if rings is None:
            return False
        avail_idx: int = _U16.unpack_from(rings[1], 2)[0]
        return avail_idx != self.last_avail_idx or self._resubmit_pos < len(self._resubmit)


    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` chains: those left to resubmit first, then available ones (stops
        early if the ring breaks)."""
        rings = self._rings()
        if rings is None or limit <= 0:
            return []
        desc, avail, used = rings
        out = self._pop_resubmitted(desc, limit)
        again = len(out)
        if again == limit or self.error is not None:
            self._took(out, again)
            return out
        pending = self._pending(avail)
        if not pending:
            self._took(out, again)
            return out
        mask = self._size - 1
        inflight = self._inflight
        for _ in range(min(limit - again, pending)):
            slot = self.last_avail_idx & mask
            head = _U16.unpack_from(avail, 4 + 2 * slot)[0]
            try:
                chain = self._walk(desc, head)
            except _Broken as exc:
                self.fail(f"chain at avail slot {slot} (avail idx {self.last_avail_idx}): {exc}")
                break
            out.append(chain)
            if inflight is not None:
                inflight.popped(head)
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if len(out) > again and self.event_idx and self._notify:
            # Keep kicks coming: ask for one when the driver publishes the entry after these.
            _store_u16(used, 4 + USED_ELEM_SIZE * self._size, self.last_avail_idx)
        self._took(out, again)
        return out

    def _pop_resubmitted(self, desc: memoryview, limit: int) -> list[DescriptorChain]:
        out: list[DescriptorChain] = []
        while len(out) < limit and self._resubmit_pos < len(self._resubmit):
            head = self._resubmit[self._resubmit_pos]
            try:
                out.append(self._walk(desc, head))
            except _Broken as exc:
                self.fail(f"resubmitted chain at head {head}: {exc}")
                break
            self._resubmit_pos += 1
        return out

    def _unpop(self, head: int, resubmitted: bool) -> None:
        if resubmitted and self._resubmit_pos:
            self._resubmit_pos -= 1
            return
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        if self._inflight is not None and 0 <= head < self._size:
            self._inflight.given_back(head)


    def _walk(self, desc: memoryview, head: int) -> DescriptorChain:
        size = self._size
        if head >= size:
            raise _Broken(f"head index {head} >= size {size}")
        memory = self.memory
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        readable_len = writable_len = 0
        table: memoryview | bytes = desc
        table_len = size
        budget = size  # descriptors left before we call it a loop
        indirect = False
        i = head
        while True:
            if i >= table_len:
                where = "indirect table" if indirect else "descriptor table"
                raise _Broken(f"next index {i} >= {where} length {table_len}")
            budget -= 1
            if budget < 0:
                where = f"indirect table of {table_len}" if indirect else f"size {size}"
                raise _Broken(f"descriptor loop: chain longer than {where}")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            if addr + length > ADDRESS_LIMIT:
                raise _Broken(f"descriptor {i} addr {addr:#x} + len {length:#x} overflows 64 bits")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise _Broken(f"nested indirect descriptor {i} at addr {addr:#x}")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _Broken(f"descriptor {i} has both INDIRECT and NEXT (flags {flags:#x})")
                if length == 0 or length % DESC_SIZE or length > DESC_SIZE * MAX_QUEUE_SIZE:
                    raise _Broken(f"indirect table at {addr:#x} has bad length {length:#x}")
                try:
                    parts = memory.views(addr, length)
                except MemoryAccessError as exc:
                    raise _Broken(f"indirect table: {exc}") from None
                # A table spanning regions is copied; the copy also pins what we walk.
                table = parts[0] if len(parts) == 1 else b"".join(parts)
                table_len = budget = length // DESC_SIZE
                indirect = True
                i = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                writable_len += length
            elif writable:
                raise _Broken(
                    f"device-readable descriptor {i} (addr {addr:#x} len {length:#x}) "
                    "after a device-writable one"
                )
            else:
                readable.append((addr, length))
                readable_len += length
            if readable_len + writable_len > _MAX_CHAIN_BYTES:
                raise _Broken(
                    f"chain length {readable_len + writable_len:#x} overflows 32 bits "
                    f"at descriptor {i}"
                )
            if length:
                try:
                    memory.check(addr, length)
                except MemoryAccessError as exc:
                    raise _Broken(f"descriptor {i} buffer: {exc}") from None
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            i = nxt
        return DescriptorChain(memory, head, readable, writable, readable_len, writable_len)

    # ---------------------------------------------------------------- used ring


    def add_used_many(self, items: Sequence[tuple[int, int]]) -> None:
        """Return several chains with a single used->idx update (elements first)."""
        if not items:
            return
        rings = self._rings()
        if rings is None:
            log.debug("virtqueue %d: add_used on a queue that is not ready: dropped", self.index)
            return
        desc, used = rings[0], rings[2]
        self._check_used(items)
        inflight = self._inflight
        if inflight is not None:
            heads = [head for head, _ in items]
            inflight.completing(heads)
        mask = self._size - 1
        idx = self.used_idx
        for head, length in items:
            _USED_ELEM.pack_into(used, 4 + USED_ELEM_SIZE * (idx & mask), head, length)
            idx = (idx + 1) & 0xFFFF
        # Publish only after every element is written: the driver reads elements below idx.
        _store_u16(used, 2, idx)
        self.used_idx = idx
        self._unsignalled += len(items)
        self._completed(items)
        if inflight is not None:
            inflight.completed(heads, idx)
        if self._log is not None:
            self._log_chains(desc, items)

    def _log_chains(self, desc: memoryview, items: Sequence[tuple[int, int]]) -> None:
        """Mark the writable buffers of completed chains (walked again from the table, as
        the driver still owns them unchanged), then the used ring."""
        for head, _ in items:
            try:
                chain = self._walk(desc, head)
            except _Broken:
                continue        # the driver rewrote a chain it handed over: its loss
            for addr, length in chain.writable:
                self._log_mark(addr, length)
        self.log_used_ring()


    def needs_notification(self) -> bool:
        """Should the driver be interrupted for used entries added since the last signal?

        A query only; `signal_used()` is what records that a decision was made.
        """
        if self._unsignalled == 0:
            return False
        rings = self._rings()
        if rings is None:
            return False
        avail = rings[1]
        full_fence()   # used->idx was stored; the driver's used_event / flags are loaded next
        if self.event_idx:
            if not self._signal_valid or self._unsignalled >= 0x10000:
                return True
            used_event = _U16.unpack_from(avail, 4 + 2 * self._size)[0]
            old = (self.used_idx - self._unsignalled) & 0xFFFF
            return vring_need_event(used_event, self.used_idx, old)
        flags = _U16.unpack_from(avail, 0)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


    def disable_notifications(self) -> None:
        """Ask the driver not to kick (used->flags NO_NOTIFY, or avail_event under EVENT_IDX)."""
        self._notify = False
        rings = self._rings()
        if rings is None:
            return
        used = rings[2]
        if self.event_idx:
            # An event index the driver cannot reach: it lies just behind everything unconsumed.
            _store_u16(
                used, 4 + USED_ELEM_SIZE * self._size, (self.last_avail_idx - 1) & 0xFFFF
            )
        else:
            flags = _U16.unpack_from(used, 0)[0]
            _store_u16(used, 0, flags | VIRTQ_USED_F_NO_NOTIFY)


    def enable_notifications(self, after_available: bool = False) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (the caller must re-poll).

        With `after_available`, kicks are asked for only for entries the driver adds after
        those available now, and True means such entries came: for a device that leaves
        available entries unused until more come (receive buffers too few for a waiting
        frame). With EVENT_IDX that sets avail_event to avail->idx instead of
        last_avail_idx, which a driver adding buffers after the unused ones never crosses.
        """
        self._notify = True
        rings = self._rings()
        if rings is None:
            return False
        _desc, avail, used = rings
        start = _U16.unpack_from(avail, 2)[0] if after_available else self.last_avail_idx
        if self.event_idx:
            _store_u16(used, 4 + USED_ELEM_SIZE * self._size, start)
        else:
            flags = _U16.unpack_from(used, 0)[0]
            _store_u16(used, 0, flags & ~VIRTQ_USED_F_NO_NOTIFY & 0xFFFF)
        # The driver may have published between our last pop and the store above without
        # kicking; re-reading avail->idx after the store (fenced) closes that window.
        full_fence()
        avail_idx: int = _U16.unpack_from(avail, 2)[0]
        return bool(avail_idx != start)

