"""The public front doors, without QEMU: `vhostpy.Server`, `vhostpy.serve`,
`vhostpy.serve_async` and `vhostpy serve MODULE:CALLABLE`.

Front-ends are the in-tree scripted guest (`scripted.ScriptedGuest` over
`vhostpy.frontend.Frontend`): real sockets, real eventfds, a real ring in a memfd.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import stop as stop_process
from scripted import ScriptedGuest
from tools import wait_until

import vhostpy
from vhostpy import cli
from vhostpy.device import VIRTIO_ID_RNG, Device
from vhostpy.errors import ConfigurationError
from vhostpy.loop import AsyncioHost, EventLoop
from vhostpy.virtqueue import DescriptorChain, Virtqueue

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
#: Generous bounds for events that take milliseconds.
SOON = 10.0


class Filler(Device):
    """virtio-rng-shaped: fills each writable buffer with one byte value; records where it
    ran and whether anyone closed it."""

    device_id = VIRTIO_ID_RNG
    name = "filler"

    def __init__(self, byte: int = 0x5A) -> None:
        super().__init__()
        self.byte = byte
        self.threads: set[int] = set()
        self.closed = False

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        self.threads.add(threading.get_ident())
        return chain.write(bytes([self.byte]) * chain.writable_len)

    def close(self) -> None:
        self.closed = True


class AsyncFiller(Filler):
    """The same with an `async def handle_chain` that awaits the running loop's sleep."""

    name = "async-filler"

    def __init__(self, byte: int = 0xA5, delay: float = 0.01) -> None:
        super().__init__(byte)
        self.delay = delay
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def handle_chain(self, index: int, vq: Virtqueue,  # type: ignore[override]
                           chain: DescriptorChain) -> int:
        self.loops.append(asyncio.get_running_loop())
        self.threads.add(threading.get_ident())
        await asyncio.sleep(self.delay)
        # On an AsyncioHost the ring's thread is this one: writing here is safe.
        return chain.write(bytes([self.byte]) * chain.writable_len)


def fill_request(path: str, sizes: tuple[int, ...] = (32, 100), *, uniform: bool = True
                 ) -> ScriptedGuest:
    """Connect a scripted guest to `path`, have it fill one buffer per size, check the bytes
    (one repeated value, or random ones when not `uniform`) and return the guest, still
    connected (the caller closes it)."""
    guest = ScriptedGuest(path)
    try:
        guest.start()
        ring = guest.setup_ring(0)
        chains = [ring.builder.add_chain([], [n]) for n in sizes]
        guest.kick(0)
        used = dict(guest.wait_used(0, len(sizes)))
        for (head, (addr,)), n in zip(chains, sizes, strict=True):
            assert used[head] == n
            data = guest.memory.read(addr, n)
            assert (len(set(data)) == 1) == uniform, data.hex()
        return guest
    except BaseException:
        guest.close()
        raise


def filled_with(guest: ScriptedGuest, size: int = 16) -> int:
    """One more request on ring 0; the byte value the device filled it with."""
    ring = guest.rings[0]
    head, (addr,) = ring.builder.add_chain([], [size])
    guest.kick(0)
    ((h, n),) = guest.wait_used(0, 1)
    assert (h, n) == (head, size)
    data = guest.memory.read(addr, size)
    assert len(set(data)) == 1
    return data[0]


def disconnected(guest: ScriptedGuest) -> bool:
    return not guest.fe.is_connected()


@pytest.fixture
def guests() -> Iterator[list[ScriptedGuest]]:
    """Scripted guests a test connected; closed at the end."""
    started: list[ScriptedGuest] = []
    yield started
    for guest in started:
        guest.close()


# ------------------------------------------------------------------ vhostpy.Server


