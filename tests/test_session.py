"""The vhost-user back-end control plane (`Session`), driven without sockets or processes.

The test is the front-end and the guest driver at once: it builds `protocol.request(...)`
messages by hand, shares guest RAM as a memfd, lays out rings with `RingBuilder` over its own
mapping of that memfd (the "driver view"), and hands over eventfds for kick, call and err.
The session's host is a fake that records which kick fds it was asked to watch; a kick is
`Session.kick(index)`, exactly what a real host calls after reading the eventfd.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fakeloop import FakeLoop
from ringbuilder import RingBuilder, layout

from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.errors import ProtocolError
from vhostpy.memory import GuestMemory
from vhostpy.session import (
    DEFAULT_MAX_MEM_SLOTS,
    HANDLERS,
    SUPPORTED_PROTOCOL_FEATURES,
    Session,
)
from vhostpy.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_NEXT,
    DescriptorChain,
    Virtqueue,
)

R = p.Request
PF = p.ProtocolFeature
RAM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000          # where the "front-end process" has guest RAM mapped
RING_SIZE = 8
RING_STRIDE = 0x40000           # ring i and its buffers live at (i + 1) * RING_STRIDE
PROTOCOL_BIT = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
PACKED_BIT = 1 << 34            # VIRTIO_F_RING_PACKED: acked only by tests that build packed rings
DEVICE_BIT = 3                  # the echo device's one device-specific feature
EMPTY = p.Empty()


# ------------------------------------------------------------------ fakes


class EchoDevice(Device):
    """Two queues; each chain's readable bytes are copied into its writable buffers.

    Records every call the transport makes; `failing` holds queues whose process_queue raises.
    """

    name = "echo"
    num_queues = 2
    max_queue_size = 64
    supports_mtu = True
    supports_announce = True
    CONFIG = bytes(range(1, 11))

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[object, ...]] = []
        self.failing: set[int] = set()
        self.cfg = bytearray(self.CONFIG)

    def device_features(self) -> int:
        return 1 << DEVICE_BIT

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.events.append(("features", features))

    def config(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 8:
            super().write_config(offset, data)  # PermissionError: read-only part
        self.cfg[offset:offset + len(data)] = data

    def set_mtu(self, mtu: int) -> None:
        self.events.append(("mtu", mtu))

    def announce(self, mac: bytes) -> None:
        self.events.append(("announce", mac))

    def queue_started(self, index: int, vq: Virtqueue) -> None:
        self.events.append(("started", index))
        super().queue_started(index, vq)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        self.events.append(("stopped", index))

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        self.events.append(("process", index))
        if index in self.failing:
            raise RuntimeError("echo device bug")
        super().process_queue(index, vq)

    def handle_chain(self, index: int, vq: Virtqueue, chain: DescriptorChain) -> int:
        return chain.write(chain.read())

    def reset(self) -> None:
        super().reset()
        self.events.append(("reset",))

    def lifecycle(self, index: int) -> list[str]:
        """The started/stopped events of one queue, in order."""
        return [str(e[0]) for e in self.events if e[0] in ("started", "stopped") and e[1] == index]


def fired(fd: int) -> int:
    """How many times eventfd `fd` was signalled since the last call (0 if never)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


@dataclass
class DriverRing:
    index: int
    rb: RingBuilder
    kick: int          # our ends of the eventfds
    call: int
    err: int
    s_kick: int        # the duplicates the session was given (and owns)
    s_call: int
    s_err: int


