"""Sans-I/O codec for the vhost-user protocol.

This module owns the wire format: request numbers, header flags, protocol-feature bits,
one frozen dataclass per payload layout, the table of what each request must carry
(`REQUEST_SPECS`), an incremental `Decoder` and `encode`.

It must never do I/O: no sockets, no closing of file descriptors, no logging. File
descriptors are plain integers here; whoever calls `Decoder.next_message` owns the fds of
every message and of every `ProtocolError` it gets back and must close them.

All numbers were checked against one revision of the specification, `SPEC_REVISION`.
Integers on the wire are little-endian: the spec says "machine native byte order", and every
platform that runs vhost-user back-ends in practice is little-endian.

Known limits: the XEN_MMAP memory-region layout (40-byte regions) is not modelled, so a
back-end using this codec must not offer `ProtocolFeature.XEN_MMAP`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from vhostpy.errors import ProtocolError

if TYPE_CHECKING:
    from typing import Self

SPEC_REVISION = (
    "qemu/qemu docs/interop/vhost-user.rst at commit f6b615b52d1d92f02103596a30df95f31138a2e4 "
    "(QEMU 8.2 protocol level: requests 1-43, back-end requests 1-8, protocol features 0-19)"
)

VHOST_USER_VERSION = 1
HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
# The largest payload QEMU can send is sizeof(VhostUserPayload), about 1.1 KiB (the crypto
# session union); the largest modelled one is a full SET_MEM_TABLE (8 + 8 * 32 = 264 bytes).
# One page leaves room for growth while a corrupt size can never make us buffer megabytes.
MAX_PAYLOAD_SIZE = 4096
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS / VHOST_USER_BACKEND_MAX_FDS
MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
VHOST_USER_F_PROTOCOL_FEATURES = 30  # virtio feature bit number, not a mask
VHOST_F_LOG_ALL = 26  # virtio feature bit number
VHOST_LOG_PAGE = 0x1000
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
VHOST_VRING_F_LOG = 0  # bit number in VringAddr.flags

# struct vhost_iotlb_msg: type and perm values
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
IOTLB_ACCESS_RO, IOTLB_ACCESS_WO, IOTLB_ACCESS_RW = 1, 2, 3
# SET_DEVICE_STATE_FD parameters
DEVICE_STATE_SAVE, DEVICE_STATE_LOAD = 0, 1
DEVICE_STATE_PHASE_STOPPED = 0
# SET_CONFIG / GET_CONFIG flags
CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION = 0, 1

_U64_MAX = (1 << 64) - 1


class Request(enum.IntEnum):
    """Front-end to back-end requests (VHOST_USER_<name>); old names are aliases."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    SET_SLAVE_REQ_FD = 21  # alias: the name before the SLAVE -> BACKEND rename


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests (VHOST_USER_BACKEND_<name>); old SLAVE_ names alias."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SLAVE_IOTLB_MSG = 1
    SLAVE_CONFIG_CHANGE_MSG = 2
    SLAVE_VRING_HOST_NOTIFIER_MSG = 3
    SLAVE_VRING_CALL = 4
    SLAVE_VRING_ERR = 5


class HeaderFlags(enum.IntFlag):
    """Bits of the header's flags word."""

    VERSION_MASK = 0x3
    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks (1 << bit number); old names are aliases."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    MTU = NET_MTU
    SLAVE_REQ = BACKEND_REQ
    SLAVE_SEND_FD = BACKEND_SEND_FD


def request_name(req: int) -> str:
    """Spec name of a request: "VHOST_USER_GET_FEATURES", or "unknown request 99".

    A `BackendRequest` gets the "VHOST_USER_BACKEND_" prefix; a plain int is looked up as a
    front-end `Request`.
    """
    if isinstance(req, BackendRequest):
        return f"VHOST_USER_BACKEND_{req.name}"
    try:
        return f"VHOST_USER_{Request(req).name}"
    except ValueError:
        return f"unknown request {int(req)}"


# --- Payloads ---


def _bad(what: str, field: str, value: object) -> ProtocolError:
    return ProtocolError(f"{what}: {field}={value!r}", field=field, value=value)


