"""A minimal SVR4 ``newc`` cpio writer: the format the kernel's initramfs unpacker reads.

Pure Python so that device nodes (``/dev/console``) need no root and the output is
byte-for-byte reproducible (inode numbers count up, owners are 0, mtimes are 0, gzip's mtime
too). Knows nothing about kernels or guests. Stdlib only.
"""

from __future__ import annotations

import gzip
import io

__all__ = ["CpioWriter"]

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000


class CpioWriter:
    """Collects entries in memory; `finish()` returns the gzip-compressed archive."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0,
        )
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(hdr + name_b)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        return name

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents created as needed)."""
        self._entry(self._parent(name), S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(self._parent(name), S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(self._parent(name), S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """Return the gzip-compressed archive (trailer included, mtime 0 for reproducibility)."""
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._buf.getvalue(), compresslevel=6, mtime=0)
