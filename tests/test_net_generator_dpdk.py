"""The generator path toward a real front-end: `NetPort.offer(batch, N, wait=...)` in
`bench/vhostpy_txgen.py` (a `NetApp`, one port, nothing else writing to the guest) against
DPDK's virtio-user in ``rxonly``, split and packed rings, 64- and 1500-byte frames.

What is checked: frames flow (testpmd counts them), every frame the generator counted as
sent is in vhostpy's receive counters and nothing else is (no drops, no backlog), testpmd
received exactly those (the generator offers once testpmd forwards, and stops first; the
front-end reads its ring to the end), and
the back-end logged no warning or error. No speed is asserted; the rate is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dpdk import Testpmd, TestpmdStats, pick_cpus, rate, require_dpdk, virtio_user_vdev

pytestmark = pytest.mark.dpdk

ROOT = Path(__file__).resolve().parent.parent
QUEUE_SIZE = 256
FE_MAC = "02:dd:00:00:00:01"


@pytest.fixture
def sock() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vhpy-gen-", dir="/tmp")
    yield os.path.join(d, "net.sock")
    shutil.rmtree(d, ignore_errors=True)


def _start_generator(sock: str, size: int, log: Path, cpu: int) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.vhostpy_txgen", "--socket-path",
                                 sock, "--size", str(size), "--dst-mac", FE_MAC,
                                 "--start-on-sigusr1"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    os.sched_setaffinity(proc.pid, {cpu})
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.02)
    return proc


def _generator_counters(proc: subprocess.Popen[bytes], log: Path) -> dict:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text(errors="replace")
    out = log.read_text(errors="replace")
    lines = [ln for ln in out.splitlines() if ln.startswith("vhostpy-bench: counters ")]
    assert len(lines) == 1, out
    counters: dict = json.loads(lines[0].split(" ", 2)[2])
    assert "WARNING" not in out and "ERROR" not in out and "Traceback" not in out, out
    return counters


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("size", [64, 1500])
def test_generator_into_rxonly(sock: str, tmp_path: Path, size: int, packed: bool) -> None:
    require_dpdk()
    be_cpu, fe_cpu = pick_cpus(2)
    log = tmp_path / "txgen.log"
    gen = _start_generator(sock, size, log, be_cpu)
    fe = Testpmd(virtio_user_vdev(sock, queue_size=QUEUE_SIZE, mac=FE_MAC, packed_vq=packed),
                 forward_mode="rxonly", cpu=fe_cpu, log_path=tmp_path / "testpmd.log")
    try:
        fe.start()
        fe.wait_ready(20)
        # Only now: frames placed while testpmd sets its port up are discarded by it
        # (uncounted) when it starts the port.
        gen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 15
        rounds: list[TestpmdStats] = []
        while len(rounds) < 2:
            rounds = [r for r in fe.periodic_stats() if r.rx_packets]
            assert fe.alive() and gen.poll() is None, fe.output()
            assert time.monotonic() < deadline, fe.output()
            time.sleep(0.1)
        # The generator stops first: everything it placed is in the ring, and the
        # front-end, still polling, receives it before it stops.
        counters = _generator_counters(gen, log)
        time.sleep(1.0)
        st = fe.stop()
        # Shutting its port down, testpmd writes to the socket of the back-end that is gone
        # already: SIGPIPE, after its final statistics.
        assert fe.returncode in (0, -signal.SIGPIPE) and st.final, fe.output()
    finally:
        fe.close()
        if gen.poll() is None:
            gen.kill()
            gen.wait(10)
    assert not fe.runtime_dir.exists()

    pps = rate(rounds, "rx_packets", skip=0)
    print(f"\nvhostpy offer(wait) generator {size} B ({'packed' if packed else 'split'}) -> "
          f"virtio-user rxonly: {pps / 1e6:.3f} Mpps ({st.rx_packets} frames)")
    port = counters["ports"][0]
    sent = counters["generator"]["sent"]
    assert st.rx_packets > 1000, st
    # What offer counted as taken is what the receive ring got, whole, with no drops ...
    assert port["to_guest"] == {"frames": sent, "bytes": sent * size, "drops": {},
                                "checksums": 0, "merged": 0}, port
    assert port["backlog"] == 0, port
    # ... and the front-end received exactly that: nothing lost, nothing made up.
    assert st.rx_packets == sent, (sent, st)
