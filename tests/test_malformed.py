"""Hostile front-ends and hostile guests never take a real `vhostpy blk` process down.

Every test talks to a real back-end process over a real UNIX socket, with fds passed by
SCM_RIGHTS. After each hostile episode it checks that

* the process is alive,
* its log names the request (or the ring) and the offending value,
* a well-behaved scripted guest is served right after, on a NEW connection, and
* the process holds exactly the fds it held when idle (nothing the front-end sent leaks).

Where a request asked for an answer (NEED_REPLY with REPLY_ACK negotiated, or a request with a
reply of its own) the answer must be an explicit failure: a REPLY_ACK other than 0, or an empty
payload. Never a fake success.

Processes are shared per group (module-scoped fixtures) to keep the run short; each case
still ends with the survival checks above, so a case that breaks the process fails itself.
"""

from __future__ import annotations

import array
import hashlib
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Backend
from ringbuilder import RingBuilder
from scripted import RAM_SIZE, RING_STRIDE, UVA_BASE, ScriptedGuest, blk_request

from vhostpy import _accel
from vhostpy import protocol as p
from vhostpy.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vhostpy.frontend import Frontend
from vhostpy.session import HANDLERS
from vhostpy.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

Request = p.Request
PF = p.ProtocolFeature
HDR = struct.Struct("<III")
V1 = int(p.HeaderFlags.VERSION_1)
REPLY = int(p.HeaderFlags.REPLY)
NEED = int(p.HeaderFlags.NEED_REPLY)
U64 = struct.Struct("<Q")
BLK_HDR = struct.Struct("<IIQ")

WAIT = 5.0


# ------------------------------------------------------------------------------------------
# helpers: a back-end under test, raw wire access, a well-behaved guest


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd(size: int, name: str = "hostile-ram") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def start(guest: ScriptedGuest) -> None:
    """Negotiate everything but EVENT_IDX (so every completion interrupts: the scripted
    driver never moves used_event) and hand over guest RAM."""
    guest.fe.negotiate(features_mask=~(1 << VIRTIO_RING_F_EVENT_IDX))
    guest.fe.set_mem_table([guest.region()], [guest.ram_fd])


def serve_guest(path: str, queues: Sequence[int] = (0,), sector: int = 7) -> None:
    """A well-behaved guest on a new connection: write a sector, read it back, per queue."""
    guest = ScriptedGuest(path, timeout=WAIT)
    try:
        start(guest)
        for q in queues:
            guest.setup_ring(q)
        for q in queues:
            data = os.urandom(512)
            assert blk_request(guest, VIRTIO_BLK_T_OUT, sector + q, data=data, index=q) == \
                (VIRTIO_BLK_S_OK, b"")
            assert blk_request(guest, VIRTIO_BLK_T_IN, sector + q, read_len=512, index=q) == \
                (VIRTIO_BLK_S_OK, data)
    finally:
        guest.close()


class Target:
    """A running back-end plus what its idle state looks like."""

    def __init__(self, backend: Backend, queues: Sequence[int] = (0,)) -> None:
        self.b = backend
        self.path = backend.path
        self.pid = backend.proc.pid
        self.queues = tuple(queues)
        self.idle_fds = fd_count(self.pid)
        self._mark = 0
        serve_guest(self.path, self.queues)   # warm-up; must leave nothing behind
        self.wait_idle_fds()

    def mark(self) -> None:
        """Start a new episode: later log checks only look at what follows."""
        self._mark = len(self.b.output())

    def log(self) -> str:
        return self.b.output()[self._mark:]

    def wait_log(self, *needles: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"log lacks {missing!r}; log of this episode:\n{text}")
            time.sleep(0.02)

    def wait_idle_fds(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while (n := fd_count(self.pid)) != self.idle_fds:
            if time.monotonic() > deadline:
                fds = {f: os.readlink(f"/proc/{self.pid}/fd/{f}")
                       for f in os.listdir(f"/proc/{self.pid}/fd")}
                raise AssertionError(f"back-end holds {n} fds, {self.idle_fds} when idle: {fds}"
                                     f"\n{self.log()}")
            time.sleep(0.02)

    def survived(self, *needles: str) -> None:
        """The episode's connection is closed: check log, fds, and serve a good guest."""
        assert self.b.alive(), self.b.output()
        self.wait_log(*needles)
        self.wait_idle_fds()
        serve_guest(self.path, self.queues)
        self.wait_idle_fds()
        assert self.b.alive(), self.b.output()


def _start(tmp: Path, name: str, *args: str) -> Backend:
    path = str(tmp / f"{name}.sock")
    return Backend(["blk", "--socket-path", path, "-v", *args], path, tmp / f"{name}.log")


def _finish(b: Backend) -> None:
    rc = b.stop()
    assert rc == 0, f"back-end exited with {rc}:\n{b.log_path.read_text(errors='replace')}"
    assert not os.path.exists(b.path), "back-end left its socket behind"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    b = _start(tmp_path_factory.mktemp("malformed"), "blk")
    try:
        yield Target(b)
    finally:
        _finish(b)


@pytest.fixture
def t(target: Target) -> Target:
    target.mark()
    return target


def _recv_exact(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    buf, fds = b"", list[int]()
    while len(buf) < n:
        data, anc, _, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * p.MAX_FDS))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
                fds.extend(arr)
        if not data:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += data
    return buf, fds


