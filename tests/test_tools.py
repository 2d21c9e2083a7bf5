"""The suite's own rules (tests/tools.py): a missing prerequisite fails under CI and skips
elsewhere; waiting gives up at its deadline."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools import find_tool, require_tool, unavailable, under_ci, wait_until

MISSING = "vhostpy-no-such-tool-7f3a"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_ci_true_and_missing_tool_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert under_ci()
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} not found \\(apt install it\\)"):
        require_tool(MISSING, "apt install it")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_missing_tool_skips(monkeypatch: pytest.MonkeyPatch, value: str | None
                                       ) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not under_ci()
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} not found \\(the hint\\)"):
        require_tool(MISSING, "the hint")


def test_present_tool_returns_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    path = require_tool("sh", "always there")
    assert os.path.isabs(path) and os.access(path, os.X_OK)


def test_sbin_tools_are_found_off_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """e2fsck & co. live in /usr/sbin, which a non-root PATH may lack."""
    tool = tmp_path / "vhostpy-sbin-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr("tools.SBIN_DIRS", (str(tmp_path),))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_tool(tool.name) == str(tool)
    assert find_tool("sh") is None            # not on PATH, not in the sbin dirs given
    tool.chmod(0o644)                         # a file that is not executable is no tool
    assert find_tool(tool.name) is None


def test_unavailable_is_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception,
                       match=r"^DPDK is gone \(CI=true: a missing prerequisite fails"):
        unavailable("DPDK is gone")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="DPDK is gone"):
        unavailable("DPDK is gone")


def test_outcome_in_a_real_pytest_run(tmp_path: Path) -> None:
    """End to end: pytest reports the test failed under CI=true and skipped without CI."""
    test = tmp_path / "test_needs_tool.py"
    test.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from tools import require_tool

        def test_it():
            require_tool({MISSING!r}, "apt install it")
    """))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    outcomes = {}
    for ci in (None, "true"):
        run_env = env if ci is None else {**env, "CI": ci}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                            str(test)], cwd=tmp_path, env=run_env, capture_output=True,
                           text=True, timeout=120, check=False)
        outcomes[ci] = (r.returncode, r.stdout)
    code, out = outcomes[None]
    assert code == 0 and "1 skipped" in out and f"{MISSING} not found" in out, out
    code, out = outcomes["true"]
    assert code == 1 and "1 failed" in out and f"{MISSING} not found" in out, out


def test_wait_until_returns_the_value_and_times_out() -> None:
    start = time.monotonic()
    assert wait_until(lambda: time.monotonic() - start > 0.05 and "done", 5, "a clock") == "done"
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        wait_until(lambda: 0, 0.05, "nothing")
    assert time.monotonic() - start < 5
