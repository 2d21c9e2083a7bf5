"""virtio-blk (`BlockDevice`) driven through a real `Virtqueue` and a driver-side `RingBuilder`.

No sockets and no session: the test plays the transport. Every request is checked against
what the spec requires (status byte, used length) and against the image file itself (bytes
written where they should be, and nowhere else).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ringbuilder import RingBuilder, anon_memory, layout

from vhostpy import blk
from vhostpy.blk import BlockDevice
from vhostpy.errors import ConfigurationError
from vhostpy.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhostpy.vring import DefaultVirtqueue

SECTOR = 512
SECTORS = 64
IMAGE_SIZE = SECTORS * SECTOR
RING = 64
HDR = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")

# Spec numbers, written out here rather than taken from blk.py (virtio 1.2, 5.2).
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ = 1, 2, 5, 6, 9, 12
F_DISCARD, F_WRITE_ZEROES = 13, 14
FLAG_UNMAP = 1


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(fd: int) -> tuple[int, str]:
    """(size, sha256) of everything in fd."""
    size = os.fstat(fd).st_size
    return size, hashlib.sha256(os.pread(fd, size, 0)).hexdigest()


@dataclass
class Result:
    status: int
    used_len: int
    data: bytes


class Rig:
    """A BlockDevice, one ring in anonymous guest memory, and the driver's view of that ring."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.mem, self._buf = anon_memory(1 << 21)
        self.rb = RingBuilder(self.mem, RING, layout(RING, data_size=1 << 20))
        self.vq = self.rb.attach(DefaultVirtqueue(self.mem, 0))
        dev.set_features(dev.features())
        dev.queue_started(0, self.vq)

    def submit(self, readable: list[bytes], writable: list[int], *,
               indirect: bool = False) -> tuple[int, list[int]]:
        """Publish one chain, let the device serve it; returns (used len, buffer addresses)."""
        head, addrs = self.rb.add_chain(readable, writable, indirect=indirect)
        self.dev.process_queue(0, self.vq)
        used = self.rb.get_used()
        assert [h for h, _ in used] == [head]
        assert self.vq.error is None
        return used[0][1], addrs

    def request(self, rtype: int, sector: int = 0, data: bytes = b"", read_len: int = 0, *,
                indirect: bool = False) -> Result:
        used_len, addrs = self.submit([HDR.pack(rtype, 0, sector) + data],
                                      [read_len, 1] if read_len else [1], indirect=indirect)
        status = self.mem.read(addrs[-1], 1)[0]
        got = self.mem.read(addrs[1], read_len) if read_len else b""
        return Result(status, used_len, got)

    def segments(self, rtype: int, *segs: tuple[int, int, int]) -> Result:
        body = b"".join(SEGMENT.pack(*s) for s in segs)
        return self.request(rtype, 0, body)

    def image(self, offset: int = 0, size: int | None = None) -> bytes:
        if size is None:
            size = os.fstat(self.dev.fd).st_size - offset
        return os.pread(self.dev.fd, size, offset)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(IMAGE_SIZE))
    return path


@pytest.fixture(params=["file", "memory"])
def dev(request: pytest.FixtureRequest, image: Path) -> Iterator[BlockDevice]:
    if request.param == "file":
        d = BlockDevice.open_image(str(image), serial="vhostpy-serial")
    else:
        d = BlockDevice.in_memory(IMAGE_SIZE, serial="vhostpy-serial")
        os.pwrite(d.fd, pattern(IMAGE_SIZE), 0)
    yield d
    d.close()


@pytest.fixture
def rig(dev: BlockDevice) -> Rig:
    return Rig(dev)


