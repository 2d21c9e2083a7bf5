"""A device served by ANOTHER vhost-user back-end, driven through `frontend.Frontend`.

`VhostUserProxy` is a `Device` like any other, so a transport that serves devices (the
lguest bridge, a test) can put any vhost-user back-end behind a guest: qemu-storage-daemon,
DPDK's vhost PMD, `vhostpy blk`. Its features and config space come from the back-end
(GET_FEATURES, GET_CONFIG); when the transport starts a queue, the proxy hands the ring to
the back-end (SET_MEM_TABLE with the guest memory fd, SET_VRING_NUM/BASE/ADDR, kick and call
eventfds, SET_VRING_ENABLE) instead of serving it in Python. A driver notify becomes a write
to the kick eventfd; the back-end's call eventfd becomes `vq.interrupt()`, i.e. the transport's
interrupt (the back-end already applied the driver's interrupt suppression).

Guest-physical addresses double as front-end virtual addresses here (the region table says
so), which keeps ring addresses identical on both sides.

Legacy drivers (lguest) do not know VIRTIO_F_VERSION_1, which libvhost-user back-ends
require. On little-endian hosts the split ring and the virtio-blk request are the same in
both, so for block devices the proxy negotiates VERSION_1 on the driver's behalf
(`assume_version_1=True`); the virtio-net header differs unless MRG_RXBUF is negotiated, so
that is left to the caller.

Ring layout: the proxy forwards split rings only (the transports that drive it, the lguest
bridge, know no other). VIRTIO_F_RING_PACKED is stripped from what the back-end offers, and
a driver acking it is refused: the proxy would hand a packed ring to a back-end as split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from vhostpy import protocol as p
from vhostpy.device import Device
from vhostpy.errors import BackendError
from vhostpy.frontend import BackendFailure, BackendGone, Frontend
from vhostpy.virtqueue import VIRTIO_F_VERSION_1, Virtqueue

log = logging.getLogger(__name__)

PF = p.ProtocolFeature
WANTED_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.CONFIG
PROTOCOL_FEATURES_BIT = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
#: Bits a vhost-user back-end offers that are the protocol's, never the device's.
VHOST_USER_BITS = PROTOCOL_FEATURES_BIT | 1 << p.VHOST_F_LOG_ALL
#: VIRTIO_F_RING_PACKED (virtio 1.1+): never forwarded (see the module docstring).
RING_PACKED_BIT = 1 << 34


class VhostUserProxy(Device):
    """Device `device_id` whose queues are served by the back-end at the other end of `fe`.

    `memory_fd`/`memory_size`: the guest RAM (and everything else the rings may live in) as
    one shareable fd mapped at guest-physical 0. `config_size`: how many config bytes to ask
    the back-end for (0 without the CONFIG protocol feature).
    """

    def __init__(self, fe: Frontend, *, device_id: int, memory_fd: int, memory_size: int,
                 num_queues: int = 1, queue_size: int = 256, config_size: int = 0,
                 assume_version_1: bool = False, name: str = "vhost-user proxy") -> None:
        super().__init__()
        self.fe = fe
        self.device_id = device_id
        self.name = name
        self.num_queues = num_queues
        self.max_queue_size = queue_size
        self.memory_fd = memory_fd
        self.memory_size = memory_size
        self.assume_version_1 = assume_version_1
        self._kick: dict[int, int] = {}
        self._call: dict[int, tuple[int, Virtqueue]] = {}
        self._memory_sent = False
        try:
            self._handshake(config_size)
        except BaseException:
            fe.close()      # the proxy owns `fe` from here on, even when it cannot start
            raise

    def _handshake(self, config_size: int) -> None:
        fe = self.fe
        fe.set_owner()
        self.backend_features = fe.get_features()
        protocol = PF(0)
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            protocol = fe.get_protocol_features() & WANTED_PROTOCOL_FEATURES
            fe.set_protocol_features(protocol)
        self.protocol_features = protocol
        self._config = b""
        if config_size and PF.CONFIG in protocol:
            self._config = fe.get_config(0, config_size)

    # -- Device interface ------------------------------------------------------------------
    def features(self) -> int:
        """What the back-end offers, without the vhost-user-only bits (the protocol
        features bit, VHOST_F_LOG_ALL: this proxy never migrates) and without
        VIRTIO_F_RING_PACKED (split rings only)."""
        return self.backend_features & ~(VHOST_USER_BITS | RING_PACKED_BIT)

    def device_features(self) -> int:
        return self.features()

    def config(self) -> bytes:
        return self._config

    def set_features(self, features: int) -> None:
        """Forward the driver's features (BackendError for VIRTIO_F_RING_PACKED: this
        proxy hands split rings to its back-end only)."""
        if features & RING_PACKED_BIT:
            raise BackendError(f"{self.name}: VIRTIO_F_RING_PACKED acked, but this proxy "
                               "forwards split rings only")
        super().set_features(features)
        wire = features
        if self.assume_version_1 and self.backend_features >> VIRTIO_F_VERSION_1 & 1:
            wire |= 1 << VIRTIO_F_VERSION_1
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            wire |= PROTOCOL_FEATURES_BIT
        self._request(self.fe.set_features, wire)

    def queue_started(self, index: int, vq: Virtqueue) -> None:
        if not self._memory_sent:
            region = p.MemoryRegion(0, self.memory_size, 0, 0)
            self._request(self.fe.set_mem_table, [region], [self.memory_fd])
            self._memory_sent = True
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick[index] = kick
        self._call[index] = (call, vq)
        fe = self.fe
        self._request(fe.set_vring_num, index, vq.size)
        self._request(fe.set_vring_base, index, vq.last_avail_idx)
        self._request(fe.set_vring_addr, index, vq.desc_addr, vq.used_addr, vq.avail_addr)
        self._request(fe.set_vring_call, index, call)
        self._request(fe.set_vring_kick, index, kick)
        if self.backend_features & PROTOCOL_FEATURES_BIT:   # rings start disabled then
            self._request(fe.set_vring_enable, index, True)
        os.eventfd_write(kick, 1)   # serve what the driver queued before the start

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        """The driver notified: kick the back-end."""
        fd = self._kick.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        if index in self._kick:
            try:
                vq.set_base(self.fe.get_vring_base(index))
            except (BackendFailure, BackendGone, BackendError) as exc:
                log.warning("%s: GET_VRING_BASE for queue %d failed: %s", self.name, index, exc)
            os.close(self._kick.pop(index))
            os.close(self._call.pop(index)[0])

    def reset(self) -> None:
        for index in list(self._kick):
            os.close(self._kick.pop(index))
            os.close(self._call.pop(index)[0])
        super().reset()

    # -- interrupts ------------------------------------------------------------------------
    def call_fds(self) -> Sequence[int]:
        """The call eventfds to watch; when one is readable, run `poll_calls()`."""
        return [fd for fd, _ in self._call.values()]

    def poll_calls(self) -> int:
        """Turn fired call eventfds into `vq.interrupt()` (the transport's interrupt)."""
        fired = 0
        for fd, vq in list(self._call.values()):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            fired += 1
            vq.interrupt()
        return fired

    def close(self) -> None:
        """Release the eventfds and the connection to the back-end."""
        self.reset()
        self.fe.close()

    def _request(self, call: object, *args: object) -> None:
        try:
            call(*args)  # type: ignore[operator]
        except (BackendFailure, BackendGone) as exc:
            raise BackendError(f"{self.name}: the vhost-user back-end refused: {exc}") from exc
