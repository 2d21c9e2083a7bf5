"""virtio-net (`NetDevice`, `NetPort`) driven through real `Virtqueue`s and a `RingBuilder`.

No sockets and no session: the test plays the transport and the guest driver. Frames are
checked byte for byte on both sides, headers against the spec layout (virtio 1.2, 5.1.6),
and every drop against the counter named for its reason. scapy builds and checks the
checksummed frames (those tests are skipped without it).
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout

from vhostpy.errors import ConfigurationError, FrontendError
from vhostpy.loop import EventLoop
from vhostpy.net import NetDevice, NetPort
from vhostpy.packets import prepare_partial_checksum, verify_l4_checksums
from vhostpy.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Virtqueue,
)
from vhostpy.vring import DefaultVirtqueue

try:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    HAVE_SCAPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SCAPY = False

#: scapy is a test dependency: missing, these tests fail under CI (conftest.scapy_installed).
needs_scapy = pytest.mark.usefixtures("scapy_installed")

# Spec numbers written out here rather than taken from net.py (virtio 1.2, 5.1.3 and 5.1.6).
F_CSUM, F_MTU, F_MAC, F_MRG_RXBUF, F_STATUS, F_MQ = 0, 3, 5, 15, 16, 22
F_GUEST_CSUM, F_CTRL_VQ, F_GUEST_TSO4, F_HOST_TSO4 = 1, 17, 7, 11
S_LINK_UP = 1
HDR_F_NEEDS_CSUM = 1
GSO_TCPV4 = 1
HDR = struct.Struct("<BBHHHH")          # flags, gso_type, hdr_len, gso_size, csum_start/offset
HDR_MRG = struct.Struct("<BBHHHHH")     # ... + num_buffers

RING = 64
STRIDE = 1 << 20                        # guest RAM per ring (ring + buffers)
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")

ALL = NetDevice().features()
LEGACY_MRG = ALL & ~(1 << VIRTIO_F_VERSION_1)
LEGACY = LEGACY_MRG & ~(1 << F_MRG_RXBUF)
MODERN_NO_MRG = ALL & ~(1 << F_MRG_RXBUF)


def frame(size: int = 64, seed: int = 0, *, dst: bytes = PEER_MAC,
          src: bytes = GUEST_MAC) -> bytes:
    """A plain Ethernet frame of `size` bytes (local experimental EtherType)."""
    body = bytes((seed + i) & 0xFF for i in range(size - 14))
    return dst + src + b"\x88\xb5" + body


def vhdr(hdr_len: int = 12, *, flags: int = 0, gso_type: int = 0, csum_start: int = 0,
         csum_offset: int = 0) -> bytes:
    return HDR_MRG.pack(flags, gso_type, 0, 0, csum_start, csum_offset, 0)[:hdr_len]


class Rig:
    """A NetDevice, its rings in anonymous guest memory, and the driver's side of each ring."""

    def __init__(self, dev: NetDevice | None = None, *, features: int | None = None) -> None:
        self.dev = dev if dev is not None else NetDevice()
        self.mem, self._buf = anon_memory((self.dev.num_queues + 1) * STRIDE)
        self.rbs: dict[int, RingBuilder] = {}
        self.vqs: dict[int, Virtqueue] = {}
        self.bufs: dict[int, dict[int, int]] = collections.defaultdict(dict)  # head -> addr
        self.calls: collections.Counter[int] = collections.Counter()
        self.fds: dict[int, int] = {}   # ring index -> call eventfd (test_fastpath's rigs)
        self.batches: list[list[bytes]] = []
        self.features = self.dev.features() if features is None else features
        self.dev.set_features(self.features)
        self.dev.port.add_handler(self.handler)

    def handler(self, port: NetPort, frames: list[bytes]) -> None:
        self.batches.append(list(frames))

    @property
    def port(self) -> NetPort:
        return self.dev.port

    @property
    def delivered(self) -> list[bytes]:
        return [f for batch in self.batches for f in batch]

    def ring(self, index: int, *, event_idx: bool = False, start: bool = True) -> RingBuilder:
        """Configure ring `index` (and start it on the device unless `start=False`)."""
        rb = RingBuilder(self.mem, RING, layout(RING, base=index * STRIDE,
                                                 data_size=STRIDE // 2))
        vq = rb.attach(DefaultVirtqueue(self.mem, index))
        vq.event_idx = event_idx

        def call() -> None:
            self.calls[index] += 1
        CallRunner(vq, call)
        self.rbs[index], self.vqs[index] = rb, vq
        if start:
            self.dev.queue_started(index, vq)
        return rb

    def process(self, index: int) -> None:
        self.dev.process_queue(index, self.vqs[index])

    # -- guest -> host -----------------------------------------------------------------------
    def transmit(self, *chains: list[bytes], index: int = 1,
                 indirect: bool = False) -> list[tuple[int, int]]:
        """Publish one tx chain per argument, kick once; returns the used entries."""
        rb = self.rbs[index]
        heads = [rb.add_chain(parts, indirect=indirect)[0] for parts in chains]
        self.process(index)
        used = rb.get_used()
        assert sorted(h for h, _ in used) == sorted(heads)
        return used

    # -- host -> guest -----------------------------------------------------------------------
    def post(self, count: int = 1, size: int = 2048, index: int = 0) -> list[int]:
        """Give the device `count` receive buffers of `size` bytes; returns their heads."""
        rb = self.rbs[index]
        heads = []
        for _ in range(count):
            head, addrs = rb.add_chain(writable=[size])
            self.bufs[index][head] = addrs[0]
            heads.append(head)
        return heads

    def received(self, index: int = 0, *, hdr_len: int | None = None,
                 mrg: bool | None = None) -> list[tuple[bytes, bytes, list[tuple[int, int]]]]:
        """Frames in the used ring since the last call: (header, frame, used entries)."""
        if hdr_len is None:
            hdr_len = 10 if not self.features >> VIRTIO_F_VERSION_1 & 1 and not \
                self.features >> F_MRG_RXBUF & 1 else 12
        if mrg is None:
            mrg = bool(self.features >> F_MRG_RXBUF & 1)
        used = self.rbs[index].get_used()
        out = []
        i = 0
        while i < len(used):
            head, n = used[i]
            first = self.mem.read(self.bufs[index][head], n)
            header = first[:hdr_len]
            count = HDR_MRG.unpack(header)[6] if mrg else 1
            assert count >= 1, header
            entries = used[i:i + count]
            assert len(entries) == count, f"num_buffers {count} but {len(entries)} used"
            data = first[hdr_len:] + b"".join(self.mem.read(self.bufs[index][h], m)
                                              for h, m in entries[1:])
            out.append((header, data, entries))
            i += count
        return out

    def received_frames(self, index: int = 0) -> list[bytes]:
        return [f for _, f, _ in self.received(index)]


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    r.ring(0)
    r.ring(1)
    return r


def port_counters(rig: Rig) -> dict[str, Any]:
    return rig.port.counters()


def drops(counters: object) -> dict[str, int]:
    return dict(counters.drops)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------
# features and config space


def test_features_offered() -> None:
    feats = NetDevice().features()
    for bit in (F_CSUM, F_MAC, F_MRG_RXBUF, F_STATUS, F_MTU, VIRTIO_F_VERSION_1,
                VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX):
        assert feats >> bit & 1, bit
    # Nothing it cannot do: no MQ with one pair, no offloads, no control queue.
    for bit in (F_MQ, F_GUEST_CSUM, F_CTRL_VQ, F_GUEST_TSO4, F_HOST_TSO4):
        assert not feats >> bit & 1, bit
    multi = NetDevice(queue_pairs=4)
    assert multi.features() >> F_MQ & 1
    assert multi.num_queues == 8
    assert multi.features() & ~(1 << F_MQ) == feats


def test_config_space_at_spec_offsets() -> None:
    dev = NetDevice(mac="02:11:22:33:44:55", mtu=9000, queue_pairs=3)
    cfg = dev.config()
    assert len(cfg) == 12
    assert cfg[0:6] == bytes.fromhex("021122334455")
    assert struct.unpack_from("<H", cfg, 6)[0] == S_LINK_UP
    assert struct.unpack_from("<H", cfg, 8)[0] == 3
    assert struct.unpack_from("<H", cfg, 10)[0] == 9000
    default = NetDevice().config()
    assert default[0:6] == GUEST_MAC
    assert struct.unpack_from("<HHH", default, 6) == (S_LINK_UP, 1, 1500)


@pytest.mark.parametrize("kwargs", [{"queue_pairs": 0}, {"queue_pairs": 65}, {"mtu": 67},
                                    {"mtu": 65536}])
def test_bad_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        NetDevice(**kwargs)


# ------------------------------------------------------------------------------------------
# header size, both directions


@pytest.mark.parametrize(("features", "hdr_len"), [(ALL, 12), (MODERN_NO_MRG, 12),
                                                   (LEGACY_MRG, 12), (LEGACY, 10)],
                         ids=["modern+mrg", "modern", "legacy+mrg", "legacy"])
def test_header_size(features: int, hdr_len: int) -> None:
    rig = Rig(features=features)
    assert rig.dev.hdr_len == hdr_len
    rig.ring(0)
    rig.ring(1)
    # rx: exactly hdr_len bytes of header, then the frame.
    rig.post(2)
    f = frame(100, 1)
    assert rig.port.send([f]) == 1
    (header, data, entries), = rig.received(hdr_len=hdr_len, mrg=False)
    assert len(entries) == 1 and entries[0][1] == hdr_len + len(f)
    assert data == f
    if hdr_len == 12:
        assert HDR_MRG.unpack(header) == (0, 0, 0, 0, 0, 0, 1)  # num_buffers 1 even without MRG
    else:
        assert HDR.unpack(header) == (0, 0, 0, 0, 0, 0)
    # tx: the device strips exactly hdr_len bytes.
    rig.transmit([vhdr(hdr_len) + f])
    assert rig.delivered == [f]


def test_reset_forgets_negotiation(rig: Rig) -> None:
    rig.dev.reset()
    assert rig.dev.hdr_len == 10
    rig.dev.set_features(ALL)
    assert rig.dev.hdr_len == 12


# ------------------------------------------------------------------------------------------
# guest -> host


def test_tx_batches_exact_bytes_and_counters(rig: Rig) -> None:
    frames = [frame(60 + 37 * i, i) for i in range(5)]
    used = rig.transmit(*[[vhdr() + f] for f in frames])
    assert all(n == 0 for _, n in used)
    assert rig.batches == [frames]          # one kick, one batch, in order
    assert rig.calls[1] == 1                # the driver is told its buffers are back
    tx0 = port_counters(rig)["queues"]["tx0"]
    assert tx0 == {"frames": 5, "bytes": sum(map(len, frames)), "drops": {},
                   "checksums": 0, "merged": 0}
    assert rig.port.from_guest.frames == 5
    assert rig.port.from_guest.bytes == sum(map(len, frames))
    assert rig.port.to_guest.frames == 0
    rig.transmit([vhdr() + frames[0]])
    assert rig.batches == [frames, [frames[0]]]
    assert rig.port.from_guest.frames == 6


def test_tx_more_than_one_batch(rig: Rig) -> None:
    frames = [frame(64, i) for i in range(RING)]
    rig.transmit(*[[vhdr() + f] for f in frames])
    assert rig.delivered == frames


def test_tx_header_split_from_data(rig: Rig) -> None:
    f = frame(1514, 3)
    rig.transmit([vhdr(), f], [vhdr(), f[:14], f[14:700], f[700:]], [vhdr()[:5], vhdr()[5:] + f])
    rig.transmit([vhdr(), f], indirect=True)
    assert rig.delivered == [f] * 4


@needs_scapy
@pytest.mark.parametrize("l4", ["udp", "tcp"])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("payload", [0, 1, 1001])
def test_tx_needs_csum(rig: Rig, l4: str, version: int, payload: int) -> None:
    ip = IP(src="10.0.2.15", dst="10.0.2.2") if version == 4 else \
        IPv6(src="fd00::15", dst="fd00::2")
    seg = UDP(sport=5000, dport=53) if l4 == "udp" else TCP(sport=5000, dport=80, seq=7)
    pkt = Ether(src=GUEST_MAC, dst=PEER_MAC) / ip / seg
    if payload:
        pkt = pkt / Raw((bytes(range(256)) * 4)[:payload])
    want = bytes(pkt)                       # scapy's own, complete checksums
    partial = bytearray(want)
    start, offset = prepare_partial_checksum(partial)
    assert (start, offset) == (34 if version == 4 else 54, 6 if l4 == "udp" else 16)
    hdr = vhdr(flags=HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=offset)
    rig.transmit([hdr, bytes(partial)])
    got, = rig.delivered
    assert got == want
    assert verify_l4_checksums(got) is True
    check = Ether(got)
    layer = check[UDP] if l4 == "udp" else check[TCP]
    chksum = layer.chksum
    del layer.chksum
    assert Ether(bytes(check))[UDP if l4 == "udp" else TCP].chksum == chksum


# Invalid transmit chains: (reason, chain parts). Each chain must come back used with
# length 0, be counted under its reason, and never reach the port.
INVALID_TX: list[tuple[str, Callable[[], list[bytes]]]] = [
    ("empty", lambda: [b""]),
    ("short header", lambda: [vhdr()[:5]]),
    ("header only", lambda: [vhdr()]),
    ("oversize", lambda: [vhdr(), frame(65536 + 1)]),
    ("runt", lambda: [vhdr() + frame(64)[:13]]),
    ("gso", lambda: [vhdr(gso_type=GSO_TCPV4) + frame(200)]),
    ("bad checksum offsets", lambda: [vhdr(flags=HDR_F_NEEDS_CSUM, csum_start=200,
                                           csum_offset=0) + frame(200)]),
    ("bad checksum offsets", lambda: [vhdr(flags=HDR_F_NEEDS_CSUM, csum_start=34,
                                           csum_offset=165) + frame(200)]),
]


@pytest.mark.parametrize(("reason", "parts"), INVALID_TX,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(INVALID_TX)])
def test_tx_invalid_dropped(rig: Rig, reason: str, parts: Callable[[], list[bytes]]) -> None:
    used = rig.transmit(parts())
    assert [n for _, n in used] == [0]
    assert rig.calls[1] == 1
    assert rig.batches == []
    assert drops(rig.dev.tx_counters[0]) == {reason: 1}
    assert rig.dev.tx_counters[0].frames == 0
    assert rig.vqs[1].error is None
    good = frame(64, 9)
    rig.transmit([vhdr() + good])
    assert rig.delivered == [good]


def test_tx_writable_only_chain_is_empty(rig: Rig) -> None:
    rb = rig.rbs[1]
    head, _ = rb.add_chain(writable=[100])
    rig.process(1)
    assert rb.get_used() == [(head, 0)]
    assert drops(rig.dev.tx_counters[0]) == {"empty": 1}


def test_tx_all_invalid_in_one_batch(rig: Rig) -> None:
    good = frame(100, 4)
    chains = [parts() for _, parts in INVALID_TX]
    used = rig.transmit([vhdr() + good], *chains, [vhdr() + good])
    assert len(used) == len(INVALID_TX) + 2 and all(n == 0 for _, n in used)
    assert rig.batches == [[good, good]]
    assert drops(rig.dev.tx_counters[0]) == dict(collections.Counter(r for r, _ in INVALID_TX))
    assert port_counters(rig)["from_guest"] == {
        "frames": 2, "bytes": 200, "drops": dict(collections.Counter(r for r, _ in INVALID_TX)),
        "checksums": 0, "merged": 0}


def test_tx_largest_frame_accepted(rig: Rig) -> None:
    big = frame(65536, 5)
    rig.transmit([vhdr(), big])
    assert rig.delivered == [big]


# ------------------------------------------------------------------------------------------
# host -> guest


def test_rx_one_buffer(rig: Rig) -> None:
    rig.post(1)
    f = frame(1514, 2)
    assert rig.port.send([f]) == 1
    (header, data, entries), = rig.received()
    assert data == f
    assert entries[0][1] == 12 + 1514
    assert HDR_MRG.unpack(header) == (0, 0, 0, 0, 0, 0, 1)
    assert rig.dev.rx_counters[0].frames == 1 and rig.dev.rx_counters[0].bytes == 1514
    assert rig.port.to_guest.frames == 1
    assert rig.calls[0] == 1


def test_rx_mergeable_across_buffers() -> None:
    rig = Rig(NetDevice(mtu=9000))
    rig.ring(0)
    rig.post(8, size=2048)
    f = frame(8000, 6)
    assert rig.port.send([f]) == 1
    (header, data, entries), = rig.received()
    assert data == f
    assert HDR_MRG.unpack(header)[6] == len(entries) == 4       # ceil(8012 / 2048)
    assert sum(n for _, n in entries) == 12 + 8000
    assert [n for _, n in entries[:-1]] == [2048] * 3
    # The other buffers are still there for the next frame.
    g = frame(3000, 7)
    rig.port.send([g])
    (header, data, entries), = rig.received()
    assert data == g and HDR_MRG.unpack(header)[6] == 2


def test_rx_waits_for_enough_buffers() -> None:
    rig = Rig(NetDevice(mtu=9000))
    rb = rig.ring(0)
    rig.post(2, size=2048)
    f = frame(8000, 8)
    assert rig.port.send([f]) == 1             # accepted: it waits in the backlog
    assert rb.used_idx == 0 and rig.calls[0] == 0
    assert len(rig.dev.backlog) == 1
    assert rig.vqs[0].last_avail_idx == 0      # nothing consumed
    g = frame(100, 9)
    assert rig.port.send([g]) == 1             # queued behind it, order kept
    assert rb.used_idx == 0
    rig.post(3, size=2048)
    rig.process(0)                             # the driver's kick
    assert rig.received_frames() == [f, g]
    assert len(rig.dev.backlog) == 0
    assert rig.calls[0] == 1
    assert drops(rig.port.to_guest) == {}


def test_rx_without_mrg_small_buffer_drops_and_is_reused() -> None:
    rig = Rig(features=MODERN_NO_MRG)
    rig.ring(0)
    small, = rig.post(1, size=200)
    assert rig.port.send([frame(1000, 1)]) == 1
    assert rig.rbs[0].used_idx == 0
    assert drops(rig.dev.rx_counters[0]) == {"rx buffer too small": 1}
    assert rig.port.to_guest.drops == {"rx buffer too small": 1}
    assert len(rig.dev.backlog) == 0
    g = frame(188, 2)                          # 12 + 188 fits exactly
    rig.port.send([g])
    (_, data, entries), = rig.received()
    assert entries == [(small, 200)] and data == g


def test_rx_without_mrg_waits_without_buffers() -> None:
    rig = Rig(features=MODERN_NO_MRG)
    rig.ring(0)
    f = frame(1500, 3)
    assert rig.port.send([f]) == 1
    assert len(rig.dev.backlog) == 1
    rig.post(1)
    rig.process(0)
    assert rig.received_frames() == [f]


def test_rx_backlog_bound() -> None:
    rig = Rig(NetDevice(rx_backlog=8))
    frames = [frame(80, i) for i in range(11)]
    # No receive queue at all yet: the backlog fills, the excess drops.
    assert rig.port.send(frames[:5]) == 5
    assert rig.port.send(frames[5:]) == 3
    assert drops(rig.dev.backlog_counters) == {"no rx buffers": 3}
    assert port_counters(rig)["backlog"] == 8
    rig.ring(0)                                # started with no buffers: nothing moves
    assert len(rig.dev.backlog) == 8
    assert rig.port.send([frame(80, 99)]) == 0
    assert drops(rig.port.to_guest) == {"no rx buffers": 4}
    rig.post(16)
    rig.process(0)
    assert rig.received_frames() == frames[:8]
    assert port_counters(rig)["to_guest"] == {
        "frames": 8, "bytes": 8 * 80, "drops": {"no rx buffers": 4}, "checksums": 0,
        "merged": 0}


def test_rx_mtu_limit_and_set_mtu(rig: Rig) -> None:
    rig.post(8, size=4096)
    limit = 1500 + 18
    assert rig.port.send([frame(limit), frame(limit + 1)]) == 1
    assert drops(rig.dev.backlog_counters) == {"larger than MTU": 1}
    assert [len(f) for f in rig.received_frames()] == [limit]
    rig.dev.set_mtu(9000)
    assert rig.port.send([frame(9018), frame(9019)]) == 1
    assert [len(f) for f in rig.received_frames()] == [9018]
    assert drops(rig.dev.backlog_counters) == {"larger than MTU": 2}
    rig.dev.set_mtu(68)
    assert rig.port.send([frame(87)]) == 0
    for bad in (67, 65536):
        with pytest.raises(FrontendError):
            rig.dev.set_mtu(bad)
    assert rig.dev.mtu == 68


def test_rx_runts_dropped(rig: Rig) -> None:
    rig.post(2)
    assert rig.port.send([b"", frame(64)[:13], frame(14)]) == 1
    assert drops(rig.dev.backlog_counters) == {"runt": 2}
    assert rig.received_frames() == [frame(14)]


def test_rx_frame_larger_than_the_ring_dropped() -> None:
    rig = Rig(NetDevice(mtu=9000))
    rb = RingBuilder(rig.mem, 2, layout(2, base=0, data_size=STRIDE // 2))
    vq = rb.attach(DefaultVirtqueue(rig.mem, 0))
    rig.rbs[0], rig.vqs[0] = rb, vq
    rig.dev.queue_started(0, vq)
    rig.post(2, size=1024)
    assert rig.port.send([frame(9000), frame(500)]) == 2
    assert drops(rig.dev.rx_counters[0]) == {"larger than the whole ring": 1}
    assert rig.received_frames() == [frame(500)]


def test_rx_stopped_queue_keeps_frames(rig: Rig) -> None:
    rig.post(4)
    rig.dev.queue_stopped(0, rig.vqs[0])
    f = frame(64, 1)
    assert rig.port.send([f]) == 1
    assert rig.rbs[0].used_idx == 0
    rig.dev.queue_started(0, rig.vqs[0])
    assert rig.received_frames() == [f]


def test_multiqueue() -> None:
    rig = Rig(NetDevice(queue_pairs=2))
    assert rig.features >> F_MQ & 1
    for index in range(4):
        rig.ring(index)
    rig.post(RING - 1, index=0)
    rig.post(RING - 1, index=2)
    # Different flows (src MAC / payload in the hashed prefix) spread over the live queues.
    frames = [frame(100, i, src=bytes([2, 0, 0, 0, 0, i])) for i in range(40)]
    assert rig.port.send(frames) == 40
    got0, got2 = rig.received_frames(0), rig.received_frames(2)
    assert got0 and got2
    assert sorted(got0 + got2) == sorted(frames)
    counters = port_counters(rig)["queues"]
    assert counters["rx0"]["frames"] == len(got0) and counters["rx1"]["frames"] == len(got2)
    # Only pair 1's receive queue live: everything goes there.
    rig.dev.queue_stopped(0, rig.vqs[0])
    assert rig.port.send(frames[:10]) == 10
    assert rig.received_frames(0) == [] and rig.received_frames(2) == frames[:10]
    # Transmit on both pairs, counted per queue.
    rig.transmit([vhdr() + frame(70)], [vhdr() + frame(71)], index=1)
    rig.transmit([vhdr() + frame(72)], index=3)
    queues = port_counters(rig)["queues"]
    assert queues["tx0"] == {"frames": 2, "bytes": 141, "drops": {},
                              "checksums": 0, "merged": 0}
    assert queues["tx1"] == {"frames": 1, "bytes": 72, "drops": {},
                              "checksums": 0, "merged": 0}
    assert rig.port.from_guest.frames == 3
    assert [len(f) for f in rig.delivered] == [70, 71, 72]


def test_send_threadsafe_needs_a_loop(rig: Rig) -> None:
    with pytest.raises(RuntimeError, match="no event loop"):
        rig.port.send_threadsafe([frame()])


def test_send_threadsafe_from_another_thread(rig: Rig) -> None:
    rig.post(4)
    loop = EventLoop()
    rig.port.call_soon_threadsafe = loop.call_soon_threadsafe
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        frames = [frame(64, i) for i in range(3)]
        sender = threading.Thread(target=rig.port.send_threadsafe, args=(iter(frames),))
        sender.start()
        sender.join(5)
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)    # runs after the send, on the loop's thread
        assert done.wait(5)
        assert rig.received_frames() == frames
    finally:
        loop.stop()
        thread.join(5)
        loop.close()
    assert not thread.is_alive()


# ------------------------------------------------------------------------------------------
# scapy on the port


@needs_scapy
def test_scapy_handler_and_send(rig: Rig) -> None:
    got: list[object] = []
    rig.port.add_handler(lambda port, pkts: got.extend(pkts), scapy=True)
    pkt = Ether(src=GUEST_MAC, dst=PEER_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") / \
        UDP(sport=1, dport=2) / Raw(b"hello")
    rig.transmit([vhdr() + bytes(pkt)])
    assert len(got) == 1 and isinstance(got[0], Ether)
    assert got[0][UDP].dport == 2 and bytes(got[0][Raw]) == b"hello"
    assert rig.delivered == [bytes(pkt)]      # the plain handler still gets bytes
    rig.post(2)
    reply = Ether(src=PEER_MAC, dst=GUEST_MAC) / IP(src="10.0.2.2", dst="10.0.2.15") / \
        UDP(sport=2, dport=1) / Raw(b"world")
    assert rig.port.send([reply, bytearray(frame(64))]) == 2
    first, second = rig.received_frames()
    assert first == bytes(reply) and Ether(first)[Raw].load == b"world"
    assert second == frame(64)
    with pytest.raises(TypeError):
        rig.port.send([42])


def test_handler_removal_and_monitor(rig: Rig) -> None:
    seen: list[tuple[str, list[bytes]]] = []
    rig.port.add_monitor(lambda port, direction, frames: seen.append((direction, list(frames))))
    rig.port.remove_handler(rig.handler)
    f = frame(64)
    rig.transmit([vhdr() + f])
    assert rig.batches == []
    rig.post(1)
    rig.port.send([f])
    assert seen == [("from_guest", [f]), ("to_guest", [f])]


# ------------------------------------------------------------------------------------------
# interrupt suppression on the receive queue


def test_rx_event_idx() -> None:
    rig = Rig()
    rb = rig.ring(0, event_idx=True)
    rig.post(8)
    rig.port.send([frame(64, 0)])
    assert rig.calls[0] == 1                   # the first decision always interrupts
    rb.set_used_event(100)                     # "interrupt me at used idx 101"
    rig.port.send([frame(64, 1)])
    rig.port.send([frame(64, 2)])
    assert rig.calls[0] == 1
    rb.set_used_event(3)                       # the next entry (idx 3 -> 4) crosses it
    rig.port.send([frame(64, 3)])
    assert rig.calls[0] == 2
    assert rig.received_frames() == [frame(64, i) for i in range(4)]
    _rx_kicks_only_while_frames_wait(rig, rb, event_idx=True)


def test_rx_kicks_only_while_frames_wait() -> None:
    rig = Rig(features=ALL & ~(1 << VIRTIO_RING_F_EVENT_IDX))
    rb = rig.ring(0)
    _rx_kicks_only_while_frames_wait(rig, rb, event_idx=False)


def _rx_kicks_only_while_frames_wait(rig: Rig, rb: RingBuilder, *, event_idx: bool) -> None:
    """Receive buffers nobody waits for are refilled without a kick; frames waiting in the
    backlog ask for one at the driver's next buffer, and once they are placed the ring is
    quiet again."""
    dev = rig.dev
    assert not dev.wants_kicks(0) and dev.wants_kicks(1)
    old = rb.avail_idx
    rig.post(2)
    assert not rb.should_kick(old, event_idx)
    sent = [frame(64, k) for k in range(10, 13 + rig.vqs[0].available())]
    rig.port.send(sent)                                    # all buffers used, 3 wait
    assert len(dev.backlog) == 3 and dev.wants_kicks(0)
    assert rb.device_wants_kicks(event_idx)
    old = rb.avail_idx
    rig.post(1)
    assert rb.should_kick(old, event_idx)
    rig.process(0)                                         # the kick: one more placed
    assert len(dev.backlog) == 2 and rb.device_wants_kicks(event_idx)
    old = rb.avail_idx
    rig.post(4)
    assert rb.should_kick(old, event_idx)
    rig.process(0)
    assert not dev.backlog and not dev.wants_kicks(0)
    old = rb.avail_idx
    rig.post(2)
    assert not rb.should_kick(old, event_idx)
    assert rig.received_frames()[-len(sent):] == sent


def test_rx_no_interrupt() -> None:
    rig = Rig(features=ALL & ~(1 << VIRTIO_RING_F_EVENT_IDX))
    rb = rig.ring(0)
    rig.post(4)
    rb.set_no_interrupt(True)
    rig.port.send([frame(64, 0)])
    assert rig.calls[0] == 0
    rb.set_no_interrupt(False)
    rig.port.send([frame(64, 1)])
    assert rig.calls[0] == 1
    assert len(rig.received_frames()) == 2
    assert rb.no_notify                        # no kicks while no frame waits for buffers


def test_rx_batch_signals_once(rig: Rig) -> None:
    rig.post(20)
    rig.port.send([frame(64, i) for i in range(20)])
    assert rig.calls[0] == 1
    assert len(rig.received_frames()) == 20


def test_no_busy_state_left_after_many_rounds(rig: Rig) -> None:
    t0 = time.monotonic()
    for i in range(300):                       # wraps the 64-entry rings several times
        rig.post(1)
        rig.port.send([frame(64, i)])
        assert rig.received_frames() == [frame(64, i)]
        rig.transmit([vhdr() + frame(64, i)])
    assert rig.port.from_guest.frames == rig.port.to_guest.frames == 300
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------
# user code and resets never break the device


def test_raising_handler_is_contained(rig: Rig) -> None:
    def bad(port: NetPort, frames: list[bytes]) -> None:
        raise RuntimeError("user bug")
    rig.port.add_handler(bad)
    f1, f2 = frame(64, 1), frame(64, 2)
    rig.transmit([vhdr() + f1])
    rig.transmit([vhdr() + f2])
    # the ring keeps serving and the other handler saw both batches
    assert rig.delivered == [f1, f2]
    assert rig.vqs[1].error is None
    assert rig.port.handler_errors == 2
    assert rig.port.counters()["handler_errors"] == 2


def test_reset_drops_the_backlog(rig: Rig) -> None:
    # no receive buffers posted: frames wait in the backlog
    assert rig.port.send([frame(64, 1), frame(64, 2)]) == 2
    assert len(rig.dev.backlog) == 2
    rig.dev.reset()
    assert len(rig.dev.backlog) == 0
    assert rig.port.to_guest.drops["device reset"] == 2


def test_monitor_sees_only_frames_accepted_for_the_guest(rig: Rig) -> None:
    seen: list[bytes] = []
    rig.port.add_monitor(lambda port, direction, frames: seen.extend(frames)
                         if direction == "to_guest" else None)
    good = frame(64, 3)
    runt = good[:10]
    too_big = frame(rig.dev.mtu + 100, 4)
    rig.post(1)
    assert rig.port.send([runt, good, too_big]) == 1
    assert seen == [good]


def test_announce_sends_a_rarp_from_the_guest_mac_to_the_consumers() -> None:
    """SEND_RARP after a migration: the port's consumers see a broadcast RARP "request
    reverse" from the guest's MAC, as if the guest had sent it."""
    from vhostpy.packets import rarp_announcement

    dev = NetDevice()
    seen: list[bytes] = []
    dev.port.add_handler(lambda port, frames: seen.extend(frames))
    mac = bytes.fromhex("525400abcdef")
    dev.announce(mac)
    assert seen == [rarp_announcement(mac)]
    frame = seen[0]
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35"                       # ETH_P_RARP
    assert frame[14:22] == bytes.fromhex("0001080006040003")  # ethernet/IPv4, op 3
    assert frame[22:28] == mac and frame[32:38] == mac
    assert frame[28:32] == frame[38:42] == bytes(4)
    with pytest.raises(ValueError):
        rarp_announcement(b"\x01\x02")