class Hostile:
    """A front-end that writes raw bytes and reads raw replies (after an honest opening)."""

    def __init__(self, path: str, *, negotiate: bool = True) -> None:
        self.fe = Frontend.connect(path, timeout=WAIT)
        self.sock = self.fe.sock
        self.features = 0
        if negotiate:
            self.features, _ = self.fe.negotiate()
            assert PF.REPLY_ACK in self.fe.protocol_features

    def send(self, req: int, payload: bytes = b"", *, flags: int = V1 | NEED,
             fds: Sequence[int] = (), size: int | None = None) -> None:
        size = len(payload) if size is None else size
        self.fe.send_raw(HDR.pack(req, flags, size) + payload, fds)

    def read(self) -> tuple[int, int, bytes, list[int]]:
        head, fds = _recv_exact(self.sock, HDR.size)
        req, flags, size = HDR.unpack(head)
        body, more = _recv_exact(self.sock, size) if size else (b"", [])
        return req, flags, body, fds + more

    def _reply(self, req: int) -> tuple[bytes, list[int]]:
        got, flags, body, fds = self.read()
        for fd in fds:
            os.close(fd)
        assert (got, flags) == (req, V1 | REPLY), (got, flags, body)
        return body, fds

    def nack(self, req: int) -> int:
        """The next message is a REPLY_ACK to `req` reporting failure; returns its value."""
        body, fds = self._reply(req)
        assert len(body) == 8 and not fds, body
        (value,) = U64.unpack(body)
        assert value != 0, f"{p.request_name(req)} was acknowledged as a success"
        return value

    def ack_ok(self, req: int) -> None:
        body, _ = self._reply(req)
        assert body == bytes(8), body

    def empty(self, req: int) -> None:
        """The next message is the empty-payload failure reply to `req`, without fds."""
        body, fds = self._reply(req)
        assert body == b"" and not fds, (body, fds)

    def still_talking(self) -> None:
        """The connection is usable and nothing else was queued for us (a reply would be)."""
        self.send(Request.GET_FEATURES, flags=V1)
        body, _ = self._reply(Request.GET_FEATURES)
        assert len(body) == 8 and U64.unpack(body)[0] >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1

    def dropped(self) -> None:
        """The back-end closes the connection without a word."""
        self.sock.settimeout(WAIT)
        try:
            data = self.sock.recv(4096)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"expected EOF, got {data!r}"

    def map_ram(self, size: int = RAM_SIZE) -> int:
        fd = memfd(size)
        try:
            self.send(Request.SET_MEM_TABLE, p.MemTable((p.MemoryRegion(0, size, UVA_BASE, 0),
                                                          )).pack(), fds=[fd])
            self.ack_ok(Request.SET_MEM_TABLE)
        finally:
            os.close(fd)
        return size

    def close(self) -> None:
        self.fe.close()

    def __enter__(self) -> Hostile:  # noqa: PYI034 - typing.Self is 3.11+, we support 3.10
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mem_table(*regions: tuple[int, int, int, int], n: int | None = None) -> bytes:
    """A SET_MEM_TABLE payload; `n` overrides the region count in the header."""
    body = b"".join(struct.pack("<QQQQ", *r) for r in regions)
    return struct.pack("<II", len(regions) if n is None else n, 0) + body


def vring_state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0)


def config(offset: int, size: int, data: bytes | None = None, flags: int = 0) -> bytes:
    return struct.pack("<III", offset, size, flags) + (bytes(size) if data is None else data)


# ------------------------------------------------------------------------------------------
# byte streams that cannot be resynchronised: the connection is dropped, nothing else


def _hdr(req: int, size: int, flags: int = V1) -> bytes:
    return HDR.pack(req, flags, size)


FATAL_STREAMS = [
    ("http-garbage", b"GET / HTTP/1.1\r\nHost: vhost\r\n\r\n", ["size=825184340"]),
    ("deadbeef-garbage", b"\xde\xad\xbe\xef" * 64, ["unknown request 4022250974",
                                                    "size=4022250974"]),
    *[(f"size-{size:#x}", _hdr(Request.GET_FEATURES, size) + b"\0" * 64,
       ["VHOST_USER_GET_FEATURES", f"size={size}"])
      for size in (p.MAX_PAYLOAD_SIZE + 1, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF)],
    ("size-0xffffffff-unknown", _hdr(99, 0xFFFFFFFF), ["unknown request 99", "size=4294967295"]),
    ("mem-table-200-regions", _hdr(Request.SET_MEM_TABLE, 8 + 200 * 32, V1 | NEED)
     + mem_table(*[(i << 20, 1 << 20, UVA_BASE + (i << 20), 0) for i in range(200)]),
     ["VHOST_USER_SET_MEM_TABLE", "size=6408"]),
    ("get-config-1MiB", _hdr(Request.GET_CONFIG, 1 << 20) + config(0, 256),
     ["VHOST_USER_GET_CONFIG", "size=1048576"]),
]


@pytest.mark.parametrize("data,needles", [c[1:] for c in FATAL_STREAMS],
                         ids=[c[0] for c in FATAL_STREAMS])
def test_unresynchronisable_stream_drops_the_connection(t: Target, data: bytes,
                                                        needles: list[str]) -> None:
    with Hostile(t.path) as h:
        h.fe.send_raw(data)
        h.dropped()
    t.survived("dropping the connection", *needles)


def test_garbage_before_any_negotiation(t: Target) -> None:
    with Hostile(t.path, negotiate=False) as h:
        h.fe.send_raw(bytes(range(256)) * 4)
        h.dropped()
    # bytes 0..11 read as request 0x03020100, flags, size 0x0b0a0908
    t.survived("unknown request 50462976", "size=185207048")


@pytest.mark.parametrize("nfds", [9, 10, 200])
def test_too_many_fds_on_one_message_drops_and_closes_them(t: Target, nfds: int) -> None:
    ram = memfd(1 << 20)
    fds = [os.dup(ram) for _ in range(nfds)]
    try:
        with Hostile(t.path) as h:
            region = (0, 1 << 20, UVA_BASE, 0)
            h.send(Request.SET_MEM_TABLE, mem_table(region), fds=fds)
            h.dropped()
    finally:
        for fd in (ram, *fds):
            os.close(fd)
    if nfds <= 64:   # the decoder saw them all
        t.survived("VHOST_USER_SET_MEM_TABLE", f"{nfds} fds on one message",
                   "dropping the connection")
    else:            # more than the server's receive buffer: the kernel truncated them
        t.survived("more than 64 fds at once")


# ------------------------------------------------------------------------------------------
# truncated messages, then EOF


