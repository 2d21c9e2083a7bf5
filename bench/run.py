"""Run the benchmark suite and write ``DIR/results.md`` and ``DIR/results.json``.

    python -m bench.run [--quick] [--only net|idle|blk|python] [--repeat N] [--out DIR]

Groups: ``net`` (bench/net.py: vhostpy against DPDK net_vhost, DPDK virtio-user as the
front-end), ``idle`` (bench/idle.py: each back-end's CPU use with a front-end attached and
no traffic), ``python`` (bench/net.py: frames/s through a Python handler, the switch alone;
plus ``run_python(args)`` of bench/python_level.py and bench/blk.py when they have one),
``blk`` (bench/blk.py's ``run_blk(args)``, skipped when that module is absent).  ``--only``
may be repeated.

Benchmark modules get the parsed arguments: ``args.quick``, ``args.repeat`` (None: the
module's default; also as ``args.repetitions``), ``args.seconds`` (None: the module's
default), ``args.out`` (a Path; logs go under it), plus whatever the optional
modules' ``add_arguments(parser)`` add.  They return :class:`bench.common.Result` objects, or plain
dicts (bench/blk.py's records: ``case``, ``backend``, ``metric``, ``values``, ``command``,
``cpu_per_io_us_values``... converted by :func:`as_results`).  A module raising ``Skipped``
or ``BenchSetupError`` (by class name) is listed as skipped; any other exception is recorded
as a failure and the other groups still run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Result,
    log,
    machine_facts,
    now_utc,
    render_tables,
    shell_join,
    write_results,
)

GROUPS = ("net", "idle", "python", "blk")
#: Benchmark modules written separately, imported lazily, each optional: (group, module,
#: function).  A module that does not exist is skipped (said so for the blk group).
OPTIONAL = (
    ("idle", "bench.idle", "run_idle"),
    ("python", "bench.blk", "run_python"),
    ("python", "bench.python_level", "run_python"),
    ("blk", "bench.blk", "run_blk"),
)
SKIP_EXCEPTIONS = ("Skipped", "BenchSetupError")
#: bench/blk.py's C baseline (the ratio denominator of its cases).
BLK_REFERENCE = "qemu-storage-daemon"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="about 1 s per run (default repetitions: 1)")
    parser.add_argument("--only", action="append", choices=GROUPS, metavar="GROUP",
                        help="run only this group: net, idle, blk or python (repeatable)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="repetitions of every run, interleaved (default 5; --quick: 1)")
    parser.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="measured seconds per run (default: each module's)")
    parser.add_argument("--wait-idle", type=float, default=None, metavar="S",
                        help="before each net run wait up to S s for other processes to use "
                        "< 15%% of a CPU, 5*S in all (default 120; --quick: 0)")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="re-run a net run disturbed by other processes up to N times "
                        "when the machine was idle before it (default 2; --quick: 0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", metavar="DIR",
                        help="where results.md, results.json and logs/ go (default bench/out)")
    for name in dict.fromkeys(["bench.net", *(module for _, module, _ in OPTIONAL)]):
        try:
            mod = _load(name)
        except Exception:  # noqa: BLE001 (reported when its group runs)
            mod = None
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    return parser


def as_results(group: str, items: list[Any]) -> list[Result]:
    """``Result`` objects as they are; bench/blk.py's dict records converted (one Result
    per record, plus one each for the back-end CPU per I/O and the guest's interrupts per
    I/O when the record has them)."""
    out: list[Result] = []
    for item in items:
        if isinstance(item, Result):
            out.append(item)
            continue
        rec = dict(item)
        title = str(rec.get("case", "?"))
        key = str(rec.get("job") or title)
        backend = str(rec.get("backend", "?"))
        command = rec.get("command") or []
        commands = [command] if isinstance(command, str) else [str(c) for c in command]
        values = [float(v) for v in rec.get("values") or []]
        known = {"case", "job", "backend", "metric", "values", "command", "median", "min",
                 "max", "cpu_per_io_us", "cpu_per_io_us_values", "irqs_per_io_values",
                 "higher_is_better"}
        r = Result(group=group, case=key, title=title, backend=backend, label=backend,
                   unit={"iops": "IOPS"}.get(str(rec.get("metric")), str(rec.get("metric"))),
                   reference=backend == BLK_REFERENCE, values=values,
                   higher_is_better=bool(rec.get("higher_is_better", True)),
                   repetitions=list(range(len(values))), commands=commands,
                   extra={k: v for k, v in rec.items() if k not in known})
        out.append(r)
        for field, suffix, what, unit in (
                ("cpu_per_io_us_values", "cpu", "back-end CPU", "µs CPU per I/O"),
                ("irqs_per_io_values", "irqs", "guest interrupts", "interrupts per I/O")):
            per_io = [float(v) for v in rec.get(field) or []]
            if per_io:
                out.append(Result(group=group, case=f"{key}/{suffix}", title=f"{title}: {what}",
                                  backend=backend, label=backend, unit=unit,
                                  reference=backend == BLK_REFERENCE, higher_is_better=False,
                                  values=per_io, repetitions=list(range(len(per_io))),
                                  commands=commands))
    return out


def _load(module: str) -> Any:
    """A benchmark module, imported lazily; None when it does not exist (yet)."""
    if importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM, and SIGINT even when inherited as ignored (a background job of a script), stop
    # the suite the way Ctrl-C does: processes ended, partial results written.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.repeat is not None and args.repeat < 1:
        print("python -m bench.run: error: --repeat must be at least 1", file=sys.stderr)
        return 2
    args.out = args.out.resolve()
    if getattr(args, "repetitions", None) is None:
        args.repetitions = args.repeat      # bench/blk.py's name for it
    groups = [g for g in GROUPS if not args.only or g in args.only]
    started, t0 = now_utc(), time.monotonic()
    command = shell_join(["python", "-m", "bench.run",
                          *(sys.argv[1:] if argv is None else argv)])
    log(f"{command} -> {args.out}")
    facts = machine_facts()
    log(f"machine: {facts['cpu_model']}, {facts['cpus_online']} CPUs, {facts['kernel']}, "
        f"{facts['python']}, {facts['dpdk']}, vhostpy {facts['vhostpy_implementation']}")

    results: list[Result] = []
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    interrupted = False

    def attempt(name: str, group: str, fn: Callable[[argparse.Namespace], list[Any]]) -> None:
        try:
            results.extend(as_results(group, fn(args)))
        except KeyboardInterrupt as exc:
            results.extend(as_results(group, getattr(exc, "partial_results", [])))
            raise
        except Exception as exc:  # noqa: BLE001 (one group must not lose the others)
            if type(exc).__name__ in SKIP_EXCEPTIONS:
                skipped[name] = str(exc)
                log(f"{name}: skipped: {exc}")
            else:
                skipped[name] = f"FAILED: {type(exc).__name__}: {exc}"
                log(f"{name}: FAILED\n{traceback.format_exc()}")

    try:
        for group in groups:
            log(f"=== {group}")
            if group in ("net", "python"):
                from bench import net

                notes[group] = net.NOTES[group]
                attempt(group, group, net.run_net if group == "net" else net.run_python)
            for g, module, fn_name in OPTIONAL:
                if g != group:
                    continue
                where = f"{module.replace('.', '/')}.py"
                try:
                    mod = _load(module)
                except Exception as exc:  # noqa: BLE001
                    skipped[f"{group} ({where})"] = (f"FAILED to import: "
                                                     f"{type(exc).__name__}: {exc}")
                    continue
                fn = getattr(mod, fn_name, None) if mod is not None else None
                if fn is None:
                    if group == "blk":
                        skipped[f"{group} ({where})"] = (
                            f"{where} is absent" if mod is None else f"{where} has no {fn_name}")
                    continue
                note = getattr(mod, "NOTES", {}).get(group)
                if note:
                    notes[group] = (notes[group] + "\n\n" + note) if group in notes else note
                attempt(f"{group} ({where})", group, fn)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured")

    meta = {"command": command, "started": started, "finished": now_utc(),
            "duration_s": round(time.monotonic() - t0, 1), "quick": args.quick,
            "repeat": args.repeat if args.repeat is not None else (1 if args.quick else 5),
            "groups": groups, "interrupted": interrupted, "out": str(args.out)}
    md, js = write_results(args.out, results, facts, meta, notes, skipped)
    print(render_tables(results, notes, skipped))
    log(f"wrote {md} and {js}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
