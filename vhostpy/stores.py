"""Block stores: what a virtio-blk device reads and writes (`blk.BlockDevice(store=...)`).

A store is any object with

* `size`: the disk's size in bytes (read once, when the device is built);
* `read(offset, length)` -> a bytes-like object of exactly `length` bytes;
* `write(offset, data)` (not needed when the device is read-only);
* `flush()`: make every completed write durable;

and optionally `discard(offset, length)` (with `can_discard`, default True, saying whether
the device may offer it), `write_zeroes(offset, length)` (else the device writes zeros),
`readinto(offset, buffers)` / `writefrom(offset, buffers)` (scatter lists of memoryviews:
no copy), `block_size` (a power of two >= 512, default 512), `read_only`, and
`device_reset()`, called when the driver resets or (re)initialises the device (vhost-user: a
reset, a front-end that goes away, SET_FEATURES at every device start). Any method may
be an `async def` (or return an awaitable): the device then completes the request when it
resolves, and other requests go on meanwhile. A store may raise anything: the request
fails with VIRTIO_BLK_S_IOERR and a log line. The device checks every request against
`size` first: a store never sees an offset or length outside the disk. `data` given to a
synchronous `write` is valid only during the call (it may be guest memory); an asynchronous
one gets its own copy.

Built in: `FileStore` (a raw image file, block device or memfd; the device serves it with
the compiled data path when that is in use) and `MemoryStore` (a bytearray, in Python).
`nbd.NbdStore` keeps the disk on an NBD server. This module knows nothing about virtio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import inspect
import os
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, runtime_checkable

from vhostpy.errors import ConfigurationError
from vhostpy.images import SECTOR_SIZE, image_size, open_image

__all__ = [
    "BlockStore",
    "FileStore",
    "MemoryStore",
    "StoreError",
    "StoreLayer",
    "can_discard",
    "check_store",
    "close_store",
    "reset_store",
    "settle",
    "zero_by_writing",
    "zero_range",
]

#: Largest piece of zeros written at once when a store cannot zero a range itself.
ZERO_CHUNK = 1 << 20
_IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

Buffer = bytes | bytearray | memoryview


class StoreError(OSError):
    """An I/O error whose message already says what failed and where (the device logs it
    as is): what `FileStore` raises, worded as the compiled data path words it."""


@runtime_checkable
class BlockStore(Protocol):
    """The part of the store interface every store has (see the module docstring)."""

    size: int

    def read(self, offset: int, length: int) -> Buffer | Awaitable[Buffer]: ...

    def write(self, offset: int, data: Buffer) -> None | Awaitable[None]: ...

    def flush(self) -> None | Awaitable[None]: ...


def check_store(store: object, *, read_only: bool) -> int:
    """Validate `store` for a block device and return its size; ConfigurationError naming
    what is missing or wrong (a size that is not a positive int, a method that is absent
    or not callable, a bad `block_size`)."""
    name = type(store).__name__
    size = getattr(store, "size", None)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigurationError(f"store {name}: size must be a positive number of bytes, "
                                 f"not {size!r}")
    needed = ("read", "flush") if read_only else ("read", "write", "flush")
    for method in needed:
        if not callable(getattr(store, method, None)):
            raise ConfigurationError(f"store {name} has no {method}() method")
    block = getattr(store, "block_size", SECTOR_SIZE)
    if not isinstance(block, int) or block < SECTOR_SIZE or block & (block - 1) or \
            block > 1 << 16:
        raise ConfigurationError(f"store {name}: block_size must be a power of two in "
                                 f"512..65536, not {block!r}")
    return size


def zero_by_writing(store: Any, offset: int, length: int) -> Any:
    """Zero a range of a store without `write_zeroes` by writing zeros, `ZERO_CHUNK` at a
    time: done on return when its `write` is synchronous, else a coroutine that awaits each
    write in turn (None or that coroutine is returned)."""
    chunks = [(at, min(ZERO_CHUNK, offset + length - at))
              for at in range(offset, offset + length, ZERO_CHUNK)]
    if not inspect.iscoroutinefunction(store.write):
        for at, n in chunks:
            store.write(at, bytes(n))
        return None

    async def zero() -> None:
        for at, n in chunks:
            await store.write(at, bytes(n))
    return zero()


async def settle(value: Any) -> Any:
    """A store method's result, awaited when it is awaitable (for store wrappers, whose
    inner store may be synchronous or not)."""
    return await value if inspect.isawaitable(value) else value


async def zero_range(store: Any, offset: int, length: int) -> None:
    """Zero a range of any store: its `write_zeroes` if it has one, else `zero_by_writing`."""
    inner = getattr(store, "write_zeroes", None)
    if callable(inner):
        await settle(inner(offset, length))
    else:
        await settle(zero_by_writing(store, offset, length))


def reset_store(store: Any) -> None:
    """Tell `store` the driver reset or re-initialised the device (its optional
    `device_reset()`); store wrappers pass it on with this."""
    hook = getattr(store, "device_reset", None)
    if callable(hook):
        hook()


def close_store(store: Any) -> None:
    """Close `store` (its optional `close()`)."""
    close = getattr(store, "close", None)
    if callable(close):
        close()


def can_discard(store: Any) -> bool:
    """Whether a device may offer DISCARD over `store`: it has `discard`, and `can_discard`
    (default True) does not say otherwise."""
    return callable(getattr(store, "discard", None)) and bool(getattr(store, "can_discard",
                                                                      True))


class StoreLayer:
    """The base of a store that wraps another (faults, a write cache, a write log): it
    takes `store`'s `size`, `block_size`, `read_only` and whether it can discard, and passes
    `device_reset()` and `close()` on to it. Subclasses add the store methods."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.size = store.size
        self.block_size = getattr(store, "block_size", SECTOR_SIZE)
        self.read_only = bool(getattr(store, "read_only", False))
        self.can_discard = can_discard(store)

    def device_reset(self) -> None:
        """Passed on to the store below (see the module docstring)."""
        reset_store(self.store)

    def close(self) -> None:
        """Close the store below (its `close()`, if it has one)."""
        close_store(self.store)


