"""The vring runner: one object per ring being served, shared by every transport.

`Vring` owns "a ring being served" (rust-vmm's `VringState` and its handler, DPDK's central
`vhost_vring_call`, in Python). Transports translate their world into calls on it: the
vhost-user session turns SET_VRING_* messages into `set_size`, `set_base`, `set_addresses`,
`set_kick`, `set_call`, `set_err`, `start`, `enable` and `stop`; the lguest bridge turns an
`lguest_vqconfig` and a status notify into the same calls. Per ring it owns:

* its state, a `RingState` moved only along `TRANSITIONS` (see `RingState`);
* its endpoints, one `notifier.Notifier` each for kick, call and err: an eventfd (which the
  compiled data paths write directly) or a Python callable (in-process transports);
* every call of a device hook, under ONE rule (`call_hook`): the exception is logged with the
  device, ring and hook, and only that ring breaks (its err notifier fires once) -- it never
  escapes to the transport; hooks that belong to a request (`set_features`, `write_config`,
  `set_mtu`) go through the same function and fail only that request;
* the decision after a kick: interrupt now, hold the interrupt (coalescing, `Coalescing`),
  keep polling with kicks off, or ask for kicks again. The transport supplies only a
  `RingHost` (fd watching and timers); without timers a ring is never polled;
* the chains taken and not yet completed (`in_flight`, their heads in pop order), among them
  those a device completes later (`completion.InFlight`: `vq.defer(chain)` or an `async def
  handle_chain`), published on the ring's thread as they finish (in order under
  VIRTIO_F_IN_ORDER), with interrupt coalescing;
* what a stop does about them: `stop_after_drain` (GET_VRING_BASE) takes no new chains,
  lets those in flight finish (their completions are published) and only then stops, or
  gives up on them after `device.stop_timeout`; `reset` (front-end gone) and `fail` cancel
  them at once. A completion that comes after its ring stopped is never published.

What it must never do: parse a vhost-user message, know an lguest page, or walk a ring
itself (`Virtqueue` is ring mechanics only).

Polling and interrupt coalescing (the decision after a kick) are `pacing.Pacer`, which
`Vring` builds on.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from . import _accel, native_kick
from .completion import Completion, InFlight
from .device import Device
from .errors import BackendError, FrontendError, VhostError
from .notifier import EventFdNotifier, Notifier, NotifierError
from .pacing import POLL_IDLE, POLL_IDLE_MAX, POLL_TURN, CoalescingStats, Pacer
from .virtqueue import (
    VIRTIO_F_IN_ORDER,
    VIRTIO_RING_F_EVENT_IDX,
    DescriptorChain,
    PythonVirtqueue,
    Virtqueue,
)
from .virtqueue_cffi import CffiPackedVirtqueue, CffiVirtqueue
from .virtqueue_packed import PackedVirtqueue

__all__ = [
    "POLL_IDLE", "POLL_IDLE_MAX", "POLL_TURN", "TRANSITIONS", "CoalescingStats",
    "DefaultPackedVirtqueue", "DefaultVirtqueue", "HookError", "RingHost", "RingState",
    "Vring", "call_hook",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The visible rule for which ring implementation transports build: the compiled sibling
#: when the fast path is in use (`_accel.IMPLEMENTATION`), else the pure-Python reference.
DefaultVirtqueue: type[Virtqueue] = CffiVirtqueue if _accel.lib is not None else PythonVirtqueue
#: The same rule for packed rings (VIRTIO_F_RING_PACKED): the compiled packed ring (a
#: `CffiVirtqueue`, so the compiled blk and net paths serve it) or the pure-Python reference.
DefaultPackedVirtqueue: type[Virtqueue] = (CffiPackedVirtqueue if _accel.lib is not None
                                           else PackedVirtqueue)


# ---------------------------------------------------------------------------- hooks

class HookError(BackendError):
    """A device hook raised; the message names the device, the ring (if any) and the hook."""


def call_hook(device: Device, hook: str, fn: Callable[..., _T], *args: object,
              ring: int | None = None) -> _T:
    """Call device hook `fn(*args)` under the one containment rule.

    Any exception is logged once (device, ring, hook, traceback) and re-raised as
    `HookError`, which the caller turns into "this ring breaks" (`Vring`) or "this request
    fails" (a failure reply): it never reaches a transport's loop. `VhostError`s a hook raises
    on purpose (a refused value) keep their class and are logged at WARNING without a traceback;
    a PermissionError (a read-only config field) becomes a `BackendError` the same way.
    """
    try:
        return fn(*args)
    except VhostError as exc:
        where = f" on vring {ring}" if ring is not None else ""
        log.warning("device %s refused %s%s: %s", device.name, hook, where, exc)
        raise
    except PermissionError as exc:     # `Device.write_config`'s refusal of a read-only field
        log.warning("device %s refused %s: %s", device.name, hook, exc)
        raise BackendError(str(exc)) from exc
    except Exception as exc:
        where = f" on vring {ring}" if ring is not None else ""
        log.exception("device %s failed in %s%s", device.name, hook, where)
        raise HookError(f"device {device.name} failed in {hook}{where}: {exc!r}") from exc


# ---------------------------------------------------------------------------- state

class RingState(enum.Enum):
    """Where a ring is in its life (vhost-user spec "Ring states", lguest start/reset).

    UNCONFIGURED: size or addresses unknown. CONFIGURED: size and addresses set, not started.
    STARTED: started (a kick endpoint arrived, or the lguest device was started) but disabled.
    ENABLED: the device serves it. STOPPING: a stop waits for the chains in flight (nothing
    new is taken; completions are still published). BROKEN: the ring, its notifier or the
    device failed; nothing is served until it is stopped or reset. STOPPED: `stop()` returned
    its base; it must be configured again.
    """

    UNCONFIGURED = "unconfigured"
    CONFIGURED = "configured"
    STARTED = "started"
    ENABLED = "enabled"
    STOPPING = "stopping"
    BROKEN = "broken"
    STOPPED = "stopped"


_S = RingState
#: Every move a ring may make. Resetting (to UNCONFIGURED) is allowed from every state.
TRANSITIONS: dict[RingState, frozenset[RingState]] = {
    _S.UNCONFIGURED: frozenset({_S.CONFIGURED, _S.STARTED, _S.ENABLED, _S.STOPPED}),
    _S.CONFIGURED: frozenset({_S.UNCONFIGURED, _S.STARTED, _S.ENABLED, _S.STOPPING,
                              _S.BROKEN, _S.STOPPED}),
    _S.STARTED: frozenset({_S.UNCONFIGURED, _S.CONFIGURED, _S.ENABLED, _S.STOPPING,
                           _S.BROKEN, _S.STOPPED}),
    _S.ENABLED: frozenset({_S.UNCONFIGURED, _S.CONFIGURED, _S.STARTED, _S.STOPPING,
                           _S.BROKEN, _S.STOPPED}),
    _S.STOPPING: frozenset({_S.UNCONFIGURED, _S.BROKEN, _S.STOPPED}),
    _S.BROKEN: frozenset({_S.UNCONFIGURED, _S.STOPPED}),
    _S.STOPPED: frozenset({_S.UNCONFIGURED, _S.CONFIGURED, _S.STARTED, _S.ENABLED}),
}


class RingHost(Protocol):
    """What a runner needs from the transport's loop (an `EventLoop` is one)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever `fd` is readable."""

    def remove_reader(self, fd: int) -> bool:
        """Stop watching `fd`."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback()` once, `delay` seconds from now."""

    # Optional, for chains completed later (`completion.CompletionHost`): a host without
    # `call_soon_threadsafe` publishes other threads' completions on the ring's next turn;
    # one without `run_coroutine` cannot serve a device whose `handle_chain` is async.


