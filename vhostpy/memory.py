"""Guest memory: the regions a front-end shares with us, and bounds-checked access to them.

This module owns the mapping of guest RAM into this process (`GuestMemory`, `Region`), the
translation of guest-physical addresses (GPA) and front-end virtual addresses (UVA) to bytes, and
the checks that keep every access inside a mapped region.

It must never hand out a view that reaches outside a region, never map an fd past its end (a
later access would SIGBUS the whole process), never take ownership of a caller's fd, and never
know about rings, devices or the vhost-user protocol.

Every guest address and length is treated as hostile: ranges are checked against 2**64 and
against region ends before any slicing, so wraparound cannot land inside a valid region.

A front-end can still shrink its memfd (ftruncate) after we mapped it; the next access past the
new end raises SIGBUS. With the compiled extension, every mapping made by `map_fd` is registered
with the SIGBUS guard (`_guard.c`, installed when the first region is mapped): such a fault maps
a zero page over the hole, the access completes (reads see zeros, writes are discarded), and
`GuestMemory.faulted()` describes it until the region goes away. This covers the C ring walks
and the pure-Python copies through `view()` / `read()` / `write()` alike. The caller decides
what to do (the ring runner breaks the ring or drops the front-end). Limits: without the
extension (`VHOSTPY_IMPLEMENTATION=python`, or no compiled module) there is no guard and such a
fault kills the process; buffers given to `add_buffer` are the caller's and not guarded; a
system call handed a view over a hole (os.readv, os.pwritev, socket.send) fails with EFAULT
instead of faulting, and `faulted()` does not see it; a SIGBUS handler installed after the
first region was mapped (faulthandler.enable()) replaces the guard, which `map_fd` then logs.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _accel
from .errors import BackendError, FrontendError, MemoryAccessError

__all__ = ["ADDRESS_LIMIT", "GuestMemory", "Region"]

log = logging.getLogger(__name__)

#: One past the highest address a 64-bit guest (or front-end) can name.
ADDRESS_LIMIT = 1 << 64

_PAGE_SIZE = mmap.ALLOCATIONGRANULARITY


@dataclass(frozen=True)
class Region:
    """One contiguous piece of guest RAM, as the front-end described it.

    `mapping` is a writable memoryview of exactly this region's `size` bytes. It is not part of
    equality: two regions are the same region when the front-end's four numbers are the same.
    After `GuestMemory.remove()` or `clear()` the mapping is released and must not be used.
    """

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    mapping: memoryview = field(compare=False, repr=False)

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    @property
    def uva_end(self) -> int:
        """One past the last front-end virtual address of the region."""
        return self.userspace_addr + self.size

    def contains_gpa(self, gpa: int, length: int = 1) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.gpa_end


class _Slot:
    """A region plus what we must release when it goes away (not public)."""

    __slots__ = ("guard", "host", "mm", "region", "root")

    def __init__(
        self,
        region: Region,
        root: memoryview,
        mm: mmap.mmap | None,
        guard: _Guarded | None = None,
    ) -> None:
        self.region = region
        self.root = root  # the view `region.mapping` was sliced from
        self.mm = mm  # an mmap we created (map_fd) and must unmap; None for add_buffer
        self.guard = guard  # its registration with the SIGBUS guard (compiled path only)

    def release(self) -> None:
        # mmap.close() raises BufferError while any memoryview of it is alive. Release our own
        # views first; views held elsewhere keep the pages mapped (never a dangling pointer),
        # so on failure we drop our reference and let the garbage collector unmap it.
        for view in (self.region.mapping, self.root):
            try:
                view.release()
            except BufferError:
                pass
        guard, self.guard = self.guard, None
        if guard is not None:
            # Unregister before the unmap: a registration must never outlive its pages, or a
            # bus error in whatever is mapped there next would be swallowed.
            guard.unregister()
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                if guard is not None:
                    # Still mapped for views held elsewhere: guard it until the mmap object
                    # dies (its dealloc unmaps, then runs the finaliser).
                    try:
                        later = _Guarded.register(guard.start, guard.end)
                    except BackendError as exc:
                        log.warning("region gpa=%#x left unguarded: %s",
                                    self.region.guest_phys_addr, exc)
                    else:
                        weakref.finalize(self.mm, later.unregister)
                log.debug(
                    "region gpa=%#x size=%#x still has views; unmapped when they go",
                    self.region.guest_phys_addr,
                    self.region.size,
                )
            self.mm = None


class _Guarded:
    """One host range registered with the compiled SIGBUS guard (`_guard.c`); not public.

    `start` is the first byte of the mmap, `end` one past its last page. Exists only when the
    compiled extension is in use; `unregister()` must come before the range is unmapped.
    """

    __slots__ = ("end", "handle", "start")

    #: Whether the last check found the guard replaced by another SIGBUS handler (logged once).
    displaced = False

    def __init__(self, handle: int, start: int, end: int) -> None:
        self.handle = handle
        self.start = start
        self.end = end

    @classmethod
    def install(cls) -> None:
        """Install the process's SIGBUS handler (the first time) and check it is still ours."""
        lib = _accel.lib
        if lib.vp_guard_install() != 0:
            code = _accel.ffi.errno
            raise BackendError(f"cannot install the SIGBUS guard: {os.strerror(code)}")
        active = bool(lib.vp_guard_active())
        if not active and not cls.displaced:
            log.warning(
                "the SIGBUS guard over guest memory was replaced by another SIGBUS handler "
                "(faulthandler.enable() after the first region was mapped?): a front-end "
                "that truncates its memory will now kill the process"
            )
        cls.displaced = not active

    @classmethod
    def register(cls, start: int, end: int) -> _Guarded:
        """Register [start, end); BackendError when the guard's table is full."""
        handle = int(_accel.lib.vp_guard_register(start, end))
        if handle < 0:
            raise BackendError(
                f"cannot guard guest memory at {start:#x}..{end:#x}: too many regions mapped"
            )
        return cls(handle, start, end)

    @classmethod
    def for_mmap(cls, mm: mmap.mmap) -> _Guarded | None:
        """Register all of `mm`'s pages, or None when the compiled extension is not in use."""
        if _accel.lib is None:
            return None
        cls.install()
        with _accel.ffi.from_buffer("uint8_t[]", mm) as pin:
            start = int(_accel.ffi.cast("uintptr_t", pin))
        end = start + -(-len(mm) // mmap.PAGESIZE) * mmap.PAGESIZE
        return cls.register(start, end)

    def unregister(self) -> None:
        """Forget the range (idempotent)."""
        if self.handle >= 0:
            _accel.lib.vp_guard_unregister(self.handle)
            self.handle = -1

    def fault(self) -> tuple[int, int] | None:
        """(order, host address) of the first fault absorbed in the range, or None."""
        record = _accel.ffi.new("struct vp_guard_fault *")
        if self.handle < 0 or _accel.lib.vp_guard_fault(self.handle, record) != 1:
            return None
        # order 0: the handler is between claiming the fault and numbering it.
        return (int(record.order) or ADDRESS_LIMIT, int(record.addr))


def _check_range(gpa: int, length: int) -> None:
    if gpa < 0 or length < 0 or gpa + length > ADDRESS_LIMIT:
        raise MemoryAccessError(
            f"guest range gpa={gpa:#x} length={length:#x} is outside the 64-bit address space"
        )


class GuestMemory:
    """Guest RAM as a set of non-overlapping regions; all accesses bounds-checked.

    Regions never overlap in guest-physical or in front-end virtual address space. Lookups are
    a binary search over region starts. `generation` changes whenever the table changes, so a
    caller may cache views and re-resolve them when it moves.
    """

    def __init__(self) -> None:
        self._slots: list[_Slot] = []  # sorted by guest_phys_addr
        self._starts: list[int] = []  # guest_phys_addr of each slot, for bisect
        self._by_uva: list[_Slot] = []  # sorted by userspace_addr
        self._uva_starts: list[int] = []
        self._generation = 0
        # The compiled path's region table: (struct vp_mem *, its region array, the
        # from_buffer objects that pin each mapping), valid for `_native_gen` only.
        self._native: tuple[Any, Any, list[Any]] | None = None
        self._native_gen = -1
        # The guard's process-wide fault count when `faulted()` last found nothing.
        self._quiet_at = -1

    # ---------------------------------------------------------------- table changes

    def map_fd(
        self, fd: int, guest_phys_addr: int, size: int, userspace_addr: int, mmap_offset: int
    ) -> Region:
        """Map `size` bytes of `fd` from `mmap_offset` (MAP_SHARED, read/write) as a region.

        The fd's size is checked before mapping: a region that extends past the end of its
        file would SIGBUS on first touch. With the compiled extension the mapping is registered
        with the SIGBUS guard, so a later shrink of the fd is absorbed and reported by
        `faulted()` (see the module docstring). Does not take ownership of `fd`; the caller
        closes it.
        """
        self._check_new(guest_phys_addr, size, userspace_addr)
        if mmap_offset < 0:
            raise FrontendError(f"memory region mmap_offset {mmap_offset} is negative")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise FrontendError(f"memory region fd {fd} cannot be examined: {exc}") from exc
        if stat.S_ISREG(st.st_mode):
            if mmap_offset + size > st.st_size:
                raise FrontendError(
                    f"memory region past end of its fd: fd size {st.st_size:#x}, "
                    f"mmap_offset {mmap_offset:#x} + size {size:#x} = {mmap_offset + size:#x}"
                )
        elif not stat.S_ISCHR(st.st_mode):
            # Character devices (device DAX) have no fstat size; anything else cannot be RAM.
            raise FrontendError(
                f"memory region fd {fd} is not a regular file or character device "
                f"(mode {st.st_mode:#o})"
            )
        aligned = mmap_offset - mmap_offset % _PAGE_SIZE
        delta = mmap_offset - aligned
        try:
            mm = mmap.mmap(
                fd,
                delta + size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as exc:
            code = getattr(exc, "errno", None)
            message = (
                f"cannot map memory region fd {fd} offset {mmap_offset:#x} size {size:#x}: {exc}"
            )
            if code == errno.ENOMEM:
                raise BackendError(message) from exc
            raise FrontendError(message) from exc
        try:
            guard = _Guarded.for_mmap(mm)
        except BackendError:
            mm.close()
            raise
        root = memoryview(mm)
        region = Region(
            guest_phys_addr, size, userspace_addr, mmap_offset, root[delta : delta + size]
        )
        self._insert(_Slot(region, root, mm, guard))
        log.debug(
            "mapped region gpa=%#x size=%#x uva=%#x offset=%#x",
            guest_phys_addr,
            size,
            userspace_addr,
            mmap_offset,
        )
        return region

    def add_buffer(
        self, buf: Any, guest_phys_addr: int, userspace_addr: int | None = None
    ) -> Region:
        """Add an already-mapped writable buffer (mmap, bytearray) as a region.

        Used by in-process transports and tests. `userspace_addr` defaults to the guest-physical
        address (an identity mapping). The buffer is not closed by `remove()` or `clear()`.
        """
        base = memoryview(buf)
        if base.readonly:
            base.release()
            raise FrontendError("memory region buffer is read-only")
        root = base.cast("B")
        base.release()
        size = root.nbytes
        uva = guest_phys_addr if userspace_addr is None else userspace_addr
        try:
            self._check_new(guest_phys_addr, size, uva)
        except FrontendError:
            root.release()
            raise
        region = Region(guest_phys_addr, size, uva, 0, root[:])
        self._insert(_Slot(region, root, None))
        return region

    def remove(self, guest_phys_addr: int, size: int, userspace_addr: int | None = None) -> Region:
        """Remove the region with exactly this address and size (VHOST_USER_REM_MEM_REG)."""
        for i, slot in enumerate(self._slots):
            r = slot.region
            if (
                r.guest_phys_addr == guest_phys_addr
                and r.size == size
                and (userspace_addr is None or r.userspace_addr == userspace_addr)
            ):
                del self._slots[i]
                del self._starts[i]
                j = self._by_uva.index(slot)
                del self._by_uva[j]
                del self._uva_starts[j]
                self._generation += 1
                self._release_native()
                slot.release()
                return r
        uva = "any" if userspace_addr is None else f"{userspace_addr:#x}"
        raise FrontendError(
            f"no memory region gpa={guest_phys_addr:#x} size={size:#x} uva={uva} to remove"
        )

    def clear(self) -> None:
        """Drop all regions (SET_MEM_TABLE replaces the table; disconnect). Never raises."""
        slots = self._slots
        self._slots, self._starts, self._by_uva, self._uva_starts = [], [], [], []
        self._generation += 1
        self._release_native()
        for slot in slots:
            slot.release()

    def _check_new(self, gpa: int, size: int, uva: int) -> None:
        if size <= 0:
            raise FrontendError(f"memory region gpa={gpa:#x} has size {size}")
        for name, start in (("guest_phys_addr", gpa), ("userspace_addr", uva)):
            if start < 0 or start + size > ADDRESS_LIMIT:
                raise FrontendError(
                    f"memory region {name} {start:#x} + size {size:#x} overflows 64 bits"
                )
        for slot in self._slots:
            r = slot.region
            if gpa < r.gpa_end and r.guest_phys_addr < gpa + size:
                raise FrontendError(
                    f"memory region gpa={gpa:#x} size={size:#x} overlaps region "
                    f"gpa={r.guest_phys_addr:#x} size={r.size:#x}"
                )
            if uva < r.uva_end and r.userspace_addr < uva + size:
                raise FrontendError(
                    f"memory region uva={uva:#x} size={size:#x} overlaps region "
                    f"uva={r.userspace_addr:#x} size={r.size:#x}"
                )

    def _insert(self, slot: _Slot) -> None:
        r = slot.region
        i = bisect.bisect(self._starts, r.guest_phys_addr)
        self._slots.insert(i, slot)
        self._starts.insert(i, r.guest_phys_addr)
        j = bisect.bisect(self._uva_starts, r.userspace_addr)
        self._by_uva.insert(j, slot)
        self._uva_starts.insert(j, r.userspace_addr)
        self._generation += 1

    # ---------------------------------------------------------------- compiled path

    def native_table(self) -> Any:
        """The region table as a cffi `struct vp_mem *` (compiled path only).

        Valid until `generation` changes: then the next call builds a new one and the old
        one's host pointers are released (before any region is unmapped), so C code must
        re-fetch it whenever the generation moved, as `Virtqueue` does.
        """
        if self._native is not None and self._native_gen == self._generation:
            return self._native[0]
        self._release_native()
        ffi = _accel.ffi
        if ffi is None:
            raise RuntimeError("the compiled fast path is not in use")
        regions = ffi.new("struct vp_region[]", max(1, len(self._slots)))
        pins: list[Any] = []
        for k, slot in enumerate(self._slots):
            r = slot.region
            try:
                pin, host = pin_view(r.mapping, slot.root.obj)
            except ValueError as exc:
                raise AssertionError(f"region gpa={r.guest_phys_addr:#x}: {exc}") from exc
            pins.append(pin)
            regions[k].gpa = r.guest_phys_addr
            regions[k].size = r.size
            regions[k].host = host
        table = ffi.new("struct vp_mem *")
        table.n = len(self._slots)
        table.r = regions
        self._native = (table, regions, pins)
        self._native_gen = self._generation
        return table

    def _release_native(self) -> None:
        """Drop the compiled path's pins on the mappings (before they are unmapped)."""
        native, self._native = self._native, None
        self._native_gen = -1
        if native is None or _accel.ffi is None:
            return
        native[0].n = 0
        for pin in native[2]:
            _accel.ffi.release(pin)

    # ---------------------------------------------------------------- queries

    @property
    def regions(self) -> tuple[Region, ...]:
        """The current regions, sorted by guest-physical address."""
        return tuple(slot.region for slot in self._slots)

    @property
    def generation(self) -> int:
        """Changes whenever a region is added or removed (for callers that cache views)."""
        return self._generation

    @property
    def total_size(self) -> int:
        return sum(slot.region.size for slot in self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def find(self, gpa: int) -> Region | None:
        """The region holding guest-physical address `gpa`, or None."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._slots[i].region
            if gpa < r.gpa_end:
                return r
        return None

    def is_mapped(self, gpa: int, length: int) -> bool:
        """Whether every byte of [gpa, gpa+length) is mapped (possibly across regions)."""
        try:
            self.check(gpa, length)
        except MemoryAccessError:
            return False
        return True

    def check(self, gpa: int, length: int) -> None:
        """Raise MemoryAccessError unless [gpa, gpa+length) is mapped (possibly across regions)."""
        _check_range(gpa, length)
        end = gpa + length
        while gpa < end:
            r = self.find(gpa)
            if r is None:
                raise MemoryAccessError(
                    f"guest range gpa={gpa:#x} length={end - gpa:#x} is not mapped"
                )
            gpa = r.gpa_end

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest bytes [gpa, gpa+length), which must lie inside one region."""
        _check_range(gpa, length)
        if length == 0:
            return memoryview(bytearray())
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._slots[i].region
            off = gpa - r.guest_phys_addr
            if off + length <= r.size:
                return r.mapping[off : off + length]
        raise MemoryAccessError(
            f"guest range gpa={gpa:#x} length={length:#x} is not inside one mapped region"
        )

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering [gpa, gpa+length), which may span adjacent regions."""
        _check_range(gpa, length)
        out: list[memoryview] = []
        end = gpa + length
        while gpa < end:
            r = self.find(gpa)
            if r is None:
                raise MemoryAccessError(
                    f"guest range gpa={gpa:#x} length={end - gpa:#x} is not mapped"
                )
            off = gpa - r.guest_phys_addr
            n = min(r.size - off, end - gpa)
            out.append(r.mapping[off : off + n])
            gpa += n
        return out

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of guest bytes [gpa, gpa+length) (may span adjacent regions)."""
        parts = self.views(gpa, length)
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into guest memory at `gpa` (may span adjacent regions)."""
        src = memoryview(data).cast("B")
        pos = 0
        for part in self.views(gpa, src.nbytes):
            n = part.nbytes
            part[:] = src[pos : pos + n]
            pos += n

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address to guest-physical (range inside one region)."""
        if uva < 0 or length < 0 or uva + length > ADDRESS_LIMIT:
            raise MemoryAccessError(f"front-end range uva={uva:#x} length={length:#x} is invalid")
        i = bisect.bisect(self._uva_starts, uva) - 1
        if i >= 0:
            r = self._by_uva[i].region
            off = uva - r.userspace_addr
            if off < r.size and off + length <= r.size:
                return r.guest_phys_addr + off
        raise MemoryAccessError(
            f"front-end range uva={uva:#x} length={length:#x} is not inside one mapped region"
        )

    def faulted(self) -> str | None:
        """None while no access hit a hole, else one line describing the first one.

        A hole is a page of a region whose fd the front-end shrank after we mapped it; the
        SIGBUS guard made the access complete on a zero page (see the module docstring). The
        line names the region (gpa, size), its fd's size now and the faulting guest address.
        Sticky: the region's pages past the fd's end stay zero pages, so the answer stays until
        `clear()` or the removal of that region. Cheap when nothing faulted (one C call). Safe
        from any thread. Always None without the compiled extension (no guard: such an access
        kills the process instead).
        """
        lib = _accel.lib
        if lib is None:
            return None
        order = int(lib.vp_guard_fault_order())
        if order == self._quiet_at:
            return None  # no fault anywhere since the last look found none here
        # Read each slot's fields once: another thread may clear() while we look.
        first: tuple[int, int, Region, _Guarded, mmap.mmap | None] | None = None
        for slot in list(self._slots):
            guard, mm = slot.guard, slot.mm
            fault = guard.fault() if guard is not None else None
            if guard is not None and fault is not None and (first is None or fault[0] < first[0]):
                first = (fault[0], fault[1], slot.region, guard, mm)
        if first is None:
            self._quiet_at = order
            return None
        _, addr, r, guard, mm = first
        gpa = r.guest_phys_addr + addr - guard.start - r.mmap_offset % _PAGE_SIZE
        try:
            fd_size = f"{mm.size():#x}" if mm is not None else "unknown"
        except (OSError, ValueError) as exc:  # ValueError: unmapped by a concurrent clear()
            fd_size = f"unknown ({exc})"
        return (
            f"guest memory region gpa={r.guest_phys_addr:#x} size={r.size:#x} lost its "
            f"backing: fd size now {fd_size}, region maps fd bytes {r.mmap_offset:#x}.."
            f"{r.mmap_offset + r.size:#x}; first access to the hole at gpa={gpa:#x} "
            f"(reads there see zeros, writes never reach the front-end)"
        )

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.guest_phys_addr:#x}+{r.size:#x}" for r in self.regions)
        return f"<GuestMemory [{parts}]>"


def pin_view(view: memoryview, owner: Any = None) -> tuple[Any, Any]:
    """For C code: `(pin, pointer)`, a cffi pin on the object that owns `view`'s bytes
    (`owner`, by default `view.obj`: an mmap, a bytearray) and a `uint8_t *` to the view's
    first byte inside it. C may use the pointer while `pin` is alive.

    The owner is pinned, never a memoryview: the garbage collector may clear a memoryview
    in a reference cycle before the pin on it is released, and CPython then crashes
    releasing the pin; neither an mmap nor a bytearray takes part in cycles. ValueError when
    the view is read-only or does not lie inside `owner`."""
    ffi = _accel.ffi
    if ffi is None:
        raise RuntimeError("the compiled fast path is not in use")
    owner = view.obj if owner is None else owner
    try:
        pin = ffi.from_buffer("uint8_t[]", owner, require_writable=True)
        with ffi.from_buffer("uint8_t[]", view, require_writable=True) as probe:
            delta = int(ffi.cast("uintptr_t", probe)) - int(ffi.cast("uintptr_t", pin))
    except TypeError as exc:
        raise ValueError(f"cannot pin a buffer for C: {exc}") from exc
    if not 0 <= delta <= len(pin) - view.nbytes:
        raise ValueError("the view lies outside the object it was taken from")
    return pin, pin + delta
