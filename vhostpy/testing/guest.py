"""Booting one throw-away QEMU guest and waiting for it: `RunningGuest`, `start_guest`,
`boot_guest`.

Owns: the per-run directory (initrd = the cached base archive + a tiny archive holding
``/test.sh`` and any extra files, ``console.log``, ``qemu.log``), starting QEMU, timeouts
(a guest that outlives its timeout is killed and reported with its console tail), and
turning the serial console into a `GuestResult`.

Never starts a vhost-user back-end (its callers do: tests, `vhostpy.testing.launcher`) and
never imports pytest. Guest contract: the script runs as root under busybox ``sh`` with
/proc, /sys, /dev (devtmpfs), /tmp and /run mounted and the virtio + ext4 modules loaded;
``/init`` prints ``VHOSTPY-GUEST-START`` before the script and ``VHOSTPY-GUEST-EXIT=<rc>``
after it (after ``sync`` and unmounting disk filesystems), then powers off.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vhostpy.testing.accel import detect_accel
from vhostpy.testing.console import GuestResult, normalize, parse_console
from vhostpy.testing.errors import GuestError, GuestTimeout
from vhostpy.testing.initramfs import (
    EXIT_MARKER,
    START_MARKER,
    build_initramfs,
    overlay_archive,
)
from vhostpy.testing.kernel import find_kernel
from vhostpy.testing.qemu import DeviceSpec, VhostUserDevice, find_qemu, qemu_command

__all__ = ["POWEROFF_GRACE", "RunningGuest", "boot_guest", "keep_guest_files", "start_guest"]

#: Seconds QEMU may take to exit after the guest printed its exit marker before we kill it.
POWEROFF_GRACE = 15.0


def keep_guest_files() -> bool:
    """True when ``VHOSTPY_KEEP_GUEST`` asks to keep each run's initrd and logs."""
    return os.environ.get("VHOSTPY_KEEP_GUEST") not in (None, "", "0")


