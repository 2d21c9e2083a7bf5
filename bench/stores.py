"""Block stores for the block benchmark (`bench/blk.py`'s vhostpy-memory and vhostpy-async
back-ends): the Python store path measured without a disk behind it.

`memory_store()` is `vhostpy.stores.MemoryStore`; `async_store()` is the same bytes behind
`async def` methods that complete at once (the async machinery's own cost: a coroutine per
request on the companion asyncio loop, completions handed back to the ring's thread). Their
size is `VHOSTPY_BENCH_STORE_MB` MiB (bench/blk.py sets it to the image size).
"""

from __future__ import annotations

import os

from vhostpy.stores import MemoryStore


def _size() -> int:
    return int(os.environ.get("VHOSTPY_BENCH_STORE_MB", "256")) << 20


class AsyncMemoryStore:
    """A MemoryStore whose methods are coroutines."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.inner = MemoryStore(size)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.inner.read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        self.inner.write(offset, data)

    async def flush(self) -> None:
        """Nothing to make durable."""


def memory_store() -> MemoryStore:
    return MemoryStore(_size())


def async_store() -> AsyncMemoryStore:
    return AsyncMemoryStore(_size())
