"""The vhost-user edge: a UNIX socket, `recvmsg` with SCM_RIGHTS, one session per connection.

`Server` listens on `--socket-path` (or adopts `--fd`, a listening or connected socket),
serves one front-end at a time and, when it goes away, waits for the next. Further
connections wait in the listen backlog meanwhile. Every byte and fd read goes to the
connection's `Decoder`; every decoded message to its `Session`. Whatever the front-end
does (garbage, truncation, a vanished peer) ends at most that connection, never the
process.

Polling with a budget: a kick that finds work (at least `device.poll_after` chains: a
device answering one request per kick, such as virtio-blk at queue depth 1, gains nothing
from a spin after each) starts polling that ring with kicks disabled (`vq.polling`). Each
turn serves the ring for up to `POLL_TURN` seconds and then yields to the event loop (a
zero-delay timer), so the control socket and other rings are served in between. After
`POLL_IDLE` seconds (or the device's `poll_idle`) without work the ring asks for kicks again,
re-checks it (work that raced in keeps the polling going) and goes back to waiting on its
kick eventfd: an idle back-end uses no CPU.

Interrupt coalescing, for a device with `coalesce` set (`device.Coalescing`): once an
interrupt covered two or more completions the driver counts as streaming, and the next
kick's completions are held (`vq.hold_signals`) while the ring is polled; the driver is
interrupted once when the ring has been quiet for `quiet`, `batch` completions wait or the
oldest waited `wait`, and always before the ring goes back to kicks. Held completions are
already in the used ring; only the interrupt waits.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.errors import ConfigurationError, ProtocolError
from vhostpy.loop import EventLoop
from vhostpy.session import Session, Vring
from vhostpy.virtqueue import Virtqueue

log = logging.getLogger(__name__)

RECV_BYTES = 65536
#: Room for more fds than any message may carry, so extras are received and closed by us
#: rather than silently dropped by the kernel.
RECV_FDS = 64
SEND_TIMEOUT = 10.0
#: Longest stretch one ring is served before the event loop gets its turn (seconds).
POLL_TURN = 0.0005
#: How long a polled ring may stay empty before it waits for kicks again (seconds).
POLL_IDLE = 0.0002


@dataclass
class _Held:
    """The interrupt coalescing state of one ring."""

    last_batch: int = 0        # completions the last interrupt decision covered
    since: float | None = None  # when the oldest held completion was seen (None: none held)
    streaming: bool = False     # whether the held ones may wait (see `Coalescing`)
    held: int = 0               # completions whose interrupt waited, in all
    releases: int = 0           # interrupt decisions that covered them


def _fd_space() -> int:
    return socket.CMSG_SPACE(RECV_FDS * array.array("i").itemsize)


class Connection:
    """One front-end: its socket, decoder and session."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.decoder = p.Decoder("frontend")
        self.kicks: dict[int, int] = {}
        self.polling: dict[int, float] = {}   # ring index -> when it last had work
        self.session = Session(server.device, self)
        self.poll_after = server.device.poll_after
        idle = server.device.poll_idle
        self.poll_idle = POLL_IDLE if idle is None else idle
        self.coalesce = server.device.coalesce
        self.held: dict[int, _Held] = {}   # ring index -> its coalescing state
        self.closed = False
        sock.setblocking(False)

    # -- SessionHost -----------------------------------------------------------------------
    def watch_kick(self, fd: int, index: int) -> None:
        self.kicks[fd] = index
        self.server.loop.add_reader(fd, lambda: self._on_kick(fd))

    def unwatch_kick(self, fd: int) -> None:
        self.kicks.pop(fd, None)
        self.server.loop.remove_reader(fd)

    def _on_kick(self, fd: int) -> None:
        index = self.kicks.get(fd)
        if index is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("kick fd %d of vring %d: %s; no longer watched", fd, index, exc)
            self.unwatch_kick(fd)
            return
        vq = self.session.rings[index].vq
        held = self.held.setdefault(index, _Held()) if self.coalesce is not None else None
        streaming = held is not None and held.last_batch >= 2 and vq.call is not None
        vq.hold_signals = streaming or (held is not None and index in self.polling)
        served = self.session.kick(index)
        if held is not None and vq.hold_signals:
            if vq.unsignalled:
                if held.since is None:
                    held.since, held.streaming = time.monotonic(), streaming
                if index not in self.polling:
                    self._start_polling(index)
                return
            if index not in self.polling:
                vq.hold_signals = False
        elif held is not None and served:
            held.last_batch = served
        if self.poll_after and served >= self.poll_after and index not in self.polling:
            self._start_polling(index)

    # -- polling ---------------------------------------------------------------------------
    def _start_polling(self, index: int) -> None:
        self.polling[index] = time.monotonic()
        vq = self.session.rings[index].vq
        vq.polling = True
        vq.hold_signals = self.coalesce is not None   # `_on_kick` made its `_Held`
        self.server.loop.call_later(0, lambda: self._poll_turn(index))

    def _poll_turn(self, index: int) -> None:
        """Serve ring `index` for up to POLL_TURN; reschedule, or go back to kicks if idle."""
        if self.closed or index not in self.polling:
            return
        ring = self.session.rings[index]
        vq = ring.vq
        now = time.monotonic()
        end = now + POLL_TURN
        last_work = self.polling[index]
        held = self.held.get(index)   # None unless the device coalesces
        while ring.live and vq.polling:
            if self.session.poll(index):
                last_work = now = time.monotonic()
                if held is not None:
                    self._coalesce(vq, held, now, last_work)
                if now >= end:
                    break
                continue
            now = time.monotonic()
            if held is not None:
                self._coalesce(vq, held, now, last_work)
            if now - last_work >= self.poll_idle and (held is None or held.since is None):
                if self._keep_polling(index, held):
                    last_work = now = time.monotonic()
                    continue
                del self.polling[index]
                return
            break
        if not ring.live or not vq.polling:
            self._release(vq, held)
            vq.polling = False
            self.polling.pop(index, None)
            return
        self.polling[index] = last_work
        self.server.loop.call_later(0, lambda: self._poll_turn(index))

    def _keep_polling(self, index: int, held: _Held | None) -> bool:
        """Ring `index` went idle: stop polling it and ask for kicks again. Returns True (and
        polls on) when there is a reason to: the device took entries the driver published
        before kicks were back on (it need not kick for those), or, where the device leaves
        entries (receive buffers with no frame for them), entries added after those. Kicks
        are then asked for only past the entries left, which a driver adding more crosses."""
        ring = self.session.rings[index]
        if not self._ask_for_kicks(ring, held):
            return False
        if self.session.poll(index):
            return True
        return self._ask_for_kicks(ring, held, after_available=True)

    def _ask_for_kicks(self, ring: Vring, held: _Held | None, *,
                       after_available: bool = False) -> bool:
        """Stop polling `ring` and ask for kicks (`Virtqueue.enable_notifications`); if
        entries are there already, poll on instead and return True."""
        vq = ring.vq
        self._release(vq, held)
        vq.polling = False
        if not ring.live or not vq.enable_notifications(after_available=after_available):
            return False
        vq.polling = True
        vq.hold_signals = held is not None
        return True

    # -- interrupt coalescing (see the module docstring) -----------------------------------
    def _coalesce(self, vq: Virtqueue, held: _Held, now: float, last_work: float) -> None:
        """Interrupt the driver for what `vq` holds, once `Coalescing` says it is time."""
        pending = vq.unsignalled
        if not pending or vq.call is None:
            return
        if held.since is None:
            held.since, held.streaming = now, held.last_batch >= 2
        c = self.coalesce
        assert c is not None
        if (not held.streaming or pending >= c.batch or now - last_work >= c.quiet
                or now - held.since >= c.wait):
            self._release(vq, held)
            vq.hold_signals = True

    def _release(self, vq: Virtqueue, held: _Held | None) -> None:
        """Stop holding `vq`'s interrupts; interrupt the driver for what was held (if it
        asked for it: `signal_used`)."""
        waited = held is not None and held.since is not None and held.streaming
        if held is not None:
            held.since = None
        if not vq.hold_signals:
            return
        vq.hold_signals = False
        pending = vq.unsignalled
        if held is not None and pending:
            held.last_batch = pending
            if waited:
                held.held += pending
                held.releases += 1
        vq.signal_used()

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
        while not self.closed:
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
        for reply in replies:
            data, fds = p.encode(reply)
            try:
                self.sock.settimeout(SEND_TIMEOUT)
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    self.sock.sendmsg([data], anc)
                else:
                    self.sock.sendall(data)
            except OSError as exc:
                log.warning("cannot send %s reply: %s", p.request_name(reply.request), exc)
                self.close()
                return
            finally:
                if not self.closed:
                    self.sock.setblocking(False)

    def close(self) -> None:
        """End this connection and release everything the front-end gave us."""
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove_reader(self.sock.fileno())
        for fd in list(self.kicks):
            self.unwatch_kick(fd)
        for index in self.polling:
            vq = self.session.rings[index].vq
            vq.polling = vq.hold_signals = False
        self.polling.clear()
        for index, held in sorted(self.held.items()):
            if held.releases:
                log.info("vring %d: interrupt coalescing: %d completions held, %d interrupt "
                         "decisions for them", index, held.held, held.releases)
        try:
            self.session.close()
        finally:
            _close_all(self.decoder.take_pending_fds())
            self.sock.close()
            self.server.connection_closed(self)


class Server:
    """Serves `device` to one vhost-user front-end at a time, guest after guest."""

    def __init__(self, device: Device, loop: EventLoop, *, socket_path: str | None = None,
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
            self.listener = _listen(socket_path)
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


def _listen(path: str) -> socket.socket:
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
        os.set_inheritable(fd, False)
    return fds


def _close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
