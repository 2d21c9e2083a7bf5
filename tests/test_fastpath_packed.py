"""The compiled packed ring against the pure-Python reference, and both layouts' hostile rings.

* `CffiPackedVirtqueue` and `PackedVirtqueue` replaying the same random driver (chains of
  every shape, indirect tables, out-of-order and batched completion, rewinds, kick and
  interrupt suppression with and without EVENT_IDX, the dirty log, an inflight region and
  two back-end replacements that serve the chains in flight again from it) across many
  wraps of rings of odd and power-of-two sizes give the same chains, the same ring bytes,
  the same decisions, the same base, the same inflight region bytes and the same dirty
  bits;
* hostile descriptors, split and packed alike: both implementations refuse each with the
  same message, pop nothing of the bad chain and keep what was taken before it;
* the compiled device paths (blk) serve a packed ring through `CffiPackedVirtqueue`.

Everything here compares C with Python, so it runs in the suite's cffi pass.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout
from test_virtqueue_packed import PackedDriver, packed_layout

from vhostpy import _accel
from vhostpy.dirtylog import LOG_PAGE, DirtyLog
from vhostpy.inflight import queue_region_size
from vhostpy.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PythonVirtqueue,
    Virtqueue,
)
from vhostpy.virtqueue_packed import PackedVirtqueue

pytestmark = pytest.mark.skipif(
    _accel.lib is None,
    reason=f"compares the compiled path with Python; this run uses {_accel.IMPLEMENTATION}")

if _accel.lib is not None:
    from vhostpy.virtqueue_cffi import CffiPackedVirtqueue, CffiVirtqueue
    PACKED: dict[str, type[Virtqueue]] = {"python": PackedVirtqueue,
                                          "cffi": CffiPackedVirtqueue}
    SPLIT: dict[str, type[Virtqueue]] = {"python": PythonVirtqueue, "cffi": CffiVirtqueue}
else:
    PACKED = SPLIT = {}

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MEM = 1 << 20
_DESC = struct.Struct("<QIHH")


# ------------------------------------------------------------------ random agreement


def _packed(variant: str, size: int, event_idx: bool) -> tuple[PackedDriver, Virtqueue, DirtyLog]:
    mem, _ = anon_memory(MEM)
    drv = PackedDriver(mem, size, packed_layout(size))
    vq = PACKED[variant](mem, 0)
    drv.attach(vq)  # type: ignore[arg-type]
    vq.event_idx = event_idx
    log = DirtyLog(memoryview(bytearray(MEM // LOG_PAGE // 8)))
    return drv, vq, log


def _restarted(variant: str, drv: PackedDriver, event_idx: bool, region: bytearray,
               calls: list[int]) -> tuple[Virtqueue, list[int]]:
    """A new back-end's ring over the same guest memory and inflight region, started with
    a fresh ring's base (as QEMU's SET_VRING_BASE after a crash may be): the region says
    where the ring is and what to serve again."""
    vq = PACKED[variant](drv.memory, 0)
    vq.set_size(drv.size)
    vq.set_base(0x80008000)
    vq.set_addresses(drv.lay.desc, drv.lay.driver, drv.lay.device)
    vq.event_idx = event_idx
    CallRunner(vq, lambda: calls.append(1))
    return vq, vq.attach_inflight(memoryview(region))


def _run(variant: str, seed: int, size: int, event_idx: bool) -> list[Any]:
    """One variant's trace of a seeded random driver/device dialogue: an inflight region
    attached from the start, the dirty log from step 150, the back-end replaced (its chains
    in flight served again from the region) at steps 120 and 300."""
    rng = random.Random(seed)
    drv, vq, log = _packed(variant, size, event_idx)
    calls: list[int] = []
    CallRunner(vq, lambda: calls.append(1))
    region = bytearray(queue_region_size(size, packed=True))
    trace: list[Any] = [vq.attach_inflight(memoryview(region))]
    held: list[Any] = []          # chains popped, not completed (completed in random order)
    for step in range(400):
        if step == 150:
            vq.set_dirty_log(log, drv.lay.device)
        if step in (120, 300):
            vq, again = _restarted(variant, drv, event_idx, region, calls)
            trace.append(("restart", again, vq.base, vq.inflight_tracked))
            held = []
            if step == 300:
                vq.set_dirty_log(log, drv.lay.device)
        for _ in range(rng.randrange(0, 4)):
            readable = [bytes([rng.randrange(256)]) * rng.randrange(1, 40)
                        for _ in range(rng.randrange(0, 3))]
            writable = [rng.randrange(1, 5000) for _ in range(rng.randrange(0, 4))]
            if not readable and not writable:
                writable = [8]
            indirect = rng.random() < 0.3
            slots = 1 if indirect else len(readable) + len(writable)
            if slots > drv.num_free or not drv.free_ids:
                break
            drv.add_chain(readable, writable, indirect=indirect)
        r = rng.random()
        if r < 0.15:
            drv.set_driver_event(rng.choice([0, 1]))
        elif r < 0.3:
            drv.arm_next_used()
        if rng.random() < 0.2:
            vq.disable_notifications()
        chains = vq.pop_many(rng.randrange(1, 6))
        trace.append([(c.head, c.readable, c.writable, c.readable_len, c.writable_len,
                       c.read()) for c in chains])
        if chains and rng.random() < 0.15:
            back = rng.randrange(1, len(chains) + 1)
            vq.rewind(back)
            chains = chains[:-back]
        held.extend(chains)
        rng.shuffle(held)
        done, held = held[:rng.randrange(0, len(held) + 1)], held[len(held) // 2:]
        held = [c for c in held if c not in done]
        items = []
        for c in done:
            if c.writable_len:
                c.write(bytes([step & 0xFF]) * min(c.writable_len, 300))
            items.append((c.head, min(c.writable_len, 300)))
        vq.add_used_many(items)
        trace.append((vq.needs_notification(), vq.signal_used(), len(calls)))
        trace.append((vq.enable_notifications(rng.random() < 0.5), vq.has_available(),
                      vq.available()))
        trace.append(drv.memory.read(drv.lay.desc, 16 * size))
        trace.append(drv.memory.read(drv.lay.device, 4))
        trace.append(drv.get_used())
        trace.append((vq.base, vq.taken, vq.error, bytes(region)))
    vq.log_used_ring()
    trace.append(bytes(log.view))
    return trace


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize(("seed", "size"), [(0, 8), (1, 5), (2, 64), (3, 1), (4, 3), (5, 256)])
def test_c_and_python_agree_on_packed_rings(seed: int, size: int, event_idx: bool) -> None:
    python = _run("python", seed, size, event_idx)
    cffi = _run("cffi", seed, size, event_idx)
    assert len(python) == len(cffi)
    for k, (a, b) in enumerate(zip(python, cffi, strict=True)):
        assert a == b, f"step item {k} differs"
    assert sum(len(t) for t in python if isinstance(t, list)) > 100, "too little was popped"
    restarts = [t[1:] for t in python if isinstance(t, tuple) and t[:1] == ("restart",)]
    assert len(restarts) == 2 and all(tracked for _ids, _base, tracked in restarts)
    assert any(ids for ids, _base, _tracked in restarts) or size == 1, "nothing served again"


def _in_order_run(variant: str) -> list[Any]:
    """VIRTIO_F_IN_ORDER on a packed ring, many wraps of a 7-slot ring: batches that
    complete every chain in flight in order with nothing written go out as one used
    descriptor; a length, an order other than the ring's, or a chain left in flight gives
    each chain its own. The driver must see every chain either way."""
    drv, vq, _ = _packed(variant, 7, False)
    vq.in_order = drv.in_order = True
    trace: list[Any] = []
    rng = random.Random(7)
    for step in range(60):
        shape = step % 4   # 0: one descriptor; 1: a length; 2: reversed; 3: one left over
        ids = [drv.add_chain([b"x"] * rng.choice([1, 1, 2]))[0] for _ in range(3)]
        chains = vq.pop_many(8)
        assert [c.head for c in chains] == ids
        items = [(c.head, 1 if shape == 1 and c is chains[1] else 0) for c in chains]
        if shape == 2:
            items.reverse()
        kept = items.pop() if shape == 3 else None
        before = drv.memory.read(drv.lay.desc, 16 * 7)
        vq.add_used_many(items)
        after = drv.memory.read(drv.lay.desc, 16 * 7)
        written = sum(before[k:k + 16] != after[k:k + 16] for k in range(0, 16 * 7, 16))
        if kept is not None:
            vq.add_used_many([kept])
        used = drv.get_used()
        assert sorted(used) == sorted([*items, *([kept] if kept else [])]), (step, used)
        trace.append((shape, written, used, after, vq.base))
        assert (written == 1) == (shape == 0), (step, shape, written)
    return trace


def test_in_order_batches_as_one_used_descriptor_alike() -> None:
    assert _in_order_run("python") == _in_order_run("cffi")


# ------------------------------------------------------------------ hostile rings, both layouts

#: Each builder sets one hostile chain up after one good chain; None: that layout has no such
#: case. They return nothing: the ring is the case.
PackedCase = Callable[[PackedDriver], None]
SplitCase = Callable[[RingBuilder], None]


def _p_loop(drv: PackedDriver) -> None:      # every slot chained to the next: a loop
    buf = drv.alloc(16)
    drv.add_raw([(buf, 16, 0, NEXT)] * (drv.size - drv.chain_slots.get(0, 1)))


def _p_unmapped(drv: PackedDriver) -> None:
    drv.add_raw([(MEM + 0x1000, 64, 1, 0)])


def _p_overflow(drv: PackedDriver) -> None:
    drv.add_raw([((1 << 64) - 16, 32, 1, 0)])


def _p_long_chain(drv: PackedDriver) -> None:
    buf = drv.alloc(16)
    drv.add_raw([(buf, 16, 1, NEXT), (buf, 0x80000000, 1, NEXT), (buf, 0x80000000, 1, 0)])


def _p_readable_after_writable(drv: PackedDriver) -> None:
    buf = drv.alloc(64)
    drv.add_raw([(buf, 16, 1, WRITE | NEXT), (buf + 16, 16, 1, 0)])


def _p_indirect_and_next(drv: PackedDriver) -> None:
    table = drv.alloc(32)
    drv.add_raw([(table, 32, 1, INDIRECT | NEXT), (table, 16, 1, 0)])


def _p_indirect_after_direct(drv: PackedDriver) -> None:
    table = drv.alloc(32)
    drv.add_raw([(table, 16, 1, NEXT), (table, 32, 1, INDIRECT)])


def _p_indirect_bad_length(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(32), 24, 1, INDIRECT)])


def _p_indirect_unmapped(drv: PackedDriver) -> None:
    drv.add_raw([(MEM - 16, 32, 1, INDIRECT)])


def _p_nested_indirect(drv: PackedDriver) -> None:
    table = drv.alloc(32)
    drv.write_desc(0, table, 32, 0, INDIRECT, table=table)
    drv.add_raw([(table, 32, 1, INDIRECT)])


def _p_indirect_entry_unmapped(drv: PackedDriver) -> None:
    table = drv.alloc(32)
    drv.write_desc(0, drv.alloc(8), 8, 0, 0, table=table)
    drv.write_desc(1, MEM + 64, 8, 0, WRITE, table=table)
    drv.add_raw([(table, 32, 1, INDIRECT)])


def _p_id_out_of_range(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(8), 8, drv.size, 0)])


def _p_id_reused(drv: PackedDriver) -> None:
    drv.add_raw([(drv.alloc(8), 8, 0, 0)])        # id 0 is the good chain's, in flight


PACKED_CASES: dict[str, PackedCase] = {
    "loop": _p_loop, "unmapped": _p_unmapped, "overflow": _p_overflow,
    "long_chain": _p_long_chain, "readable_after_writable": _p_readable_after_writable,
    "indirect_and_next": _p_indirect_and_next, "indirect_after_direct": _p_indirect_after_direct,
    "indirect_bad_length": _p_indirect_bad_length, "indirect_unmapped": _p_indirect_unmapped,
    "nested_indirect": _p_nested_indirect, "indirect_entry_unmapped": _p_indirect_entry_unmapped,
    "id_out_of_range": _p_id_out_of_range, "id_reused": _p_id_reused,
}


def _packed_hostile(variant: str, case: PackedCase) -> tuple[Any, ...]:
    mem, _ = anon_memory(MEM)
    drv = PackedDriver(mem, 8, packed_layout(8))
    vq = PACKED[variant](mem, 0)
    drv.attach(vq)  # type: ignore[arg-type]
    drv.add_chain([b"good"], [16])          # id 0, taken before the hostile chain
    case(drv)
    chains = vq.pop_many(8)
    again = vq.pop_many(8)                   # a broken ring gives nothing more
    return ([(c.head, c.readable, c.writable) for c in chains], len(again), vq.error,
            mem.read(drv.lay.desc, 16 * 8), vq.base)


@pytest.mark.parametrize("name", sorted(PACKED_CASES))
def test_hostile_packed_ring_fails_alike(name: str) -> None:
    python = _packed_hostile("python", PACKED_CASES[name])
    cffi = _packed_hostile("cffi", PACKED_CASES[name])
    assert python == cffi
    chains, again, error, _ring, _base = python
    assert error is not None and again == 0
    assert [c[0] for c in chains] == [0], "the good chain before the hostile one is served"


def _s_loop(rb: RingBuilder) -> None:
    buf = rb.alloc(16)
    rb.write_desc(5, buf, 16, NEXT, 6)
    rb.write_desc(6, buf, 16, NEXT, 5)
    rb.publish(5)


def _s_next_out_of_range(rb: RingBuilder) -> None:
    rb.write_desc(5, rb.alloc(16), 16, NEXT, 99)
    rb.publish(5)


def _s_head_out_of_range(rb: RingBuilder) -> None:
    rb.publish(rb.size + 3)


def _s_unmapped(rb: RingBuilder) -> None:
    rb.write_desc(5, MEM + 0x1000, 64, 0)
    rb.publish(5)


def _s_overflow(rb: RingBuilder) -> None:
    rb.write_desc(5, (1 << 64) - 16, 32, 0)
    rb.publish(5)


def _s_long_chain(rb: RingBuilder) -> None:
    buf = rb.alloc(16)
    rb.write_desc(5, buf, 0x80000000, NEXT, 6)
    rb.write_desc(6, buf, 0x80000000, 0)
    rb.publish(5)


def _s_readable_after_writable(rb: RingBuilder) -> None:
    buf = rb.alloc(32)
    rb.write_desc(5, buf, 16, WRITE | NEXT, 6)
    rb.write_desc(6, buf + 16, 16, 0)
    rb.publish(5)


def _s_indirect_and_next(rb: RingBuilder) -> None:
    rb.write_desc(5, rb.alloc(32), 32, INDIRECT | NEXT, 6)
    rb.publish(5)


def _s_indirect_bad_length(rb: RingBuilder) -> None:
    rb.write_desc(5, rb.alloc(32), 24, INDIRECT)
    rb.publish(5)


def _s_nested_indirect(rb: RingBuilder) -> None:
    table = rb.alloc(32)
    rb.write_desc(0, table, 32, INDIRECT, 0, table=table)
    rb.write_desc(5, table, 32, INDIRECT)
    rb.publish(5)


def _s_indirect_loop(rb: RingBuilder) -> None:
    table = rb.alloc(32)
    buf = rb.alloc(8)
    rb.write_desc(0, buf, 8, NEXT, 1, table=table)
    rb.write_desc(1, buf, 8, NEXT, 0, table=table)
    rb.write_desc(5, table, 32, INDIRECT)
    rb.publish(5)


def _s_avail_idx_ahead(rb: RingBuilder) -> None:
    rb.set_avail_idx(rb.avail_idx + rb.size + 5)


SPLIT_CASES: dict[str, SplitCase] = {
    "loop": _s_loop, "next_out_of_range": _s_next_out_of_range,
    "head_out_of_range": _s_head_out_of_range, "unmapped": _s_unmapped,
    "overflow": _s_overflow, "long_chain": _s_long_chain,
    "readable_after_writable": _s_readable_after_writable,
    "indirect_and_next": _s_indirect_and_next, "indirect_bad_length": _s_indirect_bad_length,
    "nested_indirect": _s_nested_indirect, "indirect_loop": _s_indirect_loop,
    "avail_idx_ahead": _s_avail_idx_ahead,
}


def _split_hostile(variant: str, case: SplitCase) -> tuple[Any, ...]:
    mem, _ = anon_memory(MEM)
    rb = RingBuilder(mem, 8, layout(8))
    vq = SPLIT[variant](mem, 0)
    rb.attach(vq)
    rb.write_desc(0, rb.alloc(b"good"), 4, 0)
    rb.publish(0)
    case(rb)
    first = vq.pop_many(1)
    chains = vq.pop_many(8)
    again = vq.pop_many(8)
    return ([(c.head, c.readable, c.writable) for c in first + chains], len(again), vq.error,
            vq.last_avail_idx)


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_hostile_split_ring_fails_alike(name: str) -> None:
    python = _split_hostile("python", SPLIT_CASES[name])
    cffi = _split_hostile("cffi", SPLIT_CASES[name])
    assert python == cffi
    chains, again, error, _last = python
    assert error is not None and again == 0
    # An impossible avail idx condemns the whole ring, the good chain with it.
    assert [c[0] for c in chains] == ([] if name == "avail_idx_ahead" else [0])


# ------------------------------------------------------------------ compiled devices, packed


def test_compiled_blk_path_serves_a_packed_ring(tmp_path: Any) -> None:
    """BlockDevice's C drain takes a CffiPackedVirtqueue like a split one: a write then a
    read of the same sectors through the ring, statuses and data as expected."""
    from vhostpy.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDevice
    from vhostpy.blk_cffi import BlkFastPath

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    dev = BlockDevice.open_image(str(image))
    mem, _ = anon_memory(MEM)
    drv = PackedDriver(mem, 16, packed_layout(16))
    vq = CffiPackedVirtqueue(mem, 0)
    drv.attach(vq)  # type: ignore[arg-type]
    CallRunner(vq)
    assert BlkFastPath.serves(vq)
    dev.set_features(dev.features())
    dev.queue_started(0, vq)
    payload = bytes(range(256)) * 16
    for sector in range(0, 40, 8):      # several rounds: the ring wraps
        drv.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), payload], [1])
        dev.process_queue(0, vq)
        drv.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)], [4096, 1])
        dev.process_queue(0, vq)
        used = drv.get_used()
        assert [length for _id, length in used] == [1, 4097]
    assert vq.error is None and vq.taken == ()
    assert image.read_bytes()[32 * 512:32 * 512 + 4096] == payload
