"""The benchmark suite runs end to end: `python -m bench.run --quick --only net --only idle`.

One quick pass over every net case (vhostpy and DPDK's net_vhost, both driven by DPDK's
virtio-user testpmd) and the idle measurement (each back-end's CPU with that front-end
attached and no traffic), as a user runs it, in a subprocess.  It checks the shape of what is
written — every case measured for both back-ends, ratios, machine facts, the markdown
table — and never a speed: figures on a shared 2-vCPU machine vary several-fold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dpdk import require_dpdk
from tools import bench_smoke_once_per_suite

pytestmark = pytest.mark.dpdk

ROOT = Path(__file__).resolve().parent.parent
#: case -> title row in results.md (issue 5: each direction, 64 and 1500-byte frames).
NET_CASES = {
    "g2b_64": "guest→back-end, 64 B",
    "g2b_1500": "guest→back-end, 1500 B",
    "b2g_64": "back-end→guest, 64 B",
    "b2g_1500": "back-end→guest, 1500 B",
    "loop_64": "loop (io --tx-first), 64 B",
    "loop_1500": "loop (io --tx-first), 1500 B",
}


def test_bench_net_quick(tmp_path: Path) -> None:
    bench_smoke_once_per_suite("the net and idle benchmarks")
    require_dpdk()
    out = tmp_path / "bench-out"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--only", "net", "--only", "idle",
           "--repeat", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["quick"] is True and doc["groups"] == ["net", "idle"] and not doc["interrupted"]
    assert doc["skipped"] == {}, doc["skipped"]
    machine = doc["machine"]
    assert machine["dpdk"] and machine["dpdk"].startswith("DPDK "), machine
    for key in ("cpu_model", "cpus_online", "kernel", "python", "vhostpy_implementation"):
        assert machine[key], (key, machine)

    results = {(r["case"], r["backend"]): r for r in doc["results"] if r["group"] == "net"}
    assert {case for case, _ in results} == set(NET_CASES), sorted(results)
    for case in NET_CASES:
        dpdk, vh = results[(case, "dpdk")], results[(case, "vhostpy")]
        for r in (dpdk, vh):
            assert r["group"] == "net" and r["unit"] == "Mpps", r
            assert r["errors"] == [] and r["runs"] == 1, r["errors"]
            assert r["median"] > 0 and r["min"] <= r["median"] <= r["max"], r
            assert len(r["commands"]) == 2 and all("dpdk-testpmd" in c or "vhostpy" in c
                                                   for c in r["commands"]), r["commands"]
            assert "net_virtio_user0" in r["commands"][-1], r["commands"]
        assert dpdk["reference"] and not vh["reference"]
        assert "net_vhost0" in dpdk["commands"][0]
        assert vh["extra"]["implementation"] == machine["vhostpy_implementation"]
        assert vh["ratio"]["reference"] == "dpdk"
        assert vh["ratio"]["of_medians"] == pytest.approx(vh["median"] / dpdk["median"])
        assert vh["ratio"]["of_best"] == pytest.approx(vh["max"] / dpdk["max"])

    md = (out / "results.md").read_text()
    assert "| case | back-end | Mpps (median) | min–max | runs |" in md, md[:2000]
    for title in NET_CASES.values():
        assert f"| {title} | DPDK net_vhost" in md, title
    assert md.count(f"({machine['vhostpy_implementation']}) |") >= len(NET_CASES), md[:3000]
    assert "## Command lines" in md and "## Machine" in md

    idle = {r["backend"]: r for r in doc["results"] if r["group"] == "idle"}
    impl = machine["vhostpy_implementation"]
    assert set(idle) == {"dpdk", "vhostpy"} | ({"vhostpy-python"} if impl == "cffi" else set())
    for r in idle.values():
        assert r["case"] == "idle_net" and r["unit"] == "% of one CPU", r
        assert r["errors"] == [] and r["runs"] == 1 and r["median"] >= 0, r
        assert r["extra"]["runs"][0]["window_s"] > 0
    assert idle["dpdk"]["reference"] and idle["dpdk"]["median"] > 0   # a PMD busy-polls
    assert "| case | back-end | % of one CPU (median) |" in md
