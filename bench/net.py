"""Net benchmarks: vhostpy's virtio-net against DPDK's ``net_vhost``, one front-end for all.

The front-end is always DPDK's ``net_virtio_user`` in ``dpdk-testpmd`` (1 queue, ring 256,
burst 32), pinned to one CPU; the back-end under test is pinned to the other:

* guest→back-end (``g2b_*``): front-end ``txonly``; the back-end consumes: DPDK in
  ``rxonly``, ``vhostpy net --no-respond`` (one port and no responder: the switch learns the
  source MAC of every frame and floods it to no one — the count/sink case);
* back-end→guest (``b2g_*``): the back-end generates, the front-end runs ``rxonly``: DPDK in
  ``txonly``, vhostpy ``bench/vhostpy_txgen.py`` (a `NetApp` offering a prebuilt frame with
  ``port.offer``: as many copies as the receive ring takes, nothing queued);
* loop (``loop_*``): front-end ``io --tx-first`` (one burst of 32 frames circulates) against
  DPDK ``macswap`` (the reference: the same work as reflecting) and ``io``, and
  ``vhostpy net --reflect``.

64- and 1500-byte frames.  Every rate is read from the FRONT-END's periodic statistics
(``tests/dpdk.py``'s ``rate()``; TX-packets for txonly, RX-packets otherwise), so all back-ends
are measured by the same C code; the first round with traffic is skipped as warm-up (not
with ``--quick``).  Under the compiled path each vhostpy case also has a ``vhostpy-python``
row (``VHOSTPY_IMPLEMENTATION=python``, first ``PYTHON_REPS`` repetitions, not ``--quick``).

Python level (group ``python``): frames per second through a user handler on the batch API
(``bench/vhostpy_handler.py``: `NetDevice` + `Server` + ``port.add_handler``, no switch),
driven by ``txonly`` 64 B, interleaved with ``vhostpy net --no-respond`` (the same plus
`NetApp`'s switch) so their ratio is the switch's cost; and ``Switch.forward`` alone
in-process (one port, frames flooded to no one).

Each back-end is a fresh process per run; runs are interleaved (for each repetition, for
each case: reference, vhostpy; the order flips on odd repetitions).  Logs of every process
go to ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Result,
    log,
    ordered,
    pick_named,
    shell_join,
    tests_on_path,
    vhostpy_implementation,
)

tests_on_path()
from dpdk import (  # tests/ is put on sys.path just above
    Testpmd,
    TestpmdStats,
    find_testpmd,
    missing_pmds,
    pick_cpus,
    rate,
    vhost_vdev,
    virtio_user_vdev,
)
from procs import terminate  # tests/ is on sys.path

from vhostpy.cli import parse_counters_lines

QUEUE_SIZE = 256
BURST = 32
FE_MAC = "02:dd:00:00:00:01"        # the front-end's port MAC (virtio-user picks a random one)
#: A round counts as traffic once the counter passes what the rings hold without a peer.
TRAFFIC_THRESHOLD = 2 * (QUEUE_SIZE + BURST)
#: CPU % (of one CPU) used by anything but the two peers above which a run is flagged.
DISTURBED_PERCENT = 15.0
#: The whole suite waits for an idle machine at most this many times --wait-idle.
WAIT_BUDGET_FACTOR = 5
COUNTERS_PREFIXES = ("vhostpy-bench: counters ",)

NOTES = {
    "net": (
        "Front-end: DPDK `net_virtio_user` (testpmd, 1 queue, ring 256, burst 32) for every "
        "back-end, each side pinned to its own CPU; Mpps as counted by the front-end "
        "(TX-packets for txonly, RX-packets otherwise). Ratios are vhostpy / DPDK "
        "`net_vhost`; the per-repetition range pairs runs made back to back. "
        "Loop = front-end `io --tx-first` (32 frames circulate); its reference is DPDK "
        "`macswap` (the same work as `--reflect`)."),
    "python": (
        "Frames per second through user Python code. `handler_64`: testpmd `txonly` 64 B "
        "into a bare `NetDevice` whose only consumer is a handler counting frames "
        "(batch API, no switch), against `vhostpy net --no-respond` (the same plus "
        "NetApp's switch, which looks at every frame and floods it to no one): the ratio "
        "is what the switch costs. `switch_flood`: `Switch.forward` alone in-process, "
        "64-frame batches from one port, flooded to no one."),
}


class Skipped(Exception):
    """This group cannot run here (reason in the message)."""


# ------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Backend:
    key: str
    label: str
    reference: bool = False
    dpdk_mode: str | None = None     # net_vhost testpmd forward mode
    dpdk_txpkts: bool = False        # net_vhost generates: --txpkts=<size>
    module: tuple[str, ...] = ()     # vhostpy: python -m <module...> --socket-path SOCK
    quick: bool = True               # also in --quick runs
    implementation: str | None = None   # vhostpy: force VHOSTPY_IMPLEMENTATION
    max_reps: int | None = None      # run in the first N repetitions only (slow back-ends)

    @property
    def is_dpdk(self) -> bool:
        return self.dpdk_mode is not None


@dataclass(frozen=True)
class Case:
    group: str
    key: str
    title: str
    size: int
    fe_mode: str
    attr: str                        # front-end counter: "tx_packets" / "rx_packets"
    backends: tuple[Backend, ...]
    tx_first: bool = False
    packed: bool = False             # the front-end asks for packed rings (packed_vq=1)


def _vhostpy_label(text: str, implementation: str | None = None) -> str:
    return f"{text} ({implementation or vhostpy_implementation()})"


#: Repetitions of the pure-Python rows (each run is as long as the others; they are slow
#: only in what they measure, and the ratio to DPDK needs no more precision than this).
PYTHON_REPS = 2


def _python_twin(key: str, text: str, module: tuple[str, ...]) -> list[Backend]:
    """The same vhostpy back-end forced onto the pure-Python fallback (issue 5: "the
    pure-Python fallback measured too"), when the suite itself runs the compiled path."""
    if vhostpy_implementation() != "cffi":
        return []
    return [Backend(f"{key}-python", _vhostpy_label(text, "python"), module=module,
                    quick=False, implementation="python", max_reps=PYTHON_REPS)]


def _dirty_log_pair(size: int, *extra: str) -> list[Backend]:
    """The cost of the migration dirty log at 64 B: one device without and with a log
    (bench/vhostpy_dirtylog.py), not in --quick runs."""
    if size != 64:
        return []
    module = ("bench.vhostpy_dirtylog", "net", *extra)
    return [Backend("nolog", _vhostpy_label("NetDevice, no dirty log"), module=module,
                    quick=False),
            Backend("dirty-log", _vhostpy_label("NetDevice, dirty log on"),
                    module=(*module, "--dirty-log"), quick=False)]


def net_cases() -> list[Case]:
    cases: list[Case] = []
    for size in (64, 1500):
        cases.append(Case("net", f"g2b_{size}", f"guest→back-end, {size} B", size, "txonly",
                          "tx_packets", (
                              Backend("dpdk", "DPDK net_vhost, rxonly", True, "rxonly"),
                              Backend("vhostpy", _vhostpy_label("vhostpy net --no-respond"),
                                      module=("vhostpy", "net", "--no-respond")),
                              *_python_twin("vhostpy", "vhostpy net --no-respond",
                                            ("vhostpy", "net", "--no-respond")),
                              *_dirty_log_pair(size))))
    for size in (64, 1500):
        cases.append(Case("net", f"b2g_{size}", f"back-end→guest, {size} B", size, "rxonly",
                          "rx_packets", (
                              Backend("dpdk", "DPDK net_vhost, txonly", True, "txonly",
                                      dpdk_txpkts=True),
                              Backend("vhostpy", _vhostpy_label(
                                  "vhostpy NetApp + port.offer generator"),
                                  module=("bench.vhostpy_txgen", "--size", str(size),
                                          "--dst-mac", FE_MAC)),
                              *_python_twin("vhostpy", "vhostpy NetApp + port.offer generator",
                                            ("bench.vhostpy_txgen", "--size", str(size),
                                             "--dst-mac", FE_MAC)))))
    for size in (64, 1500):
        backends = [Backend("dpdk", "DPDK net_vhost, macswap", True, "macswap")]
        if size == 64:
            backends.append(Backend("dpdk-io", "DPDK net_vhost, io", False, "io", quick=False))
        backends.append(Backend("vhostpy", _vhostpy_label("vhostpy net --reflect"),
                                module=("vhostpy", "net", "--reflect")))
        backends += _python_twin("vhostpy", "vhostpy net --reflect", ("vhostpy", "net", "--reflect"))
        backends += _dirty_log_pair(size, "--reflect")
        cases.append(Case("net", f"loop_{size}", f"loop (io --tx-first), {size} B", size, "io",
                          "rx_packets", tuple(backends), tx_first=True))
    cases += packed_cases()
    return cases


def packed_cases() -> list[Case]:
    """The 64-byte cases again with packed rings (virtio-user ``packed_vq=1``; DPDK's
    net_vhost serves them packed too), against the same references; not in --quick runs
    (the tests check packed rings against testpmd; these are figures)."""
    gen = ("bench.vhostpy_txgen", "--size", "64", "--dst-mac", FE_MAC)

    def pair(dpdk: Backend, text: str, module: tuple[str, ...]) -> tuple[Backend, Backend]:
        return (replace(dpdk, quick=False),
                Backend("vhostpy", _vhostpy_label(text), module=module, quick=False))
    return [
        Case("net", "g2b_64_packed", "guest→back-end, 64 B, packed rings", 64, "txonly",
             "tx_packets", pair(Backend("dpdk", "DPDK net_vhost, rxonly", True, "rxonly"),
                                "vhostpy net --no-respond", ("vhostpy", "net", "--no-respond")),
             packed=True),
        Case("net", "b2g_64_packed", "back-end→guest, 64 B, packed rings", 64, "rxonly",
             "rx_packets", pair(Backend("dpdk", "DPDK net_vhost, txonly", True, "txonly",
                                        dpdk_txpkts=True),
                                "vhostpy NetApp + port.offer generator", gen),
             packed=True),
        Case("net", "loop_64_packed", "loop (io --tx-first), 64 B, packed rings", 64, "io",
             "rx_packets", pair(Backend("dpdk", "DPDK net_vhost, macswap", True, "macswap"),
                                "vhostpy net --reflect", ("vhostpy", "net", "--reflect")),
             tx_first=True, packed=True),
    ]


def python_cases() -> list[Case]:
    return [Case("python", "handler_64", "user handler, batch API, 64 B (testpmd txonly)", 64,
                 "txonly", "tx_packets", (
                     Backend("handler", _vhostpy_label("NetDevice + handler counting frames"),
                             True, module=("bench.vhostpy_handler",)),
                     Backend("netapp", _vhostpy_label("vhostpy net --no-respond (+ switch)"),
                             module=("vhostpy", "net", "--no-respond"))))]


# ------------------------------------------------------------------------------- options


@dataclass
class Options:
    seconds: float                   # measured span (after warm-up) per run
    warmup_rounds: int               # periodic rounds with traffic skipped first
    repeat: int
    quick: bool
    log_dir: Path
    be_cpu: int
    fe_cpu: int
    threshold: int = TRAFFIC_THRESHOLD   # counter value from which a round counts
    timeout: float = 30.0            # for traffic to show and the span to elapse
    wait_idle: float = 0.0           # before each run, wait up to this for an idle machine
    wait_budget: float = 0.0         # ... and up to this in all (then run regardless)
    retries: int = 0                 # re-runs of a disturbed run
    extra: dict[str, Any] = field(default_factory=dict)


def options_from(args: argparse.Namespace) -> Options:
    quick = bool(getattr(args, "quick", False))
    seconds = getattr(args, "seconds", None)
    if seconds is None:
        seconds = 0.9 if quick else 3.5
    repeat = getattr(args, "repeat", None) or (1 if quick else 5)
    out = Path(getattr(args, "out", None) or REPO / "bench" / "out")
    be_cpu, fe_cpu = pick_cpus(2)
    # --quick measures from the round printed when forwarding starts (counters near 0):
    # rounds come every 1-2 s, so waiting for traffic to show first would double the time.
    wait_idle = getattr(args, "wait_idle", None)
    if wait_idle is None:
        wait_idle = 0 if quick else 120
    retries = getattr(args, "retries", None)
    return Options(seconds=float(seconds), warmup_rounds=0 if quick else 1, repeat=int(repeat),
                   quick=quick, log_dir=out / "logs", be_cpu=be_cpu, fe_cpu=fe_cpu,
                   threshold=0 if quick else TRAFFIC_THRESHOLD, timeout=30.0 + float(seconds),
                   wait_idle=float(wait_idle),
                   wait_budget=WAIT_BUDGET_FACTOR * float(wait_idle),
                   retries=int((0 if quick else 2) if retries is None else retries))


def require_testpmd() -> str:
    try:
        path = find_testpmd()
    except FileNotFoundError as exc:
        raise Skipped(str(exc)) from None
    missing = missing_pmds()
    if missing:
        raise Skipped(f"DPDK PMDs missing: {', '.join(missing)} (run ci/dpdk/install-deps.sh)")
    return path


# ------------------------------------------------------------------------------- one run


def _system_busy() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / hz, steal / hz


def _cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all threads), or None when it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parse_counters(text: str) -> dict[str, Any] | None:
    """The counters a back-end printed at exit: vhostpy's counters line (`cli`), or the
    bench helpers' own prefixed line."""
    exits = [r for r in parse_counters_lines(text) if r.get("event") == "exit"]
    if exits:
        counters: dict[str, Any] = exits[-1]["counters"]
        return counters
    for line in reversed(text.splitlines()):
        for prefix in COUNTERS_PREFIXES:
            if line.startswith(prefix):
                with contextlib.suppress(ValueError):
                    parsed: dict[str, Any] = json.loads(line[len(prefix):])
                    return parsed
    return None


