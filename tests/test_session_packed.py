"""Packed rings (VIRTIO_F_RING_PACKED) through the vhost-user session, driven by a scripted
front-end: the offer, the layout SET_FEATURES picks (and a reset takes back), sizes that are
not powers of two, the 32-bit SET/GET_VRING_BASE form across wraps, refusals (a layout switch
on a running ring, bases that do not fit), the inflight region on packed rings, the dirty log
and real devices (echo, virtio-blk, virtio-net) served through it. The driver side is
test_virtqueue_packed's `PackedDriver` over the rig's view of guest RAM. Both implementations
(the suite runs whole under each).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_session import (
    PACKED_BIT,
    PROTOCOL_BIT,
    RAM_SIZE,
    RING_STRIDE,
    UVA,
    DriverRing,
    EchoDevice,
    R,
    Rig,
)
from test_virtqueue_packed import PackedDriver, PackedLayout, packed_layout

from vhostpy import inflight
from vhostpy import protocol as p
from vhostpy.blk import BlockDevice
from vhostpy.device import Device
from vhostpy.dirtylog import LOG_PAGE
from vhostpy.errors import BackendError
from vhostpy.net import NetDevice, NetPort
from vhostpy.session import Session
from vhostpy.virtqueue_packed import PackedVirtqueue
from vhostpy.vring import DefaultPackedVirtqueue, DefaultVirtqueue, RingState

PF = p.ProtocolFeature
FRESH = 0x80008000   # avail 0 wrap 1, used 0 wrap 1: what QEMU sends for a new packed ring


def state_of(drv: PackedDriver) -> int:
    """The driver's view of the ring as the 32-bit base form."""
    return (drv.next_avail | drv.avail_wrap << 15 | drv.next_used << 16
            | drv.used_wrap << 31)


def set_driver_state(drv: PackedDriver, base: int) -> None:
    drv.next_avail, drv.avail_wrap = base & 0x7FFF, bool(base >> 15 & 1)
    drv.next_used, drv.used_wrap = base >> 16 & 0x7FFF, bool(base >> 31 & 1)


def packed_ring(rig: Rig, index: int, size: int, *, base: int = FRESH,
                drv: PackedDriver | None = None, log: int | None = None,
                lay: PackedLayout | None = None) -> PackedDriver:
    """Configure ring `index` as a packed ring of `size` through the session (NUM, BASE,
    ADDR, CALL, KICK, ENABLE) and return the driver model on it (`drv` continues one)."""
    if lay is None:
        lay = packed_layout(size, base=(index + 1) * RING_STRIDE, data_size=0x10000)
    if drv is None:
        drv = PackedDriver(rig.driver, size, lay)
        set_driver_state(drv, base)
    rig.must(R.SET_VRING_NUM, p.VringState(index, size))
    rig.must(R.SET_VRING_BASE, p.VringState(index, base))
    flags = 0 if log is None else 1 << p.VHOST_VRING_F_LOG
    rig.must(R.SET_VRING_ADDR, p.VringAddr(index, flags, UVA + lay.desc, UVA + lay.device,
                                           UVA + lay.driver, log or 0))
    ring = DriverRing(index, None, rig.eventfd(), rig.eventfd(), rig.eventfd(),  # type: ignore[arg-type]
                      -1, -1, -1)
    ring.s_call = os.dup(ring.call)
    rig.must(R.SET_VRING_CALL, p.VringFd(index), fds=[ring.s_call])
    rig.rings[index] = ring
    rig.set_kick(index)
    rig.must(R.SET_VRING_ENABLE, p.VringState(index, 1))
    return drv


