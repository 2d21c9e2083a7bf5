"""Shared fixtures: `vhostpy` back-end processes started exactly as users start them, and a
real event loop on a thread of its own (`loop`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopthread import loop_thread
from procs import terminate
from tools import unavailable

from vhostpy.loop import EventLoop

sys.path.insert(0, str(Path(__file__).parent))


class Backend:
    """A `python -m vhostpy ...` process listening on `path`."""

    def __init__(self, args: list[str], path: str, log_path: Path) -> None:
        self.path = path
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([sys.executable, "-m", "vhostpy", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"back-end exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"back-end never listened on {path}:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        """Everything the process logged so far (also after `stop()`)."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        terminate(self.proc)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    """A real EventLoop running on a thread of its own (see loopthread.py)."""
    yield from loop_thread()


@pytest.fixture
def scapy_installed() -> None:
    """scapy is a test dependency (the `test` extra): missing, it fails under CI."""
    if importlib.util.find_spec("scapy") is None:
        unavailable("scapy not installed (pip install 'vhostpy[scapy]')")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator:
    """Factory: backend("blk", "--image", X) starts `vhostpy blk --socket-path ... X`."""
    started: list[Backend] = []

    def start(command: str, *args: str, name: str = "vhost.sock") -> Backend:
        path = str(tmp_path / name)
        b = Backend([command, "--socket-path", path, "-v", *args], path,
                    tmp_path / f"{name}.log")
        started.append(b)
        return b

    yield start
    for b in started:
        rc = b.stop()
        assert rc == 0, f"back-end exited with {rc}:\n{b.output()}"
        assert not os.path.exists(b.path), "back-end left its socket behind"
