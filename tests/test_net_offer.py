"""Frames toward the guest in bursts (issue 16): `NetPort.offer` with and without `wait`,
`send` through the backlog, a burst that stalls and resumes, a receive ring that turns out
hostile in the middle of a burst, and the compiled path kept for to-guest frames while only
handlers (which see frames from the guest) are attached.

Every behaviour test runs on both implementations and must give the same frames, byte for
byte in the guest's receive buffers, the same counters and the same capture.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ringbuilder import CallRunner, anon_memory
from test_fastpath import IMPLEMENTATIONS, _loop_rig, _signals, needs_cffi
from test_net import PEER_MAC, Rig, frame
from test_virtqueue_packed import PackedDriver, packed_layout

from vhostpy import _accel, net_cffi
from vhostpy.net import MAX_OFFER_WAIT, FrameBatch, NetDevice, NetPort
from vhostpy.pcap import PcapWriter
from vhostpy.switch import CffiSwitch, PythonSwitch
from vhostpy.tap import MAX_READ, TapPort
from vhostpy.virtqueue import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_WRITE
from vhostpy.virtqueue_packed import PackedVirtqueue


def _batch() -> FrameBatch:
    """Three frames of different sizes (one needs its own buffer), offered cyclically."""
    return FrameBatch([frame(64, 1), frame(200, 2), frame(1400, 3)])


def _cyclic(batch: FrameBatch, count: int, start: int = 0) -> list[bytes]:
    return [batch.frames[(start + k) % len(batch)] for k in range(count)]


def _pcap_frames(path: Path) -> list[bytes]:
    data = path.read_bytes()[24:]
    frames = []
    while data:
        n = int.from_bytes(data[8:12], "little")
        frames.append(data[16:16 + n])
        data = data[16 + n:]
    return frames


def _driver(rig: Rig, rounds: int, per_round: int, gap: float, seen_no_notify: list[bool]
            ) -> threading.Thread:
    """A driver thread posting `per_round` receive buffers every `gap` seconds, noting
    whether the device asked for no kicks at each refill."""
    def run() -> None:
        for _ in range(rounds):
            time.sleep(gap)
            seen_no_notify.append(rig.rbs[0].no_notify)
            rig.post(per_round)
    return threading.Thread(target=run, name="driver", daemon=True)


# ------------------------------------------------------------------ offer with a wait


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_keeps_up_while_the_driver_posts(impl: str, tmp_path: Path) -> None:
    """One `offer(wait=...)` call takes frames as the driver posts buffers for them, kicks
    off meanwhile and still off after (no frame waits for buffers); frames exact and in
    order, counted and captured."""
    path = tmp_path / "x.pcap"
    with PcapWriter(path) as writer:
        rig = _loop_rig(impl, capture=writer)
        batch = _batch()
        rig.post(5)
        seen: list[bool] = []
        driver = _driver(rig, rounds=6, per_round=5, gap=0.02, seen_no_notify=seen)
        started = time.monotonic()
        driver.start()
        taken = rig.port.offer(batch, 35, wait=MAX_OFFER_WAIT, idle=0.5)
        elapsed = time.monotonic() - started
        driver.join(5)
        assert taken == 35 and elapsed < 0.9
        assert rig.received_frames() == _cyclic(batch, 35)
        assert seen and all(seen)                         # no kicks wanted while it waited
        assert rig.rbs[0].no_notify                       # ... nor after: nothing waits
        to_guest = rig.port.counters()["to_guest"]
        assert to_guest["frames"] == 35 and to_guest["drops"] == {}
        assert to_guest["bytes"] == sum(map(len, _cyclic(batch, 35)))
        assert _signals(rig, 0) >= 1
    assert _pcap_frames(path) == _cyclic(batch, 35)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_gives_up_after_idle_and_resumes(impl: str) -> None:
    """A driver that stops posting holds an offer for `idle`, not for `wait`; what the ring
    could not take is not taken; the next offer starts again from the batch's first frame."""
    rig = _loop_rig(impl)
    batch = _batch()
    rig.post(4)
    started = time.monotonic()
    assert rig.port.offer(batch, 100, wait=MAX_OFFER_WAIT, idle=0.05) == 4
    assert time.monotonic() - started < 0.5
    assert rig.rbs[0].no_notify     # what it could not take is not waiting: no kicks
    rig.post(2)
    assert rig.port.offer(batch, 100) == 2                # no wait: what the ring takes now
    assert rig.received_frames() == _cyclic(batch, 4) + _cyclic(batch, 2)
    assert rig.port.counters()["to_guest"]["frames"] == 6
    assert not rig.dev.backlog


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_counts_what_no_buffer_could_hold(impl: str) -> None:
    """Refused and dropped frames count as taken, as `send`'s do; placement goes on after."""
    rig = Rig(NetDevice(mtu=1000), features=None)
    rig.port.remove_handler(rig.handler)
    if impl == "python":
        rig.dev._fast = None
    rig.ring(0)
    rig.ring(1)
    batch = FrameBatch([frame(64, 1), frame(1500, 2), b"\x01" * 10])   # ok, > MTU, runt
    rig.post(3)
    assert rig.port.offer(batch, 9, wait=0.2, idle=0.02) == 9
    assert rig.received_frames() == [frame(64, 1)] * 3
    assert rig.port.counters()["to_guest"]["drops"] == {"larger than MTU": 3, "runt": 3}


