"""virtio-console (`ConsoleDevice`, one port) through real `Virtqueue`s and `RingBuilder`s.

The test plays the transport: receiveq (0) and transmitq (1) live in one anonymous guest
memory. Guest output must reach the sink byte for byte and in order; host input must land in
receive buffers in order, wait when there are none, and be dropped (and counted) beyond the
input limit, without ever blocking. `FdOutput` is checked on real pipes.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
from collections.abc import Iterator, Sequence

import pytest
from ringbuilder import CallRunner, RingBuilder, anon_memory, layout

from vhostpy import console
from vhostpy.console import ConsoleDevice, FdOutput
from vhostpy.device import RING_FEATURES, VIRTIO_ID_CONSOLE
from vhostpy.errors import ConfigurationError
from vhostpy.vring import DefaultVirtqueue

RING = 64
RX, TX = 0, 1
# Spec numbers written out (virtio 1.2, 5.3).
F_SIZE, F_MULTIPORT, F_EMERG_WRITE = 0, 1, 2


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


class Rig:
    """A ConsoleDevice with its receiveq and transmitq; the sink records every call."""

    def __init__(self, dev: ConsoleDevice | None = None, *, start: Sequence[int] = (RX, TX),
                 **kwargs: object) -> None:
        self.out: list[bytes] = []
        self.dev = dev if dev is not None else ConsoleDevice(on_output=self.out.append,
                                                              **kwargs)  # type: ignore[arg-type]
        self.mem, self._buf = anon_memory(1 << 22)
        self.rb = {q: RingBuilder(self.mem, RING, layout(RING, base=q << 21, data_size=1 << 20))
                   for q in (RX, TX)}
        self.vq = {q: self.rb[q].attach(DefaultVirtqueue(self.mem, q)) for q in (RX, TX)}
        self.calls = {RX: 0, TX: 0}
        for q in (RX, TX):
            CallRunner(self.vq[q], lambda q=q: self._call(q))
        self.dev.set_features(self.dev.features())
        for q in start:
            self.dev.queue_started(q, self.vq[q])

    def _call(self, q: int) -> None:
        self.calls[q] += 1

    @property
    def output(self) -> bytes:
        return b"".join(self.out)

    def write(self, *chains: Sequence[bytes], indirect: bool = False) -> list[tuple[int, int]]:
        """The guest transmits: each chain is a list of readable buffers; returns used."""
        heads = [self.rb[TX].add_chain(list(c), indirect=indirect)[0] for c in chains]
        self.dev.process_queue(TX, self.vq[TX])
        used = self.rb[TX].get_used()
        assert [h for h, _ in used] == heads
        assert self.vq[TX].error is None
        return used

    def post(self, *sizes: int, kick: bool = True) -> list[tuple[int, int]]:
        """The guest posts receive buffers; returns [(head, address)]."""
        out = []
        for n in sizes:
            head, (addr,) = self.rb[RX].add_chain([], [n])
            out.append((head, addr))
        if kick:
            self.dev.process_queue(RX, self.vq[RX])
        return out

    def received(self, posted: list[tuple[int, int]]) -> list[bytes]:
        """Used entries of the receiveq so far, as the bytes each buffer got (in used order)."""
        where = dict(posted)
        return [self.mem.read(where[h], n) for h, n in self.rb[RX].get_used()]


# --------------------------------------------------------------------------------------------
# identity and config space


def test_identity_features_and_config() -> None:
    dev = ConsoleDevice(on_output=lambda b: None)
    assert dev.device_id == VIRTIO_ID_CONSOLE == 3
    assert dev.num_queues == 2
    assert dev.features() == RING_FEATURES | 1 << F_EMERG_WRITE
    assert not dev.features() >> F_MULTIPORT & 1
    assert dev.config() == struct.pack("<HHII", 0, 0, 1, 0)
    sized = ConsoleDevice(on_output=lambda b: None, size=(132, 43), emerg_write=False)
    assert sized.features() == RING_FEATURES | 1 << F_SIZE
    assert sized.config() == struct.pack("<HHII", 132, 43, 1, 0)
    assert len(sized.config()) == 12


def test_emergency_write_reaches_the_sink_even_before_negotiation() -> None:
    out: list[bytes] = []
    dev = ConsoleDevice(on_output=out.append)
    for ch in b"hi\n":
        dev.write_config(8, struct.pack("<I", ch))
    dev.write_config(8, b"!")                       # a one-byte write of the low byte
    assert out == [b"h", b"i", b"\n", b"!"]
    assert dev.stats.emerg_bytes == 4
    assert dev.config()[8:] == bytes(4)              # emerg_wr always reads as 0
    for offset, payload in ((0, b"\x50\x00"), (4, b"\1\0\0\0"), (6, b"\0" * 4), (8, b"\0" * 5)):
        with pytest.raises(PermissionError):
            dev.write_config(offset, payload)
    assert out == [b"h", b"i", b"\n", b"!"]
    silent = ConsoleDevice(on_output=out.append, emerg_write=False)
    with pytest.raises(PermissionError):
        silent.write_config(8, struct.pack("<I", 65))


@pytest.mark.parametrize("kwargs", [
    {"on_output": print, "output_fd": 1},
    {"size": (70000, 10)},
    {"size": (-1, 10)},
    {"input_limit": -1},
    {"queue_size": 3},
])
def test_bad_configuration(kwargs) -> None:
    with pytest.raises(ConfigurationError):
        ConsoleDevice(**kwargs)


# --------------------------------------------------------------------------------------------
# guest -> host


def test_output_sink_receives_exact_guest_bytes() -> None:
    rig = Rig()
    chunks = [data(n, i) for i, n in enumerate((1, 100, 4096, 3, 7000))]
    used = rig.write([chunks[0]], [chunks[1], chunks[2]], [chunks[3]], [chunks[4]])
    assert [n for _, n in used] == [0, 0, 0, 0]       # the device writes nothing back
    assert rig.output == b"".join(chunks)
    assert len(rig.out) == 1                           # one sink call for the whole batch
    used = rig.write([b"indirect ", b"chain\n"], indirect=True)
    assert rig.output == b"".join(chunks) + b"indirect chain\n"
    s = rig.dev.stats
    assert s.output_chains == 5 and s.output_bytes == len(rig.output)
    assert rig.calls[TX] == 2


def test_output_many_chains_batches_and_wraps_in_order(monkeypatch) -> None:
    monkeypatch.setattr(console, "OUTPUT_BATCH_BYTES", 1000)
    rig = Rig()
    expect = b""
    for rnd in range(5):                              # 5 x 60 chains: the ring wraps
        chains = [[data(1 + (i * 31) % 97, rnd * 100 + i)] for i in range(60)]
        rig.write(*chains)
        expect += b"".join(c[0] for c in chains)
        assert rig.output == expect
    assert max(len(b) for b in rig.out) < 1000 + 97   # split near the batch size
    assert rig.dev.stats.output_chains == 300


def test_empty_and_writable_tx_chains_are_returned(monkeypatch) -> None:
    rig = Rig()
    rig.rb[TX].add_chain([b"abc"], [16])     # a writable part is ignored
    rig.rb[TX].add_chain([], [8])
    rig.dev.process_queue(TX, rig.vq[TX])
    used = rig.rb[TX].get_used()
    assert [n for _, n in used] == [0, 0]
    assert rig.output == b"abc"
    assert rig.dev.stats.output_chains == 2


def test_oversized_transmit_chain_is_cut_and_counted(monkeypatch) -> None:
    monkeypatch.setattr(console, "MAX_OUTPUT_PER_CHAIN", 100)
    rig = Rig()
    big = data(250, 9)
    rig.write([big[:120], big[120:]], [b"next"])
    assert rig.output == big[:100] + b"next"
    assert rig.dev.stats.output_truncated == 150


def test_a_failing_sink_never_breaks_the_ring(caplog) -> None:
    calls: list[bytes] = []

    def sink(b: bytes) -> None:
        calls.append(b)
        raise RuntimeError("terminal on fire")

    rig = Rig(ConsoleDevice(on_output=sink))
    rig.write([b"one"])
    rig.write([b"two"])
    assert calls == [b"one", b"two"]
    assert rig.dev.stats.output_errors == 2
    assert rig.vq[TX].error is None
    assert "terminal on fire" in caplog.text


# --------------------------------------------------------------------------------------------
# host -> guest


def test_feed_fills_receive_buffers_in_order_across_several() -> None:
    rig = Rig()
    posted = rig.post(10, 10, 10, 10)
    msg = data(25, 1)
    assert rig.dev.feed(msg) == 25
    got = rig.received(posted)
    assert got == [msg[:10], msg[10:20], msg[20:]]     # the fourth buffer stays posted
    assert rig.dev.pending_input == 0
    more = data(7, 2)
    rig.dev.feed(more)
    assert rig.received(posted) == [more]              # into the fourth buffer
    s = rig.dev.stats
    assert s.input_bytes == 32 and s.input_chains == 4 and s.input_dropped == 0
    assert rig.calls[RX] == 2


def test_input_waits_for_buffers_and_for_the_queue() -> None:
    rig = Rig(start=(TX,))                             # receiveq not started yet
    msg = data(300, 3)
    assert rig.dev.feed(msg[:100]) == 100
    assert rig.dev.feed(msg[100:]) == 200
    assert rig.dev.pending_input == 300
    rig.dev.queue_started(RX, rig.vq[RX])              # started, but no buffers yet
    assert rig.dev.pending_input == 300
    posted = rig.post(128)
    assert rig.received(posted) == [msg[:128]]
    posted += rig.post(64, 64, kick=False)             # posted without a kick:
    assert rig.rb[RX].get_used() == []
    rig.dev.feed(b"")                                  # the next feed finds them
    posted += rig.post(100)
    got = rig.received(posted)
    assert b"".join(got) == msg[128:]
    assert [len(b) for b in got] == [64, 64, 44]
    assert rig.dev.pending_input == 0


def test_overflow_is_dropped_and_counted_without_blocking() -> None:
    rig = Rig(input_limit=100)
    msg = data(150, 4)
    assert rig.dev.feed(msg) == 100
    assert rig.dev.feed(b"late") == 0
    assert rig.dev.stats.input_dropped == 54
    assert rig.dev.counters()["input_pending"] == 100
    posted = rig.post(64, 64)
    assert b"".join(rig.received(posted)) == msg[:100]
    assert rig.dev.feed(b"room again") == 10          # space freed by delivery
    posted += rig.post(64)
    assert rig.received(posted) == [b"room again"]


def test_zero_length_receive_buffer_is_returned_empty() -> None:
    rig = Rig()
    posted = rig.post(0, 8)
    rig.dev.feed(b"abc")
    used = rig.rb[RX].get_used()
    assert [n for _, n in used] == [0, 3]
    assert rig.mem.read(posted[1][1], 3) == b"abc"


def test_stop_and_reset_keep_pending_input_for_the_next_driver() -> None:
    rig = Rig()
    rig.dev.queue_stopped(RX, rig.vq[RX])
    rig.dev.feed(b"typed early")
    rig.dev.reset()
    assert rig.dev.pending_input == 11
    rig2 = Rig(rig.dev)
    posted = rig2.post(64)
    assert rig2.received(posted) == [b"typed early"]
    rig2.dev.feed(b"wait")                             # no buffer left: it waits
    rig2.dev.queue_stopped(RX, rig2.vq[RX])
    rig2.dev.feed(b"x")
    assert rig2.dev.discard_input() == 5 and rig2.dev.pending_input == 0
    assert rig2.dev.stats.input_dropped == 0


# --------------------------------------------------------------------------------------------
# FdOutput: the default sink


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_CLOEXEC)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _drain(fd: int) -> bytes:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_default_sink_writes_guest_output_to_the_fd(pipe) -> None:
    r, w = pipe
    dev = ConsoleDevice(output_fd=w)
    assert isinstance(dev.output, FdOutput) and dev.on_output is dev.output
    rig = Rig(dev)
    rig.write([b"hello "], [b"console\n"])
    assert os.read(r, 100) == b"hello console\n"


def test_fd_output_never_blocks_on_a_full_pipe(pipe) -> None:
    r, w = pipe
    fcntl.fcntl(w, 1031, 4096)                           # F_SETPIPE_SZ: a small pipe
    sink = FdOutput(w, limit=10_000, nonblocking=True)
    assert fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    rig = Rig(ConsoleDevice(on_output=sink))
    payload = data(20_000, 5)
    for i in range(0, len(payload), 1000):             # far more than the pipe holds
        rig.write([payload[i:i + 1000]])
    capacity = len(payload) - sink.pending - sink.dropped
    assert sink.pending == 10_000                      # backlog full, the rest dropped
    assert sink.dropped == len(payload) - capacity - 10_000 > 0
    assert not sink.flush()
    got = _drain(r)
    while sink.pending:
        sink.flush()
        got += _drain(r)
    assert got == payload[:capacity + 10_000]          # in order, nothing duplicated
    assert sink.written == len(got)
    sink(b"after")                                      # writes straight through again
    assert _drain(r) == b"after" and sink.pending == 0


def test_fd_output_survives_a_closed_reader(pipe) -> None:
    r, w = pipe
    os.close(r)
    sink = FdOutput(w, nonblocking=True)
    sink(b"nobody listens")
    sink(b"still nobody")
    assert sink.errors == 2 and sink.dropped == 26 and sink.pending == 0


def test_feed_and_output_are_independent_of_any_loop() -> None:
    # The layering rule, restated where a reader of this file looks for it.
    import ast
    from pathlib import Path

    tree = ast.parse(Path(console.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    for bad in ("vhostpy.loop", "vhostpy.server", "vhostpy.session", "vhostpy.protocol",
                "selectors", "asyncio", "socket"):
        assert bad not in imported
