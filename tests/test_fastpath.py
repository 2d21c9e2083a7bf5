"""The compiled fast path against the pure-Python reference, in one process.

`_accel`'s choice of implementation; C and Python variants of `Virtqueue` giving identical
chains, used rings and notification decisions on identical rings; the net endpoints run by
C (count/sink, reflect, pcap capture, switch forwarding) giving the same frames, counters
and capture files as the Python path; and an idle served ring costing no CPU. Tests that
need the extension skip without it (the suite also runs whole under each implementation).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout
from scripted import ScriptedGuest
from test_net import ALL, F_CSUM, HDR_MRG, MODERN_NO_MRG, PEER_MAC, RING, STRIDE, Rig, frame, vhdr
from test_virtqueue_packed import PackedDriver, packed_layout
from tools import wait_until

from vhostpy import _accel
from vhostpy.errors import ConfigurationError
from vhostpy.net import FrameBatch
from vhostpy.pcap import PcapWriter
from vhostpy.switch import CffiSwitch, PythonSwitch
from vhostpy.virtqueue import (
    VIRTIO_F_IN_ORDER,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PythonVirtqueue,
    Virtqueue,
)
from vhostpy.virtqueue_packed import PackedVirtqueue
from vhostpy.vring import DefaultVirtqueue

#: C-against-Python comparisons: they run in the suite's cffi pass (ci/test.sh runs both); in
#: the pure-Python pass, or where no compiler built the extension, there is no C side to compare.
needs_cffi = pytest.mark.skipif(
    _accel.lib is None,
    reason=f"compares the compiled path with Python; this run uses {_accel.IMPLEMENTATION}")
IMPLEMENTATIONS = ["python", pytest.param("cffi", marks=needs_cffi)]
if _accel.lib is not None:
    from vhostpy.virtqueue_cffi import CffiPackedVirtqueue
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ _accel


def test_select_python_and_bad_values() -> None:
    assert _accel.select("python") == ("python", None, None)
    assert _accel.select(" Python ")[0] == "python"
    for bad in ("c", "pypy", "1"):
        with pytest.raises(ConfigurationError, match="auto, cffi, python"):
            _accel.select(bad)


def test_select_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> tuple[Any, Any]:
        raise ImportError("No module named 'vhostpy._native'")
    monkeypatch.setattr(_accel, "_load", missing)
    assert _accel.select(None) == ("python", None, None)
    assert _accel.select("auto") == ("python", None, None)
    with pytest.raises(ConfigurationError, match="cannot be loaded: No module named"):
        _accel.select("cffi")


@needs_cffi
def test_select_cffi() -> None:
    impl, ffi, lib = _accel.select("cffi")
    assert impl == "cffi" and ffi is not None and lib is not None
    assert _accel.select("auto")[0] == "cffi"


@pytest.mark.parametrize("value", ["python", "bogus", *(["cffi"] if _accel.lib else [])])
def test_environment_variable(value: str) -> None:
    env = {**os.environ, "VHOSTPY_IMPLEMENTATION": value}
    code = ("import vhostpy, vhostpy.vring as v, vhostpy.memory as m; "
            "print(vhostpy.implementation, type(v.DefaultVirtqueue(m.GuestMemory(), 0)).__name__)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, cwd=ROOT, timeout=60, check=False)
    if value == "bogus":
        assert result.returncode != 0 and "is not one of auto, cffi, python" in result.stderr
    else:
        expected = {"python": "python PythonVirtqueue", "cffi": "cffi CffiVirtqueue"}[value]
        assert result.stdout.split("\n")[0] == expected, result.stderr


# ------------------------------------------------------------------ rings: C == Python


def _make(variant: str, size: int, event_idx: bool) -> tuple[RingBuilder, Virtqueue]:
    mem, _ = anon_memory(1 << 20)
    rb = RingBuilder(mem, size, layout(size))
    cls = PythonVirtqueue if variant == "python" else DefaultVirtqueue
    vq = rb.attach(cls(mem, 0))
    vq.event_idx = event_idx
    return rb, vq


def _script(seed: int, rb: RingBuilder) -> list[list[tuple[str, Any]]]:
    """The same random driver actions for any ring builder (replayed per variant)."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(30):
        actions: list[tuple[str, Any]] = []
        for _ in range(rng.randrange(0, 6)):
            readable = [bytes([rng.randrange(256)]) * rng.randrange(1, 40)
                        for _ in range(rng.randrange(0, 3))]
            writable = [rng.randrange(1, 64) for _ in range(rng.randrange(0, 3))]
            if not readable and not writable:
                writable = [8]
            actions.append(("chain", (readable, writable, rng.random() < 0.3)))
        actions.append(("driver", (rng.random() < 0.3, rng.randrange(0, 8))))
        actions.append(("device", (rng.randrange(1, 9), rng.random() < 0.5)))
        rounds.append(actions)
    return rounds


