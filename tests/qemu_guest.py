"""Boot throw-away QEMU guests against vhost-user sockets, for tests and for humans.

This module owns: the QEMU command line (q35, shared memfd RAM, vhost-user-blk-pci and
vhost-user virtio-net-pci devices), the per-run initrd (cached base archive from
``ci/qemu/initramfs.py`` + a tiny archive holding ``/test.sh``), accelerator choice, timeouts,
and turning the serial console into a :class:`GuestResult`.

It never starts a vhost-user back-end (tests do that) and never skips on its own except in
:func:`require_qemu`.  pytest is imported lazily so ``ci/qemu/run-guest.sh`` works without it.

Guest contract (see ``ci/qemu/README.md``): the script runs as root under busybox ``sh`` with
/proc, /sys, /dev (devtmpfs), /tmp and /run mounted and the virtio + ext4 modules loaded.
Disks are ``/dev/vda``, ``/dev/vdb`` … in ``blk_sockets`` order; NICs ``eth0`` … in
``net_sockets`` order with MAC ``52:54:00:12:34:5<N>``.  ``/init`` prints
``VHOSTPY-GUEST-START`` before the script and ``VHOSTPY-GUEST-EXIT=<rc>`` after it (after
``sync`` and unmounting disk filesystems), then powers off.

Typical use::

    from qemu_guest import boot_guest, require_qemu
    require_qemu()
    r = boot_guest("cat /sys/block/vda/size", blk_sockets=[sock])
    assert r.exit_code == 0, r.console
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol, Union

from tools import unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
_INITRAMFS_PY = REPO_ROOT / "ci" / "qemu" / "initramfs.py"


def _load_initramfs() -> ModuleType:
    name = "vhostpy_ci_initramfs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _INITRAMFS_PY)
    if spec is None or spec.loader is None:  # pragma: no cover - repository damaged
        raise ImportError(f"cannot load {_INITRAMFS_PY}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


#: ci/qemu/initramfs.py, loaded by path (ci/ is not a package); typed loosely on purpose.
_initramfs: Any = _load_initramfs()

GuestImageError: type[RuntimeError] = _initramfs.GuestImageError


class KernelInfo(Protocol):
    """A guest kernel and its module tree (``initramfs.KernelInfo``)."""

    version: str
    vmlinuz: Path
    modules_dir: Path

START_MARKER: str = _initramfs.START_MARKER
EXIT_MARKER: str = _initramfs.EXIT_MARKER

#: Seconds QEMU may take to exit after the guest printed its exit marker before we kill it.
POWEROFF_GRACE = 15.0
#: Seconds the KVM probe boot may take (a KVM boot takes ~1 s; nested-KVM hangs never finish).
KVM_PROBE_TIMEOUT = 10.0

DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet printk.time=1"

#: A device socket, optionally with per-device properties: ``"s.sock"`` or ``("s.sock", {...})``.
DeviceSpec = Union[str, "os.PathLike[str]", "tuple[str | os.PathLike[str], Mapping[str, object]]"]

_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")


class GuestError(RuntimeError):
    """QEMU failed to start, or the guest ended without reporting an exit status."""

    def __init__(self, message: str, console: str = "", qemu_log: str = "") -> None:
        details = message
        if qemu_log.strip():
            details += f"\n--- qemu output ---\n{qemu_log.strip()[-4000:]}"
        if console.strip():
            details += f"\n--- guest console (tail) ---\n{console.strip()[-4000:]}"
        super().__init__(details)
        self.console = console
        self.qemu_log = qemu_log


class GuestTimeout(GuestError):
    """The guest (or a wait) outlived its timeout; QEMU was killed if it was the guest."""


@dataclass(frozen=True)
class GuestResult:
    """What a finished guest reported.

    ``console`` is only what the guest script printed (between the start and exit markers,
    kernel ``[  1.234]`` lines removed); ``raw_console`` is the whole serial log.
    """

    exit_code: int
    console: str
    duration: float
    raw_console: str = ""
    qemu_log: str = ""

    @property
    def lines(self) -> list[str]:
        """``console`` split into lines."""
        return self.console.splitlines()

    def check(self) -> GuestResult:
        """Return self, or raise :class:`GuestError` if the script exited non-zero."""
        if self.exit_code != 0:
            raise GuestError(f"guest script exited with {self.exit_code}", self.raw_console)
        return self


# --------------------------------------------------------------------------------------------
# environment


def find_qemu() -> str:
    """Path of ``qemu-system-x86_64`` (``VHOSTPY_QEMU`` overrides); raises GuestImageError."""
    path = os.environ.get("VHOSTPY_QEMU") or shutil.which("qemu-system-x86_64")
    if not path or not os.access(path, os.X_OK):
        raise GuestImageError(
            "qemu-system-x86_64 not found: run ci/qemu/install-deps.sh (apt qemu-system-x86)"
        )
    return path


def find_kernel() -> KernelInfo:
    """The guest kernel (``/boot/vmlinuz-<ver>`` + ``/lib/modules/<ver>``); raises if missing."""
    kernel: KernelInfo = _initramfs.find_kernel()
    return kernel


def build_initramfs(*, force: bool = False) -> Path:
    """Build or reuse the cached base initramfs for :func:`find_kernel`; return its path."""
    return Path(_initramfs.build_initramfs(None, find_kernel(), force=force))


def require_qemu() -> KernelInfo:
    """Skip the calling test when QEMU or a guest kernel is missing; fail instead under CI.

    Under ``CI=true`` (GitHub Actions sets it) a missing prerequisite is a test failure, so a
    broken runner cannot turn the QEMU suite into silent skips.
    """
    try:
        find_qemu()
        kernel = find_kernel()
        _initramfs.find_busybox()
        build_initramfs()
    except (GuestImageError, subprocess.CalledProcessError, OSError) as e:
        unavailable(f"QEMU guest prerequisites missing: {e}")
    return kernel


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


_accel_cache: str | None = None


def detect_accel() -> str:
    """``tcg`` or ``kvm``: ``VHOSTPY_QEMU_ACCEL`` wins; else KVM only if it really boots.

    /dev/kvm existing is not enough (nested KVM can hang at "Booting from ROM"), so a tiny
    guest is booted under KVM once; the answer is cached per host boot in the cache dir.
    """
    global _accel_cache
    forced = os.environ.get("VHOSTPY_QEMU_ACCEL")
    if forced:
        return forced
    if _accel_cache is not None:
        return _accel_cache
    accel = "tcg"
    if _kvm_usable_device():
        marker = _initramfs.default_cache_dir() / f"accel-{_boot_id()}"
        try:
            accel = marker.read_text().strip() or "tcg"
        except OSError:
            try:
                r = boot_guest("true", timeout=KVM_PROBE_TIMEOUT, accel="kvm")
                accel = "kvm" if r.exit_code == 0 else "tcg"
            except GuestError:
                accel = "tcg"
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(accel + "\n")
            except OSError:
                pass
    _accel_cache = accel
    return accel


def wait_for_socket(path: str | os.PathLike[str], timeout: float = 10.0,
                    proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``path`` is a UNIX socket (a back-end is listening); never connects to it.

    If ``proc`` (the back-end) exits first, raise RuntimeError at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"back-end exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"socket {path} did not appear within {timeout} s")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# command line


def _opt_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")  # QEMU option syntax escapes commas by doubling


def _props(props: Mapping[str, object]) -> str:
    return "".join(f",{k}={_opt_value(v)}" for k, v in props.items())


def _split_spec(spec: DeviceSpec) -> tuple[str, Mapping[str, object]]:
    if isinstance(spec, tuple):
        return os.fspath(spec[0]), spec[1]
    return os.fspath(spec), {}


def console_values(console: str) -> dict[str, str]:
    """``key=value`` lines a guest script printed (the last one of a key wins)."""
    out = {}
    for line in console.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def host_binary(path: str, dest: str) -> tuple[dict[str, bytes], str]:
    """A host program for the busybox guest: the binary, every shared library ``ldd`` lists
    and the dynamic loader, all under ``/<dest>/``.

    Returns the ``files=`` entries and the guest command that runs the program through the
    loader, so the initramfs needs no /lib64 layout (a static binary runs as is). A library
    missing on the host raises GuestImageError.
    """
    name = os.path.basename(path)
    files = {f"{dest}/{name}": Path(path).read_bytes()}
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    loader = None
    for line in ldd.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)
        if m:
            files[f"{dest}/{m.group(1)}"] = Path(m.group(2)).read_bytes()
            continue
        m = re.match(r"\s*(/\S*ld-linux\S*)\s", line)
        if m:
            loader = m.group(1)
        elif "not found" in line:
            raise GuestImageError(f"{name}: shared library missing on the host: {line.strip()}")
    if loader is None:
        return files, f"/{dest}/{name}"
    files[f"{dest}/ld.so"] = Path(loader).read_bytes()
    return files, f"/{dest}/ld.so --library-path /{dest} /{dest}/{name}"


def guest_mac(index: int) -> str:
    """MAC address of the ``index``-th NIC: ``52:54:00:12:34:5<index>`` (hex above 9)."""
    return f"52:54:00:12:34:{0x50 + index:02x}"


def qemu_command(
    *,
    kernel: Path,
    initrd: Path,
    console_path: Path,
    accel: str,
    blk_sockets: Sequence[DeviceSpec] = (),
    net_sockets: Sequence[DeviceSpec] = (),
    blk_options: Mapping[str, object] | None = None,
    net_options: Mapping[str, object] | None = None,
    netdev_options: Mapping[str, object] | None = None,
    memory_mb: int = 256,
    append: str = "",
    extra_args: Sequence[str] = (),
    qemu: str | None = None,
) -> list[str]:
    """The full QEMU argv for one guest (pure function; nothing is started).

    ``qemu`` defaults to :func:`find_qemu`.
    """
    argv = [
        qemu or find_qemu(),
        "-accel", accel,
        "-m", str(memory_mb),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "q35,memory-backend=mem",
        # -nodefaults: no default e1000e NIC / VGA / CD-ROM, so eth0 is our virtio-net.
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{console_path}",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", f"{DEFAULT_APPEND} {append}".strip(),
    ]
    for i, spec in enumerate(blk_sockets):
        path, own = _split_spec(spec)
        props = {"num-queues": 1, **(blk_options or {}), **own}
        argv += [
            "-chardev", f"socket,id=blk{i},path={_opt_value(path)}",
            "-device", f"vhost-user-blk-pci,chardev=blk{i}{_props(props)}",
        ]
    for i, spec in enumerate(net_sockets):
        path, own = _split_spec(spec)
        # vectors=0 (INTx): QEMU 7.2 (Debian 12) segfaults in vhost_net_start while wiring
        # MSI-X vector notifiers for vhost-user net, with any back-end (DPDK's too).
        props = {"mac": guest_mac(i), "vectors": 0, **(net_options or {}), **own}
        argv += [
            "-chardev", f"socket,id=net{i},path={_opt_value(path)}",
            "-netdev", f"vhost-user,id=hn{i},chardev=net{i}{_props(netdev_options or {})}",
            "-device", f"virtio-net-pci,netdev=hn{i}{_props(props)}",
        ]
    argv += list(extra_args)
    return argv


# --------------------------------------------------------------------------------------------
# running guests


def _normalize(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


def parse_console(raw: str) -> tuple[int | None, str]:
    """Return (exit status or None, script output) from a normalized serial log."""
    start = raw.find(START_MARKER + "\n")
    body = raw[start + len(START_MARKER) + 1:] if start >= 0 else ""
    m = re.search(r"\n?" + re.escape(EXIT_MARKER) + r"(-?\d+)", body)
    code = int(m.group(1)) if m else None
    if m:
        body = body[: m.start()]
    kept = [ln for ln in body.split("\n") if not _KERNEL_LINE.match(ln)]
    return code, "\n".join(kept)


class RunningGuest:
    """A QEMU guest that has been started and not yet reaped.

    Use as a context manager (leaving it kills QEMU if still running and removes the run
    directory), or call :meth:`wait` / :meth:`kill`.  Set ``VHOSTPY_KEEP_GUEST=1`` to keep the
    run directory (initrd, console.log, qemu.log) for debugging.
    """

    def __init__(
        self,
        script: str,
        *,
        blk_sockets: Sequence[DeviceSpec] = (),
        net_sockets: Sequence[DeviceSpec] = (),
        net_options: Mapping[str, object] | None = None,
        blk_options: Mapping[str, object] | None = None,
        netdev_options: Mapping[str, object] | None = None,
        memory_mb: int = 256,
        timeout: float = 120,
        extra_args: Sequence[str] = (),
        append: str = "",
        files: Mapping[str, bytes | str] | None = None,
        accel: str | None = None,
    ) -> None:
        kernel = find_kernel()
        base = _initramfs.build_initramfs(None, kernel)
        self.accel = accel or detect_accel()
        self.timeout = timeout
        qemu = find_qemu()  # fail before creating anything
        self.run_dir = Path(tempfile.mkdtemp(prefix="vhostpy-guest-"))
        self.console_path = self.run_dir / "console.log"
        self.qemu_log_path = self.run_dir / "qemu.log"
        initrd = self.run_dir / "initrd.gz"
        try:
            overlay = {"test.sh": script, **(files or {})}
            initrd.write_bytes(base.read_bytes() + _initramfs.overlay_archive(overlay))
            self.argv = qemu_command(
                kernel=kernel.vmlinuz, initrd=initrd, console_path=self.console_path,
                accel=self.accel, blk_sockets=blk_sockets, net_sockets=net_sockets,
                blk_options=blk_options, net_options=net_options,
                netdev_options=netdev_options, memory_mb=memory_mb, append=append,
                extra_args=extra_args, qemu=qemu,
            )
            self.console_path.touch()
            with open(self.qemu_log_path, "wb") as log:
                self.started = time.monotonic()
                self.deadline = self.started + timeout
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    close_fds=True,
                )
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self._result: GuestResult | None = None

    # -- inspection --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    def is_running(self) -> bool:
        """True while QEMU has not exited."""
        return self.proc.poll() is None

    def console_so_far(self) -> str:
        """The whole serial log so far (``\\r\\n`` normalized), kernel lines included."""
        try:
            return _normalize(self.console_path.read_bytes())
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        """QEMU's own stdout/stderr so far (its error messages land here)."""
        try:
            return _normalize(self.qemu_log_path.read_bytes())
        except FileNotFoundError:
            return ""

    def wait_for_text(self, text: str, timeout: float = 60) -> str:
        """Block until ``text`` appears on the console; return the console so far.

        Raises :class:`GuestTimeout` (QEMU left running) or :class:`GuestError` if QEMU exits
        without printing it.
        """
        deadline = time.monotonic() + timeout
        while True:
            console = self.console_so_far()
            if text in console:
                return console
            if self.proc.poll() is not None:
                console = self.console_so_far()
                if text in console:
                    return console
                raise GuestError(
                    f"QEMU exited ({self.proc.returncode}) before printing {text!r}",
                    console, self.qemu_log(),
                )
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{text!r} not seen within {timeout} s", console)
            time.sleep(0.05)

    # -- ending ------------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL QEMU now (simulates a crashed front-end) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off and return its result.

        ``timeout`` defaults to what is left of the ``timeout`` given at start.  On expiry
        QEMU is killed and :class:`GuestTimeout` raised with the console tail.  If the guest
        printed its exit marker but QEMU lingers, it is killed after a short grace period and
        the result still returned.
        """
        if self._result is not None:
            return self._result
        deadline = self.deadline if timeout is None else time.monotonic() + timeout
        marker_seen_at: float | None = None
        while self.proc.poll() is None:
            now = time.monotonic()
            if marker_seen_at is None and EXIT_MARKER in self.console_so_far():
                marker_seen_at = now
            if marker_seen_at is not None and now - marker_seen_at > POWEROFF_GRACE:
                self.kill()
                break
            if now > deadline:
                self.kill()
                console = self.console_so_far()
                raise GuestTimeout(
                    f"guest did not finish within {now - self.started:.1f} s "
                    f"(timeout {timeout if timeout is not None else self.timeout} s); "
                    "QEMU killed", console, self.qemu_log(),
                )
            time.sleep(0.05)
        duration = time.monotonic() - self.started
        raw = self.console_so_far()
        code, output = parse_console(raw)
        if code is None:
            where = "after" if START_MARKER in raw else "before"
            raise GuestError(
                f"QEMU exited (code {self.proc.returncode}) {where} the guest script started, "
                "without the guest reporting an exit status", raw, self.qemu_log(),
            )
        self._result = GuestResult(code, output, duration, raw, self.qemu_log())
        return self._result

    def close(self) -> None:
        """Kill QEMU if still running and remove the run directory (unless kept)."""
        self.kill()
        if os.environ.get("VHOSTPY_KEEP_GUEST") in (None, "", "0"):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> RunningGuest:  # noqa: PYI034 - typing.Self is 3.11+, we support 3.10
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: Alias: the brief calls the running-guest class ``Guest`` too.
Guest = RunningGuest


def start_guest(script: str, **options: Any) -> RunningGuest:
    """Start a guest running ``script`` (busybox sh) and return at once.

    Options are :class:`RunningGuest`'s keyword parameters.

    ``net_options``/``blk_options`` are extra ``-device`` properties for every NIC/disk
    (e.g. ``{"host_mtu": 9000}``, ``{"num-queues": 2}``); a socket given as
    ``(path, {props})`` gets its own.  ``netdev_options`` go to ``-netdev vhost-user``
    (e.g. ``{"queues": 2}``).  ``files`` adds files to the guest's root (``{"data.bin": b..}``).
    ``append`` extends the kernel command line.
    """
    return RunningGuest(script, **options)


def boot_guest(script: str, **options: Any) -> GuestResult:
    """Boot a guest, run ``script``, wait for power-off; options as for :func:`start_guest`.

    Returns the result whatever the script's exit status; raises :class:`GuestTimeout` when
    the guest outlives ``timeout`` and :class:`GuestError` when QEMU fails.
    """
    with start_guest(script, **options) as guest:
        return guest.wait()


# --------------------------------------------------------------------------------------------
# CLI (ci/qemu/run-guest.sh)


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Boot a guest from the command line, stream its console, exit with the script's status."""
    ap = argparse.ArgumentParser(
        prog="run-guest.sh",
        description="Boot a throw-away QEMU guest against vhost-user sockets.",
        epilog="Arguments after -- go to QEMU verbatim.",
    )
    ap.add_argument("--blk", action="append", default=[], metavar="SOCK",
                    help="vhost-user-blk socket (repeatable; /dev/vda, /dev/vdb, ...)")
    ap.add_argument("--net", action="append", default=[], metavar="SOCK",
                    help="vhost-user net socket (repeatable; eth0, eth1, ...)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--script", type=Path, help="shell script to run in the guest")
    src.add_argument("--command", help="shell commands to run in the guest")
    ap.add_argument("--blk-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra vhost-user-blk-pci property, e.g. num-queues=2")
    ap.add_argument("--net-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra virtio-net-pci property, e.g. host_mtu=9000")
    ap.add_argument("--netdev-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra -netdev vhost-user property, e.g. queues=2")
    ap.add_argument("--memory", type=int, default=256, metavar="MB")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--accel", default=None, help="tcg or kvm (default: detect)")
    ap.add_argument("--append", default="", help="extra kernel command line")
    ap.add_argument("--quiet", "-q", action="store_true",
                    help="print only the script's output (after the guest ends)")
    ap.add_argument("--print-command", action="store_true", help="print the QEMU argv first")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    qemu_extra: list[str] = []
    if "--" in raw_argv:
        i = raw_argv.index("--")
        raw_argv, qemu_extra = raw_argv[:i], raw_argv[i + 1:]
    args = ap.parse_args(raw_argv)
    script = args.script.read_text() if args.script else args.command + "\n"
    try:
        guest = start_guest(
            script, blk_sockets=args.blk, net_sockets=args.net,
            blk_options=dict(args.blk_opt), net_options=dict(args.net_opt),
            netdev_options=dict(args.netdev_opt), memory_mb=args.memory, timeout=args.timeout,
            extra_args=qemu_extra, append=args.append, accel=args.accel,
        )
    except GuestImageError as e:
        print(f"run-guest: {e}", file=sys.stderr)
        return 2
    with guest:
        if args.print_command:
            print(shlex.join(guest.argv), file=sys.stderr)
        printed = 0
        try:
            while not args.quiet and guest.is_running():
                text = guest.console_so_far()
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
                time.sleep(0.1)
            result = guest.wait()
        except GuestError as e:
            if not args.quiet:
                sys.stdout.write(guest.console_so_far()[printed:])
            print(f"\nrun-guest: {e}", file=sys.stderr)
            return 124 if isinstance(e, GuestTimeout) else 125
        if args.quiet:
            sys.stdout.write(result.console)
        else:
            sys.stdout.write(result.raw_console[printed:])
        sys.stdout.flush()
        print(f"run-guest: [{guest.accel}] guest exited {result.exit_code} "
              f"after {result.duration:.1f} s", file=sys.stderr)
        return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
