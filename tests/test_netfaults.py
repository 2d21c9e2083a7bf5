"""Net faults on purpose (`vhostpy.netfaults`, `vhostpy.framefilter`): specs, filters, what
each kind does to frames with a fixed seed, counters, rules changed at run time; then the
same rules on real `NetDevice`s (both data paths: with no rule the compiled path keeps
frames out of Python, with one no frame bypasses it), `NetApp` and `vhostpy net --fault`.

Frames are built with scapy and checked byte for byte; held frames are released by a fake
timer (`Timers`), so nothing here sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from test_cli_net import scripted_net_guest
from test_fastpath import IMPLEMENTATIONS, _rig
from test_net import HDR_MRG, vhdr

from vhostpy import netfaults
from vhostpy.cli import parse_counters_lines
from vhostpy.errors import ConfigurationError
from vhostpy.framefilter import compile_filter, parse_headers
from vhostpy.net import FrameBatch
from vhostpy.netapp import NetApp
from vhostpy.netfaults import REORDER_TIMEOUT, FaultLane, NetFault, NetFaults
from vhostpy.packets import verify_l4_checksums
from vhostpy.switch import CffiSwitch, PythonSwitch
from vhostpy.vring import Vring

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def eth(**kw: Any) -> Ether:
    return Ether(src=kw.pop("src", A_MAC), dst=kw.pop("dst", B_MAC), **kw)


#: One frame of each shape the filters and the corruption must tell apart.
SAMPLES: dict[str, bytes] = {
    "udp69": bytes(eth() / IP(src="10.0.2.15", dst="10.0.2.2") / UDP(sport=1000, dport=69)
                   / Raw(b"read-request")),
    "tcp": bytes(eth() / IP(src="10.0.2.16", dst="10.0.2.15")
                 / TCP(sport=40000, dport=5000, flags="PA") / Raw(b"x" * 100)),
    "ack": bytes(eth() / IP(src="10.0.2.15", dst="10.0.2.16")
                 / TCP(sport=5000, dport=40000, flags="A")),
    "arp": bytes(eth(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.2.15", pdst="10.0.2.2")),
    "icmp": bytes(eth() / IP(src="10.0.2.2", dst="10.0.2.15") / ICMP() / Raw(b"ping" * 8)),
    "ip6udp": bytes(eth(dst="33:33:00:01:00:02") / IPv6(src="fe80::1", dst="ff02::1:2")
                    / IPv6ExtHdrHopByHop() / UDP(sport=546, dport=547) / Raw(b"dhcp")),
    "icmp6": bytes(eth() / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6EchoRequest()),
    "vlantcp": bytes(eth() / Dot1Q(vlan=5) / IP(src="192.168.1.1", dst="192.168.1.2")
                     / TCP(sport=80, dport=1234) / Raw(b"http")),
    # the second fragment of a UDP datagram to port 69: no ports in it
    "frag": bytes(eth() / IP(src="10.0.2.15", dst="10.0.2.2", proto=17, frag=10)
                  / Raw(b"\x03\xe8\x00\x45" + b"z" * 40)),
    "runt": bytes(10),
}


class Timers:
    """A fake loop's clock and timers: `call_later` queues, `advance` runs what is due."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), callback))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end + 1e-9:
            due, _, callback = heapq.heappop(self._heap)
            self.now = max(self.now, due)
            callback()
        self.now = end

    @property
    def pending(self) -> int:
        return len(self._heap)


class Lane:
    """A `FaultLane` with its sink and a fake timer: `run(frames)` -> frames sent now."""

    def __init__(self, *specs: str | NetFault, seed: int = 1, direction: str = "tx") -> None:
        self.timers = Timers()
        self.faults = NetFaults([s if isinstance(s, NetFault) else NetFault.parse(s)
                                 for s in specs], seed=seed, clock=self.timers.clock)
        self.later: list[bytes] = []
        self.lane: FaultLane = self.faults.lane("port0", direction, self.later.extend,
                                                self.timers.call_later)

    def run(self, frames: list[bytes]) -> list[bytes]:
        return self.lane.process(frames)


def numbered(n: int, size: int = 80) -> list[bytes]:
    """`n` distinct UDP frames (their payload starts with their number; checksums unset)."""
    template = bytes(eth() / IP(src="10.0.2.15", dst="10.0.2.2")
                     / UDP(sport=1000, dport=2000, chksum=0) / Raw(bytes(4 + size)))
    return [template[:42] + i.to_bytes(4, "big") + template[46:] for i in range(n)]


