"""Packaging facts a user relies on, read the way setuptools and the tools read them.

One version (`vhostpy.__version__`, which pyproject reads dynamically), an MIT LICENSE file,
Linux declared, the `scapy` extra, and one Python floor that pyproject, mypy, ruff and the
interpreter running the tests agree on.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import vhostpy

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def raw_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())
    return config


def setuptools_config() -> dict[str, Any]:
    """pyproject.toml as setuptools builds the package from it (dynamic fields expanded)."""
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "[tool.setuptools] is still beta" on older setuptools
        config: dict[str, Any] = read_configuration(str(PYPROJECT), expand=True)
    return config


def test_one_version_source() -> None:
    project = raw_config()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert setuptools_config()["project"]["version"] == vhostpy.__version__
    assert "version=" not in (ROOT / "setup.py").read_text()


def test_license_file_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the vhostpy authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert raw_config()["project"]["license"] == {"text": "MIT"}


def test_linux_only_is_declared() -> None:
    assert "Operating System :: POSIX :: Linux" in setuptools_config()["project"]["classifiers"]


def test_scapy_extra() -> None:
    extras = setuptools_config()["project"]["optional-dependencies"]
    (scapy,) = extras["scapy"]
    assert scapy.startswith("scapy")
    assert scapy in extras["test"]          # the tests exercise what the extra installs


def test_python_floor_agrees_everywhere() -> None:
    config = raw_config()
    floor = config["project"]["requires-python"]
    assert floor.startswith(">=")
    major, minor = (int(x) for x in floor[2:].split("."))
    assert config["tool"]["mypy"]["python_version"] == f"{major}.{minor}"
    assert config["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert f"Programming Language :: Python :: {major}.{minor}" in \
        config["project"]["classifiers"]
    assert sys.version_info[:2] >= (major, minor)
