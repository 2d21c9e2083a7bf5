"""The vring runner (`vring.Vring`): state machine, notifiers, hook containment, the decision
after a kick (polling, coalescing) and the in-flight count, without a transport.

Rings are laid out with `RingBuilder` in anonymous memory; the runner's host is a fake
loop whose timers the test runs by hand, so every polling turn is deterministic.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator

import pytest
from fakeloop import FakeLoop
from ringbuilder import RingBuilder, anon_memory, layout

from vhostpy.device import Coalescing, Device
from vhostpy.errors import FrontendError, UnsupportedError
from vhostpy.memory import GuestMemory
from vhostpy.notifier import CallbackNotifier, EventFdNotifier, eventfd_notifier
from vhostpy.virtqueue import VIRTIO_RING_F_EVENT_IDX, DescriptorChain, Virtqueue
from vhostpy.vring import (
    TRANSITIONS,
    DefaultVirtqueue,
    HookError,
    RingState,
    Vring,
    call_hook,
)

SIZE = 8
S = RingState


class Recorder(Device):
    """Completes every chain with 0 bytes; records hooks; raises in `failing` hooks."""

    name = "recorder"
    num_queues = 2

    def __init__(self, failing: set[str] | None = None) -> None:
        super().__init__()
        self.failing = failing or set()
        self.events: list[tuple[str, int]] = []

    def _hook(self, hook: str, index: int) -> None:
        self.events.append((hook, index))
        if hook in self.failing:
            raise RuntimeError(f"{hook} exploded")

    def queue_started(self, index: int, vq: Virtqueue) -> None:
        self._hook("queue_started", index)
        super().queue_started(index, vq)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        self._hook("queue_stopped", index)

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        self._hook("process_queue", index)
        super().process_queue(index, vq)

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        return 0


class Rig:
    """Two rings of one device over one memory, each with its driver side and eventfds."""

    def __init__(self, device: Device, host: FakeLoop | None = None) -> None:
        self.device = device
        self.mem: GuestMemory
        self.mem, self._buf = anon_memory(1 << 20)
        self.rbs = [RingBuilder(self.mem, SIZE, layout(SIZE, base=i << 18, data_size=1 << 16))
                    for i in range(2)]
        self.rings = [Vring(device, DefaultVirtqueue(self.mem, i), host) for i in range(2)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.errs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        for i, ring in enumerate(self.rings):
            ring.set_call(EventFdNotifier(os.dup(self.calls[i])))
            ring.set_err(EventFdNotifier(os.dup(self.errs[i])))

    def configure(self, i: int) -> Vring:
        ring, lay = self.rings[i], self.rbs[i].lay
        ring.set_size(SIZE)
        ring.set_base(0)
        ring.set_addresses(lay.desc, lay.avail, lay.used)
        return ring

    def live(self, i: int) -> Vring:
        ring = self.configure(i)
        ring.start()
        ring.enable(True)
        assert ring.state is S.ENABLED
        return ring

    def close(self) -> None:
        for ring in self.rings:
            ring.reset()
        for fd in self.calls + self.errs:
            os.close(fd)


def fired(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(Recorder())
    yield r
    r.close()


# ------------------------------------------------------------------ the state machine


def test_transition_table_is_closed_and_broken_only_stops() -> None:
    assert set(TRANSITIONS) == set(RingState)
    for targets in TRANSITIONS.values():
        assert targets <= set(RingState)
    assert TRANSITIONS[S.BROKEN] == {S.UNCONFIGURED, S.STOPPED}
    assert S.BROKEN not in TRANSITIONS[S.UNCONFIGURED] | TRANSITIONS[S.STOPPED]


def test_life_cycle(rig: Rig) -> None:
    ring = rig.rings[0]
    assert ring.state is S.UNCONFIGURED
    rig.configure(0)
    assert ring.state is S.CONFIGURED
    ring.start()
    assert ring.state is S.STARTED and rig.device.events == []   # started, not enabled
    ring.enable(True)
    assert ring.state is S.ENABLED and ring.live
    assert rig.device.events == [("queue_started", 0), ("process_queue", 0)]
    ring.enable(False)
    assert ring.state is S.STARTED and rig.device.events[-1] == ("queue_stopped", 0)
    ring.enable(True)
    head = rig.rbs[0].add_chain([b"x"], [4])[0]
    assert ring.kick() == 1 and rig.rbs[0].get_used() == [(head, 0)]
    assert fired(rig.calls[0]) >= 1
    assert ring.stop() == 1                      # the next avail index
    assert ring.state is S.STOPPED and ring.kick_fd is None and ring.vq.size == 0
    assert ring.call_fd is not None              # call and err survive a stop
    rig.configure(0)
    assert ring.state is S.CONFIGURED
    ring.reset()
    assert ring.state is S.UNCONFIGURED and ring.call_fd is None and ring.err_fd is None


def test_kick_on_a_ring_that_is_not_enabled_does_nothing(rig: Rig) -> None:
    rig.configure(0)
    rig.rbs[0].add_chain([b"x"], [4])
    assert rig.rings[0].kick() == 0 and rig.rings[0].kicks == 1
    assert rig.rbs[0].get_used() == [] and rig.device.events == []


def test_size_and_base_refused_while_serving(rig: Rig) -> None:
    ring = rig.live(0)
    with pytest.raises(FrontendError, match="running ring"):
        ring.set_size(4)
    with pytest.raises(FrontendError, match="running ring"):
        ring.set_base(3)


def test_in_flight_holds_the_chains_taken_and_not_completed(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    ring = rig.live(0)
    heads = [rig.rbs[0].add_chain([bytes([k])], [4])[0] for k in range(4)]
    chains = ring.vq.pop_many(8)
    assert [c.head for c in chains] == heads and ring.in_flight == tuple(heads)
    ring.vq.add_used(chains[1].head, 0)                  # out of order
    assert ring.in_flight == (heads[0], heads[2], heads[3])
    ring.vq.rewind(1)                                     # the last one is given back
    assert ring.in_flight == (heads[0], heads[2])
    assert [c.head for c in ring.vq.pop_many(8)] == [heads[3]]
    ring.vq.add_used_many([(heads[0], 0), (heads[3], 0)])
    assert ring.in_flight == (heads[2],) and ring.status()["in_flight"] == 1
    with caplog.at_level(logging.WARNING):
        ring.stop()
    assert f"stopped with 1 chains in flight (heads [{heads[2]}])" in caplog.text
    assert ring.in_flight == ()


# ------------------------------------------------------------------ containment


@pytest.mark.parametrize("hook", ["queue_started", "process_queue"])
def test_a_raising_hook_breaks_only_its_ring(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(Recorder())
    try:
        other = rig.live(1)
        rig.device.events.clear()
        with caplog.at_level(logging.ERROR, logger="vhostpy.vring"):
            ring = rig.configure(0)
            ring.start()
            if hook == "queue_started":
                rig.device.failing = {hook}
            ring.enable(True)
            rig.device.failing = {hook}
            ring.kick()
        assert ring.state is S.BROKEN and "exploded" in (ring.error or "")
        assert f"device recorder failed in {hook} on vring 0" in caplog.text
        assert fired(rig.errs[0]) == 1 and fired(rig.errs[1]) == 0
        assert ("queue_stopped", 0) in rig.device.events    # the device lets go of it
        kicks = rig.device.events.count(("process_queue", 0))
        ring.kick()                                           # nothing is served any more
        assert rig.device.events.count(("process_queue", 0)) == kicks
        rig.device.failing = set()
        head = rig.rbs[1].add_chain([b"y"], [4])[0]
        assert other.kick() == 1 and rig.rbs[1].get_used() == [(head, 0)]
        assert ring.stop() == ring.stop() and ring.state is S.STOPPED   # recoverable by stop
        rig.live(0)
    finally:
        rig.close()


def test_a_raising_queue_stopped_is_logged_and_the_ring_still_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(Recorder({"queue_stopped"}))
    try:
        ring = rig.live(0)
        with caplog.at_level(logging.ERROR, logger="vhostpy.vring"):
            assert ring.stop() == 0
        assert ring.state is S.STOPPED and "failed in queue_stopped on vring 0" in caplog.text
        assert fired(rig.errs[0]) == 0
    finally:
        rig.close()


def test_call_hook_for_requests() -> None:
    dev = Recorder()

    def boom(value: int) -> None:
        raise KeyError(value)

    with pytest.raises(HookError, match=r"device recorder failed in set_features: KeyError\(7\)"):
        call_hook(dev, "set_features", boom, 7)
    with pytest.raises(UnsupportedError):           # a refusal on purpose keeps its class
        call_hook(dev, "set_mtu", dev.set_mtu, 1500)
    assert call_hook(dev, "features", dev.features) == dev.features()


def test_a_dead_call_notifier_breaks_the_ring_not_the_caller(rig: Rig) -> None:
    ring = rig.live(0)

    def gone() -> None:
        raise OSError("the interrupt controller went away")

    ring.set_call(CallbackNotifier(gone))
    rig.rbs[0].add_chain([b"x"], [4])
    ring.kick()                                      # must not raise
    assert ring.state is S.BROKEN and "call notifier" in (ring.error or "")
    assert fired(rig.errs[0]) == 1


# ------------------------------------------------------------------ notifiers


def test_only_eventfds_are_accepted() -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    memfd = os.memfd_create("x")
    try:
        for fd in (r, w, a.fileno(), memfd):
            with pytest.raises(FrontendError, match="is not an eventfd"):
                eventfd_notifier(fd, "vring 0 call")
        efd = os.eventfd(0)                          # blocking as created
        n = eventfd_notifier(efd, "vring 0 call")
        assert not os.get_blocking(efd)
        for _ in range(3):
            n.notify()
        assert n.drain() and not n.drain()
        n.close()
        with pytest.raises(OSError):
            os.fstat(efd)
        with pytest.raises(FrontendError, match=f"kick fd {efd}"):
            eventfd_notifier(efd, "vring 0 kick")
    finally:
        for fd in (r, w, memfd):
            os.close(fd)
        a.close()
        b.close()


def test_a_full_eventfd_never_blocks() -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)     # the largest count an eventfd holds
    n = EventFdNotifier(efd)
    n.notify()          # the counter cannot grow: the other side has a wake-up pending
    n.close()


def test_kick_fd_is_watched_and_drained() -> None:
    host = FakeLoop()
    rig = Rig(Recorder(), host)
    try:
        ring = rig.live(0)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        ring.set_kick(EventFdNotifier(os.dup(kick)))
        assert ring.kick_fd in host.watched
        head = rig.rbs[0].add_chain([b"x"], [4])[0]
        os.eventfd_write(kick, 1)
        host.watched[ring.kick_fd]()
        assert ring.kicks == 1 and rig.rbs[0].get_used() == [(head, 0)]
        host.watched[ring.kick_fd]()                 # spurious wake-up: nothing to read
        assert ring.kicks == 1
        old = ring.kick_fd
        ring.stop()
        assert old not in host.watched
        os.close(kick)
    finally:
        rig.close()


# ------------------------------------------------------------------ polling and coalescing


def test_polling_starts_on_work_and_returns_to_kicks_when_idle() -> None:
    host = FakeLoop()
    dev = Recorder()
    dev.poll_idle = 60.0
    rig = Rig(dev, host)
    try:
        ring = rig.live(0)
        rb = rig.rbs[0]
        rb.add_chain([b"x"], [4])
        assert ring.kick() == 1
        assert ring.polling and ring.vq.polling
        # Work published while polled is served without a kick, and kicks stay off.
        head = rb.add_chain([b"y"], [4])[0]
        host.timers.pop()()
        assert (head, 0) in rb.get_used() and rb.no_notify and ring.polling
        ring.poll_idle = 0.0
        assert host.run_timers() < 1000
        assert not ring.polling and not rb.no_notify              # idle: kicks asked again
    finally:
        rig.close()


def test_the_idle_window_widens_after_a_short_sleep_and_narrows_after_a_long_one() -> None:
    """Adaptive polling (pacing's docstring): a kick soon after polling gave up widens the
    window to cover that gap (at least doubling it), a kick after more than poll_idle_max
    halves it; the window never leaves [poll_idle, poll_idle_max]."""
    host = FakeLoop()
    dev = Recorder()
    dev.poll_idle, dev.poll_idle_max = 0.002, 0.3
    rig = Rig(dev, host)
    try:
        ring = rig.live(0)
        rb = rig.rbs[0]

        def burst_then_idle() -> float:
            rb.add_chain([b"x"], [4])
            assert ring.kick() == 1 and ring.polling
            window = ring.idle_window
            while ring.polling:                        # serve the empty ring until it gives up
                assert host.run_timers(1) == 1
            return window

        assert burst_then_idle() == 0.002 and ring.poll_sleeps == 1
        time.sleep(0.02)                               # 20 ms: 2 ms more would not have met it
        assert 0.02 <= burst_then_idle() < 0.3         # fits the gap
        assert ring.status()["idle_window"] == ring.idle_window
        assert ring.status()["poll_sleeps"] == ring.poll_sleeps == 2
        wide = ring.idle_window
        for _ in range(4):                             # gaps shorter than the window: no change
            rb.add_chain([b"y"], [4])
            assert ring.kick() == 1
            assert ring.idle_window == wide
            while ring.polling:
                assert host.run_timers(1) == 1
        time.sleep(0.31)                               # longer than poll_idle_max: halved
        assert burst_then_idle() == wide / 2
        for _ in range(5):
            time.sleep(0.31)
            burst_then_idle()
        assert ring.idle_window == 0.002               # back to the start, never below it
    finally:
        rig.close()


def test_a_fixed_idle_window_never_widens() -> None:
    host = FakeLoop()
    dev = Recorder()
    dev.poll_idle = dev.poll_idle_max = 0.001
    rig = Rig(dev, host)
    try:
        ring = rig.live(0)
        for _ in range(3):
            rig.rbs[0].add_chain([b"x"], [4])
            assert ring.kick() == 1 and ring.idle_window == 0.001
            while ring.polling:
                assert host.run_timers(1) == 1
            time.sleep(0.003)
        assert ring.poll_sleeps == 3 and ring.idle_window == 0.001
    finally:
        rig.close()


def test_no_host_means_no_polling(rig: Rig) -> None:
    ring = rig.live(0)
    rig.rbs[0].add_chain([b"x"], [4])
    assert ring.kick() == 1 and not ring.polling and not rig.rbs[0].no_notify


def test_coalescing_holds_a_streaming_drivers_interrupts_until_the_batch() -> None:
    host = FakeLoop()
    dev = Recorder()
    dev.coalesce = Coalescing(quiet=60.0, batch=3, wait=60.0)
    dev.poll_idle = 60.0
    rig = Rig(dev, host)
    try:
        ring = rig.live(0)
        rb = rig.rbs[0]
        for _ in range(2):
            rb.add_chain([b"a"], [4])
        ring.kick()                    # two completions, one interrupt: streaming from now
        assert fired(rig.calls[0]) == 1
        assert ring.polling
        rb.add_chain([b"b"], [4])
        host.timers.pop()()            # one completion: held
        assert fired(rig.calls[0]) == 0 and ring.vq.unsignalled == 1
        rb.add_chain([b"c"], [4])
        rb.add_chain([b"d"], [4])
        host.timers.pop()()            # three wait: one interrupt for them
        assert fired(rig.calls[0]) == 1 and ring.vq.unsignalled == 0
        assert ring.coalescing is not None and ring.coalescing.releases == 1
        assert ring.coalescing.held == 3
        rb.add_chain([b"e"], [4])
        host.timers.pop()()
        assert fired(rig.calls[0]) == 0
        ring.stop()                    # stopping releases what is held
        assert fired(rig.calls[0]) == 1
    finally:
        rig.close()


def test_failing_a_ring_with_nothing_configured_changes_nothing(rig: Rig) -> None:
    ring = rig.rings[0]
    ring.fail("front-end memory went away")
    assert ring.state is S.UNCONFIGURED and ring.error is None and fired(rig.errs[0]) == 0
    assert rig.live(0).state is S.ENABLED          # it can still be brought up


def test_a_depth_one_driver_keeping_up_with_one_drain_is_not_streaming() -> None:
    """Twenty requests served by one kick, each completed, interrupted and followed by the
    next (queue depth 1 with a fast driver): one completion per interrupt, so the next
    kick's completion is interrupted at once, not held."""
    host = FakeLoop()

    class KeepsUp(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.more = 0
            self.rb: RingBuilder | None = None

        def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
            if self.more and self.rb is not None:    # the driver's next request arrives
                self.more -= 1
                self.rb.add_chain([b"n"], [4])
            return 0

    dev = KeepsUp()
    dev.coalesce = Coalescing(quiet=60.0, batch=64, wait=60.0)
    rig = Rig(dev, host)
    try:
        ring = rig.live(0)
        dev.rb = rig.rbs[0]
        dev.more = 19
        rig.rbs[0].add_chain([b"a"], [4])
        assert ring.kick() == 20
        assert fired(rig.calls[0]) == 20                 # one interrupt per completion
        assert ring.coalescing is not None and ring.coalescing.last_batch == 1
        host.timers.clear()
        ring.enable(False)
        ring.enable(True)                                # polling off, state kept
        rig.rbs[0].add_chain([b"b"], [4])
        ring.kick()
        assert fired(rig.calls[0]) == 1 and ring.vq.unsignalled == 0   # not held
    finally:
        rig.close()


def test_a_streaming_driver_stays_streaming_while_its_queue_is_deep() -> None:
    """Depth (EVENT_IDX: avail->idx against used_event) keeps a streaming driver streaming
    when an interrupt found one completion; it never starts streaming by itself."""
    dev = Recorder()
    dev.coalesce = Coalescing(quiet=60.0, batch=64, wait=60.0)
    rig = Rig(dev, FakeLoop())
    try:
        ring = rig.rings[0]
        ring.set_features(1 << VIRTIO_RING_F_EVENT_IDX)
        rig.configure(0)
        ring.start()
        ring.enable(True)
        held = ring.coalescing
        assert held is not None
        rb = rig.rbs[0]
        for _ in range(4):
            rb.add_chain([b"x"], [4])
        rb.set_used_event(0)                          # four published, none taken back
        assert ring.vq.driver_depth() == 4
        held.last_batch = 1
        assert not ring._streaming(held)              # depth alone does not start it
        held.last_batch = 2
        assert ring._streaming(held)                  # an interrupt covered two: streaming
        held.last_batch = 1
        assert ring._streaming(held)                  # one completion, but 4 deep: still
        rb.set_used_event(3)
        assert ring.vq.driver_depth() == 1
        assert not ring._streaming(held) and not held.engaged
    finally:
        rig.close()
