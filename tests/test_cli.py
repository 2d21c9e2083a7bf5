"""The `vhostpy` command line, run as users run it (`python -m vhostpy`, the same `main` the
console script calls): capabilities, help, one-line errors with exit status 1 and nothing
left listening, socket-path ownership (stale, in use, not a socket), signals, `--fd`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted
from conftest import Backend
from procs import stop
from scripted import ScriptedGuest, blk_request

from vhostpy import cli
from vhostpy import protocol as p
from vhostpy.blk import VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhostpy.frontend import BackendFailure, Frontend

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
PROG = [sys.executable, "-m", "vhostpy"]
StartBackend = Callable[..., Backend]   # the `backend` fixture


def run(*args: str, pass_fds: tuple[int, ...] = (), timeout: float = 20
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROG, *args], check=False, capture_output=True, text=True,
                          timeout=timeout,
                          cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def start(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*PROG, *args], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started by hand; killed if the test left them running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def io_roundtrip(guest: ScriptedGuest, sector: int = 3) -> None:
    data = os.urandom(1024)
    assert blk_request(guest, VIRTIO_BLK_T_OUT, sector, data=data) == (VIRTIO_BLK_S_OK, b"")
    assert blk_request(guest, VIRTIO_BLK_T_IN, sector, read_len=1024) == (VIRTIO_BLK_S_OK, data)


def serve_guest(path: str) -> None:
    guest = ScriptedGuest(path)
    try:
        guest.start()
        guest.setup_ring(0)
        io_roundtrip(guest)
    finally:
        guest.close()


# ------------------------------------------------------------------------------------------
# capabilities, help, the entry point


def test_print_capabilities() -> None:
    r = run("blk", "--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("\n") == 1 and r.stdout.endswith("\n")
    caps = json.loads(r.stdout)
    assert set(caps) == {"type", "features"}
    assert caps["type"] == "block"
    assert isinstance(caps["features"], list)
    assert all(isinstance(f, str) for f in caps["features"])
    assert "read-only" in caps["features"] and "blk-file" in caps["features"]


def test_print_capabilities_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["blk", "--print-capabilities"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["type"] == "block"
    assert err == ""


@pytest.mark.parametrize("args", [["--help"], ["blk", "--help"], ["--version"]])
def test_help_and_version_exit_0(args: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout
    if "--help" in args:
        assert "usage:" in r.stdout
    if args == ["blk", "--help"]:
        for option in ("--socket-path", "--fd", "--print-capabilities", "--image", "--size",
                       "--num-queues", "--queue-size", "--serial", "--read-only"):
            assert option in r.stdout


def test_help_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["blk", "--help"])
    assert exc.value.code == 0
    assert "--socket-path" in capsys.readouterr().out


def test_console_script_is_cli_main() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["vhostpy"] == "vhostpy.cli:main"
    assert "main()" in (ROOT / "vhostpy" / "__main__.py").read_text()
    exe = shutil.which("vhostpy")
    if exe is not None:    # installed (pip install -e .): the script behaves the same
        r = subprocess.run([exe, "blk", "--print-capabilities"], check=False,
                           capture_output=True, text=True, timeout=20, env=ENV)
        assert r.returncode == 0 and json.loads(r.stdout)["type"] == "block"


# ------------------------------------------------------------------------------------------
# bad values: exit 1, one line on stderr naming the problem, nothing listening

BAD = [
    ("num-queues-0", ["--num-queues", "0"], "--num-queues"),
    ("num-queues-abc", ["--num-queues", "abc"], "'abc'"),
    ("num-queues-65", ["--num-queues", "65"], "--num-queues"),
    ("queue-size-3", ["--queue-size", "3"], "--queue-size"),
    ("queue-size-100000", ["--queue-size", "100000"], "--queue-size"),
    ("queue-size-48", ["--queue-size", "48"], "power of two"),
    ("queue-size-65536", ["--queue-size", "65536"], "4..32768"),
    ("queue-size-2", ["--queue-size", "2"], "4..32768"),
    ("size-negative", ["--size", "-1M"], "sizes must be positive"),
    ("size-negative-joined", ["--size=-4096"], "sizes must be positive"),
    ("format-qcow2", ["--image", "{img}", "--format", "qcow2"], "raw"),
    ("serial-21-bytes", ["--serial", "s" * 21], "--serial"),
    ("serial-22-utf8-bytes", ["--serial", "\u00e9" * 11], "--serial"),
    ("size-100", ["--size", "100"], "--size"),
    ("size-junk", ["--size", "junk"], "'junk'"),
    ("size-0", ["--size", "0"], "--size"),
    ("image-missing", ["--image", "{tmp}/missing.img"], "missing.img"),
    ("image-directory", ["--image", "{tmp}"], "Is a directory"),
    ("image-directory-ro", ["--image", "{tmp}", "--read-only"], "not a regular file"),
    ("image-and-size", ["--image", "{img}", "--size", "1M"], "--size"),
    ("unknown-option", ["--bogus"], "--bogus"),
]


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def check_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), r.stderr
    assert "error" in lines[0] and needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_value(tmp_path: Path, img: Path, args: list[str], needle: str) -> None:
    sock = tmp_path / "vhost.sock"
    args = [a.format(tmp=tmp_path, img=img) for a in args]
    r = run("blk", "--socket-path", str(sock), *args)
    check_one_line_error(r, needle)
    assert r.stderr.startswith("vhostpy blk: error: "), r.stderr   # names its command
    assert not sock.exists()


def test_neither_socket_path_nor_fd(tmp_path: Path) -> None:
    check_one_line_error(run("blk", "--size", "1M"), "--socket-path")


def test_both_socket_path_and_fd(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        r = run("blk", "--socket-path", str(sock), "--fd", str(s.fileno()),
                pass_fds=(s.fileno(),))
    check_one_line_error(r, "--fd")
    assert not sock.exists()


def test_unknown_command() -> None:
    check_one_line_error(run("frob"), "frob")


def test_bare_vhostpy_lists_the_commands() -> None:
    r = run()
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("vhostpy: error: a command is required"), r.stderr
    listed = [line.split()[0] for line in r.stderr.splitlines()[1:] if line.startswith("  ")]
    assert listed == list(cli.COMMANDS) == ["blk", "net", "rng", "serve", "lguest", "ctl",
                                            "replay"]
    for name in listed:     # every listed command exists
        assert run(name, "--help").returncode == 0


@pytest.mark.parametrize("command", ["blk", "net", "rng"])
def test_every_error_names_its_command(tmp_path: Path, command: str) -> None:
    sock = str(tmp_path / "s.sock")
    for args in (["--bogus"], ["--socket-path", sock, "--fd", "3"], ["-v"],
                 ["--socket-path", str(tmp_path / "missing" / "s.sock")]):
        r = run(command, *args)
        check_one_line_error(r, "")
        assert r.stderr.startswith(f"vhostpy {command}: error: "), (args, r.stderr)


@pytest.mark.parametrize("command", ["blk", "net"])
def test_num_queues_and_queue_size_have_help(command: str) -> None:
    out = run(command, "--help").stdout
    for option in ("--num-queues N", "--queue-size N"):
        text = out[out.index(option) + len(option):].split("\n  -", 1)[0]
        assert len(text.split()) >= 4, f"{option} has no help: {text!r}"
    assert "32768" in out and "power of two" in out


@pytest.mark.parametrize("fd", ["999", "-1", "x"])
def test_fd_not_open_or_invalid(fd: str) -> None:
    check_one_line_error(run("blk", "--fd", fd), fd)


def test_fd_of_regular_file(tmp_path: Path) -> None:
    with open(tmp_path / "plain", "wb") as f:
        r = run("blk", "--fd", str(f.fileno()), pass_fds=(f.fileno(),))
    check_one_line_error(r, "not a socket")


@pytest.mark.parametrize("family,kind", [(socket.AF_UNIX, socket.SOCK_DGRAM),
                                         (socket.AF_INET, socket.SOCK_STREAM)],
                         ids=["unix-dgram", "tcp"])
def test_fd_of_wrong_kind_of_socket(family: int, kind: int) -> None:
    with socket.socket(family, kind) as s:
        r = run("blk", "--fd", str(s.fileno()), pass_fds=(s.fileno(),))
    check_one_line_error(r, "not a UNIX stream socket")


def test_socket_path_parent_missing(tmp_path: Path) -> None:
    sock = tmp_path / "no" / "such" / "dir" / "vhost.sock"
    check_one_line_error(run("blk", "--socket-path", str(sock)), "No such file or directory")
    assert not sock.parent.exists()


def test_socket_path_under_a_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("keep")
    for path in ("/etc/passwd/x.sock", str(plain / "x.sock")):
        r = run("blk", "--socket-path", path)
        check_one_line_error(r, "Not a directory")
        assert "Traceback" not in r.stderr
    assert plain.read_text() == "keep"


def test_socket_path_in_a_directory_we_may_not_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    sock = locked / "vhost.sock"
    argv = [*PROG, "blk", "--socket-path", str(sock)]
    if os.geteuid() == 0:   # root writes anywhere: drop the capabilities that allow it
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to test this as root"
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20, cwd=ROOT,
                       env=ENV, stdin=subprocess.DEVNULL)
    check_one_line_error(r, "Permission denied")
    assert r.stderr.startswith("vhostpy blk: error: cannot listen on "), r.stderr
    assert os.listdir(locked) == []


def test_socket_path_in_a_read_only_file_system() -> None:
    check_one_line_error(run("blk", "--socket-path", "/proc/vhostpy-test.sock"), "cannot listen")


def test_socket_path_empty() -> None:
    check_one_line_error(run("blk", "--socket-path", ""), "--socket-path")
    check_one_line_error(run("net", "--socket-path", ""), "socket path is empty")


def test_socket_path_too_long(tmp_path: Path) -> None:
    sock = tmp_path / ("x" * 120)
    check_one_line_error(run("blk", "--socket-path", str(sock)), "too long")
    assert not sock.exists()


def test_socket_path_is_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("do not delete me\n")
    check_one_line_error(run("blk", "--socket-path", str(path)), "not a socket")
    assert path.read_text() == "do not delete me\n"


def test_socket_path_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.mkdir()
    check_one_line_error(run("blk", "--socket-path", str(path)), "not a socket")
    assert path.is_dir()


def test_socket_path_in_use_by_live_process(backend: StartBackend) -> None:
    first = backend("blk", "--size", "1M")
    check_one_line_error(run("blk", "--socket-path", first.path), "in use")
    assert first.alive()
    assert stat.S_ISSOCK(os.lstat(first.path).st_mode)
    serve_guest(first.path)                    # the first one still serves
    assert first.alive()


def test_stale_socket_is_replaced(tmp_path: Path,
                                  procs: list[subprocess.Popen[bytes]]) -> None:
    sock = tmp_path / "vhost.sock"
    dead = start("blk", "--socket-path", str(sock), "--size", "1M")
    procs.append(dead)
    wait_for(sock, dead)
    dead.kill()
    dead.wait()
    stale = os.lstat(sock)
    assert stat.S_ISSOCK(stale.st_mode), "SIGKILL should leave the socket behind"
    fresh = start("blk", "--socket-path", str(sock), "--size", "1M")
    procs.append(fresh)
    deadline = time.monotonic() + 15
    while not _accepts(sock):
        assert fresh.poll() is None, fresh.communicate()
        assert time.monotonic() < deadline, "the stale socket was never replaced"
        time.sleep(0.01)
    serve_guest(str(sock))
    rc, err = stop(fresh)
    assert rc == 0, err
    assert not sock.exists()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


# ------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("when", ["idle", "connected", "at-once"])
def test_signal_exits_0_and_removes_socket(tmp_path: Path, procs: list[subprocess.Popen[bytes]],
                                           signum: int, when: str) -> None:
    sock = tmp_path / "vhost.sock"
    proc = start("blk", "--socket-path", str(sock), "--size", "1M")
    procs.append(proc)
    wait_for(sock, proc)   # "at-once": signal the moment the socket file appears
    guest = None
    try:
        if when == "idle":
            serve_guest(str(sock))
        elif when == "connected":            # a front-end mid-session, ring running
            guest = ScriptedGuest(str(sock))
            guest.start()
            guest.setup_ring(0)
            io_roundtrip(guest)
        rc, err = stop(proc, signum)
    finally:
        if guest is not None:
            guest.close()
    assert rc == 0, err
    assert "Traceback" not in err, err
    assert not sock.exists()


# ------------------------------------------------------------------------------------------
# --fd: an inherited socket


def test_fd_inherited_listening_socket(tmp_path: Path,
                                       procs: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    fd = listener.fileno()
    proc = start("blk", "--fd", str(fd), "--size", "1M", "-v", pass_fds=(fd,))
    procs.append(proc)
    listener.close()                            # only the back-end holds it now
    serve_guest(str(path))
    serve_guest(str(path))                      # and it keeps listening, guest after guest
    rc, err = stop(proc)
    assert rc == 0, err
    assert "front-end connected (connection 2)" in err


def test_fd_inherited_connected_socket(monkeypatch: pytest.MonkeyPatch,
                                       procs: list[subprocess.Popen[bytes]]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = start("blk", "--fd", str(theirs.fileno()), "--size", "1M",
                 pass_fds=(theirs.fileno(),))
    procs.append(proc)
    theirs.close()
    monkeypatch.setattr(scripted.Frontend, "connect",
                        classmethod(lambda cls, path, timeout=5.0: cls(ours, timeout=timeout)))
    serve_guest("(socketpair)")   # `connect` above hands it our end of the pair
    rc, err = stop(proc)
    assert rc == 0, err


# ------------------------------------------------------------------------------------------
# what the options configure, seen through the protocol


def _config(path: str) -> tuple[Frontend, bytes]:
    fe = Frontend.connect(path)
    fe.negotiate()
    return fe, fe.get_config(0, 60)


def test_size_1M_gives_capacity_2048(backend: StartBackend) -> None:
    b = backend("blk", "--size", "1M")
    fe, cfg = _config(b.path)
    with fe:
        assert struct.unpack_from("<Q", cfg)[0] == 2048
        assert not fe.features >> VIRTIO_BLK_F_RO & 1


def test_default_disk_and_image_capacity(backend: StartBackend, img: Path) -> None:
    fe, cfg = _config(backend("blk", name="default.sock").path)
    with fe:
        assert struct.unpack_from("<Q", cfg)[0] == cli.DEFAULT_DISK_SIZE // 512
    fe, cfg = _config(backend("blk", "--image", str(img), "--read-only", name="ro.sock").path)
    with fe:
        assert struct.unpack_from("<Q", cfg)[0] == 2048
        assert fe.features >> VIRTIO_BLK_F_RO & 1


def test_queue_options_reach_the_protocol(backend: StartBackend) -> None:
    b = backend("blk", "--size", "1M", "--num-queues", "3", "--queue-size", "128")
    with Frontend.connect(b.path) as fe:
        fe.negotiate()
        assert fe.get_queue_num() == 3
        assert struct.unpack_from("<H", fe.get_config(34, 2))[0] == 3   # num_queues
        fe.set_vring_num(2, 128)
        with pytest.raises(BackendFailure):
            fe.set_vring_num(2, 256)
        assert p.ProtocolFeature.MQ in fe.protocol_features


def test_bad_value_is_one_line_even_with_verbose(tmp_path: Path) -> None:
    """-v must not add log lines to the one-line error of a start that failed."""
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "vhostpy", "blk", "--socket-path", str(regular), "-v"],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a socket" in result.stderr
    assert regular.read_text() == "keep me"


# ------------------------------------------------------------------------------------------
# SIGUSR1 / SIGHUP, the counters line, the -v "serving" line

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}"


def start_logged(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`vhostpy ARGS` with stderr in `log`, so a test can read it while the process runs."""
    with open(log, "wb") as out:
        return subprocess.Popen([*PROG, *args], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out)


