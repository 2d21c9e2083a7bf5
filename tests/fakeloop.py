"""A stand-in for the event loop a ring runner or a session is given (`vring.RingHost`):
readers and timers are recorded, and the test runs timers by hand, so every polling turn of
a ring is deterministic."""

from __future__ import annotations

from collections.abc import Callable


class FakeLoop:
    """Records watched fds (watching one twice is a bug) and timers (`run_timers` runs them)."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.calls: list[tuple[str, int]] = []
        self.timers: list[Callable[[], None]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        assert fd not in self.watched, f"fd {fd} watched twice"
        self.calls.append(("watch", fd))
        self.watched[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        self.calls.append(("unwatch", fd))
        return self.watched.pop(fd, None) is not None

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self.timers.append(callback)

    def run_timers(self, rounds: int = 1000) -> int:
        """Run timers (and those they add) until none is left or `rounds` rounds ran;
        returns how many rounds ran."""
        for k in range(rounds):
            if not self.timers:
                return k
            timers, self.timers = self.timers, []
            for t in timers:
                t()
        return rounds
