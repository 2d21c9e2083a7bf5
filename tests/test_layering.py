"""The import rules of ARCHITECTURE.md's module map, checked on the source with `ast`.

`ALLOWED` is the whole rule set: for each module, the vhostpy modules it may import (None:
anything). Every import counts, including ones inside functions and under TYPE_CHECKING,
relative ones and `from vhostpy import x`. The table and the package match exactly: a module
missing from the table fails, and so does a table entry with no module behind it.
The sans-I/O layers must not import the stdlib's socket or event-loop modules either.
"""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

PACKAGE = "vhostpy"
ROOT = "__init__"  # `import vhostpy` / `from vhostpy import __version__`
SRC = Path(__file__).resolve().parent.parent / PACKAGE

# Layers (ARCHITECTURE.md, "Module map and import rules").
LAYER0 = {"errors", "protocol", "_accel", "notifier"}
LAYER1 = LAYER0 | {"memory", "virtqueue"}
LAYER2 = LAYER1 | {"device"}
MODELS = {"blk", "net", "rng", "console"}
#: Layer 2½: the vring runner (it builds the ring variant the visible rule picks).
LAYER2H = LAYER2 | {"vring", "completion", "pacing", "virtqueue_cffi", "virtqueue_packed",
                    "native_kick"}
LAYER3 = LAYER2H | MODELS | {"packets"}
LAYER5 = LAYER3 | {"session", "frontend", "loop"}
#: What a device model may import: the table's "device, virtqueue, memory, errors", plus
#: `packets`, the transport-free frame helpers behind virtio-net.
MODEL_DEPS = {"device", "virtqueue", "memory", "errors", "packets", "_accel", ROOT}
#: Host-side ports and frame helpers of virtio-net: no transports, no devices (`_accel`: the
#: compiled fast path they may use).
PORT_DEPS = {"errors", "packets", "_accel", ROOT}

