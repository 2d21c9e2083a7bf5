"""The transport-agnostic virtio device interface.

A `Device` is what vhostpy users write. It never sees a vhost-user message or an lguest
page: a transport (the vhost-user session, the lguest bridge, a test) negotiates features,
builds `Virtqueue` objects over guest memory and calls the device in this order:

1. `features()` (any time) -> the device feature bits offered, transport bits excluded.
2. `config()` / `write_config()` (any time) -> the device config space.
3. `set_features(acked)` once the driver has chosen (a subset of `features()`).
4. `queue_started(index, vq)` when a ring is configured, started and enabled.
5. `process_queue(index, vq)` each time the driver kicks that ring (and once after start).
6. `queue_stopped(index, vq)` when the ring is disabled or stopped; no more calls for it
   until the next `queue_started`.
7. `reset()` on device reset or when the front-end goes away; the device returns to the
   state it had before step 3 and must keep what it owns (an image file, a port).

A device adds used buffers with `vq.add_used()` and then calls `vq.signal_used()`: the ring's
runner (`vring.Vring`) interrupts the driver when the driver asked for it, or holds the
interrupt while it coalesces.

Completing later. `handle_chain` (called by `drain`, the default `process_queue`) returns
the bytes it wrote into the chain's buffers, and the chain is completed at once. It may
instead return `vq.defer(chain)` and call `.complete(written)` on it later, from any thread;
or be an `async def` (or return any awaitable), which the transport's host runs on an asyncio
loop. Either may give, instead of the byte count, a function returning it: the runner calls
it on the ring's thread just before it publishes the used entry, and not at all once the ring
stopped, which is where a device that writes guest memory late should write it. The runner publishes those completions on the ring's thread, in the order they come
(in ring order under VIRTIO_F_IN_ORDER), with interrupt coalescing. In-flight chains are
bounded by the ring size. A stop (GET_VRING_BASE) waits up to `stop_timeout` for them; a
reset or a vanished front-end drops them, and a completion that comes after that is ignored. Every hook runs under the runner's one containment rule: an
exception breaks only that ring (or fails only that request) and is logged with the device,
ring and hook. Devices must treat every guest buffer as hostile: sizes and contents come from
the guest.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vhostpy.errors import UnsupportedError
from vhostpy.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DescriptorChain,
    Virtqueue,
)

log = logging.getLogger(__name__)

# Device IDs (virtio 1.2, section 5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

#: Ring features every vhostpy device supports because `Virtqueue` implements them.
RING_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
)

#: How many chains one `drain` pass takes before publishing used entries.
BATCH = 64


@dataclass(frozen=True)
class Coalescing:
    """When a polling host may hold a ring's interrupts, and for how long (seconds).

    A driver whose last interrupt covered two or more completions is streaming: it keeps
    several requests in flight, and each interrupt costs it time it would rather spend
    submitting (a TCG vCPU, a busy guest). The host then holds the interrupts of the
    requests that follow, keeps polling, and interrupts once the ring has been `quiet` that
    long, `batch` completions wait, or the oldest waited `wait`. A driver that waits for each
    completion (queue depth 1: every interrupt covers one) is interrupted at once, so its
    latency does not change.
    """

    quiet: float = 50e-6
    batch: int = 32
    wait: float = 500e-6


class Device:
    """Base class of every virtio device model; optional hooks have sensible defaults.

    Subclasses set `device_id`, `name`, `num_queues` and `max_queue_size`, and override
    `device_features`, `config` and either `process_queue` or `handle_chain`.
    """

    device_id: int = 0
    name: str = "device"
    num_queues: int = 1
    max_queue_size: int = 1024
    #: A host that can busy-poll rings starts polling one when a kick made the device take
    #: at least this many chains (0: never poll). 1 suits streams (net); a device whose
    #: requests are answered one at a time (blk at queue depth 1) wastes a spin per request.
    poll_after: int = 1
    #: How long (seconds) such a host keeps polling an empty ring before it asks for kicks
    #: again, at first; None: the host's default. The window widens up to `poll_idle_max`
    #: while kicks come soon after it gave up (see `pacing`).
    poll_idle: float | None = None
    #: The widest that window gets (seconds); None: the host's default; `poll_idle` (or
    #: less): a fixed window.
    poll_idle_max: float | None = None
    #: Interrupt coalescing for a driver that streams requests (see `Coalescing`); None:
    #: every batch the device completes gets its interrupt decision at once.
    coalesce: Coalescing | None = None
    #: How long (seconds) a ring stop waits for chains this device completes later.
    stop_timeout: float = 30.0

    def __init__(self) -> None:
        self.acked_features = 0

    # -- feature negotiation ---------------------------------------------------------------
    def device_features(self) -> int:
        """Device-specific feature bits (ring and version bits are added by `features`)."""
        return 0

    def features(self) -> int:
        """Every feature bit this device offers to a driver."""
        return self.device_features() | RING_FEATURES

    def set_features(self, features: int) -> None:
        """Record the driver's choice; `features` is already checked against `features()`."""
        self.acked_features = features

    def has_feature(self, bit: int) -> bool:
        """True when the driver acknowledged feature `bit` (a bit number)."""
        return bool(self.acked_features >> bit & 1)

    # -- config space ----------------------------------------------------------------------
    def config(self) -> bytes:
        """The device config space as the driver reads it (little-endian)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space; read-only by default."""
        raise PermissionError(f"{self.name}: config space is read-only "
                              f"(write of {len(data)} bytes at offset {offset})")

    # -- queues ----------------------------------------------------------------------------
    def queue_started(self, index: int, vq: Virtqueue) -> None:
        """Ring `index` is live; the default just processes what is already queued."""
        self.process_queue(index, vq)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        """Ring `index` stopped; the device must not touch `vq` any more."""

    def native_server(self, index: int, vq: Virtqueue) -> Any:
        """The compiled data path that may serve ring `index`'s kicks in C by itself, with
        no Python per kick (a `native_kick.NativeServer`), or None: kicks go through
        `process_queue` (the default). Asked each time the ring goes live."""
        return None

    def wants_kicks(self, index: int) -> bool:
        """Whether ring `index` needs the driver's kicks now (asked whenever the runner
        would turn them back on after polling). True by default; a ring whose entries wait
        for the device rather than the other way round (virtio-net's receive buffers while
        nothing waits for them) answers False, keeps kicks off itself, and turns them on
        when it starts waiting for entries."""
        return True

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        """Serve every available chain of ring `index` (called on each kick)."""
        drain(vq, lambda chain: self.handle_chain(index, vq, chain))

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> Any:
        """Serve one chain and return how many bytes were written into its buffers; or
        `vq.defer(chain)` to complete it later; or an awaitable (an `async def` override)
        whose result is that byte count (see the module docstring)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Return to the pre-negotiation state, keeping owned resources."""
        self.acked_features = 0

    @property
    def prefers_asyncio(self) -> bool:
        """True when this device's requests run as coroutines (`handle_chain` is an `async
        def`): `vhostpy.serve` and the command line then serve it on an asyncio loop, in one
        thread. Elsewhere (a `vhostpy.Server` on its own loop) coroutines run on a companion
        asyncio thread, and a coroutine that writes guest memory itself should rather return
        a function that does (see `completion.Written`): it then runs on the ring's thread,
        and not at all once the ring stopped."""
        return inspect.iscoroutinefunction(type(self).handle_chain)

    # -- transport-level settings a device may accept ---------------------------------------
    #: True when `set_mtu` is implemented (vhost-user then offers the NET_MTU protocol feature).
    supports_mtu = False
    #: Whether a vhost-user front-end reads this device's config space from the back-end
    #: (GET_CONFIG: QEMU's vhost-user-blk does); False where the front-end builds its own
    #: (QEMU's virtio-net), so the CONFIG protocol feature is not offered to it.
    config_via_frontend = True

    def set_mtu(self, mtu: int) -> None:
        """The front-end tells the device the MTU the driver was given (virtio-net)."""
        raise UnsupportedError(f"{self.name} has no MTU")

    #: True when `announce` is implemented (vhost-user then offers the RARP protocol
    #: feature: SEND_RARP after a migration).
    supports_announce = False

    def announce(self, mac: bytes) -> None:
        """The guest with `mac` moved here (live migration) and cannot announce itself
        (no VIRTIO_NET_F_GUEST_ANNOUNCE): tell the network on its behalf (virtio-net)."""
        raise UnsupportedError(f"{self.name} cannot announce a MAC address")


