"""Several commands in one boot: a shell loop in the guest, driven over its second serial port.

The guest's ``/test.sh`` is `GUEST_LOOP`: it puts ``/dev/ttyS1`` in raw mode, says it is
ready, then runs each command the host sends (``sh`` in ``/``, stdin ``/dev/null``, stdout
and stderr together) and answers with its exit status and output, until the host says
``exit``. QEMU connects ttyS1 to a UNIX socket that `GuestShell` listens on (created before
QEMU starts, so no race). Wire format, both ways length-prefixed so any bytes pass:

* host → guest: ``run <n>\\n`` then the command's ``n`` bytes; or ``exit <status>\\n``;
* guest → host: ``VHOSTPY-SHELL-READY\\n`` once, then per command
  ``VHOSTPY-SHELL-DONE <status> <n>\\n`` and the ``n`` bytes of output.

Strictly one request at a time: the host sends the next command only after the answer, so
the guest's readers never take bytes meant for the next one. Never boots QEMU itself (see
`vhostpy.testing.launcher`). Stdlib only.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vhostpy.testing.console import console_values
from vhostpy.testing.errors import GuestError, GuestTimeout
from vhostpy.testing.guest import RunningGuest

__all__ = ["GUEST_LOOP", "CommandResult", "GuestShell"]

READY = b"VHOSTPY-SHELL-READY\n"
_DONE = re.compile(rb"VHOSTPY-SHELL-DONE (-?\d+) (\d+)\n")
CHARDEV_ID = "vhostpy-shell"

GUEST_LOOP = r"""# vhostpy guest shell (vhostpy/testing/shell.py): runs what the host sends on ttyS1.
tty=/dev/ttyS1
if ! stty -F "$tty" raw -echo 2>/run/vhostpy-stty.err; then
    echo "vhostpy-shell: cannot set up $tty: $(cat /run/vhostpy-stty.err)"
    exit 125
fi
exec 3<>"$tty"
printf 'VHOSTPY-SHELL-READY\n' >&3
while read -r verb arg <&3; do
    case "$verb" in
    run)
        head -c "$arg" <&3 > /run/vhostpy-cmd.sh
        (cd / && sh /run/vhostpy-cmd.sh) </dev/null >/run/vhostpy-out 2>&1 3>&-
        rc=$?
        n=$(wc -c < /run/vhostpy-out)
        printf 'VHOSTPY-SHELL-DONE %d %d\n' "$rc" "$((n))" >&3
        cat /run/vhostpy-out >&3
        ;;
    exit)
        exit "$arg"
        ;;
    esac
done
echo "vhostpy-shell: $tty closed"
exit 124
"""


@dataclass(frozen=True)
class CommandResult:
    """One command run in the guest: its exit status, its output (stdout and stderr
    together, decoded as UTF-8 with bad bytes replaced) and how long it took."""

    command: str
    exit_code: int
    output_bytes: bytes
    duration: float

    @property
    def output(self) -> str:
        """The output as text."""
        return self.output_bytes.decode("utf-8", "replace")

    @property
    def lines(self) -> list[str]:
        """The output split into lines."""
        return self.output.splitlines()

    @property
    def values(self) -> dict[str, str]:
        """The output's ``key=value`` lines (the last of a key wins)."""
        return console_values(self.output)

    def check(self) -> CommandResult:
        """Return self, or raise `GuestError` (with the output) if the command failed."""
        if self.exit_code != 0:
            raise GuestError(f"guest command exited with {self.exit_code}: {self.command!r}"
                             f"\n--- its output ---\n{self.output[-4000:]}")
        return self


class GuestShell:
    """The host's end of `GUEST_LOOP`: listens on ``socket_path`` for QEMU's ttyS1.

    Give QEMU `qemu_args()`, start the guest with `GUEST_LOOP` as its script, `connect` to
    it, `run` commands as often as needed, then `exit`. While waiting for the guest, QEMU's
    exit is an immediate `GuestError` and a timeout a `GuestTimeout`, both carrying the
    guest's console and QEMU's output.
    """

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = Path(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(self.socket_path))
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._conn: socket.socket | None = None
        self._guest: RunningGuest | None = None
        self._buf = b""

    def qemu_args(self) -> list[str]:
        """QEMU arguments that make ttyS1 a client of this socket (the console is ttyS0)."""
        path = str(self.socket_path).replace(",", ",,")
        return ["-chardev", f"socket,id={CHARDEV_ID},path={path}",
                "-serial", f"chardev:{CHARDEV_ID}"]

    def connect(self, guest: RunningGuest, timeout: float) -> None:
        """Accept ``guest``'s QEMU connection and wait until the guest loop is ready."""
        self._guest = guest
        deadline = time.monotonic() + timeout
        self._listener.settimeout(0.1)
        while self._conn is None:
            try:
                self._conn, _ = self._listener.accept()
            except TimeoutError:
                self._check(deadline, "QEMU's connection to the guest shell")
        self._listener.close()
        self._read_until(re.compile(re.escape(READY)), deadline, "the guest shell to start")
        self._buf = self._buf.split(READY, 1)[1]

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command`` (busybox sh) in the guest and return its result."""
        conn, guest = self._connected()
        started = time.monotonic()
        deadline = started + timeout
        body = command.encode()
        if not body.endswith(b"\n"):
            body += b"\n"
        conn.settimeout(max(timeout, 0.1))
        try:
            conn.sendall(b"run %d\n" % len(body) + body)
        except OSError as e:
            raise guest.failure(f"cannot send a command to the guest shell: {e}") from None
        what = f"the guest command {command!r} to finish"
        m = self._read_until(_DONE, deadline, what)
        code, size = int(m.group(1)), int(m.group(2))
        self._buf = self._buf[m.end():]
        while len(self._buf) < size:
            self._receive(deadline, what)
        output, self._buf = self._buf[:size], self._buf[size:]
        return CommandResult(command, code, output, time.monotonic() - started)

    def exit(self, status: int = 0) -> None:
        """Tell the guest loop to end with ``status`` (the guest then powers off)."""
        conn, _ = self._connected()
        conn.settimeout(5)
        try:
            conn.sendall(b"exit %d\n" % status)
        except OSError:
            pass   # the guest is gone already; its end is read from QEMU, not from here

    def close(self) -> None:
        """Close the sockets and remove the socket file."""
        if self._conn is not None:
            self._conn.close()
        self._listener.close()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    # -- reading -----------------------------------------------------------------------------

    def _connected(self) -> tuple[socket.socket, RunningGuest]:
        if self._conn is None or self._guest is None:
            raise RuntimeError("GuestShell.connect() has not succeeded")
        return self._conn, self._guest

    def _check(self, deadline: float, what: str) -> None:
        guest = self._guest
        if guest is None:
            raise RuntimeError("GuestShell.connect() has not been called")
        if not guest.is_running():
            raise guest.failure(f"QEMU exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise GuestTimeout(f"timed out waiting for {what}", guest.console_so_far(),
                               guest.qemu_log())

    def _receive(self, deadline: float, what: str) -> None:
        conn, guest = self._connected()
        conn.settimeout(0.1)
        try:
            data = conn.recv(1 << 16)
        except TimeoutError:
            self._check(deadline, what)
            return
        if not data:
            raise guest.failure(f"the guest shell closed while waiting for {what}")
        self._buf += data

    def _read_until(self, regex: re.Pattern[bytes], deadline: float,
                    what: str) -> re.Match[bytes]:
        while True:
            m = regex.search(self._buf)
            if m:
                return m
            self._receive(deadline, what)
