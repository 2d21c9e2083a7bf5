"""`vhostpy lguest` (vhostpy.lguest_launcher) against the software model of /dev/lguest.

The guest is the driver model (vhostpy.lguest_guest) on its own thread, reaching guest memory
through the guest_base and pfnlimit the Launcher wrote in LHREQ_INITIALIZE (as the kernel
does); the Launcher's run loop reads the model's /dev/lguest on the test's thread, the devices
run on the Launcher's device thread, interrupts come back as LHREQ_IRQ writes. The command
line is driven as a process (tests/lguest_model.py as a script) with pipes and signals.
Nothing here runs on a real lguest host (see the README for the check done by hand).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lguest_model import LHREQ_EVENTFD, LHREQ_INITIALIZE, FakeLguest
from procs import terminate
from test_lguest_boot import bzimage
from tools import wait_until

from vhostpy import cli, lguest_launcher
from vhostpy.errors import ConfigurationError
from vhostpy.lguest_guest import ID_BLOCK, ID_NET, BlkDriver, LguestGuestDriver, NetDriver
from vhostpy.lguest_host import RunExit
from vhostpy.lguest_launcher import (
    POWER_OFF_REASON,
    Launcher,
    LaunchOptions,
    NetOptions,
    create_memory_fd,
    launch,
    terminal_mode,
)
from vhostpy.memory import GuestMemory
from vhostpy.packets import Responder

MIB = 1 << 20
RAM_MIB = 16
RAM = RAM_MIB * MIB
KERNEL = bzimage(b"\xf4" * 4096)                     # hlt; entered at 1 MiB
MODEL = Path(__file__).with_name("lguest_model.py")
Guest = Callable[[LguestGuestDriver, FakeLguest], None]


@pytest.fixture
def console() -> object:
    """(stdin read end, stdin write end, stdout read end, stdout write end) pipes."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    os.set_blocking(r_out, False)
    yield r_in, w_in, r_out, w_out
    for fd in (r_in, w_in, r_out, w_out):
        os.close(fd)


