"""NbdStore against real NBD servers: qemu-nbd and nbdkit on temporary UNIX sockets and TCP ports.

URI parsing is tested alone; everything else talks to a server process (no mocks of servers; a
plain listener stands in only for "a server that is not NBD"). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from procs import terminate
from tools import require_tool, wait_until

from vhostpy import nbd
from vhostpy.errors import ConfigurationError
from vhostpy.nbd import DEFAULT_PORT, NbdAddress, NbdStore, parse_uri

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    """Run ``coro`` on a fresh loop, never for longer than ``timeout`` seconds."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image(tmp_path: Path, size: int = SIZE, seed: int = 1, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def image_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class Server:
    """A server process listening on ``uri``; ``stop()`` ends it."""

    def __init__(self, argv: list[str], uri: str, log_path: Path) -> None:
        self.uri, self.log_path = uri, log_path
        self.address = parse_uri(uri)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_until(self._listening, 10, f"{argv[0]} listening on {uri}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.uri}: server exited:\n{self.log_path.read_text()}")
        a = self.address
        family = socket.AF_UNIX if a.socket_path else socket.AF_INET
        with socket.socket(family) as s:
            try:
                s.connect(a.socket_path or (a.host, a.port))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        terminate(self.proc, timeout=5)


Start = Callable[..., Server]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """``start("qemu-nbd" | "nbdkit", *args, tcp=False, export="")``: a server, stopped after
    the test. The listening address (-k/-U or -b/-p) is added here."""
    servers: list[Server] = []

    def _start(tool: str, *args: str, tcp: bool = False, export: str = "") -> Server:
        exe = require_tool(tool, "install it with ci/nbd/install-deps.sh")
        n = len(servers)
        sock = str(tmp_path / f"{tool}{n}.sock")
        port = free_port()
        if tool == "qemu-nbd":
            where = ["-b", "127.0.0.1", "-p", str(port)] if tcp else ["-k", sock]
            argv = [exe, "-f", "raw", "--persistent", "--shared=8", "-x", export, *where, *args]
        else:
            where = ["-i", "127.0.0.1", "-p", str(port)] if tcp else ["-U", sock]
            argv = [exe, "--foreground", "--exit-with-parent", *where, *args]
        uri = (f"nbd://127.0.0.1:{port}/{export}" if tcp
               else f"nbd+unix:///{export}?socket={sock}")
        servers.append(Server(argv, uri, tmp_path / f"{tool}{n}.log"))
        return servers[-1]

    yield _start
    for server in servers:
        server.stop()


# ------------------------------------------------------------------ URIs


@pytest.mark.parametrize(("uri", "expected"), [
    ("nbd://example.com/disk", NbdAddress("", "disk", host="example.com", port=DEFAULT_PORT)),
    ("nbd://127.0.0.1:10810", NbdAddress("", "", host="127.0.0.1", port=10810)),
    ("nbd://example.com/", NbdAddress("", "", host="example.com")),
    ("NBD://[::1]:5000/hello%20world", NbdAddress("", "hello world", host="::1", port=5000)),
    ("nbd://h//disk", NbdAddress("", "/disk", host="h")),
    ("nbd+unix:///disk?socket=/run/nbd.sock", NbdAddress("", "disk", socket_path="/run/nbd.sock")),
    ("nbd+unix:///?socket=a%20b.sock", NbdAddress("", "", socket_path="a b.sock")),
    ("nbd+unix://?socket=%00/abstract&x-mine=1", NbdAddress("", "", socket_path="\0/abstract")),
])
def test_parse_good_uris(uri: str, expected: NbdAddress) -> None:
    got = parse_uri(uri)
    assert got.uri == uri
    assert (got.export, got.host, got.port, got.socket_path) == (
        expected.export, expected.host, expected.port, expected.socket_path)