class Rig:
    """Session + fake host + echo device + guest RAM + the driver's view of it."""

    def __init__(self, *, max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS) -> None:
        self.ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, RAM_SIZE)
        self.ours = [self.ram]
        self.driver = GuestMemory()
        self.driver.map_fd(self.ram, 0, RAM_SIZE, UVA, 0)
        self.device = EchoDevice()
        self.host = FakeLoop()
        self.session = Session(self.device, self.host, max_mem_slots=max_mem_slots)
        self.rings: dict[int, DriverRing] = {}

    def close(self) -> None:
        self.session.close()
        self.driver.clear()
        for fd in self.ours:
            os.close(fd)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ours.append(fd)
        return fd

    # -- messages --------------------------------------------------------------------------
    def send(self, req: p.Request | int, payload: p.Payload = EMPTY, *,
             fds: tuple[int, ...] | list[int] = (), need_reply: bool = False) -> list[p.Message]:
        """Send one request the way a connection does: encoded, then decoded (the decoder is
        where fd counts and payload layouts are checked, once), then handled."""
        msg = p.request(req, payload, fds=fds, need_reply=need_reply)  # type: ignore[arg-type]
        data, _ = p.encode(msg)
        decoder = p.Decoder("frontend")
        decoder.feed(data, msg.fds)
        try:
            decoded = decoder.next_message()
        except ProtocolError as err:
            replies = self.session.handle_error(err)
        else:
            assert decoded is not None
            replies = self.session.handle(decoded)
        for r in replies:
            assert r.is_reply and r.request == req and not r.need_reply
            p.encode(r)  # every reply must be encodable
        return replies

    def ack(self, req: p.Request, payload: p.Payload = EMPTY, *,
            fds: tuple[int, ...] | list[int] = ()) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated): the ack value, 0 = success."""
        replies = self.send(req, payload, fds=fds, need_reply=True)
        assert len(replies) == 1, replies
        assert isinstance(replies[0].payload, p.U64), replies
        return replies[0].payload.value

    def must(self, req: p.Request, payload: p.Payload = EMPTY, *,
             fds: tuple[int, ...] | list[int] = ()) -> None:
        """A request that must succeed (checked through REPLY_ACK once it is negotiated)."""
        replies = self.send(req, payload, fds=fds, need_reply=True)
        if PF.REPLY_ACK in self.session.protocol_features:
            assert replies == [p.reply(req, p.U64(0))], (req, payload, replies)
        else:
            assert replies == [], (req, replies)

    def get(self, req: p.Request, payload: p.Payload = EMPTY) -> p.Payload:
        """A request with its own reply; returns the reply payload."""
        replies = self.send(req, payload)
        assert len(replies) == 1, replies
        return replies[0].payload

    def u64(self, req: p.Request) -> int:
        payload = self.get(req)
        assert isinstance(payload, p.U64)
        return payload.value

    # -- scripted set-up -------------------------------------------------------------------
    def negotiate(self, *, protocol: bool = True, features: int | None = None,
                  packed: bool = False) -> None:
        offered = self.u64(R.GET_FEATURES)
        if protocol:
            self.must(R.SET_PROTOCOL_FEATURES, p.U64(self.u64(R.GET_PROTOCOL_FEATURES)))
        self.must(R.SET_OWNER)
        chosen = offered if features is None else features
        if not packed:
            chosen &= ~PACKED_BIT
        if not protocol:
            chosen &= ~PROTOCOL_BIT
        self.must(R.SET_FEATURES, p.U64(chosen))

    def region(self) -> p.MemoryRegion:
        return p.MemoryRegion(0, RAM_SIZE, UVA, 0)

    def mem_table(self) -> int:
        fd = os.dup(self.ram)
        self.must(R.SET_MEM_TABLE, p.MemTable((self.region(),)), fds=[fd])
        assert len(self.session.memory.regions) == 1
        return fd

    def setup_ring(self, index: int, *, enable: bool = True, base: int = 0,
                   kick: bool = True, size: int = RING_SIZE) -> DriverRing:
        lay = layout(size, base=(index + 1) * RING_STRIDE, data_size=0x10000)
        rb = RingBuilder(self.driver, size, lay)
        if base:
            rb.set_base(base)
        ring = DriverRing(index, rb, self.eventfd(), self.eventfd(), self.eventfd(), -1, -1, -1)
        self.must(R.SET_VRING_NUM, p.VringState(index, size))
        self.must(R.SET_VRING_BASE, p.VringState(index, base))
        self.must(R.SET_VRING_ADDR, p.VringAddr(index, 0, UVA + lay.desc, UVA + lay.used,
                                                UVA + lay.avail, 0))
        ring.s_call = os.dup(ring.call)
        self.must(R.SET_VRING_CALL, p.VringFd(index), fds=[ring.s_call])
        ring.s_err = os.dup(ring.err)
        self.must(R.SET_VRING_ERR, p.VringFd(index), fds=[ring.s_err])
        self.rings[index] = ring
        if kick:
            self.set_kick(index)
        if enable:
            self.must(R.SET_VRING_ENABLE, p.VringState(index, 1))
        return ring

    def set_kick(self, index: int) -> int:
        ring = self.rings[index]
        ring.s_kick = os.dup(ring.kick)
        self.must(R.SET_VRING_KICK, p.VringFd(index), fds=[ring.s_kick])
        assert ring.s_kick in self.host.watched
        return ring.s_kick

    def start(self, *rings: int, protocol: bool = True, features: int | None = None) -> None:
        self.negotiate(protocol=protocol, features=features)
        self.mem_table()
        for i in rings:
            self.setup_ring(i)

    # -- the guest driver ------------------------------------------------------------------
    def post(self, index: int, data: bytes) -> tuple[int, int]:
        """Publish one echo request; returns (head, address of the writable buffer)."""
        head, addrs = self.rings[index].rb.add_chain([data], [len(data)])
        return head, addrs[1]

    def echo(self, index: int, data: bytes) -> list[tuple[int, int]]:
        """Post, kick, and return the used entries that appeared."""
        head, out = self.post(index, data)
        self.session.kick(index)
        used = self.rings[index].rb.get_used()
        if used:
            assert used == [(head, len(data))]
            assert self.driver.read(out, len(data)) == data
        return used


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test ends with exactly the fds it started with: nothing the session kept leaks."""
    before = open_fds()
    yield
    gc.collect()  # mmaps still referenced by a view close when the view goes
    assert open_fds() - before == set()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


# ------------------------------------------------------------------ every handler, once


def test_every_handler_in_one_session(rig: Rig) -> None:
    """A whole front-end life cycle: each request in HANDLERS succeeds at least once."""
    done: set[p.Request] = set()

    def ok(req: p.Request, payload: p.Payload = EMPTY, fds: tuple[int, ...] = ()) -> None:
        spec = p.REQUEST_SPECS[req]
        replies = rig.send(req, payload, fds=fds, need_reply=True)
        if spec.reply is None:
            assert replies == [p.reply(req, p.U64(0))], req
        else:
            assert len(replies) == 1 and type(replies[0].payload) is spec.reply, req
        done.add(req)

    ok(R.GET_FEATURES)
    ok(R.GET_PROTOCOL_FEATURES)
    ok(R.SET_PROTOCOL_FEATURES, p.U64(rig.u64(R.GET_PROTOCOL_FEATURES)))
    ok(R.NET_SET_MTU, p.U64(1500))
    ok(R.SEND_RARP, p.U64(int.from_bytes(bytes.fromhex("525400123456"), "little")))
    assert ("announce", bytes.fromhex("525400123456")) in rig.device.events
    ok(R.GET_QUEUE_NUM)
    ok(R.SET_OWNER)
    ok(R.SET_FEATURES, p.U64(rig.session.offered_features() & ~PACKED_BIT))
    ok(R.GET_MAX_MEM_SLOTS)
    ok(R.SET_MEM_TABLE, p.MemTable((rig.region(),)), (os.dup(rig.ram),))
    ok(R.REM_MEM_REG, p.MemRegionMsg(rig.region()))
    ok(R.ADD_MEM_REG, p.MemRegionMsg(rig.region()), (os.dup(rig.ram),))
    ok(R.GET_CONFIG, p.ConfigSpace(0, 10, 0, bytes(10)))
    ok(R.SET_CONFIG, p.ConfigSpace(8, 2, 0, b"xy"))
    lay = layout(RING_SIZE, base=RING_STRIDE)
    rb = RingBuilder(rig.driver, RING_SIZE, lay)
    ok(R.SET_VRING_NUM, p.VringState(0, RING_SIZE))
    ok(R.SET_VRING_BASE, p.VringState(0, 0))
    ok(R.SET_VRING_ADDR, p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used, UVA + lay.avail, 0))
    ok(R.SET_VRING_CALL, p.VringFd(0), (os.dup(rig.eventfd()),))
    ok(R.SET_VRING_ERR, p.VringFd(0, no_fd=True))
    ok(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, RING_SIZE))
    [answer] = rig.send(R.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, RING_SIZE))
    assert isinstance(answer.payload, p.InflightInfo) and len(answer.fds) == 1
    ok(R.SET_INFLIGHT_FD, answer.payload, (os.dup(answer.fds[0]),))
    log_fd = os.memfd_create("log")
    os.ftruncate(log_fd, 4096)
    ok(R.SET_LOG_BASE, p.LogInfo(4096, 0), (log_fd,))
    kick = rig.eventfd()
    ok(R.SET_VRING_KICK, p.VringFd(0), (os.dup(kick),))
    ok(R.SET_VRING_ENABLE, p.VringState(0, 1))
    rb.add_chain([b"hello"], [5])
    rig.session.kick(0)
    assert len(rb.get_used()) == 1
    assert rig.session.rings[0].vq.inflight_tracked
    ok(R.GET_VRING_BASE, p.VringState(0, 0))
    ok(R.RESET_DEVICE)
    ok(R.RESET_OWNER)
    assert done == set(HANDLERS), set(HANDLERS) - done