@needs_cffi
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_c_and_python_agree(seed: int, event_idx: bool) -> None:
    traces = []
    for variant in ("python", "cffi"):
        rb, vq = _make(variant, 16, event_idx)
        calls: list[int] = []
        CallRunner(vq, lambda calls=calls: calls.append(1))
        trace: list[Any] = []
        for actions in _script(seed, rb):
            for kind, arg in actions:
                if kind == "chain":
                    readable, writable, indirect = arg
                    try:
                        rb.add_chain(readable, writable, indirect=indirect)
                    except RuntimeError:   # no free descriptors this round
                        pass
                elif kind == "driver":
                    no_interrupt, event = arg
                    rb.set_no_interrupt(no_interrupt)
                    rb.set_used_event(vq.used_idx + event)
                else:
                    limit, toggle = arg
                    if toggle:
                        vq.disable_notifications()
                    chains = vq.pop_many(limit)
                    trace.append([(c.head, c.readable, c.writable, c.readable_len,
                                   c.writable_len, c.read()) for c in chains])
                    vq.add_used_many([(c.head, c.writable_len) for c in chains])
                    trace.append((vq.needs_notification(), vq.signal_used(), len(calls)))
                    trace.append((vq.enable_notifications(), vq.has_available()))
                    trace.append(rb.memory.read(rb.lay.used, 6 + 8 * rb.size))
                    trace.append(rb.get_used())
        traces.append(trace)
    assert traces[0] == traces[1]


# ------------------------------------------------------------------ net endpoints


