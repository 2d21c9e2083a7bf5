"""`vhostpy rng` serving a real QEMU guest's virtio-rng driver (vhost-user-rng-pci).

The guest (busybox initramfs, ``virtio_rng`` loaded by /init) reads ``/dev/hwrng``, which the
hw_random core fills from our device only; the checks are that the bytes arrived, in the
number asked for, are not constant, and that the kernel picked ``virtio_rng`` as its current
hardware RNG. The back-end is the ``backend`` fixture's process: on teardown it must exit 0
on SIGTERM and remove its socket.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qemu_guest

GUEST_TIMEOUT = 120


def rng_args(socket_path: str, index: int = 0, **props: object) -> list[str]:
    """QEMU arguments for a vhost-user-rng-pci device on `socket_path` (chardev rng<index>)."""
    extra = "".join(f",{k}={v}" for k, v in props.items())
    return ["-chardev", f"socket,id=rng{index},path={socket_path}",
            "-device", f"vhost-user-rng-pci,chardev=rng{index}{extra}"]


#: Each device in turn: virtio0 and virtio1 are the two rng devices in PCI order.
SCRIPT = r"""
echo "available=$(cat /sys/class/misc/hw_random/rng_available)"
echo "default=$(cat /sys/class/misc/hw_random/rng_current)"
for i in 0 1; do
    echo "virtio_rng.$i" > /sys/class/misc/hw_random/rng_current
    echo "irq$i=$(grep "virtio$i" /proc/interrupts | head -n1)"
    echo "current$i=$(cat /sys/class/misc/hw_random/rng_current)"
    dd if=/dev/hwrng bs=64 count=4 2>/dev/null > /tmp/r1
    dd if=/dev/hwrng bs=64 count=4 2>/dev/null > /tmp/r2
    echo "len$i=$(wc -c < /tmp/r1) $(wc -c < /tmp/r2)"
    echo "hex$i=$(od -An -v -tx1 /tmp/r1 | tr -d ' \n') $(od -An -v -tx1 /tmp/r2 | tr -d ' \n')"
    # A larger read: the hw_random core asks in rng_buffer_size() pieces (at least 32 bytes).
    echo "big$i=$(dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c)"
done
"""


@pytest.mark.qemu
def test_guest_reads_hwrng_from_vhostpy_rng(backend) -> None:
    """One guest, two `vhostpy rng` back-ends: QEMU 7.2 gives vhost-user-rng-pci one MSI-X
    vector by default and Linux needs two (config + queue), so the first falls back to INTx;
    the second has `vectors=2` and gets MSI-X. The guest reads each in turn."""
    qemu_guest.require_qemu()
    intx = backend("rng", name="intx.sock")
    msix = backend("rng", name="msix.sock")
    result = qemu_guest.boot_guest(
        SCRIPT, extra_args=rng_args(intx.path, 0) + rng_args(msix.path, 1, vectors=2),
        timeout=GUEST_TIMEOUT)
    logs = intx.output() + msix.output()
    assert result.exit_code == 0, result.raw_console + result.qemu_log + logs
    v = qemu_guest.console_values(result.console)
    assert v.get("default", "").startswith("virtio_rng."), result.raw_console
    assert "virtio_rng.0" in v["available"] and "virtio_rng.1" in v["available"]
    for i, irq in ((0, "IO-APIC"), (1, "PCI-MSI")):
        assert v[f"current{i}"] == f"virtio_rng.{i}", result.console
        assert v[f"len{i}"] == "256 256", result.console
        one, two = (bytes.fromhex(h) for h in v[f"hex{i}"].split())
        assert len(one) == len(two) == 256
        assert len(set(one)) > 64, one.hex()              # not all equal, not a short cycle
        assert one != two
        assert v[f"big{i}"] == str(16 * 4096)
        assert irq in v[f"irq{i}"], v[f"irq{i}"]
    assert intx.alive() and msix.alive(), logs


@pytest.mark.qemu
def test_one_backend_serves_two_guests_in_a_row(backend) -> None:
    """The rng back-end outlives a guest and serves the next one (reconnect after reset)."""
    qemu_guest.require_qemu()
    be = backend("rng", "--max-bytes-per-request", "16")
    pid = be.proc.pid
    hexes = []
    for _ in range(2):
        result = qemu_guest.boot_guest(
            'echo "hex=$(dd if=/dev/hwrng bs=64 count=2 2>/dev/null | od -An -v -tx1 '
            "| tr -d ' \\n')\"\n",
            extra_args=rng_args(be.path), timeout=GUEST_TIMEOUT)
        assert result.exit_code == 0, result.raw_console + be.output()
        data = bytes.fromhex(qemu_guest.console_values(result.console)["hex"])
        assert len(data) == 128                         # many 16-byte partial fills
        hexes.append(data)
        assert be.alive() and be.proc.pid == pid, be.output()
    assert hexes[0] != hexes[1]