# ------------------------------------------------------------------------------ specs


@pytest.mark.parametrize(("spec", "written"), [
    ("drop", "drop"),
    ("drop,p=0.5", "drop,p=0.5"),
    (" dup , p=0.25 ,dir=rx", "dup,p=0.25,dir=rx"),
    ("reorder,p=0.1", "reorder,p=0.1,depth=3"),
    ("reorder,depth=8,p=1", "reorder,depth=8"),
    ("corrupt,p=0.01,filter=udp and port 69", "corrupt,p=0.01,filter=udp and port 69"),
    ("delay,ms=20", "delay,ms=20"),
    ("delay,ms=5-50,p=0.5,seed=7", "delay,p=0.5,ms=5-50,seed=7"),
    ("drop,filter=  not  arp ,dir=tx", "drop,dir=tx,filter=not arp"),
    ("drop,filter=(tcp or udp) and host 10.0.2.15,p=0.05",
     "drop,p=0.05,filter=(tcp or udp) and host 10.0.2.15"),
])
def test_spec_round_trip(spec: str, written: str) -> None:
    rule = NetFault.parse(spec)
    assert rule.spec() == written
    assert NetFault.parse(written).spec() == written
    assert rule.as_dict() == {"spec": written, "seen": 0, "hits": 0}


BAD_SPECS = {
    "": "unknown kind ''",
    "lose,p=1": "unknown kind 'lose' (one of drop, dup, reorder, corrupt, delay)",
    "drop,p": "'p' is not KEY=VALUE",
    "drop,p=": "'p=' is not KEY=VALUE",
    "drop,prob=0.5": "unknown option prob=",
    "drop,p=0.1,p=0.2": "p= given twice",
    "drop,p=1.5": "p=1.5 is not a probability in 0..1",
    "drop,p=-0.1": "-0.1 is negative",
    "drop,p=nan": "'nan' is not a finite number",
    "drop,p=half": "'half' is not a number",
    "drop,depth=2": "depth= is for reorder faults",
    "reorder,depth=0": "depth=0 is not in 1..1000",
    "reorder,depth=1001": "depth=1001 is not in 1..1000",
    "reorder,depth=2.5": "'2.5' is not an integer",
    "delay": "a delay needs ms=N or ms=A-B",
    "delay,ms=0": "a delay needs ms=N or ms=A-B (more than 0)",
    "drop,ms=5": "ms= is for delay faults",
    "delay,ms=50-5": "ms=50-5 is not a range in 0..60000",
    "delay,ms=60001": "ms=60001-60001 is not a range",
    "delay,ms=a-b": "'a' is not a number",
    "drop,dir=up": "dir=up is not rx or tx",
    "drop,seed=x": "'x' is not an integer",
    "drop,filter=tcp and": "filter 'tcp and': a primitive expected at the end",
    "drop,filter=<python f>": "unknown primitive '<python'",
}