ALLOWED: dict[str, set[str] | None] = {
    # layer 0: codec, errors, accelerated loops
    "errors": set(),
    "protocol": {"errors"},
    # ring endpoints: eventfds and callables, nothing about rings
    "notifier": {"errors"},
    "_accel": {"errors", "_native"},
    "_native": set(),  # the compiled extension itself (built from _fastpath.c)
    "_native_build": set(),  # the cffi builder: run at install, never imported
    # The package imports only layer 0 at import time; `vhostpy.Server`, `serve` and
    # `serve_async` are loaded from `api` on first use (a module __getattr__, plus a
    # TYPE_CHECKING import for type checkers), which this test counts like any import.
    ROOT: set(LAYER0) | {"api"},
    # layer 1: guest memory and rings
    "memory": LAYER0 | {ROOT},
    # the two ring variants are siblings: neither imports the other's module
    # (each ring keeps its inflight region and dirty log: stdlib-only bookkeeping below it)
    "virtqueue": LAYER0 | {"memory", "inflight", "dirtylog", ROOT},
    "virtqueue_cffi": LAYER0 | {"memory", "virtqueue", "virtqueue_packed", "inflight", "dirtylog",
                                ROOT},
    # the packed ring (virtio 1.1+ 2.8): the split ring's base class and helpers, below it
    "virtqueue_packed": LAYER0 | {"memory", "virtqueue", "inflight", "dirtylog", ROOT},
    # layer 2: the device interface
    "device": LAYER1 | {ROOT},
    # layer 2½: the runner of every served ring, shared by every transport
    "vring": LAYER2 | {"virtqueue_cffi", "virtqueue_packed", "completion", "pacing",
                       "native_kick", ROOT},
    # kicks served in C: the runner's hand-off to the loop's waiter
    "native_kick": LAYER1 | {ROOT},
    # the runner's decision after a kick: polling and interrupt coalescing
    "pacing": LAYER2 | {ROOT},
    # the runner's book of chains completed later (asyncio only for its CancelledError)
    "completion": {"virtqueue", ROOT},
    # inflight tracking (INFLIGHT_SHMFD): the split region's layout and bookkeeping
    "inflight": set(),
    # the migration dirty log: one bit per guest page
    "dirtylog": set(),
    # layer 3: device models, and the transport-free helpers beside them
    "blk": MODEL_DEPS | {"blk_cffi", "stores", "images"},
    # the compiled virtio-blk data path (blk's fast variant; never imports blk)
    "blk_cffi": MODEL_DEPS | {"virtqueue_cffi"},
    "net": MODEL_DEPS | {"net_cffi", "netfaults"},
    # the compiled virtio-net data path (net's fast variant; never imports net)
    "net_cffi": {"_accel", "virtqueue", "virtqueue_cffi", ROOT},
    "rng": MODEL_DEPS,
    "console": MODEL_DEPS,
    "packets": set(),  # standard library only (its docstring)
    "tap": PORT_DEPS,
    "pcap": PORT_DEPS,
    "switch": PORT_DEPS,
    # net faults on purpose: rules applied to frames, and the filter language they use
    "framefilter": PORT_DEPS,
    "netfaults": PORT_DEPS | {"framefilter"},
    # block stores behind virtio-blk: files and memory, the NBD client; raw images on the host
    "stores": {"errors", "images"},
    "nbd": {"errors"},
    "images": {"errors"},
    # fault injection wrapped around any store; a volatile write cache and a write log
    "faults": {"errors", "stores"},
    "writecache": {"stores"},
    "writelog": {"errors", "stores", "writecache"},
    # layer 4: control planes
    "session": LAYER3 | {"inflight", "dirtylog", ROOT},
    "frontend": LAYER1 | {ROOT},
    # a device served by another back-end: the device interface over the front-end
    "vhost_proxy": LAYER2 | {"frontend", ROOT},
    # console glue: the device on stdin/stdout or a UNIX socket, driven by the loop
    "console_io": {"console", "errors", "loop", ROOT},
    # layer 5: the event loop knows nothing about virtio
    "loop": set(),
    # layer 6: I/O edges
    "server": LAYER5 | {ROOT},
    "lguest_bridge": (LAYER5 - {"session"}) | {ROOT},
    "lguest_host": {"lguest_bridge", "device", "memory", "errors", "loop", ROOT},
    "lguest_guest": {"errors", "memory", "virtqueue", ROOT},
    # the lguest Launcher: boot data (stdlib + memory) and the process around the bridge
    "lguest_boot": {"errors", "memory", ROOT},
    "lguest_launcher": {"lguest_boot", "lguest_bridge", "lguest_host", "blk", "console", "net",
                        "rng", "device", "errors", "frontend", "vhost_proxy", "loop", "memory",
                        "netapp", "packets", "pcap", "switch", "tap", ROOT},
    # layer 7: front doors
    "api": None,     # vhostpy.Server, serve, serve_async: anything but the command line
    "netapp": None,  # checked below: anything but the command line
    # the control socket (JSON lines, any loop) and the commands the device commands answer
    "control": {"errors", "server"},
    "ctlcommands": {"control", "writecache", "writelog"},
    "cli": None,
    # the command line's shared parser and argument types; the lguest command's arguments
    "cliargs": set(),
    "cli_lguest": {"cliargs", "errors", "lguest_launcher", ROOT},
    "__main__": None,
}

#: vhostpy.testing, the pytest plugin's package (its modules are named "testing.<module>").
#: The guest-image machinery and the QEMU harness below `backends` import only the standard
#: library and each other (STDLIB_ONLY), so a checkout's ci/qemu scripts run them as they are.
TESTING: dict[str, set[str] | None] = {
    "testing": {f"testing.{m}" for m in ("backends", "console", "errors", "files", "guest",
                                         "image", "launcher", "qemu", "shell")},
    "testing.errors": set(),
    "testing.cpio": set(),
    "testing.kernel": {"testing.errors"},
    "testing.initramfs": {"testing.cpio", "testing.errors", "testing.kernel"},
    "testing.qemu": {"testing.errors"},
    "testing.console": {"testing.errors", "testing.initramfs"},
    "testing.files": {"testing.errors"},
    # the KVM probe is a guest: accel and guest import each other (accel inside a function)
    "testing.accel": {"testing.errors", "testing.initramfs", "testing.guest"},
    "testing.guest": {"testing.accel", "testing.console", "testing.errors",
                      "testing.initramfs", "testing.kernel", "testing.qemu"},
    "testing.shell": {"testing.console", "testing.errors", "testing.guest"},
    "testing.image": {"testing.accel", "testing.initramfs", "testing.kernel", "testing.qemu"},
    "testing.run_guest": {"testing.errors", "testing.guest"},
    # devices served in-process (vhostpy.Server, loaded on first use) or by the command line
    "testing.backends": {"device", "errors", "api", "testing.qemu"},
    "testing.launcher": {"device", "errors", "testing.backends", "testing.console",
                         "testing.errors", "testing.guest", "testing.image", "testing.qemu",
                         "testing.shell"},
    "testing.plugin": {"testing.errors", "testing.image", "testing.launcher"},
}
ALLOWED.update(TESTING)
STDLIB_ONLY = {m for m in TESTING if m not in ("testing.backends", "testing.launcher",
                                               "testing.plugin")}

