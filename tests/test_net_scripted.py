"""A scripted front-end sends the invalid frames: dropped, counted, the port still works.

A real `NetApp` back-end (event loop in a thread, vhost-user over a UNIX socket) serves a
`ScriptedGuest`: memfd guest RAM, a real `Frontend`, rings with kick and call eventfds.
The guest transmits every kind of invalid frame, then talks to the built-in responder
(ARP, ping) and checks the answers with scapy; with `pcap=` every frame of both
directions must be in the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scripted import ScriptedGuest

from vhostpy.netapp import RESPONDER_MAC, NetApp
from vhostpy.packets import verify_l4_checksums
from vhostpy.pcap import read_pcap

try:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    HAVE_SCAPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SCAPY = False

#: scapy is a test dependency: missing, these tests fail under CI (conftest.scapy_installed).
pytestmark = pytest.mark.usefixtures("scapy_installed")

RX, TX = 0, 1
HDR_MRG = struct.Struct("<BBHHHHH")   # virtio_net_hdr with num_buffers (VERSION_1: 12 bytes)
NEEDS_CSUM, GSO_TCPV4 = 1, 1
GUEST_MAC = "52:54:00:aa:bb:cc"
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"
RX_BUFFERS = 32
RX_BUF_SIZE = 2048


def vhdr(*, flags: int = 0, gso_type: int = 0, csum_start: int = 0,
         csum_offset: int = 0) -> bytes:
    return HDR_MRG.pack(flags, gso_type, 0, 0, csum_start, csum_offset, 0)


def raw_frame(size: int) -> bytes:
    body = bytes(i & 0xFF for i in range(size - 14))
    return bytes.fromhex("525400123502") + bytes.fromhex(GUEST_MAC.replace(":", "")) + \
        b"\x88\xb5" + body


#: (reason counted by the back-end, the chain's readable buffers)
INVALID: list[tuple[str, list[bytes]]] = [
    ("empty", [b""]),
    ("short header", [vhdr()[:7]]),
    ("header only", [vhdr()]),
    ("oversize", [vhdr(), raw_frame(65536 + 1)]),
    ("runt", [vhdr() + raw_frame(14)[:13]]),
    ("gso", [vhdr(gso_type=GSO_TCPV4) + raw_frame(200)]),
    ("bad checksum offsets", [vhdr(flags=NEEDS_CSUM, csum_start=300) + raw_frame(200)]),
]


class NetGuest:
    """A ScriptedGuest with receive ring 0 full of buffers and transmit ring 1."""

    def __init__(self, path: str) -> None:
        self.g = ScriptedGuest(path)
        self.closed = False
        self.g.start()
        self.rx = self.g.setup_ring(RX).builder
        self.tx = self.g.setup_ring(TX).builder
        self.bufs: dict[int, int] = {}
        self.post(RX_BUFFERS)

    def post(self, count: int) -> None:
        for _ in range(count):
            head, addrs = self.rx.add_chain(writable=[RX_BUF_SIZE])
            self.bufs[head] = addrs[0]
        self.g.kick(RX)

    def transmit(self, *chains: list[bytes]) -> list[tuple[int, int]]:
        heads = [self.tx.add_chain(parts)[0] for parts in chains]
        self.g.kick(TX)
        used = self.g.wait_used(TX, len(heads))
        assert sorted(h for h, _ in used) == sorted(heads)
        return used

    def send(self, pkt: Any) -> None:
        assert [n for _, n in self.transmit([vhdr() + bytes(pkt)])] == [0]

    def receive(self, count: int = 1) -> list[bytes]:
        """`count` frames from the receive ring (each must fit one buffer)."""
        frames = []
        for head, n in self.g.wait_used(RX, count):
            data = self.g.memory.read(self.bufs[head], n)
            assert HDR_MRG.unpack_from(data) == (0, 0, 0, 0, 0, 0, 1)
            frames.append(data[HDR_MRG.size:])
        self.post(count)
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.g.close()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., NetApp]]:
    apps: list[NetApp] = []

    def make(**kwargs: Any) -> NetApp:
        app = NetApp(socket_paths=[str(tmp_path / "net.sock")], respond_ip=HOST_IP, **kwargs)
        apps.append(app)
        app.start_thread()
        return app

    yield make
    for app in apps:
        shut_down(app)


def shut_down(app: NetApp) -> None:
    """Stop the loop thread and close the app (once; the fixture calls it too)."""
    if not getattr(app, "_test_closed", False):
        app._test_closed = True  # type: ignore[attr-defined]
        app.stop()
        app.close()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Callable[[], NetGuest]]:
    made: list[NetGuest] = []

    def make() -> NetGuest:
        made.append(NetGuest(str(tmp_path / "net.sock")))
        return made[-1]

    yield make
    for guest in made:
        guest.close()


def arp_request() -> Any:
    return Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, hwdst="00:00:00:00:00:00", pdst=HOST_IP)


def echo_request(seq: int = 1) -> Any:
    return Ether(src=GUEST_MAC, dst=RESPONDER_MAC) / IP(src=GUEST_IP, dst=HOST_IP) / \
        ICMP(type=8, id=0x4242, seq=seq) / Raw(bytes(range(100)))


def check_arp_reply(frame: bytes) -> None:
    pkt = Ether(frame)
    assert pkt.dst == GUEST_MAC and pkt.src == RESPONDER_MAC
    arp = pkt[ARP]
    assert (arp.op, arp.psrc, arp.hwsrc) == (2, HOST_IP, RESPONDER_MAC)
    assert (arp.pdst, arp.hwdst) == (GUEST_IP, GUEST_MAC)


def check_echo_reply(frame: bytes, seq: int = 1) -> None:
    pkt = Ether(frame)
    assert pkt.dst == GUEST_MAC and pkt.src == RESPONDER_MAC
    assert (pkt[IP].src, pkt[IP].dst) == (HOST_IP, GUEST_IP)
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, 0x4242, seq)
    assert bytes(icmp.payload) == bytes(range(100))
    assert verify_l4_checksums(frame) is True
    # scapy recomputes deleted checksums: they must come out the same.
    ip_sum, icmp_sum = pkt[IP].chksum, icmp.chksum
    del pkt[IP].chksum, pkt[ICMP].chksum
    again = Ether(bytes(pkt))
    assert (again[IP].chksum, again[ICMP].chksum) == (ip_sum, icmp_sum)


def port_counters(app: NetApp) -> dict[str, Any]:
    counters: dict[str, Any] = app.call(lambda: app.ports[0].counters())
    return counters


def test_invalid_frames_dropped_counted_port_still_works(make_app: Callable[..., NetApp],
                                                        guests: Callable[[], NetGuest]) -> None:
    app = make_app()
    guest = guests()
    # One chain at a time, each kicked on its own.
    for reason, parts in INVALID:
        used = guest.transmit(parts)
        assert [n for _, n in used] == [0], reason
        tx0 = port_counters(app)["queues"]["tx0"]
        assert tx0["drops"].get(reason) == 1, (reason, tx0)
    want = {reason: 1 for reason, _ in INVALID}
    counters = port_counters(app)
    assert counters["queues"]["tx0"] == {"frames": 0, "bytes": 0, "drops": want,
                                              "checksums": 0, "merged": 0}
    assert counters["from_guest"]["drops"] == want
    # All of them again in one kick: one batch, the same drops.
    used = guest.transmit(*[parts for _, parts in INVALID])
    assert all(n == 0 for _, n in used)
    assert port_counters(app)["queues"]["tx0"]["drops"] == {r: 2 for r in want}
    # Nothing reached the switch or the responder, and the receive ring saw nothing.
    assert app.call(lambda: app.switch.counters())["flooded"] == 0
    assert guest.rx.used_idx == 0
    # The port still works: ARP, then ping the responder.
    guest.send(arp_request())
    check_arp_reply(guest.receive()[0])
    guest.send(echo_request())
    check_echo_reply(guest.receive()[0])
    counters = port_counters(app)
    assert counters["from_guest"]["frames"] == 2
    assert counters["to_guest"]["frames"] == 2
    assert app.call(lambda: app.responder.counters())["echo_replies_sent"] == 1  # type: ignore
    assert app.call(lambda: app.ports[0].device.rx_counters[0].drops) == {}


def test_ping_with_checksum_offload(make_app: Callable[..., NetApp],
                                    guests: Callable[[], NetGuest]) -> None:
    """An echo request whose ICMP checksum the back-end completes (NEEDS_CSUM)."""
    make_app()
    guest = guests()
    guest.send(arp_request())
    guest.receive()
    req = bytearray(bytes(echo_request(seq=7)))
    req[36:38] = b"\0\0"                       # ICMP checksum left to the device
    hdr = vhdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=2)
    assert [n for _, n in guest.transmit([hdr, bytes(req)])] == [0]
    check_echo_reply(guest.receive()[0], seq=7)


def test_pcap_has_both_directions(make_app: Callable[..., NetApp],
                                  guests: Callable[[], NetGuest], tmp_path: Path) -> None:
    path = tmp_path / "capture.pcap"
    app = make_app(pcap=str(path))
    guest = guests()
    sent = [bytes(arp_request()), bytes(echo_request(1)), bytes(echo_request(2))]
    guest.transmit(*[parts for _, parts in INVALID])   # dropped: never captured
    received = []
    for frame in sent:
        guest.send(frame)
        received += guest.receive()
    check_arp_reply(received[0])
    check_echo_reply(received[1], 1)
    check_echo_reply(received[2], 2)
    guest.close()
    shut_down(app)
    records = [data for _, data in read_pcap(path)]
    assert records == [f for pair in zip(sent, received) for f in pair]
    assert Ether(records[0])[ARP].op == 1 and Ether(records[1])[ARP].op == 2
