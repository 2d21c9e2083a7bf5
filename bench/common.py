"""Shared pieces of the benchmark suite: result records, machine facts, the writers.

A benchmark module (``bench/net.py``, ``bench/blk.py``) returns a list of :class:`Result`:
one per (case, back-end), holding one value per repetition.  ``bench/run.py`` gathers them,
adds :func:`machine_facts` and writes ``results.md`` and ``results.json`` with
:func:`write_results`.

Conventions every module follows (so the tables mean the same thing):

* ``group`` is the section (``"net"``, ``"blk"``, ``"python"``); ``case`` a stable id within
  it (``"g2b_64"``); ``backend`` a stable id within the case (``"dpdk"``, ``"vhostpy"``).
* Exactly one result per case may be the ``reference`` (the C baseline: DPDK ``net_vhost``,
  qemu-storage-daemon); every other result of the case gets a ratio to it, both as the ratio
  of the medians and per repetition (the two runs of one repetition ran back to back, so
  their ratio is the least noisy figure on a shared machine), and as the ratio of the best
  repetitions (highest rate, lowest cost): a disturbance on a shared machine only ever
  slows a run down, so the best run of each side is the closest to what it can do, and
  that ratio does not depend on which side a slow spell happened to hit.
* Repetitions are interleaved (reference, candidate, reference, candidate...) and numbered
  from 0; ``Result.add(value, rep)`` keeps the number so ratios pair the right runs.
* ``commands`` are the exact command lines of one repetition, shell-quoted
  (:func:`shell_join`), one per process.
* Nothing here asserts a speed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "Result",
    "fmt",
    "log",
    "machine_facts",
    "now_utc",
    "ordered",
    "pick_named",
    "ratios",
    "render_markdown",
    "render_tables",
    "shell_join",
    "tests_on_path",
    "vhostpy_implementation",
    "write_results",
]

#: The repository root (``bench/``'s parent).
REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
SCHEMA = 1


def tests_on_path() -> None:
    """Make ``tests/dpdk.py`` (and ``tests/qemu_guest.py``...) importable."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def log(message: str) -> None:
    """Progress line on stderr (the results go to files)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def shell_join(argv: Sequence[str | os.PathLike[str]]) -> str:
    """A command line as one could paste it into a shell."""
    return shlex.join(os.fspath(a) for a in argv)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One (case, back-end): a value per repetition, and how it was obtained."""

    group: str
    case: str
    title: str                      # "guest→back-end, 64 B"
    backend: str                    # "dpdk", "vhostpy", ...
    label: str                      # "DPDK net_vhost, rxonly"
    unit: str = "Mpps"
    reference: bool = False         # the case's baseline (ratio denominator)
    higher_is_better: bool = True
    values: list[float] = field(default_factory=list)
    repetitions: list[int] = field(default_factory=list)   # parallel to values
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, value: float, rep: int | None = None) -> None:
        self.values.append(float(value))
        self.repetitions.append(len(self.values) - 1 if rep is None else rep)

    def fail(self, message: str, rep: int | None = None) -> None:
        where = "" if rep is None else f"repetition {rep}: "
        self.errors.append(where + message)

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def best(self) -> float | None:
        """The best repetition: the highest value, or the lowest if lower is better."""
        return self.max if self.higher_is_better else self.min

    def by_rep(self) -> dict[int, float]:
        return dict(zip(self.repetitions, self.values))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=self.min, max=self.max, runs=len(self.values))
        return d


def ordered(backends: Sequence[Any], rep: int) -> list[Any]:
    """The back-ends of one case in the order to run them in repetition ``rep``: as given
    on even repetitions, reversed on odd ones, so neither side always runs first."""
    return list(backends) if rep % 2 == 0 else list(reversed(backends))