# ------------------------------------------------------------------ features


def test_get_features(rig: Rig) -> None:
    offered = rig.u64(R.GET_FEATURES)
    assert offered == rig.device.features() | PROTOCOL_BIT | 1 << p.VHOST_F_LOG_ALL | PACKED_BIT
    assert offered >> DEVICE_BIT & 1 and offered >> VIRTIO_F_VERSION_1 & 1


def test_set_features_reaches_device_without_protocol_bit(rig: Rig) -> None:
    chosen = (1 << DEVICE_BIT) | (1 << VIRTIO_F_VERSION_1) | PROTOCOL_BIT
    assert rig.send(R.SET_FEATURES, p.U64(chosen)) == []
    assert rig.device.events == [("features", chosen & ~PROTOCOL_BIT)]
    assert rig.device.acked_features == chosen & ~PROTOCOL_BIT
    assert rig.session.features == chosen and rig.session.features_set


@pytest.mark.parametrize("bit", [0, 5, 27, 63])
def test_set_features_refuses_unoffered_bits(rig: Rig, bit: int) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    good = 1 << VIRTIO_F_VERSION_1
    assert rig.ack(R.SET_FEATURES, p.U64(good)) == 0
    assert rig.ack(R.SET_FEATURES, p.U64(good | 1 << bit)) == 1
    assert rig.session.features == good
    assert rig.device.events == [("features", good)]


def test_protocol_features(rig: Rig) -> None:
    offered = rig.u64(R.GET_PROTOCOL_FEATURES)
    # the echo device has an MTU and announces itself
    assert offered == int(SUPPORTED_PROTOCOL_FEATURES | PF.NET_MTU | PF.RARP)
    for need in (PF.MQ, PF.REPLY_ACK, PF.CONFIG):
        assert offered & need
    # XEN_MMAP is not modelled by the codec and must never be offered.
    assert not offered & PF.XEN_MMAP
    assert rig.send(R.SET_PROTOCOL_FEATURES, p.U64(offered | int(PF.PAGEFAULT))) == []
    assert rig.session.protocol_features == PF(0)
    assert rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.MQ))) == []
    assert rig.session.protocol_features == PF.MQ


def test_net_mtu_only_for_devices_with_an_mtu() -> None:
    class Plain(Device):
        pass

    session = Session(Plain(), FakeLoop())
    offered = session.handle(p.request(R.GET_PROTOCOL_FEATURES))[0].payload
    # no MTU, and (with no config space) no CONFIG either
    assert offered == p.U64(int(SUPPORTED_PROTOCOL_FEATURES & ~PF.CONFIG))
    assert not int(SUPPORTED_PROTOCOL_FEATURES) & PF.NET_MTU
    session.handle(p.request(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK))))
    replies = session.handle(p.request(R.NET_SET_MTU, p.U64(1500), need_reply=True))
    assert replies == [p.reply(R.NET_SET_MTU, p.U64(1))]
    session.close()


def test_config_offered_only_with_a_config_space() -> None:
    class WithConfig(Device):
        def config(self) -> bytes:
            return b"\x01\x02"

    for device, has_config in ((Device(), False), (WithConfig(), True)):
        session = Session(device, FakeLoop())
        offered = session.handle(p.request(R.GET_PROTOCOL_FEATURES))[0].payload
        assert isinstance(offered, p.U64)
        assert bool(offered.value & PF.CONFIG) is has_config
        session.close()


def test_net_set_mtu(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    assert rig.ack(R.NET_SET_MTU, p.U64(1500)) == 1  # NET_MTU not negotiated
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK | PF.NET_MTU)))
    assert rig.ack(R.NET_SET_MTU, p.U64(9000)) == 0
    assert rig.device.events == [("mtu", 9000)]


def test_get_queue_num(rig: Rig) -> None:
    assert rig.u64(R.GET_QUEUE_NUM) == 2


def test_set_owner(rig: Rig) -> None:
    assert not rig.session.owner
    assert rig.send(R.SET_OWNER) == []
    assert rig.session.owner


# ------------------------------------------------------------------ REPLY_ACK


def test_no_ack_without_reply_ack_negotiated(rig: Rig) -> None:
    # NEED_REPLY alone asks for nothing: REPLY_ACK was not negotiated.
    assert rig.send(R.SET_OWNER, need_reply=True) == []
    assert rig.send(R.SET_FEATURES, p.U64(1 << 0), need_reply=True) == []  # fails silently
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.MQ | PF.CONFIG)))
    assert rig.send(R.SET_OWNER, need_reply=True) == []


def test_reply_ack(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    # Success: ack 0 only when asked.
    assert rig.send(R.SET_OWNER) == []
    assert rig.send(R.SET_OWNER, need_reply=True) == [p.reply(R.SET_OWNER, p.U64(0))]
    # Failure: ack 1 when asked, silence otherwise.
    bad = p.U64(1 << 0)
    assert rig.send(R.SET_FEATURES, bad) == []
    assert rig.send(R.SET_FEATURES, bad, need_reply=True) == [p.reply(R.SET_FEATURES, p.U64(1))]
    # A request with its own reply gets exactly that reply, never an extra ack.
    replies = rig.send(R.GET_FEATURES, need_reply=True)
    assert replies == [p.reply(R.GET_FEATURES, p.U64(rig.session.offered_features()))]


@pytest.mark.parametrize("need_reply", [False, True])
@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (R.GET_VRING_BASE, p.VringState(7, 0)),              # no such ring
        (R.GET_CONFIG, p.ConfigSpace(250, 10, 0, bytes(10))),  # past 256 bytes
        (R.GET_CONFIG, p.ConfigSpace(2**32 - 1, 1, 0, b"\0")),
    ],
)
def test_failing_request_with_own_reply_gets_empty_payload(
        rig: Rig, req: p.Request, payload: p.Payload, need_reply: bool) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    assert rig.send(req, payload, need_reply=need_reply) == [p.reply(req, EMPTY)]


