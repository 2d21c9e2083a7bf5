"""vhostpy: virtio device back-ends written in Python.

The package is layered (see ARCHITECTURE in the project docs): a sans-I/O vhost-user
codec (`protocol`), guest memory and virtqueues (`memory`, `virtqueue`), transport-agnostic
devices (`device`, `blk`), the per-connection control plane (`session`), and thin I/O edges
(`loop`, `server`, `cli`).
"""

__version__ = "0.1.0"
