"""A write log (in the manner of dm-log-writes) and its replay: the disk at every flush.

`LoggedStore(store, path)` serves any block store and appends to the file at `path`, in the
order the requests complete, every write (with its data), write-zeroes, discard and flush,
plus the power cuts of a `writecache.WriteCache` below it (`record_cut`) and named marks
(`mark`). `Replay(path, image)` rebuilds, on a copy of the image as it was when logging
began, the disk as it stood at any flush: the writes logged before flush N are exactly what
the driver was promised was durable once flush N completed. `vhostpy replay` is the command
line over it.

Replay semantics: writes, write-zeroes and discards are held back until the next flush
record, then applied in order; a cut record drops the ones held back since the last flush
(they were in a volatile cache), and the cut's kept records (a torn prefix) are applied at
once, as are the requests the cache wrote back early because it was full (`E`, `X`
records, `record_write_back`). So after a cut the replayed image follows what the disk really
held.

File format (little-endian): a header `MAGIC`, u32 version (1), u32 sector size (512), u64
disk size; then records of a 24-byte head (1-byte kind, 3 zero bytes, u32 zero, u64
offset, u64 length) followed, for the kinds that carry data (write, kept, mark), by
`length` bytes. Kinds: `W` write, `Z` write-zeroes, `D` discard, `F` flush, `C` cut, `K`
kept at a cut, `E` a write the cache wrote back early, `X` zeroes (write-zeroes or discard)
it wrote back early, `M` mark (the data is its UTF-8 name). A log cut short (the process killed
mid-record) reads up to its last whole record (`LogReader.truncated`).

This module knows nothing about virtio.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from vhostpy.errors import ConfigurationError
from vhostpy.stores import FileStore, StoreLayer, settle, zero_range
from vhostpy.writecache import CutReport

__all__ = ["LogReader", "LoggedStore", "Record", "Replay", "replay"]

MAGIC = b"VHOSTPY-WRITELOG"
VERSION = 1
SECTOR = 512
HEADER = struct.Struct("<16sIIQ")
HEAD = struct.Struct("<c3xIQQ")
WRITE, ZEROES, DISCARD, FLUSH, CUT, KEPT, MARK = (b"W", b"Z", b"D", b"F", b"C", b"K", b"M")
EARLY, EARLY_ZEROES = b"E", b"X"
KINDS = {WRITE, ZEROES, DISCARD, FLUSH, CUT, KEPT, MARK, EARLY, EARLY_ZEROES}
_WITH_DATA = {WRITE, KEPT, MARK, EARLY}
#: Python's buffer for the log file; flushed to the file at every flush record and at close.
LOG_BUFFER = 1 << 20


class LoggedStore(StoreLayer):
    """`store` with every completed request appended to the write log at `path` (created or
    truncated; see the module docstring). ConfigurationError if it cannot be written."""

    def __init__(self, store: Any, path: str) -> None:
        super().__init__(store)
        self.path = path
        try:
            self._file: BinaryIO = open(path, "wb", buffering=LOG_BUFFER)  # noqa: SIM115
        except OSError as exc:
            raise ConfigurationError(f"--log-writes {path}: {exc.strerror or exc}") from None
        self._file.write(HEADER.pack(MAGIC, VERSION, SECTOR, self.size))
        self.records = 0
        self.flushes = 0
        self.bytes_logged = HEADER.size

    async def read(self, offset: int, length: int) -> Any:
        return await settle(self.store.read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        await settle(self.store.write(offset, data))
        self._append(WRITE, offset, len(data), data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await zero_range(self.store, offset, length)
        self._append(ZEROES, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        await settle(self.store.discard(offset, length))
        self._append(DISCARD, offset, length)

    async def flush(self) -> None:
        await settle(self.store.flush())
        self._append(FLUSH, 0, 0)
        self.flushes += 1
        self._file.flush()

    def record_cut(self, report: CutReport) -> None:
        """A power cut below: what was held back since the last flush is gone, `report.kept`
        reached the disk."""
        self._append(CUT, 0, 0)
        for offset, data in report.kept:
            self._append(KEPT, offset, len(data), data)
        self._file.flush()

    def record_write_back(self, kind: str, offset: int, length: int, data: bytes | None
                          ) -> None:
        """A `WriteCache` below wrote a cached request back before a flush (it was full):
        from now on it survives a power cut (`WriteCache.on_write_back` is this)."""
        if data is not None:
            self._append(EARLY, offset, length, data)
        else:
            self._append(EARLY_ZEROES, offset, length)

    def mark(self, name: str) -> None:
        """A named point in the log (`vhostpy replay --mark NAME`)."""
        data = name.encode()
        self._append(MARK, 0, len(data), data)
        self._file.flush()

    def counters(self) -> dict[str, object]:
        return {"path": self.path, "records": self.records, "flushes": self.flushes,
                "bytes": self.bytes_logged}

    def close(self) -> None:
        """Finish the log and close the store (its `close()`, if any); idempotent."""
        if not self._file.closed:
            self._file.close()
        super().close()

    def _append(self, kind: bytes, offset: int, length: int, data: bytes = b"") -> None:
        self._file.write(HEAD.pack(kind, 0, offset, length))
        if data:
            self._file.write(data)
        self.records += 1
        self.bytes_logged += HEAD.size + len(data)


@dataclass(frozen=True)
class Record:
    """One log record: `kind` (one byte), `offset`, `length`, and where its data starts in
    the file (`data_at`; meaningful for the kinds with data)."""

    number: int
    kind: bytes
    offset: int
    length: int
    data_at: int


class LogReader:
    """Reads a write log: `size` (of the disk), `records()`, `data(record)`. A file that is
    not a write log is a ConfigurationError; a truncated tail ends `records()` early and sets
    `truncated`."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise ConfigurationError(f"{path}: {exc.strerror or exc}") from None
        head = self._file.read(HEADER.size)
        if len(head) < HEADER.size or head[:len(MAGIC)] != MAGIC:
            self._file.close()
            raise ConfigurationError(f"{path} is not a vhostpy write log")
        _, version, sector, self.size = HEADER.unpack(head)
        if version != VERSION or sector != SECTOR:
            self._file.close()
            raise ConfigurationError(f"{path}: write log version {version}, sector {sector}: "
                                     f"this vhostpy reads version {VERSION}, sector {SECTOR}")
        self.file_size = os.fstat(self._file.fileno()).st_size
        self.truncated = False

    def records(self) -> Iterator[Record]:
        """Every whole record, in order."""
        at, number = HEADER.size, 0
        while at + HEAD.size <= self.file_size:
            self._file.seek(at)
            kind, _, offset, length = HEAD.unpack(self._file.read(HEAD.size))
            size = length if kind in _WITH_DATA else 0
            if kind not in KINDS or \
                    at + HEAD.size + size > self.file_size or offset + (
                        length if kind != MARK else 0) > self.size:
                self.truncated = True   # torn or damaged from here on: stop reading
                return
            number += 1
            yield Record(number, kind, offset, length, at + HEAD.size)
            at += HEAD.size + size
        self.truncated = at != self.file_size

    def data(self, record: Record) -> bytes:
        """The data a write, kept or mark record carries."""
        self._file.seek(record.data_at)
        return self._file.read(record.length)

    def close(self) -> None:
        self._file.close()

    def summary(self) -> dict[str, object]:
        """What the log holds: counts by kind, the flush points (the record number of each
        flush), the marks (name and the flush count before them), and whether it is cut
        short."""
        counts = {"writes": 0, "zeroes": 0, "discards": 0, "flushes": 0, "cuts": 0}
        names = {WRITE: "writes", ZEROES: "zeroes", DISCARD: "discards", FLUSH: "flushes",
                 CUT: "cuts"}
        flush_records: list[int] = []
        marks: list[dict[str, object]] = []
        for record in self.records():
            if record.kind in names:
                counts[names[record.kind]] += 1
            if record.kind == FLUSH:
                flush_records.append(record.number)
            elif record.kind == MARK:
                marks.append({"mark": self.data(record).decode(errors="replace"),
                              "after_flush": counts["flushes"]})
        return {"size": self.size, **counts, "flush_records": flush_records, "marks": marks,
                "truncated": self.truncated}


