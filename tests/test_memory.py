"""GuestMemory: fd-backed and buffer regions, translation, bounds checks, teardown."""

from __future__ import annotations

import gc
import mmap
import os
from collections.abc import Iterator

import pytest

from vhostpy import _accel
from vhostpy.errors import FrontendError, GuestError, MemoryAccessError
from vhostpy.memory import ADDRESS_LIMIT, GuestMemory, Region

PAGE = mmap.PAGESIZE


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vhostpy-test")
    os.ftruncate(fd, 16 * PAGE)
    for i in range(16):
        os.pwrite(fd, bytes([i]) * PAGE, i * PAGE)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.clear()


def test_map_fd_reads_and_writes_shared(mem: GuestMemory, memfd: int) -> None:
    r = mem.map_fd(memfd, 0x10000, 4 * PAGE, 0x7F0000000000, 2 * PAGE)
    assert r == Region(0x10000, 4 * PAGE, 0x7F0000000000, 2 * PAGE, memoryview(b""))
    assert mem.regions == (r,)
    assert len(mem) == 1 and mem.total_size == 4 * PAGE
    assert mem.read(0x10000, 4) == b"\x02" * 4
    assert mem.read(0x10000 + PAGE, 1) == b"\x03"
    mem.write(0x10000 + 5, b"hello")
    assert os.pread(memfd, 5, 2 * PAGE + 5) == b"hello"  # MAP_SHARED reaches the file
    v = mem.view(0x10000, 3)
    v[:] = b"abc"
    assert os.pread(memfd, 3, 2 * PAGE) == b"abc"
    v.release()


def test_caller_keeps_fd(mem: GuestMemory, memfd: int) -> None:
    mem.map_fd(memfd, 0, PAGE, 0, 0)
    os.fstat(memfd)  # still open: map_fd must not close it
    mem.clear()
    os.fstat(memfd)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 17 * PAGE), (15 * PAGE, 2 * PAGE), (16 * PAGE, PAGE), (100 * PAGE, PAGE), (1, 16 * PAGE)],
)
def test_fd_too_small_refused_before_mapping(
    mem: GuestMemory, memfd: int, offset: int, size: int
) -> None:
    with pytest.raises(FrontendError, match="fd size"):
        mem.map_fd(memfd, 0, size, 0, offset)
    assert mem.regions == ()


def test_bad_fd_and_sizes(mem: GuestMemory, memfd: int) -> None:
    with pytest.raises(FrontendError):
        mem.map_fd(-1, 0, PAGE, 0, 0)
    with pytest.raises(FrontendError):
        mem.map_fd(memfd, 0, 0, 0, 0)
    with pytest.raises(FrontendError):
        mem.map_fd(memfd, 0, PAGE, 0, -PAGE)
    r, w = os.pipe()
    try:
        with pytest.raises(FrontendError, match="not a regular file"):
            mem.map_fd(r, 0, PAGE, 0, 0)
    finally:
        os.close(r)
        os.close(w)


def test_read_only_fd_refused(mem: GuestMemory, memfd: int) -> None:
    ro = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY)
    try:
        with pytest.raises(FrontendError, match="cannot map"):
            mem.map_fd(ro, 0, PAGE, 0, 0)
    finally:
        os.close(ro)


def test_unaligned_offset(mem: GuestMemory, memfd: int) -> None:
    off = 3 * PAGE + 100
    mem.map_fd(memfd, 0x1000, 2 * PAGE, 0x5000, off)
    assert mem.read(0x1000, 1) == b"\x03"
    assert mem.read(0x1000 + PAGE - 101, 2) == b"\x03\x04"
    mem.write(0x1000, b"Z")
    assert os.pread(memfd, 1, off) == b"Z"
    # the last byte of the region is the file byte off + size - 1
    assert mem.read(0x1000 + 2 * PAGE - 1, 1) == os.pread(memfd, 1, off + 2 * PAGE - 1)
    with pytest.raises(MemoryAccessError):
        mem.read(0x1000 + 2 * PAGE - 1, 2)


