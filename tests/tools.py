"""Rules every test module shares: missing prerequisites, and waiting for events.

* A prerequisite that is missing (a tool, QEMU, DPDK, a Python module, network namespaces)
  **fails** the test under ``CI=true`` (GitHub Actions sets it), so a broken runner cannot turn
  a suite into silent skips, and **skips** it elsewhere. :func:`unavailable` is that rule,
  :func:`require_tool` its most common use.
* Tests never sleep to let something happen: they wait for an observable event (a log line, a
  reply, a counter, a process exit) with :func:`wait_until`, under a bounded deadline.

Also imported by ``bench/`` (through ``dpdk.py`` and ``qemu_guest.py``), which runs without
pytest: pytest is imported only when a rule has to skip or fail.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

#: Where administrators' tools live when they are not on a non-root user's PATH (e2fsck, ...).
SBIN_DIRS = ("/usr/sbin", "/sbin")


def under_ci() -> bool:
    """True when ``CI`` says this run is continuous integration (``true``, ``1`` or ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """A prerequisite of the calling test is missing: fail it under CI, skip it elsewhere."""
    import pytest

    if under_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the test)", pytrace=False)
    pytest.skip(reason)


def boots_once_per_suite(subject: str) -> None:
    """Skip the calling guest test in ci/test.sh's VHOSTPY_IMPLEMENTATION=cffi run: its
    `subject` is Python code that runs the same under every implementation (block stores,
    devices written on the SDK, the fault and power layers), so the suite's time goes to one
    boot, in the python run. What differs under cffi is only the ring access below it (the
    compiled virtqueue), which the cffi run covers with its other guest tests (test_qemu_blk,
    test_qemu_rng, test_qemu_net) and its unit tests (test_completion: completions deferred
    over the compiled virtqueue). A plain `pytest` (implementation auto) runs it."""
    import pytest

    if os.environ.get("VHOSTPY_IMPLEMENTATION", "").strip().lower() == "cffi":
        pytest.skip(f"{subject}: the same Python code under every implementation; "
                    "ci/test.sh boots this guest once, in its VHOSTPY_IMPLEMENTATION=python run")


def bench_smoke_once_per_suite(subject: str) -> None:
    """Skip the calling benchmark smoke test in ci/test.sh's VHOSTPY_IMPLEMENTATION=python
    run: what it checks is the harness (`bench.run`: every case measured, ratios, the
    table), the same code under every implementation, and the figures users run it for come
    from the compiled path, so the suite's time goes to one run, in the cffi pass. The
    pure-Python back-ends stay covered there by their own guest and DPDK tests. A plain
    `pytest` (implementation auto) runs it."""
    import pytest

    if os.environ.get("VHOSTPY_IMPLEMENTATION", "").strip().lower() == "python":
        pytest.skip(f"{subject}: the harness is the same code under every implementation; "
                    "ci/test.sh runs it once, in its VHOSTPY_IMPLEMENTATION=cffi run")


def find_tool(name: str) -> str | None:
    """Path of the executable ``name``: on PATH, else in /usr/sbin or /sbin; None if absent."""
    for path in (shutil.which(name), *(os.path.join(d, name) for d in SBIN_DIRS)):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def require_tool(name: str, hint: str) -> str:
    """Path of the executable ``name``; if it is missing, :func:`unavailable` with ``hint``
    (how to install it) in the message."""
    path = find_tool(name)
    if path is None:
        unavailable(f"{name} not found ({hint})")
    return path


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; raise
    TimeoutError naming ``what`` once ``timeout`` seconds have passed without it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
