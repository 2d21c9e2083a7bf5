"""A guest-side model of Linux's lguest virtio driver, for tests and as a reference.

This module owns the guest's half of the lguest device page: scanning entries in either
layout, reading host features, writing accepted bits, finalising with a notify on the entry
(3.x; a 2.6.24 guest never notifies status), setting status bytes, finding vrings at
`pfn * 4096`, and driving them as Linux's virtio drivers do: blk requests with the legacy
16-byte header, net frames with the 10-byte virtio_net_hdr (12 with MRG_RXBUF), rng reads and
console writes. Buffers live in a heap inside guest RAM the caller sets aside.

The blk header is the 16-byte one of later kernels in both layouts: 2.6.24-era headers carry
a trailing u64 `id` (24 bytes), which BlockDevice would count as data; not modelled.

It re-derives every layout from the header definitions instead of importing the host side, so
it checks the bridge rather than agreeing with it. It must never import host code (bridge,
session, loop). It is a well-behaved guest: hostile pages and rings are built by tests
directly.
"""

from __future__ import annotations

import collections
import itertools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import GuestError
from .memory import GuestMemory
from .virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

__all__ = ["BlkDriver", "ConsoleDriver", "DriverDevice", "DriverRing", "GuestDeviceInfo",
           "GuestHeap", "LguestGuestDriver", "NetDriver", "RngDriver"]

PAGE_SIZE = 4096
VRING_ALIGN = 4096
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FAILED = 1, 2, 4, 0x80
F_VIRTQUEUE, F_USED = 2, 0x80                 # 2.6.24 field types
NET_F_BITMAP, NET_F_MAC = 0x40, 0x41          # 2.6.24 virtio_net.h
BLK_F_BITMAP, BLK_F_CAPACITY, BLK_F_SIZE_MAX, BLK_F_SEG_MAX = 0x40, 0x41, 0x42, 0x43
ID_NET, ID_BLOCK, ID_CONSOLE, ID_RNG = 1, 2, 3, 4

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")
_VQCONFIG = struct.Struct("<HHI")
_BLK_HDR = struct.Struct("<IIQ")              # type, ioprio, sector: the legacy 16 bytes
_NET_HDR = struct.Struct("<BBHHHH")           # 10 bytes; + u16 num_buffers with MRG_RXBUF

#: Feature bits (modern numbering) the model's drivers accept when offered.
_EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
DRIVER_FEATURES = {
    ID_NET: (1 << 5) | (1 << 16) | _EVENT_IDX,                         # MAC, STATUS
    ID_BLOCK: (1 << 1) | (1 << 2) | (1 << 5) | (1 << 6) | (1 << 9) | _EVENT_IDX,
    ID_CONSOLE: _EVENT_IDX,
    ID_RNG: _EVENT_IDX,
}


class GuestHeap:
    """First-fit allocator over [base, base+size) of guest RAM (16-byte aligned blocks)."""

    def __init__(self, base: int, size: int) -> None:
        self.free_list: list[tuple[int, int]] = [(base, size)]
        self.used: dict[int, int] = {}

    def alloc(self, n: int) -> int:
        n = max(16, (n + 15) & ~15)
        for i, (addr, size) in enumerate(self.free_list):
            if size >= n:
                self.free_list[i] = (addr + n, size - n)
                self.used[addr] = n
                return addr
        raise MemoryError(f"guest heap: no room for {n} bytes")

    def free(self, addr: int) -> None:
        n = self.used.pop(addr)
        blocks = sorted([*self.free_list, (addr, n)])
        merged: list[tuple[int, int]] = []
        for a, s in blocks:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            elif s:
                merged.append((a, s))
        self.free_list = merged


@dataclass
class Completion:
    """A chain the device returned: its token, used length and the device-written buffers."""

    token: int
    length: int
    data: list[bytes]


