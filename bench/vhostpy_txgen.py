"""vhostpy as a frame GENERATOR toward the guest (the back-end→guest benchmark).

    python -m bench.vhostpy_txgen --socket-path SOCK [--size 64] [--dst-mac MAC]

A `NetApp` (one port, no responder, so nothing else writes to the guest) whose event loop
runs a timer chained with ``call_later(0, ...)``: each turn offers a prebuilt UDP frame
(a `FrameBatch`, made once) with the public ``port.offer(batch, BURST, wait=WAIT)``, which
writes copies into the driver's receive buffers and keeps doing so while the driver posts
more, for up to ``--wait`` seconds (1 ms; the driver's kicks off meanwhile), in one C call
under the compiled path (32 frames per chunk, each published and signalled at once; a
Python loop under the pure-Python one), and queues nothing: like DPDK's txonly, what the
ring cannot take is simply not sent.  Between calls the loop serves its fds once
(``select`` with timeout 0), so the generator spins like txonly does.

SIGTERM/SIGINT: stop, then print one line ``vhostpy-bench: counters {json}`` on stderr
(the port's counters, the frames handed to ``send`` and the implementation) and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import struct
import sys
import time

from bench.common import print_counters
from vhostpy.net import FrameBatch
from vhostpy.netapp import NetApp
from vhostpy.packets import internet_checksum, parse_mac

PORT_MAC = "52:54:00:12:34:56"      # NetApp's first port
BURST = 1 << 20                      # frames offered per loop turn at most
WAIT = 0.001                         # seconds one offer may keep up with the driver


def udp_frame(size: int, dst: str, src: str = PORT_MAC) -> bytes:
    """Ether/IPv4 198.18.0.2 -> 198.18.0.1/UDP 9 -> 9 (checksum 0), zero payload, ``size``
    bytes in all (no FCS): testpmd txonly's template, the other way round."""
    if not 42 <= size <= 1514:
        raise ValueError(f"frame size must be 42..1514, not {size}")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0,
                               bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1])))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    udp = struct.pack("!HHHH", 9, 9, size - 34, 0)
    frame = parse_mac(dst) + parse_mac(src) + b"\x08\x00" + bytes(ip) + udp
    return frame + bytes(size - len(frame))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vhostpy_txgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket-path", required=True)
    parser.add_argument("--size", type=int, default=64, help="frame bytes, no FCS (64)")
    parser.add_argument("--dst-mac", default="02:dd:00:00:00:01")
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--burst", type=int, default=BURST,
                        help=f"frames offered per loop turn at most ({BURST})")
    parser.add_argument("--start-on-sigusr1", action="store_true",
                        help="offer nothing until SIGUSR1 (a test starts the generator once "
                             "its front-end forwards: frames placed while testpmd sets its "
                             "port up are discarded by it, uncounted)")
    parser.add_argument("--wait", type=float, default=WAIT,
                        help=f"seconds one offer keeps placing while the driver posts "
                             f"buffers ({WAIT}; 0: only what the ring takes at once)")
    args = parser.parse_args(argv)

    app = NetApp(socket_paths=[args.socket_path], respond_ip=None, queue_size=args.queue_size)
    port = app.ports[0]
    batch = FrameBatch([udp_frame(args.size, args.dst_mac)])
    burst = args.burst
    wait = args.wait
    sent = 0
    loop = app.loop

    def tick() -> None:
        nonlocal sent
        sent += port.offer(batch, burst, wait=wait)
        loop.call_later(0, tick)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    started_ticking = False

    def start() -> None:
        nonlocal started_ticking
        if not started_ticking:
            started_ticking = True
            loop.call_later(0, tick)
    if args.start_on_sigusr1:
        loop.add_signal_handler(signal.SIGUSR1, start)
    else:
        start()
    started = time.monotonic()
    try:
        app.run()
    finally:
        counters = app.counters()
        app.close()
        counters.update(generator={"size": args.size, "sent": sent,
                                   "seconds": round(time.monotonic() - started, 3)})
        print_counters(counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
