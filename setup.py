"""Build hook for the optional compiled fast path (`vhostpy._native`, via cffi).

Everything else is in pyproject.toml. A failed compile (no C compiler, no Python headers)
is a warning, not an error: the package installs and runs on its pure-Python fallback.
"""

from __future__ import annotations

import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a compile failure into a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"
            _warn(exc)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _warn(exc)


def _warn(exc: BaseException) -> None:
    print(f"WARNING: vhostpy's compiled fast path was not built ({exc}); "
          "the pure-Python implementation will be used", file=sys.stderr)


setup(cffi_modules=["vhostpy/_native_build.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
