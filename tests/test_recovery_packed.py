"""Crash recovery of PACKED rings through the inflight region (vhost-user INFLIGHT_SHMFD,
the spec's packed layout), for `PackedVirtqueue` (the packed ring is pure Python under
either implementation; the suite runs under both).

* Sizes and field offsets of QueueRegionPacked / DescStatePacked, written out here from the
  spec (C layout: the descriptor array starts 8-aligned at byte 32).
* The region after every operation is byte for byte what an independent model of the
  spec's algorithm keeps (descriptor copies on a free list, `old_*` committed after each
  operation): seeded random lives of a few hundred steps across the rings' wrap, chains of
  one to three descriptors and indirect ones, out-of-order batches, rewinds, restarts.
* A back-end stopped after EVERY single store of a pop, of a batch of completions (also a
  batch of a whole ring's worth, which brings the used index back where it was with the
  wrap counter flipped), and of a rewind; the next back-end, started with a stale
  SET_VRING_BASE (QEMU's view after a crash), serves again exactly the chains taken and
  not published, oldest first, and every request reaches the driver exactly once.
* Hostile regions (version, desc_num, positions, wrap counters, free lists that loop, chains
  that overlap, leave the queue or do not make a chain, ids out of range or twice, leaked
  entries, counters no back-end reaches): RegionError, nothing written, the ring served
  untracked; a region changed while the ring runs stops tracking, not the ring; copies
  pointing outside guest memory break only the ring.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from fakeloop import FakeLoop
from ringbuilder import anon_memory
from test_session import EchoDevice, R
from test_session import Rig as SessionRig
from test_session_packed import echo as session_echo
from test_session_packed import packed_ring, state_of
from test_virtqueue_packed import PackedDriver, packed_layout

import vhostpy.inflight as inflight_mod
import vhostpy.virtqueue_packed as packed_mod
from vhostpy import protocol as p
from vhostpy.inflight import (
    PACKED_HEADER,
    PACKED_STATE,
    PackedInflight,
    RegionError,
    create_region,
    queue_offset,
    queue_region_size,
    queue_view,
    region_size,
)
from vhostpy.session import Session
from vhostpy.virtqueue import DescriptorChain, Virtqueue
from vhostpy.virtqueue_packed import PackedVirtqueue

SIZE = 8
AVAIL, USED, NEXT, WRITE, INDIRECT = 1 << 7, 1 << 15, 1, 2, 4

# The spec's packed layout, written out here rather than taken from vhostpy.inflight.
HDR = 32
FEATURES, VERSION, DESC_NUM, FREE_HEAD, OLD_FREE_HEAD = 0, 8, 10, 12, 14
USED_IDX, OLD_USED_IDX, USED_WRAP, OLD_USED_WRAP = 16, 18, 20, 21
ST = 32
S_INFLIGHT, S_NEXT, S_LAST, S_NUM, S_COUNTER, S_ID, S_FLAGS, S_LEN, S_ADDR = (
    0, 2, 4, 6, 8, 16, 18, 20, 24)


class Killed(Exception):
    """The back-end process died here."""


def put(region: bytearray | memoryview, at: int, fmt: str, value: int) -> None:
    struct.pack_into("<" + fmt, region, at, value)


def get(region: bytes | bytearray | memoryview, at: int, fmt: str) -> int:
    value: int = struct.unpack_from("<" + fmt, region, at)[0]
    return value


# ------------------------------------------------------------------ the spec, modelled


class SpecModel:
    """One packed queue's part of the region as the spec's algorithm leaves it."""

    def __init__(self, size: int, used: int, wrap: bool) -> None:
        self.size = size
        self.free_head = self.old_free_head = 0
        self.used_idx = self.old_used_idx = used
        self.used_wrap = self.old_used_wrap = int(wrap)
        self.inflight = [0] * size
        self.next = [j + 1 for j in range(size)]
        self.last = [0] * size
        self.num = [0] * size
        self.counter = [0] * size
        self.copy = [(0, 0, 0, 0)] * size         # addr, len, id, flags
        self.global_counter = 0
        self.entry_of: dict[int, int] = {}         # buffer id -> head entry (in flight)

    def popped(self, descs: list[tuple[int, int, int, int]]) -> None:
        head = self.old_free_head
        self.num[head] = 0
        self.counter[head] = self.global_counter
        self.global_counter += 1
        self.inflight[head] = 1
        for k, d in enumerate(descs):
            if k == len(descs) - 1:
                self.last[head] = self.free_head
            self.num[head] += 1
            self.copy[self.free_head] = d
            self.free_head = self.next[self.free_head]
        self.old_free_head = self.free_head
        self.entry_of[descs[-1][2]] = head

    def completed(self, ids: list[int], slots: list[int]) -> None:
        heads = [self.entry_of.pop(i) for i in ids]
        for head in heads:
            self.next[self.last[head]] = self.free_head
            self.free_head = head
        for n in slots:
            self.used_idx += n
            if self.used_idx >= self.size:
                self.used_idx -= self.size
                self.used_wrap ^= 1
        for head in heads:
            self.inflight[head] = 0
        self.old_free_head, self.old_used_idx = self.free_head, self.used_idx
        self.old_used_wrap = self.used_wrap

    def given_back(self, buf_id: int) -> None:
        head = self.entry_of.pop(buf_id)
        self.next[self.last[head]] = self.free_head
        self.free_head = self.old_free_head = head
        self.inflight[head] = 0

    def restarted(self) -> list[int]:
        """The next back-end's resubmit list (the region is consistent between
        operations, so recovery writes no change)."""
        self.global_counter = 1 + max(self.counter)
        heads = sorted(self.entry_of.values(), key=lambda h: self.counter[h])
        return [self.copy[self.last[h]][2] for h in heads]

    def image(self) -> bytes:
        out = bytearray(queue_region_size(self.size, packed=True))
        put(out, VERSION, "H", 1)
        put(out, DESC_NUM, "H", self.size)
        put(out, FREE_HEAD, "H", self.free_head)
        put(out, OLD_FREE_HEAD, "H", self.old_free_head)
        put(out, USED_IDX, "H", self.used_idx)
        put(out, OLD_USED_IDX, "H", self.old_used_idx)
        put(out, USED_WRAP, "B", self.used_wrap)
        put(out, OLD_USED_WRAP, "B", self.old_used_wrap)
        for e in range(self.size):
            at = HDR + ST * e
            addr, length, buf_id, flags = self.copy[e]
            put(out, at + S_INFLIGHT, "B", self.inflight[e])
            put(out, at + S_NEXT, "H", self.next[e])
            put(out, at + S_LAST, "H", self.last[e])
            put(out, at + S_NUM, "H", self.num[e])
            put(out, at + S_COUNTER, "Q", self.counter[e])
            put(out, at + S_ID, "H", buf_id)
            put(out, at + S_FLAGS, "H", flags)
            put(out, at + S_LEN, "I", length)
            put(out, at + S_ADDR, "Q", addr)
        return bytes(out)


# ------------------------------------------------------------------ a guest and its driver


class Guest:
    """Guest memory, the driver's side of one packed ring (`PackedDriver`), the ring's part
    of the inflight region, and what the driver submitted and got back: each request
    carries a unique tag the echoing device copies into its writable buffer."""

    def __init__(self, base: int = 0, size: int = SIZE) -> None:
        self.size = size
        self.mem, self._buf = anon_memory(1 << 20)
        self.drv = PackedDriver(self.mem, size, packed_layout(size))
        self.base = base
        self.drv.next_avail = self.drv.next_used = base & 0x7FFF
        self.drv.avail_wrap = self.drv.used_wrap = bool(base & 0x8000)
        self.region = bytearray(queue_region_size(size, packed=True))
        self.view = memoryview(self.region)
        self.pending: dict[int, tuple[bytes, int]] = {}   # buffer id -> (tag, its buffer)
        self.submitted: list[bytes] = []
        self.seen: list[bytes] = []
        #: Each chain's ring descriptors as the driver wrote them (used ones overwrite them).
        self.written: dict[int, list[tuple[int, int, int, int]]] = {}
        self._tags = itertools.count()

    def backend(self, base: int | None = None) -> PackedVirtqueue:
        """A back-end's ring as QEMU configures it; `base` defaults to where the ring first
        started: after a crash QEMU has nothing newer for a packed ring."""
        vq = PackedVirtqueue(self.mem, 0)
        vq.set_size(self.size)
        vq.set_base(self.base if base is None else base)
        lay = self.drv.lay
        vq.set_addresses(lay.desc, lay.driver, lay.device)
        return vq

    def first_backend(self) -> PackedVirtqueue:
        vq = self.backend()
        assert vq.attach_inflight(self.view) == [] and vq.inflight_tracked
        return vq

    def can_submit(self, descs: int) -> bool:
        return self.drv.num_free >= descs and bool(self.drv.free_ids)

    def submit(self, kind: int = 1) -> int:
        """kind 0: indirect (one slot), 1: readable + writable (two), 2: three slots."""
        tag = b"r%07d" % next(self._tags)
        readable = [tag[:3], tag[3:]] if kind == 2 else [tag]
        slot = self.drv.next_avail
        buf_id, addrs = self.drv.add_chain(readable, [len(tag)], indirect=kind == 0)
        assert buf_id not in self.pending
        self.written[buf_id] = self.ring_descs(slot, self.drv.chain_slots[buf_id])
        self.pending[buf_id] = (tag, addrs[-1])
        self.submitted.append(tag)
        return buf_id

    def collect(self) -> list[int]:
        """The driver reads the used ring: each entry a request in flight, echoed."""
        ids = []
        for buf_id, length in self.drv.get_used():
            assert buf_id in self.pending, f"used descriptor for id {buf_id}, not in flight"
            tag, addr = self.pending.pop(buf_id)
            assert length == len(tag) and self.mem.read(addr, len(tag)) == tag
            self.seen.append(tag)
            ids.append(buf_id)
        return ids

    def each_once(self) -> None:
        assert not self.pending, f"requests never completed: {self.pending}"
        assert sorted(self.seen) == sorted(self.submitted)
        assert len(set(self.seen)) == len(self.seen)

    def ring_descs(self, slot: int, count: int) -> list[tuple[int, int, int, int]]:
        """What the ring holds at `count` slots from `slot` (before anything overwrote it)."""
        out = []
        for k in range(count):
            at = self.drv.lay.desc + 16 * ((slot + k) % self.size)
            out.append(struct.unpack("<QIHH", self.mem.read(at, 16)))
        return out


def echo(chains: list[DescriptorChain]) -> list[tuple[int, int]]:
    return [(c.head, c.write(c.read())) for c in chains]


def all_clear(g: Guest) -> None:
    """Nothing in flight in the region, and every entry on the free list."""
    region = g.region
    assert [region[HDR + ST * e] for e in range(g.size)] == [0] * g.size
    seen, entry = set(), get(region, FREE_HEAD, "H")
    while entry < g.size:
        assert entry not in seen
        seen.add(entry)
        entry = get(region, HDR + ST * entry + S_NEXT, "H")
    assert seen == set(range(g.size))
    assert get(region, FREE_HEAD, "H") == get(region, OLD_FREE_HEAD, "H")
    assert region[USED_IDX:USED_IDX + 2] == region[OLD_USED_IDX:OLD_USED_IDX + 2]
    assert region[USED_WRAP] == region[OLD_USED_WRAP]


# ------------------------------------------------------------------ layout


def test_sizes_and_offsets_follow_the_spec_layout() -> None:
    assert (PACKED_HEADER.size, PACKED_STATE.size) == (HDR, ST) == (32, 32)
    assert queue_region_size(256, packed=True) == 32 + 32 * 256 + 32 == 8256   # 64-aligned
    assert queue_region_size(3, packed=True) == 128
    assert region_size(2, 256, packed=True) == 2 * 8256
    assert queue_offset(1, 256, packed=True) == 8256
    assert region_size(2, 256) == 2 * 4160                      # split: unchanged
    fields = PACKED_STATE.unpack(struct.pack("<BxHHHQHHIQ", 1, 2, 3, 4, 5, 6, 7, 8, 9))
    assert fields == (1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_queue_view_and_create_region() -> None:
    fd, region = create_region(2, 5, packed=True)
    try:
        assert len(region) == region_size(2, 5, packed=True) == 2 * 192
        view = queue_view(region, 1, 5, packed=True)
        assert len(view) == 192
        q = PackedInflight(view, 5)
        assert q.attach(3, False) is False
        assert region[192 + VERSION] == 1 and region[192 + USED_IDX] == 3
        with pytest.raises(RegionError, match="ends at"):
            queue_view(region, 2, 5, packed=True)
        with pytest.raises(RegionError, match="ends at"):
            queue_view(region, 1, 5, packed=True, offset=1)
        view.release()
        q.view.release()
    finally:
        region.close()
        os.close(fd)


def test_a_fresh_region_is_initialised_at_the_rings_used_position() -> None:
    g = Guest(base=position(5, True))
    g.region[:] = b"\xff" * len(g.region)          # garbage, but version 0 says fresh
    put(g.region, VERSION, "H", 0)
    vq = g.backend()
    assert vq.attach_inflight(g.view) == []
    assert bytes(g.region) == SpecModel(SIZE, 5, True).image()


def test_region_bytes_step_by_step() -> None:
    g = Guest()
    vq = g.first_backend()
    ids = [g.submit(1), g.submit(0), g.submit(2)]          # slots 0-1, 2, 3-5
    descs = g.ring_descs(0, 6)
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == ids == [0, 1, 2]
    r = g.region
    # chain 0: entries 0, 1; chain 1 (indirect): entry 2; chain 2: entries 3, 4, 5
    assert (r[HDR], get(r, HDR + S_NUM, "H"), get(r, HDR + S_LAST, "H"),
            get(r, HDR + S_COUNTER, "Q")) == (1, 2, 1, 0)
    assert struct.unpack_from("<HHIQ", r, HDR + ST * 1 + S_ID) == (
        descs[1][2], descs[1][3], descs[1][1], descs[1][0])
    assert (r[HDR + ST * 2], get(r, HDR + ST * 2 + S_NUM, "H"),
            get(r, HDR + ST * 2 + S_COUNTER, "Q")) == (1, 1, 1)
    assert get(r, HDR + ST * 2 + S_FLAGS, "H") & INDIRECT
    assert (get(r, HDR + ST * 3 + S_NUM, "H"), get(r, HDR + ST * 3 + S_LAST, "H")) == (3, 5)
    assert get(r, FREE_HEAD, "H") == get(r, OLD_FREE_HEAD, "H") == 6
    vq.add_used_many(echo([chains[2], chains[0]]))        # out of order, one batch
    # chain 2's last entry (5) links to the old free head (6), then chain 0's (1) to 3.
    assert get(r, HDR + ST * 5 + S_NEXT, "H") == 6 and get(r, HDR + ST * 1 + S_NEXT, "H") == 3
    assert get(r, FREE_HEAD, "H") == get(r, OLD_FREE_HEAD, "H") == 0
    assert get(r, USED_IDX, "H") == get(r, OLD_USED_IDX, "H") == 5    # 3 + 2 slots
    assert r[HDR] == r[HDR + ST * 3] == 0 and r[HDR + ST * 2] == 1
    assert sorted(g.collect()) == [0, 2]


# ------------------------------------------------------------------ random lives


def random_life(seed: int, steps: int = 300, size: int = SIZE,
                base: int = 0) -> None:
    rng = random.Random(seed)
    g = Guest(base, size)
    vq = g.first_backend()
    model = SpecModel(size, base & 0x7FFF, bool(base & 0x8000))
    avail: list[int] = []              # made available, not taken
    resubmit: list[int] = []           # to serve again, oldest first
    taken: dict[int, DescriptorChain] = {}
    slots_of: dict[int, int] = {}
    met = {"restart": 0, "rewind": 0, "wrap": 0, "indirect": 0, "batch": 0}

    def check(step: int, what: str) -> None:
        assert bytes(g.region) == model.image(), f"step {step} ({what})"
        assert (vq.used_idx, vq.used_wrap) == (model.used_idx, bool(model.used_wrap))

    for step in range(steps + 1):
        roll = rng.random()
        if step == steps:
            chains = vq.pop_many(size)
            assert [c.head for c in chains] == resubmit + avail
            for c in chains[len(resubmit):]:
                model.popped(g.written[c.head])
            taken.update({c.head: c for c in chains})
            ids = list(taken)
            vq.add_used_many(echo(list(taken.values())))
            model.completed(ids, [slots_of[i] for i in ids])
            g.collect()
            check(step, "last")
            break
        if roll < 0.3:
            for _ in range(rng.randint(1, 3)):
                kind = rng.choice((0, 1, 1, 2))
                if not g.can_submit(1 if kind == 0 else kind + 1):
                    break
                buf_id = g.submit(kind)
                slots_of[buf_id] = len(g.written[buf_id])
                met["indirect"] += kind == 0
                avail.append(buf_id)
        elif roll < 0.6:
            limit = rng.randint(1, 4)
            chains = vq.pop_many(limit)
            assert [c.head for c in chains] == (resubmit + avail)[:limit], f"step {step}"
            sources = []
            for c in chains:
                if resubmit and c.head == resubmit[0]:
                    resubmit.pop(0)
                    sources.append("resubmit")
                else:
                    assert avail.pop(0) == c.head
                    model.popped(g.written[c.head])
                    sources.append("avail")
                taken[c.head] = c
            check(step, "pop")
            if chains and rng.random() < 0.3:
                count = rng.randint(1, len(chains))
                vq.rewind(count)
                met["rewind"] += 1
                for c, source in reversed(list(zip(chains, sources, strict=True))[-count:]):
                    del taken[c.head]
                    if source == "resubmit":
                        resubmit.insert(0, c.head)
                    else:
                        avail.insert(0, c.head)
                        model.given_back(c.head)
                check(step, "rewind")
        elif roll < 0.94:
            if not taken:
                continue
            batch = rng.sample(list(taken), rng.randint(1, min(4, len(taken))))
            before = vq.used_wrap
            vq.add_used_many(echo([taken.pop(i) for i in batch]))
            met["wrap"] += vq.used_wrap != before
            met["batch"] += len(batch) > 1
            model.completed(batch, [slots_of[i] for i in batch])
            assert g.collect() == batch
            check(step, "complete")
        else:
            last = (vq.last_avail_idx, vq.avail_wrap)
            vq = g.backend()                            # a stale SET_VRING_BASE
            ids = vq.attach_inflight(g.view)
            assert ids == model.restarted()
            assert sorted(ids) == sorted([*taken, *resubmit])
            assert (vq.last_avail_idx, vq.avail_wrap) == last
            resubmit, taken = list(ids), {}
            met["restart"] += 1
            check(step, "restart")
    g.each_once()
    all_clear(g)
    assert all(met.values()), met


def position(idx: int, wrap: bool) -> int:
    """A SET_VRING_BASE value with both positions at (`idx`, `wrap`)."""
    half = idx | wrap << 15
    return half | half << 16


@pytest.mark.parametrize("size, base", [(8, 0), (8, position(6, True)), (5, position(3, False)),
                                        (16, position(0, True))])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_life_matches_the_spec_model(seed: int, size: int, base: int) -> None:
    random_life(seed, size=size, base=base)


# ------------------------------------------------------------------ killed after any store


#: Every store a packed ring and its region make: the region's (inflight module helpers)
#: and the ring's 16-bit flag and event stores.
STORES = [(inflight_mod, name) for name in ("_put8", "_put16", "_put32", "_put64",
                                            "_put_copy")] + [(packed_mod, "_store_u16")]


def killed_after(monkeypatch: pytest.MonkeyPatch, stores: int, operation: Callable[[], Any]
                 ) -> bool:
    """Run `operation`, the back-end dying right after its `stores`-th store; False when
    it finished first."""
    done = [0]
    with monkeypatch.context() as m:
        for module, name in STORES:
            real = getattr(module, name)

            def store(*args: Any, _real: Callable[..., None] = real) -> None:
                _real(*args)
                done[0] += 1
                if done[0] == stores:
                    raise Killed
            m.setattr(module, name, store)
        try:
            operation()
        except Killed:
            return True
    return False


Scenario = Callable[[Guest, PackedVirtqueue], tuple[Callable[[], Any], list[int], list[int]]]


def taken(g: Guest, vq: PackedVirtqueue, kinds: list[int]) -> list[DescriptorChain]:
    ids = [g.submit(kind) for kind in kinds]
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == ids
    return chains


def while_popping(g: Guest, vq: PackedVirtqueue
                  ) -> tuple[Callable[[], Any], list[int], list[int]]:
    """Two chains in flight (one completed before), two new ones being taken."""
    chains = taken(g, vq, [1, 0, 1])
    vq.add_used_many(echo([chains[1]]))
    g.collect()
    new = [g.submit(2), g.submit(0)]
    return (lambda: vq.pop_many(SIZE)), [chains[0].head, chains[2].head], new


def while_completing(g: Guest, vq: PackedVirtqueue
                     ) -> tuple[Callable[[], Any], list[int], list[int]]:
    """Four chains in flight, two of them completed out of order in one batch."""
    chains = taken(g, vq, [1, 2, 0, 1])
    items = echo([chains[2], chains[0]])
    return (lambda: vq.add_used_many(items)), [c.head for c in chains], []


def while_completing_a_whole_ring(g: Guest, vq: PackedVirtqueue
                                  ) -> tuple[Callable[[], Any], list[int], list[int]]:
    """Every slot in flight (2 + 3 + 1 + 2 = 8), all completed in one batch: the used
    index comes back where it was, only its wrap counter tells."""
    chains = taken(g, vq, [1, 2, 0, 1])
    items = echo([chains[3], chains[1], chains[0], chains[2]])
    return (lambda: vq.add_used_many(items)), [c.head for c in chains], []


def while_completing_onto_a_slot_never_used(g: Guest, vq: PackedVirtqueue
                                            ) -> tuple[Callable[[], Any], list[int], list[int]]:
    """From base 0: used descriptors at slots 0, 3 and 5 (chains of 3, 2 and 1 slots, one
    by one), then a chain of 3 slots from 6 across the wrap: the used position lands on
    slot 1 of the next lap, which still holds the first lap's available flags (the middle
    of a chain): what recovery reads there must be read with the right wrap counter, so
    the old used index and its wrap counter are committed in one store."""
    p, q, r = taken(g, vq, [1, 2, 0])
    for chain in (q, p, r):
        vq.add_used_many(echo([chain]))
    g.collect()
    [s] = taken(g, vq, [2])
    items = echo([s])
    return (lambda: vq.add_used_many(items)), [s.head], []


def while_rewinding(g: Guest, vq: PackedVirtqueue
                    ) -> tuple[Callable[[], Any], list[int], list[int]]:
    """Three chains taken, the last two given back."""
    chains = taken(g, vq, [1, 0, 2])
    return (lambda: vq.rewind(2)), [c.head for c in chains], []


@pytest.mark.parametrize("scenario", [while_popping, while_completing,
                                      while_completing_a_whole_ring,
                                      while_completing_onto_a_slot_never_used, while_rewinding],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("base", [position(0, True), position(6, True), position(3, False)],
                         ids=["start", "wrap1", "wrap0"])
@pytest.mark.parametrize("driver_goes_on", [False, True], ids=["idle", "refills"])
def test_killed_after_every_store(monkeypatch: pytest.MonkeyPatch, scenario: Scenario,
                                  base: int, driver_goes_on: bool) -> None:
    outcomes = set()
    for stores in itertools.count(1):
        g = Guest(base)
        first = g.first_backend()
        operation, in_flight, new = scenario(g, first)
        g.collect()
        killed = killed_after(monkeypatch, stores, operation)
        published = g.collect()
        # The driver may go on while no back-end runs: it refills the ring (and so may
        # overwrite the descriptor a restart reads to tell whether a batch was published).
        late = []
        while driver_goes_on and g.can_submit(2):
            late.append(g.submit(1))
        second = g.backend()                       # a stale SET_VRING_BASE
        ids = second.attach_inflight(g.view)
        # Exactly the chains taken and not published, oldest first; a chain whose pop was
        # not committed comes from the ring again, a chain given back too.
        expected = [i for i in in_flight if i not in published]
        if scenario is while_popping:
            assert ids[:len(expected)] == expected and ids[len(expected):] == \
                new[:len(ids) - len(expected)]
            from_ring = new[len(ids) - len(expected):]
        elif scenario is while_rewinding:
            assert ids == expected[:len(ids)] and len(ids) >= 1
            from_ring = expected[len(ids):]
        else:
            assert ids == expected
            from_ring = []
        assert (second.used_idx, second.used_wrap) == (g.drv.next_used, g.drv.used_wrap)
        all_flags = [g.region[HDR + ST * e] for e in range(SIZE)]
        assert sum(all_flags) == len(ids)
        chains = second.pop_many(SIZE)
        assert [c.head for c in chains] == ids + from_ring + late
        second.add_used_many(echo(chains[1::2]))
        second.add_used_many(echo(chains[::2]))
        g.collect()
        g.each_once()
        all_clear(g)
        outcomes.add((tuple(ids), tuple(published)))
        if not killed:
            break
    assert stores > 8 and len(outcomes) >= 2, (stores, outcomes)


@pytest.mark.parametrize("base", [position(0, True), position(3, False)], ids=["start", "wrap0"])
def test_killed_again_while_recovering(monkeypatch: pytest.MonkeyPatch, base: int) -> None:
    """The first back-end dies after publishing a batch and before committing it; the
    second dies after any store of its repair; the third finds the same state."""
    for stores in itertools.count(1):
        g = Guest(base)
        first = g.first_backend()
        chains = taken(g, first, [1, 2, 0])
        items = echo([chains[2], chains[0]])
        real = PackedInflight.completed

        def dies(self: PackedInflight, ids: list[int]) -> None:
            self.view[HDR + ST * self.entry_of(ids[0])[0]] = 0    # one flag cleared
            raise Killed
        with monkeypatch.context() as m:
            m.setattr(PackedInflight, "completed", dies)
            with pytest.raises(Killed):
                first.add_used_many(items)
        assert PackedInflight.completed is real
        assert g.collect() == [chains[2].head, chains[0].head]
        second = g.backend()
        killed = killed_after(monkeypatch, stores,
                              lambda vq=second, view=g.view: vq.attach_inflight(view))
        third = g.backend()
        assert third.attach_inflight(g.view) == [chains[1].head]
        assert (third.used_idx, third.used_wrap) == (g.drv.next_used, g.drv.used_wrap)
        third.add_used_many(echo(third.pop_many(SIZE)))
        g.collect()
        g.each_once()
        all_clear(g)
        if not killed:
            break
    assert stores > 3


def test_rewound_resubmitted_chains_go_back_to_the_list() -> None:
    g = Guest()
    first = g.first_backend()
    chains = taken(g, first, [1, 0, 2])
    second = g.backend()
    ids = second.attach_inflight(g.view)
    assert ids == [c.head for c in chains] and second.resubmit_left == 3
    assert second.has_available() and second.available() == 3
    region = bytes(g.region)
    new = g.submit(1)
    got = second.pop_many(SIZE)
    assert [c.head for c in got] == [*ids, new]
    second.rewind(2)                   # the new chain (given back) and the last resubmitted
    assert second.resubmit_left == 1 and second.taken == tuple(ids[:2])
    assert bytes(g.region)[:HDR] == region[:HDR]
    assert [g.region[HDR + ST * e] for e in range(SIZE)] == [
        region[HDR + ST * e] for e in range(SIZE)]
    again = second.pop_many(SIZE)
    assert [c.head for c in again] == [ids[2], new]
    second.add_used_many(echo([*again, *got[:2]]))
    g.collect()
    g.each_once()
    all_clear(g)


# ------------------------------------------------------------------ hostile regions


def _layout_state(g: Guest) -> tuple[PackedVirtqueue, list[DescriptorChain]]:
    """A: entries 0-1, B (indirect): entry 2 (completed), C: entries 3-5. Free list:
    2, 6, 7."""
    vq = g.first_backend()
    chains = taken(g, vq, [1, 0, 2])
    vq.add_used_many(echo([chains[1]]))
    g.collect()
    return vq, chains


def _entry(e: int, field: int, fmt: str, value: int) -> Callable[[memoryview], None]:
    return lambda v: put(v, HDR + ST * e + field, fmt, value)


def _both(*damage: Callable[[memoryview], None]) -> Callable[[memoryview], None]:
    def both(v: memoryview) -> None:
        for d in damage:
            d(v)
    return both


HOSTILE: dict[str, tuple[Callable[[memoryview], None], str]] = {
    "version": (lambda v: put(v, VERSION, "H", 2), "version 2"),
    "desc_num": (lambda v: put(v, DESC_NUM, "H", 16), "for 16 descriptors"),
    "used_idx": (lambda v: put(v, USED_IDX, "H", SIZE), "used_idx 8 outside"),
    "old_used_idx": (lambda v: put(v, OLD_USED_IDX, "H", 0xFFFF), "old_used_idx 65535"),
    "used_wrap_counter": (lambda v: put(v, USED_WRAP, "B", 2), "not 0 or 1"),
    "free_list_loops": (_entry(7, S_NEXT, "H", 6), "loops at entry 6"),
    "free_list_short": (_entry(6, S_NEXT, "H", 0xFFFF), "entry 7 is neither free"),
    "free_head_short": (lambda v: (put(v, FREE_HEAD, "H", 6), put(v, OLD_FREE_HEAD, "H", 6)),
                        "entry 2 is neither free"),
    "num_0": (_entry(0, S_NUM, "H", 0), "chain of 0"),
    "num_too_big": (_entry(0, S_NUM, "H", SIZE + 1), "chain of 9"),
    "link_out_of_range": (_entry(3, S_NEXT, "H", 200), "entry 200, outside"),
    "last_wrong": (_entry(0, S_LAST, "H", 5), "its last says 5"),
    "chain_into_free": (_both(_entry(0, S_NUM, "H", 3), _entry(0, S_LAST, "H", 2),
                              _entry(1, S_FLAGS, "H", NEXT | AVAIL)), "also free"),
    "chains_overlap": (_both(_entry(3, S_NEXT, "H", 1), _entry(1, S_NEXT, "H", 5)),
                       "in another chain"),
    "next_flag_missing": (_entry(0, S_FLAGS, "H", AVAIL), "has flags 0x80"),
    "indirect_in_a_chain": (_entry(0, S_FLAGS, "H", AVAIL | NEXT | INDIRECT), "has flags"),
    "buffer_id_out_of_range": (_entry(1, S_ID, "H", 200), "buffer id 200"),
    "buffer_id_twice": (lambda v: put(v, HDR + ST * 5 + S_ID, "H",
                                      get(v, HDR + ST * 1 + S_ID, "H")), "in flight twice"),
    "counter_no_back_end_reaches": (_entry(7, S_COUNTER, "Q", 1 << 63), "a counter of"),
}


@pytest.mark.parametrize("damage", list(HOSTILE), ids=str)
def test_a_region_that_does_not_fit_is_refused_and_not_used(damage: str) -> None:
    g = Guest(position(2, True))
    _layout_state(g)
    change, message = HOSTILE[damage]
    change(g.view)
    region = bytes(g.region)
    vq = g.backend(position(5, False))
    with pytest.raises(RegionError, match=message):
        vq.attach_inflight(g.view)
    assert not vq.inflight_tracked and vq.resubmit_left == 0
    assert vq.base == position(5, False)                 # as SET_VRING_BASE said
    assert bytes(g.region) == region
    vq.add_used_many(echo(vq.pop_many(SIZE)))            # untracked, it serves; no region
    assert vq.error is None and bytes(g.region) == region


def test_the_untouched_layout_state_recovers() -> None:
    g = Guest(position(2, True))
    _vq, chains = _layout_state(g)
    vq = g.backend(position(5, False))
    assert vq.attach_inflight(g.view) == [chains[0].head, chains[2].head]
    vq.add_used_many(echo(vq.pop_many(SIZE)))
    g.collect()
    g.each_once()


def test_a_region_too_small_or_an_unconfigured_ring_is_refused() -> None:
    g = Guest()
    vq = g.backend()
    with pytest.raises(RegionError, match="needs"):
        vq.attach_inflight(g.view[:-1])
    with pytest.raises(RegionError, match="not configured"):
        PackedVirtqueue(g.mem, 1).attach_inflight(g.view)
    assert not vq.inflight_tracked and bytes(g.region) == bytes(len(g.region))
    with pytest.raises(RegionError, match="not in 1..32768"):
        PackedInflight(memoryview(bytearray(1 << 21)), 40000)


def test_a_region_changed_while_the_ring_runs_stops_tracking_only(
        caplog: pytest.LogCaptureFixture) -> None:
    g = Guest()
    vq = g.first_backend()
    put(g.region, HDR + S_NEXT, "H", 0xFFFF)          # entry 0's next: the list ends there
    buf_id = g.submit(1)                               # two slots: needs entries 0 and 1
    with caplog.at_level("WARNING"):
        chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == [buf_id] and vq.error is None
    assert not vq.inflight_tracked
    assert "inflight tracking stopped" in caplog.text and "free list ends" in caplog.text
    vq.add_used_many(echo(chains))
    assert g.collect() == [buf_id]


def test_resubmitted_copies_are_checked_like_a_rings_chain() -> None:
    g = Guest()
    first = g.first_backend()
    chains = taken(g, first, [1, 1])
    put(g.region, HDR + ST * 2 + S_ADDR, "Q", 1 << 40)     # the second chain's readable buffer
    second = g.backend()
    assert second.attach_inflight(g.view) == [c.head for c in chains]
    got = second.pop_many(SIZE)
    assert [c.head for c in got] == [chains[0].head]
    assert second.error is not None and "resubmitted chain of buffer id" in second.error
    assert second.pop_many(SIZE) == []


# ------------------------------------------------------------------ a killed session


class HoldSome(EchoDevice):
    """The echo device that writes every reply but never completes requests starting with
    b"hold" (it is about to die)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[object] = []

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> Any:
        data = chain.read()
        written = chain.write(data)
        if not data.startswith(b"hold"):
            return written
        handle = vq.defer(chain)
        self.held.append(handle)
        return handle


