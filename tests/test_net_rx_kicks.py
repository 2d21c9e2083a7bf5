"""Frames that wait for receive buffers in `vhostpy net` (the port's backlog).

A scripted driver plays the guest against a real `vhostpy net --reflect` process: it posts
fewer receive buffers than it sends frames, so reflected frames wait in the backlog, then
posts more and kicks exactly when a virtio driver would (VRING_USED_F_NO_NOTIFY, or
avail_event with EVENT_IDX). Every frame must come back, in order, and once nothing waits the
back-end must go quiet: serving the receive ring from a kick must not leave it polling a ring
full of empty buffers, nor asking for receive kicks while no frame waits for buffers.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from conftest import Backend
from ringbuilder import RingBuilder
from scripted import ScriptedGuest
from tools import wait_until

from vhostpy.virtqueue import VIRTIO_RING_F_EVENT_IDX

StartBackend = Callable[..., Backend]
HDR = bytes(12)                 # virtio_net_hdr_mrg_rxbuf, nothing asked
BUFFER = 2048
FE_MAC = bytes.fromhex("02dd00000001")
PEER_MAC = bytes.fromhex("02dd00000002")


def _frame(k: int) -> bytes:
    return PEER_MAC + FE_MAC + b"\x88\xb5" + struct.pack("<I", k) * 15


def _reflected_bytes(f: bytes) -> bytes:
    return f[6:12] + f[0:6] + f[12:]


def _reflected(k: int) -> bytes:
    return _reflected_bytes(_frame(k))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Driver:
    """The guest side: receive buffers on ring 0, frames sent on ring 1."""

    def __init__(self, guest: ScriptedGuest) -> None:
        self.guest = guest
        self.rx = guest.setup_ring(0, size=64).builder
        self.tx = guest.setup_ring(1, size=64).builder
        self.event_idx = bool(guest.fe.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.buffers: dict[int, int] = {}   # rx head -> buffer address

    def post(self, count: int, size: int = BUFFER) -> None:
        """Post `count` receive buffers; kick if the device asked for it."""
        old = self.rx.avail_idx
        for _ in range(count):
            head, (addr,) = self.rx.add_chain([], [size])
            self.buffers[head] = addr
        if self.rx.should_kick(old, self.event_idx):
            self.guest.kick(0)

    def send(self, frames: list[bytes]) -> None:
        old = self.tx.avail_idx
        for f in frames:
            self.tx.add_chain([HDR + f])
        if self.tx.should_kick(old, self.event_idx):
            self.guest.kick(1)

    def buffers_used(self, count: int) -> list[bytes]:
        """Wait for `count` used receive buffers; what was written into each."""
        used = self.guest.wait_used(0, count)
        assert len(used) == count, used
        return [self.guest.memory.read(self.buffers.pop(head), n) for head, n in used]

    def idle(self, *builders: RingBuilder) -> None:
        """Wait until the back-end polls none of `builders` (default both): it asks for
        kicks again, which it does only once it has gone idle on that ring."""
        for rb in builders or (self.rx, self.tx):
            wait_until(lambda rb=rb: rb.device_wants_kicks(self.event_idx), 5.0,
                       "the back-end to stop polling and ask for kicks")

    def receive(self, count: int) -> list[bytes]:
        """Wait for `count` reflected frames, one buffer each (virtio-net header removed)."""
        return [data[len(HDR):] for data in self.buffers_used(count)]


def test_waiting_frames_go_out_when_buffers_come_then_the_back_end_idles(
        backend: StartBackend) -> None:
    b = backend("net", "--reflect")
    guest = ScriptedGuest(b.path)
    try:
        guest.start()
        drv = Driver(guest)
        drv.post(5)
        drv.send([_frame(k) for k in range(12)])     # 7 of them wait for buffers
        got = drv.receive(5)
        for more, spare in ((2, 0), (1, 0), (4, 8)):
            drv.idle(drv.rx)    # the driver refills only after the back-end gave up polling
            drv.post(more + spare)   # at the end, 8 buffers more than frames wait
            got += drv.receive(more)
        assert got == [_reflected(k) for k in range(12)]
        drv.idle(drv.tx)
        wait_until(lambda: not drv.rx.device_wants_kicks(drv.event_idx), 5.0,
                   "the back-end to want no receive kicks once nothing waits")
        before = _cpu_seconds(b.proc.pid)
        time.sleep(1.0)
        assert _cpu_seconds(b.proc.pid) - before < 0.1, "the back-end keeps polling"
        drv.send([_frame(99)])
        assert drv.receive(1) == [_reflected(99)]
    finally:
        guest.close()


def test_a_frame_waiting_for_more_buffers_than_posted_gets_its_kick(
        backend: StartBackend) -> None:
    """A large frame needs several small receive buffers (MRG_RXBUF) and fewer are there:
    the back-end takes none and must ask to be kicked when the driver adds more. With
    EVENT_IDX that means avail_event past the buffers already there: a driver adding
    buffers after them kicks only if avail_event lies in what it adds."""
    b = backend("net", "--reflect")
    guest = ScriptedGuest(b.path)
    try:
        guest.start()
        drv = Driver(guest)
        small = _frame(1)
        big = PEER_MAC + FE_MAC + b"\x88\xb5" + bytes(range(256)) * 4   # 1038 bytes
        drv.send([small, big])     # no buffers yet: both wait
        wait_until(lambda: drv.tx.used_idx == 2, 5.0, "the back-end to take both frames")
        drv.post(2, size=300)      # the small frame fits; the big one needs 4 of these
        got = drv.receive(1)
        drv.idle(drv.rx)           # the back-end polls the receive ring, then goes idle
        drv.post(3, size=300)      # now there are enough
        parts = drv.buffers_used(4)   # one frame over four buffers
        assert got == [_reflected_bytes(small)]
        assert struct.unpack_from("<H", parts[0], 10)[0] == 4      # num_buffers
        assert parts[0][len(HDR):] + b"".join(parts[1:]) == _reflected_bytes(big)
    finally:
        guest.close()