def test_reply_flag_on_a_request_is_refused(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    fd = os.eventfd(0)
    msg = p.Message(R.SET_VRING_CALL, int(p.HeaderFlags.VERSION_1 | p.HeaderFlags.REPLY
                                          | p.HeaderFlags.NEED_REPLY), p.VringFd(0), (fd,))
    assert rig.session.handle(msg) == []  # a reply is never answered
    assert is_closed(fd)
    assert rig.session.rings[0].call_fd is None


# ------------------------------------------------------------------ unsupported requests

_SAMPLE_PAYLOADS: dict[type, p.Payload] = {
    p.Empty: EMPTY,
    p.U64: p.U64(0),
    p.VringState: p.VringState(0, 0),
    p.LogInfo: p.LogInfo(0x1000, 0),
    p.IotlbMsg: p.IotlbMsg(0, 0x1000, UVA, p.IOTLB_ACCESS_RW, p.IOTLB_UPDATE),
    p.RawPayload: p.RawPayload(bytes(16)),
    p.InflightInfo: p.InflightInfo(0, 0, 1, 8),
    p.DeviceStateTransfer: p.DeviceStateTransfer(p.DEVICE_STATE_SAVE, 0),
    p.SharedObject: p.SharedObject(bytes(16)),
}
UNSUPPORTED = [r for r in p.Request if r not in HANDLERS]


def test_unsupported_list_is_not_empty() -> None:
    assert R.SET_LOG_FD in UNSUPPORTED and R.SET_VRING_ENDIAN in UNSUPPORTED
    assert R.SEND_RARP not in UNSUPPORTED
    assert R.SET_BACKEND_REQ_FD in UNSUPPORTED  # nothing in SUPPORTED_PROTOCOL_FEATURES needs it


@pytest.mark.parametrize("req", UNSUPPORTED, ids=lambda r: r.name)
@pytest.mark.parametrize("mode", ["no-ack", "ack", "ack+need-reply"])
def test_unsupported_requests_fail_explicitly(rig: Rig, req: p.Request, mode: str) -> None:
    if mode != "no-ack":
        rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    spec = p.REQUEST_SPECS[req]
    payload = _SAMPLE_PAYLOADS[spec.payload]
    fds = [os.eventfd(0) for _ in range(spec.fds[0])]
    replies = rig.send(req, payload, fds=fds, need_reply=mode == "ack+need-reply")
    assert all(is_closed(fd) for fd in fds)  # not kept: closed by the session
    for r in replies:
        assert r.payload != p.U64(0), "an unsupported request was acknowledged"
    if spec.reply is not None:
        assert replies == [p.reply(req, EMPTY)]
    elif mode == "ack+need-reply":
        assert replies == [p.reply(req, p.U64(1))]
    else:
        assert replies == []


def test_unknown_request_number(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    msg = p.Message(99, int(p.HeaderFlags.VERSION_1 | p.HeaderFlags.NEED_REPLY),  # type: ignore[arg-type]
                    EMPTY, ())
    replies = rig.session.handle(msg)
    assert [r.payload for r in replies] == [p.U64(1)]


# ------------------------------------------------------------------ decoder errors


def test_handle_error_from_decoder(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    fd = os.eventfd(0)
    # SET_VRING_CALL with a reserved bit set in its u64, asking for a reply.
    wire = p.HEADER.pack(int(R.SET_VRING_CALL), 0x1 | 0x8, 8) + (1 << 20).to_bytes(8, "little")
    dec = p.Decoder()
    dec.feed(wire, [fd])
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.fds == (fd,)
    assert rig.session.handle_error(info.value) == [p.reply(R.SET_VRING_CALL, p.U64(1))]
    assert is_closed(fd)


def test_handle_error_cases(rig: Rig) -> None:
    need = int(p.HeaderFlags.VERSION_1 | p.HeaderFlags.NEED_REPLY)
    plain = int(p.HeaderFlags.VERSION_1)

    def err(request: object, flags: int, *, fatal: bool = False) -> tuple[list[p.Message], int]:
        fd = os.eventfd(0)
        e = ProtocolError("bad", request=request, flags=flags, field="size", value=3,
                          fatal=fatal, fds=(fd,))
        replies = rig.session.handle_error(e)
        assert is_closed(fd)
        return replies, fd

    # Before REPLY_ACK: no ack, but a request with its own reply still gets an empty one.
    assert err(R.SET_FEATURES, need)[0] == []
    assert err(R.GET_CONFIG, plain)[0] == [p.reply(R.GET_CONFIG, EMPTY)]
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    assert err(R.SET_FEATURES, need)[0] == [p.reply(R.SET_FEATURES, p.U64(1))]
    assert err(R.SET_FEATURES, plain)[0] == []
    assert err(R.GET_VRING_BASE, need)[0] == [p.reply(R.GET_VRING_BASE, EMPTY)]
    assert err(R.SET_FEATURES, need, fatal=True)[0] == []  # the connection is dropped
    assert err(None, need)[0] == []                          # header unreadable
    replies, _ = err(1234, need)                              # unknown request number
    assert [r.payload for r in replies] == [p.U64(1)]
    # A rejected reply is never answered.
    assert err(R.SET_FEATURES, need | int(p.HeaderFlags.REPLY))[0] == []


# ------------------------------------------------------------------ memory table


def test_set_mem_table_closes_its_fd(rig: Rig) -> None:
    fd = rig.mem_table()
    assert is_closed(fd)  # mapped, then closed: the mapping keeps the memory
    region = rig.session.memory.regions[0]
    assert (region.guest_phys_addr, region.size, region.userspace_addr) == (0, RAM_SIZE, UVA)


def test_set_mem_table_replaces_table_and_live_ring_follows(rig: Rig) -> None:
    rig.start(0)
    assert rig.echo(0, b"one")
    half = RAM_SIZE // 2
    regions = (p.MemoryRegion(0, half, UVA, 0), p.MemoryRegion(half, half, UVA + half, half))
    fds = [os.dup(rig.ram), os.dup(rig.ram)]
    assert rig.ack(R.SET_MEM_TABLE, p.MemTable(regions), fds=fds) == 0
    assert all(is_closed(fd) for fd in fds)
    got = [(r.guest_phys_addr, r.size) for r in rig.session.memory.regions]
    assert got == [(0, half), (half, half)]
    assert rig.echo(0, b"two")
    # An empty table (QEMU's postcopy ack layout) is valid and leaves nothing mapped.
    rig.must(R.SET_MEM_TABLE, p.MemTable(()))
    assert len(rig.session.memory.regions) == 0


def test_set_mem_table_failure_clears_memory(rig: Rig) -> None:
    rig.start(0)
    ring = rig.rings[0]
    fd = os.dup(rig.ram)
    too_big = p.MemoryRegion(0, RAM_SIZE * 2, UVA, 0)  # past the end of the memfd
    assert rig.ack(R.SET_MEM_TABLE, p.MemTable((too_big,)), fds=[fd]) == 1
    assert is_closed(fd)
    assert len(rig.session.memory.regions) == 0
    # The live ring lost its memory: it is broken, the next kick reports it, nothing crashes.
    assert rig.session.rings[0].vq.error is not None
    rig.session.kick(0)
    assert fired(ring.err) == 1


def test_set_mem_table_fd_count_mismatch(rig: Rig) -> None:
    rig.negotiate()
    fds = [os.dup(rig.ram), os.dup(rig.ram)]
    assert rig.ack(R.SET_MEM_TABLE, p.MemTable((rig.region(),)), fds=fds) == 1
    assert all(is_closed(fd) for fd in fds)
    assert rig.ack(R.SET_MEM_TABLE, p.MemTable((rig.region(),))) == 1


def test_add_rem_mem_reg_and_slot_limit() -> None:
    rig = Rig(max_mem_slots=2)
    try:
        rig.negotiate()
        assert rig.u64(R.GET_MAX_MEM_SLOTS) == 2
        half = RAM_SIZE // 2
        a = p.MemoryRegion(0, half, UVA, 0)
        b = p.MemoryRegion(half, half, UVA + half, half)
        c = p.MemoryRegion(0x4000_0000, 0x1000, UVA + 0x4000_0000, 0)
        fd = os.dup(rig.ram)
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(a), fds=[fd]) == 0
        assert is_closed(fd)
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(b), fds=[os.dup(rig.ram)]) == 0
        # A ring spanning both regions' address space works.
        rig.setup_ring(0)
        rig.setup_ring(1)
        assert rig.echo(0, b"a") and rig.echo(1, b"b")
        fd = os.dup(rig.ram)
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(c), fds=[fd]) == 1  # slots full
        assert is_closed(fd)
        # Removing the region under ring 1 breaks only ring 1.
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(b)) == 0
        assert [r.guest_phys_addr for r in rig.session.memory.regions] == [0]
        assert rig.echo(0, b"still")
        rig.post(1, b"gone")
        rig.session.kick(1)
        assert fired(rig.rings[1].err) == 1
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(c), fds=[os.dup(rig.ram)]) == 0
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(b)) == 1  # already gone
        # Overlap, missing fd, and the postcopy u64 layout are refused.
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(c)) == 0
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(p.MemoryRegion(0, half // 2, UVA, 0)),
                       fds=[os.dup(rig.ram)]) == 1
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(b)) == 1
        assert rig.ack(R.ADD_MEM_REG, p.U64(int(R.ADD_MEM_REG))) == 1
        assert len(rig.session.memory.regions) == 1
    finally:
        rig.close()


