"""Ethernet frame helpers that sit behind a virtio-net port: checksums, MACs, a tiny host.

This module owns per-frame packet work that does not depend on any transport: the RFC 1071
Internet checksum, virtio-net's VIRTIO_NET_HDR_F_NEEDS_CSUM completion (virtio 1.2, 5.1.6.2),
checksum verification for tests, MAC address helpers and `Responder`, a minimal IPv4 host
(ARP + ICMP echo) for wiring a guest to something that answers.

Frames are plain Ethernet frames (destination MAC, source MAC, EtherType, payload) without
FCS and without `virtio_net_hdr`. Every parser here treats its input as hostile: a truncated
or garbage frame is ignored (or rejected with ValueError where documented), never a crash.

It must never import transports, devices or anything outside the standard library; scapy is
only imported lazily by `to_scapy` for tests and tools.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BROADCAST_MAC",
    "ETH_HLEN",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "ETH_ZLEN",
    "EchoReply",
    "Responder",
    "complete_checksum",
    "ethertype",
    "format_mac",
    "frame_bytes",
    "from_scapy",
    "internet_checksum",
    "is_broadcast",
    "is_multicast",
    "ones_complement_sum",
    "parse_mac",
    "prepare_partial_checksum",
    "rarp_announcement",
    "swap_macs",
    "to_scapy",
    "verify_l4_checksums",
]

Buffer = bytes | bytearray | memoryview

# Ethernet (IEEE 802.3) sizes and EtherTypes, as in <linux/if_ether.h>.
ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame length without FCS; shorter frames are padded on the wire
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_IPV6 = 0x86DD
ETH_P_RARP = 0x8035
BROADCAST_MAC = b"\xff" * ETH_ALEN

# IP protocol numbers (IANA).
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

# ARP (RFC 826) and ICMP (RFC 792) constants.
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ICMP_ECHOREPLY = 0
ICMP_ECHO = 8

#: Offset of the checksum field inside each checkable L4 header.
_CSUM_FIELD = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}
_L4_MIN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 8}

_H = struct.Struct("!H")
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # after the Ethernet header; 28 bytes
_IPV4 = struct.Struct("!BBHHHBBH4s4s")  # 20 bytes without options
_IPV6 = struct.Struct("!IHBB16s16s")  # 40 bytes
_ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


# --------------------------------------------------------------------------- checksums


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """The RFC 1071 ones'-complement sum of `data` as 16-bit big-endian words, folded.

    An odd trailing byte is padded with a zero byte. `initial` is any non-negative partial
    sum to add (folded or not), e.g. a pseudo-header sum. The result is in 0..0xFFFF and is
    0 only when `data` and `initial` are all zero ("negative zero" 0xFFFF otherwise).
    """
    # Sum without a per-word loop: as one little-endian integer, data is sum(b[i] * 256**i)
    # and 256**2 == 1 (mod 0xFFFF), so modulo 0xFFFF it is the ones'-complement sum of the
    # byte-swapped words. Multiplying by 256 swaps the bytes of a 16-bit residue back.
    n = int.from_bytes(data, "little")
    total = (n % 0xFFFF) * 256 + initial
    s = total % 0xFFFF
    if s == 0 and (n or initial):
        return 0xFFFF  # end-around-carry arithmetic never yields +0 from non-zero input
    return s


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of `data`: the complement of its ones'-complement sum.

    The value is ready to store big-endian in an IPv4/ICMP/TCP/UDP checksum field (zeroed
    while computing). Over data that already holds a correct checksum it returns 0.
    `initial` is a partial sum to include (e.g. the pseudo-header sum).
    """
    return ~ones_complement_sum(data, initial) & 0xFFFF


