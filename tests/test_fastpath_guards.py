"""The compiled fast path refuses what would take it outside its buffers, and the net C path
sees its device only through the narrow interface (`NetPathConfig`, `signal_target`).

* every net entry taking a virtio-net header length refuses one other than 10 or 12 with
  `VP_ERR_HDR_LEN` before touching a ring or a counter, and Python turns that into a
  ValueError naming the length;
* `vp_pcap_headers` writes nothing unless every frame has its 16-byte record slot (frames
  laid end to end by `vp_frames_from_flat` have none);
* the plan the net path caches is rebuilt when how a ring is signalled changes;
* `NetPathConfig` is republished, never mutated, on every change;
* the modules of the net data path read no other module's private attributes (ruff SLF001).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ringbuilder import CallRunner
from test_fastpath import _rig, _signals, _used_poll_loop
from test_net import MODERN_NO_MRG, Rig, frame, vhdr

from vhostpy import _accel
from vhostpy.net import NetDevice, NetPathConfig

needs_cffi = pytest.mark.skipif(_accel.lib is None, reason="the extension is not built")
ROOT = Path(__file__).resolve().parent.parent
BAD_HDR_LENS = [0, 9, 11, 13, 16, 24, 100]


def _c() -> tuple[Any, Any]:
    return _accel.ffi, _accel.lib


def _frames(count: int, data_bytes: int) -> tuple[Any, Any]:
    from vhostpy.net_cffi import new_frames
    return new_frames(count, data_bytes)


# ------------------------------------------------------------------ hdr_len


@needs_cffi
@pytest.mark.parametrize("bad", BAD_HDR_LENS)
def test_every_net_entry_refuses_a_bad_header_length(bad: int) -> None:
    ffi, lib = _c()
    rig = Rig()
    rig.port.remove_handler(rig.handler)
    rig.ring(0, start=False)
    rig.ring(1, start=False)
    rig.post(4)
    rig.rbs[1].add_chain([vhdr(flags=1, csum_start=14, csum_offset=20) + frame(64, 1)])
    q, rq = rig.vqs[1].native(), rig.vqs[0].native()
    state = (q.last_avail_idx, q.used_idx, rq.last_avail_idx, rq.used_idx)
    st, rx_st, bl = (ffi.new("struct vp_net_stats *") for _ in range(3))
    out, _keep = _frames(4, 4 * 2048)
    err = lib.VP_ERR_HDR_LEN

    assert lib.vp_net_tx_burst(q, bad, 1, 8, st, out) == err
    stalled = ffi.new("int *", 7)
    assert lib.vp_net_reflect_burst(q, rq, bad, 1, 1, 1518, 8, st, rx_st, bl, out,
                                    stalled) == err
    assert stalled[0] == 0
    flat, _flat_keep = _frames(1, 0)
    data = ffi.new("uint8_t[]", frame(64, 2))
    lib.vp_frames_from_flat(flat, data, ffi.new("uint32_t[]", [64]), 1)
    assert lib.vp_net_rx_place(rq, bad, 1, 1518, flat, ffi.NULL, 1, 0, st, bl, ffi.NULL,
                               0, 0) == err
    plan = ffi.new("struct vp_net_poll *")
    plan.mode, plan.hdr_len, plan.burst, plan.max_bursts, plan.bursts = (
        lib.VP_TX_SINK, bad, 8, 4, 5)
    assert lib.vp_net_tx_poll(q, st, out, plan) == err and plan.bursts == 0

    # Nothing popped, published, counted or kept.
    assert (q.last_avail_idx, q.used_idx, rq.last_avail_idx, rq.used_idx) == state
    assert rig.rbs[1].get_used() == [] and rig.rbs[0].get_used() == []
    for s in (st, rx_st, bl):
        assert (s.frames, s.dropped, s.bytes) == (0, 0, 0)
    assert out.n == 0

    # The two lengths virtio defines still work on the same rings.
    assert lib.vp_net_tx_burst(q, 12, 1, 8, st, out) == 1 and st.frames == 1
    assert lib.vp_net_rx_place(rq, 10, 0, 1518, flat, ffi.NULL, 1, 0, st, bl, ffi.NULL,
                               0, 0) == 1


def _bad_config(rig: Rig, hdr_len: int) -> None:
    # A device can only publish 10 or 12; the test forces another to reach C's check.
    rig.dev._path_config = dataclasses.replace(rig.dev.path_config, hdr_len=hdr_len)


@needs_cffi
@pytest.mark.parametrize("fds", [False, True], ids=["per-burst", "poll-loop"])
def test_a_refused_header_length_is_a_clear_error(fds: bool) -> None:
    rig = _rig("cffi", fds=fds)
    _bad_config(rig, 16)
    rig.rbs[1].add_chain([vhdr() + frame(64, 1)])
    with pytest.raises(ValueError, match="header length 16 refused by the compiled path"):
        rig.process(1)
    assert rig.rbs[1].get_used() == []
    rig.post(2)
    with pytest.raises(ValueError, match="header length 16 refused"):
        rig.dev.transmit_to_guest([frame(64, 2)])
    assert rig.rbs[0].get_used() == []


# ------------------------------------------------------------------ pcap record slots


def _filled(ffi: Any, size: int, fill: int) -> Any:
    buf = ffi.new("uint8_t[]", size)
    ffi.memmove(buf, bytes([fill]) * size, size)
    return buf


@needs_cffi
def test_pcap_headers_refuse_frames_laid_end_to_end() -> None:
    """Frames from vp_frames_from_flat have no slot: writing one would hit the 16 bytes
    before the first frame (outside the data) and the end of every previous frame."""
    ffi, lib = _c()
    frames = [frame(60, 1), frame(70, 2), frame(80, 3)]
    data = b"".join(frames)
    guard = 32
    buf = _filled(ffi, guard + len(data), 0xAA)
    ffi.memmove(buf + guard, data, len(data))
    flat, _keep = _frames(3, 0)
    lib.vp_frames_from_flat(flat, buf + guard, ffi.new("uint32_t[]", list(map(len, frames))), 3)
    assert lib.vp_pcap_headers(flat, 1, 2) == lib.VP_ERR_NO_SLOT
    assert ffi.buffer(buf, guard + len(data))[:] == b"\xaa" * guard + data


def _slotted(ffi: Any, offsets: list[int], lens: list[int]) -> tuple[Any, Any, Any]:
    f, keep = _frames(len(offsets), offsets[-1] + lens[-1])
    buf = keep[0]
    ffi.memmove(buf, b"\x55" * (offsets[-1] + lens[-1]), offsets[-1] + lens[-1])
    for k, (off, n) in enumerate(zip(offsets, lens)):
        f.off[k], f.len[k] = off, n
    f.n, f.used = len(offsets), offsets[-1] + lens[-1]
    return f, keep, buf


@needs_cffi
def test_pcap_headers_fill_slots_and_check_all_before_writing() -> None:
    ffi, lib = _c()
    f, _keep, buf = _slotted(ffi, [16, 16 + 60 + 16, 16 + 60 + 16 + 70 + 16], [60, 70, 80])
    assert lib.vp_pcap_headers(f, 7, 9) == 3
    blob = ffi.buffer(buf, f.used)[:]
    for off, n in zip([16, 92, 178], [60, 70, 80]):
        assert struct.unpack_from("<IIII", blob, off - 16) == (7, 9, n, n)
        assert blob[off:off + n] == b"\x55" * n
    # The third frame's slot overlaps the second frame: refused, even the good slots untouched.
    f, _keep, buf = _slotted(ffi, [16, 92, 92 + 70 + 8], [60, 70, 80])
    assert lib.vp_pcap_headers(f, 7, 9) == lib.VP_ERR_NO_SLOT
    assert ffi.buffer(buf, f.used)[:] == b"\x55" * f.used


# ------------------------------------------------------------------ signalling and the plan


@needs_cffi
def test_plan_follows_the_rings_signal_target() -> None:
    """The C loop's plan is keyed on `signal_target()`: a new call eventfd is used at once."""
    rig = _rig("cffi", fds=True)
    rig.transmit([vhdr() + frame(64, 1)])
    assert _used_poll_loop(rig) and _signals(rig, 1) == 1
    vq = rig.vqs[1]
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        CallRunner(vq, lambda: os.eventfd_write(new, 1), new)   # a new call eventfd
        assert vq.signal_target() == (1, new)
        rig.transmit([vhdr() + frame(64, 2)])
        assert _signals(rig, 1) == 0 and os.eventfd_read(new) == 1
    finally:
        os.close(new)