def _stats_dict(st: TestpmdStats | None) -> dict[str, Any] | None:
    if st is None:
        return None
    return {"kind": st.kind, "rx_packets": st.rx_packets, "tx_packets": st.tx_packets,
            "rx_dropped": st.rx_dropped, "tx_dropped": st.tx_dropped}


_live: set[_VhostpyProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for vh in list(_live):
        with contextlib.suppress(Exception):
            vh.proc.kill()
            vh.proc.wait(5)


class _VhostpyProcess:
    """``taskset -c CPU python -m MODULE... --socket-path SOCK``, output to a log file."""

    def __init__(self, module: Sequence[str], sock: str, cpu: int, log_path: Path,
                 implementation: str | None = None) -> None:
        self.sock = sock
        self.log_path = log_path
        taskset = shutil.which("taskset")
        self.argv = [*([taskset, "-c", str(cpu)] if taskset else []), sys.executable, "-m",
                     *module, "--socket-path", sock]
        env = dict(os.environ)
        if implementation is not None:
            env["VHOSTPY_IMPLEMENTATION"] = implementation
            self.argv = ["env", f"VHOSTPY_IMPLEMENTATION={implementation}", *self.argv]
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.DEVNULL, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _live.add(self)
        try:
            if not taskset:
                os.sched_setaffinity(self.proc.pid, {cpu})
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{shell_join(self.argv)} exited with "
                                       f"{self.proc.returncode}:\n{self.output()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{shell_join(self.argv)} never listened on {sock}")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        with contextlib.suppress(ValueError, OSError):
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        terminate(self.proc)
        self._log.close()
        _live.discard(self)
        return self.proc.returncode


