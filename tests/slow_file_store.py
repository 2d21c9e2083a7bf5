"""A block store for guest tests: a raw image behind `async def` methods that each wait a
random 0-4 ms first, so requests in flight complete out of order (what the inflight region
must recover from when the back-end dies). `vhostpy blk --store slow_file_store:from_env`
with this directory on PYTHONPATH serves the image named by $VHOSTPY_TEST_STORE_IMAGE."""

from __future__ import annotations

import asyncio
import os
import random

from vhostpy.stores import FileStore


class SlowFileStore:
    """`FileStore` semantics (positional I/O on the image), completions out of order."""

    def __init__(self, path: str, delay: float = 0.004) -> None:
        self.file = FileStore.open(path, share_rw=True)
        self.size = self.file.size
        self.delay = delay

    async def _wait(self) -> None:
        await asyncio.sleep(random.uniform(0, self.delay))

    async def read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return self.file.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._wait()
        self.file.write(offset, data)

    async def flush(self) -> None:
        await self._wait()
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def from_env() -> SlowFileStore:
    return SlowFileStore(os.environ["VHOSTPY_TEST_STORE_IMAGE"])
