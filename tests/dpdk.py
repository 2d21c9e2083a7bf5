"""Drive DPDK's ``dpdk-testpmd`` as a vhost-user peer, for tests and benchmarks.

testpmd plays either side of a vhost-user socket:

* FRONT-END (the "guest driver"): ``--vdev net_virtio_user0,path=SOCK,...`` — see
  :func:`virtio_user_vdev`.  It connects to a back-end (vhostpy, or DPDK's own) and, in
  ``txonly`` mode, floods it with frames.
* BACK-END (DPDK's C reference): ``--vdev net_vhost0,iface=SOCK,...`` — see :func:`vhost_vdev`.
  It listens on SOCK (unless ``client=True``).

One :class:`Testpmd` object is one testpmd process.  It owns the command line (no hugepages,
no PCI, a private ``--file-prefix``), the output (read by a thread; kept in memory and
optionally copied to ``log_path``), the parsed statistics, and cleanup: the process is always
ended and its EAL runtime directory (``/var/run/dpdk/<prefix>`` as root, else
``$XDG_RUNTIME_DIR/dpdk/<prefix>`` or ``/tmp/dpdk/<prefix>``) always removed, even after a
crash, and at interpreter exit for anything a test forgot.

Typical use::

    from dpdk import Testpmd, require_dpdk, vhost_vdev, virtio_user_vdev
    require_dpdk()
    with Testpmd(vhost_vdev(sock), forward_mode="rxonly", cpu=0) as be:
        be.wait_ready()
        with Testpmd(virtio_user_vdev(sock), forward_mode="txonly", txpkts=64, cpu=1) as fe:
            fe.wait_ready()
            time.sleep(3)
            tx = fe.stop()
        rx = be.stop()
    assert abs(rx.rx_packets - tx.tx_packets) <= 256

Facts this relies on (checked with DPDK 22.11 on Debian 12; see ``ci/dpdk/README.md``):

* Non-interactive testpmd with ``--stats-period N`` ignores stdin (otherwise it exits at
  once when stdin is at EOF) and prints a ``Port statistics`` block every N seconds; it
  flushes stdout itself, so a plain pipe works.  Interactive mode (``-i``) is driven through
  a pty because its output is block-buffered on a pipe.
* SIGINT makes it print ``Forward statistics for port N`` blocks plus an ``Accumulated
  forward statistics`` block, close its ports and exit 0.  Those counters are the forwarding
  engine's: ``TX-packets`` are frames the ring accepted, ``TX-dropped`` the ones it refused.
  The periodic blocks are the NIC counters (bytes, RX-missed, pps) and carry no TX-dropped.
* If the ``--vdev`` fails to probe (e.g. a virtio-user socket nobody listens on), testpmd does
  NOT exit: it forwards on ``ports=0`` forever.  :meth:`Testpmd.wait_ready` turns that into an
  error.
* ``--no-mlockall`` is a testpmd option (after ``--``); EAL rejects it before ``--``.
* ``-l 0,1`` pins lcore 1 of *every* testpmd to CPU 1: two processes then fight over one CPU
  and throughput collapses (0.03 Mpps instead of several Mpps).  Pass ``cpu=N``
  (``--lcores (0,1)@N``) to give each process its own CPU.

pytest is imported lazily (only :func:`require_dpdk` needs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

import atexit
import codecs
import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from tools import unavailable

__all__ = [
    "PortStats",
    "Testpmd",
    "TestpmdError",
    "TestpmdStats",
    "dpdk_version",
    "find_testpmd",
    "iter_live",
    "missing_pmds",
    "mpps",
    "parse_final",
    "parse_periodic",
    "pick_cpus",
    "rate",
    "require_dpdk",
    "runtime_dir",
    "vhost_vdev",
    "virtio_user_vdev",
]

#: Environment variable naming a testpmd binary to use instead of ``dpdk-testpmd`` on PATH.
TESTPMD_ENV = "VHOSTPY_TESTPMD"

#: Longest usable AF_UNIX path (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107

#: Interactive prompt.
PROMPT = "testpmd> "

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PAIR = re.compile(r"([A-Za-z][A-Za-z-]*):\s*(\d+)")
_READY = re.compile(r"packet forwarding[^\n]*? - ports=(\d+)")
# Tolerant of CRLF (pty) and of the clear-screen escapes testpmd puts before each round, so
# that it can run on the raw output, whose offsets match the arrival times we record.
_NIC_BLOCK = re.compile(
    r"#+ NIC statistics for port (\d+)[ \t]*#+\r?\n(.*?)\r?\n[ \t]*#{20,}", re.DOTALL)
_ROUND_HEADER = "Port statistics ===="
_FWD_BLOCK = re.compile(
    r"-+ Forward statistics for port (\d+)\s*-+\n(.*?)\n[ \t]*-{20,}", re.DOTALL)
_ACCUM_BLOCK = re.compile(
    r"\++ Accumulated forward statistics for all ports\s*\++\n(.*?)\n[ \t]*\+{20,}", re.DOTALL)
_STOP_MARK = "Telling cores to stop"


class TestpmdError(RuntimeError):
    """testpmd is missing, failed to start, or did something we did not expect."""

    __test__ = False  # not a pytest test class despite the name


# --------------------------------------------------------------------------- discovery


def find_testpmd() -> str:
    """Path of the testpmd binary: ``$VHOSTPY_TESTPMD``, else ``dpdk-testpmd`` (or the
    pre-20.11 name ``testpmd``) on PATH.  Raises :class:`FileNotFoundError`."""
    env = os.environ.get(TESTPMD_ENV)
    if env:
        path = shutil.which(env) or env
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${TESTPMD_ENV}={env} is not an executable file")
        return path
    for name in ("dpdk-testpmd", "testpmd"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "dpdk-testpmd not found (Debian/Ubuntu: package dpdk-dev; run ci/dpdk/install-deps.sh)")


def _pmd_dirs() -> list[str]:
    pats = ("/usr/lib/*/dpdk/pmds-*", "/usr/lib64/dpdk/pmds-*", "/usr/lib/dpdk/pmds-*",
            "/usr/local/lib*/dpdk/pmds-*", "/usr/local/lib/*/dpdk/pmds-*")
    return sorted({d for p in pats for d in glob.glob(p) if os.path.isdir(d)})


def missing_pmds() -> list[str]:
    """vhost-user PMDs absent from a shared-library DPDK install (``librte_net_virtio``,
    ``librte_net_vhost``).  Empty when no plugin directory exists (a static build has the
    drivers linked in) or when both are present."""
    dirs = _pmd_dirs()
    if not dirs:
        return []
    missing = []
    for lib in ("librte_net_virtio", "librte_net_vhost"):
        if not any(glob.glob(os.path.join(d, lib + ".so*")) for d in dirs):
            missing.append(lib)
    return missing


def require_dpdk() -> str:
    """Return the testpmd path, or skip the calling test (fail it when ``CI`` is true)."""
    reason = None
    try:
        path = find_testpmd()
    except FileNotFoundError as e:
        reason = str(e)
        path = ""
    else:
        missing = missing_pmds()
        if missing:
            reason = (f"DPDK PMDs missing: {', '.join(missing)} (Debian: librte-net-virtio23, "
                      "librte-net-vhost23; run ci/dpdk/install-deps.sh)")
    if reason is None:
        return path
    unavailable(f"DPDK is unusable: {reason}")


def runtime_dir(file_prefix: str) -> Path:
    """Where EAL keeps ``config``, ``mp_socket``, ``fbarray_*`` for ``--file-prefix``:
    ``/var/run/dpdk/<prefix>`` for root, else ``$XDG_RUNTIME_DIR/dpdk/<prefix>`` or
    ``/tmp/dpdk/<prefix>`` (DPDK's ``eal_create_runtime_dir``).  testpmd never removes it."""
    if os.getuid() == 0:
        base = "/var/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / "dpdk" / file_prefix


def dpdk_version(testpmd: str | None = None) -> str:
    """``"DPDK 22.11.11"`` as reported by EAL (runs testpmd briefly; cleans up after it)."""
    exe = testpmd or find_testpmd()
    prefix = _new_prefix()
    try:
        r = subprocess.run([exe, "-v", "--no-huge", "--no-pci", "--in-memory", "-m", "64",
                            "--file-prefix", prefix, "--", "--help"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30, errors="replace", check=False)
    finally:
        shutil.rmtree(runtime_dir(prefix), ignore_errors=True)
    m = re.search(r"RTE Version: '([^']+)'", r.stdout + r.stderr)
    if not m:
        raise TestpmdError(f"no version in testpmd output:\n{r.stdout}{r.stderr}")
    return m.group(1)


# --------------------------------------------------------------------------- devargs


def _devarg_value(v: object) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    s = str(v)
    if "," in s or "=" in s:
        raise ValueError(f"devargs value may not contain ',' or '=': {s!r}")
    return s


def _check_socket_path(sock: str) -> str:
    sock = os.fspath(sock)
    if "," in sock or "=" in sock:
        raise ValueError(f"vhost-user socket path may not contain ',' or '=' (devargs): {sock!r}")
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path longer than {MAX_SOCKET_PATH} bytes (AF_UNIX limit); "
                         f"use a short directory such as tempfile.mkdtemp(dir='/tmp'): {sock!r}")
    return sock


def virtio_user_vdev(sock: str | os.PathLike[str], *, queues: int = 1, queue_size: int = 256,
                     server: bool = False, mrg_rxbuf: bool | None = None,
                     in_order: bool | None = None, packed_vq: bool = False, index: int = 0,
                     mac: str | None = None, **options: object) -> str:
    """``--vdev`` for a virtio-user FRONT-END on ``sock``.

    ``server=True`` makes testpmd listen and the back-end connect.  ``mrg_rxbuf`` /
    ``in_order`` left at ``None`` keep DPDK's default (offered); ``False`` withholds the
    feature.  ``options`` are passed through (``vectorized=True`` -> ``vectorized=1``)."""
    args = [f"net_virtio_user{index}", f"path={_check_socket_path(os.fspath(sock))}",
            f"queues={int(queues)}", f"queue_size={int(queue_size)}"]
    if server:
        args.append("server=1")
    if mrg_rxbuf is not None:
        args.append(f"mrg_rxbuf={_devarg_value(mrg_rxbuf)}")
    if in_order is not None:
        args.append(f"in_order={_devarg_value(in_order)}")
    if packed_vq:
        args.append("packed_vq=1")
    if mac is not None:
        args.append(f"mac={mac}")
    args += [f"{k}={_devarg_value(v)}" for k, v in options.items()]
    return ",".join(args)


def vhost_vdev(sock: str | os.PathLike[str], *, queues: int = 1, client: bool = False,
               index: int = 0, **options: object) -> str:
    """``--vdev`` for DPDK's vhost-user BACK-END (``net_vhost``) on ``sock``.

    By default it listens (server); ``client=True`` connects to a front-end in server mode.
    ``options`` are appended verbatim, bools as 0/1; DPDK spells most of these with dashes,
    so pass them as ``**{"iommu-support": True, "linear-buffer": True}``."""
    args = [f"net_vhost{index}", f"iface={_check_socket_path(os.fspath(sock))}",
            f"queues={int(queues)}"]
    if client:
        args.append("client=1")
    args += [f"{k}={_devarg_value(v)}" for k, v in options.items()]
    return ",".join(args)


# --------------------------------------------------------------------------- statistics


@dataclass
class PortStats:
    """One port's counters from one statistics block."""

    port: int
    rx_packets: int = 0
    tx_packets: int = 0
    #: final: RX-dropped; periodic: RX-missed (frames the port could not take).
    rx_dropped: int = 0
    #: final only (frames the TX ring refused); 0 in periodic blocks, which do not report it.
    tx_dropped: int = 0
    rx_total: int | None = None  # final only (RX-packets + RX-dropped)
    tx_total: int | None = None  # final only (TX-packets + TX-dropped)
    rx_bytes: int | None = None  # periodic only
    tx_bytes: int | None = None  # periodic only
    rx_errors: int | None = None
    tx_errors: int | None = None
    rx_nombuf: int | None = None
    rx_pps: int | None = None  # periodic only: rate since the previous block
    tx_pps: int | None = None

    @property
    def rx_missed(self) -> int:
        return self.rx_dropped


@dataclass
class TestpmdStats:
    """Counters of one testpmd at one moment, summed over ports (``per_port`` has each).

    ``kind`` is ``"final"`` (the forward statistics printed on exit/stop) or ``"periodic"``
    (a ``--stats-period`` / ``show port stats`` block).  ``time`` is the ``time.monotonic()``
    at which the block was read from the process (``None`` for text parsed offline)."""

    __test__ = False

    kind: str
    rx_packets: int = 0
    tx_packets: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rx_bytes: int | None = None
    tx_bytes: int | None = None
    rx_pps: int | None = None
    tx_pps: int | None = None
    per_port: dict[int, PortStats] = field(default_factory=dict)
    time: float | None = None

    @property
    def final(self) -> bool:
        return self.kind == "final"

    @property
    def rx_missed(self) -> int:
        return self.rx_dropped

    @classmethod
    def _from_ports(cls, kind: str, ports: dict[int, PortStats],
                    when: float | None = None) -> TestpmdStats:
        def total(attr: str) -> int | None:
            vals: list[int | None] = [getattr(p, attr) for p in ports.values()]
            if not vals or any(v is None for v in vals):
                return None
            return sum(v for v in vals if v is not None)

        return cls(kind=kind,
                   rx_packets=sum(p.rx_packets for p in ports.values()),
                   tx_packets=sum(p.tx_packets for p in ports.values()),
                   rx_dropped=sum(p.rx_dropped for p in ports.values()),
                   tx_dropped=sum(p.tx_dropped for p in ports.values()),
                   rx_bytes=total("rx_bytes"), tx_bytes=total("tx_bytes"),
                   rx_pps=total("rx_pps"), tx_pps=total("tx_pps"),
                   per_port=ports, time=when)


def _pairs(body: str) -> dict[str, int]:
    return {k: int(v) for k, v in _PAIR.findall(body)}


def _nic_port(port: int, body: str) -> PortStats:
    kv = _pairs(body)
    return PortStats(port=port, rx_packets=kv.get("RX-packets", 0),
                     tx_packets=kv.get("TX-packets", 0), rx_dropped=kv.get("RX-missed", 0),
                     rx_bytes=kv.get("RX-bytes"), tx_bytes=kv.get("TX-bytes"),
                     rx_errors=kv.get("RX-errors"), tx_errors=kv.get("TX-errors"),
                     rx_nombuf=kv.get("RX-nombuf"), rx_pps=kv.get("Rx-pps"),
                     tx_pps=kv.get("Tx-pps"))


def parse_periodic(text: str, nb_ports: int | None = None,
                   times: Sequence[tuple[int, float]] = ()) -> list[TestpmdStats]:
    """Every complete NIC-statistics round in ``text`` (oldest first).

    A round starts at a ``Port statistics ====`` header (``--stats-period``) or when a port
    repeats (interactive ``show port stats all``).  The last round counts only when it holds
    ``nb_ports`` closed blocks (when known).  ``times`` maps output offsets to arrival times
    (``(end_offset, monotonic)`` per chunk read)."""
    ends = [e for e, _ in times]
    rounds: list[tuple[dict[int, PortStats], int]] = []
    cur: dict[int, PortStats] = {}
    cur_end = 0
    headers = [m.start() for m in re.finditer(re.escape(_ROUND_HEADER), text)]
    hi = 0
    for m in _NIC_BLOCK.finditer(text):
        new_round = False
        while hi < len(headers) and headers[hi] < m.start():
            hi += 1
            new_round = True
        port = int(m.group(1))
        if cur and (new_round or port in cur):
            rounds.append((cur, cur_end))
            cur = {}
        cur[port] = _nic_port(port, m.group(2))
        cur_end = m.end()
    if cur and (nb_ports is None or len(cur) >= nb_ports):
        rounds.append((cur, cur_end))
    out = []
    for ports, end in rounds:
        when = None
        if times:  # the chunk whose arrival completed this round
            i = bisect_left(ends, end)
            when = times[min(i, len(times) - 1)][1]
        out.append(TestpmdStats._from_ports("periodic", ports, when))
    return out


def parse_final(text: str) -> TestpmdStats | None:
    """The last forward-statistics report in ``text`` (printed when forwarding stops), or
    ``None`` if there is none (killed, crashed, never forwarded)."""
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    accums = list(_ACCUM_BLOCK.finditer(text))
    if accums:
        last = accums[-1]
        start = text.rfind(_STOP_MARK, 0, last.start())
        region = text[max(start, 0):last.start()]
    else:
        start = text.rfind(_STOP_MARK)
        if start < 0:
            return None
        region = text[start:]
    ports: dict[int, PortStats] = {}
    for m in _FWD_BLOCK.finditer(region):
        kv = _pairs(m.group(2))
        port = int(m.group(1))
        ports[port] = PortStats(port=port, rx_packets=kv.get("RX-packets", 0),
                                tx_packets=kv.get("TX-packets", 0),
                                rx_dropped=kv.get("RX-dropped", 0),
                                tx_dropped=kv.get("TX-dropped", 0),
                                rx_total=kv.get("RX-total"), tx_total=kv.get("TX-total"),
                                rx_errors=kv.get("RX-error"))
    if not ports and not accums:
        return None
    stats = TestpmdStats._from_ports("final", ports)
    if accums:
        kv = _pairs(accums[-1].group(1))
        stats.rx_packets = kv.get("RX-packets", stats.rx_packets)
        stats.tx_packets = kv.get("TX-packets", stats.tx_packets)
        stats.rx_dropped = kv.get("RX-dropped", stats.rx_dropped)
        stats.tx_dropped = kv.get("TX-dropped", stats.tx_dropped)
    return stats


# --------------------------------------------------------------------------- the process

_live: weakref.WeakSet[Testpmd] = weakref.WeakSet()
_counter = 0
_counter_lock = threading.Lock()


def _new_prefix() -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"vhostpy{os.getpid()}_{n}_{secrets.token_hex(2)}"


@atexit.register
def _kill_leftovers() -> None:
    for tp in list(_live):
        with contextlib.suppress(Exception):
            tp.kill()
            tp._finish(join_timeout=1.0)


class Testpmd:
    """One ``dpdk-testpmd`` process; see the module docstring.

    Command line (non-interactive)::

        dpdk-testpmd -l LCORES | --lcores (LCORES)@CPU  --no-pci --no-huge -m MEMORY_MB
            --file-prefix P --vdev VDEV [EAL_ARGS...]
          -- --no-mlockall --total-num-mbufs=N --forward-mode=MODE [--txpkts=N] [--burst=N]
             [--tx-first] --stats-period S [EXTRA_ARGS...]

    ``interactive=True`` replaces ``--stats-period`` (and ``--tx-first``) with ``-i`` and runs
    testpmd on a pty; use :meth:`command` (``"start"``, ``"start tx_first"``,
    ``"show port stats all"``...).  ``cpu=N`` pins all lcores of this process to CPU N so
    that a peer can have the other CPU."""

    __test__ = False

    def __init__(self, vdev: str, *, forward_mode: str, file_prefix: str | None = None,
                 lcores: str = "0,1", cpu: int | str | None = None,
                 txpkts: int | str | None = None, burst: int | None = None,
                 tx_first: bool = False, extra_args: Sequence[str] = (),
                 eal_args: Sequence[str] = (), stats_period: int = 1,
                 interactive: bool = False, log_path: str | os.PathLike[str] | None = None,
                 memory_mb: int = 1024, total_num_mbufs: int = 16384,
                 testpmd: str | None = None, nb_ports: int = 1) -> None:
        if interactive and tx_first:
            raise ValueError("--tx-first is for non-interactive mode; use command('start tx_first')")
        if not interactive and stats_period < 1:
            raise ValueError("non-interactive testpmd needs stats_period >= 1 (it exits at "
                             "once on stdin EOF otherwise)")
        self.vdev = vdev
        self.forward_mode = forward_mode
        self.file_prefix = file_prefix or _new_prefix()
        self.interactive = interactive
        self.log_path = Path(log_path) if log_path is not None else None
        self.nb_ports = nb_ports
        self.exe = testpmd or find_testpmd()

        eal = [self.exe]
        if cpu is not None:
            eal += ["--lcores", f"({lcores})@{cpu}"]
        else:
            eal += ["-l", lcores]
        eal += ["--no-pci", "--no-huge", "-m", str(memory_mb), "--file-prefix", self.file_prefix,
                "--vdev", vdev, *eal_args]
        app = ["--no-mlockall", f"--total-num-mbufs={total_num_mbufs}",
               f"--forward-mode={forward_mode}"]
        if txpkts is not None:
            app.append(f"--txpkts={txpkts}")
        if burst is not None:
            app.append(f"--burst={burst}")
        if interactive:
            app.append("-i")
        else:
            if tx_first:
                app.append("--tx-first")
            app.append(f"--stats-period={stats_period}")
        app += list(extra_args)
        self.argv: list[str] = [*eal, "--", *app]

        self.proc: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None  # pipe read end or pty master
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._chunks: list[str] = []
        self._len = 0
        self._times: list[tuple[int, float]] = []
        self._eof = False
        self._log: BinaryIO | None = None
        self._final: TestpmdStats | None = None
        self._finished = False
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.killed = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self.proc is not None:
            raise TestpmdError("already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in _finish)
        if self.interactive:
            import pty
            import termios
            master, slave = pty.openpty()
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO  # lflag: cmdline echoes what it reads itself
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            try:
                self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave,
                                             stderr=slave, start_new_session=True)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._fd = master
        else:
            r, w = os.pipe()
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=w,
                                             stderr=w, start_new_session=True)
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)
            self._fd = r
        self.started_at = time.monotonic()
        _live.add(self)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"testpmd-{self.file_prefix}")
        self._reader.start()

    def _read_loop(self) -> None:
        assert self._fd is not None
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError as e:  # EIO: pty slave closed (process gone)
                if e.errno not in (errno.EIO, errno.EBADF):
                    raise
                data = b""
            if self._log is not None and data:
                with contextlib.suppress(ValueError, OSError):
                    self._log.write(data)
                    self._log.flush()
            text = dec.decode(data, final=not data)
            with self._cond:
                if text:
                    self._chunks.append(text)
                    self._len += len(text)
                    self._times.append((self._len, time.monotonic()))
                if not data:
                    self._eof = True
                self._cond.notify_all()
            if not data:
                return

    def output(self) -> str:
        """Everything testpmd printed so far (stdout and stderr interleaved; CRLF -> LF)."""
        with self._cond:
            if len(self._chunks) > 1:
                self._chunks[:] = ["".join(self._chunks)]
            text = self._chunks[0] if self._chunks else ""
        return text.replace("\r\n", "\n")

    def _raw_offset(self) -> int:
        with self._cond:
            return self._len

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir(self.file_prefix)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30,
                 start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (regex) matches the output from offset ``start``.
        Raises :class:`TestpmdError` (with the output) on timeout or if testpmd exits."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                raw_len = self._len
            text = self.output()
            m = rx.search(text, start)
            if m:
                return m
            with self._cond:
                eof = self._eof
            if eof:
                raise TestpmdError(f"testpmd ended (rc={self.returncode}) before "
                                   f"{rx.pattern!r}:\n{self._tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestpmdError(f"timed out after {timeout}s waiting for {rx.pattern!r}:\n"
                                   f"{self._tail()}")
            with self._cond:
                if self._len == raw_len and not self._eof:
                    self._cond.wait(min(left, 0.2))

    def wait_ready(self, timeout: float = 30) -> None:
        """Non-interactive: until forwarding has started on ``nb_ports`` port(s).
        Interactive: until the first prompt.  Raises :class:`TestpmdError` if the vdev failed
        to probe (testpmd would otherwise happily forward on zero ports forever)."""
        if self.proc is None:
            self.start()
        if self.interactive:
            self.wait_for(re.escape(PROMPT), timeout)
            if "No probed ethernet devices" in self.output():
                raise TestpmdError(f"no port probed for {self.vdev}:\n{self._tail()}")
        else:
            m = self.wait_for(_READY, timeout)
            if int(m.group(1)) < self.nb_ports:
                raise TestpmdError(f"testpmd forwards on ports={m.group(1)}, expected "
                                   f"{self.nb_ports}: the vdev did not probe ({self.vdev}):\n"
                                   f"{self._tail()}")
        self.ready_at = time.monotonic()

    def command(self, cmd: str, timeout: float = 10) -> str:
        """Interactive mode: send one command line, return its output (up to the next prompt)."""
        if not self.interactive:
            raise TestpmdError("command() needs interactive=True")
        if not self.alive():
            raise TestpmdError(f"testpmd is not running (rc={self.returncode})")
        start = len(self.output())
        assert self._fd is not None
        os.write(self._fd, cmd.encode() + b"\n")
        m = self.wait_for(re.escape(PROMPT), timeout, start=start)
        return self.output()[start:m.start()]

    def periodic_stats(self) -> list[TestpmdStats]:
        """Every complete periodic (or ``show port stats``) round so far, oldest first."""
        with self._cond:
            text = "".join(self._chunks)
            times = list(self._times)
        return parse_periodic(text, self.nb_ports, times)

    def running_stats(self) -> TestpmdStats | None:
        """The latest complete periodic statistics round, or ``None`` before the first."""
        rounds = self.periodic_stats()
        return rounds[-1] if rounds else None

    def final_stats(self) -> TestpmdStats | None:
        """The forward statistics printed when forwarding stopped, if any yet."""
        return parse_final(self.output())

    def kill(self) -> None:
        """SIGKILL now (simulates a crash).  :meth:`stop` still cleans up afterwards."""
        if self.alive():
            assert self.proc is not None
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def stop(self, timeout: float = 10) -> TestpmdStats:
        """End testpmd and return its statistics.

        SIGINT (interactive: ``quit``) makes it stop forwarding, print its forward statistics
        and exit; after ``timeout`` seconds it is SIGKILLed.  The runtime directory is removed
        in every case.  Returns the final forward statistics (``.final`` is True) or, if the
        process died without printing them, the last periodic round (``.final`` False), or
        all-zero ``kind="none"`` stats.  Idempotent."""
        if self.proc is None:
            raise TestpmdError("stop() before start()")
        if self._finished:
            return self._result()
        try:
            if self.proc.poll() is None:
                self.stopped_at = time.monotonic()
                if self.interactive and self._fd is not None:
                    with contextlib.suppress(OSError):
                        os.write(self._fd, b"quit\n")
                else:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.interactive:  # maybe the prompt never came up: try the signal
                        with contextlib.suppress(ProcessLookupError):
                            self.proc.send_signal(signal.SIGINT)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(2)
                    if self.proc.poll() is None:
                        self.kill()
                        self.proc.wait()
        finally:
            self._finish()
        return self._result()

    def _result(self) -> TestpmdStats:
        if self._final is None:
            self._final = parse_final(self.output())
        if self._final is not None:
            return self._final
        last = self.running_stats()
        return last if last is not None else TestpmdStats(kind="none")

    def _finish(self, join_timeout: float = 5.0) -> None:
        """Reap the process, stop the reader, close fds, remove the runtime dir."""
        if self._finished:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(join_timeout)
        if self._fd is not None and (self._reader is None or not self._reader.is_alive()):
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self._finished = True
        _live.discard(self)

    def close(self) -> None:
        """Stop without caring about statistics (never raises for a dead process)."""
        if self.proc is not None:
            self.stop()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _tail(self, lines: int = 60) -> str:
        out = _ANSI.sub("", self.output()).splitlines()
        return "\n".join(out[-lines:])

    def __repr__(self) -> str:
        return (f"Testpmd(pid={self.pid}, prefix={self.file_prefix!r}, vdev={self.vdev!r}, "
                f"mode={self.forward_mode!r})")


