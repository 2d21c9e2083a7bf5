"""The guest kernel: which one boots, and which of its modules the guest loads, in order.

Owns: finding a guest kernel (``/boot/vmlinuz-<ver>`` with a matching ``/lib/modules/<ver>``;
the host's own kernel is usually the best guest, since Debian and Ubuntu build the virtio
drivers it needs), resolving the virtio and ext4 modules of that kernel with their hard
(``modinfo -F depends``) and ``pre:`` soft dependencies, and reading module files
(decompressing .ko.xz / .ko.gz / .ko.zst, which busybox ``insmod`` may not read).

Never builds an archive and never boots anything. Needs from the host: a readable
``/boot/vmlinuz-*`` (Ubuntu installs it mode 0600), ``modinfo`` (kmod) and, for .ko.zst
modules, ``zstd``. Every missing piece is a `GuestImageError` with one line saying what to
install. Stdlib only.
"""

from __future__ import annotations

import gzip
import lzma
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vhostpy.testing.errors import GuestImageError

__all__ = [
    "OPTIONAL_MODULES",
    "REQUIRED_MODULES",
    "KernelInfo",
    "Module",
    "find_kernel",
    "read_module",
    "resolve_modules",
]

#: Modules loaded by /init, in this order (dependencies are pulled in first automatically).
#: A name missing from the kernel is fine when it is built in (modules.builtin).
REQUIRED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
)

#: Modules shipped and loaded (after REQUIRED_MODULES) when this kernel has them, skipped
#: without error when it has neither the module nor a built-in copy. virtio_rng needs
#: rng-core (hw_random), which Debian builds in; where it is a module, `depends` brings it.
OPTIONAL_MODULES = (
    "virtio_rng",
    "virtio_console",
)

#: What a missing kernel takes to install, by distribution.
KERNEL_HINT = ("apt-get install linux-image-amd64 (Debian) or linux-image-generic (Ubuntu), "
               "or set VHOSTPY_GUEST_KERNEL")


@dataclass(frozen=True)
class KernelInfo:
    """A guest kernel and its module tree."""

    version: str
    vmlinuz: Path
    modules_dir: Path


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def find_kernel(version: str | None = None) -> KernelInfo:
    """Find a guest kernel: ``/boot/vmlinuz-<ver>`` with a ``/lib/modules/<ver>`` directory.

    ``VHOSTPY_GUEST_KERNEL`` (a vmlinuz path) and ``VHOSTPY_GUEST_MODULES`` (a modules dir)
    override the search.  Otherwise the running kernel's version wins when installed, else the
    newest.  Raises `GuestImageError` (never skips) when nothing usable exists.
    """
    env_kernel = os.environ.get("VHOSTPY_GUEST_KERNEL")
    env_modules = os.environ.get("VHOSTPY_GUEST_MODULES")
    if env_kernel:
        vmlinuz = Path(env_kernel)
        ver = version or vmlinuz.name.removeprefix("vmlinuz-")
        mods = Path(env_modules) if env_modules else Path("/lib/modules") / ver
        _check_kernel(vmlinuz, mods)
        return KernelInfo(mods.name, vmlinuz, mods)

    candidates: list[KernelInfo] = []
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*")):
        ver = vmlinuz.name.removeprefix("vmlinuz-")
        mods = Path("/lib/modules") / ver
        if (mods / "modules.dep").is_file() or (mods / "kernel").is_dir():
            candidates.append(KernelInfo(ver, vmlinuz, mods))
    if version is not None:
        candidates = [k for k in candidates if k.version == version]
    if not candidates:
        found = ", ".join(p.name for p in Path("/boot").glob("vmlinuz-*")) or "none"
        raise GuestImageError(
            "no guest kernel: need /boot/vmlinuz-<ver> with a matching /lib/modules/<ver> "
            f"(vmlinuz found: {found}): {KERNEL_HINT}"
        )
    running = platform.release()
    chosen = next((k for k in candidates if k.version == running), None)
    if chosen is None:
        chosen = max(candidates, key=lambda k: _version_key(k.version))
    _check_kernel(chosen.vmlinuz, chosen.modules_dir)
    return chosen


