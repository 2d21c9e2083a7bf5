"""The pytest plugin (``pytest11`` entry point ``vhostpy``): QEMU guests with vhostpy devices
in a project's own tests.

Fixtures (all opt-in: nothing is autouse, and loading the plugin imports no more than
``vhostpy`` itself, so projects that do not use them see no change):

* ``vhostpy_guest_image`` (session): the `GuestImage` guests boot (kernel, cached busybox
  initramfs, QEMU, accelerator). A missing prerequisite fails the test with one line saying
  what to install.
* ``vhostpy_guest`` (function): a `GuestLauncher`. ``vhostpy_guest(device, ...)`` boots a
  guest with those devices (in-process `vhostpy.device.Device` objects, ``.backend(...)``
  processes, or any vhost-user socket) and returns a `Guest` whose ``run(command)`` gives
  the exit status and output; ``.boot(script, device, ...)`` runs one script per boot. At
  the end of the test, guests are killed, back-ends stopped and sockets removed, also when
  the test failed.

Marker ``vhostpy_skip_missing``: a test (or module, with ``pytestmark``) marked so that uses
``vhostpy_guest`` is skipped instead of failed when this host cannot boot guests (the
session-scoped ``vhostpy_guest_image`` cannot see a test's marks: alone, it fails). Disable
the plugin with ``-p no:vhostpy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from vhostpy.testing.image import GuestImage
    from vhostpy.testing.launcher import GuestLauncher

#: Skip instead of fail when the host lacks QEMU, a readable guest kernel or busybox.
SKIP_MARK = "vhostpy_skip_missing"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers", f"{SKIP_MARK}: skip, instead of failing, when this host cannot boot "
                   "vhostpy test guests (no QEMU, guest kernel or static busybox)")


def _missing(message: str, skip: bool) -> NoReturn:
    reason = f"vhostpy.testing: this host cannot boot test guests: {message}"
    if skip:
        pytest.skip(reason)
    pytest.fail(reason, pytrace=False)


def _image(skip: bool) -> GuestImage:
    from vhostpy.testing.errors import GuestImageError
    from vhostpy.testing.image import guest_image

    try:
        return guest_image()
    except GuestImageError as e:
        message = str(e)
    _missing(message, skip)   # outside the except block: one line, no chained traceback


@pytest.fixture(scope="session")
def vhostpy_guest_image() -> GuestImage:
    """The kernel, initramfs, QEMU and accelerator every guest of this session boots with."""
    return _image(skip=False)


@pytest.fixture
def vhostpy_guest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GuestLauncher]:
    """Boots guests with vhostpy devices; everything is cleaned up after the test."""
    from vhostpy.testing.launcher import GuestLauncher

    if request.node.get_closest_marker(SKIP_MARK) is not None:
        _image(skip=True)
    image: GuestImage = request.getfixturevalue("vhostpy_guest_image")
    launcher = GuestLauncher(image, tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()
