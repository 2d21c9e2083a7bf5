"""Which accelerator test guests use: KVM when it really works here, TCG otherwise.

``/dev/kvm`` existing is not enough (nested KVM can hang right after "Booting from ROM"), so
a tiny guest is booted under KVM once and must finish within `KVM_PROBE_TIMEOUT`; the answer
is cached per host boot (``accel-<boot_id>`` in the image cache) and per process.
``VHOSTPY_QEMU_ACCEL=tcg|kvm`` skips the detection. Never raises for a missing KVM.
"""

from __future__ import annotations

import os
from pathlib import Path

from vhostpy.testing.errors import GuestError
from vhostpy.testing.initramfs import default_cache_dir

__all__ = ["KVM_PROBE_TIMEOUT", "detect_accel"]

#: Seconds the KVM probe boot may take (a KVM boot takes ~1 s; nested-KVM hangs never finish).
KVM_PROBE_TIMEOUT = 10.0

_accel_cache: str | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_device_usable() -> bool:
    """True when this user can open ``/dev/kvm`` read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_accel() -> str:
    """``tcg`` or ``kvm``: ``VHOSTPY_QEMU_ACCEL`` wins; else KVM only if a probe guest boots."""
    global _accel_cache
    forced = os.environ.get("VHOSTPY_QEMU_ACCEL")
    if forced:
        return forced
    if _accel_cache is not None:
        return _accel_cache
    accel = "tcg"
    if kvm_device_usable():
        marker = default_cache_dir() / f"accel-{_boot_id()}"
        try:
            accel = marker.read_text().strip() or "tcg"
        except OSError:
            accel = "kvm" if _kvm_boots() else "tcg"
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(accel + "\n")
            except OSError:
                pass
    _accel_cache = accel
    return accel


def _kvm_boots() -> bool:
    # The probe is a guest like any other, so it comes from guest.py, which needs this
    # module for its default accelerator: imported here, when a probe is due, not at load.
    from vhostpy.testing.guest import boot_guest

    try:
        return boot_guest("true", timeout=KVM_PROBE_TIMEOUT, accel="kvm").exit_code == 0
    except GuestError:
        return False