class _Struct:
    """Base of fixed-layout payloads: subclasses set `_FMT` and field order = struct order.

    `SIZE` is the exact payload size in bytes, or None for variable-size payloads.
    """

    _FMT: ClassVar[struct.Struct] = struct.Struct("")
    SIZE: ClassVar[int | None] = 0

    def __init_subclass__(cls) -> None:
        if "_FMT" in cls.__dict__:
            cls.SIZE = cls._FMT.size

    def _values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]

    def pack(self) -> bytes:
        """Wire bytes of this payload (struct.error if a field does not fit its C type)."""
        return self._FMT.pack(*self._values())

    @classmethod
    def _check_size(cls, buf: bytes | memoryview) -> None:
        if len(buf) != cls.SIZE:
            raise _bad(f"{cls.__name__} payload must be {cls.SIZE} bytes", "size", len(buf))

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Self:
        """Decode exactly `SIZE` bytes; ProtocolError (field, value) on a bad size or value."""
        cls._check_size(buf)
        obj = cls(*cls._FMT.unpack_from(buf))
        obj._validate()
        return obj

    def _validate(self) -> None:
        """Raise ProtocolError if a decoded value is not allowed (default: all allowed)."""


@dataclass(frozen=True)
class Empty(_Struct):
    """No payload (size 0)."""

    _FMT = struct.Struct("<")


@dataclass(frozen=True)
class U64(_Struct):
    """A single u64: features, status, queue counts, and every REPLY_ACK (0 = success)."""

    value: int
    _FMT = struct.Struct("<Q")


@dataclass(frozen=True)
class VringState(_Struct):
    """struct vhost_vring_state: u32 index, u32 num (size, base, enable, endianness...)."""

    index: int
    num: int
    _FMT = struct.Struct("<II")


@dataclass(frozen=True)
class VringAddr(_Struct):
    """struct vhost_vring_addr: u32 index, u32 flags, then desc, used, avail and log addrs."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    _FMT = struct.Struct("<IIQQQQ")


@dataclass(frozen=True)
class VringFd(_Struct):
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index in bits 0-7, bit 8 = no fd attached.

    Any other bit set is a ProtocolError (field "u64").
    """

    index: int
    no_fd: bool = False
    _FMT = struct.Struct("<Q")

    def _values(self) -> tuple[int, ...]:
        return (_vring_fd_word(self.index, self.no_fd),)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> VringFd:
        cls._check_size(buf)
        (raw,) = cls._FMT.unpack_from(buf)
        if raw & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise _bad("reserved bits set in vring fd word", "u64", hex(raw))
        return cls(raw & VRING_IDX_MASK, bool(raw & VRING_NOFD_MASK))


def _vring_fd_word(index: int, no_fd: bool) -> int:
    """The u64 of VringFd and VringArea: the ring index in bits 0-7, bit 8 = no fd."""
    if not 0 <= index <= VRING_IDX_MASK:
        raise ValueError(f"vring index {index} does not fit in 8 bits")
    return index | (VRING_NOFD_MASK if no_fd else 0)