class DriverRing:
    """The driver side of one vring at `pfn * 4096`, laid out by vring_init(num, p, 4096)."""

    def __init__(self, memory: GuestMemory, heap: GuestHeap, num: int, pfn: int, irq: int,
                 notify: Callable[[int], None], *, event_idx: bool = False) -> None:
        self.memory, self.heap, self.num, self.irq = memory, heap, num, irq
        self.address = pfn * PAGE_SIZE
        self.notify = notify
        self.event_idx = event_idx
        self.desc = self.address
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 2 * (2 + num) + 2 + VRING_ALIGN - 1) & ~(VRING_ALIGN - 1)
        self.avail_idx = self._u16(self.avail + 2)
        self.last_used = self._u16(self.used + 2)
        self.kicked_idx = self.avail_idx
        self.free_desc = list(range(num))
        self.inflight: dict[int, tuple[int, list[int], list[tuple[int, int, bool]]]] = {}
        self.done: dict[int, Completion] = {}
        self.kicks = 0
        self._tokens = itertools.count(1)

    def _u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.memory.read(gpa, 2))[0]
        return value

    def add(self, out: Sequence[bytes], in_lens: Sequence[int] = ()) -> int:
        """Queue a chain of readable `out` buffers then writable ones; returns its token."""
        bufs = [(data, len(data), False) for data in out] + [(b"", n, True) for n in in_lens]
        if len(bufs) > len(self.free_desc):
            raise GuestError(f"ring at {self.address:#x}: {len(bufs)} descriptors needed, "
                             f"{len(self.free_desc)} free")
        ids = [self.free_desc.pop(0) for _ in bufs]
        placed = []
        for k, (data, n, writable) in enumerate(bufs):
            addr = self.heap.alloc(n)
            self.memory.write(addr, data if not writable else bytes(n))
            flags = (VIRTQ_DESC_F_WRITE if writable else 0)
            nxt = 0
            if k + 1 < len(bufs):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = ids[k + 1]
            self.memory.write(self.desc + 16 * ids[k], _DESC.pack(addr, n, flags, nxt))
            placed.append((addr, n, writable))
        token = next(self._tokens)
        self.inflight[ids[0]] = (token, ids, placed)
        slot = self.avail_idx % self.num
        self.memory.write(self.avail + 4 + 2 * slot, _U16.pack(ids[0]))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, _U16.pack(self.avail_idx))   # publish after the entry
        return token

    def kick(self) -> bool:
        """Notify the host if it wants it (VRING_USED_F_NO_NOTIFY, or avail_event)."""
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        if old == new:
            return False
        if self.event_idx:
            wanted = vring_need_event(self._u16(self.used + 4 + 8 * self.num), new, old)
        else:
            wanted = not self._u16(self.used) & VIRTQ_USED_F_NO_NOTIFY
        if wanted:
            self.kicks += 1
            self.notify(self.address)
        return wanted

    def collect(self) -> list[Completion]:
        """Take every newly used chain: read back its writable buffers, free everything."""
        out = []
        idx = self._u16(self.used + 2)
        while self.last_used != idx:
            slot = self.last_used % self.num
            head, length = _ELEM.unpack(self.memory.read(self.used + 4 + 8 * slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            if head not in self.inflight:
                raise GuestError(f"ring at {self.address:#x}: host used unknown head {head}")
            token, ids, placed = self.inflight.pop(head)
            data = [self.memory.read(a, n) for a, n, w in placed if w]
            for a, _, _ in placed:
                self.heap.free(a)
            self.free_desc.extend(ids)
            done = Completion(token, length, data)
            self.done[token] = done
            out.append(done)
        if self.event_idx:
            self.memory.write(self.avail + 4 + 2 * self.num, _U16.pack(self.last_used))
        return out

    def set_no_interrupt(self, on: bool = True) -> None:
        self.memory.write(self.avail, _U16.pack(VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0))


@dataclass
class GuestDeviceInfo:
    """One device entry as the guest reads it."""

    type: int
    address: int
    layout: str
    size: int                                 # bytes of the entry
    status_offset: int
    vqconfigs: list[tuple[int, int, int]]     # (num, irq, pfn) per queue
    host_features: int = 0                    # 3.x: offered bits
    feature_len: int = 0
    config: bytes = b""                       # 3.x: config bytes
    fields: list[tuple[int, int, bytes]] = field(default_factory=list)  # 2.6.24 (off, type, data)


class LguestGuestDriver:
    """Linux's lguest bus driver in Python: scan the device page, probe devices.

    `notify(address)` is LHCALL_NOTIFY. Buffers come from `heap` = (base, size) in RAM
    (default: the top half of RAM). `pump()` is called while waiting for a completion (run
    the host's event loop); without it the model sleeps briefly, for threaded hosts.
    Interrupts arrive through `interrupt(irq)`, counted in `irqs`; completions are found by
    polling used rings, so a missed interrupt never hangs the model.
    """

    def __init__(self, memory: GuestMemory, ram_size: int, notify: Callable[[int], None], *,
                 layout: Literal["3.x", "2.6.24"] = "3.x", heap: tuple[int, int] | None = None,
                 pump: Callable[[], None] | None = None, timeout: float = 5.0) -> None:
        self.memory, self.ram_size, self.notify, self.layout = memory, ram_size, notify, layout
        base, size = heap if heap is not None else (ram_size // 2, ram_size // 2)
        self.heap = GuestHeap(base, size)
        self.pump = pump
        self.timeout = timeout
        self.irqs: collections.Counter[int] = collections.Counter()

    def interrupt(self, irq: int) -> None:
        self.irqs[irq] += 1

    # ---------------------------------------------------------------- scanning

    def scan(self) -> list[GuestDeviceInfo]:
        """Every entry of the device page, as scan_devices() walks it (type 0 ends)."""
        page = self.memory.read(self.ram_size, PAGE_SIZE)
        found = []
        i = 0
        while i < PAGE_SIZE and page[i] != 0:
            info = (self._parse_3x if self.layout == "3.x" else self._parse_2624)(page, i)
            found.append(info)
            i += info.size
        return found

    def _parse_3x(self, page: bytes, i: int) -> GuestDeviceInfo:
        dtype, num_vq, flen, clen = page[i:i + 4]
        pos = i + 5
        vqs = [_VQCONFIG.unpack_from(page, pos + 8 * k) for k in range(num_vq)]
        pos += 8 * num_vq
        # lg_get_features: at most 32 bits.
        host = int.from_bytes(page[pos:pos + flen], "little") & 0xFFFFFFFF
        config = page[pos + 2 * flen:pos + 2 * flen + clen]
        size = 5 + 8 * num_vq + 2 * flen + clen
        return GuestDeviceInfo(dtype, self.ram_size + i, "3.x", size, 4, vqs, host, flen,
                               config)

    def _parse_2624(self, page: bytes, i: int) -> GuestDeviceInfo:
        dtype, clen = page[i], page[i + 1]
        fields, pos = [], 3
        while pos < 3 + clen:
            ftype, flen = page[i + pos], page[i + pos + 1]
            fields.append((pos, ftype, page[i + pos + 2:i + pos + 2 + flen]))
            pos += 2 + flen
        vqs = [_VQCONFIG.unpack(d) for _, t, d in fields if t & ~F_USED == F_VIRTQUEUE]
        return GuestDeviceInfo(dtype, self.ram_size + i, "2.6.24", 3 + clen, 2, vqs,
                               fields=fields)

    # ---------------------------------------------------------------- probing

    def probe(self, info: GuestDeviceInfo, *, accept: int | None = None,
              want: int | None = None) -> DriverDevice:
        """Bring a device up the way virtio_dev_probe() + lguest_device.c do.

        3.x: ACKNOWLEDGE, DRIVER, accepted bits (`accept` verbatim, else host & `want`),
        the finalising notify on the entry, rings, DRIVER_OK (no notify). 2.6.24: the same
        statuses, fields consumed with lg_find()/virtio_use_bit(), and no notify at all.
        """
        cls = {ID_BLOCK: BlkDriver, ID_NET: NetDriver, ID_RNG: RngDriver,
               ID_CONSOLE: ConsoleDriver}.get(info.type, DriverDevice)
        dev = cls(self, info)
        dev.set_status(S_ACKNOWLEDGE)
        dev.set_status(S_ACKNOWLEDGE | S_DRIVER)
        wanted = DRIVER_FEATURES.get(info.type, 0) if want is None else want
        if info.layout == "3.x":
            features = info.host_features & wanted if accept is None else accept
            self.memory.write(info.address + 5 + 8 * len(info.vqconfigs) + info.feature_len,
                              features.to_bytes(info.feature_len, "little"))
            dev.features = features
            self.notify(info.address)               # lg_finalize_features -> status_notify
        else:
            dev.features = dev.consume_2624(wanted)
        dev.setup_rings()
        dev.setup()
        dev.set_status(S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK)
        return dev

    def find(self, dtype: int, nth: int = 0) -> GuestDeviceInfo:
        matches = [d for d in self.scan() if d.type == dtype]
        if len(matches) <= nth:
            raise LookupError(f"no device of type {dtype} (#{nth}) in the device page")
        return matches[nth]

    def blk(self, **kw: int) -> BlkDriver:
        dev = self.probe(self.find(ID_BLOCK), **kw)
        assert isinstance(dev, BlkDriver)
        return dev

    def net(self, **kw: int) -> NetDriver:
        dev = self.probe(self.find(ID_NET), **kw)
        assert isinstance(dev, NetDriver)
        return dev

    def rng(self, **kw: int) -> RngDriver:
        dev = self.probe(self.find(ID_RNG), **kw)
        assert isinstance(dev, RngDriver)
        return dev

    def console(self, **kw: int) -> ConsoleDriver:
        dev = self.probe(self.find(ID_CONSOLE), **kw)
        assert isinstance(dev, ConsoleDriver)
        return dev

    def early_console(self, text: bytes, scratch: int) -> None:
        """early_put_chars(): NUL-terminated chunks of at most 16 bytes, notified from RAM."""
        for k in range(0, len(text), 16):
            self.memory.write(scratch, text[k:k + 16] + b"\0")
            self.notify(scratch)


class DriverDevice:
    """A probed device: status, accepted features, rings; subclasses add the device's I/O."""

    def __init__(self, driver: LguestGuestDriver, info: GuestDeviceInfo) -> None:
        self.driver, self.info = driver, info
        self.memory = driver.memory
        self.features = 0
        self.rings: list[DriverRing] = []
        self.field_data: dict[int, bytes] = {}     # 2.6.24 consumed fields by type

    @property
    def status(self) -> int:
        return self.memory.read(self.info.address + self.info.status_offset, 1)[0]

    def set_status(self, status: int, *, notify: bool = False) -> None:
        """lg_set_status: write the byte; 3.x notifies only FAILED (and `notify=True`)."""
        self.memory.write(self.info.address + self.info.status_offset, bytes([status]))
        if notify or (self.info.layout == "3.x" and status & S_FAILED):
            self.driver.notify(self.info.address)

    def reset(self) -> None:
        """lg_reset: status 0, then the notify."""
        self.set_status(0, notify=True)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def lg_find(self, ftype: int) -> bytes | None:
        """2.6.24 lg_find(): the first unconsumed field of `ftype`, marked consumed."""
        page = self.memory.read(self.info.address, self.info.size)
        pos = 3
        while pos < self.info.size:
            t, n = page[pos], page[pos + 1]
            if t == ftype:
                self.memory.write(self.info.address + pos, bytes([t | F_USED]))
                return page[pos + 2:pos + 2 + n]
            pos += 2 + n
        return None

    def use_bit(self, ftype: int, bitnum: int) -> bool:
        """2.6.24 virtio_use_bit() on the bitmap field `ftype` (found anew, like the driver)."""
        page = self.memory.read(self.info.address, self.info.size)
        pos = 3
        while pos < self.info.size:
            t, n = page[pos], page[pos + 1]
            if t & ~F_USED == ftype:
                self.memory.write(self.info.address + pos, bytes([t | F_USED]))
                if bitnum * 8 >= n // 2:                # the 2.6.24 test, kept as it was
                    return False
                bits = int.from_bytes(page[pos + 2:pos + 2 + n], "little")
                if not bits >> bitnum & 1:
                    return False
                bits |= 1 << (bitnum + n * 8 // 2)
                self.memory.write(self.info.address + pos + 2, bits.to_bytes(n, "little"))
                return True
            pos += 2 + n
        return False

    def consume_2624(self, wanted: int) -> int:
        """Find the device fields a 2.6.24 driver reads; returns what that means in features."""
        return 0

    def setup_rings(self) -> None:
        event_idx = self.has(VIRTIO_RING_F_EVENT_IDX)
        configs = self.info.vqconfigs
        if self.info.layout == "2.6.24":     # find_vq: consume each VIRTQUEUE field in order
            configs = []
            while (data := self.lg_find(F_VIRTQUEUE)) is not None:
                configs.append(_VQCONFIG.unpack(data))
        for num, irq, pfn in configs:
            self.rings.append(DriverRing(self.memory, self.driver.heap, num, pfn, irq,
                                         self.driver.notify, event_idx=event_idx))

    def setup(self) -> None:
        """Device-specific set-up after the rings exist (post receive buffers...)."""

    def wait(self, ring: DriverRing, token: int) -> Completion:
        """Poll `ring` until chain `token` completes (pumping the host meanwhile)."""
        deadline = time.monotonic() + self.driver.timeout
        while True:
            ring.collect()
            done = ring.done.pop(token, None)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring at {ring.address:#x}: chain {token} never completed")
            if self.driver.pump is not None:
                self.driver.pump()
            else:
                time.sleep(0.001)

    def call(self, ring: DriverRing, out: Sequence[bytes], in_lens: Sequence[int]) -> Completion:
        token = ring.add(out, in_lens)
        ring.kick()
        return self.wait(ring, token)


class BlkDriver(DriverDevice):
    """virtio_blk: one request queue; 16-byte header, data, one status byte."""

    T_IN, T_OUT, T_FLUSH = 0, 1, 4
    capacity = 0

    def consume_2624(self, wanted: int) -> int:
        features = 0
        cap = self.lg_find(BLK_F_CAPACITY)
        if cap is None:
            raise GuestError("virtio-blk: no capacity field")
        self.capacity = struct.unpack("<Q", cap)[0]
        for ftype, bit in ((BLK_F_SIZE_MAX, 1), (BLK_F_SEG_MAX, 2)):
            if wanted >> bit & 1 and self.lg_find(ftype) is not None:
                features |= 1 << bit
        return features

    def setup(self) -> None:
        if self.info.layout == "3.x":
            self.capacity = struct.unpack_from("<Q", self.info.config)[0]

    def request(self, rtype: int, sector: int, data: bytes = b"",
                in_len: int = 0) -> tuple[int, bytes]:
        """(status, data read) of one request."""
        out = [_BLK_HDR.pack(rtype, 0, sector)] + ([data] if data else [])
        done = self.call(self.rings[0], out, ([in_len] if in_len else []) + [1])
        return done.data[-1][0], (done.data[0] if in_len else b"")

    def read(self, sector: int, count: int) -> bytes:
        status, data = self.request(self.T_IN, sector, in_len=512 * count)
        if status:
            raise OSError(f"virtio-blk read of {count} sectors at {sector}: status {status}")
        return data

    def write(self, sector: int, data: bytes) -> None:
        status, _ = self.request(self.T_OUT, sector, data)
        if status:
            raise OSError(f"virtio-blk write of {len(data)} bytes at {sector}: status {status}")

    def flush(self) -> int:
        return self.request(self.T_FLUSH, 0)[0]


class NetDriver(DriverDevice):
    """virtio_net: receiveq 0, transmitq 1; 10-byte header unless MRG_RXBUF (12)."""

    mac = b""
    RX_BUFFER = 1526

    @property
    def hdr_len(self) -> int:
        return 12 if self.has(15) else _NET_HDR.size

    def consume_2624(self, wanted: int) -> int:
        features = 0
        if wanted & 1 and self.use_bit(NET_F_BITMAP, 0):     # NO_CSUM = modern CSUM
            features |= 1
        if wanted >> 5 & 1:
            mac = self.lg_find(NET_F_MAC)
            if mac is not None:
                self.mac, features = mac, features | 1 << 5
        return features

    def setup(self) -> None:
        if self.info.layout == "3.x" and self.has(5):
            self.mac = self.info.config[:6]
        self.rx_tokens: set[int] = set()
        self.post_rx(16)

    def post_rx(self, count: int) -> None:
        ring = self.rings[0]
        for _ in range(count):
            self.rx_tokens.add(ring.add([], [self.hdr_len + self.RX_BUFFER]))
        ring.kick()

    def send(self, frame: bytes) -> None:
        hdr = bytes(self.hdr_len)
        self.call(self.rings[1], [hdr + frame], [])

    def receive(self) -> list[bytes]:
        """Frames delivered since the last call (buffers are reposted)."""
        frames = []
        for done in self.rings[0].collect():
            self.rings[0].done.pop(done.token, None)
            self.rx_tokens.discard(done.token)
            frames.append(done.data[0][self.hdr_len:done.length])
        if frames:
            self.post_rx(len(frames))
        return frames


class RngDriver(DriverDevice):
    """virtio_rng: one request queue of device-writable buffers."""

    def read(self, n: int) -> bytes:
        done = self.call(self.rings[0], [], [n])
        return done.data[0][:done.length]


class ConsoleDriver(DriverDevice):
    """virtio_console (one port): receiveq 0, transmitq 1."""

    def setup(self) -> None:
        ring = self.rings[0]
        for _ in range(4):
            ring.add([], [256])
        ring.kick()

    def write(self, data: bytes) -> None:
        self.call(self.rings[1], [data], [])

    def receive(self) -> bytes:
        ring = self.rings[0]
        got = ring.collect()
        for done in got:
            ring.done.pop(done.token, None)
            ring.add([], [256])
        if got:
            ring.kick()
        return b"".join(d.data[0][:d.length] for d in got)