def _unread(fd: int) -> int:
    """Bytes written into the pipe whose read end is `fd` and not yet read (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def make(model: FakeLguest, console: tuple[int, int, int, int], **kw: object) -> Launcher:
    launcher = Launcher(RAM_MIB, console_in=console[0], console_out=console[3],
                        opener=model.open, word_size=model.word, **kw)  # type: ignore[arg-type]
    return launcher


def irq_came(model: FakeLguest) -> None:
    """Wait, in the guest, for a completion's LHREQ_IRQ: the driver finds completions by
    polling the used ring, so the interrupt may come after it saw them (and a guest that
    died first would never get it)."""
    wait_until(lambda: model.irqs, 10, "a completion's LHREQ_IRQ")


def run_guest(launcher: Launcher, model: FakeLguest, guest: Guest, *,
              reason: str = POWER_OFF_REASON) -> RunExit:
    """Boot, run `guest(driver, model)` on its own thread, then the guest dies with `reason`."""
    errors: list[BaseException] = []
    launcher.boot(KERNEL, "console=hvc0")

    def play() -> None:
        try:
            assert model.initialized.wait(10), "LHREQ_INITIALIZE never came"
            mem = model.memory if model.memory is not None else launcher.memory
            drv = LguestGuestDriver(mem, RAM, model.guest_notify, heap=(RAM // 2, RAM // 4))
            model.on_irq = drv.interrupt
            guest(drv, model)
        except BaseException as exc:  # noqa: BLE001 (re-raised on the test's thread)
            errors.append(exc)
        finally:
            model.die(reason if not errors else f"test guest failed: {errors[0]!r}")

    thread = threading.Thread(target=play)
    thread.start()
    try:
        result = launcher.run(handle_signals=False)
    finally:
        thread.join(20)
        launcher.close()
    if errors:
        raise errors[0]
    return result


def native_model(**kw: object) -> FakeLguest:
    return FakeLguest(blocking=True, map_guest=True, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ guest memory


def test_memfd_and_its_fallbacks_are_shareable(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def enosys(name: str, flags: int) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")   # a 3.11 kernel

    kinds = []
    for create in (None, enosys):
        fd, kind = create_memory_fd(8 * 4096, memfd_create=create, directory=str(tmp_path))
        kinds.append(kind)
        a, b = GuestMemory(), GuestMemory()          # this process and a back-end
        a.map_fd(fd, 0, 8 * 4096, 0, 0)
        b.map_fd(fd, 0, 8 * 4096, 0, 0)
        a.write(5000, b"shared")
        assert b.read(5000, 6) == b"shared" and os.fstat(fd).st_size == 8 * 4096
        a.clear()
        b.clear()
        os.close(fd)
    monkeypatch.delattr(os, "O_TMPFILE")             # before 3.11: a named file, unlinked
    fd, kind = create_memory_fd(4096, memfd_create=enosys, directory=str(tmp_path))
    os.close(fd)
    assert kinds + [kind] == ["memfd", "tmpfile", "unlinked"]
    assert list(tmp_path.iterdir()) == []            # nothing left behind
    with pytest.raises(ConfigurationError, match="2 GiB|must be"):
        create_memory_fd(1 << 31)


# ------------------------------------------------------------------ devices through the run loop


@pytest.mark.parametrize("word", [None, 4], ids=["native", "i386-words"])
def test_blk_writes_reach_the_image(tmp_path: Path, console: tuple[int, int, int, int],
                                    word: int | None) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"R" * 4096)
    # i386 words cannot carry this host's 64-bit guest_base: the guest uses our mapping.
    model = native_model() if word is None else FakeLguest(4, blocking=True)
    launcher = make(model, console)
    launcher.add_block(str(image))
    launcher.add_block(str(ro), read_only=True)
    data = bytes(range(256)) * 8

    def guest(drv: LguestGuestDriver, model: FakeLguest) -> None:
        blk = drv.blk()
        assert blk.capacity == (1 << 20) // 512
        blk.write(10, data)
        assert blk.read(10, 4) == data
        robk = drv.probe(drv.find(ID_BLOCK, 1))
        assert isinstance(robk, BlkDriver)
        assert robk.read(0, 1) == b"R" * 512
        with pytest.raises(OSError, match="status"):
            robk.write(0, b"W" * 512)
        irq_came(model)

    # the console is always the first device, then the command line's order
    assert launcher.bridge.devices[0].device is launcher.console
    assert [lg.device.device_id for lg in launcher.bridge.devices] == [3, 2, 2]
    expected_limit = launcher.bridge.guest_limit // 4096
    result = run_guest(launcher, model, guest)
    assert result == RunExit("died", POWER_OFF_REASON)
    with open(image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(len(data)) == data
    assert ro.read_bytes() == b"R" * 4096
    init = model.requests[0]
    assert init[0] == LHREQ_INITIALIZE and init[2:] == (expected_limit, 0x100000)
    assert model.irqs, "no completion came back as LHREQ_IRQ"
    registered = [r[1] for r in model.requests if r[0] == LHREQ_EVENTFD]
    assert registered and not set(registered) & set(model.returned)   # kicks on eventfds
    assert model.closed


def test_eventfd_refused_by_an_old_kernel(tmp_path: Path,
                                          console: tuple[int, int, int, int]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 << 10))
    model = native_model(eventfd_errno=errno.EINVAL)
    launcher = make(model, console)
    launcher.add_block(str(image))
    lg = launcher.bridge.devices[1]

    def guest(drv: LguestGuestDriver, model: FakeLguest) -> None:
        blk = drv.blk()
        blk.write(3, b"\x33" * 512)
        assert blk.read(3, 1) == b"\x33" * 512

    run_guest(launcher, model, guest)
    assert launcher.host.eventfds_refused and launcher.host.eventfds == {}
    assert lg.queues[0].address in model.returned                    # kicks came by pread
    # tried once, then never again: the console's and later queues stay on pread too
    assert len([r for r in model.requests if r[0] == LHREQ_EVENTFD]) == 1


def test_net_ping_responder_and_switch(tmp_path: Path,
                                       console: tuple[int, int, int, int]) -> None:
    pcap = tmp_path / "net.pcap"
    model = native_model()
    launcher = make(model, console, net=NetOptions(respond_ip="10.0.2.2", pcap=str(pcap)))
    launcher.add_net()
    launcher.add_net()

    def guest(drv: LguestGuestDriver, model: FakeLguest) -> None:
        a, b = drv.net(), drv.probe(drv.find(ID_NET, 1))
        assert isinstance(b, NetDriver)
        assert (a.mac, b.mac) == (bytes.fromhex("525400123456"), bytes.fromhex("525400123457"))
        stacks = {id(a): Responder("10.0.2.15", mac="52:54:00:12:34:56"),
                  id(b): Responder("10.0.2.16", mac="52:54:00:12:34:57")}
        # the responder, then the other port (through the switch)
        for want, target in enumerate(("10.0.2.2", "10.0.2.16"), 1):
            pending = {id(a): stacks[id(a)].ping(target, payload_size=64), id(b): []}
            deadline = time.monotonic() + 5
            while len(stacks[id(a)].echo_replies) < want:
                assert time.monotonic() < deadline, f"no echo reply from {target}"
                for port in (a, b):
                    for frame in pending[id(port)]:
                        port.send(frame)
                    pending[id(port)] = [r for f in port.receive()
                                         for r in stacks[id(port)].handle(f)]
                time.sleep(0.002)

    run_guest(launcher, model, guest)
    assert pcap.stat().st_size > 24 + 4 * 16          # header plus the frames both ways


def test_rng_and_console_in_process(console: tuple[int, int, int, int]) -> None:
    model = native_model()
    launcher = make(model, console)
    launcher.add_rng()
    os.write(console[1], b"typed\n")

    def guest(drv: LguestGuestDriver, model: FakeLguest) -> None:
        got = drv.rng().read(64)
        assert len(got) == 64 and len(set(got)) > 8
        con = drv.console()
        con.write(b"to stdout\n")
        text, deadline = b"", time.monotonic() + 5
        while text != b"typed\n":
            assert time.monotonic() < deadline, f"console input never came: {text!r}"
            text += con.receive()
            time.sleep(0.002)

    run_guest(launcher, model, guest)
    assert os.read(console[2], 100) == b"to stdout\n"


def test_vhost_user_blk_through_vhostpy_blk(tmp_path: Path, backend: Callable[..., object],
                                            console: tuple[int, int, int, int]) -> None:
    image = tmp_path / "remote.img"
    image.write_bytes(bytes(1 << 20))
    b = backend("blk", "--image", str(image))
    model = native_model()
    launcher = make(model, console)
    launcher.add_vhost_user("blk", b.path)  # type: ignore[attr-defined]
    data = b"lguest->vhost-user" * 57

    def guest(drv: LguestGuestDriver, model: FakeLguest) -> None:
        blk = drv.blk()
        assert blk.capacity == (1 << 20) // 512
        blk.write(7, data[:1024])
        assert blk.read(7, 2) == data[:1024]
        irq_came(model)

    run_guest(launcher, model, guest)
    with open(image, "rb") as f:
        f.seek(7 * 512)
        assert f.read(1024) == data[:1024]
    assert model.irqs


def test_guest_death_exit_status_and_reason(tmp_path: Path,
                                            console: tuple[int, int, int, int]) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(KERNEL)
    for reason, status in ((POWER_OFF_REASON, 0), ("CRASH: Kernel panic - oops", 1)):
        model = native_model()
        threading.Thread(target=lambda m=model, r=reason: (m.initialized.wait(10),
                                                           m.die(r))).start()
        err = io.StringIO()
        result = launch(LaunchOptions(kernel=str(kernel), memory_mib=RAM_MIB),
                        stdin_fd=console[0], stdout_fd=console[3], stderr=err,
                        handle_signals=False, opener=model.open)
        assert (result.exit, result.status) == (RunExit("died", reason), status)
        assert err.getvalue() == f"vhostpy lguest: guest died: {reason}\n"


def test_three_ctrl_c_stop_the_guest(console: tuple[int, int, int, int]) -> None:
    model = native_model()
    launcher = make(model, console)
    launcher.boot(KERNEL)

    stopped = threading.Event()

    def typist() -> None:
        try:
            model.initialized.wait(10)
            for _ in range(3):
                os.write(console[1], b"\x03")
                # one ^C per read, as keys typed apart arrive: the launcher read this one
                wait_until(lambda: _unread(console[0]) == 0, 5, "the launcher to read ^C",
                           interval=0.002)
        finally:
            if not stopped.wait(10):
                model.die("the ^C hack did not stop the guest")   # never hang the suite

    thread = threading.Thread(target=typist, daemon=True)
    thread.start()
    try:
        result = launcher.run()          # on the main thread, with its signal handlers
    finally:
        stopped.set()
        launcher.close()
    thread.join(10)
    assert result == RunExit("stopped", "three ^C on the console")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_terminal_mode_on_a_pty() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with terminal_mode(slave):
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & (termios.ISIG | termios.ICANON | termios.ECHO)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# ------------------------------------------------------------------ the command line


def _cli(tmp_path: Path, scenario: str, *args: str, stdin: bytes | None = None,
         signal_after: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(KERNEL)
    argv = [sys.executable, str(MODEL), scenario, "--", "lguest", "-m", str(RAM_MIB), *args,
            str(kernel), "console=hvc0", "quiet"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = b""
        if signal_after is not None:        # once the guest runs: it wrote signal_after
            assert proc.stdout is not None
            while not out.endswith(signal_after):
                chunk = os.read(proc.stdout.fileno(), 100)
                assert chunk, f"launcher exited early: {proc.wait()}"
                out += chunk
            proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(stdin, timeout=20)
        out += rest
    finally:
        terminate(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_cli_console_both_ways_and_power_off(tmp_path: Path) -> None:
    done = _cli(tmp_path, "console", "--rng", stdin=b"ping\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"early boot\nhello from the guest\nguest read: ping\n"
    assert done.stderr.decode().splitlines()[-1] == \
        f"vhostpy lguest: guest died: {POWER_OFF_REASON}"


def test_cli_panic_exits_1_with_the_reason(tmp_path: Path) -> None:
    done = _cli(tmp_path, "panic")
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        "vhostpy lguest: guest died: CRASH: Kernel panic - not syncing: no init found"]


def test_cli_sigterm_stops_cleanly(tmp_path: Path) -> None:
    done = _cli(tmp_path, "idle", signal_after=b"idling\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"idling\n"
    assert done.stderr.decode().splitlines()[-1] == "vhostpy lguest: stopped (signal: SIGTERM)"


def test_cli_restart_reexecutes_the_launcher(tmp_path: Path) -> None:
    done = _cli(tmp_path, "restart")
    lines = done.stderr.decode().splitlines()
    # The fresh process has no model: it finds no /dev/lguest here, in one line.
    assert lines[0] == "vhostpy lguest: the guest asked for a restart"
    assert lines[1].startswith("vhostpy lguest: error: cannot start the guest on /dev/lguest")
    assert len(lines) == 2 and done.returncode == 1


def _main(argv: list[str]) -> int | str | None:
    """cli.main's status, also when argparse exits (SystemExit) on a bad value."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(("args", "message"), [
    (["-m", "0"], "must be positive"),
    (["-m", "4096"], "a 32-bit Launcher can map"),
    (["--layout", "2.6.24"], "page tables"),
    (["--vhost-user", "blk"], "TYPE:SOCKET"),
    (["--vhost-user", "scsi:/tmp/x.sock"], "unknown type 'scsi'"),
    (["--pcap", "x.pcap"], "--pcap is a network option"),
    (["--net", "--net", "--reflect"], "exactly one --net"),
    (["--net", "--respond", "300.1.1.1"], "invalid IPv4"),
    (["--block", "/nonexistent/disk.img"], "cannot open image"),
    (["--vhost-user", "blk:/nonexistent.sock"], "cannot connect"),
    (["--initrd", "/nonexistent/initrd"], "cannot read initrd"),
])
def test_cli_bad_values_exit_1_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(KERNEL)

    def never(path: str) -> FakeLguest:
        raise AssertionError("the guest was started despite a bad value")

    monkeypatch.setattr(lguest_launcher, "DEFAULT_OPENER", never)
    assert _main(["lguest", *args, str(kernel)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_refuses_a_file_that_is_no_kernel(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    assert _main(["lguest", str(junk)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "neither an ELF vmlinux nor a bzImage" in err