def test_package_exports_lazily() -> None:
    code = ("import sys, vhostpy; assert 'vhostpy.api' not in sys.modules; "
            "assert 'vhostpy.server' not in sys.modules; "
            "from vhostpy import Server, serve, serve_async; "
            "import vhostpy.api as api; "
            "assert (Server, serve, serve_async) == (api.Server, api.serve, api.serve_async)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30, env=ENV, check=False)
    assert r.returncode == 0, r.stderr
    assert {"Server", "serve", "serve_async"} <= set(dir(vhostpy))
    with pytest.raises(AttributeError):
        vhostpy.no_such_name  # noqa: B018


def test_two_devices_on_two_sockets_on_one_thread(tmp_path: Path,
                                                  guests: list[ScriptedGuest]) -> None:
    one, two = Filler(0x11), Filler(0x22)
    server = vhostpy.Server()
    try:
        a = server.add(one, socket_path=tmp_path / "a.sock")
        b = server.add(two, socket_path=str(tmp_path / "b.sock"))
        assert (a.device, b.device) == (one, two) and server.endpoints == [a, b]
        assert a.socket_path == str(tmp_path / "a.sock") and a.fd is None
        assert (a.connected, a.connections_served) == (False, 0)
        thread = server.start_thread()
        assert thread.daemon and thread.is_alive()
        guests.append(fill_request(str(a.socket_path)))
        guests.append(fill_request(str(b.socket_path)))
        assert [filled_with(g) for g in guests] == [0x11, 0x22]
        assert a.connected and b.connected
        assert a.connections_served == b.connections_served == 1
        assert one.threads == two.threads == {thread.ident}   # one loop for both
    finally:
        stopper = threading.Thread(target=server.stop)
        started = time.monotonic()
        stopper.start()
        stopper.join(SOON)
    assert not stopper.is_alive()
    assert time.monotonic() - started < 2.0, "stop() took too long"
    assert not thread.is_alive()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b.sock").exists()
    assert all(disconnected(g) for g in guests)            # front-ends dropped
    assert not a.connected and not b.connected
    assert not one.closed and not two.closed               # devices are the caller's
    server.stop()                                          # idempotent
    with pytest.raises(RuntimeError):
        server.add(Filler(), socket_path=tmp_path / "c.sock")
    assert not (tmp_path / "c.sock").exists()


def test_guest_after_guest_and_add_while_running(tmp_path: Path,
                                                  guests: list[ScriptedGuest]) -> None:
    with vhostpy.Server() as server:
        first = server.add(Filler(1), socket_path=tmp_path / "first.sock")
        server.start_thread()
        fill_request(str(first.socket_path)).close()
        wait_until(lambda: not first.connected, SOON, "the first guest to be gone")
        guests.append(fill_request(str(first.socket_path)))
        assert first.connections_served == 2
        # added from this thread while the loop runs on its own
        late = server.add(Filler(2), socket_path=tmp_path / "late.sock")
        guests.append(fill_request(str(late.socket_path)))
        assert filled_with(guests[-1]) == 2
    assert not (tmp_path / "first.sock").exists() and not (tmp_path / "late.sock").exists()
    assert all(disconnected(g) for g in guests)


def test_context_manager_stops_and_removes_sockets(tmp_path: Path) -> None:
    path = tmp_path / "cm.sock"
    with vhostpy.Server() as server:
        endpoint = server.add(Filler(), socket_path=path)
        thread = server.start_thread()
        fill_request(str(path)).close()
        assert path.exists()
    assert not path.exists() and not thread.is_alive()
    assert endpoint.connections_served == 1 and "closed" in repr(endpoint)


def test_context_manager_without_a_thread(tmp_path: Path) -> None:
    """Sockets listen from `add`; leaving the block removes them even if nothing ran."""
    with vhostpy.Server() as server:
        server.add(Filler(), socket_path=tmp_path / "idle.sock")
        assert (tmp_path / "idle.sock").exists()
    assert not (tmp_path / "idle.sock").exists()


def test_run_in_this_thread_stopped_from_another(tmp_path: Path) -> None:
    server = vhostpy.Server()
    endpoint = server.add(Filler(), socket_path=tmp_path / "run.sock")
    result: dict[str, Any] = {}

    def client() -> None:
        try:
            fill_request(str(endpoint.socket_path)).close()
            result["served"] = True
        finally:
            server.stop()
    helper = threading.Thread(target=client)
    helper.start()
    server.run()                  # returns once stop() has been called
    helper.join(SOON)
    assert result == {"served": True}
    assert not (tmp_path / "run.sock").exists()
    with pytest.raises(RuntimeError):
        server.run()              # stopped for good


class Stopper(Filler):
    """Stops its server from inside `handle_chain`, then goes on using the chain."""

    server: vhostpy.Server

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        self.server.stop()
        return super().handle_chain(index, vq, chain)


def test_stop_from_a_device_hook(tmp_path: Path, guests: list[ScriptedGuest]) -> None:
    """A hook on the loop's thread may stop the server: the endpoints close once it has
    returned (its chain completes), not under its feet."""
    server = vhostpy.Server()
    device = Stopper(0x33)
    device.server = server
    server.add(device, socket_path=tmp_path / "s.sock")
    thread = server.start_thread()
    guests.append(fill_request(str(tmp_path / "s.sock"), (24,)))
    thread.join(SOON)
    assert not thread.is_alive()
    assert not (tmp_path / "s.sock").exists()
    assert disconnected(guests[0])
    server.stop()


def test_stop_from_a_callback_on_an_asyncio_host(tmp_path: Path) -> None:
    async def main() -> tuple[bool, bool]:
        server = vhostpy.Server(host=AsyncioHost())
        device = Stopper(0x44)
        device.server = server
        server.add(device, socket_path=tmp_path / "a.sock")
        guest = await asyncio.to_thread(fill_request, str(tmp_path / "a.sock"), (12,))
        try:
            dropped = await asyncio.to_thread(wait_until, lambda: disconnected(guest), SOON,
                                              "the guest to be dropped")
        finally:
            guest.close()
        return dropped, (tmp_path / "a.sock").exists()
    assert asyncio.run(main()) == (True, False)


def test_inherited_listening_fd(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "fd.sock"))
    listener.listen(4)
    fd = listener.detach()
    with vhostpy.Server() as server:
        endpoint = server.add(Filler(7), fd=fd)
        assert endpoint.fd == fd and endpoint.socket_path is None
        server.start_thread()
        guest = fill_request(str(tmp_path / "fd.sock"))
        assert filled_with(guest) == 7
        guest.close()
    with pytest.raises(OSError):
        os.fstat(fd)             # the server closed the socket it was given