class RunningGuest:
    """A QEMU guest that has been started and not yet reaped.

    Use as a context manager (leaving it kills QEMU if still running and removes the run
    directory), or call `wait` / `kill`.  Set ``VHOSTPY_KEEP_GUEST=1`` to keep the run
    directory (initrd, console.log, qemu.log) for debugging.

    ``blk_sockets``/``net_sockets`` are vhost-user sockets the guest gets as disks and NICs
    (a socket given as ``(path, {props})`` gets its own ``-device`` properties);
    ``devices`` are `VhostUserDevice` objects of any kind, after those. ``blk_options``,
    ``net_options`` and ``netdev_options``: see `qemu_command`. ``files`` adds files to
    the guest's root (``{"data.bin": b".."}``, mode 0755). ``append`` extends the kernel
    command line, ``extra_args`` go to QEMU verbatim. ``accel`` defaults to `detect_accel`;
    ``kernel``/``initramfs`` default to the host's kernel and its cached base archive.
    """

    def __init__(
        self,
        script: str,
        *,
        blk_sockets: Sequence[DeviceSpec] = (),
        net_sockets: Sequence[DeviceSpec] = (),
        devices: Sequence[VhostUserDevice] = (),
        net_options: Mapping[str, object] | None = None,
        blk_options: Mapping[str, object] | None = None,
        netdev_options: Mapping[str, object] | None = None,
        memory_mb: int = 256,
        timeout: float = 120,
        extra_args: Sequence[str] = (),
        append: str = "",
        files: Mapping[str, bytes | str] | None = None,
        accel: str | None = None,
        kernel: Path | None = None,
        initramfs: Path | None = None,
        qemu: str | None = None,
    ) -> None:
        if kernel is None or initramfs is None:
            info = find_kernel()
            kernel = info.vmlinuz
            initramfs = build_initramfs(None, info)
        self.accel = accel or detect_accel()
        self.timeout = timeout
        qemu = qemu or find_qemu()  # fail before creating anything
        self.run_dir = Path(tempfile.mkdtemp(prefix="vhostpy-guest-"))
        self.console_path = self.run_dir / "console.log"
        self.qemu_log_path = self.run_dir / "qemu.log"
        initrd = self.run_dir / "initrd.gz"
        try:
            overlay = {"test.sh": script, **(files or {})}
            initrd.write_bytes(initramfs.read_bytes() + overlay_archive(overlay))
            self.argv = qemu_command(
                kernel=kernel, initrd=initrd, console_path=self.console_path,
                accel=self.accel, blk_sockets=blk_sockets, net_sockets=net_sockets,
                devices=devices, blk_options=blk_options, net_options=net_options,
                netdev_options=netdev_options, memory_mb=memory_mb, append=append,
                extra_args=extra_args, qemu=qemu,
            )
            self.console_path.touch()
            with open(self.qemu_log_path, "wb") as log:
                self.started = time.monotonic()
                self.deadline = self.started + timeout
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    close_fds=True,
                )
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self._result: GuestResult | None = None

    # -- inspection --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    def is_running(self) -> bool:
        """True while QEMU has not exited."""
        return self.proc.poll() is None

    def console_so_far(self) -> str:
        """The whole serial log so far (``\\r\\n`` normalized), kernel lines included."""
        try:
            return normalize(self.console_path.read_bytes())
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        """QEMU's own stdout/stderr so far (its error messages land here)."""
        try:
            return normalize(self.qemu_log_path.read_bytes())
        except FileNotFoundError:
            return ""

    def wait_for_text(self, text: str, timeout: float = 60) -> str:
        """Block until ``text`` appears on the console; return the console so far.

        Raises `GuestTimeout` (QEMU left running) or `GuestError` if QEMU exits
        without printing it.
        """
        deadline = time.monotonic() + timeout
        while True:
            console = self.console_so_far()
            if text in console:
                return console
            if self.proc.poll() is not None:
                console = self.console_so_far()
                if text in console:
                    return console
                raise GuestError(
                    f"QEMU exited ({self.proc.returncode}) before printing {text!r}",
                    console, self.qemu_log(),
                )
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{text!r} not seen within {timeout} s", console)
            time.sleep(0.05)

    def failure(self, what: str) -> GuestError:
        """A `GuestError` about this guest: ``what`` plus QEMU's output and the console."""
        return GuestError(what, self.console_so_far(), self.qemu_log())

    # -- ending ------------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL QEMU now (simulates a crashed front-end) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off and return its result.

        ``timeout`` defaults to what is left of the ``timeout`` given at start.  On expiry
        QEMU is killed and `GuestTimeout` raised with the console tail.  If the guest
        printed its exit marker but QEMU lingers, it is killed after a short grace period and
        the result still returned.
        """
        if self._result is not None:
            return self._result
        deadline = self.deadline if timeout is None else time.monotonic() + timeout
        marker_seen_at: float | None = None
        while self.proc.poll() is None:
            now = time.monotonic()
            if marker_seen_at is None and EXIT_MARKER in self.console_so_far():
                marker_seen_at = now
            if marker_seen_at is not None and now - marker_seen_at > POWEROFF_GRACE:
                self.kill()
                break
            if now > deadline:
                self.kill()
                console = self.console_so_far()
                raise GuestTimeout(
                    f"guest did not finish within {now - self.started:.1f} s "
                    f"(timeout {timeout if timeout is not None else self.timeout} s); "
                    "QEMU killed", console, self.qemu_log(),
                )
            time.sleep(0.05)
        duration = time.monotonic() - self.started
        raw = self.console_so_far()
        code, output = parse_console(raw)
        if code is None:
            where = "after" if START_MARKER in raw else "before"
            raise GuestError(
                f"QEMU exited (code {self.proc.returncode}) {where} the guest script started, "
                "without the guest reporting an exit status", raw, self.qemu_log(),
            )
        self._result = GuestResult(code, output, duration, raw, self.qemu_log())
        return self._result

    def close(self) -> None:
        """Kill QEMU if still running and remove the run directory (unless kept)."""
        self.kill()
        if not keep_guest_files():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_guest(script: str, **options: Any) -> RunningGuest:
    """Start a guest running ``script`` (busybox sh) and return at once.

    Options are `RunningGuest`'s keyword parameters.
    """
    return RunningGuest(script, **options)


def boot_guest(script: str, **options: Any) -> GuestResult:
    """Boot a guest, run ``script``, wait for power-off; options as for `start_guest`.

    Returns the result whatever the script's exit status; raises `GuestTimeout` when
    the guest outlives ``timeout`` and `GuestError` when QEMU fails.
    """
    with start_guest(script, **options) as guest:
        return guest.wait()