def _measure(fe: Testpmd, attr: str, be_pid: int | None, be_alive: Callable[[], bool],
             opts: Options) -> tuple[list[TestpmdStats], dict[str, Any]]:
    """Wait for periodic rounds with traffic: skip ``warmup_rounds``, then at least two
    spanning ``opts.seconds`` over which the counter grew by ``TRAFFIC_THRESHOLD`` frames
    at least (a starved peer makes the span longer, not the rate zero).  Returns them and CPU use over them, in % of one CPU: the
    back-end's, the front-end's, everything else's (other processes, this driver, the
    kernel; a large figure means the run was disturbed) and steal (the hypervisor)."""
    deadline = time.monotonic() + opts.timeout
    samples: list[tuple[float, float | None, float | None, float, float]] = []
    while True:
        now = time.monotonic()
        busy, steal = _system_busy()
        samples.append((now, _cpu_seconds(be_pid), _cpu_seconds(fe.pid), busy, steal))
        rounds = [r for r in fe.periodic_stats() if getattr(r, attr) >= opts.threshold]
        counted = rounds[opts.warmup_rounds:]
        if len(counted) >= 2:
            t0, t1 = counted[0].time, counted[-1].time
            assert t0 is not None and t1 is not None
            grown = getattr(counted[-1], attr) - getattr(counted[0], attr)
            # No growth: the peers have not started (or were starved): measure on.
            if t1 - t0 >= opts.seconds and grown >= TRAFFIC_THRESHOLD:
                return counted, _cpu_use([s for s in samples if s[0] >= t0 - 0.03])
        if not fe.alive():
            raise RuntimeError(f"front-end testpmd exited (rc={fe.returncode})")
        if not be_alive():
            raise RuntimeError("the back-end exited")
        if now > deadline:
            raise RuntimeError(f"no steady traffic after {opts.timeout:.0f} s: "
                               f"{len(rounds)} periodic round(s) with {attr} >= "
                               f"{opts.threshold}")
        time.sleep(0.05)