@pytest.mark.parametrize("uri", [
    "nbds://example.com/disk", "nbds+unix:///disk?socket=s", "http://example.com/disk",
    "/tmp/disk.sock", "nbd+unix:///disk", "nbd+unix:///disk?socket=", "nbd+unix://host/d?socket=s",
    "nbd://h:99999/disk", "nbd://h:port/disk", "nbd://h:0/", "nbd:///disk", "nbd://h/d?foo=1",
    "nbd://h/d?socket=s", "nbd://h/d#frag", "nbd://user@h/d", "nbd+unix:///?socket=a&socket=b",
    "nbd://h/" + "x" * 4097,
])
def test_parse_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_uri(uri)
    assert repr(uri) in str(info.value)


# ------------------------------------------------------------------ handshake


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_nbd_handshake(start: Start, tmp_path: Path, tcp: bool) -> None:
    server = start("qemu-nbd", str(image(tmp_path)), export="disk", tcp=tcp)
    store = NbdStore.connect(server.uri, timeout=5)
    try:
        assert (store.size, store.read_only, store.block_size) == (SIZE, False, 4096)
        assert store.max_block_size == 32 * MiB and store.max_request == 32 * MiB
        assert store.can_flush and store.can_discard and store.can_write_zeroes
        assert store.can_multi_conn  # qemu-nbd --shared=8
        assert store.address.export == "disk" and store.uri == server.uri
    finally:
        store.close()


def test_nbdkit_handshake_without_block_sizes(start: Start) -> None:
    # nbdkit's memory plugin states no block sizes, and --mask-handshake=1 drops NO_ZEROES
    server = start("nbdkit", "--mask-handshake=1", "memory", "3M")
    store = NbdStore(server.uri)
    try:
        assert (store.size, store.block_size, store.max_request) == (3 * MiB, 512, 32 * MiB)
        assert store.min_block_size == 1 and store.preferred_block_size == 0
    finally:
        store.close()


def test_unknown_export_names_the_servers_reason(start: Start, tmp_path: Path) -> None:
    server = start("qemu-nbd", str(image(tmp_path)), export="disk")
    uri = server.uri.replace("/disk?", "/nope?")
    with pytest.raises(ConfigurationError) as info:
        NbdStore(uri)
    text = str(info.value)
    assert uri in text and "unknown export" in text and "'nope' not present" in text


def test_connection_refused(tmp_path: Path) -> None:
    for uri in (f"nbd://127.0.0.1:{free_port()}/", f"nbd+unix:///?socket={tmp_path}/none.sock"):
        with pytest.raises(ConfigurationError, match="cannot connect") as info:
            NbdStore(uri, timeout=2)
        assert uri in str(info.value)


def test_oldstyle_and_non_fixed_servers_are_refused(start: Start) -> None:
    with pytest.raises(ConfigurationError, match="oldstyle"):
        NbdStore(start("nbdkit", "--oldstyle", "memory", "1M").uri)
    with pytest.raises(ConfigurationError, match="fixed newstyle"):
        NbdStore(start("nbdkit", "--mask-handshake=0", "memory", "1M").uri)


