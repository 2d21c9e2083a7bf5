"""vhostpy devices with the migration dirty log always on, to measure what logging costs.

    python -m bench.vhostpy_dirtylog blk --socket-path SOCK --image FILE [--dirty-log]
    python -m bench.vhostpy_dirtylog net --socket-path SOCK [--reflect] [--dirty-log]

A front-end turns logging on only while it migrates (VHOST_F_LOG_ALL and SET_LOG_BASE);
neither the benchmark's QEMU guests nor DPDK's virtio-user do that on their own. Here the
device installs a log itself when each ring starts (`Virtqueue.set_dirty_log`, the same
call the session makes for a migrating front-end): a private bitmap covering all of guest
memory, used ring included, so every completion does exactly the work it does during a
migration (the chain walked again, one atomic OR per written page, the used ring's pages)
minus the front-end's collecting. Without ``--dirty-log`` the same program serves the same
device without a log: the pair, run alternately in one benchmark, is the cost.

blk: a `BlockDevice` over the raw image (the compiled path when it is in use). net: a
`NetDevice` whose frames from the guest are counted and dropped, or reflected
(``--reflect``, MACs swapped). SIGTERM/SIGINT: stop, print ``vhostpy-bench: counters
{json}`` on stderr (dirty pages in the logs, implementation) and exit 0.
"""

from __future__ import annotations

import argparse
import mmap
import sys
from typing import Any

from bench.common import print_counters, serve_until_signalled
from vhostpy.blk import BlockDevice
from vhostpy.dirtylog import DirtyLog, log_size
from vhostpy.net import NetDevice
from vhostpy.stores import FileStore
from vhostpy.virtqueue import Virtqueue


class AlwaysLogging:
    """Installs one dirty log, sized to guest memory, on every ring a device starts."""

    def __init__(self) -> None:
        self.logs: list[DirtyLog] = []

    def install(self, vq: Virtqueue) -> None:
        end = max((r.guest_phys_addr + r.size for r in vq.memory.regions), default=0)
        region = mmap.mmap(-1, max(1, log_size(end)))
        log = DirtyLog(memoryview(region))
        self.logs.append(log)
        vq.set_dirty_log(log, vq.used_addr)

    def dirty_pages(self) -> int:
        """Bits set in every log (C sets them without counting)."""
        return sum(int.from_bytes(log.view, "little").bit_count() for log in self.logs)


def logging_device(base: type[Any], logging: AlwaysLogging | None) -> type[Any]:
    """`base` (a Device class) whose rings get `logging`'s log when they start."""
    if logging is None:
        return base

    class Logged(base):  # type: ignore[misc, valid-type]
        def queue_started(self, index: int, vq: Virtqueue) -> None:
            logging.install(vq)
            super().queue_started(index, vq)

    return Logged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vhostpy_dirtylog", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("blk", "net"))
    parser.add_argument("--socket-path", required=True)
    parser.add_argument("--image", help="blk: the raw image")
    parser.add_argument("--reflect", action="store_true", help="net: reflect frames")
    parser.add_argument("--dirty-log", action="store_true", help="log every write")
    args = parser.parse_args(argv)
    logging = AlwaysLogging() if args.dirty_log else None
    device: Any
    if args.kind == "blk":
        if not args.image:
            parser.error("blk needs --image")
        device = logging_device(BlockDevice, logging)(FileStore.open(args.image))
    else:
        device = logging_device(NetDevice, logging)(queue_size=1024, name="port0")
        device.port.set_consumer("reflect" if args.reflect else None)
    try:
        serve_until_signalled(device, args.socket_path)
    finally:
        close = getattr(device, "close", None)
        if close is not None:
            close()
        print_counters({"dirty_log": args.dirty_log,
                        "dirty_pages": logging.dirty_pages() if logging else 0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
