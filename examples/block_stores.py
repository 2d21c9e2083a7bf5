"""Block storage written in Python: stores for `vhostpy blk --store` and a disk for `vhostpy serve`.

A store is any object with `size`, `read`, `write` and `flush` (see `vhostpy.stores`); the
virtio-blk device around it checks every request, fills guest memory and reports errors.

* `DictStore`: a sparse disk in a dict of 4 KiB blocks, all synchronous;
* `SlowStore`: the same disk behind an `async def` interface that waits a random while on
  every request, as a disk on the network would: requests overlap and complete out of
  order. At `close()` it prints how many finished before an older one;
* `make_device()`: a whole `BlockDevice` over a `MemoryStore`, for `vhostpy serve`.

Serve them with::

    vhostpy blk --store examples.block_stores:dict_store --socket-path /tmp/blk.sock
    vhostpy blk --store examples.block_stores:slow_store --socket-path /tmp/blk.sock
    vhostpy serve examples.block_stores:make_device --socket-path /tmp/blk.sock
    python examples/block_stores.py /tmp/blk.sock      # vhostpy.serve() from a script

and attach the socket to QEMU with ``-chardev socket,id=blk0,path=/tmp/blk.sock
-device vhost-user-blk-pci,chardev=blk0``.
"""

from __future__ import annotations

import asyncio
import random
import sys

from vhostpy.blk import BlockDevice
from vhostpy.stores import MemoryStore

SIZE = 64 << 20
BLOCK = 4096


class DictStore:
    """A sparse disk: only blocks ever written take memory."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.blocks: dict[int, bytearray] = {}

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        at = offset
        while at < offset + length:
            block, skip = divmod(at, BLOCK)
            n = min(BLOCK - skip, offset + length - at)
            data = self.blocks.get(block)
            if data is not None:
                out[at - offset:at - offset + n] = data[skip:skip + n]
            at += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            block, skip = divmod(offset + at, BLOCK)
            n = min(BLOCK - skip, len(view) - at)
            stored = self.blocks.setdefault(block, bytearray(BLOCK))
            stored[skip:skip + n] = view[at:at + n]
            at += n

    def flush(self) -> None:
        """Nothing to make durable: the disk lives as long as the process."""


class SlowStore:
    """`DictStore` behind a network-like delay: each request waits 0 to `delay` seconds."""

    def __init__(self, size: int = SIZE, delay: float = 0.002) -> None:
        self.size = size
        self.disk = DictStore(size)
        self.delay = delay
        self.requests = 0
        self.overtaken = 0          # requests that finished while an older one was waiting
        self.most_in_flight = 0
        self._waiting: set[int] = set()

    async def _wait(self) -> int:
        self.requests += 1
        ticket = self.requests
        self._waiting.add(ticket)
        self.most_in_flight = max(self.most_in_flight, len(self._waiting))
        await asyncio.sleep(random.uniform(0, self.delay))
        self._waiting.discard(ticket)
        if self._waiting and min(self._waiting) < ticket:
            self.overtaken += 1
        return ticket

    async def read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return self.disk.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._wait()
        self.disk.write(offset, data)

    async def flush(self) -> None:
        await self._wait()

    def close(self) -> None:
        print(f"SlowStore: {self.requests} requests, {self.overtaken} finished before an "
              f"older one, at most {self.most_in_flight} in flight", file=sys.stderr,
              flush=True)


def dict_store() -> DictStore:
    return DictStore()


def slow_store() -> SlowStore:
    return SlowStore()


def make_device() -> BlockDevice:
    return BlockDevice(MemoryStore(SIZE), serial="VHOSTPY-SDK")


if __name__ == "__main__":
    import vhostpy

    store = SlowStore()
    device = BlockDevice(store, serial="VHOSTPY-SCRIPT")
    try:
        vhostpy.serve(device, socket_path=sys.argv[1])
    finally:
        device.close()
