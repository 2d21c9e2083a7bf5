"""The decision after a kick: polling with a budget and interrupt coalescing, for one ring.

`Pacer` is the part of `vring.Vring` that decides, once the device has served a kick, what
comes next: interrupt the driver now, hold the interrupt while coalescing, keep polling the
ring with kicks off, or ask for kicks again. It owns no ring state of its own beyond that
decision; `Vring` gives it the ring (`vq`), the device, the host and `serve()`.

Polling with a budget: a kick that made the device take at least `device.poll_after` chains
starts polling the ring with kicks disabled. Each turn serves the ring for up to `POLL_TURN`
seconds and yields to the host (a zero-delay timer). After the idle window without work the
ring asks for kicks again, re-checks it (work that raced in keeps the polling going) and
waits on its kick: an idle back-end uses no CPU.

The idle window adapts, as KVM's halt polling does: it starts at `device.poll_idle` (default
`POLL_IDLE`); a kick that comes after the ring gave up, but within `device.poll_idle_max`
(default `POLL_IDLE_MAX`) of it, widens the window to cover that gap (at least doubling it);
a kick after a longer silence halves it, back to `poll_idle`. On a virtual machine whose
host is busy, the peer's vCPU is often descheduled for a millisecond or more, and a back-end
that then sleeps pays for it again: its halted vCPU is handed to someone else, and its
wake-up waits for the host (measured with DPDK's virtio-user looping 32 frames through
`--reflect` on such a machine: 150 to 1600 sleeps in a 10 s run, the next kick 1.3 ms later
at the median, each costing the front-end a kick). A back-end whose traffic pauses that
briefly keeps polling through the pause; one whose traffic stopped spends at most one
window (`poll_idle_max`) before it sleeps.

Interrupt coalescing, for a device with `coalesce` set: once an interrupt covered two or more
completions the driver counts as streaming, and the completions of the next kick are held
while the ring is polled; the driver is interrupted once the ring has been quiet for `quiet`,
`batch` completions wait or the oldest waited `wait`, and always before the ring goes back to
kicks. Held completions are already in the used ring; only the interrupt waits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .device import Device
from .virtqueue import Virtqueue

if TYPE_CHECKING:
    from .notifier import Notifier

__all__ = ["POLL_IDLE", "POLL_IDLE_MAX", "POLL_TURN", "CoalescingStats", "Pacer"]

log = logging.getLogger(__name__)

#: Longest stretch one ring is served before the host's loop gets its turn (seconds).
POLL_TURN = 0.0005
#: How long a polled ring may stay empty before it waits for kicks again (seconds): the
#: idle window's start.
POLL_IDLE = 0.0002
#: The widest the idle window grows to (seconds).
POLL_IDLE_MAX = 0.02


@dataclass
class CoalescingStats:
    """The interrupt coalescing state and counters of one ring."""

    last_batch: int = 0         # completions the last interrupt decision covered
    since: float | None = None  # when the oldest held completion was seen (None: none held)
    streaming: bool = False     # whether the held ones may wait (see `Coalescing`)
    engaged: bool = False       # whether the driver counts as streaming (`Vring._streaming`)
    held: int = 0               # completions whose interrupt waited, in all
    releases: int = 0           # interrupt decisions that covered them


class Pacer:
    """Polling and coalescing for one ring (a base of `vring.Vring`, which sets every
    attribute below and provides `live`, `serve()` and `signal_used()`)."""

    device: Device
    vq: Virtqueue
    host: Any
    index: int
    coalescing: CoalescingStats | None
    poll_idle: float
    poll_idle_max: float
    #: Times polling gave up on an empty ring and asked for kicks.
    poll_sleeps: int
    _idle_grown: float          # the window beyond poll_idle earned by short sleeps
    _slept_at: float | None     # when polling last gave up (None: a kick came since)
    _call: Notifier | None
    _polling: bool
    _poll_since: float
    _poll_gen: int
    _held: bool
    _async_timer: bool
    _last_completion: float

    @property
    def live(self) -> bool:
        raise NotImplementedError

    def serve(self) -> int:
        raise NotImplementedError

    def signal_used(self, vq: Virtqueue) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ polling

    @property
    def idle_window(self) -> float:
        """How long (seconds) a polled ring may stay empty now before it asks for kicks."""
        return max(self.poll_idle, min(self._idle_grown, self.poll_idle_max))

    def _woken(self, now: float) -> None:
        """A kick came: if polling had given up, fit the idle window to the gap."""
        slept = self._slept_at
        if slept is None:
            return
        self._slept_at = None
        gap, window = now - slept, self.idle_window
        if gap > self.poll_idle_max:         # the traffic had stopped: narrow back
            self._idle_grown = window / 2     # idle_window keeps it at poll_idle or more
        elif gap > window:                   # polling on would have met this kick
            self._idle_grown = min(self.poll_idle_max, max(2 * window, gap))

    def _start_polling(self) -> bool:
        if self.host is None:
            return False
        self._polling = True
        self._poll_since = time.monotonic()
        self._held = self.coalescing is not None
        self._poll_gen += 1
        gen = self._poll_gen
        self.host.call_later(0, lambda: self._poll_turn(gen))
        return True

    def _stop_polling(self) -> None:
        """Leave polling (releasing held interrupts) without asking for kicks."""
        if self._polling or self._held:
            self._release()
        self._polling = False
        self._poll_gen += 1

    def _poll_turn(self, gen: int) -> None:
        """Serve the ring for up to POLL_TURN; reschedule, or go back to kicks if idle."""
        if gen != self._poll_gen or not self._polling:
            return
        now = time.monotonic()
        end = now + POLL_TURN
        last_work = self._poll_since
        held = self.coalescing
        while self.live and self._polling:
            if self.serve():
                last_work = now = time.monotonic()
                if held is not None:
                    self._coalesce(held, now, last_work)
                if now >= end:
                    break
                continue
            now = time.monotonic()
            if held is not None:
                self._coalesce(held, now, last_work)
            if now - last_work >= self.idle_window and (held is None or held.since is None):
                if self._keep_polling():
                    last_work = now = time.monotonic()
                    continue
                self._polling = False
                self._slept_at = now
                self.poll_sleeps += 1
                return
            break
        if not self.live or not self._polling:
            self._stop_polling()
            return
        self._poll_since = last_work
        assert self.host is not None
        self.host.call_later(0, lambda: self._poll_turn(gen))

    def _keep_polling(self) -> bool:
        """The ring went idle: ask for kicks again. Returns True (and polls on) when there is
        a reason to: the device took entries the driver published before kicks were back on
        (it need not kick for those), or, where the device leaves entries (receive buffers
        with no frame for them), entries added after those. Kicks are then asked for only
        past the entries left, which a driver adding more crosses."""
        if not self._ask_for_kicks():
            return False
        if self.serve():
            return True
        return self._ask_for_kicks(after_available=True)

    def _ask_for_kicks(self, *, after_available: bool = False) -> bool:
        """Stop polling and ask for kicks (unless the device wants none for now: they stay
        off); if entries are there already, poll on instead and return True."""
        self._release()
        self._polling = False
        if not self.live:
            return False
        if not self.device.wants_kicks(self.index):
            self.vq.disable_notifications()
            return False
        if not self.vq.enable_notifications(after_available=after_available):
            return False
        self._polling = True
        self._held = self.coalescing is not None
        return True

    # ------------------------------------------------------------------ coalescing

    def _coalesce(self, held: CoalescingStats, now: float, last_work: float) -> None:
        """Interrupt the driver for what the ring holds once `Coalescing` says it is time."""
        pending = self.vq.unsignalled
        if not pending or self._call is None:
            return
        if held.since is None:
            held.since, held.streaming = now, self._streaming(held)
        c = self.device.coalesce
        assert c is not None
        if (not held.streaming or pending >= c.batch or now - last_work >= c.quiet
                or now - held.since >= c.wait):
            self._release()
            self._held = True

    def _completions_published(self) -> None:
        """Chains completed later were published: interrupt the driver now, or, while it
        streams, hold the interrupt as a polled ring would (released once completions have
        been quiet for `quiet`, `batch` wait or the oldest waited `wait`)."""
        if self._held:
            if not self._polling and self._async_timer:   # held here: count, maybe release
                self._last_completion = time.monotonic()
                c = self.device.coalesce
                if c is not None and self.vq.unsignalled >= c.batch:
                    self._release()
            return    # else a poll turn decides
        held, c = self.coalescing, self.device.coalesce
        if held is None or c is None or self.host is None or not self._streaming(held):
            self.signal_used(self.vq)
            return
        now = time.monotonic()
        self._last_completion = now
        held.since, held.streaming = now, True
        self._held = True
        if self.vq.unsignalled >= c.batch:
            self._release()
            return
        if not self._async_timer:
            self._async_timer = True
            self.host.call_later(c.quiet, self._async_release)

    def _async_release(self) -> None:
        """The timer of `_completions_published`: release, or look again later."""
        self._async_timer = False
        held, c = self.coalescing, self.device.coalesce
        if held is None or c is None or held.since is None or self._polling:
            return    # released meanwhile, or a poll turn decides now
        now = time.monotonic()
        if (self.vq.unsignalled >= c.batch or now - self._last_completion >= c.quiet
                or now - held.since >= c.wait or not self.live):
            self._release()
            return
        assert self.host is not None
        self._async_timer = True
        self.host.call_later(min(c.quiet, max(0.0, held.since + c.wait - now)),
                             self._async_release)

    def _streaming(self, held: CoalescingStats) -> bool:
        """Whether the driver keeps several requests in flight: its last interrupt covered
        two or more completions; or it was streaming and (EVENT_IDX) its queue depth as the
        ring shows it (avail->idx against used_event) is still two or more, which keeps it
        streaming when, on a busy host, a few interrupts happened to find one completion
        each. Depth alone never starts it: a driver whose requests all complete at once has
        nothing to gain from a held interrupt."""
        if held.last_batch >= 2:
            held.engaged = True
        elif held.engaged:
            depth = self.vq.driver_depth()
            held.engaged = depth is not None and depth >= 2
        return held.engaged

    def _release(self) -> None:
        """Stop holding interrupts; interrupt the driver for what was held (if it asked)."""
        held = self.coalescing
        waited = held is not None and held.since is not None and held.streaming
        if held is not None:
            held.since = None
        if not self._held:
            return
        self._held = False
        pending = self.vq.unsignalled
        if held is not None and pending:
            held.last_batch = pending
            if waited:
                held.held += pending
                held.releases += 1
        self.vq.signal_used()

    def _log_coalescing(self) -> None:
        held = self.coalescing
        if held is not None and held.releases:
            log.info("vring %d: interrupt coalescing: %d completions held, %d interrupt "
                     "decisions for them", self.index, held.held, held.releases)
