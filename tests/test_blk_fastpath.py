"""virtio-blk's compiled data path (`blk_cffi`, `_fastpath_blk.c`) against the pure-Python one.

The same request scripts run twice, once through `BlockDevice` on the pure-Python
`Virtqueue` with the fast path switched off, once through the compiled variant; everything
the driver or the operator can see must be identical: used entries and the whole used ring
(flags, avail event), guest buffers (data and status bytes), the image, `BlkStats`,
interrupts and WARNING lines. The scripts mix what C serves (IN, OUT, FLUSH, GET_ID, and
their failures) with what it hands back to Python (DISCARD, WRITE_ZEROES, unknown types, no
status byte), hostile rings, chains longer than C's segment array and IOV_MAX, and short
reads from an image that shrank. Last, the polling policy: a kick starts busy-polling only
when it brought at least `device.poll_after` chains (2 for virtio-blk). Without the
extension only the Python runs happen (the suite also runs whole under each implementation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout
from test_session import Rig as SessionRig

from vhostpy import _accel
from vhostpy.blk import BlockDevice
from vhostpy.loop import EventLoop
from vhostpy.virtqueue import PythonVirtqueue
from vhostpy.vring import DefaultVirtqueue, Vring

#: C-against-Python comparisons: they run in the suite's cffi pass (ci/test.sh runs both); in
#: the pure-Python pass, or where no compiler built the extension, there is no C side to compare.
needs_cffi = pytest.mark.skipif(
    _accel.lib is None,
    reason=f"compares the compiled path with Python; this run uses {_accel.IMPLEMENTATION}")

SECTOR = 512
SECTORS = 64
HDR = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR = 0, 1
RING = 256
DATA = 3 << 20

#: A request: readable buffers, writable buffer sizes, indirect?
Request = tuple[list[bytes], list[int], bool]


def _pieces(rng: random.Random, data: bytes, most: int = 3) -> list[bytes]:
    """`data` cut into 1..most pieces (possibly empty ones)."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(most)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _request(rng: random.Random) -> Request:
    kind = rng.choices(["in", "out", "flush", "id", "discard", "zeroes", "unknown", "nostatus",
                        "shorthdr"], [30, 30, 6, 6, 5, 5, 3, 3, 3])[0]
    indirect = rng.random() < 0.4
    sector = rng.choice([rng.randrange(SECTORS), SECTORS - 1, SECTORS, SECTORS + 3, 2**64 - 1])
    nbytes = rng.randrange(5) * SECTOR + (rng.randrange(1, SECTOR) if rng.random() < 0.1 else 0)
    status = [1] if rng.random() < 0.7 else []  # else the status shares the last data buffer
    if kind == "in":
        sizes = [len(p) for p in _pieces(rng, bytes(nbytes))]
        if not status:
            sizes[-1] += 1
        return _pieces(rng, HDR.pack(T_IN, 0, sector), 2), sizes + status, indirect
    if kind == "out":
        data = rng.randbytes(nbytes)
        return _pieces(rng, HDR.pack(T_OUT, rng.randrange(3), sector) + data, 4), [1], indirect
    if kind in ("flush", "id", "unknown"):
        rtype = {"flush": T_FLUSH, "id": T_GET_ID, "unknown": rng.choice([2, 5, 99])}[kind]
        writable = [rng.randrange(1, 40)] if kind == "id" else [1]
        if rng.random() < 0.2:
            writable.append(0)  # a trailing empty buffer: the status is before it
        return [HDR.pack(rtype, 0, 0)], writable, indirect
    if kind in ("discard", "zeroes"):
        rtype = T_DISCARD if kind == "discard" else T_WRITE_ZEROES
        seg = SEGMENT.pack(rng.randrange(SECTORS + 2), rng.randrange(4), rng.choice([0, 0, 1]))
        return [HDR.pack(rtype, 0, 0) + seg], [1], indirect
    if kind == "nostatus":
        return [HDR.pack(rng.choice([T_IN, T_OUT, T_FLUSH]), 0, 0)], rng.choice([[], [0]]), indirect
    return [HDR.pack(T_IN, 0, 0)[:rng.randrange(16)] or b"\0"], [SECTOR, 1], indirect


def script(seed: int, kicks: int = 12) -> list[list[Request]]:
    rng = random.Random(seed)
    out = []
    for k in range(kicks):
        count = 70 if k == 3 else rng.randrange(1, 12)   # one kick spans two bursts of 64
        out.append([_request(rng) for _ in range(count)])
        if k == 3:
            out[-1] = [(r, w, True) for r, w, _ in out[-1]]   # 70 one-descriptor chains
    return out


