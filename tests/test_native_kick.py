"""Kicks served in C (`native_kick`): a virtio-blk ring on a real `EventLoop`, driven by a
scripted front-end with real kick and call eventfds.

* queue-depth-1 requests are served by C alone (the ring's C kick count grows, the runner
  counts every kick, `BlkStats` and the image are right, each request gets its interrupt);
* whatever C hands back is finished by Python exactly as the Python kick path would: a
  request only Python serves (DISCARD) in the middle of a burst, a failed request (its
  WARNING line, once), a kick that served several requests (the runner starts polling), a
  hostile ring (broken, err signalled, nothing more served), and kicks while polled;
* the ring goes back to Python kicks when it stops and comes back to C when it restarts, a
  memory table change under a served ring keeps it served, the loop's waiter is closed
  with the loop;
* under the pure-Python implementation, or with an asyncio host, nothing is served in C
  and everything works the same.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopthread import loop_thread, on_loop
from scripted import BLK_HDR, ScriptedGuest, blk_request
from tools import wait_until

from vhostpy import _accel, native_kick
from vhostpy.blk import BlockDevice
from vhostpy.loop import EventLoop
from vhostpy.server import Server

T_IN, T_OUT, T_DISCARD = 0, 1, 11
SECTORS = 2048
compiled = _accel.lib is not None


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    yield from loop_thread()


class Rig:
    """A BlockDevice served on `loop`, a scripted guest connected with one ring."""

    def __init__(self, loop: EventLoop, tmp_path: Path, *, discard: bool = False) -> None:
        self.loop = loop
        self.image = tmp_path / "disk.img"
        self.image.write_bytes(bytes(SECTORS * 512))
        self.device = BlockDevice.open_image(str(self.image))
        sock = str(tmp_path / "blk.sock")
        self.server = on_loop(loop, lambda: Server(self.device, loop, socket_path=sock))
        self.guest = ScriptedGuest(sock)
        self.guest.start()
        self.ring = self.guest.setup_ring(0, 64)
        wait_until(lambda: self.vring().live, 5, "ring 0 live")

    def vring(self) -> Any:
        conn = self.server.connection
        assert conn is not None
        return conn.session.rings[0]

    def status(self) -> dict[str, Any]:
        return on_loop(self.loop, lambda: self.vring().status())

    def close(self) -> None:
        self.guest.close()
        on_loop(self.loop, self.server.close)


@pytest.fixture
def rig(loop: EventLoop, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(loop, tmp_path)
    yield r
    r.close()


def _write_read(rig: Rig, sector: int, fill: int) -> None:
    """A write then a read at queue depth 1, each re-arming used_event after its
    completion as Linux's driver does (so the runner sees the depth drop back to 1), with
    a guest's think time before each (this driver, on another CPU of the same machine,
    would otherwise submit the next request while C is still in the drain of the last)."""
    data = bytes([fill]) * 4096
    b = rig.ring.builder
    time.sleep(0.001)
    assert blk_request(rig.guest, T_OUT, sector, data=data) == (0, b"")
    b.set_used_event(b.used_idx)
    time.sleep(0.001)
    assert blk_request(rig.guest, T_IN, sector, read_len=4096) == (0, data)
    b.set_used_event(b.used_idx)


def test_depth_one_requests_are_served_in_c(rig: Rig) -> None:
    for k in range(20):
        _write_read(rig, 8 * k, k + 1)
    status = rig.status()
    # One kick per request (and the runner's own at the ring's start), or fewer: a drain
    # that met the next request before its kick was read serves it, and the guest's two
    # eventfd writes are then one read (the think time above makes that rare; a back-end
    # descheduled on a busy machine still meets it).
    assert 20 <= status["kicks"] <= 41, status
    if compiled:   # all but the first few (they may race the arming) served in C alone
        assert status["kicks_in_c"] >= status["kicks"] - 4, status
    else:
        assert status["kicks_in_c"] == 0, status
    assert rig.device.stats.writes == 20 and rig.device.stats.reads == 20
    data = rig.image.read_bytes()
    for k in range(20):
        assert data[8 * k * 512:8 * k * 512 + 4096] == bytes([k + 1]) * 4096


def _add(rig: Rig, rtype: int, sector: int, payload: bytes = b"", writable: tuple[int, ...] = (1,)
         ) -> tuple[int, list[int]]:
    return rig.ring.builder.add_chain([BLK_HDR.pack(rtype, 0, sector) + payload],
                                      list(writable))


def test_a_burst_with_a_python_request_and_a_failure(rig: Rig,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _write_read(rig, 0, 7)                    # armed now (under cffi)
    caplog.set_level(logging.WARNING)
    heads = [
        _add(rig, T_OUT, 16, bytes([9]) * 512),
        _add(rig, T_DISCARD, 0, struct.pack("<QII", 0, 8, 0)),    # Python serves it
        _add(rig, T_IN, SECTORS + 5, writable=(512, 1)),          # out of range: fails
        _add(rig, T_IN, 16, writable=(512, 1)),
    ]
    rig.guest.kick(0)
    used = dict(rig.guest.wait_used(0, 4))
    assert set(used) == {h for h, _ in heads}
    statuses = [rig.guest.memory.read(addrs[-1], 1)[0] for _h, addrs in heads]
    assert statuses == [0, 0, 1, 0]
    assert rig.guest.memory.read(heads[3][1][1], 512) == bytes([9]) * 512
    failures = [r for r in caplog.records if "sector" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert rig.image.read_bytes()[:4096] == bytes(4096)       # discarded
    st = rig.status()
    assert st["state"] == "enabled" and st["error"] is None
    _write_read(rig, 24, 3)                   # and it goes on being served
    if compiled:
        kicks = rig.status()["kicks_in_c"]
        for k in range(4):
            _write_read(rig, 32 + 8 * k, 4)
        assert rig.status()["kicks_in_c"] >= kicks + 3


def test_hostile_ring_breaks_and_signals_err(rig: Rig) -> None:
    _write_read(rig, 0, 1)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    rig.guest.fe.set_vring_err(0, err)
    b = rig.ring.builder
    head = b.alloc_desc()
    b.write_desc(head, b.alloc(16), 16, 1, head)      # NEXT to itself: a loop
    b.publish(head)
    rig.guest.kick(0)
    wait_until(lambda: rig.status()["state"] == "broken", 5, "ring broken")
    assert "loop" in rig.status()["error"]
    assert os.eventfd_read(err) == 1
    os.close(err)


def test_stop_and_restart_move_the_kick_between_python_and_c(rig: Rig) -> None:
    _write_read(rig, 0, 1)
    fe = rig.guest.fe
    base = fe.get_vring_base(0)
    assert rig.status()["state"] == "stopped"
    fe.set_vring_num(0, 64)
    fe.set_vring_base(0, base)
    lay = rig.ring.builder.lay
    from scripted import UVA_BASE
    fe.set_vring_addr(0, UVA_BASE + lay.desc, UVA_BASE + lay.used, UVA_BASE + lay.avail)
    fe.set_vring_kick(0, rig.ring.kick_fd)
    fe.set_vring_enable(0, True)
    wait_until(lambda: rig.status()["state"] == "enabled", 5, "ring restarted")
    before = rig.status()["kicks_in_c"]
    for k in range(4):
        _write_read(rig, 8 + 8 * k, 2)
    if compiled:
        assert rig.status()["kicks_in_c"] >= before + 4


def test_streaming_hands_back_and_polls_then_returns_to_c(rig: Rig) -> None:
    _write_read(rig, 0, 1)
    for _round in range(5):
        heads = [_add(rig, T_IN, 8 * k, writable=(4096, 1)) for k in range(8)]
        rig.guest.kick(0)
        used = dict(rig.guest.wait_used(0, 8))
        assert set(used) == {h for h, _ in heads}
        rig.ring.builder.set_used_event(rig.ring.builder.used_idx)
    assert rig.device.stats.reads == 41
    time.sleep(0.05)                          # polling gives up after poll_idle
    before = rig.status()
    for k in range(5):
        _write_read(rig, 8 * k, k + 1)
    after = rig.status()
    assert after["kicks"] >= before["kicks"] + 5   # kicks landing while polled are not read
    if compiled:
        assert after["kicks_in_c"] >= before["kicks_in_c"] + 4


@pytest.mark.skipif(not compiled, reason="the compiled path's waiter")
def test_waiter_is_installed_once_and_closed_with_the_loop(tmp_path: Path) -> None:
    gen = loop_thread()
    lp = next(gen)
    r = Rig(lp, tmp_path)
    try:
        _write_read(r, 0, 1)
        waiter = lp.waiter
        assert isinstance(waiter, native_kick.KickWaiter) and waiter.active()
        assert native_kick.waiter_for(lp) is waiter
    finally:
        r.close()
    assert not waiter.active()         # the connection closed: the ring left C
    with pytest.raises(StopIteration):
        next(gen)
    assert lp.waiter is None
