"""Interrupts per I/O an lguest guest takes at a queue depth: the lguest guest driver model
(`vhostpy.lguest_guest`) against the bridge, in one process.

The model plays Linux's virtio_blk under a streaming reader (fio at iodepth N): it keeps
`--depth` 4 KiB reads in flight and learns about completions only from interrupts; its
interrupt handler takes the used entries at once and re-arms used_event (`virtblk_done`),
and the submitter dispatches each replacement request on its own, kicking when the ring asks
for it, as blk-mq does without plugging (`--batch-refill`: all at once, one kick). The host (`lguest_host.SharedMemoryHost`) runs its loop on
a second thread, which is where the rings' polling and interrupt-coalescing timers run since
the bridge uses the vring runner; `--no-loop` serves without one (every batch interrupted at
once, as lguest guests were before the runner). Prints one JSON line.

    python -m bench.lguest_irqs --depth 32 --requests 3000
"""

from __future__ import annotations

import argparse
import json
import struct
import threading
import time

from vhostpy.blk import BlockDevice
from vhostpy.lguest_guest import LguestGuestDriver
from vhostpy.lguest_host import SharedMemoryHost
from vhostpy.loop import EventLoop

RAM = 64 << 20
DISK = 16 << 20
HDR = struct.Struct("<IIQ")     # type, ioprio, sector
T_IN = 0
BLOCK = 4096


def run(depth: int, requests: int, loop_on: bool, batch_refill: bool) -> dict[str, object]:
    host = SharedMemoryHost(RAM, device_pages=64)
    dev = BlockDevice.in_memory(DISK)
    host.add_device(dev)
    interrupts = 0
    fired = threading.Event()
    done: list[object] = []
    ring_box: list[object] = []

    def on_irq(irq: int) -> None:
        # Called under the bridge's lock (from a notify or the loop's thread): the handler.
        nonlocal interrupts
        interrupts += 1
        if ring_box:
            done.extend(ring_box[0].collect())     # type: ignore[attr-defined]
        fired.set()

    host.on_irq(on_irq)
    loop = EventLoop()
    thread = None
    if loop_on:
        host.attach(loop)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
    drv = LguestGuestDriver(host.memory, RAM, host.notify)
    blk = drv.blk()
    ring = blk.rings[0]
    ring_box.append(ring)
    sectors = DISK // 512 - BLOCK // 512
    submitted = completed = 0
    start = time.monotonic()
    try:
        def submit() -> None:
            nonlocal submitted
            sector = (submitted * 977) % sectors
            with host.bridge.lock:
                ring.add([HDR.pack(T_IN, 0, sector)], [BLOCK, 1])
                submitted += 1

        for _ in range(min(depth, requests)):
            submit()
        ring.kick()
        while completed < requests:
            if not fired.wait(5.0):
                raise TimeoutError(f"no interrupt for 5 s ({completed}/{requests} done)")
            fired.clear()
            with host.bridge.lock:
                taken = len(done)
                done.clear()
            completed += taken
            for _ in range(taken):
                if submitted < requests:
                    submit()
                    if not batch_refill:
                        ring.kick()
            ring.kick()
    finally:
        elapsed = time.monotonic() - start
        if thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        host.close()
        loop.close()
        dev.close()
    return {"depth": depth, "requests": requests, "loop": loop_on,
            "batch_refill": batch_refill, "interrupts": interrupts,
            "interrupts_per_io": round(interrupts / requests, 3),
            "kicks": ring.kicks, "seconds": round(elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--no-loop", action="store_true", help="serve without a loop")
    parser.add_argument("--batch-refill", action="store_true",
                        help="refill after each interrupt with one kick, not one per request")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.repeat):
        print(json.dumps(run(args.depth, args.requests, not args.no_loop, args.batch_refill)),
              flush=True)


if __name__ == "__main__":
    main()