def pick_named(value: str | Sequence[str] | None, known: dict[str, Any],
               what: str) -> list[Any]:
    """The entries of ``known`` named in ``value`` (a comma-separated string or a list of
    names), in the order given; ``[]`` for ``None`` (meaning "all", the caller's default).
    An unknown name raises ValueError listing the known ones."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in known:
            raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
        out.append(known[name])
    return out


def ratios(results: Sequence[Result]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """For every non-reference result whose case has a reference: ``of_medians`` (the ratio
    of the medians), ``of_best`` (the ratio of the best repetitions), ``per_repetition``
    (value / reference value of the same repetition), their ``min``, ``median`` and ``max``.
    Keyed by (group, case, backend)."""
    refs = {(r.group, r.case): r for r in results if r.reference}
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        ref = refs.get((r.group, r.case))
        if ref is None or ref is r:
            continue
        info: dict[str, Any] = {"reference": ref.backend, "of_medians": None,
                                "of_best": None, "per_repetition": {}, "min": None,
                                "median": None, "max": None}
        if r.median is not None and ref.median:
            info["of_medians"] = r.median / ref.median
        if r.best is not None and ref.best:
            info["of_best"] = r.best / ref.best
        mine, theirs = r.by_rep(), ref.by_rep()
        pairs = {rep: mine[rep] / theirs[rep] for rep in sorted(mine)
                 if theirs.get(rep)}
        if pairs:
            vals = list(pairs.values())
            info.update(per_repetition=pairs, min=min(vals), max=max(vals),
                        median=statistics.median(vals))
        out[(r.group, r.case, r.backend)] = info
    return out


# --------------------------------------------------------------------------- machine


def _run(argv: Sequence[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return ""
    return (r.stdout or r.stderr).strip()


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    model = m.group(1).strip() if m else platform.processor() or "unknown"
    if re.search(r"^flags\s*:.*\bhypervisor\b", text, re.MULTILINE):
        model += " (virtual machine)"
    return model


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.MULTILINE)
    return m.group(1) if m else ""


def _commit() -> str | None:
    """The checked-out commit, read from .git's files (no git command)."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        packed = (git / "packed-refs").read_text()
        m = re.search(rf"^([0-9a-f]{{40}}) {re.escape(ref)}$", packed, re.MULTILINE)
        return m.group(1) if m else None
    except OSError:
        return None


def _first_line(text: str) -> str | None:
    return text.splitlines()[0].strip() if text else None


def vhostpy_implementation() -> str:
    """``vhostpy.implementation`` when the package has one, else ``"pure-python"`` (the only
    implementation before the compiled fast path exists)."""
    import vhostpy

    return str(getattr(vhostpy, "implementation", "pure-python"))


def machine_facts() -> dict[str, Any]:
    """CPU, cores, kernel, Python, DPDK/QEMU versions... (missing tools give ``None``)."""
    import vhostpy

    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "vhostpy": getattr(vhostpy, "__version__", "?"),
        "vhostpy_implementation": vhostpy_implementation(),
        "commit": _commit(),
        "loadavg_at_start": list(os.getloadavg()),
        "dpdk": None,
        "testpmd": None,
        "qemu": None,
        "qemu_storage_daemon": None,
        "fio": None,
    }
    tests_on_path()
    try:
        from dpdk import dpdk_version, find_testpmd

        facts["testpmd"] = find_testpmd()
        facts["dpdk"] = dpdk_version(facts["testpmd"])
    except Exception as exc:  # noqa: BLE001 (absent or broken DPDK is a fact, not an error)
        facts["dpdk_error"] = f"{type(exc).__name__}: {exc}"
    for key, exe in (("qemu", "qemu-system-x86_64"), ("qemu_storage_daemon",
                                                       "qemu-storage-daemon"), ("fio", "fio")):
        if shutil.which(exe):
            facts[key] = _first_line(_run([exe, "--version"]))
    return facts


# --------------------------------------------------------------------------- writers


