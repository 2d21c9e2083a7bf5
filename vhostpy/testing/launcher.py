"""Guests with vhostpy devices, for a test: `GuestLauncher` (what the ``vhostpy_guest``
fixture gives) and `Guest` (a booted guest that runs commands).

A launcher serves devices (in-process `Device` objects, ``vhostpy`` command-line processes,
or any vhost-user socket as a `VhostUserDevice`), boots guests on them, and on `close`
kills its guests, stops its back-ends and removes its sockets, whatever state the test left
them in. `GuestLauncher.start` boots a guest whose ``/test.sh`` is the shell loop of
`vhostpy.testing.shell` (many commands, one boot); `GuestLauncher.boot` runs one script per
boot and returns its `GuestResult`. Never imports pytest (`vhostpy.testing.plugin` does).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from vhostpy.device import Device
from vhostpy.errors import ConfigurationError
from vhostpy.testing.backends import BackendProcess, DeviceServer, ServedDevice
from vhostpy.testing.console import GuestResult
from vhostpy.testing.errors import GuestError
from vhostpy.testing.guest import RunningGuest
from vhostpy.testing.image import GuestImage
from vhostpy.testing.qemu import VhostUserDevice
from vhostpy.testing.shell import GUEST_LOOP, CommandResult, GuestShell

__all__ = ["Guest", "GuestDeviceLike", "GuestLauncher"]

#: What `GuestLauncher.start` and `boot` accept as a guest's device.
GuestDeviceLike = Device | ServedDevice | BackendProcess | VhostUserDevice

#: Default seconds for a guest to boot (TCG takes ~5 s; slow CI machines much longer), for
#: one command, and for a whole one-script guest.
BOOT_TIMEOUT = 120.0
COMMAND_TIMEOUT = 60.0
SCRIPT_TIMEOUT = 180.0
#: Seconds a guest may take to power off after its shell loop ended.
SHUTDOWN_TIMEOUT = 60.0
#: A bound on an interactive guest's QEMU if nothing ends it earlier (the launcher does).
LIFETIME = 24 * 3600.0


class Guest:
    """A booted guest whose shell runs commands: `run` as often as needed, then `shutdown`
    (clean power-off, returns its `GuestResult`) or `kill`. The launcher kills what is left
    when the test ends."""

    def __init__(self, running: RunningGuest, shell: GuestShell, command_timeout: float,
                 console_copy: Path) -> None:
        self.running = running
        self.shell = shell
        self.command_timeout = command_timeout
        self._console_copy = console_copy
        self._closed = False

    @property
    def accel(self) -> str:
        """``kvm`` or ``tcg``."""
        return self.running.accel

    @property
    def argv(self) -> list[str]:
        """QEMU's command line."""
        return self.running.argv

    def console(self) -> str:
        """The serial console so far (kernel messages included)."""
        return self.running.console_so_far()

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` (busybox ``sh``, in ``/``, stdin ``/dev/null``) and return its exit
        status and output; a failing command is a result, not an error. `GuestTimeout` (the
        guest is killed) when it takes longer than ``timeout`` (default `command_timeout`),
        `GuestError` when QEMU dies meanwhile."""
        if self._closed:
            raise GuestError(f"this guest was shut down; cannot run {command!r}")
        try:
            return self.shell.run(command, self.command_timeout if timeout is None else timeout)
        except GuestError:
            self.kill()
            raise

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> GuestResult:
        """End the shell loop and wait for the guest to sync, unmount its disks and power off.
        `GuestTimeout` (QEMU killed) when it takes longer than ``timeout``."""
        if not self._closed:
            self.shell.exit(0)
        try:
            return self.running.wait(timeout=timeout)
        finally:
            self.close()

    def kill(self) -> None:
        """Kill QEMU now (a crashed front-end, as far as the back-ends can tell)."""
        self.running.kill()

    def close(self) -> None:
        """Kill QEMU if it still runs, keep a copy of the console beside the test's files,
        remove the run directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.running.kill()
        try:
            self._console_copy.write_text(self.console())
        except OSError:
            pass
        self.shell.close()
        self.running.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.running.is_running() else "ended"
        return f"<Guest pid {self.running.pid} ({self.accel}): {state}>"


class GuestLauncher:
    """Serves devices and boots guests on them; `close` cleans everything up.

    ``image`` is what guests boot (`vhostpy.testing.image.guest_image`); ``log_dir`` keeps
    back-end logs and the consoles of closed guests. Sockets live in a short private
    directory of their own (a UNIX socket path is limited to 107 bytes, a test's tmp_path can
    be longer).
    """

    def __init__(self, image: GuestImage, log_dir: Path) -> None:
        self.image = image
        self.log_dir = log_dir
        self.socket_dir = Path(tempfile.mkdtemp(prefix="vhostpy-"))
        self._server = DeviceServer()
        self._processes: list[BackendProcess] = []
        self._guests: list[Guest] = []
        self._names: set[str] = set()

    # -- devices -----------------------------------------------------------------------------

    def _name(self, stem: str) -> str:
        n = 0
        while f"{stem}{n}" in self._names:
            n += 1
        self._names.add(f"{stem}{n}")
        return f"{stem}{n}"

    def serve(self, device: Device, *, kind: str | None = None,
              properties: Mapping[str, object] | None = None,
              netdev_properties: Mapping[str, object] | None = None) -> ServedDevice:
        """Serve ``device`` in this process (on a thread) for guests to come.

        ``kind`` (``blk``, ``net``, ``rng`` or a QEMU vhost-user device name) defaults to
        what the device's ``device_id`` says; ``properties`` / ``netdev_properties`` are its
        extra QEMU ``-device`` / ``-netdev`` properties. Passing a `Device` to `start` or
        `boot` serves it this way with the defaults.
        """
        path = self.socket_dir / f"{self._name(kind or 'dev')}.sock"
        return self._server.serve(device, path, kind=kind, properties=properties,
                                  netdev_properties=netdev_properties)

    def backend(self, command: str, *args: str, kind: str | None = None, ports: int = 1,
                properties: Mapping[str, object] | None = None,
                netdev_properties: Mapping[str, object] | None = None) -> BackendProcess:
        """Start ``vhostpy COMMAND --socket-path S ARGS`` (``ports`` sockets, for ``net``),
        the way a user runs it, and wait until it listens. Its output goes to
        ``<log_dir>/<name>.log``; `BackendProcess.stop` returns its exit status."""
        if ports < 1:
            raise ConfigurationError(f"ports must be at least 1, not {ports}")
        name = self._name(command)
        paths = [str(self.socket_dir / f"{name}-{i}.sock") for i in range(ports)]
        proc = BackendProcess(command, args, paths, self.log_dir / f"{name}.log", kind=kind,
                              properties=properties, netdev_properties=netdev_properties)
        self._processes.append(proc)
        return proc

    def _guest_devices(self, devices: Sequence[GuestDeviceLike]) -> list[VhostUserDevice]:
        out: list[VhostUserDevice] = []
        for dev in devices:
            if isinstance(dev, Device):
                out += self.serve(dev).guest_devices
            elif isinstance(dev, (ServedDevice, BackendProcess)):
                out += dev.guest_devices
            elif isinstance(dev, VhostUserDevice):
                out.append(dev)
            else:
                raise ConfigurationError(
                    f"{dev!r} is not a guest device (a vhostpy Device, a served device, a "
                    "back-end process or a VhostUserDevice)")
        return out

    # -- guests ------------------------------------------------------------------------------

    def start(self, *devices: GuestDeviceLike, files: Mapping[str, bytes | str] | None = None,
              memory_mb: int = 256, boot_timeout: float = BOOT_TIMEOUT,
              command_timeout: float = COMMAND_TIMEOUT, qemu_args: Sequence[str] = (),
              append: str = "") -> Guest:
        """Boot a guest with ``devices`` and return it once its shell is ready.

        Disks are ``/dev/vda`` … and NICs ``eth0`` … in the order given (NICs are down).
        ``files`` are added to the guest's root (``{"bin/tool": data}``, mode 0755;
        `vhostpy.testing.host_binary` makes them from a host program). ``qemu_args`` go to
        QEMU verbatim, ``append`` to the kernel command line.
        """
        guest_devices = self._guest_devices(devices)
        name = self._name("guest")
        shell = GuestShell(self.socket_dir / f"{name}-shell.sock")
        try:
            running = self._start(GUEST_LOOP, guest_devices, files, memory_mb, LIFETIME,
                                  [*shell.qemu_args(), *qemu_args], append)
        except BaseException:
            shell.close()
            raise
        guest = Guest(running, shell, command_timeout, self.log_dir / f"{name}.console.log")
        self._guests.append(guest)
        try:
            shell.connect(running, boot_timeout)
        except BaseException:
            guest.close()
            raise
        return guest

    __call__ = start

    def boot(self, script: str, *devices: GuestDeviceLike,
             files: Mapping[str, bytes | str] | None = None, memory_mb: int = 256,
             timeout: float = SCRIPT_TIMEOUT, qemu_args: Sequence[str] = (),
             append: str = "") -> GuestResult:
        """Boot a guest with ``devices``, run ``script`` (busybox ``sh``) as its ``/test.sh``
        and return its `GuestResult` once it powered off (whatever the script's status).
        `GuestTimeout` when it takes longer than ``timeout``, `GuestError` when QEMU fails."""
        with self._start(script, self._guest_devices(devices), files, memory_mb, timeout,
                         qemu_args, append) as running:
            return running.wait()

    def _start(self, script: str, devices: list[VhostUserDevice],
               files: Mapping[str, bytes | str] | None, memory_mb: int, timeout: float,
               qemu_args: Sequence[str], append: str) -> RunningGuest:
        image = self.image
        return RunningGuest(script, devices=devices, files=files, memory_mb=memory_mb,
                            timeout=timeout, extra_args=qemu_args, append=append,
                            accel=image.accel, kernel=image.kernel.vmlinuz,
                            initramfs=image.initramfs, qemu=image.qemu)

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every guest, stop every back-end (processes: SIGTERM, then SIGKILL), remove
        the sockets. Never raises for what the test left behind; idempotent."""
        for guest in self._guests:
            guest.close()
        self._guests.clear()
        for proc in self._processes:
            proc.stop()
        self._processes.clear()
        self._server.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
