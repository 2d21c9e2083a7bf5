"""Net handlers that answer: frames returned now, or later by an `async def` handler.

A `NetDevice` is served by `vhostpy.Server` (no `NetApp`) over a real socket to a
`ScriptedGuest` that transmits on ring 1 and keeps receive buffers posted on ring 0, so every
answer is checked where the guest sees it, in its receive ring. Run under both
implementations (the compiled path hands batches to `NetPort.deliver` from C bursts, the
pure-Python one from its own loop: `VHOSTPY_IMPLEMENTATION=python`).

Covered: a handler's returned frames (a list, one frame, scapy packets), answers that are
not frames (counted), an async handler answering later on the transport's asyncio loop (the
`EventLoop`'s companion thread, or the application's own loop under an `AsyncioHost`), an
async handler that raises (counted, the ring keeps serving), `max_pending_handlers`,
`send_threadsafe` learnt from the rings, and resets and stopped rings with answers pending
(cancelled, dropped and counted; a stopped receive ring gets nothing, the backlog stays
bounded). Last, the README's example service (examples/net_service.py) in-process, and the
README's blocks of it are the file's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from scripted import ScriptedGuest
from tools import wait_until

import vhostpy
from vhostpy.loop import AsyncioHost, EventLoop
from vhostpy.net import NetDevice, NetPort
from vhostpy.packets import Responder

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RX, TX = 0, 1
HDR = struct.Struct("<BBHHHHH")          # virtio_net_hdr with num_buffers (VERSION_1: 12 bytes)
RX_BUF_SIZE = 2048
GUEST_MAC = bytes.fromhex("525400aabbcc")
HOST_MAC = bytes.fromhex("525400123502")
SOON = 5.0


def frame(payload: bytes, *, dst: bytes = HOST_MAC, src: bytes = GUEST_MAC) -> bytes:
    """A plain Ethernet frame (local experimental EtherType) carrying `payload`."""
    return dst + src + b"\x88\xb5" + payload


def reply_to(f: bytes, tag: bytes = b"re:") -> bytes:
    """The answer the test handlers give to `f`: MACs swapped, `tag` before the payload."""
    return f[6:12] + f[0:6] + f[12:14] + tag + f[14:]


class Guest:
    """A ScriptedGuest with transmit ring 1 and receive ring 0 (buffers posted)."""

    def __init__(self, path: str, *, buffers: int = 16) -> None:
        self.g = ScriptedGuest(path)
        self.closed = False
        self.g.start()
        self.rx = self.g.setup_ring(RX).builder
        self.tx = self.g.setup_ring(TX).builder
        self.bufs: dict[int, int] = {}
        self.post(buffers)

    def post(self, count: int) -> None:
        for _ in range(count):
            head, addrs = self.rx.add_chain(writable=[RX_BUF_SIZE])
            self.bufs[head] = addrs[0]
        self.g.kick(RX)

    def send(self, *frames: bytes) -> None:
        """Transmit one chain per frame in one kick; returns once the device used them."""
        heads = [self.tx.add_chain([HDR.pack(0, 0, 0, 0, 0, 0, 0) + f])[0] for f in frames]
        self.g.kick(TX)
        used = self.g.wait_used(TX, len(heads))
        assert sorted(h for h, _ in used) == sorted(heads)

    def receive(self, count: int = 1) -> list[bytes]:
        """The next `count` frames in the receive ring."""
        frames = []
        for head, n in self.g.wait_used(RX, count):
            data = self.g.memory.read(self.bufs[head], n)
            frames.append(data[HDR.size:])
        self.post(count)
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.g.close()


class Served:
    """One device on a `vhostpy.Server`, and the guests that connect to it. `host` is the
    loop: "eventloop" (an `EventLoop` of the test's: coroutines run on its companion
    asyncio thread) or "asyncio" (an `AsyncioHost` over an asyncio loop the test runs on a
    thread: coroutines run on that loop, on the rings' thread, as under `serve_async`)."""

    def __init__(self, device: NetDevice, path: str, host: str = "eventloop") -> None:
        self.device = device
        self.path = path
        self.guests: list[Guest] = []
        self.aloop: asyncio.AbstractEventLoop | None = None
        if host == "eventloop":
            self.loop = EventLoop()
            self.server = vhostpy.Server(host=self.loop)
            self.thread = self.server.start_thread()
            self.call_soon_threadsafe = self.loop.call_soon_threadsafe
        else:
            self.aloop = aloop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=aloop.run_forever, daemon=True)
            self.thread.start()
            self.server = vhostpy.Server(host=AsyncioHost(aloop))
            self.call_soon_threadsafe = aloop.call_soon_threadsafe
        self.server.add(device, socket_path=path)

    @property
    def port(self) -> NetPort:
        return self.device.port

    def guest(self, **kwargs: Any) -> Guest:
        guest = Guest(self.path, **kwargs)
        self.guests.append(guest)
        # The rings start on the loop's thread once their kicks arrive.
        wait_until(lambda: self.call(lambda: self.device.path_config.rx_ring is not None),
                   SOON, "the receive ring to start")
        return guest

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop's thread; its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
                future.set_exception(exc)
        self.call_soon_threadsafe(run)
        return future.result(SOON)

    def counters(self) -> dict[str, Any]:
        counters: dict[str, Any] = self.call(self.port.counters)
        return counters

    def close(self) -> None:
        for guest in self.guests:
            guest.close()
        self.server.stop()
        if self.aloop is not None:
            self.aloop.call_soon_threadsafe(self.aloop.stop)
            self.thread.join(SOON)
            self.aloop.close()
        else:
            self.loop.close()


