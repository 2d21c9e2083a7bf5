"""Testing guest software against a virtio device written in Python: vhostpy's pytest plugin.

With vhostpy installed, pytest finds the plugin by itself (its ``pytest11`` entry point), so
this file is all a project needs: ``pytest test_guest_plugin.py``. The host needs QEMU, a
guest kernel readable by the test user and busybox-static (see the README's "Testing guest
software" for the packages and a GitHub Actions workflow).
"""

from pathlib import Path

from vhostpy.device import VIRTIO_ID_RNG, Device
from vhostpy.testing import GuestLauncher
from vhostpy.virtqueue import DescriptorChain, Virtqueue

PATTERN = b"vhostpy!"


class PatternRng(Device):
    """A virtio-rng device (QEMU's vhost-user-rng-pci) that fills every buffer with PATTERN
    repeated, so the test knows exactly what the guest must read from /dev/hwrng."""

    device_id = VIRTIO_ID_RNG
    name = "pattern-rng"
    num_queues = 1

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        self.requests += 1
        size = min(chain.writable_len, 4096)
        return chain.write((PATTERN * (size // len(PATTERN) + 1))[:size])


def test_guest_sees_our_devices(vhostpy_guest: GuestLauncher, tmp_path: Path) -> None:
    rng = PatternRng()                                   # served by this test process
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    blk = vhostpy_guest.backend("blk", "--image", str(disk))  # `vhostpy blk`, a process
    guest = vhostpy_guest(rng, blk)      # boots QEMU: the rng, and the disk as /dev/vda

    current = guest.run("cat /sys/class/misc/hw_random/rng_current")
    assert current.exit_code == 0, current.output
    assert current.output.strip() == "virtio_rng.0"

    read = guest.run("dd if=/dev/hwrng bs=64 count=1 2>/dev/null")
    assert len(read.output_bytes) == 64
    assert read.output_bytes in PATTERN * 10             # every byte came from PatternRng
    assert rng.requests > 0

    missing = guest.run("cat /no/such/file")
    assert missing.exit_code == 1 and "No such file" in missing.output

    wrote = guest.run("echo 'hello from the guest' | dd of=/dev/vda conv=fsync")
    assert wrote.exit_code == 0, wrote.output
    assert guest.shutdown().exit_code == 0               # a clean power-off
    assert disk.read_bytes().startswith(b"hello from the guest\n")
    assert blk.stop() == 0                               # `vhostpy blk` exits cleanly
