"""Raw disk images on the host: opening, format probing and QEMU-compatible locking.

`open_image` opens a raw image file or block device the way QEMU's file-posix driver does
for a guest disk: refused when it is in another format (`probe_format`), empty, not whole
sectors, or locked by another user (`ImageLock`: QEMU's OFD byte locks, so QEMU,
qemu-storage-daemon and vhostpy refuse each other's images). Every refusal is a
ConfigurationError naming the image and the reason, with nothing left open.

This module knows nothing about virtio; `stores.FileStore` serves what it opens.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass

from vhostpy.errors import ConfigurationError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512


def open_image(path: str, *, read_only: bool = False, image_format: str | None = None,
               share_rw: bool = False, lock: bool = True, whole_sectors: bool = True) -> int:
    """Open the raw image `path` (a regular file or a block device) for serving; returns
    the fd (the caller owns it).

    Refused with a ConfigurationError naming `path` and the reason, with nothing left open:
    a file that is missing, unreadable or not a file/block device; an image in a
    recognisable non-raw format (qcow2, vmdk, ...; see `probe_format`) unless
    `image_format="raw"` forces raw (any other `image_format` is refused); an empty image,
    or (with `whole_sectors`) one whose size is not a multiple of 512 bytes; an image
    another process locked against us. Locks (`lock`) are QEMU's: OFD locks on the bytes
    file-posix uses (see `ImageLock`), so QEMU, qemu-storage-daemon and vhostpy refuse each
    other's images; `share_rw` lets other writers in, like QEMU's share-rw=on. The locks
    live as long as the fd.
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
        if not os.path.isfile(path) and not is_block_device(fd):
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
        size = image_size(fd)
        if size == 0:
            raise ConfigurationError(f"image {path!r} is empty (0 bytes): a disk needs at "
                                     f"least one {SECTOR_SIZE}-byte sector")
        if whole_sectors and size % SECTOR_SIZE:
            raise ConfigurationError(
                f"image {path!r} is {size} bytes, not a multiple of the {SECTOR_SIZE}-byte "
                f"sector: its last {size % SECTOR_SIZE} bytes would be out of the guest's "
                "reach (pad or truncate it to whole sectors)")
        return fd
    except BaseException:
        os.close(fd)   # also drops every lock taken on it (OFD locks belong to the fd)
        raise


def is_block_device(fd: int) -> bool:
    """Whether `fd` is a block device."""
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def image_size(fd: int) -> int:
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
