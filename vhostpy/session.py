"""The vhost-user back-end control plane for one front-end connection (sans-I/O).

`Session.handle(message)` applies one decoded request and returns the reply messages to
send. The session owns what the front-end handed over (guest memory mappings, kick, call
and err eventfds) and the ring states; it never touches a socket or a selector. To learn
about kicks it asks its host to watch kick fds (`SessionHost`), and the host calls
`Session.kick(index)` when one fires.

Dispatch is one table, `HANDLERS`. Everything that is common to all requests happens once
in `handle`: DEBUG logging, fd ownership (fds a handler did not keep are closed), failures
turned into explicit failure replies (a REPLY_ACK of 1, or an empty payload for requests
that have their own reply), and REPLY_ACK on success. A request missing from the table is
unsupported and always fails: it is never answered with a fake "ok".

Ring states follow the spec: a ring is *started* by SET_VRING_KICK and stopped by
GET_VRING_BASE; it is *enabled* by SET_VRING_ENABLE, or implicitly when
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated. The device serves a ring only while it
is started, enabled and configured ("live").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.errors import BackendError, FrontendError, ProtocolError, UnsupportedError, VhostError
from vhostpy.memory import GuestMemory
from vhostpy.virtqueue import MAX_QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX, Virtqueue

log = logging.getLogger(__name__)

Request = p.Request
PF = p.ProtocolFeature

#: Protocol features this session implements completely.
SUPPORTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
)
PROTOCOL_FEATURES_BIT = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
#: Memory slots offered with CONFIGURE_MEM_SLOTS.
DEFAULT_MAX_MEM_SLOTS = 32


class SessionHost(Protocol):
    """What a session needs from the I/O edge that runs it."""

    def watch_kick(self, fd: int, index: int) -> None:
        """Call `Session.kick(index)` whenever eventfd `fd` becomes readable (after reading it)."""

    def unwatch_kick(self, fd: int) -> None:
        """Stop watching `fd`; the session closes it right after."""


@dataclass
class Vring:
    """One ring's vhost-user state beside its `Virtqueue`."""

    vq: Virtqueue
    addr: p.VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    live: bool = False
    error_reported: bool = False
    kicks: int = field(default=0)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _eventfd_signal(fd: int) -> Callable[[], None]:
    def signal() -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:  # the front-end closed its end: nothing to interrupt
            log.debug("call fd %d: %s", fd, exc)
    return signal


def _install_call(vq: Virtqueue, fd: int | None) -> None:
    """Point the ring's interrupt at call eventfd `fd` (None: no interrupts): both the callable
    Python devices use and the fd the compiled path writes, so they never disagree."""
    vq.call = _eventfd_signal(fd) if fd is not None else None
    vq.call_fd = fd


