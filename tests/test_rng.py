"""virtio-rng (`RngDevice`) through a real `Virtqueue` and a driver-side `RingBuilder`, then
`vhostpy rng` as a process driven by a scripted vhost-user front-end.

The device-level tests play the transport: they publish chains, call `process_queue` and
read the used ring and guest memory back. A deterministic source makes every filled byte
checkable; the default source is checked for what can be checked of randomness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout

from vhostpy.device import RING_FEATURES, VIRTIO_ID_RNG
from vhostpy.errors import ConfigurationError
from vhostpy.rng import DEFAULT_MAX_BYTES_PER_REQUEST, RngDevice
from vhostpy.vring import DefaultVirtqueue

ROOT = Path(__file__).resolve().parent.parent
RING = 128


class Counting:
    """A deterministic source: byte i of the whole stream is i % 251; records each call."""

    def __init__(self) -> None:
        self.pos = 0
        self.calls: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        out = bytes((self.pos + i) % 251 for i in range(n))
        self.pos += n
        return out

    @staticmethod
    def stream(start: int, n: int) -> bytes:
        return bytes((start + i) % 251 for i in range(n))


class Rig:
    """An RngDevice on one ring in anonymous guest memory."""

    def __init__(self, dev: RngDevice, *, event_idx: bool = False) -> None:
        self.dev = dev
        self.mem, self._buf = anon_memory(1 << 22)
        self.rb = RingBuilder(self.mem, RING, layout(RING, data_size=3 << 20))
        self.vq = self.rb.attach(DefaultVirtqueue(self.mem, 0))
        self.vq.event_idx = event_idx
        self.calls = 0
        CallRunner(self.vq, self._call)
        dev.set_features(dev.features())
        dev.queue_started(0, self.vq)

    def _call(self) -> None:
        self.calls += 1

    def submit(self, writable: list[int], readable: Sequence[bytes] = (), *,
               indirect: bool = False) -> tuple[int, list[bytes]]:
        """One chain; returns (used length, the writable buffers' contents afterwards)."""
        head, addrs = self.rb.add_chain(list(readable), writable, indirect=indirect)
        self.dev.process_queue(0, self.vq)
        used = self.rb.get_used()
        assert used and used[0][0] == head and len(used) == 1, used
        assert self.vq.error is None
        bufs = addrs[len(readable):]
        return used[0][1], [self.mem.read(a, n) for a, n in zip(bufs, writable)]


def test_identity() -> None:
    dev = RngDevice()
    assert dev.device_id == VIRTIO_ID_RNG == 4
    assert dev.num_queues == 1
    assert dev.config() == b""                       # no config space
    assert dev.features() == RING_FEATURES           # no device feature bits
    assert dev.max_bytes_per_request == DEFAULT_MAX_BYTES_PER_REQUEST == 64 * 1024


def test_fills_every_writable_buffer_with_source_bytes() -> None:
    src = Counting()
    rig = Rig(RngDevice(source=src))
    used, bufs = rig.submit([16, 100, 7])
    assert used == 123
    assert b"".join(bufs) == Counting.stream(0, 123)
    assert src.calls == [123]                         # one source call per request
    used, bufs = rig.submit([64], indirect=True)
    assert used == 64 and bufs[0] == Counting.stream(123, 64)
    assert rig.dev.stats.requests == 2
    assert rig.dev.stats.bytes == 187


def test_default_source_is_urandom_and_looks_random() -> None:
    rig = Rig(RngDevice())
    assert rig.dev.source is os.urandom
    used1, (a,) = rig.submit([4096])
    used2, (b,) = rig.submit([4096])
    assert used1 == used2 == 4096
    assert a != b
    assert len(set(a)) > 200                           # 4 KiB of urandom covers most values
    assert a.count(0) < 100


def test_limit_fills_long_buffers_partially() -> None:
    src = Counting()
    rig = Rig(RngDevice(source=src, max_bytes_per_request=100))
    used, bufs = rig.submit([60, 60, 60])
    assert used == 100
    assert bufs[0] == Counting.stream(0, 60)
    assert bufs[1] == Counting.stream(60, 40) + bytes(20)   # the rest is untouched
    assert bufs[2] == bytes(60)
    assert src.calls == [100]
    assert rig.dev.stats.truncated == 1
    used, bufs = rig.submit([100])                    # exactly the limit is not truncated
    assert used == 100 and rig.dev.stats.truncated == 1
    assert rig.dev.stats.bytes == 200


def test_default_limit_caps_a_huge_buffer() -> None:
    rig = Rig(RngDevice())
    used, (buf,) = rig.submit([1 << 20])
    assert used == DEFAULT_MAX_BYTES_PER_REQUEST
    assert buf[DEFAULT_MAX_BYTES_PER_REQUEST:] == bytes((1 << 20) - DEFAULT_MAX_BYTES_PER_REQUEST)


def test_readonly_and_empty_chains_return_zero_and_count() -> None:
    src = Counting()
    rig = Rig(RngDevice(source=src))
    used, _ = rig.submit([], [b"not for an rng"])
    assert used == 0
    used, bufs = rig.submit([0])                      # a zero-length writable descriptor
    assert used == 0
    assert src.calls == []
    assert rig.dev.stats.empty == 2 and rig.dev.stats.requests == 2
    assert rig.dev.stats.bytes == 0
    # Readable bytes before writable ones are ignored; the writable part is still filled.
    used, bufs = rig.submit([32], [b"x" * 8])
    assert used == 32 and bufs[0] == Counting.stream(0, 32)
    assert rig.dev.stats.empty == 2 and rig.dev.stats.requests == 3


def test_short_source_reports_what_was_written() -> None:
    rig = Rig(RngDevice(source=lambda n: b"\xab" * (n // 2)))
    used, (buf,) = rig.submit([64])
    assert used == 32 and buf == b"\xab" * 32 + bytes(32)
    long_rig = Rig(RngDevice(source=lambda n: b"\xcd" * (n + 50)))  # too long: cut at n
    used, (buf,) = long_rig.submit([64])
    assert used == 64 and buf == b"\xcd" * 64


@pytest.mark.parametrize("source", [
    pytest.param(lambda n: (_ for _ in ()).throw(OSError(5, "EIO")), id="raises"),
    pytest.param(lambda n: "text", id="not-bytes"),
    pytest.param(lambda n: None, id="none"),
])
def test_failing_source_never_loses_a_chain(source, caplog) -> None:
    rig = Rig(RngDevice(source=source))
    used, (buf,) = rig.submit([64])
    assert used == 0 and buf == bytes(64)
    assert rig.dev.stats.source_errors == 1 and rig.dev.stats.requests == 1
    assert rig.vq.error is None
    assert "random source failed" in caplog.text


def test_many_chains_in_batches_counters_and_one_call_per_batch() -> None:
    src = Counting()
    rig = Rig(RngDevice(source=src, max_bytes_per_request=48))
    sizes = [1 + (i * 37) % 90 for i in range(100)]   # > BATCH (64) chains at once
    chains = [rig.rb.add_chain([], [n], indirect=bool(i % 3 == 0)) for i, n in enumerate(sizes)]
    rig.dev.process_queue(0, rig.vq)
    used = rig.rb.get_used()
    assert [h for h, _ in used] == [h for h, _ in chains]
    want = [min(n, 48) for n in sizes]
    assert [n for _, n in used] == want
    pos = 0
    for (_, (addr,)), n in zip(chains, want):
        assert rig.mem.read(addr, n) == Counting.stream(pos, n)
        pos += n
    assert rig.dev.stats.requests == 100
    assert rig.dev.stats.bytes == sum(want)
    assert rig.dev.stats.truncated == sum(1 for n in sizes if n > 48)
    assert rig.calls == 2                             # one interrupt per batch of 64
    assert rig.dev.counters()["requests"] == 100


def test_event_idx_ring_and_wraparound() -> None:
    src = Counting()
    rig = Rig(RngDevice(source=src), event_idx=True)
    total = 0
    for _ in range(3 * RING + 5):                      # the 16-bit indices wrap the ring
        used, (buf,) = rig.submit([8])
        assert used == 8 and buf == Counting.stream(total, 8)
        total += 8
    assert rig.dev.stats.requests == 3 * RING + 5


def test_reset_keeps_the_source_and_serves_again() -> None:
    src = Counting()
    dev = RngDevice(source=src)
    rig = Rig(dev)
    rig.submit([10])
    dev.queue_stopped(0, rig.vq)
    dev.reset()
    assert dev.acked_features == 0
    rig2 = Rig(dev)
    used, (buf,) = rig2.submit([10])
    assert used == 10 and buf == Counting.stream(10, 10)


@pytest.mark.parametrize("kwargs", [
    {"max_bytes_per_request": 0},
    {"max_bytes_per_request": -1},
    {"max_bytes_per_request": (1 << 30) + 1},
    {"queue_size": 0},
    {"queue_size": 100},
    {"queue_size": 65536},
])
def test_bad_configuration(kwargs) -> None:
    with pytest.raises(ConfigurationError):
        RngDevice(**kwargs)


# --------------------------------------------------------------------------------------------
# the command line and a scripted front-end


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostpy", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                          check=False)


def test_cli_print_capabilities() -> None:
    r = _run("rng", "--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"type": "rng"}


@pytest.mark.parametrize("args, needle", [
    ([], "one of --socket-path or --fd is required"),
    (["--max-bytes-per-request", "0"], "--max-bytes-per-request must be 1"),
    (["--max-bytes-per-request", "lots"], "invalid size"),
    (["--fd", "3"], "not allowed with"),
])
def test_cli_errors_are_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    r = _run("rng", *(["--socket-path", str(sock)] if args else []), *args)
    assert not sock.exists()                           # nothing was left listening
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr


def test_backend_process_serves_a_scripted_guest(backend) -> None:
    from scripted import ScriptedGuest

    from vhostpy import protocol as p

    be = backend("rng", "--max-bytes-per-request", "1K")
    guest = ScriptedGuest(be.path)
    try:
        guest.start()
        assert guest.fe.features & RING_FEATURES == RING_FEATURES
        if p.ProtocolFeature.MQ in guest.fe.protocol_features:
            assert guest.fe.get_queue_num() == 1
        ring = guest.setup_ring(0, size=8)
        heads = [ring.builder.add_chain([], [n])[0] for n in (16, 4096, 1)]
        guest.kick(0)
        used = guest.wait_used(0, 3)
        assert [h for h, _ in used] == heads
        assert [n for _, n in used] == [16, 1024, 1]
        # Reuse the descriptors many times over: the ring wraps several times.
        seen = set()
        for round_ in range(40):
            head, (addr,) = ring.builder.add_chain([], [32])
            guest.kick(0)
            ((h, n),) = guest.wait_used(0, 1)
            assert (h, n) == (head, 32), round_
            seen.add(guest.memory.read(addr, 32))
        assert len(seen) == 40                           # no two 32-byte draws alike
    finally:
        guest.close()
    assert be.alive(), be.output()


def test_cli_help_lists_rng() -> None:
    r = _run("--help")
    assert r.returncode == 0 and "rng" in r.stdout
    r = _run("rng", "--help")
    assert r.returncode == 0 and "--max-bytes-per-request" in r.stdout
