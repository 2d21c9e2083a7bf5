"""What every command of the command line shares: the argument parser that reports a bad value
in one line (exit 1), the argparse types (sizes, counts, ring sizes, addresses), and logging.

Nothing here knows a device; `cli` and `cli_lguest` build the commands from these pieces.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

__all__ = ["MAX_QUEUE_SIZE", "Parser", "fd_number", "image_format", "ipv4", "not_negative",
           "parse_size", "positive_int", "queue_size", "setup_logging"]

_ActionT = TypeVar("_ActionT", bound=argparse.Action)

#: The largest ring the virtio spec allows (2.7: Queue Size up to 32768).
MAX_QUEUE_SIZE = 32768
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line and exits 1 (not 2 with a usage dump).

    It also remembers which of its options take a value (`value_options`), so that `main`
    can keep a value such as `-1M` from being read as an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.value_options: set[str] = set()
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def _add_action(self, action: _ActionT) -> _ActionT:
        if action.option_strings and action.nargs != 0:
            self.value_options.update(action.option_strings)
        return super()._add_action(action)

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message}\n")


def parse_size(text: str) -> int:
    """'64M', '1G', '512k', '4096' -> bytes (binary multiples); sizes are never negative."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: sizes must be positive "
                                         "(examples: 4096, 64M, 1G)")
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4096, 64M, 1G)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


def positive_int(text: str) -> int:
    """An argparse type: a number above 0 (decimal, or 0x.. / 0o..)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def queue_size(minimum: int) -> Callable[[str], int]:
    """An argparse type: a ring size, a power of two in minimum..MAX_QUEUE_SIZE."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if not minimum <= value <= MAX_QUEUE_SIZE or value & (value - 1):
            raise argparse.ArgumentTypeError(f"must be a power of two in {minimum}.."
                                             f"{MAX_QUEUE_SIZE}, not {value}")
        return value
    return parse


def image_format(text: str) -> str:
    """An argparse type: the image format, which can only be raw."""
    if text != "raw":
        raise argparse.ArgumentTypeError(
            f"invalid format {text!r}: vhostpy serves raw images only (--format raw forces raw; "
            f"convert others with qemu-img convert -O raw)")
    return text


def not_negative(noun: str) -> Callable[[str], int]:
    """An argparse type: a whole number, 0 or more (`noun` names it in the errors)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {noun} {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"invalid {noun} {value}: it must not be "
                                             "negative")
        return value
    return parse


fd_number = not_negative("file descriptor")


def ipv4(text: str) -> str:
    """An argparse type: an IPv4 address, normalised."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IPv4 address {text!r}") from None


def setup_logging(verbosity: int) -> None:
    """Timestamped log lines on stderr: WARNING, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d vhostpy[%(process)d] %(levelname)s "
                        "%(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")


