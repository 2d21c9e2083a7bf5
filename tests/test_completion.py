"""Chains completed later (`completion.InFlight` inside `vring.Vring`): deferred handles,
other threads, coroutines, VIRTIO_F_IN_ORDER, and what a stop or a reset does about chains
in flight. Rings are laid out with `RingBuilder`; the host is a fake loop (timers run by
hand) or a real `EventLoop` where coroutines must run."""

from __future__ import annotations

import asyncio
import os
import random
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeloop import FakeLoop
from loopthread import on_loop
from ringbuilder import RingBuilder, anon_memory, layout
from scripted import ScriptedGuest
from tools import wait_until

from vhostpy import protocol as p
from vhostpy.completion import Completion
from vhostpy.device import Coalescing, Device
from vhostpy.loop import EventLoop
from vhostpy.notifier import EventFdNotifier
from vhostpy.server import Server
from vhostpy.virtqueue import VIRTIO_F_IN_ORDER, DescriptorChain, Virtqueue
from vhostpy.vring import DefaultVirtqueue, RingState, Vring

SIZE = 64


class Deferring(Device):
    """Defers every chain; the test completes them (`held`). Chains whose first readable
    byte is 0x5A are completed at once instead (mixing both kinds)."""

    name = "deferring"

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Completion] = []

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> Any:
        if chain.read(0, 1) == b"\x5a":
            return 7
        completion = vq.defer(chain)
        self.held.append(completion)
        return completion


class AsyncDevice(Device):
    """`async def handle_chain`: sleeps a random while, writes the chain's head, returns 4."""

    name = "async"

    def __init__(self, *, fail_head: int | None = None) -> None:
        super().__init__()
        self.finished: list[int] = []
        self.fail_head = fail_head

    async def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        await asyncio.sleep(random.uniform(0, 0.02))
        if chain.head == self.fail_head:
            raise OSError(5, "the store exploded")
        self.finished.append(chain.head)
        return chain.write(chain.head.to_bytes(4, "little"))


class Rig:
    def __init__(self, device: Device, host: Any = None) -> None:
        self.mem, self._buf = anon_memory(1 << 20)
        self.rb = RingBuilder(self.mem, SIZE, layout(SIZE, data_size=1 << 16))
        self.ring = Vring(device, DefaultVirtqueue(self.mem, 0), host)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.buffers: dict[int, int] = {}   # head -> its writable buffer
        self.ring.set_call(EventFdNotifier(os.dup(self.call)))
        lay = self.rb.lay
        self.ring.set_size(SIZE)
        self.ring.set_base(0)
        self.ring.set_addresses(lay.desc, lay.avail, lay.used)

    def go(self, features: int = 0) -> Vring:
        self.ring.set_features(features)
        self.ring.start()
        self.ring.enable(True)
        assert self.ring.state is RingState.ENABLED
        return self.ring

    def submit(self, n: int, *, sync: bool = False) -> list[int]:
        first = b"\x5a" if sync else b"\x00"
        heads = []
        for _ in range(n):
            head, addrs = self.rb.add_chain([first], [4])
            self.buffers[head] = addrs[-1]
            heads.append(head)
        return heads

    def interrupts(self) -> int:
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.ring.reset()
        os.close(self.call)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(Deferring(), FakeLoop())
    yield r
    r.close()


def test_deferred_chains_complete_out_of_order(rig: Rig) -> None:
    ring = rig.go()
    heads = rig.submit(4)
    assert ring.kick() == 4
    assert rig.rb.get_used() == [] and ring.in_flight == tuple(heads)
    assert len(ring.inflight) == 4
    held = ring.device.held  # type: ignore[attr-defined]
    for completion in reversed(held):
        completion.complete(3)
    assert rig.rb.get_used() == [(h, 3) for h in reversed(heads)]
    assert ring.in_flight == () and len(ring.inflight) == 0
    assert rig.interrupts() >= 1
    with pytest.raises(RuntimeError, match="completed twice"):
        held[0].complete(3)


def test_in_order_publishes_in_ring_order(rig: Rig) -> None:
    ring = rig.go(1 << VIRTIO_F_IN_ORDER)
    deferred = rig.submit(2)
    sync = rig.submit(1, sync=True)
    later = rig.submit(1)
    ring.kick()
    held = ring.device.held  # type: ignore[attr-defined]
    assert rig.rb.get_used() == []          # the synchronous one waits behind two deferred
    held[2].complete(1)                     # the newest first: nothing may move
    held[1].complete(1)
    assert rig.rb.get_used() == []
    held[0].complete(1)
    assert rig.rb.get_used() == [(deferred[0], 1), (deferred[1], 1), (sync[0], 7),
                                 (later[0], 1)]


