"""Tests for vhostpy.protocol: one table of (message, wire bytes, fds), run both ways.

No sockets and no QEMU: fds are small integers, which is all they are to the codec. Expected
wire bytes are built with explicit struct formats typed from the spec, not with the codec's.
"""

from __future__ import annotations

import struct

import pytest

from vhostpy import protocol as p
from vhostpy.errors import ProtocolError
from vhostpy.protocol import BackendRequest as B
from vhostpy.protocol import Request as R

V1, REPLY, NEED = 0x1, 0x4, 0x8
UUID = bytes(range(16))


def h(req: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", req, flags, size)


def wire(req: int, flags: int, body: bytes = b"") -> bytes:
    return h(req, flags, len(body)) + body


def region(gpa: int, size: int, uaddr: int, off: int) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


REG0 = p.MemoryRegion(0, 0x8000_0000, 0x7F00_0000_0000, 0)
REG1 = p.MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x8000_0000)
REG0_B = region(0, 0x8000_0000, 0x7F00_0000_0000, 0)
REG1_B = region(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x8000_0000)
MEM2 = struct.pack("<II", 2, 0) + REG0_B + REG1_B

# (id, channel, message, wire bytes, fds)
CASES = [
    ("set_owner_hex", "frontend", p.request(R.SET_OWNER),
     bytes.fromhex("03000000" "01000000" "00000000"), ()),
    ("get_features", "frontend", p.request(R.GET_FEATURES), wire(1, V1), ()),
    ("get_features_reply", "frontend", p.reply(R.GET_FEATURES, p.U64(0x1_5000_0000)),
     wire(1, V1 | REPLY, struct.pack("<Q", 0x1_5000_0000)), ()),
    ("set_features_need_reply", "frontend",
     p.request(R.SET_FEATURES, p.U64(1 << 32), need_reply=True),
     wire(2, V1 | NEED, struct.pack("<Q", 1 << 32)), ()),
    ("reply_ack", "frontend", p.reply(R.SET_FEATURES, p.U64(0)), wire(2, V1 | REPLY, bytes(8)), ()),
    ("set_vring_num", "frontend", p.request(R.SET_VRING_NUM, p.VringState(1, 256)),
     wire(8, V1, struct.pack("<II", 1, 256)), ()),
    ("set_vring_addr", "frontend",
     p.request(R.SET_VRING_ADDR, p.VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x9000)),
     wire(9, V1, struct.pack("<IIQQQQ", 1, 1, 0x1000, 0x3000, 0x2000, 0x9000)), ()),
    ("get_vring_base", "frontend", p.request(R.GET_VRING_BASE, p.VringState(0, 0)),
     wire(11, V1, bytes(8)), ()),
    ("get_vring_base_reply", "frontend", p.reply(R.GET_VRING_BASE, p.VringState(0, 77)),
     wire(11, V1 | REPLY, struct.pack("<II", 0, 77)), ()),
    ("set_vring_kick", "frontend", p.request(R.SET_VRING_KICK, p.VringFd(1), fds=(5,)),
     wire(12, V1, struct.pack("<Q", 1)), (5,)),
    ("set_vring_call_nofd", "frontend", p.request(R.SET_VRING_CALL, p.VringFd(2, no_fd=True)),
     wire(13, V1, struct.pack("<Q", 0x102)), ()),
    ("set_vring_enable", "frontend",
     p.request(R.SET_VRING_ENABLE, p.VringState(0, 1), need_reply=True),
     wire(18, V1 | NEED, struct.pack("<II", 0, 1)), ()),
    ("set_mem_table", "frontend",
     p.request(R.SET_MEM_TABLE, p.MemTable((REG0, REG1)), fds=(10, 11), need_reply=True),
     wire(5, V1 | NEED, struct.pack("<II", 2, 0) + REG0_B + REG1_B), (10, 11)),
    ("set_mem_table_postcopy_ack", "frontend", p.request(R.SET_MEM_TABLE, p.MemTable(())),
     wire(5, V1, bytes(8)), ()),
    ("set_mem_table_postcopy_reply", "frontend", p.reply(R.SET_MEM_TABLE, p.MemTable((REG0,))),
     wire(5, V1 | REPLY, struct.pack("<II", 1, 0) + REG0_B), ()),
    ("add_mem_reg", "frontend", p.request(R.ADD_MEM_REG, p.MemRegionMsg(REG1), fds=(12,)),
     wire(37, V1, bytes(8) + REG1_B), (12,)),
    ("add_mem_reg_postcopy_ack", "frontend", p.request(R.ADD_MEM_REG, p.U64(0)),
     wire(37, V1, bytes(8)), ()),
    ("rem_mem_reg", "frontend", p.request(R.REM_MEM_REG, p.MemRegionMsg(REG1)),
     wire(38, V1, bytes(8) + REG1_B), ()),
    ("set_log_base", "frontend", p.request(R.SET_LOG_BASE, p.LogInfo(0x4000, 0), fds=(13,)),
     wire(6, V1, struct.pack("<QQ", 0x4000, 0)), (13,)),
    ("get_config", "frontend", p.request(R.GET_CONFIG, p.ConfigSpace(0, 4, 0, bytes(4))),
     wire(24, V1, struct.pack("<III", 0, 4, 0) + bytes(4)), ()),
    ("get_config_reply", "frontend", p.reply(R.GET_CONFIG, p.ConfigSpace(0, 4, 0, b"abcd")),
     wire(24, V1 | REPLY, struct.pack("<III", 0, 4, 0) + b"abcd"), ()),
    ("get_config_reply_error", "frontend", p.reply(R.GET_CONFIG, p.Empty()),
     wire(24, V1 | REPLY), ()),
    ("set_inflight_fd", "frontend",
     p.request(R.SET_INFLIGHT_FD, p.InflightInfo(8192, 0, 2, 128), fds=(14,)),
     wire(32, V1, struct.pack("<QQHH", 8192, 0, 2, 128) + bytes(4)), (14,)),
    ("get_inflight_fd_reply", "frontend",
     p.reply(R.GET_INFLIGHT_FD, p.InflightInfo(8192, 0, 2, 128), fds=(3,)),
     wire(31, V1 | REPLY, struct.pack("<QQHH4x", 8192, 0, 2, 128)), (3,)),
    ("iotlb_msg", "frontend",
     p.request(R.IOTLB_MSG, p.IotlbMsg(0x1000, 0x2000, 0x7F00_0000_0000, 3, 2), need_reply=True),
     wire(22, V1 | NEED,
          struct.pack("<QQQBB", 0x1000, 0x2000, 0x7F00_0000_0000, 3, 2) + bytes(6)), ()),
    ("set_device_state_fd", "frontend",
     p.request(R.SET_DEVICE_STATE_FD, p.DeviceStateTransfer(1, 0), fds=(15,)),
     wire(42, V1, struct.pack("<II", 1, 0)), (15,)),
    ("set_device_state_fd_reply", "frontend", p.reply(R.SET_DEVICE_STATE_FD, p.U64(0x100)),
     wire(42, V1 | REPLY, struct.pack("<Q", 0x100)), ()),
    ("get_shared_object", "frontend", p.request(R.GET_SHARED_OBJECT, p.SharedObject(UUID)),
     wire(41, V1, UUID), ()),
    ("crypto_session", "frontend", p.request(R.CREATE_CRYPTO_SESSION, p.RawPayload(b"\x01" * 40)),
     wire(26, V1, b"\x01" * 40), ()),
    ("postcopy_advise_reply", "frontend", p.reply(R.POSTCOPY_ADVISE, p.Empty(), fds=(4,)),
     wire(28, V1 | REPLY), (4,)),
    ("set_backend_req_fd", "frontend", p.request(R.SET_BACKEND_REQ_FD, fds=(16,), need_reply=True),
     wire(21, V1 | NEED), (16,)),
    ("check_device_state", "frontend", p.request(R.CHECK_DEVICE_STATE), wire(43, V1), ()),
    ("backend_iotlb_miss", "backend",
     p.request(B.IOTLB_MSG, p.IotlbMsg(0x5000, 0, 0, 1, 1), need_reply=True),
     wire(1, V1 | NEED, struct.pack("<QQQBB6x", 0x5000, 0, 0, 1, 1)), ()),
    ("backend_config_change", "backend", p.request(B.CONFIG_CHANGE_MSG), wire(2, V1), ()),
    ("backend_host_notifier", "backend",
     p.request(B.VRING_HOST_NOTIFIER_MSG, p.VringArea(3, False, 4096, 0), fds=(20,)),
     wire(3, V1, struct.pack("<QQQ", 3, 4096, 0)), (20,)),
    ("backend_vring_call", "backend", p.request(B.VRING_CALL, p.VringState(1, 0)),
     wire(4, V1, struct.pack("<II", 1, 0)), ()),
    ("backend_shared_object_lookup_reply", "backend",
     p.reply(B.SHARED_OBJECT_LOOKUP, p.U64(0), fds=(21,)), wire(8, V1 | REPLY, bytes(8)), (21,)),
    ("backend_reply_ack", "backend", p.reply(B.SHARED_OBJECT_ADD, p.U64(1)),
     wire(6, V1 | REPLY, struct.pack("<Q", 1)), ()),
]  # fmt: skip

