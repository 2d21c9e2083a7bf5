"""Crash recovery through the inflight region (vhost-user INFLIGHT_SHMFD), ring level and
session level, for both ring implementations (`PythonVirtqueue`, and `CffiVirtqueue` when
the extension is built; the suite also runs whole under each implementation).

* The region after every operation is byte for byte the spec's split layout, as kept by an
  independent model here (header: features, version 1, desc_num, last_batch_head, used_idx;
  per descriptor: inflight flag, next, counter): a seeded random life of a ring of a few
  hundred steps -- pops, rewinds, out-of-order batches, restarts -- starting just below the
  16-bit index wrap; the Python and C rings leave identical bytes for the same steps.
* A back-end killed at every point of a request's life (taken; data written; used elements
  written but used->idx not moved; used->idx moved but flags not cleared; while clearing;
  several out-of-order batches) and replaced by a fresh ring on the same memory and region
  (SET_VRING_BASE = the used idx, as QEMU does after a crash): it serves again exactly the
  chains taken and not completed, oldest first, before the avail ring's new ones, and every
  request reaches the used ring exactly once. The C ring cannot be stopped inside
  `vp_add_used`: for it the state those points leave is built with `SplitInflight` and
  checked to be what the interrupted Python ring left.
* `rewind` of resubmitted and of avail chains; regions that do not fit (RegionError,
  tracking off); a killed session's request served again after SET_INFLIGHT_FD by the
  ring's own kick, once.

Also: a fresh region attached to a ring whose used idx is not 0 (after a migration) starts
at that idx, so a back-end killed before its first completion is recovered exactly; a
`CffiVirtqueue` collected in a reference cycle with its region still attached is collected
safely (run in a subprocess).
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from fakeloop import FakeLoop
from ringbuilder import RingBuilder, anon_memory, layout
from test_dirty_logging import collect_garbage_ring
from test_session import RING_SIZE, UVA, EchoDevice, R
from test_session import Rig as SessionRig

from vhostpy import _accel
from vhostpy import protocol as p
from vhostpy import virtqueue as virtqueue_module
from vhostpy.inflight import RegionError, SplitInflight, queue_region_size
from vhostpy.session import Session
from vhostpy.virtqueue import DescriptorChain, PythonVirtqueue, Virtqueue
from vhostpy.vring import DefaultVirtqueue

#: Every variant of Virtqueue: the pure-Python reference and (when built) the compiled one.
VARIANTS: list[type[Virtqueue]] = [PythonVirtqueue] + (
    [DefaultVirtqueue] if DefaultVirtqueue is not PythonVirtqueue else [])
needs_cffi = pytest.mark.skipif(
    _accel.lib is None,
    reason=f"compares the compiled ring with Python; this run uses {_accel.IMPLEMENTATION}")

SIZE = 16
#: The spec's split layout, written out here rather than taken from vhostpy.inflight.
SPEC_HEADER = struct.Struct("<QHHHH")    # features, version, desc_num, last_batch_head, used_idx
SPEC_STATE = struct.Struct("<B5xHQ")     # inflight, padding, next, counter
VERSION_AT, DESC_NUM_AT, LAST_BATCH_AT, USED_IDX_AT = 8, 10, 12, 14


def ids(cls: type[Virtqueue]) -> str:
    return cls.__name__


class Killed(Exception):
    """The back-end process died here."""


# ------------------------------------------------------------------ the spec's region, modelled


class RegionModel:
    """One queue's part of the region as the spec says it must be after each operation."""

    def __init__(self, size: int, ring_used: int) -> None:
        self.size = size
        self.last_batch_head = 0
        self.used_idx = 0              # a fresh region: the front-end zeroed it
        self.ring_used = ring_used     # the used ring's idx (what the driver sees)
        self.inflight = [0] * size
        self.next = [0] * size
        self.counter = [0] * size
        self.next_counter = 0

    def popped(self, head: int) -> None:
        self.counter[head] = self.next_counter
        self.next_counter += 1
        self.inflight[head] = 1

    def completed(self, heads: list[int]) -> None:
        for head in heads:
            self.next[head] = self.last_batch_head
            self.last_batch_head = head
        self.ring_used = (self.ring_used + len(heads)) & 0xFFFF
        for head in heads:
            self.inflight[head] = 0
        self.used_idx = self.ring_used

    def given_back(self, head: int) -> None:
        self.inflight[head] = 0

    def restarted(self) -> list[int]:
        """A new back-end attached: the heads it must serve again, oldest first."""
        self.next_counter = 1 + max(self.counter)
        return sorted((h for h in range(self.size) if self.inflight[h]),
                      key=lambda h: self.counter[h])

    def image(self) -> bytes:
        out = bytearray(queue_region_size(self.size))
        SPEC_HEADER.pack_into(out, 0, 0, 1, self.size, self.last_batch_head, self.used_idx)
        for h in range(self.size):
            SPEC_STATE.pack_into(out, SPEC_HEADER.size + SPEC_STATE.size * h,
                                 self.inflight[h], self.next[h], self.counter[h])
        return bytes(out)