def test_duplicate_add_mem_reg_is_counted_like_qemu_7_multiqueue() -> None:
    """QEMU < 8.0 sends ADD/REM_MEM_REG once per queue pair: the same region N times."""
    rig = Rig(max_mem_slots=1)
    try:
        rig.negotiate()
        a = p.MemoryRegion(0, RAM_SIZE, UVA, 0)
        for _ in range(2):
            fd = os.dup(rig.ram)
            assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(a), fds=[fd]) == 0
            assert is_closed(fd)
        assert len(rig.session.memory.regions) == 1  # one mapping, and the one slot suffices
        rig.setup_ring(0)
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(a)) == 0  # the duplicate goes first
        assert rig.echo(0, b"still mapped")
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(a)) == 0
        assert len(rig.session.memory.regions) == 0
        assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(a)) == 1
        # Same addresses but another mmap_offset is an overlap, not a duplicate.
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(a), fds=[os.dup(rig.ram)]) == 0
        moved = p.MemoryRegion(0, RAM_SIZE // 2, UVA, RAM_SIZE // 2)
        assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(moved), fds=[os.dup(rig.ram)]) == 1
    finally:
        rig.close()


# ------------------------------------------------------------------ vring configuration


def test_vring_requests_validate(rig: Rig) -> None:
    rig.negotiate()
    rig.mem_table()
    lay = layout(RING_SIZE, base=RING_STRIDE)
    RingBuilder(rig.driver, RING_SIZE, lay)
    addr = p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used, UVA + lay.avail, 0)
    # SET_VRING_ADDR before SET_VRING_NUM.
    assert rig.ack(R.SET_VRING_ADDR, addr) == 1
    for n in (0, 3, 12, 128, 2**31):  # not a power of two, or above max_queue_size (64)
        assert rig.ack(R.SET_VRING_NUM, p.VringState(0, n)) == 1
    assert rig.ack(R.SET_VRING_NUM, p.VringState(2, 8)) == 1  # no such ring
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 64)) == 0
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, RING_SIZE)) == 0
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0x10000)) == 1
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0xFFFF)) == 0
    assert rig.ack(R.SET_VRING_BASE, p.VringState(0, 0)) == 0
    # Flags other than VHOST_VRING_F_LOG; addresses outside guest RAM are refused.
    flagged = p.VringAddr(0, 2, addr.desc_user_addr, addr.used_user_addr,
                          addr.avail_user_addr, 0)
    assert rig.ack(R.SET_VRING_ADDR, flagged) == 1
    unmapped = p.VringAddr(0, 0, UVA + RAM_SIZE, addr.used_user_addr, addr.avail_user_addr, 0)
    assert rig.ack(R.SET_VRING_ADDR, unmapped) == 1
    misaligned = p.VringAddr(0, 0, addr.desc_user_addr + 8, addr.used_user_addr,
                             addr.avail_user_addr, 0)
    assert rig.ack(R.SET_VRING_ADDR, misaligned) == 1
    assert rig.session.vring_addr(0) is None
    assert rig.ack(R.SET_VRING_ADDR, addr) == 0
    assert rig.ack(R.SET_VRING_ADDR, unmapped) == 1
    assert rig.session.vring_addr(0) == addr  # a failed update keeps the old addresses
    assert rig.ack(R.SET_VRING_ENABLE, p.VringState(0, 2)) == 1
    assert rig.ack(R.SET_VRING_ENABLE, p.VringState(5, 1)) == 1