class Session:
    """One front-end's view of one device; see the module docstring for the contract."""

    def __init__(self, device: Device, host: SessionHost, *,
                 max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS) -> None:
        self.device = device
        self.host = host
        self.max_mem_slots = max_mem_slots
        self.memory = GuestMemory()
        self.rings = [Vring(Virtqueue(self.memory, i)) for i in range(device.num_queues)]
        self.features = 0
        self.features_set = False
        self.protocol_features = PF(0)
        self.owner = False
        self._kept: set[int] = set()
        #: Extra ADD_MEM_REGs of an already mapped region, by (gpa, size, uva): QEMU before
        #: 8.0 sends ADD/REM_MEM_REG once per queue pair (one vhost_dev each) on one socket.
        self._region_dups: dict[tuple[int, int, int], int] = {}

    # -- offered features ------------------------------------------------------------------
    def offered_features(self) -> int:
        """GET_FEATURES: the device's bits plus VHOST_USER_F_PROTOCOL_FEATURES."""
        return self.device.features() | PROTOCOL_FEATURES_BIT

    def offered_protocol_features(self) -> PF:
        """GET_PROTOCOL_FEATURES: what this session implements for this device."""
        offered = SUPPORTED_PROTOCOL_FEATURES
        if self.device.supports_mtu:
            offered |= PF.NET_MTU
        if not self.device.config():     # nothing to GET_CONFIG (virtio-rng)
            offered &= ~PF.CONFIG
        return offered

    # -- dispatch --------------------------------------------------------------------------
    def handle(self, msg: p.Message) -> list[p.Message]:
        """Apply one request from the front-end; return the replies to send, in order."""
        req = msg.request
        name = p.request_name(req)
        log.debug("%s flags=%#x payload=%s fds=%s", name, msg.flags, msg.payload, msg.fds)
        spec = p.REQUEST_SPECS.get(req) if isinstance(req, Request) else None
        handler = HANDLERS.get(req) if isinstance(req, Request) else None
        self._kept = set()
        try:
            if msg.is_reply:
                raise FrontendError(f"{name}: a reply where a request was expected")
            if handler is None:
                raise UnsupportedError(f"{name} is not supported by this back-end")
            result = handler(self, msg)
        except (VhostError, ValueError, OverflowError) as exc:
            log.warning("%s failed (%s): %s", name, getattr(exc, "whose", "input"), exc)
            return self._failure_reply(req, msg.flags, spec)
        finally:
            for fd in msg.fds:
                if fd not in self._kept:
                    _close(fd)
        if result is not None:
            return [p.reply(req, result)]
        if self._wants_ack(msg.flags) and (spec is None or spec.reply is None):
            return [p.reply(req, p.U64(0))]
        return []

    def handle_error(self, err: ProtocolError) -> list[p.Message]:
        """A message the decoder rejected: log it, close its fds, answer if one is awaited."""
        log.warning("rejected %s from the front-end: %s (field=%s value=%r)",
                    p.request_name(int(err.request)) if isinstance(err.request, int) else "message",
                    err, err.field, err.value)
        for fd in err.fds:
            _close(fd)
        if err.fatal or err.request is None:
            return []
        spec = p.REQUEST_SPECS.get(err.request) if isinstance(err.request, Request) else None
        return self._failure_reply(err.request, err.flags, spec)

    def _wants_ack(self, flags: int) -> bool:
        return bool(flags & p.HeaderFlags.NEED_REPLY) and PF.REPLY_ACK in self.protocol_features

    def _failure_reply(self, req: object, flags: int, spec: p.RequestSpec | None) -> list[p.Message]:
        if flags & p.HeaderFlags.REPLY:
            return []
        if spec is not None and spec.reply is not None:
            # The front-end waits for this reply: an empty payload says "failed".
            return [p.reply(req, p.Empty())]  # type: ignore[arg-type]
        if self._wants_ack(flags):
            return [p.reply(req, p.U64(1))]  # type: ignore[arg-type]
        return []

    def _keep(self, fd: int) -> int:
        self._kept.add(fd)
        return fd

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise FrontendError(f"vring index {index} out of range "
                                f"(device has {len(self.rings)} queues)")
        return self.rings[index]

    # -- ring life cycle -------------------------------------------------------------------
    def _should_be_live(self, ring: Vring) -> bool:
        implicit = not (self.features & PROTOCOL_FEATURES_BIT)
        return ring.started and (ring.enabled or implicit) and ring.vq.size > 0 \
            and ring.addr is not None

    def _update(self, ring: Vring) -> None:
        """Tell the device when a ring goes live or stops being live."""
        want = self._should_be_live(ring)
        if want and not ring.live:
            try:
                self._apply_addresses(ring)
            except VhostError as exc:
                log.warning("vring %d cannot start: %s", ring.vq.index, exc)
                return
            ring.vq.event_idx = bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1)
            _install_call(ring.vq, ring.call_fd)
            ring.live = True
            log.debug("vring %d live (size %d, base %d)", ring.vq.index, ring.vq.size,
                      ring.vq.last_avail_idx)
            self._run_device(ring, self.device.queue_started)
        elif ring.live and not want:
            ring.live = False
            self.device.queue_stopped(ring.vq.index, ring.vq)
            log.debug("vring %d stopped", ring.vq.index)

    def _apply_addresses(self, ring: Vring) -> None:
        assert ring.addr is not None
        a = ring.addr
        size = ring.vq.size
        ring.vq.set_addresses(
            self.memory.uva_to_gpa(a.desc_user_addr, 16 * size),
            self.memory.uva_to_gpa(a.avail_user_addr, 6 + 2 * size),
            self.memory.uva_to_gpa(a.used_user_addr, 6 + 8 * size),
        )

    def _run_device(self, ring: Vring, call: Callable[[int, Virtqueue], None]) -> None:
        try:
            call(ring.vq.index, ring.vq)
        except Exception as exc:  # a device bug stops this ring, not the process
            log.exception("device %s failed on vring %d", self.device.name, ring.vq.index)
            ring.vq.fail(f"device error: {exc!r}")
        if ring.vq.error is not None and not ring.error_reported:
            ring.error_reported = True
            if ring.err_fd is not None:
                _eventfd_signal(ring.err_fd)()

    def kick(self, index: int) -> int:
        """The driver kicked ring `index` (its kick eventfd was read by the host).

        Returns what `poll` returns: how many chains the device took (truthy on progress).
        """
        self.rings[index].kicks += 1
        return self.poll(index)

    def poll(self, index: int) -> int:
        """Serve ring `index` without a kick (a polling host); returns how many chains the
        device popped, or 1 if it only published used entries (0: no progress). A host
        that polls sets `vq.polling` meanwhile (see `Virtqueue`)."""
        ring = self.rings[index]
        if not ring.live:
            return 0
        vq = ring.vq
        avail, used = vq.last_avail_idx, vq.used_idx
        self._run_device(ring, self.device.process_queue)
        popped: int = (vq.last_avail_idx - avail) & 0xFFFF
        return popped or int(vq.used_idx != used)

    def _stop_ring(self, ring: Vring) -> None:
        ring.started = False
        self._update(ring)
        if ring.kick_fd is not None:
            self.host.unwatch_kick(ring.kick_fd)
            _close(ring.kick_fd)
            ring.kick_fd = None

    def _reset_ring(self, ring: Vring) -> None:
        self._stop_ring(ring)
        for fd in (ring.call_fd, ring.err_fd):
            _close(fd)
        vq = ring.vq
        vq.reset()
        _install_call(vq, None)  # the fds are closed: their numbers may be reused
        ring.__init__(vq)  # type: ignore[misc]

    def _reset_device(self) -> None:
        for ring in self.rings:
            self._reset_ring(ring)
        self.device.reset()
        self.features = 0
        self.features_set = False

    def close(self) -> None:
        """The front-end went away: stop rings, release every fd and mapping, reset the device."""
        self._reset_device()
        self.memory.clear()
        self._region_dups.clear()

    def _memory_changed(self) -> None:
        for ring in self.rings:
            if ring.live:
                try:
                    self._apply_addresses(ring)
                except VhostError as exc:
                    ring.vq.fail(f"ring no longer mapped after a memory change: {exc}")

    # -- handlers (one per request; each returns a reply payload or None) -------------------
    def _on_get_features(self, msg: p.Message) -> p.Payload:
        return p.U64(self.offered_features())

    def _on_set_features(self, msg: p.Message) -> None:
        value = _payload(msg, p.U64).value
        extra = value & ~self.offered_features()
        if extra:
            raise FrontendError(f"feature bits {extra:#x} were never offered "
                                f"(offered {self.offered_features():#x})")
        if value != self.features or not self.features_set:
            log.info("%s: driver features %#x (offered %#x)", self.device.name, value,
                     self.offered_features())
        self.features = value
        self.features_set = True
        self.device.set_features(value & ~PROTOCOL_FEATURES_BIT)
        for ring in self.rings:
            self._update(ring)

    def _on_set_owner(self, msg: p.Message) -> None:
        self.owner = True

    def _on_reset(self, msg: p.Message) -> None:
        self._reset_device()

    def _on_get_protocol_features(self, msg: p.Message) -> p.Payload:
        return p.U64(int(self.offered_protocol_features()))

    def _on_set_protocol_features(self, msg: p.Message) -> None:
        value = _payload(msg, p.U64).value
        extra = value & ~int(self.offered_protocol_features())
        if extra:
            raise FrontendError(f"protocol feature bits {extra:#x} were never offered")
        self.protocol_features = PF(value)

    def _on_get_queue_num(self, msg: p.Message) -> p.Payload:
        return p.U64(len(self.rings))

    def _on_set_mem_table(self, msg: p.Message) -> None:
        table = _payload(msg, p.MemTable)
        if len(msg.fds) != len(table.regions):
            raise FrontendError(f"{len(table.regions)} regions but {len(msg.fds)} fds")
        self.memory.clear()
        self._region_dups.clear()
        try:
            for region, fd in zip(table.regions, msg.fds):
                self.memory.map_fd(fd, region.guest_phys_addr, region.memory_size,
                                   region.userspace_addr, region.mmap_offset)
        except VhostError:
            self.memory.clear()
            self._memory_changed()
            raise
        self._memory_changed()

    def _on_get_max_mem_slots(self, msg: p.Message) -> p.Payload:
        return p.U64(self.max_mem_slots)

    def _on_add_mem_reg(self, msg: p.Message) -> None:
        region = _payload(msg, p.MemRegionMsg).region
        if len(msg.fds) != 1:
            raise FrontendError(f"ADD_MEM_REG needs one fd, got {len(msg.fds)}")
        key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        if any((r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
               == (*key, region.mmap_offset) for r in self.memory.regions):
            # The same region again (QEMU 7.2 with several queue pairs): count it so the
            # matching REM_MEM_REGs unmap it only when the last one arrives.
            self._region_dups[key] = self._region_dups.get(key, 0) + 1
            return
        if len(self.memory.regions) >= self.max_mem_slots:
            raise FrontendError(f"all {self.max_mem_slots} memory slots are in use")
        self.memory.map_fd(msg.fds[0], region.guest_phys_addr, region.memory_size,
                           region.userspace_addr, region.mmap_offset)

    def _on_rem_mem_reg(self, msg: p.Message) -> None:
        region = _payload(msg, p.MemRegionMsg).region
        key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        if self._region_dups.get(key, 0) > 0:
            self._region_dups[key] -= 1
            return
        self.memory.remove(region.guest_phys_addr, region.memory_size, region.userspace_addr)
        self._memory_changed()

    def _on_set_vring_num(self, msg: p.Message) -> None:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        if not 0 < state.num <= limit or state.num & (state.num - 1):
            raise FrontendError(f"vring {state.index}: size {state.num} is not a power of two "
                                f"in 1..{limit}")
        if ring.live:
            raise FrontendError(f"vring {state.index}: cannot resize a running ring")
        ring.vq.set_size(state.num)

    def _on_set_vring_addr(self, msg: p.Message) -> None:
        addr = _payload(msg, p.VringAddr)
        ring = self._ring(addr.index)
        if addr.flags & (1 << p.VHOST_VRING_F_LOG):
            raise UnsupportedError(f"vring {addr.index}: dirty logging was never offered")
        if ring.vq.size == 0:
            raise FrontendError(f"vring {addr.index}: SET_VRING_ADDR before SET_VRING_NUM")
        previous = ring.addr
        ring.addr = addr
        try:
            self._apply_addresses(ring)
        except VhostError:
            ring.addr = previous
            raise
        self._update(ring)

    def _on_set_vring_base(self, msg: p.Message) -> None:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        if state.num > 0xFFFF:
            raise FrontendError(f"vring {state.index}: base {state.num:#x} does not fit a "
                                "split ring (packed rings are not offered)")
        if ring.live:
            raise FrontendError(f"vring {state.index}: SET_VRING_BASE on a running ring")
        ring.vq.set_base(state.num)

    def _on_get_vring_base(self, msg: p.Message) -> p.Payload:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        self._stop_ring(ring)
        base = ring.vq.last_avail_idx
        ring.vq.reset()
        ring.addr = None
        ring.error_reported = False
        return p.VringState(state.index, base)

    def _on_set_vring_kick(self, msg: p.Message) -> None:
        ring, fd = self._vring_fd(msg)
        if fd is None:
            raise UnsupportedError(f"vring {ring.vq.index}: polling mode (kick without an fd) "
                                   "is not supported")
        try:  # an fd epoll refuses (a regular file, a directory) must fail this request only
            os.set_blocking(fd, False)
            self.host.watch_kick(fd, ring.vq.index)
        except OSError as exc:
            self.host.unwatch_kick(fd)
            raise FrontendError(f"vring {ring.vq.index}: kick fd cannot be watched: "
                                f"{exc.strerror or exc}") from exc
        if ring.kick_fd is not None:
            self.host.unwatch_kick(ring.kick_fd)
            _close(ring.kick_fd)
        ring.kick_fd = self._keep(fd)
        ring.started = True
        self._update(ring)

    def _on_set_vring_call(self, msg: p.Message) -> None:
        ring, fd = self._vring_fd(msg)
        _close(ring.call_fd)
        ring.call_fd = self._keep(fd) if fd is not None else None
        _install_call(ring.vq, ring.call_fd)

    def _on_set_vring_err(self, msg: p.Message) -> None:
        ring, fd = self._vring_fd(msg)
        _close(ring.err_fd)
        ring.err_fd = self._keep(fd) if fd is not None else None

    def _vring_fd(self, msg: p.Message) -> tuple[Vring, int | None]:
        vfd = _payload(msg, p.VringFd)
        ring = self._ring(vfd.index)
        if vfd.no_fd:
            if msg.fds:
                raise FrontendError(f"vring {vfd.index}: NOFD flag set but an fd was sent")
            return ring, None
        if len(msg.fds) != 1:
            raise FrontendError(f"vring {vfd.index}: expected one fd, got {len(msg.fds)}")
        return ring, msg.fds[0]

    def _on_set_vring_enable(self, msg: p.Message) -> None:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise FrontendError(f"vring {state.index}: enable value {state.num} is not 0 or 1")
        ring.enabled = bool(state.num)
        self._update(ring)

    def _on_net_set_mtu(self, msg: p.Message) -> None:
        if PF.NET_MTU not in self.protocol_features:
            raise FrontendError("NET_SET_MTU without the NET_MTU protocol feature")
        self.device.set_mtu(_payload(msg, p.U64).value)

    def _on_get_config(self, msg: p.Message) -> p.Payload:
        cfg = _payload(msg, p.ConfigSpace)
        end = cfg.offset + cfg.size
        if end > p.MAX_CONFIG_SIZE:
            raise FrontendError(f"config read of {cfg.size} bytes at offset {cfg.offset} "
                                f"exceeds {p.MAX_CONFIG_SIZE} bytes")
        space = self.device.config().ljust(end, b"\0")
        return p.ConfigSpace(cfg.offset, cfg.size, cfg.flags, space[cfg.offset:end])

    def _on_set_config(self, msg: p.Message) -> None:
        cfg = _payload(msg, p.ConfigSpace)
        size = len(self.device.config())
        if cfg.offset + cfg.size > size:
            raise FrontendError(f"config write of {cfg.size} bytes at offset {cfg.offset} "
                                f"is outside the {size}-byte config space")
        try:
            self.device.write_config(cfg.offset, cfg.payload)
        except PermissionError as exc:
            raise BackendError(str(exc)) from exc


_P = TypeVar("_P")


def _payload(msg: p.Message, kind: type[_P]) -> _P:
    """The message's payload, checked to be the layout this handler needs."""
    if not isinstance(msg.payload, kind):
        raise FrontendError(f"{p.request_name(msg.request)}: payload {msg.payload!r} is not "
                            f"a {kind.__name__}")
    return msg.payload


#: The dispatch table: every request this back-end implements. Absent means unsupported.
HANDLERS: dict[Request, Callable[[Session, p.Message], p.Payload | None]] = {
    Request.GET_FEATURES: Session._on_get_features,
    Request.SET_FEATURES: Session._on_set_features,
    Request.SET_OWNER: Session._on_set_owner,
    Request.RESET_OWNER: Session._on_reset,
    Request.SET_MEM_TABLE: Session._on_set_mem_table,
    Request.SET_VRING_NUM: Session._on_set_vring_num,
    Request.SET_VRING_ADDR: Session._on_set_vring_addr,
    Request.SET_VRING_BASE: Session._on_set_vring_base,
    Request.GET_VRING_BASE: Session._on_get_vring_base,
    Request.SET_VRING_KICK: Session._on_set_vring_kick,
    Request.SET_VRING_CALL: Session._on_set_vring_call,
    Request.SET_VRING_ERR: Session._on_set_vring_err,
    Request.GET_PROTOCOL_FEATURES: Session._on_get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: Session._on_set_protocol_features,
    Request.GET_QUEUE_NUM: Session._on_get_queue_num,
    Request.SET_VRING_ENABLE: Session._on_set_vring_enable,
    Request.NET_SET_MTU: Session._on_net_set_mtu,
    Request.GET_CONFIG: Session._on_get_config,
    Request.SET_CONFIG: Session._on_set_config,
    Request.RESET_DEVICE: Session._on_reset,
    Request.GET_MAX_MEM_SLOTS: Session._on_get_max_mem_slots,
    Request.ADD_MEM_REG: Session._on_add_mem_reg,
    Request.REM_MEM_REG: Session._on_rem_mem_reg,
}