def flags_of(region: bytes | bytearray, size: int) -> list[int]:
    return [region[SPEC_HEADER.size + SPEC_STATE.size * h] for h in range(size)]


def header_of(region: bytes | bytearray) -> tuple[int, int, int, int, int]:
    fields: tuple[int, int, int, int, int] = SPEC_HEADER.unpack_from(region, 0)
    return fields


# ------------------------------------------------------------------ a guest and its driver


class Guest:
    """Guest memory, the driver's side of one ring, the ring's inflight region, and what
    the driver submitted and got back (each request carries a unique tag the echoing device
    copies into its writable buffer)."""

    def __init__(self, base: int = 0, size: int = SIZE) -> None:
        self.size = size
        self.mem, self._buf = anon_memory(1 << 20)
        self.rb = RingBuilder(self.mem, size, layout(size))
        self.rb.set_base(base)
        self.region = bytearray(queue_region_size(size))
        self.view = memoryview(self.region)
        self.pending: dict[int, tuple[bytes, int]] = {}   # head -> (tag, writable address)
        self.submitted: list[bytes] = []
        self.seen: list[bytes] = []
        #: Heads published before the kill and never taken (served after the resubmitted).
        self.untaken: list[int] = []
        self._tags = itertools.count()

    def backend(self, cls: type[Virtqueue]) -> Virtqueue:
        """A fresh back-end's ring, configured as after SET_VRING_BASE(used idx)."""
        vq = cls(self.mem, 0)
        vq.set_size(self.size)
        vq.set_base(self.rb.used_idx)
        lay = self.rb.lay
        vq.set_addresses(lay.desc, lay.avail, lay.used)
        return vq

    def first_backend(self, cls: type[Virtqueue]) -> Virtqueue:
        """The first back-end, on the fresh region. A fresh region starts with used_idx 0,
        so on a ring that does not start at 0 one request is completed first, which brings
        it to the ring's idx (test_a_fresh_region_on_a_used_ring_... shows why)."""
        vq = self.backend(cls)
        assert vq.attach_inflight(self.view) == [] and vq.inflight_tracked
        if self.rb.used_idx:
            self.submit()
            vq.add_used_many(echo(vq.pop_many(1)))
            assert len(self.collect()) == 1
        return vq

    def can_submit(self, indirect: bool) -> bool:
        self.rb.reclaim()
        return len(self.rb._free) >= (1 if indirect else 2)

    def submit(self, indirect: bool = False) -> int:
        tag = b"r%07d" % next(self._tags)
        head, addrs = self.rb.add_chain([tag], [len(tag)], indirect=indirect)
        assert head not in self.pending
        self.pending[head] = (tag, addrs[1])
        self.submitted.append(tag)
        return head

    def collect(self) -> list[int]:
        """The driver reads the used ring: each entry must be a request in flight, echoed."""
        heads = []
        for head, length in self.rb.get_used():
            assert head in self.pending, f"used entry for head {head}, not in flight"
            tag, addr = self.pending.pop(head)
            assert length == len(tag) and self.mem.read(addr, len(tag)) == tag
            self.seen.append(tag)
            heads.append(head)
        return heads

    def each_once(self) -> None:
        assert not self.pending, f"requests never completed: {self.pending}"
        assert sorted(self.seen) == sorted(self.submitted)
        assert len(set(self.seen)) == len(self.seen)

    def used_ring(self) -> bytes:
        return self.mem.read(self.rb.lay.used, 6 + 8 * self.size)

    def write_used_elements(self, start: int, items: list[tuple[int, int]]) -> None:
        for k, (head, length) in enumerate(items):
            slot = (start + k) % self.size
            self.mem.write(self.rb.lay.used + 4 + 8 * slot, struct.pack("<II", head, length))