def wait_for_text(log: Path, proc: subprocess.Popen[bytes], predicate: Callable[[str], bool],
                  what: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if predicate(text):
            return text
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{text}"
        assert time.monotonic() < deadline, f"never {what}:\n{text}"
        time.sleep(0.01)


def term(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM a process started by `start_logged`; its exit status."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(15)


def records(text: str, event: str) -> list[dict[str, object]]:
    return [r for r in cli.parse_counters_lines(text) if r["event"] == event]


@pytest.mark.parametrize("command", ["blk", "rng"])
def test_sigusr1_prints_counters_and_sighup_is_harmless(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], command: str) -> None:
    sock, log = tmp_path / "vhost.sock", tmp_path / "stderr.txt"
    extra = ["--size", "1M"] if command == "blk" else []
    proc = start_logged(log, command, "--socket-path", str(sock), "-v", *extra)
    procs.append(proc)
    wait_for(sock, proc)
    for n in (1, 2):
        proc.send_signal(signal.SIGUSR1)
        wait_for_text(log, proc, lambda t, n=n: len(records(t, "SIGUSR1")) == n,
                      f"SIGUSR1 line {n}")
    proc.send_signal(signal.SIGHUP)
    text = wait_for_text(log, proc, lambda t: "SIGHUP" in t, "the SIGHUP log line")
    assert re.search(rf"^{TIMESTAMP} vhostpy\[{proc.pid}\] INFO vhostpy: SIGHUP", text,
                     re.MULTILINE)
    assert proc.poll() is None and _accepts(sock)          # still serving
    if command == "blk":
        serve_guest(str(sock))                             # one write, one read
    rc = term(proc)
    text = log.read_text()
    assert rc == 0, text
    assert not sock.exists()
    assert "Traceback" not in text
    usr1, (final,) = records(text, "SIGUSR1"), records(text, "exit")
    assert [r["device"] for r in usr1] == [command, command] and final["device"] == command
    assert usr1[0]["counters"] == usr1[1]["counters"] and set(final["counters"]) == \
        set(usr1[0]["counters"])                           # one shape, signal or exit
    if command == "blk":
        assert usr1[0]["counters"]["writes"] == 0
        assert final["counters"]["writes"] == 1 and final["counters"]["reads"] >= 1
    # the counters line is one JSON object on a line of its own, device first
    line = next(ln for ln in text.splitlines() if '"event": "exit"' in ln)
    assert line.startswith(f'{{"device": "{command}", "event": "exit", "counters": {{')


def test_counters_line_at_exit_without_verbose(tmp_path: Path,
                                               procs: list[subprocess.Popen[bytes]]) -> None:
    sock = tmp_path / "vhost.sock"
    proc = start("blk", "--socket-path", str(sock), "--size", "1M")
    procs.append(proc)
    wait_for(sock, proc)
    rc, err = stop(proc)
    assert rc == 0
    (line,) = err.splitlines()            # without -v: the counters line and nothing else
    record = json.loads(line)
    assert record == {"device": "blk", "event": "exit", "counters": {
        "reads": 0, "writes": 0, "flushes": 0, "bytes_read": 0, "bytes_written": 0,
        "errors": 0, "unsupported": 0}}


def test_no_counters_line_when_start_fails(tmp_path: Path) -> None:
    r = run("blk", "--socket-path", str(tmp_path / "missing" / "s.sock"))
    check_one_line_error(r, "cannot listen")
    assert cli.parse_counters_lines(r.stderr) == []


def test_serving_line_says_size_mode_and_queues(tmp_path: Path, img: Path,
                                                procs: list[subprocess.Popen[bytes]]) -> None:
    sock, log = tmp_path / "vhost.sock", tmp_path / "stderr.txt"
    proc = start_logged(log, "blk", "--socket-path", str(sock), "--image", str(img),
                        "--read-only", "--num-queues", "2", "--queue-size", "128", "-v")
    procs.append(proc)
    text = wait_for_text(log, proc, lambda t: "serving" in t, "the serving line")
    assert re.search(rf"^{TIMESTAMP} vhostpy\[{proc.pid}\] INFO vhostpy: serving virtio-blk on "
                     rf"{re.escape(str(sock))}: 1 MiB \(2048 sectors\), read-only, 2 queue\(s\) "
                     r"of up to 128$", text, re.MULTILINE), text
    rc = term(proc)
    assert rc == 0
