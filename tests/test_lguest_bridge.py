"""The lguest bridge: byte-exact device pages, the guest driver model through it, guest mistakes.

Expected pages are built here field by field from the header definitions (lguest_launcher.h,
the 2.6.24 virtio_config.h / virtio_net.h / virtio_blk.h) with `struct`, independently of the
bridge's code. The driver model (vhostpy.lguest_guest) then plays the Linux guest against the
bridge on the same device classes the vhost-user tests use.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from vhostpy.blk import BlockDevice
from vhostpy.console import ConsoleDevice
from vhostpy.device import Device
from vhostpy.errors import ConfigurationError
from vhostpy.lguest_bridge import LguestBridge, vring_layout, vring_size
from vhostpy.lguest_guest import LguestGuestDriver
from vhostpy.memory import GuestMemory
from vhostpy.net import NetDevice, NetPort
from vhostpy.packets import Responder
from vhostpy.rng import RngDevice
from vhostpy.vring import RingState

# Header facts, written out here.
PAGE = 4096
DESC = struct.Struct("<BBBBB")        # 3.x lguest_device_desc
DESC_2624 = struct.Struct("<BBB")     # 2.6.24 lguest_device_desc
VQCONFIG = struct.Struct("<HHI")      # lguest_vqconfig
F_VIRTQUEUE = 2
NET_F, NET_MAC_F = 0x40, 0x41
BLK_CAPACITY, BLK_SIZE_MAX, BLK_SEG_MAX = 0x41, 0x42, 0x43
S_ACK, S_DRIVER, S_DRIVER_OK, S_FAILED = 1, 2, 4, 0x80
EVENT_IDX = 29

RAM = 4 << 20
AREA = 64 * PAGE                      # device page + vrings
LAYOUTS = ["3.x", "2.6.24"]


def ring_pages(num: int) -> int:
    """Linux vring_size(num, 4096) in pages, from the formula in virtio_ring.h."""
    size = ((16 * num + 2 * (3 + num) + 4095) & ~4095) + 2 * 3 + 8 * num
    return -(-size // PAGE)


class Rig:
    """Guest memory (RAM + device area), a bridge, irqs and console output recorded."""

    def __init__(self, layout: str = "3.x", area: int = AREA) -> None:
        self.buf = mmap.mmap(-1, RAM + area)
        self.memory = GuestMemory()
        self.memory.add_buffer(self.buf, 0)
        self.irqs: list[int] = []
        self.console: list[bytes] = []
        self.bridge = LguestBridge(self.memory, RAM, layout=layout,  # type: ignore[arg-type]
                                   irq_sink=self.irqs.append, console_sink=self.console.append)
        self.driver = LguestGuestDriver(self.memory, RAM, self.bridge.notify,
                                        layout=layout,  # type: ignore[arg-type]
                                        heap=(RAM // 2, RAM // 2))

    def page(self) -> bytes:
        return self.memory.read(RAM, PAGE)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * 512))
    return path


def offered(dev: Device) -> int:
    return dev.features() & 0xFFFFFFFF


def entry_3x(dev: Device, irq0: int, pfn0: int, num: int) -> tuple[bytes, int, int]:
    """(entry, next irq, next pfn) for `dev`, per lguest_launcher.h (3.x)."""
    feats = offered(dev)
    flen = (feats.bit_length() + 7) // 8
    cfg = dev.config()
    vqs = b""
    irq, pfn = irq0, pfn0
    for _ in range(dev.num_queues):
        vqs += VQCONFIG.pack(num, irq, pfn)
        irq, pfn = irq + 1, pfn + ring_pages(num)
    entry = (DESC.pack(dev.device_id, dev.num_queues, flen, len(cfg), 0) + vqs
             + feats.to_bytes(flen, "little") + bytes(flen) + cfg)
    return entry, irq, pfn


def fld(ftype: int, data: bytes) -> bytes:
    return bytes([ftype, len(data)]) + data


def entry_2624(dev: Device, irq0: int, pfn0: int, num: int) -> tuple[bytes, int, int]:
    """(entry, next irq, next pfn) in the 2.6.24 layout: queues first, then device fields."""
    body = b""
    irq, pfn = irq0, pfn0
    for _ in range(dev.num_queues):
        body += fld(F_VIRTQUEUE, VQCONFIG.pack(num, irq, pfn))
        irq, pfn = irq + 1, pfn + ring_pages(num)
    cfg, feats = dev.config(), offered(dev)
    if dev.device_id == 1:
        if feats & 1:                              # CSUM -> 2.6.24 NO_CSUM (bit 0)
            body += fld(NET_F, b"\x01\x00")
        body += fld(NET_MAC_F, cfg[:6])
    elif dev.device_id == 2:
        body += fld(BLK_CAPACITY, cfg[:8])
        if feats >> 1 & 1:
            body += fld(BLK_SIZE_MAX, cfg[8:12])
        if feats >> 2 & 1:
            body += fld(BLK_SEG_MAX, cfg[12:16])
    return DESC_2624.pack(dev.device_id, len(body), 0) + body, irq, pfn


def all_devices(image: Path) -> list[Device]:
    devs: list[Device] = [BlockDevice.open_image(str(image)), NetDevice(queue_size=128)]
    if ConsoleDevice is not None:
        devs.append(ConsoleDevice(on_output=lambda data: None))
    if RngDevice is not None:
        devs.append(RngDevice(queue_size=64))
    return devs


# ------------------------------------------------------------------ vring arithmetic


@pytest.mark.parametrize(("num", "pages"), [(1, 2), (64, 2), (128, 2), (256, 3), (1024, 8)])
def test_vring_size_matches_linux(num: int, pages: int) -> None:
    assert -(-vring_size(num) // PAGE) == pages == ring_pages(num)


def test_vring_layout() -> None:
    desc, avail, used = vring_layout(256, 0x10000)
    assert (desc, avail) == (0x10000, 0x10000 + 4096)
    assert used == 0x10000 + 8192     # 4096 + 4 + 512 + 2 rounded up to the next page


# ------------------------------------------------------------------ byte-exact pages


@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_byte_exact(layout: str, image: Path) -> None:
    rig = Rig(layout)
    devs = all_devices(image)
    expected = b""
    irq, pfn = 1, RAM // PAGE + 1
    build = entry_3x if layout == "3.x" else entry_2624
    for dev in devs:
        lg = rig.bridge.add_device(dev)
        num = min(dev.max_queue_size, 256)
        assert lg.address == RAM + len(expected)
        entry, irq, pfn = build(dev, irq, pfn, num)
        expected += entry
        assert [q.irq for q in lg.queues] == list(range(irq - dev.num_queues, irq))
    assert rig.page() == expected + bytes(PAGE - len(expected))
    assert rig.bridge.guest_limit == pfn * PAGE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hand_built_page_is_read_by_the_driver_model(layout: str) -> None:
    mem = GuestMemory()
    buf = bytearray(RAM + AREA)
    mem.add_buffer(buf, 0)
    mac = bytes.fromhex("02aabbccddee")
    pfn = RAM // PAGE + 1
    if layout == "3.x":
        net = (DESC.pack(1, 2, 1, 8, 0) + VQCONFIG.pack(128, 1, pfn) + VQCONFIG.pack(128, 2, pfn + 2)
               + bytes([1 << 5]) + bytes(1) + mac + b"\x01\x00")
        blk = (DESC.pack(2, 1, 1, 8, 0) + VQCONFIG.pack(64, 3, pfn + 4) + bytes([0x04]) + bytes(1)
               + struct.pack("<Q", 1234))
    else:
        net = DESC_2624.pack(1, 28, 0) + fld(2, VQCONFIG.pack(128, 1, pfn)) + \
            fld(2, VQCONFIG.pack(128, 2, pfn + 2)) + fld(NET_MAC_F, mac)
        blk = DESC_2624.pack(2, 20, 0) + fld(2, VQCONFIG.pack(64, 3, pfn + 4)) + \
            fld(BLK_CAPACITY, struct.pack("<Q", 1234))
    mem.write(RAM, net + blk)
    notified: list[int] = []
    drv = LguestGuestDriver(mem, RAM, notified.append, layout=layout)  # type: ignore[arg-type]
    infos = drv.scan()
    assert [(i.type, i.address, i.vqconfigs) for i in infos] == [
        (1, RAM, [(128, 1, pfn), (128, 2, pfn + 2)]), (2, RAM + len(net), [(64, 3, pfn + 4)])]
    dev = drv.probe(infos[0])
    assert dev.mac == mac and dev.has(5)                          # type: ignore[attr-defined]
    blk_dev = drv.probe(infos[1])
    assert blk_dev.capacity == 1234                               # type: ignore[attr-defined]
    if layout == "3.x":
        assert notified[0] == RAM and notified.count(RAM + len(net)) == 1
        assert mem.read(RAM + 5 + 16 + 1, 1) == bytes([1 << 5])   # MAC accepted
    else:   # 2.6.24: fields consumed (type | 0x80), no status notify at all
        assert RAM not in notified and mem.read(RAM + 3, 1)[0] == 0x82
        assert mem.read(RAM + 3 + 20, 1)[0] == 0x80 | NET_MAC_F
    assert mem.read(RAM + 4 if layout == "3.x" else RAM + 2, 1)[0] == S_ACK | S_DRIVER | S_DRIVER_OK


def test_hand_written_acceptance_is_read_by_the_bridge() -> None:
    rig = Rig()
    dev = NetDevice()
    lg = rig.bridge.add_device(dev)
    acc = lg.features_address + lg.feature_len
    rig.memory.write(acc, ((1 << 5) | (1 << 16)).to_bytes(lg.feature_len, "little"))
    rig.memory.write(lg.status_address, bytes([S_ACK | S_DRIVER]))
    rig.bridge.notify(lg.address)
    assert lg.running and dev.acked_features == (1 << 5) | (1 << 16) and dev.hdr_len == 10


# ------------------------------------------------------------------ the driver model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blk_reads_and_writes_the_image(layout: str, image: Path) -> None:
    rig = Rig(layout)
    dev = BlockDevice.open_image(str(image))
    rig.bridge.add_device(dev)
    blk = rig.driver.blk()
    assert blk.capacity == 64
    data = image.read_bytes()
    assert blk.read(0, 64) == data
    new = os.urandom(3 * 512)
    blk.write(5, new)
    assert image.read_bytes()[5 * 512:8 * 512] == new
    fresh = os.urandom(512)
    with open(image, "r+b") as f:
        f.seek(20 * 512)
        f.write(fresh)
    assert blk.read(20, 1) == fresh
    if layout == "3.x":
        assert blk.flush() == 0
    with pytest.raises(OSError, match="status 1"):
        blk.read(63, 2)                               # beyond capacity: IOERR, host fine
    assert rig.irqs and set(rig.irqs) == {1}
    assert dev.acked_features >> 32 == 0              # never VERSION_1 for an lguest guest
    dev.close()


# 2.6.24 had no MRG_RXBUF: that combination does not exist, so it is not generated.
@pytest.mark.parametrize(("layout", "mrg"), [("3.x", False), ("3.x", True), ("2.6.24", False)])
def test_net_ping_through_the_responder(layout: str, mrg: bool) -> None:
    rig = Rig(layout)
    dev = NetDevice(queue_size=128)
    host = Responder("10.0.2.2")

    def answer(port: NetPort, frames: list[Any]) -> None:
        port.send([r for f in frames for r in host.handle(f)])

    dev.port.add_handler(answer)
    rig.bridge.add_device(dev)
    want = (1 << 5) | (1 << 16) | ((1 << 15) if mrg else 0)
    net = rig.driver.net(want=want)
    assert net.hdr_len == (12 if mrg else 10) == dev.hdr_len
    guest = Responder("10.0.2.15", mac="52:54:00:12:34:56")
    assert net.mac == bytes.fromhex("525400123456")
    pending = guest.ping("10.0.2.2", payload_size=100)
    for _ in range(4):
        for frame in pending:
            net.send(frame)
        pending = [r for f in net.receive() for r in guest.handle(f)]
    assert len(guest.echo_replies) == 1 and host.echo_replies_sent == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rng_returns_bytes(layout: str) -> None:
    rig = Rig(layout)
    rig.bridge.add_device(RngDevice(source=lambda n: b"\xab" * n))
    rng = rig.driver.rng()
    assert rng.read(64) == b"\xab" * 64


@pytest.mark.parametrize("layout", LAYOUTS)
def test_console_text_arrives(layout: str) -> None:
    rig = Rig(layout)
    out: list[bytes] = []
    dev = ConsoleDevice(on_output=out.append)
    rig.bridge.add_device(dev)
    con = rig.driver.console()
    con.write(b"hello from lguest\n")
    assert b"".join(out) == b"hello from lguest\n"
    dev.feed(b"typed")
    assert con.receive() == b"typed"


# ------------------------------------------------------------------ interrupts


def test_no_interrupt_is_honoured() -> None:
    rig = Rig()
    rig.bridge.add_device(RngDevice())
    rng = rig.driver.rng(want=0)                      # no EVENT_IDX: the flag decides
    rng.rings[0].set_no_interrupt()
    assert len(rng.read(8)) == 8 and rig.irqs == []   # completed, no irq
    rng.rings[0].set_no_interrupt(False)
    rng.read(8)
    assert rig.irqs == [1]


def test_event_idx_negotiated_sets_the_virtqueue() -> None:
    rig = Rig()
    lg = rig.bridge.add_device(BlockDevice.in_memory(4096))
    blk = rig.driver.blk()
    assert blk.has(EVENT_IDX) and lg.queues[0].vq is not None and lg.queues[0].vq.event_idx
    blk.read(0, 1)
    assert rig.irqs == [1]


# ------------------------------------------------------------------ guest mistakes


def test_early_console(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.driver.early_console(b"Linux version 2.6.24-lguest booting", scratch=0x1000)
    assert b"".join(rig.console) == b"Linux version 2.6.24-lguest booting"
    assert all(len(chunk) <= 16 for chunk in rig.console)
    rig.memory.write(RAM - 4, b"end!")                # no NUL before the end of RAM
    rig.bridge.notify(RAM - 4)
    assert rig.console[-1] == b"end!"


def test_reset_stops_and_zeroes(image: Path) -> None:
    rig = Rig()
    dev = BlockDevice.open_image(str(image))
    lg = rig.bridge.add_device(dev)
    blk = rig.driver.blk()
    blk.read(0, 1)
    ring_base = lg.queues[0].address
    assert rig.memory.read(ring_base, vring_size(256)) != bytes(vring_size(256))
    blk.reset()
    assert not lg.running and lg.queues[0].vq is None and dev.acked_features == 0
    assert rig.memory.read(ring_base, vring_size(256)) == bytes(vring_size(256))
    assert rig.memory.read(lg.features_address + lg.feature_len, lg.feature_len) == \
        bytes(lg.feature_len)
    blk2 = rig.driver.blk()                           # a new driver can bring it up again
    assert blk2.read(0, 1) == image.read_bytes()[:512]


def test_failed_resets_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    lg = rig.bridge.add_device(BlockDevice.in_memory(4096))
    blk = rig.driver.blk()
    with caplog.at_level(logging.WARNING):
        blk.set_status(S_ACK | S_DRIVER | S_FAILED)   # 3.x lg_set_status notifies FAILED
    assert not lg.running
    assert "FAILED" in caplog.text and "virtio-blk" in caplog.text


def test_double_start_is_refused_without_harm(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    lg = rig.bridge.add_device(BlockDevice.in_memory(4096))
    blk = rig.driver.blk()
    vq = lg.queues[0].vq
    with caplog.at_level(logging.WARNING):
        rig.bridge.notify(lg.address)
    assert "finalised twice" in caplog.text
    assert lg.running and lg.queues[0].vq is vq
    assert blk.read(0, 1) == bytes(512)


@pytest.mark.parametrize("address", [RAM + 3, RAM + PAGE + 8, RAM + AREA, 1 << 40])
def test_notify_at_or_beyond_ram_is_logged(address: int,
                                           caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.bridge.add_device(BlockDevice.in_memory(4096))
    with caplog.at_level(logging.WARNING):
        rig.bridge.notify(address)
    assert f"{address:#x}" in caplog.text and not rig.console


def test_kick_before_start_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    lg = rig.bridge.add_device(BlockDevice.in_memory(4096))
    with caplog.at_level(logging.WARNING):
        rig.bridge.notify(lg.queues[0].address)
    assert "before the device was started" in caplog.text and not lg.running


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accepted_but_not_offered(layout: str, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(layout)
    dev = NetDevice()
    lg = rig.bridge.add_device(dev)
    info = rig.driver.find(1)
    with caplog.at_level(logging.WARNING):
        if layout == "3.x":
            bogus = (1 << 5) | (1 << 30) | (1 << 31)
            rig.driver.probe(info, accept=bogus)
        else:
            net_f = next(f for f in lg.fields if f.type == NET_F)
            ack = lg.address + net_f.offset + 2 + 1   # ack half of a one-byte bitmap
            rig.memory.write(ack, bytes([0x81]))      # bit 0 offered, bit 7 never
            rig.driver.probe(info, want=0)
            rig.bridge.notify(lg.queues[0].address)   # 2.6.24 starts at the first kick
    assert lg.running
    if layout == "3.x":
        assert "[30, 31]" in caplog.text and dev.acked_features == 1 << 5
    else:
        assert "[7]" in caplog.text and dev.acked_features == 1      # CSUM via NO_CSUM


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_page_is_refused_and_unchanged(layout: str) -> None:
    rig = Rig(layout, area=512 * PAGE)
    added = 0
    with pytest.raises(ConfigurationError, match="device page full"):
        while True:
            rig.bridge.add_device(NetDevice(queue_size=1))
            added += 1
    assert added > 10
    before, used = rig.page(), rig.bridge.page_free
    with pytest.raises(ConfigurationError, match="device page full"):
        rig.bridge.add_device(NetDevice(queue_size=1))
    assert rig.page() == before and rig.bridge.page_free == used


def test_rings_beyond_the_device_area_are_refused() -> None:
    rig = Rig(area=4 * PAGE)
    before = rig.page()
    with pytest.raises(ConfigurationError, match="beyond the device area"):
        rig.bridge.add_device(NetDevice(queue_size=256))
    assert rig.page() == before and rig.bridge.devices == []
    rig.bridge.add_device(BlockDevice.in_memory(4096, queue_size=64))   # 2 pages fit


def test_bad_bridge_configuration() -> None:
    mem = GuestMemory()
    mem.add_buffer(bytearray(RAM), 0)
    with pytest.raises(ConfigurationError, match="device page"):
        LguestBridge(mem, RAM, irq_sink=print)
    with pytest.raises(ConfigurationError, match="layout"):
        LguestBridge(mem, RAM // 2, layout="2.6.25", irq_sink=print)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_guest_edited_vqconfig_outside_ram(layout: str, image: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A hostile page edit points a queue outside RAM: the host keeps its own values."""
    rig = Rig(layout)
    lg = rig.bridge.add_device(BlockDevice.open_image(str(image)))
    host_ring = lg.queues[0].address
    pfn_at = lg.address + (DESC.size + 4 if layout == "3.x" else DESC_2624.size + 2 + 4)
    rig.memory.write(pfn_at, struct.pack("<I", 0xFFFFF))
    rig.memory.write(lg.status_address, bytes([S_ACK | S_DRIVER]))
    with caplog.at_level(logging.WARNING):
        if layout == "3.x":
            rig.bridge.notify(lg.address)             # finalise features
        rig.bridge.notify(0xFFFFF * PAGE)             # a kick where the guest now looks
        assert "0xfffff000" in caplog.text and "neither a device entry nor a queue" in \
            caplog.text
        rig.bridge.notify(host_ring)                  # (2.6.24: this first kick starts it)
    assert "changed the host-written entry header or vqconfig" in caplog.text
    vq = lg.queues[0].vq
    assert lg.running and vq is not None and vq.desc_addr == host_ring and vq.error is None


