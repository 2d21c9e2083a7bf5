"""Block benchmark: fio inside a TCG guest against three back-ends serving one raw image.

Back-ends, all measured in the same run against the same raw image file (on a disk path, not
tmpfs: O_DIRECT on tmpfs needs host kernel 6.6+):

- ``vhostpy``: ``python -m vhostpy blk --image IMG``, pinned to its own core;
- ``qemu-storage-daemon``: a vhost-user-blk export of the same image, same pinning;
- ``qemu-builtin``: QEMU's own virtio-blk (``-drive ...,cache=none,aio=native
  -device virtio-blk-pci``); its back-end is QEMU's main loop, so no CPU per I/O is reported.

One guest boot per back-end and repetition runs every fio job (``--direct=1``, libaio when the
guest kernel and the fio build have it); repetitions are interleaved across back-ends (the
order rotates each repetition).  The host's ``fio`` binary travels into the busybox guest with
its shared libraries and the dynamic loader (like ``mke2fs`` in ``tests/test_qemu_blk.py``).
Between jobs the guest prints markers; the host samples ``utime+stime`` of the back-end
process (``/proc/PID/stat``) when it sees them, and divides by the requests the guest's block
layer completed in that window (``/sys/block/vda/stat``) to get back-end CPU µs per I/O.
fio's JSON goes to the serial console between markers and is parsed on the host.

The last job, ``idle``, runs no fio: the guest sleeps for the job's runtime and the figure is
the back-end's CPU over that window in % of one CPU (issue 5's goal: under 1% with a guest
attached and no traffic); QEMU's built-in device has no process of its own, so no figure.

A guest-only reference runs in every boot too: fio's ``null`` engine (4k, QD32), the most
IOPS this TCG guest's fio can issue, so a back-end faster than the guest shows as such.

Public API for ``bench/run.py``: :func:`add_arguments` and :func:`run_blk` (returns plain
records, see :func:`run_blk`).  Standalone: ``python bench/blk.py [--quick] [--json FILE]``.
Needs ``ci/qemu/install-deps.sh`` and ``ci/bench/install-deps.sh`` (fio).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
_TESTS = str(REPO_ROOT / "tests")
for _path in (_TESTS, str(REPO_ROOT)):   # standalone runs reach bench.common too
    if _path not in sys.path:
        sys.path.insert(0, _path)

import qemu_guest  # tests/ is not a package: the path is set just above
from procs import terminate  # tests/ is on sys.path

from bench.common import pick_named

MiB = 1 << 20
#: A boot whose guest fails (seen once: qemu-storage-daemon's guest hung in a QD32 job) is
#: booted again this many times before the group fails; the repetitions stay paired.
BOOT_RETRIES = 1

# ------------------------------------------------------------------------------------------
# jobs and back-ends


@dataclass(frozen=True)
class Job:
    """One fio job; ``key`` names it on the command line and in the console markers."""

    key: str
    case: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops" or "MB/s"
    engine: str | None = None  # None: the run's chosen engine (libaio)
    guest_only: bool = False  # never touches the disk (null engine)
    idle: bool = False  # no fio: the guest sleeps; the figure is the back-end's CPU use


JOBS: tuple[Job, ...] = (
    Job("randread-4k-qd1", "4k randread QD1", "randread", "4k", 1, "iops"),
    Job("randread-4k-qd32", "4k randread QD32", "randread", "4k", 32, "iops"),
    Job("randwrite-4k-qd32", "4k randwrite QD32", "randwrite", "4k", 32, "iops"),
    Job("read-128k-qd8", "128k read QD8", "read", "128k", 8, "MB/s"),
    # Issue 5's idle goal: the back-end's CPU while a guest is attached and does no I/O
    # (after the jobs above, so a back-end that keeps polling once work stops shows it).
    Job("idle", "idle, guest attached (back-end CPU)", "idle", "-", 0, "% of a CPU", idle=True),
)
NULL_JOB = Job("null-4k-qd32", "4k randread QD32, fio null engine (guest ceiling)",
               "randread", "4k", 32, "iops", engine="null", guest_only=True)
JOB_KEYS = tuple(j.key for j in JOBS)

#: Back-ends: vhostpy's compiled image path, qemu-storage-daemon, QEMU's own virtio-blk; the
#: Python store path (a MemoryStore, and an async store over the same bytes); and an NBD
#: export of the image by qemu-nbd, reached by vhostpy --nbd and by qemu-storage-daemon's NBD
#: client; and the cost of the migration dirty log (the same device without and with a
#: log, bench/vhostpy_dirtylog.py). The default runs the first three.
BACKENDS = ("vhostpy", "qemu-storage-daemon", "qemu-builtin", "vhostpy-memory",
            "vhostpy-async", "vhostpy-nbd", "qsd-nbd", "vhostpy-nolog", "vhostpy-dirty-log")
DEFAULT_BACKENDS = BACKENDS[:3]
QEMU_AFFINITIES = ("guest", "split", "vcpu", "none")
#: The ``backend`` field of the null-engine reference records.
NULL_BACKEND = "none (guest fio null engine)"

DEFAULT_REPETITIONS = 5
DEFAULT_RUNTIME = 5.0  # seconds per fio job
QUICK_RUNTIME = 2.0
DEFAULT_IMAGE_MB = 1024
QUICK_IMAGE_MB = 256
GUEST_MEMORY_MB = 512  # fio and its ~80 MB of shared libraries live in the initramfs

MARK = "VHOSTPY-BENCH"

#: Shown above the blk table by ``bench/run.py``.
NOTES = {"blk": (
    "fio (O_DIRECT, libaio unless said otherwise) in a 1-vCPU TCG guest, one boot per back-end "
    "and repetition running every job; all back-ends serve the same raw image file (page "
    "cache warm; QEMU's built-in virtio-blk opens it with cache=none,aio=native, "
    "qemu-storage-daemon with its defaults). QEMU on one CPU, the back-end process on the "
    "other. Back-end CPU per I/O = utime+stime of the back-end process over the job / "
    "requests completed by the guest's disk; none for the built-in device (QEMU's own "
    "thread). The null-engine row is the guest's own ceiling: fio issuing to no device."
)}
_FIO_IN_GUEST = "/fio/ld.so --library-path /fio /fio/fio"


def log(msg: str) -> None:
    """Progress on stderr (stdout stays free for whoever drives us)."""
    print(f"[bench blk] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# options


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The block benchmark's options, for ``bench/run.py`` (all have defaults)."""
    g = ap.add_argument_group("blk (fio in a QEMU guest)")
    g.add_argument("--blk-jobs", default=None, metavar="K1,K2",
                   help=f"fio jobs to run (default all: {','.join(JOB_KEYS)})")
    g.add_argument("--blk-backends", default=None, metavar="B1,B2",
                   help=f"back-ends (default {','.join(DEFAULT_BACKENDS)}; also "
                        f"{','.join(BACKENDS[3:])})")
    g.add_argument("--blk-runtime", type=float, default=None, metavar="S",
                   help=f"seconds per fio job (default {DEFAULT_RUNTIME:g}, "
                        f"--quick {QUICK_RUNTIME:g})")
    g.add_argument("--blk-image-mb", type=int, default=None, metavar="MB",
                   help=f"raw image size (default {DEFAULT_IMAGE_MB}, --quick {QUICK_IMAGE_MB})")
    g.add_argument("--blk-workdir", default=None, metavar="DIR",
                   help="directory for the image and sockets (a disk path, not tmpfs)")
    g.add_argument("--blk-ioengine", default=None, metavar="ENGINE",
                   help="fio engine for the disk jobs (default: libaio if usable, else "
                        "io_uring, else psync)")
    g.add_argument("--blk-no-null", action="store_true",
                   help="skip the null-engine guest ceiling job")
    g.add_argument("--backend-cpu", type=int, default=None, metavar="N",
                   help="core for the back-end process (default: the last allowed one)")
    g.add_argument("--guest-cpu", type=int, default=None, metavar="N",
                   help="core for QEMU (default: the first allowed one)")
    g.add_argument("--qemu-affinity", choices=QEMU_AFFINITIES, default=None,
                   help="guest (default): every QEMU thread on --guest-cpu; split: vCPU "
                        "thread on --guest-cpu, QEMU's other threads (main loop: interrupt "
                        "relay, the built-in device) on --backend-cpu; vcpu: only the vCPU "
                        "thread pinned; none: QEMU unpinned")


