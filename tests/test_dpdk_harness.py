"""The DPDK testpmd harness (tests/dpdk.py), proven with DPDK alone: no vhostpy involved.

DPDK's C vhost-user back-end (``net_vhost``) in one testpmd, DPDK's virtio-user front-end
(``net_virtio_user``) in another, talking over a unix socket.  Each process is pinned to its
own CPU when there are two.  The parser tests at the bottom need no DPDK.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dpdk import (
    Testpmd,
    TestpmdError,
    TestpmdStats,
    parse_final,
    parse_periodic,
    pick_cpus,
    rate,
    require_dpdk,
    runtime_dir,
    vhost_vdev,
    virtio_user_vdev,
)
from tools import wait_until

pytestmark = pytest.mark.dpdk

QUEUE_SIZE = 256
BURST = 32

StartFn = Callable[..., Testpmd]


@pytest.fixture
def sock() -> Iterator[str]:
    """A vhost-user socket path short enough for AF_UNIX (pytest's tmp_path may not be)."""
    d = tempfile.mkdtemp(prefix="vhostpy-dpdk-", dir="/tmp")
    yield os.path.join(d, "vu.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def testpmd(tmp_path: Path) -> Iterator[StartFn]:
    """Factory: testpmd("be", vdev, forward_mode=...) starts a Testpmd logging to tmp_path;
    every one is stopped afterwards and must leave no EAL runtime directory behind."""
    started: list[Testpmd] = []

    def start(name: str, vdev: str, **kw: object) -> Testpmd:
        tp = Testpmd(vdev, log_path=tmp_path / f"testpmd-{name}.log", **kw)  # type: ignore[arg-type]
        started.append(tp)
        tp.start()
        return tp

    yield start
    for tp in reversed(started):  # front-ends (started last) first
        tp.close()
    for tp in started:
        assert not tp.runtime_dir.exists(), f"{tp} left {tp.runtime_dir}"


def _pair(testpmd: StartFn, sock: str, be_mode: str, fe_mode: str,
          **fe_kw: object) -> tuple[Testpmd, Testpmd]:
    be_cpu, fe_cpu = pick_cpus(2)
    be = testpmd("be", vhost_vdev(sock), forward_mode=be_mode, cpu=be_cpu)
    be.wait_ready()
    assert os.path.exists(sock), "net_vhost did not create its socket before forwarding"
    fe = testpmd("fe", virtio_user_vdev(sock, queue_size=QUEUE_SIZE), forward_mode=fe_mode,
                 cpu=fe_cpu, **fe_kw)
    fe.wait_ready()
    return be, fe


def _wait_rounds(tp: Testpmd, n: int, timeout: float = 10,
                 moving: bool = False) -> list[TestpmdStats]:
    """At least ``n`` periodic rounds (only those that saw frames arrive when ``moving``)."""
    deadline = time.monotonic() + timeout
    while True:
        rounds = tp.periodic_stats()
        if moving:
            rounds = [r for r in rounds if r.rx_packets]
        if len(rounds) >= n:
            return rounds
        if time.monotonic() > deadline or not tp.alive():
            raise AssertionError(f"only {len(rounds)} stats rounds from {tp}:\n{tp.output()}")
        time.sleep(0.1)


def _settled_round(tp: Testpmd, timeout: float = 10) -> TestpmdStats:
    """The first periodic round whose counters equal the round before it (no traffic)."""
    deadline = time.monotonic() + timeout
    while True:
        rounds = tp.periodic_stats()
        if len(rounds) >= 2 and rounds[-1].rx_packets == rounds[-2].rx_packets:
            return rounds[-1]
        if time.monotonic() > deadline or not tp.alive():
            raise AssertionError(f"the counters of {tp} never settled:\n{tp.output()}")
        time.sleep(0.1)


def test_txonly_into_rxonly(testpmd: StartFn, sock: str,
                            record_property: Callable[[str, object], None]) -> None:
    require_dpdk()
    be, fe = _pair(testpmd, sock, "rxonly", "txonly", txpkts=64)
    # Three rounds with traffic (rounds come every 1-2 s): two full intervals to measure.
    rounds = _wait_rounds(be, 3, moving=True)
    tx = fe.stop()
    settled = _settled_round(be)
    rx = be.stop()
    assert fe.returncode == 0 and be.returncode == 0, (fe.output(), be.output())
    assert tx.final and rx.final
    assert tx.tx_packets > 0, fe.output()
    # Every frame the ring accepted reaches the back-end, except at most one ring in flight.
    assert rx.rx_packets <= tx.tx_packets
    assert tx.tx_packets - rx.rx_packets <= QUEUE_SIZE, (tx, rx)
    assert rx.rx_dropped == 0 and tx.rx_packets == 0 and rx.tx_packets == 0
    # Periodic NIC counters: the bytes are 64 per frame. Checked on a round printed after the
    # traffic stopped: while frames arrive, testpmd reads packets and bytes a few frames
    # apart (seen once in CI: 5 frames).
    assert settled.rx_packets == rx.rx_packets > 0, (settled, rx)
    assert settled.rx_bytes == 64 * settled.rx_packets, settled
    # Steady state: growth of the cumulative counter from the first round with traffic on.
    pps = rate(rounds, "rx_packets", skip=0)
    assert pps > 0
    record_property("dpdk_vhost_rx_mpps", round(pps / 1e6, 3))
    print(f"\nnet_virtio_user txonly -> net_vhost rxonly, 64 B: {pps / 1e6:.2f} Mpps")


def test_io_loop_tx_first(testpmd: StartFn, sock: str) -> None:
    require_dpdk()
    be, fe = _pair(testpmd, sock, "io", "io", tx_first=True, txpkts=64)
    fe_rounds = _wait_rounds(fe, 2, moving=True)
    be_rounds = _wait_rounds(be, 2, moving=True)
    # Both sides' counters keep growing while the first burst circulates.
    for rounds, side in ((fe_rounds, "fe"), (be_rounds, "be")):
        a, b = rounds[-2], rounds[-1]
        assert b.rx_packets > a.rx_packets > 0, (side, a, b)
        assert b.tx_packets > a.tx_packets > 0, (side, a, b)
    tx_side = fe.stop()
    rx_side = be.stop()
    assert tx_side.final and rx_side.final
    assert min(tx_side.rx_packets, tx_side.tx_packets,
               rx_side.rx_packets, rx_side.tx_packets) > 0, (tx_side, rx_side)
    # What one side sent, the other received (give or take a ring in flight) ...
    assert 0 <= tx_side.tx_packets - rx_side.rx_packets <= QUEUE_SIZE, (tx_side, rx_side)
    assert 0 <= rx_side.tx_packets - tx_side.rx_packets <= QUEUE_SIZE, (tx_side, rx_side)
    # ... and io mode forwards every frame it receives or counts it dropped.
    assert rx_side.rx_packets == rx_side.tx_packets + rx_side.tx_dropped, rx_side
    assert rx_side.tx_dropped <= BURST, rx_side  # only the burst in flight when fe stopped
    # The front-end sent (or dropped) everything it received, plus the --tx-first burst.
    assert tx_side.tx_packets + tx_side.tx_dropped == tx_side.rx_packets + BURST, tx_side


@pytest.mark.parametrize("victim", ["backend", "frontend"])
def test_stop_after_peer_crash(testpmd: StartFn, sock: str, victim: str) -> None:
    require_dpdk()
    be, fe = _pair(testpmd, sock, "rxonly", "txonly", txpkts=64)
    _wait_rounds(be, 2)
    dead, survivor = (be, fe) if victim == "backend" else (fe, be)
    mark = len(survivor.output())
    dead.kill()
    assert dead.proc is not None
    dead.proc.wait(10)
    # the survivor saw its peer go (net_vhost: "vhost peer closed"; virtio-user: "port 0 is
    # down"; both then report the link change)
    survivor.wait_for("Port 0: link state change event", timeout=10, start=mark)
    t0 = time.monotonic()
    stats = survivor.stop(timeout=10)
    assert time.monotonic() - t0 < 8, "stop() hung after the peer died"
    assert stats.final, survivor.output()
    moved = stats.tx_packets if survivor is fe else stats.rx_packets
    assert moved > 0, stats
    # DPDK 22.11's virtio-user dies of SIGPIPE while closing its port to a dead back-end,
    # after printing its statistics; net_vhost exits cleanly.
    allowed = (0, -signal.SIGPIPE) if survivor is fe else (0,)
    assert survivor.returncode in allowed, (survivor.returncode, survivor.output())
    dead_stats = dead.stop()
    assert dead.returncode == -signal.SIGKILL
    assert not dead_stats.final  # killed: only the periodic counters survive
    for tp in (be, fe):
        assert not tp.runtime_dir.exists(), tp.runtime_dir
        assert not tp.alive()


def test_unprobed_vdev_is_an_error(testpmd: StartFn, sock: str) -> None:
    """virtio-user on a socket nobody listens on: testpmd forwards on ports=0 forever."""
    require_dpdk()
    fe = testpmd("fe", virtio_user_vdev(sock), forward_mode="txonly")
    with pytest.raises(TestpmdError, match="ports=0"):
        fe.wait_ready()
    assert fe.alive()  # (that is the trap)
    fe.stop()
    assert not fe.runtime_dir.exists()


def test_interactive_backend(testpmd: StartFn, sock: str) -> None:
    require_dpdk()
    be_cpu, fe_cpu = pick_cpus(2)
    be = testpmd("be", vhost_vdev(sock), forward_mode="rxonly", cpu=be_cpu, interactive=True)
    be.wait_ready()
    assert "rxonly packet forwarding - ports=1" in be.command("start")
    fe = testpmd("fe", virtio_user_vdev(sock), forward_mode="txonly", txpkts=64, cpu=fe_cpu)
    fe.wait_ready()

    def shown() -> TestpmdStats | None:
        """`show port stats all` once more: the round it printed."""
        out = be.command("show port stats all")
        assert "NIC statistics for port 0" in out, out
        return be.running_stats()

    # frames arrive, then keep arriving: the counter read on demand grows between two reads
    first = wait_until(lambda: (r := shown()) is not None and r.rx_packets > 0 and r, 10,
                       "rx_packets > 0 in `show port stats all`", interval=0.05)
    second = wait_until(lambda: (r := shown()) is not None and r.rx_packets > first.rx_packets
                        and r, 10, "rx_packets to grow", interval=0.05)
    assert second.rx_packets > first.rx_packets > 0
    tx = fe.stop()
    rx = be.stop()  # sends "quit"
    assert be.returncode == 0 and rx.final
    assert 0 <= tx.tx_packets - rx.rx_packets <= QUEUE_SIZE


# ------------------------------------------------------------------- no DPDK needed below


def test_vdev_strings() -> None:
    assert (virtio_user_vdev("/tmp/a.sock") ==
            "net_virtio_user0,path=/tmp/a.sock,queues=1,queue_size=256")
    assert (virtio_user_vdev("/tmp/a.sock", queues=2, queue_size=1024, server=True,
                             mrg_rxbuf=False, in_order=True, packed_vq=True, index=3) ==
            "net_virtio_user3,path=/tmp/a.sock,queues=2,queue_size=1024,server=1,"
            "mrg_rxbuf=0,in_order=1,packed_vq=1")
    assert vhost_vdev("/tmp/b.sock") == "net_vhost0,iface=/tmp/b.sock,queues=1"
    assert (vhost_vdev("/tmp/b.sock", client=True, **{"linear-buffer": True}) ==
            "net_vhost0,iface=/tmp/b.sock,queues=1,client=1,linear-buffer=1")
    with pytest.raises(ValueError, match="AF_UNIX"):
        virtio_user_vdev("/tmp/" + "x" * 120)
    with pytest.raises(ValueError, match="devargs"):
        vhost_vdev("/tmp/a,b.sock")


def test_command_line() -> None:
    tp = Testpmd("net_null0", forward_mode="txonly", txpkts=64, burst=64, tx_first=True,
                 cpu=1, file_prefix="pfx", testpmd="/usr/bin/dpdk-testpmd")
    assert tp.argv == [
        "/usr/bin/dpdk-testpmd", "--lcores", "(0,1)@1", "--no-pci", "--no-huge", "-m", "1024",
        "--file-prefix", "pfx", "--vdev", "net_null0", "--",
        "--no-mlockall", "--total-num-mbufs=16384", "--forward-mode=txonly", "--txpkts=64",
        "--burst=64", "--tx-first", "--stats-period=1"]
    tp = Testpmd("net_null0", forward_mode="io", interactive=True, testpmd="x")
    assert tp.argv[1:3] == ["-l", "0,1"] and tp.argv[-1] == "-i"
    assert "--stats-period=1" not in tp.argv
    assert Testpmd("v", forward_mode="io", testpmd="x").file_prefix != \
        Testpmd("v", forward_mode="io", testpmd="x").file_prefix
    with pytest.raises(ValueError):
        Testpmd("v", forward_mode="io", stats_period=0, testpmd="x")


def test_runtime_dir() -> None:
    if os.getuid() == 0:
        assert runtime_dir("p") == Path("/var/run/dpdk/p")
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        assert runtime_dir("p") == Path(base) / "dpdk" / "p"


_ROUND = (
    "\x1b[2J\x1b[1;1H\nPort statistics ====================================\n"
    "  ######################## NIC statistics for port 0  ########################\n"
    "  RX-packets: {rx:<10} RX-missed: 3          RX-bytes:  {rxb}\n"
    "  RX-errors: 0\n  RX-nombuf:  0         \n"
    "  TX-packets: 0          TX-errors: 0          TX-bytes:  0\n\n"
    "  Throughput (since last show)\n"
    "  Rx-pps:       {pps}          Rx-bps:    274679680\n"
    "  Tx-pps:            0          Tx-bps:            0\n"
    "  ############################################################################\n")

_FINAL = (
    "Telling cores to stop...\nWaiting for lcores to finish...\n\n"
    "  ---------------------- Forward statistics for port 0  ----------------------\n"
    "  RX-packets: 0              RX-dropped: 0             RX-total: 0\n"
    "  TX-packets: 7525440        TX-dropped: 72254784      TX-total: 79780224\n"
    "  ----------------------------------------------------------------------------\n\n"
    "  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n"
    "  RX-packets: 0              RX-dropped: 0             RX-total: 0\n"
    "  TX-packets: 7525440        TX-dropped: 72254784      TX-total: 79780224\n"
    "  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++\n\n"
    "Done.\n\nBye...\n")


@pytest.mark.parametrize("crlf", [False, True])
def test_parse_periodic_and_final(crlf: bool) -> None:
    text = (_ROUND.format(rx=1000, rxb=64000, pps=1000) + "VHOST_CONFIG: noise\n"
            + _ROUND.format(rx=3000, rxb=192000, pps=2000))
    partial = _ROUND.format(rx=5000, rxb=320000, pps=2000)[:-90]  # still being printed
    text += partial
    if crlf:
        text = text.replace("\n", "\r\n")
    times = [(len(text) // 2, 10.0), (len(text) - len(partial), 11.0), (len(text), 11.5)]
    rounds = parse_periodic(text, nb_ports=1, times=times)
    assert [r.rx_packets for r in rounds] == [1000, 3000]
    assert rounds[1].rx_bytes == 192000 and rounds[1].rx_missed == 3
    assert rounds[1].rx_pps == 2000 and rounds[1].per_port[0].rx_nombuf == 0
    assert [r.time for r in rounds] == [10.0, 11.0]
    assert rate(rounds, skip=0) == 2000.0
    assert parse_final(text) is None

    final = parse_final(text + _FINAL)
    assert final is not None and final.final
    assert (final.tx_packets, final.tx_dropped, final.rx_packets) == (7525440, 72254784, 0)
    assert final.per_port[0].tx_total == 79780224


def test_parse_show_port_stats_rounds() -> None:
    """Interactive `show port stats all` prints blocks without the round header."""
    block = _ROUND.format(rx=7, rxb=448, pps=0).split("\n", 2)[2]
    rounds = parse_periodic("show port stats all\n" + block + "testpmd> show port stats all\n"
                            + block.replace(" 7 ", " 9 "), nb_ports=1)
    assert [r.rx_packets for r in rounds] == [7, 9]
