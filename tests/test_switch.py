"""vhostpy.switch: learning, flooding, unicast, no hairpin, aging, moves, batching, detach.

Every behaviour test runs over both sibling variants (`PythonSwitch`, and `CffiSwitch` where
the extension is built), through the `variant` fixture; the alias `Switch` is checked to be
the visible rule ARCHITECTURE.md asks for.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from vhostpy import _accel
from vhostpy.packets import Responder, parse_mac
from vhostpy.switch import MAX_ENTRIES, BaseSwitch, CffiSwitch, Port, PythonSwitch, Switch

needs_cffi = pytest.mark.skipif(_accel.lib is None, reason="the compiled switch is not built")

BCAST = "ff:ff:ff:ff:ff:ff"


class FakePort:
    """Records every `send()` call (one list per call)."""

    def __init__(self, name: str, accept: int | None = None) -> None:
        self.name = name
        self.calls: list[list[bytes]] = []
        self.accept = accept

    def send(self, frames: Sequence[bytes]) -> int:
        self.calls.append(list(frames))
        return len(frames) if self.accept is None else min(self.accept, len(frames))

    @property
    def received(self) -> list[bytes]:
        return [f for call in self.calls for f in call]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(dst: str, src: str, tag: int = 0) -> bytes:
    return parse_mac(dst) + parse_mac(src) + b"\x08\x00" + bytes([tag]) * 50


def mac(n: int) -> str:
    return f"52:54:00:00:00:{n:02x}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["python", pytest.param("cffi", marks=needs_cffi)])
def variant(request: pytest.FixtureRequest) -> type[BaseSwitch]:
    """Each sibling variant of the switch in turn."""
    return PythonSwitch if request.param == "python" else CffiSwitch


@pytest.fixture
def net(clock: FakeClock, variant: type[BaseSwitch]
        ) -> tuple[BaseSwitch, FakePort, FakePort, FakePort]:
    sw = variant(aging=300.0, clock=clock)
    a, b, c = FakePort("a"), FakePort("b"), FakePort("c")
    for p in (a, b, c):
        sw.attach(p)
    return sw, a, b, c


def test_port_protocol_is_structural() -> None:
    port: Port = FakePort("x")  # a plain class satisfies the Protocol
    assert port.send([b"\0" * 14]) == 1


def test_unknown_unicast_floods_then_learns(net: tuple[BaseSwitch, FakePort, FakePort, FakePort]
                                            ) -> None:
    sw, a, b, c = net
    f1 = frame(mac(2), mac(1))
    sw.forward(a, [f1])
    assert a.calls == [] and b.calls == [[f1]] and c.calls == [[f1]]
    assert sw.flooded == 1 and sw.forwarded == 0
    assert sw.table() == {mac(1): ("a", 0.0)}
    # b answers: its MAC is learned and a is known, so only a gets it.
    f2 = frame(mac(1), mac(2))
    sw.forward(b, [f2])
    assert a.calls == [[f2]] and len(c.calls) == 1
    assert sw.forwarded == 1 and sw.lookup(parse_mac(mac(2))) is b
    # From now on a -> b is known unicast.
    f3 = frame(mac(2), mac(1), 3)
    sw.forward(a, [f3])
    assert b.calls[-1] == [f3] and len(c.calls) == 1 and sw.forwarded == 2


@pytest.mark.parametrize("dst", [BCAST, "01:00:5e:00:00:fb", "33:33:00:00:00:01"])
def test_broadcast_and_multicast_flood_everywhere_but_source(
        net: tuple[BaseSwitch, FakePort, FakePort, FakePort], dst: str) -> None:
    sw, a, b, c = net
    sw.forward(b, [frame(mac(2), mac(1))])  # mac(1) now lives on b
    a.calls.clear()
    f = frame(dst, mac(3))
    sw.forward(a, [f])
    assert a.calls == [] and b.received[-1] == f and c.received[-1] == f
    assert sw.flooded == 2


def test_no_hairpin(net: tuple[BaseSwitch, FakePort, FakePort, FakePort]) -> None:
    sw, a, b, c = net
    sw.forward(a, [frame(BCAST, mac(1)), frame(BCAST, mac(2))])  # both on a
    b.calls.clear()
    c.calls.clear()
    sw.forward(a, [frame(mac(2), mac(1))])  # destination is on the source port
    assert a.calls == b.calls == c.calls == []
    assert sw.filtered == 1
    # A frame to itself is filtered too.
    sw.forward(a, [frame(mac(1), mac(1))])
    assert a.calls == b.calls == c.calls == [] and sw.filtered == 2


def test_aging_with_fake_clock(net: tuple[BaseSwitch, FakePort, FakePort, FakePort],
                               clock: FakeClock) -> None:
    sw, a, b, c = net
    sw.forward(b, [frame(BCAST, mac(2))])
    clock.now += 299.0
    sw.forward(a, [frame(mac(2), mac(1))])
    assert c.calls == [[frame(BCAST, mac(2))]]  # known: only b got it
    assert sw.table()[mac(2)] == ("b", 299.0)
    clock.now += 2.0  # mac(2) last seen 301 s ago
    f = frame(mac(2), mac(1), 9)
    sw.forward(a, [f])
    assert c.calls[-1] == [f] and b.calls[-1] == [f]  # flooded again
    assert mac(2) not in sw.table() and sw.lookup(parse_mac(mac(2))) is None
    # Traffic from mac(2) refreshes it.
    sw.forward(b, [frame(mac(1), mac(2))])
    clock.now += 200.0
    sw.forward(b, [frame(mac(1), mac(2))])
    clock.now += 200.0
    assert sw.lookup(parse_mac(mac(2))) is b


def test_sweep_bounds_table(clock: FakeClock, variant: type[BaseSwitch]) -> None:
    sw = variant(aging=10.0, clock=clock)
    a, b = FakePort("a"), FakePort("b")
    sw.attach(a)
    sw.attach(b)
    sw.forward(a, [frame(BCAST, mac(n)) for n in range(1, 50)])
    assert len(sw.table()) == 49
    clock.now += 11.0
    sw.forward(b, [frame(BCAST, mac(99))])
    assert sw.table() == {mac(99): ("b", 0.0)}


def test_mac_move_relearns(net: tuple[BaseSwitch, FakePort, FakePort, FakePort],
                           clock: FakeClock) -> None:
    sw, a, b, c = net
    sw.forward(a, [frame(BCAST, mac(1))])
    assert sw.lookup(parse_mac(mac(1))) is a
    clock.now += 1.0
    sw.forward(b, [frame(BCAST, mac(1))])  # the VM migrated to port b
    assert sw.lookup(parse_mac(mac(1))) is b and sw.table()[mac(1)] == ("b", 0.0)
    f = frame(mac(1), mac(3))
    sw.forward(c, [f])
    assert b.calls[-1] == [f] and a.calls[-1] != [f]


def test_one_send_per_destination_in_order(net: tuple[BaseSwitch, FakePort, FakePort, FakePort]
                                           ) -> None:
    sw, a, b, c = net
    sw.forward(b, [frame(BCAST, mac(2))])
    sw.forward(c, [frame(BCAST, mac(3))])
    for p in (a, b, c):
        p.calls.clear()
    batch = [
        frame(mac(2), mac(1), 1),
        frame(mac(3), mac(1), 2),
        frame(BCAST, mac(1), 3),
        frame(mac(9), mac(1), 4),  # unknown: flooded
        frame(mac(2), mac(1), 5),
        b"\0" * 13,  # runt: dropped
        frame(mac(2), "01:00:00:00:00:01", 6),  # multicast source: dropped
        frame(mac(2), "00:00:00:00:00:00", 7),  # zero source: dropped
    ]
    sw.forward(a, batch)
    assert a.calls == []
    assert b.calls == [[batch[0], batch[2], batch[3], batch[4]]]
    assert c.calls == [[batch[1], batch[2], batch[3]]]
    assert (sw.forwarded, sw.flooded, sw.dropped) == (3, 4, 3)
    assert sw.counters() == {"forwarded": 3, "flooded": 4, "filtered": 0, "dropped": 3,
                             "macs": 3}
    sw.forward(a, [])
    sw.forward(a, [frame(mac(2), mac(1))])
    assert len(c.calls) == 1 and len(b.calls) == 2  # ports with nothing get no call


def test_detach_forgets_macs(net: tuple[BaseSwitch, FakePort, FakePort, FakePort]) -> None:
    sw, a, b, c = net
    sw.forward(b, [frame(BCAST, mac(2)), frame(BCAST, mac(22))])
    sw.forward(c, [frame(BCAST, mac(3))])
    sw.detach(b)
    sw.detach(b)  # idempotent
    assert set(sw.table()) == {mac(3)} and sw.ports == [a, c]
    b.calls.clear()
    f = frame(mac(2), mac(1))
    sw.forward(a, [f, frame(BCAST, mac(1))])
    assert b.calls == [] and c.calls[-1] == [f, frame(BCAST, mac(1))]
    # A detached port's frames go nowhere (a device still draining its queue).
    dropped = sw.dropped
    sw.forward(b, [frame(BCAST, mac(2))])
    assert sw.dropped == dropped + 1 and mac(2) not in sw.table()
    sw.attach(b)
    with pytest.raises(ValueError):
        sw.attach(b)


def test_table_limit_still_forwards(clock: FakeClock, variant: type[BaseSwitch]) -> None:
    sw = variant(clock=clock, max_entries=4)
    a, b = FakePort("a"), FakePort("b")
    sw.attach(a)
    sw.attach(b)
    sw.forward(a, [frame(BCAST, mac(n)) for n in range(1, 10)])
    assert len(sw.table()) == 4 and len(b.received) == 9


def test_refused_frames_are_the_ports_business(clock: FakeClock, variant: type[BaseSwitch]) -> None:
    sw = variant(clock=clock)
    a, full = FakePort("a"), FakePort("full", accept=0)
    sw.attach(a)
    sw.attach(full)
    sw.forward(a, [frame(BCAST, mac(1))] * 3)
    assert full.calls == [[frame(BCAST, mac(1))] * 3] and sw.dropped == 0


class ResponderPort:
    """A `Responder` host plugged into the switch: answers straight back through it."""

    def __init__(self, switch: BaseSwitch, responder: Responder) -> None:
        self.name = f"host-{responder.ip}"
        self.switch = switch
        self.responder = responder

    def send(self, frames: Sequence[bytes]) -> int:
        replies = [r for f in frames for r in self.responder.handle(f)]
        if replies:
            self.switch.forward(self, replies)  # re-entrant forward
        return len(frames)


def test_ping_through_switch(clock: FakeClock, variant: type[BaseSwitch]) -> None:
    sw = variant(clock=clock)
    guest_port = FakePort("guest")
    host = ResponderPort(sw, Responder())
    other = ResponderPort(sw, Responder("10.0.2.3", "52:54:00:12:35:03"))
    for p in (guest_port, host, other):
        sw.attach(p)
    pinger = Responder("10.0.2.15", "52:54:00:12:34:56")  # plays the guest
    for seq in (1, 2):
        pending = pinger.ping("10.0.2.2", seq=seq)
        while pending:
            sw.forward(guest_port, pending)
            got, guest_port.calls = guest_port.received, []
            pending = [r for f in got for r in pinger.handle(f)]
    assert [(r.src_ip, r.seq) for r in pinger.echo_replies] == [("10.0.2.2", 1), ("10.0.2.2", 2)]
    assert host.responder.echo_replies_sent == 2 and other.responder.echo_replies_sent == 0
    assert other.responder.arp_replies_sent == 0
    assert sw.table().keys() == {"52:54:00:12:34:56", "52:54:00:12:35:02"}


def test_switch_is_the_visible_alias() -> None:
    """`Switch` is one of the two siblings, picked by whether the extension is in use; no
    class builds another class's instances."""
    assert Switch is (CffiSwitch if _accel.lib is not None else PythonSwitch)
    assert not issubclass(CffiSwitch, PythonSwitch) and not issubclass(PythonSwitch, CffiSwitch)
    assert type(PythonSwitch()) is PythonSwitch
    assert "__new__" not in vars(BaseSwitch)


