"""Frame filters: a small tcpdump-like expression language, compiled to a frame predicate.

`compile_filter("udp and port 69")` returns a `FrameFilter`; calling it with an Ethernet
frame (bytes without FCS or virtio_net_hdr) says whether the frame matches. The filter is
evaluated on `Headers`, what `parse_headers` finds in a frame (`netfaults` also uses it to
find where a frame's payload starts). The language is a subset of pcap-filter(7):

    expr      := term { ("or" | "||") term }
    term      := factor { ("and" | "&&") factor }
    factor    := ("not" | "!") factor | "(" expr ")" | primitive
    primitive := ip | ip6 | arp | tcp | udp | icmp | icmp6 | vlan | broadcast | multicast
               | [src | dst] host ADDR        an IPv4 or IPv6 address: the IP source or
                                              destination; for IPv4 also an ARP sender/target
               | [src | dst] net ADDR/LEN     the same, for a network (CIDR)
               | [tcp | udp] [src | dst] port N
               | [tcp | udp] [src | dst] portrange A-B
               | ether [src | dst] host MAC   the Ethernet source or destination
               | proto N                      the IP protocol (IPv6: after extension headers)
               | less N | greater N           frame length <= N, >= N bytes

`and` binds tighter than `or`, as in tcpdump; words are case-insensitive. Unlike tcpdump,
a qualifier is never carried over to the next primitive (`host A or B` is an error: write
`host A or host B`). VLAN tags (802.1Q, 802.1ad, up to two) are looked through: `ip`
matches tagged IPv4 too, `vlan` matches tagged frames. `port` matches TCP and UDP only, and
never a fragment other than the first (it has no ports). The language has no commas, so
a filter fits in a comma-separated fault spec. A bad expression raises ConfigurationError
saying what is wrong and where; evaluating never raises, whatever the frame holds.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vhostpy.errors import ConfigurationError
from vhostpy.packets import (
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ethertype,
    parse_mac,
)

__all__ = ["FrameFilter", "Headers", "compile_filter", "parse_headers"]

_H = struct.Struct("!H")
#: IPv6 extension headers walked past to find the transport header (RFC 8200 4.1): hop-by-hop,
#: routing, destination options ((len + 1) * 8 bytes each) and fragment (8 bytes).
_IPV6_EXT = (0, 43, 60)
_IPV6_FRAGMENT = 44
#: Bytes of the transport header `parse_headers` counts as header (TCP: its data offset).
_L4_HEADER = {IPPROTO_UDP: 8, IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 8}
_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}


@dataclass(slots=True)
class Headers:
    """What `parse_headers` found in a frame. Offsets are into the frame; fields a frame
    does not have (or that were cut off) are None."""

    length: int
    dst_mac: bytes = b""
    src_mac: bytes = b""
    vlan: bool = False
    etype: int = -1
    #: IP source/destination (4 or 16 bytes); for ARP over IPv4, sender/target address.
    src_ip: bytes | None = None
    dst_ip: bytes | None = None
    proto: int | None = None   # IP protocol / IPv6 next header after extension headers
    sport: int | None = None
    dport: int | None = None
    #: First byte past every header found (Ethernet, VLAN, IP, TCP/UDP/ICMP), and the end of
    #: the packet (the IP length: Ethernet padding excluded; the frame's end for non-IP).
    payload: int = 0
    end: int = 0
    #: Offset of the TCP/UDP/ICMP/ICMPv6 checksum field when the header holding it is whole.
    csum: int | None = None


def parse_headers(frame: bytes) -> Headers:
    """The headers of `frame` as far as they are whole; never raises."""
    size = len(frame)
    h = Headers(size, payload=size, end=size)
    if size < ETH_HLEN:
        return h
    h.dst_mac, h.src_mac = frame[0:6], frame[6:12]
    etype, off = ethertype(frame)
    h.etype, h.vlan = etype, off > ETH_HLEN
    h.payload = off
    if etype == ETH_P_IP:
        _ipv4(frame, off, h)
    elif etype == ETH_P_IPV6:
        _ipv6(frame, off, h)
    elif etype == ETH_P_ARP and size >= off + 28 and frame[off + 4] == 6 and \
            frame[off + 5] == 4:   # Ethernet/IPv4 ARP: sender and target protocol addresses
        h.src_ip, h.dst_ip = frame[off + 14:off + 18], frame[off + 24:off + 28]
    return h


def _ipv4(frame: bytes, off: int, h: Headers) -> None:
    if len(frame) < off + 20 or frame[off] >> 4 != 4:
        return
    ihl = (frame[off] & 0x0F) * 4
    total = _H.unpack_from(frame, off + 2)[0]
    if ihl < 20 or total < ihl or len(frame) < off + ihl:
        return
    h.src_ip, h.dst_ip = frame[off + 12:off + 16], frame[off + 16:off + 20]
    h.proto = frame[off + 9]
    h.end = min(off + total, len(frame))
    h.payload = off + ihl
    if _H.unpack_from(frame, off + 6)[0] & 0x1FFF == 0:   # the first (or only) fragment
        _transport(frame, off + ihl, h)


def _ipv6(frame: bytes, off: int, h: Headers) -> None:
    if len(frame) < off + 40 or frame[off] >> 4 != 6:
        return
    h.src_ip, h.dst_ip = frame[off + 8:off + 24], frame[off + 24:off + 40]
    h.end = min(off + 40 + _H.unpack_from(frame, off + 4)[0], len(frame))
    nh, p = frame[off + 6], off + 40
    first = True
    while nh in _IPV6_EXT or nh == _IPV6_FRAGMENT:
        if p + 8 > h.end:
            h.payload = h.end
            return
        if nh == _IPV6_FRAGMENT:
            first = _H.unpack_from(frame, p + 2)[0] & 0xFFF8 == 0
            nh, p = frame[p], p + 8
        else:
            nh, p = frame[p], p + (frame[p + 1] + 1) * 8
    h.proto = nh
    h.payload = min(p, h.end)
    if first and p <= h.end:
        _transport(frame, p, h)


def _transport(frame: bytes, l4: int, h: Headers) -> None:
    """TCP/UDP ports, and where the payload and the checksum field are."""
    proto, end = h.proto, h.end
    if proto == IPPROTO_TCP:
        if end < l4 + 20:
            return
        hlen = (frame[l4 + 12] >> 4) * 4
        if hlen < 20 or end < l4 + hlen:
            return
    elif proto in _L4_HEADER:
        hlen = _L4_HEADER[proto]
        if end < l4 + hlen:
            return
    else:
        return
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        h.sport, h.dport = _H.unpack_from(frame, l4)[0], _H.unpack_from(frame, l4 + 2)[0]
    h.payload = l4 + hlen
    h.csum = l4 + _CSUM_AT[proto]


# --------------------------------------------------------------------------- the language

Predicate = Callable[[Headers], bool]
T = TypeVar("T")
_TOKEN = re.compile(r"\s*(?:(\(|\)|&&|\|\||!)|([^\s()!&|]+)|(\S))")
_PROTOCOLS: dict[str, Predicate] = {
    "ip": lambda h: h.etype == ETH_P_IP,
    "ip6": lambda h: h.etype == ETH_P_IPV6,
    "arp": lambda h: h.etype == ETH_P_ARP,
    "tcp": lambda h: h.proto == IPPROTO_TCP,
    "udp": lambda h: h.proto == IPPROTO_UDP,
    "icmp": lambda h: h.proto == IPPROTO_ICMP and h.etype == ETH_P_IP,
    "icmp6": lambda h: h.proto == IPPROTO_ICMPV6 and h.etype == ETH_P_IPV6,
    "vlan": lambda h: h.vlan,
    "broadcast": lambda h: h.dst_mac == b"\xff" * 6,
    "multicast": lambda h: bool(h.dst_mac) and bool(h.dst_mac[0] & 1),
}
_KEYWORDS = {"and", "or", "not", "src", "dst", "host", "net", "port", "portrange", "ether",
             "proto", "less", "greater", *_PROTOCOLS}


class FrameFilter:
    """A compiled filter: `filter(frame)` -> bool; `text` is the expression, normalised."""

    def __init__(self, text: str, predicate: Predicate) -> None:
        self.text = text
        self.predicate = predicate

    def __call__(self, frame: bytes) -> bool:
        return self.predicate(parse_headers(frame))

    def matches(self, headers: Headers) -> bool:
        """The filter on headers already parsed (`parse_headers`)."""
        return self.predicate(headers)

    def __repr__(self) -> str:
        return f"FrameFilter({self.text!r})"


def compile_filter(text: str) -> FrameFilter:
    """`text` (see the module docstring) compiled; ConfigurationError when it is not one."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens)
    predicate = parser.expr()
    if parser.pos < len(tokens):
        parser.fail(f"unexpected {tokens[parser.pos]!r}")
    return FrameFilter(" ".join(text.split()), predicate)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        op, word, bad = match.groups()
        if bad is not None:
            raise ConfigurationError(f"filter {text!r}: {bad!r} is not an operator "
                                     "(and, or, not, &&, ||, !)")
        if op is not None or word is not None:
            tokens.append(op if op is not None else word.lower())
    if not tokens:
        raise ConfigurationError(f"filter {text!r}: empty")
    return tokens


