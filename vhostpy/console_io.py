"""Connect a `ConsoleDevice`'s port 0 to the outside world: stdin/stdout or a UNIX socket.

The device itself knows no event loop; this module is the glue a launcher or application
uses. `attach_stdio()` feeds stdin into the guest and writes guest output to stdout.
`UnixConsole` listens on a socket path and connects one client at a time (like `socat` or
`nc -U` would use it): the client's bytes become guest input, guest output goes to the client.
Guest output while no client is connected is kept in a bounded buffer for the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from vhostpy.console import ConsoleDevice, FdOutput
from vhostpy.errors import ConfigurationError
from vhostpy.loop import EventLoop

log = logging.getLogger(__name__)

READ_CHUNK = 4096
#: Guest output kept for a UNIX-socket client that is not connected yet.
BACKLOG_LIMIT = 64 * 1024


def attach_stdio(console: ConsoleDevice, loop: EventLoop, *, input_fd: int | None = None,
                 output_fd: int | None = None) -> FdOutput:
    """Guest output to `output_fd` (stdout), `input_fd` (stdin) into the guest.

    Returns the output writer; its backlog is flushed whenever the output fd is writable.
    """
    in_fd = sys.stdin.fileno() if input_fd is None else input_fd
    out_fd = sys.stdout.fileno() if output_fd is None else output_fd
    output = FdOutput(out_fd)
    console.on_output = output

    def on_input() -> None:
        try:
            data = os.read(in_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("console input fd %d: %s; no longer read", in_fd, exc)
            loop.remove_reader(in_fd)
            return
        if not data:                 # EOF: the guest just gets no more input
            loop.remove_reader(in_fd)
            return
        console.feed(data)
    loop.add_reader(in_fd, on_input)
    return output


class UnixConsole:
    """The console on a UNIX socket at `path`, one client at a time."""

    def __init__(self, console: ConsoleDevice, loop: EventLoop, path: str) -> None:
        self.console = console
        self.loop = loop
        self.path = path
        self.client: socket.socket | None = None
        self.backlog = bytearray()
        self.dropped = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            self.listener.listen(4)
        except OSError as exc:
            self.listener.close()
            raise ConfigurationError(f"console socket {path!r}: {exc.strerror or exc}") from exc
        self.listener.setblocking(False)
        console.on_output = self._on_output
        loop.add_reader(self.listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.client is not None:
            log.info("console %s: a second client was refused", self.path)
            sock.close()
            return
        sock.setblocking(False)
        self.client = sock
        self.loop.add_reader(sock.fileno(), self._on_client)
        if self.backlog:
            pending, self.backlog = bytes(self.backlog), bytearray()
            self._on_output(pending)

    def _on_client(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self.console.feed(data)

    def _on_output(self, data: bytes) -> None:
        if self.client is not None:
            try:
                sent = self.client.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop_client()
                sent = 0
            data = data[sent:]
        if data:
            room = BACKLOG_LIMIT - len(self.backlog)
            self.backlog += data[:room]
            self.dropped += max(0, len(data) - room)

    def _drop_client(self) -> None:
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None

    def close(self) -> None:
        """Disconnect the client, stop listening and remove the socket file."""
        self._drop_client()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
