"""An NBD client used as a block store: :class:`NbdStore`, a disk that lives on an NBD server.

Owns one connection to an NBD server (qemu-nbd, nbdkit, nbd-server, ...): the parsing of NBD URIs
(the NBD project's doc/uri.md), the fixed-newstyle handshake, done synchronously so that ``size``
is known before anything runs, and the transmission phase (doc/proto.md) on the asyncio loop of
the first coroutine that uses the store, with many requests in flight matched to their simple
replies by cookie.

It must never: import any part of vhostpy but ``errors`` (it is a layer-3 store), negotiate
structured replies, TLS or extensions, leave a caller waiting on a dead connection, reconnect
behind the device's back, or serve one store from two event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from vhostpy.errors import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
#: Largest request sent when the server states no maximum block size.
DEFAULT_MAX_REQUEST = 32 << 20

NBDMAGIC, IHAVEOPT, OLDSTYLE_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x00420281861253
OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x3E889045565A9, 0x25609513, 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1  # handshake flags (and the client's)
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ACK, REP_INFO, REP_ERR = 1, 3, 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERRORS = {REP_ERR | n: why for n, why in enumerate((
    "option unsupported", "denied by policy", "invalid request", "unsupported on this platform",
    "TLS required", "unknown export", "server shutting down", "block size required",
    "request too big"), start=1)}
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
# transmission flags
TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_TRIM = 1 << 1, 1 << 2, 1 << 5
TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 1 << 6, 1 << 8

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_WRITE_ZEROES: "WRITE_ZEROES"}

#: NBD error values are Linux's numbers on the wire; map them to this host's errno.
NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
             75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}
NBD_ESHUTDOWN = 108

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_DISC = _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
_OPTION_REPLY = struct.Struct(">QIII")
#: Longest option reply accepted during the handshake (strings are at most 4096 bytes).
_MAX_OPTION_REPLY = 64 << 10


@dataclass(frozen=True)
class NbdAddress:
    """Where an export lives: ``host``/``port`` (TCP) or ``socket_path`` (UNIX), and its name."""

    uri: str
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None


def parse_uri(uri: str) -> NbdAddress:
    """Parse ``nbd://host[:port]/[export]`` or ``nbd+unix:///[export]?socket=PATH``.

    The export name is the percent-decoded path without its leading ``/`` (empty: the default
    export). Anything else (TLS schemes, unknown schemes or query parameters, a missing host or
    socket, a bad port) raises ConfigurationError naming the URI.
    """
    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(f"bad NBD URI {uri!r}: {why}")

    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise bad(str(e)) from None
    scheme = parts.scheme.lower()
    if scheme.startswith("nbds"):
        raise bad("TLS (nbds) is not supported; use nbd:// or nbd+unix://")
    if scheme not in ("nbd", "nbd+unix"):
        raise bad("expected nbd://host[:port]/[export] or nbd+unix:///[export]?socket=PATH")
    if parts.path and not parts.path.startswith("/"):
        raise bad("the export name must follow a '/'")
    if parts.fragment:
        raise bad("unexpected fragment")
    export = unquote(parts.path[1:])
    if "\0" in export or len(export.encode()) > 4096:
        raise bad("export names hold no NUL and are at most 4096 bytes")
    query: dict[str, str] = {}
    for item in filter(None, parts.query.split("&")):
        key, _, value = (unquote(x) for x in item.partition("="))
        if key in query:
            raise bad(f"query parameter {key!r} given twice")
        query[key] = value
    unknown = sorted(k for k in query if not k.startswith("x-") and k != "socket")
    if unknown:
        raise bad(f"unsupported query parameter(s): {', '.join(unknown)}")
    if scheme == "nbd":
        if "socket" in query:
            raise bad("socket= belongs to nbd+unix:// URIs")
        if parts.username is not None:
            raise bad("user info is not supported")
        if not parts.hostname:
            raise bad("no host")
        if port == 0:
            raise bad("port 0")
        return NbdAddress(uri, export, host=parts.hostname, port=port or DEFAULT_PORT)
    if parts.netloc:
        raise bad("an nbd+unix URI has no host: nbd+unix:///[export]?socket=PATH")
    if not query.get("socket"):
        raise bad("nbd+unix needs ?socket=PATH")
    return NbdAddress(uri, export, socket_path=query["socket"])


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Request(NamedTuple):
    command: int
    offset: int
    length: int
    future: asyncio.Future[bytes]


class NbdStore:
    """A block store on one NBD export: ``size``, ``read``, ``write``, ``flush``, ``discard``,
    ``write_zeroes`` (the coroutines) and ``close``/``aclose``.

    The handshake runs in the constructor (blocking, bounded by ``timeout``) and raises
    ConfigurationError naming the URI and the server's reason. The first coroutine call attaches
    the store to its running loop; a call from any other loop raises RuntimeError. Requests run
    concurrently on one connection; one larger than ``max_request`` (the server's maximum block
    size, else 32 MiB, lowered by the ``max_request`` argument) is split and joined.

    Capabilities, fixed by the server's transmission flags: ``read_only``; ``can_flush`` (else
    ``flush`` is a no-op); ``can_discard`` (``discard`` always exists and raises
    OSError(EOPNOTSUPP) without it: a device offers discard when
    ``getattr(store, "can_discard", True)``); ``can_write_zeroes`` (else ``write_zeroes`` writes
    zero bytes); ``can_multi_conn`` (informative: this client uses one connection).

    Failures are OSError: a server error carries its errno (EIO, ENOSPC, EPERM, ...) and names
    the command, offset and length; a lost or garbled connection fails every request in flight and
    every later call with EIO (one WARNING line, no reconnection).
    """

    def __init__(self, uri: str, *, timeout: float = 10.0, max_request: int | None = None) -> None:
        self.uri = uri
        self.address = parse_uri(uri)
        self._timeout = timeout
        self.min_block_size, self.preferred_block_size, self.max_block_size = 1, 0, 0
        sock = self._connect_socket()
        try:
            self.size, self.flags = self._handshake(sock)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.read_only = bool(self.flags & TF_READ_ONLY)
        self.can_flush = bool(self.flags & TF_SEND_FLUSH)
        self.can_discard = bool(self.flags & TF_SEND_TRIM) and not self.read_only
        self.can_write_zeroes = bool(self.flags & TF_SEND_WRITE_ZEROES) and not self.read_only
        self.can_multi_conn = bool(self.flags & TF_CAN_MULTI_CONN)
        # a guest's logical block must be a power of two from 512 to a page (Linux virtio_blk)
        self.block_size = min(max(self.preferred_block_size, 512), 4096)
        limit = min(self.max_block_size or DEFAULT_MAX_REQUEST, max_request or 1 << 32, 2**32 - 1)
        self.max_request = max(limit - limit % self.min_block_size, self.min_block_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Request] = {}
        #: Requests queued in this turn of the loop, sent together by `_send_queued` (one
        #: write, one syscall, for every request a burst of guest requests made).
        self._queued: list[bytes | memoryview] = []
        self._cookies = itertools.count(1)
        self._broken: str | None = None
        self._closed = False
        log.debug("NBD %s: export %r, %d bytes, flags %#x, block sizes %d/%d/%d", uri,
                  self.address.export, self.size, self.flags, self.min_block_size,
                  self.preferred_block_size, self.max_block_size)

    @classmethod
    def connect(cls, uri: str, *, timeout: float = 10.0,
                max_request: int | None = None) -> NbdStore:
        """Connect and handshake (blocking); the same as ``NbdStore(uri, ...)``."""
        return cls(uri, timeout=timeout, max_request=max_request)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<NbdStore {self.uri} size={self.size} {state}>"

    # ------------------------------------------------------------------ handshake (blocking)

    def _fail(self, why: str) -> ConfigurationError:
        return ConfigurationError(f"NBD {self.uri}: {why}")

    def _connect_socket(self) -> socket.socket:
        a = self.address
        try:
            if a.socket_path is None:
                sock = socket.create_connection((a.host, a.port), timeout=self._timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.settimeout(self._timeout)
                sock.connect(a.socket_path)
            except OSError:
                sock.close()
                raise
            return sock
        except OSError as e:
            raise self._fail(f"cannot connect: {e}") from None

    def _recv(self, sock: socket.socket, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                raise self._fail(f"timed out after {self._timeout} s waiting for {what}") from None
            except OSError as e:
                raise self._fail(f"connection failed while reading {what}: {e}") from None
            if not chunk:
                raise self._fail(f"server closed the connection; expected {what}")
            buf += chunk
        return bytes(buf)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as e:
            raise self._fail(f"sending the handshake failed: {e}") from None

    def _handshake(self, sock: socket.socket) -> tuple[int, int]:
        magic, style = struct.unpack(">QQ", self._recv(sock, 16, "the NBD greeting"))
        if magic != NBDMAGIC:
            raise self._fail(f"not an NBD server (greeting {magic:#018x})")
        if style == OLDSTYLE_MAGIC:
            raise self._fail("oldstyle NBD server; only fixed newstyle is supported")
        if style != IHAVEOPT:
            raise self._fail(f"unknown NBD negotiation style {style:#x}")
        (hflags,) = struct.unpack(">H", self._recv(sock, 2, "handshake flags"))
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._fail("server does not speak fixed newstyle negotiation")
        no_zeroes = hflags & FLAG_NO_ZEROES
        name = self.address.export.encode()
        # client flags, then NBD_OPT_GO asking for the export and its block sizes
        self._send(sock, struct.pack(f">IQIII{len(name)}sHHH", FLAG_FIXED_NEWSTYLE | no_zeroes,
                                     IHAVEOPT, OPT_GO, len(name) + 10, len(name), name, 2,
                                     INFO_EXPORT, INFO_BLOCK_SIZE))
        size = flags = None
        while True:
            head = self._recv(sock, _OPTION_REPLY.size, "an option reply")
            magic, option, rtype, length = _OPTION_REPLY.unpack(head)
            if magic != OPTION_REPLY_MAGIC or option != OPT_GO or length > _MAX_OPTION_REPLY:
                raise self._fail(f"malformed option reply (magic {magic:#x}, option {option}, "
                                 f"length {length})")
            data = self._recv(sock, length, "option reply data")
            if rtype == REP_INFO and len(data) >= 2:
                (info,) = struct.unpack_from(">H", data)
                if info == INFO_EXPORT and len(data) >= 12:
                    size, flags = struct.unpack_from(">QH", data, 2)
                elif info == INFO_BLOCK_SIZE and len(data) >= 14:
                    low, pref, high = struct.unpack_from(">III", data, 2)
                    # the spec's rules (powers of two, min <= preferred, max a multiple of min,
                    # or 2**32-1); sizes that break them are ignored rather than trusted
                    if _pow2(low) and low <= 65536 and _pow2(pref) and pref >= low and \
                            high >= low and (high % low == 0 or high == 2**32 - 1):
                        self.min_block_size, self.preferred_block_size = low, pref
                        self.max_block_size = high
            elif rtype == REP_ACK:
                break
            elif rtype == REP_ERR_UNSUP:
                return self._export_name(sock, no_zeroes)
            elif rtype & REP_ERR:
                reason = REP_ERRORS.get(rtype, f"error {rtype:#x}")
                message = data.decode(errors="replace")
                raise self._fail(f"server refused export {self.address.export!r}: {reason}"
                                 + (f": {message}" if message else ""))
            else:
                raise self._fail(f"unexpected reply type {rtype} to NBD_OPT_GO")
        if size is None or flags is None:
            raise self._fail("server finished NBD_OPT_GO without NBD_INFO_EXPORT")
        return size, flags

    def _export_name(self, sock: socket.socket, no_zeroes: int) -> tuple[int, int]:
        name = self.address.export.encode()
        self._send(sock, struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        # a server refuses NBD_OPT_EXPORT_NAME by closing the connection
        reply = self._recv(sock, 10 if no_zeroes else 134, f"export {self.address.export!r}")
        size, flags = struct.unpack_from(">QH", reply)
        return size, flags

    # ------------------------------------------------------------------ transmission (asyncio)

    def _where(self, command: int, offset: int, length: int) -> str:
        return f"NBD {self.uri}: {CMD_NAMES[command]} offset={offset} length={length}"

    async def _attach(self) -> asyncio.StreamWriter:
        loop = asyncio.get_running_loop()
        if self._loop is None and not self._closed:
            self._loop = loop
            self._ready = loop.create_task(self._open(), name=f"NBD attach {self.uri}")
        elif self._loop is not None and self._loop is not loop:
            raise RuntimeError(f"NbdStore {self.uri} is attached to another event loop; "
                               "one store serves one loop")
        if self._ready is not None and not self._ready.done():
            await asyncio.shield(self._ready)  # a cancelled first caller leaves it running
        if self._closed or self._broken is not None or self._writer is None:
            why = "closed" if self._closed else f"connection broken: {self._broken}"
            raise OSError(errno.EIO, f"NBD {self.uri}: {why}")
        return self._writer

    async def _open(self) -> None:
        try:
            self._sock.setblocking(False)
            reader, self._writer = await asyncio.open_connection(sock=self._sock)
        except OSError as e:
            return self._break(f"cannot attach to the event loop: {e}")
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_replies(reader), name=f"NBD replies {self.uri}")
        if self._closed:  # close() ran while we attached
            self._shutdown()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        """The one reader: match each simple reply to its request by cookie. Without structured
        replies a READ's data follows only a successful reply (what qemu-nbd and nbdkit do)."""
        try:
            while True:
                magic, error, cookie = _REPLY.unpack(await reader.readexactly(_REPLY.size))
                request = self._pending.get(cookie)
                if magic != SIMPLE_REPLY_MAGIC or request is None:
                    return self._break(f"bad reply magic {magic:#010x}" if magic !=
                                       SIMPLE_REPLY_MAGIC else f"reply for unknown cookie {cookie}")
                data = b""
                if request.command == CMD_READ and not error:
                    data = await reader.readexactly(request.length)
                del self._pending[cookie]
                if request.future.done():  # its caller was cancelled
                    pass
                elif error:
                    code = NBD_ERRNO.get(error, errno.EIO)
                    request.future.set_exception(OSError(code, f"{self._where(*request[:3])} "
                        f"failed: server error {errno.errorcode.get(code, '?')} ({error})"))
                else:
                    request.future.set_result(data)
                if error == NBD_ESHUTDOWN and self._broken is None:
                    self._broken = "server is shutting down (ESHUTDOWN)"
                    log.warning("NBD %s: %s; disconnecting", self.uri, self._broken)
                if self._broken is not None and not self._pending and self._writer is not None:
                    self._writer.write(_DISC)  # the soft disconnect ESHUTDOWN asks for
        except asyncio.CancelledError:
            self.close()  # by close(), or by a loop shutting down (asyncio.run cancels tasks)
            raise
        except asyncio.IncompleteReadError as e:
            self._break("server closed the connection" if not e.partial else
                        f"short read ({len(e.partial)} of {e.expected} bytes)")
        except OSError as e:
            self._break(f"connection error: {e}")
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("NBD %s: reply reader failed", self.uri)
            self._break(f"reply reader failed: {e!r}")

    def _break(self, reason: str) -> None:
        """The connection is unusable: fail everything in flight (quietly after a close)."""
        if self._broken is None and not self._closed:
            log.warning("NBD %s: connection broken (%s); failing %d request(s) in flight",
                        self.uri, reason, len(self._pending))
        self._broken = self._broken or reason
        self._fail_pending("store closed" if self._closed else f"connection lost: {self._broken}")
        if self._writer is not None:
            self._writer.close()

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for r in pending.values():
            if not r.future.done():
                r.future.set_exception(OSError(errno.EIO, f"{self._where(*r[:3])}: {why}"))

    def _queue(self, writer: asyncio.StreamWriter, command: int, offset: int, length: int,
               payload: memoryview | None) -> asyncio.Future[bytes]:
        """Queue one request (header and payload together) and return its reply's future;
        the queue goes out at the end of this turn of the loop."""
        assert self._loop is not None
        cookie = next(self._cookies)
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[cookie] = _Request(command, offset, length, future)
        if not self._queued:
            self._loop.call_soon(self._send_queued, writer)
        self._queued.append(_REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length))
        if payload is not None:
            self._queued.append(payload)
        return future

    def _send_queued(self, writer: asyncio.StreamWriter) -> None:
        queued, self._queued = self._queued, []
        if self._broken is not None or self._closed or writer.is_closing():
            return    # their futures failed (or fail) with the connection
        try:
            writer.writelines(queued)
        except OSError as e:
            self._break(f"sending failed: {e}")

    async def _run(self, command: int, offset: int, length: int,
                   payload: memoryview | None = None, fill: bytes | None = None) -> list[bytes]:
        """Send one command as requests of at most ``max_request`` bytes (``fill``: the payload
        of every WRITE, and the request size) and wait for all their replies."""
        writer = await self._attach()
        step = min(self.max_request, len(fill)) if fill is not None else self.max_request
        source = payload if fill is None else memoryview(fill)
        if length <= step and fill is None:    # the usual case: one request
            future = self._queue(writer, command, offset, length, payload)
            await self._drain(writer)
            return [await future]
        futures: list[asyncio.Future[bytes]] = []
        error: BaseException | None = None
        try:
            for pos in range(0, max(length, 1), step):
                if self._broken is not None or self._closed:
                    raise OSError(errno.EIO, f"{self._where(command, offset, length)}: "
                                             f"{self._broken or 'store closed'}")
                n = min(step, length - pos)
                start = pos if fill is None else 0
                futures.append(self._queue(writer, command, offset + pos, n,
                                           None if source is None else source[start:start + n]))
                await self._drain(writer)
        except OSError as e:
            self._break(f"sending failed: {e}")
            error = e
        results = await asyncio.gather(*futures, return_exceptions=True)
        error = next((r for r in results if isinstance(r, BaseException)), error)
        if error is not None:
            raise error
        return results  # type: ignore[return-value]  # no exceptions among them

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Flow control: wait while the transport holds more than its high-water mark (a
        server that stopped reading); the queued requests go out first."""
        transport = writer.transport
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            if self._queued:
                self._send_queued(writer)
            await writer.drain()

    def _check(self, command: int, offset: int, length: int, *, writes: bool = False) -> None:
        if writes and self.read_only:
            raise OSError(errno.EPERM, f"{self._where(command, offset, length)}: read-only export")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{self._where(command, offset, length)}: outside the "
                                        f"export's {self.size} bytes")
        if (offset | length) % self.min_block_size:
            raise OSError(errno.EINVAL, f"{self._where(command, offset, length)}: not aligned "
                                        f"to the server's minimum block size {self.min_block_size}")

    #: Every method is awaited (a coroutine, or a future): a device serves this store on an
    #: asyncio loop (`BlockDevice.prefers_asyncio`).
    prefers_asyncio = True

    def read(self, offset: int, length: int) -> Awaitable[bytes]:
        """The ``length`` bytes at ``offset`` (awaitable: a future for one request on an
        attached connection, which costs no task; a coroutine otherwise)."""
        try:
            self._check(CMD_READ, offset, length)
        except OSError as exc:
            return _failed(exc)   # raised when awaited, as from a coroutine
        future = self._one(CMD_READ, offset, length, None)
        return future if future is not None else self._read(offset, length)

    async def _read(self, offset: int, length: int) -> bytes:
        parts = await self._run(CMD_READ, offset, length) if length else [b""]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> Awaitable[Any]:
        """Write ``data`` (any contiguous bytes-like object, sent as is) at ``offset``
        (awaitable, as `read`)."""
        view = memoryview(data).cast("B")
        try:
            self._check(CMD_WRITE, offset, view.nbytes, writes=True)
        except OSError as exc:
            return _failed(exc)
        future = self._one(CMD_WRITE, offset, view.nbytes, view) if view.nbytes else None
        return future if future is not None else self._write(offset, view)

    async def _write(self, offset: int, view: memoryview) -> None:
        if view.nbytes:
            await self._run(CMD_WRITE, offset, view.nbytes, payload=view)

    def _one(self, command: int, offset: int, length: int, payload: memoryview | None
             ) -> asyncio.Future[bytes] | None:
        """The reply future of a request sent as one NBD request right away, when that is
        possible here: called on the attached loop, the connection up, the request within
        `max_request`, the transport not backed up. None: take the coroutine path."""
        writer = self._writer
        if (writer is None or self._broken is not None or self._closed or length == 0
                or length > self.max_request or self._loop is None):
            return None
        try:
            if asyncio.get_running_loop() is not self._loop:
                return None
        except RuntimeError:
            return None
        transport = writer.transport
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            return None
        return self._queue(writer, command, offset, length, payload)

    async def flush(self) -> None:
        """Make completed writes durable (NBD_CMD_FLUSH); a no-op if the server has no flush."""
        if self.can_flush:
            await self._run(CMD_FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM; OSError(EOPNOTSUPP) when ``can_discard`` is false."""
        self._check(CMD_TRIM, offset, length, writes=True)
        if not self.can_discard:
            raise OSError(errno.EOPNOTSUPP, f"NBD {self.uri}: the server does not support trim")
        if length:
            await self._run(CMD_TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: NBD_CMD_WRITE_ZEROES, or writes of zero bytes if the server has none."""
        self._check(CMD_WRITE_ZEROES, offset, length, writes=True)
        if length and self.can_write_zeroes:
            await self._run(CMD_WRITE_ZEROES, offset, length)
        elif length:
            await self._run(CMD_WRITE, offset, length, fill=bytes(min(length, 1 << 20)))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Fail requests in flight, send NBD_CMD_DISC if the connection still works, and close
        the socket. Idempotent; callable from any thread."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed() or self._writer is None:
            if self._broken is None:  # not (or no longer) on a loop: the socket is ours again
                with contextlib.suppress(OSError):
                    self._sock.send(_DISC)
            self._sock.close()
        elif loop.is_running() and _running_loop() is not loop:
            loop.call_soon_threadsafe(self._shutdown)
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._writer is not None and self._broken is None and not self._writer.is_closing():
            self._writer.write(_DISC)
        self._fail_pending("store closed")
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        """Let requests in flight finish (for up to ``timeout`` seconds), then ``close()`` and
        wait for the socket to close. Idempotent."""
        if self._loop is asyncio.get_running_loop() and not self._closed and self._pending:
            await asyncio.wait([r.future for r in self._pending.values()], timeout=self._timeout)
        self.close()
        if self._loop is asyncio.get_running_loop() and self._writer is not None:
            waits: list[asyncio.Future[None]] = [asyncio.ensure_future(_wait_closed(self._writer))]
            if self._reader_task is not None:
                waits.append(self._reader_task)
            await asyncio.wait(waits, timeout=self._timeout)


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):  # the peer reset a connection we were closing anyway
        await writer.wait_closed()


async def _failed(exc: BaseException) -> Any:
    """An awaitable that raises `exc`."""
    raise exc
