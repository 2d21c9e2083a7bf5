"""Python-level block benchmark: requests per second through vhostpy's Python block store.

No guest, no socket, no vhost-user session: a :class:`vhostpy.blk.BlockDevice` is driven
in-process exactly as a transport drives it — a :class:`vhostpy.virtqueue.Virtqueue` over
anonymous "guest" memory, filled by the driver-side ring model of ``tests/ringbuilder.py``
(imported from ``tests/``, not copied).  The driver publishes a batch of 64 requests
(4 KiB reads at random 4 KiB-aligned offsets: a 16-byte header, a 4 KiB data buffer and a
status byte each), then the device drains the ring (``process_queue``: pop, ``preadv``
into guest memory, used entries, one ``signal_used`` per batch onto a real eventfd), and
the driver reclaims its descriptors.  Only the device side is timed — the driver model is
Python too and much slower than a guest's driver.

Cases: an image file (``BlockDevice.open_image``, page-cached) and
``BlockDevice.in_memory`` (a memfd).  Every record says ``implementation``: the
``vhostpy.implementation`` attribute when the package has one, else ``"pure-python"``.

Public API for ``bench/run.py``: :func:`add_arguments`, :func:`run_python`.
Standalone: ``python bench/python_level.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(REPO_ROOT), str(REPO_ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ringbuilder import RingBuilder, anon_memory, layout

import vhostpy  # the path is set just above
from vhostpy.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, BlockDevice
from vhostpy.notifier import EventFdNotifier
from vhostpy.vring import DefaultVirtqueue, Vring

BATCH = 64
BLOCK = 4096
RING_SIZE = 256
IMAGE_MB = 64
DEFAULT_SECONDS = 2.0  # device time per repetition
QUICK_SECONDS = 0.5
DEFAULT_REPETITIONS = 5
_HDR = struct.Struct("<IIQ")

CASES = ("file", "memory")

#: Shown above the Python-level table by ``bench/run.py``.
NOTES = {"python": (
    "Block store: vhostpy's BlockDevice driven in-process through a Virtqueue (no guest, no "
    "socket): batches of 64 4 KiB reads at random offsets published by a Python driver model "
    "(tests/ringbuilder.py), then one process_queue per batch; only the device side is timed. "
    "CPU per I/O is the bench process's CPU time in that side per request."
)}


def implementation() -> str:
    """What executes the rings: the package's own answer, else pure Python."""
    return str(getattr(vhostpy, "implementation", "pure-python"))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The Python-level benchmark's options, for ``bench/run.py`` (all have defaults)."""
    g = ap.add_argument_group("python-level (in-process block store)")
    g.add_argument("--python-seconds", type=float, default=None, metavar="S",
                   help=f"timed device seconds per repetition (default {DEFAULT_SECONDS:g}, "
                        f"--quick {QUICK_SECONDS:g})")
    g.add_argument("--python-workdir", default=None, metavar="DIR",
                   help="directory for the image file of the 'file' case")


class Rig:
    """One BlockDevice, one ring of RING_SIZE in anonymous memory, and the driver's side."""

    def __init__(self, dev: BlockDevice, seed: int = 1) -> None:
        self.dev = dev
        data = BATCH * (BLOCK + 64) * 2
        self.mem, self._buf = anon_memory(2 * data + (1 << 20))
        self.rb = RingBuilder(self.mem, RING_SIZE, layout(RING_SIZE, data_size=data))
        self.vq = self.rb.attach(DefaultVirtqueue(self.mem, 0))
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring = Vring(dev, self.vq)
        self.ring.set_call(EventFdNotifier(self._efd))
        dev.set_features(dev.features())
        dev.queue_started(0, self.vq)
        self.rng = random.Random(seed)
        self.blocks = dev.size_bytes // BLOCK
        self._status: list[int] = []

    def post_batch(self) -> None:
        """Driver side: publish BATCH 4 KiB reads at random offsets (not timed)."""
        self._status = []
        for _ in range(BATCH):
            sector = self.rng.randrange(self.blocks) * (BLOCK // 512)
            _head, addrs = self.rb.add_chain([_HDR.pack(VIRTIO_BLK_T_IN, 0, sector)],
                                             [BLOCK, 1])
            self._status.append(addrs[-1])

    def serve(self) -> None:
        """Device side: what a kick does (timed)."""
        self.dev.process_queue(0, self.vq)

    def reap(self) -> None:
        """Driver side: collect used entries, check them (not timed)."""
        used = self.rb.get_used()
        if len(used) != BATCH or any(n != BLOCK + 1 for _h, n in used):
            raise RuntimeError(f"device returned {used[:4]}... for a batch of {BATCH}")
        if self.mem.read(self._status[-1], 1)[0] != VIRTIO_BLK_S_OK:
            raise RuntimeError("read failed")
        self.rb.reclaim()
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._efd)


