"""The migration dirty log as the rings and devices keep it (`Virtqueue.set_dirty_log`),
for both ring implementations (`PythonVirtqueue`, and `CffiVirtqueue` when the extension
is built; the suite also runs whole under each implementation).

* After `add_used_many` the bits set are exactly the 4 KiB pages of the completed chains'
  writable buffers -- direct and indirect, across page boundaries, zero-length ones marking
  nothing -- plus the used ring's pages when its log address is given; nothing when the
  log is off, nothing at pop time; readable-only chains mark only the used ring. A seeded
  random run checks the same against a page model. Writes past the log's end are counted
  (`DirtyLog.outside` for Python, `CffiVirtqueue.log_outside` for C) and do not break the
  ring.
* The compiled device paths log too: a virtio-blk read served by `vp_blk_drain`, a frame
  written into a receive ring by `vp_net_rx_place`, and frames reflected by the compiled net
  transmit path (with Python's `add_used_many` and `pop_many` made to fail, so only C could
  have published them).
* A session: SET_LOG_BASE (LOG_SHMFD; reply u64 0) + SET_FEATURES with VHOST_F_LOG_ALL +
  SET_VRING_ADDR with VHOST_VRING_F_LOG: a served request marks its pages and the used
  ring's; without LOG_ALL nothing is marked; toggling LOG_ALL alone does not reach the
  device's set_features; a stopping ring marks its used ring.

Also: `Session.status()` counts the pages marked by either ring (C counts its own), and a
`CffiVirtqueue` collected in a reference cycle with its dirty log still set is collected
safely (run in a subprocess). Tests whose rings sit in such a cycle take the log off before
they end anyway (`release_logs`).
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout
from test_fastpath import _rig as net_rig
from test_net import frame, vhdr
from test_session import UVA, R
from test_session import Rig as SessionRig

from vhostpy import _accel
from vhostpy import protocol as p
from vhostpy.blk import BlockDevice
from vhostpy.dirtylog import DirtyLog, log_size
from vhostpy.memory import GuestMemory
from vhostpy.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    PythonVirtqueue,
    Virtqueue,
)
from vhostpy.virtqueue_cffi import CffiVirtqueue
from vhostpy.vring import DefaultVirtqueue

#: Every variant of Virtqueue: the pure-Python reference and (when built) the compiled one.
VARIANTS: list[type[Virtqueue]] = [PythonVirtqueue] + (
    [DefaultVirtqueue] if DefaultVirtqueue is not PythonVirtqueue else [])
needs_cffi = pytest.mark.skipif(
    _accel.lib is None,
    reason=f"the compiled data paths are not in use ({_accel.IMPLEMENTATION})")

PAGE = 4096                 # one bit of the log per 4 KiB guest page (written out here)
SIZE = 8
MEMORY = 1 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
LOG_ALL = 1 << p.VHOST_F_LOG_ALL

#: A buffer: guest-physical address, length, device-writable.
Buffer = tuple[int, int, bool]
ROOT = Path(__file__).resolve().parent.parent


def release_logs(*vqs: Virtqueue) -> None:
    """Take the log off rings that sit in a reference cycle with their runner before they
    become garbage (see test_a_garbage_ring_with_a_dirty_log_is_collected_safely)."""
    for vq in vqs:
        vq.set_dirty_log(None)


def ids(cls: type[Virtqueue]) -> str:
    return cls.__name__


def pages(gpa: int, length: int) -> set[int]:
    """The guest pages a buffer covers (none for an empty one)."""
    if length == 0:
        return set()
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def bits(log: bytes | bytearray | memoryview | mmap.mmap) -> set[int]:
    """The pages whose bits are set: bit n % 8 of byte n // 8 is page n."""
    return {8 * at + bit for at, value in enumerate(bytes(log)) for bit in range(8)
            if value >> bit & 1}


