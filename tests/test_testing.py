"""vhostpy.testing, the pytest plugin, the way a user gets it.

Without QEMU: the ``pytest11`` entry point, what loading the plugin costs, the public names,
fixture names that do not clash with this suite's, the cache directory, one-line errors for
what the host lacks (a failure, or a skip where the test asks), the launcher's own errors and
its clean-up after a failing test, the command channel of the guest shell against a scripted
guest, and the README's example and workflow (verbatim, and a valid GitHub workflow).
With QEMU (one boot): the README's example test file, run by pytest in a directory of its
own with no conftest, exactly as a user runs it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from qemu_guest import require_qemu
from tools import boots_once_per_suite, unavailable

import vhostpy.testing
from vhostpy.console import ConsoleDevice
from vhostpy.errors import ConfigurationError
from vhostpy.testing import GuestError, GuestImage, GuestImageError, GuestLauncher
from vhostpy.testing.initramfs import default_cache_dir
from vhostpy.testing.kernel import KernelInfo
from vhostpy.testing.qemu import VhostUserDevice, find_qemu, qemu_command
from vhostpy.testing.shell import READY, GuestShell

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_guest_plugin.py"
WORKFLOW = ROOT / "examples" / "github-workflow.yml"
PLUGIN = ROOT / "vhostpy" / "testing" / "plugin.py"
#: What `import vhostpy.testing.plugin` may load of vhostpy (the package itself, and what
#: `import vhostpy` loads: the implementation choice and the compiled extension).
LIGHT = {"vhostpy", "vhostpy._accel", "vhostpy._native", "vhostpy._native.lib",
         "vhostpy.errors", "vhostpy.testing", "vhostpy.testing.plugin"}


def user_pytest(directory: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """pytest run in ``directory`` (its own rootdir, no conftest above it) by this Python,
    with the plugin found the way an installed vhostpy offers it."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
                            "PYTHONPATH")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
         f"--basetemp={directory / 'basetemp'}", *args],
        cwd=directory, env=environ, capture_output=True, text=True, timeout=timeout,
        check=False)


