"""The vhost-user back-end control plane for one front-end connection (sans-I/O).

`Session.handle(message)` applies one decoded request and returns the reply messages to
send. The session owns what the front-end handed over (guest memory mappings; kick, call
and err eventfds as the rings' notifiers); it never touches a socket. Each ring is a
`vring.Vring` runner, which owns the ring's state, its notifiers, every device hook call and
the decision after a kick; the session only translates messages into runner calls. The
runners ask the session's host (`SessionHost`, an event loop) to watch kick fds and to run
timers.

Dispatch is one table, `HANDLERS`. Everything that is common to all requests happens once
in `handle`: DEBUG logging, fd ownership (fds a handler did not keep are closed), failures
turned into explicit failure replies (a REPLY_ACK of 1, or an empty payload for requests
that have their own reply), and REPLY_ACK on success. A request missing from the table is
unsupported and always fails: it is never answered with a fake "ok".

Checked once, centrally, by the decoder (`protocol.expected_fds`): how many fds a message
carries and its payload layout; handlers never re-check them. Only eventfds are accepted as
kick, call and err (`vring.eventfd_notifier`). Device hooks that belong to a request
(`set_features`, `write_config`, `set_mtu`) run under `vring.call_hook`, so a device that
raises fails that request only.

One reply may come later: GET_VRING_BASE on a ring with chains in flight (a device
completing requests later) is answered once they are completed (`Vring.stop_after_drain`).
Meanwhile `waiting` is True and the host must hand over no further message; the reply
then goes out through `on_reply`.

Ring layouts: the session offers VIRTIO_F_RING_PACKED (bit 34) to every device, as it adds
the vhost-user bits (devices' `set_features` see it; they need not care, their rings are
`Virtqueue`s either way). SET_FEATURES picks every ring's layout from it (`Vring.set_layout`;
QEMU sends SET_FEATURES before it configures rings, and QEMU 7.2's vhost-user-blk also before
GET_INFLIGHT_FD); a reset goes back to split. For a packed ring SET_VRING_NUM takes any size
in 1..32768, SET_VRING_ADDR's desc/avail/used are the descriptor ring, driver area and device
area, and SET/GET_VRING_BASE carry the 32-bit form (bits 0-14 the avail index, 15 its wrap
counter, 16-30 the used index, 31 its wrap counter); split rings keep 16-bit bases. The
inflight region (GET/SET_INFLIGHT_FD) is sized and sliced for the acked layout
(`inflight.region_size(..., packed=)`); one made for the other layout is dropped (logged)
when SET_FEATURES changes it.

Ring states follow the spec: a ring is *started* by SET_VRING_KICK and stopped by
GET_VRING_BASE; it is *enabled* by SET_VRING_ENABLE, or implicitly when
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated. The device serves a ring only while it
is started, enabled and configured (`vring.RingState.ENABLED`).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable
from typing import ClassVar, Protocol, TypeVar

from vhostpy import inflight
from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.dirtylog import DirtyLog
from vhostpy.errors import FrontendError, ProtocolError, UnsupportedError, VhostError
from vhostpy.memory import GuestMemory
from vhostpy.notifier import EventFdNotifier, eventfd_notifier
from vhostpy.virtqueue import MAX_QUEUE_SIZE
from vhostpy.virtqueue_packed import VIRTIO_F_RING_PACKED
from vhostpy.vring import DefaultVirtqueue, Vring, call_hook

log = logging.getLogger(__name__)

Request = p.Request
PF = p.ProtocolFeature

#: Protocol features this session implements completely.
SUPPORTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
    | PF.INFLIGHT_SHMFD | PF.LOG_SHMFD
)
PROTOCOL_FEATURES_BIT = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
#: VHOST_F_LOG_ALL: the front-end turns dirty logging on (migration) by acking it.
LOG_ALL_BIT = 1 << p.VHOST_F_LOG_ALL
#: Feature bits that belong to vhost-user, never handed to the device.
VHOST_BITS = PROTOCOL_FEATURES_BIT | LOG_ALL_BIT
#: VIRTIO_F_RING_PACKED: offered to every device (the session builds the rings); the
#: device's `set_features` sees it.
PACKED_BIT = 1 << VIRTIO_F_RING_PACKED
#: Memory slots offered with CONFIGURE_MEM_SLOTS.
DEFAULT_MAX_MEM_SLOTS = 32


class SessionHost(Protocol):
    """What a session needs from the I/O edge that runs it: fd watching and timers for its
    rings (`vring.RingHost`; an `EventLoop` is one)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> bool: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class Session:
    """One front-end's view of one device; see the module docstring for the contract."""

    def __init__(self, device: Device, host: SessionHost, *,
                 max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS) -> None:
        self.device = device
        self.host = host
        self.max_mem_slots = max_mem_slots
        self.memory = GuestMemory()
        self.rings = [Vring(device, DefaultVirtqueue(self.memory, i), host)
                      for i in range(device.num_queues)]
        #: Each ring's SET_VRING_ADDR (front-end virtual addresses), re-translated into
        #: guest-physical ones whenever the memory table changes.
        self._addrs: list[p.VringAddr | None] = [None] * device.num_queues
        for ring in self.rings:
            ring.on_memory_lost = self._memory_lost
        #: Set by the host: called once when guest memory lost its backing (the front-end
        #: shrank a memfd under a ring); the host drops the front-end.
        self.on_fatal: Callable[[str], None] | None = None
        self._fatal = False
        #: True while a reply is pending (GET_VRING_BASE waiting for a ring to drain): the
        #: host must not call `handle` until `on_reply` delivered it.
        self.waiting = False
        #: Set by the host: sends replies that come after `handle` returned.
        self.on_reply: Callable[[list[p.Message]], None] | None = None
        #: Each ring's explicit SET_VRING_ENABLE.
        self._enabled = [False] * device.num_queues
        self.features = 0
        self.features_set = False
        self.protocol_features = PF(0)
        self.owner = False
        self._kept: set[int] = set()
        #: Extra ADD_MEM_REGs of an already mapped region, by (gpa, size, uva): QEMU before
        #: 8.0 sends ADD/REM_MEM_REG once per queue pair (one vhost_dev each) on one socket.
        self._region_dups: dict[tuple[int, int, int], int] = {}
        #: The inflight region in force (GET/SET_INFLIGHT_FD): its fd and mapping.
        self._inflight_fd: int | None = None
        self._inflight_map: mmap.mmap | None = None
        #: The layout the region in force was sliced with (packed or split rings).
        self._inflight_packed = False
        #: The dirty log (SET_LOG_BASE) and its mapping; logging runs while LOG_ALL is acked.
        self._log: DirtyLog | None = None
        self._log_map: mmap.mmap | None = None

    # -- offered features ------------------------------------------------------------------
    def offered_features(self) -> int:
        """GET_FEATURES: the device's bits plus VHOST_USER_F_PROTOCOL_FEATURES,
        VHOST_F_LOG_ALL (every device writes guest memory only through its chains, which
        the rings log) and VIRTIO_F_RING_PACKED (the session builds every ring in the
        layout the driver picks)."""
        return self.device.features() | VHOST_BITS | PACKED_BIT

    def offered_protocol_features(self) -> PF:
        """GET_PROTOCOL_FEATURES: what this session implements for this device."""
        offered = SUPPORTED_PROTOCOL_FEATURES
        if self.device.supports_mtu:
            offered |= PF.NET_MTU
        if self.device.supports_announce:
            offered |= PF.RARP
        if not self.device.config_via_frontend or not self.device.config():
            offered &= ~PF.CONFIG   # nothing the front-end reads (virtio-net, virtio-rng)
        return offered

    # -- introspection ---------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """A snapshot for the control socket and logs: negotiated features (hex and names),
        protocol features, guest memory regions, and each ring's `Vring.status()`."""
        device_id = self.device.device_id
        return {
            "features": {"offered": hex(self.offered_features()), "acked": hex(self.features),
                         "acked_names": p.feature_names(self.features & ~PROTOCOL_FEATURES_BIT,
                                                        device_id)},
            "protocol_features": {"acked": hex(int(self.protocol_features)),
                                  "names": [f.name for f in PF if f in self.protocol_features
                                            and f.name]},
            "memory": {"regions": len(self.memory), "bytes": self.memory.total_size},
            "inflight_region": self._inflight_map is not None,
            "dirty_log": None if self._log is None else {
                "logging": self._logging(), "bytes": len(self._log.view),
                "pages_marked": self._log.pages_marked
                + sum(ring.vq.pages_logged for ring in self.rings)},
            "rings": [ring.status() for ring in self.rings],
        }

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
            if self.waiting:
                raise FrontendError(f"{name} while a GET_VRING_BASE reply is pending")
            result = handler(self, msg)
        except (VhostError, ValueError, OverflowError) as exc:
            log.warning("%s failed (%s): %s", name, getattr(exc, "whose", "input"), exc)
            return self._failure_reply(req, msg.flags, spec)
        finally:
            for fd in msg.fds:
                if fd not in self._kept:
                    _close(fd)
        if isinstance(result, _Later):
            return []
        if isinstance(result, p.Message):
            return [result]
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

    # -- ring life cycle (the runner owns it; these translate) -----------------------------
    def vring_addr(self, index: int) -> p.VringAddr | None:
        """Ring `index`'s SET_VRING_ADDR in force (None: none since the last stop)."""
        return self._addrs[self._ring(index).index]

    def _implicitly_enabled(self) -> bool:
        """Without VHOST_USER_F_PROTOCOL_FEATURES a ring starts enabled (spec)."""
        return not self.features & PROTOCOL_FEATURES_BIT

    def _apply_enable(self, index: int) -> None:
        self.rings[index].enable(self._enabled[index] or self._implicitly_enabled())

    def _translate(self, index: int) -> tuple[int, int, int]:
        """The ring's guest-physical (desc, avail, used) from its SET_VRING_ADDR."""
        a = self._addrs[index]
        assert a is not None
        vq = self.rings[index].vq
        desc, avail, used = vq.part_lengths(vq.size)
        return (self.memory.uva_to_gpa(a.desc_user_addr, desc),
                self.memory.uva_to_gpa(a.avail_user_addr, avail),
                self.memory.uva_to_gpa(a.used_user_addr, used))

    def _memory_lost(self, reason: str) -> None:
        """Guest memory lost its backing: every ring over it breaks, the front-end goes."""
        if self._fatal:
            return
        self._fatal = True
        log.error("%s: %s; the front-end is dropped", self.device.name, reason)
        for ring in self.rings:
            ring.fail(f"guest memory lost: {reason}")
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def kick(self, index: int) -> int:
        """The driver kicked ring `index` (the runner watches kick fds itself; this is for
        in-process front-ends and tests). Returns how many chains the device took."""
        return self._ring(index).kick()

    def _reset_device(self) -> None:
        self.waiting = False
        for ring in self.rings:
            ring.reset()
            ring.set_layout(packed=False)     # unconfigured now: always allowed
        self._addrs = [None] * len(self.rings)
        self._enabled = [False] * len(self.rings)
        try:
            call_hook(self.device, "reset", self.device.reset)
        except VhostError:
            pass    # logged by call_hook; the session is reset whatever the device did
        self.features = 0
        self.features_set = False
        # The front-end makes a new inflight region after a reset (QEMU frees its own).
        self._set_inflight(None, None)
        self._update_logging()

    def close(self) -> None:
        """The front-end went away: stop rings, release every fd and mapping, reset the device."""
        self._fatal = False
        self._reset_device()
        self._set_log(None, None)
        self.memory.clear()
        self._region_dups.clear()

    # -- inflight region and dirty log ------------------------------------------------------
    def _set_inflight(self, fd: int | None, region: mmap.mmap | None,
                      info: p.InflightInfo | None = None) -> None:
        """Make `region` (described by `info`) the inflight region: each ring it covers
        tracks its chains there from its next start. The previous region's fd is closed;
        its mapping goes once the rings let go of it."""
        packed = self._packed()
        for i, ring in enumerate(self.rings):
            view = None
            if region is not None and info is not None and i < info.num_queues:
                view = inflight.queue_view(region, i, info.queue_size, packed=packed,
                                           offset=info.mmap_offset)
            ring.set_inflight(view)
        self._inflight_packed = packed
        _close(self._inflight_fd)
        self._inflight_fd, self._inflight_map = fd, region

    def _packed(self) -> bool:
        """Whether the driver acked VIRTIO_F_RING_PACKED (the rings' and the inflight
        region's layout)."""
        return bool(self.features & PACKED_BIT)

    def _set_log(self, log: DirtyLog | None, region: mmap.mmap | None) -> None:
        self._log, self._log_map = log, region
        self._update_logging()

    def _logging(self) -> bool:
        return self._log is not None and bool(self.features & LOG_ALL_BIT)

    def _update_logging(self) -> None:
        """Hand each ring the dirty log while LOG_ALL is acked and a log is mapped (and the
        used ring's log address when its SET_VRING_ADDR asked for it); else none."""
        log_ = self._log if self._logging() else None
        for i, ring in enumerate(self.rings):
            addr = self._addrs[i]
            used = None
            if addr is not None and addr.flags & (1 << p.VHOST_VRING_F_LOG):
                used = addr.log_guest_addr
            ring.vq.set_dirty_log(log_, used)

    def _memory_changed(self) -> None:
        for i, ring in enumerate(self.rings):
            if self._addrs[i] is None or ring.vq.size == 0:
                continue
            try:
                ring.set_addresses(*self._translate(i))
            except VhostError as exc:
                ring.fail(f"ring no longer mapped after a memory change: {exc}")

    # -- handlers (one per request; each returns a reply payload or None) -------------------
    def _on_get_features(self, msg: p.Message) -> p.Payload:
        return p.U64(self.offered_features())

    def _on_set_features(self, msg: p.Message) -> None:
        value = _payload(msg, p.U64).value
        extra = value & ~self.offered_features()
        if extra:
            raise FrontendError(f"feature bits {extra:#x} were never offered "
                                f"(offered {self.offered_features():#x})")
        self._set_layouts(bool(value & PACKED_BIT))
        if value != self.features or not self.features_set:
            log.info("%s: driver features %#x (%s); offered %#x", self.device.name, value,
                     " ".join(p.feature_names(value, self.device.device_id)),
                     self.offered_features())
        # Migration toggles LOG_ALL alone while the device runs: that is not a new driver.
        if not self.features_set or (value ^ self.features) != LOG_ALL_BIT:
            call_hook(self.device, "set_features", self.device.set_features,
                      value & ~VHOST_BITS)
        self.features = value
        self.features_set = True
        if self._inflight_map is not None and self._inflight_packed != self._packed():
            log.warning("%s: inflight region dropped: it was laid out for %s rings",
                        self.device.name, "packed" if self._inflight_packed else "split")
            self._set_inflight(None, None)
        for i, ring in enumerate(self.rings):
            ring.set_features(value)
            self._apply_enable(i)
        self._update_logging()

    def _set_layouts(self, packed: bool) -> None:
        """Every ring in the layout SET_FEATURES asked for; FrontendError (and every ring
        as it was) when a ring in use would have to change its layout."""
        before = [ring.layout for ring in self.rings]
        try:
            for ring in self.rings:
                ring.set_layout(packed)
        except VhostError:
            for ring, layout in zip(self.rings, before, strict=True):
                ring.set_layout(layout == "packed")
            raise
        if self.rings and before[0] != self.rings[0].layout:
            log.info("%s: %s rings", self.device.name, self.rings[0].layout)

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

    def _require_mem_slots(self, name: str) -> None:
        if PF.CONFIGURE_MEM_SLOTS not in self.protocol_features:
            raise FrontendError(f"{name} without the CONFIGURE_MEM_SLOTS protocol feature")

    def _on_add_mem_reg(self, msg: p.Message) -> None:
        self._require_mem_slots("ADD_MEM_REG")
        region = _payload(msg, p.MemRegionMsg).region
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
        self._require_mem_slots("REM_MEM_REG")
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
        num, limit = state.num, self.device.max_queue_size
        if ring.layout == "packed":
            if not 0 < num <= MAX_QUEUE_SIZE:
                raise FrontendError(f"vring {state.index}: packed ring size {num} is not "
                                    f"in 1..{MAX_QUEUE_SIZE}")
        elif not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise FrontendError(f"vring {state.index}: size {num} is not a power of two "
                                f"in 1..{MAX_QUEUE_SIZE}")
        if num > limit:
            raise FrontendError(f"vring {state.index}: size {num} is larger than the "
                                f"{limit} this device accepts (its queue size limit, "
                                "--queue-size on the command line)")
        ring.set_size(num)

    def _on_set_vring_addr(self, msg: p.Message) -> None:
        addr = _payload(msg, p.VringAddr)
        ring = self._ring(addr.index)
        if addr.flags & ~(1 << p.VHOST_VRING_F_LOG):
            raise FrontendError(f"vring {addr.index}: unknown address flags {addr.flags:#x}")
        if ring.vq.size == 0:
            raise FrontendError(f"vring {addr.index}: SET_VRING_ADDR before SET_VRING_NUM")
        previous, self._addrs[addr.index] = self._addrs[addr.index], addr
        try:
            ring.set_addresses(*self._translate(addr.index))
        except VhostError:
            self._addrs[addr.index] = previous
            raise
        self._update_logging()

    def _on_set_vring_base(self, msg: p.Message) -> None:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        if ring.layout == "packed":
            self._check_packed_base(state.index, state.num, ring.vq.size)
        elif state.num > 0xFFFF:
            raise FrontendError(f"vring {state.index}: base {state.num:#x} does not fit a "
                                "split ring (16 bits; VIRTIO_F_RING_PACKED was not acked)")
        ring.set_base(state.num)

    @staticmethod
    def _check_packed_base(index: int, base: int, size: int) -> None:
        """FrontendError for a packed base (32-bit form) whose indices do not fit `size`
        (0: not known yet; the ring checks it when SET_VRING_NUM comes)."""
        if not 0 <= base <= 0xFFFFFFFF:
            raise FrontendError(f"vring {index}: packed base {base:#x} is not 32 bits")
        used_half = base >> 16 or base & 0xFFFF     # 0: the used half follows the avail one
        avail, used = base & 0x7FFF, used_half & 0x7FFF
        if size and (avail >= size or used >= size):
            raise FrontendError(
                f"vring {index}: packed base {base:#x} (avail index {avail} wrap "
                f"{base >> 15 & 1}, used index {used} wrap {used_half >> 15 & 1}) does not "
                f"fit size {size}")

    def _on_get_vring_base(self, msg: p.Message) -> p.Payload | _Later:
        state = _payload(msg, p.VringState)
        ring = self._ring(state.index)
        now: list[int] = []
        later = False

        def stopped(base: int) -> None:
            self._addrs[state.index] = None
            if not later:
                now.append(base)
                return
            self.waiting = False
            log.debug("GET_VRING_BASE reply for vring %d: base %d", state.index, base)
            if self.on_reply is not None:
                self.on_reply([p.reply(Request.GET_VRING_BASE, p.VringState(state.index, base))])
        ring.stop_after_drain(stopped)
        if now:
            return p.VringState(state.index, now[0])
        later = True
        self.waiting = True
        return _LATER

    def _on_set_vring_kick(self, msg: p.Message) -> None:
        vfd = _payload(msg, p.VringFd)
        ring = self._ring(vfd.index)
        if vfd.no_fd:
            raise UnsupportedError(f"vring {vfd.index}: polling mode (kick without an fd) "
                                   "is not supported")
        kick = self._eventfd(msg, "kick")
        try:
            ring.set_kick(kick)
        except VhostError:
            kick.close()
            raise
        ring.start()

    def _on_set_vring_call(self, msg: p.Message) -> None:
        vfd = _payload(msg, p.VringFd)
        ring = self._ring(vfd.index)
        ring.set_call(None if vfd.no_fd else self._eventfd(msg, "call"))

    def _on_set_vring_err(self, msg: p.Message) -> None:
        vfd = _payload(msg, p.VringFd)
        ring = self._ring(vfd.index)
        ring.set_err(None if vfd.no_fd else self._eventfd(msg, "err"))

    def _eventfd(self, msg: p.Message, what: str) -> EventFdNotifier:
        """The message's one fd as a ring notifier (refused unless an eventfd); kept."""
        index = _payload(msg, p.VringFd).index
        notifier = eventfd_notifier(msg.fds[0], f"vring {index} {what}")
        self._keep(msg.fds[0])
        return notifier

    def _on_set_vring_enable(self, msg: p.Message) -> None:
        state = _payload(msg, p.VringState)
        self._ring(state.index)
        if state.num not in (0, 1):
            raise FrontendError(f"vring {state.index}: enable value {state.num} is not 0 or 1")
        self._enabled[state.index] = bool(state.num)
        self._apply_enable(state.index)

    def _on_get_inflight_fd(self, msg: p.Message) -> p.Message:
        if PF.INFLIGHT_SHMFD not in self.protocol_features:
            raise FrontendError("GET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature")
        info = _payload(msg, p.InflightInfo)
        self._check_inflight_shape(info)
        fd, region = inflight.create_region(info.num_queues, info.queue_size,
                                            packed=self._packed())
        size = len(region)
        self._set_inflight(fd, region, p.InflightInfo(size, 0, info.num_queues,
                                                      info.queue_size))
        log.info("%s: inflight region of %d bytes for %d %s queues of %d", self.device.name,
                 size, info.num_queues, "packed" if self._packed() else "split",
                 info.queue_size)
        return p.reply(Request.GET_INFLIGHT_FD,
                       p.InflightInfo(size, 0, info.num_queues, info.queue_size), fds=(fd,))

    def _check_inflight_shape(self, info: p.InflightInfo) -> None:
        if not 1 <= info.num_queues <= len(self.rings):
            raise FrontendError(f"inflight region for {info.num_queues} queues; the device "
                                f"has {len(self.rings)}")
        size = info.queue_size
        if self._packed():
            if not 0 < size <= MAX_QUEUE_SIZE:
                raise FrontendError(f"inflight region for packed queues of {size}: not in "
                                    f"1..{MAX_QUEUE_SIZE}")
        elif not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise FrontendError(f"inflight region for queues of {size}: not a power of two "
                                f"in 1..{MAX_QUEUE_SIZE}")

    def _on_set_inflight_fd(self, msg: p.Message) -> None:
        if PF.INFLIGHT_SHMFD not in self.protocol_features:
            raise FrontendError("SET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature")
        info = _payload(msg, p.InflightInfo)
        self._check_inflight_shape(info)
        packed = self._packed()
        want = inflight.region_size(info.num_queues, info.queue_size, packed=packed)
        need = info.mmap_offset + want
        if info.mmap_size < want:
            raise FrontendError(f"inflight region of {info.mmap_size} bytes for "
                                f"{info.num_queues} {'packed' if packed else 'split'} queues "
                                f"of {info.queue_size}: needs {want}")
        fd = msg.fds[0]
        region = _map_shared(fd, need, "inflight region")
        self._set_inflight(self._keep(fd), region, info)

    def _on_set_log_base(self, msg: p.Message) -> p.Payload:
        if PF.LOG_SHMFD not in self.protocol_features or not msg.fds:
            raise UnsupportedError("SET_LOG_BASE without the LOG_SHMFD protocol feature and "
                                   "its fd (a log in the front-end's address space) is not "
                                   "supported")
        info = _payload(msg, p.LogInfo)
        if info.mmap_size == 0:
            raise FrontendError("SET_LOG_BASE with an empty log")
        region = _map_shared(msg.fds[0], info.mmap_offset + info.mmap_size, "dirty log")
        view = memoryview(region)[info.mmap_offset:info.mmap_offset + info.mmap_size]
        self._set_log(DirtyLog(view), region)
        covers = info.mmap_size * 8 * 4096
        end = max((r.guest_phys_addr + r.size for r in self.memory.regions), default=0)
        if covers < end:
            log.warning("%s: the dirty log covers %#x bytes of guest memory, which ends at "
                        "%#x: writes above it cannot be logged", self.device.name, covers,
                        end)
        log.info("%s: dirty log of %d bytes (logging %s)", self.device.name, info.mmap_size,
                 "on" if self._logging() else "off until LOG_ALL")
        return p.U64(0)

    def _on_net_set_mtu(self, msg: p.Message) -> None:
        if PF.NET_MTU not in self.protocol_features:
            raise FrontendError("NET_SET_MTU without the NET_MTU protocol feature")
        call_hook(self.device, "set_mtu", self.device.set_mtu, _payload(msg, p.U64).value)

    def _on_send_rarp(self, msg: p.Message) -> None:
        if PF.RARP not in self.protocol_features:
            raise FrontendError("SEND_RARP without the RARP protocol feature")
        mac = _payload(msg, p.U64).value.to_bytes(8, "little")[:6]
        call_hook(self.device, "announce", self.device.announce, mac)

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
        call_hook(self.device, "write_config", self.device.write_config, cfg.offset,
                  cfg.payload)


    #: The dispatch table: every request this back-end implements. Absent means unsupported.
    HANDLERS: ClassVar[dict[Request, Callable[[Session, p.Message],
                                              p.Payload | p.Message | _Later | None]]] = {
        Request.GET_FEATURES: _on_get_features,
        Request.SET_FEATURES: _on_set_features,
        Request.SET_OWNER: _on_set_owner,
        Request.RESET_OWNER: _on_reset,
        Request.SET_MEM_TABLE: _on_set_mem_table,
        Request.SET_VRING_NUM: _on_set_vring_num,
        Request.SET_VRING_ADDR: _on_set_vring_addr,
        Request.SET_VRING_BASE: _on_set_vring_base,
        Request.GET_VRING_BASE: _on_get_vring_base,
        Request.SET_VRING_KICK: _on_set_vring_kick,
        Request.SET_VRING_CALL: _on_set_vring_call,
        Request.SET_VRING_ERR: _on_set_vring_err,
        Request.GET_PROTOCOL_FEATURES: _on_get_protocol_features,
        Request.SET_PROTOCOL_FEATURES: _on_set_protocol_features,
        Request.GET_QUEUE_NUM: _on_get_queue_num,
        Request.SET_VRING_ENABLE: _on_set_vring_enable,
        Request.NET_SET_MTU: _on_net_set_mtu,
        Request.SEND_RARP: _on_send_rarp,
        Request.GET_CONFIG: _on_get_config,
        Request.SET_CONFIG: _on_set_config,
        Request.RESET_DEVICE: _on_reset,
        Request.GET_MAX_MEM_SLOTS: _on_get_max_mem_slots,
        Request.GET_INFLIGHT_FD: _on_get_inflight_fd,
        Request.SET_INFLIGHT_FD: _on_set_inflight_fd,
        Request.SET_LOG_BASE: _on_set_log_base,
        Request.ADD_MEM_REG: _on_add_mem_reg,
        Request.REM_MEM_REG: _on_rem_mem_reg,
    }


_P = TypeVar("_P")


class _Later:
    """A handler's result when its reply comes later, through `Session.on_reply`."""


_LATER = _Later()


def _map_shared(fd: int, size: int, what: str) -> mmap.mmap:
    """A shared read-write mapping of the first `size` bytes of `fd` (FrontendError when
    the fd cannot be mapped that far)."""
    try:
        if os.fstat(fd).st_size < size:
            raise FrontendError(f"{what}: the fd holds {os.fstat(fd).st_size} bytes, the "
                                f"message says {size}")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise FrontendError(f"{what}: cannot map {size} bytes of fd {fd}: {exc}") from exc


def _payload(msg: p.Message, kind: type[_P]) -> _P:
    """The message's payload, checked to be the layout this handler needs."""
    if not isinstance(msg.payload, kind):
        raise FrontendError(f"{p.request_name(msg.request)}: payload {msg.payload!r} is not "
                            f"a {kind.__name__}")
    return msg.payload

#: The dispatch table (`Session.HANDLERS`): every request this back-end implements.
HANDLERS = Session.HANDLERS
