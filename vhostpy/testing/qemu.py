"""The QEMU command line of a test guest (a pure function: nothing is started here).

Owns: finding ``qemu-system-x86_64``, the machine (q35 with its RAM in a shared memfd, which
vhost-user needs), the kernel command line, and how each vhost-user socket becomes a virtio
device: `VhostUserDevice` (kind ``blk``: vhost-user-blk-pci; ``net``: a vhost-user netdev
under virtio-net-pci; ``rng``: vhost-user-rng-pci; any other kind is taken as the name of a
QEMU vhost-user device, e.g. ``vhost-user-fs-pci``). Disks appear in the guest as
``/dev/vda``, ``/dev/vdb`` … in the order given; NICs as ``eth0`` … with MAC
``52:54:00:12:34:5<N>`` (`guest_mac`).

Needs from the host: QEMU (``apt-get install qemu-system-x86``). Stdlib only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from vhostpy.testing.errors import GuestImageError

__all__ = [
    "DEFAULT_APPEND",
    "DeviceSpec",
    "VhostUserDevice",
    "find_qemu",
    "guest_mac",
    "qemu_command",
]

DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet printk.time=1"

#: A device socket, optionally with per-device properties: ``"s.sock"`` or ``("s.sock", {...})``.
DeviceSpec = Union[str, "os.PathLike[str]", "tuple[str | os.PathLike[str], Mapping[str, object]]"]

#: QEMU front-ends of the short kinds (``net`` is a netdev plus virtio-net-pci).
QEMU_DEVICES = {"blk": "vhost-user-blk-pci", "rng": "vhost-user-rng-pci"}


@dataclass(frozen=True)
class VhostUserDevice:
    """A vhost-user socket that the guest gets as a virtio device.

    ``kind`` is ``blk``, ``net``, ``rng`` or the name of a QEMU vhost-user device.
    ``properties`` are extra ``-device`` properties (``{"num-queues": 2}``,
    ``{"host_mtu": 9000}``); ``netdev_properties`` go to ``-netdev vhost-user`` (net only,
    e.g. ``{"queues": 2}``); ``chardev_properties`` go to its ``-chardev socket``
    (``{"reconnect": 1}``: QEMU reconnects to a back-end that went away and restarts the
    device on the new connection).
    """

    socket_path: str
    kind: str = "blk"
    properties: Mapping[str, object] = field(default_factory=dict)
    netdev_properties: Mapping[str, object] = field(default_factory=dict)
    chardev_properties: Mapping[str, object] = field(default_factory=dict)


def find_qemu() -> str:
    """Path of ``qemu-system-x86_64`` (``VHOSTPY_QEMU`` overrides); raises GuestImageError."""
    path = os.environ.get("VHOSTPY_QEMU") or shutil.which("qemu-system-x86_64")
    if not path or not os.access(path, os.X_OK):
        raise GuestImageError(
            "qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
            "(or set VHOSTPY_QEMU)"
        )
    return path


def guest_mac(index: int) -> str:
    """MAC address of the ``index``-th NIC: ``52:54:00:12:34:5<index>`` (hex above 9)."""
    return f"52:54:00:12:34:{0x50 + index:02x}"


def _opt_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")  # QEMU option syntax escapes commas by doubling


def _props(props: Mapping[str, object]) -> str:
    return "".join(f",{k}={_opt_value(v)}" for k, v in props.items())


def _from_spec(spec: DeviceSpec, kind: str) -> VhostUserDevice:
    if isinstance(spec, tuple):
        return VhostUserDevice(os.fspath(spec[0]), kind, spec[1])
    return VhostUserDevice(os.fspath(spec), kind)


def qemu_command(
    *,
    kernel: Path,
    initrd: Path,
    console_path: Path,
    accel: str,
    blk_sockets: Sequence[DeviceSpec] = (),
    net_sockets: Sequence[DeviceSpec] = (),
    devices: Sequence[VhostUserDevice] = (),
    blk_options: Mapping[str, object] | None = None,
    net_options: Mapping[str, object] | None = None,
    netdev_options: Mapping[str, object] | None = None,
    memory_mb: int = 256,
    append: str = "",
    extra_args: Sequence[str] = (),
    qemu: str | None = None,
) -> list[str]:
    """The full QEMU argv for one guest (pure function; nothing is started).

    The guest gets ``blk_sockets`` (disks), then ``net_sockets`` (NICs), then ``devices`` in
    their order. ``blk_options`` / ``net_options`` are extra ``-device`` properties of every
    disk / NIC and ``netdev_options`` of every ``-netdev``; a device's own properties win.
    ``qemu`` defaults to `find_qemu`.
    """
    argv = [
        qemu or find_qemu(),
        "-accel", accel,
        "-m", str(memory_mb),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "q35,memory-backend=mem",
        # -nodefaults: no default e1000e NIC / VGA / CD-ROM, so eth0 is our virtio-net.
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{console_path}",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", f"{DEFAULT_APPEND} {append}".strip(),
    ]
    every = ([_from_spec(s, "blk") for s in blk_sockets]
             + [_from_spec(s, "net") for s in net_sockets] + list(devices))
    counts: dict[str, int] = {}
    for dev in every:
        name = dev.kind if dev.kind in ("blk", "net", "rng") else "vu"
        i = counts[name] = counts.get(name, -1) + 1
        chardev = f"{name}{i}"
        socket_opts = (f"socket,id={chardev},path={_opt_value(dev.socket_path)}"
                       f"{_props(dev.chardev_properties)}")
        argv += ["-chardev", socket_opts]
        if dev.kind == "net":
            # vectors=0 (INTx): QEMU 7.2 (Debian 12) segfaults in vhost_net_start while wiring
            # MSI-X vector notifiers for vhost-user net, with any back-end (DPDK's too).
            props = {"mac": guest_mac(i), "vectors": 0, **(net_options or {}),
                     **dev.properties}
            netdev = {**(netdev_options or {}), **dev.netdev_properties}
            argv += [
                "-netdev", f"vhost-user,id=hn{i},chardev={chardev}{_props(netdev)}",
                "-device", f"virtio-net-pci,netdev=hn{i}{_props(props)}",
            ]
            continue
        props = dict(dev.properties)
        if dev.kind == "blk":
            props = {"num-queues": 1, **(blk_options or {}), **props}
        model = QEMU_DEVICES.get(dev.kind, dev.kind)
        argv += ["-device", f"{model},chardev={chardev}{_props(props)}"]
    argv += list(extra_args)
    return argv
