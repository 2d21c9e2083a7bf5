"""The SDK end to end: the README's example device (examples/rng_device.py), written on the
public API only, serving a real QEMU guest's virtio-rng driver (vhost-user-rng-pci).

One boot, two devices, two back-end processes: the synchronous device served by
`vhostpy serve examples.rng_device:make_device`, and the `async def handle_chain` variant
served by the example run as a script, which calls `vhostpy.serve(...)`. The guest (busybox
initramfs, ``virtio_rng`` loaded by /init) makes each device in turn the current hardware RNG
and reads ``/dev/hwrng``; the checks are that the bytes arrived and are not constant, and
that each back-end counted the requests, exits 0 on SIGTERM and removes its socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qemu_guest
from procs import terminate
from tools import boots_once_per_suite, wait_until

from vhostpy.cli import parse_counters_lines

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
GUEST_TIMEOUT = 120
READ = 4 * 64   # bytes the guest reads

SCRIPT = r"""
echo "available=$(cat /sys/class/misc/hw_random/rng_available)"
for rng in virtio_rng.0 virtio_rng.1; do
    echo "$rng" > /sys/class/misc/hw_random/rng_current
    echo "current_$rng=$(cat /sys/class/misc/hw_random/rng_current)"
    echo "hex_$rng=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
done
"""

#: The two back-ends, given the socket path (cwd: the repository root, as in the README).
BACKENDS: dict[str, Callable[[str], list[str]]] = {
    "vhostpy-serve": lambda sock: [sys.executable, "-m", "vhostpy", "serve",
                                   "examples.rng_device:make_device", "--socket-path", sock,
                                   "-v"],
    "script-async": lambda sock: [sys.executable, "examples/rng_device.py", sock, "--async"],
}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def served(how: str, text: str) -> tuple[int, int]:
    """(requests, bytes) a back-end reported at exit."""
    if how == "vhostpy-serve":
        (final,) = parse_counters_lines(text)         # the exit counters line
        assert final["device"] == "example-rng" and final["event"] == "exit", text
        return final["counters"]["requests"], final["counters"]["bytes"]
    # the script's own line, printed once vhostpy.serve() returned
    line = next(ln for ln in text.splitlines() if ln.startswith("served "))
    requests, count = (int(word) for word in line.split()[1:4:2])
    return requests, count


@pytest.mark.qemu
def test_example_rng_devices_serve_a_guest(tmp_path: Path,
                                           procs: list[subprocess.Popen[bytes]]) -> None:
    boots_once_per_suite("devices written on the SDK (virtio-rng)")
    qemu_guest.require_qemu()
    socks = {how: tmp_path / f"{how}.sock" for how in BACKENDS}
    logs = {how: tmp_path / f"{how}.log" for how in BACKENDS}
    for how, command in BACKENDS.items():
        with open(logs[how], "wb") as out:
            procs.append(subprocess.Popen(command(str(socks[how])), cwd=ROOT, env=ENV,
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT))
    for proc, (how, sock) in zip(procs, socks.items(), strict=True):
        wait_until(lambda p=proc, s=sock: s.exists() or p.poll() is not None, 30,
                   f"the {how} back-end's socket")
        assert proc.poll() is None, logs[how].read_text()

    def backend_logs() -> str:
        return "".join(f"\n--- {how} ---\n{path.read_text()}" for how, path in logs.items())
    extra: list[str] = []
    for i, sock in enumerate(socks.values()):
        extra += ["-chardev", f"socket,id=rng{i},path={sock}",
                  "-device", f"vhost-user-rng-pci,chardev=rng{i}"]
    result = qemu_guest.boot_guest(SCRIPT, timeout=GUEST_TIMEOUT, extra_args=extra)
    assert result.exit_code == 0, result.raw_console + result.qemu_log + backend_logs()
    values = qemu_guest.console_values(result.console)
    for rng in ("virtio_rng.0", "virtio_rng.1"):
        assert rng in values["available"], result.console
        assert values[f"current_{rng}"] == rng, result.console
        data = bytes.fromhex(values[f"hex_{rng}"])
        assert len(data) == READ, result.console
        assert len(set(data)) > 64, data.hex()       # random, not a constant fill

    for proc, how in zip(procs, BACKENDS, strict=True):
        assert proc.poll() is None, backend_logs()   # they outlive the guest
        assert terminate(proc) == 0, backend_logs()
        text = logs[how].read_text()
        assert "Traceback" not in text, text
        assert not socks[how].exists()
        requests, count = served(how, text)
        # each device was the current RNG for one 256-byte read (the kernel may ask more)
        assert requests >= 4 and count >= READ, text
