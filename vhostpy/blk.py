"""virtio-blk (virtio 1.2, section 5.2) on a raw image file descriptor.

`BlockDevice` serves IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES with `preadv` /
`pwritev` straight between the image and guest memory. Every request is checked against
the capacity before any byte moves: an out-of-range or malformed request gets
VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types) and never touches bytes outside the
image. A read-only device opens nothing for writing and fails every write with IOERR.

An in-memory disk is a memfd, so one code path serves files and RAM alike. This module
never imports the vhost-user layers: it is fed by whichever transport owns the rings.

Variants: when the compiled fast path is in use (`_accel.lib` is set) and a ring is the
compiled `Virtqueue`, `process_queue` hands the whole drain to `blk_cffi.BlkFastPath` (IN,
OUT, FLUSH and GET_ID in C; everything else comes back here, to `handle_chain`, in ring
order). The pure-Python path below is the reference: both give the same used rings, status
bytes, data, `BlkStats` and WARNING lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from vhostpy import _accel
from vhostpy.device import VIRTIO_ID_BLOCK, Coalescing, Device
from vhostpy.errors import ConfigurationError
from vhostpy.memory import GuestMemory
from vhostpy.virtqueue import DescriptorChain, Virtqueue

if _accel.lib is not None:
    from vhostpy.blk_cffi import BlkFastPath

log = logging.getLogger(__name__)

SECTOR_SIZE = 512

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
ZERO_CHUNK = 1 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


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


class BlockDevice(Device):
    """A virtio-blk device over `fd`, an open image (or memfd) of `size` bytes."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    #: Poll a ring only after a kick that brought several requests (at queue depth 1 the
    #: next request comes a whole guest round trip later), and give up on an empty ring
    #: sooner than the default: a spin should cost less than the wake-up it may save (an
    #: epoll wake-up and a kick eventfd read are some tens of µs here), so polling lasts
    #: only while requests come densely.
    poll_after = 2
    poll_idle = 0.000025
    #: A guest at queue depth 32 spends much of its vCPU on completion interrupts; held
    #: while it streams, they come once per several requests (`Coalescing`).
    coalesce: Coalescing | None = Coalescing()

    def __init__(self, fd: int, *, read_only: bool = False, serial: str = "",
                 num_queues: int = 1, queue_size: int = 256, owns_fd: bool = True) -> None:
        super().__init__()
        if not 1 <= num_queues <= 64:
            raise ConfigurationError(f"--num-queues must be 1..64, not {num_queues}")
        if queue_size < 4 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise ConfigurationError(f"--queue-size must be a power of two in 4..32768, "
                                     f"not {queue_size}")
        serial_bytes = serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ConfigurationError(f"--serial is at most {VIRTIO_BLK_ID_BYTES} bytes, "
                                     f"{serial!r} has {len(serial_bytes)}")
        self.fd = fd
        self.owns_fd = owns_fd
        self.read_only = read_only
        self.serial = serial_bytes
        self.num_queues = num_queues
        self.max_queue_size = queue_size
        self.size_bytes = _image_size(fd)
        self.capacity = self.size_bytes // SECTOR_SIZE
        self.stats = BlkStats()
        #: The compiled data path, or None (pure Python; tests set it to None to compare).
        self._fast: BlkFastPath | None = BlkFastPath(self) if _accel.lib is not None else None

    # -- construction helpers --------------------------------------------------------------
    @classmethod
    def open_image(cls, path: str, *, read_only: bool = False, image_format: str | None = None,
                   share_rw: bool = False, lock: bool = True, whole_sectors: bool = True,
                   **kwargs: object) -> BlockDevice:
        """Open the raw image `path` (a regular file or a block device) and serve it.

        Refused with a ConfigurationError naming `path` and the reason, with nothing left
        open: a file that is missing, unreadable or not a file/block device; an image in a
        recognisable non-raw format (qcow2, vmdk, ...; see `probe_format`) unless
        `image_format="raw"` forces raw (any other `image_format` is refused); an empty image,
        or (with `whole_sectors`) one whose size is not a multiple of 512 bytes; an image
        another process locked against us. Locks (`lock`) are QEMU's: OFD locks on the
        bytes file-posix uses (see `ImageLock`), so QEMU, qemu-storage-daemon and vhostpy
        refuse each other's images; `share_rw` lets other writers in, like QEMU's share-rw=on.
        The locks live as long as the image fd (`close()`).
        """
        if image_format not in (None, "raw"):
            raise ConfigurationError(f"--format {image_format}: only raw images are served "
                                     "(--format raw forces raw; convert others with qemu-img)")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ConfigurationError(f"cannot open image {path!r}: {exc.strerror}") from exc
        try:
            if not os.path.isfile(path) and not _is_block_device(fd):
                raise ConfigurationError(f"image {path!r} is not a regular file or block device")
            if lock:
                ImageLock.for_device(read_only=read_only, share_rw=share_rw).apply(fd, path)
            if image_format is None:
                found = probe_format(os.pread(fd, PROBE_BYTES, 0))
                if found is not None:
                    raise ConfigurationError(
                        f"image {path!r} is a {found} image, not raw: serving it raw would let "
                        f"the guest overwrite its {found} metadata (convert it with qemu-img "
                        "convert -O raw, or force raw with --format raw)")
            size = _image_size(fd)
            if size == 0:
                raise ConfigurationError(f"image {path!r} is empty (0 bytes): a disk needs at "
                                         f"least one {SECTOR_SIZE}-byte sector")
            if whole_sectors and size % SECTOR_SIZE:
                raise ConfigurationError(
                    f"image {path!r} is {size} bytes, not a multiple of the {SECTOR_SIZE}-byte "
                    f"sector: its last {size % SECTOR_SIZE} bytes would be out of the guest's "
                    "reach (pad or truncate it to whole sectors)")
            return cls(fd, read_only=read_only, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            os.close(fd)   # also drops every lock taken on it (OFD locks belong to the fd)
            raise

    @classmethod
    def in_memory(cls, size: int, **kwargs: object) -> BlockDevice:
        """A zero-filled RAM disk of `size` bytes (a memfd), gone when the process ends."""
        if size < SECTOR_SIZE or size % SECTOR_SIZE:
            raise ConfigurationError(f"--size must be a positive multiple of {SECTOR_SIZE} "
                                     f"bytes, not {size}")
        fd = os.memfd_create("vhostpy-disk", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Release the image fd if this device opened it."""
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- virtio interface ------------------------------------------------------------------
    def device_features(self) -> int:
        bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
        if self.num_queues > 1:
            bits.append(VIRTIO_BLK_F_MQ)
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        return CONFIG.pack(
            self.capacity, SIZE_MAX, self.max_queue_size - 2,
            0, 0, 0,                         # geometry: cylinders, heads, sectors (unused)
            SECTOR_SIZE,                     # blk_size
            0, 0, 0, 0,                      # topology
            0, 0,                            # writeback, unused0
            self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,   # discard: sectors, segs, alignment
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,   # write zeroes: sectors, segs, may_unmap
        )

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        fast = self._fast
        if fast is not None and fast.serves(vq):
            fast.drain(index, vq)
            return
        super().process_queue(index, vq)   # the reference: device.drain over handle_chain

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        writable_len = chain.writable_len
        if writable_len < 1:
            log.warning("virtio-blk queue %d: request %d has no status byte; dropped",
                        index, chain.head)
            self.stats.errors += 1
            return 0
        try:
            written = self._serve(chain, writable_len - 1)
            status = VIRTIO_BLK_S_OK
        except BlkRequestError as exc:
            self.request_failed(index, chain.head, str(exc))
            if exc.status == VIRTIO_BLK_S_UNSUPP:
                self.stats.unsupported += 1
            else:
                self.stats.errors += 1
            written, status = 0, exc.status
        # The status byte is the last writable byte: the last byte of the last buffer, unless
        # that buffer is empty.
        gpa, length = chain.writable[-1]
        if length:
            chain.memory.view(gpa + length - 1, 1)[0] = status
        else:
            chain.write(bytes((status,)), writable_len - 1)
        return written + 1

    def request_failed(self, index: int, head: int, reason: str) -> None:
        """Log a request that completes with an error status (both data paths)."""
        log.warning("virtio-blk queue %d: request %d failed: %s", index, head, reason)

    # -- request handling ------------------------------------------------------------------
    def _serve(self, chain: DescriptorChain, data_len_in: int) -> int:
        """Serve one request; return the bytes written to the guest before the status byte."""
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
            self._write(chain, sector, data_out)
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self._flush()
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:data_len_in]
            return chain.write(ident)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(chain, rtype, data_out)
            return 0
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

    def _read(self, chain: DescriptorChain, sector: int, length: int) -> int:
        offset = self._check_range("read", sector, length)
        views = _views(chain.memory, chain.writable, 0, length)
        done = _vectored(os.preadv, self.fd, views, offset, length)
        if done != length:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"short read: {done} of {length} bytes at sector {sector}")
        self.stats.reads += 1
        self.stats.bytes_read += length
        return length

    def _write(self, chain: DescriptorChain, sector: int, length: int) -> None:
        if self.read_only:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"write at sector {sector} to a "
                                  "read-only device")
        offset = self._check_range("write", sector, length)
        views = _views(chain.memory, chain.readable, REQUEST_HEADER.size, length)
        done = _vectored(os.pwritev, self.fd, views, offset, length)
        if done != length:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"short write: {done} of {length} bytes at sector {sector}")
        self.stats.writes += 1
        self.stats.bytes_written += length

    def _flush(self) -> None:
        if not self.read_only:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"fdatasync: {exc.strerror}") from exc
        self.stats.flushes += 1

    def _discard_or_zero(self, chain: DescriptorChain, rtype: int, length: int) -> None:
        what = "discard" if rtype == VIRTIO_BLK_T_DISCARD else "write-zeroes"
        if self.read_only:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what} on a read-only device")
        if length == 0 or length % DISCARD_SEGMENT.size:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what} payload of {length} bytes")
        count = length // DISCARD_SEGMENT.size
        if count > MAX_DISCARD_SEG:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR,
                                  f"{what} with {count} segments (max {MAX_DISCARD_SEG})")
        payload = chain.read(REQUEST_HEADER.size, length)
        segments = [DISCARD_SEGMENT.unpack_from(payload, i * DISCARD_SEGMENT.size)
                    for i in range(count)]
        # Spec 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP; too many sectors
        # is IOERR whatever the flags.
        allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
        for sector, num, flags in segments:   # validate all before changing anything
            if flags & ~allowed:
                raise BlkRequestError(VIRTIO_BLK_S_UNSUPP, f"{what}: flags {flags:#x}")
            if num > MAX_DISCARD_SECTORS:
                raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"{what}: {num} sectors "
                                      f"(max {MAX_DISCARD_SECTORS})")
            self._check_range(what, sector, num * SECTOR_SIZE)
        for sector, num, flags in segments:
            offset, size = sector * SECTOR_SIZE, num * SECTOR_SIZE
            if rtype == VIRTIO_BLK_T_DISCARD:
                # Discard is a hint: where the file system cannot punch holes, keeping the
                # data is a correct implementation.
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size)
            else:
                self._zero(offset, size)
        self.stats.writes += 1

    def _zero(self, offset: int, size: int) -> None:
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, size):
            return
        zeros = bytes(min(size, ZERO_CHUNK))
        end = offset + size
        while offset < end:
            n = os.pwrite(self.fd, zeros[: end - offset], offset)
            if n <= 0:
                raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"write-zeroes stalled at {offset}")
            offset += n


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


def _skip(views: list[memoryview], skip: int) -> list[memoryview]:
    """A scatter list without its first `skip` bytes."""
    out = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:])
        skip = 0
    return out


def _vectored(call: object, fd: int, views: list[memoryview], offset: int, length: int) -> int:
    """preadv/pwritev until `length` bytes moved, IOV_MAX-sized pieces; returns bytes moved."""
    done = 0
    pending = views
    while pending and done < length:
        batch = pending[:1024]
        try:
            n = call(fd, batch, offset + done)  # type: ignore[operator]
        except OSError as exc:
            raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"I/O error at byte {offset + done}: "
                                  f"{exc.strerror}") from exc
        if n <= 0:
            break
        done += n
        pending = _skip(pending, n)
    return done


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system does not support `mode`."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise BlkRequestError(VIRTIO_BLK_S_IOERR, f"fallocate: {os.strerror(err)}")


def _is_block_device(fd: int) -> bool:
    import stat
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def _image_size(fd: int) -> int:
    """Bytes in the image behind `fd`: st_size for files and memfds, and the device size
    for block devices (whose st_size is 0)."""
    return os.lseek(fd, 0, os.SEEK_END)


# -- image formats ------------------------------------------------------------------------------
#: How much of an image the format probe reads (QEMU's BLOCK_PROBE_BUF_SIZE).
PROBE_BYTES = 2048


def probe_format(head: bytes) -> str | None:
    """The non-raw image format whose signature starts `head` (an image's first bytes), or
    None when it looks like raw data.

    The signatures are those QEMU's block drivers probe for: qcow2 and qcow ("QFI\\xfb" and the
    version), QED, VMDK (sparse extent magics and the text descriptor), VDI (its signature
    at offset 64), VHDX, VPC/VHD (a dynamic disk's footer copy), LUKS (versions 1 and 2),
    Parallels, Bochs and cloop. A raw image that happens to start with one of them is
    indistinguishable: that is what `--format raw` is for.
    """
    if head[:4] == b"QFI\xfb" and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        if version == 1:
            return "qcow"
        if version >= 2:
            return "qcow2"
    if head[:4] == b"QED\x00":
        return "qed"
    if head[:4] in (b"KDMV", b"COWD") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == 0xBEDA107F:
        return "vdi"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vpc"
    if head[:6] == b"LUKS\xba\xbe" and len(head) >= 8 and head[6:8] in (b"\x00\x01", b"\x00\x02"):
        return "luks"
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "parallels"
    if head.startswith(b"Bochs Virtual HD Image"):
        return "bochs"
    if head.startswith(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"):
        return "cloop"
    return None


# -- image locks (QEMU's file-posix locking) ----------------------------------------------------
#: QEMU's block permissions (include/block/block-common.h): bit numbers and QEMU's names.
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
#: block/file-posix.c: a holder of permission i read-locks byte 100 + i; a holder that does
#: not share permission i read-locks byte 200 + i. (Byte 0 and up are libvirt's.)
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("@hhqqi4x")


@dataclass(frozen=True)
class ImageLock:
    """The permissions one image user takes (`perm`) and lets others take (`shared`), as
    sets of PERM_* bit numbers, applied with QEMU's protocol.

    `apply` first read-locks its own bytes, then checks, with F_OFD_GETLK, that no other
    open file holds a byte that conflicts: 200 + i for a permission i we take (someone does
    not share it), 100 + i for a permission i we do not share (someone holds it). Taking
    before checking means two users starting at once both see each other and both give up,
    never both go on. OFD locks belong to the open file description, so they are dropped
    when the fd is closed, by whatever process holds it last.
    """

    perm: frozenset[int]
    shared: frozenset[int]

    @classmethod
    def for_device(cls, *, read_only: bool, share_rw: bool = False) -> ImageLock:
        """The set QEMU's guest devices take: read (and write unless read-only); share read
        and unchanged writes, plus writes with share-rw. Resizing is never shared: the
        capacity is read once, at start."""
        perm = {PERM_CONSISTENT_READ} | (set() if read_only else {PERM_WRITE})
        shared = {PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED} | ({PERM_WRITE} if share_rw
                                                                 else set())
        return cls(frozenset(perm), frozenset(shared))

    def apply(self, fd: int, path: str) -> None:
        """Take and check the locks on `fd`; ConfigurationError (naming `path` and the
        permission) if another process's locks conflict. A file system without OFD locks
        gets a WARNING and no locks, like QEMU's locking=auto."""
        try:
            for bit in range(len(PERM_NAMES)):
                if bit in self.perm:
                    _set_lock(fd, LOCK_PERM_BASE + bit)
                if bit not in self.shared:
                    _set_lock(fd, LOCK_SHARED_BASE + bit)
            for bit in range(len(PERM_NAMES)):
                if bit in self.perm and _locked_by_others(fd, LOCK_SHARED_BASE + bit):
                    raise ConfigurationError(f"image {path!r} {_IN_USE} that does not share "
                                             f"'{PERM_NAMES[bit]}'{_share_hint(bit)}")
                if bit not in self.shared and _locked_by_others(fd, LOCK_PERM_BASE + bit):
                    raise ConfigurationError(f"image {path!r} {_IN_USE} that holds "
                                             f"'{PERM_NAMES[bit]}'{_share_hint(bit)}")
        except _LockBusy as busy:   # someone write-locked a byte: not QEMU's protocol
            raise ConfigurationError(f"image {path!r} is in use: byte {busy.offset} is "
                                     "locked by another process") from None
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("image %s: file system without OFD locks (%s); serving it unlocked",
                            path, exc.strerror)
                return
            raise ConfigurationError(f"cannot lock image {path!r}: {exc.strerror}") from exc


_IN_USE = "is in use by another process (QEMU, qemu-storage-daemon or vhostpy)"


class _LockBusy(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def _share_hint(bit: int) -> str:
    if bit == PERM_WRITE:
        return (" (writers can share an image only when every user of it agrees: vhostpy "
                "--share-rw, QEMU share-rw=on)")
    return ""


def _set_lock(fd: int, offset: int) -> None:
    """Read-lock one byte at `offset` with an OFD lock (never waits)."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise _LockBusy(offset) from None
        raise


def _locked_by_others(fd: int, offset: int) -> bool:
    """Whether another open file holds any lock on the byte at `offset` (QEMU's
    qemu_lock_fd_test: F_OFD_GETLK with a write lock, which any lock conflicts with)."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                         _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