def _rig(impl: str, *, reflect: bool = False, capture: PcapWriter | None = None,
         fds: bool = False, python_rings: tuple[int, ...] = (), features: int | None = None,
         packed: bool = False) -> Rig:
    """A Rig on `impl`'s virtqueues; `fds=True`: calls go through eventfds (as a session sets
    them up), so the compiled path may signal from C and serve many bursts per call.
    `python_rings`: rings that are `PythonVirtqueue`s whatever `impl` is. `packed`: packed
    rings (`PackedDriver` on the driver's side) instead of split ones."""
    rig = Rig(features=features)
    rig.port.remove_handler(rig.handler)
    if impl == "python":
        rig.dev._fast = None
    if reflect:
        rig.port.set_consumer("reflect")
    if capture is not None:
        rig.port.set_capture(capture)
    for index in (0, 1):
        python = impl == "python" or index in python_rings
        vq: Virtqueue
        if packed:
            drv = PackedDriver(rig.mem, RING, packed_layout(RING, base=index * STRIDE,
                                                            data_size=STRIDE // 2))
            vq = (PackedVirtqueue if python else CffiPackedVirtqueue)(rig.mem, index)
            drv.attach(vq)
            # the driver's VIRTIO_F_IN_ORDER, as a session hands it to the ring
            vq.in_order = drv.in_order = bool(rig.features >> VIRTIO_F_IN_ORDER & 1)
            rig.rbs[index] = drv  # type: ignore[assignment]
        else:
            rb = rig.ring(index, start=False)
            vq = (PythonVirtqueue if python else DefaultVirtqueue)(rig.mem, index)
            rb.attach(vq)
        runner = CallRunner(vq, lambda index=index: rig.calls.update([index]))
        if fds:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            rig.fds[index] = fd
            runner.call_fd = fd
            runner.call = lambda fd=fd: os.eventfd_write(fd, 1)
        rig.vqs[index] = vq
        rig.dev.queue_started(index, vq)
    return rig


@needs_cffi
def test_a_pure_python_receive_ring_under_the_compiled_path() -> None:
    """C fills only a compiled receive ring: with a `PythonVirtqueue` there (a transport
    that built one itself), the generator, `transmit_to_guest` and reflect go through Python,
    with the same result as the pure-Python device."""
    seen = {}
    for impl, python_rings in (("python", ()), ("cffi", (0,))):
        rig = _rig(impl, reflect=True, python_rings=python_rings)
        rig.post(12)
        taken = rig.port.offer(FrameBatch([frame(64, k) for k in range(3)]), 4)
        accepted = rig.dev.transmit_to_guest([frame(70, 7), b"runt"])
        rig.transmit(*[[vhdr(), frame(80, k)] for k in range(3)])
        seen[impl] = (taken, accepted, rig.received_frames(), rig.port.counters())
    assert seen["cffi"] == seen["python"]
    assert seen["cffi"][:2] == (4, 1) and len(seen["cffi"][2]) == 8


BAD_CHAINS = [
    [vhdr()],                                        # header only
    [vhdr()[:5]],                                    # short header
    [vhdr(), b"\x01" * 10],                          # runt
    [vhdr(gso_type=1), frame(80)],                   # gso
    [vhdr(flags=1, csum_start=70, csum_offset=20), frame(80)],  # bad checksum offsets
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sink_counts_and_drops(impl: str) -> None:
    rig = _rig(impl)
    good = [[vhdr(), frame(64, k)] for k in range(25)]
    rig.transmit(*good, *BAD_CHAINS)
    c = rig.port.counters()["from_guest"]
    assert c == {"frames": 25, "bytes": 25 * 64,
                 "drops": {"header only": 1, "short header": 1, "runt": 1, "gso": 1,
                           "bad checksum offsets": 1},
                 "checksums": 0, "merged": 0}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transmit_header_unread_without_csum(impl: str) -> None:
    """Without VIRTIO_NET_F_CSUM the driver must send flags 0 and no GSO, so the header
    carries nothing and is not read (C leaves that cache line alone): a header that sets
    them anyway changes nothing. With CSUM (the default rig) such frames are dropped."""
    seen = {}
    for features in (ALL & ~(1 << F_CSUM), ALL):
        rig = _rig(impl, reflect=True, features=features)
        rig.post(4)
        sent = [frame(80, 1), frame(90, 2)]
        rig.transmit([vhdr(gso_type=1), sent[0]],
                     [vhdr(flags=1, csum_start=14, csum_offset=20), sent[1]])
        seen[features] = (rig.received_frames(), rig.port.counters()["from_guest"])
    got, counted = seen[ALL & ~(1 << F_CSUM)]
    assert got == [f[6:12] + f[0:6] + f[12:] for f in sent]
    assert counted["frames"] == 2 and counted["drops"] == {} and counted["checksums"] == 0
    got, counted = seen[ALL]
    assert len(got) == 1 and counted["drops"] == {"gso": 1} and counted["checksums"] == 1


def _reflect_run(impl: str, capture: PcapWriter | None) -> tuple[list[Any], dict[str, Any]]:
    rig = _rig(impl, reflect=True, capture=capture)
    rig.post(15)
    frames = [frame(60 + 7 * k, k) for k in range(25)]
    csum = bytearray(frame(90, 9))
    csum[14 + 20:14 + 22] = b"\x12\x34"
    rig.transmit(*[[vhdr(), f] for f in frames],
                 [vhdr(flags=1, csum_start=14, csum_offset=20), bytes(csum)], *BAD_CHAINS)
    got = rig.received()
    rig.post(20)
    rig.process(0)
    got += rig.received()
    return [(h, f) for h, f, _ in got], rig.port.counters()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_reflect_byte_exact(impl: str) -> None:
    got, counters = _reflect_run(impl, None)
    assert len(got) == 26
    for k, (header, data) in enumerate(got[:25]):
        sent = frame(60 + 7 * k, k)
        assert HDR_MRG.unpack(header) == (0, 0, 0, 0, 0, 0, 1)
        assert data == sent[6:12] + sent[0:6] + sent[12:]
    assert counters["to_guest"]["frames"] == 26


@needs_cffi
def test_reflect_and_capture_match_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(time, "time", lambda: 1700000000.25)
    results = {}
    for impl in ("python", "cffi"):
        path = tmp_path / f"{impl}.pcap"
        with PcapWriter(path) as writer:
            results[impl] = _reflect_run(impl, writer), writer.frames, writer.bytes
        results[impl] += (path.read_bytes(),)
    assert results["python"] == results["cffi"]
    assert results["cffi"][1] == 2 * 26


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_switch_between_two_ports(impl: str) -> None:
    switch = PythonSwitch() if impl == "python" else CffiSwitch()
    rigs = [_rig(impl), _rig(impl)]
    for rig in rigs:
        rig.port.set_consumer("switch", switch)
        switch.attach(rig.port)
    a, b = rigs
    b.post(30)
    a_mac, b_mac = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    first = [frame(100, k, dst=b_mac, src=a_mac) for k in range(5)]
    a.transmit(*[[vhdr(), f] for f in first])            # flooded: b_mac unknown
    b.transmit([vhdr(), frame(70, 1, dst=a_mac, src=b_mac)])  # learn b_mac (a has no buffers)
    second = [frame(200, k, dst=b_mac, src=a_mac) for k in range(20)]
    a.transmit(*[[vhdr(), f] for f in second])           # forwarded to b only
    a.transmit([vhdr(), frame(64, 0, dst=a_mac, src=a_mac)])  # filtered
    got = [f for _, f, _ in b.received()]
    assert got == first + second
    assert switch.counters() == {"forwarded": 21, "flooded": 5, "filtered": 1, "dropped": 0,
                                 "macs": 2}
    assert switch.lookup(b_mac) is b.port and switch.lookup(PEER_MAC) is None
    assert set(switch.table()) == {"02:00:00:00:00:01", "02:00:00:00:00:02"}
    assert len(a.dev.backlog) == 1 and a.port.counters()["to_guest"]["frames"] == 0
    switch.detach(a.port)
    assert set(switch.table()) == {"02:00:00:00:00:02"}


# ------------------------------------------------------------------ many bursts per C call


#: BAD_CHAINS with each chain in one buffer (so 60 chains fit a 64-descriptor test ring).
ONE_PART_BAD = [[b"".join(parts)] for parts in BAD_CHAINS]


def _signals(rig: Rig, index: int) -> int:
    try:
        return os.eventfd_read(rig.fds[index])
    except BlockingIOError:
        return 0


def _serve_all(rig: Rig, chains: list[list[bytes]], *, event_idx: bool = False
               ) -> tuple[list[tuple[int, int]], int]:
    """Publish `chains` on the transmit ring (more than one burst), serve it once;
    returns the used entries and how many calls the back-end made."""
    rb = rig.rbs[1]
    heads = []
    for parts in chains:
        heads.append(rb.add_chain(parts)[0])
    rig.process(1)
    used = rb.get_used()
    assert sorted(h for h, _ in used) == sorted(heads)
    return used, _signals(rig, 1)


@pytest.fixture
def small_bursts(monkeypatch: pytest.MonkeyPatch) -> None:
    """8-chain bursts, so a 64-entry test ring takes several bursts (and several per C call)."""
    if _accel.lib is not None:
        from vhostpy import net_cffi
        monkeypatch.setattr(net_cffi, "BURST", 8)
        monkeypatch.setattr(net_cffi, "POLL_BURSTS", 3)


def _used_poll_loop(rig: Rig) -> bool:
    return any(plan is not None for _, plan in rig.dev._fast._plans.values())


def _loop_rig(impl: str, **kw: Any) -> Rig:
    return _rig(impl, fds=True, **kw)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.usefixtures("small_bursts")
def test_poll_loop_sink_matches_python(impl: str) -> None:
    # 60 chains: several bursts and C calls, with every drop reason among them.
    rig = _loop_rig(impl)
    chains = [[vhdr() + frame(60 + k % 40, k)] for k in range(50)] + ONE_PART_BAD * 2
    used, calls = _serve_all(rig, chains)
    c = rig.port.counters()
    assert c["from_guest"]["frames"] == 50
    assert c["from_guest"]["drops"] == {"header only": 2, "short header": 2, "runt": 2,
                                        "gso": 2, "bad checksum offsets": 2}
    assert all(n == 0 for _, n in used) and calls >= 1
    if impl == "cffi":
        assert _used_poll_loop(rig), "the C polling loop was not used"
    rig.rbs[1].reclaim()
    # A second round reuses the ring: the counters keep adding up.
    _serve_all(rig, [[vhdr() + frame(64, k)] for k in range(10)])
    assert rig.port.counters()["from_guest"]["frames"] == 60


@needs_cffi
@pytest.mark.usefixtures("small_bursts")
def test_poll_loop_reflect_and_solo_switch_match_python() -> None:
    outcomes: dict[str, Any] = {}
    for impl in ("python", "cffi"):
        rig = _loop_rig(impl, reflect=True)
        rig.post(20)   # fewer buffers than frames: the rest waits in the backlog
        frames = [frame(60 + 3 * k, k) for k in range(45)]
        _, tx_calls = _serve_all(rig, [[vhdr() + f] for f in frames] + ONE_PART_BAD)
        got = rig.received()
        rig.post(40)
        rig.process(0)
        got += rig.received()
        outcomes[f"reflect-{impl}"] = ([(h, f) for h, f, _ in got], rig.port.counters(),
                                       len(rig.dev.backlog), tx_calls > 0)
        assert impl == "python" or _used_poll_loop(rig)

        switch = PythonSwitch() if impl == "python" else CffiSwitch()
        rig = _loop_rig(impl)
        rig.port.set_consumer("switch", switch)
        switch.attach(rig.port)
        _serve_all(rig, [[vhdr() + frame(64, k)] for k in range(50)] + ONE_PART_BAD)
        outcomes[f"switch-{impl}"] = (switch.counters(), rig.port.counters(),
                                      set(switch.table()))
    assert outcomes["reflect-python"] == outcomes["reflect-cffi"]
    assert outcomes["switch-python"] == outcomes["switch-cffi"]
    got, counters, backlog, _ = outcomes["reflect-cffi"]
    assert len(got) == 45 and backlog == 0
    assert counters["to_guest"]["frames"] == 45
    assert outcomes["switch-cffi"][0]["flooded"] == 50


def _mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


#: (source, destination) of frames a port alone on its switch sends, in order: runs of one
#: source and sources alternating, a destination unknown, then learnt mid-burst (then on
#: the sending port: filtered; also by the very frame that names it next), broadcast, a multicast and a zero source (dropped).
SOLO_MACS = ([(_mac(1), PEER_MAC)] * 6 + [(_mac(2), _mac(3)), (_mac(3), _mac(4)),
                                          (_mac(5), _mac(3)), (_mac(1), _mac(2))] * 3
             + [(_mac(4), b"\xff" * 6), (b"\x01\x00\x5e\x00\x00\x01", _mac(1)),
                (bytes(6), _mac(1)), (_mac(6), _mac(10)), (_mac(10), _mac(10))]
             + [(_mac(7 + k % 3), _mac(1)) for k in range(9)])


@needs_cffi
@pytest.mark.parametrize("max_entries", [4096, 3])
@pytest.mark.usefixtures("small_bursts")
def test_poll_loop_solo_switch_learns_like_python(max_entries: int) -> None:
    """A port alone on the compiled switch is served by C's in-place classification (the
    MACs read where the driver put them): what it learns, filters, drops and floods is what
    the Python switch decides, with the table full (3 entries) or not."""
    outcomes = {}
    for impl in ("python", "cffi"):
        switch = (PythonSwitch if impl == "python" else CffiSwitch)(max_entries=max_entries)
        rig = _loop_rig(impl)
        rig.port.set_consumer("switch", switch)
        switch.attach(rig.port)
        frames = [dst + src + b"\x88\xb5" + bytes(50) for src, dst in SOLO_MACS]
        # in one buffer, the header apart, or cut inside the source MAC
        _serve_all(rig, [[vhdr() + f] if k % 3 == 0 else [vhdr(), f] if k % 3 == 1 else
                         [vhdr() + f[:9], f[9:]] for k, f in enumerate(frames)])
        assert impl == "python" or _used_poll_loop(rig)
        outcomes[impl] = (switch.counters(), rig.port.counters(), sorted(switch.table()))
    assert outcomes["python"] == outcomes["cffi"]
    counters = outcomes["cffi"][0]
    assert counters["dropped"] == 2 and counters["filtered"] > 0 and counters["flooded"] > 0
    assert len(outcomes["cffi"][2]) == min(max_entries, 10)


def _odd_shapes(rng: random.Random) -> list[tuple[list[bytes], bool]]:
    """Transmit chains (parts, indirect) of every shape the reflect loop copies from: frames
    cut anywhere (inside the MACs, inside the header), in more pieces than C resolves at once,
    with a checksum to complete, larger than the MTU, in indirect tables, and bad ones."""
    chains: list[tuple[list[bytes], bool]] = []
    for k in range(24):   # a 64-entry ring: most cut-up chains go in indirect tables
        f = frame(rng.choice([60, 61, 100, 333, 1000, 1514]), k)
        data = vhdr() + f
        cuts = sorted(rng.sample(range(1, len(data)), rng.choice([0, 1, 2, 5])))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        chains.append((parts, len(parts) > 1 and k % 3 != 0))
    f = frame(120, 1)
    chains.append(([vhdr(), *[f[i:i + 5] for i in range(0, len(f), 5)]], True))  # 25 pieces
    csum = bytearray(frame(90, 9))
    csum[14 + 20:14 + 22] = b"\x12\x34"
    chains.append(([vhdr(flags=1, csum_start=14, csum_offset=20), bytes(csum[:30]),
                    bytes(csum[30:])], False))
    chains.append(([vhdr() + frame(1600, 2)], False))       # larger than the MTU
    chains += [(parts, False) for parts in ONE_PART_BAD]
    rng.shuffle(chains)
    return chains


@needs_cffi
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "no-mrg"])
@pytest.mark.usefixtures("small_bursts")
def test_poll_loop_reflect_copies_every_chain_shape_like_python(mrg: bool, packed: bool
                                                               ) -> None:
    """The C reflect loop copies each frame once, straight from transmit to receive
    buffers: the same frames, headers, used entries, counters and backlog as Python, on
    split and packed rings (plain frames go through a batch of receive chains popped at
    once, the rest one by one after the batch's unused chains were given back)."""
    features = None if mrg else MODERN_NO_MRG
    outcomes = {}
    for impl in ("python", "cffi"):
        rig = _loop_rig(impl, reflect=True, features=features, packed=packed)
        posted = rig.post(30 if mrg else 8, size=400)   # merged, or too small without mrg
        posted += rig.post(6 if mrg else 0, size=2048)
        rb = rig.rbs[1]
        sent = [rb.add_chain(parts, indirect=indirect)[0]
                for parts, indirect in _odd_shapes(random.Random(5))]
        rig.process(1)
        tx_used = rb.get_used()
        got = rig.received()
        backlog = len(rig.dev.backlog)
        posted += rig.post(20, size=2048)
        rig.process(0)
        got += rig.received()
        # VIRTIO_F_IN_ORDER (offered by the net device): buffers used in ring order.
        assert [h for h, _ in tx_used] == sent
        rx_heads = [h for _, _, entries in got for h, _ in entries]
        assert rx_heads == posted[:len(rx_heads)]
        outcomes[impl] = (tx_used, [(h, f, [n for _, n in e]) for h, f, e in got],
                          rig.port.counters(), backlog, len(rig.dev.backlog))
        assert impl == "python" or _used_poll_loop(rig)
    assert outcomes["cffi"] == outcomes["python"]
    counters, waited = outcomes["cffi"][2], outcomes["cffi"][3]
    assert counters["from_guest"]["frames"] == 27
    assert counters["to_guest"]["drops"].get("larger than MTU") == 1
    assert waited > 0 and outcomes["cffi"][4] == 0
    if mrg:
        assert counters["to_guest"]["merged"] > 0
    else:
        assert counters["to_guest"]["drops"].get("rx buffer too small", 0) > 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_offer_fills_the_ring_and_queues_nothing(impl: str, tmp_path: Path) -> None:
    with PcapWriter(tmp_path / "x.pcap") as writer:
        rig = _loop_rig(impl, capture=writer)
        batch = FrameBatch([frame(64, 1), frame(1400, 2), b"\x01" * 10])
        assert rig.port.offer(batch, 10) == 0          # no receive buffers yet
        rig.post(7)
        taken = rig.port.offer(batch, 50)
        got = rig.received_frames()
        # Cycling through the batch: the runt is refused and counted, never placed.
        assert taken == 10 and len(got) == 7
        assert got == [batch.frames[k % 3] for k in range(10) if k % 3 != 2]
        assert rig.port.counters()["to_guest"]["drops"] == {"runt": 3}
        assert not rig.dev.backlog
        rig.post(3)
        assert rig.port.offer(batch) == 3 and len(rig.received_frames()) == 2
        assert _signals(rig, 0) >= 1
        frames_written = writer.frames
    assert frames_written == 9


# ------------------------------------------------------------------ idle costs nothing


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_idle_backend_uses_no_cpu(tmp_path: Path, impl: str) -> None:
    sock = str(tmp_path / "net.sock")
    env = {**os.environ, "VHOSTPY_IMPLEMENTATION": impl}
    proc = subprocess.Popen([sys.executable, "-m", "vhostpy", "net", "--no-respond",
                             "--socket-path", sock], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guest = None
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        guest = ScriptedGuest(sock)
        guest.start()
        guest.setup_ring(0)
        tx = guest.setup_ring(1).builder
        for _ in range(20):   # some traffic first, so the ring was polled
            tx.add_chain([vhdr(), frame(64)])
        guest.kick(1)
        guest.wait_used(1, 20)
        event_idx = bool(guest.fe.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        wait_until(lambda: tx.device_wants_kicks(event_idx), 5.0,
                   "the back-end to stop polling the transmit ring")
        before = _cpu_seconds(proc.pid)
        time.sleep(1.0)
        used = _cpu_seconds(proc.pid) - before
        assert used < 0.05, f"idle back-end used {used:.2f} s of CPU in 1 s"
    finally:
        if guest is not None:
            guest.close()
        proc.terminate()
        proc.wait(10)


def test_vq_flags_roundtrip_after_idle_on_both() -> None:
    # A polled ring leaves kicks disabled; the transport's enable re-checks the ring.
    for cls in (PythonVirtqueue, DefaultVirtqueue):
        mem, _ = anon_memory(1 << 20)
        rb = RingBuilder(mem, 8, layout(8))
        vq = rb.attach(cls(mem, 0))
        runner = CallRunner(vq)
        runner.polling = True
        rb.add_chain([b"x"], [4])
        chains = vq.pop_many(8)
        vq.disable_notifications()
        assert len(chains) == 1 and rb.no_notify
        rb.add_chain([b"y"])
        runner.polling = False
        assert vq.enable_notifications() is True and not rb.no_notify
        head = rb.add_chain([b"z"], publish=False)[0]
        rb.publish(head)
        assert len(vq.pop_many(8)) == 2
        vq.reset()
        assert vq.size == 0
    assert VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT and VIRTQ_DESC_F_WRITE
