"""vhostpy: virtio device back-ends written in Python.

The package is layered (see ARCHITECTURE in the project docs): a sans-I/O vhost-user
codec (`protocol`), guest memory and virtqueues (`memory`, `virtqueue`), transport-agnostic
devices (`device`, `blk`), the per-connection control plane (`session`), and thin I/O edges
(`loop`, `server`, `cli`).

`implementation` is "cffi" when the compiled fast path runs the hot loops, "python" when
the pure-Python reference does (environment variable VHOSTPY_IMPLEMENTATION: auto, cffi,
python).
"""

from vhostpy import _accel

__version__ = "0.1.0"
implementation: str = _accel.IMPLEMENTATION
