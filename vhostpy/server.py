"""The vhost-user edge: a UNIX socket, `recvmsg` with SCM_RIGHTS, one session per connection.

`Server` listens on `--socket-path` (or adopts `--fd`, a listening or connected socket),
serves one front-end at a time and, when it goes away, waits for the next. Further
connections wait in the listen backlog meanwhile. Every byte and fd read goes to the
connection's `Decoder`; every decoded message to its `Session`. Whatever the front-end
does (garbage, truncation, a vanished peer, replies it never reads) ends at most that
connection, never the process, and never stalls the loop: every received fd is made
non-blocking, and replies go out through a bounded queue written when the socket is
writable (`MAX_PENDING_REPLY_BYTES`; a front-end past it is dropped).

This module is sockets only: the rings' kicks, polling and interrupt coalescing belong to
the session's `vring.Vring` runners, which get the loop as their `RingHost`.
"""

from __future__ import annotations

import array
import collections
import logging
import os
import socket
import stat
from collections.abc import Callable

from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.errors import ConfigurationError, ProtocolError
from vhostpy.loop import Host
from vhostpy.session import Session

log = logging.getLogger(__name__)

RECV_BYTES = 65536
#: Room for more fds than any message may carry, so extras are received and closed by us
#: rather than silently dropped by the kernel.
RECV_FDS = 64
#: Reply bytes a front-end may leave unread before it is dropped (it sends requests and
#: never reads the answers).
MAX_PENDING_REPLY_BYTES = 256 * 1024


def _fd_space() -> int:
    return socket.CMSG_SPACE(RECV_FDS * array.array("i").itemsize)