def put_chain(rb: RingBuilder, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
    """Publish a chain of `buffers` at the addresses given (readable ones first), directly
    in the descriptor table or through an indirect table; returns its head."""
    return rb.add_chain_at([(addr, length, WRITE if writable else 0)
                            for addr, length, writable in buffers], indirect=indirect)


def writable_pages(buffers: Sequence[Buffer]) -> set[int]:
    out: set[int] = set()
    for addr, length, writable in buffers:
        if writable:
            out |= pages(addr, length)
    return out


def fill(chains: Sequence[DescriptorChain]) -> list[tuple[int, int]]:
    """A device that fills every writable byte of each chain."""
    return [(c.head, c.write(b"\xa5" * c.writable_len)) for c in chains]


def outside(vq: Virtqueue) -> int:
    """Marks that reached past the log's end, wherever the variant counts them."""
    if isinstance(vq, CffiVirtqueue):
        return vq.log_outside
    log = vq.dirty_log
    assert log is not None
    return log.outside


class Ring:
    """One ring in 1 MiB of guest memory and a log covering all of it."""

    def __init__(self, cls: type[Virtqueue], *, log_bytes: int | None = None) -> None:
        self.mem: GuestMemory
        self.mem, self._buf = anon_memory(MEMORY)
        self.rb = RingBuilder(self.mem, SIZE, layout(SIZE))
        self.vq = self.rb.attach(cls(self.mem, 0))
        self.bitmap = bytearray(log_size(MEMORY) if log_bytes is None else log_bytes)
        self.log = DirtyLog(memoryview(self.bitmap))

    def used_pages(self, used_gpa: int | None) -> set[int]:
        return set() if used_gpa is None else pages(used_gpa, 6 + 8 * SIZE)


# ------------------------------------------------------------------ the ring marks its writes

#: Chains at fixed places; the ring's own parts are below 0x3000, RingBuilder's data area
#: (indirect tables) from 0x2000 to 0x42000, these buffers above it.
CHAINS: dict[str, tuple[list[Buffer], bool]] = {
    "across_a_boundary": ([(0x50000, 100, False), (0x51FF0, 0x20, True)], False),
    "indirect": ([(0x60000, 16, False), (0x61000, PAGE, True), (0x63FFF, 2, True)], True),
    "empty_buffer": ([(0x70000, 0, True), (0x71800, 0x2000, True)], False),
    "readable_only": ([(0x80000, 64, False), (0x81000, 3 * PAGE, False)], True),
    "indirect_wide": ([(0x90000, 3 * PAGE, True)], True),
}


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("used_gpa", [None, 0x7FFF0], ids=["no_used_log", "used_log"])
def test_completed_chains_mark_exactly_their_writable_pages(cls: type[Virtqueue],
                                                            used_gpa: int | None) -> None:
    r = Ring(cls)
    r.vq.set_dirty_log(r.log, used_gpa)
    heads = {name: put_chain(r.rb, bufs, indirect=indirect)
             for name, (bufs, indirect) in CHAINS.items()}
    chains = {c.head: c for c in r.vq.pop_many(SIZE)}
    assert sorted(chains) == sorted(heads.values())
    assert r.bitmap == bytes(len(r.bitmap))                  # taking a chain writes nothing
    first = ["empty_buffer", "across_a_boundary", "readable_only"]
    r.vq.add_used_many(fill([chains[heads[n]] for n in first]))
    expected = set().union(*(writable_pages(CHAINS[n][0]) for n in first))
    assert expected == {0x51, 0x52, 0x71, 0x72, 0x73}       # not page 0x70 (empty buffer)
    assert bits(r.bitmap) == expected | r.used_pages(used_gpa)
    if used_gpa is not None:
        assert r.used_pages(used_gpa) == {0x7F, 0x80}         # the whole used ring
    rest = ["indirect", "indirect_wide"]
    r.vq.add_used_many(fill([chains[heads[n]] for n in rest]))
    expected |= {0x61, 0x63, 0x64, 0x90, 0x91, 0x92}
    assert bits(r.bitmap) == expected | r.used_pages(used_gpa)
    assert outside(r.vq) == 0
    assert [h for h, _ in r.rb.get_used()] == [heads[n] for n in first + rest]


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("used_gpa", [None, 0x1000])
def test_readable_only_chains_mark_only_the_used_ring(cls: type[Virtqueue],
                                                      used_gpa: int | None) -> None:
    r = Ring(cls)
    r.vq.set_dirty_log(r.log, used_gpa)
    put_chain(r.rb, [(0x50000, 3 * PAGE, False)])
    put_chain(r.rb, [(0x60000, 10, False), (0x61000, 10, False)], indirect=True)
    r.vq.add_used_many([(c.head, 0) for c in r.vq.pop_many(SIZE)])
    assert len(r.rb.get_used()) == 2
    assert bits(r.bitmap) == r.used_pages(used_gpa)
    if used_gpa is not None:
        assert bits(r.bitmap) == {1}


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_no_log_marks_nothing(cls: type[Virtqueue]) -> None:
    r = Ring(cls)
    r.vq.set_dirty_log(r.log, 0x1000)
    r.vq.set_dirty_log(None, 0x1000)          # logging off: the used address goes with it
    assert r.vq.dirty_log is None
    bufs, indirect = CHAINS["indirect"]
    put_chain(r.rb, bufs, indirect=indirect)
    put_chain(r.rb, CHAINS["across_a_boundary"][0])
    r.vq.add_used_many(fill(r.vq.pop_many(SIZE)))
    r.vq.log_used_ring()
    assert len(r.rb.get_used()) == 2
    assert r.bitmap == bytes(len(r.bitmap))
    assert r.mem.read(0x61000, 4) == b"\xa5" * 4              # the data was written


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_log_used_ring_marks_the_used_ring_only_when_asked(cls: type[Virtqueue]) -> None:
    r = Ring(cls)
    r.vq.set_dirty_log(r.log)
    r.vq.log_used_ring()
    assert r.bitmap == bytes(len(r.bitmap))
    r.vq.set_dirty_log(r.log, 0x3FFC0)       # 70 bytes across pages 0x3f and 0x40
    r.vq.log_used_ring()
    assert bits(r.bitmap) == {0x3F, 0x40}


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_writes_past_the_logs_end_are_counted(cls: type[Virtqueue]) -> None:
    r = Ring(cls, log_bytes=1)                # pages 0 to 7 only
    r.vq.set_dirty_log(r.log, 0x1000)
    put_chain(r.rb, [(0x3000, 16, False), (0x7800, PAGE, True)])         # pages 7 and 8
    put_chain(r.rb, [(0x9000, 16, True)], indirect=True)               # page 9: outside
    put_chain(r.rb, [(0x6000, 8, True), (0xA0000, 0, True)])            # empty: nothing
    r.vq.add_used_many(fill(r.vq.pop_many(SIZE)))
    assert r.vq.error is None and len(r.rb.get_used()) == 3
    assert bits(r.bitmap) == {1, 6, 7}
    assert outside(r.vq) == 2
    assert r.mem.read(0x9000, 16) == b"\xa5" * 16


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("used_gpa", [None, 0x1000])
def test_random_chains_match_a_page_model(cls: type[Virtqueue], used_gpa: int | None) -> None:
    rng = random.Random(11)
    r = Ring(cls)
    r.vq.set_dirty_log(r.log, used_gpa)
    expected: set[int] = set()
    marks: dict[int, set[int]] = {}          # head -> pages its writable buffers cover
    held: dict[int, DescriptorChain] = {}
    completions = 0
    for _ in range(150):
        for _ in range(rng.randint(0, 3)):
            count = rng.randint(1, 4)
            indirect = rng.random() < 0.4
            r.rb.reclaim()
            if len(r.rb._free) < (1 if indirect else count):
                break
            readable = rng.randint(0, count - 1) if rng.random() < 0.8 else count
            bufs = []
            for k in range(count):
                length = rng.choice([0, 1, rng.randint(1, 3 * PAGE)])
                bufs.append((rng.randrange(0x50000, 0xFC000), length, k >= readable))
            head = put_chain(r.rb, bufs, indirect=indirect)
            marks[head] = writable_pages(bufs)
        for c in r.vq.pop_many(SIZE):
            held[c.head] = c
        assert bits(r.bitmap) == expected
        if held:
            batch = rng.sample(list(held), rng.randint(1, len(held)))
            r.vq.add_used_many(fill([held.pop(h) for h in batch]))
            for h in batch:
                expected |= marks.pop(h)
            expected |= r.used_pages(used_gpa)
            completions += len(batch)
            assert bits(r.bitmap) == expected
            r.rb.get_used()
        if rng.random() < 0.2:                 # the front-end collects and clears
            r.bitmap[:] = bytes(len(r.bitmap))
            expected = set()
    assert completions > 100 and outside(r.vq) == 0 and r.vq.error is None


# ------------------------------------------------------------------ compiled device paths

SECTOR = 512
BLK_HDR = struct.Struct("<IIQ")
T_IN, T_OUT = 0, 1


@needs_cffi
def test_a_read_served_by_the_compiled_blk_path_marks_its_buffers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dev = BlockDevice.in_memory(64 * SECTOR)
    try:
        image = random.Random(2).randbytes(64 * SECTOR)
        os.pwrite(dev.fd, image, 0)
        r = Ring(DefaultVirtqueue)
        assert isinstance(r.vq, CffiVirtqueue) and dev._fast is not None
        CallRunner(r.vq)
        dev.set_features(dev.features())
        dev.queue_started(0, r.vq)
        r.vq.set_dirty_log(r.log, r.rb.lay.used)

        def python_ring(*args: object) -> None:
            raise AssertionError("the ring was served through Python")
        monkeypatch.setattr(CffiVirtqueue, "add_used_many", python_ring)
        monkeypatch.setattr(CffiVirtqueue, "pop_many", python_ring)
        read = put_chain(r.rb, [(0x50000, 16, False), (0x61F00, 2 * SECTOR, True),
                                (0x70000, 1, True)], indirect=True)
        r.mem.write(0x50000, BLK_HDR.pack(T_IN, 0, 2))
        write = put_chain(r.rb, [(0x80000, 16, False), (0x81000, SECTOR, False),
                                 (0x90FFF, 1, True)])
        r.mem.write(0x80000, BLK_HDR.pack(T_OUT, 0, 9))
        dev.process_queue(0, r.vq)
        assert dev._fast.burst.served == 2
        assert r.rb.get_used() == [(read, 2 * SECTOR + 1), (write, 1)]
        assert r.mem.read(0x61F00, 2 * SECTOR) == image[2 * SECTOR:4 * SECTOR]
        assert r.mem.read(0x70000, 1) == r.mem.read(0x90FFF, 1) == b"\0"
        # The read's data and status pages, the write's status page, the used ring: not
        # the headers or the written data (device-readable).
        assert bits(r.bitmap) == {0x61, 0x62, 0x70, 0x90, 1}
    finally:
        release_logs(r.vq)
        dev.close()


def _no_python_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    def python_ring(*args: object) -> None:
        raise AssertionError("the ring was served through Python")
    monkeypatch.setattr(CffiVirtqueue, "add_used_many", python_ring)
    monkeypatch.setattr(CffiVirtqueue, "pop_many", python_ring)


@needs_cffi
def test_a_frame_placed_by_the_compiled_net_path_marks_its_buffer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rig = net_rig("cffi")          # no Python consumer on the port: C may place frames
    rx, tx = rig.rbs[0], rig.rbs[1]
    assert rig.dev._fast is not None and isinstance(rig.vqs[0], CffiVirtqueue)
    bitmap = bytearray(log_size(len(rig._buf)))
    log = DirtyLog(memoryview(bitmap))
    rig.vqs[0].set_dirty_log(log, rx.lay.used)
    rig.vqs[1].set_dirty_log(log, tx.lay.used)
    try:
        first, second = rig.post(2, size=6000)
        a, b = rig.bufs[0][first], rig.bufs[0][second]
        assert pages(b, 6000) - pages(a, 6000)         # the second has pages of its own
        _no_python_ring(monkeypatch)
        sent = frame(100, 3)
        assert rig.dev.transmit_to_guest([sent]) == 1
        [(_header, data, used)] = rig.received()
        assert data == sent and used == [(first, 12 + 100)]
        marked = bits(bitmap)
        assert pages(a, 12 + 100) | pages(rx.lay.used, 6 + 8 * rx.size) <= marked
        assert marked <= pages(a, 6000) | pages(rx.lay.used, 6 + 8 * rx.size)
        assert not marked & (pages(b, 6000) - pages(a, 6000))   # the unused buffer: untouched
    finally:
        release_logs(*rig.vqs.values())


@needs_cffi
def test_frames_reflected_by_the_compiled_net_path_mark_receive_buffers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rig = net_rig("cffi", reflect=True)
    assert isinstance(rig.vqs[0], CffiVirtqueue) and isinstance(rig.vqs[1], CffiVirtqueue)
    bitmap = bytearray(log_size(len(rig._buf)))
    log = DirtyLog(memoryview(bitmap))
    rx, tx = rig.rbs[0], rig.rbs[1]
    rig.vqs[0].set_dirty_log(log, rx.lay.used)
    rig.vqs[1].set_dirty_log(log, tx.lay.used)
    try:
        heads = rig.post(4)
        sent = [frame(300 + k, k) for k in range(3)]
        tx_buffers = [tx.add_chain([vhdr(), f])[1] for f in sent]
        _no_python_ring(monkeypatch)
        rig.process(1)
        assert len(tx.get_used()) == 3
        got = rig.received()
        assert [f for _, f, _ in got] == [f[6:12] + f[0:6] + f[12:] for f in sent]
        receive = set().union(*(pages(rig.bufs[0][h], 2048) for h in heads[:3]))
        used_rings = pages(rx.lay.used, 6 + 8 * rx.size) | pages(tx.lay.used, 6 + 8 * tx.size)
        marked = bits(bitmap)
        assert marked - used_rings <= receive
        for h, (_, f, used) in zip(heads, got, strict=False):
            assert used[0][0] == h and pages(rig.bufs[0][h], 12 + len(f)) <= marked
        # The transmit buffers were only read.
        transmit = set().union(*(pages(addr, 300) for addrs in tx_buffers for addr in addrs))
        assert not (transmit - receive - used_rings) & marked
        assert pages(rx.lay.used, 6 + 8 * rx.size) <= marked
    finally:
        release_logs(*rig.vqs.values())


# ------------------------------------------------------------------ a session


class LoggedRig:
    """A session rig with a dirty log handed over by SET_LOG_BASE at `offset` in its fd."""

    def __init__(self, offset: int = 64, size: int = 4096) -> None:
        self.rig = SessionRig()
        self.offset, self.size = offset, size
        self.log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        self.rig.ours.append(self.log_fd)
        os.ftruncate(self.log_fd, offset + size)

    def bitmap(self) -> bytes:
        return os.pread(self.log_fd, self.size, self.offset)

    def clear(self) -> None:
        os.pwrite(self.log_fd, bytes(self.size), self.offset)

    def set_log_base(self) -> list[p.Message]:
        return self.rig.send(R.SET_LOG_BASE, p.LogInfo(self.size, self.offset),
                             fds=[os.dup(self.log_fd)])

    def feature_hooks(self) -> list[int]:
        return [int(str(e[1])) for e in self.rig.device.events if e[0] == "features"]

    def serve(self, data: bytes) -> set[int]:
        """One echo request; returns the pages the driver's writable buffer covers."""
        head, out = self.rig.post(0, data)
        self.rig.session.kick(0)
        assert self.rig.rings[0].rb.get_used() == [(head, len(data))]
        assert self.rig.driver.read(out, len(data)) == data
        return pages(out, len(data))


def test_a_session_logs_while_log_all_is_acked() -> None:
    lr = LoggedRig()
    rig = lr.rig
    try:
        offered = rig.u64(R.GET_FEATURES)
        assert offered & LOG_ALL
        features = offered & ~LOG_ALL & ~(1 << 34)   # split rings
        rig.negotiate(features=features)
        assert p.ProtocolFeature.LOG_SHMFD in rig.session.protocol_features
        rig.mem_table()
        ring = rig.setup_ring(0)
        lay = ring.rb.lay
        assert lr.feature_hooks() == [features & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES)]
        assert lr.set_log_base() == [p.reply(R.SET_LOG_BASE, p.U64(0))]
        # A log, but LOG_ALL not acked: nothing is marked.
        lr.serve(b"a" * 5000)
        assert lr.bitmap() == bytes(lr.size)
        rig.must(R.SET_FEATURES, p.U64(features | LOG_ALL))
        written = lr.serve(b"b" * 5000)
        assert len(written) >= 2 and bits(lr.bitmap()) == written
        # The used ring is logged once its SET_VRING_ADDR asks (log_guest_addr: its gpa).
        lr.clear()
        rig.must(R.SET_VRING_ADDR, p.VringAddr(0, 1 << p.VHOST_VRING_F_LOG, UVA + lay.desc,
                                                UVA + lay.used, UVA + lay.avail, lay.used))
        used_ring = pages(lay.used, 6 + 8 * ring.rb.size)
        written = lr.serve(b"c" * 300)
        assert bits(lr.bitmap()) == written | used_ring
        # LOG_ALL off (migration cancelled): no more marks.
        lr.clear()
        rig.must(R.SET_FEATURES, p.U64(features))
        lr.serve(b"d" * 5000)
        assert lr.bitmap() == bytes(lr.size)
        # On again; the ring's log flag was kept.
        rig.must(R.SET_FEATURES, p.U64(features | LOG_ALL))
        written = lr.serve(b"e" * 10)
        assert bits(lr.bitmap()) == written | used_ring
        # Toggling LOG_ALL alone is not a new driver: the device heard of features once.
        assert len(lr.feature_hooks()) == 1
        # A ring stopping marks its used ring (flags and avail event written since).
        lr.clear()
        assert rig.get(R.GET_VRING_BASE, p.VringState(0, 0)) == p.VringState(0, 5)
        assert bits(lr.bitmap()) == used_ring
    finally:
        rig.close()


