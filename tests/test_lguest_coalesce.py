"""The vring runner reaches lguest guests: with a loop attached to the bridge, a streaming
guest (the lguest driver model, its interrupt handler taking completions and re-arming
used_event at once, requests dispatched one at a time) is polled and its interrupts
coalesced; without one, every completion interrupts it.

The loop is a fake whose timers the test runs, and the coalescing limits are set so only the
batch size releases interrupts: counts, not times. bench/lguest_irqs.py measures the same
with a real loop thread and the default limits.
"""

from __future__ import annotations

import struct

import pytest
from fakeloop import FakeLoop

from vhostpy.blk import BlockDevice
from vhostpy.device import Coalescing
from vhostpy.lguest_bridge import LguestBridge
from vhostpy.lguest_guest import LguestGuestDriver
from vhostpy.memory import GuestMemory

RAM = 4 << 20
AREA = 64 * 4096
HDR = struct.Struct("<IIQ")   # virtio_blk_outhdr: type, ioprio, sector
BATCH = 8
STREAM = 64


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "no-loop"])
def test_a_streaming_lguest_guest_is_polled_and_coalesced(loop: bool) -> None:
    mem = GuestMemory()
    mem.add_buffer(bytearray(RAM + AREA), 0)
    interrupts: list[int] = []
    done: list[object] = []
    rings: list[object] = []

    def irq(line: int) -> None:          # the guest's handler: take completions at once
        interrupts.append(line)
        done.extend(rings[0].collect())  # type: ignore[attr-defined]

    bridge = LguestBridge(mem, RAM, irq_sink=irq)
    fake = FakeLoop()
    if loop:
        bridge.attach(fake)  # type: ignore[arg-type]
    dev = BlockDevice.in_memory(1 << 20)
    dev.coalesce = Coalescing(quiet=60.0, batch=BATCH, wait=60.0)
    dev.poll_idle = 60.0
    bridge.add_device(dev)
    ring = LguestGuestDriver(mem, RAM, bridge.notify).blk().rings[0]
    rings.append(ring)

    def submit(k: int) -> None:
        ring.add([HDR.pack(0, 0, k)], [512, 1])

    for k in range(32):                   # the stream starts with a burst
        submit(k)
    ring.kick()
    fake.run_timers(2)
    assert len(interrupts) == 1 and len(done) == 32
    for k in range(STREAM):               # then one request at a time
        submit(k)
        ring.kick()
        fake.run_timers(2)                # the loop's turn: a poll of the ring
    fake.run_timers(4)
    if loop:
        assert fake.timers, "the ring is still polled"
        assert len(done) == 32 + STREAM
        assert len(interrupts) == 1 + STREAM // BATCH   # one per batch of held completions
        assert ring.kicks <= 2                          # kicks stay off while polled
    else:
        assert len(done) == 32 + STREAM
        assert len(interrupts) == 1 + STREAM and ring.kicks == 1 + STREAM
    bridge.reset_all()
