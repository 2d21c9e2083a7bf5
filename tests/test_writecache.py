"""The volatile write cache (`vhostpy.writecache.WriteCache`): what reads see, what a flush
makes durable, what a power cut loses (and a torn one keeps), and that nothing works between
a cut and the device reset. A random workload is checked against a model of a disk."""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest

from vhostpy.stores import MemoryStore
from vhostpy.writecache import WriteCache

SECTOR = 512
SIZE = 64 * SECTOR


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sectors(fill: int, count: int = 1) -> bytes:
    return bytes([fill]) * (SECTOR * count)


def test_writes_are_read_back_but_durable_only_after_flush() -> None:
    inner = MemoryStore(SIZE)
    cache = WriteCache(inner)

    async def go() -> None:
        await cache.write(2 * SECTOR, sectors(0xAA, 2))
        assert await cache.read(0, 4 * SECTOR) == bytes(2 * SECTOR) + sectors(0xAA, 2)
        assert inner.read(2 * SECTOR, 2 * SECTOR) == bytes(2 * SECTOR)   # not yet durable
        await cache.write(3 * SECTOR, sectors(0xBB))                     # newer, overlapping
        await cache.write_zeroes(5 * SECTOR, SECTOR)
        await cache.flush()
    inner.write(5 * SECTOR, sectors(0x11))
    run(go())
    assert inner.read(2 * SECTOR, 4 * SECTOR) == sectors(0xAA) + sectors(0xBB) + \
        bytes(SECTOR) * 2
    assert cache.counters()["cached_writes"] == 0 and cache.flushes == 1


def test_power_cut_loses_what_was_not_flushed_and_fails_io_until_reset() -> None:
    inner = MemoryStore(SIZE)
    cache = WriteCache(inner)

    async def before() -> None:
        await cache.write(0, sectors(1))
        await cache.flush()
        await cache.write(0, sectors(2))
        await cache.write(SECTOR, sectors(3, 3))
    run(before())
    report = cache.power_cut()
    assert (report.dropped_writes, report.dropped_bytes, report.torn) == (2, 4 * SECTOR, None)
    assert inner.read(0, 4 * SECTOR) == sectors(1) + bytes(3 * SECTOR)
    for call in (cache.read(0, SECTOR), cache.write(0, sectors(9)), cache.flush(),
                 cache.write_zeroes(0, SECTOR), cache.discard(0, SECTOR)):
        with pytest.raises(OSError) as info:
            run(call)
        assert info.value.errno == errno.EIO
    assert cache.counters()["refused"] == 5 and not cache.powered
    cache.device_reset()
    assert run(cache.read(0, 2 * SECTOR)) == sectors(1) + bytes(SECTOR)
    assert cache.counters()["dropped_writes"] == 2


def test_a_torn_cut_keeps_a_prefix_of_one_multi_sector_write() -> None:
    for seed in range(20):
        inner = MemoryStore(SIZE)
        cache = WriteCache(inner, seed=seed)
        run(cache.write(0, sectors(0x55)))             # one sector: never torn
        run(cache.write(8 * SECTOR, sectors(0x77, 6)))
        report = cache.power_cut(torn=True)
        assert report.torn is not None and report.torn["offset"] == 8 * SECTOR
        keep = report.torn["kept_sectors"]
        assert report.torn["sectors"] == 6 and 1 <= keep <= 5
        assert inner.read(0, SECTOR) == bytes(SECTOR)
        assert inner.read(8 * SECTOR, 6 * SECTOR) == sectors(0x77, keep) + \
            bytes((6 - keep) * SECTOR)
        assert report.kept == [(8 * SECTOR, sectors(0x77, keep))]


def test_a_torn_cut_with_no_multi_sector_write_tears_nothing() -> None:
    cache = WriteCache(MemoryStore(SIZE))
    run(cache.write(0, sectors(1)))
    report = cache.power_cut(torn=True)
    assert report.torn is None and report.kept == [] and report.dropped_writes == 1


def test_concurrent_flushes_destage_each_write_once_in_order() -> None:
    class Slow(MemoryStore):
        def __init__(self) -> None:
            super().__init__(SIZE)
            self.writes: list[int] = []

        async def write(self, offset: int, data: Any) -> None:   # type: ignore[override]
            await asyncio.sleep(0.001)
            self.writes.append(offset)
            MemoryStore.write(self, offset, data)

    inner = Slow()
    cache = WriteCache(inner)

    async def go() -> None:
        for k in range(6):
            await cache.write(k * SECTOR, sectors(k + 1))
        await asyncio.gather(cache.flush(), cache.flush(), cache.flush())
    run(go())
    assert inner.writes == [k * SECTOR for k in range(6)]
    assert inner.read(0, 6 * SECTOR) == b"".join(sectors(k + 1) for k in range(6))