TRUNCATED = [
    ("half-header", b"\x01\x00\x00\x00\x01", 0, ["after 5 of the 12 bytes of a message header"]),
    ("half-payload", _hdr(Request.SET_FEATURES, 8) + b"\0\0\0\0", 0,
     ["VHOST_USER_SET_FEATURES", "size=8 but only 4 bytes"]),
    ("mem-table-with-fd", _hdr(Request.SET_MEM_TABLE, 40) + mem_table((0, 4096, UVA_BASE, 0))[:20],
     1, ["VHOST_USER_SET_MEM_TABLE", "size=40 but only 20 bytes"]),
    ("unknown-with-fds", _hdr(77, 100) + b"x" * 10, 3, ["unknown request 77", "size=100"]),
]


@pytest.mark.parametrize("data,nfds,needles", [c[1:] for c in TRUNCATED],
                         ids=[c[0] for c in TRUNCATED])
def test_truncated_message_then_eof(t: Target, data: bytes, nfds: int,
                                    needles: list[str]) -> None:
    fds = [memfd(4096) for _ in range(nfds)]
    try:
        with Hostile(t.path) as h:
            h.fe.send_raw(data, fds)
            h.sock.shutdown(socket.SHUT_WR)
            h.dropped()
    finally:
        for fd in fds:
            os.close(fd)
    t.survived("front-end disconnected", *needles)


# ------------------------------------------------------------------------------------------
# bad requests on an open connection: an explicit failure answer, and the connection goes on