def fixture_names(path: Path) -> set[str]:
    """Names of the functions decorated with ``pytest.fixture`` in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if ast.unparse(target) in ("pytest.fixture", "fixture"):
                    names.add(node.name)
    return names


# ------------------------------------------------------------------ the plugin as installed


def test_entry_point_names_the_plugin() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["entry-points"]["pytest11"] == {"vhostpy": "vhostpy.testing.plugin"}
    installed = {ep.name: ep.value
                 for ep in importlib.metadata.entry_points(group="pytest11")}
    assert installed.get("vhostpy") == "vhostpy.testing.plugin", \
        "the installed metadata is stale: reinstall (ci/install.sh)"
    assert "vhostpy.testing" in config["tool"]["setuptools"]["packages"]


def test_loading_the_plugin_imports_nothing_more() -> None:
    code = ("import sys, vhostpy.testing.plugin\n"
            "print(' '.join(m for m in sys.modules if m.startswith('vhostpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "vhostpy.testing.plugin" in out
    assert sorted(set(out) - LIGHT) == []
    decorators = [dec for node in ast.walk(ast.parse(PLUGIN.read_text()))
                  if isinstance(node, ast.FunctionDef) for dec in node.decorator_list]
    assert len(decorators) == 2
    assert [kw.arg for dec in decorators if isinstance(dec, ast.Call)
            for kw in dec.keywords] == ["scope"]            # no autouse fixture


def test_public_names_resolve() -> None:
    assert sorted(vhostpy.testing.__all__) == sorted(vhostpy.testing._EXPORTS)
    for name in vhostpy.testing.__all__:
        assert getattr(vhostpy.testing, name).__name__ == name
    with pytest.raises(AttributeError):
        vhostpy.testing.no_such_name  # noqa: B018


def test_plugin_fixtures_do_not_clash_with_this_suites() -> None:
    plugin = fixture_names(PLUGIN)
    assert plugin == {"vhostpy_guest", "vhostpy_guest_image"}
    ours = set().union(*(fixture_names(p) for p in (ROOT / "tests").glob("*.py")))
    assert ours, "no fixtures found in tests/"
    assert sorted(plugin & ours) == []


def test_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VHOSTPY_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "qemu"
    monkeypatch.delenv("VHOSTPY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "vhostpy" / "qemu"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")   # the XDG spec says: ignore it
    assert default_cache_dir() == Path.home() / ".cache" / "vhostpy" / "qemu"


def test_missing_qemu_is_one_line_naming_the_package(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("VHOSTPY_QEMU", str(tmp_path / "no-qemu"))
    with pytest.raises(GuestImageError) as info:
        find_qemu()
    assert "\n" not in str(info.value)
    assert "apt-get install qemu-system-x86" in str(info.value)


def test_missing_prerequisite_fails_unless_the_test_asks_to_skip(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(
        "import pytest\n\n"
        "def test_plain(vhostpy_guest):\n    pass\n\n"
        "@pytest.mark.vhostpy_skip_missing\n"
        "def test_marked(vhostpy_guest):\n    pass\n")
    missing = {"VHOSTPY_QEMU": str(tmp_path / "no-qemu")}
    run = user_pytest(tmp_path, "--strict-markers", env=missing)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert re.search(r"\b1 skipped, 1 error\b", out), out    # a fixture's failure: an error
    line = ("vhostpy.testing: this host cannot boot test guests: qemu-system-x86_64 not "
            "found: apt-get install qemu-system-x86 (or set VHOSTPY_QEMU)")
    assert re.search(rf"ERROR at setup of test_plain _+\n{re.escape(line)}\n", out), out
    assert re.search(rf"SKIPPED \[1\] test_user.py:\d+: {re.escape(line)}", out), out
    assert "Traceback" not in out and "During handling" not in out, out
    # The fixtures come from the entry point: without it, pytest does not know them.
    run = user_pytest(tmp_path, "-p", "no:vhostpy", env=missing)
    assert "fixture 'vhostpy_guest' not found" in run.stdout, run.stdout + run.stderr


def test_fixture_cleans_up_after_a_failing_test(tmp_path: Path) -> None:
    require_qemu()   # the fixture needs the guest image, though this test boots no guest
    record = tmp_path / "record.txt"
    (tmp_path / "test_user.py").write_text(f'''
import os
from vhostpy.rng import RngDevice

def test_fails(vhostpy_guest):
    served = vhostpy_guest.serve(RngDevice())
    proc = vhostpy_guest.backend("rng")
    with open({str(record)!r}, "w") as f:
        f.write(f"{{proc.proc.pid}} {{served.socket_path}} {{proc.socket_path}}")
    assert os.path.exists(served.socket_path) and os.path.exists(proc.socket_path)
    assert False, "the test fails; its devices must go all the same"
''')
    run = user_pytest(tmp_path)
    out = run.stdout + run.stderr
    assert re.search(r"\b1 failed\b", out) and "the test fails" in out, out
    pid, *sockets = record.read_text().split()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)                       # the back-end process was stopped
    for path in sockets:
        assert not os.path.exists(path), path
    assert not os.path.exists(os.path.dirname(sockets[0]))


# ------------------------------------------------------------------ launcher and shell


def fake_image(tmp_path: Path) -> GuestImage:
    """An image no guest can boot from: for what a launcher does before booting."""
    kernel = KernelInfo("0", tmp_path / "vmlinuz", tmp_path)
    return GuestImage("qemu-system-x86_64", kernel, tmp_path / "initrd", "tcg")


def test_launcher_refuses_what_it_cannot_attach(tmp_path: Path) -> None:
    launcher = GuestLauncher(fake_image(tmp_path), tmp_path)
    try:
        with pytest.raises(ConfigurationError, match="virtio device id 3"):
            launcher.start(ConsoleDevice())
        with pytest.raises(ConfigurationError, match="give kind="):
            launcher.backend("serve", "examples.rng_device:make_device")
        with pytest.raises(ConfigurationError, match="not a guest device"):
            launcher.start("/some/socket")   # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=r"(?s)exited with 1 .*no-such\.img"):
            launcher.backend("blk", "--image", str(tmp_path / "no-such.img"))
        served = launcher.serve(ConsoleDevice(), kind="vhost-user-device-pci",
                                properties={"virtio-id": 3})
        assert served.guest_devices == [VhostUserDevice(
            served.socket_path, "vhost-user-device-pci", {"virtio-id": 3})]
        assert os.path.exists(served.socket_path)
    finally:
        launcher.close()
    assert not launcher.socket_dir.exists()
    assert (tmp_path / "blk0.log").read_text()   # the failed back-end's output is kept


def test_launcher_backend_with_two_ports(tmp_path: Path) -> None:
    launcher = GuestLauncher(fake_image(tmp_path), tmp_path)
    try:
        net = launcher.backend("net", "--no-respond", ports=2,
                               properties={"host_mtu": 9000})
        assert [d.kind for d in net.guest_devices] == ["net", "net"]
        assert all(os.path.exists(d.socket_path) for d in net.guest_devices)
        assert net.guest_devices[1].properties == {"host_mtu": 9000}
        assert net.alive() and net.stop() == 0, net.output()
        with pytest.raises(ConfigurationError, match="at least 1"):
            launcher.backend("net", ports=0)
    finally:
        launcher.close()


def test_qemu_command_for_every_kind(tmp_path: Path) -> None:
    argv = qemu_command(
        kernel=Path("/k"), initrd=Path("/i"), console_path=tmp_path / "c", accel="tcg",
        blk_sockets=["/b0"], devices=[
            VhostUserDevice("/r0", "rng", {"vectors": 2}),
            VhostUserDevice("/n0", "net", {"host_mtu": 9000}, {"queues": 2}),
            VhostUserDevice("/b1", "blk", {"num-queues": 2}),
            VhostUserDevice("/f0", "vhost-user-fs-pci", {"tag": "t"}),
        ], blk_options={"serial": "S"}, qemu="q")
    pairs = [f"{a} {b}" for a, b in itertools.pairwise(argv)
             if a in ("-chardev", "-device", "-netdev")]
    assert pairs == [
        "-chardev socket,id=blk0,path=/b0",
        "-device vhost-user-blk-pci,chardev=blk0,num-queues=1,serial=S",
        "-chardev socket,id=rng0,path=/r0",
        "-device vhost-user-rng-pci,chardev=rng0,vectors=2",
        "-chardev socket,id=net0,path=/n0",
        "-netdev vhost-user,id=hn0,chardev=net0,queues=2",
        "-device virtio-net-pci,netdev=hn0,mac=52:54:00:12:34:50,vectors=0,host_mtu=9000",
        "-chardev socket,id=blk1,path=/b1",
        "-device vhost-user-blk-pci,chardev=blk1,num-queues=2,serial=S",
        "-chardev socket,id=vu0,path=/f0",
        "-device vhost-user-fs-pci,chardev=vu0,tag=t",
    ]
    assert argv[-2:] == ["-device", "vhost-user-fs-pci,chardev=vu0,tag=t"]


class ScriptedGuest:
    """Stands for a RunningGuest whose QEMU runs as long as `running` says."""

    def __init__(self) -> None:
        self.running = True

    def is_running(self) -> bool:
        return self.running

    def failure(self, what: str) -> GuestError:
        return GuestError(what, "console", "qemu log")

    def console_so_far(self) -> str:
        return "console"

    def qemu_log(self) -> str:
        return "qemu log"


def test_shell_channel_against_a_scripted_guest(tmp_path: Path) -> None:
    shell = GuestShell(tmp_path / "shell.sock")
    assert shell.qemu_args()[-2:] == ["-serial", "chardev:vhostpy-shell"]
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(tmp_path / "shell.sock"))
    received: list[bytes] = []

    def guest_side() -> None:
        peer.sendall(b"boot noise\n" + READY)
        data = b""
        while b"\n" not in data:
            data += peer.recv(100)
        header, body = data.split(b"\n", 1)
        size = int(header.split()[1])
        while len(body) < size:
            body += peer.recv(100)
        received.append(header + b"\n" + body)
        output = bytes(range(256)) * 3
        answer = b"VHOSTPY-SHELL-DONE 3 %d\n" % len(output) + output
        for i in range(0, len(answer), 97):          # in pieces, as a UART delivers
            peer.sendall(answer[i:i + 97])
        peer.close()                                  # then the guest goes away

    thread = threading.Thread(target=guest_side)
    thread.start()
    guest = ScriptedGuest()
    try:
        shell.connect(guest, timeout=10)  # type: ignore[arg-type]
        result = shell.run("printf x; exit 3", timeout=10)
        thread.join()
        assert received == [b"run 17\nprintf x; exit 3\n"]
        assert result.exit_code == 3 and result.output_bytes == bytes(range(256)) * 3
        with pytest.raises(GuestError, match="guest shell") as info:  # EPIPE or EOF
            shell.run("true", timeout=10)
        assert info.value.console == "console"
    finally:
        shell.close()
    assert not (tmp_path / "shell.sock").exists()


def test_shell_times_out_and_notices_qemu_exiting(tmp_path: Path) -> None:
    shell = GuestShell(tmp_path / "shell.sock")
    guest = ScriptedGuest()
    try:
        with pytest.raises(GuestError, match="timed out waiting for QEMU's connection"):
            shell.connect(guest, timeout=0.3)  # type: ignore[arg-type]
        guest.running = False
        with pytest.raises(GuestError, match="QEMU exited"):
            shell.connect(guest, timeout=10)  # type: ignore[arg-type]
    finally:
        shell.close()


# ------------------------------------------------------------------ the README's example


def readme_blocks(language: str, heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split(f"```{language}\n")[1:]]
    return [b for b in blocks if b.startswith(heading)]


def test_readme_shows_the_example_and_workflow_as_they_are() -> None:
    (test_file,) = readme_blocks("python", '"""Testing guest software')
    assert test_file == EXAMPLE.read_text()
    (workflow,) = readme_blocks("yaml", "# A project's guest tests on GitHub Actions")
    assert workflow == WORKFLOW.read_text()


def test_workflow_is_a_valid_github_workflow() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    if not tool.exists():
        tool_path = shutil.which("check-jsonschema")
        if tool_path is None:
            unavailable("check-jsonschema not installed (pip install -e '.[test]')")
        tool = Path(tool_path)
    run = subprocess.run([str(tool), "--builtin-schema", "vendor.github-workflows",
                          str(WORKFLOW)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok -- validation done" in run.stdout


@pytest.mark.qemu
def test_readme_example_passes_as_a_user_runs_it(tmp_path: Path) -> None:
    """The README's test file, alone in a directory, found and run by pytest with the plugin
    from vhostpy's entry point: it boots a guest with a Python device and a `vhostpy blk`."""
    require_qemu()
    boots_once_per_suite("the pytest plugin")
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    run = user_pytest(tmp_path, "-v", EXAMPLE.name)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert re.search(r"^=+ 1 passed in [\d.]+s", out, re.MULTILINE), out
    assert "PASSED test_guest_plugin.py::test_guest_sees_our_devices" in out, out
