"""Block faults on purpose: a store wrapper that fails or delays chosen requests.

`FaultyStore(store, faults)` serves any block store (see `stores`) and applies `BlockFault`
rules to each request before the store sees it:

* `ioerr,op=read|write|flush|any,sectors=A-B[,after=N][,count=N]`: the matching request
  fails (the guest gets VIRTIO_BLK_S_IOERR) and the store is not called, so nothing is
  written; `after=N` lets the first N matching requests through, `count=N` fails at most N;
* `delay,ms=N` or `delay,ms=A-B` (uniformly at random), with the same optional `op=`,
  `sectors=`, `after=`, `count=`: the request waits that long, then goes to the store.

`op=write` also matches DISCARD and WRITE_ZEROES; `sectors=A-B` (inclusive, 512-byte
sectors; `sectors=A` for one) matches a request that touches any of them; a FLUSH has no
sectors and matches only rules without `sectors=`. Rules are checked in order; the first
`ioerr` that matches wins, every matching `delay` adds up. Rules can be added and cleared
while the device runs (`add`, `clear`), and count what they did (`BlockFault.hits`).

Every method of a FaultyStore is a coroutine (delays must not block the loop), so a device
over it is served on an asyncio loop. This module knows nothing about virtio.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vhostpy.errors import ConfigurationError
from vhostpy.stores import StoreLayer, settle, zero_range

__all__ = ["BLOCK_OPS", "BlockFault", "FaultyStore"]

SECTOR = 512
#: What `op=` may name.
BLOCK_OPS = ("read", "write", "flush", "any")
KINDS = ("ioerr", "delay")
#: Longest delay a rule may ask for (ms): a minute, so a typo cannot hang a guest for a day.
MAX_DELAY_MS = 60_000


@dataclass
class BlockFault:
    """One fault rule (see the module docstring); `parse` builds one from its spec."""

    kind: str
    op: str = "any"
    first: int | None = None      # sectors=first-last (inclusive); None: every request
    last: int | None = None
    after: int = 0
    count: int | None = None
    ms: tuple[float, float] = (0.0, 0.0)
    seen: int = field(default=0, compare=False)   # matching requests so far
    hits: int = field(default=0, compare=False)   # requests this rule failed or delayed

    @classmethod
    def parse(cls, spec: str) -> BlockFault:
        """`ioerr,op=write,sectors=100-199` -> a rule; ConfigurationError naming `spec` and
        what is wrong with it."""
        kind, *options = [part.strip() for part in spec.split(",")]
        if kind not in KINDS:
            raise ConfigurationError(f"fault {spec!r}: unknown kind {kind!r} (one of "
                                     f"{', '.join(KINDS)})")
        fault = cls(kind)
        seen: set[str] = set()
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or not value:
                raise ConfigurationError(f"fault {spec!r}: {option!r} is not KEY=VALUE")
            if key in seen:
                raise ConfigurationError(f"fault {spec!r}: {key}= given twice")
            seen.add(key)
            fault._set(spec, key, value)
        if kind == "delay" and "ms" not in seen:
            raise ConfigurationError(f"fault {spec!r}: a delay needs ms=N or ms=A-B")
        if kind == "ioerr" and "ms" in seen:
            raise ConfigurationError(f"fault {spec!r}: ms= is for delay faults")
        return fault

    def _set(self, spec: str, key: str, value: str) -> None:
        if key == "op":
            if value not in BLOCK_OPS:
                raise ConfigurationError(f"fault {spec!r}: op={value} is not one of "
                                         f"{'|'.join(BLOCK_OPS)}")
            self.op = value
        elif key == "sectors":
            self.first, self.last = _range(spec, key, value, int)
        elif key == "ms":
            low, high = _range(spec, key, value, float)
            if high > MAX_DELAY_MS:
                raise ConfigurationError(f"fault {spec!r}: ms= at most {MAX_DELAY_MS}")
            self.ms = (low, high)
        elif key in ("after", "count"):
            number = _number(spec, key, value, int)
            if key == "after":
                self.after = number
            else:
                self.count = number
        else:
            raise ConfigurationError(f"fault {spec!r}: unknown option {key}= (op, sectors, "
                                     "after, count, ms)")

    def spec(self) -> str:
        """The rule written back as a spec (what `parse` reads)."""
        parts = [self.kind, f"op={self.op}"]
        if self.first is not None:
            parts.append(f"sectors={self.first}-{self.last}")
        if self.kind == "delay":
            low, high = self.ms
            parts.append(f"ms={low:g}" if low == high else f"ms={low:g}-{high:g}")
        if self.after:
            parts.append(f"after={self.after}")
        if self.count is not None:
            parts.append(f"count={self.count}")
        return ",".join(parts)

    def applies(self, op: str, offset: int, length: int) -> bool:
        """Whether this rule acts on a request (counting it: `after`, `count`)."""
        if self.op != "any" and self.op != op:
            return False
        if self.first is not None:
            if op == "flush":
                return False
            assert self.last is not None
            start, end = offset // SECTOR, (offset + max(length, 1) - 1) // SECTOR
            if end < self.first or start > self.last:
                return False
        self.seen += 1
        if self.seen <= self.after or (self.count is not None and self.hits >= self.count):
            return False
        self.hits += 1
        return True

    def as_dict(self) -> dict[str, object]:
        """For status and `fault list`: the spec and what the rule did."""
        return {"spec": self.spec(), "seen": self.seen, "hits": self.hits}


class FaultyStore(StoreLayer):
    """`store` with `faults` applied to its requests (see the module docstring)."""

    def __init__(self, store: Any, faults: Iterable[BlockFault] = ()) -> None:
        super().__init__(store)
        self.faults: list[BlockFault] = list(faults)
        self.errors = 0       # requests failed on purpose
        self.delays = 0       # requests delayed on purpose

    def add(self, fault: BlockFault) -> None:
        """Apply `fault` to the requests from now on (after the rules already there)."""
        self.faults.append(fault)

    def clear(self) -> None:
        """Drop every rule."""
        self.faults.clear()

    async def _gate(self, op: str, offset: int, length: int) -> None:
        """Apply the rules to one request: wait for its delays, raise for an ioerr."""
        wait = 0.0
        for fault in self.faults:
            if not fault.applies(op, offset, length):
                continue
            if fault.kind == "ioerr":
                self.errors += 1
                raise OSError(errno.EIO, f"injected fault {fault.spec()}")
            wait += random.uniform(*fault.ms) / 1000
        if wait:
            self.delays += 1
            await asyncio.sleep(wait)

    async def read(self, offset: int, length: int) -> Any:
        await self._gate("read", offset, length)
        return await settle(self.store.read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        await self._gate("write", offset, len(data))
        await settle(self.store.write(offset, data))

    async def flush(self) -> None:
        await self._gate("flush", 0, 0)
        await settle(self.store.flush())

    async def discard(self, offset: int, length: int) -> None:
        await self._gate("write", offset, length)
        await settle(self.store.discard(offset, length))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._gate("write", offset, length)
        await zero_range(self.store, offset, length)

    def counters(self) -> dict[str, object]:
        """What the faults did: requests failed and delayed, and each rule's counts."""
        return {"errors": self.errors, "delays": self.delays,
                "faults": [f.as_dict() for f in self.faults]}


def _number(spec: str, key: str, text: str, kind: type[int | float]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigurationError(f"fault {spec!r}: {key}={text} is not a number") from None
    if value < 0:
        raise ConfigurationError(f"fault {spec!r}: {key}={text} is negative")
    return value


def _range(spec: str, key: str, text: str, kind: type[int | float]) -> tuple[Any, Any]:
    """`A-B` or `A` as (A, B), A <= B."""
    low_text, dash, high_text = text.partition("-")
    low = _number(spec, key, low_text, kind)
    high = _number(spec, key, high_text, kind) if dash else low
    if high < low:
        raise ConfigurationError(f"fault {spec!r}: {key}={text} is an empty range")
    return low, high