IDS = [c[0] for c in CASES]
PAYLOAD_TYPES = {
    p.Empty, p.U64, p.VringState, p.VringAddr, p.VringFd, p.MemTable, p.MemRegionMsg, p.LogInfo,
    p.ConfigSpace, p.InflightInfo, p.IotlbMsg, p.VringArea, p.DeviceStateTransfer,
    p.SharedObject, p.RawPayload,
}  # fmt: skip


def drain(dec: p.Decoder) -> list[p.Message]:
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


def test_table_covers_every_payload_type() -> None:
    assert {type(c[2].payload) for c in CASES} == PAYLOAD_TYPES


@pytest.mark.parametrize(("name", "channel", "msg", "data", "fds"), CASES, ids=IDS)
def test_encode(name: str, channel: str, msg: p.Message, data: bytes, fds: tuple) -> None:
    assert p.encode(msg) == (data, fds)


@pytest.mark.parametrize(("name", "channel", "msg", "data", "fds"), CASES, ids=IDS)
def test_decode_whole(name: str, channel: str, msg: p.Message, data: bytes, fds: tuple) -> None:
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    dec.feed(data, fds)
    assert dec.next_message() == msg
    assert dec.next_message() is None
    assert dec.pending_bytes == 0
    assert dec.take_pending_fds() == ()
    assert p.decode_all(data, fds, channel) == [msg]  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "channel", "msg", "data", "fds"), CASES, ids=IDS)