_REGION = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class MemoryRegion(_Struct):
    """VhostUserMemoryRegion (32 bytes). Size 0 or a range past 2**64 is a ProtocolError."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _FMT = _REGION

    def _validate(self) -> None:
        if self.memory_size == 0:
            raise _bad("empty memory region", "memory_size", 0)
        for field in ("guest_phys_addr", "userspace_addr"):
            if getattr(self, field) + self.memory_size - 1 > _U64_MAX:
                raise _bad("memory region wraps past 2**64", field, hex(getattr(self, field)))


_MEMTABLE_HDR = struct.Struct("<II")


@dataclass(frozen=True)
class MemTable(_Struct):
    """VhostUserMemory: u32 nregions, u32 padding, nregions * MemoryRegion.

    The payload is exactly 8 + 32 * nregions bytes (QEMU sends only the used regions), and
    nregions <= MAX_MEM_REGIONS. Zero regions is valid: QEMU's postcopy acknowledgement is a
    SET_MEM_TABLE carrying a zero u64, which is this layout.
    """

    regions: tuple[MemoryRegion, ...] = ()
    SIZE = None

    def pack(self) -> bytes:
        out = [_MEMTABLE_HDR.pack(len(self.regions), 0)]
        out.extend(r.pack() for r in self.regions)
        return b"".join(out)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> MemTable:
        if len(buf) < _MEMTABLE_HDR.size:
            raise _bad("memory table shorter than its header", "size", len(buf))
        n, _padding = _MEMTABLE_HDR.unpack_from(buf)
        if n > MAX_MEM_REGIONS:
            raise _bad(f"more than {MAX_MEM_REGIONS} memory regions", "nregions", n)
        want = _MEMTABLE_HDR.size + n * _REGION.size
        if len(buf) != want:
            raise _bad(f"memory table with nregions={n} must be {want} bytes", "size", len(buf))
        view = memoryview(buf)
        regions = tuple(MemoryRegion.unpack(view[8 + i * 32 : 8 + (i + 1) * 32]) for i in range(n))
        return cls(regions)


@dataclass(frozen=True)
class MemRegionMsg(_Struct):
    """VhostUserMemRegMsg: u64 padding + one MemoryRegion (ADD_MEM_REG / REM_MEM_REG)."""

    region: MemoryRegion
    SIZE = 40

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> MemRegionMsg:
        cls._check_size(buf)
        return cls(MemoryRegion.unpack(memoryview(buf)[8:]))


@dataclass(frozen=True)
class LogInfo(_Struct):
    """VhostUserLog: u64 mmap_size, u64 mmap_offset (SET_LOG_BASE; the spec says u64, QEMU
    sends this 16-byte struct)."""

    mmap_size: int
    mmap_offset: int
    _FMT = struct.Struct("<QQ")


_CONFIG_HDR = struct.Struct("<III")


@dataclass(frozen=True)
class ConfigSpace(_Struct):
    """VhostUserConfig: u32 offset, u32 size, u32 flags, then `size` bytes of config space.

    size <= MAX_CONFIG_SIZE and the payload is exactly 12 + size bytes.
    """

    offset: int
    size: int
    flags: int
    payload: bytes
    SIZE = None

    def pack(self) -> bytes:
        if len(self.payload) != self.size:
            raise ValueError(f"ConfigSpace size {self.size} != len(payload) {len(self.payload)}")
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + bytes(self.payload)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> ConfigSpace:
        if len(buf) < _CONFIG_HDR.size:
            raise _bad("config payload shorter than its header", "size", len(buf))
        offset, size, flags = _CONFIG_HDR.unpack_from(buf)
        if size > MAX_CONFIG_SIZE:
            raise _bad(f"config space larger than {MAX_CONFIG_SIZE} bytes", "config.size", size)
        if len(buf) != _CONFIG_HDR.size + size:
            raise _bad(f"config.size={size} needs a {12 + size}-byte payload", "size", len(buf))
        return cls(offset, size, flags, bytes(buf[_CONFIG_HDR.size :]))


@dataclass(frozen=True)
class InflightInfo(_Struct):
    """VhostUserInflight: u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size,
    plus 4 bytes of C padding: 24 bytes on the wire, as QEMU sends sizeof()."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _FMT = struct.Struct("<QQHH4x")


@dataclass(frozen=True)
class IotlbMsg(_Struct):
    """struct vhost_iotlb_msg: u64 iova, size, uaddr, u8 perm, u8 type, 6 bytes padding (32).

    perm must be 0-3 and type one of IOTLB_MISS/UPDATE/INVALIDATE/ACCESS_FAIL.
    """

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    _FMT = struct.Struct("<QQQBB6x")

    def _validate(self) -> None:
        if self.perm > IOTLB_ACCESS_RW:
            raise _bad("bad IOTLB permission", "perm", self.perm)
        if not IOTLB_MISS <= self.type <= IOTLB_ACCESS_FAIL:
            raise _bad("bad IOTLB message type", "type", self.type)


@dataclass(frozen=True)
class VringArea(_Struct):
    """VhostUserVringArea (BACKEND_VRING_HOST_NOTIFIER_MSG): u64 index/no-fd word (as in
    VringFd), u64 size, u64 offset."""

    index: int
    no_fd: bool
    size: int
    offset: int
    _FMT = struct.Struct("<QQQ")

    def _values(self) -> tuple[int, ...]:
        word = _vring_fd_word(self.index, self.no_fd)
        return (word, self.size, self.offset)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> VringArea:
        cls._check_size(buf)
        fd_word = VringFd.unpack(memoryview(buf)[:8])
        _, size, offset = cls._FMT.unpack_from(buf)
        return cls(fd_word.index, fd_word.no_fd, size, offset)


