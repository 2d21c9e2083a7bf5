"""The compiled virtio-blk data path: whole bursts of requests in C, no bytecode per request.

`BlkFastPath` belongs to one `BlockDevice` (when `_accel.lib` is set) and serves a ring
whose `Virtqueue` is the compiled variant. One `drain` is the reference `device.drain`
loop in a single C call (`vp_blk_drain` in `_fastpath_blk.c`): kicks disabled, a burst of
`BURST` chains popped by the shared ring walker, IN / OUT / FLUSH / GET_ID served with
preadv / pwritev straight into guest memory, used entries published and the driver
notified once per burst, kicks re-enabled when the ring is empty (not while polled).

C returns to Python only for what the reference must do itself, in ring order:

* a request C does not serve (no status byte, DISCARD, WRITE_ZEROES, unknown types):
  `BlockDevice.handle_chain` serves it and C goes on with the rest of the burst;
* a request that failed in C: its WARNING line, worded as `BlockDevice` words it;
* an interrupt C decided on when the ring's `signal_target()` is not an eventfd C can
  write (`vq.interrupt()`);
* a chain with more descriptors than the segment array holds: a bigger array.

So used rings, status bytes, data and `BlkStats` are those of the pure-Python path (C's
counters are folded into `BlkStats` after each drain). This module never imports `blk`
(the device is passed in).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from . import _accel
from .virtqueue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue
from .virtqueue_cffi import CffiVirtqueue

__all__ = ["BURST", "BlkFastPath"]

ffi: Any = _accel.ffi
lib: Any = _accel.lib

#: Chains per burst: `device.BATCH`, so used->idx moves and interrupts come as in the reference.
BURST = 64
_SEGS = 4096
_ID_BYTES = 20
_NO_SIGNAL = -2   # call_fd for C: make no interrupt decision (`signal_target()` (0, -1))
_PY_CALL = -1     # call_fd for C: decide, but let Python interrupt (`vq.interrupt()`)


class BlkFastPath:
    """The compiled data path of one `BlockDevice` (see the module docstring)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        b = self.blk = ffi.new("struct vp_blk *")
        b.id = device.serial.ljust(_ID_BYTES, b"\0")[:_ID_BYTES]
        self._chains = ffi.new("struct vp_chain[]", BURST)
        self._items = ffi.new("uint32_t[]", 2 * BURST)
        self._segs = ffi.new("struct vp_seg[]", _SEGS)
        bu = self.burst = ffi.new("struct vp_blk_burst *")
        bu.chains, bu.items, bu.segs = self._chains, self._items, self._segs
        bu.max_chains, bu.max_segs = BURST, _SEGS

    @staticmethod
    def serves(vq: Virtqueue) -> TypeGuard[CffiVirtqueue]:
        """Whether `vq` is a ring this path can drive (the compiled `Virtqueue` variant)."""
        return isinstance(vq, CffiVirtqueue)

    def drain(self, index: int, vq: CffiVirtqueue) -> None:
        """Serve every available request of ring `index` (what `device.drain` does)."""
        if not vq.ready:
            return
        q = vq.native()
        if q is None:
            return
        self._sync_device()
        self.burst.count = self.burst.pos = 0
        self._run(index, vq, q, None, 1 if vq.polling else 0)

    def resume(self, index: int, vq: Virtqueue, rc: int) -> int:
        """Finish a drain a kick served in C handed back with `rc` (`native_kick`): the
        burst goes on from where C left it; returns the chains published meanwhile."""
        served = self.burst.served
        if not isinstance(vq, CffiVirtqueue):
            return 0
        q = vq.native()
        if q is None:
            return 0
        self._run(index, vq, q, rc, 0)
        return int(self.burst.served - served)

    def kick_parts(self) -> tuple[Any, Any]:
        """For `native_kick`: the device and burst structs C serves kicks with."""
        return self.blk, self.burst

    def prepare(self, vq: Virtqueue) -> bool:
        """For `native_kick`: C's view of the device made current before a wait."""
        self._sync_device()
        self._fold()
        return True

    def fold(self) -> None:
        """For `native_kick`: C's counters into `BlkStats`."""
        self._fold()

    def _sync_device(self) -> None:
        dev, b = self.device, self.blk
        b.fd, b.read_only, b.capacity = dev.fd, dev.read_only, dev.capacity

    def _run(self, index: int, vq: CffiVirtqueue, q: Any, rc: int | None, polling: int) -> None:
        """Call C until the ring is drained, doing in between what C hands back (`rc`: a
        return of C's to handle first, None: call C first)."""
        dev = self.device
        bu, items = self.burst, self._items
        target = vq.signal_target()
        if target is None:
            call_fd = _PY_CALL
        else:
            call_fd = target[1] if target[0] else _NO_SIGNAL
        drain = lib.vp_blk_drain
        try:
            while True:
                if rc is None:
                    rc = drain(self.blk, q, bu, BURST, polling, call_fd)
                if rc == 0:  # VP_BLK_DONE
                    break
                if rc == 1:  # VP_BLK_PYTHON
                    k = bu.pos
                    items[2 * k + 1] = dev.handle_chain(index, vq, self._chain(vq, k))
                    bu.pos = k + 1
                elif rc == 2:  # VP_BLK_FAILED
                    dev.request_failed(index, items[2 * bu.pos - 2],
                                       ffi.string(bu.error).decode("utf-8", "replace"))
                elif rc == 3:  # VP_BLK_CALL
                    vq.interrupt()
                else:  # VP_BLK_SEGS
                    self._segs = ffi.new("struct vp_seg[]", vq.size + MAX_QUEUE_SIZE + 1)
                    bu.segs, bu.max_segs = self._segs, len(self._segs)
                rc = None
        finally:
            vq.check_broken()
            self._fold()

    def _chain(self, vq: CffiVirtqueue, k: int) -> DescriptorChain:
        """Chain `k` of the current burst as the reference's `DescriptorChain`."""
        ch = self._chains[k]
        segs = self._segs
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        for j in range(ch.first, ch.first + ch.nseg):
            seg = segs[j]
            (writable if seg.write else readable).append((seg.addr, seg.len))
        return DescriptorChain(vq.memory, ch.head, readable, writable, ch.readable_len,
                               ch.writable_len)

    def _fold(self) -> None:
        """Move C's counters into the device's `BlkStats` and zero them."""
        b, st = self.blk, self.device.stats
        if b.reads or b.writes or b.flushes or b.errors:
            st.reads += b.reads
            st.writes += b.writes
            st.flushes += b.flushes
            st.bytes_read += b.bytes_read
            st.bytes_written += b.bytes_written
            st.errors += b.errors
            b.reads = b.writes = b.flushes = b.bytes_read = b.bytes_written = b.errors = 0
