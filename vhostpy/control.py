"""The control socket: commands for a running device, as JSON lines over a UNIX socket.

`vhostpy blk|net|rng|serve --control PATH` listens on PATH; `vhostpy ctl PATH COMMAND
[ARGS...]` (`request`) sends one command and prints the answer. The protocol, one JSON
object per line each way:

    -> {"command": "fault", "args": ["add", "ioerr,op=write,sectors=0-7"]}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "fault 'x': unknown kind 'x' (one of ioerr, delay)"}

A client may send several requests on one connection; each gets its answer in order.
Clients are served at once, each on a thread of its own (at most `MAX_CLIENTS`; one more
gets an error line), so a client that stays connected never holds up another.
`Controls` is the table of commands (a name, a handler taking the argument list and
returning something JSON can encode, a one-line help); `help` is always there. Handlers run
on the serving loop's thread (handed over with `call_soon_threadsafe`), so they may touch
devices, rings and stores like any hook. A handler raising `ControlError` (or
`ConfigurationError`, `ValueError`) answers `ok: false` with its message; anything else is
logged with its traceback and answered as an internal error. The control socket never stops
the device: a bad line, a client that vanishes or a handler that fails costs only that answer.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vhostpy.errors import ConfigurationError
from vhostpy.server import listen_unix

__all__ = ["ControlError", "ControlServer", "Controls", "expect_args", "request"]

log = logging.getLogger(__name__)

#: Longest request line accepted (bytes); longer lines are answered with an error.
MAX_LINE = 64 * 1024
#: Seconds a handler may take on the loop before the client is told it timed out.
HANDLER_TIMEOUT = 30.0
#: Seconds a client may stay silent in the middle of a line.
CLIENT_TIMEOUT = 10.0
#: Seconds a connected client may stay silent between requests.
IDLE_TIMEOUT = 600.0
#: Clients served at once (each on a thread of its own); one more is told so and closed.
MAX_CLIENTS = 8

Handler = Callable[[list[str]], Any]


class ControlError(Exception):
    """A command that cannot be done: the message is the answer's `error`."""


@dataclass(frozen=True)
class Command:
    """One entry of `Controls`."""

    name: str
    handler: Handler
    help: str


class Controls:
    """The commands a control socket answers (see the module docstring)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self.add("help", lambda args: self.describe(), "list the commands")

    def add(self, name: str, handler: Handler, help: str) -> None:
        """Answer `name` with `handler(args)`; a name may be registered once."""
        if name in self._commands:
            raise ValueError(f"control command {name!r} is already registered")
        self._commands[name] = Command(name, handler, help)

    def describe(self) -> dict[str, str]:
        """{command: help} for every command."""
        return {c.name: c.help for c in self._commands.values()}

    def handle(self, message: object) -> dict[str, Any]:
        """One decoded request -> its answer (never raises)."""
        if not isinstance(message, dict):
            return _error(f"a request is a JSON object, not {type(message).__name__}")
        name, args = message.get("command"), message.get("args", [])
        if not isinstance(name, str):
            return _error('a request needs "command": a string')
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            return _error('"args" must be a list of strings')
        command = self._commands.get(name)
        if command is None:
            return _error(f"unknown command {name!r} (one of {', '.join(self._commands)})")
        try:
            result = command.handler(args)
            json.dumps(result)
        except (ControlError, ConfigurationError, ValueError) as exc:
            return _error(str(exc))
        except Exception:
            log.exception("control command %s %s failed", name, " ".join(args))
            return _error(f"{name}: internal error (logged by the back-end)")
        return {"ok": True, "result": result}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def expect_args(args: Sequence[str], usage: str, *, least: int, most: int) -> None:
    """ControlError naming `usage` unless `least <= len(args) <= most`."""
    if not least <= len(args) <= most:
        raise ControlError(f"usage: {usage}")


class ControlServer:
    """Listens on `path` at once; from `start(call_soon)` on, answers requests with
    `controls`, each handler run through `call_soon` (the serving loop's
    `call_soon_threadsafe`). The socket is served on a daemon thread; `close()` stops it and
    removes the socket file.

    `path` is refused as `server.listen_unix` refuses a socket path (ConfigurationError,
    before anything listens); a stale socket is replaced."""

    def __init__(self, path: str, controls: Controls) -> None:
        self.path = path
        self.controls = controls
        self._call_soon: Callable[[Callable[[], None]], None] | None = None
        self._sock = listen_unix(path)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="vhostpy-control",
                                        daemon=True)

    def start(self, call_soon: Callable[[Callable[[], None]], None]) -> None:
        """Answer requests from now on, running each handler through `call_soon` (clients
        that connected since the socket was made wait until then)."""
        self._call_soon = call_soon
        self._thread.start()

    def close(self) -> None:
        """Stop answering and remove the socket file (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for conn in clients:          # wakes their threads, which close them
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                log.warning("control socket: accept failed: %s", exc)
                self._closed.wait(0.1)      # e.g. out of fds: do not spin
                continue
            with self._lock:
                room = len(self._clients) < MAX_CLIENTS
                if room:
                    self._clients.add(conn)
            if not room:
                log.warning("control socket: %d clients connected already; refused one",
                            MAX_CLIENTS)
                with conn:
                    try:
                        conn.sendall(json.dumps(_error(f"{MAX_CLIENTS} control clients are "
                                                       "connected already")).encode() + b"\n")
                    except OSError:
                        pass
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True,
                             name="vhostpy-control-client").start()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError as exc:
            log.info("control client went away: %s", exc)
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        while not self._closed.is_set():
            conn.settimeout(CLIENT_TIMEOUT if pending else IDLE_TIMEOUT)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                if pending:
                    log.warning("control client sent half a line and went quiet")
                return
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    conn.sendall(self._answer(line) + b"\n")
            if len(pending) > MAX_LINE:
                conn.sendall(json.dumps(_error(f"request longer than {MAX_LINE} bytes"))
                             .encode() + b"\n")
                return

    def _answer(self, line: bytes) -> bytes:
        try:
            message = json.loads(line)
        except ValueError as exc:
            log.warning("control request is not JSON: %r (%s)", line[:200], exc)
            return json.dumps(_error(f"not a JSON line: {exc}")).encode()
        answer: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            if answer.set_running_or_notify_cancel():
                answer.set_result(self.controls.handle(message))
        try:
            assert self._call_soon is not None
            self._call_soon(run)
            reply = answer.result(HANDLER_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            answer.cancel()
            reply = _error(f"the device's loop did not answer ({exc or 'timed out'})")
        return json.dumps(reply).encode()


def request(path: str, command: str, args: Sequence[str] = (), *,
            timeout: float = HANDLER_TIMEOUT + 5) -> Any:
    """Send one command to the control socket at `path` and return its result;
    ControlError with the answer's error, or with what went wrong reaching the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command, "args": list(args)}).encode()
                         + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: the answer is not JSON: {data[:200]!r}") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"{path}: unexpected answer {answer!r}")
    if not answer["ok"]:
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
