"""Block faults on purpose (`vhostpy.faults`, `vhostpy blk --fault`): rule parsing and
matching, and a `vhostpy blk --image ... --fault` process driven by the scripted front-end:
failed requests leave the image untouched, other I/O goes on, delays delay."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scripted import BLK_HDR, ScriptedGuest

from vhostpy.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhostpy.cli import parse_counters_lines
from vhostpy.errors import ConfigurationError
from vhostpy.faults import BlockFault

SECTOR = 512


@pytest.mark.parametrize("spec", [
    "ioerr,op=write,sectors=100-199", "ioerr,op=any", "ioerr,op=flush,after=2,count=1",
    "delay,ms=5", "delay,ms=1-20,op=read,sectors=7",
])
def test_specs_round_trip(spec: str) -> None:
    fault = BlockFault.parse(spec)
    assert BlockFault.parse(fault.spec()) == fault


@pytest.mark.parametrize("spec, message", [
    ("melt,op=read", "unknown kind 'melt'"),
    ("ioerr,op=scribble", "op=scribble is not one of"),
    ("ioerr,sectors=9-3", "empty range"),
    ("ioerr,sectors=-3", "not a number"),
    ("ioerr,count", "is not KEY=VALUE"),
    ("ioerr,op=read,op=write", "op= given twice"),
    ("ioerr,ms=5", "ms= is for delay faults"),
    ("delay,op=read", "a delay needs ms="),
    ("delay,ms=999999", "ms= at most"),
    ("ioerr,colour=red", "unknown option colour="),
])
def test_bad_specs_are_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        BlockFault.parse(spec)
    assert repr(spec) in str(info.value)


def test_matching_ops_sectors_after_and_count() -> None:
    f = BlockFault.parse("ioerr,op=write,sectors=10-19,after=1,count=2")
    assert not f.applies("read", 10 * SECTOR, SECTOR)          # another op
    assert not f.applies("write", 20 * SECTOR, SECTOR)         # outside the sectors
    assert not f.applies("write", 8 * SECTOR, 2 * SECTOR)      # ends just before them
    assert not f.applies("write", 9 * SECTOR, 2 * SECTOR)      # the first match: after=1
    assert f.applies("write", 19 * SECTOR, 4 * SECTOR)         # touches sector 19
    assert f.applies("write", 12 * SECTOR, SECTOR)
    assert not f.applies("write", 12 * SECTOR, SECTOR)         # count=2 used up
    assert (f.seen, f.hits) == (4, 2)
    assert not BlockFault.parse("ioerr,sectors=0-9").applies("flush", 0, 0)
    assert BlockFault.parse("ioerr,op=flush").applies("flush", 0, 0)


def _request(guest: ScriptedGuest, rtype: int, sector: int, data: bytes = b"",
             read_len: int = 0) -> tuple[int, float]:
    """(status, seconds) of one request."""
    ring = guest.rings[0]
    _, addrs = ring.builder.add_chain([BLK_HDR.pack(rtype, 0, sector) + data],
                                      [read_len, 1] if read_len else [1])
    t0 = time.monotonic()
    guest.kick(0)
    guest.wait_used(0)
    return guest.memory.read(addrs[-1], 1)[0], time.monotonic() - t0


def test_cli_faults_fail_and_delay_chosen_requests(tmp_path: Path, backend: Any) -> None:
    image = tmp_path / "disk.img"
    original = bytes(range(256)) * (1024 * 1024 // 256)
    image.write_bytes(original)
    b = backend("blk", "--image", str(image), "--fault", "ioerr,op=write,sectors=100-199",
                "--fault", "delay,ms=80,op=read,sectors=300")
    guest = ScriptedGuest(b.path)
    try:
        guest.start()
        guest.setup_ring(0, 64)
        block = b"\xee" * SECTOR
        assert _request(guest, VIRTIO_BLK_T_OUT, 150, block)[0] == VIRTIO_BLK_S_IOERR
        assert _request(guest, VIRTIO_BLK_T_OUT, 99, block * 2)[0] == VIRTIO_BLK_S_IOERR
        assert _request(guest, VIRTIO_BLK_T_OUT, 98, block)[0] == VIRTIO_BLK_S_OK
        assert _request(guest, VIRTIO_BLK_T_IN, 150, read_len=SECTOR)[0] == VIRTIO_BLK_S_OK
        status, slow = _request(guest, VIRTIO_BLK_T_IN, 300, read_len=SECTOR)
        assert status == VIRTIO_BLK_S_OK and slow >= 0.08
    finally:
        guest.close()
    assert b.stop() == 0
    data = image.read_bytes()
    assert data[98 * SECTOR:99 * SECTOR] == block                 # the write that was let in
    assert data[99 * SECTOR:] == original[99 * SECTOR:]           # the failed ones: untouched
    (line,) = [r for r in parse_counters_lines(b.output()) if r["event"] == "exit"]
    faults = line["counters"]["faults"]
    assert (faults["errors"], faults["delays"]) == (2, 1), faults
    assert [f["hits"] for f in faults["faults"]] == [2, 1]
    assert "injected fault ioerr,op=write,sectors=100-199" in b.output()


def test_cli_bad_fault_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    proc = subprocess.run([sys.executable, "-m", "vhostpy", "blk", "--socket-path", str(sock),
                           "--fault", "ioerr,op=sideways"], check=False, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhostpy blk: error: fault "), proc.stderr
    assert not sock.exists()
