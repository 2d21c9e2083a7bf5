"""Classic libpcap capture files: a writer for port taps and a minimal reader for tests.

Format (pcap(5) / draft-ietf-opsawg-pcap): a 24-byte global header (magic 0xa1b2c3d4 for
microsecond timestamps, version 2.4, thiszone, sigfigs, snaplen, linktype), then per frame a
16-byte record header (ts_sec, ts_usec, incl_len, orig_len) and `incl_len` captured bytes.
Files are written little-endian; readers detect byte order from the magic.

`PcapWriter` hands each `write()` / `write_many()` call's records to the OS in one
unbuffered `write(2)` (a file it opened has no Python-level buffer), so the file on disk is
always a complete capture between calls. A signal handler may call `close()` at any point,
even in the middle of a `write_many()` (Python runs handlers between bytecodes, never
inside one `write(2)` to a regular file): the records already written stay whole. A
buffered writer would make that handler fail with "reentrant call" instead.
This module does no other I/O and never imports the rest of vhostpy.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from typing import Self

__all__ = ["LINKTYPE_ETHERNET", "PcapWriter", "read_pcap"]

LINKTYPE_ETHERNET = 1
MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
VERSION = (2, 4)
DEFAULT_SNAPLEN = 262144  # tcpdump's default

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")

Frame = bytes | bytearray | memoryview
Buffer = Any  # anything with the buffer protocol (bytes, a cffi buffer)


class PcapWriter:
    """Write Ethernet frames to a classic pcap file (or an open binary file object).

    `path` is a file name (created or truncated, written unbuffered, closed by `close()`)
    or a writable binary file object (flushed after every call, left open by `close()`).
    Frames longer than `snaplen` are stored truncated with `orig_len` set to their real
    length. `ts` is seconds since the epoch (float, microsecond resolution); None means
    now. Counters: `frames` written, `bytes` of frame data seen (original lengths),
    `truncated` frames.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
    ) -> None:
        if not 0 < snaplen <= 0x7FFFFFFF:
            raise ValueError(f"snaplen {snaplen} out of range")
        if not 0 <= linktype <= 0xFFFFFFFF:
            raise ValueError(f"linktype {linktype} out of range")
        self.snaplen = snaplen
        self.linktype = linktype
        self.frames = 0
        self.bytes = 0
        self.truncated = 0
        self._file: BinaryIO | None
        if isinstance(path, (str, os.PathLike)):
            self._owned = True
            # Unbuffered: see the module docstring about signal handlers.
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
            self.name = os.fspath(path)
        else:
            self._owned = False
            self._file = path
            self.name = str(getattr(path, "name", "<stream>"))
        self._write_all(self._file, _GLOBAL.pack(MAGIC_USEC, *VERSION, 0, 0, snaplen, linktype))

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._file is None

    def _record(self, frame: Frame, ts: float) -> tuple[bytes, Frame]:
        usec = round(ts * 1_000_000)
        if usec < 0 or usec >= (1 << 32) * 1_000_000:
            raise ValueError(f"timestamp {ts} does not fit in a pcap record")
        sec, usec = divmod(usec, 1_000_000)
        orig = len(frame)
        self.frames += 1
        self.bytes += orig
        if orig > self.snaplen:
            self.truncated += 1
            frame = memoryview(frame)[: self.snaplen]
        return _RECORD.pack(sec, usec, len(frame), orig), frame

    def write(self, frame: Frame, ts: float | None = None) -> None:
        """Append one frame record (one `write(2)`)."""
        self.write_many((frame,), ts)

    def write_many(self, frames: Iterable[Frame], ts: float | None = None) -> None:
        """Append one record per frame, all with timestamp `ts` (None: now), in one write.

        Raises ValueError once the writer is closed (also if a signal handler closed it
        while this call was building its records; nothing partial reaches the file).
        """
        f = self._file
        if f is None:
            raise ValueError("write to a closed PcapWriter")
        if ts is None:
            ts = time.time()
        parts: list[Frame] = []
        for frame in frames:
            parts.extend(self._record(frame, ts))
        if parts:
            data = b"".join(parts)
            if self._file is not f:  # closed meanwhile (a signal handler)
                raise ValueError("PcapWriter closed during write_many")
            self._write_all(f, data)

    @property
    def native_ok(self) -> bool:
        """Whether the compiled path may hand this writer whole records (`write_records`):
        no frame it can see is ever truncated by `snaplen`."""
        return self.snaplen >= 0x10000 + 18 and self._file is not None

    def write_records(self, data: Buffer, frames: int, nbytes: int) -> None:
        """Append complete records built elsewhere (the compiled path builds them exactly as
        `write_many` does), in one write; `frames` and `nbytes` update the counters."""
        f = self._file
        if f is None:
            raise ValueError("write to a closed PcapWriter")
        self.frames += frames
        self.bytes += nbytes
        self._write_all(f, data)

    @staticmethod
    def _write_all(f: BinaryIO, data: Buffer) -> None:
        # A raw file may write less than asked (disk full, quotas); finish or raise.
        view = memoryview(data)
        while view:
            n = f.write(view)
            if n is None or n >= len(view):  # buffered objects return None or all
                break
            view = view[n:]
        f.flush()

    def flush(self) -> None:
        """Push buffered bytes to the OS (a no-op after close)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close (an owned file); idempotent."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.flush()
        finally:
            if self._owned:
                f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[float, bytes]]:
    """All records of a classic pcap file as (timestamp seconds, captured bytes).

    Accepts both byte orders and microsecond or nanosecond magic. Raises ValueError on an
    unknown magic, a truncated header or record, or a record longer than the file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _GLOBAL.size:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a pcap header")
    for order in "<>":
        magic = struct.unpack_from(order + "I", data, 0)[0]
        if magic in (MAGIC_USEC, MAGIC_NSEC):
            break
    else:
        raise ValueError(f"{path}: not a pcap file (magic {data[:4].hex()})")
    scale = 1e-6 if magic == MAGIC_USEC else 1e-9
    record = struct.Struct(order + "IIII")
    out: list[tuple[float, bytes]] = []
    pos = _GLOBAL.size
    end = len(data)
    while pos < end:
        if pos + record.size > end:
            raise ValueError(f"{path}: truncated record header at offset {pos}")
        sec, frac, incl, _orig = record.unpack_from(data, pos)
        pos += record.size
        if pos + incl > end:
            raise ValueError(f"{path}: record at offset {pos - record.size} is truncated")
        out.append((sec + frac * scale, data[pos:pos + incl]))
        pos += incl
    return out
