"""Network faults on purpose: rules that drop, duplicate, reorder, corrupt or delay frames.

`NetFaults` is a set of `NetFault` rules applied to the frames of virtio-net ports (what
`NetPort.set_faults` installs; `NetApp.faults` is one, shared by every guest port). Each
rule has a kind, a probability and, optionally, a direction and a filter:

* `drop[,p=P]`: the frame is lost;
* `dup[,p=P]`: an identical copy is sent right after it;
* `reorder[,p=P][,depth=N]`: the frame is held back and sent after the next N frames of its
  port and direction (default 3), or after `REORDER_TIMEOUT` seconds if fewer come: a held
  frame is never lost;
* `corrupt[,p=P]`: one bit is flipped in the payload past the headers (Ethernet, VLAN,
  IPv4/IPv6, TCP/UDP/ICMP), so the transport checksum is left wrong (the Internet checksum
  catches every one-bit change); a frame with no payload gets the flip in its checksum field,
  a non-IP frame past its Ethernet header. The length never changes;
* `delay,ms=N` or `delay,ms=A-B` (uniformly at random)`[,p=P]`: the frame is sent that much
  later (frames with equal delays keep their order).

Options every kind takes: `p=P` (0..1, default 1: every matching frame), `dir=rx|tx` (rx:
toward the guest, tx: from the guest, the guest driver's queue names; default both),
`seed=N` (this rule's own random generator, for repeatable runs; otherwise the set's, see
`NetFaults(seed=)`) and `filter=EXPR`, a tcpdump-like expression (`vhostpy.framefilter`:
`filter=udp and port 69`, `filter=not arp`); the filter language has no commas, so `filter=`
may stand anywhere in the spec. Through Python, `NetFault(kind, filter=callable)` takes any
`callable(frame_bytes) -> bool` instead (`scapy=True`: it gets a scapy packet).

Rules are applied in order to each frame of a port and direction. A rule sees a frame when
no earlier rule dropped it, its direction and filter match, and (for `reorder` and
`delay`) no earlier rule already holds the frame; it acts with probability p. The frame
then goes on with every effect that fired: a duplicate is an identical copy, and later rules
act on both alike. Counted: per rule `seen` and `hits`; per set and per port and direction
`dropped`, `duplicated`, `reordered`, `corrupted`, `delayed` frames and frames `held` now.

Rules can be added and cleared while frames flow (`add`, `clear`), on the thread that runs
the ports' loop. Frames held when the rules are cleared are still sent when their time
comes. A filter callable that raises is logged and counted (`errors`), and the rule treats
the frame as not matching: a faulty rule never breaks the data path. This module knows
nothing about virtio: a port hands its frames to a `FaultLane` and gets them back through
the lane's sink.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vhostpy.errors import ConfigurationError
from vhostpy.framefilter import FrameFilter, Headers, compile_filter, parse_headers
from vhostpy.packets import to_scapy

__all__ = ["DIRECTIONS", "KINDS", "REORDER_TIMEOUT", "FaultLane", "NetFault", "NetFaults"]

log = logging.getLogger(__name__)

KINDS = ("drop", "dup", "reorder", "corrupt", "delay")
#: `dir=` values: rx toward the guest, tx from the guest.
DIRECTIONS = ("rx", "tx")
#: Seconds a reordered frame waits for its `depth` later frames before it is sent anyway.
REORDER_TIMEOUT = 0.05
#: Longest delay a rule may ask for (ms), and the deepest reorder.
MAX_DELAY_MS = 60_000
MAX_DEPTH = 1000
#: Frames one lane (a port and direction) may hold at once; beyond it `reorder` and `delay`
#: let frames through (a guest flooding a slow delay cannot grow memory without bound).
MAX_HELD = 10_000
#: Frames `FaultLane.offer` passes through the rules before it tries to place them.
OFFER_CHUNK = 32
_HOLDS = ("reorder", "delay")
_OPTIONS = {"p", "dir", "seed", "filter", "depth", "ms"}

#: What a lane needs to send frames later: call_later(seconds, callback) on the loop's thread.
CallLater = Callable[[float, Callable[[], None]], None]


@dataclass(eq=False)
class NetFault:
    """One rule (see the module docstring); `parse` builds one from its spec.

    `filter` is None (every frame), an expression (str, compiled here) or a callable
    `filter(frame) -> bool` (with `scapy=True` it gets a scapy packet). A bad value raises
    ConfigurationError, as `parse` does for a bad spec.
    """

    kind: str
    p: float = 1.0
    depth: int = 3
    ms: tuple[float, float] = (0.0, 0.0)
    direction: str | None = None
    filter: str | Callable[[Any], bool] | None = None
    scapy: bool = False
    seed: int | None = None
    seen: int = 0    # frames that reached this rule and matched its direction and filter
    hits: int = 0    # frames it acted on
    errors: int = 0  # filter calls that raised
    #: The compiled `filter` expression (None for no filter or a callable one).
    expression: FrameFilter | None = field(default=None, init=False, repr=False)
    #: This rule's own generator (`seed=`), else None: it draws from its set's.
    rng: random.Random | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise _BadRule(f"fault {self.kind!r}: {problem}", problem)

    def _problem(self) -> str | None:
        """What is wrong with this rule (None: nothing); compiles its filter expression."""
        if self.kind not in KINDS:
            return f"unknown kind {self.kind!r} (one of {', '.join(KINDS)})"
        if not 0.0 <= self.p <= 1.0:   # NaN fails too
            return f"p={self.p:g} is not a probability in 0..1"
        if not 1 <= self.depth <= MAX_DEPTH:
            return f"depth={self.depth} is not in 1..{MAX_DEPTH}"
        low, high = self.ms
        if not 0 <= low <= high <= MAX_DELAY_MS:
            return f"ms={low:g}-{high:g} is not a range in 0..{MAX_DELAY_MS}"
        if self.kind == "delay" and high == 0:
            return "a delay needs ms=N or ms=A-B (more than 0)"
        if self.direction not in (None, *DIRECTIONS):
            return f"dir={self.direction} is not rx or tx"
        if isinstance(self.filter, str):
            try:
                self.expression = compile_filter(self.filter)
            except ConfigurationError as exc:
                return str(exc)
        elif self.filter is not None and not callable(self.filter):
            return f"filter must be an expression or a callable, not {type(self.filter).__name__}"
        if self.seed is not None:
            self.rng = random.Random(self.seed)
        return None

    @classmethod
    def parse(cls, spec: str) -> NetFault:
        """`drop,p=0.05,dir=tx,filter=tcp port 5000` -> a rule; ConfigurationError naming
        `spec` and what is wrong with it."""
        kind, *options = [part.strip() for part in spec.split(",")]
        if kind not in KINDS:
            raise ConfigurationError(f"fault {spec!r}: unknown kind {kind!r} (one of "
                                     f"{', '.join(KINDS)})")
        values: dict[str, str] = {}
        for option in options:
            key, eq, value = option.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise ConfigurationError(f"fault {spec!r}: {option!r} is not KEY=VALUE")
            if key not in _OPTIONS:
                raise ConfigurationError(f"fault {spec!r}: unknown option {key}= "
                                         f"({', '.join(sorted(_OPTIONS))})")
            if key in values:
                raise ConfigurationError(f"fault {spec!r}: {key}= given twice")
            values[key] = value
        if "depth" in values and kind != "reorder":
            raise ConfigurationError(f"fault {spec!r}: depth= is for reorder faults")
        if ("ms" in values) != (kind == "delay"):
            raise ConfigurationError(f"fault {spec!r}: " + (
                "a delay needs ms=N or ms=A-B" if kind == "delay" else
                "ms= is for delay faults"))
        kwargs: dict[str, Any] = {}
        try:
            if "p" in values:
                kwargs["p"] = _number(values["p"], float)
            if "depth" in values:
                kwargs["depth"] = _number(values["depth"], int)
            if "seed" in values:
                kwargs["seed"] = _number(values["seed"], int)
            if "ms" in values:
                low, dash, high = values["ms"].partition("-")
                kwargs["ms"] = (_number(low, float), _number(high, float) if dash else
                                _number(low, float))
        except ValueError as exc:
            raise ConfigurationError(f"fault {spec!r}: {exc}") from None
        if "dir" in values:
            kwargs["direction"] = values["dir"]
        if "filter" in values:
            kwargs["filter"] = values["filter"]
        try:
            return cls(kind, **kwargs)
        except _BadRule as exc:
            raise ConfigurationError(f"fault {spec!r}: {exc.problem}") from None

    def spec(self) -> str:
        """The rule written back as a spec (what `parse` reads; a Python filter is shown as
        `filter=<python NAME>`, which `parse` refuses)."""
        parts = [self.kind]
        if self.p != 1.0:
            parts.append(f"p={self.p:g}")
        if self.kind == "reorder":
            parts.append(f"depth={self.depth}")
        if self.kind == "delay":
            low, high = self.ms
            parts.append(f"ms={low:g}" if low == high else f"ms={low:g}-{high:g}")
        if self.direction is not None:
            parts.append(f"dir={self.direction}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        if self.expression is not None:
            parts.append(f"filter={self.expression.text}")
        elif self.filter is not None:
            name = getattr(self.filter, "__name__", "callable").strip("<>")
            parts.append(f"filter=<python {name}>")
        return ",".join(parts)

    def as_dict(self) -> dict[str, object]:
        """For status and `fault list`: the spec and what the rule did."""
        out: dict[str, object] = {"spec": self.spec(), "seen": self.seen, "hits": self.hits}
        if self.errors:
            out["errors"] = self.errors
        return out

    def matches(self, direction: str, frame: bytes, headers: Headers | None) -> bool:
        """Whether `frame` (its `headers` parsed when the rule has an expression) matches the
        direction and filter; counts `seen`. A filter callable that raises does not match."""
        if self.direction is not None and self.direction != direction:
            return False
        if self.expression is not None:
            assert headers is not None
            if not self.expression.matches(headers):
                return False
        elif callable(self.filter):
            try:
                matched = bool(self.filter(to_scapy(frame) if self.scapy else frame))
            except Exception:
                self.errors += 1
                if self.errors & (self.errors - 1) == 0:   # 1, 2, 4, ...: no flood
                    log.exception("fault %s: its filter raised (%d times so far); the frame "
                                  "is treated as not matching", self.spec(), self.errors)
                return False
            if not matched:
                return False
        self.seen += 1
        return True

    def fires(self, rng: random.Random) -> bool:
        """Whether the rule acts on a frame it saw (p), drawing from `rng` or its own."""
        p = self.p
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return (self.rng or rng).random() < p

    def delay(self, rng: random.Random) -> float:
        """Seconds a delay rule holds a frame (drawn from `ms`)."""
        low, high = self.ms
        return (low if low == high else (self.rng or rng).uniform(low, high)) / 1000


@dataclass
class FaultCounts:
    """What faults did to frames (per set, and per port and direction)."""

    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    delayed: int = 0
    held: int = 0     # frames held back now (reorder and delay)

    def as_dict(self) -> dict[str, int]:
        return {"dropped": self.dropped, "duplicated": self.duplicated,
                "reordered": self.reordered, "corrupted": self.corrupted,
                "delayed": self.delayed, "held": self.held}


class NetFaults:
    """A set of `NetFault` rules shared by the lanes of any number of ports.

    `seed` seeds the generator of rules without their own `seed=` (None: unpredictable);
    `clock` is what reorder timeouts are measured with. `faults` is the list of rules in
    order; `add`, `clear` and `counters` are what a control socket needs. Loop thread only.
    """

    def __init__(self, faults: Iterable[NetFault] = (), *, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.faults: list[NetFault] = list(faults)
        self.rng = random.Random(seed)
        self.clock = clock
        self.counts = FaultCounts()

    @property
    def active(self) -> bool:
        """Whether any rule is installed (ports take their fast paths while none is)."""
        return bool(self.faults)

    def add(self, fault: NetFault) -> None:
        """Apply `fault` to frames from now on (after the rules already there)."""
        self.faults.append(fault)

    def clear(self) -> None:
        """Drop every rule (frames held now are still sent when their time comes)."""
        self.faults.clear()

    def counters(self) -> dict[str, object]:
        """Totals over every lane, and each rule's spec and counts (`faults`)."""
        return {**self.counts.as_dict(), "faults": [f.as_dict() for f in self.faults]}

    def lane(self, name: str, direction: str, sink: Callable[[list[bytes]], Any],
             call_later: CallLater) -> FaultLane:
        """A lane for one port and direction: frames pass through `FaultLane.process`, and
        what is sent later goes to `sink(frames)` from a `call_later` timer."""
        return FaultLane(self, name, direction, sink, call_later)