def test_decode_byte_by_byte(
    name: str, channel: str, msg: p.Message, data: bytes, fds: tuple
) -> None:
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    for i in range(len(data)):
        dec.feed(data[i : i + 1], fds if i == 0 else ())
        got = dec.next_message()
        if i < len(data) - 1:
            assert got is None
            assert dec.pending_bytes == i + 1
    assert got == msg
    assert dec.pending_bytes == 0


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_back_to_back(i: int) -> None:
    _, channel, msg, data, fds = CASES[i]
    same = [c for c in CASES if c[1] == channel]
    _, _, msg2, data2, fds2 = same[(same.index(CASES[i]) + 1) % len(same)]
    # two sendmsg calls buffered before anything is decoded
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    dec.feed(data, fds)
    dec.feed(data2, fds2)
    assert drain(dec) == [msg, msg2]
    # one chunk holding both, as a UNIX stream read returns them: an fd-less message may
    # precede the one that carried fds, but the read ends with that one, so the fds belong
    # to the last message in the chunk (QEMU's SET_FEATURES + SET_VRING_CALL do this)
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    if channel == "frontend":
        extra = p.request(R.GET_FEATURES)
    else:
        extra = p.request(B.VRING_ERR, p.VringState(0, 0))
    dec.feed(p.encode(extra)[0] + data, fds)
    first, second = drain(dec)
    assert first == extra
    assert second == msg