class Run:
    """One implementation's BlockDevice over one ring, recording what can be observed."""

    def __init__(self, impl: str, image: Path, *, read_only: bool = False,
                 event_idx: bool = False, call: str = "none", polling: bool = False,
                 size: int = RING, memory: int = 4 << 20) -> None:
        self.impl = impl
        self.dev = BlockDevice.open_image(str(image), read_only=read_only,
                                          serial="fastpath-serial")
        if impl == "python":
            self.dev._fast = None
        self.mem, self.buf = anon_memory(memory)
        self.lay = layout(size, data_size=memory - 2 * (16 * size + 8192) - 65536)
        self.rb = RingBuilder(self.mem, size, self.lay)
        cls = PythonVirtqueue if impl == "python" else DefaultVirtqueue
        self.vq = self.rb.attach(cls(self.mem, 0))
        self.vq.event_idx = event_idx
        self.runner = CallRunner(self.vq)
        self.runner.polling = polling
        self.calls = 0
        self.efd: int | None = None
        if call == "python":
            self.runner.call = self._count
        elif call == "eventfd":
            efd = self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.runner.call = lambda: os.eventfd_write(efd, 1)
            self.runner.call_fd = efd
        self.dev.set_features(self.dev.features())
        self.dev.queue_started(0, self.vq)
        self.trace: list[Any] = []

    def _count(self) -> None:
        self.calls += 1

    def interrupts(self) -> int:
        if self.efd is None:
            return self.calls
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def kick(self, requests: list[Request]) -> None:
        for readable, writable, indirect in requests:
            self.rb.add_chain(readable, writable, indirect=indirect)
        self.process()

    def process(self) -> None:
        self.dev.process_queue(0, self.vq)
        self.observe()

    def observe(self) -> None:
        used = self.lay.used
        self.trace.append((self.rb.get_used(), bytes(self.buf[used:used + 6 + 8 * self.rb.size]),
                           self.interrupts(), self.vq.error,
                           hashlib.sha256(self.buf[self.lay.data:self.lay.data_end]).hexdigest(),
                           dataclasses.asdict(self.dev.stats)))

    def result(self) -> list[Any]:
        size = os.fstat(self.dev.fd).st_size
        return [*self.trace, hashlib.sha256(os.pread(self.dev.fd, size, 0)).hexdigest()]

    def close(self) -> None:
        self.dev.close()
        if self.efd is not None:
            os.close(self.efd)


@pytest.fixture
def make_image(tmp_path: Path) -> Any:
    def make(name: str, size: int = SECTORS * SECTOR) -> Path:
        path = tmp_path / name
        path.write_bytes(random.Random(5).randbytes(size))
        return path
    return make


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    return lines


def both(caplog: pytest.LogCaptureFixture, make_image: Any, drive: Any, **kwargs: Any
         ) -> list[tuple[list[Any], list[str], Run]]:
    """`drive(run)` under each available implementation: (observations, warnings, run)."""
    caplog.set_level(logging.WARNING)
    out = []
    for impl in ("python", "cffi") if _accel.lib is not None else ("python",):
        run = Run(impl, make_image(f"{impl}.img"), **kwargs)
        try:
            drive(run)
            out.append((run.result(), _warnings(caplog), run))
        finally:
            run.close()
    if len(out) == 2:
        assert out[0][0] == out[1][0]
        assert out[0][1] == out[1][1]
        fast = out[1][2].dev._fast   # the compiled run did go through C
        assert fast is not None
        assert fast.burst.served == sum(len(o[0]) for o in out[1][0][:-1])
    return out


# ------------------------------------------------------------------ random scripts


@pytest.mark.parametrize(("seed", "options"), [
    (1, {}),
    (2, {"event_idx": True}),
    (3, {"call": "python"}),
    (4, {"call": "eventfd", "event_idx": True}),
    (5, {"read_only": True, "call": "eventfd"}),
    (6, {"polling": True, "event_idx": True, "call": "python"}),
    (7, {"polling": True}),
])
def test_scripts_identical(caplog: pytest.LogCaptureFixture, make_image: Any, seed: int,
                           options: dict[str, Any]) -> None:
    def drive(run: Run) -> None:
        for requests in script(seed):
            run.kick(requests)

    runs = both(caplog, make_image, drive, **options)
    obs, warnings, _ = runs[-1]
    stats = obs[-2][-1]
    assert stats["reads"] and stats["errors"] and warnings
    if not options.get("read_only"):
        assert stats["writes"]
    if options.get("call"):
        assert sum(o[2] for o in obs[:-1]) > 0


