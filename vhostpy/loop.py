"""Event loops for the I/O edges: fd readers and writers, timers, signals, coroutines.

Two hosts with one interface (what `vring.RingHost` and the servers use):

* `EventLoop`, a thin loop over `selectors` (the command line's: its per-event cost is about
  half of asyncio's, which a ring pays per kick). Coroutines (a device or block store
  written with `async def`) run on a companion asyncio loop in a thread of its own, started
  on first use; their outcome comes back to the loop's thread.
* `AsyncioHost`, the same interface over an asyncio loop an application already runs
  (`vhostpy.serve_async`): everything, coroutines included, runs on that loop's thread.

Neither knows anything about virtio or vhost-user. Callbacks run one at a time on the loop's
thread; an exception escaping a callback is logged and the loop goes on, so one
misbehaving connection cannot take the process down.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger(__name__)

Callback = Callable[[], None]
#: Called on the loop's thread when a coroutine ends: (result, None), or (None, the
#: exception it raised; `asyncio.CancelledError` when it was cancelled).
Outcome = Callable[[Any, BaseException | None], None]
_EVENTS = (selectors.EVENT_READ, selectors.EVENT_WRITE)


class Host(Protocol):
    """The interface both hosts offer (what the servers, sessions and ring runners use)."""

    def add_reader(self, fd: int, callback: Callback) -> None: ...

    def remove_reader(self, fd: int) -> bool: ...

    def add_writer(self, fd: int, callback: Callback) -> None: ...

    def remove_writer(self, fd: int) -> bool: ...

    def call_later(self, delay: float, callback: Callback) -> None: ...

    def call_soon_threadsafe(self, callback: Callback) -> None: ...

    def run_coroutine(self, coro: Awaitable[Any], done: Outcome) -> Callable[[], bool]: ...


class Waiter(Protocol):
    """Something that waits in an `EventLoop`'s place (`set_waiter`): while `active()`, the
    loop calls `wait` instead of selecting; it must return once the selector's own fd
    (`selector_fd`, an epoll fd) is readable or `timeout` seconds (None: no limit) passed,
    and may do work of its own meanwhile (`native_kick.KickWaiter` serves rings' kicks in
    C). The callbacks it returns run on the loop's thread before the ready fds'."""

    def active(self) -> bool: ...

    def wait(self, selector_fd: int, timeout: float | None) -> list[Callback]: ...

    def close(self) -> None: ...


class EventLoop:
    """Runs reader callbacks, timers and signal handlers until `stop()`."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._running = False
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_handlers: dict[int, Callback] = {}
        self._previous_handlers: dict[int, object] = {}
        self._old_wakeup_fd: int | None = None
        self.add_reader(self._signal_r, self._on_signal_pipe)
        self._soon: collections.deque[Callback] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add_reader(self._wake_fd, self._run_soon)
        self._companion: _Companion | None = None
        self._closing = threading.Lock()
        self._waiter: Waiter | None = None

    # -- a waiter ----------------------------------------------------------------------------
    def set_waiter(self, waiter: Waiter | None) -> None:
        """Let `waiter` wait in the selector's place while it is active (see `Waiter`); the
        loop closes it when it closes."""
        self._waiter = waiter

    @property
    def waiter(self) -> Waiter | None:
        """The waiter `set_waiter` installed, or None."""
        return self._waiter

    # -- readers and writers -----------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is readable (replaces an earlier reader)."""
        self._watch(fd, 0, callback)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching `fd` for reading; returns False when it was not watched."""
        return self._unwatch(fd, 0)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is writable (replaces an earlier writer)."""
        self._watch(fd, 1, callback)

    def remove_writer(self, fd: int) -> bool:
        """Stop watching `fd` for writing; returns False when it was not watched."""
        return self._unwatch(fd, 1)

    def _watch(self, fd: int, which: int, callback: Callback) -> None:
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            handlers: list[Callback | None] = [None, None]
            handlers[which] = callback
            self._selector.register(fd, _EVENTS[which], handlers)
            return
        handlers = key.data
        handlers[which] = callback
        self._selector.modify(fd, key.events | _EVENTS[which], handlers)

    def _unwatch(self, fd: int, which: int) -> bool:
        try:
            key = self._selector.get_key(fd)
        except (KeyError, ValueError, RuntimeError):   # RuntimeError: the loop is closed
            return False
        handlers = key.data
        if handlers[which] is None:
            return False
        handlers[which] = None
        events = key.events & ~_EVENTS[which]
        if events:
            self._selector.modify(fd, events, handlers)
        else:
            self._selector.unregister(fd)
        return True

    # -- timers ----------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callback) -> None:
        """Call `callback()` once, `delay` seconds from now."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), callback))

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run `callback()` on the loop's thread soon; callable from any thread. After
        `close()` the callback is dropped (there is no thread to run it)."""
        with self._closing:
            if self._wake_fd < 0:
                return
            self._soon.append(callback)
            os.eventfd_write(self._wake_fd, 1)

    # -- coroutines --------------------------------------------------------------------------
    def run_coroutine(self, coro: Awaitable[Any], done: Outcome) -> Callable[[], bool]:
        """Run `coro` (a coroutine, or a future of the companion loop) on the companion
        asyncio loop (its own thread, started on first use); `done(result, exc)` is then
        called on this loop's thread. Returns a function that cancels it (callable from this
        loop's thread; `done` still comes, with CancelledError, unless the loop closed
        first)."""
        companion = self._companion
        if companion is None:
            companion = self._companion = _Companion()
        if not asyncio.iscoroutine(coro):
            coro = _awaited(coro)
        future = asyncio.run_coroutine_threadsafe(coro, companion.loop)

        def finished(f: concurrent.futures.Future[Any]) -> None:   # the companion's thread
            result, exc = _outcome(f)
            self.call_soon_threadsafe(lambda: done(result, exc))
        future.add_done_callback(finished)
        return future.cancel

    def _run_soon(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while self._soon:
            self._dispatch(self._soon.popleft())

    # -- signals ---------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run `callback()` from the loop (not from the signal context) on `signum`."""
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._signal_w)
        self._signal_handlers[signum] = callback
        self._previous_handlers[signum] = signal.signal(signum, _ignore_in_handler)

    def _on_signal_pipe(self) -> None:
        try:
            data = os.read(self._signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler()

    # -- running ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Make `run()` return after the current callback (callable from any thread)."""
        self._running = False
        with self._closing:   # the loop's thread may be closing it right now
            if self._wake_fd >= 0:  # after close() the number may belong to another file
                os.eventfd_write(self._wake_fd, 1)

    def run(self) -> None:
        """Dispatch events until `stop()` is called."""
        self._running = True
        while self._running:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            waiter = self._waiter
            if waiter is not None and waiter.active():
                try:
                    callbacks = waiter.wait(self._selector.fileno(), timeout)
                except Exception:   # a bug: select as usual this turn (no busy loop)
                    log.exception("event loop waiter %r failed", waiter)
                else:
                    for callback in callbacks:
                        self._dispatch(callback)
                    timeout = 0.0
            for key, events in self._selector.select(timeout):
                if not self._running:
                    break
                reader, writer = key.data
                if events & selectors.EVENT_READ and reader is not None:
                    self._dispatch(reader)
                # The reader may have removed the writer (or closed the fd) meanwhile.
                if events & selectors.EVENT_WRITE and writer is not None and \
                        key.data[1] is writer:
                    self._dispatch(writer)
            now = time.monotonic()
            while self._running and self._timers and self._timers[0][0] <= now:
                _, _, callback = heapq.heappop(self._timers)
                self._dispatch(callback)

    def _dispatch(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:  # a bug in one callback must not stop the others
            log.exception("event loop callback %r failed", callback)

    def close(self) -> None:
        """Restore signal handlers, cancel running coroutines (their companion loop and
        thread end) and release the loop's own descriptors (idempotent)."""
        if self._wake_fd < 0:
            return  # closing the numbers again could close files that reused them
        companion, self._companion = self._companion, None
        if companion is not None:
            companion.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        self._selector.close()
        with self._closing:
            os.close(self._wake_fd)
            self._wake_fd = -1
        os.close(self._signal_r)
        os.close(self._signal_w)
        self._signal_r = self._signal_w = -1


def _ignore_in_handler(signum: int, frame: FrameType | None) -> None:
    """The real work happens in the loop, woken through the wakeup fd."""


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _outcome(future: concurrent.futures.Future[Any] | asyncio.Future[Any]
             ) -> tuple[Any, BaseException | None]:
    if future.cancelled():
        return None, asyncio.CancelledError()
    exc = future.exception()
    return (None, exc) if exc is not None else (future.result(), None)


class _Companion:
    """An asyncio loop on a daemon thread of its own, for `EventLoop.run_coroutine`."""

    #: How long `close` lets cancelled coroutines finish their clean-up (seconds).
    SHUTDOWN_WAIT = 5.0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="vhostpy-asyncio")
        self.thread.start()

    def close(self) -> None:
        """Cancel every task, let them finish, stop the loop and join its thread."""
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(self.SHUTDOWN_WAIT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("coroutines still running %.0f s after they were cancelled",
                        self.SHUTDOWN_WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(self.SHUTDOWN_WAIT)
        if not self.thread.is_alive():
            self.loop.close()


class AsyncioHost:
    """`EventLoop`'s interface over a running asyncio loop (`loop`, default: the running one).

    Readers, writers, timers and coroutines all run on that loop's thread. `add_signal_handler`
    is asyncio's (main thread only). There is no `run()`: the application runs its loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is readable (replaces an earlier reader)."""
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching `fd` for reading; returns False when it was not watched."""
        try:
            return self.loop.remove_reader(fd)
        except (ValueError, RuntimeError):    # a closed fd, a closed loop
            return False

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is writable (replaces an earlier writer)."""
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> bool:
        """Stop watching `fd` for writing; returns False when it was not watched."""
        try:
            return self.loop.remove_writer(fd)
        except (ValueError, RuntimeError):
            return False

    def call_later(self, delay: float, callback: Callback) -> None:
        """Call `callback()` once, `delay` seconds from now."""
        if delay <= 0:
            self.loop.call_soon(callback)
        else:
            self.loop.call_later(delay, callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run `callback()` on the loop's thread soon; callable from any thread (dropped
        once the loop is closed)."""
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass

    def run_coroutine(self, coro: Awaitable[Any], done: Outcome) -> Callable[[], bool]:
        """Run `coro` as a task of the loop (a future of this loop is waited for as it is,
        with no task); `done(result, exc)` when it ends. Returns a function that cancels
        it."""
        if asyncio.isfuture(coro) and coro.get_loop() is self.loop:
            task: asyncio.Future[Any] = coro
        else:
            task = self.loop.create_task(coro if asyncio.iscoroutine(coro) else _awaited(coro))

        def finished(t: asyncio.Future[Any]) -> None:
            done(*_outcome(t))
        task.add_done_callback(finished)
        return task.cancel

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run `callback()` from the loop on `signum` (asyncio's rules: main thread only)."""
        self.loop.add_signal_handler(signum, callback)