def echo(chains: list[DescriptorChain]) -> list[tuple[int, int]]:
    """Serve chains as the echoing device does: readable bytes into the writable buffer."""
    return [(c.head, c.write(c.read())) for c in chains]


# ------------------------------------------------------------------ byte layout


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_region_bytes_follow_the_spec_step_by_step(cls: type[Virtqueue]) -> None:
    g = Guest()
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == [] and vq.inflight_tracked
    # A fresh (zeroed) region gets version 1 and the queue size, nothing else.
    assert bytes(g.region) == SPEC_HEADER.pack(0, 1, SIZE, 0, 0) + bytes(len(g.region) - 16)
    heads = [g.submit() for _ in range(3)]                 # descriptors 0, 2, 4
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == heads == [0, 2, 4]
    for counter, head in enumerate(heads):                 # counter, then flag, per chain
        at = 16 + 16 * head
        assert bytes(g.region[at:at + 16]) == bytes([1, 0, 0, 0, 0, 0]) + struct.pack(
            "<HQ", 0, counter)
    vq.add_used_many(echo([chains[2], chains[0]]))        # one batch, out of order
    # 4's next is the old last_batch_head (0), 0's next is 4; last_batch_head 0; used_idx 2.
    assert header_of(g.region) == (0, 1, SIZE, 0, 2)
    assert SPEC_STATE.unpack_from(g.region, 16 + 16 * 4) == (0, 0, 2)
    assert SPEC_STATE.unpack_from(g.region, 16 + 16 * 0) == (0, 4, 0)
    assert SPEC_STATE.unpack_from(g.region, 16 + 16 * 2) == (1, 0, 1)
    vq.add_used_many(echo([chains[1]]))
    assert header_of(g.region) == (0, 1, SIZE, 2, 3)
    assert SPEC_STATE.unpack_from(g.region, 16 + 16 * 2) == (0, 0, 1)
    assert flags_of(g.region, SIZE) == [0] * SIZE
    # 16 + 16 * 16 = 272 bytes, padded to the next multiple of 64 with zeros.
    assert len(g.region) == 320 and bytes(g.region[272:]) == bytes(48)