def test_every_kind_once(caplog: pytest.LogCaptureFixture, make_image: Any) -> None:
    data = random.Random(9).randbytes(2 * SECTOR)
    requests: list[Request] = [
        ([HDR.pack(T_OUT, 0, 4) + data], [1], False),
        ([HDR.pack(T_IN, 0, 4)], [SECTOR, SECTOR + 1], False),
        ([HDR.pack(T_DISCARD, 0, 0) + SEGMENT.pack(8, 2, 0)], [1], False),   # handed back
        ([HDR.pack(T_IN, 0, 4)], [2 * SECTOR, 1], True),
        ([HDR.pack(T_FLUSH, 0, 0)], [1], False),
        ([HDR.pack(T_GET_ID, 0, 0)], [20, 1], False),
        ([HDR.pack(T_WRITE_ZEROES, 0, 0) + SEGMENT.pack(4, 1, 1)], [1], True),
        ([HDR.pack(T_IN, 0, SECTORS)], [SECTOR, 1], False),                   # beyond capacity
        ([HDR.pack(T_OUT, 0, 0) + bytes(100)], [1], False),                   # not whole sectors
        ([HDR.pack(77, 0, 0)], [1], False),                                   # unknown: UNSUPP
        ([HDR.pack(T_OUT, 0, 0) + bytes(SECTOR)], [], False),                 # no status byte
        ([HDR.pack(T_IN, 0, 0)[:9]], [SECTOR, 1], False),                     # short header
        ([HDR.pack(T_IN, 0, 4)], [2 * SECTOR, 1], False),                     # sees zeroes
    ]
    runs = both(caplog, make_image, lambda run: run.kick(requests))
    obs, warnings, _ = runs[-1]
    used = obs[0][0]
    assert [n for _, n in used] == [1, 2 * SECTOR + 1, 1, 2 * SECTOR + 1, 1, 21, 1, 1, 1, 1, 0,
                                    1, 2 * SECTOR + 1]
    assert obs[0][-1] == {"reads": 3, "writes": 3, "flushes": 1, "bytes_read": 6 * SECTOR,
                          "bytes_written": 2 * SECTOR, "errors": 4, "unsupported": 1}
    assert len(warnings) == 5 and "beyond capacity 64" in warnings[0]


def test_read_only_device(caplog: pytest.LogCaptureFixture, make_image: Any) -> None:
    requests: list[Request] = [
        ([HDR.pack(T_OUT, 0, 1) + bytes(SECTOR)], [1], False),
        ([HDR.pack(T_IN, 0, 1)], [SECTOR, 1], False),
        ([HDR.pack(T_FLUSH, 0, 0)], [1], False),
    ]
    runs = both(caplog, make_image, lambda run: run.kick(requests), read_only=True)
    obs, warnings, _ = runs[-1]
    assert [n for _, n in obs[0][0]] == [1, SECTOR + 1, 1]
    reason = "write at sector 1 to a read-only device"
    assert warnings == [f"virtio-blk queue 0: request 0 failed: {reason}"]


# ------------------------------------------------------------------ short transfers


def test_short_read_of_a_shrunken_image(caplog: pytest.LogCaptureFixture,
                                        make_image: Any) -> None:
    def drive(run: Run) -> None:
        # The image loses its tail after the device sized itself: reads past the new end
        # come back short (partly filled buffers) and fail with IOERR, as in Python.
        os.ftruncate(run.dev.fd, 40 * SECTOR + 100)
        run.kick([([HDR.pack(T_IN, 0, 38)], [SECTOR, 2 * SECTOR, 1], False),
                  ([HDR.pack(T_IN, 0, 50)], [SECTOR, 1], True),
                  ([HDR.pack(T_IN, 0, 39)], [SECTOR, 1], False)])

    runs = both(caplog, make_image, drive)
    obs, warnings, _ = runs[-1]
    assert [n for _, n in obs[0][0]] == [1, 1, SECTOR + 1]
    prefix = "virtio-blk queue 0: request"
    assert warnings == [f"{prefix} 0 failed: short read: 1124 of 1536 bytes at sector 38",
                        f"{prefix} 4 failed: short read: 0 of 512 bytes at sector 50"]