def use_device(rig: Rig, device: Device) -> None:
    rig.session.close()
    rig.device = device  # type: ignore[assignment]
    rig.session = Session(device, rig.host)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def echo(rig: Rig, drv: PackedDriver, index: int, parts: list[bytes]) -> None:
    """One echo chain of `parts` (readable) and one writable buffer per part: served and
    echoed byte-exact."""
    total = sum(len(x) for x in parts)
    buf_id, addrs = drv.add_chain(parts, [total])
    rig.session.kick(index)
    assert drv.get_used() == [(buf_id, total)]
    assert rig.driver.read(addrs[-1], total) == b"".join(parts)


# ------------------------------------------------------------------ negotiation and layout


def test_packed_offered_and_layout_follows_set_features(rig: Rig) -> None:
    offered = rig.u64(R.GET_FEATURES)
    assert offered & PACKED_BIT
    assert not rig.device.features() & PACKED_BIT      # the session's bit, not the device's
    assert [r.layout for r in rig.session.rings] == ["split", "split"]
    rig.negotiate(packed=True)
    assert rig.device.acked_features & PACKED_BIT      # devices see the layout acked
    assert all(type(r.vq) is DefaultPackedVirtqueue for r in rig.session.rings)
    status = rig.session.status()["rings"]
    assert [(s["layout"], s["avail_wrap"], s["used_wrap"]) for s in status] == \
        [("packed", 1, 1)] * 2                          # type: ignore[index]
    assert "RING_PACKED" in rig.session.status()["features"]["acked_names"]  # type: ignore[index]
    rig.must(R.RESET_DEVICE)
    assert all(type(r.vq) is DefaultVirtqueue for r in rig.session.rings)
    assert "avail_wrap" not in rig.session.status()["rings"][0]  # type: ignore[index]
    rig.negotiate()
    assert all(r.layout == "split" for r in rig.session.rings)


def test_sizes_and_bases_by_layout(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.negotiate(packed=True)
    rig.mem_table()
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 6)) == 0     # packed: any size
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 0)) == 1
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 32769)) == 1
    caplog.clear()
    # avail index 6 does not fit size 6; used index 7 neither
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x8006)) == 1
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x80078002)) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and "does not fit size 6" in lines[0], lines
    assert "avail index 6 wrap 1, used index 6 wrap 1" in lines[0]   # used follows
    assert "used index 7 wrap 1" in lines[1]
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x00058003)) == 0
    assert rig.session.rings[0].vq.base == 0x00058003
    # DPDK's virtio-user sends only the avail half for a new packed ring (0x8000: index 0,
    # wrap 1); the used half follows it
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x8000)) == 0
    assert rig.session.rings[0].vq.base == FRESH
    # split rings: powers of two and 16-bit bases only
    rig.must(R.RESET_DEVICE)
    rig.negotiate()
    caplog.clear()
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 6)) == 1
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x80008000)) == 1
    assert "VIRTIO_F_RING_PACKED was not acked" in caplog.text