def random_life(cls: type[Virtqueue], seed: int, steps: int = 300, base: int = 0xFFF0,
                size: int = 16) -> list[tuple[object, ...]]:
    """A seeded random life of one ring under `cls`, every step checked against the model;
    returns what each step left (region bytes, used ring, indices) for comparisons."""
    rng = random.Random(seed)
    g = Guest(base, size)
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == []
    model = RegionModel(size, base)
    # A fresh region starts at the ring's used idx (what a restart before the first
    # completion needs: test_a_fresh_region_on_a_used_ring_...).
    model.used_idx = header_of(g.region)[4]
    assert model.used_idx == base
    avail: deque[int] = deque()        # published by the driver, not taken
    resubmit: list[int] = []           # to be served again, oldest first
    taken: dict[int, DescriptorChain] = {}
    trace: list[tuple[object, ...]] = []
    restarts = rewinds = wrapped = 0

    def check(what: str) -> None:
        assert bytes(g.region) == model.image(), f"{cls.__name__} step {step} ({what})"
        assert vq.used_idx == g.rb.used_idx == model.ring_used
        trace.append((what, bytes(g.region), g.used_ring(), vq.last_avail_idx, vq.used_idx))

    for step in range(steps + 1):
        roll = rng.random()
        if step == steps:                               # the end: serve everything
            chains = vq.pop_many(size)
            assert [c.head for c in chains] == resubmit + list(avail)
            for c in chains:
                if c.head in avail:
                    model.popped(c.head)
            resubmit, taken = [], {**taken, **{c.head: c for c in chains}}
            avail.clear()
            vq.add_used_many(echo(list(taken.values())))
            model.completed(list(taken))
            g.collect()
            check("last")
            break
        if roll < 0.3:
            for _ in range(rng.randint(1, 3)):
                indirect = rng.random() < 0.3
                if not g.can_submit(indirect):
                    break
                avail.append(g.submit(indirect))
        elif roll < 0.6:
            limit = rng.randint(1, 4)
            chains = vq.pop_many(limit)
            expect = (resubmit + list(avail))[:limit]
            assert [c.head for c in chains] == expect, f"step {step}"
            sources = []
            for c in chains:
                if resubmit and c.head == resubmit[0]:
                    resubmit.pop(0)
                    sources.append("resubmit")
                else:
                    assert avail.popleft() == c.head
                    model.popped(c.head)
                    sources.append("avail")
                taken[c.head] = c
            check("pop")
            if chains and rng.random() < 0.35:
                count = rng.randint(1, len(chains))
                vq.rewind(count)
                rewinds += 1
                for c, source in reversed(list(zip(chains, sources, strict=True))[-count:]):
                    del taken[c.head]
                    if source == "resubmit":
                        resubmit.insert(0, c.head)
                    else:
                        avail.appendleft(c.head)
                        model.given_back(c.head)
                check("rewind")
        elif roll < 0.94:
            if not taken:
                continue
            batch = rng.sample(list(taken), rng.randint(1, min(4, len(taken))))
            before = vq.used_idx
            vq.add_used_many(echo([taken.pop(h) for h in batch]))
            wrapped += vq.used_idx < before
            model.completed(batch)
            assert g.collect() == batch
            check("complete")
        elif model.used_idx == model.ring_used:         # a restart
            last_avail = vq.last_avail_idx
            vq = g.backend(cls)
            heads = vq.attach_inflight(g.view)
            assert heads == model.restarted()
            assert vq.last_avail_idx == last_avail
            resubmit, taken = list(heads), {}
            restarts += 1
            check("restart")
    g.each_once()
    assert restarts and rewinds and wrapped, (restarts, rewinds, wrapped)   # all were met
    return trace


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_life_matches_the_spec_model(cls: type[Virtqueue], seed: int) -> None:
    random_life(cls, seed)


@needs_cffi
@pytest.mark.parametrize("seed", [4, 5])
def test_random_life_is_byte_identical_in_c_and_python(seed: int) -> None:
    assert DefaultVirtqueue is not PythonVirtqueue
    python = random_life(PythonVirtqueue, seed)
    compiled = random_life(DefaultVirtqueue, seed)
    assert len(python) > 100
    assert python == compiled


# ------------------------------------------------------------------ killed at every point


Kill = Callable[[Virtqueue, list[tuple[int, int]], str], None]


def killer(g: Guest, monkeypatch: pytest.MonkeyPatch) -> Kill:
    """`kill(vq, items, point)`: the back-end dies inside `add_used_many(items)`:

    * "elements": used elements written (and the batch linked), used->idx not moved;
    * "idx": used->idx moved, the batch's flags not cleared, used_idx not updated;
    * "clearing": as "idx", and the first head's flag cleared.

    The Python ring is really interrupted there; the C ring cannot be, so the state those
    points leave is built with `SplitInflight` and the used ring written by hand."""

    def kill(vq: Virtqueue, items: list[tuple[int, int]], point: str) -> None:
        heads = [h for h, _ in items]
        if isinstance(vq, PythonVirtqueue):
            with monkeypatch.context() as m:
                if point == "elements":
                    real = virtqueue_module._store_u16

                    def store(view: memoryview, offset: int, value: int) -> None:
                        if offset == 2:             # used->idx
                            raise Killed
                        real(view, offset, value)
                    m.setattr(virtqueue_module, "_store_u16", store)
                else:
                    def completed(self: SplitInflight, hs: list[int], used_idx: int) -> None:
                        if point == "clearing":
                            self.view[SPEC_HEADER.size + SPEC_STATE.size * hs[0]] = 0
                        raise Killed
                    m.setattr(SplitInflight, "completed", completed)
                with pytest.raises(Killed):
                    vq.add_used_many(items)
            return
        SplitInflight(g.view, g.size).completing(heads)
        g.write_used_elements(vq.used_idx, items)
        if point in ("idx", "clearing"):
            g.rb.memory.write(g.rb.lay.used + 2,
                              struct.pack("<H", (vq.used_idx + len(items)) & 0xFFFF))
        if point == "clearing":
            g.region[SPEC_HEADER.size + SPEC_STATE.size * heads[0]] = 0

    return kill