#: Standard-library modules that would let a sans-I/O layer do I/O or own a loop.
IO_MODULES = {"socket", "selectors", "select", "asyncio", "socketserver"}
SANS_IO = {"errors", "protocol", "memory", "virtqueue", "device", "session"}
#: Modules no library module may import (the command line sits on top of everything).
NEVER_IMPORTED = {"cli", "__main__"}


def present_modules() -> set[str]:
    """The package's modules: "x" for vhostpy/x.py, "testing.x" for vhostpy/testing/x.py
    ("testing" for its __init__)."""
    return ({p.stem for p in SRC.glob("*.py")}
            | {"testing" if p.stem == "__init__" else f"testing.{p.stem}"
               for p in (SRC / "testing").glob("*.py")})


def module_path(module: str) -> Path:
    """The source file of a module named as in `present_modules`."""
    if module == "testing":
        return SRC / "testing" / "__init__.py"
    return SRC / (module.replace(".", "/") + ".py")


def vhostpy_imports(source: str, known: Collection[str], package: str = "") -> set[str]:
    """The vhostpy modules `source` imports, by module name (ROOT for the package itself).

    `known` names the package's modules, to tell `from vhostpy import memory` (a module)
    from `from vhostpy import __version__` (a name in the package). A relative import that
    climbs out of the package comes back as "..<module>", which no rule allows.
    `package` is "testing" for a module of vhostpy.testing: its relative imports resolve there,
    and a module of that package comes back as "testing.<module>".
    """

    def named(parts: list[str]) -> str:
        if parts[0] == "testing" and len(parts) > 1 and f"testing.{parts[1]}" in known:
            return f"testing.{parts[1]}"
        return parts[0]

    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    found.add(named(parts[1:]) if len(parts) > 1 else ROOT)
        elif isinstance(node, ast.ImportFrom):
            relative = node.module.split(".") if node.module else []
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != PACKAGE:
                    continue
                rest = parts[1:]
            elif node.level == 1:
                rest = [package, *relative] if package else relative
            elif node.level == 2 and package:
                rest = relative
            else:
                found.add(".." + (node.module or ""))
                continue
            if rest == ["testing"]:
                for alias in node.names:
                    found.add(f"testing.{alias.name}" if f"testing.{alias.name}" in known
                              else "testing")
            elif rest:
                found.add(named(rest))
            else:
                for alias in node.names:
                    found.add(alias.name if alias.name in known else ROOT)
    return found


def stdlib_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(module: str, source: str, known: Collection[str] | None = None) -> list[str]:
    """Every broken rule of `module` (whose code is `source`), one line each."""
    known = set(ALLOWED) | present_modules() if known is None else known
    if module not in ALLOWED:
        return [f"{module}: not in the layering table; add it to ALLOWED"]
    package = "testing" if module.startswith("testing") else ""
    imports = vhostpy_imports(source, known, package) - {module}
    allowed = ALLOWED[module]
    out = []
    if allowed is None:
        if module not in NEVER_IMPORTED:
            out += [f"{module} imports {imp} (only the command line may)"
                    for imp in sorted(imports & NEVER_IMPORTED)]
    else:
        out += [f"{module} imports {imp} (allowed: {', '.join(sorted(allowed)) or 'none'})"
                for imp in sorted(imports - allowed)]
    if module in SANS_IO:
        out += [f"{module} is sans-I/O but imports {name}"
                for name in sorted(stdlib_imports(source) & IO_MODULES)]
    return out