def _check_kernel(vmlinuz: Path, modules_dir: Path) -> None:
    if not vmlinuz.is_file():
        raise GuestImageError(f"guest kernel {vmlinuz} does not exist: {KERNEL_HINT}")
    if not os.access(vmlinuz, os.R_OK):
        raise GuestImageError(
            f"guest kernel {vmlinuz} is not readable by this user "
            f"(Ubuntu installs it mode 0600): sudo chmod 0644 {vmlinuz}"
        )
    if not modules_dir.is_dir():
        raise GuestImageError(f"kernel modules directory {modules_dir} does not exist: "
                              f"install the modules of {vmlinuz.name} or set "
                              "VHOSTPY_GUEST_MODULES")


def _modinfo(kver: str, field: str, name: str) -> list[str]:
    modinfo = shutil.which("modinfo") or next(
        (p for p in ("/sbin/modinfo", "/usr/sbin/modinfo") if os.path.exists(p)), None
    )
    if modinfo is None:
        raise GuestImageError("modinfo not found: apt-get install kmod")
    proc = subprocess.run(
        [modinfo, "-k", kver, "-F", field, name], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _builtin_names(kernel: KernelInfo) -> set[str]:
    names: set[str] = set()
    path = kernel.modules_dir / "modules.builtin"
    if path.is_file():
        for line in path.read_text().splitlines():
            base = line.rsplit("/", 1)[-1]
            names.add(re.sub(r"\.ko.*$", "", base).replace("-", "_"))
    return names


def _norm(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True)
class Module:
    """One module file to ship, and whether /init may ignore its failure to load."""

    name: str
    path: Path
    optional: bool


def resolve_modules(
    kernel: KernelInfo,
    names: Iterable[str] = REQUIRED_MODULES,
    optional_names: Iterable[str] = OPTIONAL_MODULES,
) -> list[Module]:
    """Return ``names`` plus their hard (``depends``) and ``pre:`` soft dependencies, deps first.

    Soft dependencies (``softdep pre: crypto-crc32c``) can resolve to several modules, some of
    which cannot load on every CPU; they are shipped as optional. ``optional_names`` follow
    ``names``: each one the kernel has is shipped like a required one (a failure to load it
    is reported), each one it lacks is left out.
    """
    builtin = _builtin_names(kernel)
    order: list[Module] = []
    seen: set[str] = set()

    def visit(name: str, optional: bool, stack: tuple[str, ...]) -> None:
        key = _norm(name)
        if key in seen or key in stack:
            return
        files = _modinfo(kernel.version, "filename", name)
        files = [f for f in files if f != "(builtin)"]
        if not files:
            if key in builtin or optional:
                return
            raise GuestImageError(
                f"kernel module {name!r} not found for kernel {kernel.version} "
                f"(not in {kernel.modules_dir} and not built in)"
            )
        for dep_field in _modinfo(kernel.version, "depends", name):
            for dep in filter(None, dep_field.split(",")):
                visit(dep, optional, stack + (key,))
        for soft in _modinfo(kernel.version, "softdep", name):
            m = re.search(r"pre:\s*(.*?)(?:\s+post:|$)", soft)
            if m:
                for dep in m.group(1).split():
                    visit(dep, True, stack + (key,))
        multiple = len(files) > 1  # an alias (crypto-crc32c) naming several implementations
        for f in files:
            path = Path(f)
            mod_name = _norm(re.sub(r"\.ko.*$", "", path.name))
            if mod_name in seen:
                continue
            if multiple:
                for dep_field in _modinfo(kernel.version, "depends", str(path)):
                    for dep in filter(None, dep_field.split(",")):
                        visit(dep, True, stack + (key,))
            seen.add(mod_name)
            order.append(Module(mod_name, path, optional or multiple))
        seen.add(key)

    names = list(names)
    for n in names:
        visit(n, False, ())
    present: set[str] = set()
    for n in optional_names:
        if _modinfo(kernel.version, "filename", n) or _norm(n) in builtin:
            visit(n, False, ())
            present.add(n)
    # A module asked for explicitly is required even if an alias pulled it in as optional.
    wanted = {_norm(n) for n in [*names, *present]}
    return [Module(m.name, m.path, m.optional and m.name not in wanted) for m in order]


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox ``insmod`` may not read .ko.xz / .ko.zst / .ko.gz."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore[import-not-found]

            return bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 28))
        except ImportError:
            pass
        tool = shutil.which("zstd") or shutil.which("unzstd")
        if tool is None:
            raise GuestImageError(f"{path} is zstd-compressed: apt-get install zstd")
        return subprocess.run(
            [tool, "-d", "-c", "-q"], input=data, capture_output=True, check=True
        ).stdout
    return data