def test_a_server_that_is_not_nbd(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "http.sock")
    listener.bind(path)
    listener.listen()

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(ConfigurationError, match="not an NBD server"):
            NbdStore(f"nbd+unix:///?socket={path}", timeout=5)
    finally:
        thread.join(5)
        listener.close()


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("kind", ["qemu-nbd", "qemu-nbd-tcp", "nbdkit-file"])
def test_writes_land_in_the_image(start: Start, tmp_path: Path, kind: str) -> None:
    path = image(tmp_path)
    if kind == "nbdkit-file":
        server = start("nbdkit", "file", str(path))
    else:
        server = start("qemu-nbd", str(path), export="disk", tcp=kind.endswith("tcp"))
    store = NbdStore(server.uri)
    data = random.Random(2).randbytes(3 * 4096 + 512)

    async def main() -> None:
        await store.write(4096, data)
        await store.write(SIZE - 512, bytearray(b"\xab" * 512))
        await store.write(65536, memoryview(b"mv" * 256))
        await store.flush()
        assert await store.read(4096, len(data)) == data
        assert await store.read(SIZE - 1024, 1024) == image_bytes(path, SIZE - 1024, 512) + \
            b"\xab" * 512
        assert await store.read(0, 0) == b""
        await store.aclose()

    run(main())
    assert image_bytes(path, 4096, len(data)) == data
    assert image_bytes(path, SIZE - 512, 512) == b"\xab" * 512
    assert image_bytes(path, 65536, 512) == b"mv" * 256


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-memory"])
def test_hundreds_of_requests_in_flight(start: Start, tmp_path: Path, kind: str) -> None:
    path = image(tmp_path)
    if kind == "qemu-nbd":
        server = start("qemu-nbd", str(path), export="disk")
        model = bytearray(path.read_bytes())
    else:
        server = start("nbdkit", "--threads=16", "memory", str(SIZE))
        model = bytearray(SIZE)
    store = NbdStore(server.uri)
    rng = random.Random(3)
    slot = 16 * KiB
    slots = list(range(SIZE // slot))
    rng.shuffle(slots)

    async def check_read(offset: int, length: int) -> None:
        assert await store.read(offset, length) == bytes(model[offset:offset + length])

    async def main() -> None:
        # one round: writes to 150 slots and reads of 150 others, all at once (a slot is
        # touched by one request, so any order the server picks gives the same result)
        await check_read(0, 512)  # attached: every request below goes out at its first step
        ops: list[Awaitable[None]] = []
        for i, s in enumerate(slots[:300]):
            offset = s * slot + rng.randrange(0, slot // 512) * 512
            length = rng.randrange(1, (s + 1) * slot - offset + 1)
            if i % 2:
                data = rng.randbytes(length)
                model[offset:offset + length] = data
                ops.append(store.write(offset, data))
            else:
                ops.append(check_read(offset, length))
        tasks = [asyncio.ensure_future(op) for op in ops]
        await asyncio.sleep(0)
        assert len(store._pending) >= 200
        await asyncio.gather(*tasks)
        reads = [store.read(s * slot, slot) for s in range(SIZE // slot)]
        assert b"".join(await asyncio.gather(*reads)) == bytes(model)
        await store.aclose()

    run(main())
    if kind == "qemu-nbd":
        assert path.read_bytes() == bytes(model)


def test_replies_out_of_order_reach_their_requests(start: Start) -> None:
    # reads wait 50 ms in the server, writes do not: the replies come back out of order
    store = NbdStore(start("nbdkit", "--filter=delay", "memory", "1M", "delay-read=50ms").uri)
    done: list[str] = []

    async def read(i: int) -> None:
        assert await store.read(i * 4096, 4096) == bytes([i]) * 4096
        done.append(f"r{i}")

    async def write(i: int) -> None:
        await store.write(65536 + i * 512, bytes([i]) * 512)
        done.append(f"w{i}")

    async def main() -> None:
        await asyncio.gather(*(store.write(i * 4096, bytes([i]) * 4096) for i in range(8)))
        await asyncio.gather(*(f(i) for i in range(8) for f in (read, write)))
        # every write finished before any read, though each read went out before its write
        assert sorted(done[:8]) == [f"w{i}" for i in range(8)]
        assert await store.read(65536, 4096) == b"".join(bytes([i]) * 512 for i in range(8))
        await store.aclose()

    run(main())


def test_requests_above_the_maximum_block_size_are_split(start: Start) -> None:
    # the filter makes nbdkit refuse (EINVAL) any request above 64 KiB or off 512 bytes
    server = start("nbdkit", "--filter=blocksize-policy", "memory", "4M",
                   "blocksize-minimum=512", "blocksize-preferred=4K", "blocksize-maximum=64K",
                   "blocksize-error-policy=error")
    store = NbdStore(server.uri, max_request=1 << 30)
    assert (store.min_block_size, store.block_size, store.max_block_size) == (512, 4096, 65536)
    assert store.max_request == 65536
    data = random.Random(4).randbytes(MiB + 3 * 512)

    async def main() -> None:
        await store.write(512, data)
        assert await store.read(512, len(data)) == data
        await store.write_zeroes(1024, 300 * KiB)
        assert await store.read(1024, 300 * KiB) == bytes(300 * KiB)
        await store.discard(0, 4 * MiB)
        with pytest.raises(OSError) as info:
            await store.read(100, 512)
        assert info.value.errno == errno.EINVAL and "minimum block size 512" in str(info.value)
        await store.aclose()

    run(main())


def test_qemu_nbd_limit_of_32_mib(start: Start, tmp_path: Path) -> None:
    path = image(tmp_path, 48 * MiB)
    store = NbdStore(start("qemu-nbd", str(path)).uri)
    data = random.Random(5).randbytes(40 * MiB)

    async def main() -> None:
        await store.write(4 * MiB, data)
        assert await store.read(4 * MiB, len(data)) == data
        await store.aclose()

    run(main())
    assert image_bytes(path, 4 * MiB, len(data)) == data


def test_small_max_request_splits_too(start: Start, tmp_path: Path) -> None:
    path = image(tmp_path)
    store = NbdStore(start("qemu-nbd", str(path)).uri, max_request=4096)
    assert store.max_request == 4096
    data = random.Random(6).randbytes(100 * 4096 + 7)

    async def main() -> None:
        await store.write(0, data)
        assert await store.read(0, len(data)) == data
        await store.aclose()

    run(main())
    assert image_bytes(path, 0, len(data)) == data


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-file"])
def test_flush_discard_and_write_zeroes_reach_the_image(start: Start, tmp_path: Path,
                                                          kind: str) -> None:
    path = image(tmp_path)
    if kind == "qemu-nbd":
        server = start("qemu-nbd", "--discard=unmap", str(path))
    else:
        server = start("nbdkit", "file", str(path))
    store = NbdStore(server.uri)
    assert store.can_discard and store.can_write_zeroes and store.can_flush

    async def main() -> None:
        await store.write(0, b"\x01" * (2 * MiB))
        await store.write_zeroes(256 * KiB, 512 * KiB)
        await store.discard(MiB, 512 * KiB)  # hole punched: reads back as zeros here
        await store.flush()
        assert await store.read(256 * KiB, 512 * KiB) == bytes(512 * KiB)
        await store.aclose()

    run(main())
    assert image_bytes(path, 0, 256 * KiB) == b"\x01" * (256 * KiB)
    assert image_bytes(path, 256 * KiB, 512 * KiB) == bytes(512 * KiB)
    assert image_bytes(path, 768 * KiB, 256 * KiB) == b"\x01" * (256 * KiB)
    assert image_bytes(path, MiB, 512 * KiB) == bytes(512 * KiB)
    assert image_bytes(path, 1536 * KiB, 512 * KiB) == b"\x01" * (512 * KiB)


def test_write_zeroes_without_server_support_writes_zeros(start: Start) -> None:
    server = start("nbdkit", "--filter=nozero", "--filter=nocache", "memory", "8M")
    store = NbdStore(server.uri)
    assert not store.can_write_zeroes

    async def main() -> None:
        await store.write(0, b"\xff" * (4 * MiB))
        await store.write_zeroes(4096, 3 * MiB + 4096)
        got = await store.read(0, 4 * MiB)
        assert got == b"\xff" * 4096 + bytes(3 * MiB + 4096) + b"\xff" * (MiB - 8192)
        await store.aclose()

    run(main())


def test_read_only_export_refuses_writes(start: Start, tmp_path: Path) -> None:
    path = image(tmp_path)
    store = NbdStore(start("qemu-nbd", "-r", str(path)).uri)
    assert store.read_only and not store.can_discard and not store.can_write_zeroes

    async def main() -> None:
        assert await store.read(0, 4096) == image_bytes(path, 0, 4096)
        for call in (store.write(0, b"x" * 512), store.write_zeroes(0, 512),
                     store.discard(0, 512)):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.EPERM and "read-only" in str(info.value)
        await store.aclose()

    run(main())


# ------------------------------------------------------------------ failures


def test_server_errors_raise_oserror_and_the_connection_stays(start: Start,
                                                               tmp_path: Path) -> None:
    trigger = tmp_path / "fail-reads"
    server = start("nbdkit", "--filter=error", "memory", "1M", "error-pread=EIO",
                   "error-pread-rate=1", f"error-pread-file={trigger}")
    store = NbdStore(server.uri)

    async def main() -> None:
        await store.write(0, b"a" * 8192)
        trigger.touch()
        results = await asyncio.gather(*(store.read(i * 512, 512) for i in range(8)),
                                       return_exceptions=True)
        for i, err in enumerate(results):
            assert isinstance(err, OSError) and err.errno == errno.EIO
            assert f"READ offset={i * 512} length=512" in str(err) and "EIO" in str(err)
        await store.write(8192, b"b" * 512)  # still usable
        trigger.unlink()
        assert await store.read(0, 8704) == b"a" * 8192 + b"b" * 512
        await store.aclose()

    run(main())


def test_server_shutdown_error_stops_the_store(start: Start,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = start("nbdkit", "--filter=error", "memory", "1M", "error-pread=ESHUTDOWN",
                   "error-pread-rate=1")
    store = NbdStore(server.uri)

    async def main() -> None:
        with pytest.raises(OSError) as info:
            await store.read(0, 512)
        assert info.value.errno == errno.ESHUTDOWN
        with pytest.raises(OSError, match="shutting down"):
            await store.write(0, b"x" * 512)
        await store.aclose()

    with caplog.at_level(logging.WARNING, logger="vhostpy.nbd"):
        run(main())
    assert len([r for r in caplog.records if r.name == "vhostpy.nbd"]) == 1


def test_server_killed_mid_flight_fails_pending_requests(start: Start,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    server = start("nbdkit", "--filter=delay", "memory", "1M", "rdelay=30")
    store = NbdStore(server.uri)

    async def main() -> None:
        await store.write(0, b"z" * 4096)  # not delayed
        tasks = [asyncio.ensure_future(store.read(i * 512, 512)) for i in range(50)]
        while len(store._pending) < 50:
            await asyncio.sleep(0.001)
        server.proc.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        for err in results:
            assert isinstance(err, OSError) and err.errno == errno.EIO
            assert "connection lost" in str(err)
        with pytest.raises(OSError, match="connection broken"):
            await asyncio.wait_for(store.write(0, b"x" * 512), 5)
        await store.aclose()
        await store.aclose()

    with caplog.at_level(logging.WARNING, logger="vhostpy.nbd"):
        run(main())
    warnings = [r for r in caplog.records if r.name == "vhostpy.nbd"]
    assert len(warnings) == 1 and "connection broken" in warnings[0].getMessage()


def test_one_store_one_loop(start: Start) -> None:
    store = NbdStore(start("nbdkit", "memory", "1M").uri)
    try:
        assert run(store.read(0, 512)) == bytes(512)
        with pytest.raises(RuntimeError, match="another event loop"):
            run(store.read(0, 512))
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                run(store.write(0, b"x" * 512))
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    finally:
        store.close()
        store.close()


def test_closed_store_refuses_calls(start: Start) -> None:
    store = NbdStore(start("nbdkit", "memory", "1M").uri)
    store.close()
    store.close()
    assert "closed" in repr(store)

    async def main() -> Any:
        return await store.read(0, 512)

    with pytest.raises(OSError, match="closed"):
        run(main())


# ------------------------------------------------------------------ what real servers never do
# A scripted server (a thread on a UNIX socket) for the two things qemu-nbd and nbdkit cannot be
# made to do: garble their replies, and refuse NBD_OPT_GO (old servers do).


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


@contextlib.contextmanager
def scripted(tmp_path: Path, script: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection server on a UNIX socket: the greeting (fixed newstyle, NO_ZEROES), then
    ``script``, then reading until the client hangs up; yields the URI."""
    listener = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "scripted.sock")
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(EOFError, OSError):
            conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
            assert _recv_exact(conn, 4) == struct.pack(">I", 3)
            script(conn)
            while conn.recv(4096):  # until the client hangs up
                pass
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"nbd+unix:///?socket={path}"
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive()


def _option(conn: socket.socket) -> tuple[int, bytes]:
    _, option, length = struct.unpack(">QII", _recv_exact(conn, 16))
    return option, _recv_exact(conn, length)


def _go(conn: socket.socket) -> None:
    assert _option(conn)[0] == nbd.OPT_GO
    info = struct.pack(">HQH", nbd.INFO_EXPORT, MiB, 1)
    conn.sendall(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_INFO, len(info))
                 + info + struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ACK, 0))


def _request(conn: socket.socket) -> tuple[int, int, int, int]:
    magic, _, command, cookie, offset, length = struct.unpack(">IHHQQI", _recv_exact(conn, 28))
    assert magic == nbd.REQUEST_MAGIC
    return command, cookie, offset, length


@pytest.mark.parametrize(("reply", "reason"), [
    (lambda cookie: struct.pack(">IIQ", 0xDEADBEEF, 0, cookie), "bad reply magic 0xdeadbeef"),
    (lambda cookie: struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie + 7),
     "reply for unknown cookie"),
    (lambda cookie: struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(100),
     "short read (100 of 4096 bytes)"),
], ids=["magic", "cookie", "short"])
def test_garbled_replies_break_the_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              reply: Callable[[int], bytes],
                                              reason: str) -> None:
    def script(conn: socket.socket) -> None:
        _go(conn)
        command, cookie, _, _ = _request(conn)
        assert command == nbd.CMD_READ
        conn.sendall(reply(cookie))
        if reason.startswith("short"):
            conn.shutdown(socket.SHUT_WR)

    async def main(store: NbdStore) -> None:
        with pytest.raises(OSError) as info:
            await store.read(0, 4096)
        assert info.value.errno == errno.EIO and reason in str(info.value)
        with pytest.raises(OSError, match="connection broken"):
            await store.read(0, 4096)
        await store.aclose()

    with scripted(tmp_path, script) as uri, caplog.at_level(logging.WARNING, "vhostpy.nbd"):
        run(main(NbdStore(uri, timeout=5)), timeout=10)
    assert [r.name for r in caplog.records] == ["vhostpy.nbd"]


def test_export_name_fallback_when_go_is_unsupported(tmp_path: Path) -> None:
    def script(conn: socket.socket) -> None:
        assert _option(conn)[0] == nbd.OPT_GO
        conn.sendall(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ERR_UNSUP,
                                 0))
        assert _option(conn) == (nbd.OPT_EXPORT_NAME, b"")
        conn.sendall(struct.pack(">QH", 2 * MiB, 1 | 2))  # NO_ZEROES: no 124 zero bytes
        command, cookie, offset, length = _request(conn)
        assert (command, offset, length) == (nbd.CMD_READ, 512, 1024)
        conn.sendall(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie) + b"r" * length)
        assert _request(conn)[0] == nbd.CMD_DISC

    async def main(store: NbdStore) -> None:
        assert await store.read(512, 1024) == b"r" * 1024
        await store.aclose()

    with scripted(tmp_path, script) as uri:
        store = NbdStore(uri, timeout=5)
        assert (store.size, store.read_only, store.block_size) == (2 * MiB, True, 512)
        run(main(store), timeout=10)


def test_go_refusal_carries_the_servers_message(tmp_path: Path) -> None:
    def script(conn: socket.socket) -> None:
        _option(conn)
        why = b"go away: policy says no"
        conn.sendall(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO,
                                 nbd.REP_ERR | 2, len(why)) + why)

    with scripted(tmp_path, script) as uri, \
            pytest.raises(ConfigurationError, match="denied by policy: go away: policy says no"):
        NbdStore(uri, timeout=5)
