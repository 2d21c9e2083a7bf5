"""The lguest edge: an lguest device page and its vrings served by vhostpy `Device` objects.

This module owns what the lguest Launcher did for its devices, over any `GuestMemory`: laying
out device entries in the one-page device table at guest-physical `ram_size` (the 3.x layout
with `num_vq`/`feature_len`/`config_len`, or the 2.6.24 layout of typed config fields),
allocating vring pages above that page, numbering irqs, negotiating features, starting,
resetting and kicking queues, early console output, and raising irqs through a pluggable sink.

It must never import the vhost-user session, and never raise for anything the guest wrote:
every guest mistake (a bad notify address, accepted bits never offered, a status the device
cannot take, an edited page, a hostile ring) is logged once with the offending values and
survived. Host mistakes (a device that does not fit in the page, rings past the memory
given) raise `ConfigurationError` and leave the page unchanged.

Facts taken from the Linux sources (include/linux/lguest_launcher.h, drivers/lguest/
lguest_device.c, Documentation/lguest/lguest.c and tools/lguest/lguest.c):

* 3.x entry: u8 type, num_vq, feature_len, config_len, status; num_vq x lguest_vqconfig
  {u16 num; u16 irq; u32 pfn}; feature_len bytes offered; feature_len bytes accepted (bit b in
  byte b/8, mask 1 << b%8); config_len config bytes. The guest writes the accepted bits and
  then notifies the entry's address (status ACKNOWLEDGE|DRIVER): the Launcher starts the device
  there. A status of 0 notified means reset; FAILED resets with a warning. DRIVER_OK is written
  later without a notify. The guest reads at most 32 feature bits.
* 2.6.24 entry: u8 type, config_len, status, then fields {u8 type; u8 len; data}. One
  VIRTIO_CONFIG_F_VIRTQUEUE (2) field per queue, holding an lguest_vqconfig; the guest ORs 0x80
  into a field's type when it consumes it (lg_find). Feature bitmaps are fields whose first half
  holds offered bits and second half the guest's acknowledgements (virtio_use_bit). A 2.6.24
  guest never notifies status changes, so the bridge starts such a device at the first kick of
  any of its queues (its Launcher served queues from creation). Which device fields exist
  (net: 0x40 bitmap, 0x41 MAC; blk: 0x40 bitmap, 0x41 capacity, 0x42 size_max, 0x43 seg_max)
  comes from the 2.6.24 virtio_net.h / virtio_blk.h; console and rng get only their queues
  (rng did not exist in 2.6.24: extrapolated). We read a consumed (0x80) device field as the
  guest accepting the matching modern feature bit: our interpretation, not the Launcher's.
* Early console: a notify on any other address below RAM is a NUL-terminated string there
  (the 3.x guest sends at most 16 characters per notify; we read up to EARLY_CONSOLE_MAX).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .device import Device
from .errors import ConfigurationError, MemoryAccessError, VhostError
from .loop import EventLoop
from .memory import GuestMemory
from .notifier import CallbackNotifier
from .virtqueue import Virtqueue
from .vring import DefaultVirtqueue, RingHost, Vring, call_hook

__all__ = [
    "LGUEST_VRING_ALIGN", "LHCALL_NOTIFY", "LHREQ_BREAK", "LHREQ_EVENTFD", "LHREQ_GETDMA",
    "LHREQ_INITIALIZE", "LHREQ_IRQ", "PAGE_SIZE", "VIRTIO_CONFIG_F_VIRTQUEUE",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER", "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FAILED", "Layout", "LguestBridge", "LguestDevice", "LguestQueue",
    "vring_layout", "vring_size",
]

log = logging.getLogger(__name__)

Layout = Literal["3.x", "2.6.24"]
LAYOUTS: tuple[Layout, ...] = ("3.x", "2.6.24")

# include/linux/lguest_launcher.h and arch/x86/include/asm/lguest_hcall.h (i386).
PAGE_SIZE = 4096
LGUEST_VRING_ALIGN = 4096
LHCALL_NOTIFY = 17
LHREQ_INITIALIZE, LHREQ_GETDMA, LHREQ_IRQ, LHREQ_BREAK, LHREQ_EVENTFD = range(5)

# include/linux/virtio_config.h.
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8     # virtio 1.0 only: no lguest guest ever sets it
VIRTIO_CONFIG_S_FAILED = 0x80
# 2.6.24 field types (virtio_config.h, virtio_net.h, virtio_blk.h of 2.6.24).
VIRTIO_CONFIG_F_VIRTIO = 1
VIRTIO_CONFIG_F_VIRTQUEUE = 2
VIRTIO_CONFIG_F_USED = 0x80         # ORed into a field's type by the guest's lg_find()
VIRTIO_CONFIG_NET_F = 0x40          # feature bitmap
VIRTIO_CONFIG_NET_MAC_F = 0x41
VIRTIO_CONFIG_BLK_F = 0x40          # feature bitmap
VIRTIO_CONFIG_BLK_F_CAPACITY = 0x41
VIRTIO_CONFIG_BLK_F_SIZE_MAX = 0x42
VIRTIO_CONFIG_BLK_F_SEG_MAX = 0x43
# 2.6.24 bit numbers inside those bitmaps (they differ from later kernels).
V2624_NET_F_NO_CSUM = 0             # = modern VIRTIO_NET_F_CSUM (0)
V2624_BLK_F_BARRIER = 1             # = legacy VIRTIO_BLK_F_BARRIER (0)

DEVICE_DESC = struct.Struct("<BBBBB")       # 3.x: type, num_vq, feature_len, config_len, status
DEVICE_DESC_2624 = struct.Struct("<BBB")    # 2.6.24: type, config_len, status
VQCONFIG = struct.Struct("<HHI")            # num, irq, pfn

#: Ring size the Launcher used (tools/lguest VIRTQUEUE_NUM); devices asking less get less.
LGUEST_QUEUE_SIZE = 256
#: Feature bits a legacy lguest guest can see (lg_get_features reads at most 32).
LEGACY_FEATURE_MASK = 0xFFFFFFFF
#: Longest early-console string read per notify (the Launcher's limit was the end of RAM).
EARLY_CONSOLE_MAX = 256

# Modern bit numbers used for the 2.6.24 translation (virtio 1.2 / legacy).
_NET_F_CSUM, _NET_F_MAC = 0, 5
_BLK_F_BARRIER, _BLK_F_SIZE_MAX, _BLK_F_SEG_MAX = 0, 1, 2


def vring_size(num: int, align: int = LGUEST_VRING_ALIGN) -> int:
    """Bytes of a vring of `num` entries as Linux's vring_size() computes them."""
    return ((16 * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + 8 * num


def vring_layout(num: int, base: int, align: int = LGUEST_VRING_ALIGN) -> tuple[int, int, int]:
    """(desc, avail, used) guest-physical addresses per vring_init(num, base, align)."""
    avail = base + 16 * num
    used = (avail + 2 * (2 + num) + 2 + align - 1) & ~(align - 1)  # +2: used_event
    return base, avail, used


def _bits(value: int) -> list[int]:
    return [b for b in range(value.bit_length()) if value >> b & 1]


@dataclass
class LguestQueue:
    """One vring of an lguest device: its lguest_vqconfig and, while running, its runner."""

    index: int
    num: int
    irq: int
    pfn: int
    ring: Vring | None = None
    refused: bool = False        # a kick of a queue that could not start was reported

    @property
    def vq(self) -> Virtqueue | None:
        """The running ring's `Virtqueue` (None while the device is not started)."""
        return None if self.ring is None else self.ring.vq

    @property
    def address(self) -> int:
        """The ring's guest-physical address (pfn * PAGE_SIZE): the guest's kick address."""
        return self.pfn * PAGE_SIZE

    @property
    def pages(self) -> int:
        return -(-vring_size(self.num) // PAGE_SIZE)

    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail, used) of this ring."""
        return vring_layout(self.num, self.address)


@dataclass
class _Field:
    """A 2.6.24 config field as the host wrote it: where, what, and what it negotiates."""

    offset: int                  # of the type byte, from the entry's start
    type: int
    data: bytes
    feature: int | None = None   # modern bit a consumed field stands for
    bitmap: dict[int, int] = field(default_factory=dict)  # 2.6.24 bit -> modern bit


@dataclass
class LguestDevice:
    """A device's entry in the device page, its queues and its negotiation state."""

    device: Device
    address: int                 # guest-physical address of the entry (the status notify)
    layout: Layout
    entry: bytes                 # the entry as the host wrote it
    queues: list[LguestQueue]
    offered: int                 # feature bits offered (modern numbering, 32 bits)
    feature_len: int = 0         # 3.x only
    fields: list[_Field] = field(default_factory=list)  # 2.6.24 only
    running: bool = False
    acked: int = 0               # what the device was given by set_features

    @property
    def status_address(self) -> int:
        return self.address + (4 if self.layout == "3.x" else 2)

    @property
    def features_address(self) -> int:
        """3.x: guest-physical address of the offered bits (accepted ones follow)."""
        return self.address + DEVICE_DESC.size + VQCONFIG.size * len(self.queues)

    @property
    def config_address(self) -> int:
        """3.x: guest-physical address of the config bytes."""
        return self.features_address + 2 * self.feature_len


class LguestBridge:
    """The Launcher's device side: an lguest device page in `memory`, devices behind it.

    `memory` must map the device page at `ram_size` and, contiguously above it, the pages
    vrings are allocated from (`device_area` bytes from `ram_size`, default: all that is
    mapped there). `irq_sink(irq)` raises a guest interrupt; `console_sink(text)` receives
    early console output (logged at INFO without one). `notify()` and `kick()` take `lock`;
    code that feeds devices from another thread (a NetPort send) should hold it too.

    Each running queue is a `vring.Vring` runner, as on vhost-user: the same device hook
    containment, and, once a loop is attached (`attach(loop)`; its timers run under `lock`),
    the same polling and interrupt coalescing. Without a loop every batch is interrupted at
    once.
    """

    def __init__(self, memory: GuestMemory, ram_size: int, *, layout: Layout = "3.x",
                 irq_sink: Callable[[int], None],
                 console_sink: Callable[[bytes], None] | None = None,
                 device_area: int | None = None) -> None:
        if layout not in LAYOUTS:
            raise ConfigurationError(f"lguest layout must be one of {LAYOUTS}, not {layout!r}")
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise ConfigurationError(f"guest RAM size {ram_size:#x} is not a positive multiple "
                                     f"of the {PAGE_SIZE}-byte page")
        if not memory.is_mapped(ram_size, PAGE_SIZE):
            raise ConfigurationError(f"no guest memory at {ram_size:#x} for the lguest "
                                     "device page (map RAM plus the device area)")
        mapped = _contiguous_end(memory, ram_size) - ram_size
        if device_area is None:
            device_area = mapped
        elif device_area < PAGE_SIZE or device_area > mapped:
            raise ConfigurationError(f"device area of {device_area:#x} bytes must hold the "
                                     f"device page and be mapped ({mapped:#x} bytes are)")
        self.memory = memory
        self.ram_size = ram_size
        self.layout: Layout = layout
        self.irq_sink = irq_sink
        self.console_sink = console_sink
        self.limit = ram_size + device_area   # one past the last byte vrings may use
        self.lock = threading.RLock()
        self.devices: list[LguestDevice] = []
        #: Called after a device starts / resets (host adapters attach eventfds here).
        self.on_device_started: Callable[[LguestDevice], None] | None = None
        self.on_device_reset: Callable[[LguestDevice], None] | None = None
        self._page_used = 0
        self._next_pfn = ram_size // PAGE_SIZE + 1
        self._next_irq = 1
        self._by_entry: dict[int, LguestDevice] = {}
        self._by_pfn: dict[int, tuple[LguestDevice, LguestQueue]] = {}
        self._host: RingHost | None = None
        memory.write(ram_size, bytes(PAGE_SIZE))

    def attach(self, loop: EventLoop) -> None:
        """Run the rings' timers (polling, coalescing) on `loop`, under `lock` (notifies may
        come on any thread: timers are handed to the loop's thread); call before the guest
        starts devices (rings started earlier keep serving without polling)."""
        self._host = _LockedHost(loop, self.lock)

    # ---------------------------------------------------------------- layout

    @property
    def device_page(self) -> int:
        """Guest-physical address of the device page."""
        return self.ram_size

    @property
    def guest_limit(self) -> int:
        """One past the last page in use (RAM, device page, vrings): the Launcher's limit."""
        return self._next_pfn * PAGE_SIZE

    @property
    def page_free(self) -> int:
        """Bytes of the device page not yet used by entries."""
        return PAGE_SIZE - self._page_used

    def add_device(self, device: Device, *, queue_size: int | None = None) -> LguestDevice:
        """Lay out `device`'s entry and vrings; ConfigurationError (page unchanged) if no room."""
        with self.lock:
            return self._add_device(device, queue_size)

    def _add_device(self, device: Device, queue_size: int | None) -> LguestDevice:
        name = device.name
        if not 1 <= device.device_id <= 255:
            raise ConfigurationError(f"{name}: device id {device.device_id} cannot be an "
                                     "lguest type (1..255; 0 ends the table)")
        num = queue_size if queue_size is not None else min(device.max_queue_size,
                                                            LGUEST_QUEUE_SIZE)
        if not 1 <= num <= 32768 or num & (num - 1):
            raise ConfigurationError(f"{name}: queue size {num} is not a power of two "
                                     "in 1..32768")
        if not 1 <= device.num_queues <= 255:
            raise ConfigurationError(f"{name}: {device.num_queues} queues do not fit "
                                     "lguest's u8 num_vq")
        pfn = self._next_pfn
        queues = []
        for i in range(device.num_queues):
            q = LguestQueue(i, num, self._next_irq + i, pfn)
            pfn += q.pages
            queues.append(q)
        if pfn * PAGE_SIZE > self.limit:
            raise ConfigurationError(
                f"{name}: {device.num_queues} vrings of {num} entries need memory up to "
                f"{pfn * PAGE_SIZE:#x}, beyond the device area ending at {self.limit:#x}")
        offered = device.features() & LEGACY_FEATURE_MASK
        address = self.ram_size + self._page_used
        if self.layout == "3.x":
            lg = self._entry_3x(device, address, queues, offered)
        else:
            lg = self._entry_2624(device, address, queues, offered)
        if len(lg.entry) > self.page_free:
            raise ConfigurationError(
                f"{name}: device page full: the entry needs {len(lg.entry)} bytes, "
                f"{self.page_free} of {PAGE_SIZE} are left")
        # Commit: nothing above can have touched guest memory.
        self.memory.write(address, lg.entry)
        for q in queues:
            self.memory.write(q.address, bytes(q.pages * PAGE_SIZE))
            self._by_pfn[q.pfn] = (lg, q)
        self._page_used += len(lg.entry)
        self._next_pfn = pfn
        self._next_irq += len(queues)
        self._by_entry[address] = lg
        self.devices.append(lg)
        log.debug("lguest: %s at %#x: %d queue(s) of %d, irqs %s, pfns %s, features %#x",
                  name, address, len(queues), num, [q.irq for q in queues],
                  [q.pfn for q in queues], offered)
        return lg

    def _entry_3x(self, device: Device, address: int, queues: list[LguestQueue],
                  offered: int) -> LguestDevice:
        feature_len = (offered.bit_length() + 7) // 8
        config = device.config()
        if len(config) > 255:
            raise ConfigurationError(f"{device.name}: {len(config)} config bytes do not fit "
                                     "lguest's u8 config_len")
        entry = b"".join([
            DEVICE_DESC.pack(device.device_id, len(queues), feature_len, len(config), 0),
            *(VQCONFIG.pack(q.num, q.irq, q.pfn) for q in queues),
            offered.to_bytes(feature_len, "little"), bytes(feature_len), config,
        ])
        return LguestDevice(device, address, "3.x", entry, queues, offered, feature_len)

    def _entry_2624(self, device: Device, address: int, queues: list[LguestQueue],
                    offered: int) -> LguestDevice:
        fields = [_Field(0, VIRTIO_CONFIG_F_VIRTQUEUE, VQCONFIG.pack(q.num, q.irq, q.pfn))
                  for q in queues]
        fields += _device_fields_2624(device, offered)
        pos = DEVICE_DESC_2624.size
        parts = []
        for f in fields:
            if len(f.data) > 255:
                raise ConfigurationError(f"{device.name}: a {len(f.data)}-byte field does "
                                         "not fit a u8 length")
            f.offset = pos
            parts.append(bytes([f.type, len(f.data)]) + f.data)
            pos += 2 + len(f.data)
        body = b"".join(parts)
        if len(body) > 255:
            raise ConfigurationError(f"{device.name}: {len(body)} bytes of config fields do "
                                     "not fit lguest's u8 config_len")
        entry = DEVICE_DESC_2624.pack(device.device_id, len(body), 0) + body
        offered_2624 = 0
        for f in fields:
            if f.feature is not None:
                offered_2624 |= 1 << f.feature
            offered_2624 |= sum(1 << m for m in f.bitmap.values())
        return LguestDevice(device, address, "2.6.24", entry, queues, offered_2624,
                            fields=fields)

    # ---------------------------------------------------------------- the guest's side

    def notify(self, address: int) -> None:
        """LHCALL_NOTIFY(address): kick, status change, early console or an invalid address."""
        with self.lock:
            try:
                self._notify(address)
            except Exception:   # a device or sink bug must not take the host down
                log.exception("lguest: notify %#x failed", address)

    def _notify(self, address: int) -> None:
        if not isinstance(address, int) or not 0 <= address < 1 << 64:
            log.warning("lguest: notify with invalid address %r ignored", address)
            return
        hit = self._by_pfn.get(address // PAGE_SIZE)
        if hit is not None and (self.layout == "2.6.24" or address % PAGE_SIZE == 0):
            self.kick(*hit)
            return
        lg = self._by_entry.get(address)
        if lg is not None:
            self._status_changed(lg)
            return
        if address < self.ram_size:
            self._early_console(address)
            return
        log.warning("lguest: notify at %#x is at or above RAM (%#x) and is neither a device "
                    "entry nor a queue; ignored", address, self.ram_size)

    def kick(self, lg: LguestDevice, q: LguestQueue) -> None:
        """The guest kicked queue `q` of `lg` (a notify or its eventfd)."""
        with self.lock:
            if not lg.running:
                if lg.layout == "3.x":
                    log.warning("lguest: %s queue %d kicked before the device was started "
                                "(features not finalised); ignored", lg.device.name, q.index)
                    return
                self._start(lg)     # a 2.6.24 guest never announces it: first kick starts
            if q.ring is not None:
                q.ring.kick()
            elif not q.refused:
                q.refused = True
                log.warning("lguest: %s queue %d kicked but it could not start (see above); "
                            "its kicks are ignored", lg.device.name, q.index)

    def _status_changed(self, lg: LguestDevice) -> None:
        status = self.memory.read(lg.status_address, 1)[0]
        name = lg.device.name
        if status == 0:
            log.debug("lguest: %s reset by the guest", name)
            self.reset(lg)
        elif status & VIRTIO_CONFIG_S_FAILED:
            log.warning("lguest: %s: guest reports FAILED (status %#x); device reset",
                        name, status)
            self.reset(lg)
        elif lg.running:
            log.warning("lguest: %s: features finalised twice (status %#x); second start "
                        "refused, device keeps running", name, status)
        else:
            self._start(lg)

    def _early_console(self, address: int) -> None:
        length = min(EARLY_CONSOLE_MAX, self.ram_size - address)
        try:
            raw = self.memory.read(address, length)
        except MemoryAccessError as exc:
            log.warning("lguest: early console notify at %#x: %s", address, exc)
            return
        text = raw.split(b"\0", 1)[0]
        if self.console_sink is None:
            log.info("lguest early console: %r", text)
            return
        try:
            self.console_sink(text)
        except Exception:
            log.exception("lguest: console sink failed")

    # ---------------------------------------------------------------- negotiation and start

    def accepted_features(self, lg: LguestDevice) -> int:
        """The feature bits the guest accepted, as written in the page (modern numbering)."""
        if lg.layout == "3.x":
            raw = self.memory.read(lg.features_address + lg.feature_len, lg.feature_len)
            return int.from_bytes(raw, "little")
        entry = self.memory.read(lg.address, len(lg.entry))
        accepted = 0
        for f in lg.fields:
            seen = entry[f.offset]
            if seen & ~VIRTIO_CONFIG_F_USED != f.type:
                log.warning("lguest: %s: guest rewrote the type of the field at +%d "
                            "(%#x -> %#x); ignored", lg.device.name, f.offset, f.type, seen)
                continue
            if f.feature is not None and seen & VIRTIO_CONFIG_F_USED:
                accepted |= 1 << f.feature
            if f.bitmap:
                half = len(f.data) // 2
                acks = int.from_bytes(entry[f.offset + 2 + half:f.offset + 2 + 2 * half],
                                      "little")
                for old, modern in f.bitmap.items():
                    if acks >> old & 1:
                        accepted |= 1 << modern
                stray = acks & ~sum(1 << b for b in f.bitmap)
                if stray:
                    log.warning("lguest: %s: guest acknowledged bitmap bits %s of field "
                                "%#x that were never offered; refused", lg.device.name,
                                _bits(stray), f.type)
        return accepted

    def _check_entry(self, lg: LguestDevice) -> None:
        """Warn about guest edits of what only the host may write (we keep our own copy)."""
        if lg.layout == "3.x":
            n = DEVICE_DESC.size + VQCONFIG.size * len(lg.queues) + lg.feature_len
            page = self.memory.read(lg.address, n)
            seen, want = page[:4] + page[5:], lg.entry[:4] + lg.entry[5:n]
        else:
            page = self.memory.read(lg.address, len(lg.entry))
            seen, want = page[:2], lg.entry[:2]
            for f in lg.fields:
                if f.type == VIRTIO_CONFIG_F_VIRTQUEUE:
                    span = slice(f.offset + 1, f.offset + 2 + len(f.data))
                    seen, want = seen + page[span], want + lg.entry[span]
        if seen != want:
            log.warning("lguest: %s: the guest changed the host-written entry header or "
                        "vqconfig (%s, host wrote %s); the host's values stay in force",
                        lg.device.name, seen.hex(), want.hex())

    def _start(self, lg: LguestDevice) -> None:
        name = lg.device.name
        self._check_entry(lg)
        accepted = self.accepted_features(lg)
        refused = accepted & ~lg.offered
        if refused:
            log.warning("lguest: %s: guest accepted feature bits %s that were never offered; "
                        "refused (the device gets only the offered ones)", name, _bits(refused))
        acked = accepted & lg.offered
        try:
            call_hook(lg.device, "set_features", lg.device.set_features, acked)
        except VhostError:
            log.warning("lguest: %s refused features %#x; device not started", name, acked)
            return
        lg.acked = acked
        lg.running = True
        for q in lg.queues:
            try:
                ring = Vring(lg.device, DefaultVirtqueue(self.memory, q.index), self._host)
                ring.set_size(q.num)
                ring.set_addresses(*q.addresses())
                ring.set_base(0)
            except VhostError as exc:
                log.warning("lguest: %s queue %d cannot start: %s", name, q.index, exc)
                continue
            ring.set_features(acked)
            ring.set_call(CallbackNotifier(self._irq_raiser(q.irq)))
            q.ring = ring
        log.debug("lguest: %s started with features %#x", name, acked)
        for q in lg.queues:
            if q.ring is not None:
                q.ring.start()
                q.ring.enable(True)
                if q.ring.error is not None:
                    log.warning("lguest: %s queue %d stopped: %s", name, q.index,
                                q.ring.error)
        if self.on_device_started is not None:
            self.on_device_started(lg)

    def _irq_raiser(self, irq: int) -> Callable[[], None]:
        def call() -> None:
            try:
                self.irq_sink(irq)
            except Exception:
                log.exception("lguest: irq sink failed for irq %d", irq)
        return call

    # ---------------------------------------------------------------- reset

    def reset(self, lg: LguestDevice) -> None:
        """Reset a device: stop and zero its rings, clear accepted bits, reset the model."""
        with self.lock:
            for q in lg.queues:
                if q.ring is not None:
                    q.ring.reset()
                    q.ring = None
                q.refused = False
            try:
                call_hook(lg.device, "reset", lg.device.reset)
            except VhostError:
                pass    # logged by call_hook; the page is reset whatever the device did
            try:
                self._scrub(lg)
            except MemoryAccessError as exc:    # the memory went away before us
                log.debug("lguest: %s: page and rings not cleared: %s", lg.device.name, exc)
            was_running, lg.running, lg.acked = lg.running, False, 0
            if was_running and self.on_device_reset is not None:
                self.on_device_reset(lg)

    def _scrub(self, lg: LguestDevice) -> None:
        """Zero the rings and take back the guest's acceptance (the Launcher's reset)."""
        for q in lg.queues:
            self.memory.write(q.address, bytes(vring_size(q.num)))
        if lg.layout == "3.x":
            self.memory.write(lg.features_address + lg.feature_len, bytes(lg.feature_len))
        else:   # fields back as the host wrote them (types unconsumed, no acks)
            status = self.memory.read(lg.status_address, 1)
            self.memory.write(lg.address, lg.entry)
            self.memory.write(lg.status_address, status)

    def reset_all(self) -> None:
        """Reset every device (the guest went away)."""
        with self.lock:
            for lg in self.devices:
                self.reset(lg)

    # ---------------------------------------------------------------- lookups

    def device_at(self, address: int) -> LguestDevice | None:
        """The device whose entry is at `address`."""
        return self._by_entry.get(address)

    def queue_at(self, address: int) -> tuple[LguestDevice, LguestQueue] | None:
        """The device and queue whose vring starts at `address`."""
        if address % PAGE_SIZE:
            return None
        return self._by_pfn.get(address // PAGE_SIZE)

    def queue_by_irq(self, irq: int) -> tuple[LguestDevice, LguestQueue] | None:
        for lg in self.devices:
            for q in lg.queues:
                if q.irq == irq:
                    return lg, q
        return None


class _LockedHost:
    """A loop whose timers run on its own thread under the bridge's lock: notifies (and so
    the runners' `call_later`) may come on any thread."""

    def __init__(self, loop: EventLoop, lock: threading.RLock) -> None:
        self.loop = loop
        self.lock = lock

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, self._locked(callback))

    def remove_reader(self, fd: int) -> bool:
        return self.loop.remove_reader(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        locked = self._locked(callback)
        self.loop.call_soon_threadsafe(lambda: self.loop.call_later(delay, locked))

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(self._locked(callback))

    def run_coroutine(self, coro: Awaitable[Any],
                      done: Callable[[Any, BaseException | None], None]) -> Callable[[], bool]:
        def locked(result: Any, exc: BaseException | None) -> None:
            with self.lock:
                done(result, exc)
        return self.loop.run_coroutine(coro, locked)

    def _locked(self, callback: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                callback()
        return run


def _contiguous_end(memory: GuestMemory, start: int) -> int:
    """One past the last byte of the mapped run beginning at `start`."""
    end = start
    while True:
        region = memory.find(end)
        if region is None:
            return end
        end = region.gpa_end


def _bitmap_field(ftype: int, bitmap: dict[int, int]) -> _Field:
    """A 2.6.24 feature bitmap offering `bitmap`'s 2.6.24 bits, acknowledgements zero.

    2.6.24's virtio_use_bit() refuses bit b unless b*8 < half length in bytes (it compares a
    bit number times 8 with a byte count), so each half is made long enough for that test.
    """
    top = max(bitmap)
    half = max(top // 8 + 1, 8 * top + 1)
    offered = sum(1 << b for b in bitmap).to_bytes(half, "little")
    return _Field(0, ftype, offered + bytes(half), bitmap=dict(bitmap))


def _device_fields_2624(device: Device, offered: int) -> list[_Field]:
    """The 2.6.24 config fields after the queues, for the device types 2.6.24 knew."""
    cfg = device.config()
    fields: list[_Field] = []
    if device.device_id == 1:      # virtio-net
        if offered >> _NET_F_CSUM & 1:
            fields.append(_bitmap_field(VIRTIO_CONFIG_NET_F, {V2624_NET_F_NO_CSUM: _NET_F_CSUM}))
        if offered >> _NET_F_MAC & 1 and len(cfg) >= 6:
            fields.append(_Field(0, VIRTIO_CONFIG_NET_MAC_F, cfg[:6], feature=_NET_F_MAC))
    elif device.device_id == 2:    # virtio-blk
        if offered >> _BLK_F_BARRIER & 1:
            fields.append(_bitmap_field(VIRTIO_CONFIG_BLK_F,
                                        {V2624_BLK_F_BARRIER: _BLK_F_BARRIER}))
        if len(cfg) >= 8:
            fields.append(_Field(0, VIRTIO_CONFIG_BLK_F_CAPACITY, cfg[:8]))
        if offered >> _BLK_F_SIZE_MAX & 1 and len(cfg) >= 12:
            fields.append(_Field(0, VIRTIO_CONFIG_BLK_F_SIZE_MAX, cfg[8:12],
                                 feature=_BLK_F_SIZE_MAX))
        if offered >> _BLK_F_SEG_MAX & 1 and len(cfg) >= 16:
            fields.append(_Field(0, VIRTIO_CONFIG_BLK_F_SEG_MAX, cfg[12:16],
                                 feature=_BLK_F_SEG_MAX))
    return fields