@dataclass(frozen=True)
class DeviceStateTransfer(_Struct):
    """VhostUserTransferDeviceState: u32 direction (0 save, 1 load), u32 phase (0 stopped)."""

    direction: int
    phase: int
    _FMT = struct.Struct("<II")

    def _validate(self) -> None:
        if self.direction not in (DEVICE_STATE_SAVE, DEVICE_STATE_LOAD):
            raise _bad("bad device state transfer direction", "direction", self.direction)


@dataclass(frozen=True)
class SharedObject(_Struct):
    """VhostUserShared: a 16-byte UUID (first three fields big-endian, kept as raw bytes)."""

    uuid: bytes
    SIZE = 16

    def pack(self) -> bytes:
        if len(self.uuid) != 16:
            raise ValueError(f"uuid must be 16 bytes, got {len(self.uuid)}")
        return bytes(self.uuid)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> SharedObject:
        cls._check_size(buf)
        return cls(bytes(buf))


@dataclass(frozen=True)
class RawPayload(_Struct):
    """Payload bytes kept as-is, for layouts this codec does not model: the
    VhostUserCryptoSession of CREATE_CRYPTO_SESSION (request and reply), whose size depends
    on QEMU's crypto structs. (GPU_SET_SOCKET carries no payload; the vhost-user-gpu
    protocol runs on its own socket.)"""

    data: bytes
    SIZE = None

    def pack(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> RawPayload:
        return cls(bytes(buf))


_FixedPayload = Empty | U64 | VringState | VringAddr | VringFd | LogInfo | InflightInfo
Payload = (_FixedPayload | MemTable | MemRegionMsg | ConfigSpace | IotlbMsg | VringArea) | (
    DeviceStateTransfer | SharedObject | RawPayload
)
_EMPTY = Empty()


# --- Messages ---


@dataclass(frozen=True)
class Message:
    """One vhost-user message: header fields, decoded payload and the fds that came with it."""

    request: Request | BackendRequest
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def version(self) -> int:
        return self.flags & HeaderFlags.VERSION_MASK


def request(
    req: Request | BackendRequest,
    payload: Payload = _EMPTY,
    *,
    fds: Sequence[int] = (),
    need_reply: bool = False,
) -> Message:
    """A request message: flags VERSION_1, plus NEED_REPLY when asked."""
    flags = HeaderFlags.VERSION_1 | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return Message(req, int(flags), payload, tuple(fds))


def reply(req: Request | BackendRequest, payload: Payload, *, fds: Sequence[int] = ()) -> Message:
    """A reply message: flags VERSION_1 | REPLY."""
    return Message(req, int(HeaderFlags.VERSION_1 | HeaderFlags.REPLY), payload, tuple(fds))


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """Wire bytes (header + payload) and the fds to send with them in one sendmsg.

    Raises ValueError if the message could never be accepted by a peer (too many fds, or a
    payload larger than MAX_PAYLOAD_SIZE).
    """
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"{request_name(msg.request)}: payload of {len(body)} bytes too large")
    if len(msg.fds) > MAX_FDS:
        raise ValueError(f"{request_name(msg.request)}: {len(msg.fds)} fds, at most {MAX_FDS}")
    return HEADER.pack(int(msg.request), msg.flags, len(body)) + body, tuple(msg.fds)


# --- What each request carries ---


@dataclass(frozen=True)
class RequestSpec:
    """What the wire must carry for one request.

    `payload`: request payload class. `reply`: reply payload class when the request always
    gets a reply, else None (a reply is then a REPLY_ACK `U64`). `fds`/`reply_fds`: (min, max)
    fds allowed. `alt_payloads`/`alt_replies`: other layouts real peers send for the same
    request, chosen by payload size (e.g. QEMU's postcopy u64 ack on ADD_MEM_REG). Some
    counts are refined from the payload (`expected_fds`).
    """

    payload: type
    reply: type | None = None
    fds: tuple[int, int] = (0, 0)
    reply_fds: tuple[int, int] = (0, 0)
    alt_payloads: tuple[type, ...] = ()
    alt_replies: tuple[type, ...] = ()