def test_layout_switch_refused_on_a_running_ring(rig: Rig,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    rig.start(0)                                        # split, running
    features = rig.session.features
    caplog.clear()
    assert rig.ack(R.SET_FEATURES, p.U64(features | PACKED_BIT)) == 1
    assert "cannot switch a enabled ring from the split to the packed layout" in caplog.text
    assert [r.layout for r in rig.session.rings] == ["split", "split"]   # nothing switched
    assert rig.session.features == features
    assert rig.session.rings[0].state is RingState.ENABLED
    assert rig.echo(0, b"still split") != []
    # once stopped, the layout may change (a driver re-initialising the device)
    rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
    assert rig.ack(R.SET_FEATURES, p.U64(features | PACKED_BIT)) == 0
    assert rig.session.rings[0].layout == "packed"


def test_a_size_set_before_set_features_carries_over(rig: Rig) -> None:
    rig.must(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    rig.mem_table()
    rig.must(R.SET_VRING_NUM, p.VringState(1, 8))
    rig.must(R.SET_FEATURES, p.U64(rig.u64(R.GET_FEATURES) & ~PROTOCOL_BIT))
    assert rig.session.rings[1].layout == "packed" and rig.session.rings[1].vq.size == 8


# ------------------------------------------------------------------ traffic and bases


@pytest.mark.parametrize("size", [5, 8])
def test_echo_wraps_and_the_base_round_trips(rig: Rig, size: int) -> None:
    rig.negotiate(packed=True)
    rig.mem_table()
    drv = packed_ring(rig, 0, size)
    assert isinstance(rig.session.rings[0].vq, PackedVirtqueue)
    for k in range(3 * size + 2):          # single and multi-descriptor chains, three laps
        echo(rig, drv, 0, [bytes([k]) * 9, b"x" * k][: 1 + k % 2])
    assert not drv.avail_wrap or not drv.used_wrap or drv.next_avail != 0
    [reply] = rig.send(R.GET_VRING_BASE, p.VringState(0, 0))
    base = reply.payload.num  # type: ignore[union-attr]
    assert base == state_of(drv) and base > 0xFFFF
    assert rig.session.rings[0].state is RingState.STOPPED
    # a restart at that base (a new back-end, a migration) goes on where the ring was
    drv = packed_ring(rig, 0, size, base=base, drv=drv)
    for k in range(size + 1):
        echo(rig, drv, 0, [b"again" * (k + 1)])
    [reply] = rig.send(R.GET_VRING_BASE, p.VringState(0, 0))
    assert reply.payload.num == state_of(drv)  # type: ignore[union-attr]


# ------------------------------------------------------------------ real devices


SECTOR = 512
BLK_HDR = struct.Struct("<IIQ")


def blk_request(rig: Rig, drv: PackedDriver, index: int, kind: int, sector: int,
                data: bytes = b"", read_len: int = 0) -> tuple[int, bytes]:
    """One virtio-blk request (header, data, status) on a packed ring: (status, data)."""
    readable = [BLK_HDR.pack(kind, 0, sector)] + ([data] if data else [])
    writable = ([read_len] if read_len else []) + [1]
    buf_id, addrs = drv.add_chain(readable, writable)
    rig.session.kick(index)
    [(got, length)] = drv.get_used()
    assert got == buf_id and length == read_len + 1
    status = rig.driver.read(addrs[-1], 1)[0]
    return status, rig.driver.read(addrs[-2], read_len) if read_len else b""


def test_blk_on_packed_rings(rig: Rig, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR))
    fd = os.open(image, os.O_RDWR)
    dev = BlockDevice(fd=fd, owns_fd=False, num_queues=2)
    try:
        use_device(rig, dev)
        rig.negotiate(packed=True)
        rig.mem_table()
        drivers = [packed_ring(rig, q, 7) for q in range(2)]
        for k in range(20):                 # writes then reads, both queues, past the wrap
            q = k % 2
            data = bytes([k + 1]) * SECTOR + bytes([255 - k]) * SECTOR
            assert blk_request(rig, drivers[q], q, 1, 2 * k, data) == (0, b"")
            assert blk_request(rig, drivers[q], q, 0, 2 * k, read_len=2 * SECTOR) == (0, data)
        with open(image, "rb") as f:
            f.seek(2 * 19 * SECTOR)
            assert f.read(2 * SECTOR) == bytes([20]) * SECTOR + bytes([236]) * SECTOR
        assert all(r["layout"] == "packed" and r["error"] is None
                   for r in rig.session.status()["rings"])  # type: ignore[index,union-attr]
    finally:
        rig.session.close()
        dev.close()
        os.close(fd)


def test_net_on_packed_rings(rig: Rig) -> None:
    dev = NetDevice(queue_size=256)
    got: list[bytes] = []

    def handler(port: NetPort, frames: list[bytes]) -> None:
        got.extend(frames)
    dev.port.add_handler(handler)
    use_device(rig, dev)
    rig.negotiate(packed=True)
    rig.mem_table()
    rx, tx = packed_ring(rig, 0, 6), packed_ring(rig, 1, 6)
    hdr = bytes(12)
    frames = [bytes([k]) * 6 + bytes(6) + b"\x88\xb5" + bytes(range(k, k + 50)) for k in range(15)]
    for frame in frames:                    # guest -> host, header and frame split or not
        parts = [hdr + frame] if frame[0] % 2 else [hdr, frame]
        buf_id, _ = tx.add_chain(parts)
        rig.session.kick(1)
        assert tx.get_used() == [(buf_id, 0)]
    assert got == frames
    for k, frame in enumerate(frames):      # host -> guest into the receive buffers
        buf_id, [addr] = rx.add_chain((), [2048])
        rig.session.kick(0)
        assert dev.transmit_to_guest([frame]) == 1, k
        [(used_id, length)] = rx.get_used()
        assert used_id == buf_id and length == 12 + len(frame)
        assert rig.driver.read(addr + 12, len(frame)) == frame


# ------------------------------------------------------------------ inflight region, dirty log


def test_inflight_region_on_packed_rings(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU's vhost-user-blk asks for the region after a SET_FEATURES with packed acked: it
    is laid out for packed rings and every packed ring tracks its chains there; a layout
    change drops it (one WARNING)."""
    rig.negotiate(packed=True)
    rig.mem_table()
    [answer] = rig.send(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 2, 6))
    assert isinstance(answer.payload, p.InflightInfo) and len(answer.fds) == 1
    assert answer.payload.mmap_size == inflight.region_size(2, 6, packed=True)
    assert answer.payload.mmap_size != inflight.region_size(2, 6)
    fd = os.dup(answer.fds[0])
    rig.must(R.SET_INFLIGHT_FD, answer.payload, fds=[fd])
    caplog.clear()
    drv = packed_ring(rig, 0, 6)
    rig.host.run_timers()
    for k in range(8):
        echo(rig, drv, 0, [bytes([k]) * 4])
    vq = rig.session.rings[0].vq
    if vq.inflight_tracked:
        assert "inflight region not used" not in caplog.text
    else:   # a ring class that cannot track yet (the compiled one): says so once, serves
        assert type(vq) is not PackedVirtqueue
        assert caplog.text.count("inflight region not used") == 1
    # too small for packed queues (a split-sized region) is refused
    small = p.InflightInfo(inflight.region_size(2, 8), 0, 2, 8)
    assert rig.ack(R.SET_INFLIGHT_FD, small, fds=[os.dup(answer.fds[0])]) == 1
    assert "2 packed queues of 8: needs" in caplog.text
    rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
    caplog.clear()
    rig.must(R.SET_FEATURES, p.U64(rig.session.features & ~PACKED_BIT))
    assert caplog.text.count("inflight region dropped: it was laid out for packed") == 1
    assert rig.session.status()["inflight_region"] is False


def test_dirty_log_of_a_packed_ring(rig: Rig) -> None:
    """With LOG_ALL the ring marks the buffers it wrote, the descriptor ring slots of the
    used descriptors (at their guest-physical address) and, at the stop, the device area at
    the ring's log address (QEMU: log_guest_addr = the device area, its "used" part)."""
    rig.negotiate(packed=True)
    log_fd = os.memfd_create("log")
    rig.ours.append(log_fd)
    pages = RAM_SIZE // LOG_PAGE
    os.ftruncate(log_fd, pages // 8)
    rig.must(R.SET_LOG_BASE, p.LogInfo(pages // 8, 0), fds=[os.dup(log_fd)])
    rig.mem_table()
    # the three parts and the buffers on pages of their own
    lay = PackedLayout(RING_STRIDE, RING_STRIDE + 0x1000, RING_STRIDE + 0x2000,
                       RING_STRIDE + 0x3000, RING_STRIDE + 0x13000)
    drv = packed_ring(rig, 0, 8, log=lay.device, lay=lay)
    rig.must(R.SET_FEATURES, p.U64(rig.session.features | 1 << p.VHOST_F_LOG_ALL))
    buf_id, addrs = drv.add_chain([b"abc"], [3])
    rig.session.kick(0)
    assert drv.get_used() == [(buf_id, 3)]

    def marked() -> set[int]:
        bits = os.pread(log_fd, pages // 8, 0)
        return {i for i in range(pages) if bits[i // 8] >> (i % 8) & 1}
    assert marked() == {addrs[1] // LOG_PAGE, lay.desc // LOG_PAGE}
    os.pwrite(log_fd, bytes(pages // 8), 0)
    rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
    assert marked() == {lay.desc // LOG_PAGE, lay.device // LOG_PAGE}


# ------------------------------------------------------------------ the proxy stays split


def test_vhost_proxy_never_forwards_packed(backend: Any, tmp_path: Path) -> None:
    """A vhostpy back-end offers bit 34; the proxy (split rings only) strips it from what it
    offers on and refuses a driver that acks it, with a clear error."""
    from test_vhost_proxy import LegacyDriver

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    be = backend("blk", "--image", str(image))
    drv = LegacyDriver(be.path)
    try:
        assert drv.proxy.backend_features & PACKED_BIT
        assert not drv.proxy.features() & PACKED_BIT
        with pytest.raises(BackendError, match="forwards split rings only"):
            drv.proxy.set_features(drv.proxy.features() | PACKED_BIT)
        assert not drv.proxy.acked_features & PACKED_BIT
    finally:
        drv.close()


# ------------------------------------------------------------------ a killed back-end


def test_a_killed_sessions_packed_chain_is_served_again(rig: Rig) -> None:
    """The inflight region on packed rings, end to end through two sessions: queue 1 (its
    part of the packed region after queue 0's) holds a chain when its back-end goes; the
    next session, given the same region and the ring's state as the front-end kept it,
    serves that chain again, once, and goes on."""
    from test_recovery import Holding

    use_device(rig, Holding())
    rig.negotiate(packed=True)
    rig.mem_table()
    [answer] = rig.send(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 2, 6))
    info = answer.payload
    assert isinstance(info, p.InflightInfo)
    region_fd = os.dup(answer.fds[0])         # the front-end keeps it across back-ends
    rig.ours.append(region_fd)
    rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
    drv = packed_ring(rig, 1, 6)
    rig.host.run_timers()
    for k in range(4):                        # completed ones first: the state moved on
        buf_id, _ = drv.add_chain([b"x" * k], [k])
        rig.session.kick(1)
        for handle in rig.device.held:        # type: ignore[attr-defined]
            handle.complete(k)
        rig.device.held.clear()               # type: ignore[attr-defined]
        rig.host.run_timers()
        assert drv.get_used() == [(buf_id, k)]
    assert rig.session.rings[1].vq.inflight_tracked   # both ring classes track
    buf_id, addrs = drv.add_chain([b"only once"], [9])
    assert rig.session.kick(1) and drv.get_used() == []    # (kick counts slots: 2)
    kept = state_of(drv)                      # what the front-end's vring state says
    rig.session.close()                       # the back-end is gone
    rig.driver.write(addrs[1], bytes(9))      # (its reply must come again)

    rig.device = EchoDevice()
    rig.session = Session(rig.device, rig.host)
    rig.negotiate(packed=True)
    rig.mem_table()
    rig.must(R.SET_INFLIGHT_FD, info, fds=[os.dup(region_fd)])
    # QEMU hands the last state it has: here the used half it saw, avail where it was
    drv = packed_ring(rig, 1, 6, base=kept, drv=drv)
    rig.host.run_timers()
    assert drv.get_used() == [(buf_id, 9)]
    assert rig.driver.read(addrs[1], 9) == b"only once"
    assert rig.session.rings[1].resubmitted == 1
    assert rig.session.kick(1) == 0           # served once only
    echo(rig, drv, 1, [b"and on"])