def test_a_killed_sessions_requests_are_served_again_once() -> None:
    """Through the session: a packed ring of 6 (not a power of two) that has wrapped, two
    requests held out of order when the back-end dies; the next back-end gets QEMU's stale
    SET_VRING_BASE (the fresh ring's: no GET_VRING_BASE happened) and the same region, and
    serves both again at its start, in order, once; then the ring goes on."""
    rig = SessionRig()
    try:
        rig.device = HoldSome()
        rig.session = Session(rig.device, rig.host)
        features = rig.u64(R.GET_FEATURES) & ~(1 << p.VHOST_F_LOG_ALL)
        rig.negotiate(features=features, packed=True)
        rig.mem_table()
        [answer] = rig.send(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, 6))
        info = answer.payload
        assert isinstance(info, p.InflightInfo)
        assert info.mmap_size == region_size(1, 6, packed=True)
        region_fd = os.dup(answer.fds[0])           # the front-end keeps it across back-ends
        rig.ours.append(region_fd)
        rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
        drv = packed_ring(rig, 0, 6)
        rig.host.run_timers()
        assert rig.session.rings[0].vq.inflight_tracked   # both ring classes track
        for k in range(7):                          # 14 slots: the ring has wrapped
            session_echo(rig, drv, 0, [b"ok%d" % k])
        held = []
        for data in (b"hold-1", b"done", b"hold-2"):
            buf_id, addrs = drv.add_chain([data], [len(data)])
            held.append((buf_id, addrs[-1], data))
        assert rig.session.kick(0) > 0
        assert drv.get_used() == [(held[1][0], 4)]
        del held[1]
        rig.session.close()                         # the back-end is gone
        for _, out, data in held:
            rig.driver.write(out, bytes(len(data)))  # (its replies must come again)

        rig.host = FakeLoop()
        rig.device = EchoDevice()
        rig.session = Session(rig.device, rig.host)
        rig.negotiate(features=features, packed=True)
        rig.mem_table()
        rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
        packed_ring(rig, 0, 6, drv=drv)             # SET_VRING_BASE: the fresh ring's
        rig.host.run_timers()
        assert drv.get_used() == [(buf_id, len(data)) for buf_id, _, data in held]
        for _, out, data in held:
            assert rig.driver.read(out, len(data)) == data
        assert rig.session.rings[0].resubmitted == 2
        state = os.pread(region_fd, region_size(1, 6, packed=True), 0)
        assert [state[HDR + ST * e] for e in range(6)] == [0] * 6
        assert rig.session.kick(0) == 0             # nothing served twice
        session_echo(rig, drv, 0, [b"after"])       # and the ring goes on
        reply = rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
        assert isinstance(reply, p.VringState) and reply.num == state_of(drv)
    finally:
        rig.close()