_S = RequestSpec
_R = Request
REQUEST_SPECS: dict[Request, RequestSpec] = {
    _R.GET_FEATURES: _S(Empty, U64),
    _R.SET_FEATURES: _S(U64),
    _R.SET_OWNER: _S(Empty),
    _R.RESET_OWNER: _S(Empty),
    # Reply only under postcopy: the regions' new bases (or a plain ack).
    _R.SET_MEM_TABLE: _S(MemTable, fds=(0, MAX_MEM_REGIONS), alt_replies=(MemTable,)),
    # The fd comes only with LOG_SHMFD; DPDK answers with an empty payload.
    _R.SET_LOG_BASE: _S(LogInfo, fds=(0, 1), alt_replies=(Empty,)),
    _R.SET_LOG_FD: _S(Empty, fds=(1, 1)),
    _R.SET_VRING_NUM: _S(VringState),
    _R.SET_VRING_ADDR: _S(VringAddr),
    _R.SET_VRING_BASE: _S(VringState),
    _R.GET_VRING_BASE: _S(VringState, VringState),
    _R.SET_VRING_KICK: _S(VringFd, fds=(0, 1)),
    _R.SET_VRING_CALL: _S(VringFd, fds=(0, 1)),
    _R.SET_VRING_ERR: _S(VringFd, fds=(0, 1)),
    _R.GET_PROTOCOL_FEATURES: _S(Empty, U64),
    _R.SET_PROTOCOL_FEATURES: _S(U64),
    _R.GET_QUEUE_NUM: _S(Empty, U64),
    _R.SET_VRING_ENABLE: _S(VringState),
    _R.SEND_RARP: _S(U64),  # MAC address in the first 6 bytes
    _R.NET_SET_MTU: _S(U64),
    _R.SET_BACKEND_REQ_FD: _S(Empty, fds=(1, 1)),
    _R.IOTLB_MSG: _S(IotlbMsg, U64),
    _R.SET_VRING_ENDIAN: _S(VringState),
    # A zero-length reply is the back-end's way to report failure.
    _R.GET_CONFIG: _S(ConfigSpace, ConfigSpace, alt_replies=(Empty,)),
    _R.SET_CONFIG: _S(ConfigSpace),
    _R.CREATE_CRYPTO_SESSION: _S(RawPayload, RawPayload),
    _R.CLOSE_CRYPTO_SESSION: _S(U64),
    _R.POSTCOPY_ADVISE: _S(Empty, Empty, reply_fds=(0, 1)),
    _R.POSTCOPY_LISTEN: _S(Empty),
    _R.POSTCOPY_END: _S(Empty, U64),
    _R.GET_INFLIGHT_FD: _S(InflightInfo, InflightInfo, reply_fds=(0, 1)),
    _R.SET_INFLIGHT_FD: _S(InflightInfo, fds=(1, 1)),
    _R.GPU_SET_SOCKET: _S(Empty, fds=(1, 1)),
    _R.RESET_DEVICE: _S(Empty),
    _R.VRING_KICK: _S(VringState),
    _R.GET_MAX_MEM_SLOTS: _S(Empty, U64),
    # Under postcopy QEMU ends an ADD/REM series with a u64 ack carrying this request number,
    # and the back-end answers ADD_MEM_REG with the region's new base.
    _R.ADD_MEM_REG: _S(MemRegionMsg, fds=(0, 1), alt_payloads=(U64,), alt_replies=(MemRegionMsg,)),
    # The spec tolerates one (unused) fd on REM_MEM_REG.
    _R.REM_MEM_REG: _S(MemRegionMsg, fds=(0, 1), alt_payloads=(U64,), alt_replies=(MemRegionMsg,)),
    _R.SET_STATUS: _S(U64),
    _R.GET_STATUS: _S(Empty, U64),
    # QEMU's vhost_user_get_shared_object() leaves hdr.size at 0; libvhost-user echoes the UUID
    # in its reply.
    _R.GET_SHARED_OBJECT: _S(
        SharedObject,
        SharedObject,
        reply_fds=(0, 1),
        alt_payloads=(Empty,),
        alt_replies=(U64, Empty),
    ),
    _R.SET_DEVICE_STATE_FD: _S(DeviceStateTransfer, U64, fds=(1, 1), reply_fds=(0, 1)),
    _R.CHECK_DEVICE_STATE: _S(Empty, U64),
}

