"""The dirty log of live migration (vhost-user LOG_SHMFD, SET_LOG_BASE): which guest pages
the back-end wrote, for the front-end to send again.

The log is a bitmap in memory the front-end shares (SET_LOG_BASE: an fd, its size and
offset): bit `n % 8` of byte `n // 8` stands for the guest-physical page `n` of
`LOG_PAGE` (4 KiB) bytes. While VHOST_F_LOG_ALL is negotiated, a back-end sets the bits of
every page it writes into guest memory (buffers it fills, and the used ring of a ring whose
SET_VRING_ADDR flags carry `protocol.VHOST_VRING_F_LOG`, at the ring's `log_guest_addr`);
the front-end collects
and clears them with atomic exchanges while the guest runs.

`DirtyLog(view)` sets bits over a writable buffer (the mapping). Setting a bit here is a
read-modify-write of one byte, not an atomic OR: that is safe because only the front-end
clears bits (atomically, a word at a time) and only one thread of this process (the loop
serving the session's rings) sets them: a clear that lands between our read and our write
can only be undone for bits that were set already, which sends a page once more, and never
loses a bit. A write beyond the log's end is counted (`outside`) and reported by `mark`
returning False: the front-end sized the log for the guest's memory, so it means a broken
front-end, and the transport decides what to do. Nothing here maps memory or knows a ring;
the runner will call it on both data paths (the compiled one sets the same bits in C).
"""

from __future__ import annotations

__all__ = ["LOG_PAGE", "DirtyLog", "log_size"]

#: Bytes of guest memory one bit of the log stands for.
LOG_PAGE = 0x1000


def log_size(memory_end: int) -> int:
    """Bytes of log covering guest-physical addresses below `memory_end`."""
    pages = (memory_end + LOG_PAGE - 1) // LOG_PAGE
    return (pages + 7) // 8


class DirtyLog:
    """Dirty bits over `view` (see the module docstring). `pages_marked` counts bits set by
    `mark` calls (a page marked twice counts twice), `outside` the calls that reached past
    the log."""

    def __init__(self, view: memoryview) -> None:
        if view.readonly:
            raise ValueError("the dirty log must be writable")
        self.view = view
        self.pages = len(view) * 8
        self.pages_marked = 0
        self.outside = 0

    def mark(self, gpa: int, length: int) -> bool:
        """Mark the pages of guest-physical `gpa`..`gpa+length-1` dirty; False (nothing
        marked past the log's end, counted) when the range reaches beyond the log."""
        if length <= 0:
            return True
        first, last = gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE
        inside = last < self.pages
        if not inside:
            self.outside += 1
            last = self.pages - 1
        view = self.view
        page = first
        while page <= last:
            byte, bit = divmod(page, 8)
            if bit == 0 and last - page >= 7:          # whole bytes at once
                whole = (last - page + 1) // 8
                view[byte:byte + whole] = b"\xff" * whole
                page += whole * 8
                continue
            view[byte] |= 1 << bit
            page += 1
        self.pages_marked += max(0, last - first + 1)
        return inside

    def dirty_pages(self) -> list[int]:
        """Every page whose bit is set (for tests and introspection)."""
        out: list[int] = []
        for byte, value in enumerate(bytes(self.view)):
            if value:
                out.extend(byte * 8 + bit for bit in range(8) if value >> bit & 1)
        return out