def test_set_log_base_needs_log_shmfd_and_logs_nothing_before_features() -> None:
    lr = LoggedRig(offset=0)
    rig = lr.rig
    try:
        offered = rig.u64(R.GET_FEATURES)
        protocol = rig.u64(R.GET_PROTOCOL_FEATURES) & ~int(p.ProtocolFeature.LOG_SHMFD)
        rig.must(R.SET_PROTOCOL_FEATURES, p.U64(protocol))
        rig.must(R.SET_OWNER)
        rig.must(R.SET_FEATURES, p.U64(offered & ~(1 << 34)))   # LOG_ALL, no log; split rings
        rig.mem_table()
        rig.setup_ring(0)
        assert rig.ack(R.SET_LOG_BASE, p.LogInfo(lr.size, 0), fds=[os.dup(lr.log_fd)]) != 0
        lr.serve(b"x" * 100)
        assert lr.bitmap() == bytes(lr.size)
        assert rig.session.rings[0].vq.dirty_log is None
    finally:
        rig.close()


def test_session_status_counts_the_pages_marked() -> None:
    lr = LoggedRig()
    rig = lr.rig
    try:
        rig.negotiate()                                   # everything offered: LOG_ALL too
        rig.mem_table()
        rig.setup_ring(0)
        assert lr.set_log_base() == [p.reply(R.SET_LOG_BASE, p.U64(0))]
        written = lr.serve(b"z" * 5000)
        assert bits(lr.bitmap()) == written
        status = rig.session.status()["dirty_log"]
        assert isinstance(status, dict) and status["logging"] is True
        assert status["pages_marked"] >= len(written)
    finally:
        rig.close()