@pytest.mark.parametrize(("name", "channel", "msg", "data", "fds"), CASES, ids=IDS)
def test_garbage_after_valid_message(
    name: str, channel: str, msg: p.Message, data: bytes, fds: tuple
) -> None:
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    # the read that carried fds ends with their message: garbage comes in the next read
    dec.feed(data, fds)
    dec.feed(b"\xde\xad\xbe\xef" * 4)
    assert dec.next_message() == msg
    with pytest.raises(ProtocolError) as e:
        dec.next_message()
    assert e.value.fatal  # the garbage header claims a payload of 0xefbeadde bytes
    # a complete but meaningless header is a non-fatal error
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    dec.feed(data, fds)
    dec.feed(bytes(12))
    assert dec.next_message() == msg
    with pytest.raises(ProtocolError, match="unknown request 0"):
        dec.next_message()
    assert dec.next_message() is None


# --- errors ---------------------------------------------------------------------------------


def decode_error(data: bytes, fds: tuple = (), channel: str = "frontend") -> ProtocolError:
    dec = p.Decoder(channel)  # type: ignore[arg-type]
    dec.feed(data, fds)
    with pytest.raises(ProtocolError) as e:
        dec.next_message()
    return e.value


def test_huge_size_is_fatal_and_sticky() -> None:
    dec = p.Decoder()
    dec.feed(h(R.SET_MEM_TABLE, V1, 0xFFFFFFFF), (7, 8))
    with pytest.raises(ProtocolError) as e:
        dec.next_message()
    err = e.value
    assert err.fatal and err.field == "size" and err.value == 0xFFFFFFFF
    assert "VHOST_USER_SET_MEM_TABLE" in str(err) and str(0xFFFFFFFF) in str(err)
    assert err.fds == (7, 8)
    dec.feed(wire(1, V1))
    for _ in range(2):
        with pytest.raises(ProtocolError) as e2:
            dec.next_message()
        assert e2.value.fatal and e2.value.fds == ()


@pytest.mark.parametrize("req", [99, 0, 44])
def test_unknown_request(req: int) -> None:
    err = decode_error(wire(req, V1 | NEED, bytes(8)), (3,))
    assert not err.fatal
    assert err.request == req and isinstance(err.request, int)
    assert f"unknown request {req}" in str(err)
    assert err.fds == (3,) and err.flags == V1 | NEED


def test_unknown_backend_request() -> None:
    err = decode_error(wire(9, V1), channel="backend")
    assert "unknown request 9" in str(err) and err.request == 9


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x6])
def test_wrong_version(flags: int) -> None:
    err = decode_error(wire(R.GET_FEATURES, flags))
    assert not err.fatal and err.field == "flags" and err.value == flags
    assert "VHOST_USER_GET_FEATURES" in str(err) and hex(flags) in str(err)
    assert err.request is R.GET_FEATURES


def test_truncated_payload_waits() -> None:
    data = wire(R.SET_VRING_ADDR, V1, bytes(40))
    for cut in (0, 5, 12, 13, 51):
        dec = p.Decoder()
        dec.feed(data[:cut])
        assert dec.next_message() is None
        assert dec.pending_bytes == cut
    dec.feed(data[cut:])
    assert dec.next_message() is not None
    with pytest.raises(ProtocolError, match="bytes"):
        p.decode_all(data[:20])


@pytest.mark.parametrize(
    ("req", "body", "field", "value"),
    [
        (R.SET_VRING_NUM, bytes(4), "size", 4),
        (R.SET_VRING_ADDR, bytes(39), "size", 39),
        (R.SET_FEATURES, bytes(7), "size", 7),
        (R.GET_FEATURES, bytes(8), "size", 8),
        (R.SET_INFLIGHT_FD, bytes(20), "size", 20),
        (R.IOTLB_MSG, bytes(26), "size", 26),
        (R.ADD_MEM_REG, bytes(32), "size", 32),
        (R.SET_MEM_TABLE, bytes(4), "size", 4),
    ],
)
def test_wrong_payload_size(req: R, body: bytes, field: str, value: int) -> None:
    err = decode_error(wire(req, V1, body))
    assert not err.fatal and err.request is req
    assert (err.field, err.value) == (field, value)
    assert p.request_name(req) in str(err) and f"size={value}" in str(err)


