"""The public front doors: serve `Device` objects to vhost-user front-ends from Python.

Three ways in, one implementation (`vhostpy.Server`, `vhostpy.serve`, `vhostpy.serve_async`;
`import vhostpy` loads this module only when one of them is first used):

* `Server`: several devices, each on its own socket, on one loop in one process. The loop
  is vhostpy's own `EventLoop` (run it on a daemon thread with `start_thread()`, or in the
  calling thread with `run()`), or, with `host=AsyncioHost()`, the asyncio loop an
  application already runs.
* `serve(device, ...)`: one device until SIGINT or SIGTERM, the way `vhostpy blk|rng|serve`
  run (the command line is built on it).
* `serve_async(device, ...)`: one device inside the caller's asyncio loop until the task is
  cancelled.

`load_device("module:callable")` is how `vhostpy serve` finds a device to serve.

Each endpoint serves one front-end at a time, guest after guest (a front-end that goes away
resets the device, and the next one is served). Devices belong to the caller: stopping never
calls a device's `close()`. What this module must never do: speak vhost-user itself (that
is `server` and `session`) or print (the command line decides what the user sees).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar, cast

from vhostpy.device import Device
from vhostpy.errors import ConfigurationError
from vhostpy.loop import AsyncioHost, EventLoop
from vhostpy.server import Server as SocketServer

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Endpoint", "Server", "load_device", "serve", "serve_async"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Host = EventLoop | AsyncioHost

#: Seconds `stop()` waits for the loop's thread to finish closing before it gives up
#: (a device hook that never returns holds the loop).
STOP_TIMEOUT = 10.0
#: Signals that end `serve`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Endpoint:
    """One device on one socket of a `Server` (returned by `Server.add`).

    `device`, `socket_path` (None for an inherited `fd`) and `fd` are what was given;
    `connections_served` counts the front-ends that have connected so far, and `connected`
    says whether one is connected now. Both are read without a lock: from a thread other
    than the loop's they are a recent snapshot.
    """

    def __init__(self, device: Device, socket_path: str | None, fd: int | None,
                 edge: SocketServer) -> None:
        self.device = device
        self.socket_path = socket_path
        self.fd = fd
        self._edge = edge
        self.closed = False

    @property
    def connections_served(self) -> int:
        """Front-ends that connected to this endpoint so far (the current one included)."""
        return self._edge.connections_served

    @property
    def connected(self) -> bool:
        """True while a front-end is connected."""
        return self._edge.connection is not None

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the thread of the loop serving this endpoint (from any thread)."""
        self._edge.loop.call_soon_threadsafe(callback)

    def status(self) -> dict[str, object]:
        """A snapshot (loop thread only): the device, the socket, whether a front-end is
        connected and, if so, the negotiated features and every ring's state."""
        return {"device": self.device.name, **self._edge.status()}

    def close(self) -> None:
        """Drop the front-end, stop listening, remove the socket file (loop thread only;
        `Server.stop` does it for every endpoint)."""
        if not self.closed:
            self.closed = True
            self._edge.close()

    def __repr__(self) -> str:
        where = self.socket_path if self.socket_path is not None else f"fd {self.fd}"
        state = "closed" if self.closed else "connected" if self.connected else "listening"
        return f"<Endpoint {self.device.name} on {where}: {state}>"