class Vring(Pacer):
    """One ring being served: state, endpoints, device calls, the after-kick decision.

    `host` is None for a transport without a loop: kicks then come only through `kick()`,
    and the ring is never polled (every batch gets its interrupt decision at once).
    """

    def __init__(self, device: Device, vq: Virtqueue, host: RingHost | None = None) -> None:
        self.device = device
        self.vq = vq
        self.index = vq.index
        self.host = host
        self.state = RingState.UNCONFIGURED
        self.kicks = 0
        #: Of those, the kicks C served alone (`native_kick`).
        self.kicks_in_c = 0
        self.error: str | None = None
        self._started = False
        self._enabled = False
        self._stopped = False
        self._event_idx = False
        self._kick: Notifier | None = None
        self._call: Notifier | None = None
        self._err: Notifier | None = None
        self._polling = False
        self._poll_since = 0.0
        self._poll_gen = 0
        self._held = False
        self.coalescing = CoalescingStats() if device.coalesce is not None else None
        idle, idle_max = device.poll_idle, device.poll_idle_max
        self.poll_idle = POLL_IDLE if idle is None else idle
        self.poll_idle_max = POLL_IDLE_MAX if idle_max is None else idle_max
        self.poll_sleeps = 0
        self._idle_grown = 0.0
        self._slept_at: float | None = None
        #: Called (once) when guest memory lost its backing under this ring (the front-end
        #: shrank a memfd: `GuestMemory.faulted`); the transport drops that front-end.
        self.on_memory_lost: Callable[[str], None] | None = None
        #: Chains the device completes later (see `completion`).
        self.inflight = InFlight(vq.index, self._publish, self.fail)
        self.inflight.host = host
        self._stopping: Callable[[int], None] | None = None
        #: This ring's part of the inflight region (`set_inflight`), attached at each start.
        self._inflight_view: memoryview | None = None
        self._attach_pending = False
        #: Heads resubmitted at the last start (a previous back-end's chains in flight).
        self.resubmitted = 0
        self._stop_token = 0
        self._async_timer = False
        self._last_completion = 0.0
        #: This ring's kicks served in C (`native_kick`), while that is possible.
        self._native: native_kick.NativeKick | None = None
        vq.runner = self

    # ------------------------------------------------------------------ what devices see

    @property
    def polling(self) -> bool:
        """True while the runner polls this ring: a device finding it empty leaves kicks
        off (the runner asks for them again before it stops polling)."""
        return self._polling

    def signal_used(self, vq: Virtqueue) -> bool:
        """A device published used entries: interrupt the driver now if it asked for it,
        unless the runner holds this ring's interrupts (they stay pending)."""
        if self._call is None or self._held:
            return False
        need = vq.decide_signal()
        if need:
            self.interrupt()
        return need

    def signal_target(self) -> tuple[int, int] | None:
        """For compiled paths: see `Virtqueue.signal_target`."""
        call = self._call
        if call is None or self._held:
            return 0, -1
        if call.fd is None:
            return None
        return 1, call.fd

    def interrupt(self) -> None:
        """Raise the call endpoint now; a dead endpoint breaks the ring."""
        call = self._call
        if call is None:
            return
        try:
            call.notify()
        except NotifierError as exc:
            self.fail(f"call notifier cannot be written: {exc}")

    def hold_interrupts(self) -> None:
        """Hold this ring's interrupts: `signal_used` decides nothing (entries stay pending,
        `vq.unsignalled` counts them) until `release_interrupts`."""
        self._held = True

    def release_interrupts(self) -> None:
        """Stop holding; one interrupt decision covers everything held."""
        self._release()

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Heads of the chains the device took and has not completed, oldest first (those
        it completes later, and any it simply holds; a device completing every chain before
        it returns leaves none)."""
        return self.vq.taken

    def defer(self, chain: DescriptorChain) -> Completion:
        """`vq.defer(chain)`: a handle to complete `chain` later (see `completion`)."""
        return self.inflight.defer(chain)

    def later(self, chain: DescriptorChain, result: object) -> None:
        """`handle_chain` returned `result` (a `Completion` or an awaitable) for `chain`."""
        self.inflight.later(chain, result)

    def spawn(self, awaitable: object, done: Callable[[Any, BaseException | None], None]
              ) -> Callable[[], bool]:
        """`vq.spawn`: run `awaitable` on the host's asyncio loop; `done(result, exc)` comes
        on the ring's thread. Returns a function that cancels it. TypeError when the
        transport runs no asyncio loop."""
        return self.inflight.run(awaitable, done)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """`vq.call_soon_threadsafe`: run `callback()` on the ring's thread soon, from any
        thread. TypeError when the transport's host cannot."""
        wake = getattr(self.host, "call_soon_threadsafe", None)
        if wake is None:
            raise TypeError(f"vring {self.index}: this transport cannot run callbacks from "
                            "other threads")
        wake(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """`vq.call_later`: run `callback()` on the ring's thread in `delay` seconds (the
        host's timer). TypeError for a transport without a loop."""
        if self.host is None:
            raise TypeError(f"vring {self.index}: this transport has no timers")
        self.host.call_later(delay, callback)

    def publish(self, items: list[tuple[int, int]]) -> None:
        """Used entries for chains the device completed now (`device.drain`): published at
        once, unless VIRTIO_F_IN_ORDER holds them behind older chains still in flight."""
        items = self.inflight.completed_now(items)
        if items:
            self.vq.add_used_many(items)

    def _publish(self, items: list[tuple[int, int]]) -> None:
        """Chains completed later: publish them and decide the interrupt (coalesced)."""
        vq = self.vq
        vq.add_used_many(items)
        if vq.error is not None:
            self.fail(vq.error)
            return
        self._completions_published()

    # ------------------------------------------------------------------ configuration

    def set_size(self, size: int) -> None:
        """The ring's size (RingError when out of range; a split ring's must be a power of
        two, a packed ring's need not)."""
        self._refuse_while_serving("change the size of")
        self.vq.set_size(size)
        self._configured()

    def set_base(self, idx: int) -> None:
        """The next avail index to take (SET_VRING_BASE; lguest starts at 0)."""
        self._refuse_while_serving("set the base of")
        self.vq.set_base(idx)

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """Guest-physical addresses of the three parts (RingError if unmapped/misaligned).
        Allowed while serving: a memory table change moves the same ring."""
        self.vq.set_addresses(desc, avail, used)
        self._configured()

    def set_features(self, features: int) -> None:
        """The driver's feature bits (only the ring's own ones matter here)."""
        self._event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.inflight.in_order = bool(features >> VIRTIO_F_IN_ORDER & 1)

    @property
    def layout(self) -> str:
        """The ring layout served: "packed" (VIRTIO_F_RING_PACKED) or "split"."""
        return "packed" if isinstance(self.vq, PackedVirtqueue) else "split"

    def set_layout(self, packed: bool) -> None:
        """Serve the ring with the packed (`DefaultPackedVirtqueue`) or the split
        (`DefaultVirtqueue`) layout from now on: the transport calls it when the driver's
        VIRTIO_F_RING_PACKED is known (vhost-user: SET_FEATURES). Nothing happens when the
        layout does not change. A new `Virtqueue` of that class is built over the same guest
        memory and index; a size and addresses set before carry over (checked against the
        new layout: RingError when they do not fit it), a base does not (the two layouts
        encode it differently; the new ring starts fresh). The dirty log does not carry
        over either: the transport hands it again (`Virtqueue.set_dirty_log`).

        FrontendError on a ring that is started, running, stopping or broken: a driver
        cannot change the layout of a ring in use.
        """
        cls = DefaultPackedVirtqueue if packed else DefaultVirtqueue
        old = self.vq
        if type(old) is cls:
            return
        if self.state not in (RingState.UNCONFIGURED, RingState.CONFIGURED,
                              RingState.STOPPED) or self._stopping is not None:
            raise FrontendError(f"vring {self.index}: cannot switch a {self.state.value} "
                                f"ring from the {self.layout} to the "
                                f"{'packed' if packed else 'split'} layout")
        new = cls(old.memory, self.index)
        if old.size:
            new.set_size(old.size)
        if old.addresses_set:
            new.set_addresses(old.desc_addr, old.avail_addr, old.used_addr)
        old.runner = None
        old.reset()
        new.runner = self
        self.vq = new
        log.debug("vring %d: %s layout", self.index, self.layout)
        self._settle()

    def _refuse_while_serving(self, what: str) -> None:
        if self.state is RingState.ENABLED or self.state is RingState.BROKEN:
            raise FrontendError(f"vring {self.index}: cannot {what} a running ring")

    def _configured(self) -> None:
        self._stopped = False
        self._settle()

    # ------------------------------------------------------------------ endpoints

    def set_kick(self, notifier: Notifier | None) -> None:
        """Install the kick endpoint (the old one is closed); its fd is watched when a host
        exists. A fd the host refuses raises FrontendError and leaves the old one."""
        if notifier is not None and notifier.fd is not None and self.host is not None:
            fd = notifier.fd
            try:
                self.host.add_reader(fd, self._on_kick_fd)
            except (OSError, ValueError) as exc:
                self.host.remove_reader(fd)
                raise FrontendError(f"vring {self.index}: kick fd {fd} cannot be watched: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from exc
        self._native_remove()
        self._drop_kick()
        self._kick = notifier
        self._native_install()

    def set_call(self, notifier: Notifier | None) -> None:
        """Install the call endpoint (None: no interrupts); the old one is closed."""
        old, self._call = self._call, notifier
        if old is not None and old is not notifier:
            old.close()

    def set_err(self, notifier: Notifier | None) -> None:
        """Install the err endpoint (signalled once when the ring breaks)."""
        old, self._err = self._err, notifier
        if old is not None and old is not notifier:
            old.close()

    @property
    def kick_fd(self) -> int | None:
        """The kick endpoint's eventfd (None: none, or in-process kicks)."""
        return None if self._kick is None else self._kick.fd

    @property
    def call_fd(self) -> int | None:
        """The call endpoint's eventfd (None: none, or a Python callable)."""
        return None if self._call is None else self._call.fd

    @property
    def err_fd(self) -> int | None:
        """The err endpoint's eventfd (None: none, or a Python callable)."""
        return None if self._err is None else self._err.fd

    @property
    def live(self) -> bool:
        """Whether the device serves this ring (`RingState.ENABLED`)."""
        return self.state is RingState.ENABLED

    def _drop_kick(self) -> None:
        kick, self._kick = self._kick, None
        if kick is None:
            return
        if kick.fd is not None and self.host is not None:
            self.host.remove_reader(kick.fd)
        kick.close()

    def _on_kick_fd(self) -> None:
        kick = self._kick
        if not isinstance(kick, EventFdNotifier):
            return
        try:
            if not kick.drain():
                return
        except NotifierError as exc:
            log.warning("vring %d: kick fd %s: %s; no longer watched", self.index, kick.fd,
                        exc)
            self._drop_kick()
            return
        self.kick()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """The ring is started (vhost-user: its kick arrived; lguest: the device started)."""
        self._started = True
        self._stopped = False
        self._attach_pending = True
        self._settle()

    def set_inflight(self, view: memoryview | None) -> None:
        """This ring's part of the inflight region (INFLIGHT_SHMFD), or None: from its next
        start the ring tracks its chains there, and first recovers what a previous back-end
        left in it (`Virtqueue.attach_inflight`): those chains are served again before the
        ring's new ones."""
        self._inflight_view = view
        if view is None:
            self.vq.attach_inflight(None)

    def _attach_inflight(self) -> None:
        """At the ring's first ENABLED after a start: attach the region (recovering), then
        serve once without waiting for a kick -- the driver's last kick may have gone to
        the back-end that died, and resubmitted chains need no kick at all."""
        self._attach_pending = False
        self.resubmitted = 0
        try:
            heads = self.vq.attach_inflight(self._inflight_view)
        except ValueError as exc:      # RegionError: serve without tracking
            log.warning("vring %d: inflight region not used: %s", self.index, exc)
            heads = []
        if heads:
            self.resubmitted = len(heads)
            log.info("vring %d: serving again %d requests a previous back-end took and never "
                     "completed (heads %s%s)", self.index, len(heads), heads[:8],
                     "..." if len(heads) > 8 else "")
        if self.host is not None:
            self.host.call_later(0, self._self_kick)

    def _self_kick(self) -> None:
        if self.state is RingState.ENABLED:
            self.kick()

    def enable(self, enabled: bool) -> None:
        """SET_VRING_ENABLE (or the implicit enable of a front-end without protocol
        features, or an lguest start)."""
        self._enabled = enabled
        self._settle()

    def stop(self) -> int:
        """Stop the ring now and return its base, GET_VRING_BASE's value (`vq.base`: split,
        the next avail index to take; packed, both indices and wrap counters); chains still in flight
        are dropped (logged), the kick endpoint is dropped and size, addresses and indices
        are forgotten. See `stop_after_drain` for the stop GET_VRING_BASE wants."""
        self._stop_polling()
        self._stopping = None
        dropped = self.inflight.cancel("stopped")
        held = [head for head in self.in_flight if head not in dropped]
        if held and self.state in (RingState.ENABLED, RingState.STOPPING):
            log.warning("vring %d stopped with %d chains in flight (heads %s): they are "
                        "not completed",
                        self.index, len(held), held[:8])
        self._started = False
        self._stopped = True
        self._attach_pending = False
        self._move(RingState.STOPPED)
        self._drop_kick()
        base = self.vq.base
        self.vq.log_used_ring()      # flags and avail event written since the last batch
        self.vq.reset()
        self.error = None
        return base

    def stop_after_drain(self, done: Callable[[int], None]) -> None:
        """Stop the ring once the chains in flight are completed, then `done(base)` (see
        `stop`). Until then (`RingState.STOPPING`) no new chain is taken and completions are
        published. After `device.stop_timeout` seconds (a host's timer) the rest are given
        up; a ring that breaks meanwhile stops at once. With nothing in flight, `done` is
        called before this returns."""
        if not self.inflight or self.state in (RingState.BROKEN, RingState.UNCONFIGURED,
                                               RingState.STOPPED):
            done(self.stop())
            return
        self._stopping = done
        self._stop_polling()
        self._settle()
        log.info("vring %d: stop waits for %d requests in flight", self.index,
                 len(self.inflight))
        self.inflight.when_idle(self._drained)
        if self.host is not None and self._stopping is not None:
            self._stop_token += 1
            token = self._stop_token
            self.host.call_later(self.device.stop_timeout, lambda: self._stop_timed_out(token))

    def _drained(self) -> None:
        done, self._stopping = self._stopping, None
        if done is not None:
            done(self.stop())

    def _stop_timed_out(self, token: int) -> None:
        if self._stopping is None or token != self._stop_token:
            return
        log.warning("vring %d: %d requests still in flight %.1f s after the stop; giving up "
                    "on them", self.index, len(self.inflight), self.device.stop_timeout)
        self._drained()

    def reset(self) -> None:
        """Forget everything (device reset, front-end gone): every endpoint is closed and
        chains in flight are dropped."""
        self._stopping = None
        self.inflight.cancel("reset")
        self._stop_polling()
        self._started = self._enabled = self._stopped = self._attach_pending = False
        self._move(RingState.UNCONFIGURED)
        self._drop_kick()
        self.set_call(None)
        self.set_err(None)
        self.vq.reset()
        self.error = None
        self._event_idx = False
        self._log_coalescing()
        if self.coalescing is not None:
            self.coalescing = CoalescingStats()

    def fail(self, reason: str) -> None:
        """Break the ring: the device stops serving it, err is signalled once. A ring with
        nothing configured (unconfigured, stopped) has nothing to break: only logged."""
        if self.state is RingState.BROKEN:
            return
        if RingState.BROKEN not in TRANSITIONS[self.state]:
            log.debug("vring %d (%s): %s", self.index, self.state.value, reason)
            return
        self.vq.fail(reason)   # the ring rejects every further access
        self.error = self.vq.error
        self._stop_polling()
        self.inflight.cancel("broken")
        self._move(RingState.BROKEN)
        err = self._err
        if err is not None:
            try:
                err.notify()
            except NotifierError as exc:
                log.warning("vring %d: err notifier cannot be written: %s", self.index, exc)
        if self._stopping is not None:
            self._drained()   # a stop was waiting: it completes now

    def _target(self) -> RingState:
        if self.state is RingState.BROKEN:
            return RingState.BROKEN
        vq = self.vq
        if vq.size == 0 or not vq.addresses_set:
            return RingState.STOPPED if self._stopped else RingState.UNCONFIGURED
        if self._stopping is not None:
            return RingState.STOPPING
        if not self._started:
            return RingState.CONFIGURED
        return RingState.ENABLED if self._enabled else RingState.STARTED

    def _settle(self) -> None:
        target = self._target()
        if target is not self.state:
            self._move(target)

    def _move(self, new: RingState) -> None:
        old = self.state
        if new is old:
            return
        if new is not RingState.UNCONFIGURED and new not in TRANSITIONS[old]:
            raise AssertionError(f"vring {self.index}: no transition {old.name} -> {new.name}")
        self.state = new
        log.debug("vring %d: %s -> %s", self.index, old.value, new.value)
        if new is RingState.ENABLED:
            self._serve_start()
            self._native_install()
        elif old is RingState.ENABLED:
            self._native_remove()
            self._stop_polling()
            self._device_hook("queue_stopped", self.device.queue_stopped)

    def _serve_start(self) -> None:
        self.vq.event_idx = self._event_idx
        self.vq.in_order = self.inflight.in_order
        if self._attach_pending:
            self._attach_inflight()
        log.debug("vring %d live (size %d, base %d)", self.index, self.vq.size,
                  self.vq.last_avail_idx)
        self._device_hook("queue_started", self.device.queue_started)

    def _device_hook(self, hook: str, fn: Callable[[int, Virtqueue], None]) -> None:
        """Run a device hook for this ring; a failure (or a ring the device found hostile)
        breaks only this ring."""
        try:
            call_hook(self.device, hook, fn, self.index, self.vq, ring=self.index)
        except VhostError as exc:
            if hook != "queue_stopped":
                self.fail(f"device error: {exc}")
            return
        lost = self.vq.memory.faulted()
        if lost is not None:
            self.fail(f"guest memory lost: {lost}")
            if self.on_memory_lost is not None:
                self.on_memory_lost(lost)
        elif self.vq.error is not None and self.state is not RingState.BROKEN:
            self.fail(self.vq.error)

    # ------------------------------------------------------------------ serving

    def kick(self) -> int:
        """The driver kicked this ring; serve it and decide what comes next (see the module
        docstring). Returns how many chains the device took (`serve`; truthy on progress)."""
        self.kicks += 1
        self._woken(time.monotonic())
        if self.state is not RingState.ENABLED:
            return 0
        held = self.coalescing
        streaming = held is not None and self._streaming(held) and self._call is not None
        self._held = streaming or (held is not None and self._polling)
        signals, waiting = self.vq.signals, self.vq.available()
        served = self.serve()
        # A kick that found several requests waiting: the driver streams. One that found a
        # single request may still serve many (a depth-1 driver keeping up with a long
        # drain: a completion, its interrupt, the next request): count completions per
        # interrupt then.
        batch = served if waiting >= 2 else served // max(1, self.vq.signals - signals)
        return self._paced(served, batch, streaming)

    def _paced(self, served: int, batch: int, streaming: bool) -> int:
        """What comes after a kick that served `served` chains (`batch`: the completions
        each interrupt covered, for coalescing): hold its interrupt, poll, or neither."""
        held = self.coalescing
        if held is not None and self._held:
            if self.vq.unsignalled:
                if held.since is None:
                    held.since, held.streaming = time.monotonic(), streaming
                if not self._polling and not self._start_polling():
                    self._release()
                return served
            if not self._polling:
                self._held = False
        elif held is not None and served:
            held.last_batch = batch
        if self.device.poll_after and served >= self.device.poll_after and not self._polling:
            self._start_polling()
        return served

    # ------------------------------------------------------------------ kicks served in C

    def native_target(self) -> int | None:
        """For `native_kick`: C's call_fd when C may serve this ring's next kick alone --
        the ring is live and the runner would do nothing but serve the kick and decide its
        interrupt (not polling, not holding interrupts, not stopping, no completions
        pending, the driver not streaming into coalescing) -- else None."""
        if self.state is not RingState.ENABLED or self._polling or self._held \
                or self._stopping is not None or self.inflight or self.inflight.queued:
            return None
        held = self.coalescing
        if held is not None and (held.engaged or held.last_batch >= 2):
            return None
        target = self.signal_target()
        if target is None:
            return None
        return target[1] if target[0] else native_kick.NO_SIGNAL

    def native_served(self, kicks: int, chains: int) -> None:
        """For `native_kick`: C served `kicks` kicks to the end (each at most
        `_native_max()` chains, `chains` in all), as `kick()` would have."""
        self.kicks += kicks
        self.kicks_in_c += kicks
        held = self.coalescing
        if held is not None and chains:
            held.last_batch = 1
        lost = self.vq.memory.faulted()
        if lost is not None:
            self.fail(f"guest memory lost: {lost}")
            if self.on_memory_lost is not None:
                self.on_memory_lost(lost)

    def native_handback(self, rc: int, served: int, batch: int) -> None:
        """For `native_kick`: finish a kick C handed back: one C did not serve
        (`native_kick.NOT_SERVED`) goes the Python way; otherwise the device finishes the
        drain C started (its hook under the usual containment), then the runner paces as
        after any kick."""
        native = self._native
        if rc == native_kick.NOT_SERVED or native is None:
            self.kick()
            return
        self.kicks += 1
        if self.state is not RingState.ENABLED:
            return
        more = 0

        def finish(index: int, vq: Virtqueue) -> None:
            nonlocal more
            more = native.server.resume(index, vq, rc)
        self._device_hook("process_queue", finish)
        if self.state is RingState.ENABLED:
            self._paced(served + more, batch + more, False)

    def _native_max(self) -> int:
        """The most chains a kick served in C may publish before the runner must see it: one
        fewer than starts polling, and one with coalescing (two would engage it)."""
        most = self.device.poll_after - 1 if self.device.poll_after else 1 << 30
        if self.coalescing is not None:
            most = min(most, 1)
        return max(most, 0)

    def _native_install(self) -> None:
        """Have C serve this live ring's kicks when its device's compiled path can
        (`Device.native_server`) and the host lets a `KickWaiter` wait for it."""
        kick, host = self._kick, self.host
        if self._native is not None or host is None or not isinstance(kick, EventFdNotifier) \
                or kick.fd is None or self.state is not RingState.ENABLED:
            return
        waiter = native_kick.waiter_for(host)
        if waiter is None:
            return
        try:
            server = call_hook(self.device, "native_server", self.device.native_server,
                               self.index, self.vq, ring=self.index)
        except VhostError:
            return
        if server is None:
            return
        self._native = native_kick.NativeKick(self, server, self.vq, kick.fd,
                                              self._native_max())
        host.remove_reader(kick.fd)
        waiter.add(self._native)
        log.debug("vring %d: kicks served in C", self.index)

    def _native_remove(self) -> None:
        """Serve kicks in Python again (the kick fd goes back to the host's selector)."""
        native, self._native = self._native, None
        if native is None:
            return
        waiter = native_kick.waiter_for(self.host)
        if waiter is not None:
            waiter.remove(native.fd)
        native.close()
        kick = self._kick
        if kick is not None and kick.fd == native.fd and self.host is not None:
            self.host.add_reader(native.fd, self._on_kick_fd)

    def serve(self) -> int:
        """Run the device over the ring once (no kick counted); returns how many chains it
        popped (`Virtqueue.chains_popped`), or 1 if it only published used entries (0: no
        progress)."""
        if self.state is not RingState.ENABLED:
            return 0
        vq = self.vq
        inflight = self.inflight
        inflight.thread = threading.get_ident()
        if inflight.queued:
            inflight.flush()
        before, used = vq.chains_popped, vq.used_idx
        self._device_hook("process_queue", self.device.process_queue)
        popped = self.vq.chains_popped - before if self.vq is vq else 0
        return max(popped, 0) or int(vq.used_idx != used)

    def status(self) -> dict[str, object]:
        """A snapshot for logs and introspection."""
        vq = self.vq
        wraps: dict[str, object] = {}
        if isinstance(vq, PackedVirtqueue):
            wraps = {"avail_wrap": int(vq.avail_wrap), "used_wrap": int(vq.used_wrap)}
        return {"index": self.index, "state": self.state.value, "layout": self.layout,
                "size": vq.size,
                "last_avail_idx": vq.last_avail_idx, "used_idx": vq.used_idx, **wraps,
                "in_flight": len(self.in_flight), "deferred": len(self.inflight),
                "inflight_tracked": vq.inflight_tracked, "resubmitted": self.resubmitted,
                "dirty_logging": vq.dirty_log is not None,
                "kicks": self.kicks, "kicks_in_c": self.kicks_in_c,
                "polling": self._polling, "idle_window": self.idle_window,
                "poll_sleeps": self.poll_sleeps,
                "error": self.error}

    def __repr__(self) -> str:
        return f"<Vring {self.index} {self.state.value} kicks={self.kicks}>"