class FileStore:
    """A raw image: a regular file, a block device or a memfd, by its fd.

    I/O is positional (`preadv`, `pwritev`) with no lock: requests in flight never share
    state. `close()` releases the fd when this store owns it (and with it the image locks).
    """

    block_size = SECTOR_SIZE

    def __init__(self, fd: int, *, read_only: bool = False, owns_fd: bool = True) -> None:
        self.fd = fd
        self.read_only = read_only
        self.owns_fd = owns_fd
        self.size = image_size(fd)

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, image_format: str | None = None,
             share_rw: bool = False, lock: bool = True, whole_sectors: bool = True
             ) -> FileStore:
        """The raw image at `path`, opened, probed and locked by `images.open_image` (its
        refusals are ConfigurationErrors naming the image)."""
        fd = open_image(path, read_only=read_only, image_format=image_format,
                        share_rw=share_rw, lock=lock, whole_sectors=whole_sectors)
        return cls(fd, read_only=read_only)

    @classmethod
    def in_memory(cls, size: int) -> FileStore:
        """A zero-filled RAM disk of `size` bytes (a memfd), gone when the process ends."""
        if size < SECTOR_SIZE or size % SECTOR_SIZE:
            raise ConfigurationError(f"--size must be a positive multiple of {SECTOR_SIZE} "
                                     f"bytes, not {size}")
        fd = os.memfd_create("vhostpy-disk", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd)

    def close(self) -> None:
        """Release the fd if this store owns it (idempotent)."""
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, [memoryview(buf)])
        return bytes(buf)

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Read into `buffers` (a scatter list) from `offset` with preadv."""
        _vectored(os.preadv, self.fd, buffers, offset, "read")

    def write(self, offset: int, data: Buffer) -> None:
        self.writefrom(offset, [memoryview(data)])

    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write `buffers` (a gather list) at `offset` with pwritev."""
        if self.read_only:
            raise StoreError(errno.EROFS, "the image is open read-only")
        _vectored(os.pwritev, self.fd, buffers, offset, "write")

    def flush(self) -> None:
        if not self.read_only:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise StoreError(exc.errno, f"fdatasync: {exc.strerror}") from exc

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; where the file system cannot, keeping the data is correct (a
        discard is a hint)."""
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        zeros = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, zeros[: end - offset], offset)
            if n <= 0:
                raise StoreError(errno.EIO, f"write-zeroes stalled at {offset}")
            offset += n

    def __repr__(self) -> str:
        return f"<FileStore fd={self.fd} size={self.size}>"


class MemoryStore:
    """A disk in a bytearray, served in Python: the reference store, and an example."""

    def __init__(self, size: int, *, block_size: int = SECTOR_SIZE) -> None:
        if size < SECTOR_SIZE or size % SECTOR_SIZE:
            raise ConfigurationError(f"MemoryStore size must be a positive multiple of "
                                     f"{SECTOR_SIZE} bytes, not {size}")
        self.size = size
        self.block_size = block_size
        self.data = bytearray(size)
        self._view = memoryview(self.data)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset:offset + length]

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        view = self._view
        for buf in buffers:
            n = len(buf)
            buf[:] = view[offset:offset + n]
            offset += n

    def write(self, offset: int, data: Buffer) -> None:
        self._view[offset:offset + len(data)] = data

    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> None:
        view = self._view
        for buf in buffers:
            n = len(buf)
            view[offset:offset + n] = buf
            offset += n

    def flush(self) -> None:
        """Nothing to make durable: the disk lives as long as the process."""

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._view[offset:offset + length] = bytes(length)

    def __repr__(self) -> str:
        return f"<MemoryStore size={self.size}>"


def _skip(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """A scatter list without its first `skip` bytes."""
    out = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:])
        skip = 0
    return out


def _vectored(call: object, fd: int, views: Sequence[memoryview], offset: int,
              what: str) -> None:
    """preadv/pwritev until every byte of `views` moved (IOV_MAX-sized pieces); StoreError
    otherwise (EIO for a short transfer)."""
    length = sum(len(v) for v in views)
    done = 0
    pending: Sequence[memoryview] = views
    while pending and done < length:
        try:
            n = call(fd, pending[:_IOV_MAX], offset + done)  # type: ignore[operator]
        except OSError as exc:
            raise StoreError(exc.errno, f"I/O error at byte {offset + done}: "
                             f"{exc.strerror}") from exc
        if n <= 0:
            break
        done += n
        pending = _skip(pending, n)
    if done != length:
        raise StoreError(errno.EIO, f"short {what}: {done} of {length} bytes at sector "
                         f"{offset // SECTOR_SIZE}")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system does not support `mode`."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise StoreError(err, f"fallocate: {os.strerror(err)}")
