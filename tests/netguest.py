"""Helpers for the virtio-net QEMU tests: guest shell snippets, ping output, frame logs, netns.

Nothing here starts QEMU or a back-end; ``tests/test_qemu_net.py`` does. The shell snippets
run under the guest's busybox ``sh`` (see ``ci/qemu/README.md``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

GUEST_IP = "10.0.2.15"
RESPONDER_IP = "10.0.2.2"

#: Guest shell functions: the guest's ICMP OutEchoReps counter (echo replies it sent), and
#: ``wait_echo_replies N SECONDS`` which returns once it reached N or fails the script.
GUEST_FUNCTIONS = r"""
out_echo_reps() {
    awk '/^Icmp:/ { if (!c) { for (i = 2; i <= NF; i++) if ($i == "OutEchoReps") c = i }
                    else { print $c; exit } }' /proc/net/snmp
}
wait_echo_replies() {
    n=0
    until [ "$(out_echo_reps)" -ge "$1" ]; do
        sleep 0.2; n=$((n + 1))
        if [ $n -ge $(($2 * 5)) ]; then echo "TIMEOUT waiting for $1 echo replies"; exit 3; fi
    done
}
"""

_PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def configure(ip: str = GUEST_IP, *, ifname: str = "eth0", mtu: int | None = None) -> str:
    """Shell lines that bring ``ifname`` up with ``ip``/24 (and ``mtu``)."""
    lines = [f"ip link set {ifname} mtu {mtu}"] if mtu is not None else []
    lines += [f"ip link set {ifname} up", f"ip addr add {ip}/24 dev {ifname}"]
    return "\n".join(lines) + "\n"


def ping_stats(output: str) -> list[tuple[int, int]]:
    """(transmitted, received) of every ping summary in ``output`` (busybox or iputils)."""
    return [(int(t), int(r)) for t, r in _PING_STATS.findall(output)]


class FrameLog:
    """A port handler that keeps every frame it is given (from the loop thread), for waiting.

    Register with ``port.add_handler(log, scapy=True)``; ``wait_for(pred)`` blocks until
    frames matching ``pred`` arrived and returns them.
    """

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, port: object, frames: list[Any]) -> None:
        with self._cond:
            self.frames.extend(frames)
            self._cond.notify_all()

    def matching(self, predicate: Callable[[Any], bool]) -> list[Any]:
        with self._cond:
            return [f for f in self.frames if predicate(f)]

    def wait_for(self, predicate: Callable[[Any], bool], count: int = 1,
                 timeout: float = 20.0, what: str = "frames") -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [f for f in self.frames if predicate(f)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"saw {len(found)} of {count} {what} in {timeout} s "
                                       f"({len(self.frames)} frames in all)")
                self._cond.wait(left)


def host_ping() -> list[str]:
    """argv prefix of a ping for the host: iputils ``ping``, else busybox's (the guest's)."""
    if shutil.which("ping"):
        return ["ping"]
    from qemu_guest import _initramfs

    return [str(_initramfs.find_busybox()), "ping"]


def netns_available() -> str | None:
    """None when this process may create network namespaces, else the reason it may not."""
    name = f"vhpy-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


@contextmanager
def network_namespace() -> Iterator[str]:
    """A fresh ``vhpy-XXXXXX`` network namespace, deleted on exit (also after failures)."""
    name = f"vhpy-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def in_netns(ns: str, *argv: str, timeout: float = 30.0,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside network namespace ``ns``."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=check, env=os.environ.copy())