class FaultLane:
    """The rules of a `NetFaults` applied to one port's frames in one direction.

    `process(frames)` returns the frames to send now, in order (held frames released by
    this batch after the frame that released them); frames held (`reorder`, `delay`) go to
    `sink` later, from a timer. `counts` is this lane's share of the set's counters.
    """

    def __init__(self, faults: NetFaults, name: str, direction: str,
                 sink: Callable[[list[bytes]], Any], call_later: CallLater) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} is not rx or tx")
        self.faults = faults
        self.name = name
        self.direction = direction
        self.sink = sink
        self.call_later = call_later
        self.counts = FaultCounts()
        self._passed = 0   # frames sent now so far: the clock of reorder depths
        #: Reordered frames: (release at this `_passed`, held since (`clock`), frames).
        self._reordered: list[tuple[int, float, list[bytes]]] = []
        self._next_release = 0
        self._timer = False
        self._no_timer_logged = False

    @property
    def active(self) -> bool:
        return bool(self.faults.faults)

    def _count(self, what: str, n: int = 1) -> None:
        setattr(self.counts, what, getattr(self.counts, what) + n)
        total = self.faults.counts
        setattr(total, what, getattr(total, what) + n)

    def process(self, frames: Sequence[bytes]) -> list[bytes]:
        """Apply the rules to `frames`; the frames to send now."""
        rules = list(self.faults.faults)
        rng = self.faults.rng
        parse = any(r.expression is not None or r.kind == "corrupt" for r in rules)
        direction = self.direction
        out: list[bytes] = []
        delayed: dict[float, list[bytes]] = {}
        for frame in frames:
            headers = parse_headers(frame) if parse else None
            copies = 1
            hold: NetFault | None = None
            for rule in rules:
                if hold is not None and rule.kind in _HOLDS:
                    continue
                if not rule.matches(direction, frame, headers) or not rule.fires(rng):
                    continue
                kind = rule.kind
                if kind == "drop":
                    rule.hits += 1
                    self._count("dropped", copies)
                    copies = 0
                    break
                if kind == "dup":
                    rule.hits += 1
                    self._count("duplicated", copies)
                    copies *= 2
                elif kind == "corrupt":
                    assert headers is not None
                    changed = _flip_one_bit(frame, headers, rule.rng or rng)
                    if changed is not None:
                        rule.hits += 1
                        self._count("corrupted")
                        frame = changed
                elif self.counts.held + copies <= MAX_HELD:   # reorder or delay
                    rule.hits += 1
                    hold = rule
            if not copies:
                continue
            batch = [frame] * copies
            if hold is None:
                out += batch
                self._passed += 1
                if self._reordered and self._passed >= self._next_release:
                    out += self._release(lambda entry: entry[0] <= self._passed)
            elif hold.kind == "delay":
                self._count("delayed", copies)
                self._count("held", copies)
                delayed.setdefault(hold.delay(rng), []).extend(batch)
            else:
                self._count("reordered", copies)
                self._count("held", copies)
                self._reordered.append((self._passed + hold.depth, self.faults.clock(), batch))
                self._next_release = min(e[0] for e in self._reordered)
        for delay, held in delayed.items():
            if not self._later(delay, lambda held=held: self._send_held(held)):  # type: ignore[misc]
                self._count("held", -len(held))
                out += held
        if self._reordered and not self._arm(REORDER_TIMEOUT):
            out += self.release_all()
        return out

    def send(self, frames: Sequence[bytes]) -> int:
        """`process`, then the frames to send now go to the sink (`sink(frames)` returns
        how many it accepted). Returns how many of `frames` count as accepted: all but those
        the sink refused (frames the rules dropped or hold are accepted)."""
        out = self.process(frames)
        refused = len(out) - int(self.sink(out)) if out else 0
        return len(frames) - min(len(frames), max(0, refused))

    def offer(self, frames: Iterator[bytes], count: int,
              place: Callable[[list[bytes]], int]) -> int:
        """`NetPort.offer` through the rules: up to `count` frames of `frames`, a chunk at a
        time, placed with `place(frames) -> how many it took`; the first frames `place`
        could not take (the ring is full) go to `sink` (queued) and the offer stops.
        Returns how many of `frames` were taken (each went through the rules)."""
        taken = 0
        while taken < count:
            chunk = [f for _, f in zip(range(min(OFFER_CHUNK, count - taken)), frames)]
            if not chunk:
                break
            taken += len(chunk)
            out = self.process(chunk)
            placed = place(out) if out else 0
            if placed < len(out):
                self.sink(out[placed:])
                break
        return taken

    # -- held frames -------------------------------------------------------------------------
    def _release(self, due: Callable[[tuple[int, float, list[bytes]]], bool]) -> list[bytes]:
        """Take the reordered entries `due` says are due, in the order they were held."""
        out: list[bytes] = []
        keep = []
        for entry in self._reordered:
            if due(entry):
                out += entry[2]
            else:
                keep.append(entry)
        self._reordered = keep
        self._next_release = min((e[0] for e in keep), default=0)
        self._count("held", -len(out))
        return out

    def _arm(self, delay: float) -> bool:
        """Make sure the reorder timer runs; False when this port has no timers."""
        if not self._timer:
            self._timer = self._later(delay, self._timeout)
        return self._timer

    def _timeout(self) -> None:
        """The reorder timer: send what waited `REORDER_TIMEOUT`, re-arm for the rest."""
        self._timer = False
        now = self.faults.clock()
        due = self._release(lambda entry: now - entry[1] >= REORDER_TIMEOUT - 1e-3)
        if self._reordered:
            oldest = min(e[1] for e in self._reordered)
            if not self._arm(max(0.0, oldest + REORDER_TIMEOUT - now)):
                due += self.release_all()
        if due:
            self._deliver(due)

    def _send_held(self, frames: list[bytes]) -> None:
        self._count("held", -len(frames))
        self._deliver(frames)

    def _deliver(self, frames: list[bytes]) -> None:
        """Frames sent later: to the sink, whose errors are logged (a timer has no caller)."""
        try:
            self.sink(frames)
        except Exception:
            log.exception("%s: %d frames held by faults could not be sent", self.name,
                          len(frames))

    def _later(self, delay: float, callback: Callable[[], None]) -> bool:
        """`callback()` in `delay` seconds; False (logged once) when this port has no
        timers: then the caller sends its frames at once instead."""
        try:
            self.call_later(delay, callback)
        except (RuntimeError, TypeError, AttributeError) as exc:   # no loop, no timers
            if not self._no_timer_logged:
                self._no_timer_logged = True
                log.warning("%s: no timer to hold frames with (%s): held frames are sent "
                            "at once", self.name, exc)
            return False
        return True

    def release_all(self) -> list[bytes]:
        """Every reordered frame held now (they are no longer held); for tests and resets."""
        return self._release(lambda entry: True)


class _BadRule(ConfigurationError):
    """A rule's problem, raised by its constructor (`parse` names the spec instead)."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


def _flip_one_bit(frame: bytes, headers: Headers, rng: random.Random) -> bytes | None:
    """`frame` with one bit flipped past its headers (see the module docstring), or None
    when it has no such byte."""
    start, end = headers.payload, headers.end
    if start >= end:
        if headers.csum is None or headers.csum + 2 > end:
            return None
        start, end = headers.csum, headers.csum + 2
    data = bytearray(frame)
    data[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def _number(text: str, kind: type[int | float]) -> Any:
    """`text` as an int or a finite float; ValueError saying what is wrong."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    if value < 0:
        raise ValueError(f"{text} is negative")
    return value
