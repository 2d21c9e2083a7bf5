"""Reading a guest's serial console: what the guest script printed and how it ended.

Owns: `GuestResult` (a finished guest), `parse_console` (the script's output between the
``/init`` markers, kernel ``[  1.234]`` lines removed, and its exit status) and
`console_values` (``key=value`` lines, the usual way a guest script reports). Pure functions
over text; stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vhostpy.testing.errors import GuestError
from vhostpy.testing.initramfs import EXIT_MARKER, START_MARKER

__all__ = ["GuestResult", "console_values", "normalize", "parse_console"]

_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")
_VALUE_LINE = re.compile(r"([A-Za-z0-9_.-]+)=(.*)")


@dataclass(frozen=True)
class GuestResult:
    """What a finished guest reported.

    ``console`` is only what the guest script printed (between the start and exit markers,
    kernel ``[  1.234]`` lines removed); ``raw_console`` is the whole serial log.
    """

    exit_code: int
    console: str
    duration: float
    raw_console: str = ""
    qemu_log: str = ""

    @property
    def lines(self) -> list[str]:
        """``console`` split into lines."""
        return self.console.splitlines()

    @property
    def values(self) -> dict[str, str]:
        """The ``key=value`` lines of ``console`` (`console_values`)."""
        return console_values(self.console)

    def check(self) -> GuestResult:
        """Return self, or raise `GuestError` if the script exited non-zero."""
        if self.exit_code != 0:
            raise GuestError(f"guest script exited with {self.exit_code}", self.raw_console)
        return self


def normalize(raw: bytes) -> str:
    """Serial bytes as text: UTF-8 (bad bytes replaced), ``\\r\\n`` and ``\\r`` dropped to
    ``\\n``-only lines."""
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


def console_values(console: str) -> dict[str, str]:
    """``key=value`` lines a guest script printed (the last one of a key wins)."""
    out = {}
    for line in console.splitlines():
        m = _VALUE_LINE.fullmatch(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def parse_console(raw: str) -> tuple[int | None, str]:
    """Return (exit status or None, script output) from a normalized serial log."""
    start = raw.find(START_MARKER + "\n")
    body = raw[start + len(START_MARKER) + 1:] if start >= 0 else ""
    m = re.search(r"\n?" + re.escape(EXIT_MARKER) + r"(-?\d+)", body)
    code = int(m.group(1)) if m else None
    if m:
        body = body[: m.start()]
    kept = [ln for ln in body.split("\n") if not _KERNEL_LINE.match(ln)]
    return code, "\n".join(kept)
