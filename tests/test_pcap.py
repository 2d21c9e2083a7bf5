"""vhostpy.pcap: files scapy (an independent reader) accepts, truncation, timestamps, crashes."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tools import wait_until

from vhostpy.packets import Responder, verify_l4_checksums
from vhostpy.pcap import PcapWriter, read_pcap

try:
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    HAVE_SCAPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SCAPY = False

#: scapy is a test dependency: missing, these tests fail under CI (conftest.scapy_installed).
needs_scapy = pytest.mark.usefixtures("scapy_installed")

ROOT = Path(__file__).resolve().parent.parent


def sample_frames() -> list[bytes]:
    """A conversation between two `Responder`s: ARP, then pings of several sizes."""
    host = Responder()
    guest = Responder("10.0.2.15", "52:54:00:12:34:56")
    frames: list[bytes] = []
    for seq, size in enumerate((56, 1472, 8000, 0), start=1):
        to_guest = host.ping("10.0.2.15", seq=seq, payload_size=size)
        to_host: list[bytes] = []
        while to_guest or to_host:
            frames.extend(to_guest + to_host)
            to_guest, to_host = (
                [a for f in to_host for a in host.handle(f)],
                [a for f in to_guest for a in guest.handle(f)],
            )
    assert len(host.echo_replies) == 4
    return frames


def test_global_header(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    with PcapWriter(path, snaplen=1234):
        pass
    data = path.read_bytes()
    assert struct.unpack("<IHHiIII", data) == (0xA1B2C3D4, 2, 4, 0, 0, 1234, 1)
    assert read_pcap(path) == []


@needs_scapy
def test_round_trip_with_scapy_and_read_pcap(tmp_path: Path) -> None:
    frames = sample_frames()
    assert len(frames) == 10
    path = tmp_path / "ping.pcap"
    with PcapWriter(path) as w:
        w.write(frames[0])
        w.write_many(frames[1:])
        assert (w.frames, w.bytes, w.truncated) == (len(frames), sum(map(len, frames)), 0)
    packets = rdpcap(str(path))
    assert len(packets) == len(frames)
    assert all(isinstance(p, Ether) for p in packets)
    assert [bytes(p) for p in packets] == frames
    assert [p.wirelen for p in packets] == [len(f) for f in frames]
    assert [data for _ts, data in read_pcap(path)] == frames
    # The capture is of a real conversation: every checksum in it is valid.
    checked = [verify_l4_checksums(f) for f in frames]
    assert checked == [None, None] + [True] * 8  # ARP has no checksum


@needs_scapy
def test_snaplen_truncates_with_orig_len(tmp_path: Path) -> None:
    path = tmp_path / "snap.pcap"
    big, small = bytes(range(256)) * 40, b"\xaa" * 60
    with PcapWriter(path, snaplen=128) as w:
        w.write_many([big, small, b"\x01" * 128])
        assert w.truncated == 1 and w.bytes == len(big) + 60 + 128
    records = read_pcap(path)
    assert [d for _, d in records] == [big[:128], small, b"\x01" * 128]
    incl, orig = struct.unpack_from("<II", path.read_bytes(), 24 + 8)
    assert (incl, orig) == (128, len(big))
    packets = rdpcap(str(path))
    assert [p.wirelen for p in packets] == [len(big), 60, 128]
    assert bytes(packets[0]) == big[:128]


@needs_scapy
def test_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "ts.pcap"
    before = time.time()
    with PcapWriter(path) as w:
        w.write(b"\0" * 60, ts=1_700_000_000.123456)
        w.write(b"\1" * 60, ts=1.9999996)  # rounds up into the next second
        w.write_many([b"\2" * 60, b"\3" * 60], ts=42.5)
        w.write(b"\4" * 60)
    after = time.time()
    records = read_pcap(path)
    assert records[0][0] == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert records[1][0] == 2.0
    assert records[2][0] == records[3][0] == 42.5
    assert before - 1e-6 <= records[4][0] <= after + 1e-6
    raw = path.read_bytes()
    assert struct.unpack_from("<II", raw, 24) == (1_700_000_000, 123456)
    assert struct.unpack_from("<II", raw, 24 + 76) == (2, 0)
    assert [float(p.time) for p in rdpcap(str(path))][:4] == pytest.approx(
        [1_700_000_000.123456, 2.0, 42.5, 42.5], abs=1e-6)
    with PcapWriter(tmp_path / "neg.pcap") as w, pytest.raises(ValueError):
        w.write(b"\0" * 60, ts=-1.0)


class CountingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)

    def flush(self) -> None:
        self.flushes += 1


def test_batches_are_one_write_and_flushed() -> None:
    f = CountingFile()
    w = PcapWriter(f)
    assert (f.writes, f.flushes) == (1, 1)
    w.write_many([b"a" * 60] * 50, ts=1.0)
    assert (f.writes, f.flushes) == (2, 2)
    w.write_many([], ts=1.0)
    assert f.writes == 2
    w.close()
    w.close()
    assert not f.closed and w.closed  # a caller's file object stays open
    assert len(f.getvalue()) == 24 + 50 * (16 + 60)
    with pytest.raises(ValueError):
        w.write(b"x" * 60)


def test_file_is_complete_while_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "live.pcap"
    w = PcapWriter(path)
    w.write_many([b"x" * 100, b"y" * 61], ts=5.0)
    assert [d for _, d in read_pcap(path)] == [b"x" * 100, b"y" * 61]
    w.write(b"z" * 70, ts=6.0)
    assert len(read_pcap(path)) == 3
    w.close()


def test_sigterm_then_close_leaves_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "term.pcap"
    script = textwrap.dedent(f"""
        import signal, sys
        from vhostpy.pcap import PcapWriter
        w = PcapWriter({str(path)!r})
        def stop(signum, frame):
            w.close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        frames = [bytes([i % 256]) * (60 + i) for i in range(64)]
        print("ready", flush=True)
        while True:
            w.write_many(frames)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    # A few MB of batches, then the signal lands mid-stream.
    wait_until(lambda: path.stat().st_size > 2 << 20, 10.0, "the capture to pass 2 MiB")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    records = read_pcap(path)  # raises on any partial record
    assert len(records) >= 64
    assert all(d == bytes([d[0]]) * len(d) and len(d) == 60 + d[0] for _, d in records)


def test_read_pcap_validates(tmp_path: Path) -> None:
    good = tmp_path / "good.pcap"
    with PcapWriter(good) as w:
        w.write_many([b"a" * 60, b"b" * 70], ts=3.0)
    data = good.read_bytes()
    cases = {
        "magic": b"\0\0\0\0" + data[4:],
        "short-header": data[:20],
        "short-record-header": data[: 24 + 76 + 10],
        "short-record": data[:-1],
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pcap"
        bad.write_bytes(content)
        with pytest.raises(ValueError):
            read_pcap(bad)


def test_read_pcap_big_endian_and_nanoseconds(tmp_path: Path) -> None:
    path = tmp_path / "be.pcap"
    path.write_bytes(struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
                     + struct.pack(">IIII", 10, 500_000_000, 3, 3) + b"abc")
    assert read_pcap(path) == [(10.5, b"abc")]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PcapWriter(tmp_path / "x.pcap", snaplen=0)
    with pytest.raises(ValueError):
        PcapWriter(tmp_path / "y.pcap", linktype=-1)