def complete_checksum(frame: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum the way a device honouring VIRTIO_NET_HDR_F_NEEDS_CSUM must.

    The driver already stored the pseudo-header sum in the 16-bit field at
    `csum_start + csum_offset` (as Linux does for CHECKSUM_PARTIAL). This sums
    `frame[csum_start:]` (field included), and stores the complement there, big-endian.
    A computed 0 is stored as 0xFFFF (Linux `skb_checksum_help`): equal in ones'-complement
    arithmetic for TCP and ICMP, and required for UDP where 0 means "no checksum".
    Raises ValueError when the offsets do not leave a whole field inside the frame.
    """
    field = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or field + 2 > len(frame):
        raise ValueError(
            f"csum_start {csum_start} + csum_offset {csum_offset} outside a "
            f"{len(frame)}-byte frame"
        )
    csum = internet_checksum(memoryview(frame)[csum_start:]) or 0xFFFF
    _H.pack_into(frame, field, csum)


def ethertype(frame: Buffer) -> tuple[int, int]:
    """(EtherType, L3 offset) skipping up to two 802.1Q/802.1ad tags; (-1, 0) if short."""
    if len(frame) < ETH_HLEN:
        return -1, 0
    off = 12
    etype = _H.unpack_from(frame, off)[0]
    for _ in range(2):
        if etype not in (ETH_P_8021Q, ETH_P_8021AD) or len(frame) < off + 8:
            break
        off += 4
        etype = _H.unpack_from(frame, off)[0]
    if etype in (ETH_P_8021Q, ETH_P_8021AD):
        return -1, 0
    return etype, off + 2


@dataclass(frozen=True, slots=True)
class _L4:
    """Where a frame's transport segment is, and what its checksum covers."""

    l4: int  # offset of the L4 header in the frame
    end: int  # end of the L3 payload (Ethernet padding excluded)
    proto: int
    pseudo: int  # unfolded pseudo-header sum (0 for ICMPv4, which has none)
    ip_ok: bool  # IPv4 header checksum valid (always True for IPv6)
    fragment: bool
    v4: bool


def _locate_l4(frame: Buffer) -> _L4 | None:
    """Parse Ethernet + IPv4/IPv6 far enough to find the L4 segment; None if impossible."""
    etype, off = ethertype(frame)
    size = len(frame)
    if etype == ETH_P_IP:
        if size < off + 20:
            return None
        vihl, _tos, total, _id, frag, _ttl, proto, _cs, src, dst = _IPV4.unpack_from(frame, off)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or total < ihl or off + total > size:
            return None
        ip_ok = ones_complement_sum(memoryview(frame)[off:off + ihl]) == 0xFFFF
        pseudo = ones_complement_sum(src + dst, proto + total - ihl)
        return _L4(off + ihl, off + total, proto, pseudo, ip_ok, bool(frag & 0x3FFF), True)
    if etype == ETH_P_IPV6:
        if size < off + 40:
            return None
        vtcfl, plen, nh, _hlim, src, dst = _IPV6.unpack_from(frame, off)
        end = off + 40 + plen
        if vtcfl >> 28 != 6 or plen == 0 or end > size:
            return None
        p = off + 40
        # Hop-by-hop and destination options do not change the pseudo-header; a routing
        # header would (final destination), so it is left uncheckable like fragments.
        while nh in (0, 60):
            if p + 8 > end:
                return None
            nh, hlen = frame[p], (frame[p + 1] + 1) * 8
            p += hlen
        if p > end:
            return None
        pseudo = ones_complement_sum(src + dst, (end - p) + nh)
        return _L4(p, end, nh, pseudo, True, nh == 44, False)
    return None


def verify_l4_checksums(frame: Buffer) -> bool | None:
    """Check the IPv4 header checksum and the TCP/UDP/ICMP/ICMPv6 checksum of `frame`.

    Returns True when every checksum present is valid, False when one is wrong (an IPv4
    header checksum, or an L4 checksum; UDP over IPv6 with checksum 0 is wrong, over IPv4 it
    means "none" and is valid), and None when there is nothing to check: not IPv4/IPv6,
    truncated, fragmented, or another L4 protocol with a valid IPv4 header. Never raises
    on garbage.
    """
    info = _locate_l4(frame)
    if info is None:
        return None
    if not info.ip_ok:
        return False
    proto = info.proto
    if (
        info.fragment
        or proto not in _CSUM_FIELD
        or proto == (IPPROTO_ICMPV6 if info.v4 else IPPROTO_ICMP)
        or info.end - info.l4 < _L4_MIN[proto]
    ):
        return None
    if proto == IPPROTO_UDP and _H.unpack_from(frame, info.l4 + 6)[0] == 0:
        return info.v4
    pseudo = 0 if proto == IPPROTO_ICMP else info.pseudo
    return ones_complement_sum(memoryview(frame)[info.l4:info.end], pseudo) == 0xFFFF


def prepare_partial_checksum(frame: bytearray | memoryview) -> tuple[int, int]:
    """Do what a Linux driver does before setting VIRTIO_NET_HDR_F_NEEDS_CSUM.

    For an unfragmented TCP or UDP segment over IPv4/IPv6, store the folded pseudo-header
    sum in the L4 checksum field and return `(csum_start, csum_offset)` for the
    `virtio_net_hdr`. `complete_checksum(frame, *result)` then yields the full checksum.
    Raises ValueError for any other frame.
    """
    info = _locate_l4(frame)
    if (
        info is None
        or info.fragment
        or info.proto not in (IPPROTO_TCP, IPPROTO_UDP)
        or info.end - info.l4 < _L4_MIN[info.proto]
    ):
        raise ValueError("not an unfragmented TCP/UDP segment over IPv4 or IPv6")
    offset = _CSUM_FIELD[info.proto]
    _H.pack_into(frame, info.l4 + offset, ones_complement_sum(b"", info.pseudo))
    return info.l4, offset


# --------------------------------------------------------------------------- MACs


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:35:02' (or with '-') -> 6 bytes. Raises ValueError on anything else."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or any(len(p) != 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes.fromhex("".join(parts))
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


def format_mac(mac: Buffer) -> str:
    """6 bytes -> 'xx:xx:xx:xx:xx:xx' (lower case)."""
    if len(mac) != ETH_ALEN:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return bytes(mac).hex(":")


def rarp_announcement(mac: Buffer) -> bytes:
    """The broadcast RARP "request reverse" (RFC 903) a host sends after it moved, so
    that switches learn where `mac` is now (what QEMU's announce-self sends): sender and
    target hardware address `mac`, protocol addresses zero, padded to ETH_ZLEN."""
    mac = bytes(mac)
    if len(mac) != ETH_ALEN:
        raise ValueError(f"a MAC address is {ETH_ALEN} bytes, not {len(mac)}")
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, ETH_ALEN, 4, 3) + mac + bytes(4) + mac + bytes(4)
    frame = b"\xff" * ETH_ALEN + mac + struct.pack("!H", ETH_P_RARP) + arp
    return frame.ljust(ETH_ZLEN, b"\0")