def test_corrupted_ring_breaks_only_that_queue(image: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    lg = rig.bridge.add_device(BlockDevice.open_image(str(image)))
    rig.bridge.add_device(NetDevice(queue_size=64))
    blk = rig.driver.blk()
    net = rig.driver.net()
    ring = blk.rings[0]
    rig.memory.write(ring.avail + 2, struct.pack("<H", 1000))    # avail idx far ahead
    with caplog.at_level(logging.WARNING):
        rig.bridge.notify(ring.address)
    assert lg.queues[0].vq is not None and lg.queues[0].vq.error is not None
    assert "avail idx" in caplog.text
    net.send(Responder().arp_request("10.0.2.15"))               # the other device still works


def test_device_errors_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Device):
        device_id = 4
        name = "broken"

        def handle_chain(self, index: int, vq: object, chain: object) -> int:
            raise RuntimeError("boom")

    rig = Rig()
    lg = rig.bridge.add_device(Broken())
    other = rig.bridge.add_device(BlockDevice.in_memory(4096))
    drv = rig.driver.probe(rig.driver.find(4))
    blk = rig.driver.blk()
    drv.rings[0].add([], [16])
    with caplog.at_level(logging.WARNING):
        drv.rings[0].kick()
    assert "device broken failed in process_queue on vring 0" in caplog.text
    assert "RuntimeError: boom" in caplog.text
    ring = lg.queues[0].ring
    assert ring is not None and ring.state is RingState.BROKEN and ring.error is not None
    assert other.running and blk.read(0, 1) == bytes(512)     # the other device goes on


