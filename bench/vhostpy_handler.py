"""A user Python handler on the batch API, as the only consumer of a virtio-net port.

    python -m bench.vhostpy_handler --socket-path SOCK

The smallest useful vhostpy program for frames from a guest: a `NetDevice` served by a
`Server` on an `EventLoop`, and ``port.add_handler(count)`` where ``count(port, frames)``
adds ``len(frames)`` (one call per batch of up to 64 frames, frames as ``bytes``).  No
`NetApp`, so no switch, responder or capture: the difference from ``vhostpy net
--no-respond`` (whose switch looks at every frame, then floods it to no one) is their cost.

SIGTERM/SIGINT: stop, print ``vhostpy-bench: counters {json}`` on stderr (the port's
counters, the handler's frame and batch counts, the implementation) and exit 0.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import print_counters, serve_until_signalled
from vhostpy.net import NetDevice, NetPort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vhostpy_handler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket-path", required=True)
    parser.add_argument("--queue-size", type=int, default=1024)
    args = parser.parse_args(argv)

    device = NetDevice(queue_size=args.queue_size, name="port0")
    seen = {"frames": 0, "batches": 0}

    def count(port: NetPort, frames: list[bytes]) -> None:
        seen["frames"] += len(frames)
        seen["batches"] += 1

    device.port.add_handler(count)
    try:
        serve_until_signalled(device, args.socket_path)
    finally:
        print_counters({"ports": [device.port.counters()], "handler": seen})
    return 0


if __name__ == "__main__":
    sys.exit(main())
