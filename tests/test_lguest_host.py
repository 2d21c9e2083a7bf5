"""Host adapters: the memfd/eventfd host, and the /dev/lguest run loop against a software model.

`FakeLguest` (tests/lguest_model.py) models the kernel side of /dev/lguest as the 3.x
lguest_user.c describes it; here it runs non-blocking (an empty read gives EAGAIN).
It is a model, not the kernel: CI never runs DevLguestHost on a real lguest host (it has run on
one by hand, under `vhostpy lguest`: see the README).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

import pytest
from lguest_model import FakeLguest

from vhostpy.blk import BlockDevice
from vhostpy.errors import ConfigurationError
from vhostpy.lguest_bridge import PAGE_SIZE
from vhostpy.lguest_guest import LguestGuestDriver
from vhostpy.lguest_host import DevLguestHost, RunExit, SharedMemoryHost
from vhostpy.loop import EventLoop
from vhostpy.memory import GuestMemory

LHREQ_INITIALIZE, LHREQ_GETDMA, LHREQ_IRQ, LHREQ_BREAK, LHREQ_EVENTFD = range(5)
RAM = 4 << 20


# ------------------------------------------------------------------ shared-memory host


@pytest.fixture
def host() -> Iterator[SharedMemoryHost]:
    h = SharedMemoryHost(RAM, device_pages=32)
    yield h
    h.close()


def test_memory_is_a_shareable_memfd(host: SharedMemoryHost) -> None:
    host.add_device(BlockDevice.in_memory(4096))
    assert os.fstat(host.fd).st_size == RAM + 32 * PAGE_SIZE == host.size
    other = GuestMemory()                        # what a vhost-user back-end would map
    for gpa, size, uva, offset in host.regions():
        other.map_fd(host.fd, gpa, size, uva, offset)
    assert other.read(RAM, 16) == host.memory.read(RAM, 16)
    assert other.read(RAM, 1) == b"\x02"         # virtio-blk's entry, seen through the fd
    other.clear()


def test_direct_notify_and_irq_callbacks(host: SharedMemoryHost) -> None:
    host.add_device(BlockDevice.in_memory(8192))
    drv = LguestGuestDriver(host.memory, RAM, host.notify)
    seen: list[int] = []
    host.on_irq(seen.append)
    host.on_irq(drv.interrupt)
    fd = host.irq_fd(1)
    blk = drv.blk()
    blk.write(1, b"\x5a" * 512)
    assert blk.read(1, 1) == b"\x5a" * 512
    assert seen == [1, 1] and drv.irqs[1] == 2 and host.irq_counts[1] == 2
    assert os.eventfd_read(fd) == 2


def test_pipe_and_kick_eventfd_notifies_from_a_loop(host: SharedMemoryHost) -> None:
    lg = host.add_device(BlockDevice.in_memory(8192))
    loop = EventLoop()
    kick = host.kick_fd(lg.queues[0].address)
    host.attach(loop)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        def guest_notify(address: int) -> None:
            if address == lg.queues[0].address:
                os.eventfd_write(kick, 1)        # like the kernel with LHREQ_EVENTFD
            else:
                host.post_notify(address)        # from the "guest" thread

        drv = LguestGuestDriver(host.memory, RAM, guest_notify)
        blk = drv.blk()                          # the finalising notify goes through the pipe
        blk.write(3, b"\x11" * 1024)             # completions polled: the loop thread serves
        assert blk.read(3, 2) == b"\x11" * 1024
        assert lg.running
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_partial_notify_records_are_kept(host: SharedMemoryHost) -> None:
    out: list[bytes] = []
    host.bridge.console_sink = out.append
    host.memory.write(0x2000, b"hi\0")
    record = struct.pack("<Q", 0x2000)
    os.write(host.notify_fd, record[:3])
    assert host.drain_notifies() == 0
    os.write(host.notify_fd, record[3:] + record)
    assert host.drain_notifies() == 2 and out == [b"hi", b"hi"]


def test_poll_kicks_and_close_is_idempotent() -> None:
    h = SharedMemoryHost(RAM, device_pages=8, layout="2.6.24")
    lg = h.add_device(BlockDevice.in_memory(4096, queue_size=64))
    fd = h.kick_fd(lg.queues[0].address)
    assert h.poll_kicks() == 0
    os.eventfd_write(fd, 1)
    assert h.poll_kicks() == 1 and lg.running       # 2.6.24: the first kick starts it
    h.close()
    h.close()
    with pytest.raises(ConfigurationError):
        SharedMemoryHost(RAM, device_pages=0)


# ------------------------------------------------------------------ /dev/lguest model


def dev_host(word: int = 4, **kw: object) -> tuple[DevLguestHost, FakeLguest, GuestMemory]:
    fake = FakeLguest(word)
    buf = bytearray(RAM + 32 * PAGE_SIZE)
    mem = GuestMemory()
    mem.add_buffer(buf, 0)
    host = DevLguestHost(mem, RAM, opener=fake.open, word_size=word, **kw)  # type: ignore[arg-type]
    return host, fake, mem


@pytest.mark.parametrize("word", [4, 8])
def test_initialize_words(word: int) -> None:
    host, fake, _ = dev_host(word)
    host.bridge.add_device(BlockDevice.in_memory(4096))
    host.initialize(0x100000, guest_base=0x40000000)
    limit = RAM // PAGE_SIZE + 1 + 3              # RAM, the device page, one 256-entry ring
    assert fake.opened == ["/dev/lguest"]
    assert fake.requests == [(LHREQ_INITIALIZE, 0x40000000, limit, 0x100000)]
    host.initialize(0x200000)                     # default guest_base: our mapping's address
    assert fake.requests[-1][0] == LHREQ_INITIALIZE and fake.requests[-1][1] != 0
    host.initialize(0x100000, guest_base=0x1000, pgdir=0x3ff000)     # the 2.6.24 form
    assert fake.requests[-1] == (LHREQ_INITIALIZE, 0x1000, limit, 0x3ff000, 0x100000)
    host.close()
    assert fake.closed


def test_notifies_from_pread_and_irqs_as_lhreq_irq() -> None:
    host, fake, mem = dev_host()
    host.bridge.add_device(BlockDevice.in_memory(8192))
    host.initialize(0x100000, guest_base=0x1000)

    def pump() -> None:
        host.run(16)

    drv = LguestGuestDriver(mem, RAM, fake.guest_notify, pump=pump)
    blk = drv.blk()
    blk.write(2, b"\x77" * 512)
    assert blk.read(2, 1) == b"\x77" * 512
    irqs = [r for r in fake.requests if r[0] == LHREQ_IRQ]
    assert irqs == [(LHREQ_IRQ, 1)] * 2
    assert host.run(1) == RunExit("limit") or not fake.notifies


def test_eventfd_registration() -> None:
    host, fake, mem = dev_host(eventfds=True)
    lg = host.bridge.add_device(BlockDevice.in_memory(8192))
    host.initialize(0x100000, guest_base=0x1000)

    def pump() -> None:
        host.poll_eventfds()
        host.run(16)

    drv = LguestGuestDriver(mem, RAM, fake.guest_notify, pump=pump)
    blk = drv.blk()
    host.run(16)                                  # the Launcher serves the finalising notify
    ring = lg.queues[0].address
    assert [r for r in fake.requests if r[0] == LHREQ_EVENTFD] == [
        (LHREQ_EVENTFD, ring, host.eventfds[ring])]
    blk.write(0, b"\x42" * 512)
    assert blk.read(0, 1) == b"\x42" * 512
    assert ring not in fake.notifies
    blk.reset()                                   # registration survives a device reset
    host.run(16)
    blk = drv.blk()
    host.run(16)
    assert blk.read(0, 1) == b"\x42" * 512
    assert len([r for r in fake.requests if r[0] == LHREQ_EVENTFD]) == 1
    host.close()
    assert host.eventfds == {}


def test_run_exits() -> None:
    host, fake, mem = dev_host()
    out: list[bytes] = []
    host.bridge.console_sink = out.append
    host.initialize(0, guest_base=0x1000)
    mem.write(0x3000, b"boot\0")
    fake.notifies.extend([0x3000, 0x3000])
    assert host.run(2) == RunExit("limit") and out == [b"boot", b"boot"]
    fake.dead = "Guest panic: oops"
    assert host.run() == RunExit("died", "Guest panic: oops")
    fake.dead, fake.restart = None, True
    assert host.run() == RunExit("restart")


def test_irq_write_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    host, _, _ = dev_host()
    host.initialize(0, guest_base=0x1000)
    host.trigger_irq(40)                          # the model refuses irqs >= 32
    assert "LHREQ_IRQ 40 failed" in caplog.text


def test_short_pread_and_bad_word_size() -> None:
    host, fake, mem = dev_host()
    host.initialize(0, guest_base=0x1000)
    fake.pread = lambda size, offset: b"\x01"     # type: ignore[method-assign]
    assert host.run().kind == "error"
    with pytest.raises(ConfigurationError):
        DevLguestHost(mem, RAM, word_size=2)
