"""A virtio-rng device written from scratch on vhostpy's public API.

Two variants of one device: `RandomDevice` answers each request at once; `AsyncRandomDevice`
awaits its bytes first (an `async def handle_chain`), as a device that asks a network
service or a hardware token would. Serve either one with the command line::

    vhostpy serve examples.rng_device:make_device --socket-path /tmp/rng.sock
    vhostpy serve examples.rng_device:make_async_device --socket-path /tmp/rng.sock

or run this file, which calls `vhostpy.serve` (add `--async` for the second variant)::

    python examples/rng_device.py /tmp/rng.sock

and attach it to QEMU with ``-chardev socket,id=rng0,path=/tmp/rng.sock
-device vhost-user-rng-pci,chardev=rng0``: the guest reads it from /dev/hwrng.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import vhostpy
from vhostpy.device import VIRTIO_ID_RNG, Device
from vhostpy.virtqueue import DescriptorChain, Virtqueue

#: The most one request gets: the guest chooses buffer sizes, the device chooses its limits.
MAX_BYTES_PER_REQUEST = 4096


class CountingRng(Device):
    """virtio-rng (device id 4): one queue of buffers the guest wants filled with random
    bytes. This base class counts; the two below fill."""

    device_id = VIRTIO_ID_RNG   # 4, what QEMU's vhost-user-rng-pci expects
    name = "example-rng"
    num_queues = 1              # the requestq

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.bytes = 0

    def fill(self, chain: DescriptorChain, data: bytes) -> int:
        """Write `data` into the chain's device-writable buffers; the bytes written."""
        written = chain.write(data)
        self.requests += 1
        self.bytes += written
        return written

    def counters(self) -> dict[str, int]:
        """Printed as JSON by `vhostpy serve` on exit and on SIGUSR1."""
        return {"requests": self.requests, "bytes": self.bytes}


class RandomDevice(CountingRng):
    """Answers each request at once."""

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers; return how many bytes were written."""
        size = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
        return self.fill(chain, os.urandom(size))


def make_device() -> RandomDevice:
    """For `vhostpy serve examples.rng_device:make_device`."""
    return RandomDevice()


class AsyncRandomDevice(CountingRng):
    """Gets its bytes from something it must wait for."""

    name = "example-rng-async"

    async def handle_chain(self, index: int, vq: Virtqueue,
                           chain: DescriptorChain) -> Callable[[], int]:
        data = await self.fetch(min(chain.writable_len, MAX_BYTES_PER_REQUEST))
        # Return the write instead of doing it here: vhostpy runs it on the ring's thread,
        # and skips it when the guest stopped the ring meanwhile, so guest memory is only
        # touched while it is mapped, whichever thread the coroutine ran on.
        return lambda: self.fill(chain, data)

    async def fetch(self, size: int) -> bytes:
        await asyncio.sleep(0.001)   # stands for a network call, a hardware token, ...
        return os.urandom(size)


def make_async_device() -> AsyncRandomDevice:
    """For `vhostpy serve examples.rng_device:make_async_device`."""
    return AsyncRandomDevice()


def main(argv: list[str]) -> int:
    """`python examples/rng_device.py SOCKET_PATH [--async]`."""
    if not argv or argv[1:] not in ([], ["--async"]):
        print("usage: python examples/rng_device.py SOCKET_PATH [--async]", file=sys.stderr)
        return 2
    device = make_async_device() if argv[1:] else make_device()
    vhostpy.serve(device, socket_path=argv[0])   # returns after SIGINT or SIGTERM
    print(f"served {device.requests} requests, {device.bytes} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