def _cpu_use(samples: Sequence[tuple[float, float | None, float | None, float, float]]
             ) -> dict[str, Any]:
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return {}
    a, b = samples[0], samples[-1]
    dt = b[0] - a[0]
    out: dict[str, Any] = {}
    be = fe = 0.0
    if a[1] is not None and b[1] is not None:
        be = b[1] - a[1]
        out["backend_cpu_percent"] = round(100 * be / dt, 1)
    if a[2] is not None and b[2] is not None:
        fe = b[2] - a[2]
        out["frontend_cpu_percent"] = round(100 * fe / dt, 1)
    out["other_cpu_percent"] = round(100 * max(0.0, (b[3] - a[3]) - be - fe) / dt, 1)
    out["steal_percent"] = round(100 * (b[4] - a[4]) / dt, 1)
    return out


def _check_mode(tp: Testpmd, mode: str) -> None:
    """testpmd silently falls back to ``io`` on an unknown ``--forward-mode``."""
    pattern = rf"^{re.escape(mode)} packet forwarding - ports="
    if not re.search(pattern, tp.output(), re.MULTILINE):
        raise RuntimeError(f"testpmd is not forwarding in {mode} mode:\n{tp.output()[-1500:]}")


def _log_dir(opts: Options, case: Case, backend: Backend, rep: int, attempt: int) -> Path:
    suffix = f"-retry{attempt}" if attempt else ""
    return opts.log_dir / f"{case.group}-{case.key}-{backend.key}-r{rep}{suffix}"