def measure(dev: BlockDevice, seconds: float) -> tuple[float, float]:
    """(requests per second, CPU µs per request) of the device side over ``seconds``."""
    rig = Rig(dev)
    try:
        for _ in range(4):  # warm-up: page cache, code paths
            rig.post_batch()
            rig.serve()
            rig.reap()
        wall = cpu = 0.0
        n = 0
        while wall < seconds:
            rig.post_batch()
            c0, t0 = time.process_time(), time.perf_counter()
            rig.serve()
            t1, c1 = time.perf_counter(), time.process_time()
            rig.reap()
            wall += t1 - t0
            cpu += c1 - c0
            n += BATCH
    finally:
        rig.close()
    return n / wall, cpu / n * 1e6


def _open(case: str, workdir: Path) -> BlockDevice:
    size = IMAGE_MB << 20
    if case == "memory":
        dev = BlockDevice.in_memory(size)
        os.pwrite(dev.fd, os.urandom(1 << 20) * IMAGE_MB, 0)
        return dev
    path = workdir / "python-level.img"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * IMAGE_MB)
    return BlockDevice.open_image(str(path))


_TITLES = {
    "file": "Python block store: 4k reads, batches of 64, image file (page cache)",
    "memory": "Python block store: 4k reads, batches of 64, BlockDevice.in_memory",
}


def run_python(args: Any = None) -> list[dict[str, Any]]:
    """Run the Python-level block benchmark; returns one record per case::

        {"case": ..., "backend": "vhostpy BlockDevice", "metric": "requests/s",
         "values": [per repetition], "cpu_per_io_us": median CPU µs per request,
         "command": how to reproduce, "implementation": "pure-python", ...}
    """
    args = args if args is not None else argparse.Namespace()
    quick = bool(getattr(args, "quick", False))
    seconds = getattr(args, "python_seconds", None) or getattr(args, "seconds", None)
    seconds = float(seconds) if seconds is not None else (
        QUICK_SECONDS if quick else DEFAULT_SECONDS)
    reps = getattr(args, "python_repetitions", None) or getattr(args, "repetitions", None)
    reps = int(reps) if reps else (1 if quick else DEFAULT_REPETITIONS)
    base = getattr(args, "python_workdir", None)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vhostpy-bench-py-", dir=base) as tmp:
        devs = {case: _open(case, Path(tmp)) for case in CASES}
        try:
            values: dict[str, list[float]] = {c: [] for c in CASES}
            cpus: dict[str, list[float]] = {c: [] for c in CASES}
            for _rep in range(reps):
                for case in CASES:  # interleaved
                    rate, cpu = measure(devs[case], seconds)
                    values[case].append(rate)
                    cpus[case].append(cpu)
        finally:
            for d in devs.values():
                d.close()
    command = (f"{sys.executable} bench/python_level.py --python-seconds {seconds:g} "
               f"--repetitions {reps}")
    for case in CASES:
        v = values[case]
        records.append({
            "case": _TITLES[case], "job": f"blk_read4k_{case}", "backend": "vhostpy BlockDevice", "metric": "requests/s",
            "values": v, "cpu_per_io_us": statistics.median(cpus[case]), "command": command,
            "median": statistics.median(v), "min": min(v), "max": max(v),
            "implementation": implementation(), "cpu_per_io_us_values": cpus[case],
            "batch": BATCH, "block_size": BLOCK, "ring_size": RING_SIZE,
            "seconds_per_repetition": seconds, "python": sys.version.split()[0],
        })
    return records


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repetitions", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    add_arguments(ap)
    args = ap.parse_args(argv)
    records = run_python(args)
    for r in records:
        print(f"{r['case']} [{r['implementation']}]: {r['median']:,.0f} {r['metric']} "
              f"(min {r['min']:,.0f}, max {r['max']:,.0f}), "
              f"{r['cpu_per_io_us']:.2f} µs CPU per request")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