#: A ring served by a `Vring` (vq.runner <-> ring.vq: a reference cycle) with a dirty log or
#: an inflight region attached, dropped without being detached, then collected.
GARBAGE_RING = """
import gc, mmap, sys
from vhostpy.device import Device
from vhostpy.dirtylog import DirtyLog
from vhostpy.inflight import queue_region_size
from vhostpy.memory import GuestMemory
from vhostpy.virtqueue_cffi import CffiVirtqueue
from vhostpy.vring import Vring

class Idle(Device):
    name = "idle"
    num_queues = 1

class Holder:
    pass

for _ in range(10):
    h = Holder()
    h.shared = bytearray(queue_region_size(8))   # the log or region the front-end shared
    h.view = memoryview(h.shared)
    h.mem, h.ram = GuestMemory(), mmap.mmap(-1, 1 << 16)
    h.mem.add_buffer(h.ram, 0)
    vq = CffiVirtqueue(h.mem, 0)
    vq.set_size(8)
    vq.set_addresses(0, 0x1000, 0x2000)
    Vring(Idle(), vq)
    if sys.argv[1] == "log":
        vq.set_dirty_log(DirtyLog(h.view), 0x2000)
    else:
        vq.attach_inflight(h.view)
    del h, vq
    gc.collect()
print("collected")
"""


def collect_garbage_ring(what: str) -> subprocess.CompletedProcess[str]:
    """GARBAGE_RING in a process of its own (what it shows kills the interpreter)."""
    return subprocess.run([sys.executable, "-c", GARBAGE_RING, what], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


@needs_cffi
def test_a_garbage_ring_with_a_dirty_log_is_collected_safely() -> None:
    result = collect_garbage_ring("log")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "collected"