def run_once(case: Case, backend: Backend, rep: int, opts: Options,
             attempt: int = 0) -> tuple[float, list[str], dict[str, Any]]:
    """One run: start the back-end, then the front-end; measure; stop both.
    Returns (packets per second, command lines, details)."""
    tmp = tempfile.mkdtemp(prefix="vhb-", dir="/tmp")   # short: AF_UNIX paths < 108 bytes
    sock = os.path.join(tmp, "net.sock")
    logs = _log_dir(opts, case, backend, rep, attempt)
    logs.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    details: dict[str, Any] = {"rep": rep, "logs": str(logs)}
    be_tp: Testpmd | None = None
    be_vh: _VhostpyProcess | None = None
    fe: Testpmd | None = None
    try:
        if backend.is_dpdk:
            assert backend.dpdk_mode is not None
            be_tp = Testpmd(vhost_vdev(sock), forward_mode=backend.dpdk_mode, cpu=opts.be_cpu,
                            burst=BURST, txpkts=case.size if backend.dpdk_txpkts else None,
                            log_path=logs / "backend.log")
            commands.append(shell_join(be_tp.argv) + " </dev/null")
            be_tp.start()
            be_tp.wait_ready(30)
            _check_mode(be_tp, backend.dpdk_mode)
        else:
            be_vh = _VhostpyProcess(backend.module, sock, opts.be_cpu, logs / "backend.log",
                                    backend.implementation)
            commands.append(shell_join(be_vh.argv))
        be = be_tp or be_vh
        assert be is not None
        fe = Testpmd(virtio_user_vdev(sock, queue_size=QUEUE_SIZE, mac=FE_MAC,
                                      packed_vq=case.packed),
                     forward_mode=case.fe_mode, cpu=opts.fe_cpu, burst=BURST,
                     txpkts=case.size if case.fe_mode == "txonly" or case.tx_first else None,
                     tx_first=case.tx_first, log_path=logs / "frontend.log")
        commands.append(shell_join(fe.argv) + " </dev/null")
        fe.start()
        fe.wait_ready(30)
        _check_mode(fe, case.fe_mode)
        rounds, cpu = _measure(fe, case.attr, be.pid, be.alive, opts)
        pps = rate(rounds, case.attr, skip=0)
        first, last = rounds[0], rounds[-1]
        assert first.time is not None and last.time is not None
        details.update(rounds=len(rounds), span_s=round(last.time - first.time, 3), **cpu)
        return pps, commands, details
    finally:
        _stop_all(fe, be_tp, be_vh, details)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_all(fe: Testpmd | None, be_tp: Testpmd | None, be_vh: _VhostpyProcess | None,
              details: dict[str, Any]) -> None:
    """Stop the front-end and a DPDK back-end together (each takes up to ~1 s after SIGINT:
    testpmd's main loop sleeps 1 s at a time), a vhostpy back-end right after the
    front-end.  Never raises; what they reported goes into ``details``."""
    got: dict[str, Any] = {}

    def stop(name: str, tp: Testpmd) -> None:
        with contextlib.suppress(Exception):
            got[name] = tp.stop()
            got[name + "_rc"] = tp.returncode

    threads = []
    for name, tp in (("frontend", fe), ("backend", be_tp)):
        if tp is not None and tp.proc is not None:
            t = threading.Thread(target=stop, args=(name, tp), daemon=True)
            t.start()
            threads.append(t)
    for t in threads:
        t.join(30)
    if be_vh is not None:
        with contextlib.suppress(Exception):
            got["backend_rc"] = be_vh.stop()
        details["backend_counters"] = _parse_counters(be_vh.output())
    details["frontend_final"] = _stats_dict(got.get("frontend"))
    details["frontend_rc"] = got.get("frontend_rc")
    if be_tp is not None:
        details["backend_final"] = _stats_dict(got.get("backend"))
    details["backend_rc"] = got.get("backend_rc")