def check_file(path: Path, module: str | None = None) -> list[str]:
    return violations(module or path.stem, path.read_text())


# ------------------------------------------------------------------ the rules hold


def test_table_lists_the_architecture_modules() -> None:
    architecture = {"errors", "protocol", "_accel", "memory", "virtqueue", "device", "blk",
                    "net", "rng", "console", "session", "frontend", "loop", "server",
                    "lguest_bridge", "cli", "__main__"}
    assert architecture <= set(ALLOWED)


def test_every_module_is_in_the_table() -> None:
    assert present_modules(), f"no modules found in {SRC}"
    assert sorted(present_modules() - set(ALLOWED)) == []


def test_every_table_entry_is_a_module() -> None:
    """No planned or removed modules linger in the table (the compiled `_native` has no .py)."""
    assert sorted(set(ALLOWED) - present_modules() - {"_native"}) == []
    assert SANS_IO <= present_modules()


@pytest.mark.parametrize("module", sorted(set(ALLOWED) - {"_native"}))
def test_module_follows_its_layer(module: str) -> None:
    assert check_file(module_path(module), module) == []


@pytest.mark.parametrize("module", sorted(STDLIB_ONLY))
def test_guest_machinery_is_stdlib_only(module: str) -> None:
    """What ci/qemu runs from a checkout needs nothing installed (no pytest, no cffi);
    `zstandard` is used where installed (the `zstd` command otherwise)."""
    imported = stdlib_imports(module_path(module).read_text()) - {PACKAGE, "zstandard"}
    assert sorted(imported - sys.stdlib_module_names) == []


@pytest.mark.parametrize("module", sorted(SANS_IO))
def test_sans_io_modules_do_not_import_sockets(module: str) -> None:
    assert not stdlib_imports((SRC / f"{module}.py").read_text()) & {"socket", "selectors"}


def test_lower_layers_never_import_higher_ones() -> None:
    # The table itself must be acyclic along layers: spot-check the rules the map states.
    for module in ("errors", "protocol", "_accel"):
        assert ALLOWED[module] <= {"errors", "_native"}  # type: ignore[operator]
    for module in ("memory", "virtqueue", "virtqueue_cffi"):
        assert ALLOWED[module] <= LAYER0 | {"memory", "virtqueue", "virtqueue_cffi", "inflight",  # type: ignore[operator]
                                            "virtqueue_packed", "dirtylog", ROOT}
    for module in MODELS:
        assert not ALLOWED[module] & {"protocol", "session", "server", "loop", "frontend"}  # type: ignore[operator]
    assert not ALLOWED["session"] & {"loop", "server", "frontend"}  # type: ignore[operator]
    assert ALLOWED["frontend"] <= LAYER1 | {ROOT}  # type: ignore[operator]
    assert ALLOWED["loop"] == set()
    assert "session" not in ALLOWED["lguest_bridge"]  # type: ignore[operator]
    assert not ALLOWED["server"] & NEVER_IMPORTED  # type: ignore[operator]


# ------------------------------------------------------------------ the checker checks