def fmt(x: float | None) -> str:
    """About three significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _group_table(results: Sequence[Result],
                 rat: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    units = {r.unit for r in results}
    one_unit = len(units) == 1
    has_ref = any(r.reference for r in results)
    head = ["case", "back-end", f"{units.pop()} (median)" if one_unit else "median",
            "min–max"]
    if not one_unit:
        head.append("unit")
    head.append("runs")
    if has_ref:
        head += ["vs reference: ratio of medians (per-repetition min–max)",
                 "ratio of best runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first_seen: dict[str, int] = {}
    for i, r in enumerate(results):
        first_seen.setdefault(r.case, i)
    last_case = None
    for r in sorted(results, key=lambda r: first_seen[r.case]):   # stable: a case together
        case = r.title if r.case != last_case else ""
        last_case = r.case
        row = [case, r.label, fmt(r.median),
               f"{fmt(r.min)}–{fmt(r.max)}" if r.values else "—"]
        if not one_unit:
            row.append(r.unit)
        runs = str(len(r.values))
        if r.errors:
            runs += f" ({len(r.errors)} failed)"
        row.append(runs)
        if has_ref:
            if r.reference:
                row += ["reference", ""]
            else:
                info = rat.get((r.group, r.case, r.backend))
                if info is None or info["of_medians"] is None:
                    row.append("—")
                else:
                    cell = f"{info['of_medians']:.3f}"
                    if info["min"] is not None:
                        cell += f" ({info['min']:.3f}–{info['max']:.3f})"
                    row.append(cell)
                row.append("—" if info is None or info["of_best"] is None
                           else f"{info['of_best']:.3f}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


GROUP_TITLES = {"net": "net: vhost-user virtio-net back-ends",
                "python": "Python level", "blk": "blk: virtio-blk back-ends"}


def render_tables(results: Sequence[Result], notes: dict[str, str] | None = None,
                  skipped: dict[str, str] | None = None) -> str:
    """The result sections of ``results.md``: a table per group, then what was skipped,
    what failed and what disturbed the runs."""
    notes = notes or {}
    skipped = skipped or {}
    rat = ratios(results)
    out: list[str] = []
    groups: list[str] = []
    for r in results:
        if r.group not in groups:
            groups.append(r.group)
    for g in groups:
        rs = [r for r in results if r.group == g]
        out += [f"## {GROUP_TITLES.get(g, g)}", ""]
        if notes.get(g):
            out += [notes[g].strip(), ""]
        out += _group_table(rs, rat)
        out.append("")
    if skipped:
        out += ["## Skipped", ""]
        out += [f"- {name}: {why}" for name, why in skipped.items()]
        out.append("")
    errors = [(r, e) for r in results for e in r.errors]
    if errors:
        out += ["## Failed runs", ""]
        for r, e in errors:
            first = e.strip().splitlines()[0] if e.strip() else e
            out.append(f"- {r.group}/{r.case}/{r.backend}: {_cell(first)[:300]}")
        out.append("")
    warnings = [(r, w) for r in results for w in r.extra.get("warnings", [])]
    if warnings:
        out += ["## Warnings", ""]
        out += [f"- {r.group}/{r.case}/{r.backend}: {_cell(str(w))}" for r, w in warnings]
        out.append("")
    return "\n".join(out)


def render_markdown(results: Sequence[Result], facts: dict[str, Any], meta: dict[str, Any],
                    notes: dict[str, str] | None = None,
                    skipped: dict[str, str] | None = None) -> str:
    """The whole ``results.md``."""
    out = ["# vhostpy benchmark results", ""]
    out.append(f"`{meta.get('command', '')}` — {meta.get('started', '')}, "
               f"{meta.get('duration_s', 0):.0f} s; {meta.get('repeat')} repetition(s) per "
               f"run{' (quick)' if meta.get('quick') else ''}, interleaved"
               f"{'; INTERRUPTED' if meta.get('interrupted') else ''}.")
    out.append("")
    dpdk = facts.get("dpdk") or "no DPDK"
    qemu = facts.get("qemu") or "no QEMU"
    out.append(f"Machine: {facts.get('cpu_model')}, {facts.get('cpus_online')} CPUs; "
               f"{facts.get('kernel')}; {facts.get('python')}; {dpdk}; {qemu}; "
               f"vhostpy {facts.get('vhostpy')} ({facts.get('vhostpy_implementation')}).")
    out.append("")
    out.append(render_tables(results, notes, skipped))
    out += ["## Machine", "", "| fact | value |", "|---|---|"]
    for k, v in facts.items():
        out.append(f"| {k} | {_cell(str(v))} |")
    out.append("")
    out += ["## Command lines", "",
            ("One repetition's processes per (case, back-end); socket directories and DPDK "
             "file prefixes differ from run to run."), ""]
    groups: list[str] = []
    for r in results:
        if r.group not in groups:
            groups.append(r.group)
    for g in groups:
        for r in (r for r in results if r.group == g):
            if not r.commands:
                continue
            out.append(f"- {g}/{r.case} — {r.title} — {r.label}:")
            out.append("")
            out.append("  ```sh")
            out += [f"  {c}" for c in r.commands]
            out.append("  ```")
    out.append("")
    return "\n".join(out)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return repr(obj)


def write_results(out_dir: str | os.PathLike[str], results: Iterable[Result],
                  facts: dict[str, Any], meta: dict[str, Any],
                  notes: dict[str, str] | None = None,
                  skipped: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns their paths."""
    results = list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rat = ratios(results)
    records = []
    for r in results:
        d = r.as_dict()
        info = rat.get((r.group, r.case, r.backend))
        if info is not None:
            info = dict(info, per_repetition={str(k): v for k, v in
                                              info["per_repetition"].items()})
        d["ratio"] = info
        records.append(d)
    doc = {"schema": SCHEMA, **meta, "machine": facts, "notes": notes or {},
           "skipped": skipped or {}, "results": records}
    json_path = out / "results.json"
    md_path = out / "results.md"
    json_path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    md_path.write_text(render_markdown(results, facts, meta, notes, skipped))
    return md_path, json_path


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def print_counters(counters: dict[str, Any]) -> None:
    """A bench back-end's last words: ``vhostpy-bench: counters {json}`` on stderr, with the
    implementation that ran (`vhostpy.implementation`, else "pure-python")."""
    import vhostpy

    counters.setdefault("implementation",
                        str(getattr(vhostpy, "implementation", "pure-python")))
    print(f"vhostpy-bench: counters {json.dumps(counters, sort_keys=True)}", file=sys.stderr,
          flush=True)


def serve_until_signalled(device: Any, socket_path: str) -> None:
    """Serve `device` on `socket_path` (an `EventLoop` and a `Server`) until SIGTERM or
    SIGINT, then close both."""
    import signal

    from vhostpy.loop import EventLoop
    from vhostpy.server import Server

    loop = EventLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    server = Server(device, loop, socket_path=socket_path)
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
