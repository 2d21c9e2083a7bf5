"""The compiled variant of `Virtqueue`: ring state in a C struct, ring walks in C.

`CffiVirtqueue` is the sibling of the pure-Python reference (`virtqueue.PythonVirtqueue`),
both implementing the abstract `Virtqueue`; it keeps the ring's state
(indices, notification flags, the count of unsignalled entries) in a cffi `struct vp_vq`,
which both languages read and write, and delegates `pop_many`, `add_used_many`, the
notification decisions and `has_available` to `_fastpath.c`. Configuration, checks of the
ring addresses, `fail()` and error reporting stay in the base class, so a hostile ring fails
with the same message and the same single WARNING line.

The C struct's ring pointers are host addresses inside the memory's region table; they are
re-resolved (`_sync`) whenever the memory's generation moves, so C never sees a mapping
that was removed. Importable without the extension; instantiable only with it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Any

from . import _accel
from .dirtylog import DirtyLog
from .errors import BackendError
from .inflight import PackedInflight, RecoveredChain, RegionError, SplitInflight
from .memory import GuestMemory, pin_view
from .virtqueue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue
from .virtqueue_packed import PackedVirtqueue

__all__ = ["CffiPackedVirtqueue", "CffiVirtqueue"]

ffi: Any = _accel.ffi
lib: Any = _accel.lib

_SEGS = 4096
_PDESC = struct.Struct("<QIHH")  # a packed ring descriptor: addr, len, id, flags


def _field(name: str, kind: type = int) -> property:
    """A Virtqueue attribute stored in the C struct."""

    def get(self: CffiVirtqueue) -> Any:
        return kind(getattr(self._q, name))

    def set_(self: CffiVirtqueue, value: Any) -> None:
        setattr(self._q, name, int(value))

    return property(get, set_)


class CffiVirtqueue(Virtqueue):
    """`Virtqueue` with the hot loops in C; same contract, same state, same failures."""

    last_avail_idx = _field("last_avail_idx")
    used_idx = _field("used_idx")
    event_idx = _field("event_idx", bool)
    in_order = _field("in_order", bool)
    _notify = _field("notify", bool)
    _unsignalled = _field("unsignalled")
    _signal_valid = _field("signal_valid", bool)
    _signals = _field("calls")
    chains_popped = _field("popped")   # C counts: its device paths pop without Python

    def __init__(self, memory: GuestMemory, index: int) -> None:
        if lib is None:
            raise BackendError("CffiVirtqueue needs the compiled fast path, which is not "
                               f"in use ({_accel.IMPLEMENTATION})")
        self._q: Any = ffi.new("struct vp_vq *")
        self._c_gen = -1
        self._table: Any = None
        self._chains: Any = None
        self._segs: Any = ffi.new("struct vp_seg[]", _SEGS)
        self._nsegs = _SEGS
        #: What C points into (kept alive here): the inflight part, the resubmit heads, the log.
        self._c_inflight: Any = None
        self._c_resubmit: Any = None
        self._c_log: Any = None
        super().__init__(memory, index)

    # ---------------------------------------------------------------- C state

    def _drop_views(self) -> None:
        super()._drop_views()
        self._c_gen = -1

    def reset(self) -> None:
        super().reset()
        self._q.broken = 0

    def _sync(self) -> Any:
        """The C struct, ready for a call (pointers valid now); None if the ring is unusable."""
        if self._c_gen == self.memory.generation:
            return self._q
        rings = self._rings()  # validates the addresses; fails the ring if unmapped
        if rings is None:
            return None
        table = self.memory.native_table()
        q, size = self._q, self._size
        self._set_c_size(size)
        q.mem = table
        desc_len, avail_len, used_len = self.part_lengths(size)
        q.desc = lib.vp_mem_ptr(table, self._desc_addr, desc_len)
        q.avail = lib.vp_mem_ptr(table, self._avail_addr, avail_len)
        q.used = lib.vp_mem_ptr(table, self._used_addr, used_len)
        if ffi.NULL in (q.desc, q.avail, q.used):  # cannot happen after _rings(): be safe
            self.fail("ring not inside one region of the native table")
            return None
        self._table = table
        self._c_gen = self.memory.generation
        return q

    def _set_c_size(self, size: int) -> None:
        """C's idea of the size (the packed ring sizes its per-id records here too)."""
        self._q.size = size

    def native(self) -> Any:
        """For device fast paths: the synced `struct vp_vq *`, or None if not usable."""
        return self._sync()

    # ---------------------------------------------------------------- crash recovery, migration

    def _native_inflight(self, split: SplitInflight | None) -> None:
        q = self._q
        if split is None:
            q.inflight, self._c_inflight = ffi.NULL, None
            return
        self._c_inflight, q.inflight = pin_view(split.view)
        q.inflight_counter = split.counter

    def _set_resubmit(self, heads: list[int]) -> None:
        super()._set_resubmit(heads)
        q = self._q
        self._c_resubmit = ffi.new("uint16_t[]", heads) if heads else None
        q.resubmit = self._c_resubmit if heads else ffi.NULL
        q.resubmit_n, q.resubmit_pos = len(heads), 0

    @property
    def resubmit_left(self) -> int:
        return int(self._q.resubmit_n - self._q.resubmit_pos)

    def set_dirty_log(self, log: DirtyLog | None, used_addr: int | None = None) -> None:
        super().set_dirty_log(log, used_addr)
        q = self._q
        if log is None:
            q.log, q.log_len, q.log_used, self._c_log = ffi.NULL, 0, 0, None
            return
        self._c_log, q.log = pin_view(log.view)
        q.log_len = log.view.nbytes
        q.log_used = int(used_addr is not None)
        q.log_used_gpa = used_addr or 0

    def _log_mark(self, gpa: int, length: int) -> None:
        lib.vp_log_mark(self._q, gpa, length)

    @property
    def log_outside(self) -> int:
        """Marks C made past the log's end."""
        return int(self._q.log_outside)

    @property
    def pages_logged(self) -> int:
        return int(self._q.log_marked)

    def _unpop(self, head: int, resubmitted: bool) -> None:
        lib.vp_unpop(self._q, head if head >= 0 else 0xFFFFFFFF, int(resubmitted))

    def check_broken(self) -> None:
        """After a C call that walks the ring: report a ring C found hostile via `fail()`."""
        if self._q.broken and self.error is None:
            self.fail(ffi.string(self._q.error).decode("utf-8", "replace"))

    # ---------------------------------------------------------------- ring access

    def has_available(self) -> bool:
        q = self._sync()
        return q is not None and bool(lib.vp_has_available(q))

    def available(self) -> int:
        q = self._sync()
        return 0 if q is None else int(lib.vp_available(q))

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        if limit <= 0:
            return []
        q = self._sync()
        if q is None:
            return []
        limit = min(limit, self._size)
        if self._chains is None or len(self._chains) < limit:
            self._chains = ffi.new("struct vp_chain[]", max(limit, 64))
        chains, segs = self._chains, self._segs
        n = lib.vp_pop(q, limit, chains, segs, self._nsegs)
        if n == 0 and q.seg_overflow:  # one chain with more descriptors than we had room for
            self._nsegs = self._size + MAX_QUEUE_SIZE + 1
            self._segs = segs = ffi.new("struct vp_seg[]", self._nsegs)
            n = lib.vp_pop(q, 1, chains, segs, self._nsegs)
        out: list[DescriptorChain] = []
        memory = self.memory
        again = 0
        for k in range(n):
            ch = chains[k]
            again += ch.resubmitted
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            for j in range(ch.first, ch.first + ch.nseg):
                seg = segs[j]
                (writable if seg.write else readable).append((seg.addr, seg.len))
            out.append(DescriptorChain(memory, ch.head, readable, writable, ch.readable_len,
                                       ch.writable_len))
        self.check_broken()
        self._took(out, again)
        return out

    # ---------------------------------------------------------------- used ring

    def add_used_many(self, items: Any) -> None:
        if not items:
            return
        q = self._sync()
        if q is None:
            return
        self._check_used(items)
        flat = ffi.new("uint32_t[]", list(itertools.chain.from_iterable(items)))
        lib.vp_add_used(q, flat, len(items))
        self._completed(items)

    # ---------------------------------------------------------------- notifications

    def needs_notification(self) -> bool:
        if self._q.unsignalled == 0:
            return False
        q = self._sync()
        return q is not None and bool(lib.vp_needs_notification(q))

    def decide_signal(self) -> bool:
        q = self._sync()
        if q is None:
            self._q.unsignalled = 0
            self._q.signal_valid = 1
            return False
        return bool(lib.vp_signal(q, -1))

    def disable_notifications(self) -> None:
        self._q.notify = 0
        q = self._sync()
        if q is not None:
            lib.vp_disable_notifications(q)

    def enable_notifications(self, after_available: bool = False) -> bool:
        self._q.notify = 1
        q = self._sync()
        return q is not None and bool(lib.vp_enable_notifications(q, int(after_available)))


