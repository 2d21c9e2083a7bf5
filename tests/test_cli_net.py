"""`vhostpy net` run as users run it (`python -m vhostpy net`): capabilities, one-line errors
with exit status 1 and nothing left listening, several ports, SIGTERM with a counters line,
and `--reflect` serving a scripted guest.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import stop
from scripted import ScriptedGuest

from vhostpy.cli import parse_counters_lines

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
PROG = [sys.executable, "-m", "vhostpy", "net"]
HDR_MRG = struct.Struct("<BBHHHHH")


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROG, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def start() -> Iterator:
    """start(*args) -> a running `vhostpy net` process; killed if the test left it running."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*PROG, *args], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(paths: list[Path], proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{paths} never all appeared"
        time.sleep(0.01)


def counters_line(stderr: str) -> dict:
    """The counters of the one exit line (`{"device": "net", "event": "exit", ...}`)."""
    records = [r for r in parse_counters_lines(stderr) if r["event"] == "exit"]
    assert len(records) == 1, stderr
    assert records[0]["device"] == "net"
    counters: dict = records[0]["counters"]
    return counters


# ------------------------------------------------------------------------------------------


def test_print_capabilities() -> None:
    r = run("--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert r.stdout == '{"type": "net"}\n'
    assert r.stderr == ""


#: name -> (arguments, what the one error line must mention)
BAD = {
    "respond": (["--respond", "1.2.3"], "1.2.3"),
    "num-queues": (["--num-queues", "0"], "--num-queues"),
    "num-queues-too-many": (["--num-queues", "65"], "--num-queues"),
    "queue-size": (["--queue-size", "x"], "--queue-size"),
    "queue-size-3": (["--queue-size", "3"], "a power of two in 1..32768, not 3"),
    "queue-size-65536": (["--queue-size", "65536"], "a power of two in 1..32768, not 65536"),
    "queue-size-0": (["--queue-size", "0"], "--queue-size"),
    "queue-size-negative": (["--queue-size", "-8"], "must be positive"),
    "bogus-option": (["--bogus"], "unrecognized arguments: --bogus"),
    "pcap": (["--pcap", "/nonexistent-dir/x.pcap"], "/nonexistent-dir/x.pcap"),
    "tap": (["--tap", "a" * 20], "invalid interface name"),
}


@pytest.mark.parametrize(("args", "mention"), list(BAD.values()), ids=list(BAD))
def test_bad_value_one_line_exit_1(tmp_path: Path, args: list[str], mention: str) -> None:
    sock = tmp_path / "net.sock"
    r = run("--socket-path", str(sock), *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhostpy net: error:"), r.stderr
    assert mention in r.stderr, r.stderr
    assert r.stdout == ""
    assert os.listdir(tmp_path) == [], "something was created"


def test_reflect_with_two_sockets(tmp_path: Path) -> None:
    r = run("--socket-path", str(tmp_path / "a.sock"), "--socket-path",
            str(tmp_path / "b.sock"), "--reflect")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "--reflect" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_neither_socket_nor_fd(tmp_path: Path) -> None:
    r = run("--respond", "10.0.0.1")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "--socket-path" in r.stderr, r.stderr


def test_socket_and_fd_exclusive(tmp_path: Path) -> None:
    r = run("--socket-path", str(tmp_path / "a.sock"), "--fd", "3")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert os.listdir(tmp_path) == []


def test_second_socket_in_use_first_cleaned_up(tmp_path: Path) -> None:
    busy = tmp_path / "b.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.bind(str(busy))
        holder.listen(1)
        r = run("--socket-path", str(tmp_path / "a.sock"), "--socket-path", str(busy))
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "in use" in r.stderr, r.stderr
        assert sorted(os.listdir(tmp_path)) == ["b.sock"], "the first socket was left behind"
    finally:
        holder.close()


def test_several_sockets_sigterm(tmp_path: Path, start) -> None:
    paths = [tmp_path / f"port{i}.sock" for i in range(3)]
    proc = start(*[a for p in paths for a in ("--socket-path", str(p))], "--num-queues", "2")
    wait_for(paths, proc)
    # Each socket is a working vhost-user back-end of its own (two queue pairs each).
    for path in paths:
        guest = ScriptedGuest(str(path))
        try:
            guest.start()
            assert guest.fe.get_queue_num() == 4
        finally:
            guest.close()
    rc, err = stop(proc)
    assert rc == 0, err
    assert not any(p.exists() for p in paths)
    assert os.listdir(tmp_path) == []
    counters = counters_line(err)
    assert [p["port"] for p in counters["ports"]] == ["port0", "port1", "port2"]
    assert set(counters["ports"][0]["queues"]) == {"rx0", "rx1", "tx0", "tx1"}
    assert "switch" in counters and "responder" in counters


def scripted_net_guest(path: str, buffers: int) -> tuple[ScriptedGuest, Any, dict[int, int]]:
    """A scripted driver on a `vhostpy net` socket: receive ring 0 given `buffers` 2048-byte
    buffers (and kicked), transmit ring 1 set up. Returns (guest, the transmit ring's
    builder, receive buffer address by head); the caller closes the guest."""
    guest = ScriptedGuest(path)
    try:
        guest.start()
        rx = guest.setup_ring(0).builder
        tx = guest.setup_ring(1).builder
        bufs = {}
        for _ in range(buffers):
            head, addrs = rx.add_chain(writable=[2048])
            bufs[head] = addrs[0]
        guest.kick(0)
    except BaseException:
        guest.close()
        raise
    return guest, tx, bufs


def test_reflect(backend) -> None:
    b = backend("net", "--reflect")   # the conftest fixture: -v, waits for the socket
    path = Path(b.path)
    guest, tx, bufs = scripted_net_guest(str(path), 4)
    try:
        dst, src = bytes.fromhex("0200000000aa"), bytes.fromhex("0200000000bb")
        frame = dst + src + b"\x88\xb5" + bytes(range(200))
        tx.add_chain([HDR_MRG.pack(0, 0, 0, 0, 0, 0, 0), frame])
        guest.kick(1)
        assert [n for _, n in guest.wait_used(1)] == [0]
        (head, n), = guest.wait_used(0)
        data = guest.memory.read(bufs[head], n)
        assert HDR_MRG.unpack_from(data) == (0, 0, 0, 0, 0, 0, 1)
        assert data[HDR_MRG.size:] == src + dst + frame[12:]
    finally:
        guest.close()
    rc = b.stop()
    out = b.log_path.read_text(errors="replace")
    assert rc == 0, out
    assert not path.exists()
    port = counters_line(out)["ports"][0]
    assert port["from_guest"]["frames"] == 1 and port["to_guest"]["frames"] == 1


@pytest.mark.parametrize("spelling", ["same", "relative", "dotted"])
def test_socket_path_given_twice(tmp_path: Path, spelling: str) -> None:
    first = tmp_path / "a.sock"
    second = {"same": str(first), "relative": os.path.relpath(first, ROOT),
              "dotted": str(tmp_path / "." / "a.sock")}[spelling]
    r = run("--socket-path", str(first), "--socket-path", second)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhostpy net: error:"), r.stderr
    assert "given twice" in r.stderr and "in use" not in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_queue_size_limits_are_accepted(tmp_path: Path, start) -> None:
    """1 and 32768 are legal ring sizes: the back-end starts and takes them from a front-end."""
    for size in (1, 32768):
        sock = tmp_path / f"q{size}.sock"
        proc = start("--socket-path", str(sock), "--queue-size", str(size))
        wait_for([sock], proc)
        guest = ScriptedGuest(str(sock))
        try:
            guest.start()
            guest.fe.set_vring_num(0, size)
        finally:
            guest.close()
        rc, err = stop(proc)
        assert rc == 0, err


def test_sigusr1_and_sighup_keep_serving(tmp_path: Path) -> None:
    sock, log = tmp_path / "net.sock", tmp_path / "stderr.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*PROG, "--socket-path", str(sock), "-v", "--num-queues", "2"],
                                cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_for([sock], proc)

        def until(predicate, what: str) -> str:
            deadline = time.monotonic() + 15
            while not predicate(text := log.read_text(errors="replace")):
                assert proc.poll() is None, f"exited before {what}:\n{text}"
                assert time.monotonic() < deadline, f"never {what}:\n{text}"
                time.sleep(0.01)
            return text

        text = until(lambda t: "serving virtio-net" in t, "the serving line")
        assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} vhostpy\[\d+\] INFO vhostpy: "
                         rf"serving virtio-net on {re.escape(str(sock))}: 1 port\(s\), 2 queue "
                         r"pair\(s\) per port, rings of up to 1024$", text, re.MULTILINE), text
        proc.send_signal(signal.SIGUSR1)
        until(lambda t: any(r["event"] == "SIGUSR1" for r in parse_counters_lines(t)),
              "the SIGUSR1 counters line")
        proc.send_signal(signal.SIGHUP)
        until(lambda t: "SIGHUP" in t, "the SIGHUP log line")
        guest = ScriptedGuest(str(sock))            # still serving
        try:
            guest.start()
            assert guest.fe.get_queue_num() == 4
        finally:
            guest.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert not sock.exists() and "Traceback" not in text
    (usr1,) = [r for r in parse_counters_lines(text) if r["event"] == "SIGUSR1"]
    assert usr1["device"] == "net"
    assert set(usr1["counters"]) == set(counters_line(text))   # one shape, signal or exit
