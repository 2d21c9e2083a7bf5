"""The write log (`vhostpy.writelog`) and `vhostpy replay`: a random workload with flushes and
power cuts (some torn) is logged; replaying the log onto the starting image gives, at every
flush point, exactly what the disk held right after that flush; marks, a log cut short, and
the command line's answers to bad input."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vhostpy.errors import ConfigurationError
from vhostpy.stores import FileStore
from vhostpy.writecache import WriteCache
from vhostpy.writelog import LoggedStore, LogReader, Replay, replay

SECTOR = 512
SIZE = 128 * SECTOR


def _workload(image: Path, log: Path, seed: int = 11) -> list[bytes]:
    """Random requests through LoggedStore(WriteCache(FileStore(image))), the cache small
    enough to write back early; returns the image's bytes right after each flush (index 0:
    before the first) and, last, at the mark "half-way"."""
    rng = random.Random(seed)
    store = FileStore.open(str(image))
    cache = WriteCache(store, seed=seed, limit=48 * SECTOR)   # it fills: early write-backs
    logged = LoggedStore(cache, str(log))
    cache.on_write_back = logged.record_write_back
    states = [image.read_bytes()]
    at_mark: list[bytes] = []

    async def go() -> None:
        for step in range(1500):
            if step == 700:
                logged.mark("half-way")
                at_mark.append(image.read_bytes())
            op = rng.random()
            first = rng.randrange(SIZE // SECTOR)
            at = first * SECTOR
            n = rng.randint(1, min(16, SIZE // SECTOR - first)) * SECTOR
            if op < 0.6:
                await logged.write(at, rng.randbytes(n))
            elif op < 0.66:
                await logged.write_zeroes(at, n)
            elif op < 0.7:
                await logged.discard(at, n)
            elif op < 0.85:
                await logged.flush()
                states.append(image.read_bytes())
            elif op < 0.88:
                logged.record_cut(cache.power_cut(torn=rng.random() < 0.5))
                cache.device_reset()
    try:
        asyncio.run(go())
    finally:
        logged.close()
    assert cache.written_back > 20
    return states + at_mark


def test_replay_rebuilds_every_flush_point(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "writes.log"
    start = random.Random(1).randbytes(SIZE)
    image.write_bytes(start)
    states = _workload(image, log)
    summary = LogReader(str(log)).summary()
    states.pop()                        # the image at the mark: not a flush point
    assert summary["flushes"] == len(states) - 1 > 100 and summary["cuts"] > 10
    assert summary["truncated"] is False
    copy = tmp_path / "copy.img"
    copy.write_bytes(start)
    run = Replay(str(log), str(copy))
    try:
        while (number := run.step()) is not None:
            run.store.flush()
            assert copy.read_bytes() == states[number], f"flush {number}"
        assert run.flush == len(states) - 1 and run.dropped > 0
    finally:
        run.close()


def test_replay_to_a_flush_or_mark_and_a_log_cut_short(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "writes.log"
    image.write_bytes(bytes(SIZE))
    states = _workload(image, log, seed=5)
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes(SIZE))
    assert replay(str(log), str(copy), flush=17)["flush"] == 17
    assert copy.read_bytes() == states[17]
    copy.write_bytes(bytes(SIZE))
    done = replay(str(log), str(copy), mark="half-way")
    marks = LogReader(str(log)).summary()["marks"]
    assert marks == [{"mark": "half-way", "after_flush": done["flush"]}]
    assert copy.read_bytes() == states[-1]       # flushed, and written back early by then
    # a log whose writer died in the record after flush 40: flush 40 is what replays
    reader = LogReader(str(log))
    flushes = [r for r in reader.records() if r.kind == b"F"]
    reader.close()
    short = tmp_path / "short.log"
    short.write_bytes(log.read_bytes()[:flushes[39].data_at + 7])
    copy.write_bytes(bytes(SIZE))
    done = replay(str(short), str(copy))
    assert done["truncated_log"] is True and done["flush"] == 40
    assert copy.read_bytes() == states[40]


def test_replay_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "writes.log"
    image.write_bytes(bytes(SIZE))
    _workload(image, log, seed=2)
    (tmp_path / "small.img").write_bytes(bytes(SECTOR * 4))
    with pytest.raises(ConfigurationError, match="the logged disk had"):
        replay(str(log), str(tmp_path / "small.img"))
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(ConfigurationError, match="is not a vhostpy write log"):
        replay(str(tmp_path / "junk"), str(image))
    with pytest.raises(ConfigurationError, match="flush points, not 100000"):
        replay(str(log), str(image), flush=100000)
    with pytest.raises(ConfigurationError, match="no mark 'nope'"):
        replay(str(log), str(image), mark="nope")


def _vhostpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostpy", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_replay_command_line(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "writes.log"
    image.write_bytes(bytes(SIZE))
    states = _workload(image, log, seed=9)[:-1]     # the flush points
    listed = _vhostpy("replay", str(log), "--list")
    assert listed.returncode == 0, listed.stderr
    summary = json.loads(listed.stdout)
    assert summary["flushes"] == len(states) - 1 == len(summary["flush_records"])
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes(SIZE))
    done = _vhostpy("replay", str(log), str(copy), "--flush", "3")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["flush"] == 3 and copy.read_bytes() == states[3]
    for args, message in (
            ((str(log),), "give the IMAGE to rebuild"),
            ((str(log), str(copy), "--list"), "--list reads only the log"),
            ((str(log), str(copy), "--flush", "-2"), "must not be negative"),
            ((str(tmp_path / "missing.log"), str(copy)), "No such file"),
            ((str(log), str(copy), "--flush", "1", "--mark", "x"), "not allowed with")):
        bad = _vhostpy("replay", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and message in lines[0], bad.stderr
