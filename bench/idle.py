"""Idle cost: a back-end's CPU use with a front-end attached and no traffic (group ``idle``).

Issue 5's goal: vhostpy under 1% of one CPU with a guest attached and nothing to do.  The
front-end is DPDK's ``net_virtio_user`` in ``dpdk-testpmd`` (as in bench/net.py), forwarding
mode ``rxonly``: its port is started, its rings set up and filled with receive buffers, and
it sends nothing.  The back-ends:

* ``vhostpy net --no-respond`` under the implementation the suite runs (``cffi`` normally),
  and the same forced onto the pure-Python fallback (``VHOSTPY_IMPLEMENTATION=python``);
* DPDK's ``net_vhost`` in testpmd ``rxonly`` for contrast: a PMD busy-polls, so it uses
  its whole CPU whether or not there is traffic.

Protocol: start the back-end (pinned like bench/net.py's), then the front-end; once testpmd
says it is forwarding, wait ``SETTLE`` seconds (connection set-up, the last polling turn),
then read the back-end's CPU time (``/proc/PID/task/*/schedstat``, ns resolution; utime +
stime from ``/proc/PID/stat`` where that is missing) over a fixed window
(``WINDOW`` s, 1.5 s with ``--quick``).  The figure is % of one CPU (100 = one CPU busy).
blk's idle cost (``vhostpy blk`` vs qemu-storage-daemon with a TCG guest attached) is the
``idle`` job of bench/blk.py, measured in the blk group's guest boots; tests/test_fastpath.py
checks vhostpy net's idle cost with a scripted front-end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import net
from bench.common import Result, log, shell_join, vhostpy_implementation

#: Seconds measured per run, and with --quick.
WINDOW = 5.0
QUICK_WINDOW = 1.5
#: Seconds between "front-end forwarding" and the start of the window.
SETTLE = 1.0
QUICK_SETTLE = 0.5

NOTES = {
    "idle": (
        "Back-end CPU use with DPDK `net_virtio_user` (testpmd `rxonly`, 1 queue, ring 256) "
        "attached and no traffic, in % of one CPU over a fixed window (CPU time from "
        "/proc/PID/task/*/schedstat). Goal (issue 5): vhostpy under 1%. DPDK `net_vhost` busy-polls: "
        "its ~100% is the contrast, not a target; the ratio column is meaningless here."),
}

Skipped = net.Skipped


def cpu_seconds(pid: int) -> float | None:
    """CPU time of all of a process's threads in ns resolution (``schedstat``), or
    utime + stime (clock ticks) where schedstat is missing; None when the process is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total = 0
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return net._cpu_seconds(pid)


def idle_backends() -> list[net.Backend]:
    module = ("vhostpy", "net", "--no-respond")
    backends = [net.Backend("dpdk", "DPDK net_vhost, rxonly (busy-polls)", True, "rxonly"),
                net.Backend("vhostpy", net._vhostpy_label("vhostpy net --no-respond"),
                            module=module)]
    if vhostpy_implementation() == "cffi":
        backends.append(net.Backend("vhostpy-python",
                                    net._vhostpy_label("vhostpy net --no-respond", "python"),
                                    module=module, implementation="python"))
    return backends