@pytest.mark.parametrize("bad", [-1, MAX_ENTRIES + 1, 2**31, 2**32 - 1, 2**40])
def test_max_entries_out_of_range_is_refused(variant: type[BaseSwitch], bad: int) -> None:
    with pytest.raises(ValueError, match=f"max_entries must be 0..{MAX_ENTRIES}"):
        variant(max_entries=bad)


@needs_cffi
def test_python_limit_is_the_c_limit() -> None:
    assert _accel.lib.VP_SWITCH_MAX_ENTRIES == MAX_ENTRIES


@needs_cffi
def test_c_switch_init_refuses_huge_tables_without_looping() -> None:
    """vp_switch_init used to double a 32-bit capacity past 2**31 (to 0) and loop forever for
    max_entries >= 2**31: it must return VP_ERR_TOO_LARGE at once (run in a child process so a
    regression fails on the timeout instead of hanging the suite)."""
    code = (
        "from vhostpy import _accel\n"
        "ffi, lib = _accel.ffi, _accel.lib\n"
        "sw = ffi.new('struct vp_switch *')\n"
        "for n in (lib.VP_SWITCH_MAX_ENTRIES + 1, 2**31, 2**31 + 5, 2**32 - 1):\n"
        "    print(n, lib.vp_switch_init(sw, n), sw.t == ffi.NULL)\n"
        "assert lib.vp_switch_init(sw, 4096) == 0 and sw.cap == 16384\n"
        "lib.vp_switch_free(sw)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=False,
                            env={"VHOSTPY_IMPLEMENTATION": "cffi", "PATH": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    too_large = str(_accel.lib.VP_ERR_TOO_LARGE)
    assert lines[1::3] == [too_large] * 4 and lines[2::3] == ["True"] * 4