def test_set_features_that_raises_leaves_the_device_stopped(
        caplog: pytest.LogCaptureFixture) -> None:
    class Picky(BlockDevice):
        def set_features(self, features: int) -> None:
            raise RuntimeError("no such feature set")

    rig = Rig()
    lg = rig.bridge.add_device(Picky.in_memory(4096))
    with caplog.at_level(logging.WARNING):
        rig.driver.probe(rig.driver.find(2))
    assert "device virtio-blk failed in set_features" in caplog.text
    assert "no such feature set" in caplog.text
    assert not lg.running and all(q.ring is None for q in lg.queues)


def test_irq_sink_errors_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    mem = GuestMemory()
    mem.add_buffer(bytearray(RAM + AREA), 0)

    def sink(irq: int) -> None:
        raise OSError("irq line gone")

    bridge = LguestBridge(mem, RAM, irq_sink=sink)
    bridge.add_device(BlockDevice.in_memory(4096))
    drv = LguestGuestDriver(mem, RAM, bridge.notify).blk()
    assert drv.read(0, 1) == bytes(512)
    assert "irq line gone" in caplog.text


def test_a_queue_that_cannot_be_built_is_reported_not_silently_dead(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring the host cannot build (here: the ring implementation refuses the machine, as
    the fence check once did on i686) leaves one WARNING at start and one at the first kick,
    never an exception out of notify."""
    import vhostpy.lguest_bridge as bridge_mod
    from vhostpy.errors import RingError

    def refuse(*args: object) -> object:
        raise RingError("cannot order its stores and loads on this machine")

    rig = Rig()
    lg = rig.bridge.add_device(RngDevice())
    monkeypatch.setattr(bridge_mod, "DefaultVirtqueue", refuse)
    with caplog.at_level(logging.WARNING):
        drv = rig.driver.probe(rig.driver.find(4))
        drv.rings[0].add([], [16])
        drv.rings[0].kick()
        drv.rings[0].add([], [16])
        drv.rings[0].kick()
    assert "queue 0 cannot start: cannot order its stores and loads" in caplog.text
    assert caplog.text.count("queue 0 kicked but it could not start") == 1
    assert lg.queues[0].ring is None