@pytest.mark.parametrize("size", [8, 8 + 32 * 8])
def test_mem_table_200_regions(size: int) -> None:
    body = struct.pack("<II", 200, 0) + REG0_B * ((size - 8) // 32)
    err = decode_error(wire(R.SET_MEM_TABLE, V1, body))
    assert not err.fatal and err.field == "nregions" and err.value == 200
    assert "VHOST_USER_SET_MEM_TABLE" in str(err) and "200" in str(err)


def test_mem_table_nregions_mismatch() -> None:
    body = struct.pack("<II", 2, 0) + REG0_B
    err = decode_error(wire(R.SET_MEM_TABLE, V1, body), (4, 5))
    assert err.field == "size" and err.value == 40
    assert "VHOST_USER_SET_MEM_TABLE" in str(err) and "nregions=2" in str(err)
    assert err.fds == (4, 5)


@pytest.mark.parametrize(
    ("reg", "field"),
    [
        (region(0, 0, 0x1000, 0), "memory_size"),
        (region(0xFFFF_FFFF_FFFF_F000, 0x2000, 0x1000, 0), "guest_phys_addr"),
        (region(0, 0x2000, 0xFFFF_FFFF_FFFF_F000, 0), "userspace_addr"),
    ],
)
def test_bad_memory_region(reg: bytes, field: str) -> None:
    err = decode_error(wire(R.ADD_MEM_REG, V1, bytes(8) + reg), (6,))
    assert err.field == field and "VHOST_USER_ADD_MEM_REG" in str(err)
    assert str(err.value) in str(err)


@pytest.mark.parametrize("size", [257, 1 << 20])
def test_config_too_big(size: int) -> None:
    body = struct.pack("<III", 0, size, 0) + bytes(min(size, 300))
    err = decode_error(wire(R.SET_CONFIG, V1, body))
    assert not err.fatal and err.field == "config.size" and err.value == size
    assert "VHOST_USER_SET_CONFIG" in str(err) and str(size) in str(err)


def test_config_size_mismatch() -> None:
    err = decode_error(wire(R.SET_CONFIG, V1, struct.pack("<III", 0, 8, 0) + bytes(4)))
    assert err.field == "size" and err.value == 16 and "config.size=8" in str(err)


def test_vring_fd_high_bits() -> None:
    err = decode_error(wire(R.SET_VRING_KICK, V1, struct.pack("<Q", 0x1_0000_0001)), (5,))
    assert err.field == "u64" and err.value == "0x100000001" and err.fds == (5,)
    assert "VHOST_USER_SET_VRING_KICK" in str(err) and "0x100000001" in str(err)


@pytest.mark.parametrize(
    ("data", "fds", "name", "count"),
    [
        (wire(R.SET_MEM_TABLE, V1, MEM2), (), "SET_MEM_TABLE", 0),
        (wire(R.SET_MEM_TABLE, V1, MEM2), (1, 2, 3), "SET_MEM_TABLE", 3),
        (wire(R.SET_VRING_KICK, V1, struct.pack("<Q", 0x100)), (5,), "SET_VRING_KICK", 1),
        (wire(R.SET_VRING_CALL, V1, struct.pack("<Q", 0)), (), "SET_VRING_CALL", 0),
        (wire(R.GET_FEATURES, V1), (5,), "GET_FEATURES", 1),
        (wire(R.SET_BACKEND_REQ_FD, V1), (), "SET_BACKEND_REQ_FD", 0),
        (wire(R.ADD_MEM_REG, V1, bytes(8) + REG0_B), (), "ADD_MEM_REG", 0),
        (wire(R.REM_MEM_REG, V1, bytes(8) + REG0_B), (1, 2), "REM_MEM_REG", 2),
        (wire(R.SET_DEVICE_STATE_FD, V1 | REPLY, bytes(8)), (), "SET_DEVICE_STATE_FD", 0),
    ],
)  # fmt: skip
def test_wrong_fd_count(data: bytes, fds: tuple, name: str, count: int) -> None:
    err = decode_error(data, fds)
    assert not err.fatal and err.field == "fds" and err.value == count and err.fds == fds
    assert f"VHOST_USER_{name}" in str(err) and f"{count} fds" in str(err)


def test_rem_mem_reg_tolerates_one_fd() -> None:
    (msg,) = p.decode_all(wire(R.REM_MEM_REG, V1, bytes(8) + REG0_B), (9,))
    assert msg.fds == (9,)


def test_ten_fds_is_fatal() -> None:
    dec = p.Decoder()
    dec.feed(wire(R.SET_MEM_TABLE, V1, struct.pack("<II", 1, 0) + REG0_B), tuple(range(10, 20)))
    with pytest.raises(ProtocolError) as e:
        dec.next_message()
    assert e.value.fatal and e.value.field == "fds" and e.value.value == 10
    assert "VHOST_USER_SET_MEM_TABLE" in str(e.value) and "10 fds" in str(e.value)
    assert e.value.fds == tuple(range(10, 20))
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_fds_accumulating_past_max_is_fatal() -> None:
    dec = p.Decoder()
    data = wire(R.SET_MEM_TABLE, V1, struct.pack("<II", 1, 0) + REG0_B)
    for i in range(9):
        dec.feed(data[i : i + 1], (100 + i,))
    with pytest.raises(ProtocolError) as e:
        dec.next_message()
    assert e.value.fatal and len(e.value.fds) == 9


def test_stream_resyncs_after_non_fatal_errors() -> None:
    good = wire(R.SET_VRING_KICK, V1, struct.pack("<Q", 3))
    bad = [
        wire(99, V1, bytes(8)),
        wire(R.GET_FEATURES, 0x2),
        wire(R.SET_VRING_NUM, V1, bytes(3)),
        wire(R.SET_VRING_CALL, V1, struct.pack("<Q", 0x200)),
        wire(R.SET_MEM_TABLE, V1, struct.pack("<II", 200, 0)),
    ]
    dec = p.Decoder()
    for b in bad:
        dec.feed(b, (1,))
    dec.feed(good, (2,))
    for _ in bad:
        with pytest.raises(ProtocolError) as e:
            dec.next_message()
        assert not e.value.fatal and e.value.fds == (1,)
    msg = dec.next_message()
    assert msg == p.request(R.SET_VRING_KICK, p.VringFd(3), fds=(2,))
    assert dec.next_message() is None and dec.pending_bytes == 0


def test_fds_go_to_first_incomplete_message() -> None:
    a = wire(R.SET_VRING_KICK, V1, struct.pack("<Q", 0))
    b = wire(R.SET_VRING_CALL, V1, struct.pack("<Q", 0))
    dec = p.Decoder()
    dec.feed(a, (7,))  # a is complete and not yet decoded; the next fds belong to b
    dec.feed(b[:3], (8,))
    dec.feed(b[3:])
    assert [m.fds for m in drain(dec)] == [(7,), (8,)]


def test_take_pending_fds_at_eof() -> None:
    dec = p.Decoder()
    dec.feed(wire(R.SET_VRING_KICK, V1, bytes(8))[:10], (3, 4))
    assert dec.next_message() is None
    assert dec.take_pending_fds() == (3, 4)
    assert dec.take_pending_fds() == ()


def test_encode_rejects_impossible_messages() -> None:
    with pytest.raises(ValueError):
        p.encode(p.request(R.SET_MEM_TABLE, p.MemTable((REG0,)), fds=tuple(range(9))))
    with pytest.raises(ValueError):
        p.encode(p.request(R.SET_CONFIG, p.ConfigSpace(0, 5, 0, b"abc")))


def test_message_properties() -> None:
    m = p.request(R.SET_FEATURES, p.U64(0), need_reply=True)
    assert (m.is_reply, m.need_reply, m.version) == (False, True, 1)
    r = p.reply(R.GET_FEATURES, p.U64(0))
    assert (r.is_reply, r.need_reply, r.version) == (True, False, 1)


def test_request_name() -> None:
    assert p.request_name(R.GET_FEATURES) == "VHOST_USER_GET_FEATURES"
    assert p.request_name(1) == "VHOST_USER_GET_FEATURES"
    assert p.request_name(21) == "VHOST_USER_SET_BACKEND_REQ_FD"
    assert p.request_name(B.IOTLB_MSG) == "VHOST_USER_BACKEND_IOTLB_MSG"
    assert p.request_name(99) == "unknown request 99"


# --- numbers from the pinned spec -----------------------------------------------------------

SPEC_REQUESTS = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9,
    "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13,
    "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16,
    "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18, "SEND_RARP": 19, "NET_SET_MTU": 20,
    "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23, "GET_CONFIG": 24,
    "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39,
    "GET_STATUS": 40, "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42,
    "CHECK_DEVICE_STATE": 43,
}  # fmt: skip
SPEC_BACKEND_REQUESTS = {
    "IOTLB_MSG": 1, "CONFIG_CHANGE_MSG": 2, "VRING_HOST_NOTIFIER_MSG": 3, "VRING_CALL": 4,
    "VRING_ERR": 5, "SHARED_OBJECT_ADD": 6, "SHARED_OBJECT_REMOVE": 7, "SHARED_OBJECT_LOOKUP": 8,
}  # fmt: skip
SPEC_PROTOCOL_FEATURE_BITS = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18,
    "DEVICE_STATE": 19,
}  # fmt: skip


