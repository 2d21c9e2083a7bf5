"""A volatile write-back cache in front of any block store, and the power cut that empties it.

`WriteCache(store)` acknowledges writes at once and keeps them in memory; a FLUSH writes them
to `store` (in the order they came) and then flushes `store`. Until then they are what a
disk's volatile cache holds: reads see them, a power loss loses them. `power_cut()` is that
loss: every write since the last completed FLUSH is dropped, and every request fails
(`OSError(EIO)`) until `device_reset()` (the driver resets or re-initialises the device:
what a guest does after a power loss, or a reboot). With `torn=True`, the cut lands inside a
multi-sector write: one cached write of two or more sectors keeps a prefix of its sectors
(chosen at random: at least one sector, not all), as a disk that loses power in the middle
of writing it back would. What the store holds after a cut is what a power loss would leave.
The cache is finite (`limit`): when it fills, its oldest requests go to the store early, and
survive a cut, as on a real disk.

Discards and write-zeroes are cached like writes (reads see zeros) and go to the store as
what they are when flushed (a discard's range then reads as the store's discard leaves it). Offsets and lengths are whole 512-byte sectors, as virtio-blk
sends them. Every method is a coroutine (the store's methods may be async); nothing here
blocks or sleeps. A cut report says what was lost: {"dropped_writes", "dropped_bytes",
"torn": None or {"offset", "sectors", "kept_sectors"}, "kept": [(offset, data), ...]} (the
data that reached the store at the cut; `writelog` records it so a replay stays exact).
This module knows nothing about virtio.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vhostpy.stores import StoreLayer, settle, zero_range

__all__ = ["DEFAULT_LIMIT", "CutReport", "WriteBack", "WriteCache"]

SECTOR = 512
WRITE, ZEROES, DISCARD = "write", "write_zeroes", "discard"


@dataclass
class _Cached:
    """One cached request: `data` for a write, None for zeros (write-zeroes, discard)."""

    seq: int
    kind: str
    offset: int
    length: int
    data: bytes | None


@dataclass
class CutReport:
    """What a power cut did (see the module docstring)."""

    dropped_writes: int
    dropped_bytes: int
    torn: dict[str, int] | None
    kept: list[tuple[int, bytes]]

    def as_dict(self) -> dict[str, object]:
        """For the control socket: everything but the kept data itself."""
        return {"dropped_writes": self.dropped_writes, "dropped_bytes": self.dropped_bytes,
                "torn": self.torn}


#: What the cache holds at most (bytes of written data) before it writes the oldest back.
DEFAULT_LIMIT = 64 << 20

#: Told about every cached request that reaches the store before a flush (the cache was
#: full): (kind: "write", "write_zeroes" or "discard", offset, length, data or None).
WriteBack = Callable[[str, int, int, "bytes | None"], None]


class WriteCache(StoreLayer):
    """`store` behind a volatile write-back cache (see the module docstring).

    The cache is finite, like a disk's: once its requests cover more than `limit` bytes
    (zeroed ranges included), the oldest are written back to the store (without a flush of
    the store) until they cover half that, and a request larger than `limit` goes to the
    store at once, after everything cached; those survive a power cut, as on a disk whose
    cache filled up. `on_write_back` (settable) hears each of them (a write log records
    them, so its replay stays exact). `seed` makes the torn cuts reproducible. Counters:
    `cached_writes`/`cached_bytes` (now in the cache), `flushes`, `written_back` (requests
    written back early), `cuts`, `dropped_writes`/`dropped_bytes` (lost to cuts so far),
    `refused` (requests failed while the power was off)."""

    def __init__(self, store: Any, *, limit: int = DEFAULT_LIMIT, seed: int | None = None,
                 on_write_back: WriteBack | None = None) -> None:
        if limit < SECTOR:
            raise ValueError(f"write cache limit {limit} is less than a sector")
        self.limit = limit
        self.on_write_back = on_write_back
        super().__init__(store)
        self._random = random.Random(seed)
        self._entries: collections.deque[_Cached] = collections.deque()   # oldest first
        self._tracked = 0        # sectors the cached requests cover (what `limit` bounds)
        self._sectors: dict[int, tuple[int, bytes | None]] = {}   # sector -> (seq, data)
        self._seq = 0
        self._epoch = 0          # bumped by every cut: a destage from before it stops
        self._flushing = asyncio.Lock()
        self.powered = True
        self.flushes = 0
        self.written_back = 0
        self.cuts = 0
        self.dropped_writes = 0
        self.dropped_bytes = 0
        self.refused = 0

    # -- the store interface ----------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        first = offset // SECTOR
        if not any(first + k in self._sectors for k in range(length // SECTOR)):
            return bytes(await settle(self.store.read(offset, length)))
        data = bytearray(await settle(self.store.read(offset, length)))
        self._check(offset, length)      # the power may have gone while the store read
        for k in range(length // SECTOR):
            cached = self._sectors.get(first + k)
            if cached is not None:
                sector = cached[1]
                data[k * SECTOR:(k + 1) * SECTOR] = sector if sector is not None \
                    else bytes(SECTOR)
        return bytes(data)

    async def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        await self._admit(WRITE, offset, len(data), bytes(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self._admit(ZEROES, offset, length, None)

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self._admit(DISCARD, offset, length, None)

    async def flush(self) -> None:
        """Write every cached request to the store, oldest first (requests cached while
        this runs too), then flush the store. A cut meanwhile fails it with EIO."""
        self._check(0, 0)
        async with self._flushing:    # one destage at a time: each entry lands once
            await self._flush()

    async def _flush(self) -> None:
        epoch = self._epoch
        while self._entries:
            await self._destage_oldest(epoch)
        await settle(self.store.flush())
        if epoch != self._epoch:
            raise _power_off()
        self.flushes += 1

    async def _admit(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        """Cache a request; when the cache is over its limit, write the oldest back until
        it is half full. A request larger than the whole cache goes to the store at once,
        after everything cached (so nothing older lands on top of it)."""
        room = self.limit // SECTOR
        if length // SECTOR > room:
            async with self._flushing:
                epoch = self._epoch
                while self._entries:
                    await self._write_back(epoch)
                await self._destage(_Cached(0, kind, offset, length, data))
                if epoch != self._epoch:
                    raise _power_off()
                self._wrote_back(kind, offset, length, data)
            return
        self._cache(kind, offset, length, data)
        if self._tracked > room:
            async with self._flushing:
                epoch = self._epoch
                while self._entries and self._tracked > room // 2:
                    await self._write_back(epoch)

    async def _write_back(self, epoch: int) -> None:
        """Write the oldest cached request back early (the cache is full)."""
        entry = await self._destage_oldest(epoch)
        self._wrote_back(entry.kind, entry.offset, entry.length, entry.data)

    def _wrote_back(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        self.written_back += 1
        if self.on_write_back is not None:
            self.on_write_back(kind, offset, length, data)

    async def _destage_oldest(self, epoch: int) -> _Cached:
        """Write the oldest cached request to the store and forget it; EIO if the power
        was cut meanwhile (it then stays for the cut to drop)."""
        entry = self._entries[0]
        await self._destage(entry)
        if epoch != self._epoch:
            raise _power_off()
        self._entries.popleft()
        self._forget(entry)
        return entry

    # -- power ------------------------------------------------------------------------------
    def power_cut(self, *, torn: bool = False) -> CutReport:
        """Lose the cache (see the module docstring); requests fail until `device_reset`.
        Synchronous: when it returns, the store holds what survives (a torn prefix, written
        with the store's synchronous `write`; an async store gets it as a task)."""
        kept: list[tuple[int, bytes]] = []
        torn_info: dict[str, int] | None = None
        if torn:
            candidates = [e for e in self._entries
                          if e.kind == WRITE and e.length >= 2 * SECTOR]
            if candidates:
                victim = self._random.choice(candidates)
                sectors = victim.length // SECTOR
                keep = self._random.randint(1, sectors - 1)
                assert victim.data is not None
                kept.append((victim.offset, victim.data[:keep * SECTOR]))
                torn_info = {"offset": victim.offset, "sectors": sectors,
                             "kept_sectors": keep}
        report = CutReport(len(self._entries), sum(e.length for e in self._entries),
                           torn_info, kept)
        for offset, data in kept:
            _run_now(self.store.write(offset, data))
        self._entries.clear()
        self._sectors.clear()
        self._tracked = 0
        self._epoch += 1
        self.powered = False
        self.cuts += 1
        self.dropped_writes += report.dropped_writes
        self.dropped_bytes += report.dropped_bytes
        return report

    def device_reset(self) -> None:
        """The driver reset or re-initialised the device: the power is back (an empty
        cache); a no-op while the power is on."""
        self.powered = True
        super().device_reset()

    def counters(self) -> dict[str, object]:
        """The cache now and what it did so far."""
        return {"powered": self.powered, "cached_writes": len(self._entries),
                "cached_bytes": sum(e.length for e in self._entries),
                "flushes": self.flushes, "written_back": self.written_back,
                "cuts": self.cuts,
                "dropped_writes": self.dropped_writes, "dropped_bytes": self.dropped_bytes,
                "refused": self.refused}

    def close(self) -> None:
        """Close the store (its `close()`, if any); whatever is cached is lost, like a disk
        switched off without a flush."""
        super().close()

    # -- the cache --------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if not self.powered:
            self.refused += 1
            raise _power_off()
        if offset % SECTOR or length % SECTOR:
            raise OSError(errno.EINVAL, f"write cache: offset {offset} and length {length} "
                          "must be whole 512-byte sectors")

    def _cache(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        self._seq += 1
        self._entries.append(_Cached(self._seq, kind, offset, length, data))
        self._tracked += length // SECTOR
        first = offset // SECTOR
        for k in range(length // SECTOR):
            self._sectors[first + k] = (self._seq, None if data is None
                                        else data[k * SECTOR:(k + 1) * SECTOR])

    def _forget(self, entry: _Cached) -> None:
        """`entry` reached the store: reads of its sectors go there, unless a newer cached
        request covers them."""
        self._tracked -= entry.length // SECTOR
        first = entry.offset // SECTOR
        for k in range(entry.length // SECTOR):
            cached = self._sectors.get(first + k)
            if cached is not None and cached[0] == entry.seq:
                del self._sectors[first + k]

    async def _destage(self, entry: _Cached) -> None:
        if entry.kind == WRITE:
            assert entry.data is not None
            await settle(self.store.write(entry.offset, entry.data))
        elif entry.kind == DISCARD:
            await settle(self.store.discard(entry.offset, entry.length))
        else:
            await zero_range(self.store, entry.offset, entry.length)


def _power_off() -> OSError:
    return OSError(errno.EIO, "the power is cut: I/O fails until the device is reset")


def _run_now(value: Any) -> None:
    """Let a store call that returned an awaitable run on (the caller cannot wait)."""
    if inspect.iscoroutine(value):
        asyncio.ensure_future(value)