class Server:
    """Serves devices, each on its own vhost-user socket, on one loop.

    `host` is the loop: None (default) makes a private `EventLoop`, which `start_thread()`
    runs on a daemon thread or `run()` in the calling thread, and which `stop()` closes. An
    `EventLoop` of the caller's is run the same way but never closed. An `AsyncioHost` serves
    inside an application's running asyncio loop: there is no `run()` or `start_thread()`,
    the application runs its loop; call `add` and `stop` on that loop's thread (from a
    coroutine or callback) or from any other thread.

    `add` may be called before or while the loop runs, from any thread; `stop()` from any
    thread, any number of times. Used as a context manager, leaving the block stops it::

        with vhostpy.Server() as server:
            server.add(MyDevice(), socket_path="/tmp/dev.sock")
            server.start_thread()
            ...

    Devices belong to the caller: `stop()` drops their front-ends (which resets them) but
    never calls their `close()`.
    """

    def __init__(self, *, host: Host | None = None) -> None:
        self._owns_host = host is None
        self.host: Host = EventLoop() if host is None else host
        self._endpoints: list[Endpoint] = []
        self._lock = threading.Lock()
        self._stopping = False       # stop() was called: nothing new starts
        self._closed = False         # every endpoint is closed
        self._loop_thread: int | None = None   # the thread running run(), while it runs
        self._finished = threading.Event()      # set when run() has cleaned up
        self._thread: threading.Thread | None = None
        self._waiting: set[concurrent.futures.Future[object]] = set()

    # ------------------------------------------------------------------ endpoints
    @property
    def endpoints(self) -> list[Endpoint]:
        """The endpoints added so far, in order (closed ones stay listed)."""
        return list(self._endpoints)

    def add(self, device: Device, *, socket_path: str | os.PathLike[str] | None = None,
            fd: int | None = None) -> Endpoint:
        """Serve `device` on a new socket: `socket_path` (listen there; a stale socket is
        replaced) or `fd` (an inherited UNIX stream socket, listening or connected),
        exactly one. The socket listens when `add` returns; front-ends are served once the
        loop runs.

        Raises `vhostpy.errors.ConfigurationError` (nothing is left listening, no file is
        left behind) when the path cannot be used (in use by another process, not a socket,
        a missing or unwritable directory, too long), the fd is not a usable socket, both or
        neither of `socket_path` and `fd` are given, `device` is not a `Device`, or is
        already served by this server. RuntimeError once the server is stopped.
        """
        if not isinstance(device, Device):
            raise ConfigurationError(f"{device!r} is not a vhostpy.device.Device")
        if (socket_path is None) == (fd is None):
            raise ConfigurationError("give exactly one of socket_path and fd")
        path = os.fspath(socket_path) if socket_path is not None else None
        return self._on_loop(lambda: self._add(device, path, fd))

    def _add(self, device: Device, path: str | None, fd: int | None) -> Endpoint:
        with self._lock:   # a stop() racing this from another thread closes it too
            if self._stopping:
                raise RuntimeError("this vhostpy.Server is stopped")
            for ep in self._endpoints:
                if ep.closed:
                    continue
                if ep.device is device:
                    raise ConfigurationError(f"{device.name} device {device!r} is already "
                                             "served by this server (one socket per device)")
                if path is not None and ep.socket_path is not None and \
                        os.path.abspath(ep.socket_path) == os.path.abspath(path):
                    raise ConfigurationError(f"socket path {path!r} is already served by "
                                             "this server")
            edge = SocketServer(device, self.host, socket_path=path, fd=fd)
            endpoint = Endpoint(device, path, fd, edge)
            self._endpoints.append(endpoint)
        log.debug("serving %s on %s", device.name, path if path is not None else f"fd {fd}")
        return endpoint

    # ------------------------------------------------------------------ running
    def start_thread(self) -> threading.Thread:
        """Run the loop on a daemon thread; returns it once the loop is serving (sockets
        added before or after this call are served). Not with an `AsyncioHost` (TypeError)."""
        loop = self._runnable()
        with self._lock:
            self._check_startable()
            thread = self._thread = threading.Thread(target=self._run, args=(loop,),
                                                     name="vhostpy-server", daemon=True)
        running = threading.Event()
        loop.call_soon_threadsafe(running.set)   # runs once the loop dispatches
        thread.start()
        while not running.wait(0.1):
            if not thread.is_alive():
                raise RuntimeError("the vhostpy.Server thread ended before serving")
        return thread

    def run(self) -> None:
        """Serve in the calling thread until `stop()` (from a callback, a signal handler or
        another thread); every endpoint is closed when it returns. Not with an
        `AsyncioHost` (TypeError)."""
        loop = self._runnable()
        with self._lock:
            self._check_startable()
        self._run(loop)

    def _check_startable(self) -> None:
        """RuntimeError unless the loop may start now (under `_lock`)."""
        if self._stopping:
            raise RuntimeError("this vhostpy.Server is stopped")
        if self._thread is not None or self._loop_thread is not None:
            raise RuntimeError("this vhostpy.Server is already running")

    def _runnable(self) -> EventLoop:
        if not isinstance(self.host, EventLoop):
            raise TypeError("a Server on an AsyncioHost has no loop of its own to run: "
                               "the application runs its asyncio loop")
        return self.host

    def _run(self, loop: EventLoop) -> None:
        with self._lock:
            self._loop_thread = threading.get_ident()
            stopping = self._stopping
        try:
            if not stopping:
                loop.run()
        finally:
            try:
                self._close_endpoints()
                if self._owns_host:
                    loop.close()
            finally:
                with self._lock:
                    self._loop_thread = None
                    waiting, self._waiting = self._waiting, set()
                for future in waiting:   # add() calls the loop will never run
                    future.cancel()
                self._finished.set()

    # ------------------------------------------------------------------ stopping
    def stop(self) -> None:
        """Stop serving: every endpoint's front-end is dropped and its socket file removed,
        `run()` returns, the thread `start_thread()` started is joined, a private loop is
        closed. Devices are not closed. Callable from any thread and idempotent.

        From another thread, the sockets are gone when it returns (unless the loop stayed
        blocked for `STOP_TIMEOUT` seconds, which is logged). From a callback on the loop's
        own thread (a device hook, a signal handler), they close as soon as that callback
        returns, never under a running hook's feet (a coroutine on an `AsyncioHost`'s loop
        closes them at once)."""
        with self._lock:
            self._stopping = True
            loop_thread = self._loop_thread
            thread = self._thread
        here = threading.get_ident()
        if loop_thread is not None:
            loop = cast(EventLoop, self.host)
            if loop_thread == here:
                loop.stop()    # run() closes the endpoints once this callback returns
                return
            else:
                # Queued as well, for a run() that has not entered the loop yet (a no-op
                # if it comes after run() ended: the loop may be the caller's, run again).
                loop.call_soon_threadsafe(self._stop_loop_if_running)
                loop.stop()
                if not self._finished.wait(STOP_TIMEOUT):
                    log.warning("vhostpy.Server: the loop did not stop within %.0f s",
                                STOP_TIMEOUT)
            if thread is not None and thread.ident != here:
                thread.join(STOP_TIMEOUT)
            return
        if thread is not None:   # start_thread's thread ran and has cleaned up
            if thread.ident != here:
                thread.join(STOP_TIMEOUT)
            return
        # The loop is not running here: a loop never started, or an application's asyncio loop.
        host = self.host
        if isinstance(host, AsyncioHost) and _in_plain_callback(host.loop):
            host.loop.call_soon(self._close_endpoints)   # maybe a device hook: after it
            return
        try:
            self._on_loop(self._close_endpoints)
        finally:
            if self._owns_host:
                cast(EventLoop, self.host).close()

    def _stop_loop_if_running(self) -> None:
        if self._loop_thread == threading.get_ident():
            cast(EventLoop, self.host).stop()

    def _close_endpoints(self) -> None:
        """Close every endpoint (on the loop's thread, or with the loop not running)."""
        with self._lock:
            self._stopping = True
            if self._closed:
                return
            self._closed = True
        for endpoint in self._endpoints:
            try:
                endpoint.close()
            except Exception:
                log.exception("closing %r failed", endpoint)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop's thread
    def _on_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop's thread (here when this is it, or when no thread runs the
        loop); its result or exception comes back to the caller."""
        if not self._loop_busy_elsewhere():
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:   # noqa: BLE001 (re-raised in the caller's thread)
                future.set_exception(exc)
        waiting = cast("concurrent.futures.Future[object]", future)
        with self._lock:
            self._waiting.add(waiting)
        try:
            self.host.call_soon_threadsafe(call)
            while True:
                try:
                    return future.result(timeout=0.1)
                except TimeoutError:
                    # Still queued: wait on, unless the loop stopped without running it.
                    if self._loop_busy_elsewhere() or not future.cancel():
                        continue
                except concurrent.futures.CancelledError:
                    pass
                break
        finally:
            with self._lock:
                self._waiting.discard(waiting)
        if self._loop_busy_elsewhere():
            raise RuntimeError("this vhostpy.Server stopped before the call ran")
        return fn()   # nobody runs the loop any more: nothing else touches it

    def _loop_busy_elsewhere(self) -> bool:
        """True when another thread runs the loop (calls must be handed to it)."""
        host = self.host
        if isinstance(host, AsyncioHost):
            try:
                if asyncio.get_running_loop() is host.loop:
                    return False
            except RuntimeError:
                pass
            return host.loop.is_running()
        with self._lock:
            loop_thread = self._loop_thread
        return loop_thread is not None and loop_thread != threading.get_ident()


def _in_plain_callback(loop: asyncio.AbstractEventLoop) -> bool:
    """True in a callback (not a coroutine) that `loop` runs on this thread."""
    try:
        return asyncio.get_running_loop() is loop and asyncio.current_task() is None
    except RuntimeError:
        return False


def serve(device: Device, *, socket_path: str | os.PathLike[str] | None = None,
          fd: int | None = None) -> None:
    """Serve `device` on `socket_path` (or the inherited socket `fd`), one front-end at a
    time, guest after guest, until SIGINT or SIGTERM; then drop the front-end, remove the
    socket file, restore the previous signal handlers and return.

    Must be called from the main thread (it handles signals). The signal handlers are in
    place before the socket listens, so a signal never leaves the socket file behind. A bad
    socket path or fd raises `ConfigurationError` before anything listens. The device is not
    closed.
    """
    serve_until_signalled(device, socket_path=socket_path, fd=fd)


def serve_until_signalled(device: Device, *, socket_path: str | os.PathLike[str] | None = None,
                          fd: int | None = None,
                          signals: Mapping[int, Callable[[], None]] | None = None,
                          serving: Callable[[Endpoint], None] | None = None) -> Endpoint:
    """`serve`, with more: `signals` maps other signal numbers to handlers (run on the loop's
    thread, e.g. SIGUSR1 printing counters), and `serving(endpoint)` is called once the
    socket listens. Returns the (closed) endpoint. The command line is built on this."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("vhostpy.serve handles SIGINT and SIGTERM, so it must run in the "
                           "main thread; use vhostpy.Server elsewhere")
    if device.prefers_asyncio:
        return _serve_on_asyncio(device, socket_path, fd, signals or {}, serving)
    server = Server()
    loop = cast(EventLoop, server.host)
    try:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, server.stop)
        for number, handler in (signals or {}).items():
            loop.add_signal_handler(number, handler)
        endpoint = server.add(device, socket_path=socket_path, fd=fd)
        if serving is not None:
            serving(endpoint)
    except BaseException:
        server.stop()
        raise
    server.run()
    return endpoint