def test_vring_fd_requests(rig: Rig) -> None:
    rig.negotiate()
    fd = os.eventfd(0)
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(5), fds=[fd]) == 1  # no such ring
    assert is_closed(fd)
    fd = os.eventfd(0)
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(0, no_fd=True), fds=[fd]) == 1  # NOFD + fd
    assert is_closed(fd)
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(0)) == 1  # fd missing
    assert rig.ack(R.SET_VRING_KICK, p.VringFd(0, no_fd=True)) == 1  # polling: unsupported
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(0, no_fd=True)) == 0
    assert rig.ack(R.SET_VRING_ERR, p.VringFd(0, no_fd=True)) == 0
    assert rig.host.calls == []
    # Replacing call/err closes the previous fd.
    first, second = os.eventfd(0), os.eventfd(0)
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(1), fds=[first]) == 0
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(1), fds=[second]) == 0
    assert is_closed(first) and not is_closed(second)
    first = os.eventfd(0)
    assert rig.ack(R.SET_VRING_ERR, p.VringFd(1), fds=[first]) == 0
    assert rig.ack(R.SET_VRING_ERR, p.VringFd(1, no_fd=True)) == 0
    assert is_closed(first)
    assert rig.session.rings[1].err_fd is None


def test_replacing_kick_fd(rig: Rig) -> None:
    rig.start(0)
    old = rig.rings[0].s_kick
    new = rig.set_kick(0)
    assert ("unwatch", old) in rig.host.calls
    assert is_closed(old)
    assert list(rig.host.watched) == [new]
    assert os.get_blocking(new) is False
    assert rig.echo(0, b"after")
    assert rig.device.lifecycle(0) == ["started"]


# ------------------------------------------------------------------ ring start and stop


def test_ring_waits_for_enable_with_protocol_features(rig: Rig) -> None:
    rig.start()
    ring = rig.setup_ring(0, enable=False)
    head, _ = rig.post(0, b"early")
    rig.session.kick(0)
    assert ring.rb.get_used() == []
    assert rig.device.lifecycle(0) == []
    assert fired(ring.call) == 0
    assert rig.ack(R.SET_VRING_ENABLE, p.VringState(0, 1)) == 0
    assert rig.device.lifecycle(0) == ["started"]
    assert ring.rb.get_used() == [(head, 5)]  # served at start, without another kick
    assert fired(ring.call) == 1
    assert rig.device.lifecycle(1) == []


def test_enable_before_kick(rig: Rig) -> None:
    rig.start()
    rig.setup_ring(0, kick=False, enable=True)
    assert rig.device.lifecycle(0) == []
    rig.set_kick(0)
    assert rig.device.lifecycle(0) == ["started"]
    assert rig.echo(0, b"x")


def test_ring_starts_on_kick_without_protocol_features(rig: Rig) -> None:
    rig.start(protocol=False)
    assert not rig.session.features & PROTOCOL_BIT
    ring = rig.setup_ring(0, kick=False, enable=False)
    assert rig.device.lifecycle(0) == []
    rig.set_kick(0)
    assert rig.device.lifecycle(0) == ["started"]
    assert rig.echo(0, b"implicit")
    assert fired(ring.call) == 1


def test_kick_fd_before_addresses(rig: Rig) -> None:
    # Without protocol features a ring is live once it has a kick fd AND addresses.
    rig.start(protocol=False)
    lay = layout(RING_SIZE, base=RING_STRIDE)
    rb = RingBuilder(rig.driver, RING_SIZE, lay)
    rig.must(R.SET_VRING_NUM, p.VringState(0, RING_SIZE))
    kick = os.dup(rig.eventfd())
    rig.must(R.SET_VRING_KICK, p.VringFd(0), fds=[kick])
    assert rig.device.lifecycle(0) == []
    rig.must(R.SET_VRING_ADDR, p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used,
                                           UVA + lay.avail, 0))
    assert rig.device.lifecycle(0) == ["started"]
    rb.add_chain([b"q"], [1])
    rig.session.kick(0)
    assert len(rb.get_used()) == 1


def test_set_vring_enable_0_stops_serving(rig: Rig) -> None:
    rig.start(0, 1)
    ring = rig.rings[0]
    assert rig.echo(0, b"on")
    fired(ring.call)
    assert rig.ack(R.SET_VRING_ENABLE, p.VringState(0, 0)) == 0
    assert rig.device.lifecycle(0) == ["started", "stopped"]
    head, _ = rig.post(0, b"off")
    rig.session.kick(0)
    assert ring.rb.get_used() == []
    assert fired(ring.call) == 0
    assert rig.echo(1, b"other ring unaffected")
    # A live ring cannot be resized or rebased; a disabled one can be.
    assert rig.ack(R.SET_VRING_NUM, p.VringState(1, 16)) == 1
    assert rig.ack(R.SET_VRING_BASE, p.VringState(1, 0)) == 1
    assert rig.ack(R.SET_VRING_ENABLE, p.VringState(0, 1)) == 0
    assert rig.device.lifecycle(0) == ["started", "stopped", "started"]
    assert ring.rb.get_used() == [(head, 3)]


def test_get_vring_base_stops_ring_and_returns_next_avail(rig: Rig) -> None:
    rig.start(0, 1)
    ring = rig.rings[0]
    for i in range(3):
        assert rig.echo(0, b"req%d" % i)
    kick = ring.s_kick
    reply = rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
    assert reply == p.VringState(0, 3)
    assert rig.device.lifecycle(0) == ["started", "stopped"]
    assert ("unwatch", kick) in rig.host.calls
    assert is_closed(kick)
    assert kick not in rig.host.watched
    assert rig.session.rings[0].kick_fd is None
    # Stopped: a kick serves nothing.
    rig.post(0, b"late")
    rig.session.kick(0)
    assert ring.rb.get_used() == []
    assert rig.device.lifecycle(1) == ["started"]
    # The front-end restarts the ring where it stopped (as after a migration or reconnect).
    rb = ring.rb
    lay = rb.lay
    rig.must(R.SET_VRING_NUM, p.VringState(0, RING_SIZE))
    rig.must(R.SET_VRING_BASE, p.VringState(0, 3))
    rig.must(R.SET_VRING_ADDR, p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used,
                                           UVA + lay.avail, 0))
    rig.set_kick(0)
    rig.must(R.SET_VRING_ENABLE, p.VringState(0, 1))
    assert rig.device.lifecycle(0) == ["started", "stopped", "started"]
    assert len(rb.get_used()) == 1  # "late" was served at restart
    assert rb.used_idx == 4