def test_offer_arguments_checked() -> None:
    rig = _loop_rig("python")
    for wait in (-1.0, MAX_OFFER_WAIT + 1):
        with pytest.raises(ValueError, match="wait must be"):
            rig.port.offer(_batch(), 1, wait=wait)
    with pytest.raises(ValueError, match="idle must be"):
        rig.port.offer(_batch(), 1, wait=0.01, idle=-1)
    assert rig.port.offer(FrameBatch([]), 10, wait=0.01) == 0


# ------------------------------------------------------------------ stalls and hostile rings


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_send_stalls_midway_and_resumes(impl: str, tmp_path: Path) -> None:
    """A burst larger than the ring: what fits is placed, the rest waits in the backlog, in
    order, and goes out when the driver posts buffers and kicks."""
    path = tmp_path / "x.pcap"
    frames = [frame(60 + k, k) for k in range(10)]
    with PcapWriter(path) as writer:
        rig = _loop_rig(impl, capture=writer)
        rig.post(4)
        assert rig.port.send(frames) == 10
        assert rig.received_frames() == frames[:4]
        assert len(rig.dev.backlog) == 6
        assert rig.port.offer(_batch(), 5, wait=0.01) == 0   # the backlog goes first
        rig.post(3)
        rig.process(0)
        assert rig.received_frames() == frames[4:7] and len(rig.dev.backlog) == 3
        rig.post(8)
        rig.process(0)
        assert rig.received_frames() == frames[7:] and not rig.dev.backlog
        c = rig.port.counters()
        assert c["to_guest"]["frames"] == 10 and c["backlog"] == 0
    assert _pcap_frames(path) == frames


