"""The code stays ruff- and mypy-clean: the project's own checks, run as tests.

The linters are pinned in the `test` extra so a new release cannot fail the suite with
rules nobody chose. Without them installed the test skips locally and fails under CI.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools import unavailable

ROOT = Path(__file__).resolve().parent.parent


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        unavailable(f"{module} is not installed (pip install -e '.[test]')")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff_clean() -> None:
    _require("ruff")
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    _require("mypy")
    result = _run("mypy", "--no-incremental", "vhostpy")
    assert result.returncode == 0, result.stdout + result.stderr