HOSTS = ["eventloop", "asyncio"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(device: NetDevice, host: str = "eventloop") -> Served:
        made.append(Served(device, str(tmp_path / f"net{len(made)}.sock"), host))
        return made[-1]

    yield make
    for served in made:
        served.close()


class Gate:
    """What an async handler waits for: opened from the test's thread."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.cancelled = threading.Event()

    async def wait(self) -> None:
        self.entered.set()
        try:
            while not self.opened.is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


# ------------------------------------------------------------------ answers returned now


def test_a_handler_returning_frames_answers_the_guest(serve: Callable[..., Served]) -> None:
    device = NetDevice()
    device.port.add_handler(lambda port, frames: [reply_to(f) for f in frames])
    device.port.add_handler(lambda port, frames: reply_to(frames[0], b"one:"))   # one frame
    device.port.add_handler(lambda port, frames: None)                           # no answer
    device.port.add_handler(lambda port, frames: iter([bytearray(reply_to(frames[-1], b"it:"))]))
    s = serve(device)
    guest = s.guest()
    a, b = frame(b"first"), frame(b"second")
    guest.send(a, b)
    assert guest.receive(4) == [reply_to(a), reply_to(b), reply_to(a, b"one:"),
                                reply_to(b, b"it:")]
    counters = s.counters()
    assert counters["handler_errors"] == 0
    assert counters["to_guest"]["frames"] == 4


@pytest.mark.parametrize("answer", [42, "text", [None], [b"\x00" * 4, object()]],
                         ids=["int", "str", "list of None", "bad item"])
def test_an_answer_that_is_not_frames_is_counted(serve: Callable[..., Served],
                                                 answer: object) -> None:
    device = NetDevice()
    device.port.add_handler(lambda port, frames: answer)
    device.port.add_handler(lambda port, frames: [reply_to(f) for f in frames])
    s = serve(device)
    guest = s.guest()
    for payload in (b"one", b"two"):
        guest.send(frame(payload))
        # nothing of the bad answer is sent; the next handler and the ring go on
        assert guest.receive() == [reply_to(frame(payload))]
    counters = s.counters()
    assert counters["handler_errors"] == 2
    assert counters["from_guest"]["frames"] == 2 and counters["to_guest"]["frames"] == 2


@pytest.mark.usefixtures("scapy_installed")
def test_a_scapy_handler_returns_scapy_packets(serve: Callable[..., Served]) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    def answer(port: NetPort, packets: list[Any]) -> list[Any]:
        return [Ether(src=p.dst, dst=p.src) / IP(src=p[IP].dst, dst=p[IP].src) /
                UDP(sport=p[UDP].dport, dport=p[UDP].sport) / Raw(bytes(p[Raw]).upper())
                for p in packets if UDP in p]
    device = NetDevice()
    device.port.add_handler(answer, scapy=True)
    s = serve(device)
    guest = s.guest()
    query = Ether(src="52:54:00:aa:bb:cc", dst="52:54:00:12:35:02") / \
        IP(src="10.0.2.15", dst="10.0.2.2") / UDP(sport=4000, dport=7) / Raw(b"hello")
    guest.send(bytes(query))
    (got,) = guest.receive()
    pkt = Ether(got)
    assert (pkt[IP].src, pkt[UDP].sport, pkt[UDP].dport) == ("10.0.2.2", 7, 4000)
    assert bytes(pkt[Raw]) == b"HELLO"
    assert s.counters()["handler_errors"] == 0


# ------------------------------------------------------------------ answers given later


@pytest.mark.parametrize("host", HOSTS)
def test_an_async_handler_answers_later(serve: Callable[..., Served], host: str) -> None:
    gate = Gate()
    threads: list[int] = []

    async def answer(port: NetPort, frames: list[bytes]) -> list[bytes]:
        threads.append(threading.get_ident())
        await gate.wait()
        return [reply_to(f) for f in frames]
    device = NetDevice()
    device.port.add_handler(answer)
    s = serve(device, host)
    guest = s.guest()
    query = frame(b"question")
    guest.send(query)                            # the transmit chain is used at once
    assert gate.entered.wait(SOON)
    assert s.call(lambda: device.port.handlers_pending) == 1
    assert guest.rx.used_idx == 0                # no answer yet, and the ring serves on:
    guest.send(frame(b"another"))
    wait_until(lambda: s.call(lambda: device.port.handlers_pending) == 2, SOON,
               "the second batch's handler")
    gate.opened.set()
    assert sorted(guest.receive(2)) == sorted([reply_to(query), reply_to(frame(b"another"))])
    wait_until(lambda: s.counters()["handlers_pending"] == 0, SOON, "the handlers to end")
    # on the EventLoop's companion asyncio thread; on the application's loop's own thread
    assert len(threads) == 2
    assert (s.thread.ident in threads) == (host == "asyncio")
    counters = s.counters()
    assert counters["handler_errors"] == 0 and counters["to_guest"]["frames"] == 2


def test_an_async_handler_on_the_applications_asyncio_loop(tmp_path: Path) -> None:
    """Under `Server(host=AsyncioHost())` (as `serve_async`), an async handler runs on the
    application's loop, on its thread, which is also the rings' thread."""
    path = str(tmp_path / "aio.sock")
    seen: list[tuple[asyncio.AbstractEventLoop, int]] = []

    async def answer(port: NetPort, frames: list[bytes]) -> list[bytes]:
        seen.append((asyncio.get_running_loop(), threading.get_ident()))
        await asyncio.sleep(0.01)
        return [reply_to(f) for f in frames]
    device = NetDevice()
    device.port.add_handler(answer)

    async def main() -> list[bytes]:
        server = vhostpy.Server(host=AsyncioHost())
        server.add(device, socket_path=path)
        guest = await asyncio.to_thread(Guest, path)
        try:
            await asyncio.to_thread(guest.send, frame(b"q"))
            return await asyncio.to_thread(guest.receive)
        finally:
            guest.close()
            server.stop()
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [reply_to(frame(b"q"))]
    finally:
        loop.close()
    assert seen == [(loop, threading.get_ident())]


def test_an_async_handler_that_raises_is_counted(serve: Callable[..., Served]) -> None:
    async def answer(port: NetPort, frames: list[bytes]) -> Any:
        await asyncio.sleep(0.001)
        if frames[0].endswith(b"boom"):
            raise RuntimeError("user bug")
        if frames[0].endswith(b"junk"):
            return 42                            # not frames: counted the same way
        return [reply_to(f) for f in frames]
    device = NetDevice()
    device.port.add_handler(answer)
    s = serve(device)
    guest = s.guest()
    guest.send(frame(b"boom"))
    wait_until(lambda: s.counters()["handler_errors"] == 1, SOON, "the failure to be counted")
    guest.send(frame(b"junk"))
    wait_until(lambda: s.counters()["handler_errors"] == 2, SOON, "the junk to be counted")
    guest.send(frame(b"fine"))
    assert guest.receive() == [reply_to(frame(b"fine"))]
    counters = s.counters()
    assert counters["from_guest"]["frames"] == 3 and counters["to_guest"]["frames"] == 1
    assert counters["handler_errors"] == 2 and counters["handlers_pending"] == 0


def test_too_many_pending_async_handlers_drop_batches(serve: Callable[..., Served]) -> None:
    gate = Gate()

    async def answer(port: NetPort, frames: list[bytes]) -> list[bytes]:
        await gate.wait()
        return [reply_to(f) for f in frames]
    device = NetDevice()
    device.port.max_pending_handlers = 2
    device.port.add_handler(answer)
    s = serve(device)
    guest = s.guest()
    for i in range(4):                            # one batch per kick
        guest.send(frame(b"q%d" % i))
    # The last batch's verdict may be counted just after its chain was used: wait for it.
    wait_until(lambda: (s.counters()["handlers_pending"], s.counters()["handler_drops"])
               == (2, 2), SOON, "two handlers pending and two batches dropped")
    gate.opened.set()
    # Each pending handler notices the gate on its own 5 ms timer: either may answer first.
    assert sorted(guest.receive(2)) == sorted([reply_to(frame(b"q0")), reply_to(frame(b"q1"))])
    wait_until(lambda: s.counters()["handlers_pending"] == 0, SOON, "the handlers to end")
    guest.send(frame(b"q4"))                      # room again
    assert guest.receive() == [reply_to(frame(b"q4"))]
    assert s.counters()["handler_errors"] == 0


# ------------------------------------------------------------------ send_threadsafe


def test_send_threadsafe_on_a_device_served_by_server(serve: Callable[..., Served]) -> None:
    device = NetDevice()
    with pytest.raises(RuntimeError, match="no event loop"):   # nothing knows its loop yet
        device.port.send_threadsafe([frame(b"too early")])
    s = serve(device)
    for round_ in range(2):                       # and still after a front-end went away
        guest = s.guest()
        frames = [frame(b"from a thread %d" % round_), frame(b"and another")]
        sender = threading.Thread(target=device.port.send_threadsafe, args=(iter(frames),))
        sender.start()
        sender.join(SOON)
        assert guest.receive(2) == frames
        guest.close()
        wait_until(lambda: s.call(lambda: device.path_config.rx_ring is None), SOON,
                   "the device reset")
    assert device.port.call_soon_threadsafe is None   # the application's knob stays its own


# ------------------------------------------------------------------ resets and stops


@pytest.mark.parametrize("host", HOSTS)
def test_a_reset_cancels_pending_async_handlers(serve: Callable[..., Served],
                                                host: str) -> None:
    gate = Gate()

    async def answer(port: NetPort, frames: list[bytes]) -> list[bytes]:
        await gate.wait()
        return [reply_to(f) for f in frames]
    device = NetDevice()
    device.port.add_handler(answer)
    s = serve(device, host)
    first = s.guest()
    first.send(frame(b"for the first guest"))
    assert gate.entered.wait(SOON)
    first.close()                                 # the front-end goes: the device resets
    assert gate.cancelled.wait(SOON)
    wait_until(lambda: s.counters()["handlers_pending"] == 0, SOON, "the cancellation")
    gate.entered.clear()
    gate.cancelled.clear()
    second = s.guest()
    second.send(frame(b"for the second"))
    assert gate.entered.wait(SOON)
    gate.opened.set()
    assert second.receive() == [reply_to(frame(b"for the second"))]
    counters = s.counters()
    assert counters["handler_errors"] == 0        # a cancellation the reset made is no error
    assert counters["to_guest"]["frames"] == 1 and second.rx.used_idx == 1


@pytest.mark.parametrize("host", HOSTS)
def test_a_late_answer_after_a_reset_is_dropped(serve: Callable[..., Served],
                                                host: str) -> None:
    """A handler that ignores its cancellation and answers anyway: the answer was meant for
    a driver that is gone, so it never reaches the next one. (Under an `EventLoop` the
    cancelled call's result is discarded on the companion thread; under an `AsyncioHost`
    it arrives, and is dropped and counted as the backlog is at a reset.)"""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    async def stubborn(port: NetPort, frames: list[bytes]) -> list[bytes]:
        entered.set()
        while not release.is_set():
            try:
                await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                continue                          # ignores it
        finished.set()
        return [reply_to(f) for f in frames] * 3
    device = NetDevice()
    device.port.add_handler(stubborn)
    s = serve(device, host)
    first = s.guest()
    first.send(frame(b"late"))
    assert entered.wait(SOON)
    first.close()
    wait_until(lambda: s.call(lambda: device.path_config.rx_ring is None), SOON, "the reset")
    second = s.guest()
    release.set()
    assert finished.wait(SOON)
    if host == "asyncio":
        wait_until(lambda: s.counters()["to_guest"]["drops"].get("device reset") == 3, SOON,
                   "the late answer to be dropped")
    device.port.remove_handler(stubborn)
    device.port.add_handler(lambda port, frames: [reply_to(f) for f in frames])
    second.send(frame(b"now"))
    assert second.receive() == [reply_to(frame(b"now"))]
    assert second.rx.used_idx == 1 and s.call(lambda: len(device.backlog)) == 0
    counters = s.counters()
    assert counters["handler_errors"] == 0 and counters["handlers_pending"] == 0


def test_an_answer_for_a_stopped_receive_ring_waits_in_the_bounded_backlog(
        serve: Callable[..., Served]) -> None:
    gate = Gate()

    async def answer(port: NetPort, frames: list[bytes]) -> list[bytes]:
        await gate.wait()
        return [reply_to(f, b"%d:" % i) for i in range(10) for f in frames]
    device = NetDevice(rx_backlog=4)
    device.port.add_handler(answer)
    s = serve(device)
    guest = s.guest()
    guest.send(frame(b"q"))
    assert gate.entered.wait(SOON)
    guest.g.fe.get_vring_base(RX)                 # the receive ring stops (no reset)
    assert s.call(lambda: device.path_config.rx_ring) is None
    gate.opened.set()
    wait_until(lambda: s.counters()["handlers_pending"] == 0, SOON, "the answer")
    counters = s.counters()
    assert counters["backlog"] == 4               # bounded by rx_backlog; the rest dropped
    assert counters["to_guest"]["drops"] == {"no rx buffers": 6}
    assert guest.rx.used_idx == 0                 # nothing went into the stopped ring
    assert counters["handler_errors"] == 0
    guest.close()                                 # the reset drops the backlog
    wait_until(lambda: s.counters()["backlog"] == 0, SOON, "the reset")
    assert s.counters()["to_guest"]["drops"] == {"no rx buffers": 6, "device reset": 4}


# ------------------------------------------------------------------ the README's example


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    """examples/net_service.py, imported as `vhostpy serve` imports it (from the root)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    monkeypatch.delitem(sys.modules, "examples.net_service", raising=False)
    return importlib.import_module("examples.net_service")


@pytest.mark.usefixtures("scapy_installed")
def test_the_example_service_answers_arp_now_and_tftp_later(
        serve: Callable[..., Served], example: Any) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    from vhostpy.api import load_device

    device = load_device("examples.net_service:make_device")
    assert isinstance(device, example.NetService)
    s = serve(device)
    guest = s.guest()
    me = Responder("10.0.2.15", mac="52:54:00:aa:bb:cc")
    guest.send(me.arp_request(example.SERVICE_IP))
    (arp,) = guest.receive()
    assert me.handle(arp) == [] and me.neighbours[example.SERVICE_IP] == HOST_MAC
    assert Ether(arp)[ARP].op == 2

    def tftp(payload: bytes, sport: int = 40000) -> bytes:
        return bytes(Ether(src="52:54:00:aa:bb:cc", dst="52:54:00:12:35:02") /
                     IP(src="10.0.2.15", dst=example.SERVICE_IP) /
                     UDP(sport=sport, dport=69) / Raw(payload))
    guest.send(tftp(b"\x00\x01motd\x00octet\x00"),
               tftp(b"\x00\x01nothing-here\x00octet\x00", 40001))
    got = [Ether(f) for f in guest.receive(2)]
    for pkt in got:
        assert (pkt.dst, pkt[IP].src, pkt[IP].dst) == \
            ("52:54:00:aa:bb:cc", example.SERVICE_IP, "10.0.2.15")
        assert pkt[UDP].sport == 69
        again = pkt.copy()                        # scapy recomputes deleted checksums
        del again[IP].chksum, again[UDP].chksum
        rebuilt = Ether(bytes(again))
        assert (rebuilt[IP].chksum, rebuilt[UDP].chksum) == (pkt[IP].chksum, pkt[UDP].chksum)
    data, error = sorted(got, key=lambda p: p[UDP].dport)
    assert data[UDP].dport == 40000
    assert bytes(data[UDP].payload) == b"\x00\x03\x00\x01" + example.FILES["motd"]
    assert bytes(error[UDP].payload) == b"\x00\x05\x00\x01File not found\x00"
    guest.send(tftp(b"\x00\x04\x00\x01"))            # the client's ACK: not answered
    guest.send(tftp(b"\x00\x01motd\x00octet\x00", 40002))
    (again,) = guest.receive()
    assert Ether(again)[UDP].dport == 40002 and guest.rx.used_idx == 4
    counters = s.call(device.counters)
    assert (counters["files_sent"], counters["not_found"]) == (2, 1)
    assert counters["port"]["handler_errors"] == 0


def test_readme_shows_the_example_as_it_is() -> None:
    """Every README code block headed `# examples/net_service.py` is a verbatim piece of
    that file, so the README's example is the tested one."""
    readme = (ROOT / "README.md").read_text()
    source = (ROOT / "examples" / "net_service.py").read_text()
    blocks = [block.split("\n", 1)[1].split("```", 1)[0]
              for block in readme.split("```python\n")[1:]
              if block.startswith("# examples/net_service.py\n")]
    assert blocks
    for block in blocks:
        assert block in source, block
    assert "examples.net_service:make_device" in readme
