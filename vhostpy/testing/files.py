"""Host programs for the busybox guest: a binary with every shared library it needs.

`host_binary` copies a host executable, each library ``ldd`` lists and the dynamic loader
into one guest directory and returns the command that runs it through that loader, so the
initramfs needs no /lib64 layout (a static binary runs as is). Needs ``ldd`` (libc-bin) on
the host. Stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from vhostpy.testing.errors import GuestImageError

__all__ = ["host_binary"]


def host_binary(path: str, dest: str) -> tuple[dict[str, bytes], str]:
    """A host program for the busybox guest: the binary, every shared library ``ldd`` lists
    and the dynamic loader, all under ``/<dest>/``.

    ``path`` may be a name on PATH. Returns the ``files=`` entries and the guest command that
    runs the program. A program or library missing on the host raises GuestImageError.
    """
    found = path if os.sep in path else shutil.which(path)
    if not found or not os.path.isfile(found):
        raise GuestImageError(f"{path}: no such program on this host")
    name = os.path.basename(found)
    files = {f"{dest}/{name}": Path(found).read_bytes()}
    ldd_path = shutil.which("ldd")
    if ldd_path is None:
        raise GuestImageError("ldd not found: apt-get install libc-bin")
    ldd = subprocess.run([ldd_path, found], capture_output=True, text=True,
                         check=False).stdout
    loader = None
    for line in ldd.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)
        if m:
            files[f"{dest}/{m.group(1)}"] = Path(m.group(2)).read_bytes()
            continue
        m = re.match(r"\s*(/\S*ld-linux\S*)\s", line)
        if m:
            loader = m.group(1)
        elif "not found" in line:
            raise GuestImageError(f"{name}: shared library missing on the host: {line.strip()}")
    if loader is None:
        return files, f"/{dest}/{name}"
    files[f"{dest}/ld.so"] = Path(loader).read_bytes()
    return files, f"/{dest}/ld.so --library-path /{dest} /{dest}/{name}"