def test_request_numbers_match_spec() -> None:
    assert {m.name: m.value for m in R} == SPEC_REQUESTS
    assert {m.name: m.value for m in B} == SPEC_BACKEND_REQUESTS
    assert R.SET_SLAVE_REQ_FD is R.SET_BACKEND_REQ_FD
    assert B.SLAVE_IOTLB_MSG is B.IOTLB_MSG and B.SLAVE_VRING_ERR is B.VRING_ERR


def test_protocol_feature_bits_match_spec() -> None:
    assert {m.name: m.value for m in p.ProtocolFeature} == {
        k: 1 << v for k, v in SPEC_PROTOCOL_FEATURE_BITS.items()
    }
    assert p.ProtocolFeature.SLAVE_REQ is p.ProtocolFeature.BACKEND_REQ
    assert p.ProtocolFeature.SLAVE_SEND_FD is p.ProtocolFeature.BACKEND_SEND_FD


def test_constants() -> None:
    assert (p.VHOST_USER_VERSION, p.HEADER_SIZE, p.HEADER.format) == (1, 12, "<III")
    assert (p.MAX_FDS, p.MAX_MEM_REGIONS, p.MAX_CONFIG_SIZE) == (8, 8, 256)
    assert p.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert (p.VRING_IDX_MASK, p.VRING_NOFD_MASK, p.VHOST_VRING_F_LOG) == (0xFF, 0x100, 0)
    assert (p.HeaderFlags.VERSION_MASK, p.HeaderFlags.VERSION_1) == (3, 1)
    assert (p.HeaderFlags.REPLY, p.HeaderFlags.NEED_REPLY) == (4, 8)
    assert p.MAX_PAYLOAD_SIZE >= 12 + p.MAX_CONFIG_SIZE
    assert "f6b615b52d1d" in p.SPEC_REVISION


