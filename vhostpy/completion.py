"""Chains a device completes later: the ring runner's book of deferred completions.

A device's `handle_chain` usually returns the bytes it wrote, and the chain is completed at
once. It may instead finish the chain later, in one of two ways:

* return `vq.defer(chain)`, a `Completion`, and call `completion.complete(written)` when done,
  from the ring's thread or from any other thread;
* return an awaitable (`handle_chain` is an `async def`, or it returns a coroutine): the ring's
  host runs it on an asyncio loop, and its result is the bytes written.

`InFlight` (one per ring, owned by `vring.Vring`) keeps those chains until they complete and
hands their used entries to the runner on the ring's thread, in batches: completions that
arrive from other threads are queued and published together on the ring's next turn. With
VIRTIO_F_IN_ORDER negotiated it publishes in the order the chains were taken (a chain that
finished early waits for the older ones); otherwise in the order they finish.

When the ring stops or resets, `cancel` drops every chain still in flight: their coroutines
are cancelled, and a `complete()` that comes later is ignored. Nothing is ever published for
a chain of an earlier ring generation, so a late completion never reaches a stopped ring.
What it must never do: touch the ring itself (the runner publishes), or call device hooks.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from .virtqueue import DescriptorChain

__all__ = ["Completion", "CompletionHost", "InFlight", "Written"]

log = logging.getLogger(__name__)

#: What completes a chain: the bytes written into its buffers, or a function returning them
#: that runs on the ring's thread just before the used entry is published, and not at all
#: when the ring stopped meanwhile (so it may write into guest memory safely).
Written = int | Callable[[], int]


class CompletionHost(Protocol):
    """What a book needs from the ring's host: a way onto the ring's thread, and an asyncio
    loop for coroutines (`loop.EventLoop` and `loop.AsyncioHost` are such hosts)."""

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None: ...

    def run_coroutine(self, coro: Awaitable[Any],
                      done: Callable[[Any, BaseException | None], None]) -> Callable[[], bool]:
        ...


class Completion:
    """One chain a device completes later (`vq.defer(chain)`); complete it exactly once."""

    __slots__ = ("_book", "_generation", "canceller", "chain", "finished", "registered")

    def __init__(self, chain: DescriptorChain, book: InFlight, generation: int) -> None:
        self.chain = chain
        self._book = book
        self._generation = generation
        #: The book's bookkeeping: completed once; counted in flight; cancels its coroutine.
        self.finished = False
        self.registered = False
        self.canceller: Callable[[], bool] | None = None

    @property
    def head(self) -> int:
        """The chain's head descriptor index (its used entry's id)."""
        return self.chain.head

    @property
    def cancelled(self) -> bool:
        """True once the ring stopped or reset under this chain: completing it does nothing."""
        return self._book.generation != self._generation

    def complete(self, written: Written) -> None:
        """Finish the chain with `written` bytes written into its buffers (or a function
        returning that, see `Written`). Thread-safe. RuntimeError if called twice."""
        self._book.complete(self, written)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "done" if self.finished else "pending"
        return f"<Completion head={self.chain.head} {state}>"


class InFlight:
    """The chains of one ring that a device completes later (see the module docstring).

    `publish(items)` hands (head, written) pairs to the runner, always on the ring's thread;
    `fail(reason)` breaks the ring (an async handler raised). `thread` is the ring's thread:
    the runner sets it each time it serves the ring.
    """

    def __init__(self, index: int, publish: Callable[[list[tuple[int, int]]], None],
                 fail: Callable[[str], None]) -> None:
        self.index = index
        self.host: Any = None
        self.in_order = False
        self.thread: int | None = None
        self.generation = 0
        self._publish = publish
        self._fail = fail
        #: Chains in flight in the order they were taken (None: completed synchronously,
        #: held by IN_ORDER behind older ones).
        self._pending: dict[int, Completion | None] = {}
        self._early: dict[int, int] = {}   # IN_ORDER: finished heads waiting for older ones
        self._queue: collections.deque[tuple[Completion, Written]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._idle: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ what the runner asks

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def queued(self) -> bool:
        """Whether completions from other threads wait for `flush`."""
        return bool(self._queue)

    @property
    def heads(self) -> tuple[int, ...]:
        """Heads of the chains in flight, oldest first."""
        return tuple(self._pending)

    def defer(self, chain: DescriptorChain) -> Completion:
        """A handle for completing `chain` later (`vq.defer(chain)`); the device returns it
        from `handle_chain`, which is when the chain counts as in flight."""
        return Completion(chain, self, self.generation)

    def later(self, chain: DescriptorChain, result: object) -> None:
        """What `handle_chain` returned for `chain` when it was not a byte count: the
        `Completion` it deferred, or an awaitable to run. Anything else is a device bug
        (TypeError). Called on the ring's thread, in the order the chains were taken."""
        if isinstance(result, Completion):
            if result.chain is not chain:
                raise TypeError(f"vring {self.index}: handle_chain returned a Completion for "
                                f"chain {result.head} while serving chain {chain.head}")
            self._register(result)
            if self._queue:
                self.flush()   # it completed before handle_chain returned
            return
        if not inspect.isawaitable(result):
            raise TypeError(f"vring {self.index}: handle_chain returned {result!r} for chain "
                            f"{chain.head}; expected the bytes written (int), vq.defer(chain) "
                            "or an awaitable")
        if getattr(self.host, "run_coroutine", None) is None:
            _close(result)
            raise TypeError(f"vring {self.index}: handle_chain returned an awaitable, but this "
                            "transport runs no asyncio loop for it")
        completion = Completion(chain, self, self.generation)
        self._register(completion)
        completion.canceller = self.run(
            result, lambda value, exc: self._ended(completion, value, exc))

    def run(self, awaitable: object, done: Callable[[Any, BaseException | None], None]
            ) -> Callable[[], bool]:
        """Run `awaitable` on the host's asyncio loop; `done(result, exc)` on the ring's
        thread. TypeError when the host runs no asyncio loop."""
        run = getattr(self.host, "run_coroutine", None)
        if run is None:
            _close(awaitable)
            raise TypeError(f"vring {self.index}: this transport runs no asyncio loop")
        if not inspect.isawaitable(awaitable):
            raise TypeError(f"vring {self.index}: {awaitable!r} is not awaitable")
        if not (inspect.iscoroutine(awaitable) or asyncio.isfuture(awaitable)):
            awaitable = _wrap(cast("Awaitable[Any]", awaitable))
        canceller: Callable[[], bool] = run(awaitable, done)
        return canceller

    def completed_now(self, items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Chains a device completed synchronously: returned to be published at once, unless
        IN_ORDER holds them behind older chains still in flight (then they are kept, and
        `[]` comes back)."""
        if not (self.in_order and self._pending):
            return items
        for head, count in items:
            if head in self._pending:
                raise RuntimeError(f"vring {self.index}: chain {head} is already in flight")
            self._pending[head] = None
            self._early[head] = count
        return []

    def _register(self, completion: Completion) -> None:
        head = completion.head
        if head in self._pending:
            raise RuntimeError(f"vring {self.index}: chain {head} is already in flight")
        completion.registered = True
        self._pending[head] = completion

    def complete(self, completion: Completion, written: Written) -> None:
        """`Completion.complete`: publish now on the ring's thread, else queue for it."""
        here = threading.get_ident() == self.thread
        wake: Callable[[Callable[[], None]], None] | None = None
        with self._lock:
            if completion.finished:
                raise RuntimeError(f"vring {self.index}: chain {completion.head} completed "
                                   "twice")
            completion.finished = True
            if not here or not completion.registered:
                # Another thread: queued for the ring's thread. The ring's thread before
                # handle_chain returned the handle: published by `later`.
                self._queue.append((completion, written))
                if here or self._scheduled:
                    return
                wake = getattr(self.host, "call_soon_threadsafe", None)
                if wake is None:
                    return   # no host: published when the runner next serves the ring
                self._scheduled = True
        if wake is not None:
            wake(self.flush)
        else:
            self._finish([(completion, written)])

    def flush(self) -> None:
        """Publish what other threads completed (the ring's thread; the runner also calls it
        each time it serves the ring)."""
        with self._lock:
            self._scheduled = False
            if not self._queue:
                return
            items = list(self._queue)
            self._queue.clear()
        self._finish(items)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once nothing is in flight (now, if nothing is)."""
        if self._pending:
            self._idle.append(callback)
        else:
            callback()

    def cancel(self, reason: str) -> tuple[int, ...]:
        """Drop every chain in flight (ring stopped, reset or broken): coroutines are
        cancelled, later completions ignored. Returns the dropped heads."""
        with self._lock:
            self.generation += 1
            dropped = tuple(self._pending)
            pending = list(self._pending.values())
            self._pending.clear()
            self._early.clear()
            self._queue.clear()
            self._idle.clear()
        for completion in pending:
            if completion is not None and completion.canceller is not None:
                completion.canceller()
        if dropped:
            log.warning("vring %d: %s with %d requests in flight (heads %s%s): they are not "
                        "completed", self.index, reason, len(dropped), list(dropped[:8]),
                        ", ..." if len(dropped) > 8 else "")
        return dropped

    # ------------------------------------------------------------------ internals

    def _ended(self, completion: Completion, value: Any, exc: BaseException | None) -> None:
        """A coroutine ended (on the ring's thread)."""
        if completion.cancelled:
            return
        if exc is None:
            # Queued, not published at once: every coroutine that ends in this turn of the
            # loop is published in one batch (one used->idx update, one interrupt decision).
            with self._lock:
                if completion.finished:   # the coroutine also called complete() itself
                    twice = True
                else:
                    twice = False
                    completion.finished = True
                    self._queue.append((completion, value))
                    wake = not self._scheduled
                    self._scheduled = True
            if twice:
                self._fail(f"chain {completion.head} completed twice")
            elif wake:
                self.host.call_later(0, self.flush)
            return
        self._drop(completion)
        if isinstance(exc, asyncio.CancelledError):
            reason = f"the coroutine serving chain {completion.head} was cancelled"
            log.warning("vring %d: %s", self.index, reason)
        else:
            reason = f"handle_chain (async) failed for chain {completion.head}: {exc!r}"
            log.error("vring %d: %s", self.index, reason, exc_info=exc)
        self._fail(reason)

    def _drop(self, completion: Completion) -> None:
        if self._pending.get(completion.head) is completion:
            del self._pending[completion.head]
        if not self._pending:
            self._went_idle()

    def _finish(self, items: list[tuple[Completion, Written]]) -> None:
        """Publish `items` (the ring's thread): stale ones dropped, IN_ORDER honoured."""
        out: list[tuple[int, int]] = []
        pending = self._pending
        for completion, written in items:
            head = completion.head
            if completion.cancelled or pending.get(head) is not completion:
                log.debug("vring %d: late completion of chain %d dropped (ring stopped)",
                          self.index, head)
                continue
            try:
                count = written() if callable(written) else written
                if not isinstance(count, int) or count < 0:
                    raise TypeError(f"bytes written must be an int >= 0, not {count!r}")
            except Exception as exc:
                log.error("vring %d: completing chain %d failed: %r", self.index, head, exc,
                          exc_info=exc)
                del pending[head]
                self._fail(f"completing chain {head} failed: {exc!r}")
                return
            if self.in_order:
                self._early[head] = count
            else:
                del pending[head]
                out.append((head, count))
        if self.in_order:
            early = self._early
            while pending:
                oldest = next(iter(pending))
                if oldest not in early:
                    break
                del pending[oldest]
                out.append((oldest, early.pop(oldest)))
        if out:
            self._publish(out)
        if not pending:
            self._went_idle()

    def _went_idle(self) -> None:
        waiters, self._idle = self._idle, []
        for callback in waiters:
            callback()


async def _wrap(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _close(awaitable: object) -> None:
    """Close a coroutine that will never run (no "never awaited" warning)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()
