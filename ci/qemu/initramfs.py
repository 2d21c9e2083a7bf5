#!/usr/bin/env python3
"""Build (or reuse) the busybox initramfs of vhostpy's QEMU test guests and print its path.

A front door for a checkout: the builder is `vhostpy.testing.initramfs` (the package behind
the pytest plugin; stdlib only), run here from this repository without installing it.
Options: --cache-dir D, --kernel-version V, --force, --print-kernel, --list-modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vhostpy.testing.initramfs import main  # after the path above

if __name__ == "__main__":
    sys.exit(main())
