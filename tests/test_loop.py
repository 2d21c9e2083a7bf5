"""The event loop: readers, timers, cross-thread calls, stop, and a safe double close."""

from __future__ import annotations

import os
import threading

from vhostpy.loop import EventLoop


def test_reader_timer_and_threadsafe_call() -> None:
    loop = EventLoop()
    seen: list[str] = []
    read, soon = threading.Event(), threading.Event()
    r, w = os.pipe()
    try:
        def on_read() -> None:
            seen.append(os.read(r, 10).decode())
            read.set()
        loop.add_reader(r, on_read)
        loop.call_later(0.01, lambda: os.write(w, b"x"))
        thread = threading.Thread(target=loop.run)
        thread.start()
        assert read.wait(5), "the timer's write never reached the reader"
        loop.call_soon_threadsafe(lambda: (seen.append("soon"), soon.set()))
        assert soon.wait(5), "call_soon_threadsafe never ran"
        loop.stop()          # from another thread: wakes the loop
        thread.join(5)
        assert not thread.is_alive()
        assert seen == ["x", "soon"]
        assert loop.remove_reader(r) is True
        assert loop.remove_reader(r) is False
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_failing_callback_does_not_stop_the_loop() -> None:
    loop = EventLoop()
    seen: list[int] = []

    def boom() -> None:
        raise RuntimeError("bug in a callback")
    loop.call_later(0, boom)
    loop.call_later(0.01, lambda: seen.append(1))
    loop.call_later(0.02, loop.stop)
    loop.run()
    loop.close()
    assert seen == [1]


def test_close_twice_and_stop_after_close_are_harmless() -> None:
    loop = EventLoop()
    loop.close()
    # a descriptor opened now may reuse the loop's old numbers: a second close must not touch it
    r, w = os.pipe()
    try:
        loop.close()
        loop.stop()
        os.write(w, b"still open")
        assert os.read(r, 20) == b"still open"
    finally:
        os.close(r)
        os.close(w)


def test_stop_from_another_thread_while_the_loop_closes() -> None:
    """What vhostpy.Server.stop does from a test's thread: queue a stop, then stop, while the
    loop's thread returns from run() and closes the loop. stop() must not write to the wake
    fd that close() is closing (EBADF, seen about once in 150 rounds before it held the
    lock close() takes)."""
    for _ in range(1000):
        loop = EventLoop()

        def serve(loop: EventLoop = loop) -> None:
            loop.run()
            loop.close()

        thread = threading.Thread(target=serve)
        thread.start()
        loop.call_soon_threadsafe(loop.stop)
        loop.stop()
        thread.join(10)
        assert not thread.is_alive()