def taken(g: Guest, vq: Virtqueue, count: int) -> tuple[list[int], list[DescriptorChain]]:
    heads = [g.submit(indirect=k % 3 == 1) for k in range(count)]
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == heads
    return heads, chains


def killed_after_pop(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, _ = taken(g, vq, 4)
    return heads


def killed_after_data_written(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 4)
    echo(chains)
    return heads


def killed_before_used_idx(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 4)
    kill(vq, echo([chains[2], chains[0]]), "elements")
    return heads


def killed_before_flags_cleared(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 4)
    kill(vq, echo([chains[2], chains[0]]), "idx")
    return [heads[1], heads[3]]


def killed_while_clearing_flags(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 4)
    kill(vq, echo([chains[3], chains[1], chains[0]]), "clearing")
    return [heads[2]]


def killed_after_out_of_order_batches(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 6)
    vq.add_used_many(echo([chains[3]]))
    vq.add_used_many(echo([chains[5], chains[1]]))
    return [heads[0], heads[2], heads[4]]


def killed_with_a_stale_batch_after_others(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    heads, chains = taken(g, vq, 6)
    vq.add_used_many(echo([chains[3]]))
    vq.add_used_many(echo([chains[1]]))
    kill(vq, echo([chains[4], chains[0]]), "idx")
    return [heads[2], heads[5]]


def killed_between_pops(g: Guest, vq: Virtqueue, kill: Kill) -> list[int]:
    first, chains = taken(g, vq, 3)
    vq.add_used_many(echo([chains[1]]))
    later, _ = taken(g, vq, 2)
    g.untaken.append(g.submit())        # published, never taken: not resubmitted
    return [first[0], first[2], *later]


SCENARIOS = [killed_after_pop, killed_after_data_written, killed_before_used_idx,
             killed_before_flags_cleared, killed_while_clearing_flags,
             killed_after_out_of_order_batches, killed_with_a_stale_batch_after_others,
             killed_between_pops]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("base", [0, 0xFFFD], ids=["base0", "wrap"])
def test_a_killed_back_end_is_recovered(monkeypatch: pytest.MonkeyPatch,
                                        scenario: Callable[[Guest, Virtqueue, Kill], list[int]],
                                        base: int) -> None:
    """Killed by each variant, recovered by each: the same state, the same resubmissions,
    and every request in the used ring exactly once."""
    outcomes = {}
    for crashed, recovering in itertools.product(VARIANTS, VARIANTS):
        g = Guest(base)
        first = g.first_backend(crashed)
        expected = scenario(g, first, killer(g, monkeypatch))
        before = g.collect()
        state = (bytes(g.region), g.used_ring())
        late = [g.submit(), g.submit(indirect=True)]     # the driver goes on meanwhile

        second = g.backend(recovering)
        used = g.rb.used_idx
        heads = second.attach_inflight(g.view)
        assert heads == expected
        assert second.inflight_tracked and second.resubmit_left == len(expected)
        assert second.used_idx == used
        assert second.last_avail_idx == (used + len(expected)) & 0xFFFF
        assert header_of(g.region)[4] == used               # a stale batch was settled
        assert [h for h in range(SIZE) if flags_of(g.region, SIZE)[h]] == sorted(expected)
        chains = second.pop_many(SIZE)
        # The resubmitted chains first, then the avail ring's: older, then newer.
        assert [c.head for c in chains] == expected + g.untaken + late
        assert second.resubmit_left == 0
        second.add_used_many(echo(chains[1::2]))
        second.add_used_many(echo(chains[::2]))
        after = g.collect()
        assert sorted(after) == sorted(expected + g.untaken + late)
        g.each_once()
        assert flags_of(g.region, SIZE) == [0] * SIZE
        assert header_of(g.region)[4] == g.rb.used_idx
        outcomes[crashed, recovering] = (state, before, heads)
    assert len({repr(o) for o in outcomes.values()}) == 1, outcomes


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_killed_again_while_serving_resubmitted_chains(cls: type[Virtqueue]) -> None:
    g = Guest(0xFFFE)
    vq = g.first_backend(cls)
    heads, chains = taken(g, vq, 4)
    vq.add_used_many(echo([chains[1]]))
    # Second back-end: takes the three resubmitted chains and a new one, completes one, dies.
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == [heads[0], heads[2], heads[3]]
    new = g.submit()
    chains = vq.pop_many(2)
    assert [c.head for c in chains] == [heads[0], heads[2]]
    chains += vq.pop_many(SIZE)
    assert [c.head for c in chains] == [heads[0], heads[2], heads[3], new]
    vq.add_used_many(echo([chains[1]]))
    g.collect()
    # Third: the resubmitted chains kept their age; the one taken after the restart is newer.
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == [heads[0], heads[3], new]
    vq.add_used_many(echo(vq.pop_many(SIZE)))
    g.collect()
    g.each_once()


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("base", [5, 0xFFF0])
def test_a_fresh_region_on_a_used_ring_recovers_a_kill_before_any_completion(
        cls: type[Virtqueue], base: int) -> None:
    g = Guest(base)
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == []
    heads, _ = taken(g, vq, 3)
    vq = g.backend(cls)
    # base 5: the last-batch list (all zeros) is walked 5 times: head 0 is cleared (lost)
    # and last_avail_idx lands on head 4's slot (served twice). base 0xFFF0: RegionError,
    # so the ring runs untracked and replays the avail ring from the used idx.
    assert vq.attach_inflight(g.view) == heads
    vq.add_used_many(echo(vq.pop_many(SIZE)))
    g.collect()
    g.each_once()


# ------------------------------------------------------------------ rewind


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_rewinding_resubmitted_chains_returns_them_to_the_list(cls: type[Virtqueue]) -> None:
    g = Guest(0xFFFE)
    vq = g.first_backend(cls)
    heads, _ = taken(g, vq, 3)
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == heads
    assert vq.has_available() and vq.available() == 3       # the avail ring itself is empty
    region = bytes(g.region)
    kept = vq.pop_many(2)
    assert [c.head for c in kept] == heads[:2]
    vq.rewind(1)
    assert vq.resubmit_left == 2 and vq.taken == (heads[0],)
    assert bytes(g.region) == region                         # still in flight, same counter
    new = g.submit()
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == [heads[1], heads[2], new]
    after_pop = bytes(g.region)
    vq.rewind(3)                                             # across both sources
    assert vq.resubmit_left == 2
    assert flags_of(g.region, SIZE)[new] == 0                # the avail chain is not in flight
    assert [flags_of(g.region, SIZE)[h] for h in heads] == [1, 1, 1]
    assert vq.last_avail_idx == (g.rb.used_idx + 3) & 0xFFFF
    chains = vq.pop_many(SIZE)
    assert [c.head for c in chains] == [heads[1], heads[2], new]
    # Taken again, the avail chain gets the next counter (the given-back one is not reused).
    assert SPEC_STATE.unpack_from(g.region, 16 + 16 * new)[2] == \
        SPEC_STATE.unpack_from(after_pop, 16 + 16 * new)[2] + 1
    vq.add_used_many(echo([kept[0], *chains]))
    g.collect()
    g.each_once()


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_rewinding_avail_chains_clears_their_inflight_flag(cls: type[Virtqueue]) -> None:
    g = Guest()
    vq = g.first_backend(cls)
    model = RegionModel(SIZE, 0)
    heads = [g.submit() for _ in range(3)]
    assert [c.head for c in vq.pop_many(SIZE)] == heads
    for h in heads:
        model.popped(h)
    vq.rewind(2)
    model.given_back(heads[1])
    model.given_back(heads[2])
    assert bytes(g.region) == model.image()
    assert vq.last_avail_idx == 1 and vq.taken == (heads[0],)
    # A back-end killed now serves only the chain it still held; the others come from
    # the avail ring, once.
    vq = g.backend(cls)
    assert vq.attach_inflight(g.view) == heads[:1]
    vq.add_used_many(echo(vq.pop_many(SIZE)))
    assert g.collect() == heads
    g.each_once()


# ------------------------------------------------------------------ regions that do not fit


def _stale_by(n: int) -> Callable[[memoryview, int], None]:
    def damage(view: memoryview, ring_used: int) -> None:
        struct.pack_into("<H", view, USED_IDX_AT, (ring_used - n) & 0xFFFF)
    return damage


def _last_batch_head_out_of_range(view: memoryview, ring_used: int) -> None:
    _stale_by(1)(view, ring_used)
    struct.pack_into("<H", view, LAST_BATCH_AT, 200)


def _next_out_of_range(view: memoryview, ring_used: int) -> None:
    _stale_by(2)(view, ring_used)
    head = struct.unpack_from("<H", view, LAST_BATCH_AT)[0]
    struct.pack_into("<H", view, SPEC_HEADER.size + SPEC_STATE.size * head + 6, 0xFFFF)


HOSTILE: dict[str, Callable[[memoryview, int], None]] = {
    "version": lambda v, _u: struct.pack_into("<H", v, VERSION_AT, 2),
    "desc_num": lambda v, _u: struct.pack_into("<H", v, DESC_NUM_AT, 2 * SIZE),
    "last_batch_head": _last_batch_head_out_of_range,
    "next": _next_out_of_range,
    "used_idx_far_behind": _stale_by(SIZE + 1),
    "used_idx_ahead": _stale_by(-1),
    "counter_no_back_end_reaches": lambda v, _u: struct.pack_into(
        "<Q", v, SPEC_HEADER.size + SPEC_STATE.size * 3 + 8, 1 << 63),
}


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
@pytest.mark.parametrize("damage", list(HOSTILE), ids=str)
def test_a_region_that_does_not_fit_is_refused_and_not_used(cls: type[Virtqueue],
                                                            damage: str) -> None:
    g = Guest(0x20)
    vq = g.first_backend(cls)
    _, chains = taken(g, vq, 3)
    vq.add_used_many(echo([chains[0]]))   # in order: what an untracked ring replays is right
    g.collect()
    used = g.rb.used_idx
    HOSTILE[damage](g.view, used)
    region = bytes(g.region)
    vq = g.backend(cls)
    good = Guest()                   # the same ring tracked somewhere valid first
    assert vq.attach_inflight(good.view) == [] and vq.inflight_tracked
    with pytest.raises(RegionError):
        vq.attach_inflight(g.view)
    assert not vq.inflight_tracked and vq.resubmit_left == 0
    assert (vq.last_avail_idx, vq.used_idx) == (used, used)   # as SET_VRING_BASE said
    assert bytes(g.region) == region
    # Untracked, the ring still works (from the avail ring) and writes no region.
    good_region = bytes(good.region)
    vq.add_used_many(echo(vq.pop_many(SIZE)))
    assert len(g.collect()) == 2
    assert bytes(g.region) == region and bytes(good.region) == good_region


@pytest.mark.parametrize("cls", VARIANTS, ids=ids)
def test_a_region_too_small_or_an_unconfigured_ring_is_refused(cls: type[Virtqueue]) -> None:
    g = Guest()
    vq = g.backend(cls)
    with pytest.raises(RegionError, match="needs"):
        vq.attach_inflight(memoryview(bytearray(queue_region_size(SIZE) - 1)))
    assert not vq.inflight_tracked
    with pytest.raises(RegionError, match="not configured"):
        cls(g.mem, 1).attach_inflight(g.view)
    assert bytes(g.region) == bytes(len(g.region))
    assert vq.attach_inflight(None) == [] and not vq.inflight_tracked


@needs_cffi
def test_a_garbage_ring_with_an_inflight_region_is_collected_safely() -> None:
    result = collect_garbage_ring("inflight")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "collected"


# ------------------------------------------------------------------ a killed session


class Holding(EchoDevice):
    """The echo device that writes the reply and then never completes (about to die)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[object] = []

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain
                     ) -> Any:  # a deferred handle, not a byte count
        chain.write(chain.read())
        handle = vq.defer(chain)
        self.held.append(handle)
        return handle


class Quiet(EchoDevice):
    """The echo device that serves only on kicks (not when a ring starts): what it serves
    at start is what the ring's own kick brought."""

    def queue_started(self, index: int, vq: Virtqueue) -> None:
        self.events.append(("started", index))


@pytest.mark.parametrize("device", [Quiet, EchoDevice])
def test_a_killed_sessions_request_is_served_again_once(device: type[EchoDevice]) -> None:
    rig = SessionRig()
    try:
        rig.device = Holding()
        rig.session = Session(rig.device, rig.host)
        features = rig.u64(R.GET_FEATURES) & ~(1 << p.VHOST_F_LOG_ALL)
        rig.negotiate(features=features)
        assert p.ProtocolFeature.INFLIGHT_SHMFD in rig.session.protocol_features
        rig.mem_table()
        [answer] = rig.send(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, RING_SIZE))
        info = answer.payload
        assert isinstance(info, p.InflightInfo) and len(answer.fds) == 1
        region_fd = os.dup(answer.fds[0])         # the front-end keeps it across back-ends
        rig.ours.append(region_fd)
        rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
        ring = rig.setup_ring(0)
        rig.host.run_timers()
        head, out = rig.post(0, b"only once")
        assert rig.session.kick(0) == 1 and len(rig.device.held) == 1
        assert ring.rb.get_used() == []
        state = os.pread(region_fd, 16, 16 + 16 * head)
        assert state[0] == 1                       # in flight, in the shared region
        rig.session.close()                        # the back-end is gone
        rig.driver.write(out, bytes(9))            # (its reply must come again)

        rig.host = FakeLoop()
        rig.device = device()
        rig.session = Session(rig.device, rig.host)
        rig.negotiate(features=features)
        rig.mem_table()
        rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
        lay = ring.rb.lay
        rig.must(R.SET_VRING_NUM, p.VringState(0, RING_SIZE))
        rig.must(R.SET_VRING_BASE, p.VringState(0, ring.rb.used_idx))
        rig.must(R.SET_VRING_ADDR, p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used,
                                                UVA + lay.avail, 0))
        call = rig.eventfd()
        rig.must(R.SET_VRING_CALL, p.VringFd(0), fds=[os.dup(call)])
        kick = rig.eventfd()
        rig.must(R.SET_VRING_KICK, p.VringFd(0), fds=[os.dup(kick)])
        rig.must(R.SET_VRING_ENABLE, p.VringState(0, 1))
        if device is Quiet:
            assert ring.rb.get_used() == []        # nothing served until the self-kick
            assert rig.host.timers
        rig.host.run_timers()
        assert ring.rb.get_used() == [(head, 9)]
        assert rig.driver.read(out, 9) == b"only once"
        assert os.eventfd_read(call) >= 1
        assert rig.session.rings[0].resubmitted == 1
        assert os.pread(region_fd, 16, 16 + 16 * head)[0] == 0
        # The driver's next kick (it never kicked for it) finds nothing to serve again.
        assert rig.session.kick(0) == 0
        rig.host.run_timers()
        assert ring.rb.get_used() == []
        assert len(rig.echo(0, b"next")) == 1     # and the ring goes on (echo checks it)
    finally:
        rig.close()
