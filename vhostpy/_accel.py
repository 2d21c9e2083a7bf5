"""Which implementation of the hot loops runs: the compiled cffi fast path or pure Python.

Decided once, at import, from the environment variable `VHOSTPY_IMPLEMENTATION`:

* `auto` (the default, also when unset or empty): `cffi` when the extension module
  `vhostpy._native` imports, else `python`;
* `cffi`: the compiled path, or ConfigurationError saying why it cannot be loaded;
* `python`: the pure-Python reference implementation, even when the extension is built.

Anything else is a ConfigurationError naming the valid values. `IMPLEMENTATION` says what was
chosen; `ffi` and `lib` are the extension's objects, or None under `python`. This module
imports only `errors` and `_native`: the fallback needs nothing beyond the standard library
(not even cffi). Modules that have a compiled variant pick it with `lib is not None`.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigurationError

__all__ = ["ENV_VAR", "IMPLEMENTATION", "VALID", "ffi", "lib", "select"]

ENV_VAR = "VHOSTPY_IMPLEMENTATION"
VALID = ("auto", "cffi", "python")


def _load() -> tuple[Any, Any]:
    from . import _native  # type: ignore[attr-defined]  # built at install; may be absent

    return _native.ffi, _native.lib


def select(value: str | None) -> tuple[str, Any, Any]:
    """(implementation, ffi, lib) for a value of `VHOSTPY_IMPLEMENTATION` (None: unset)."""
    choice = (value or "auto").strip().lower()
    if choice not in VALID:
        raise ConfigurationError(
            f"{ENV_VAR}={value!r} is not one of {', '.join(VALID)}"
        )
    if choice == "python":
        return "python", None, None
    try:
        native_ffi, native_lib = _load()
    except ImportError as exc:
        if choice == "cffi":
            raise ConfigurationError(
                f"{ENV_VAR}=cffi but the compiled fast path vhostpy._native cannot be "
                f"loaded: {exc} (reinstall vhostpy with a C compiler and cffi available)"
            ) from exc
        return "python", None, None
    return "cffi", native_ffi, native_lib


IMPLEMENTATION, ffi, lib = select(os.environ.get(ENV_VAR))