def mpps(before: TestpmdStats, after: TestpmdStats, attr: str = "rx_packets") -> float:
    """Millions of packets per second between two timed periodic rounds."""
    if before.time is None or after.time is None or after.time <= before.time:
        raise ValueError("need two timed rounds, the second later")
    delta: int = getattr(after, attr) - getattr(before, attr)
    return delta / (after.time - before.time) / 1e6


def rate(rounds: Sequence[TestpmdStats], attr: str = "rx_packets", skip: int = 1) -> float:
    """Steady-state packets per second over periodic rounds: the growth of the cumulative
    counter ``attr`` from round ``skip`` to the last, divided by their arrival-time distance.

    Use this rather than final counts / wall time: a non-interactive testpmd keeps forwarding
    for up to ``stats_period`` seconds after SIGINT (its main loop sleeps 1 s at a time), and
    rather than a mean of the per-round ``rx_pps`` (rounds are 1 or 2 s apart, unequal)."""
    rounds = [r for r in rounds[skip:] if r.time is not None]
    if len(rounds) < 2:
        raise ValueError(f"need at least two timed rounds after skipping {skip}, "
                         f"have {len(rounds)}")
    first, last = rounds[0], rounds[-1]
    assert first.time is not None and last.time is not None
    delta: int = getattr(last, attr) - getattr(first, attr)
    return delta / (last.time - first.time)


def pick_cpus(n: int = 2) -> list[int]:
    """``n`` CPUs from this process's affinity mask, distinct while there are enough (then
    the last one repeats), for ``Testpmd(cpu=...)`` / pinning a back-end to its own core."""
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[min(i, len(cpus) - 1)] for i in range(n)]


def iter_live() -> Iterator[Testpmd]:
    """testpmd processes started here and not yet stopped (for fixtures' leak checks)."""
    return iter(list(_live))