def _serve_on_asyncio(device: Device, socket_path: str | os.PathLike[str] | None,
                      fd: int | None, signals: Mapping[int, Callable[[], None]],
                      serving: Callable[[Endpoint], None] | None) -> Endpoint:
    """`serve_until_signalled` for a device whose requests are coroutines: everything on a
    fresh asyncio loop in this thread (no companion thread, no hand-over per request)."""
    loop = asyncio.new_event_loop()
    server = Server(host=AsyncioHost(loop))
    numbers: list[int] = [*STOP_SIGNALS, *signals]
    previous = {number: signal.getsignal(number) for number in numbers}

    def stop() -> None:
        server.stop()
        loop.stop()
    try:
        for stop_signal in STOP_SIGNALS:
            loop.add_signal_handler(stop_signal, stop)
        for number, handler in signals.items():
            loop.add_signal_handler(number, handler)
        endpoint = server.add(device, socket_path=socket_path, fd=fd)
        if serving is not None:
            serving(endpoint)
        loop.run_forever()
    finally:
        try:
            server.stop()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            for number in numbers:
                loop.remove_signal_handler(number)
                if previous[number] is not None:
                    signal.signal(number, previous[number])
            loop.close()
    return endpoint


async def serve_async(device: Device, *, socket_path: str | os.PathLike[str] | None = None,
                      fd: int | None = None) -> None:
    """Serve `device` inside the running asyncio loop (one front-end at a time, guest after
    guest) until the task running this is cancelled; then drop the front-end, remove the
    socket file and re-raise `asyncio.CancelledError`. Everything runs on the loop's thread,
    an `async def handle_chain` included, so a device may await anything of the
    application's. A bad socket path or fd raises `ConfigurationError` at once. The device is
    not closed. For several devices, use `Server(host=AsyncioHost())`.
    """
    server = Server(host=AsyncioHost())
    try:
        server.add(device, socket_path=socket_path, fd=fd)
        await asyncio.get_running_loop().create_future()   # until cancelled
    finally:
        server.stop()