def test_a_cut_during_a_slow_flush_fails_that_flush() -> None:
    class Slow(MemoryStore):
        async def write(self, offset: int, data: Any) -> None:   # type: ignore[override]
            await asyncio.sleep(0.01)
            MemoryStore.write(self, offset, data)

    inner = Slow(SIZE)
    cache = WriteCache(inner)

    async def go() -> None:
        await cache.write(0, sectors(1))
        await cache.write(SECTOR, sectors(2))
        flushing = asyncio.ensure_future(cache.flush())
        await asyncio.sleep(0.015)           # the first write landed, the second is on its way
        cache.power_cut()
        with pytest.raises(OSError):
            await flushing
    run(go())
    assert inner.read(0, SECTOR) == sectors(1)


def test_a_full_cache_writes_its_oldest_back_and_those_survive_a_cut() -> None:
    inner = MemoryStore(SIZE)
    heard: list[tuple[str, int, int, bytes | None]] = []
    cache = WriteCache(inner, limit=8 * SECTOR, on_write_back=lambda *a: heard.append(a))

    async def go() -> None:
        for k in range(8):                               # exactly full: nothing written back
            await cache.write(k * SECTOR, sectors(k + 1))
        assert heard == [] and inner.read(0, SECTOR) == bytes(SECTOR)
        await cache.write_zeroes(8 * SECTOR, SECTOR)      # one sector over: down to half
        assert [(kind, at) for kind, at, _, _ in heard] == [("write", k * SECTOR)
                                                            for k in range(5)]
        assert inner.read(0, 5 * SECTOR) == b"".join(sectors(k + 1) for k in range(5))
        await cache.write(0, sectors(0xEE))              # newer than the written-back one
        assert await cache.read(0, SECTOR) == sectors(0xEE)
    run(go())
    report = cache.power_cut()
    assert report.dropped_writes == 5 and cache.written_back == 5
    assert inner.read(0, 8 * SECTOR) == b"".join(sectors(k + 1) for k in range(5)) + \
        bytes(3 * SECTOR)


def test_a_request_larger_than_the_cache_goes_through_after_older_ones() -> None:
    inner = MemoryStore(SIZE)
    inner.write(0, sectors(0x11, 16))
    heard: list[tuple[str, int, int, bytes | None]] = []
    cache = WriteCache(inner, limit=4 * SECTOR, on_write_back=lambda *a: heard.append(a))

    async def go() -> None:
        await cache.write(2 * SECTOR, sectors(0x22))      # older, inside the big range
        await cache.write_zeroes(0, 16 * SECTOR)          # larger than the whole cache
    run(go())
    assert heard == [("write", 2 * SECTOR, SECTOR, sectors(0x22)),
                     ("write_zeroes", 0, 16 * SECTOR, None)]
    assert inner.read(0, 16 * SECTOR) == bytes(16 * SECTOR)   # the zeros landed last
    assert cache.power_cut().dropped_writes == 0


def test_unaligned_requests_are_refused() -> None:
    cache = WriteCache(MemoryStore(SIZE))
    with pytest.raises(OSError, match="whole 512-byte sectors"):
        run(cache.write(100, b"x" * SECTOR))


def test_random_workload_matches_a_model_disk() -> None:
    """Random writes, zeroes, discards, flushes, reads and cuts (some torn) through a small
    cache: reads always see the newest data; after every cut the store holds exactly the
    flushed data, plus what the full cache wrote back early (in order) and the torn prefix
    the report names."""
    rng = random.Random(7)
    inner = MemoryStore(SIZE)
    durable = bytearray(SIZE)           # what the store must hold after a cut
    visible = bytearray(SIZE)           # what reads must return
    written_back: list[tuple[int, bytes]] = []

    def wrote_back(kind: str, offset: int, length: int, data: bytes | None) -> None:
        written_back.append((offset, data if data is not None else bytes(length)))
    cache = WriteCache(inner, seed=3, limit=24 * SECTOR, on_write_back=wrote_back)

    async def go() -> None:
        nonlocal durable, visible
        for _ in range(3000):
            op = rng.random()
            first = rng.randrange(SIZE // SECTOR)
            count = rng.randint(1, min(8, SIZE // SECTOR - first))
            at, n = first * SECTOR, count * SECTOR
            if op < 0.45:
                data = rng.randbytes(n)
                await cache.write(at, data)
                visible[at:at + n] = data
            elif op < 0.52:
                await (cache.write_zeroes(at, n) if op < 0.49 else cache.discard(at, n))
                visible[at:at + n] = bytes(n)
            elif op < 0.62:
                await cache.flush()
                durable = bytearray(visible)
                written_back.clear()
            elif op < 0.97:
                assert await cache.read(at, n) == visible[at:at + n]
            else:
                for offset, data in written_back:
                    durable[offset:offset + len(data)] = data
                written_back.clear()
                report = cache.power_cut(torn=rng.random() < 0.5)
                for offset, data in report.kept:
                    durable[offset:offset + len(data)] = data
                assert inner.read(0, SIZE) == durable
                cache.device_reset()
                visible = bytearray(durable)
        assert cache.cuts > 10 and cache.written_back > 50
    run(go())