def test_region_edges(mem: GuestMemory) -> None:
    buf = bytearray(range(256)) * 16
    mem.add_buffer(buf, 0x4000)
    assert mem.view(0x4000, 1).tobytes() == b"\x00"
    assert mem.view(0x4FFF, 1).tobytes() == b"\xff"
    assert mem.view(0x4000, 0x1000).nbytes == 0x1000
    assert mem.view(0x5000, 0).nbytes == 0  # empty range: allowed
    for gpa, n in [(0x3FFF, 1), (0x3FFF, 2), (0x4FFF, 2), (0x5000, 1), (0, 1), (0x4000, 0x1001)]:
        with pytest.raises(MemoryAccessError, match=f"{gpa:#x}"):
            mem.view(gpa, n)
    with pytest.raises(MemoryAccessError):
        mem.view(0x4000, -1)
    with pytest.raises(MemoryAccessError):
        mem.view(-1, 1)
    assert isinstance(MemoryAccessError("x"), GuestError)


def test_views_across_adjacent_regions(mem: GuestMemory) -> None:
    a, b, c = bytearray(b"a" * 100), bytearray(b"b" * 50), bytearray(b"c" * 10)
    mem.add_buffer(a, 1000)
    mem.add_buffer(c, 1200)  # gap 1150..1200
    mem.add_buffer(b, 1100)
    assert [r.guest_phys_addr for r in mem.regions] == [1000, 1100, 1200]
    with pytest.raises(MemoryAccessError):
        mem.view(1090, 20)  # single-region view refuses to span
    parts = mem.views(1090, 20)
    assert [p.tobytes() for p in parts] == [b"a" * 10, b"b" * 10]
    assert mem.read(1095, 10) == b"aaaaabbbbb"
    mem.write(1098, b"XYZW")
    assert a[-2:] == b"XY" and b[:2] == b"ZW"
    assert mem.is_mapped(1000, 150) and not mem.is_mapped(1000, 151)
    with pytest.raises(MemoryAccessError, match="0x47e"):  # 1150: where the gap starts
        mem.views(1140, 70)


def test_uva_to_gpa(mem: GuestMemory) -> None:
    mem.add_buffer(bytearray(0x1000), 0x0, userspace_addr=0x7000_0000)
    mem.add_buffer(bytearray(0x1000), 0x10000, userspace_addr=0x6000_0000)
    mem.add_buffer(bytearray(0x1000), 0x20000)  # identity uva
    assert mem.uva_to_gpa(0x7000_0000) == 0
    assert mem.uva_to_gpa(0x7000_0FFF) == 0xFFF
    assert mem.uva_to_gpa(0x6000_0010, 0x10) == 0x10010
    assert mem.uva_to_gpa(0x6000_0000, 0x1000) == 0x10000
    assert mem.uva_to_gpa(0x20800) == 0x20800
    for uva, n in [(0x7000_1000, 1), (0x6FFF_FFFF, 1), (0x6000_0FFF, 2), (0, 1), (-1, 1)]:
        with pytest.raises(MemoryAccessError):
            mem.uva_to_gpa(uva, n)


@pytest.mark.parametrize(
    ("gpa", "uva"),
    [(0x1800, 0x90000), (0x0800, 0x90000), (0x1FFF, 0x90000), (0x5000, 0x10800), (0x5000, 0xF800)],
)
def test_overlaps_refused(mem: GuestMemory, gpa: int, uva: int) -> None:
    mem.add_buffer(bytearray(0x1000), 0x1000, userspace_addr=0x10000)
    with pytest.raises(FrontendError, match="overlaps"):
        mem.add_buffer(bytearray(0x1000), gpa, userspace_addr=uva)
    assert len(mem) == 1


def test_overlap_refused_for_fd(mem: GuestMemory, memfd: int) -> None:
    mem.map_fd(memfd, 0, 4 * PAGE, 0x100000, 0)
    with pytest.raises(FrontendError, match="overlaps"):
        mem.map_fd(memfd, 3 * PAGE, 4 * PAGE, 0x200000, 0)
    mem.map_fd(memfd, 4 * PAGE, 4 * PAGE, 0x200000, 4 * PAGE)  # adjacent is fine
    assert mem.read(4 * PAGE - 1, 2) == b"\x03\x04"


def test_addresses_near_2_64(mem: GuestMemory) -> None:
    top = ADDRESS_LIMIT - 0x1000
    mem.add_buffer(bytearray(0x1000), top, userspace_addr=top)
    mem.add_buffer(bytearray(0x1000), 0)
    assert mem.view(ADDRESS_LIMIT - 1, 1).nbytes == 1
    # ranges that would wrap past 2**64 into the region at 0 are refused
    for gpa, n in [(ADDRESS_LIMIT - 1, 2), (ADDRESS_LIMIT - 0x10, 0x20), (ADDRESS_LIMIT, 1)]:
        with pytest.raises(MemoryAccessError):
            mem.view(gpa, n)
        with pytest.raises(MemoryAccessError):
            mem.views(gpa, n)
    with pytest.raises(MemoryAccessError):
        mem.views(ADDRESS_LIMIT - 1, 1 << 64)
    with pytest.raises(MemoryAccessError):
        mem.uva_to_gpa(ADDRESS_LIMIT - 1, 2)
    with pytest.raises(FrontendError, match="overflows"):
        mem.add_buffer(bytearray(0x2000), ADDRESS_LIMIT - 0x1000)


