"""`vhostpy net` (the CLI, as a user runs it) driven by DPDK's virtio-user FRONT-END.

DPDK's ``net_virtio_user`` in ``dpdk-testpmd`` is a real vhost-user front-end written in C by
other people: it negotiates, maps its memory (a memfd, ``--no-huge``) and polls the rings from
another CPU as fast as it can.  Against it:

* ``txonly`` floods ``vhostpy net --pcap F --no-respond``: every frame testpmd counts as sent
  is in the pcap, byte for byte the txonly template, and vhostpy's counters line agrees;
* ``io --tx-first`` against ``vhostpy net --reflect --pcap F``: one burst circulates, every
  batch vhostpy takes is given back with its MACs swapped, and both sides' counters agree;
* a front-end SIGKILLed mid-traffic leaves vhostpy serving the next one.

Each process has its own CPU when there are two (testpmd ``cpu=``, vhostpy
``sched_setaffinity``): two busy processes on one CPU measure the scheduler, not the rings.
No speed is asserted; the rates are printed (``-s``) and recorded as properties.

Facts these tests rely on (DPDK 22.11):

* testpmd's ``txonly`` sends ONE template: Ether(dst=02:00:00:00:00:00 (the default peer),
  src=port MAC) / IPv4 198.18.0.1 -> 198.18.0.2, ttl 64, id 0, header checksum set /
  UDP 9 -> 9 with checksum 0 (none) / zeros up to ``--txpkts`` bytes (no FCS).  Only
  ``--txonly-multi-flow`` (IP source) and ``--txtimes`` (payload) vary it; neither is used.
* Without ``mac=`` virtio-user picks a random port MAC (vhostpy has no GET_CONFIG), so the
  tests pass one.
* ``--tx-first`` sends one txonly burst (32 frames, 64 bytes) before ``io`` forwarding, so
  exactly 32 frames circulate; testpmd's TX-packets includes them.
* A SIGKILLed testpmd leaves its EAL runtime dir: ``Testpmd.stop()`` removes it.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Backend
from dpdk import Testpmd, TestpmdStats, pick_cpus, rate, require_dpdk, virtio_user_vdev

from vhostpy.cli import parse_counters_lines
from vhostpy.packets import swap_macs, verify_l4_checksums
from vhostpy.pcap import read_pcap

pytestmark = pytest.mark.dpdk

QUEUE_SIZE = 256            # virtio-user queue_size: frames that may be in flight at stop
BURST = 32                  # testpmd's default burst (and the --tx-first burst)
PEER_MAC = "02:00:00:00:00:00"   # testpmd's default destination for port 0
FE_MAC = "02:dd:00:00:00:01"
FE2_MAC = "02:dd:00:00:00:02"

StartFn = Callable[..., Testpmd]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
def sock() -> Iterator[str]:
    """A socket path short enough for AF_UNIX (pytest's tmp_path may not be)."""
    d = tempfile.mkdtemp(prefix="vhpy-dpdk-", dir="/tmp")
    yield os.path.join(d, "net.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cpus() -> tuple[int, int]:
    """(vhostpy's CPU, testpmd's CPU): distinct when the affinity mask has two."""
    be_cpu, fe_cpu = pick_cpus(2)
    return be_cpu, fe_cpu


class Vhostpy(Backend):
    """`python -m vhostpy net --socket-path SOCK -vv ARGS...`, pinned to one CPU."""

    def __init__(self, sock: str, args: list[str], log_path: Path, cpu: int) -> None:
        super().__init__(["net", "--socket-path", sock, "-vv", *args], sock, log_path)
        os.sched_setaffinity(self.proc.pid, {cpu})

    def output(self) -> str:  # Backend.output() flushes its log, which stop() closed
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            assert self.alive(), f"vhostpy exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} x{count}:\n{self.output()}"
            time.sleep(0.05)

    def stop_and_count(self) -> dict:
        """SIGTERM; it must exit 0, remove its socket, and print one counters line."""
        rc = self.stop()
        out = self.output()
        assert rc == 0, f"vhostpy exited with {rc}:\n{out}"
        assert not os.path.exists(self.path), "vhostpy left its socket behind"
        records = parse_counters_lines(out)
        assert [(r["device"], r["event"]) for r in records] == [("net", "exit")], out
        counters: dict = records[0]["counters"]
        return counters


@pytest.fixture
def vhostpy(tmp_path: Path, sock: str,
            cpus: tuple[int, int]) -> Iterator[Callable[..., Vhostpy]]:
    started: list[Vhostpy] = []

    def start(*args: str) -> Vhostpy:
        vh = Vhostpy(sock, list(args), tmp_path / "vhostpy.log", cpus[0])
        started.append(vh)
        return vh

    yield start
    for vh in started:
        if vh.alive():
            vh.stop()


@pytest.fixture
def testpmd(tmp_path: Path, sock: str, cpus: tuple[int, int]) -> Iterator[StartFn]:
    """Factory: testpmd("name", forward_mode=..., mac=...) starts a virtio-user front-end
    on `sock`, pinned to testpmd's CPU; all are stopped (runtime dirs removed) afterwards."""
    started: list[Testpmd] = []

    def start(name: str, *, mac: str = FE_MAC, packed_vq: bool = False,
              **kw: object) -> Testpmd:
        vdev = virtio_user_vdev(sock, queue_size=QUEUE_SIZE, mac=mac, packed_vq=packed_vq)
        tp = Testpmd(vdev, cpu=cpus[1], log_path=tmp_path / f"testpmd-{name}.log",
                     **kw)  # type: ignore[arg-type]
        started.append(tp)
        tp.start()
        tp.wait_ready(20)
        return tp

    yield start
    for tp in started:
        tp.close()
        assert not tp.runtime_dir.exists(), f"{tp} left {tp.runtime_dir}"


# -------------------------------------------------------------------------------- helpers


def wait_rounds(tp: Testpmd, n: int, attr: str, timeout: float = 12) -> list[TestpmdStats]:
    """At least `n` periodic rounds in which `attr` (rx_packets / tx_packets) is non-zero."""
    deadline = time.monotonic() + timeout
    while True:
        rounds = [r for r in tp.periodic_stats() if getattr(r, attr)]
        if len(rounds) >= n:
            return rounds
        assert tp.alive(), f"testpmd died ({tp.returncode}):\n{tp.output()}"
        assert time.monotonic() < deadline, f"{len(rounds)} rounds with {attr}:\n{tp.output()}"
        time.sleep(0.1)


def txonly_template(length: int, src_mac: str) -> bytes:
    """The frame testpmd 22.11 `txonly` sends from a port with MAC `src_mac`."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    pkt = (Ether(dst=PEER_MAC, src=src_mac)
           / IP(src="198.18.0.1", dst="198.18.0.2", ttl=64, id=0, flags=0, tos=0)
           / UDP(sport=9, dport=9, chksum=0))
    frame = bytes(pkt / Raw(b"\0" * (length - len(pkt))))
    assert len(frame) == length
    return frame


def check_template(frame: bytes, length: int, src_mac: str) -> None:
    """`frame` is txonly's template, also checked field by field with scapy."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    assert len(frame) == length
    assert pkt.dst == PEER_MAC and pkt.src == src_mac, pkt.summary()
    assert IP in pkt and UDP in pkt, pkt.summary()
    assert pkt[IP].len == length - 14 and pkt[UDP].len == length - 34
    assert (pkt[IP].src, pkt[IP].dst, pkt[UDP].sport, pkt[UDP].dport) == (
        "198.18.0.1", "198.18.0.2", 9, 9)
    assert verify_l4_checksums(frame) is True  # IPv4 header sum set; UDP 0 = none
    assert frame == txonly_template(length, src_mac)


def scan_txonly_pcap(path: Path, template: bytes) -> int:
    """Count the records of a txonly capture, asserting each is `template` byte for byte
    (captured whole: incl_len == orig_len == len(template)).  `read_pcap` holds the whole
    file in memory; a few seconds of 1500-byte txonly is ~700 MB, so this reads chunks."""
    size = len(template)
    rec = 16 + size
    with open(path, "rb") as f:
        magic, major, minor, _zone, _figs, _snap, link = struct.unpack("<IHHiIII", f.read(24))
        assert (magic, major, minor, link) == (0xA1B2C3D4, 2, 4, 1), "not a LE usec pcap"
        n = 0
        while chunk := f.read(rec * 4096):
            assert len(chunk) % rec == 0, f"record {n + len(chunk) // rec} is not {rec} bytes"
            for off in range(0, len(chunk), rec):
                incl, orig = struct.unpack_from("<II", chunk, off + 8)
                if incl != size or orig != size or chunk[off + 16:off + rec] != template:
                    raise AssertionError(
                        f"record {n}: {incl}/{orig} bytes {chunk[off + 16:off + rec].hex()}, "
                        f"expected {size} bytes {template.hex()}")
                n += 1
    return n


def reflect_batches(records: list[tuple[float, bytes]]) -> list[tuple[list[bytes], list[bytes]]]:
    """Split a `--reflect` capture into (from-guest batch, to-guest batch) pairs.

    Each PcapWriter.write_many() call is one batch with one timestamp; a batch the guest sent
    is recorded, then (synchronously, before the next batch) its reflection.  Two calls in
    the same microsecond merge into one group; a merged pair is split in halves."""
    groups: list[list[bytes]] = []
    last = None
    for ts, frame in records:
        if ts != last or not groups:
            groups.append([])
            last = ts
        groups[-1].append(frame)
    pairs = []
    i = 0
    while i < len(groups):
        g = groups[i]
        if i + 1 < len(groups) and len(groups[i + 1]) == len(g):
            pairs.append((g, groups[i + 1]))
            i += 2
        elif len(g) % 2 == 0:
            pairs.append((g[: len(g) // 2], g[len(g) // 2:]))
            i += 1
        else:
            raise AssertionError(f"capture batch {i} ({len(g)} frames) has no reflection; "
                                 f"group sizes near it: {[len(x) for x in groups[i-2:i+3]]}")
    return pairs


# ---------------------------------------------------------------------------------- tests


def check_layout(out: str, packed: bool) -> None:
    """vhostpy's log says which ring layout virtio-user acked (VIRTIO_F_RING_PACKED)."""
    acked = [line for line in out.splitlines() if "driver features" in line]
    assert acked, out
    assert all(("RING_PACKED" in line) == packed for line in acked), acked


@pytest.mark.parametrize(("txpkts", "packed"), [(64, False), (1500, False), (64, True)],
                         ids=["64", "1500", "64-packed"])
def test_txonly_every_frame_captured(vhostpy: Callable[..., Vhostpy], testpmd: StartFn,
                                     tmp_path: Path, txpkts: int, packed: bool,
                                     record_property: Callable[[str, object], None]) -> None:
    """txonly -> `vhostpy net --pcap F --no-respond`: nothing lost, nothing changed (split
    rings, and packed ones: virtio-user packed_vq=1)."""
    require_dpdk()
    pcap = tmp_path / "txonly.pcap"
    vh = vhostpy("--pcap", str(pcap), "--no-respond")
    fe = testpmd("txonly", forward_mode="txonly", txpkts=txpkts, packed_vq=packed)
    # Rounds come every 1-2 s; 1500-byte frames make a large pcap, so measure less.
    rounds = wait_rounds(fe, 3 if txpkts == 64 else 2, "tx_packets")
    tx = fe.stop()
    assert fe.returncode == 0 and tx.final, fe.output()
    counters = vh.stop_and_count()

    pps = rate(rounds, "tx_packets", skip=0)
    layout = "packed" if packed else "split"
    record_property(f"vhostpy_txonly_{txpkts}B_{layout}_mpps", round(pps / 1e6, 4))
    print(f"\nvirtio-user txonly {txpkts} B ({layout}) -> vhostpy net --pcap: "
          f"{pps / 1e6:.3f} Mpps "
          f"({tx.tx_packets} frames, {tx.tx_dropped} refused by the full ring)")

    # Every captured frame is the template, byte for byte and whole ...
    template = txonly_template(txpkts, FE_MAC)
    check_template(template, txpkts, FE_MAC)
    n = scan_txonly_pcap(pcap, template)
    if txpkts == 64:  # small enough for read_pcap (the reader users get) to agree
        records = read_pcap(pcap)
        assert len(records) == n and records[0][1] == records[-1][1] == template
        del records
    # ... and every frame the ring accepted was captured (one ring may be in flight at stop).
    assert tx.tx_packets > 1000, tx
    assert tx.tx_packets - QUEUE_SIZE <= n <= tx.tx_packets, (n, tx)

    # vhostpy's own counters agree with the capture and saw no drops.
    port = counters["ports"][0]
    assert port["from_guest"] == {"frames": n, "bytes": n * txpkts, "drops": {},
                                  "checksums": 0, "merged": 0}, port
    assert port["to_guest"]["frames"] == 0 and port["handler_errors"] == 0, port
    assert counters["pcap"]["frames"] == n, counters
    assert "responder" not in counters
    out = vh.output()
    assert "front-end connected" in out and "front-end disconnected" in out, out
    assert "WARNING" not in out and "ERROR" not in out, out
    check_layout(out, packed)
    pcap.unlink()  # up to ~700 MB; pytest keeps the last three runs' tmp_path


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_io_reflect_counters_agree(vhostpy: Callable[..., Vhostpy], testpmd: StartFn,
                                   tmp_path: Path, packed: bool,
                                   record_property: Callable[[str, object], None]) -> None:
    """`io --tx-first` <-> `vhostpy net --reflect --pcap F`: 32 frames circulate (split
    rings, and packed ones)."""
    require_dpdk()
    pcap = tmp_path / "reflect.pcap"
    vh = vhostpy("--reflect", "--pcap", str(pcap))
    fe = testpmd("io", forward_mode="io", tx_first=True, packed_vq=packed)
    rounds = wait_rounds(fe, 3, "rx_packets")
    st = fe.stop()
    assert fe.returncode == 0 and st.final, fe.output()
    counters = vh.stop_and_count()

    pps = rate(rounds, "rx_packets", skip=0)
    record_property(f"vhostpy_reflect_64B_{'packed' if packed else 'split'}_mpps",
                    round(pps / 1e6, 4))
    print(f"\nvirtio-user io --tx-first <-> vhostpy net --reflect --pcap: "
          f"{pps / 1e6:.3f} Mpps each way ({st.rx_packets} frames back)")

    port = counters["ports"][0]
    from_guest, to_guest = port["from_guest"], port["to_guest"]
    # Frames really circulated ...
    assert st.rx_packets > 1000 and st.tx_packets > 1000, st
    # ... io mode sent back all it received, plus the --tx-first burst ...
    assert st.tx_packets + st.tx_dropped == st.rx_packets + BURST, st
    # ... and both sides count the same frames, give or take what was in flight at stop.
    slack = QUEUE_SIZE + BURST
    assert 0 <= st.tx_packets - from_guest["frames"] <= slack, (st, from_guest)
    assert 0 <= to_guest["frames"] - st.rx_packets <= slack, (st, to_guest)
    # Every frame vhostpy took went back (or was still queued when the driver went away).
    reset_drops = to_guest["drops"].pop("device reset", 0)
    assert to_guest["drops"] == {} and from_guest["drops"] == {}, port
    assert from_guest["frames"] == to_guest["frames"] + reset_drops, port
    assert reset_drops <= BURST, port
    assert to_guest["bytes"] + 64 * reset_drops == from_guest["bytes"] == 64 * from_guest["frames"]

    # The capture: each batch from the guest, then the same frames with MACs swapped.
    records = read_pcap(pcap)
    assert len(records) == counters["pcap"]["frames"] == 2 * from_guest["frames"]
    template = txonly_template(64, FE_MAC)
    check_template(template, 64, FE_MAC)
    pairs = reflect_batches(records)
    assert sum(len(f) for f, _ in pairs) == from_guest["frames"]
    for sent, back in pairs:
        assert back == [swap_macs(f) for f in sent]
    # The first batch is testpmd's --tx-first burst: the txonly template itself.
    assert pairs[0][0][0] == template
    # Only the template and its reflection ever circulate.
    kinds = collections.Counter(frame for _, frame in records)
    assert set(kinds) == {template, swap_macs(template)}, kinds.most_common(4)
    assert abs(kinds[template] - kinds[swap_macs(template)]) <= BURST, kinds.values()
    check_layout(vh.output(), packed)
    pcap.unlink()


def test_frontend_killed_then_next_one_served(vhostpy: Callable[..., Vhostpy],
                                              testpmd: StartFn, tmp_path: Path) -> None:
    """SIGKILL testpmd mid-traffic: vhostpy survives and serves a second testpmd."""
    require_dpdk()
    pcap = tmp_path / "reconnect.pcap"
    vh = vhostpy("--reflect", "--pcap", str(pcap))
    first = testpmd("first", forward_mode="io", tx_first=True, mac=FE_MAC)
    wait_rounds(first, 1, "rx_packets")
    first.kill()
    dead = first.stop()
    assert first.returncode == -signal.SIGKILL and not dead.final
    assert not first.runtime_dir.exists()
    vh.wait_log("front-end disconnected")
    assert vh.alive() and os.path.exists(vh.path)

    second = testpmd("second", forward_mode="io", tx_first=True, mac=FE2_MAC)
    wait_rounds(second, 2, "rx_packets")
    st = second.stop()
    assert second.returncode == 0 and st.final, second.output()
    assert st.rx_packets > 1000, st
    vh.wait_log("front-end disconnected", count=2)
    counters = vh.stop_and_count()
    out = vh.output()
    assert out.count("front-end connected") == 2, out

    # The second front-end's frames, told apart by its MAC: each one reflected to it.
    records = read_pcap(pcap)
    mine = [f for _, f in records if FE2_MAC.replace(":", "") in f[:12].hex()]
    template = txonly_template(64, FE2_MAC)
    assert set(mine) == {template, swap_macs(template)}
    taken = len(mine) // 2   # from the guest, and as many reflected back
    assert 0 <= st.tx_packets - taken <= QUEUE_SIZE + BURST, (st, taken)
    assert st.rx_packets <= taken, (st, taken)
    # And the counters cover both front-ends.
    port = counters["ports"][0]
    assert port["from_guest"]["frames"] * 2 == len(records) == counters["pcap"]["frames"]
    assert port["from_guest"]["frames"] > taken
    assert set(port["to_guest"]["drops"]) <= {"device reset"}, port
    assert port["handler_errors"] == 0
    pcap.unlink()