Case = Callable[[Hostile], list[str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


for _req in (0, 44, 99, 0xFFFFFFFF):
    def _unknown(h: Hostile, req: int = _req) -> list[str]:
        h.send(req, b"\0" * 8)
        h.nack(req)
        h.send(req, flags=V1)          # without NEED_REPLY: no answer at all
        return [f"unknown request {req}", "not a frontend-channel request"]
    case(f"unknown-request-{_req}")(_unknown)

for _flags in (0, 2, 3):
    def _version(h: Hostile, flags: int = _flags) -> list[str]:
        h.send(Request.GET_FEATURES, flags=flags)
        h.empty(Request.GET_FEATURES)
        h.send(Request.SET_OWNER, flags=flags | NEED)
        h.nack(Request.SET_OWNER)
        return ["VHOST_USER_GET_FEATURES", f"flags={flags:#x}",
                "VHOST_USER_SET_OWNER", f"flags={flags | NEED:#x}"]
    case(f"version-flags-{_flags}")(_version)


@case("reply-flag-on-request")
def _reply_flag(h: Hostile) -> list[str]:
    h.send(Request.GET_FEATURES, bytes(8), flags=V1 | REPLY)      # decodes, then refused
    h.send(Request.SET_OWNER, flags=V1 | REPLY | NEED)             # a reply with no payload
    h.send(Request.SET_FEATURES, U64.pack(h.features), flags=V1 | REPLY | NEED)
    # Nobody is owed an answer to a "reply": still_talking() checks nothing was sent.
    return ["VHOST_USER_GET_FEATURES", "a reply where a request was expected",
            "VHOST_USER_SET_OWNER", "VHOST_USER_SET_FEATURES"]


@case("mem-table-200-regions-in-header")
def _mem200(h: Hostile) -> list[str]:
    h.send(Request.SET_MEM_TABLE, mem_table(n=200))
    h.nack(Request.SET_MEM_TABLE)
    return ["VHOST_USER_SET_MEM_TABLE", "nregions=200"]


@case("mem-table-regions-without-fds")
def _mem_nofds(h: Hostile) -> list[str]:
    h.send(Request.SET_MEM_TABLE, mem_table((0, 1 << 20, UVA_BASE, 0)))
    h.nack(Request.SET_MEM_TABLE)
    eight = [(i << 20, 1 << 20, UVA_BASE + (i << 20), 0) for i in range(8)]
    h.send(Request.SET_MEM_TABLE, mem_table(*eight))
    h.nack(Request.SET_MEM_TABLE)
    return ["VHOST_USER_SET_MEM_TABLE", "0 fds where 1 expected", "0 fds where 8 expected"]


@case("mem-table-fds-without-regions")
def _mem_fds_noregions(h: Hostile) -> list[str]:
    fd = memfd(4096)
    try:
        h.send(Request.SET_MEM_TABLE, mem_table(), fds=[fd, fd])
    finally:
        os.close(fd)
    h.nack(Request.SET_MEM_TABLE)
    return ["VHOST_USER_SET_MEM_TABLE", "2 fds where 0 expected"]


@case("mem-region-larger-than-its-fd")
def _mem_too_big(h: Hostile) -> list[str]:
    fd = memfd(1 << 20)
    try:
        h.send(Request.SET_MEM_TABLE, mem_table((0, 2 << 20, UVA_BASE, 0)), fds=[fd])
        h.nack(Request.SET_MEM_TABLE)
        # The anchor crash (TRAPS.md): then place a ring past the fd's end.
        h.send(Request.SET_VRING_NUM, vring_state(0, 64))
        h.ack_ok(Request.SET_VRING_NUM)
        past = UVA_BASE + (1 << 20) + 0x1000
        h.send(Request.SET_VRING_ADDR, vring_addr(0, past, past + 0x2000, past + 0x1000))
        h.nack(Request.SET_VRING_ADDR)
    finally:
        os.close(fd)
    return ["VHOST_USER_SET_MEM_TABLE", "fd size 0x100000", "size 0x200000",
            "VHOST_USER_SET_VRING_ADDR", f"uva={past:#x}"]


@case("mem-region-offset-past-fd-end")
def _mem_offset(h: Hostile) -> list[str]:
    fd = memfd(1 << 20)
    try:
        h.send(Request.SET_MEM_TABLE, mem_table((0, 4096, UVA_BASE, 4 << 20)), fds=[fd])
        h.nack(Request.SET_MEM_TABLE)
        h.send(Request.SET_MEM_TABLE, mem_table((0, 4096, UVA_BASE, (1 << 64) - 4096)), fds=[fd])
        h.nack(Request.SET_MEM_TABLE)
    finally:
        os.close(fd)
    return ["VHOST_USER_SET_MEM_TABLE", "mmap_offset 0x400000", "mmap_offset 0xfffffffffffff000"]


@case("mem-region-not-memory")
def _mem_pipe(h: Hostile) -> list[str]:
    r, w = os.pipe()
    try:
        h.send(Request.SET_MEM_TABLE, mem_table((0, 4096, UVA_BASE, 0)), fds=[r])
        h.nack(Request.SET_MEM_TABLE)
        h.send(Request.SET_MEM_TABLE, mem_table((0, 0, UVA_BASE, 0)), fds=[w])
        h.nack(Request.SET_MEM_TABLE)
    finally:
        os.close(r)
        os.close(w)
    return ["VHOST_USER_SET_MEM_TABLE", "not a regular file", "memory_size=0"]


@case("mem-regions-overlapping")
def _mem_overlap(h: Hostile) -> list[str]:
    fd = memfd(2 << 20)
    try:
        h.send(Request.SET_MEM_TABLE, mem_table((0, 1 << 20, UVA_BASE, 0),
                                                (0x80000, 1 << 20, UVA_BASE + (4 << 20), 0)),
               fds=[fd, fd])
        h.nack(Request.SET_MEM_TABLE)
    finally:
        os.close(fd)
    return ["VHOST_USER_SET_MEM_TABLE", "overlaps"]


@case("vring-index-5000")
def _vring5000(h: Hostile) -> list[str]:
    h.map_ram()
    for req, body in ((Request.SET_VRING_NUM, vring_state(5000, 64)),
                      (Request.SET_VRING_BASE, vring_state(5000, 0)),
                      (Request.SET_VRING_ENABLE, vring_state(5000, 1)),
                      (Request.SET_VRING_ADDR, vring_addr(5000, UVA_BASE, UVA_BASE + 0x2000,
                                                          UVA_BASE + 0x1000))):
        h.send(req, body)
        h.nack(req)
    h.send(Request.GET_VRING_BASE, vring_state(5000, 0))
    h.empty(Request.GET_VRING_BASE)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        # 5000 does not fit the 8-bit index of the fd word: reserved bits are set
        h.send(Request.SET_VRING_KICK, U64.pack(5000), fds=[kick])
        h.nack(Request.SET_VRING_KICK)
        h.send(Request.SET_VRING_CALL, U64.pack(200), fds=[kick])     # fits, but no such ring
        h.nack(Request.SET_VRING_CALL)
        h.send(Request.SET_VRING_KICK, U64.pack(255), fds=[kick])
        h.nack(Request.SET_VRING_KICK)
    finally:
        os.close(kick)
    return ["VHOST_USER_SET_VRING_NUM", "vring index 5000 out of range",
            "VHOST_USER_SET_VRING_BASE", "VHOST_USER_SET_VRING_ENABLE",
            "VHOST_USER_SET_VRING_ADDR", "VHOST_USER_GET_VRING_BASE",
            "VHOST_USER_SET_VRING_KICK", "0x1388", "VHOST_USER_SET_VRING_CALL",
            "vring index 200 out of range", "vring index 255 out of range"]


for _num in (0, 3, 65535, 512, 1 << 20):
    def _ring_size(h: Hostile, num: int = _num) -> list[str]:
        h.send(Request.SET_VRING_NUM, vring_state(0, num))
        h.nack(Request.SET_VRING_NUM)
        if num == 512:      # a power of two, above the device's limit: say so
            return ["VHOST_USER_SET_VRING_NUM", "size 512 is larger than the 256 this device"]
        return ["VHOST_USER_SET_VRING_NUM", f"size {num} is not a power of two"]
    case(f"ring-size-{_num}")(_ring_size)


@case("ring-base-and-enable-values")
def _ring_values(h: Hostile) -> list[str]:
    h.send(Request.SET_VRING_BASE, vring_state(0, 0x10000))
    h.nack(Request.SET_VRING_BASE)
    h.send(Request.SET_VRING_ENABLE, vring_state(0, 7))
    h.nack(Request.SET_VRING_ENABLE)
    return ["VHOST_USER_SET_VRING_BASE", "0x10000", "VHOST_USER_SET_VRING_ENABLE",
            "enable value 7"]


@case("ring-addresses-unmapped")
def _ring_unmapped(h: Hostile) -> list[str]:
    h.send(Request.SET_VRING_NUM, vring_state(0, 64))
    h.ack_ok(Request.SET_VRING_NUM)
    # no memory table yet
    h.send(Request.SET_VRING_ADDR, vring_addr(0, UVA_BASE, UVA_BASE + 0x2000, UVA_BASE + 0x1000))
    h.nack(Request.SET_VRING_ADDR)
    h.map_ram()
    outside = UVA_BASE + RAM_SIZE + 0x10000
    straddle = UVA_BASE + RAM_SIZE - 0x200        # a 64-entry table is 0x400 bytes
    for desc, used, avail in ((outside, UVA_BASE + 0x2000, UVA_BASE + 0x1000),
                              (UVA_BASE, outside, UVA_BASE + 0x1000),
                              (UVA_BASE, UVA_BASE + 0x2000, 0x1000),
                              (straddle, UVA_BASE + 0x2000, UVA_BASE + 0x1000)):
        h.send(Request.SET_VRING_ADDR, vring_addr(0, desc, used, avail))
        h.nack(Request.SET_VRING_ADDR)
    h.send(Request.SET_VRING_ADDR, vring_addr(0, UVA_BASE, UVA_BASE + 0x2000, UVA_BASE + 0x1000,
                                              flags=2))   # not a flag vhost-user has
    h.nack(Request.SET_VRING_ADDR)
    return ["VHOST_USER_SET_VRING_ADDR", f"uva={outside:#x}", "uva=0x1000",
            f"uva={straddle:#x}", "unknown address flags 0x2"]


@case("kick-without-fd")
def _kick_nofd(h: Hostile) -> list[str]:
    h.send(Request.SET_VRING_KICK, p.VringFd(0, no_fd=True).pack())
    h.nack(Request.SET_VRING_KICK)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:   # NOFD bit set and an fd anyway; no bit and no fd
        h.send(Request.SET_VRING_KICK, p.VringFd(0, no_fd=True).pack(), fds=[kick])
        h.nack(Request.SET_VRING_KICK)
    finally:
        os.close(kick)
    h.send(Request.SET_VRING_CALL, p.VringFd(0).pack())
    h.nack(Request.SET_VRING_CALL)
    return ["VHOST_USER_SET_VRING_KICK", "kick without an fd", "1 fds where 0 expected",
            "VHOST_USER_SET_VRING_CALL", "0 fds where 1 expected"]


@case("inflight-and-dirty-log-that-do-not-fit")
def _inflight_and_log(h: Hostile) -> list[str]:
    """Inflight regions and dirty logs of impossible shapes: refused, nothing mapped or kept."""
    for queues, size in ((0, 64), (99, 64), (1, 3), (1, 65536 // 2 + 1)):
        h.send(Request.GET_INFLIGHT_FD, p.InflightInfo(0, 0, queues, size).pack())
        h.empty(Request.GET_INFLIGHT_FD)
    small = memfd(4096)       # far less than a region for 1 queue of 256 needs
    try:
        for info in (p.InflightInfo(4096, 0, 1, 256),
                     p.InflightInfo(1 << 20, 0, 1, 256),     # more than the fd holds
                     p.InflightInfo(1 << 20, 1 << 40, 1, 256)):
            h.send(Request.SET_INFLIGHT_FD, info.pack(), fds=[small])
            h.nack(Request.SET_INFLIGHT_FD)
        for info in (p.LogInfo(0, 0), p.LogInfo(1 << 20, 0)):  # empty; beyond the fd
            h.send(Request.SET_LOG_BASE, info.pack(), fds=[small])
            h.nack(Request.SET_LOG_BASE)
    finally:
        os.close(small)
    return ["VHOST_USER_GET_INFLIGHT_FD", "inflight region for 0 queues",
            "inflight region for queues of 3", "VHOST_USER_SET_INFLIGHT_FD", "needs",
            "VHOST_USER_SET_LOG_BASE", "with an empty log", "the fd holds 4096 bytes"]


@case("kick-fd-not-pollable")
def _kick_regular_file(h: Hostile) -> list[str]:
    fd = memfd(4096)            # epoll refuses regular files
    try:
        h.send(Request.SET_VRING_KICK, p.VringFd(0).pack(), fds=[fd])
        h.nack(Request.SET_VRING_KICK)
    finally:
        os.close(fd)
    return ["VHOST_USER_SET_VRING_KICK", "is not an eventfd"]


@case("ring-endpoints-that-are-not-eventfds")
def _not_eventfds(h: Hostile) -> list[str]:
    """A pipe nobody reads as call or err fd would block every interrupt write forever, a
    socket or pipe as kick fd would never signal: all are refused, nothing is kept."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        for req, fd in ((Request.SET_VRING_CALL, w), (Request.SET_VRING_ERR, w),
                        (Request.SET_VRING_KICK, r), (Request.SET_VRING_KICK, a.fileno()),
                        (Request.SET_VRING_CALL, a.fileno())):
            h.send(req, p.VringFd(0).pack(), fds=[fd])
            h.nack(req)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
    return ["VHOST_USER_SET_VRING_CALL", "vring 0 call fd", "is not an eventfd (pipe:",
            "VHOST_USER_SET_VRING_ERR", "vring 0 err fd", "VHOST_USER_SET_VRING_KICK",
            "vring 0 kick fd", "(socket:"]


@case("ring-size-32768-over-the-device-limit")
def _ring_32768(h: Hostile) -> list[str]:
    h.send(Request.SET_VRING_NUM, vring_state(0, 32768))
    h.nack(Request.SET_VRING_NUM)
    return ["VHOST_USER_SET_VRING_NUM", "size 32768 is larger than the 256 this device accepts"]


@case("get-config-out-of-range")
def _get_config(h: Hostile) -> list[str]:
    h.send(Request.GET_CONFIG, config(0xFFFFFF00, 256))
    h.empty(Request.GET_CONFIG)
    h.send(Request.GET_CONFIG, config(0xFFFFFFFF, 1))
    h.empty(Request.GET_CONFIG)
    h.send(Request.GET_CONFIG, config(0, 257))
    h.empty(Request.GET_CONFIG)
    h.send(Request.GET_CONFIG, config(0, 60)[:40])   # payload shorter than config.size says
    h.empty(Request.GET_CONFIG)
    return ["VHOST_USER_GET_CONFIG", "offset 4294967040", "offset 4294967295",
            "config.size=257", "size=40"]


@case("set-config-out-of-range")
def _set_config(h: Hostile) -> list[str]:
    for offset, size in ((0xFFFFFFFF, 1), (0xFFFFFF00, 256), (1 << 12, 4), (0, 256)):
        h.send(Request.SET_CONFIG, config(offset, size))
        h.nack(Request.SET_CONFIG)
    h.send(Request.SET_CONFIG, config(0, 8))       # in range, but virtio-blk's is read-only
    h.nack(Request.SET_CONFIG)
    return ["VHOST_USER_SET_CONFIG", "offset 4294967295", "offset 4294967040", "offset 4096",
            "256 bytes at offset 0", "read-only"]


@case("features-never-offered")
def _features(h: Hostile) -> list[str]:
    h.send(Request.SET_FEATURES, U64.pack(h.features | 1 << 63 | 1 << 40))
    h.nack(Request.SET_FEATURES)
    h.send(Request.SET_PROTOCOL_FEATURES, U64.pack(int(PF.REPLY_ACK | PF.XEN_MMAP | 1 << 50)))
    h.nack(Request.SET_PROTOCOL_FEATURES)
    return ["VHOST_USER_SET_FEATURES", f"{1 << 63 | 1 << 40:#x}",
            "VHOST_USER_SET_PROTOCOL_FEATURES", f"{int(PF.XEN_MMAP) | 1 << 50:#x}"]


def _payload_for(req: Request) -> bytes:
    spec = p.REQUEST_SPECS[req]
    if req is Request.IOTLB_MSG:
        return p.IotlbMsg(0, 4096, UVA_BASE, p.IOTLB_ACCESS_RW, p.IOTLB_UPDATE).pack()
    if spec.payload is p.RawPayload:
        return b"\1" * 32
    size: int = spec.payload.SIZE  # type: ignore[attr-defined]
    return bytes(size)


UNSUPPORTED = sorted((r for r in Request if r not in HANDLERS), key=int)


@pytest.mark.parametrize("req", UNSUPPORTED, ids=[r.name for r in UNSUPPORTED])
def test_known_but_unsupported_request_fails_explicitly(t: Target, req: Request) -> None:
    spec = p.REQUEST_SPECS[req]
    fds = [memfd(4096) for _ in range(spec.fds[1] if req is not Request.SET_LOG_BASE else 1)]
    with Hostile(t.path) as h:
        try:
            h.send(req, _payload_for(req), fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        if spec.reply is not None:
            h.empty(req)      # its own reply, empty: failure (POSTCOPY_ADVISE: and no ufd)
        else:
            h.nack(req)
        h.still_talking()
    t.survived(p.request_name(req), "is not supported")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_a_failure_answer(t: Target, name: str) -> None:
    with Hostile(t.path) as h:
        needles = CASES[name](h)
        h.still_talking()
    t.survived(*needles)


# ------------------------------------------------------------------------------------------
# many front-ends at once; front-ends that vanish


def test_64_connections_at_once(t: Target) -> None:
    socks = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(t.path)
            socks.append(s)
        for i, s in enumerate(socks):
            if i % 3 == 0:
                s.sendall(b"\xff" * 64)                           # garbage: dropped
            elif i % 3 == 1:
                s.sendall(_hdr(Request.GET_FEATURES, 0) + _hdr(Request.SET_OWNER, 0))
    finally:
        for s in socks:
            s.close()
    t.survived("unknown request 4294967295")
    text = t.log()
    assert text.count("front-end connected") >= 65, text


def test_frontend_vanishes_mid_setup(t: Target) -> None:
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        guest.setup_ring(0)
        err = os.eventfd(0, os.EFD_CLOEXEC)
        guest.fe.set_vring_err(0, err)
        os.close(err)
        # the back-end now holds the memory, kick, call and err fds
        assert fd_count(t.pid) >= t.idle_fds + 4
    finally:
        guest.close()
    t.survived("front-end disconnected")


def test_frontend_vanishes_mid_io(t: Target) -> None:
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        guest.setup_ring(0)
        assert blk_request(guest, VIRTIO_BLK_T_OUT, 1, data=b"a" * 512)[0] == VIRTIO_BLK_S_OK
        builder = guest.rings[0].builder
        for i in range(32):
            builder.add_chain([BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, i) + b"b" * 4096], [1])
        guest.kick(0)
    finally:
        guest.close()          # without waiting for a single completion
    t.survived("front-end disconnected")


def test_frontend_vanishes_with_replies_pending(t: Target) -> None:
    with Hostile(t.path) as h:
        h.fe.send_raw(_hdr(Request.GET_FEATURES, 0) * 2000)
    deadline = time.monotonic() + WAIT
    while not any(n in t.log() for n in ("cannot send a reply", "of replies unread",
                                         "front-end disconnected")):
        assert time.monotonic() < deadline, t.log()
        time.sleep(0.02)
    t.survived()


def test_frontend_that_never_reads_its_replies_is_dropped(t: Target) -> None:
    """100k requests and no reads: the replies pile up to the bound, the front-end is dropped
    at once (no blocking send holds the loop), and the next front-end is served."""
    with Hostile(t.path) as h:
        h.sock.setblocking(False)
        flood = _hdr(Request.GET_FEATURES, 0) * 100_000
        sent = 0
        deadline = time.monotonic() + WAIT
        while sent < len(flood):
            assert time.monotonic() < deadline, t.log()
            try:
                sent += h.sock.send(flood[sent:sent + 65536])
            except BlockingIOError:
                select.select([], [h.sock], [], 0.05)
            except (BrokenPipeError, ConnectionResetError):
                break                       # dropped while we were still sending: good
        t.wait_log("of replies unread", "dropping the connection")
        t.survived()                        # a new guest is served while we hold our socket


@pytest.mark.skipif(_accel.lib is None, reason="without the compiled extension there is no "
                    "SIGBUS guard: a shrunk memfd kills the process (README, limits)")
def test_frontend_that_shrinks_guest_ram_under_a_live_ring_is_dropped(t: Target) -> None:
    """The front-end truncates its RAM memfd below a live ring: the back-end's next ring
    access lands in the hole, completes on a zero page, and the front-end is dropped with
    one line; the process serves the next guest (qemu-storage-daemon and DPDK die here)."""
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        ring = guest.setup_ring(0)
        assert blk_request(guest, VIRTIO_BLK_T_OUT, 1, data=b"a" * 512)[0] == VIRTIO_BLK_S_OK
        ring.builder.add_chain([BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 1)], [512, 1])
        os.ftruncate(guest.ram_fd, RING_STRIDE)      # every ring lives above this
        guest.kick(0)
        t.wait_log("lost its backing", "first access to the hole", "the front-end is dropped")
    finally:
        guest.close()
    t.survived()


def test_frontend_vanishes_mid_message_with_ring_running(t: Target) -> None:
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        guest.setup_ring(0)
        guest.fe.send_raw(_hdr(Request.SET_VRING_NUM, 8) + b"\0\0")
    finally:
        guest.close()
    t.survived("VHOST_USER_SET_VRING_NUM", "size=8 but only 2 bytes")


# ------------------------------------------------------------------------------------------
# hostile rings through the real back-end: only that queue breaks


@pytest.fixture(scope="module")
def two_queues(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    b = _start(tmp_path_factory.mktemp("rings"), "mq", "--num-queues", "2")
    try:
        yield Target(b, queues=(0, 1))
    finally:
        _finish(b)


def _loop(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 0)
    b.publish(0)
    return "descriptor loop: chain longer than size 64"


def _cycle(b: RingBuilder, buf: int) -> str:
    for i in range(64):                    # 0 -> 1 -> ... -> 63 -> 0: longer than the queue
        b.write_desc(i, buf, 16, VIRTQ_DESC_F_NEXT, (i + 1) % 64)
    b.publish(5)
    return "descriptor loop: chain longer than size 64"


def _outside(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, 0x10_0000_0000, 512, 0)
    b.publish(0)
    return "descriptor 0 buffer: guest range gpa=0x1000000000"


def _straddle(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, RAM_SIZE - 256, 512, VIRTQ_DESC_F_WRITE)
    b.publish(0)
    return f"gpa={RAM_SIZE:#x} length=0x100 is not mapped"


def _wraps(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, (1 << 64) - 256, 512, 0)
    b.publish(0)
    return "overflows 64 bits"


def _nested_indirect(b: RingBuilder, buf: int) -> str:
    inner = b.alloc(32)
    table = b.alloc(32)
    b.write_desc(0, inner, 32, VIRTQ_DESC_F_INDIRECT, table=table)
    b.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    b.publish(0)
    return f"nested indirect descriptor 0 at addr {inner:#x}"


def _indirect_loop(b: RingBuilder, buf: int) -> str:
    table = b.alloc(64)
    for i in range(4):
        b.write_desc(i, buf, 16, VIRTQ_DESC_F_NEXT, (i + 1) % 4, table=table)
    b.write_desc(0, table, 64, VIRTQ_DESC_F_INDIRECT)
    b.publish(0)
    return "descriptor loop: chain longer than indirect table of 4"


def _indirect_outside(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, 0x40_0000_0000, 64, VIRTQ_DESC_F_INDIRECT)
    b.publish(0)
    return "indirect table: guest range gpa=0x4000000000"


def _write_before_read(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, buf, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    b.write_desc(1, buf + 16, 16, 0)
    b.publish(0)
    return "device-readable descriptor 1"


def _avail_jump(b: RingBuilder, buf: int) -> str:
    b.set_avail_idx(5000)
    return "avail idx 5000 is 5000 ahead of last_avail_idx 0 (size 64)"


def _bad_head(b: RingBuilder, buf: int) -> str:
    b.publish(1000)
    return "head index 1000 >= size 64"


def _bad_next(b: RingBuilder, buf: int) -> str:
    b.write_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 999)
    b.publish(0)
    return "next index 999 >= descriptor table length 64"


HOSTILE_RINGS = {f.__name__.lstrip("_"): f for f in (
    _loop, _cycle, _outside, _straddle, _wraps, _nested_indirect, _indirect_loop,
    _indirect_outside, _write_before_read, _avail_jump, _bad_head, _bad_next)}


def _wait_readable(fd: int, timeout: float = WAIT) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def _wait_drained(fd: int, timeout: float = WAIT) -> bool:
    """Wait until eventfd `fd` has been read by the other side (its counter is 0 again)."""
    deadline = time.monotonic() + timeout
    while _wait_readable(fd, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("name", list(HOSTILE_RINGS))
def test_hostile_ring_breaks_only_its_queue(two_queues: Target, name: str) -> None:
    t = two_queues
    t.mark()
    guest = ScriptedGuest(t.path, timeout=WAIT)
    errs = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
    try:
        start(guest)
        for q in (0, 1):
            guest.setup_ring(q)
            guest.fe.set_vring_err(q, errs[q])
        b0 = guest.rings[0].builder
        buf = b0.alloc(4096)
        reason = HOSTILE_RINGS[name](b0, buf)
        guest.kick(0)
        assert _wait_readable(errs[0]), f"queue 0 never signalled its err fd\n{t.log()}"
        t.wait_log("virtqueue 0: ring broken", reason)
        # the other queue of the same connection keeps serving
        for sector in (3, 4):
            data = os.urandom(512)
            assert blk_request(guest, VIRTIO_BLK_T_OUT, sector, data=data, index=1) == \
                (VIRTIO_BLK_S_OK, b"")
            assert blk_request(guest, VIRTIO_BLK_T_IN, sector, read_len=512, index=1) == \
                (VIRTIO_BLK_S_OK, data)
        assert not _wait_readable(errs[1], 0), "the healthy queue reported an error"
        # the broken queue stays broken: a good request there is not served. Proof that the
        # back-end handled that kick before we look: it drained the kick eventfd, and then
        # answered a later request on queue 1 (one loop thread: the kick's handler had
        # returned by then).
        used_before = b0.used_idx
        b0.add_chain([BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        guest.kick(0)
        assert _wait_drained(guest.rings[0].kick_fd), \
            f"the back-end never read the broken queue's kick\n{t.log()}"
        assert blk_request(guest, VIRTIO_BLK_T_GET_ID, 0, read_len=20, index=1)[0] == \
            VIRTIO_BLK_S_OK
        assert b0.used_idx == used_before, "the broken queue served a request"
    finally:
        guest.close()
        for fd in errs:
            os.close(fd)
    t.survived("front-end disconnected")


def test_broken_ring_recovers_after_get_vring_base(two_queues: Target) -> None:
    """GET_VRING_BASE stops the ring and clears its error; a fresh set-up serves again."""
    t = two_queues
    t.mark()
    guest = ScriptedGuest(t.path, timeout=WAIT)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        start(guest)
        guest.setup_ring(0)
        guest.fe.set_vring_err(0, err)
        _avail_jump(guest.rings[0].builder, 0)
        guest.kick(0)
        assert _wait_readable(err)
        guest.fe.get_vring_base(0)
        old = guest.rings.pop(0)
        os.close(old.kick_fd)
        os.close(old.call_fd)
        guest.setup_ring(0)
        data = os.urandom(512)
        assert blk_request(guest, VIRTIO_BLK_T_OUT, 9, data=data) == (VIRTIO_BLK_S_OK, b"")
        assert blk_request(guest, VIRTIO_BLK_T_IN, 9, read_len=512) == (VIRTIO_BLK_S_OK, data)
    finally:
        guest.close()
        os.close(err)
    t.survived("avail idx 5000")


# ------------------------------------------------------------------------------------------
# virtio-blk requests: errors are statuses, and bytes outside a request never change


IMAGE_SECTORS = 2048


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Path]]:
    tmp = tmp_path_factory.mktemp("image")
    img = tmp / "disk.img"
    img.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(IMAGE_SECTORS * 512)))
    b = _start(tmp, "img", "--image", str(img), "--serial", "hostile-0")
    try:
        yield Target(b), img
    finally:
        _finish(b)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw_chain(guest: ScriptedGuest, readable: list[bytes], writable: list[int]
               ) -> tuple[int, list[int]]:
    ring = guest.rings[0]
    head, addrs = ring.builder.add_chain(readable, writable)
    guest.kick(0)
    used = guest.wait_used(0)
    assert used[0][0] == head
    return used[0][1], addrs


BAD_BLK = [
    # (id, type, sector, data, read_len, expected status, log text)
    ("read-at-capacity", VIRTIO_BLK_T_IN, IMAGE_SECTORS, b"", 512, VIRTIO_BLK_S_IOERR,
     "beyond capacity 2048"),
    ("read-straddling-end", VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, b"", 1024, VIRTIO_BLK_S_IOERR,
     "at sector 2047 is beyond"),
    ("read-huge-sector", VIRTIO_BLK_T_IN, (1 << 64) - 1, b"", 512, VIRTIO_BLK_S_IOERR,
     f"sector {(1 << 64) - 1}"),
    ("write-at-capacity", VIRTIO_BLK_T_OUT, IMAGE_SECTORS, b"w" * 512, 0, VIRTIO_BLK_S_IOERR,
     "write of 512 bytes at sector 2048"),
    ("write-straddling-end", VIRTIO_BLK_T_OUT, IMAGE_SECTORS - 1, b"w" * 1024, 0,
     VIRTIO_BLK_S_IOERR, "write of 1024 bytes at sector 2047"),
    ("write-sector-2**63", VIRTIO_BLK_T_OUT, 1 << 63, b"w" * 512, 0, VIRTIO_BLK_S_IOERR,
     f"sector {1 << 63}"),
    ("write-not-sector-multiple", VIRTIO_BLK_T_OUT, 0, b"w" * 100, 0, VIRTIO_BLK_S_IOERR,
     "write of 100 bytes is not a multiple of 512"),
    ("read-not-sector-multiple", VIRTIO_BLK_T_IN, 0, b"", 100, VIRTIO_BLK_S_IOERR,
     "read of 100 bytes is not a multiple"),
    ("discard-beyond", VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", IMAGE_SECTORS - 1, 8, 0), 0,
     VIRTIO_BLK_S_IOERR, "discard of 4096 bytes at sector 2047"),
    ("discard-bad-flags", VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 0, 8, 0x80), 0,
     VIRTIO_BLK_S_UNSUPP, "flags 0x80"),
    ("unknown-type-99", 99, 0, b"w" * 512, 0, VIRTIO_BLK_S_UNSUPP,
     "unsupported request type 99"),
    ("unknown-type-0xffffffff", 0xFFFFFFFF, 0, b"", 512, VIRTIO_BLK_S_UNSUPP,
     "unsupported request type 4294967295"),
]


@pytest.mark.parametrize("rtype,sector,data,read_len,status,text",
                         [c[1:] for c in BAD_BLK], ids=[c[0] for c in BAD_BLK])
def test_bad_blk_request_gets_an_error_status(image: tuple[Target, Path], rtype: int,
                                              sector: int, data: bytes, read_len: int,
                                              status: int, text: str) -> None:
    t, img = image
    t.mark()
    before = _sha(img)
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        guest.setup_ring(0)
        got, payload = blk_request(guest, rtype, sector, data=data, read_len=read_len)
        assert got == status
        assert payload == bytes(read_len)          # nothing was read into the buffer
        assert _sha(img) == before
        # the queue goes on serving
        assert blk_request(guest, VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
    finally:
        guest.close()
    assert _sha(img) == before
    t.wait_log(text)
    t.wait_idle_fds()


def test_malformed_blk_chains_are_handled(image: tuple[Target, Path]) -> None:
    t, img = image
    t.mark()
    before = _sha(img)
    guest = ScriptedGuest(t.path, timeout=WAIT)
    try:
        start(guest)
        guest.setup_ring(0)
        # a zero-length header: only the status byte
        length, addrs = _raw_chain(guest, [], [1])
        assert length == 1 and guest.memory.read(addrs[-1], 1)[0] == VIRTIO_BLK_S_IOERR
        # a short header (8 of 16 bytes)
        length, addrs = _raw_chain(guest, [BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 0)[:8]], [1])
        assert length == 1 and guest.memory.read(addrs[-1], 1)[0] == VIRTIO_BLK_S_IOERR
        # a header split over two descriptors is fine; zero-length descriptors too
        hdr = BLK_HDR.pack(VIRTIO_BLK_T_GET_ID, 0, 0)
        length, addrs = _raw_chain(guest, [hdr[:5], b"", hdr[5:]], [20, 0, 1])
        assert length == 21 and guest.memory.read(addrs[-1], 1)[0] == VIRTIO_BLK_S_OK
        assert guest.memory.read(addrs[3], 9) == b"hostile-0"
        # no status byte at all: completed with nothing written, never served
        length, _ = _raw_chain(guest, [BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 0) + b"z" * 512], [])
        assert length == 0
        # a zero-length write and read, a flush
        assert blk_request(guest, VIRTIO_BLK_T_OUT, 5)[0] == VIRTIO_BLK_S_OK
        assert blk_request(guest, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        assert _sha(img) == before
        # a good write changes exactly its sector
        expected = bytearray(img.read_bytes())
        assert blk_request(guest, VIRTIO_BLK_T_OUT, 5, data=b"\xaa" * 512) == \
            (VIRTIO_BLK_S_OK, b"")
        expected[5 * 512:6 * 512] = b"\xaa" * 512
        assert img.read_bytes() == bytes(expected)
    finally:
        guest.close()
    t.wait_log("header of 0 bytes", "header of 8 bytes", "has no status byte")
    t.wait_idle_fds()
    assert t.b.alive()