def test_get_vring_base_of_unstarted_ring(rig: Rig) -> None:
    rig.negotiate()
    rig.must(R.SET_VRING_BASE, p.VringState(1, 1234))
    assert rig.get(R.GET_VRING_BASE, p.VringState(1, 0)) == p.VringState(1, 1234)
    assert rig.device.lifecycle(1) == []


def test_set_features_without_protocol_bit_makes_rings_implicitly_enabled(rig: Rig) -> None:
    rig.start()
    rig.setup_ring(0, enable=False)
    assert rig.device.lifecycle(0) == []
    rig.must(R.SET_FEATURES, p.U64(rig.session.offered_features() & ~PROTOCOL_BIT & ~PACKED_BIT))
    assert rig.device.lifecycle(0) == ["started"]
    rig.must(R.SET_FEATURES, p.U64(rig.session.offered_features() & ~PACKED_BIT))
    assert rig.device.lifecycle(0) == ["started", "stopped"]


# ------------------------------------------------------------------ interrupts


def test_call_respects_no_interrupt(rig: Rig) -> None:
    rig.start(0, features=rig.session.offered_features() & ~(1 << VIRTIO_RING_F_EVENT_IDX))
    ring = rig.rings[0]
    assert not rig.session.rings[0].vq.event_idx
    assert rig.echo(0, b"a")
    assert fired(ring.call) == 1
    ring.rb.set_no_interrupt(True)
    assert rig.echo(0, b"b")
    assert fired(ring.call) == 0
    ring.rb.set_no_interrupt(False)
    assert rig.echo(0, b"c")
    assert fired(ring.call) == 1


def test_call_respects_used_event(rig: Rig) -> None:
    rig.start(0)
    ring = rig.rings[0]
    assert rig.session.rings[0].vq.event_idx
    assert rig.echo(0, b"a")         # used idx 1: the first signal always goes out
    assert fired(ring.call) == 1
    ring.rb.set_used_event(5)        # "interrupt me once used idx passes 5"
    assert rig.echo(0, b"b")         # used idx 2
    assert fired(ring.call) == 0
    ring.rb.set_used_event(2)
    assert rig.echo(0, b"c")         # used idx 3 crosses 2
    assert fired(ring.call) == 1
    ring.rb.set_no_interrupt(True)   # ignored under EVENT_IDX
    ring.rb.set_used_event(3)
    assert rig.echo(0, b"d")
    assert fired(ring.call) == 1


def test_call_fd_removed_and_restored(rig: Rig) -> None:
    rig.start(0)
    ring = rig.rings[0]
    old = ring.s_call
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(0, no_fd=True)) == 0
    assert is_closed(old)
    assert rig.echo(0, b"quiet")
    assert fired(ring.call) == 0
    assert rig.ack(R.SET_VRING_CALL, p.VringFd(0), fds=[os.dup(ring.call)]) == 0
    assert rig.echo(0, b"loud")
    assert fired(ring.call) == 1


# ------------------------------------------------------------------ failures stay local


def test_device_exception_breaks_only_its_ring(rig: Rig) -> None:
    rig.start(0, 1)
    rig.device.failing.add(0)
    rig.post(0, b"boom")
    rig.session.kick(0)
    assert rig.session.rings[0].vq.error is not None
    assert fired(rig.rings[0].err) == 1
    rig.session.kick(0)  # reported once, not per kick
    assert fired(rig.rings[0].err) == 0
    assert rig.echo(1, b"fine")
    assert fired(rig.rings[1].err) == 0
    assert rig.u64(R.GET_QUEUE_NUM) == 2  # the session keeps answering


def test_hostile_ring_loop(rig: Rig) -> None:
    rig.start(0, 1)
    rb = rig.rings[0].rb
    buf = rb.alloc(16)
    rb.write_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 1)
    rb.write_desc(1, buf, 16, VIRTQ_DESC_F_NEXT, 0)
    rb.publish(0)
    rig.session.kick(0)
    assert "loop" in (rig.session.rings[0].vq.error or "")
    assert fired(rig.rings[0].err) == 1
    assert rb.get_used() == []
    assert rig.echo(1, b"unaffected")
    assert fired(rig.rings[1].err) == 0


def test_hostile_ring_buffer_outside_memory(rig: Rig) -> None:
    rig.start(0, 1)
    rb = rig.rings[0].rb
    rb.write_desc(0, RAM_SIZE - 8, 64, 0)  # runs off the end of guest RAM
    rb.publish(0)
    rig.session.kick(0)
    assert rig.session.rings[0].vq.error is not None
    assert fired(rig.rings[0].err) == 1
    assert rig.echo(1, b"unaffected")


def test_hostile_avail_idx(rig: Rig) -> None:
    rig.start(0, 1)
    rig.rings[0].rb.set_avail_idx(RING_SIZE + 1)  # more entries than the ring holds
    rig.session.kick(0)
    assert fired(rig.rings[0].err) == 1
    assert rig.echo(1, b"unaffected")


def test_broken_ring_recovers_after_restart(rig: Rig) -> None:
    rig.start(0)
    rb = rig.rings[0].rb
    rb.write_desc(0, RAM_SIZE * 4, 1, 0)
    rb.publish(0)
    rig.session.kick(0)
    assert fired(rig.rings[0].err) == 1
    base = rig.get(R.GET_VRING_BASE, p.VringState(0, 0))
    assert base == p.VringState(0, 0)  # the broken chain was never consumed
    # The driver repairs the descriptor and the front-end restarts the ring past nothing.
    rb.write_desc(0, rb.alloc(b"fixed"), 5, 0)
    lay = rb.lay
    rig.must(R.SET_VRING_NUM, p.VringState(0, RING_SIZE))
    rig.must(R.SET_VRING_ADDR, p.VringAddr(0, 0, UVA + lay.desc, UVA + lay.used,
                                           UVA + lay.avail, 0))
    rig.set_kick(0)
    rig.must(R.SET_VRING_ENABLE, p.VringState(0, 1))
    assert rig.session.rings[0].vq.error is None
    assert rb.get_used() == [(0, 0)]  # readable-only chain: nothing written back
    rig.post(0, b"again")
    rig.session.kick(0)
    assert fired(rig.rings[0].err) == 0


# ------------------------------------------------------------------ config space