KNOWN = set(ALLOWED)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import vhostpy.memory", {"memory"}),
        ("import vhostpy", {ROOT}),
        ("from vhostpy import protocol as p", {"protocol"}),
        ("from vhostpy import __version__", {ROOT}),
        ("from vhostpy import *", {ROOT}),
        ("from vhostpy.protocol import Request", {"protocol"}),
        ("from .errors import VhostError", {"errors"}),
        ("from . import memory, virtqueue", {"memory", "virtqueue"}),
        ("from ..elsewhere import x", {"..elsewhere"}),
        ("import os, vhostpy.loop as loop", {"loop"}),
        ("def f():\n    from vhostpy.server import Server\n", {"server"}),
        ("if TYPE_CHECKING:\n    from vhostpy.session import Session\n", {"session"}),
        ("import vhostpyx\nfrom vhostpy_other import y", set()),
        ("from vhostpy.testing.guest import boot_guest", {"testing.guest"}),
        ("import vhostpy.testing.qemu", {"testing.qemu"}),
        ("from vhostpy.testing import shell, GuestLauncher", {"testing.shell", "testing"}),
        ("from vhostpy.testing import plugin", {"testing.plugin"}),
    ],
)
def test_import_resolution(source: str, expected: set[str]) -> None:
    assert vhostpy_imports(source, KNOWN) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .errors import GuestError", {"testing.errors"}),
        ("from . import cpio", {"testing.cpio"}),
        ("from ..device import Device", {"device"}),
        ("from ...outside import x", {"..outside"}),
    ],
)
def test_import_resolution_inside_testing(source: str, expected: set[str]) -> None:
    assert vhostpy_imports(source, KNOWN, "testing") == expected


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("blk", "from vhostpy.session import Session"),
        ("blk", "from vhostpy import protocol as p"),
        ("blk", "from . import server"),
        ("net", "from vhostpy.loop import EventLoop"),
        ("rng", "import vhostpy.frontend"),
        ("memory", "from .virtqueue import Virtqueue"),
        ("virtqueue", "def f():\n    from vhostpy import device\n"),
        ("errors", "from vhostpy import memory"),
        ("protocol", "from vhostpy.memory import GuestMemory"),
        ("_accel", "from vhostpy.virtqueue import Virtqueue"),
        ("protocol", "import socket"),
        ("protocol", "from selectors import DefaultSelector"),
        ("session", "import selectors"),
        ("session", "from socket import socketpair"),
        ("session", "from vhostpy.loop import EventLoop"),
        ("session", "from vhostpy.server import Server"),
        ("device", "from vhostpy.blk import BlockDevice"),
        ("frontend", "from vhostpy.device import Device"),
        ("frontend", "from vhostpy.session import Session"),
        ("loop", "from vhostpy.errors import VhostError"),
        ("loop", "import vhostpy"),
        ("server", "from vhostpy.cli import main"),
        ("lguest_bridge", "import vhostpy.session"),
        ("netapp", "from vhostpy import cli"),
        ("packets", "from vhostpy.device import Device"),
        ("session", "from ..outside import thing"),
        ("brand_new_module", "import os"),
        ("testing.errors", "from vhostpy.testing.guest import RunningGuest"),
        ("testing.kernel", "from vhostpy.device import Device"),
        ("testing.qemu", "from ..api import Server"),
        ("testing.initramfs", "from . import launcher"),
        ("testing.plugin", "from vhostpy import cli"),
        ("testing.new_module", "import os"),
    ],
)
def test_checker_catches_broken_rules(module: str, source: str) -> None:
    assert violations(module, source, KNOWN) != []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("blk", "from vhostpy.device import Device\nfrom .errors import VhostError"),
        ("net", "from vhostpy.packets import frame_bytes"),
        ("session", "from vhostpy import protocol as p\nfrom vhostpy.device import Device"),
        ("server", "import socket\nfrom vhostpy.session import Session"),
        ("lguest_bridge", "from vhostpy.frontend import Frontend"),
        ("cli", "from vhostpy.server import Server\nfrom vhostpy import __version__"),
        ("__main__", "from vhostpy.cli import main"),
        ("netapp", "from vhostpy.server import Server"),
        ("virtqueue", "from .memory import GuestMemory"),
        ("protocol", "from vhostpy.errors import ProtocolError\nimport struct"),
        ("testing.kernel", "from .errors import GuestImageError"),
        ("testing.launcher", "from ..device import Device\nfrom .shell import GuestShell"),
        ("testing.backends", "from vhostpy.api import Server"),
    ],
)
def test_checker_accepts_allowed_imports(module: str, source: str) -> None:
    assert violations(module, source, KNOWN) == []


@pytest.mark.parametrize(
    ("module", "injected"),
    [
        ("blk", "from vhostpy.session import Session\n"),
        ("session", "import socket\n"),
        ("protocol", "from vhostpy import memory\n"),
        ("memory", "from .device import Device\n"),
    ],
)
def test_injected_import_in_a_copy_fails(tmp_path: Path, module: str, injected: str) -> None:
    original = SRC / f"{module}.py"
    copy = tmp_path / original.name
    shutil.copy(original, copy)
    assert check_file(copy) == []
    copy.write_text(copy.read_text() + "\n\ndef _late():\n    " + injected)
    assert check_file(copy) != []
