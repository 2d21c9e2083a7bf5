"""A front-end that shrinks its guest-RAM memfd under a live mapping (the SIGBUS guard).

Every case runs in a child process, so a missing or broken guard is a crash of the child
(seen here as death by SIGBUS), never of pytest. With the compiled extension the child must
survive accesses to the hole through the Python views and through a C ring walk, and
`GuestMemory.faulted()` must describe the first fault; a bus error anywhere else must still
kill it. Without the extension (VHOSTPY_IMPLEMENTATION=python) the documented limit holds: the
same access kills the process, and `faulted()` is always None.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vhostpy import _accel

TESTS = Path(__file__).resolve().parent

#: Whether this process (and so each child, which inherits the environment) has the guard.
GUARDED = _accel.lib is not None

#: Shared by every child: a memfd of 64 pages, its pages numbered, mapped at gpa 0x100000.
PRELUDE = """
import json, mmap, os, signal, sys
from vhostpy import _accel
from vhostpy.memory import GuestMemory
P = mmap.PAGESIZE
GPA = 0x100000
def memfd(pages=64):
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, pages * P)
    for i in range(pages):
        os.pwrite(fd, bytes([(i + 1) % 256]) * 8, i * P)
    return fd
def registered():
    return -1 if _accel.lib is None else int(_accel.lib.vp_guard_registered())
def report(**kw):
    print(json.dumps(kw), flush=True)
