"""virtio-rng, the entropy device (virtio 1.2, section 5.4).

`RngDevice` has one queue, the requestq. The driver posts device-writable buffers; the device
fills each with random bytes and returns it with the number of bytes written. The bytes come
from `os.urandom` (getrandom(2): never blocks once the host pool is initialised, unlike
/dev/random on entropy-starved TCG hosts) or from any `source(n) -> bytes` the user passes.

Guests choose buffer sizes, so every request is capped at `max_bytes_per_request`: a longer
buffer is partially filled and the used length says how much (the Linux driver asks again).
A chain with nothing writable is returned at once with length 0 and counted, and so is a
request whose source failed, so no chain is ever lost. There is no config space and no
device feature bit.

This module never imports the vhost-user layers and never does I/O beyond calling its source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from vhostpy.device import VIRTIO_ID_RNG, Device
from vhostpy.errors import ConfigurationError
from vhostpy.virtqueue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

#: Bytes a single request gets at most, unless the device is built with another limit.
DEFAULT_MAX_BYTES_PER_REQUEST = 64 * 1024
#: Largest accepted limit: one used length is 32 bits, and a source call allocates it all.
MAX_BYTES_PER_REQUEST_LIMIT = 1 << 30
DEFAULT_QUEUE_SIZE = 1024

RandomSource = Callable[[int], bytes]


@dataclass
class RngStats:
    """Request counters of one `RngDevice`."""

    requests: int = 0       # chains served (all of them, including the two kinds below)
    bytes: int = 0          # random bytes written into guest buffers
    empty: int = 0          # chains with no writable byte: returned with length 0
    truncated: int = 0      # chains longer than the limit: partially filled
    source_errors: int = 0  # the source raised or returned something that was not bytes


class RngDevice(Device):
    """A virtio-rng device filling each request from `source` (default `os.urandom`)."""

    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"
    num_queues = 1

    def __init__(self, *, source: RandomSource | None = None,
                 max_bytes_per_request: int = DEFAULT_MAX_BYTES_PER_REQUEST,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__()
        if not 1 <= max_bytes_per_request <= MAX_BYTES_PER_REQUEST_LIMIT:
            raise ConfigurationError(f"--max-bytes-per-request must be 1.."
                                     f"{MAX_BYTES_PER_REQUEST_LIMIT}, not "
                                     f"{max_bytes_per_request}")
        if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ConfigurationError(f"--queue-size must be a power of two in "
                                     f"1..{MAX_QUEUE_SIZE}, not {queue_size}")
        self.source: RandomSource = source if source is not None else os.urandom
        self.max_bytes_per_request = max_bytes_per_request
        self.max_queue_size = queue_size
        self.stats = RngStats()

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        stats = self.stats
        stats.requests += 1
        if chain.readable:
            # 5.4.6.1: the driver must not post device-readable buffers; they are ignored.
            log.debug("virtio-rng: request %d has %d device-readable bytes; ignored",
                      chain.head, chain.readable_len)
        want = min(chain.writable_len, self.max_bytes_per_request)
        if want == 0:
            stats.empty += 1
            log.debug("virtio-rng: request %d has no writable buffer", chain.head)
            return 0
        if want < chain.writable_len:
            stats.truncated += 1
        try:
            data = self.source(want)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"source returned {type(data).__name__}, not bytes")
        except Exception as exc:
            # A failing source must not lose the chain (the driver would wait forever).
            stats.source_errors += 1
            log.warning("virtio-rng: random source failed for %d bytes: %r", want, exc,
                        exc_info=True)
            return 0
        written = chain.write(memoryview(data)[:want])
        stats.bytes += written
        return written

    def counters(self) -> dict[str, int]:
        """The counters as a plain dictionary (for logs and JSON)."""
        return dict(vars(self.stats))