# ------------------------------------------------------------------------------- suites


def _results_for(cases: Sequence[Case], quick: bool) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    for case in cases:
        for b in case.backends:
            if quick and not b.quick:
                continue
            r = Result(group=case.group, case=case.key, title=case.title, backend=b.key,
                       label=b.label, unit="Mpps", reference=b.reference)
            r.extra.update(size=case.size, frontend_mode=case.fe_mode,
                           frontend_counter=case.attr, tx_first=case.tx_first,
                           packed=case.packed, runs=[])
            if not b.is_dpdk:
                r.extra["implementation"] = b.implementation or vhostpy_implementation()
            results[(case.key, b.key)] = r
    return results


def run_cases(cases: Sequence[Case], opts: Options) -> list[Result]:
    """Every (case, back-end) ``opts.repeat`` times, interleaved; see the module docstring."""
    results = _results_for(cases, opts.quick)
    try:
        _run_all(cases, opts, results)
    except KeyboardInterrupt as exc:   # hand what was measured to bench/run.py
        exc.partial_results = _finish(cases, results)  # type: ignore[attr-defined]
        raise
    return _finish(cases, results)


def _finish(cases: Sequence[Case], results: dict[tuple[str, str], Result]) -> list[Result]:
    for r in results.values():
        _flag_disturbed(r)
    return [results[(c.key, b.key)] for c in cases for b in c.backends
            if (c.key, b.key) in results]