def test_other_threads_complete_through_the_host(rig: Rig) -> None:
    ring = rig.go()
    heads = rig.submit(3)
    ring.kick()
    held = ring.device.held  # type: ignore[attr-defined]
    workers = [threading.Thread(target=c.complete, args=(2,)) for c in held]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert rig.rb.get_used() == []          # queued for the ring's thread
    host = ring.host
    assert isinstance(host, FakeLoop)
    wakes = [t for t in host.timers if getattr(t, "__name__", "") == "flush"]
    assert len(wakes) == 1                  # one wake-up for the three of them
    host.run_timers()
    assert sorted(h for h, _ in rig.rb.get_used()) == sorted(heads)


def test_a_completion_after_reset_is_never_published(rig: Rig) -> None:
    ring = rig.go()
    rig.submit(2)
    ring.kick()
    held = ring.device.held  # type: ignore[attr-defined]
    used = rig.rb.used_idx
    ring.reset()
    assert all(c.cancelled for c in held)
    held[0].complete(4)                      # ignored, and no error for the device
    threading.Thread(target=held[1].complete, args=(4,)).start()
    wait_until(lambda: held[1].finished, 5, "the other thread's completion")
    assert isinstance(ring.host, FakeLoop)
    ring.host.run_timers()
    assert rig.rb.used_idx == used


def test_stop_waits_for_chains_in_flight_then_answers(rig: Rig) -> None:
    ring = rig.go()
    heads = rig.submit(3)
    ring.kick()
    held = ring.device.held  # type: ignore[attr-defined]
    bases: list[int] = []
    ring.stop_after_drain(bases.append)
    assert ring.state is RingState.STOPPING and bases == []
    rig.submit(1)
    assert ring.kick() == 0                 # nothing new is taken while stopping
    held[1].complete(1)
    held[0].complete(1)
    assert bases == []
    held[2].complete(1)                     # the last one: the stop completes
    assert bases == [3] and ring.state is RingState.STOPPED
    assert [h for h, _ in rig.rb.get_used()] == [heads[1], heads[0], heads[2]]


def test_stop_gives_up_after_the_timeout_and_publishes_nothing_later(rig: Rig) -> None:
    ring = rig.go()
    rig.submit(2)
    ring.kick()
    held = ring.device.held  # type: ignore[attr-defined]
    bases: list[int] = []
    ring.stop_after_drain(bases.append)
    held[0].complete(1)
    used = rig.rb.used_idx
    assert isinstance(ring.host, FakeLoop)
    ring.host.run_timers()                  # the stop timeout fires
    assert bases == [2] and ring.state is RingState.STOPPED
    held[1].complete(1)
    assert rig.rb.used_idx == used


def test_stop_with_nothing_in_flight_answers_at_once(rig: Rig) -> None:
    ring = rig.go()
    rig.submit(2, sync=True)
    ring.kick()
    bases: list[int] = []
    ring.stop_after_drain(bases.append)
    assert bases == [2]


def test_async_completions_are_coalesced_while_the_driver_streams() -> None:
    device = Deferring()
    device.coalesce = Coalescing(quiet=10.0, batch=4, wait=10.0)
    device.poll_after = 0     # not polled: the completions' own hold decides
    r = Rig(device, FakeLoop())
    try:
        ring = r.go()
        assert ring.coalescing is not None
        ring.coalescing.last_batch = 8       # the driver streams
        r.submit(8)
        ring.kick()
        r.interrupts()
        for c in device.held[:3]:
            c.complete(1)
        assert r.interrupts() == 0           # held: three completions, batch is four
        device.held[3].complete(1)
        assert r.interrupts() == 1           # the fourth releases them
        assert ring.coalescing.held == 4 and ring.coalescing.releases == 1
        device.held[4].complete(1)
        assert r.interrupts() == 0
        ring.enable(False)                   # a ring that stops serving releases them
        assert r.interrupts() == 1
    finally:
        r.close()


def test_async_handle_chain_runs_on_the_companion_loop(loop: EventLoop) -> None:
    device = AsyncDevice()
    r = Rig(device, loop)
    try:
        on_loop(loop, r.go)
        heads = r.submit(12)
        on_loop(loop, r.ring.kick)
        used: list[tuple[int, int]] = []
        wait_until(lambda: used.extend(on_loop(loop, r.rb.get_used)) or len(used) == 12, 10,
                   "12 async completions")
        assert sorted(h for h, _ in used) == sorted(heads)
        assert all(n == 4 for _, n in used)
        for head, _ in used:   # each coroutine wrote its own head into its buffer
            assert r.mem.read(r.buffers[head], 4) == head.to_bytes(4, "little")
        assert [h for h, _ in used] != heads, "random delays completed them out of order"
    finally:
        on_loop(loop, r.close)


def test_an_async_handler_that_raises_breaks_only_its_ring(loop: EventLoop) -> None:
    r = Rig(AsyncDevice(fail_head=0), loop)
    try:
        on_loop(loop, r.go)
        r.submit(3)
        on_loop(loop, r.ring.kick)
        wait_until(lambda: r.ring.state is RingState.BROKEN, 10, "the ring to break")
        assert "the store exploded" in (r.ring.error or "")
    finally:
        on_loop(loop, r.close)