class Connection:
    """One front-end: its socket, decoder, session and reply queue."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.decoder = p.Decoder("frontend")
        self.session = Session(server.device, server.loop)
        # Not from inside the ring's call stack: close on the loop's next turn.
        self.session.on_fatal = lambda reason: server.loop.call_later(0, self.close)
        self.session.on_reply = self._late_reply
        self.closed = False
        #: Encoded replies not yet (fully) sent: (bytes, fds to send with the first byte).
        self._out: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()
        self._out_bytes = 0
        sock.setblocking(False)

    # -- socket ----------------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(RECV_BYTES, _fd_space())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("front-end connection error: %s", exc)
            self.close()
            return
        fds = _collect_fds(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            log.warning("front-end sent more than %d fds at once; dropping the connection",
                        RECV_FDS)
            _close_all(fds)
            self.close()
            return
        if not data:
            _close_all(fds)
            self._report_truncation()
            log.info("front-end disconnected")
            self.close()
            return
        self.decoder.feed(data, fds)
        if self.session.waiting and self.decoder.pending_bytes > MAX_PENDING_REPLY_BYTES:
            log.warning("front-end sent %d bytes while its GET_VRING_BASE reply was pending; "
                        "dropping the connection", self.decoder.pending_bytes)
            self.close()
            return
        self._drain()

    def _late_reply(self, replies: list[p.Message]) -> None:
        """A reply the session gave after `handle` returned: send it, then go on with the
        messages that waited for it."""
        if self.closed:
            return
        self._send(replies)
        self._drain()

    def _report_truncation(self) -> None:
        """At EOF: name the message the front-end left unfinished, if any."""
        pending = self.decoder.pending_bytes
        if not pending:
            return
        head = self.decoder.pending_header()
        if head is None:
            log.warning("front-end disconnected after %d of the %d bytes of a message header",
                        pending, p.HEADER_SIZE)
        else:
            req, flags, size = head
            log.warning("front-end disconnected in the middle of %s (flags=%#x): payload "
                        "size=%d but only %d bytes arrived", p.request_name(req), flags, size,
                        pending - p.HEADER_SIZE)

    def _drain(self) -> None:
        while not self.closed and not self.session.waiting:
            try:
                msg = self.decoder.next_message()
            except ProtocolError as err:
                replies = self.session.handle_error(err)
                self._send(replies)
                if err.fatal:
                    log.warning("dropping the connection: the byte stream cannot be resynchronised")
                    self.close()
                continue
            if msg is None:
                return
            self._send(self.session.handle(msg))

    def _send(self, replies: list[p.Message]) -> None:
        """Queue `replies` and write what the socket takes now; the rest goes out when it is
        writable. A front-end that leaves more than MAX_PENDING_REPLY_BYTES unread is dropped."""
        for reply in replies:
            data, fds = p.encode(reply)
            self._out.append((data, fds))
            self._out_bytes += len(data)
        if self._out_bytes > MAX_PENDING_REPLY_BYTES:
            log.warning("front-end left %d bytes of replies unread (limit %d); dropping the "
                        "connection", self._out_bytes, MAX_PENDING_REPLY_BYTES)
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            data, fds = self._out[0]
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], anc)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.server.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as exc:
                log.warning("cannot send a reply: %s; dropping the connection", exc)
                self.close()
                return
            self._out_bytes -= sent
            if sent < len(data):
                self._out[0] = (data[sent:], ())   # the fds went with the first byte
            else:
                self._out.popleft()
        if not self.closed:
            self.server.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """End this connection and release everything the front-end gave us."""
        if self.closed:
            return
        self.closed = True
        fileno = self.sock.fileno()
        self.server.loop.remove_reader(fileno)
        self.server.loop.remove_writer(fileno)
        self._out.clear()
        self._out_bytes = 0
        try:
            self.session.close()
        finally:
            _close_all(self.decoder.take_pending_fds())
            self.sock.close()
            self.server.connection_closed(self)


class Server:
    """Serves `device` to one vhost-user front-end at a time, guest after guest."""

    def __init__(self, device: Device, loop: Host, *, socket_path: str | None = None,
                 fd: int | None = None, on_connection_closed: Callable[[], None] | None = None
                 ) -> None:
        if (socket_path is None) == (fd is None):
            raise ConfigurationError("give exactly one of --socket-path and --fd")
        self.device = device
        self.loop = loop
        self.socket_path = socket_path
        self.connection: Connection | None = None
        self.connections_served = 0
        self.on_connection_closed = on_connection_closed
        self.listener: socket.socket | None = None
        if socket_path is not None:
            self.listener = listen_unix(socket_path)
        else:
            assert fd is not None
            sock = _adopt(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.listener = sock
            else:
                self._serve(sock)
        if self.listener is not None:
            self.listener.setblocking(False)
            self._listen_for_next()

    def _listen_for_next(self) -> None:
        assert self.listener is not None
        self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        # One front-end at a time: others wait in the backlog until this one leaves.
        self.loop.remove_reader(self.listener.fileno())
        self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        self.connections_served += 1
        log.info("front-end connected (connection %d)", self.connections_served)
        conn = Connection(self, sock)
        self.connection = conn
        self.loop.add_reader(sock.fileno(), conn.on_readable)

    def connection_closed(self, conn: Connection) -> None:
        if self.connection is conn:
            self.connection = None
        if self.listener is not None:
            self._listen_for_next()
        if self.on_connection_closed is not None:
            self.on_connection_closed()

    def status(self) -> dict[str, object]:
        """Where this server listens, its front-ends so far, and the current one's
        `Session.status()` (None while no front-end is connected)."""
        conn = self.connection
        return {"socket": self.socket_path, "connected": conn is not None,
                "connections_served": self.connections_served,
                "session": conn.session.status() if conn is not None else None}

    def close(self) -> None:
        """Drop the current front-end, stop listening and remove our socket file."""
        if self.connection is not None:
            self.connection.close()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass


#: Bytes of `sockaddr_un.sun_path` on Linux: a socket path must fit (a terminating NUL is optional).
_SUN_PATH_MAX = 108


def listen_unix(path: str) -> socket.socket:
    """Bind a listening socket at `path`, refusing a path that is in use or not a socket.

    Every way `path` can be unusable (a parent that is missing or not a directory, a directory
    we may not write, a name too long for a UNIX socket address, another process listening
    there, a file that is not a socket) is a ConfigurationError naming `path` and the reason:
    the caller reports it in one line. A stale socket (nobody listening) is replaced.
    """
    if not path:
        raise ConfigurationError("the socket path is empty")
    size = len(os.fsencode(path))
    if size > _SUN_PATH_MAX:
        raise ConfigurationError(f"cannot listen on {path!r}: path too long for a UNIX socket "
                                 f"({size} bytes, at most {_SUN_PATH_MAX})")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:   # e.g. ENOTDIR (/etc/passwd/x.sock), EACCES on a parent
        raise ConfigurationError(f"cannot listen on {path!r}: {exc.strerror or exc}") from exc
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigurationError(f"socket path {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # a stale socket left by a dead process
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ConfigurationError(f"cannot replace the stale socket {path!r}: "
                                         f"{exc.strerror or exc}") from exc
        except OSError as exc:
            raise ConfigurationError(f"socket path {path!r}: {exc.strerror or exc}") from exc
        else:
            raise ConfigurationError(f"socket path {path!r} is in use by another process")
        finally:
            probe.close()
    # Listen under a temporary name, then link it to `path`: whoever waits for `path` to
    # appear (libvirt, a test, the stale check above) must never find a socket that still
    # refuses connections. link() fails if `path` appeared meanwhile; it never replaces it.
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
        tmp = path  # only the temporary name is too long for sun_path: bind in place
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        sock.listen(128)
        if tmp != path:
            os.link(tmp, path)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {path!r}: {exc.strerror or exc}") from exc
    finally:
        if tmp != path:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return sock


def _adopt(fd: int) -> socket.socket:
    """The inherited socket `fd` (`--fd`): a UNIX stream socket, listening or connected.

    Anything else (a closed number, a file, another kind of socket) is a ConfigurationError
    naming the fd; the fd is left open for its owner then.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ConfigurationError(f"--fd {fd}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigurationError(f"--fd {fd} is not a socket")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigurationError(f"--fd {fd}: {exc.strerror or exc}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigurationError(f"--fd {fd} is not a UNIX stream socket")
    return sock


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
            os.set_blocking(fd, False)   # no fd the front-end hands us may ever block us
        except OSError:
            pass
    return fds


def _close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
