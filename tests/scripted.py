"""A scripted vhost-user front-end and guest driver for tests.

`ScriptedGuest` owns guest RAM (a memfd), connects a `Frontend` to a back-end, hands the
memory over with SET_MEM_TABLE, lays out split rings with `RingBuilder` and drives them
with real kick and call eventfds: everything QEMU and a guest driver do, scripted, plus
the hostile things they never do.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass

from ringbuilder import Layout, RingBuilder, layout

from vhostpy import protocol as p
from vhostpy.frontend import Frontend
from vhostpy.memory import GuestMemory

UVA_BASE = 0x7F00_0000_0000   # where the "front-end process" pretends guest RAM is mapped
RAM_SIZE = 8 << 20
RING_STRIDE = 1 << 20          # each ring and its buffers get 1 MiB of guest RAM


@dataclass
class Ring:
    index: int
    builder: RingBuilder
    kick_fd: int
    call_fd: int


class ScriptedGuest:
    """Guest RAM + a connected front-end; rings set up on request."""

    def __init__(self, socket_path: str, *, ram_size: int = RAM_SIZE, timeout: float = 5.0):
        self.ram_fd = os.memfd_create("scripted-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, ram_size)
        self.ram_size = ram_size
        self.memory = GuestMemory()
        self.memory.map_fd(self.ram_fd, 0, ram_size, UVA_BASE, 0)
        self.fe = Frontend.connect(socket_path, timeout=timeout)
        self.rings: dict[int, Ring] = {}

    def region(self) -> p.MemoryRegion:
        return p.MemoryRegion(0, self.ram_size, UVA_BASE, 0)

    def start(self, *, protocol: p.ProtocolFeature | int | None = None) -> None:
        """Negotiate everything offered and hand over guest memory."""
        self.fe.negotiate(protocol)
        self.fe.set_mem_table([self.region()], [self.ram_fd])

    def setup_ring(self, index: int, size: int = 64, *, enable: bool = True) -> Ring:
        lay: Layout = layout(size, base=(index + 1) * RING_STRIDE, data_size=RING_STRIDE // 2)
        builder = RingBuilder(self.memory, size, lay)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fe = self.fe
        fe.set_vring_num(index, size)
        fe.set_vring_base(index, 0)
        fe.set_vring_addr(index, UVA_BASE + lay.desc, UVA_BASE + lay.used, UVA_BASE + lay.avail)
        fe.set_vring_call(index, call)
        fe.set_vring_kick(index, kick)
        if enable and fe.features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            fe.set_vring_enable(index, True)
        ring = Ring(index, builder, kick, call)
        self.rings[index] = ring
        return ring

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait for `count` used entries on ring `index` (via the call eventfd)."""
        ring = self.rings[index]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += ring.builder.get_used()
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ring {index}: {len(got)} of {count} used entries")
            r, _, _ = select.select([ring.call_fd], [], [], min(left, 0.2))
            if r:
                try:
                    os.eventfd_read(ring.call_fd)
                except BlockingIOError:
                    pass
        return got

    def close(self) -> None:
        self.fe.close()
        for ring in self.rings.values():
            os.close(ring.kick_fd)
            os.close(ring.call_fd)
        self.memory.clear()
        os.close(self.ram_fd)


# -- virtio-blk requests over a scripted ring ---------------------------------------------
BLK_HDR = struct.Struct("<IIQ")


def blk_request(guest: ScriptedGuest, rtype: int, sector: int, *, data: bytes = b"",
                read_len: int = 0, index: int = 0) -> tuple[int, bytes]:
    """Submit one virtio-blk request; returns (status, bytes read)."""
    ring = guest.rings[index]
    head, addrs = ring.builder.add_chain([BLK_HDR.pack(rtype, 0, sector) + data],
                                         [read_len, 1] if read_len else [1])
    guest.kick(index)
    used = guest.wait_used(index)
    assert used[0][0] == head
    status = guest.memory.read(addrs[-1], 1)[0]
    payload = guest.memory.read(addrs[1], read_len) if read_len else b""
    return status, payload