def test_get_config(rig: Rig) -> None:
    assert rig.get(R.GET_CONFIG, p.ConfigSpace(0, 10, 0, bytes(10))) == \
        p.ConfigSpace(0, 10, 0, EchoDevice.CONFIG)
    # Past the device's bytes (but within 256) reads as zero padding; flags are echoed.
    assert rig.get(R.GET_CONFIG, p.ConfigSpace(4, 20, 1, bytes(20))) == \
        p.ConfigSpace(4, 20, 1, EchoDevice.CONFIG[4:] + bytes(14))
    assert rig.get(R.GET_CONFIG, p.ConfigSpace(246, 10, 0, bytes(10))) == \
        p.ConfigSpace(246, 10, 0, bytes(10))
    assert rig.get(R.GET_CONFIG, p.ConfigSpace(0, 256, 0, bytes(256))).size == 256  # type: ignore[union-attr]
    assert rig.get(R.GET_CONFIG, p.ConfigSpace(1, 256, 0, bytes(256))) == EMPTY


def test_set_config(rig: Rig) -> None:
    rig.send(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK | PF.CONFIG)))
    assert rig.ack(R.SET_CONFIG, p.ConfigSpace(8, 2, 0, b"xy")) == 0
    assert rig.device.cfg[8:] == b"xy"
    assert rig.ack(R.SET_CONFIG, p.ConfigSpace(0, 1, 0, b"z")) == 1    # read-only part
    assert rig.ack(R.SET_CONFIG, p.ConfigSpace(9, 2, 0, b"zz")) == 1   # past the end
    assert rig.ack(R.SET_CONFIG, p.ConfigSpace(2**32 - 1, 1, 0, b"z")) == 1
    assert bytes(rig.device.cfg) == EchoDevice.CONFIG[:8] + b"xy"


# ------------------------------------------------------------------ reset and close


@pytest.mark.parametrize("req", [R.RESET_DEVICE, R.RESET_OWNER], ids=lambda r: r.name)
def test_reset(rig: Rig, req: p.Request) -> None:
    rig.start(0, 1)
    kept = [fd for r in rig.rings.values() for fd in (r.s_kick, r.s_call, r.s_err)]
    protocol = rig.session.protocol_features
    assert rig.ack(req) == 0
    assert all(is_closed(fd) for fd in kept)
    assert rig.host.watched == {}
    for i in (0, 1):
        assert rig.device.lifecycle(i) == ["started", "stopped"]
        assert not rig.session.rings[i].live and rig.session.rings[i].kick_fd is None
    assert rig.device.events[-1] == ("reset",)
    assert rig.session.features == 0 and rig.device.acked_features == 0
    assert rig.session.protocol_features == protocol
    rig.post(0, b"x")
    rig.session.kick(0)
    assert rig.rings[0].rb.get_used() == []
    # The device can be brought up again on the same session.
    rig.must(R.SET_FEATURES, p.U64(rig.session.offered_features() & ~PACKED_BIT))
    rig.rings[0].rb.get_used()
    ring = rig.setup_ring(1)
    assert rig.echo(1, b"again")
    assert fired(ring.call) == 1


def test_close_releases_everything() -> None:
    rig = Rig()
    try:
        rig.start(0, 1)
        kept = [fd for r in rig.rings.values() for fd in (r.s_kick, r.s_call, r.s_err)]
        assert all(not is_closed(fd) for fd in kept)
        rig.session.close()
        assert [fd for fd in kept if not is_closed(fd)] == []
        assert rig.host.watched == {}
        assert len(rig.session.memory.regions) == 0
        assert rig.device.events[-1] == ("reset",)
        assert all(rig.device.lifecycle(i) == ["started", "stopped"] for i in (0, 1))
        rig.session.close()  # idempotent
    finally:
        rig.close()


def test_mem_slot_requests_need_configure_mem_slots(rig: Rig) -> None:
    """ADD/REM_MEM_REG belong to the CONFIGURE_MEM_SLOTS protocol feature: refused without it."""
    rig.must(R.SET_PROTOCOL_FEATURES, p.U64(int(PF.REPLY_ACK)))
    rig.must(R.SET_OWNER)
    fd = os.dup(rig.ram)
    assert rig.ack(R.ADD_MEM_REG, p.MemRegionMsg(rig.region()), fds=[fd]) == 1
    assert is_closed(fd) and len(rig.session.memory.regions) == 0
    assert rig.ack(R.REM_MEM_REG, p.MemRegionMsg(rig.region())) == 1


def test_ring_size_above_the_device_limit_names_the_limit(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.negotiate()
    limit = rig.device.max_queue_size
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, limit * 2)) == 1
    assert f"size {limit * 2} is larger than the {limit} this device accepts" in caplog.text
    assert rig.ack(R.SET_VRING_NUM, p.VringState(0, 3)) == 1
    assert "size 3 is not a power of two" in caplog.text


def test_config_offered_only_where_the_front_end_reads_it() -> None:
    assert PF.CONFIG in Session(EchoDevice(), FakeLoop()).offered_protocol_features()
    quiet = EchoDevice()
    quiet.config_via_frontend = False
    assert PF.CONFIG not in Session(quiet, FakeLoop()).offered_protocol_features()


@pytest.mark.parametrize("hook", ["set_features", "write_config", "set_mtu"])
def test_a_request_hook_that_raises_fails_only_that_request(
        rig: Rig, hook: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device bug in a hook that belongs to a request: logged with device and hook, the
    request gets a failure reply, and the session goes on (the rings still echo)."""
    rig.start(0)

    def bug(*args: object) -> None:
        raise RuntimeError(f"{hook} bug")

    monkeypatch.setattr(rig.device, hook, bug)
    request = {"set_features": (R.SET_FEATURES, p.U64(rig.session.features)),
               "write_config": (R.SET_CONFIG, p.ConfigSpace(8, 2, 0, b"\1\2")),
               "set_mtu": (R.NET_SET_MTU, p.U64(1500))}[hook]
    assert rig.ack(*request) == 1
    assert f"device echo failed in {hook}" in caplog.text
    assert f"RuntimeError: {hook} bug" in caplog.text      # the traceback is logged
    monkeypatch.undo()
    assert rig.echo(0, b"still served")


def test_driver_features_are_logged_by_name(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vhostpy.session"):
        rig.negotiate()
    line = next(r.getMessage() for r in caplog.records if "driver features" in r.getMessage())
    assert "EVENT_IDX" in line and "VERSION_1" in line and f"bit {DEVICE_BIT}" in line, line
