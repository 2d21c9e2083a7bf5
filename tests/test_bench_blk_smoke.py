"""The block and Python-level benchmarks produce figures (never how fast: no speed asserted).

``test_run_blk_quick_every_backend`` boots one TCG guest per back-end (vhostpy,
qemu-storage-daemon, QEMU's built-in virtio-blk) running one short fio job (~45 s in all);
``test_run_blk_quick_store_and_nbd_backends`` the async store and --nbd ones; the rest is
fast and needs no QEMU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from qemu_guest import require_qemu
from tools import bench_smoke_once_per_suite, boots_once_per_suite, require_tool

from bench import blk, python_level


@pytest.mark.qemu
def test_run_blk_quick_every_backend() -> None:
    bench_smoke_once_per_suite("the blk benchmark over every back-end")
    require_qemu()
    require_tool("fio", "ci/bench/install-deps.sh")
    require_tool("qemu-storage-daemon", "ci/qemu/install-deps.sh: qemu-utils")
    args = argparse.Namespace(quick=True, repetitions=1, blk_jobs="randread-4k-qd32,idle",
                              blk_runtime=1.0, blk_image_mb=64, blk_no_null=True)
    records = blk.run_blk(args)

    # The idle job: a back-end's CPU while the guest sleeps, for the back-ends that are
    # processes of their own (QEMU's built-in device has no separate figure).
    idle = [r for r in records if r["job"] == "idle"]
    assert {r["backend"] for r in idle} == {"vhostpy", "qemu-storage-daemon"}, idle
    for r in idle:
        assert r["metric"] == "% of a CPU" and r["higher_is_better"] is False
        assert len(r["values"]) == 1 and 0 <= r["values"][0] <= 100, r
        assert r["command"].endswith("guest: sleep 1"), r["command"]
    records = [r for r in records if r["job"] != "idle"]
    assert {r["backend"] for r in records} == set(blk.DEFAULT_BACKENDS)
    for r in records:
        assert r["case"] == "4k randread QD32"
        assert r["metric"] == "iops"
        assert len(r["values"]) == 1 and r["values"][0] > 0, r
        assert isinstance(r["command"], str) and "fio" in r["command"]
        if r["backend"] == "qemu-builtin":
            assert r["cpu_per_io_us"] is None
        else:
            assert r["cpu_per_io_us"] is not None and r["cpu_per_io_us"] >= 0, r
        # Completions reach the guest as interrupts of the disk's virtio device; at QD32
        # one interrupt may complete several requests, but never none at all.
        (irqs,) = r["irqs_per_io_values"]
        assert 0 < irqs <= 1.5, r
    json.dumps(records)  # plain data all the way down


@pytest.mark.qemu
def test_run_blk_quick_store_and_nbd_backends() -> None:
    """The async store path and an NBD export reached by vhostpy --nbd each give a figure
    (the MemoryStore and qemu-storage-daemon's NBD client share their code paths)."""
    boots_once_per_suite("an async store and an NBD disk")
    require_qemu()
    require_tool("fio", "ci/bench/install-deps.sh")
    require_tool("qemu-nbd", "ci/nbd/install-deps.sh")
    extra = ("vhostpy-async", "vhostpy-nbd")
    args = argparse.Namespace(quick=True, repetitions=1, blk_jobs="randread-4k-qd32",
                              blk_runtime=1.0, blk_image_mb=64, blk_no_null=True,
                              blk_backends=",".join(extra))
    records = blk.run_blk(args)
    assert {r["backend"] for r in records} == set(extra)
    for r in records:
        assert r["values"][0] > 0 and r["cpu_per_io_us"] is not None, r


def test_run_python_quick() -> None:
    args = argparse.Namespace(quick=True, repetitions=1, python_seconds=0.2)
    records = python_level.run_python(args)

    assert len(records) == len(python_level.CASES)
    for r in records:
        assert r["metric"] == "requests/s"
        assert len(r["values"]) == 1 and r["values"][0] > 0, r
        assert r["cpu_per_io_us"] > 0
        assert r["implementation"] == python_level.implementation()
    json.dumps(records)


def test_fio_console_parsing() -> None:
    """Markers, the disk's request counters and JSON survive interleaved noise."""
    report = {"jobs": [{"jobname": "x", "error": 0,
                        "read": {"iops": 100.5, "bw_bytes": 411_648, "total_ios": 201},
                        "write": {"iops": 0.0, "bw_bytes": 0, "total_ios": 0}}]}
    stat0 = "10 0 80 5 2 0 16 1 0 8 6 0 0 0 0 0 0"
    stat1 = "210 0 1680 90 3 0 24 2 0 99 92 0 0 0 0 0 0"
    console = "\n".join([
        f"{blk.MARK} BEGIN randread-4k-qd1",
        f"{blk.MARK} END randread-4k-qd1 rc=0",
        f"{blk.MARK} STAT randread-4k-qd1 {stat0} / {stat1}",
        f"{blk.MARK} IRQ randread-4k-qd1 12 / 190",
        f"{blk.MARK} JSON-BEGIN randread-4k-qd1",
        "[    3.141592] a kernel line in the middle",
        json.dumps(report, indent=1),
        f"{blk.MARK} JSON-END randread-4k-qd1",
    ])
    got = blk.parse_guest_output(console)["randread-4k-qd1"]
    assert got["rc"] == 0
    assert got["ios"] == 201  # 200 reads + 1 write completed
    assert got["irqs"] == 178
    assert blk.fio_figures(got["json"]) == {"iops": 100.5, "MB/s": 0.411648,
                                            "total_ios": 201.0}


def test_fio_arguments() -> None:
    job = blk.JOBS[1]
    args = blk.fio_args(job, "libaio", 2.0)
    assert "--ioengine=libaio" in args and "--direct=1" in args
    assert "--iodepth=32" in args and "--filename=/dev/vda" in args
    assert "--runtime=2000ms" in args
    null = blk.fio_args(blk.NULL_JOB, "libaio", 2.0)
    assert "--ioengine=null" in null and not any(a.startswith("--filename") for a in null)