def _run_all(cases: Sequence[Case], opts: Options,
             results: dict[tuple[str, str], Result]) -> None:
    total = sum(min(opts.repeat, b.max_reps or opts.repeat) for c in cases
                for b in c.backends if (c.key, b.key) in results)
    done = 0
    for rep in range(opts.repeat):
        for case in cases:
            for b in ordered([b for b in case.backends if (case.key, b.key) in results
                              and (b.max_reps is None or rep < b.max_reps)], rep):
                r = results[(case.key, b.key)]
                done += 1
                attempt = 0
                while True:
                    left = max(0.0, opts.wait_budget - opts.extra.get("waited_s", 0.0))
                    waited, idle = wait_idle(min(opts.wait_idle, left))
                    opts.extra["waited_s"] = opts.extra.get("waited_s", 0.0) + waited
                    try:
                        pps, commands, details = run_once(case, b, rep, opts, attempt)
                    except Exception as exc:  # noqa: BLE001 (one failed run must not end all)
                        logs = _log_dir(opts, case, b, rep, attempt)
                        r.fail(f"{type(exc).__name__} (logs in {logs}): {exc}", rep)
                        log(f"[{done}/{total}] {case.key} {b.key} rep {rep}: FAILED: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                        break
                    details.update(waited_for_idle_s=round(waited, 1), attempt=attempt)
                    cpu = " ".join(f"{k.replace('_cpu_percent', '').replace('_percent', '')} "
                                   f"{v:.0f}%" for k, v in details.items()
                                   if k.endswith("percent"))
                    line = (f"[{done}/{total}] {case.key} {b.key} rep {rep}: {pps / 1e6:.3f} "
                            f"Mpps over {details['span_s']:.1f} s (CPU: {cpu})")
                    # Re-run only when the machine was idle before: busy throughout, a re-run
                    # would be disturbed too.
                    if _disturbed(details) and attempt < opts.retries and idle and left > 0:
                        attempt += 1
                        log(line + f": disturbed, retry {attempt}/{opts.retries}")
                        r.extra.setdefault("discarded_runs", []).append(
                            {"mpps": round(pps / 1e6, 5), **details})
                        continue
                    log(line)
                    r.add(pps / 1e6, rep)
                    if not r.commands:
                        r.commands = commands
                    r.extra["runs"].append({"mpps": round(pps / 1e6, 5), **details})
                    break


def _disturbed(details: dict[str, Any]) -> bool:
    return bool((details.get("other_cpu_percent") or 0) > DISTURBED_PERCENT
                or (details.get("steal_percent") or 0) > DISTURBED_PERCENT)


def wait_idle(max_wait: float, sample: float = 1.0) -> tuple[float, bool]:
    """Wait (up to ``max_wait`` seconds) until other processes use at most
    ``DISTURBED_PERCENT`` of a CPU over ``sample`` seconds.  Returns the seconds waited and
    whether the machine was found idle (False also when ``max_wait`` is 0: not looked)."""
    if max_wait <= 0:
        return 0.0, False
    start = time.monotonic()
    said = False
    while True:
        t0, (busy0, _), own0 = time.monotonic(), _system_busy(), _own_cpu()
        time.sleep(sample)
        t1, (busy1, _), own1 = time.monotonic(), _system_busy(), _own_cpu()
        other = 100 * max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        waited = time.monotonic() - start
        if other <= DISTURBED_PERCENT:
            if said:
                log(f"machine idle again after {waited:.0f} s")
            return waited, True
        if waited >= max_wait:
            log(f"machine still busy ({other:.0f}% of a CPU) after {waited:.0f} s: running anyway")
            return waited, False
        if not said:
            log(f"other processes use {other:.0f}% of a CPU: waiting up to {max_wait:.0f} s "
                "for them to finish")
            said = True
        time.sleep(2)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _flag_disturbed(r: Result) -> None:
    """A warning when other processes took a noticeable share of a CPU during runs."""
    runs = r.extra.get("runs", [])
    other = [run.get("other_cpu_percent") or 0.0 for run in runs]
    steal = [run.get("steal_percent") or 0.0 for run in runs]
    bad = [o for o, s in zip(other, steal) if o > DISTURBED_PERCENT or s > DISTURBED_PERCENT]
    if bad:
        r.extra.setdefault("warnings", []).append(
            f"{len(bad)} of {len(runs)} run(s) disturbed: other processes used up to "
            f"{max(other):.0f}% of a CPU (steal up to {max(steal):.0f}%) while measuring")


def switch_flood_rate(seconds: float, cpu: int | None = None) -> tuple[float, float]:
    """Frames per second through ``Switch.forward`` with one attached port: 64-frame
    batches of one 64-byte unicast frame to an unknown MAC, flooded to no other port.
    Also returns the share of the wall time this thread was on a CPU (< 1: preempted)."""
    from bench.vhostpy_txgen import udp_frame
    from vhostpy.switch import Switch

    class Sink:
        name = "guest"

        def send(self, frames: Sequence[bytes]) -> int:
            return len(frames)

    sw = Switch()
    port = Sink()
    sw.attach(port)
    batch = [udp_frame(64, "02:00:00:00:00:00", FE_MAC)] * 64
    old = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        n = 0
        start, cpu_start = time.perf_counter(), time.thread_time()
        while True:
            for _ in range(200):
                sw.forward(port, batch)
            n += 200 * len(batch)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        on_cpu = (time.thread_time() - cpu_start) / elapsed
    finally:
        os.sched_setaffinity(0, old)
    assert sw.flooded >= n
    return n / elapsed, on_cpu


def _backend_keys(cases: Sequence[Case]) -> dict[str, str]:
    """Every back-end key of `cases`, once each, in order (for `pick_named`)."""
    return {b.key: b.key for c in cases for b in c.backends}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The net benchmark's options, for ``bench/run.py`` (all default to everything).
    Unknown names are refused when the command line is parsed."""
    cases = net_cases()
    case_keys = {c.key: c.key for c in cases}
    backend_keys = _backend_keys(cases)

    def names(known: dict[str, str], what: str) -> Callable[[str], str]:
        def check(value: str) -> str:
            try:
                pick_named(value, known, what)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            return value
        return check

    g = ap.add_argument_group("net (DPDK virtio-user front-end)")
    g.add_argument("--net-cases", default=None, metavar="K1,K2",
                   type=names(case_keys, "net case"),
                   help=f"net cases to run (default all: {','.join(case_keys)})")
    g.add_argument("--net-backends", default=None, metavar="B1,B2",
                   type=names(backend_keys, "net back-end"),
                   help=f"back-ends to run in each case (default all: "
                        f"{','.join(backend_keys)}); a case keeps its reference, so ratios "
                        "still come out")


def selected_cases(cases: Sequence[Case], names: str | None,
                   backends: str | None) -> list[Case]:
    """``cases`` cut down to those named in ``names`` and, in each, to the back-ends named
    in ``backends`` plus the case's reference (both comma-separated; ``None``: all).
    Unknown names raise ValueError listing the known ones."""
    chosen = pick_named(names, {c.key: c for c in cases}, "net case") or list(cases)
    known = _backend_keys(cases)
    wanted = set(pick_named(backends, known, "net back-end")) or set(known)
    out = []
    for c in chosen:
        kept = tuple(b for b in c.backends if b.reference or b.key in wanted)
        if any(not b.reference for b in kept):
            out.append(replace(c, backends=kept))
    return out


def run_net(args: argparse.Namespace) -> list[Result]:
    """The ``net`` group (DPDK needed; raises :class:`Skipped` without it)."""
    cases = selected_cases(net_cases(), getattr(args, "net_cases", None),
                           getattr(args, "net_backends", None))
    require_testpmd()
    opts = options_from(args)
    _warn_cpus(opts)
    return run_cases(cases, opts)


def run_python(args: argparse.Namespace) -> list[Result]:
    """The ``python`` group: the handler case (needs DPDK) and the switch alone."""
    opts = options_from(args)
    out: list[Result] = []
    try:
        require_testpmd()
    except Skipped as exc:
        for case in python_cases():
            for r in _results_for([case], opts.quick).values():
                r.fail(f"skipped: {exc}")
                out.append(r)
    else:
        _warn_cpus(opts)
        out += run_cases(python_cases(), opts)
    try:
        out.append(_switch_flood(opts))
    except KeyboardInterrupt as exc:
        exc.partial_results = out  # type: ignore[attr-defined]
        raise
    return out


def _switch_flood(opts: Options) -> Result:
    sw = Result(group="python", case="switch_flood",
                title="Switch.forward alone, 64 B, one port (flood to no one)",
                backend="switch", label=_vhostpy_label("vhostpy.switch.Switch, in-process"),
                unit="M frames/s")
    sw.extra["implementation"] = vhostpy_implementation()
    sw.extra["runs"] = []
    for rep in range(opts.repeat):
        fps, on_cpu = switch_flood_rate(min(opts.seconds, 2.0), opts.be_cpu)
        sw.add(fps / 1e6, rep)
        sw.extra["runs"].append({"rep": rep, "ns_per_frame": round(1e9 / fps, 1),
                                 "on_cpu": round(on_cpu, 3)})
        log(f"switch_flood rep {rep}: {fps / 1e6:.3f} M frames/s "
            f"({1e9 / fps:.0f} ns per frame, on CPU {100 * on_cpu:.0f}% of the time)")
    preempted = [r["on_cpu"] for r in sw.extra["runs"] if r["on_cpu"] < 0.85]
    if preempted:
        warning = (f"{len(preempted)} of {opts.repeat} run(s) disturbed: on a CPU only "
                   f"{100 * min(preempted):.0f}% of the time")
        sw.extra["warnings"] = [warning]
    sw.commands = [shell_join([sys.executable, "-m", "bench.net", "switch-flood", "--seconds",
                               f"{min(opts.seconds, 2.0):g}", "--cpu", str(opts.be_cpu)])]
    return sw


def _warn_cpus(opts: Options) -> None:
    if opts.be_cpu == opts.fe_cpu:
        log(f"only one usable CPU ({opts.be_cpu}): front-end and back-end share it; "
            "the figures measure the scheduler more than the rings")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.net switch-flood [--seconds S] [--cpu N]``: the in-process switch
    measurement alone (prints M frames/s)."""
    parser = argparse.ArgumentParser(prog="python -m bench.net")
    sub = parser.add_subparsers(dest="command", required=True)
    sf = sub.add_parser("switch-flood", help="Switch.forward alone, one port")
    sf.add_argument("--seconds", type=float, default=2.0)
    sf.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    fps, on_cpu = switch_flood_rate(args.seconds, args.cpu)
    print(f"{fps / 1e6:.3f} M frames/s ({1e9 / fps:.0f} ns per frame, "
          f"{vhostpy_implementation()}, on CPU {100 * on_cpu:.0f}% of the time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