"""


def run_child(body: str, *, faulthandler: bool = False) -> subprocess.CompletedProcess[str]:
    """Run PRELUDE + body in a fresh interpreter (same implementation as this process)."""
    code = PRELUDE + textwrap.dedent(body)
    if faulthandler:
        code = "import faulthandler; faulthandler.enable()\n" + code
    path = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def reports(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The JSON lines the child printed, in order."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def killed_by_sigbus(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == -signal.SIGBUS


def survived(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The child's last report, after checking it exited normally."""
    assert result.returncode == 0, (
        f"child died ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return reports(result)[-1]


# ------------------------------------------------------------------ the Python data path

PYTHON_PATH = """
fd = memfd()
mem = GuestMemory()
mem.map_fd(fd, GPA, 64 * P, 0x7f0000000000, 0)
report(stage="mapped", faulted=mem.faulted(), registered=registered())
os.ftruncate(fd, 16 * P)                       # pages 16.. are gone
kept = mem.read(GPA + 3 * P, 8)                # below the new end: still the fd's bytes
lost = mem.read(GPA + 40 * P, 8)               # past it: SIGBUS without the guard
view = mem.view(GPA + 41 * P + 8, 8)
view[:] = b"written!"                          # a write into the hole
again = bytes(view)
view.release()
mem.write(GPA + 50 * P - 4, b"spans two pages")
first = mem.faulted()
second = mem.faulted()
os.ftruncate(fd, 64 * P)                       # growing the fd back does not heal the region
report(stage="done", kept=kept.hex(), lost=lost.hex(), again=again.decode(), first=first,
       second=second, fd_now=os.pread(fd, 8, 41 * P + 8).hex(), registered=registered())
mem.clear()
report(stage="cleared", faulted=mem.faulted(), registered=registered())
"""


def test_python_views_over_a_truncated_memfd() -> None:
    result = run_child(PYTHON_PATH)
    mapped = reports(result)[0]
    assert mapped["stage"] == "mapped" and mapped["faulted"] is None
    if not GUARDED:
        # The documented limit: no handler, so the first access past the end kills us.
        assert killed_by_sigbus(result), (result.returncode, result.stdout, result.stderr)
        assert len(reports(result)) == 1
        return
    assert mapped["registered"] == 1
    done, cleared = reports(result)[1:]
    assert survived(result) == cleared
    assert done["kept"] == "04" * 8
    assert done["lost"] == "00" * 8  # the hole reads as zeros
    assert done["again"] == "written!"  # on our throw-away page ...
    assert done["fd_now"] == "00" * 8  # ... never in the front-end's file
    text = done["first"]
    assert text is not None and "\n" not in text
    assert "gpa=0x100000 size=0x40000" in text  # the region
    assert f"fd size now {hex(16 * os.sysconf('SC_PAGE_SIZE'))}" in text  # at the fault
    assert f"at gpa={hex(0x100000 + 40 * os.sysconf('SC_PAGE_SIZE'))}" in text  # the first
    assert done["second"] == text  # sticky, and still the first fault
    assert cleared == {"stage": "cleared", "faulted": None, "registered": 0}


# ------------------------------------------------------------------ the C ring walk

C_RING = """
from ringbuilder import RingBuilder, layout
from vhostpy.vring import DefaultVirtqueue
fd = memfd()
mem = GuestMemory()
mem.map_fd(fd, 0, 64 * P, 0x7f0000000000, 0)
rb = RingBuilder(mem, 8, layout(8, base=32 * P, data_size=4 * P))   # all past page 16
vq = rb.attach(DefaultVirtqueue(mem, 0))
rb.add_chain([b"request"], [64])
report(stage="ring", variant=type(vq).__name__, available=vq.has_available())
os.ftruncate(fd, 16 * P)
chains = vq.pop_many(8)                       # desc, avail and used now lie in the hole
vq.add_used_many([])
report(stage="walked", chains=len(chains), error=vq.error, faulted=mem.faulted())
"""


def test_c_ring_walk_over_a_truncated_memfd() -> None:
    result = run_child(C_RING)
    ring = reports(result)[0]
    assert ring["available"] is True
    if not GUARDED:
        assert ring["variant"] != "CffiVirtqueue"
        assert killed_by_sigbus(result), (result.returncode, result.stdout, result.stderr)
        return
    assert ring["variant"] == "CffiVirtqueue"  # the walk below is the C one
    walked = survived(result)
    assert walked["chains"] == 0  # the published chain went with the hole: avail->idx reads 0
    text = walked["faulted"]
    assert text is not None and "gpa=0x0 size=0x40000" in text
    avail_idx = 32 * os.sysconf("SC_PAGE_SIZE") + 16 * 8 + 2
    assert f"at gpa={hex(avail_idx)}" in text  # the first field C reads


# ------------------------------------------------------------------ real crashes still crash

FOREIGN_FAULT = """
fd = memfd()
mem = GuestMemory()
mem.map_fd(fd, GPA, 64 * P, 0x7f0000000000, 0)   # installs the guard (when there is one)
other = os.memfd_create("not-guest-memory")
os.ftruncate(other, 4 * P)
mm = mmap.mmap(other, 4 * P)
os.ftruncate(other, P)
report(stage="armed", active=_accel.lib is not None and bool(_accel.lib.vp_guard_active()))
mm[2 * P] = 1                                   # a bus error outside guest memory
report(stage="survived")
"""


@pytest.mark.parametrize("faulthandler", [False, True], ids=["sig_dfl", "faulthandler"])
def test_bus_error_outside_guest_memory_still_kills(faulthandler: bool) -> None:
    result = run_child(FOREIGN_FAULT, faulthandler=faulthandler)
    assert [r["stage"] for r in reports(result)] == ["armed"]
    assert reports(result)[0]["active"] is GUARDED
    assert killed_by_sigbus(result), (result.returncode, result.stdout, result.stderr)
    if faulthandler:  # chained: the handler installed before ours still runs
        assert "Fatal Python error: Bus error" in result.stderr, result.stderr


def test_sigbus_sent_by_kill_still_kills() -> None:
    result = run_child("""
        fd = memfd()
        mem = GuestMemory()
        mem.map_fd(fd, GPA, 64 * P, 0x7f0000000000, 0)
        report(stage="armed")
        os.kill(os.getpid(), signal.SIGBUS)
        report(stage="survived")
    """)
    assert [r["stage"] for r in reports(result)] == ["armed"]
    assert killed_by_sigbus(result), (result.returncode, result.stdout, result.stderr)


# ------------------------------------------------------------------ the record's life cycle

needs_guard = pytest.mark.skipif(
    not GUARDED,
    reason="no SIGBUS guard without the compiled extension (VHOSTPY_IMPLEMENTATION=python): "
    "the documented limit is checked by the tests above",
)


@needs_guard
def test_fault_is_sticky_until_its_region_goes() -> None:
    result = run_child("""
        a, b = memfd(), memfd()
        mem = GuestMemory()
        mem.map_fd(a, 0, 64 * P, 0x10000000, 0)
        mem.map_fd(b, GPA * 64, 64 * P, 0x20000000, 0)
        os.ftruncate(b, 8 * P)
        mem.read(GPA * 64 + 9 * P, 1)
        mem.read(GPA * 64 + 20 * P, 1)
        os.ftruncate(a, 8 * P)
        mem.read(10 * P, 1)                    # a later fault in another region
        first = mem.faulted()
        mem.remove(0, 64 * P)                  # the other region goes: b's fault stays
        after_a = mem.faulted()
        mem.remove(GPA * 64, 64 * P)
        report(first=first, after_a=after_a, after_b=mem.faulted(), registered=registered())
        c = memfd()
        mem.map_fd(c, 0, 64 * P, 0x10000000, 0)  # a new table starts clean
        report(fresh=mem.faulted(), registered=registered())
    """)
    lines = reports(result)
    assert result.returncode == 0, result.stderr
    page = os.sysconf("SC_PAGE_SIZE")
    first = f"gpa={hex(0x100000 * 64)} size={hex(64 * page)}"
    assert first in lines[0]["first"] and f"at gpa={hex(0x100000 * 64 + 9 * page)}" in (
        lines[0]["first"])
    assert lines[0]["after_a"] == lines[0]["first"]
    assert lines[0]["after_b"] is None and lines[0]["registered"] == 0
    assert lines[1] == {"fresh": None, "registered": 1}


@needs_guard
def test_views_held_after_clear_stay_guarded_until_unmapped() -> None:
    result = run_child("""
        import gc
        fd = memfd()
        mem = GuestMemory()
        mem.map_fd(fd, GPA, 64 * P, 0x10000000, 0)
        held = mem.view(GPA, 64 * P)             # a device still holds a view
        mem.clear()                               # cannot unmap yet
        os.ftruncate(fd, P)
        lost = bytes(held[30 * P : 30 * P + 4])   # still guarded, so no crash
        report(lost=lost.hex(), faulted=mem.faulted(), registered=registered())
        held.release()
        gc.collect()                              # the mmap goes, and its registration
        report(registered=registered())
    """)
    lines = reports(result)
    assert result.returncode == 0, result.stderr
    assert lines == [{"lost": "00" * 4, "faulted": None, "registered": 1}, {"registered": 0}]


@needs_guard
def test_faults_on_other_threads_are_seen() -> None:
    result = run_child("""
        import threading
        fd = memfd(256)
        mem = GuestMemory()
        mem.map_fd(fd, 0, 256 * P, 0x10000000, 0)
        os.ftruncate(fd, 0)
        seen = []
        def reader(first):
            for page in range(first, 256, 4):
                mem.read(page * P, 8)
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            seen.append(mem.faulted())
        for t in threads:
            t.join()
        report(final=mem.faulted(), polls=len(seen), registered=registered())
    """)
    assert result.returncode == 0, result.stderr
    final = reports(result)[0]["final"]
    assert final is not None and "fd size now 0x0" in final


@needs_guard
def test_a_handler_installed_after_the_guard_is_reported() -> None:
    result = run_child("""
        import faulthandler, logging
        logging.basicConfig(level=logging.WARNING)
        a, b = memfd(), memfd()
        mem = GuestMemory()
        mem.map_fd(a, 0, 64 * P, 0x10000000, 0)    # installs the guard
        faulthandler.enable()                      # replaces it
        mem.map_fd(b, GPA * 64, 64 * P, 0x20000000, 0)
        report(stage="displaced", active=bool(_accel.lib.vp_guard_active()))
        os.ftruncate(a, P)
        mem.read(8 * P, 1)                         # the documented limit: no guard any more
        report(stage="survived")
    """)
    assert reports(result) == [{"stage": "displaced", "active": False}]
    assert "SIGBUS guard over guest memory was replaced" in result.stderr, result.stderr
    assert killed_by_sigbus(result), (result.returncode, result.stdout, result.stderr)