# ------------------------------------------------------------------ the config snapshot


def test_path_config_is_republished_on_every_change() -> None:
    dev = NetDevice(mtu=9000)
    first = dev.path_config
    assert first == NetPathConfig(hdr_len=10, csum=False, mrg=False, mtu=9000, rx_ring=None)
    assert first.max_frame == 9018 and dev.mtu == 9000
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.mtu = 1500  # type: ignore[misc]
    dev.set_features(MODERN_NO_MRG)
    modern = dev.path_config
    assert modern is not first and (modern.hdr_len, modern.csum, modern.mrg) == (12, True, False)
    dev.set_mtu(1400)
    assert dev.path_config.mtu == 1400 and dev.mtu == 1400 and modern.mtu == 9000
    rig = Rig(dev)
    rig.ring(0)
    assert dev.path_config.rx_ring is rig.vqs[0]
    dev.queue_stopped(0, rig.vqs[0])
    assert dev.path_config.rx_ring is None
    dev.reset()
    assert (dev.path_config.hdr_len, dev.path_config.csum, dev.path_config.mtu) == (10, False,
                                                                                    1400)


def test_python_consumers_is_public_and_tracks_the_port() -> None:
    dev = NetDevice()
    port = dev.port
    assert port.python_consumers is False

    def handler(p: object, frames: list[bytes]) -> None:
        del p, frames
    port.add_handler(handler)
    assert port.python_consumers is True
    port.remove_handler(handler)
    port.add_monitor(lambda p, d, f: None)
    assert port.python_consumers is True


def test_the_net_data_path_reads_no_private_attributes() -> None:
    """ruff's SLF001 on the modules the net and blk C paths span (the package-wide switch
    waits for the modules other work owns)."""
    pytest.importorskip("ruff")
    files = ["vhostpy/net.py", "vhostpy/net_cffi.py", "vhostpy/blk_cffi.py",
             "vhostpy/switch.py", "vhostpy/netapp.py", "vhostpy/pcap.py", "vhostpy/tap.py",
             "vhostpy/packets.py"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select",
                             "SLF001", *files], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