def add_error_cases(tmp_path: Path) -> list[tuple[str, dict[str, Any], str]]:
    (tmp_path / "file").write_text("keep me")
    return [
        ("missing-directory", {"socket_path": tmp_path / "missing" / "s.sock"}, "cannot listen"),
        ("regular-file", {"socket_path": tmp_path / "file"}, "not a socket"),
        ("too-long", {"socket_path": tmp_path / ("x" * 120)}, "too long"),
        ("neither", {}, "exactly one"),
        ("both", {"socket_path": tmp_path / "b.sock", "fd": 0}, "exactly one"),
        ("fd-not-a-socket", {"fd": os.open(tmp_path / "file", os.O_RDONLY)}, "not a socket"),
    ]


def test_add_errors_leave_nothing_behind(tmp_path: Path) -> None:
    with vhostpy.Server() as server:
        for name, kwargs, needle in add_error_cases(tmp_path):
            before = sorted(os.listdir(tmp_path))
            with pytest.raises(ConfigurationError, match=needle):
                server.add(Filler(), **kwargs)
            assert sorted(os.listdir(tmp_path)) == before, name
        assert (tmp_path / "file").read_text() == "keep me"
        with pytest.raises(ConfigurationError, match="not a vhostpy.device.Device"):
            server.add(object(), socket_path=tmp_path / "x.sock")  # type: ignore[arg-type]
        device = Filler()
        server.add(device, socket_path=tmp_path / "taken.sock")
        with pytest.raises(ConfigurationError, match="already served by this server"):
            server.add(Filler(), socket_path=tmp_path / "taken.sock")
        with pytest.raises(ConfigurationError, match="already served"):
            server.add(device, socket_path=tmp_path / "other.sock")
        with vhostpy.Server() as rival, pytest.raises(ConfigurationError, match="in use"):
            rival.add(Filler(), socket_path=tmp_path / "taken.sock")   # another server
        assert server.endpoints[0].socket_path == str(tmp_path / "taken.sock")
        assert not (tmp_path / "x.sock").exists() and not (tmp_path / "other.sock").exists()
    assert not (tmp_path / "taken.sock").exists()


