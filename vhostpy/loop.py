"""A thin event loop over `selectors`: fd readers, timers and signals.

It knows nothing about virtio or vhost-user. Callbacks run one at a time on the thread
that called `run()`; an exception escaping a callback is logged and the loop goes on,
so one misbehaving connection cannot take the process down.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

Callback = Callable[[], None]
_EVENTS = (selectors.EVENT_READ, selectors.EVENT_WRITE)


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
        """Run `callback()` on the loop's thread soon; callable from any thread."""
        self._soon.append(callback)
        os.eventfd_write(self._wake_fd, 1)

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
        if self._wake_fd >= 0:  # after close() the number may belong to another file
            os.eventfd_write(self._wake_fd, 1)

    def run(self) -> None:
        """Dispatch events until `stop()` is called."""
        self._running = True
        while self._running:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
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
        """Restore signal handlers and release the loop's own descriptors (idempotent)."""
        if self._wake_fd < 0:
            return  # closing the numbers again could close files that reused them
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        self._selector.close()
        os.close(self._wake_fd)
        os.close(self._signal_r)
        os.close(self._signal_w)
        self._wake_fd = self._signal_r = self._signal_w = -1


def _ignore_in_handler(signum: int, frame: FrameType | None) -> None:
    """The real work happens in the loop, woken through the wakeup fd."""
