"""The control socket (`vhostpy.control`, `--control PATH`, `vhostpy ctl`): the request
table's answers, the socket itself, and a `vhostpy blk --write-cache --log-writes --fault none
--control` process driven by the scripted front-end: status, faults added and cleared at run
time, a power cut that loses exactly the unflushed writes and fails I/O until the driver
re-initialises the device, marks in the write log, and one-line errors."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scripted import ScriptedGuest, blk_request
from tools import wait_until

from vhostpy.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vhostpy.cli import parse_counters_lines
from vhostpy.control import ControlError, Controls, ControlServer, request
from vhostpy.loop import EventLoop
from vhostpy.writelog import LogReader

SECTOR = 512


def test_the_table_answers_every_request_shape() -> None:
    controls = Controls()
    controls.add("echo", lambda args: args, "echo ARGS")
    controls.add("boom", lambda args: 1 / 0, "fails")
    controls.add("refuse", lambda args: (_ for _ in ()).throw(ControlError("not now")), "no")
    assert controls.handle({"command": "echo", "args": ["a", "b"]}) == \
        {"ok": True, "result": ["a", "b"]}
    assert controls.handle({"command": "help"})["result"]["echo"] == "echo ARGS"
    for message, error in (([1], "a JSON object"), ({}, '"command"'),
                           ({"command": "echo", "args": [1]}, "list of strings"),
                           ({"command": "nope"}, "unknown command 'nope'"),
                           ({"command": "refuse"}, "not now"),
                           ({"command": "boom"}, "internal error")):
        answer = controls.handle(message)
        assert answer["ok"] is False and error in answer["error"], (message, answer)
    with pytest.raises(ValueError, match="already registered"):
        controls.add("echo", lambda args: None, "again")


def test_the_socket_runs_handlers_on_the_loop_and_survives_bad_clients(
        tmp_path: Path, loop: EventLoop) -> None:
    import threading
    threads: list[str] = []
    controls = Controls()
    controls.add("where", lambda args: threads.append(threading.current_thread().name)
                 or len(threads), "which thread")
    path = str(tmp_path / "ctl.sock")
    server = ControlServer(path, controls)
    server.start(loop.call_soon_threadsafe)
    try:
        with socket.socket(socket.AF_UNIX) as sock:      # garbage, then a good request
            sock.connect(path)
            sock.sendall(b"not json\n{\"command\": \"where\"}\n")
            answers = sock.makefile().readline(), sock.makefile().readline()
        assert "not a JSON line" in json.loads(answers[0])["error"]
        with socket.socket(socket.AF_UNIX) as sock:      # a client that leaves mid-line
            sock.connect(path)
            sock.sendall(b'{"command": ')
        assert request(path, "where") == 2
        assert set(threads) == {loop_thread_name(loop)}
        with pytest.raises(ControlError, match="unknown command"):
            request(path, "nope")
    finally:
        server.close()
    assert not Path(path).exists()
    with pytest.raises(ControlError, match="No such file"):
        request(path, "where")


def test_a_connected_client_never_holds_up_another(tmp_path: Path, loop: EventLoop) -> None:
    from vhostpy import control
    controls = Controls()
    controls.add("ping", lambda args: "pong", "answers pong")
    path = str(tmp_path / "ctl.sock")
    server = ControlServer(path, controls)
    server.start(loop.call_soon_threadsafe)
    idle: list[socket.socket] = []
    try:
        for _ in range(control.MAX_CLIENTS - 1):     # monitoring tools, connected and silent
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            idle.append(sock)
        assert request(path, "ping") == "pong"         # served beside them

        def take_last_place() -> socket.socket | None:
            """Connect and be served: every place taken. The request above frees its place
            once the server has read its end (on the client's thread, in its own time):
            until then this one is refused, and tries again."""
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(b'{"command": "ping"}\n')
            sock.settimeout(5)
            answer = json.loads(sock.makefile().readline())
            if answer == {"ok": True, "result": "pong"}:
                return sock
            sock.close()
            assert "control clients are connected already" in answer["error"], answer
            return None

        # Served once, so it is surely accepted (and counted) before the extra one comes:
        # the accept thread takes connections in its own time.
        idle.append(wait_until(take_last_place, 10, "the last control place"))
        extra = socket.socket(socket.AF_UNIX)          # one more than MAX_CLIENTS
        extra.connect(path)
        extra.settimeout(5)
        answer = json.loads(extra.makefile().readline())
        extra.close()
        assert "control clients are connected already" in answer["error"]
        idle[0].sendall(b'{"command": "ping"}\n')     # an idle one is still served
        idle[0].settimeout(5)
        assert json.loads(idle[0].makefile().readline()) == {"ok": True, "result": "pong"}
    finally:
        server.close()                                 # also ends the clients' threads
        for sock in idle:
            sock.close()
    assert not Path(path).exists()


def loop_thread_name(loop: EventLoop) -> str:
    import threading
    names: list[str] = []
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (names.append(threading.current_thread().name),
                                       done.set()))
    assert done.wait(5)
    return names[0]


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostpy", "ctl", str(path), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def ctl_ok(path: Path, *args: str) -> Any:
    done = ctl(path, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ctl_error(path: Path, *args: str) -> str:
    done = ctl(path, *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done
    assert lines[0].startswith("vhostpy ctl: error: ")
    return lines[0]


def test_blk_power_cut_faults_and_status_through_ctl(tmp_path: Path, backend: Any) -> None:
    image, log, control = tmp_path / "disk.img", tmp_path / "writes.log", tmp_path / "ctl"
    image.write_bytes(bytes(1 << 20))
    b = backend("blk", "--image", str(image), "--write-cache", "--log-writes", str(log),
                "--fault", "none", "--control", str(control))
    guest = ScriptedGuest(b.path)

    def write(sector: int, fill: int) -> int:
        return blk_request(guest, VIRTIO_BLK_T_OUT, sector, data=bytes([fill]) * SECTOR)[0]
    try:
        guest.start()
        guest.setup_ring(0, 64)
        assert write(10, 0xA1) == VIRTIO_BLK_S_OK
        assert blk_request(guest, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        assert write(11, 0xB2) == VIRTIO_BLK_S_OK
        status = ctl_ok(control, "status")
        assert status["device"] == "blk"
        (endpoint,) = status["endpoints"]
        assert endpoint["connected"] and endpoint["socket"] == b.path
        session = endpoint["session"]
        assert "FLUSH" in session["features"]["acked_names"]
        assert session["rings"][0]["state"] == "enabled" and session["rings"][0]["size"] == 64
        assert status["counters"]["write_cache"]["cached_writes"] == 1
        assert status["counters"]["writes"] == 2

        assert ctl_ok(control, "fault", "add", "ioerr,op=write,sectors=20")["faults"][0][
            "spec"] == "ioerr,op=write,sectors=20-20"
        assert write(20, 0xC3) == VIRTIO_BLK_S_IOERR
        assert write(21, 0xC4) == VIRTIO_BLK_S_OK
        assert ctl_ok(control, "fault", "list")["errors"] == 1
        assert ctl_ok(control, "fault", "clear")["faults"] == []
        assert write(20, 0xC5) == VIRTIO_BLK_S_OK
        assert "unknown kind 'melt'" in ctl_error(control, "fault", "add", "melt")

        ctl_ok(control, "mark", "before-cut")
        cut = ctl_ok(control, "power-cut")
        assert cut == {"dropped_writes": 3, "dropped_bytes": 3 * SECTOR, "torn": None}
        disk = image.read_bytes()
        assert disk[10 * SECTOR:11 * SECTOR] == b"\xa1" * SECTOR        # flushed: kept
        assert disk[11 * SECTOR:22 * SECTOR] == bytes(11 * SECTOR)      # the rest: lost
        assert write(30, 0xD6) == VIRTIO_BLK_S_IOERR
        assert blk_request(guest, VIRTIO_BLK_T_IN, 10, read_len=SECTOR)[0] == VIRTIO_BLK_S_IOERR
        assert "already cut" in ctl_error(control, "power-cut")
        assert "unknown option 'soft'" in ctl_error(control, "power-cut", "soft")

        # The driver re-initialises the device (as after a reset): the power is back.
        guest.fe.get_vring_base(0)
        guest.fe.set_features(guest.fe.features)
        guest.setup_ring(0, 64)
        assert blk_request(guest, VIRTIO_BLK_T_IN, 10, read_len=SECTOR) == \
            (VIRTIO_BLK_S_OK, b"\xa1" * SECTOR)
        assert write(12, 0xE7) == VIRTIO_BLK_S_OK
        assert blk_request(guest, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        assert ctl_ok(control, "status")["counters"]["write_cache"]["cuts"] == 1
        assert "unknown command 'reboot'" in ctl_error(control, "reboot")
        assert "usage: status" in ctl_error(control, "status", "extra")
    finally:
        guest.close()
    assert b.stop() == 0
    assert not control.exists()
    assert image.read_bytes()[12 * SECTOR:13 * SECTOR] == b"\xe7" * SECTOR
    summary = LogReader(str(log)).summary()
    assert (summary["writes"], summary["flushes"], summary["cuts"]) == (5, 2, 1)
    assert summary["marks"] == [{"mark": "before-cut", "after_flush": 1}]
    (line,) = [r for r in parse_counters_lines(b.output()) if r["event"] == "exit"]
    assert line["counters"]["write_cache"]["dropped_writes"] == 3
    assert line["counters"]["write_log"]["flushes"] == 2


def test_what_a_device_cannot_do_is_explained(tmp_path: Path, backend: Any) -> None:
    control = tmp_path / "ctl"
    backend("blk", "--control", str(control))
    assert "--fault none" in ctl_error(control, "fault", "add", "ioerr")
    assert "--write-cache" in ctl_error(control, "power-cut")
    assert "--log-writes" in ctl_error(control, "mark", "x")
    status = ctl_ok(control, "status")
    assert status["endpoints"][0]["connected"] is False
    assert status["endpoints"][0]["session"] is None
    assert set(ctl_ok(control, "help")) >= {"status", "fault", "power-cut", "mark", "help"}


@pytest.mark.parametrize("command", ["rng", "net"])
def test_other_devices_answer_status(tmp_path: Path, backend: Any, command: str) -> None:
    control = tmp_path / "ctl"
    b = backend(command, "--control", str(control))
    deadline = time.monotonic() + 10
    while not control.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    status = ctl_ok(control, "status")
    assert status["device"] == command and status["endpoints"][0]["socket"] == b.path
    assert isinstance(status["counters"], dict)


def test_net_faults_through_ctl(tmp_path: Path, backend: Any) -> None:
    control = tmp_path / "ctl"
    backend("net", "--control", str(control), "--fault", "drop,p=0.5,seed=1")
    deadline = time.monotonic() + 10
    while not control.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    rules = ctl_ok(control, "fault", "add", "dup,p=0.1,dir=tx,filter=udp port 69")
    specs = [rule["spec"] for rule in rules["faults"]]
    assert len(specs) == 2 and specs[1].startswith("dup"), rules
    assert "drop" in ctl_ok(control, "fault", "list")["faults"][0]["spec"]
    assert ctl_ok(control, "fault", "clear")["faults"] == []
    assert "fault 'flood'" in ctl_error(control, "fault", "add", "flood")


def test_serve_answers_status(tmp_path: Path) -> None:
    control, sock = tmp_path / "ctl", tmp_path / "dev.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vhostpy", "serve",
                             "examples.rng_device:make_device", "--socket-path", str(sock),
                             "--control", str(control)], cwd=Path(__file__).parent.parent,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not control.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        status = ctl_ok(control, "status")
        assert status["endpoints"][0]["device"] == status["device"]
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_bad_control_paths_are_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    caplog.set_level(logging.WARNING)
    not_socket = tmp_path / "file"
    not_socket.write_text("x")
    for path, message in ((not_socket, "exists and is not a socket"),
                          (tmp_path / "missing" / "ctl", "No such file")):
        sock = tmp_path / "blk.sock"
        done = subprocess.run([sys.executable, "-m", "vhostpy", "blk", "--socket-path",
                               str(sock), "--control", str(path)], capture_output=True,
                              text=True, timeout=30, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and message in lines[0], done.stderr
        assert not sock.exists()
    assert "No such file" in ctl_error(tmp_path / "nobody", "status")


@pytest.mark.parametrize("args, message", [
    (("--write-cache-size", "1M"), "--write-cache-size is for --write-cache"),
    (("--write-cache", "--write-cache-size", "1K"), "must be at least 4K"),
    (("--log-writes", "/nonexistent/dir/w.log"), "--log-writes /nonexistent/dir/w.log"),
])
def test_bad_cache_and_log_options_are_one_line(tmp_path: Path, args: tuple[str, ...],
                                                message: str) -> None:
    sock = tmp_path / "blk.sock"
    done = subprocess.run([sys.executable, "-m", "vhostpy", "blk", "--socket-path", str(sock),
                           *args], capture_output=True, text=True, timeout=30, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and message in lines[0], done.stderr
    assert not sock.exists()