def load_device(spec: str) -> Device:
    """The device `vhostpy serve MODULE:CALLABLE` serves: `load_callable(spec)`, which must
    return a `Device` (else a ConfigurationError naming `spec` and what came back)."""
    device = load_callable(spec)
    if not isinstance(device, Device):
        raise ConfigurationError(f"{spec}: it returned {_one_line(device)}, not a "
                                 "vhostpy.device.Device")
    return device


def load_callable(spec: str) -> object:
    """Import MODULE (the current directory first on sys.path, as `python -m` has it),
    follow CALLABLE (a dotted attribute path, e.g. `factories.rng` or a class), call it with
    no arguments and return what it returns (`vhostpy serve`, `vhostpy blk --store`).

    Every way this can fail (no ':' in `spec`, a module that raises anything while it is
    imported, SyntaxError included, a missing attribute, something not callable, a call that
    raises) is a ConfigurationError naming `spec` and the exception, in one line.
    """
    module_name, colon, path = spec.partition(":")
    if not colon or not module_name or not path:
        raise ConfigurationError(f"{spec!r} is not MODULE:CALLABLE (for example "
                                 "mymodule:make_device)")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        target: object = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise ConfigurationError(f"{spec}: cannot import {module_name}: "
                                 f"{_one_line(exc)}") from exc
    for part in path.split("."):
        try:
            target = getattr(target, part)
        except (Exception, SystemExit) as exc:
            raise ConfigurationError(f"{spec}: {module_name} has no attribute {path!r} "
                                     f"({_one_line(exc)})") from exc
    if not callable(target):
        raise ConfigurationError(f"{spec}: {path} is a {type(target).__name__}, not a "
                                 "callable")
    try:
        return target()
    except (Exception, SystemExit) as exc:
        raise ConfigurationError(f"{spec}: calling {path}() raised {_one_line(exc)}") from exc


def _one_line(thing: object, limit: int = 300) -> str:
    """An exception as "Type: message" (anything else as its repr), on one line, cut short."""
    if isinstance(thing, BaseException):
        text = f"{type(thing).__name__}: {thing}" if str(thing) else type(thing).__name__
    else:
        text = f"{type(thing).__name__} {thing!r}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