_B = BackendRequest
BACKEND_REQUEST_SPECS: dict[BackendRequest, RequestSpec] = {
    _B.IOTLB_MSG: _S(IotlbMsg),
    _B.CONFIG_CHANGE_MSG: _S(Empty),
    _B.VRING_HOST_NOTIFIER_MSG: _S(VringArea, fds=(0, 1)),
    _B.VRING_CALL: _S(VringState),
    _B.VRING_ERR: _S(VringState),
    _B.SHARED_OBJECT_ADD: _S(SharedObject),
    _B.SHARED_OBJECT_REMOVE: _S(SharedObject),
    _B.SHARED_OBJECT_LOOKUP: _S(SharedObject, U64, reply_fds=(0, 1)),
}
del _S, _R, _B


def expected_fds(
    req: Request | BackendRequest, is_reply: bool, payload: Payload
) -> tuple[int, int]:
    """(min, max) fds allowed on a message, refined from its payload where the spec ties them.

    SET_MEM_TABLE: one fd per region. SET_VRING_KICK/CALL/ERR and HOST_NOTIFIER: one fd unless
    the no-fd bit is set. ADD_MEM_REG: exactly one fd with a region. SET_DEVICE_STATE_FD
    reply: one fd unless it reports an error or sets the no-fd bit.
    """
    specs = BACKEND_REQUEST_SPECS if isinstance(req, BackendRequest) else REQUEST_SPECS
    spec = specs[req]  # type: ignore[index]
    if is_reply:
        if req is Request.SET_DEVICE_STATE_FD and isinstance(payload, U64):
            return (0, 0) if payload.value & (VRING_IDX_MASK | VRING_NOFD_MASK) else (1, 1)
        return spec.reply_fds
    if isinstance(payload, (VringFd, VringArea)):
        return (0, 0) if payload.no_fd else (1, 1)
    if isinstance(payload, MemTable):
        n = len(payload.regions)
        return (n, n)
    if req is Request.ADD_MEM_REG:
        return (1, 1) if isinstance(payload, MemRegionMsg) else (0, 0)
    if req is Request.REM_MEM_REG and isinstance(payload, U64):
        return (0, 0)
    return spec.fds


def _name(req: Request | BackendRequest | int) -> str:
    """request_name() that never mistakes an unknown back-end number for a front-end one."""
    if isinstance(req, (Request, BackendRequest)):
        return request_name(req)
    return f"unknown request {req}"


def _pick_type(types: Sequence[type], size: int) -> type:
    """The candidate whose fixed size matches, else the first variable-size one, else the first
    (whose own size check then raises the error)."""
    sizes = [t.SIZE for t in types]  # type: ignore[attr-defined]
    for want in (size, None):
        if want in sizes:
            return types[sizes.index(want)]
    return types[0]


# --- Decoder ---


