"""vhostpy: virtio device back-ends written in Python.

The package is layered (see ARCHITECTURE in the project docs): a sans-I/O vhost-user
codec (`protocol`), guest memory and virtqueues (`memory`, `virtqueue`), transport-agnostic
devices (`device`, `blk`), the per-connection control plane (`session`), and thin I/O edges
(`loop`, `server`, `cli`).

The front doors for serving your own `vhostpy.device.Device` (see `vhostpy.api`):
`vhostpy.Server` (several devices on one loop), `vhostpy.serve` (one device until SIGINT or
SIGTERM) and `vhostpy.serve_async` (one device inside a running asyncio loop). They are
loaded on first use, so `import vhostpy` stays cheap.

`implementation` is "cffi" when the compiled fast path runs the hot loops, "python" when
the pure-Python reference does (environment variable VHOSTPY_IMPLEMENTATION: auto, cffi,
python).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vhostpy import _accel

if TYPE_CHECKING:
    from vhostpy.api import Server, serve, serve_async

__all__ = ["Server", "__version__", "implementation", "serve", "serve_async"]

__version__ = "0.1.0"
implementation: str = _accel.IMPLEMENTATION

#: Names of `vhostpy.api` this package exports, imported when first used.
_LAZY = frozenset({"Server", "serve", "serve_async"})


if not TYPE_CHECKING:   # type checkers see the imports above; a module __getattr__ would
    # make every unknown `vhostpy.x` (the optional compiled `_native` too) look like Any.

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            from vhostpy import api

            value = getattr(api, name)
            globals()[name] = value   # later lookups skip this function
            return value
        raise AttributeError(f"module 'vhostpy' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | _LAZY)
