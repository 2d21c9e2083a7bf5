"""The console's port 0 on stdin/stdout (pipes here) and on a UNIX socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from test_console import Rig

from vhostpy.console import ConsoleDevice
from vhostpy.console_io import UnixConsole, attach_stdio
from vhostpy.loop import EventLoop


def pump(loop: EventLoop, seconds: float = 0.1) -> None:
    """Run the loop for a moment (all I/O here is local and immediate)."""
    loop.call_later(seconds, loop.stop)
    loop.run()


def test_stdio_both_directions() -> None:
    loop = EventLoop()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        rig = Rig(ConsoleDevice(on_output=lambda b: None))
        attach_stdio(rig.dev, loop, input_fd=in_r, output_fd=out_w)
        rig.write([b"hello from the guest\n"])
        assert os.read(out_r, 100) == b"hello from the guest\n"
        posted = rig.post(64)
        os.write(in_w, b"typed on the host\n")
        pump(loop)
        assert rig.received(posted) == [b"typed on the host\n"]
        os.close(in_w)               # EOF on stdin: input stops, nothing breaks
        in_w = -1
        pump(loop)
        rig.write([b"still here"])
        assert os.read(out_r, 100) == b"still here"
    finally:
        loop.close()
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_unix_socket_console(tmp_path: Path) -> None:
    loop = EventLoop()
    path = str(tmp_path / "console.sock")
    rig = Rig(ConsoleDevice(on_output=lambda b: None))
    con = UnixConsole(rig.dev, loop, path)
    try:
        rig.write([b"early boot text\n"])          # nobody connected yet: kept
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.settimeout(2)
        pump(loop)
        assert client.recv(100) == b"early boot text\n"
        rig.write([b"login: "])
        assert client.recv(100) == b"login: "
        posted = rig.post(64)
        client.sendall(b"root\n")
        pump(loop)
        assert rig.received(posted) == [b"root\n"]

        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(path)
        second.settimeout(2)
        pump(loop)
        assert second.recv(10) == b""                # one client at a time
        second.close()

        client.close()
        pump(loop)
        assert con.client is None
        rig.write([b"after the client left\n"])
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        again.connect(path)
        again.settimeout(2)
        pump(loop)
        assert again.recv(100) == b"after the client left\n"
        again.close()
    finally:
        con.close()
        loop.close()
    assert not os.path.exists(path)