def test_stop_without_start_and_a_callers_event_loop(tmp_path: Path) -> None:
    loop = EventLoop()
    try:
        server = vhostpy.Server(host=loop)
        server.add(Filler(), socket_path=tmp_path / "own.sock")
        thread = server.start_thread()
        fill_request(str(tmp_path / "own.sock")).close()
        server.stop()
        assert not thread.is_alive() and not (tmp_path / "own.sock").exists()
        ran: list[bool] = []
        loop.call_later(0, lambda: (ran.append(True), loop.stop()))
        loop.run()                    # the caller's loop is still usable: not closed
        assert ran == [True]
    finally:
        loop.close()
    never = vhostpy.Server()
    never.stop()
    never.stop()
    with pytest.raises(RuntimeError):
        never.start_thread()


# ------------------------------------------------------------------ asyncio


def test_serve_async_with_an_async_device(tmp_path: Path) -> None:
    path = str(tmp_path / "async.sock")
    device = AsyncFiller(0xA5)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(vhostpy.serve_async(device, socket_path=path))
        await asyncio.to_thread(wait_until, lambda: os.path.exists(path), SOON, "the socket")
        guest = await asyncio.to_thread(fill_request, path, (8, 64, 4096))
        try:
            outcome["byte"] = await asyncio.to_thread(filled_with, guest)
            # completions came from the application's own loop, on its thread
            outcome["same_loop"] = all(seen is loop for seen in device.loops)
            outcome["requests"] = len(device.loops)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                outcome["cancelled"] = True
            outcome["socket_left"] = os.path.exists(path)
            outcome["dropped"] = await asyncio.to_thread(
                wait_until, lambda: disconnected(guest), SOON, "the guest to be dropped")
        finally:
            guest.close()
    asyncio.run(main())
    assert outcome == {"byte": 0xA5, "same_loop": True, "requests": 4, "cancelled": True,
                       "socket_left": False, "dropped": True}
    assert device.threads == {threading.get_ident()} and not device.closed


def test_serve_async_cancelled_with_a_request_in_flight(tmp_path: Path) -> None:
    path = str(tmp_path / "inflight.sock")
    device = AsyncFiller(delay=3600)     # never finishes by itself

    async def main() -> bool:
        task = asyncio.create_task(vhostpy.serve_async(device, socket_path=path))
        await asyncio.to_thread(wait_until, lambda: os.path.exists(path), SOON, "the socket")

        def submit() -> ScriptedGuest:
            guest = ScriptedGuest(path)
            guest.start()
            ring = guest.setup_ring(0)
            ring.builder.add_chain([], [16])
            guest.kick(0)
            return guest
        guest = await asyncio.to_thread(submit)
        try:
            await asyncio.to_thread(wait_until, lambda: device.loops, SOON, "the request")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return os.path.exists(path)
        finally:
            guest.close()
    assert asyncio.run(main()) is False


def test_serve_async_bad_path_raises_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        await vhostpy.serve_async(Filler(), socket_path=str(tmp_path / "no" / "s.sock"))
    with pytest.raises(ConfigurationError, match="cannot listen"):
        asyncio.run(main())


def test_server_on_an_asyncio_host(tmp_path: Path) -> None:
    async def main() -> list[int]:
        server = vhostpy.Server(host=AsyncioHost())
        with pytest.raises(TypeError):
            server.start_thread()
        with pytest.raises(TypeError):
            server.run()
        with server:
            server.add(AsyncFiller(3), socket_path=tmp_path / "x.sock")
            # add() from another thread is handed to the loop's thread
            await asyncio.to_thread(server.add, Filler(4), socket_path=tmp_path / "y.sock")
            bytes_ = []
            for name in ("x.sock", "y.sock"):
                guest = await asyncio.to_thread(fill_request, str(tmp_path / name))
                bytes_.append(await asyncio.to_thread(filled_with, guest))
                guest.close()
        assert not (tmp_path / "x.sock").exists() and not (tmp_path / "y.sock").exists()
        return bytes_
    assert asyncio.run(main()) == [3, 4]


# ------------------------------------------------------------------ vhostpy.serve


def test_serve_needs_the_main_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            vhostpy.serve(Filler(), socket_path=tmp_path / "t.sock")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    helper = threading.Thread(target=run)
    helper.start()
    helper.join(SOON)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])
    assert not (tmp_path / "t.sock").exists()