class Decoder:
    """Incremental decoder for one direction of one socket (h11-style, no I/O).

    channel "frontend": the main socket: `Request` requests and replies to them (REPLY set).
    channel "backend": the back-end channel: `BackendRequest` requests and their replies.

    Call order: `feed(data, fds)` with what each recvmsg returned, then `next_message()` until
    it returns None. Fds belong to the first message whose bytes were not complete when they
    were fed (SCM_RIGHTS ride with the first byte of a sendmsg). Every fd handed out (in a
    Message, in a ProtocolError's `fds`, or by `take_pending_fds`) is the caller's to close.
    """

    def __init__(self, channel: Literal["frontend", "backend"] = "frontend") -> None:
        if channel not in ("frontend", "backend"):
            raise ValueError(f"channel must be 'frontend' or 'backend', not {channel!r}")
        self._channel = channel
        self._specs: dict[Any, RequestSpec] = (
            REQUEST_SPECS if channel == "frontend" else BACKEND_REQUEST_SPECS
        )
        self._enum: type[Request | BackendRequest] = (
            Request if channel == "frontend" else BackendRequest
        )
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset of owning message, fds)
        self._fatal: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered but not yet returned as (or rejected in) a message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Buffer bytes and the fds received with them. Never raises for bad input.

        The fds belong to the LAST message that begins in `data`: a UNIX stream read ends
        right after the sendmsg that carried fds, so earlier fd-less messages may share the
        chunk but later ones never do (QEMU's SET_FEATURES and SET_VRING_CALL arrive
        together). When no message begins in `data`, the message in progress owns them.
        """
        start = len(self._buf)
        self._buf += data
        if fds:
            self._fds.append((self._base + self._owner_of(start), list(fds)))

    def take_pending_fds(self) -> tuple[int, ...]:
        """Remove and return every fd not yet handed out (to close at EOF or teardown)."""
        out = tuple(fd for _, fds in self._fds for fd in fds)
        self._fds.clear()
        return out

    def pending_header(self) -> tuple[Request | BackendRequest | int, int, int] | None:
        """(request, flags, size) of the incomplete message buffered, or None when fewer than
        HEADER_SIZE bytes are buffered (for reporting a peer that vanished mid-message)."""
        if len(self._buf) < HEADER_SIZE:
            return None
        req_raw, flags, size = HEADER.unpack_from(self._buf)
        return self._lookup(req_raw), flags, size

    def _owner_of(self, start: int) -> int:
        """Buffer offset of the message owning fds fed with the bytes from `start` on.

        That is the last message beginning in the buffer: either the last one beginning at
        or after `start`, or, when none does, the one in progress at `start`.
        """
        pos, buf, owner = 0, self._buf, 0
        while pos < len(buf):
            owner = pos
            if len(buf) - pos < HEADER_SIZE:
                break
            _, _, size = HEADER.unpack_from(buf, pos)
            if size > MAX_PAYLOAD_SIZE:
                break
            pos += HEADER_SIZE + size
        return owner

    def _take_fds(self) -> tuple[int, ...]:
        mine = [fds for owner, fds in self._fds if owner <= self._base]
        self._fds = [(owner, fds) for owner, fds in self._fds if owner > self._base]
        return tuple(fd for fds in mine for fd in fds)

    def _die(self, text: str, req: object, flags: int, field: str, value: int) -> ProtocolError:
        """Record a fatal error; it takes every pending fd with it."""
        fds = self.take_pending_fds()
        self._fatal = ProtocolError(
            text, request=req, flags=flags, field=field, value=value, fatal=True, fds=fds
        )
        return self._fatal

    def next_message(self) -> Message | None:
        """The next complete message, or None if none is complete yet.

        Raises ProtocolError for a bad message, which is consumed so the following call
        continues with the next one; the error carries `request`, `flags`, `field`, `value`
        and the message's `fds`. Fatal errors (`fatal=True`: size above MAX_PAYLOAD_SIZE,
        more than MAX_FDS fds on one message) hand over every pending fd and make every later
        call raise again: the connection must be dropped.
        """
        if (e := self._fatal) is not None:  # a fresh exception each time, without the fds
            raise ProtocolError(
                str(e), request=e.request, flags=e.flags, field=e.field, value=e.value, fatal=True
            )
        head_fds = sum(len(fds) for owner, fds in self._fds if owner <= self._base)
        req_raw: int | None = None
        flags = 0
        if len(self._buf) >= HEADER_SIZE:
            req_raw, flags, size = HEADER.unpack_from(self._buf)
        if head_fds > MAX_FDS:
            req = self._lookup(req_raw) if req_raw is not None else None
            name = _name(req) if req is not None else "message"
            raise self._die(f"{name}: {head_fds} fds on one message", req, flags, "fds", head_fds)
        if req_raw is None:
            return None
        req = self._lookup(req_raw)
        if size > MAX_PAYLOAD_SIZE:
            raise self._die(f"{_name(req)}: payload size={size}", req, flags, "size", size)
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        fds = self._take_fds()
        del self._buf[:end]
        self._base += end
        return self._decode(req, flags, body, fds)

    def _lookup(self, raw: int) -> Request | BackendRequest | int:
        try:
            return self._enum(raw)
        except ValueError:
            return raw

    def _decode(
        self, req: Request | BackendRequest | int, flags: int, body: bytes, fds: tuple[int, ...]
    ) -> Message:
        def fail(text: str, field: str | None, value: object) -> ProtocolError:
            return ProtocolError(
                f"{_name(req)}: {text}", request=req, flags=flags, field=field, value=value, fds=fds
            )

        if not isinstance(req, (Request, BackendRequest)):
            raise fail(f"not a {self._channel}-channel request", "request", req)
        if flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
            raise fail(f"unsupported version in flags={flags:#x}", "flags", flags)
        spec: RequestSpec = self._specs[req]
        is_reply = bool(flags & HeaderFlags.REPLY)
        if is_reply:
            candidates = (spec.reply or U64, *spec.alt_replies)
        else:
            candidates = (spec.payload, *spec.alt_payloads)
        ptype = _pick_type(candidates, len(body))
        try:
            payload = ptype.unpack(body)  # type: ignore[attr-defined]
        except ProtocolError as e:
            raise fail(str(e), e.field, e.value) from None
        lo, hi = expected_fds(req, is_reply, payload)
        if not lo <= len(fds) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise fail(f"{len(fds)} fds where {want} expected", "fds", len(fds))
        return Message(req, flags, payload, fds)


def decode_all(
    data: bytes, fds: Sequence[int] = (), channel: Literal["frontend", "backend"] = "frontend"
) -> list[Message]:
    """Decode every message in `data` (fds belong to the last). Raises ProtocolError on the
    first bad message or if bytes or fds are left over."""
    dec = Decoder(channel)
    dec.feed(data, fds)
    out: list[Message] = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    left = dec.take_pending_fds()
    if dec.pending_bytes or left:
        raise ProtocolError(
            f"incomplete input: {dec.pending_bytes} bytes and {len(left)} fds left over",
            field="size",
            value=dec.pending_bytes,
            fds=left,
        )
    return out


# -- naming virtio feature bits (for logs) -----------------------------------------------------

#: Device-independent ("reserved") feature bits, virtio 1.2 section 6, with the two bits
#: vhost-user borrows (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES) and the legacy ones.
TRANSPORT_FEATURE_NAMES: dict[int, str] = {
    24: "NOTIFY_ON_EMPTY", 26: "VHOST_F_LOG_ALL", 27: "ANY_LAYOUT", 28: "INDIRECT_DESC",
    29: "EVENT_IDX", 30: "VHOST_USER_F_PROTOCOL_FEATURES", 32: "VERSION_1",
    33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM",
    37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET",
}

#: Device-specific feature bits by virtio device id, virtio 1.2 sections 5.1.3 (net, id 1)
#: and 5.2.3 (block, id 2), legacy bits included.
DEVICE_FEATURE_NAMES: dict[int, dict[int, str]] = {
    1: {0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
        7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
        12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
        17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA",
        21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR", 41: "GUEST_RSC4",
        42: "GUEST_RSC6", 56: "HOST_USO", 57: "HASH_REPORT", 59: "GUEST_HDRLEN", 60: "RSS",
        61: "RSC_EXT", 62: "STANDBY", 63: "SPEED_DUPLEX"},
    2: {0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE",
        7: "SCSI", 9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD",
        14: "WRITE_ZEROES", 15: "LIFETIME", 16: "SECURE_ERASE"},
}


def feature_names(bits: int, device_id: int | None = None) -> list[str]:
    """The names of the virtio feature bits set in `bits`, lowest bit first.

    Device-independent bits are named for every device (`VERSION_1`, `EVENT_IDX`, ...);
    device-specific bits only when `device_id` is a device with a table here (1 net, 2 block),
    where the device's name wins. A bit without a name comes out as "bit N", so the list
    always has one entry per set bit. `bits` must not be negative (ValueError).
    """
    if bits < 0:
        raise ValueError(f"feature bits cannot be negative: {bits}")
    device = DEVICE_FEATURE_NAMES.get(device_id, {}) if device_id is not None else {}
    names: list[str] = []
    bit = 0
    while bits >> bit:
        if bits >> bit & 1:
            names.append(device.get(bit) or TRANSPORT_FEATURE_NAMES.get(bit) or f"bit {bit}")
        bit += 1
    return names
