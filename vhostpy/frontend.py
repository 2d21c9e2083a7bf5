"""A vhost-user front-end: the mirror image of `session`, for driving any back-end.

`Frontend` speaks the protocol over a connected UNIX socket with blocking calls and a
timeout: it sends requests (with their fds), waits for the replies the spec promises, and
checks REPLY_ACK results. It is what the lguest bridge uses to hand a device to another
back-end, and what the tests use as a scripted front-end (including `send_raw` for bytes
no well-behaved front-end would send).

It owns no guest memory and no rings; callers pass fds and addresses.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

from vhostpy import protocol as p
from vhostpy.errors import FrontendError, ProtocolError

Request = p.Request
PF = p.ProtocolFeature
#: VIRTIO_F_RING_PACKED (virtio 1.1+): acked by `negotiate` only when asked for.
_RING_PACKED = 34


class BackendFailure(Exception):
    """The back-end answered a request with a failure (REPLY_ACK != 0 or an empty reply)."""

    def __init__(self, request: p.Request, detail: str) -> None:
        super().__init__(f"{p.request_name(request)}: {detail}")
        self.request = request


class BackendGone(Exception):
    """The back-end closed the connection or did not answer in time."""


class Frontend:
    """A blocking vhost-user front-end on one connected socket."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.decoder = p.Decoder("frontend")
        self.protocol_features = PF(0)
        self.features = 0

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0) -> Frontend:
        """Connect to a back-end listening on `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    def close(self) -> None:
        """Close the connection (the back-end sees the front-end go away)."""
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw transport ---------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes and fds exactly as given, in one sendmsg."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, msg: p.Message) -> None:
        """Encode and send one message; BackendGone if the connection is gone (EPIPE...)."""
        data, fds = p.encode(msg)
        try:
            self.send_raw(data, fds)
        except TimeoutError as exc:
            raise BackendGone("the back-end does not take our requests in time") from exc
        except OSError as exc:
            raise BackendGone(f"connection error: {exc}") from exc

    def receive(self) -> p.Message:
        """Block until one whole message arrives; BackendGone on EOF or timeout."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * p.MAX_FDS))
            except TimeoutError as exc:
                raise BackendGone("no reply from the back-end in time") from exc
            except OSError as exc:
                raise BackendGone(f"connection error: {exc}") from exc
            if not data:
                raise BackendGone("the back-end closed the connection")
            fds: list[int] = []
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
                    fds.extend(arr)
            self.decoder.feed(data, fds)

    def is_connected(self) -> bool:
        """True while the back-end keeps the connection open (no data is consumed)."""
        try:
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            finally:
                self.sock.settimeout(self.sock.gettimeout() or 5.0)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)

    # -- requests --------------------------------------------------------------------------
    def call(self, req: p.Request, payload: p.Payload | None = None, *,
             fds: Sequence[int] = (), ack: bool | None = None) -> p.Payload | None:
        """Send a request and return its reply payload (None for requests without one).

        With `ack` (default: whenever REPLY_ACK was negotiated) a request that has no reply
        of its own asks for a REPLY_ACK, and a non-zero ack raises BackendFailure.
        """
        spec = p.REQUEST_SPECS[req]
        has_reply = spec.reply is not None
        if ack is None:
            ack = PF.REPLY_ACK in self.protocol_features
        want_ack = ack and not has_reply
        self.send(p.request(req, payload if payload is not None else p.Empty(), fds=fds,
                            need_reply=want_ack))
        if not (has_reply or want_ack):
            return None
        answer = self.receive()
        if answer.request != req or not answer.is_reply:
            raise FrontendError(f"expected a reply to {p.request_name(req)}, got "
                                f"{p.request_name(answer.request)} flags={answer.flags:#x}")
        if want_ack:
            assert isinstance(answer.payload, p.U64)
            if answer.payload.value != 0:
                raise BackendFailure(req, f"REPLY_ACK {answer.payload.value}")
            return None
        if isinstance(answer.payload, p.Empty) and spec.reply is not p.Empty:
            raise BackendFailure(req, "empty reply (the back-end reports failure)")
        return answer.payload

    def _u64(self, req: p.Request) -> int:
        payload = self.call(req)
        if not isinstance(payload, p.U64):
            raise ProtocolError(f"{p.request_name(req)}: reply {payload!r} is not a u64",
                                request=req)
        return payload.value

    # -- the common requests, by name ------------------------------------------------------
    def get_features(self) -> int:
        return self._u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(Request.SET_FEATURES, p.U64(features))
        self.features = features

    def get_protocol_features(self) -> PF:
        return PF(self._u64(Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: PF | int) -> None:
        self.call(Request.SET_PROTOCOL_FEATURES, p.U64(int(features)), ack=False)
        self.protocol_features = PF(int(features))

    def set_owner(self) -> None:
        self.call(Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: Sequence[p.MemoryRegion], fds: Sequence[int]) -> None:
        self.call(Request.SET_MEM_TABLE, p.MemTable(tuple(regions)), fds=fds)

    def add_mem_reg(self, region: p.MemoryRegion, fd: int) -> None:
        self.call(Request.ADD_MEM_REG, p.MemRegionMsg(region), fds=(fd,))

    def rem_mem_reg(self, region: p.MemoryRegion) -> None:
        self.call(Request.REM_MEM_REG, p.MemRegionMsg(region))

    def set_vring_num(self, index: int, num: int) -> None:
        self.call(Request.SET_VRING_NUM, p.VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(Request.SET_VRING_BASE, p.VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        payload = self.call(Request.GET_VRING_BASE, p.VringState(index, 0))
        assert isinstance(payload, p.VringState)
        return payload.num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int,
                       flags: int = 0, log: int = 0) -> None:
        self.call(Request.SET_VRING_ADDR, p.VringAddr(index, flags, desc, used, avail, log))

    def _vring_fd(self, req: p.Request, index: int, fd: int | None) -> None:
        self.call(req, p.VringFd(index, fd is None), fds=() if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(Request.SET_VRING_ENABLE, p.VringState(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        payload = self.call(Request.GET_CONFIG, p.ConfigSpace(offset, size, 0, bytes(size)))
        assert isinstance(payload, p.ConfigSpace)
        return payload.payload

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(Request.SET_CONFIG, p.ConfigSpace(offset, len(data), flags, data))

    def reset_device(self) -> None:
        self.call(Request.RESET_DEVICE)

    def negotiate(self, want_protocol: PF | int | None = None,
                  features_mask: int | None = None, *, packed: bool = False) -> tuple[int, PF]:
        """The usual opening: SET_OWNER, features and protocol features.

        Accepts every offered feature (masked by `features_mask`) but VIRTIO_F_RING_PACKED
        unless `packed` (a front-end acks only the ring layout it builds), and every offered
        protocol feature in `want_protocol` (default: all offered). Returns both sets.
        """
        self.set_owner()
        offered = self.get_features()
        protocol = PF(0)
        if offered >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered_pf = self.get_protocol_features()
            protocol = offered_pf if want_protocol is None else offered_pf & PF(want_protocol)
            self.set_protocol_features(protocol)
        chosen = offered if features_mask is None else offered & features_mask
        if not packed:
            chosen &= ~(1 << _RING_PACKED)
        self.set_features(chosen)
        return chosen, protocol