def batches(vq: Virtqueue, size: int = BATCH) -> Iterator[list[DescriptorChain]]:
    """Yield the ring's available chains, `size` at a time, with kicks suppressed meanwhile.

    Stops when the ring is empty (or breaks). The race between the last pop and re-enabling
    kicks is closed by `enable_notifications()`, which reports buffers that arrived in
    between. While the runner polls the ring (`vq.polling`), kicks stay disabled. The
    caller publishes each batch's used entries before asking for the next.
    """
    while vq.ready:
        vq.disable_notifications()
        chains = vq.pop_many(size)
        if not chains:
            if not vq.ready or vq.polling or not vq.enable_notifications():
                return
            continue
        yield chains


def drain(vq: Virtqueue, handle: Callable[[DescriptorChain], Any]) -> int:
    """Serve every available chain with `handle(chain)`; returns how many were taken.

    `handle` returns the bytes written (the chain completes now), or what `handle_chain` may
    return to complete it later (`vq.later`). Used entries are published per batch of `BATCH`
    chains and the driver is signalled once per batch when it asked for it. The fast case,
    every result an int, costs one type check per chain.
    """
    served = 0
    for chains in batches(vq):
        done: list[tuple[int, int]] = []
        for chain in chains:
            result = handle(chain)
            if type(result) is int:
                done.append((chain.head, result))
                continue
            if done:   # older chains first (VIRTIO_F_IN_ORDER)
                vq.publish(done)
                done = []
            vq.later(chain, result)
        if done:
            vq.publish(done)
        vq.signal_used()
        served += len(chains)
    return served