def test_a_coroutine_without_an_asyncio_host_breaks_the_ring() -> None:
    r = Rig(AsyncDevice(), None)
    try:
        r.go()
        r.submit(1)
        r.ring.kick()
        assert r.ring.state is RingState.BROKEN
        assert "no asyncio loop" in (r.ring.error or "")
    finally:
        r.close()


# ------------------------------------------------------------- over a vhost-user socket


def _no_reply_within(guest: ScriptedGuest, seconds: float) -> bool:
    readable, _, _ = select.select([guest.fe.sock], [], [], seconds)
    return not readable


@pytest.fixture
def served(tmp_path: Path, loop: EventLoop) -> Iterator[tuple[Deferring, ScriptedGuest]]:
    device = Deferring()
    path = str(tmp_path / "deferring.sock")
    server = on_loop(loop, lambda: Server(device, loop, socket_path=path))
    guest = ScriptedGuest(path)
    guest.start()
    guest.setup_ring(0, 64)
    yield device, guest
    guest.close()
    on_loop(loop, server.close)


def _submit(guest: ScriptedGuest, device: Deferring, n: int) -> list[int]:
    heads = [guest.rings[0].builder.add_chain([b"\0"], [4])[0] for _ in range(n)]
    guest.kick(0)
    wait_until(lambda: len(device.held) >= n, 5, f"{n} chains taken")
    return heads


def test_get_vring_base_answers_once_the_chains_in_flight_complete(
        served: tuple[Deferring, ScriptedGuest]) -> None:
    device, guest = served
    heads = _submit(guest, device, 4)
    guest.fe.send(p.request(p.Request.GET_VRING_BASE, p.VringState(0, 0)))
    assert _no_reply_within(guest, 0.2), "GET_VRING_BASE answered with 4 requests in flight"
    for c in device.held[:3]:
        threading.Thread(target=c.complete, args=(1,)).start()
    assert _no_reply_within(guest, 0.2), "answered with 1 request in flight"
    device.held[3].complete(1)
    reply = guest.fe.receive()
    assert reply.request == p.Request.GET_VRING_BASE and reply.is_reply
    assert reply.payload == p.VringState(0, 4)
    assert sorted(h for h, _ in guest.rings[0].builder.get_used()) == sorted(heads)
    assert guest.fe.get_queue_num() == 1    # the session serves messages again


def test_a_stopped_ring_publishes_nothing_after_the_stop(
        served: tuple[Deferring, ScriptedGuest]) -> None:
    device, guest = served
    device.stop_timeout = 0.3
    builder = guest.rings[0].builder
    _submit(guest, device, 2)
    device.held[0].complete(1)
    wait_until(lambda: builder.used_idx == 1, 5, "the first completion")
    assert guest.fe.get_vring_base(0) == 2   # after the 0.3 s stop timeout
    device.held[1].complete(1)               # late: must never reach the stopped ring
    assert device.held[1].cancelled
    assert _no_reply_within(guest, 0.1)
    assert guest.fe.get_queue_num() == 1     # a round trip: the loop ran the late completion
    assert builder.used_idx == 1


def test_a_vanished_front_end_cancels_the_chains_in_flight(
        served: tuple[Deferring, ScriptedGuest]) -> None:
    device, guest = served
    builder = guest.rings[0].builder
    _submit(guest, device, 3)
    guest.fe.close()
    wait_until(lambda: all(c.cancelled for c in device.held), 5, "the chains to be dropped")
    for c in device.held:
        c.complete(1)
    assert builder.used_idx == 0


def test_spawn_runs_other_work_and_answers_on_the_rings_thread(loop: EventLoop) -> None:
    r = Rig(Deferring(), loop)
    try:
        on_loop(loop, r.go)
        got: list[tuple[Any, Any, bool]] = []
        loop_thread: list[int] = [on_loop(loop, threading.get_ident)]

        async def answer() -> str:
            await asyncio.sleep(0.01)
            return "late"

        def done(value: Any, exc: Any) -> None:
            got.append((value, exc, threading.get_ident() == loop_thread[0]))
        on_loop(loop, lambda: r.ring.vq.spawn(answer(), done))
        wait_until(lambda: got, 5, "the spawned coroutine")
        assert got == [("late", None, True)]
        ran = threading.Event()
        threading.Thread(target=r.ring.vq.call_soon_threadsafe, args=(ran.set,)).start()
        assert ran.wait(5)
    finally:
        on_loop(loop, r.close)


def test_spawn_without_an_asyncio_host_is_refused() -> None:
    r = Rig(Deferring(), None)
    try:
        async def nothing() -> None:
            pass
        with pytest.raises(TypeError, match="no asyncio loop"):
            r.ring.vq.spawn(nothing(), lambda value, exc: None)
        with pytest.raises(TypeError, match="cannot run callbacks"):
            r.ring.vq.call_soon_threadsafe(lambda: None)
    finally:
        r.close()