# ------------------------------------------------------------------ construction and config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_queues": 0}, "num-queues"),
        ({"num_queues": 65}, "num-queues"),
        ({"queue_size": 3}, "queue-size"),
        ({"queue_size": 2}, "queue-size"),
        ({"queue_size": 65536}, "queue-size"),
        ({"serial": "x" * 21}, "serial"),
        ({"serial": "é" * 11}, "serial"),  # 22 bytes in UTF-8
    ],
)
def test_bad_constructor_args(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        BlockDevice.in_memory(IMAGE_SIZE, **kwargs)


@pytest.mark.parametrize("size", [100, 0, 513, -512])
def test_in_memory_size_must_be_sectors(size: int) -> None:
    with pytest.raises(ConfigurationError, match="size"):
        BlockDevice.in_memory(size)


def test_open_image_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot open"):
        BlockDevice.open_image(str(tmp_path / "nope.img"))


def test_open_image_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        BlockDevice.open_image(str(tmp_path), read_only=True)


def _config(dev: BlockDevice) -> dict[str, int]:
    """struct virtio_blk_config, unpacked field by field at the spec offsets."""
    cfg = dev.config()
    fields = {
        "capacity": ("<Q", 0), "size_max": ("<I", 8), "seg_max": ("<I", 12),
        "cylinders": ("<H", 16), "heads": ("<B", 18), "sectors": ("<B", 19),
        "blk_size": ("<I", 20), "physical_block_exp": ("<B", 24),
        "alignment_offset": ("<B", 25), "min_io_size": ("<H", 26), "opt_io_size": ("<I", 28),
        "writeback": ("<B", 32), "num_queues": ("<H", 34),
        "max_discard_sectors": ("<I", 36), "max_discard_seg": ("<I", 40),
        "discard_sector_alignment": ("<I", 44), "max_write_zeroes_sectors": ("<I", 48),
        "max_write_zeroes_seg": ("<I", 52), "write_zeroes_may_unmap": ("<B", 56),
    }
    out = {name: struct.unpack_from(fmt, cfg, off)[0] for name, (fmt, off) in fields.items()}
    out["len"] = len(cfg)
    return out


def test_config_space_offsets(dev: BlockDevice) -> None:
    c = _config(dev)
    assert c["len"] >= 60
    assert c["capacity"] == SECTORS
    assert c["blk_size"] == SECTOR
    assert c["size_max"] > 0
    assert c["seg_max"] == 256 - 2  # default queue size 256, header and status take two
    assert c["num_queues"] == 1
    assert c["max_discard_sectors"] > 0 and c["max_discard_seg"] >= 1
    assert c["max_write_zeroes_sectors"] > 0 and c["max_write_zeroes_seg"] >= 1
    assert c["discard_sector_alignment"] >= 1
    assert c["write_zeroes_may_unmap"] in (0, 1)
    assert dev.config()[57:60] == b"\0\0\0"  # unused1 padding


def test_config_follows_constructor() -> None:
    d = BlockDevice.in_memory(3 << 20, num_queues=4, queue_size=64)
    try:
        c = _config(d)
        assert c["capacity"] == (3 << 20) // SECTOR
        assert c["num_queues"] == 4
        assert c["seg_max"] == 62
        assert d.num_queues == 4 and d.max_queue_size == 64
    finally:
        d.close()


def test_capacity_rounds_down_partial_sector(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(SECTOR * 3 + 100))
    with pytest.raises(ConfigurationError, match="not a multiple of the 512-byte sector"):
        BlockDevice.open_image(str(path))
    d = BlockDevice.open_image(str(path), whole_sectors=False)   # a library caller may opt out
    try:
        assert _config(d)["capacity"] == 3
        r = Rig(d)
        assert r.request(T_IN, 2, read_len=SECTOR).status == S_OK
        assert r.request(T_IN, 3, read_len=SECTOR).status == S_IOERR
    finally:
        d.close()


def _bits(features: int) -> set[int]:
    return {b for b in range(64) if features >> b & 1}


def test_features_default(dev: BlockDevice) -> None:
    bits = _bits(dev.features())
    for b in (F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES,
              VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX):
        assert b in bits
    assert F_RO not in bits
    assert F_MQ not in bits


def test_features_ro_and_mq(image: Path) -> None:
    d = BlockDevice.open_image(str(image), read_only=True, num_queues=2)
    try:
        bits = _bits(d.features())
        assert {F_RO, F_MQ} <= bits
    finally:
        d.close()


def test_close_releases_fd(image: Path) -> None:
    d = BlockDevice.open_image(str(image))
    fd = d.fd
    d.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    d.close()  # idempotent


def test_borrowed_fd_is_not_closed(image: Path) -> None:
    fd = os.open(image, os.O_RDWR)
    try:
        d = BlockDevice(fd, owns_fd=False)
        d.close()
        os.fstat(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ IN / OUT


def test_read_write_round_trip(rig: Rig) -> None:
    data = pattern(3 * SECTOR, seed=7)
    w = rig.request(T_OUT, 5, data)
    assert (w.status, w.used_len) == (S_OK, 1)
    assert rig.image(5 * SECTOR, 3 * SECTOR) == data
    r = rig.request(T_IN, 5, read_len=3 * SECTOR)
    assert (r.status, r.used_len, r.data) == (S_OK, 3 * SECTOR + 1, data)


def test_multi_descriptor_buffers(rig: Rig) -> None:
    data = pattern(2 * SECTOR, seed=8)
    hdr = HDR.pack(T_OUT, 0, 10)
    # Header alone, then data in three uneven pieces.
    used_len, addrs = rig.submit([hdr, data[:100], data[100:700], data[700:]], [1])
    assert used_len == 1 and rig.mem.read(addrs[-1], 1) == bytes([S_OK])
    assert rig.image(10 * SECTOR, 2 * SECTOR) == data
    # Read it back into four writable buffers, the last one also carrying the status byte.
    used_len, addrs = rig.submit([HDR.pack(T_IN, 0, 10)], [1, 511, 300, 212 + 1])
    assert used_len == 2 * SECTOR + 1
    got = b"".join(rig.mem.read(a, n) for a, n in zip(addrs[1:], (1, 511, 300, 212), strict=True))
    assert got == data
    assert rig.mem.read(addrs[-1] + 212, 1) == bytes([S_OK])


def test_header_split_across_descriptors(rig: Rig) -> None:
    data = pattern(SECTOR, seed=9)
    hdr = HDR.pack(T_OUT, 0, 3)
    used_len, addrs = rig.submit([hdr[:5], hdr[5:] + data[:10], data[10:]], [1])
    assert used_len == 1 and rig.mem.read(addrs[-1], 1) == bytes([S_OK])
    assert rig.image(3 * SECTOR, SECTOR) == data
    hdr = HDR.pack(T_IN, 0, 3)
    used_len, addrs = rig.submit([hdr[:8], hdr[8:]], [SECTOR, 1])
    assert used_len == SECTOR + 1
    assert rig.mem.read(addrs[2], SECTOR) == data


def test_indirect_chains(rig: Rig) -> None:
    data = pattern(2 * SECTOR, seed=10)
    assert rig.request(T_OUT, 20, data, indirect=True).status == S_OK
    r = rig.request(T_IN, 20, read_len=2 * SECTOR, indirect=True)
    assert (r.status, r.used_len, r.data) == (S_OK, 2 * SECTOR + 1, data)


def test_status_in_same_buffer_as_data(rig: Rig) -> None:
    used_len, addrs = rig.submit([HDR.pack(T_IN, 0, 1)], [SECTOR + 1])
    assert used_len == SECTOR + 1
    assert rig.mem.read(addrs[1], SECTOR) == rig.image(SECTOR, SECTOR)
    assert rig.mem.read(addrs[1] + SECTOR, 1) == bytes([S_OK])


def test_zero_length_read_and_write(rig: Rig) -> None:
    assert rig.request(T_IN, SECTORS - 1).status == S_OK
    assert rig.request(T_OUT, 0).status == S_OK


def test_last_sector(rig: Rig) -> None:
    data = pattern(SECTOR, seed=11)
    assert rig.request(T_OUT, SECTORS - 1, data).status == S_OK
    assert rig.request(T_IN, SECTORS - 1, read_len=SECTOR).data == data


def test_many_requests_in_one_kick(rig: Rig) -> None:
    heads = []
    for i in range(10):
        head, _ = rig.rb.add_chain([HDR.pack(T_OUT, 0, i) + bytes([i]) * SECTOR], [1])
        heads.append(head)
    rig.dev.process_queue(0, rig.vq)
    assert rig.rb.get_used() == [(h, 1) for h in heads]
    for i in range(10):
        assert rig.image(i * SECTOR, SECTOR) == bytes([i]) * SECTOR


# ------------------------------------------------------------------ FLUSH, GET_ID


def test_flush(rig: Rig) -> None:
    r = rig.request(T_FLUSH)
    assert (r.status, r.used_len) == (S_OK, 1)
    assert rig.dev.stats.flushes == 1


def test_get_id_padded(rig: Rig) -> None:
    r = rig.request(T_GET_ID, read_len=20)
    assert (r.status, r.used_len) == (S_OK, 21)
    assert r.data == b"vhostpy-serial" + bytes(6)


def test_get_id_truncated(rig: Rig) -> None:
    r = rig.request(T_GET_ID, read_len=8)
    assert (r.status, r.used_len, r.data) == (S_OK, 9, b"vhostpy-")


def test_get_id_full_length_serial() -> None:
    d = BlockDevice.in_memory(IMAGE_SIZE, serial="s" * 20)
    try:
        r = Rig(d).request(T_GET_ID, read_len=20)
        assert (r.status, r.used_len, r.data) == (S_OK, 21, b"s" * 20)
    finally:
        d.close()


def test_get_id_larger_buffer(rig: Rig) -> None:
    # The id is 20 bytes; a larger buffer gets 20 bytes and the status at its last byte.
    used_len, addrs = rig.submit([HDR.pack(T_GET_ID, 0, 0)], [32])
    assert used_len == 21
    assert rig.mem.read(addrs[1], 20) == b"vhostpy-serial" + bytes(6)
    assert rig.mem.read(addrs[1] + 31, 1) == bytes([S_OK])


# ------------------------------------------------------------------ DISCARD, WRITE_ZEROES


def test_write_zeroes_zeroes_only_its_range(rig: Rig) -> None:
    before = rig.image()
    r = rig.segments(T_WRITE_ZEROES, (4, 3, 0))
    assert (r.status, r.used_len) == (S_OK, 1)
    after = rig.image()
    assert after[4 * SECTOR:7 * SECTOR] == bytes(3 * SECTOR)
    assert after[:4 * SECTOR] == before[:4 * SECTOR]
    assert after[7 * SECTOR:] == before[7 * SECTOR:]
    assert len(after) == IMAGE_SIZE


def test_write_zeroes_with_unmap(rig: Rig) -> None:
    before = rig.image()
    assert rig.segments(T_WRITE_ZEROES, (SECTORS - 2, 2, FLAG_UNMAP)).status == S_OK
    after = rig.image()
    assert after[-2 * SECTOR:] == bytes(2 * SECTOR)
    assert after[:-2 * SECTOR] == before[:-2 * SECTOR]


def test_discard(rig: Rig) -> None:
    before = rig.image()
    r = rig.segments(T_DISCARD, (8, 8, 0))
    assert (r.status, r.used_len) == (S_OK, 1)
    after = rig.image()
    # Discard is a hint: the range is either kept or reads back as zeroes, nothing else.
    assert after[8 * SECTOR:16 * SECTOR] in (before[8 * SECTOR:16 * SECTOR], bytes(8 * SECTOR))
    assert after[:8 * SECTOR] == before[:8 * SECTOR]
    assert after[16 * SECTOR:] == before[16 * SECTOR:]
    assert len(after) == IMAGE_SIZE


@pytest.mark.parametrize(
    ("rtype", "flags"),
    [(T_DISCARD, 2), (T_DISCARD, 0x80000000), (T_WRITE_ZEROES, 2), (T_WRITE_ZEROES, 3),
     (T_DISCARD, FLAG_UNMAP)],  # 5.2.6.2: UNMAP on a discard is UNSUPP
)
def test_discard_unknown_flags_unsupp(rig: Rig, rtype: int, flags: int) -> None:
    before = sha(rig.dev.fd)
    r = rig.segments(rtype, (0, 1, flags))
    assert (r.status, r.used_len) == (S_UNSUPP, 1)
    assert sha(rig.dev.fd) == before
    assert rig.dev.stats.unsupported == 1


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_discard_too_many_segments(rig: Rig, rtype: int) -> None:
    c = _config(rig.dev)
    max_seg = c["max_discard_seg"] if rtype == T_DISCARD else c["max_write_zeroes_seg"]
    before = sha(rig.dev.fd)
    segs = [(i, 1, 0) for i in range(max_seg + 1)]
    assert rig.segments(rtype, *segs).status == S_IOERR
    assert sha(rig.dev.fd) == before
    assert rig.segments(rtype, *segs[:max_seg]).status == S_OK


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
@pytest.mark.parametrize("payload", [b"", bytes(8), bytes(17)])
def test_discard_malformed_payload(rig: Rig, rtype: int, payload: bytes) -> None:
    before = sha(rig.dev.fd)
    assert rig.request(rtype, 0, payload).status == S_IOERR
    assert sha(rig.dev.fd) == before


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
@pytest.mark.parametrize(("sector", "num"), [(SECTORS, 1), (SECTORS - 1, 2), (2**63, 1),
                                             (2**64 - 1, 1), (0, SECTORS + 1)])
def test_discard_out_of_range(rig: Rig, rtype: int, sector: int, num: int) -> None:
    before = sha(rig.dev.fd)
    assert rig.segments(rtype, (sector, num, 0)).status == S_IOERR
    assert sha(rig.dev.fd) == before


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_discard_sector_limit_from_config(tmp_path: Path, rtype: int) -> None:
    # A sparse image larger than the per-segment limit, so only the limit can refuse.
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(3 << 30)
    d = BlockDevice.open_image(str(path))
    try:
        c = _config(d)
        limit = c["max_discard_sectors" if rtype == T_DISCARD else "max_write_zeroes_sectors"]
        assert limit < c["capacity"]
        rig = Rig(d)
        os.pwrite(d.fd, b"\xaa" * SECTOR, 0)
        for flags in (0, FLAG_UNMAP) if rtype == T_WRITE_ZEROES else (0,):
            assert rig.segments(rtype, (0, limit + 1, flags)).status == S_IOERR
        assert rig.image(0, SECTOR) == b"\xaa" * SECTOR
        assert os.fstat(d.fd).st_size == 3 << 30
        assert rig.segments(rtype, (0, 1, 0)).status == S_OK
    finally:
        d.close()


# ------------------------------------------------------------------ read-only


def test_read_only_refuses_writes(image: Path) -> None:
    d = BlockDevice.open_image(str(image), read_only=True)
    try:
        rig = Rig(d)
        before = sha(d.fd)
        for r in (rig.request(T_OUT, 0, bytes(SECTOR)),
                  rig.segments(T_DISCARD, (0, 1, 0)),
                  rig.segments(T_WRITE_ZEROES, (0, 1, 0))):
            assert (r.status, r.used_len) == (S_IOERR, 1)
        assert sha(d.fd) == before
        assert image.read_bytes() == pattern(IMAGE_SIZE)
        r = rig.request(T_IN, 0, read_len=SECTOR)
        assert (r.status, r.data) == (S_OK, pattern(IMAGE_SIZE)[:SECTOR])
        assert rig.request(T_FLUSH).status == S_OK
        assert d.stats.writes == 0 and d.stats.errors == 3
    finally:
        d.close()


# ------------------------------------------------------------------ hostile requests


@pytest.mark.parametrize(
    ("sector", "length"),
    [
        (SECTORS, SECTOR),            # sector == capacity
        (SECTORS - 1, 2 * SECTOR),    # sector + len > capacity
        (SECTORS + 1, 0),             # past the end even with no data
        (2**63, SECTOR),
        (2**64 - 1, SECTOR),
        (2**64 - 1, 0),
        (0, 100),                     # not a multiple of 512
        (0, SECTOR + 1),
        (0, (SECTORS + 1) * SECTOR),
    ],
)
def test_out_of_range_io(rig: Rig, sector: int, length: int) -> None:
    before = sha(rig.dev.fd)
    w = rig.request(T_OUT, sector, pattern(length, seed=3))
    assert (w.status, w.used_len) == (S_IOERR, 1)
    r = rig.request(T_IN, sector, read_len=length)
    assert (r.status, r.used_len) == (S_IOERR, 1)
    assert sha(rig.dev.fd) == before
    assert rig.dev.stats.errors == 2
    assert rig.dev.stats.writes == rig.dev.stats.reads == 0


def test_no_status_byte(rig: Rig) -> None:
    used_len, _ = rig.submit([HDR.pack(T_OUT, 0, 0) + bytes(SECTOR)], [])
    assert used_len == 0
    used_len, _ = rig.submit([HDR.pack(T_IN, 0, 0)], [0])  # writable, but zero bytes
    assert used_len == 0
    assert rig.dev.stats.errors == 2
    assert rig.image(0, SECTOR) == pattern(IMAGE_SIZE)[:SECTOR]
    assert rig.request(T_FLUSH).status == S_OK  # the queue still works


@pytest.mark.parametrize("header", [b"", b"\0" * 8, HDR.pack(T_IN, 0, 0)[:15]])
def test_short_header(rig: Rig, header: bytes) -> None:
    used_len, addrs = rig.submit([header] if header else [], [SECTOR, 1])
    assert used_len == 1
    assert rig.mem.read(addrs[-1], 1) == bytes([S_IOERR])


@pytest.mark.parametrize("rtype", [2, 3, 5, 99, 0xFFFFFFFF])
def test_unknown_type(rig: Rig, rtype: int) -> None:
    before = sha(rig.dev.fd)
    r = rig.request(rtype, 0, bytes(SECTOR))
    assert (r.status, r.used_len) == (S_UNSUPP, 1)
    assert sha(rig.dev.fd) == before
    assert rig.dev.stats.unsupported == 1 and rig.dev.stats.errors == 0


def test_stats(rig: Rig) -> None:
    rig.request(T_OUT, 0, bytes(2 * SECTOR))
    rig.request(T_IN, 0, read_len=3 * SECTOR)
    rig.request(T_IN, 0, read_len=SECTOR)
    rig.request(T_FLUSH)
    rig.request(T_IN, SECTORS, read_len=SECTOR)
    rig.request(77)
    s = rig.dev.stats
    assert (s.reads, s.bytes_read) == (2, 4 * SECTOR)
    assert (s.writes, s.bytes_written) == (1, 2 * SECTOR)
    assert (s.flushes, s.errors, s.unsupported) == (1, 1, 1)


def test_constants_match_spec() -> None:
    # blk.py must speak the spec's numbers (checked once here; the tests above use literals).
    assert (blk.VIRTIO_BLK_T_IN, blk.VIRTIO_BLK_T_OUT, blk.VIRTIO_BLK_T_FLUSH,
            blk.VIRTIO_BLK_T_GET_ID, blk.VIRTIO_BLK_T_DISCARD,
            blk.VIRTIO_BLK_T_WRITE_ZEROES) == (0, 1, 4, 8, 11, 13)
    assert (blk.VIRTIO_BLK_S_OK, blk.VIRTIO_BLK_S_IOERR, blk.VIRTIO_BLK_S_UNSUPP) == (0, 1, 2)