@dataclass
class Options:
    """Everything :func:`run_blk` reads from its ``args`` (missing attributes -> defaults)."""

    quick: bool = False
    repetitions: int = DEFAULT_REPETITIONS
    runtime: float = DEFAULT_RUNTIME
    jobs: tuple[Job, ...] = JOBS
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    null_job: bool = True
    image_mb: int = DEFAULT_IMAGE_MB
    workdir: str | None = None
    ioengine: str | None = None
    backend_cpu: int | None = None
    guest_cpu: int | None = None
    qemu_affinity: str = "guest"
    verbose: bool = True

    @classmethod
    def from_args(cls, args: Any) -> Options:
        def get(name: str, default: Any = None) -> Any:
            value = getattr(args, name, None)
            return default if value is None else value

        quick = bool(get("quick", False))
        reps = get("blk_repetitions", get("repetitions", get("reps", None)))
        if reps is None:
            reps = 1 if quick else DEFAULT_REPETITIONS
        jobs = pick_named(get("blk_jobs"), {j.key: j for j in JOBS}, "job")
        backends = pick_named(get("blk_backends"), {b: b for b in BACKENDS}, "back-end")
        return cls(
            quick=quick,
            repetitions=int(reps),
            runtime=float(get("blk_runtime", get("seconds",
                                                 QUICK_RUNTIME if quick else DEFAULT_RUNTIME))),
            jobs=tuple(jobs) if jobs else JOBS,
            backends=tuple(backends) if backends else DEFAULT_BACKENDS,
            null_job=not get("blk_no_null", False),
            image_mb=int(get("blk_image_mb", QUICK_IMAGE_MB if quick else DEFAULT_IMAGE_MB)),
            workdir=get("blk_workdir"),
            ioengine=get("blk_ioengine"),
            backend_cpu=get("backend_cpu"),
            guest_cpu=get("guest_cpu"),
            qemu_affinity=get("qemu_affinity", "guest"),
            verbose=not get("quiet", False),
        )


