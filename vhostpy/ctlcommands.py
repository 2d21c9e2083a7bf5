"""The control commands of the device commands (`vhostpy blk|net|rng|serve --control PATH`).

Each function adds one family of commands to a `control.Controls` table; the command line
picks the families its device has. Every handler runs on the serving loop's thread.

* `add_status`: `status` -> {"device", "endpoints": [...], "counters": {...}}: each endpoint
  is `api.Endpoint.status()` (socket, front-end, negotiated features, rings); the counters
  are the ones the counters line prints.
* `add_faults`: `fault add SPEC`, `fault list`, `fault clear` on a set of fault rules (block
  `faults.FaultyStore`, or net fault rules): anything with `add(rule)`, `clear()` and
  `counters()`, with a `parse(spec)` that raises ConfigurationError for a bad spec.
* `add_power`: `power-cut [torn]` on a `writecache.WriteCache` (recorded in the write log
  when there is one): the writes since the last flush are lost and I/O fails until the
  driver resets the device; the answer says what was lost. `mark NAME` puts a named point
  in the write log (`vhostpy replay --mark NAME`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vhostpy.control import ControlError, Controls, expect_args
from vhostpy.writecache import WriteCache
from vhostpy.writelog import LoggedStore

__all__ = ["FaultRules", "add_faults", "add_power", "add_status"]


class FaultRules(Protocol):
    """What `fault add|list|clear` need of a set of rules."""

    def add(self, rule: Any) -> None: ...

    def clear(self) -> None: ...

    def counters(self) -> dict[str, object]: ...


def add_status(controls: Controls, device: str, endpoints: Callable[[], list[dict[str, Any]]],
               counters: Callable[[], dict[str, Any]]) -> None:
    """`status`: the device name, `endpoints()` (one status per socket) and `counters()`."""
    def status(args: list[str]) -> dict[str, Any]:
        expect_args(args, "status", least=0, most=0)
        return {"device": device, "endpoints": endpoints(), "counters": counters()}
    controls.add("status", status, "the device, its sockets, negotiated features, rings and "
                 "counters")


def add_faults(controls: Controls, rules: FaultRules | None, parse: Callable[[str], Any],
               missing: str = "") -> None:
    """`fault add SPEC | list | clear` on `rules`; with `rules` None every one of them
    answers `missing` (why this device takes no faults, and how to start it so it does)."""
    usage = "fault add SPEC | fault list | fault clear"

    def fault(args: list[str]) -> Any:
        if not args or args[0] not in ("add", "list", "clear"):
            raise ControlError(f"usage: {usage}")
        if rules is None:
            raise ControlError(missing)
        if args[0] == "add":
            expect_args(args, "fault add SPEC", least=2, most=2)
            rule = parse(args[1])
            rules.add(rule)
            return rules.counters()
        expect_args(args, f"fault {args[0]}", least=1, most=1)
        if args[0] == "clear":
            rules.clear()
        return rules.counters()
    controls.add("fault", fault, usage)


def add_power(controls: Controls, cache: WriteCache | None, log: LoggedStore | None) -> None:
    """`power-cut [torn]` on `cache`, and `mark NAME` in `log` (each answers why not when
    the device has no write cache / no write log)."""
    def power_cut(args: list[str]) -> dict[str, object]:
        expect_args(args, "power-cut [torn]", least=0, most=1)
        if args and args[0] != "torn":
            raise ControlError(f"power-cut: unknown option {args[0]!r} (torn is the one)")
        if cache is None:
            raise ControlError("power-cut needs a volatile cache: start vhostpy blk with "
                               "--write-cache")
        if not cache.powered:
            raise ControlError("the power is already cut (until the driver resets the "
                               "device)")
        report = cache.power_cut(torn=bool(args))
        if log is not None:
            log.record_cut(report)
        return report.as_dict()

    def mark(args: list[str]) -> dict[str, object]:
        expect_args(args, "mark NAME", least=1, most=1)
        if log is None:
            raise ControlError("mark needs a write log: start vhostpy blk with --log-writes")
        log.mark(args[0])
        return log.counters()
    controls.add("power-cut", power_cut, "power-cut [torn]: lose the writes since the last "
                 "flush; I/O fails until the driver resets the device")
    controls.add("mark", mark, "mark NAME: a named point in the write log")
