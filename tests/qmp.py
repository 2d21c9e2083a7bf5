"""A minimal QMP client for guest tests (QEMU's JSON monitor on a UNIX socket): enough to
migrate a guest and watch the migration."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the monitor went away."""


class QMP:
    """One connection to ``-qmp unix:PATH,server=on,wait=off``; capabilities negotiated."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._read()                          # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QMPError("the QMP monitor closed the connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command` and return its "return" value (QMPError on an "error")."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QMPError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def migrate(self, uri: str, timeout: float = 120.0) -> dict[str, Any]:
        """Migrate to `uri` and wait until it completed; returns the final query-migrate
        (QMPError if it failed or took longer than `timeout`)."""
        self.execute("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {info.get('error-desc', info)}")
            time.sleep(0.1)
        raise QMPError(f"migration not completed within {timeout} s")

    def close(self) -> None:
        self.sock.close()