# ------------------------------------------------------------------------------------------
# host facts: fio, engines, CPUs, disk paths


class BenchSetupError(RuntimeError):
    """A prerequisite (fio, qemu-storage-daemon, a guest kernel) is missing."""


def find_fio() -> str:
    path = shutil.which("fio")
    if not path:
        raise BenchSetupError("fio not found: run ci/bench/install-deps.sh (apt fio)")
    return path


def fio_version(fio: str) -> str:
    return subprocess.run([fio, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def fio_engines(fio: str) -> set[str]:
    out = subprocess.run([fio, "--enghelp"], capture_output=True, text=True, check=True).stdout
    return {ln.strip() for ln in out.splitlines()[1:] if ln.strip()}


def guest_kernel_config(kernel: qemu_guest.KernelInfo) -> dict[str, str]:
    """``CONFIG_*`` of the guest kernel from ``/boot/config-<ver>`` (empty if absent)."""
    for path in (kernel.vmlinuz.parent / f"config-{kernel.version}",
                 kernel.modules_dir / "build" / ".config"):
        try:
            text = path.read_text()
        except OSError:
            continue
        return dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", text, re.MULTILINE))
    return {}


def choose_engine(fio: str, kernel: qemu_guest.KernelInfo,
                  forced: str | None = None) -> tuple[str, str]:
    """(fio engine for disk jobs, why).  libaio needs CONFIG_AIO in the guest and the engine
    compiled into fio; io_uring likewise; psync always works."""
    engines = fio_engines(fio)
    config = guest_kernel_config(kernel)
    if forced:
        return forced, "forced by --blk-ioengine"
    unknown = "guest kernel config not found; assumed"
    for engine, option in (("libaio", "CONFIG_AIO"), ("io_uring", "CONFIG_IO_URING")):
        if engine not in engines:
            continue
        if not config:
            return engine, f"{engine} in fio; {unknown}"
        if config.get(option) == "y":
            return engine, f"{engine} in fio, {option}=y in guest kernel {kernel.version}"
    return "psync", "neither libaio nor io_uring usable: psync (synchronous, QD is ignored)"


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _fstype(path: Path) -> str:
    """File system type of the mount holding ``path`` (longest /proc/mounts prefix)."""
    best, kind = "", "?"
    real = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def work_directory(requested: str | None) -> Path:
    """A fresh directory on a disk file system for the image (never tmpfs)."""
    if requested:
        base = Path(requested)
    else:
        base = Path(tempfile.gettempdir())
        if _fstype(base) in ("tmpfs", "ramfs"):
            cache = os.environ.get("VHOSTPY_CACHE") or str(Path.home() / ".cache" / "vhostpy")
            base = Path(cache) / "bench"
    base.mkdir(parents=True, exist_ok=True)
    if _fstype(base) in ("tmpfs", "ramfs"):
        raise BenchSetupError(f"{base} is on tmpfs: O_DIRECT there needs host kernel 6.6+; "
                              "pass --blk-workdir on a disk file system")
    return Path(tempfile.mkdtemp(prefix="vhostpy-bench-blk-", dir=base))


def make_image(path: Path, size_mb: int) -> None:
    """A raw image of ``size_mb`` MiB, every block written (no holes: a sparse file would
    make reads cheaper than real data)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(block[i % 251:] + block[:i % 251] for i in range(size_mb))  # all distinct
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------
# fio in the guest


def fio_bundle(fio: str) -> dict[str, bytes]:
    """The host's fio with every shared library and the dynamic loader, under ``/fio/``.

    Run in the guest as ``/fio/ld.so --library-path /fio /fio/fio`` (a static fio gets a
    shim ``ld.so`` so that one command line serves both). Debian's fio links ceph, gluster,
    rdma and friends: ~80 MB.
    """
    try:
        files, _ = qemu_guest.host_binary(fio, "fio")
    except qemu_guest.GuestImageError as exc:
        raise BenchSetupError(str(exc)) from exc
    files.setdefault("fio/ld.so", b"#!/bin/sh\nshift 2\nexec \"$@\"\n")
    return files


def fio_args(job: Job, engine: str, runtime: float, device: str = "/dev/vda") -> list[str]:
    """fio's arguments for ``job`` (JSON output, one job, time based)."""
    eng = job.engine or engine
    args = [f"--name={job.key}", f"--rw={job.rw}", f"--bs={job.bs}",
            f"--iodepth={job.iodepth}", f"--ioengine={eng}", "--time_based",
            f"--runtime={max(1, round(runtime * 1000))}ms", "--numjobs=1",
            "--output-format=json", "--eta=never"]
    if eng == "null":
        args += ["--size=1g"]
    else:
        args += [f"--filename={device}", "--direct=1", "--randrepeat=0", "--norandommap"]
    return args


def guest_command(job: Job, engine: str, runtime: float) -> str:
    return f"fio {shlex.join(fio_args(job, engine, runtime))}"


def guest_script(jobs: Sequence[Job], engine: str, runtime: float) -> str:
    """The guest script: for each job, BEGIN marker, disk stats and interrupt count, fio,
    the same again, END marker, then the JSON between markers."""
    lines = [
        f'FIO="{_FIO_IN_GUEST}"',
        # The disk's interrupts: every /proc/interrupts line of its virtio device
        # ("virtio0-config", "virtio0-req.0", ...), summed over CPUs.
        'dev=$(basename "$(readlink /sys/block/vda/device)")',
        ("irqs() { awk -v d=\"$dev-\" 'index($0, d) { for (i = 2; i <= NF; i++) "
         "if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }' /proc/interrupts; }"),
        f'echo "{MARK} fio=$($FIO --version)"',
        f'echo "{MARK} kernel=$(uname -r)"',
        f'echo "{MARK} sched=$(cat /sys/block/vda/queue/scheduler 2>/dev/null)"',
        # No scheduler between fio and the driver: measure the device path, not mq-deadline.
        "echo none > /sys/block/vda/queue/scheduler 2>/dev/null",
        "rc_all=0",
    ]
    for job in jobs:
        if job.idle:
            work = f"sleep {runtime:g}; echo '{{}}' > /tmp/{job.key}.json"
        else:
            work = f"$FIO {shlex.join(fio_args(job, engine, runtime))} --output=/tmp/{job.key}.json"
        lines += [
            f'echo "{MARK} BEGIN {job.key}"',
            "sleep 0.2",
            "s0=$(cat /sys/block/vda/stat); i0=$(irqs)",
            work,
            "rc=$?",
            "s1=$(cat /sys/block/vda/stat); i1=$(irqs)",
            f'echo "{MARK} END {job.key} rc=$rc"',
            '[ "$rc" = 0 ] || rc_all=$rc',
            f'echo "{MARK} STAT {job.key} $s0 / $s1"',
            f'echo "{MARK} IRQ {job.key} $i0 / $i1"',
            f'echo "{MARK} JSON-BEGIN {job.key}"',
            f"cat /tmp/{job.key}.json",
            f'echo "{MARK} JSON-END {job.key}"',
            f"rm -f /tmp/{job.key}.json",
        ]
    lines.append("exit $rc_all")
    return "\n".join(lines) + "\n"


_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")


def parse_guest_output(console: str) -> dict[str, dict[str, Any]]:
    """Per job key: ``{"json": fio's JSON, "rc": int, "ios": requests the disk completed,
    "irqs": interrupts its virtio device raised}``."""
    out: dict[str, dict[str, Any]] = {}
    lines = [ln for ln in console.splitlines() if not _KERNEL_LINE.match(ln)]
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        m = re.search(rf"{MARK} END (\S+) rc=(-?\d+)$", line)
        if m:
            out.setdefault(m.group(1), {})["rc"] = int(m.group(2))
        m = re.search(rf"{MARK} STAT (\S+) (.*) / (.*)$", line)
        if m:
            s0 = [int(x) for x in m.group(2).split()]
            s1 = [int(x) for x in m.group(3).split()]
            # /sys/block/X/stat: field 0 reads completed, field 4 writes completed.
            if len(s0) >= 5 and len(s1) >= 5:
                out.setdefault(m.group(1), {})["ios"] = (s1[0] - s0[0]) + (s1[4] - s0[4])
        m = re.search(rf"{MARK} IRQ (\S+) (\d+) / (\d+)$", line)
        if m:
            out.setdefault(m.group(1), {})["irqs"] = int(m.group(3)) - int(m.group(2))
        m = re.search(rf"{MARK} JSON-BEGIN (\S+)$", line)
        if m:
            key = m.group(1)
            j = i + 1
            while j < len(lines) and not lines[j].strip().endswith(f"{MARK} JSON-END {key}"):
                j += 1
            text = "\n".join(lines[i + 1:j])
            start = text.find("{")
            try:
                out.setdefault(key, {})["json"] = json.loads(text[start:]) if start >= 0 else None
            except json.JSONDecodeError as e:
                out.setdefault(key, {})["json_error"] = f"{e}: {text[:300]!r}"
            i = j
        i += 1
    return out


def fio_figures(report: dict[str, Any]) -> dict[str, float]:
    """iops and MB/s (10^6 bytes) summed over read and write of fio's one job."""
    job = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job {job.get('jobname')} error {job['error']}")
    iops = sum(float(job[d]["iops"]) for d in ("read", "write"))
    bw = sum(float(job[d]["bw_bytes"]) for d in ("read", "write"))
    ios = sum(int(job[d]["total_ios"]) for d in ("read", "write"))
    return {"iops": iops, "MB/s": bw / 1e6, "total_ios": float(ios)}


# ------------------------------------------------------------------------------------------
# back-ends


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (dead threads included), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Other processes using more than this share of one CPU during a job mark it disturbed.
DISTURBED_PERCENT = 15.0


def host_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs from /proc/stat: busy is user + nice + system +
    irq + softirq (guest time is inside user); steal is time the hypervisor took."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


@dataclass
class Sample:
    """What the host saw when the guest printed a BEGIN or END marker."""

    time: float
    backend: int | None  # back-end process ticks
    qemu: int
    me: int  # this process
    busy: int
    steal: int

    @classmethod
    def take(cls, backend_pid: int | None, qemu_pid: int) -> Sample:
        busy, steal = host_ticks()
        return cls(time.monotonic(), cpu_ticks(backend_pid) if backend_pid else None,
                   cpu_ticks(qemu_pid), cpu_ticks(os.getpid()), busy, steal)


def _taskset(cpu: int | None) -> list[str]:
    if cpu is None:
        return []
    path = shutil.which("taskset")
    if path is None:
        raise BenchSetupError("taskset not found (util-linux)")
    return [path, "-c", str(cpu)]


@dataclass
class Backend:
    """How one back-end is run: a process serving ``socket`` or QEMU-internal (``argv`` empty)."""

    name: str
    argv: list[str]
    socket: str | None
    qemu_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: A server the back-end needs first (qemu-nbd), and the socket it listens on.
    server_argv: list[str] = field(default_factory=list)
    server_socket: str | None = None

    @property
    def command(self) -> str:
        if self.argv:
            pre = f"{shlex.join(self.server_argv)} & " if self.server_argv else ""
            return pre + shlex.join(self.argv)
        return "qemu-system-x86_64 ... " + shlex.join(self.qemu_args)


def backend_spec(name: str, image: Path, workdir: Path, cpu: int | None,
                 image_mb: int = DEFAULT_IMAGE_MB) -> Backend:
    sock = str(workdir / f"{name}.sock")
    vhostpy_blk = [*_taskset(cpu), sys.executable, "-m", "vhostpy", "blk", "--socket-path", sock]
    if name == "vhostpy":
        return Backend(name, [*vhostpy_blk, "--image", str(image)], sock)
    if name in ("vhostpy-nolog", "vhostpy-dirty-log"):
        # The cost of the migration dirty log: the same device with and without a log
        # (bench/vhostpy_dirtylog.py).
        argv = [*_taskset(cpu), sys.executable, "-m", "bench.vhostpy_dirtylog", "blk",
                "--socket-path", sock, "--image", str(image)]
        return Backend(name, argv + (["--dirty-log"] if name == "vhostpy-dirty-log" else []),
                       sock)
    if name in ("vhostpy-memory", "vhostpy-async"):
        store = "memory_store" if name == "vhostpy-memory" else "async_store"
        return Backend(name, [*vhostpy_blk, "--store", f"bench.stores:{store}"], sock,
                       env={"VHOSTPY_BENCH_STORE_MB": str(image_mb)})
    if name in ("vhostpy-nbd", "qsd-nbd"):
        nbd_sock = str(workdir / f"{name}-nbd.sock")
        qemu_nbd = shutil.which("qemu-nbd")
        if qemu_nbd is None:
            raise BenchSetupError("qemu-nbd not found: run ci/nbd/install-deps.sh")
        server = [*_taskset(cpu), qemu_nbd, "-f", "raw", "--persistent", "--shared=8",
                  "--cache=writeback", "-k", nbd_sock, str(image)]
        if name == "vhostpy-nbd":
            argv = [*vhostpy_blk, "--nbd", f"nbd+unix:///?socket={nbd_sock}"]
        else:
            argv = [*_taskset(cpu), _qsd(),
                    "--blockdev", ("driver=nbd,node-name=nbd0,server.type=unix,"
                                   f"server.path={nbd_sock}"),
                    "--export", ("type=vhost-user-blk,id=exp0,node-name=nbd0,addr.type=unix,"
                                 f"addr.path={sock},writable=on")]
        return Backend(name, argv, sock, server_argv=server, server_socket=nbd_sock)
    if name == "qemu-storage-daemon":
        argv = [*_taskset(cpu), _qsd(),
                "--blockdev", f"driver=file,node-name=file0,filename={image}",
                "--blockdev", "driver=raw,node-name=raw0,file=file0",
                "--export", ("type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                             f"addr.path={sock},writable=on")]
        return Backend(name, argv, sock)
    if name == "qemu-builtin":
        return Backend(name, [], None, [
            "-drive", f"file={image},if=none,id=d0,format=raw,cache=none,aio=native",
            "-device", "virtio-blk-pci,drive=d0",
        ])
    raise ValueError(f"unknown back-end {name!r}")


def _qsd() -> str:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise BenchSetupError("qemu-storage-daemon not found: run ci/qemu/install-deps.sh "
                              "(apt qemu-utils)")
    return qsd


@contextmanager
def running_backend(spec: Backend, workdir: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    """Start the back-end process (if any; after the server it needs), wait for its socket,
    stop both afterwards."""
    if not spec.argv:
        yield None
        return
    assert spec.socket is not None
    log_path = workdir / f"{spec.name}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(spec.env)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv, sock in ((spec.server_argv, spec.server_socket), (spec.argv, spec.socket)):
            if not argv:
                continue
            assert sock is not None
            if os.path.exists(sock):
                os.unlink(sock)
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
            started.append(proc)
            try:
                qemu_guest.wait_for_socket(sock, timeout=20, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{spec.name}: {e}\n{log_path.read_text(errors='replace')}") \
                    from None
        yield started[-1]
    finally:
        for proc in reversed(started):
            terminate(proc)
        for sock in (spec.socket, spec.server_socket):
            if sock is not None and os.path.exists(sock):
                os.unlink(sock)


_VCPU_THREAD = re.compile(r"^CPU \d+/")


def pin_qemu(pid: int, guest_cpu: int | None, other_cpus: set[int] | None,
             timeout: float = 20.0) -> bool:
    """Pin QEMU's vCPU threads (named ``CPU n/TCG``; needs ``-name ...,debug-threads=on``) to
    ``guest_cpu`` and every other QEMU thread to ``other_cpus``.  Returns whether a vCPU
    thread was found."""
    if guest_cpu is None:
        return False
    deadline = time.monotonic() + timeout
    while True:
        found = False
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return False
        for tid in tids:
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                if _VCPU_THREAD.match(comm):
                    os.sched_setaffinity(int(tid), {guest_cpu})
                    found = True
                elif other_cpus:
                    os.sched_setaffinity(int(tid), other_cpus)
            except (FileNotFoundError, ProcessLookupError):
                continue
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------
# one guest boot


@dataclass
class JobResult:
    value: float  # in job.metric
    iops: float
    cpu_seconds: float | None
    wall_seconds: float
    ios: int
    cpu_per_io_us: float | None
    other_cpu_percent: float | None = None  # everything but QEMU, back-end and us
    steal_percent: float | None = None
    irqs_per_io: float | None = None  # the guest disk's interrupts per completed request


class _ConsoleTail:
    """Incremental reader of the growing serial log: each call returns the new full lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.rest = ""

    def __call__(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *full, self.rest = (self.rest + data.decode("utf-8", "replace")).replace(
            "\r", "").split("\n")
        return full


def boot_and_measure(spec: Backend, jobs: Sequence[Job], engine: str, runtime: float,
                     files: dict[str, bytes], workdir: Path, guest_cpu: int | None,
                     backend_cpu: int | None, qemu_affinity: str = "guest",
                     ) -> tuple[dict[str, JobResult], dict[str, str]]:
    """Boot one guest against ``spec`` and run ``jobs``; returns per-job results and facts."""
    script = guest_script(jobs, engine, runtime)
    timeout = 90 + sum(runtime + 15 for _ in jobs)
    extra = ["-name", "vhostpy-bench,debug-threads=on", *spec.qemu_args]
    facts: dict[str, str] = {}
    with running_backend(spec, workdir) as proc:
        pid = proc.pid if proc is not None else None
        blk_sockets = [spec.socket] if spec.socket else []
        with qemu_guest.start_guest(script, blk_sockets=blk_sockets, files=files,
                                    memory_mb=GUEST_MEMORY_MB, timeout=timeout,
                                    extra_args=extra) as guest:
            if qemu_affinity == "guest" and guest_cpu is not None:
                pin_qemu(guest.pid, guest_cpu, {guest_cpu})
            elif qemu_affinity == "split":
                pin_qemu(guest.pid, guest_cpu, {backend_cpu} if backend_cpu is not None else None)
            elif qemu_affinity == "vcpu":
                pin_qemu(guest.pid, guest_cpu, None)
            facts["accel"] = guest.accel
            facts["qemu_command"] = shlex.join(guest.argv)
            read_lines = _ConsoleTail(guest.console_path)
            samples: dict[str, list[Sample]] = {}
            done = 0
            while guest.is_running() and done < len(jobs) and time.monotonic() < guest.deadline:
                for line in read_lines():
                    m = re.search(rf"{MARK} (BEGIN|END) (\S+)", line)
                    if not m:
                        continue
                    try:
                        samples.setdefault(m.group(2), []).append(Sample.take(pid, guest.pid))
                    except (FileNotFoundError, ProcessLookupError):
                        pass  # QEMU or the back-end is gone: reported below
                    done += m.group(1) == "END"
                time.sleep(0.005)
            result = guest.wait()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with {proc.returncode} during the run:\n"
                               + (workdir / f"{spec.name}.log").read_text(errors="replace"))
    parsed = parse_guest_output(result.console)
    for line in result.console.splitlines():
        m = re.fullmatch(rf"{MARK} (fio|kernel|sched)=(.*)", line.strip())
        if m:
            facts[f"guest_{m.group(1)}"] = m.group(2)
    results: dict[str, JobResult] = {}
    for job in jobs:
        got = parsed.get(job.key, {})
        if got.get("rc") != 0 or got.get("json") is None:
            raise RuntimeError(
                f"{spec.name}: fio job {job.key} failed (rc={got.get('rc')}, "
                f"{got.get('json_error', '')})\n--- guest console ---\n{result.console[-6000:]}")
        s = samples.get(job.key, [])
        cpu = wall = other = steal = None
        if len(s) == 2 and s[1].time > s[0].time:
            a, b = s
            wall = b.time - a.time
            be = (b.backend - a.backend) if a.backend is not None and b.backend is not None \
                else 0
            if a.backend is not None and not job.guest_only:
                cpu = be / CLK_TCK
            known = be + (b.qemu - a.qemu) + (b.me - a.me)
            other = max(0.0, (b.busy - a.busy - known) / CLK_TCK / wall * 100)
            steal = (b.steal - a.steal) / CLK_TCK / wall * 100
        if job.idle:
            if cpu is not None and wall:  # no figure for QEMU's built-in device
                results[job.key] = JobResult(cpu / wall * 100, 0.0, cpu, wall,
                                             int(got.get("ios", 0)), None, other, steal)
            continue
        figures = fio_figures(got["json"])
        ios = int(got.get("ios", figures["total_ios"]))
        per_io = cpu / ios * 1e6 if cpu is not None and ios > 0 else None
        irqs = got.get("irqs")
        results[job.key] = JobResult(figures[job.metric], figures["iops"], cpu, wall or 0.0,
                                     ios, per_io, other, steal,
                                     irqs / ios if irqs is not None and ios > 0 else None)
    return results, facts


# ------------------------------------------------------------------------------------------
# the benchmark


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_blk(args: Any = None) -> list[dict[str, Any]]:
    """Run the block benchmark; ``args`` is an argparse namespace (see :func:`add_arguments`;
    ``quick``, ``repetitions``, ``seconds`` and any ``blk_*`` attribute missing or None means
    its default).  Raises :class:`BenchSetupError` when fio, QEMU, a guest kernel or
    qemu-storage-daemon is missing.  On KeyboardInterrupt the records measured so far ride on
    the exception as ``partial_results``.

    Returns one record per (job, back-end), plus the null-engine reference::

        {"case": "4k randread QD32", "backend": "vhostpy", "metric": "iops",
         "values": [one per repetition, in repetition order],
         "cpu_per_io_us": median µs of back-end CPU per I/O (None for qemu-builtin and the
         null engine), "command": "<back-end command> ; guest: fio ...",
         ...extra keys: "job", "median", "min", "max", "commands" (back-end, QEMU, fio),
         "cpu_per_io_us_values", "cpu_util_values" (back-end CPU / wall time of the job),
         "iops_values", "ioengine", "accel", "pinning", "runtime_s", "iodepth", "bs", "rw"}
    """
    opts = Options.from_args(args if args is not None else argparse.Namespace())
    fio = find_fio()
    try:
        kernel = qemu_guest.find_kernel()
        qemu_guest.find_qemu()
        qemu_guest.build_initramfs()
    except (qemu_guest.GuestImageError, subprocess.CalledProcessError, OSError) as e:
        raise BenchSetupError(f"QEMU guest prerequisites missing: {e}") from e
    engine, engine_why = choose_engine(fio, kernel, opts.ioengine)
    cpus = allowed_cpus()
    backend_cpu = opts.backend_cpu if opts.backend_cpu is not None else (
        cpus[-1] if len(cpus) > 1 else None)
    guest_cpu = opts.guest_cpu if opts.guest_cpu is not None else (
        cpus[0] if len(cpus) > 1 else None)
    if opts.qemu_affinity == "none":
        guest_cpu = None
    pinning = (f"back-end on CPU {backend_cpu}; QEMU: {opts.qemu_affinity} "
               f"(vCPU thread on CPU {guest_cpu})")
    jobs = list(opts.jobs) + ([NULL_JOB] if opts.null_job else [])
    say = log if opts.verbose else (lambda _msg: None)
    say(f"{fio_version(fio)}, engine {engine} ({engine_why}); {pinning}; "
        f"{opts.repetitions} repetition(s) x {len(opts.backends)} back-end(s) x "
        f"{len(jobs)} job(s) of {opts.runtime:g} s")
    files = fio_bundle(fio)
    workdir = work_directory(opts.workdir)
    image = workdir / "disk.img"
    per: dict[tuple[str, str], list[JobResult]] = {}
    facts: dict[str, str] = {"engine_why": engine_why, "pinning": pinning,
                             "fstype": _fstype(workdir)}
    specs: dict[str, Backend] = {}

    def records() -> list[dict[str, Any]]:
        return _records(opts, jobs, specs, per, engine, facts)

    try:
        say(f"writing {opts.image_mb} MiB image {image} ({_fstype(workdir)})")
        make_image(image, opts.image_mb)
        specs.update({b: backend_spec(b, image, workdir, backend_cpu, opts.image_mb)
                      for b in opts.backends})
        order = list(opts.backends)
        for rep in range(opts.repetitions):
            for name in order:
                t0 = time.monotonic()
                for attempt in range(1 + BOOT_RETRIES):
                    try:
                        results, f = boot_and_measure(specs[name], jobs, engine, opts.runtime,
                                                      files, workdir, guest_cpu, backend_cpu,
                                                      opts.qemu_affinity)
                        break
                    except qemu_guest.GuestError as exc:
                        if attempt == BOOT_RETRIES:
                            raise
                        first = str(exc).splitlines()[0]
                        say(f"rep {rep + 1}/{opts.repetitions} {name}: the guest failed "
                            f"({first}); booting it again")
                        facts[f"retried[{name}, rep {rep + 1}]"] = first
                facts.update({k: v for k, v in f.items() if k != "qemu_command"})
                facts[f"qemu_command[{name}]"] = f["qemu_command"]
                done = [job for job in jobs if job.key in results]
                for job in done:
                    per.setdefault((job.key, name), []).append(results[job.key])
                say(f"rep {rep + 1}/{opts.repetitions} {name} ({time.monotonic() - t0:.0f} s): "
                    + ", ".join(_fmt(job, results[job.key]) for job in done))
            order = order[1:] + order[:1]  # rotate: no back-end always boots first
    except KeyboardInterrupt as exc:
        exc.partial_results = records()  # type: ignore[attr-defined]
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return records()


def _records(opts: Options, jobs: Sequence[Job], specs: dict[str, Backend],
             per: dict[tuple[str, str], list[JobResult]], engine: str,
             facts: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job in jobs:
        if job.guest_only:
            continue
        for name in opts.backends:
            rs = per.get((job.key, name), [])
            if not rs:
                continue
            spec = specs[name]
            cpu_values = [r.cpu_per_io_us for r in rs if r.cpu_per_io_us is not None]
            util = [r.cpu_seconds / r.wall_seconds for r in rs
                    if r.cpu_seconds is not None and r.wall_seconds > 0]
            fio_cmd = (f"sleep {opts.runtime:g}" if job.idle
                       else guest_command(job, engine, opts.runtime))
            qemu_cmd = facts.get(f"qemu_command[{name}]", "")
            commands = ([spec.command] if spec.argv else []) + [qemu_cmd, f"(guest) {fio_cmd}"]
            out.append(_record(
                job, name, [r.value for r in rs],
                statistics.median(cpu_values) if cpu_values else None,
                f"{spec.command} ; guest: {fio_cmd}", engine, facts, opts.runtime,
                commands=commands, cpu_per_io_us_values=cpu_values, cpu_util_values=util,
                iops_values=[r.iops for r in rs], ios_values=[r.ios for r in rs],
                irqs_per_io_values=[r.irqs_per_io for r in rs if r.irqs_per_io is not None],
                other_cpu_percent_values=[r.other_cpu_percent for r in rs],
                steal_percent_values=[r.steal_percent for r in rs],
                warnings=_warnings(rs),
            ))
    if any(j.guest_only for j in jobs):
        rs = [r for name in opts.backends for r in per.get((NULL_JOB.key, name), [])]
        if rs:
            cmd = "(guest) " + guest_command(NULL_JOB, engine, opts.runtime)
            out.append(_record(NULL_JOB, NULL_BACKEND, [r.value for r in rs], None, cmd,
                               "null", facts, opts.runtime, commands=[cmd],
                               note="one value per guest boot (every back-end's boots)",
                               other_cpu_percent_values=[r.other_cpu_percent for r in rs],
                               warnings=_warnings(rs)))
    return out


def _warnings(rs: Sequence[JobResult]) -> list[str]:
    out = []
    for rep, r in enumerate(rs):
        if r.other_cpu_percent is not None and r.other_cpu_percent > DISTURBED_PERCENT:
            out.append(f"repetition {rep}: other processes used {r.other_cpu_percent:.0f}% "
                       "of a CPU during the job (disturbed)")
        if r.steal_percent is not None and r.steal_percent > DISTURBED_PERCENT:
            out.append(f"repetition {rep}: hypervisor steal {r.steal_percent:.0f}% of a CPU")
    return out


def _record(job: Job, backend: str, values: list[float], cpu_per_io: float | None,
            command: str, engine: str, facts: dict[str, str], runtime: float,
            **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "case": job.case, "backend": backend, "metric": job.metric, "values": values,
        "cpu_per_io_us": cpu_per_io, "command": command, "higher_is_better": not job.idle,
    }
    rec.update(_summary(values))
    rec.update(job=job.key, rw=job.rw, bs=job.bs, iodepth=job.iodepth, ioengine=engine,
               runtime_s=runtime, accel=facts.get("accel"), pinning=facts.get("pinning"),
               guest_kernel=facts.get("guest_kernel"), fio=facts.get("guest_fio"),
               guest_scheduler="none", image="raw file on " + facts.get("fstype", "disk"))
    rec.update(extra)
    return rec


def _fmt(job: Job, r: JobResult) -> str:
    cpu = f" {r.cpu_per_io_us:.1f}us/io" if r.cpu_per_io_us is not None else ""
    other = ""
    if r.other_cpu_percent is not None and r.other_cpu_percent > DISTURBED_PERCENT:
        other = f" (DISTURBED: others {r.other_cpu_percent:.0f}% CPU)"
    value = f"{r.value:.1f}" if job.idle else f"{r.value:.0f}"
    return f"{job.key} {value} {job.metric}{cpu}{other}"


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain markdown table (``bench/run.py`` has the real writers)."""
    out = ["| case | back-end | median | min–max | back-end CPU µs/IO |",
           "|---|---|---|---|---|"]
    for r in records:
        v = r["values"]
        cpu = "—" if r["cpu_per_io_us"] is None else f"{r['cpu_per_io_us']:.1f}"
        out.append(f"| {r['case']} | {r['backend']} | {statistics.median(v):,.0f} "
                   f"{r['metric']} | {min(v):,.0f}–{max(v):,.0f} | {cpu} |")
    warnings = [f"- {r['case']} / {r['backend']}: {w}" for r in records
                for w in r.get("warnings", [])]
    if warnings:
        out += ["", "Warnings:", *warnings]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short jobs, one repetition")
    ap.add_argument("--repetitions", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--quiet", action="store_true")
    add_arguments(ap)
    args = ap.parse_args(argv)

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)  # clean up (back-end, guest, image) as on Ctrl-C
    try:
        records = run_blk(args)
    except BenchSetupError as e:
        print(f"bench/blk.py: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