def idle_once(backend: net.Backend, rep: int, opts: net.Options, window: float,
              settle: float) -> tuple[float, list[str], dict[str, Any]]:
    """One run: back-end, then an idle front-end; (back-end CPU %, commands, details)."""
    tmp = tempfile.mkdtemp(prefix="vhi-", dir="/tmp")
    sock = os.path.join(tmp, "net.sock")
    logs = opts.log_dir / f"idle-{backend.key}-r{rep}"
    logs.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    details: dict[str, Any] = {"rep": rep, "logs": str(logs), "window_s": window}
    be_tp: net.Testpmd | None = None
    be_vh: net._VhostpyProcess | None = None
    fe: net.Testpmd | None = None
    try:
        if backend.is_dpdk:
            assert backend.dpdk_mode is not None
            be_tp = net.Testpmd(net.vhost_vdev(sock), forward_mode=backend.dpdk_mode,
                                cpu=opts.be_cpu, burst=net.BURST,
                                log_path=logs / "backend.log")
            commands.append(shell_join(be_tp.argv) + " </dev/null")
            be_tp.start()
            be_tp.wait_ready(30)
        else:
            be_vh = net._VhostpyProcess(backend.module, sock, opts.be_cpu,
                                        logs / "backend.log", backend.implementation)
            commands.append(shell_join(be_vh.argv))
        be = be_tp or be_vh
        assert be is not None
        fe = net.Testpmd(net.virtio_user_vdev(sock, queue_size=net.QUEUE_SIZE, mac=net.FE_MAC),
                         forward_mode="rxonly", cpu=opts.fe_cpu, burst=net.BURST,
                         log_path=logs / "frontend.log")
        commands.append(shell_join(fe.argv) + " </dev/null")
        fe.start()
        fe.wait_ready(30)
        net._check_mode(fe, "rxonly")
        time.sleep(settle)
        t0, c0, (busy0, steal0) = time.monotonic(), cpu_seconds(be.pid), net._system_busy()
        f0 = net._cpu_seconds(fe.pid)
        time.sleep(window)
        t1, c1, (busy1, steal1) = time.monotonic(), cpu_seconds(be.pid), net._system_busy()
        f1 = net._cpu_seconds(fe.pid)
        if c0 is None or c1 is None or not be.alive():
            raise RuntimeError("the back-end exited during the idle window")
        if not fe.alive():
            raise RuntimeError("the front-end exited during the idle window")
        dt = t1 - t0
        be_s, fe_s = c1 - c0, (f1 or 0.0) - (f0 or 0.0)
        pct = 100 * be_s / dt
        details.update(backend_cpu_percent=round(pct, 3),
                       frontend_cpu_percent=round(100 * fe_s / dt, 1),
                       other_cpu_percent=round(100 * max(0.0, busy1 - busy0 - be_s - fe_s) / dt,
                                               1),
                       steal_percent=round(100 * (steal1 - steal0) / dt, 1),
                       span_s=round(dt, 3))
        return pct, commands, details
    finally:
        net._stop_all(fe, be_tp, be_vh, details)
        shutil.rmtree(tmp, ignore_errors=True)


def run_idle(args: argparse.Namespace) -> list[Result]:
    """The ``idle`` group (DPDK needed; raises :class:`Skipped` without it)."""
    net.require_testpmd()
    opts = net.options_from(args)
    window = QUICK_WINDOW if opts.quick else WINDOW
    settle = QUICK_SETTLE if opts.quick else SETTLE
    backends = idle_backends()
    results: dict[str, Result] = {}
    for b in backends:
        r = Result(group="idle", case="idle_net", title="net, front-end attached, no traffic",
                   backend=b.key, label=b.label, unit="% of one CPU", reference=b.reference,
                   higher_is_better=False)
        r.extra.update(window_s=window, frontend_mode="rxonly", runs=[])
        if not b.is_dpdk:
            r.extra["implementation"] = b.implementation or vhostpy_implementation()
        results[b.key] = r
    try:
        for rep in range(opts.repeat):
            for b in net.ordered(backends, rep):
                r = results[b.key]
                try:
                    pct, commands, details = idle_once(b, rep, opts, window, settle)
                except Exception as exc:  # noqa: BLE001 (one failed run must not end all)
                    r.fail(f"{type(exc).__name__}: {exc}", rep)
                    log(f"idle {b.key} rep {rep}: FAILED: {exc}")
                    continue
                r.add(pct, rep)
                r.commands = r.commands or commands
                r.extra["runs"].append(details)
                log(f"idle {b.key} rep {rep}: back-end {pct:.2f}% of one CPU over {window:g} s "
                    f"(other processes {details['other_cpu_percent']:.0f}%)")
    except KeyboardInterrupt as exc:
        exc.partial_results = list(results.values())  # type: ignore[attr-defined]
        raise
    for r in results.values():
        net._flag_disturbed(r)
    return list(results.values())


def main() -> int:
    """``python -m bench.idle [--quick]``: the idle group alone, printed."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-idle")
    args = parser.parse_args()
    for r in run_idle(args):
        print(f"{r.label}: {r.values} {r.unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