class Replay:
    """Rebuilds the disk of a write log on `image` (a raw image of the logged disk's size,
    as it was when logging began; it is changed in place), one flush at a time.

    `step()` applies the log up to the next flush point and returns its number (1 for the
    first flush), or None at the end of the log; `to_flush(n)` steps until flush n;
    `to_mark(name)` applies everything the driver had been promised at that mark (the log
    up to the last flush before it). ConfigurationError for an image of another size."""

    def __init__(self, log_path: str, image: str) -> None:
        self.log = LogReader(log_path)
        try:
            self.store = FileStore.open(image, image_format="raw")
        except BaseException:
            self.log.close()
            raise
        if self.store.size != self.log.size:
            self.close()
            raise ConfigurationError(f"{image} holds {self.store.size} bytes; the logged "
                                     f"disk had {self.log.size}")
        self._records = self.log.records()
        self._held: list[Record] = []
        self.flush = 0
        self.applied = 0
        self.dropped = 0

    def step(self) -> int | None:
        """Apply up to the next flush; its number, or None when the log has no more."""
        return self._advance(None)

    def _advance(self, mark: str | None) -> int | None:
        """Read records up to the next flush (applied: its number) or, when `mark` is given,
        up to that mark (returns the current flush number, nothing held back applied);
        None at the end of the log."""
        for record in self._records:
            kind = record.kind
            if kind in (WRITE, ZEROES, DISCARD):
                self._held.append(record)
            elif kind == FLUSH:
                for held in self._held:
                    self._apply(held)
                self._held.clear()
                self.flush += 1
                return self.flush
            elif kind == CUT:
                self.dropped += len(self._held)
                self._held.clear()
            elif kind in (KEPT, EARLY, EARLY_ZEROES):
                self._apply(record)
            elif kind == MARK and self.log.data(record).decode(errors="replace") == mark:
                return self.flush
        return None

    def to_flush(self, number: int) -> None:
        """Step until flush `number` is applied; ConfigurationError if the log has fewer."""
        while self.flush < number:
            if self.step() is None:
                raise ConfigurationError(f"{self.log.path} has {self.flush} flush points, "
                                         f"not {number}")

    def to_mark(self, name: str) -> None:
        """Read up to the first mark `name`: the image is then the disk as it stood there
        (the last flush before it, and what had reached the disk early since).
        ConfigurationError if there is no such mark (after it)."""
        while True:
            before = self.flush
            found = self._advance(name)
            if found is None:
                raise ConfigurationError(f"{self.log.path} has no mark {name!r}")
            if found == before:
                return

    def close(self) -> None:
        self.store.flush()
        self.store.close()
        self.log.close()

    def _apply(self, record: Record) -> None:
        if record.kind in (WRITE, KEPT, EARLY):
            self.store.write(record.offset, self.log.data(record))
        else:   # write-zeroes, and a discard (which reads as zeros on a replayed image)
            self.store.write_zeroes(record.offset, record.length)
        self.applied += 1


def replay(log_path: str, image: str, *, flush: int | None = None,
           mark: str | None = None) -> dict[str, object]:
    """Rebuild `image` (see `Replay`) at flush `flush`, at `mark`, or (neither) as the end
    of the log left the disk (its last flush, and what reached the disk after it: early
    write-backs, a cut's kept prefix); returns what was done."""
    run = Replay(log_path, image)
    try:
        if flush is not None:
            run.to_flush(flush)
        elif mark is not None:
            run.to_mark(mark)
        else:
            while run.step() is not None:
                pass
        return {"flush": run.flush, "applied": run.applied, "dropped_at_cuts": run.dropped,
                "truncated_log": run.log.truncated}
    finally:
        run.close()