class _Parser:
    """Recursive descent over the tokens, building closures (see the grammar)."""

    def __init__(self, text: str, tokens: list[str]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0

    def fail(self, what: str) -> None:
        raise ConfigurationError(f"filter {self.text!r}: {what}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, what: str) -> str:
        token = self.peek()
        if token is None:
            self.fail(f"{what} expected at the end")
        self.pos += 1
        return token   # type: ignore[return-value]

    def expr(self) -> Predicate:
        parts = [self.term()]
        while self.peek() in ("or", "||"):
            self.pos += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else (lambda h: any(p(h) for p in parts))

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self.peek() in ("and", "&&"):
            self.pos += 1
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else (lambda h: all(p(h) for p in parts))

    def factor(self) -> Predicate:
        token = self.take("a primitive")
        if token in ("not", "!"):
            inner = self.factor()
            return lambda h: not inner(h)
        if token == "(":
            inner = self.expr()
            if self.take("')'") != ")":
                self.fail(f"')' expected before {self.tokens[self.pos - 1]!r}")
            return inner
        return self.primitive(token)

    def primitive(self, token: str) -> Predicate:
        if token == "ether":
            side = self._side()
            if self.take("'host'") != "host":
                self.fail("'ether' is followed by [src|dst] host MAC")
            mac = self._value("a MAC address", _mac)
            return _either(side, lambda h: h.src_mac == mac, lambda h: h.dst_mac == mac)
        if token in ("tcp", "udp") and self.peek() in ("src", "dst", "port", "portrange"):
            proto = IPPROTO_TCP if token == "tcp" else IPPROTO_UDP
            side = self._side()
            kind = self.take("port or portrange")
            if kind not in ("port", "portrange"):
                self.fail(f"{token} [src|dst] is followed by port or portrange, not {kind!r}")
            ports = self._ports(side, kind)
            return lambda h: h.proto == proto and ports(h)
        if token in _PROTOCOLS:
            return _PROTOCOLS[token]
        if token in ("less", "greater"):
            n = self._value("a length", _uint)
            return (lambda h: h.length <= n) if token == "less" else (lambda h: h.length >= n)
        if token == "proto":
            number = self._value("a protocol number", _uint)
            if number > 255:
                self.fail(f"proto {number}: at most 255")
            return lambda h: h.proto == number
        side = None
        if token in ("src", "dst"):
            side, token = token, self.take("host, net, port or portrange")
        if token == "host":
            addr = self._value("an IPv4 or IPv6 address", _address)
            return _either(side, lambda h: h.src_ip == addr, lambda h: h.dst_ip == addr)
        if token == "net":
            net = self._value("a network ADDR/LEN", _network)
            return _either(side, lambda h: _in(h.src_ip, net), lambda h: _in(h.dst_ip, net))
        if token in ("port", "portrange"):
            return self._ports(side, token)
        if side is not None:
            self.fail(f"{side} must be followed by host, net, port or portrange, not {token!r}")
        if token in (")", "and", "or", "&&", "||"):
            self.fail(f"a primitive expected before {token!r}")
        self.fail(f"unknown primitive {token!r}")
        raise AssertionError   # not reached: fail raised

    def _ports(self, side: str | None, kind: str) -> Predicate:
        low, high = self._value("a port" if kind == "port" else "a range A-B",
                                _port if kind == "port" else _portrange)
        return _either(side, lambda h: h.sport is not None and low <= h.sport <= high,
                       lambda h: h.dport is not None and low <= h.dport <= high)

    def _side(self) -> str | None:
        if self.peek() in ("src", "dst"):
            return self.take("src or dst")
        return None

    def _value(self, what: str, convert: Callable[[str], T]) -> T:
        word = self.take(what)
        if word in _KEYWORDS or word in ("(", ")", "!", "&&", "||"):
            self.fail(f"{what} expected, not {word!r}")
        try:
            return convert(word)
        except ValueError as exc:
            self.fail(f"{word!r} is not {what}{f' ({exc})' if str(exc) else ''}")
        raise AssertionError   # not reached


def _either(side: str | None, src: Predicate, dst: Predicate) -> Predicate:
    if side == "src":
        return src
    if side == "dst":
        return dst
    return lambda h: src(h) or dst(h)


def _in(addr: bytes | None, net: tuple[int, int, int]) -> bool:
    """Whether `addr` (4 or 16 bytes) is in `net` (address bits, prefix mask, byte length)."""
    if addr is None or len(addr) != net[2]:
        return False
    return int.from_bytes(addr, "big") & net[1] == net[0]


def _address(word: str) -> bytes:
    try:
        return ipaddress.ip_address(word).packed
    except ValueError:
        raise ValueError("") from None


def _network(word: str) -> tuple[int, int, int]:
    if "/" not in word:
        raise ValueError("no /LEN")
    try:
        net = ipaddress.ip_network(word, strict=False)
    except ValueError:
        raise ValueError("") from None
    return int(net.network_address), int(net.netmask), len(net.network_address.packed)


def _mac(word: str) -> bytes:
    try:
        return parse_mac(word)
    except ValueError:
        raise ValueError("") from None


def _uint(word: str) -> int:
    if not word.isdigit():
        raise ValueError("")
    return int(word)


def _port(word: str) -> tuple[int, int]:
    number = _uint(word)
    if number > 0xFFFF:
        raise ValueError("at most 65535")
    return number, number


def _portrange(word: str) -> tuple[int, int]:
    low_text, dash, high_text = word.partition("-")
    if not dash:
        raise ValueError("")
    low, high = _port(low_text)[0], _port(high_text)[0]
    if high < low:
        raise ValueError("an empty range")
    return low, high