def test_serve_bad_path_raises_and_restores_signals(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(ConfigurationError, match="not a socket"):
        (tmp_path / "file").write_text("")
        vhostpy.serve(Filler(), socket_path=tmp_path / "file")
    assert {s: signal.getsignal(s) for s in before} == before


SERVE_SCRIPT = """
import signal, sys
import vhostpy
from vhostpy.device import Device

class Filler(Device):
    device_id = 4
    name = "script-filler"
    requests = 0

    def handle_chain(self, index, vq, chain):
        self.requests += 1
        return chain.write(b"s" * chain.writable_len)

before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
device = Filler()
vhostpy.serve(device, socket_path=sys.argv[1])
after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
print(f"serve returned after {device.requests} requests; handlers restored: {before == after}",
      file=sys.stderr)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_serve_in_a_script_until_a_signal(tmp_path: Path, signum: int) -> None:
    """A script calling vhostpy.serve(): a signal makes serve() return, socket removed."""
    (tmp_path / "serve_it.py").write_text(SERVE_SCRIPT)
    path = tmp_path / "script.sock"
    proc = subprocess.Popen([sys.executable, "serve_it.py", str(path)], env=ENV, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_until(lambda: path.exists() or proc.poll() is not None, SOON, "the socket")
        assert proc.poll() is None
        fill_request(str(path), (16, 64)).close()
        guest = fill_request(str(path), (8,))     # connected when the signal comes
        try:
            rc, err = stop_process(proc, signum)
        finally:
            guest.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    assert "Traceback" not in err
    assert "serve returned after 3 requests; handlers restored: True" in err
    assert not path.exists()


# ------------------------------------------------------------------ vhostpy serve

MODULE = '''
import sys
from vhostpy.device import Device
from vhostpy.rng import RngDevice

VALUE = 3
LOADED_FROM = sys.path[0]


class Factory:
    @staticmethod
    def make():
        return RngDevice(max_bytes_per_request=16)


class Plain(Device):
    """No counters() method: the counters line says {}."""
    device_id = 4
    name = "plain"

    def handle_chain(self, index, vq, chain):
        return chain.write(b"p" * chain.writable_len)


def fails():
    raise ValueError("no device today")


def not_a_device():
    return "hello"


def bad_counters():
    device = Plain()
    device.counters = lambda: 42
    return device
'''


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostpy", "serve", *args]


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    """A directory with user modules, the good and the broken (the tests' cwd)."""
    (tmp_path / "mydevs.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def make(:\n    pass\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('kaboom at import')\n")
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    return tmp_path


SERVE_ERRORS = [
    ("no-colon", "mydevs.Factory.make", ["MODULE:CALLABLE"]),
    ("empty-callable", "mydevs:", ["MODULE:CALLABLE"]),
    ("no-module", "nosuchmodule:make", ["nosuchmodule:make", "ModuleNotFoundError"]),
    ("syntax-error", "broken:make", ["broken:make", "SyntaxError"]),
    ("raises-on-import", "boom:make", ["boom:make", "RuntimeError", "kaboom at import"]),
    ("exits-on-import", "quits:make", ["quits:make", "SystemExit"]),
    ("no-attribute", "mydevs:nothing", ["mydevs:nothing", "no attribute 'nothing'"]),
    ("no-nested-attribute", "mydevs:Factory.nope", ["mydevs:Factory.nope", "'Factory.nope'"]),
    ("not-callable", "mydevs:VALUE", ["mydevs:VALUE", "not a callable"]),
    ("call-raises", "mydevs:fails", ["mydevs:fails", "ValueError", "no device today"]),
    ("not-a-device", "mydevs:not_a_device", ["mydevs:not_a_device", "'hello'",
                                             "not a vhostpy.device.Device"]),
]


@pytest.mark.parametrize("spec,needles", [c[1:] for c in SERVE_ERRORS],
                         ids=[c[0] for c in SERVE_ERRORS])
def test_cli_serve_errors_are_one_line(modules: Path, spec: str, needles: list[str]) -> None:
    sock = modules / "s.sock"
    r = subprocess.run(serve_cmd(spec, "--socket-path", str(sock), "-v"), cwd=modules,
                       env=ENV, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vhostpy serve: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not sock.exists()


@pytest.mark.parametrize("args,needle", [
    ([], "MODULE:CALLABLE"),
    (["mydevs:Plain"], "--socket-path or --fd"),
    (["mydevs:Plain", "--socket-path", "x.sock", "--fd", "3"], "--fd"),
    (["mydevs:Plain", "--socket-path", "missing/s.sock"], "cannot listen"),
])
def test_cli_serve_usage_errors(modules: Path, args: list[str], needle: str) -> None:
    r = subprocess.run(serve_cmd(*args), cwd=modules, env=ENV, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("vhostpy serve: error: ") and needle in line, line
    assert not (modules / "x.sock").exists()


def start_serving(modules: Path, spec: str, sock: Path, *extra: str
                  ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(serve_cmd(spec, "--socket-path", str(sock), *extra), cwd=modules,
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_until(lambda: sock.exists() or proc.poll() is not None, SOON, "the socket")
    if proc.poll() is not None:
        raise AssertionError(proc.communicate()[1].decode())
    return proc


def test_cli_serve_a_users_device(modules: Path) -> None:
    sock = modules / "good.sock"
    proc = start_serving(modules, "mydevs:Factory.make", sock, "-v")
    try:
        guest = ScriptedGuest(str(sock))
        try:
            guest.start()
            ring = guest.setup_ring(0)
            ring.builder.add_chain([], [64])
            guest.kick(0)
            assert [n for _, n in guest.wait_used(0)] == [16]   # our RngDevice's limit
        finally:
            guest.close()
        proc.send_signal(signal.SIGUSR1)
        rc, err = stop_process(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    assert not sock.exists() and "Traceback" not in err
    assert "serving virtio-rng on" in err and "from mydevs:Factory.make" in err
    usr1, final = cli.parse_counters_lines(err)
    assert usr1["event"] == "SIGUSR1" and final["event"] == "exit"
    assert final["device"] == "virtio-rng"
    assert final["counters"]["requests"] == 1 and final["counters"]["bytes"] == 16
    assert final["counters"]["truncated"] == 1


@pytest.mark.parametrize("spec,warning", [("mydevs:Plain", False),
                                          ("mydevs:bad_counters", True)])
def test_cli_serve_without_counters_prints_empty_counters(modules: Path, spec: str,
                                                          warning: bool) -> None:
    sock = modules / "plain.sock"
    proc = start_serving(modules, spec, sock)
    try:
        fill_request(str(sock), (5,)).close()
        rc, err = stop_process(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    line = err.splitlines()[-1]
    assert json.loads(line) == {"device": "plain", "event": "exit", "counters": {}}
    assert ("counters() failed" in err) == warning, err
    assert not sock.exists()


# ------------------------------------------------------------------ the README's example


def test_example_devices_on_one_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """examples/rng_device.py, loaded as `vhostpy serve` loads it: the synchronous device and
    the async one (its coroutines on the EventLoop's companion thread, its writes on the
    ring's) side by side."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    from vhostpy.api import load_device

    sync = load_device("examples.rng_device:make_device")
    async_ = load_device("examples.rng_device:make_async_device")
    with vhostpy.Server() as server:
        for name, device in (("sync.sock", sync), ("async.sock", async_)):
            server.add(device, socket_path=tmp_path / name)
        server.start_thread()
        for name in ("sync.sock", "async.sock"):
            guest = fill_request(str(tmp_path / name), (16, 1000), uniform=False)
            try:
                ring = guest.rings[0]
                ring.builder.add_chain([], [8192])
                guest.kick(0)
                assert [n for _, n in guest.wait_used(0)] == [4096]   # the example's cap
            finally:
                guest.close()
    for device in (sync, async_):
        assert device.counters() == {"requests": 3, "bytes": 16 + 1000 + 4096}  # type: ignore[attr-defined]


def test_readme_shows_the_example_as_it_is() -> None:
    """Every README code block headed `# examples/rng_device.py` is a verbatim piece of that
    file, so the README's example is the tested one."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "rng_device.py").read_text()
    blocks = [block.split("\n", 1)[1] for block in readme.split("```python\n")[1:]
              if block.startswith("# examples/rng_device.py\n")]
    blocks = [block.split("```", 1)[0] for block in blocks]
    assert len(blocks) == 3
    for block in blocks:
        assert block in example, block
    for factory in ("make_device", "make_async_device"):
        assert f"examples.rng_device:{factory}" in readme