class CffiPackedVirtqueue(CffiVirtqueue, PackedVirtqueue):
    """The compiled packed ring: `PackedVirtqueue`'s contract (layout, 32-bit base, buffer
    ids, event suppression, inflight tracking, the same checks and messages), with its state
    in the C struct (`packed` set) and its walks in `_fastpath_packed.c`, which the ring
    entry points `CffiVirtqueue` calls dispatch to. So every compiled device path serves it
    unchanged.

    Per buffer id C keeps a record (`struct vp_pid`: slots, writable buffers for the dirty
    log, its chain's entries in the inflight region), sized with the ring. Attaching an
    inflight region (and recovering one) is `PackedVirtqueue`'s Python; C then makes the
    region's stores itself, in `PackedInflight`'s order, from the state mirrored here.
    """

    avail_wrap = _field("avail_wrap", bool)
    used_wrap = _field("used_wrap", bool)
    _in_flight_slots = _field("in_flight_slots")
    _used_advance = _field("used_advance")

    def __init__(self, memory: GuestMemory, index: int) -> None:
        self._pids: Any = None
        self._pids_n = 0
        #: What C reads the resubmitted chains from (kept alive here).
        self._c_resubmit_descs: Any = None
        self._c_resubmit_first: Any = None
        super().__init__(memory, index)
        self._q.packed = 1

    def _set_c_size(self, size: int) -> None:
        q = self._q
        if size != self._pids_n:
            lib.vp_packed_forget(q)     # frees what the old records hold, q.size still theirs
            n = size
            pids = lib.vp_pids_new(n)
            if pids == ffi.NULL:
                raise MemoryError(f"virtqueue {self.index}: no memory for {n} buffer ids")
            self._pids = ffi.gc(pids, lambda p: lib.vp_pids_free(p, n))
            self._pids_n = n
            q.pid = self._pids
        q.size = size
        q.desc_gpa = self._desc_addr

    def _restart(self) -> None:
        super()._restart()
        self._forget_ids()

    def reset(self) -> None:
        super().reset()
        self._forget_ids()

    def _forget_ids(self) -> None:
        if self._pids is not None:
            lib.vp_packed_forget(self._q)
        self._q.in_flight_slots = self._q.used_advance = 0

    # ---------------------------------------------------------------- inflight tracking

    def _mirror_inflight(self, tracker: PackedInflight, chains: Sequence[RecoveredChain]
                         ) -> None:
        q = self._sync()
        if q is None:
            return
        self._c_inflight, q.inflight = pin_view(tracker.view)
        q.inflight_counter = tracker.counter
        q.pinf_free_head = tracker.free_head
        q.inflight_lost = 0
        lib.vp_packed_forget(q)
        q.in_flight_slots = sum(len(chain.descs) for chain in chains)
        entries = tracker.in_flight
        flat = bytearray()
        first = [0]
        for chain in chains:
            record = self._pids[chain.buf_id]
            record.slots = len(chain.descs)
            record.inf_head, record.inf_last = entries[chain.buf_id]
            for addr, length, buf_id, flags in chain.descs:
                flat += _PDESC.pack(addr, length, buf_id, flags)
            first.append(first[-1] + len(chain.descs))
        if chains:
            self._c_resubmit_descs = ffi.new("uint8_t[]", bytes(flat))
            self._c_resubmit_first = ffi.new("uint32_t[]", first)
            q.resubmit_descs, q.resubmit_first = self._c_resubmit_descs, self._c_resubmit_first

    def _set_resubmit(self, heads: list[int]) -> None:
        super()._set_resubmit(heads)
        if not heads:
            self._q.resubmit_descs = self._q.resubmit_first = ffi.NULL
            self._c_resubmit_descs = self._c_resubmit_first = None

    def check_broken(self) -> None:
        """Also: C found the region changed under the ring (tracking stopped there)."""
        q = self._q
        if q.inflight_lost:
            entry = q.inflight_lost - 1
            q.inflight_lost = 0
            self._lose_tracking(RegionError(f"inflight region: the free list leaves the queue "
                                            f"(entry {entry}, queue of {self._size})"))
        super().check_broken()

    def add_used_many(self, items: Any) -> None:
        """As `PackedVirtqueue.add_used_many`: ValueError (nothing written) for an id not
        handed out or given twice."""
        if not items or self._sync() is None:
            return
        self._check_used(items)
        pids, seen = self._pids, set()
        for buf_id, _ in items:
            if pids is None or buf_id >= self._pids_n or not pids[buf_id].taken \
                    or buf_id in seen:
                raise ValueError(f"virtqueue {self.index}: add_used id {buf_id} is not in flight")
            seen.add(buf_id)
        super().add_used_many(items)
        self.check_broken()

    def __repr__(self) -> str:
        return PackedVirtqueue.__repr__(self).replace("<PackedVirtqueue", "<CffiPackedVirtqueue")