def _post_hostile(rig: Rig, good_before: int, good_after: int) -> None:
    """Receive buffers with one chain in the middle whose buffer lies outside guest memory."""
    rig.post(good_before)
    rig.rbs[0].add_chain_at([(1 << 40, 2048, VIRTQ_DESC_F_WRITE)])
    rig.post(good_after)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_into_a_ring_that_breaks_mid_burst(impl: str, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    """The frames before the bad chain are placed and counted; the ring breaks with its
    reason logged; the offer returns at once (no waiting on a broken ring) and says how many
    were taken: nothing after the break is counted as sent. (Whether the used entries of
    those frames reach the ring is the ring layer's: the compiled ring publishes what was
    written before the break, the Python ring publishes nothing once broken.)"""
    rig = _loop_rig(impl)
    batch = _batch()
    _post_hostile(rig, 3, 3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        taken = rig.port.offer(batch, 10, wait=MAX_OFFER_WAIT, idle=0.5)
    assert time.monotonic() - started < 0.4
    assert taken == 3
    assert rig.vqs[0].error is not None and "buffer" in rig.vqs[0].error
    assert "ring broken" in caplog.text
    assert rig.received_frames() == (_cyclic(batch, 3) if impl == "cffi" else [])
    assert rig.port.counters()["to_guest"]["frames"] == 3
    assert rig.port.offer(batch, 10, wait=0.1, idle=0.01) == 0   # broken stays broken


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_send_into_a_ring_that_breaks_mid_burst(impl: str) -> None:
    """`send`: frames the broken ring never took stay counted in the backlog (not lost
    silently) and are dropped as "device reset" when the device resets."""
    rig = _loop_rig(impl)
    frames = [frame(64, k) for k in range(8)]
    _post_hostile(rig, 2, 4)
    assert rig.port.send(frames) == 8
    assert rig.vqs[0].error is not None
    assert rig.received_frames() == (frames[:2] if impl == "cffi" else [])
    assert list(rig.dev.backlog) == frames[2:]
    c = rig.port.counters()
    assert c["to_guest"]["frames"] == 2 and c["backlog"] == 6
    rig.dev.reset()
    assert rig.port.counters()["to_guest"]["drops"] == {"device reset": 6}


# ------------------------------------------------------------------ which path places frames


def _no_python_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a frame toward the guest was placed by Python")
    monkeypatch.setattr(NetDevice, "_place", refuse)


@needs_cffi
def test_handlers_do_not_keep_frames_toward_the_guest_out_of_c(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Handlers see frames from the guest only: their answers, `send`, `offer` and the
    backlog are placed by C while they are attached (a monitor, which sees both ways, makes
    the frames go through Python)."""
    rig = _loop_rig("cffi")
    rig.port.add_handler(lambda port, frames: None)
    assert rig.port.python_consumers and not rig.port.python_observers
    _no_python_placement(monkeypatch)
    rig.post(3)
    frames = [frame(64 + k, k) for k in range(5)]
    assert rig.port.send(frames) == 5
    rig.post(4)
    rig.process(0)
    assert rig.port.offer(_batch(), 2) == 2
    assert rig.received_frames() == frames + _cyclic(_batch(), 2)
    monkeypatch.undo()
    seen: list[bytes] = []
    rig.port.add_monitor(lambda port, direction, fs: seen.extend(fs))
    assert rig.port.python_observers
    rig.post(1)
    assert rig.port.send([frame(90, 9)]) == 1 and seen == [frame(90, 9)]


@needs_cffi
def test_generator_offer_is_one_c_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """With eventfd calls, an offer with a wait is one C call however many chunks it places
    (no Python per chunk or per frame)."""
    rig = _loop_rig("cffi")
    _no_python_placement(monkeypatch)
    calls = []
    lib = _accel.lib
    real = lib.vp_net_rx_offer

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name == "vp_net_rx_offer":
                def offer(*args: Any) -> Any:
                    calls.append(1)
                    return real(*args)
                return offer
            return getattr(lib, name)
    monkeypatch.setattr(net_cffi, "lib", Counting())
    rig.post(60)
    assert rig.port.offer(_batch(), 60, wait=0.5) == 60
    assert len(calls) == 1
    assert len(rig.received_frames()) == 60


def test_python_observers_follow_the_port() -> None:
    port: NetPort = NetDevice().port
    assert not port.python_observers
    port.add_handler(lambda p, f: None)
    assert not port.python_observers
    port.add_monitor(lambda p, d, f: None)
    assert port.python_observers
    assert PEER_MAC  # the frames of these tests go to the test driver's peer MAC


# ------------------------------------------------------------------ tap -> switch -> guest


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tap_frames_reach_the_guest_in_one_burst(impl: str, tmp_path: Path) -> None:
    """What the host sends on a tap goes through the switch into the guest's ring: read
    and placed by C under the compiled path, by Python otherwise, with the same frames,
    capture and counters; a frame longer than MAX_READ is dropped and counted."""
    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    path = tmp_path / "x.pcap"
    try:
        with PcapWriter(path) as writer:
            rig = _loop_rig(impl, capture=writer)
            switch = CffiSwitch() if impl == "cffi" else PythonSwitch()
            tap = TapPort(ours.fileno(), "tap0")
            switch.attach(tap)
            switch.attach(rig.port)
            rig.port.set_consumer("switch", switch)
            frames = [frame(60 + 30 * k, k, dst=b"\xff" * 6) for k in range(5)]
            rig.post(8)
            host.send(frames[0])
            host.send(frame(MAX_READ + 1, 9, dst=b"\xff" * 6))
            for f in frames[1:]:
                host.send(f)
            assert tap.forward_to(switch) == 5
            assert tap.forward_to(switch) == 0                 # nothing more waiting
            assert rig.received_frames() == frames
            assert tap.received == 5 and tap.truncated == 1
            assert rig.port.counters()["to_guest"]["frames"] == 5
            assert switch.counters()["flooded"] == 5
        assert _pcap_frames(path) == frames
    finally:
        host.close()
        ours.close()


# ------------------------------------------------------------------ packed receive rings


def _packed_rig(impl: str) -> tuple[NetDevice, PackedDriver, dict[int, int]]:
    """A NetDevice whose receive ring is a packed ring of 16 (the driver model of
    test_virtqueue_packed), compiled or Python as `impl` says."""
    dev = NetDevice()
    dev.set_features(dev.device_features() | 1 << VIRTIO_F_VERSION_1)
    if impl == "python":
        dev._fast = None
    mem, _ = anon_memory(1 << 20)
    drv = PackedDriver(mem, 16, packed_layout(16))
    cls: Any = PackedVirtqueue
    if impl == "cffi":
        from vhostpy.virtqueue_cffi import CffiPackedVirtqueue
        cls = CffiPackedVirtqueue
    vq = drv.attach(cls(mem, 0))
    CallRunner(vq, lambda: None)
    dev.queue_started(0, vq)
    return dev, drv, {}


def _packed_post(drv: PackedDriver, bufs: dict[int, int], count: int) -> None:
    for _ in range(count):
        buf_id, addrs = drv.add_chain(writable=[2048])
        bufs[buf_id] = addrs[0]


def _packed_received(drv: PackedDriver, bufs: dict[int, int]) -> list[bytes]:
    out = []
    for buf_id, n in drv.get_used():
        data = drv.memory.read(bufs[buf_id], n)
        assert data[:12] == bytes(10) + b"\x01\x00"      # num_buffers 1, nothing else
        out.append(data[12:])
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_and_send_on_a_packed_ring(impl: str) -> None:
    """The same paths on a packed receive ring, across several wraps: offer (with and
    without a wait), send with a backlog that drains when buffers come."""
    dev, drv, bufs = _packed_rig(impl)
    batch = _batch()
    got: list[bytes] = []
    expected: list[bytes] = []
    for _ in range(4):                                   # 4 x 10 buffers on a ring of 16
        _packed_post(drv, bufs, 10)
        assert dev.port.offer(batch, 25, wait=0.05, idle=0.01) == 10
        expected += _cyclic(batch, 10)
        got += _packed_received(drv, bufs)
    frames = [frame(70 + k, k) for k in range(12)]
    _packed_post(drv, bufs, 5)
    assert dev.port.send(frames) == 12 and len(dev.backlog) == 7
    got += _packed_received(drv, bufs)
    _packed_post(drv, bufs, 8)
    ring = dev.path_config.rx_ring
    assert ring is not None
    dev.process_queue(0, ring)                           # the driver's kick
    got += _packed_received(drv, bufs)
    expected += frames
    assert got == expected and not dev.backlog
    assert dev.port.counters()["to_guest"]["frames"] == 52
