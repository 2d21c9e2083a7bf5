"""The net SDK end to end: the README's example network service (examples/net_service.py),
written on the public API only, serving a real QEMU guest's virtio-net driver.

One TCG boot. The back-end is the command a user types,
`vhostpy serve examples.net_service:make_device`. The guest (busybox initramfs) brings eth0
up, pings the service (ARP and ICMP, answered at once by a handler that returns its
replies), then fetches a file with busybox ``tftp`` (UDP port 69: the example's
``async def`` handler awaits the file and its returned answer reaches the guest later) and
asks for a file that does not exist (an error answer, also late). The back-end counts both,
no handler failed, and it exits 0 on SIGTERM and removes its socket.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qemu_guest
from netguest import configure, ping_stats
from procs import terminate
from tools import wait_until

from vhostpy.cli import parse_counters_lines

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
GUEST_TIMEOUT = 120


def guest_script(service_ip: str) -> str:
    return configure() + f"""
ping -c 2 {service_ip}
tftp -g -r motd -l /tmp/motd {service_ip} 2>/tmp/tftp.err
echo "motd_rc=$?"
echo "motd_hex=$(od -An -v -tx1 /tmp/motd | tr -d ' \\n')"
tftp -g -r no-such-file -l /tmp/missing {service_ip} 2>/tmp/tftp.err
echo "missing_rc=$?"
echo "missing_err=$(cat /tmp/tftp.err)"
"""


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    sock, log = tmp_path / "net.sock", tmp_path / "backend.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostpy", "serve",
                                 "examples.net_service:make_device", "--socket-path", str(sock),
                                 "-v"], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, sock, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.qemu
def test_example_net_service_answers_a_guest(
        backend: tuple[subprocess.Popen[bytes], Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    qemu_guest.require_qemu()
    monkeypatch.syspath_prepend(str(ROOT))
    example = importlib.import_module("examples.net_service")
    proc, sock, log = backend
    wait_until(lambda: sock.exists() or proc.poll() is not None, 30, "the back-end's socket")
    assert proc.poll() is None, log.read_text()

    result = qemu_guest.boot_guest(guest_script(example.SERVICE_IP), timeout=GUEST_TIMEOUT, net_sockets=[str(sock)])
    assert result.exit_code == 0, result.raw_console + result.qemu_log + log.read_text()
    assert ping_stats(result.console) == [(2, 2)], result.console
    values = qemu_guest.console_values(result.console)
    assert values["motd_rc"] == "0", result.console + log.read_text()
    assert bytes.fromhex(values["motd_hex"]) == example.FILES["motd"], result.console
    assert values["missing_rc"] != "0", result.console
    assert "File not found" in values["missing_err"], result.console

    assert proc.poll() is None, log.read_text()       # it outlives the guest
    assert terminate(proc) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert not sock.exists()
    (final,) = parse_counters_lines(text)
    assert (final["device"], final["event"]) == ("example-net-service", "exit"), text
    counters = final["counters"]
    # tftp may retransmit a request whose answer is late: each copy is answered
    assert counters["files_sent"] >= 1 and counters["not_found"] >= 1, counters
    port = counters["port"]
    assert port["handler_errors"] == 0 and port["handler_drops"] == 0, port
    assert port["handlers_pending"] == 0, port
