"""virtio-blk (virtio 1.2, section 5.2) over a block store.

`BlockDevice` serves IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES from a store (see
`stores`: any object with `size`, `read`, `write`, `flush`, optionally `discard`,
`write_zeroes`, `readinto`, `writefrom`, `block_size`; any method may be async). Every
request is checked against the capacity before the store sees it: an out-of-range or
malformed request gets VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types), and a store that
raises fails its request with IOERR and a WARNING line. A read-only device fails every
write with IOERR. A store method that returns an awaitable completes its request later
(`device` docstring): guest memory is written, and the status byte set, on the ring's
thread once it resolved.

This module never imports the vhost-user layers: it is fed by whichever transport owns the
rings.

Variants: when the compiled fast path is in use (`_accel.lib` is set), the store is exactly
a `stores.FileStore` and `handle_chain` is not overridden (`uses_compiled_path`), a ring
that is the compiled `Virtqueue` is drained by `blk_cffi.BlkFastPath` (IN, OUT, FLUSH and
GET_ID with preadv/pwritev in C; everything else comes back here, to `handle_chain`, in ring
order). Anything else (a FileStore subclass, another store, an overriding subclass) is
served here, so nothing a user overrides is bypassed. The pure-Python path is the
reference: both give the same used rings, status bytes, data, `BlkStats` and WARNING lines.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from vhostpy import _accel
from vhostpy.device import VIRTIO_ID_BLOCK, Coalescing, Device
from vhostpy.errors import ConfigurationError
from vhostpy.images import SECTOR_SIZE
from vhostpy.memory import GuestMemory
from vhostpy.stores import (
    FileStore,
    StoreError,
    can_discard,
    check_store,
    close_store,
    reset_store,
    zero_by_writing,
)
from vhostpy.virtqueue import DescriptorChain, Virtqueue

if _accel.lib is not None:
    from vhostpy.blk_cffi import BlkFastPath

log = logging.getLogger(__name__)

# Feature bits (virtio 1.2, 5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

REQUEST_HEADER = struct.Struct("<IIQ")        # type, reserved (ioprio), sector
DISCARD_SEGMENT = struct.Struct("<QII")       # sector, num_sectors, flags
#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")

SIZE_MAX = 1 << 20             # largest single data segment we advertise
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per discard / write-zeroes segment
MAX_DISCARD_SEG = 1            # segments per request


class BlkRequestError(Exception):
    """A request that completes with a non-OK status; carries that status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class BlkStats:
    """Per-device request counters (all queues)."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    unsupported: int = 0


class _Pending:
    """A request waiting on its store: the awaitable, and `then(result)`, which finishes the
    request on the ring's thread (moves data into guest memory, counts it) and returns the
    bytes written into the guest."""

    __slots__ = ("awaitable", "length", "offset", "then", "what")

    def __init__(self, awaitable: Awaitable[Any], what: str, offset: int, length: int,
                 then: Callable[[Any], int]) -> None:
        self.awaitable = awaitable
        self.what = what
        self.offset = offset
        self.length = length
        self.then = then


#: What a request handler gives back: the bytes written into the guest (done), or the
#: request waiting on its store.
_Outcome = int | _Pending


class BlockDevice(Device):
    """A virtio-blk device over `store` (see `stores`), or over `fd`, a raw image (or memfd)
    served as a `stores.FileStore`.

    `read_only` (or a store whose `read_only` is true) offers VIRTIO_BLK_F_RO and fails
    writes. DISCARD is offered when the store has `discard` (and `can_discard` is not
    false); WRITE_ZEROES always (the device writes zeros where the store cannot zero a
    range). `close()` closes the store (if it has `close`). ConfigurationError for a bad
    value or a store that lacks what the device needs.
    """

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    #: Poll a ring only after a kick that brought several requests (at queue depth 1 the
    #: next request comes a whole guest round trip later), and give up on an empty ring
    #: sooner than the default: a spin should cost less than the wake-up it may save (an
    #: epoll wake-up and a kick eventfd read are some tens of µs here), so polling lasts
    #: only while requests come densely.
    poll_after = 2
    poll_idle = 0.000025
    #: The window stays fixed (not widened as for streams of frames): by the reasoning
    #: above, spins stay shorter than the wake-ups they may save.
    poll_idle_max = 0.000025
    #: A guest at queue depth 32 spends much of its vCPU on completion interrupts; held
    #: while it streams, they come once per several requests (`Coalescing`).
    coalesce: Coalescing | None = Coalescing()

    def __init__(self, store: object = None, *, fd: int | None = None, read_only: bool = False,
                 serial: str = "", num_queues: int = 1, queue_size: int = 256,
                 owns_fd: bool = True) -> None:
        super().__init__()
        if isinstance(store, int) and not isinstance(store, bool):
            store, fd = None, store        # BlockDevice(fd): the raw image behind it
        if (store is None) == (fd is None):
            raise ConfigurationError("a block device needs exactly one of a store and an fd")
        if fd is not None:
            store = FileStore(fd, read_only=read_only, owns_fd=owns_fd)
        if not 1 <= num_queues <= 64:
            raise ConfigurationError(f"--num-queues must be 1..64, not {num_queues}")
        if queue_size < 4 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise ConfigurationError(f"--queue-size must be a power of two in 4..32768, "
                                     f"not {queue_size}")
        serial_bytes = serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ConfigurationError(f"--serial is at most {VIRTIO_BLK_ID_BYTES} bytes, "
                                     f"{serial!r} has {len(serial_bytes)}")
        self.read_only = read_only or bool(getattr(store, "read_only", False))
        self.size_bytes = check_store(store, read_only=self.read_only)
        self.store: Any = store
        self.block_size: int = getattr(store, "block_size", SECTOR_SIZE)
        self.serial = serial_bytes
        self.num_queues = num_queues
        self.max_queue_size = queue_size
        self.capacity = self.size_bytes // SECTOR_SIZE
        self.stats = BlkStats()
        self._can_discard = can_discard(store)
        self._readinto = getattr(store, "readinto", None)
        self._writefrom = getattr(store, "writefrom", None)
        self._write_zeroes = getattr(store, "write_zeroes", None)
        #: An async `write` gets its own copy of the data (guest memory may change).
        self._copy_writes = inspect.iscoroutinefunction(getattr(store, "write", None))
        #: The compiled data path, or None (pure Python; tests set it to None to compare).
        self._fast: BlkFastPath | None = BlkFastPath(self) if self.uses_compiled_path else None

    @property
    def uses_compiled_path(self) -> bool:
        """Whether requests go through the compiled data path (see the module docstring):
        the fast path is in use, the store is exactly a FileStore, `handle_chain` is ours."""
        return (_accel.lib is not None and type(self.store) is FileStore
                and type(self).handle_chain is BlockDevice.handle_chain)

    @property
    def fd(self) -> int:
        """The image fd of a FileStore (-1 for other stores)."""
        return self.store.fd if isinstance(self.store, FileStore) else -1

    # -- construction helpers --------------------------------------------------------------
    @classmethod
    def open_image(cls, path: str, *, read_only: bool = False, image_format: str | None = None,
                   share_rw: bool = False, lock: bool = True, whole_sectors: bool = True,
                   **kwargs: Any) -> BlockDevice:
        """Serve the raw image `path` (a FileStore opened by `stores.FileStore.open`: its
        refusals are ConfigurationErrors naming the image, with nothing left open)."""
        store = FileStore.open(path, read_only=read_only, image_format=image_format,
                               share_rw=share_rw, lock=lock, whole_sectors=whole_sectors)
        try:
            return cls(store, read_only=read_only, **kwargs)
        except BaseException:
            store.close()
            raise

    @classmethod
    def in_memory(cls, size: int, **kwargs: Any) -> BlockDevice:
        """A zero-filled RAM disk of `size` bytes (a memfd, served like an image file)."""
        store = FileStore.in_memory(size)
        try:
            return cls(store, **kwargs)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Close the store (its `close()`, if it has one)."""
        close_store(self.store)

    # -- virtio interface ------------------------------------------------------------------
    def device_features(self) -> int:
        bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES]
        if self._can_discard:
            bits.append(VIRTIO_BLK_F_DISCARD)
        if self.num_queues > 1:
            bits.append(VIRTIO_BLK_F_MQ)
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        sectors_per_block = self.block_size // SECTOR_SIZE
        return CONFIG.pack(
            self.capacity, SIZE_MAX, self.max_queue_size - 2,
            0, 0, 0,                         # geometry: cylinders, heads, sectors (unused)
            self.block_size,                 # blk_size
            0, 0, 0, 0,                      # topology
            0, 0,                            # writeback, unused0
            self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, sectors_per_block,  # discard: alignment
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,   # write zeroes: sectors, segs, may_unmap
        )

    def set_features(self, features: int) -> None:
        """The driver (re)initialises the device: a store with `device_reset` hears it."""
        super().set_features(features)
        self._store_reset()

    def reset(self) -> None:
        super().reset()
        self._store_reset()

    def _store_reset(self) -> None:
        reset_store(self.store)

    def native_server(self, index: int, vq: Virtqueue) -> Any:
        """The compiled path serves kicks alone when it serves the ring at all and
        `process_queue` is this one (a subclass may do more per kick)."""
        fast = self._fast
        if fast is None or not fast.serves(vq) \
                or type(self).process_queue is not BlockDevice.process_queue:
            return None
        return fast

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        fast = self._fast
        if fast is not None and fast.serves(vq):
            fast.drain(index, vq)
            return
        super().process_queue(index, vq)   # the reference: device.drain over handle_chain

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> Any:
        writable_len = chain.writable_len
        if writable_len < 1:
            log.warning("virtio-blk queue %d: request %d has no status byte; dropped",
                        index, chain.head)
            self.stats.errors += 1
            return 0
        try:
            outcome = self._serve(chain, writable_len - 1)
        except BlkRequestError as exc:
            return self._finish(index, chain, 0, exc)
        if type(outcome) is int:
            return self._finish(index, chain, outcome, None)
        assert isinstance(outcome, _Pending)
        if asyncio.isfuture(outcome.awaitable):
            return self._chained(index, chain, outcome)
        return self._later(index, chain, outcome)

    @property
    def prefers_asyncio(self) -> bool:
        """True when the store says so (`prefers_asyncio`) or has `async def` methods (see
        `Device.prefers_asyncio`)."""
        return bool(getattr(self.store, "prefers_asyncio", False)) or any(inspect.iscoroutinefunction(getattr(self.store, name, None))
                   for name in ("read", "write", "flush", "discard", "write_zeroes",
                                "readinto", "writefrom"))

    def request_failed(self, index: int, head: int, reason: str) -> None:
        """Log a request that completes with an error status (both data paths)."""
        log.warning("virtio-blk queue %d: request %d failed: %s", index, head, reason)

    # -- request handling ------------------------------------------------------------------
    def _finish(self, index: int, chain: DescriptorChain, written: int,
                error: BlkRequestError | None) -> int:
        """Count the outcome, write the status byte; returns the bytes written (with it)."""
        status = VIRTIO_BLK_S_OK
        if error is not None:
            self.request_failed(index, chain.head, str(error))
            if error.status == VIRTIO_BLK_S_UNSUPP:
                self.stats.unsupported += 1
            else:
                self.stats.errors += 1
            written, status = 0, error.status
        # The status byte is the last writable byte: the last byte of the last buffer, unless
        # that buffer is empty.
        gpa, length = chain.writable[-1]
        if length:
            chain.memory.view(gpa + length - 1, 1)[0] = status
        else:
            chain.write(bytes((status,)), chain.writable_len - 1)
        return written + 1

    async def _later(self, index: int, chain: DescriptorChain,
                     pending: _Pending) -> Callable[[], int]:
        """A request waiting on the store; resolves to its finisher (the ring's thread)."""
        try:
            value = await pending.awaitable
        except Exception as exc:  # noqa: BLE001 (a store may raise anything: IOERR)
            return self._finisher(index, chain, pending, None, exc)
        return self._finisher(index, chain, pending, value, None)

    def _chained(self, index: int, chain: DescriptorChain,
                 pending: _Pending) -> asyncio.Future[Callable[[], int]]:
        """`_later` for a store that returned a future (no task, no coroutine): a future of
        the same loop resolving to the finisher."""
        source = cast("asyncio.Future[Any]", pending.awaitable)
        out: asyncio.Future[Callable[[], int]] = source.get_loop().create_future()

        def done(f: asyncio.Future[Any]) -> None:
            if out.cancelled():
                return
            if f.cancelled():
                out.cancel()
                return
            exc = f.exception()
            out.set_result(self._finisher(index, chain, pending,
                                          None if exc is not None else f.result(), exc))
        source.add_done_callback(done)
        return out

    def _finisher(self, index: int, chain: DescriptorChain, pending: _Pending, value: Any,
                  exc: BaseException | None) -> Callable[[], int]:
        """What finishes a request once its store answered (run on the ring's thread)."""
        if exc is not None:
            error = _store_error(pending.what, pending.offset, pending.length, exc)
            return lambda: self._finish(index, chain, 0, error)

        def finish() -> int:
            try:
                written = pending.then(value)
            except BlkRequestError as err:
                return self._finish(index, chain, 0, err)
            return self._finish(index, chain, written, None)
        return finish

    def _store(self, what: str, offset: int, length: int, call: Callable[..., Any],
               *args: Any, then: Callable[[Any], int]) -> _Outcome:
        """Call the store; `then(result)` finishes the request now, or once an awaitable
        result resolved. Anything the store raises fails the request (IOERR)."""
        try:
            result = call(*args)
        except Exception as exc:
            raise _store_error(what, offset, length, exc) from exc
        if inspect.isawaitable(result):
            return _Pending(result, what, offset, length, then)
        return then(result)

    def _serve(self, chain: DescriptorChain, data_len_in: int) -> _Outcome:
        """Serve one request: the bytes written to the guest before the status byte, or a
        coroutine (see `_Outcome`)."""
        if chain.readable_len < REQUEST_HEADER.size:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"header of {chain.readable_len} bytes (need 16)")
        gpa, length = chain.readable[0]
        if length >= REQUEST_HEADER.size:  # the usual case: the header is one buffer
            header: bytes | memoryview = chain.memory.view(gpa, REQUEST_HEADER.size)
        else:
            header = chain.read(0, REQUEST_HEADER.size)
        rtype, _, sector = REQUEST_HEADER.unpack(header)
        data_out = chain.readable_len - REQUEST_HEADER.size
        if rtype == VIRTIO_BLK_T_IN:
            return self._read(chain, sector, data_len_in)
        if rtype == VIRTIO_BLK_T_OUT:
            return self._write(chain, sector, data_out)
        if rtype == VIRTIO_BLK_T_FLUSH:
            return self._flush()
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:data_len_in]
            return chain.write(ident)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(chain, rtype, data_out)
        raise BlkRequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")

    def _check_range(self, what: str, sector: int, length: int) -> int:
        if length % SECTOR_SIZE:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"{what} of {length} bytes is not a multiple of {SECTOR_SIZE}")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"{what} of {length} bytes at sector {sector} is beyond "
                                  f"capacity {self.capacity}")
        return sector * SECTOR_SIZE

    def _read(self, chain: DescriptorChain, sector: int, length: int) -> _Outcome:
        offset = self._check_range("read", sector, length)
        views = _views(chain.memory, chain.writable, 0, length)
        stats = self.stats

        def counted(_: object = None) -> int:
            stats.reads += 1
            stats.bytes_read += length
            return length

        def copied(data: Any) -> int:
            got = memoryview(data).cast("B")
            if len(got) != length:
                raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"short read: the store returned "
                                      f"{len(got)} of {length} bytes at sector {sector}")
            at = 0
            for view in views:
                n = len(view)
                view[:] = got[at:at + n]
                at += n
            return counted()
        if self._readinto is not None:
            return self._store("read", offset, length, self._readinto, offset, views,
                               then=counted)
        return self._store("read", offset, length, self.store.read, offset, length,
                           then=copied)

    def _write(self, chain: DescriptorChain, sector: int, length: int) -> _Outcome:
        if self.read_only:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"write at sector {sector} to a "
                                  "read-only device")
        offset = self._check_range("write", sector, length)
        views = _views(chain.memory, chain.readable, REQUEST_HEADER.size, length)
        stats = self.stats

        def counted(_: object = None) -> int:
            stats.writes += 1
            stats.bytes_written += length
            return 0
        if self._writefrom is not None and not self._copy_writes:
            return self._store("write", offset, length, self._writefrom, offset, views,
                               then=counted)
        data: bytes | memoryview = views[0] if len(views) == 1 and not self._copy_writes \
            else b"".join(views)
        return self._store("write", offset, length, self.store.write, offset, data,
                           then=counted)

    def _flush(self) -> _Outcome:
        stats = self.stats

        def counted(_: object = None) -> int:
            stats.flushes += 1
            return 0
        if self.read_only:
            return counted()
        return self._store("flush", 0, 0, self.store.flush, then=counted)

    def _discard_or_zero(self, chain: DescriptorChain, rtype: int, length: int) -> _Outcome:
        what = "discard" if rtype == VIRTIO_BLK_T_DISCARD else "write-zeroes"
        if self.read_only:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what} on a read-only device")
        if rtype == VIRTIO_BLK_T_DISCARD and not self._can_discard:
            raise BlkRequestError(VIRTIO_BLK_S_UNSUPP, "discard was not offered")
        if length == 0 or length % DISCARD_SEGMENT.size:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what} payload of {length} bytes")
        count = length // DISCARD_SEGMENT.size
        if count > MAX_DISCARD_SEG:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"{what} with {count} segments (max {MAX_DISCARD_SEG})")
        payload = chain.read(REQUEST_HEADER.size, length)
        sector, num, flags = DISCARD_SEGMENT.unpack_from(payload, 0)
        # Spec 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP; too many sectors
        # is IOERR whatever the flags.
        allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
        if flags & ~allowed:
            raise BlkRequestError(VIRTIO_BLK_S_UNSUPP, f"{what}: flags {flags:#x}")
        if num > MAX_DISCARD_SECTORS:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what}: {num} sectors "
                                  f"(max {MAX_DISCARD_SECTORS})")
        offset = self._check_range(what, sector, num * SECTOR_SIZE)
        size = num * SECTOR_SIZE
        stats = self.stats

        def counted(_: object = None) -> int:
            stats.writes += 1
            return 0
        if rtype == VIRTIO_BLK_T_DISCARD:
            return self._store(what, offset, size, self.store.discard, offset, size,
                               then=counted)
        if self._write_zeroes is not None:
            return self._store(what, offset, size, self._write_zeroes, offset, size,
                               then=counted)
        return self._store(what, offset, size, zero_by_writing, self.store, offset, size,
                           then=counted)


def _store_error(what: str, offset: int, length: int, exc: BaseException) -> BlkRequestError:
    """A store's exception as the request's IOERR, named for the log line (a StoreError's
    message already names what failed and where)."""
    if isinstance(exc, BlkRequestError):
        return exc
    if isinstance(exc, StoreError):
        return BlkRequestError(VIRTIO_BLK_S_IOERR, str(exc.strerror))
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
    return BlkRequestError(VIRTIO_BLK_S_IOERR, f"store {what} of {length} bytes at byte "
                           f"{offset}: {reason}")


def _views(memory: GuestMemory, buffers: list[tuple[int, int]], skip: int, length: int
           ) -> list[memoryview]:
    """Views of `length` bytes of a chain's buffers after its first `skip` bytes; views only
    of what the transfer touches (not the status byte's buffer, not the header's)."""
    out: list[memoryview] = []
    for gpa, size in buffers:
        if length <= 0:
            break
        if skip >= size:
            skip -= size
            continue
        n = min(size - skip, length)
        out.extend(memory.views(gpa + skip, n))
        length -= n
        skip = 0
    return out
