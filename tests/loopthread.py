"""A real `EventLoop` on a thread of its own, for tests whose rings complete requests from
coroutines or other threads: `loop_thread()` (the `loop` fixture of conftest.py), and
`on_loop` to run code on its thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from vhostpy.loop import EventLoop


def loop_thread() -> Iterator[EventLoop]:
    """An EventLoop running on a daemon thread; stopped, joined and closed afterwards."""
    lp = EventLoop()
    thread = threading.Thread(target=lp.run, daemon=True)
    thread.start()
    yield lp
    lp.stop()
    thread.join(5)
    lp.close()


def on_loop(loop: EventLoop, fn: Callable[[], Any]) -> Any:
    """Run `fn()` on the loop's thread and return its result (5 s at most)."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        box.append(fn())
        done.set()
    loop.call_soon_threadsafe(run)
    assert done.wait(5), f"{fn!r} did not run on the loop's thread"
    return box[0]
