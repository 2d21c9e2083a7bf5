"""vhostpy.packets: checksums against a naive RFC 1071 loop and scapy, MACs, Responder.

scapy is the independent referee: frames are built and dissected by it, never by the code
under test. Tests needing scapy are skipped (with a reason) when it is not installed.
"""

from __future__ import annotations

import random
import struct

import pytest

from vhostpy.packets import (
    BROADCAST_MAC,
    EchoReply,
    Responder,
    complete_checksum,
    format_mac,
    frame_bytes,
    from_scapy,
    internet_checksum,
    is_broadcast,
    is_multicast,
    ones_complement_sum,
    parse_mac,
    prepare_partial_checksum,
    swap_macs,
    to_scapy,
    verify_l4_checksums,
)

try:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import (
        ICMPv6EchoRequest,
        IPv6,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
    )
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    HAVE_SCAPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SCAPY = False

#: scapy is a test dependency: missing, these tests fail under CI (conftest.scapy_installed).
needs_scapy = pytest.mark.usefixtures("scapy_installed")

HOST_IP, HOST_MAC = "10.0.2.2", "52:54:00:12:35:02"
GUEST_IP, GUEST_MAC = "10.0.2.15", "52:54:00:12:34:56"


# --------------------------------------------------------------------------- references


def naive_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 section 4.1, word by word, with end-around carry (folded, not complemented)."""
    if len(data) % 2:
        data += b"\0"
    s = initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_checksum(data: bytes, initial: int = 0) -> int:
    return ~naive_sum(data, initial) & 0xFFFF


def pseudo_v4(src: str, dst: str, proto: int, length: int) -> int:
    return naive_sum(bytes(IP(src=src, dst=dst))[12:20] + struct.pack("!BBH", 0, proto, length))


def pseudo_v6(src: str, dst: str, nh: int, length: int) -> int:
    addrs = bytes(IPv6(src=src, dst=dst))[8:40]
    return naive_sum(addrs + struct.pack("!I3xB", length, nh))


# --------------------------------------------------------------------------- checksums


def test_rfc1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")  # RFC 1071 section 3: sum 0xddf2
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


@pytest.mark.parametrize("seed", range(4))
def test_checksum_matches_naive_reference(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [0, 1, 2, 3, 19, 20, 21, 1499, 1500, 9001, *(rng.randrange(4000) for _ in range(60))]
    for n in lengths:
        data = rng.randbytes(n)
        initial = rng.choice([0, rng.randrange(0x10000), rng.randrange(1 << 24)])
        assert internet_checksum(data, initial) == naive_checksum(data, initial), (n, initial)
        assert ones_complement_sum(data, initial) == naive_sum(data, initial)
        assert internet_checksum(memoryview(data), initial) == naive_checksum(data, initial)
        assert internet_checksum(bytearray(data)) == naive_checksum(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\0" * 7, b"\xff" * 8, b"\xff\xff", b"\x00\x01\xff\xfe", b"\xff", b"\x80\x00" * 3],
)
def test_checksum_edge_cases(data: bytes) -> None:
    assert internet_checksum(data) == naive_checksum(data)
    for initial in (0, 1, 0xFFFF, 0x10000, 0x1FFFE):
        assert internet_checksum(data, initial) == naive_checksum(data, initial)


def test_checksum_of_data_with_checksum_is_zero() -> None:
    data = bytearray(random.Random(7).randbytes(300)) + b"\0\0"
    csum = internet_checksum(data)
    data[-2:] = csum.to_bytes(2, "big")
    assert internet_checksum(data) == 0


def _v4(l4: object, payload: bytes) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=HOST_MAC) / IP(src=GUEST_IP, dst="192.0.2.9")
                 / l4 / Raw(payload))


def _v6(l4: object, payload: bytes) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=HOST_MAC) / IPv6(src="fd00::15", dst="2001:db8::9")
                 / l4 / Raw(payload))


@needs_scapy
@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 17, 1000, 1461, 8999])
def test_complete_checksum_matches_scapy(proto: str, version: int, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    l4 = UDP(sport=5000, dport=53) if proto == "udp" else TCP(sport=40000, dport=80, seq=7)
    frame = bytearray(_v4(l4, payload) if version == 4 else _v6(l4, payload))
    start = 14 + (20 if version == 4 else 40)
    offset = 6 if proto == "udp" else 16
    expected = struct.unpack_from("!H", frame, start + offset)[0]
    length = len(frame) - start
    nr = 17 if proto == "udp" else 6
    # What a Linux driver hands over with VIRTIO_NET_HDR_F_NEEDS_CSUM: pseudo-header sum.
    if version == 4:
        partial = pseudo_v4(GUEST_IP, "192.0.2.9", nr, length)
    else:
        partial = pseudo_v6("fd00::15", "2001:db8::9", nr, length)
    struct.pack_into("!H", frame, start + offset, partial)
    mine = bytearray(frame)
    assert prepare_partial_checksum(mine) == (start, offset)
    assert mine == frame  # the module's pseudo-header sum agrees with the reference
    complete_checksum(frame, start, offset)
    assert struct.unpack_from("!H", frame, start + offset)[0] == expected
    assert verify_l4_checksums(bytes(frame)) is True
    # Ethernet padding (zeros) after the segment changes nothing.
    padded = bytearray(mine) + bytes(16)
    complete_checksum(padded, start, offset)
    assert padded[: len(frame)] == frame


@needs_scapy
def test_complete_checksum_udp_zero_becomes_ffff() -> None:
    frame = bytearray(_v4(UDP(sport=1, dport=2), b"\0\0" + b"abcdef"))
    start, offset = 34, 6
    # Choose the first payload word so that the full checksum computes to 0.
    c = struct.unpack_from("!H", frame, start + offset)[0]
    struct.pack_into("!H", frame, start + 8, c)
    struct.pack_into("!H", frame, start + offset, 0)
    assert internet_checksum(frame[start:], pseudo_v4(GUEST_IP, "192.0.2.9", 17, 16)) == 0
    prepare_partial_checksum(frame)
    complete_checksum(frame, start, offset)
    assert struct.unpack_from("!H", frame, start + offset)[0] == 0xFFFF
    assert verify_l4_checksums(bytes(frame)) is True


@pytest.mark.parametrize("start,offset", [(-1, 6), (10, -2), (50, 0), (40, 9), (0, 59)])
def test_complete_checksum_rejects_out_of_range(start: int, offset: int) -> None:
    frame = bytearray(50)
    with pytest.raises(ValueError):
        complete_checksum(frame, start, offset)
    assert frame == bytearray(50)
    complete_checksum(frame, 0, 48)  # last whole field is fine


@needs_scapy
def test_verify_l4_checksums() -> None:
    eth = Ether(src=GUEST_MAC, dst=HOST_MAC)  # explicit MACs: scapy does no ARP lookups
    good = [
        _v4(UDP(sport=1, dport=2), b"x" * 33),
        _v4(TCP(), b"y" * 100),
        _v4(ICMP(type=8, id=1, seq=2), b"z" * 56),
        _v6(UDP(), b"x" * 7),
        _v6(TCP(flags="S"), b""),
        bytes(eth / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6EchoRequest(data=b"hi")),
        bytes(eth / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop()
              / UDP(sport=9, dport=9) / Raw(b"hop")),
        bytes(eth / Dot1Q(vlan=5) / IP(src="1.2.3.4", dst="5.6.7.8") / UDP() / Raw(b"v")),
        _v4(UDP(), b"pad") + bytes(20),  # Ethernet padding is not part of the segment
    ]
    for frame in good:
        assert verify_l4_checksums(frame) is True, to_scapy(frame).summary()
        if frame is not good[-1]:  # its last byte is padding
            corrupt = bytearray(frame)
            corrupt[-1] ^= 0x40
            assert verify_l4_checksums(bytes(corrupt)) is False
    bad_ip = bytearray(_v4(UDP(), b"abc"))
    bad_ip[14 + 8] ^= 1  # TTL changed, header checksum not updated
    assert verify_l4_checksums(bytes(bad_ip)) is False
    no_csum = bytearray(_v4(UDP(), b"abc"))
    struct.pack_into("!H", no_csum, 34 + 6, 0)
    assert verify_l4_checksums(bytes(no_csum)) is True  # IPv4 UDP: 0 means "none"
    no_csum6 = bytearray(_v6(UDP(), b"abc"))
    struct.pack_into("!H", no_csum6, 54 + 6, 0)
    assert verify_l4_checksums(bytes(no_csum6)) is False  # mandatory over IPv6
    unknown = [
        bytes(eth / ARP()),
        bytes(eth / IP(proto=47) / Raw(b"gre")),
        bytes(eth / IP(flags="MF") / UDP() / Raw(b"frag")),
        bytes(eth / IPv6() / IPv6ExtHdrFragment() / UDP() / Raw(b"frag")),
        _v4(TCP(), b"q" * 40)[:-5],  # truncated
        b"",
        b"\xff" * 13,
    ]
    for frame in unknown:
        assert verify_l4_checksums(frame) is None


@needs_scapy
def test_prepare_partial_checksum_rejects_others() -> None:
    eth = Ether(src=GUEST_MAC, dst=HOST_MAC)
    for frame in (bytes(eth / ARP()), _v4(ICMP(), b"x"), b"\0" * 10):
        with pytest.raises(ValueError):
            prepare_partial_checksum(bytearray(frame))


# --------------------------------------------------------------------------- MACs


def test_mac_helpers() -> None:
    assert parse_mac("52:54:00:12:35:02") == bytes.fromhex("525400123502")
    assert parse_mac("52-54-00-AB-cd-02") == bytes.fromhex("525400abcd02")
    assert format_mac(bytes.fromhex("525400ABCD02")) == "52:54:00:ab:cd:02"
    for text in ("", "52:54:00:12:35", "52:54:00:12:35:02:01", "5:54:00:12:35:02",
                 "zz:54:00:12:35:02", "525400123502"):
        with pytest.raises(ValueError):
            parse_mac(text)
    with pytest.raises(ValueError):
        format_mac(b"\1\2")
    assert is_multicast(BROADCAST_MAC) and is_broadcast(BROADCAST_MAC)
    assert is_multicast(parse_mac("01:00:5e:00:00:01"))
    assert is_multicast(parse_mac("33:33:00:00:00:01"))
    assert not is_multicast(parse_mac(GUEST_MAC)) and not is_broadcast(parse_mac(GUEST_MAC))


def test_swap_macs() -> None:
    frame = bytes(range(6)) + bytes(range(10, 16)) + b"\x08\x00payload"
    swapped = swap_macs(frame)
    assert swapped == bytes(range(10, 16)) + bytes(range(6)) + b"\x08\x00payload"
    assert swap_macs(bytearray(swapped)) == frame
    assert swap_macs(memoryview(frame)) == swapped
    with pytest.raises(ValueError):
        swap_macs(b"\0" * 13)


# --------------------------------------------------------------------------- Responder


def arp_request(target: str = HOST_IP, sender: str = GUEST_IP) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=GUEST_MAC, psrc=sender, pdst=target))


def echo_request(size: int = 56, *, ident: int = 0x1234, seq: int = 3, dst: str = HOST_IP,
                 dst_mac: str = HOST_MAC) -> bytes:
    payload = random.Random(size).randbytes(size)
    return bytes(Ether(src=GUEST_MAC, dst=dst_mac) / IP(src=GUEST_IP, dst=dst, id=77)
                 / ICMP(type=8, id=ident, seq=seq) / Raw(payload))


def assert_checksums_like_scapy(pkt: object) -> None:
    """scapy recomputes every checksum when they are deleted; they must be unchanged."""
    rebuilt = pkt.copy()  # type: ignore[attr-defined]
    for layer in (IP, ICMP):
        if rebuilt.haslayer(layer):
            del rebuilt[layer].chksum
    assert bytes(Ether(bytes(rebuilt))) == bytes(pkt)  # type: ignore[call-overload]


@needs_scapy
def test_responder_answers_arp() -> None:
    r = Responder()
    replies = r.handle(arp_request())
    assert len(replies) == 1 and r.arp_replies_sent == 1
    pkt = Ether(replies[0])
    assert pkt.dst == GUEST_MAC and pkt.src == HOST_MAC and pkt.type == 0x0806
    arp = pkt[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (
        2, HOST_MAC, HOST_IP, GUEST_MAC, GUEST_IP)
    assert len(replies[0]) == 60  # padded to the Ethernet minimum
    assert r.neighbours == {GUEST_IP: parse_mac(GUEST_MAC)}
    # Who-has for someone else: no answer, but the asker is still learned.
    r2 = Responder()
    assert r2.handle(arp_request(target="10.0.2.3")) == []
    assert r2.neighbours == {GUEST_IP: parse_mac(GUEST_MAC)}
    # An ARP probe (sender 0.0.0.0) is answered without learning 0.0.0.0.
    r3 = Responder()
    assert len(r3.handle(arp_request(sender="0.0.0.0"))) == 1
    assert r3.neighbours == {}


@needs_scapy
@pytest.mark.parametrize("size", [0, 56, 1472, 8000])
def test_responder_answers_ping(size: int) -> None:
    r = Responder()
    request = echo_request(size)
    replies = r.handle(request)
    assert len(replies) == 1 and r.echo_replies_sent == 1
    pkt = Ether(replies[0])
    assert (pkt.src, pkt.dst) == (HOST_MAC, GUEST_MAC)
    assert (pkt[IP].src, pkt[IP].dst, pkt[IP].proto) == (HOST_IP, GUEST_IP, 1)
    assert pkt[IP].len == 28 + size
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, 0x1234, 3)
    assert bytes(icmp.payload)[:size] == bytes(Ether(request)[ICMP].payload)
    assert_checksums_like_scapy(pkt)
    assert verify_l4_checksums(replies[0]) is True
    assert r.neighbours[GUEST_IP] == parse_mac(GUEST_MAC)


@needs_scapy
def test_responder_ignores_ethernet_padding_and_bad_checksums() -> None:
    r = Responder()
    padded = echo_request(4) + bytes(20)  # 46 bytes of frame padded out, as on the wire
    (reply,) = r.handle(padded)
    assert Ether(reply)[IP].len == 32 and bytes(Ether(reply)[ICMP].payload)[:4] == (
        random.Random(4).randbytes(4))
    bad = bytearray(echo_request(100))
    bad[-1] ^= 0xFF
    assert r.handle(bytes(bad)) == [] and r.bad_checksums == 1
    bad_ip = bytearray(echo_request(100))
    bad_ip[14 + 8] ^= 1
    assert r.handle(bytes(bad_ip)) == [] and r.bad_checksums == 2
    # Not for us: another IP, another MAC, not an echo request.
    assert r.handle(echo_request(dst="10.0.2.3")) == []
    assert r.handle(echo_request(dst_mac="52:54:00:99:99:99")) == []
    udp = bytes(Ether(src=GUEST_MAC, dst=HOST_MAC) / IP(src=GUEST_IP, dst=HOST_IP) / UDP())
    assert r.handle(udp) == []
    assert r.echo_replies_sent == 1


@needs_scapy
def test_responder_records_echo_replies() -> None:
    seen: list[EchoReply] = []
    r = Responder(on_echo_reply=seen.append)
    reply = bytes(Ether(src=GUEST_MAC, dst=HOST_MAC) / IP(src=GUEST_IP, dst=HOST_IP)
                  / ICMP(type=0, id=0x7670, seq=9) / Raw(b"p" * 100))
    assert r.handle(reply) == []
    assert r.echo_replies == seen == [EchoReply(GUEST_IP, 0x7670, 9, 100)]
    assert r.echo_replies_received == 1


@needs_scapy
def test_ping_resolves_with_arp_then_pings() -> None:
    host = Responder()
    guest = Responder(GUEST_IP, GUEST_MAC)  # stands in for the guest's stack
    (who_has,) = host.ping(GUEST_IP, seq=1, payload_size=8000)
    arp = Ether(who_has)
    assert arp.dst == "ff:ff:ff:ff:ff:ff" and arp[ARP].op == 1
    assert (arp[ARP].pdst, arp[ARP].psrc, arp[ARP].hwsrc) == (GUEST_IP, HOST_IP, HOST_MAC)
    assert host.arp_requests_sent == 1 and host.echo_requests_sent == 0
    (is_at,) = guest.handle(who_has)
    (request,) = host.handle(is_at)  # the queued echo request goes out now
    assert host.neighbours[GUEST_IP] == parse_mac(GUEST_MAC) and host.echo_requests_sent == 1
    pkt = Ether(request)
    assert (pkt.dst, pkt[IP].dst, pkt[ICMP].type, pkt[ICMP].id, pkt[ICMP].seq) == (
        GUEST_MAC, GUEST_IP, 8, 0x7670, 1)
    assert len(pkt[ICMP].payload) == 8000
    assert_checksums_like_scapy(pkt)
    (echo_reply,) = guest.handle(request)
    assert host.handle(echo_reply) == []
    assert host.echo_replies == [EchoReply(GUEST_IP, 0x7670, 1, 8000)]
    # Resolved now: the next ping goes straight out.
    (second,) = host.ping(GUEST_IP, seq=2)
    assert Ether(second)[ICMP].seq == 2 and host.arp_requests_sent == 1
    assert host.handle(guest.handle(second)[0]) == [] and len(host.echo_replies) == 2
    # An explicit MAC skips resolution entirely.
    fresh = Responder()
    (direct,) = fresh.ping("10.0.2.99", dst_mac=parse_mac("52:54:00:00:00:99"))
    assert Ether(direct).dst == "52:54:00:00:00:99" and fresh.arp_requests_sent == 0


def test_ping_rejects_bad_arguments() -> None:
    r = Responder()
    with pytest.raises(ValueError):
        r.ping("10.0.2.300")
    with pytest.raises(ValueError):
        r.ping("10.0.2.15", payload_size=70000)
    with pytest.raises(ValueError):
        r.ping("10.0.2.15", ident=1 << 16, dst_mac=b"\2" * 6)
    with pytest.raises(ValueError):
        Responder(mac="01:00:5e:00:00:01")


def test_garbage_never_raises() -> None:
    rng = random.Random(1)
    host = Responder()
    guest = Responder(GUEST_IP, GUEST_MAC)
    (who_has,) = host.ping(GUEST_IP)
    (is_at,) = guest.handle(who_has)
    (request,) = host.handle(is_at)
    (reply,) = guest.handle(request)
    valid = [who_has, is_at, request, reply]
    r = Responder()
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:
            frame = rng.randbytes(rng.randrange(120))
        else:
            base = bytearray(rng.choice(valid))
            if kind == 1:
                base = base[: rng.randrange(len(base) + 1)]
            else:
                for _ in range(rng.randrange(1, 4)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
            frame = bytes(base)
        out = r.handle(frame)
        assert isinstance(out, list)
        assert verify_l4_checksums(frame) in (True, False, None)
    assert r.handle(b"") == [] and r.handle(b"\x08\x06" * 20) == []
    assert r.malformed > 0


# --------------------------------------------------------------------------- scapy bridges


@needs_scapy
def test_scapy_bridges() -> None:
    pkt = Ether(src=GUEST_MAC, dst=HOST_MAC) / IP(src=GUEST_IP, dst=HOST_IP) / UDP()
    raw = bytes(pkt)
    assert frame_bytes(pkt) == from_scapy(pkt) == raw
    assert frame_bytes(bytearray(raw)) == frame_bytes(memoryview(raw)) == frame_bytes(raw) == raw
    assert to_scapy(raw)[IP].dst == HOST_IP
    with pytest.raises(TypeError):
        frame_bytes(5)