@pytest.mark.parametrize(("spec", "mention"), list(BAD_SPECS.items()), ids=list(BAD_SPECS))
def test_bad_spec_says_which_and_why(spec: str, mention: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        NetFault.parse(spec)
    message = str(info.value)
    assert message.startswith(f"fault {spec!r}: "), message
    assert mention in message, message
    assert "\n" not in message


def test_python_rules_are_checked_too() -> None:
    with pytest.raises(ConfigurationError, match=r"fault 'drop': p=2 is not a probability"):
        NetFault("drop", p=2)
    with pytest.raises(ConfigurationError, match="filter must be an expression or a callable"):
        NetFault("drop", filter=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown kind 'lose'"):
        NetFault("lose")
    with pytest.raises(ConfigurationError, match="filter 'port x'"):
        NetFault("dup", filter="port x")

    def is_udp(frame: bytes) -> bool:
        return frame[23] == 17
    assert NetFault("dup", p=0.5, filter=is_udp).spec() == "dup,p=0.5,filter=<python is_udp>"


# ------------------------------------------------------------------------------ filters

FILTERS = {
    "udp": {"udp69", "ip6udp", "frag"},
    "udp and port 69": {"udp69"},
    "udp dst port 69": {"udp69"},
    "udp src port 69": set(),
    "tcp": {"tcp", "ack", "vlantcp"},
    "tcp port 5000": {"tcp", "ack"},
    "tcp dst port 5000": {"tcp"},
    "port 547 or port 80": {"ip6udp", "vlantcp"},
    "portrange 1-100": {"udp69", "vlantcp"},
    "not arp": set(SAMPLES) - {"arp"},
    "! (tcp || udp)": {"arp", "icmp", "icmp6", "runt"},
    "arp": {"arp"},
    "ip": {"udp69", "tcp", "ack", "icmp", "vlantcp", "frag"},
    "ip6": {"ip6udp", "icmp6"},
    "icmp": {"icmp"},
    "icmp6": {"icmp6"},
    "vlan": {"vlantcp"},
    "vlan and tcp port 80": {"vlantcp"},
    "host 10.0.2.15": {"udp69", "tcp", "ack", "arp", "icmp", "frag"},
    "src host 10.0.2.15": {"udp69", "ack", "arp", "frag"},
    "dst host 10.0.2.15 and not icmp": {"tcp"},
    "host fe80::2": {"icmp6"},
    "net 192.168.0.0/16": {"vlantcp"},
    "dst net ff00::/8": {"ip6udp"},
    "ether dst host ff:ff:ff:ff:ff:ff": {"arp"},
    "broadcast": {"arp"},
    "multicast": {"arp", "ip6udp"},
    "ether src host 02:00:00:00:00:0a and not multicast": set(SAMPLES) - {"arp", "ip6udp",
                                                                           "runt"},
    "proto 58": {"icmp6"},
    "less 60": {"arp", "ack", "udp69", "runt"},
    "greater 100": {"tcp"},
    "TCP AND PORT 5000": {"tcp", "ack"},
    "udp or tcp and port 5000": {"udp69", "ip6udp", "frag", "tcp", "ack"},  # and binds first
}


@pytest.mark.parametrize(("expr", "names"), list(FILTERS.items()), ids=list(FILTERS))
def test_filter_matches(expr: str, names: set[str]) -> None:
    f = compile_filter(expr)
    got = {name for name, frame in SAMPLES.items() if f(frame)}
    assert got == names


def test_filter_bad_expressions() -> None:
    cases = {
        "": "empty", "host": "an IPv4 or IPv6 address expected at the end",
        "host 10.0.2": "'10.0.2' is not an IPv4 or IPv6 address",
        "host a or b": "'a' is not an IPv4",
        "port 70000": "'70000' is not a port (at most 65535)",
        "(tcp": "')' expected at the end", "(tcp udp)": "')' expected before 'udp'",
        "tcp)": "unexpected ')'", "and tcp": "a primitive expected before 'and'",
        "src tcp": "src must be followed by host, net, port or portrange",
        "frobnicate": "unknown primitive 'frobnicate'", "a & b": "'&' is not an operator",
        "portrange 5-2": "an empty range", "net 10.0.0.0": "no /LEN",
        "ether src 1.2.3.4": "'ether' is followed by [src|dst] host MAC",
        "ether host 1.2.3.4": "'1.2.3.4' is not a MAC address",
        "tcp src host 1.2.3.4": "tcp [src|dst] is followed by port or portrange",
        "proto 300": "proto 300: at most 255", "less x": "'x' is not a length",
        "host port": "an IPv4 or IPv6 address expected, not 'port'",
    }
    for expr, mention in cases.items():
        with pytest.raises(ConfigurationError) as info:
            compile_filter(expr)
        assert str(info.value).startswith(f"filter {expr!r}: "), info.value
        assert mention in str(info.value), (expr, info.value)


def test_filters_never_raise_on_garbage() -> None:
    exprs = [compile_filter(e) for e in FILTERS]
    rng = random.Random(5)
    frames = [frame[:cut] for frame in SAMPLES.values() for cut in range(len(frame) + 1)]
    frames += [rng.randbytes(rng.randrange(120)) for _ in range(500)]
    # garbage behind valid EtherTypes and IP version nibbles
    for etype in (b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00"):
        frames += [bytes(12) + etype + rng.randbytes(rng.randrange(80)) for _ in range(200)]
    for frame in frames:
        headers = parse_headers(frame)
        assert 0 <= headers.payload <= headers.end <= len(frame)
        for f in exprs:
            f.matches(headers)


# ------------------------------------------------------------------------------ each kind


def test_drop_only_what_the_filter_and_direction_say() -> None:
    rule = NetFault.parse("drop,dir=tx,filter=udp")
    tx = Lane(rule)
    frames = list(SAMPLES.values())
    assert tx.run(frames) == [f for n, f in SAMPLES.items() if n not in FILTERS["udp"]]
    assert (rule.seen, rule.hits) == (3, 3)
    rx = tx.faults.lane("port0", "rx", tx.later.extend, tx.timers.call_later)
    assert rx.process(frames) == frames   # dir=tx: frames toward the guest untouched
    assert rule.seen == 3
    assert tx.faults.counters() == {"dropped": 3, "duplicated": 0, "reordered": 0,
                                    "corrupted": 0, "delayed": 0, "held": 0,
                                    "faults": [{"spec": "drop,dir=tx,filter=udp", "seen": 3,
                                                "hits": 3}]}
    assert tx.lane.counts.dropped == 3 and rx.counts.dropped == 0


def test_dup_sends_an_identical_copy_right_after() -> None:
    lane = Lane("dup,filter=tcp")
    frames = list(SAMPLES.values())
    want = [g for n, f in SAMPLES.items() for g in ([f, f] if n in FILTERS["tcp"] else [f])]
    assert lane.run(frames) == want
    assert lane.lane.counts.duplicated == 3


def test_corrupt_flips_one_bit_past_the_headers() -> None:
    lane = Lane("corrupt")
    for name, frame in SAMPLES.items():
        got = lane.run([frame])
        if name == "runt":   # nothing past any header: left alone, not counted
            assert got == [frame]
            continue
        (bad,) = got
        assert len(bad) == len(frame), name
        diff = [i for i in range(len(frame)) if bad[i] != frame[i]]
        assert len(diff) == 1 and (bad[diff[0]] ^ frame[diff[0]]).bit_count() == 1, name
        headers = parse_headers(frame)
        if name in ("ack", "icmp6"):   # no payload: the flip lands in the checksum field
            assert headers.csum is not None and diff[0] in (headers.csum, headers.csum + 1)
        else:
            assert headers.payload <= diff[0] < headers.end, name
        if name in ("udp69", "tcp", "ack", "icmp", "ip6udp", "icmp6", "vlantcp"):
            assert verify_l4_checksums(frame) is True, name
            assert verify_l4_checksums(bad) is False, name   # checksums left wrong
    assert lane.lane.counts.corrupted == len(SAMPLES) - 1
    assert lane.faults.faults[0].hits == len(SAMPLES) - 1
    assert lane.faults.faults[0].seen == len(SAMPLES)


def test_reorder_holds_a_frame_behind_depth_later_frames() -> None:
    frames = numbered(10)
    lane = Lane(NetFault("reorder", depth=3, filter=lambda f: f in (frames[2], frames[9])))
    got = lane.run(frames)
    order = [0, 1, 3, 4, 5, 2, 6, 7, 8]
    assert got == [frames[i] for i in order]
    assert lane.lane.counts.reordered == 2 and lane.lane.counts.held == 1
    # frame 9 has no later frames: the timeout sends it, never sooner
    lane.timers.advance(REORDER_TIMEOUT / 2)
    assert lane.later == []
    lane.timers.advance(REORDER_TIMEOUT / 2)
    assert lane.later == [frames[9]]
    assert lane.lane.counts.held == 0 and lane.faults.counts.held == 0 and not lane.timers.pending


def test_reorder_never_loses_a_frame() -> None:
    frames = numbered(1000)
    lane = Lane("reorder,p=0.3,depth=5", seed=42)
    got = []
    for k in range(0, 1000, 64):   # in batches, as rings deliver them
        got += lane.run(frames[k:k + 64])
    lane.timers.advance(1)
    got += lane.later
    assert sorted(got) == sorted(frames) and got != frames
    rule = lane.faults.faults[0]
    assert rule.seen == 1000 and 200 < rule.hits < 400
    assert lane.lane.counts.reordered == rule.hits and lane.lane.counts.held == 0
    # every reordered frame went at most 5 places back
    for pos, frame in enumerate(got):
        assert pos - frames.index(frame) <= 5


def test_delay_sends_later_in_order() -> None:
    frames = numbered(5)
    lane = Lane("delay,ms=20,filter=udp")
    assert lane.run(frames + [SAMPLES["arp"]]) == [SAMPLES["arp"]]
    assert lane.lane.counts.held == 5
    lane.timers.advance(0.019)
    assert lane.later == []
    lane.timers.advance(0.002)
    assert lane.later == frames
    assert lane.lane.counts.delayed == 5 and lane.lane.counts.held == 0


def test_delay_range_is_random_and_seeded() -> None:
    def release_times(seed: int) -> list[float]:
        lane = Lane("delay,ms=10-30", seed=seed)
        frames = numbered(50)
        lane.run(frames)
        when = []
        for _ in range(40):
            lane.timers.advance(0.001)
            when += [lane.timers.now] * (len(lane.later) - len(when))
        assert sorted(lane.later) == sorted(frames)
        return when
    first = release_times(3)
    assert release_times(3) == first
    assert release_times(4) != first
    assert min(first) >= 0.010 and max(first) <= 0.031 and len(set(first)) > 5


def test_drop_half_loses_about_half_and_counts_exactly() -> None:
    frames = numbered(2000, size=20)
    lane = Lane("drop,p=0.5", seed=1234)
    got = []
    for k in range(0, 2000, 64):
        got += lane.run(frames[k:k + 64])
    dropped = 2000 - len(got)
    assert 900 <= dropped <= 1100
    rule = lane.faults.faults[0]
    assert (rule.seen, rule.hits) == (2000, dropped)
    assert lane.faults.counts.dropped == lane.lane.counts.dropped == dropped
    kept = set(got)
    assert got == [f for f in frames if f in kept]   # order kept
    again = Lane("drop,p=0.5", seed=1234)
    assert [f for k in range(0, 2000, 64) for f in again.run(frames[k:k + 64])] == got
    other = Lane("drop,p=0.5", seed=99)
    assert [f for k in range(0, 2000, 64) for f in other.run(frames[k:k + 64])] != got


def test_a_rule_seed_is_its_own() -> None:
    frames = numbered(200)
    a = Lane("drop,p=0.5,seed=7", seed=1)
    b = Lane("drop,p=0.5,seed=7", seed=2)
    kept = a.run(frames)
    assert b.run(frames) == kept and 50 < len(kept) < 150
    c = Lane("drop,p=0.5,seed=8", seed=1)
    assert c.run(frames) != kept


def test_rules_combine_in_order() -> None:
    frames = numbered(4)
    # dup then drop: both copies go, counted as two dropped frames
    lane = Lane("dup", NetFault("drop", filter=lambda f: f == frames[1]))
    assert lane.run(frames) == [frames[0]] * 2 + [frames[2]] * 2 + [frames[3]] * 2
    assert lane.lane.counts.dropped == 2 and lane.lane.counts.duplicated == 4
    # the first hold wins: a delayed frame is not also reordered
    lane = Lane("delay,ms=5", "reorder")
    assert lane.run(frames) == []
    assert lane.faults.faults[1].seen == 0 and lane.lane.counts.reordered == 0
    lane.timers.advance(0.005)
    assert lane.later == frames


def test_rules_added_and_cleared_while_frames_flow() -> None:
    lane = Lane()
    frames = numbered(6)
    assert not lane.lane.active and lane.run(frames) == frames
    lane.faults.add(NetFault.parse("drop,filter=not arp"))
    assert lane.lane.active and lane.run(frames) == []
    lane.faults.clear()
    lane.faults.add(NetFault.parse("reorder,depth=10"))
    assert lane.run(frames[:2]) == []
    lane.faults.clear()   # frames held then still come out when their time comes
    assert lane.run(frames[2:]) == frames[2:]
    lane.timers.advance(REORDER_TIMEOUT)
    assert lane.later == frames[:2]
    assert lane.faults.counters()["faults"] == []
    assert lane.faults.counters()["dropped"] == 6


def test_a_filter_that_raises_never_breaks_the_path(caplog: pytest.LogCaptureFixture) -> None:
    def broken(frame: bytes) -> bool:
        raise RuntimeError("boom")
    rule = NetFault("drop", filter=broken)
    lane = Lane(rule)
    frames = numbered(3)
    with caplog.at_level(logging.ERROR, logger="vhostpy.netfaults"):
        assert lane.run(frames) == frames
    assert rule.errors == 3 and rule.seen == 0
    assert rule.as_dict() == {"spec": "drop,filter=<python broken>", "seen": 0, "hits": 0,
                              "errors": 3}
    assert "its filter raised" in caplog.text


def test_a_scapy_filter_gets_packets() -> None:
    lane = Lane(NetFault("drop", filter=lambda pkt: pkt.haslayer(ICMP), scapy=True))
    assert lane.run([SAMPLES["icmp"], SAMPLES["tcp"]]) == [SAMPLES["tcp"]]


def test_without_timers_held_frames_go_at_once(caplog: pytest.LogCaptureFixture) -> None:
    def no_timer(delay: float, callback: Callable[[], None]) -> None:
        raise RuntimeError("port port0: no event loop attached for timers")
    faults = NetFaults([NetFault.parse("delay,ms=10,filter=udp"), NetFault.parse("reorder")])
    lane = faults.lane("port0", "rx", lambda frames: None, no_timer)
    frames = numbered(2)
    with caplog.at_level(logging.WARNING, logger="vhostpy.netfaults"):
        got = lane.process(frames + [SAMPLES["arp"]])
    assert sorted(got) == sorted(frames + [SAMPLES["arp"]])
    assert lane.counts.held == 0 and "no timer to hold frames with" in caplog.text


def test_a_sink_that_raises_later_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    timers = Timers()

    def sink(frames: list[bytes]) -> None:
        raise OSError("gone")
    lane = NetFaults([NetFault.parse("delay,ms=1")]).lane("port0", "tx", sink,
                                                          timers.call_later)
    assert lane.process(numbered(2)) == []
    with caplog.at_level(logging.ERROR, logger="vhostpy.netfaults"):
        timers.advance(0.01)
    assert "2 frames held by faults could not be sent" in caplog.text


def test_held_frames_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netfaults, "MAX_HELD", 5)
    lane = Lane("delay,ms=100")
    frames = numbered(10)
    assert lane.run(frames) == frames[5:]
    assert lane.faults.faults[0].hits == 5 and lane.lane.counts.held == 5


# ------------------------------------------------------------------------------ on a device


def _udp(k: int, *, src: str = A_MAC, dst: str = B_MAC) -> bytes:
    return bytes(Ether(src=src, dst=dst) / IP(src="10.0.2.15", dst="10.0.2.2")
                 / UDP(sport=1000 + k, dport=69) / Raw(bytes(30)))


def _other(k: int, *, src: str = A_MAC, dst: str = B_MAC) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + \
        b"\x88\xb5" + bytes([k]) * 50


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_faults_on_a_reflecting_device_both_ways(impl: str) -> None:
    """Rules see every frame while they exist (the compiled path hands them to Python);
    with none installed the compiled path moves frames without Python again."""
    rig = _rig(impl, reflect=True)
    timers = Timers()
    rig.port.call_later = timers.call_later
    calls = {"n": 0}
    deliver_now = rig.port.deliver_now

    def counting(frames: list[bytes], vq: Any = None) -> None:
        calls["n"] += 1   # Python saw frames from the guest
        deliver_now(frames, vq)
    rig.port.deliver_now = counting  # type: ignore[method-assign]
    faults = NetFaults(seed=3, clock=timers.clock)
    rig.port.set_faults(faults)   # its from-guest lane sends to the counting sink
    rig.post(60)

    def reflect(frames: list[bytes]) -> list[bytes]:
        rig.transmit(*[[vhdr(), f] for f in frames])
        return rig.received_frames()

    def swapped(frame: bytes) -> bytes:
        return frame[6:12] + frame[0:6] + frame[12:]

    # no rule: the compiled path reflects without Python (the Python path always calls it)
    frames = [_udp(0), _other(1)]
    assert reflect(frames) == [swapped(f) for f in frames]
    assert calls["n"] == (0 if impl == "cffi" else 1)
    assert not rig.port.python_consumers

    faults.add(NetFault.parse("drop,dir=tx,filter=udp"))
    faults.add(NetFault.parse("dup,dir=rx"))
    assert rig.port.python_consumers
    frames = [_udp(1), _other(2), _udp(2), _other(3)]
    got = reflect(frames)
    assert got == [swapped(_other(2))] * 2 + [swapped(_other(3))] * 2
    counters = rig.port.counters()["faults"]
    assert counters["from_guest"]["dropped"] == 2 and counters["to_guest"]["duplicated"] == 2
    assert counters["to_guest"]["dropped"] == 0 and counters["from_guest"]["duplicated"] == 0

    faults.clear()
    before = calls["n"]
    assert reflect([_udp(5)]) == [swapped(_udp(5))]
    assert calls["n"] == before + (0 if impl == "cffi" else 1)

    # delay toward the guest: through the port's timer
    faults.add(NetFault.parse("delay,ms=30,dir=rx"))
    assert reflect([_other(7)]) == []
    timers.advance(0.03)
    assert rig.received_frames() == [swapped(_other(7))]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_faults_between_two_ports_on_a_switch(impl: str) -> None:
    """Frames one port's guest sends reach the other port's guest through the switch (the
    compiled switch places C bursts straight into the ring): a shared rule set sees them."""
    switch = PythonSwitch() if impl == "python" else CffiSwitch()
    faults = NetFaults(seed=11)
    a, b = _rig(impl), _rig(impl)
    for rig in (a, b):
        rig.port.set_consumer("switch", switch)
        switch.attach(rig.port)
        rig.port.set_faults(faults)
    b.post(60)
    b.transmit([vhdr(), _other(0, src=B_MAC, dst=A_MAC)])   # the switch learns b
    a.transmit(*[[vhdr(), _other(k)] for k in range(3)])
    assert b.received_frames() == [_other(k) for k in range(3)]

    faults.add(NetFault.parse("drop,dir=rx,filter=ether dst host " + B_MAC))
    a.transmit(*[[vhdr(), _other(k)] for k in range(3, 8)])
    assert b.received_frames() == []
    assert b.port.counters()["faults"]["to_guest"]["dropped"] == 5
    assert a.port.counters()["faults"]["from_guest"]["dropped"] == 0
    faults.clear()
    a.transmit([vhdr(), _other(9)])
    assert b.received_frames() == [_other(9)]
    assert faults.counters()["dropped"] == 5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_send_and_offer_go_through_the_rules(impl: str) -> None:
    rig = _rig(impl)
    faults = NetFaults([NetFault.parse("drop,p=0.5,dir=rx")], seed=8)
    rig.port.set_faults(faults)
    rig.post(60)
    frames = [_other(k) for k in range(20)]
    assert rig.port.send(frames) == 20    # dropped on purpose counts as taken
    got = rig.received_frames()
    assert len(got) == 20 - faults.counts.dropped and 3 < len(got) < 17
    assert got == [f for f in frames if f in got]

    dropped = faults.counts.dropped
    assert rig.port.offer(FrameBatch(frames[:4]), 20) == 20
    got = rig.received_frames()
    assert len(got) == 20 - (faults.counts.dropped - dropped)
    assert faults.faults[0].seen == 40 and faults.faults[0].hits == faults.counts.dropped


def test_offer_through_rules_loses_nothing_when_the_ring_fills() -> None:
    rig = _rig("python")
    rig.port.set_faults(NetFaults([NetFault.parse("drop,filter=arp")]))
    rig.post(10)
    taken = rig.port.offer(FrameBatch([_other(k) for k in range(5)]), 100)
    # one chunk went through the rules: 10 placed, the rest of the chunk queued
    assert taken == netfaults.OFFER_CHUNK
    assert len(rig.received_frames()) == 10 and len(rig.dev.backlog) == taken - 10


def test_without_a_loop_timer_a_delay_sends_at_once(caplog: pytest.LogCaptureFixture) -> None:
    rig = _rig("python", reflect=True)   # test runners have no timers
    rig.port.set_faults(NetFaults([NetFault.parse("delay,ms=50,dir=rx")]))
    rig.post(4)
    with caplog.at_level(logging.WARNING, logger="vhostpy.netfaults"):
        rig.transmit([vhdr(), _other(1)])
    assert len(rig.received_frames()) == 1
    assert "no timer to hold frames with" in caplog.text


# ------------------------------------------------------------------------------ NetApp + CLI


def test_netapp_has_one_rule_set_on_every_port(tmp_path: Path) -> None:
    app = NetApp(socket_paths=[str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
                 faults=[NetFault.parse("drop,p=0.1")])
    try:
        assert [f.spec() for f in app.faults.faults] == ["drop,p=0.1"]
        assert all(p.faults is app.faults for p in app.ports)
        counters = app.counters()
        assert counters["faults"] == {"dropped": 0, "duplicated": 0, "reordered": 0,
                                      "corrupted": 0, "delayed": 0, "held": 0,
                                      "faults": [{"spec": "drop,p=0.1", "seen": 0,
                                                  "hits": 0}]}
        assert counters["ports"][0]["faults"]["from_guest"]["dropped"] == 0  # type: ignore[index]
    finally:
        app.close()
    own = NetFaults(seed=5)
    app = NetApp(socket_paths=[str(tmp_path / "c.sock")], faults=own)
    try:
        assert app.faults is own and not own.active
    finally:
        app.close()


@pytest.mark.parametrize(("spec", "mention"), [
    ("drop,p=2", "fault 'drop,p=2': p=2 is not a probability"),
    ("reorder,filter=tcp port", "filter 'tcp port': a port expected at the end"),
    ("explode", "unknown kind 'explode'"),
])
def test_cli_bad_fault_one_line_exit_1(tmp_path: Path, spec: str, mention: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vhostpy", "net", "--socket-path",
                        str(tmp_path / "net.sock"), "--fault", "drop", "--fault", spec],
                       capture_output=True, text=True, timeout=30, cwd=ROOT, env=ENV,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhostpy net: error: "), r.stderr
    assert mention in r.stderr and r.stdout == ""
    assert os.listdir(tmp_path) == [], "something was created"


def test_cli_fault_drops_frames_and_counts_them(backend: Any) -> None:
    b = backend("net", "--reflect", "--fault", "drop,dir=tx,filter=udp and port 69",
                "--fault", "dup,dir=rx,seed=1,p=1")
    guest, tx, bufs = scripted_net_guest(b.path, 8)
    try:
        for frame in (_udp(1), _other(2)):
            tx.add_chain([HDR_MRG.pack(0, 0, 0, 0, 0, 0, 0), frame])
        guest.kick(1)
        assert len(guest.wait_used(1)) == 2
        used = guest.wait_used(0)
        while len(used) < 2:
            used += guest.wait_used(0)
        want = _other(2)[6:12] + _other(2)[0:6] + _other(2)[12:]
        assert [guest.memory.read(bufs[h], n)[HDR_MRG.size:] for h, n in used] == [want] * 2
    finally:
        guest.close()
    assert b.stop() == 0, b.output()
    (record,) = parse_counters_lines(b.output())
    faults = record["counters"]["faults"]
    assert (faults["dropped"], faults["duplicated"]) == (1, 1)
    assert faults["faults"] == [
        {"spec": "drop,dir=tx,filter=udp and port 69", "seen": 1, "hits": 1},
        {"spec": "dup,dir=rx,seed=1", "seen": 1, "hits": 1}]
    port = record["counters"]["ports"][0]
    assert port["faults"]["from_guest"]["dropped"] == 1
    assert port["faults"]["to_guest"]["duplicated"] == 1


def test_a_port_without_call_later_uses_its_rings_timer() -> None:
    """`NetPort.later`: the application's `call_later`, else the timer of the loop that
    serves the device's rings (`vq.call_later` -> `Vring.call_later` -> its host's)."""
    rig = _rig("python")
    port = rig.port
    port._ring = None
    with pytest.raises(RuntimeError, match="no event loop attached for timers"):
        port.later(0.1, lambda: None)
    timers = Timers()
    host = type("Host", (), {"call_later": staticmethod(timers.call_later),
                             "add_reader": lambda *a: None, "remove_reader": lambda *a: True})()
    vq = rig.vqs[1]
    Vring(rig.dev, vq, host)   # replaces the test runner
    port.learn_loop(vq)
    fired: list[int] = []
    port.later(0.2, lambda: fired.append(1))
    timers.advance(0.2)
    assert fired == [1]
    Vring(rig.dev, vq, None)   # a transport without a loop has no timers
    with pytest.raises(TypeError, match="has no timers"):
        port.later(0.1, lambda: None)
    port.call_later = timers.call_later   # the application's wins
    port.later(0.1, lambda: fired.append(2))
    timers.advance(0.1)
    assert fired == [1, 2]