def test_every_request_has_a_spec_row() -> None:
    assert set(p.REQUEST_SPECS) == set(R)
    assert set(p.BACKEND_REQUEST_SPECS) == set(B)
    for spec in [*p.REQUEST_SPECS.values(), *p.BACKEND_REQUEST_SPECS.values()]:
        for t in (spec.payload, spec.reply, *spec.alt_payloads, *spec.alt_replies):
            assert t is None or t in PAYLOAD_TYPES
        for lo, hi in (spec.fds, spec.reply_fds):
            assert 0 <= lo <= hi <= p.MAX_FDS


def test_spec_rows_follow_spec() -> None:
    rs = p.REQUEST_SPECS
    gets = [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
            R.GET_STATUS, R.POSTCOPY_END, R.CHECK_DEVICE_STATE, R.IOTLB_MSG]  # fmt: skip
    assert all(rs[r].reply is p.U64 for r in gets)
    assert rs[R.GET_VRING_BASE].reply is p.VringState
    assert rs[R.GET_CONFIG].reply is p.ConfigSpace
    assert rs[R.GET_INFLIGHT_FD].reply is p.InflightInfo
    assert rs[R.GET_INFLIGHT_FD].reply_fds == (0, 1)
    assert rs[R.POSTCOPY_ADVISE].reply_fds[1] == 1
    assert rs[R.SET_VRING_ENABLE].payload is p.VringState
    assert rs[R.REM_MEM_REG].fds == (0, 1)
    assert rs[R.SET_DEVICE_STATE_FD].fds == (1, 1)
    for r in (R.SET_FEATURES, R.SET_VRING_KICK, R.SET_MEM_TABLE, R.SET_OWNER):
        assert rs[r].reply is None
