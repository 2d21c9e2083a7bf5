"""The vhost-user back-ends of a test guest: devices served in-process, or ``vhostpy``
command-line processes, each on its own UNIX socket.

* `DeviceServer` serves `vhostpy.device.Device` objects (a user's own included) on one
  `vhostpy.Server` running on a daemon thread of the test process: a device's state (its
  counters, what the guest wrote) can be asserted on directly.
* `BackendProcess` runs ``python -m vhostpy COMMAND --socket-path PATH ARGS`` (``blk``,
  ``net``, ``rng``, ``serve``), exactly as a user starts it, logging to a file.

Both hand the guest `VhostUserDevice` descriptions (``guest_devices``): the socket and the
QEMU front-end of the device's kind. `wait_for_socket` waits for a back-end's socket.
Closing either stops serving and removes its sockets; nothing here asserts on how a back-end
ended (the caller does). `vhostpy.api` is imported when a device is first served.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vhostpy.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG, Device
from vhostpy.errors import ConfigurationError
from vhostpy.testing.qemu import VhostUserDevice

if TYPE_CHECKING:
    from vhostpy.api import Endpoint, Server

__all__ = ["BackendProcess", "DeviceServer", "ServedDevice", "kind_of", "wait_for_socket"]

#: The QEMU front-end kind of each virtio device id QEMU has a vhost-user front-end for.
KIND_BY_DEVICE_ID = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk", VIRTIO_ID_RNG: "rng"}
#: The kind of each `vhostpy` command's device (``serve`` serves anything: give ``kind``).
KIND_BY_COMMAND = {"blk": "blk", "net": "net", "rng": "rng"}
#: Seconds a back-end process gets to create its socket, and to exit after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def kind_of(device: Device) -> str:
    """``blk``, ``net`` or ``rng`` from the device's virtio device id; ConfigurationError
    for a device id QEMU has no known vhost-user front-end for (give ``kind`` then)."""
    kind = KIND_BY_DEVICE_ID.get(device.device_id)
    if kind is None:
        raise ConfigurationError(
            f"{device.name}: no QEMU vhost-user front-end known for virtio device id "
            f"{device.device_id}; give kind='<QEMU device name>', e.g. 'vhost-user-fs-pci'")
    return kind


def wait_for_socket(path: str | os.PathLike[str], timeout: float = 10.0,
                    proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``path`` is a UNIX socket (a back-end is listening); never connects to it.

    If ``proc`` (the back-end) exits first, raise RuntimeError at once; TimeoutError when the
    socket is not there within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"back-end exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"socket {path} did not appear within {timeout} s")
        time.sleep(0.02)


class ServedDevice:
    """A device served in-process: ``device``, its `vhostpy.api.Endpoint` and the one
    `VhostUserDevice` the guest gets (``guest_devices``)."""

    def __init__(self, device: Device, endpoint: Endpoint, guest_device: VhostUserDevice) -> None:
        self.device = device
        self.endpoint = endpoint
        self.guest_devices = [guest_device]

    @property
    def socket_path(self) -> str:
        """The device's vhost-user socket."""
        return self.guest_devices[0].socket_path

    def __repr__(self) -> str:
        return f"<ServedDevice {self.device.name} on {self.socket_path}>"


class DeviceServer:
    """Devices served on one `vhostpy.Server` on a daemon thread, started by the first
    `serve`; `close` stops it (front-ends dropped, sockets removed, devices not closed)."""

    def __init__(self) -> None:
        self._server: Server | None = None

    def serve(self, device: Device, socket_path: str | os.PathLike[str], *,
              kind: str | None = None, properties: Mapping[str, object] | None = None,
              netdev_properties: Mapping[str, object] | None = None) -> ServedDevice:
        """Serve ``device`` on ``socket_path``; ``kind`` defaults to `kind_of` (device)."""
        if not isinstance(device, Device):
            raise ConfigurationError(f"{device!r} is not a vhostpy.device.Device")
        kind = kind or kind_of(device)
        if self._server is None:
            from vhostpy.api import Server

            self._server = Server()
            endpoint = self._server.add(device, socket_path=socket_path)
            self._server.start_thread()
        else:
            endpoint = self._server.add(device, socket_path=socket_path)
        return ServedDevice(device, endpoint, VhostUserDevice(
            os.fspath(socket_path), kind, dict(properties or {}),
            dict(netdev_properties or {})))

    def close(self) -> None:
        """Stop serving; idempotent."""
        if self._server is not None:
            self._server.stop()


class BackendProcess:
    """``python -m vhostpy COMMAND --socket-path S ... ARGS``, one socket per port, output
    (stdout and stderr) in ``log_path``. Started and waited for (its sockets exist) by the
    constructor; a process that exits first or never listens is a RuntimeError with its
    output."""

    def __init__(self, command: str, args: Sequence[str], socket_paths: Sequence[str],
                 log_path: Path, *, kind: str | None = None,
                 properties: Mapping[str, object] | None = None,
                 netdev_properties: Mapping[str, object] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        kind = kind or KIND_BY_COMMAND.get(command)
        if kind is None:
            raise ConfigurationError(f"vhostpy {command}: give kind= (blk, net, rng or a "
                                     "QEMU vhost-user device name) for its guest device")
        self.command = command
        self.log_path = log_path
        self.guest_devices = [VhostUserDevice(p, kind, dict(properties or {}),
                                              dict(netdev_properties or {}))
                              for p in socket_paths]
        argv = [sys.executable, "-m", "vhostpy", command]
        for p in socket_paths:
            argv += ["--socket-path", p]
        argv += list(args)
        self.argv = argv
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env=None if env is None else dict(env))
        try:
            for p in socket_paths:
                wait_for_socket(p, START_TIMEOUT, self.proc)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"vhostpy {command}: {e}\n--- its output ---\n"
                               f"{self.output()}") from None

    @property
    def socket_path(self) -> str:
        """The (first) vhost-user socket."""
        return self.guest_devices[0].socket_path

    def output(self) -> str:
        """Everything the process printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (if still running), wait (SIGKILL after `STOP_TIMEOUT` s) and return
        the exit status; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __repr__(self) -> str:
        return f"<BackendProcess vhostpy {self.command} pid {self.proc.pid}>"