def is_multicast(mac: Buffer) -> bool:
    """True for group addresses (I/G bit set), broadcast included."""
    return bool(mac[0] & 1)


def is_broadcast(mac: Buffer) -> bool:
    """True for ff:ff:ff:ff:ff:ff."""
    return bytes(mac[:ETH_ALEN]) == BROADCAST_MAC


def swap_macs(frame: Buffer) -> bytes:
    """Reflect a frame: the same frame with destination and source MACs exchanged.

    Raises ValueError for frames shorter than an Ethernet header.
    """
    if len(frame) < ETH_HLEN:
        raise ValueError(f"{len(frame)}-byte frame is shorter than an Ethernet header")
    mv = memoryview(frame)
    return b"".join((mv[6:12], mv[0:6], mv[12:]))


# --------------------------------------------------------------------------- Responder


@dataclass(frozen=True, slots=True)
class EchoReply:
    """An ICMP echo reply that reached a `Responder`."""

    src_ip: str
    ident: int
    seq: int
    payload_len: int


def _ipv4_addr(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _unicast_ipv4(addr: bytes) -> bool:
    first = addr[0]
    return addr != b"\0\0\0\0" and first < 224 and addr != b"\xff\xff\xff\xff"


class Responder:
    """A tiny IPv4 host on the wire: answers ARP and ping, can ping, remembers neighbours.

    Feed it every frame it would receive with `handle()`; send what `handle()` and
    `ping()` return. It answers ARP who-has for `ip`, ICMP echo requests to `ip`
    (reply with the same identifier, sequence and payload), records ICMP echo replies to
    `ip` in `echo_replies` (and calls `on_echo_reply`), and learns IP -> MAC bindings from
    ARP and from the source of IPv4 frames into `neighbours`. Frames it does not handle,
    truncated or malformed frames, and ICMP with bad checksums give [] and are counted;
    `handle()` never raises on input. VLAN-tagged frames and IP fragments are ignored.
    """

    #: Echo requests kept per unresolved destination while waiting for its ARP reply.
    MAX_PENDING = 64

    def __init__(
        self,
        ip: str = "10.0.2.2",
        mac: str = "52:54:00:12:35:02",
        *,
        on_echo_reply: Callable[[EchoReply], None] | None = None,
    ) -> None:
        self.ip = ip
        self.ip_bytes = _ipv4_addr(ip)
        self.mac = parse_mac(mac)
        if is_multicast(self.mac):
            raise ValueError(f"responder MAC {mac} is a multicast address")
        self.on_echo_reply = on_echo_reply
        self.neighbours: dict[str, bytes] = {}
        self.echo_replies: list[EchoReply] = []
        #: IPv4 packets (no Ethernet header) waiting for the destination's MAC.
        self.pending: dict[str, list[bytes]] = {}
        self._ip_id = 0
        self.arp_requests_sent = 0
        self.arp_replies_sent = 0
        self.echo_requests_sent = 0
        self.echo_replies_sent = 0
        self.echo_replies_received = 0
        self.ignored = 0
        self.malformed = 0
        self.bad_checksums = 0
        self.pending_dropped = 0

    def counters(self) -> dict[str, int]:
        """All counters by name."""
        names = ("arp_requests_sent", "arp_replies_sent", "echo_requests_sent",
                 "echo_replies_sent", "echo_replies_received", "ignored", "malformed",
                 "bad_checksums", "pending_dropped")
        return {n: getattr(self, n) for n in names}

    # ------------------------------------------------------------------ receive

    def handle(self, frame: Buffer) -> list[bytes]:
        """Process one received frame; return the frames to send in answer (maybe none)."""
        if len(frame) < ETH_HLEN:
            self.malformed += 1
            return []
        dst, src, etype = _ETH.unpack_from(frame, 0)
        if etype == ETH_P_ARP:
            return self._handle_arp(frame)
        if etype == ETH_P_IP:
            return self._handle_ipv4(frame, dst, src)
        self.ignored += 1
        return []

    def _handle_arp(self, frame: Buffer) -> list[bytes]:
        if len(frame) < ETH_HLEN + _ARP.size:
            self.malformed += 1
            return []
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = _ARP.unpack_from(frame, ETH_HLEN)
        if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4) or is_multicast(sha):
            self.malformed += 1
            return []
        out: list[bytes] = []
        if _unicast_ipv4(spa) and spa != self.ip_bytes:
            out = self._learn(spa, sha)  # ARP probes (spa 0.0.0.0) teach nothing
        if op == ARPOP_REQUEST and tpa == self.ip_bytes and spa != self.ip_bytes:
            reply = _ARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REPLY,
                              self.mac, self.ip_bytes, sha, spa)
            out.append(self._eth(sha, ETH_P_ARP, reply))
            self.arp_replies_sent += 1
        elif op not in (ARPOP_REQUEST, ARPOP_REPLY):
            self.ignored += 1
        return out

    def _handle_ipv4(self, frame: Buffer, dst: bytes, src: bytes) -> list[bytes]:
        size = len(frame)
        if size < ETH_HLEN + 20:
            self.malformed += 1
            return []
        vihl, tos, total, _id, frag, _ttl, proto, _cs, sip, dip = _IPV4.unpack_from(
            frame, ETH_HLEN)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or total < ihl or ETH_HLEN + total > size:
            self.malformed += 1
            return []
        if ones_complement_sum(memoryview(frame)[ETH_HLEN:ETH_HLEN + ihl]) != 0xFFFF:
            self.bad_checksums += 1
            return []
        out: list[bytes] = []
        if not is_multicast(src) and _unicast_ipv4(sip) and sip != self.ip_bytes:
            out = self._learn(sip, src)
        if dip != self.ip_bytes or dst != self.mac or proto != IPPROTO_ICMP or frag & 0x3FFF:
            if not out:
                self.ignored += 1
            return out
        l4 = ETH_HLEN + ihl
        end = ETH_HLEN + total  # excludes Ethernet padding
        if end - l4 < _ICMP_ECHO.size:
            self.malformed += 1
            return out
        icmp = memoryview(frame)[l4:end]
        if ones_complement_sum(icmp) != 0xFFFF:
            self.bad_checksums += 1
            return out
        itype, code, _csum, ident, seq = _ICMP_ECHO.unpack_from(icmp, 0)
        if itype == ICMP_ECHO and code == 0 and _unicast_ipv4(sip):
            payload = icmp[_ICMP_ECHO.size:]
            out.append(self._eth(src, ETH_P_IP, *self._echo(ICMP_ECHOREPLY, sip, ident, seq,
                                                             payload, tos=tos)))
            self.echo_replies_sent += 1
        elif itype == ICMP_ECHOREPLY and code == 0:
            reply = EchoReply(socket.inet_ntoa(sip), ident, seq, len(icmp) - _ICMP_ECHO.size)
            self.echo_replies.append(reply)
            self.echo_replies_received += 1
            if self.on_echo_reply is not None:
                self.on_echo_reply(reply)
        else:
            self.ignored += 1
        return out

    def _learn(self, ip: bytes, mac: bytes) -> list[bytes]:
        """Record ip -> mac; return the queued packets for ip, now addressed to mac."""
        key = socket.inet_ntoa(ip)
        self.neighbours[key] = mac
        queued = self.pending.pop(key, None)
        if not queued:
            return []
        head = mac + self.mac + _H.pack(ETH_P_IP)
        self.echo_requests_sent += len(queued)
        return [head + packet for packet in queued]

    # ------------------------------------------------------------------ transmit

    def ping(
        self,
        dst_ip: str,
        *,
        ident: int = 0x7670,
        seq: int = 1,
        payload_size: int = 56,
        dst_mac: bytes | None = None,
    ) -> list[bytes]:
        """Frames that ping `dst_ip` once: the echo request, or an ARP request first.

        With `dst_mac` given or `dst_ip` in `neighbours`, returns [echo request]. Otherwise
        returns [ARP who-has dst_ip] and queues the echo request; the `handle()` call that
        sees the ARP answer (or any frame teaching that binding) returns it. The payload
        is a fixed byte pattern of `payload_size` bytes (IPv4 only, never fragmented).
        """
        dip = _ipv4_addr(dst_ip)
        if not 0 <= payload_size <= 0xFFFF - 20 - _ICMP_ECHO.size:
            raise ValueError(f"ICMP payload of {payload_size} bytes does not fit in IPv4")
        if not (0 <= ident <= 0xFFFF and 0 <= seq <= 0xFFFF):
            raise ValueError("ICMP identifier and sequence are 16-bit values")
        payload = (_PATTERN * (payload_size // len(_PATTERN) + 1))[:payload_size]
        ip_hdr, icmp_hdr, data = self._echo(ICMP_ECHO, dip, ident, seq, payload, df=True)
        mac = dst_mac if dst_mac is not None else self.neighbours.get(socket.inet_ntoa(dip))
        if mac is not None:
            if len(mac) != ETH_ALEN:
                raise ValueError("dst_mac must be 6 bytes")
            self.echo_requests_sent += 1
            return [self._eth(bytes(mac), ETH_P_IP, ip_hdr, icmp_hdr, data)]
        queue = self.pending.setdefault(socket.inet_ntoa(dip), [])
        if len(queue) >= self.MAX_PENDING:
            del queue[0]
            self.pending_dropped += 1
        queue.append(b"".join((ip_hdr, icmp_hdr, data)))
        return [self.arp_request(socket.inet_ntoa(dip))]

    def arp_request(self, target_ip: str) -> bytes:
        """A broadcast ARP who-has `target_ip` tell `self.ip` (counted as sent)."""
        arp = _ARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, self.mac, self.ip_bytes,
                        bytes(ETH_ALEN), _ipv4_addr(target_ip))
        self.arp_requests_sent += 1
        return self._eth(BROADCAST_MAC, ETH_P_ARP, arp)

    def _echo(self, itype: int, dip: bytes, ident: int, seq: int, payload: Buffer, *,
              tos: int = 0, df: bool = False) -> tuple[bytes, bytes, Buffer]:
        """(IPv4 header, ICMP header, payload) of an echo request/reply, checksums set."""
        # The payload starts at an even offset, so its words can be summed on their own.
        csum = internet_checksum(payload, (itype << 8) + ident + seq)
        icmp_hdr = _ICMP_ECHO.pack(itype, 0, csum, ident, seq)
        return self._ipv4_header(dip, IPPROTO_ICMP, len(icmp_hdr) + len(payload), tos=tos,
                                 df=df), icmp_hdr, payload

    def _ipv4_header(self, dip: bytes, proto: int, payload_len: int, *, tos: int = 0,
                     df: bool = False) -> bytes:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        hdr = bytearray(_IPV4.pack(0x45, tos, 20 + payload_len, self._ip_id,
                                   0x4000 if df else 0, 64, proto, 0, self.ip_bytes, dip))
        _H.pack_into(hdr, 10, internet_checksum(hdr))
        return bytes(hdr)

    def _eth(self, dst: bytes, etype: int, *parts: Buffer) -> bytes:
        """An Ethernet frame from us, padded to the 60-byte minimum like a real NIC."""
        frame = b"".join((dst, self.mac, _H.pack(etype), *parts))
        if len(frame) < ETH_ZLEN:
            frame += bytes(ETH_ZLEN - len(frame))
        return frame


_PATTERN = bytes(range(256))


# --------------------------------------------------------------------------- scapy bridges


def to_scapy(frame: Buffer) -> Any:
    """Decode `frame` as a scapy `Ether` packet (needs scapy; imported only here)."""
    try:
        from scapy.layers.l2 import Ether
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("vhostpy.packets.to_scapy needs scapy: pip install scapy") from e
    return Ether(bytes(frame))


def frame_bytes(obj: Any) -> bytes:
    """bytes of a frame given as bytes, bytearray, memoryview or a scapy Packet."""
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if hasattr(obj, "build") and hasattr(obj, "__bytes__"):  # a scapy Packet, no import needed
        return bytes(obj)
    raise TypeError(f"cannot make frame bytes from {type(obj).__name__}")


def from_scapy(pkt: Any) -> bytes:
    """The wire bytes of a scapy packet (same as `frame_bytes`)."""
    return frame_bytes(pkt)