def test_remove(mem: GuestMemory, memfd: int) -> None:
    r = mem.map_fd(memfd, 0, PAGE, 0x1000, 0)
    mem.add_buffer(bytearray(PAGE), 0x100000)
    gen = mem.generation
    with pytest.raises(FrontendError):
        mem.remove(0, 2 * PAGE)
    with pytest.raises(FrontendError):
        mem.remove(0, PAGE, 0x2000)
    assert mem.remove(0, PAGE, 0x1000) == r
    assert mem.generation != gen
    assert [x.guest_phys_addr for x in mem.regions] == [0x100000]
    with pytest.raises(MemoryAccessError):
        mem.read(0, 1)
    with pytest.raises(MemoryAccessError):
        mem.uva_to_gpa(0x1000)
    mem.remove(0x100000, PAGE)
    assert mem.regions == ()


def test_clear_while_view_held(mem: GuestMemory, memfd: int) -> None:
    mem.map_fd(memfd, 0, 2 * PAGE, 0, 0)
    mem.add_buffer(mmap.mmap(-1, PAGE), 0x100000)
    held = mem.view(PAGE, 10)
    held_parts = mem.views(0, 2 * PAGE)
    mem.clear()  # must not raise although views are alive
    assert mem.regions == ()
    # the held view still refers to live pages (never a dangling pointer)
    held[0] = 0x55
    assert os.pread(memfd, 1, PAGE) == b"\x55"
    assert held_parts[0].nbytes == 2 * PAGE
    with pytest.raises(MemoryAccessError):
        mem.read(0, 1)
    held.release()
    # the table can be rebuilt afterwards
    mem.map_fd(memfd, 0, 2 * PAGE, 0, 0)
    assert mem.read(PAGE, 1) == b"\x55"


def test_read_only_buffer_refused(mem: GuestMemory) -> None:
    with pytest.raises(FrontendError, match="read-only"):
        mem.add_buffer(b"immutable", 0)


# ------------------------------------------------------------------ the SIGBUS guard (in-process)
# Truncating a mapped memfd is tested in child processes (tests/test_sigbus.py); here only what
# is safe to do inside pytest: the guard's bookkeeping and the answer while nothing faulted.


def _guard_registrations() -> int:
    gc.collect()  # mmaps kept alive by views of earlier tests unregister when they go
    return int(_accel.lib.vp_guard_registered())


def test_faulted_is_none_while_every_access_is_backed(mem: GuestMemory, memfd: int) -> None:
    assert mem.faulted() is None
    mem.map_fd(memfd, 0, 16 * PAGE, 0, 0)
    mem.add_buffer(bytearray(PAGE), 0x100000)
    mem.write(15 * PAGE, b"x" * PAGE)
    assert mem.read(0, 16 * PAGE)[-PAGE:] == b"x" * PAGE
    assert mem.faulted() is None


@pytest.mark.skipif(
    _accel.lib is None,
    reason="no SIGBUS guard without the compiled extension (VHOSTPY_IMPLEMENTATION=python)",
)
def test_guard_registrations_follow_the_region_table(mem: GuestMemory, memfd: int) -> None:
    base = _guard_registrations()
    mem.map_fd(memfd, 0, 4 * PAGE, 0, 0)
    mem.map_fd(memfd, 0x100000, 4 * PAGE, 0x100000, 4 * PAGE)
    mem.add_buffer(bytearray(PAGE), 0x200000)  # the caller's buffer: not guarded
    assert _guard_registrations() == base + 2
    assert _accel.lib.vp_guard_active() == 1
    mem.remove(0, 4 * PAGE)
    assert _guard_registrations() == base + 1
    held = mem.view(0x100000, 8)
    mem.clear()  # cannot unmap under `held`: stays guarded while mapped
    assert _guard_registrations() == base + 1
    held.release()
    assert _guard_registrations() == base
    with pytest.raises(FrontendError, match="fd size"):
        mem.map_fd(memfd, 0, 17 * PAGE, 0, 0)  # refused before mapping: nothing registered
    assert _guard_registrations() == base