def test_chain_longer_than_segments_and_iov_max(caplog: pytest.LogCaptureFixture,
                                                make_image: Any) -> None:
    # 4609 one-byte buffers (9 sectors and the status): more than C's segment array (4096)
    # and more than IOV_MAX (1024) per preadv / pwritev.
    data = random.Random(3).randbytes(9 * SECTOR)
    out = [HDR.pack(T_OUT, 0, 7)] + [data[i:i + 1] for i in range(len(data))]
    requests: list[Request] = [
        (out, [1], True),
        ([HDR.pack(T_IN, 0, 7)], [1] * (9 * SECTOR + 1), True),
        ([HDR.pack(T_IN, 0, 7)], [9 * SECTOR, 1], False),
    ]
    runs = both(caplog, make_image, lambda run: run.kick(requests), memory=8 << 20)
    obs, warnings, _ = runs[-1]
    assert [n for _, n in obs[0][0]] == [1, 9 * SECTOR + 1, 9 * SECTOR + 1]
    assert obs[0][-1]["bytes_read"] == 18 * SECTOR and not warnings


# ------------------------------------------------------------------ hostile rings


@pytest.mark.parametrize("good", [3, 70])
def test_hostile_ring_after_good_chains(caplog: pytest.LogCaptureFixture, make_image: Any,
                                        good: int) -> None:
    def drive(run: Run) -> None:
        for k in range(good):
            run.rb.add_chain([HDR.pack(T_OUT, 0, k % SECTORS) + bytes([k]) * SECTOR], [1],
                             indirect=True)
        run.rb.publish(RING + 5)   # a head index beyond the ring: the ring breaks here
        run.rb.add_chain([HDR.pack(T_FLUSH, 0, 0)], [1])
        run.process()
        run.process()              # a broken ring stays broken, nothing more is served

    runs = both(caplog, make_image, drive)
    obs, warnings, _ = runs[-1]
    published = 64 if good == 70 else 0   # the burst that popped the bad head is not published
    assert len(obs[0][0]) == published
    assert obs[0][-1]["writes"] == good
    assert "head index 261 >= size 256" in obs[0][3]
    reason = f"chain at avail slot {good} (avail idx {good}): head index 261 >= size 256"
    assert warnings == [f"virtqueue 0: ring broken: {reason}"]


def test_descriptor_loop(caplog: pytest.LogCaptureFixture, make_image: Any) -> None:
    def drive(run: Run) -> None:
        head, addrs = run.rb.add_chain([HDR.pack(T_IN, 0, 0)], [SECTOR, 1], publish=False)
        run.rb.write_desc(head, addrs[0], 16, 1, head)   # NEXT points at itself
        run.rb.publish(head)
        run.process()

    runs = both(caplog, make_image, drive)
    obs, _, _ = runs[-1]
    assert obs[0][3] is not None and "descriptor loop" in obs[0][3]


@needs_cffi
def test_python_virtqueue_under_cffi_uses_python_path(make_image: Any) -> None:
    run = Run("cffi", make_image("x.img"))
    try:
        run.vq = run.rb.attach(PythonVirtqueue(run.mem, 1))
        run.dev.queue_started(1, run.vq)
        run.kick([([HDR.pack(T_IN, 0, 0)], [SECTOR, 1], False)])
        assert run.trace[0][0][0][1] == SECTOR + 1
        assert run.dev._fast is not None and run.dev._fast.burst.served == 0
    finally:
        run.close()


# ------------------------------------------------------------------ polling policy


def test_session_poll_counts_chains() -> None:
    rig = SessionRig()   # the echo device behind a real Session
    try:
        rig.start(0)
        for k in range(3):
            rig.post(0, bytes([k]) * 8)
        assert rig.session.kick(0) == 3
        assert rig.session.kick(0) == 0
        rig.post(0, b"x")
        assert rig.session.rings[0].serve() == 1
    finally:
        rig.close()


@pytest.mark.parametrize(("poll_after", "served", "polls"), [
    (2, 1, False),    # virtio-blk at queue depth 1: no spin after each request
    (2, 2, True),
    (1, 1, True),     # the default (net): any progress starts polling
    (1, 0, False),
    (0, 9, False),    # never
])
def test_kick_starts_polling_per_device(monkeypatch: pytest.MonkeyPatch, poll_after: int,
                                        served: int, polls: bool) -> None:
    dev = BlockDevice.in_memory(SECTORS * SECTOR)
    dev.poll_after = poll_after
    loop = EventLoop()
    mem, _buf = anon_memory(1 << 20)
    rb = RingBuilder(mem, 8, layout(8))
    ring = Vring(dev, DefaultVirtqueue(mem, 0), loop)
    try:
        rb.attach(ring.vq)
        ring.start()
        ring.enable(True)
        assert ring.live
        monkeypatch.setattr(ring, "serve", lambda: served)
        ring.kick()
        assert ring.polling is polls
        assert ring.vq.polling is polls
    finally:
        ring.reset()
        loop.close()
        dev.close()
    assert BlockDevice.poll_after == 2
