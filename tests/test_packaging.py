"""The installed package set matches the source tree, and the public surface imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_PACKAGES = ["resultity_core", "resultity_runtime", "resultity_kernels", "resultity_servers"]


def _declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"])


def _source_packages() -> set[str]:
    found = set()
    for top in ("resultity_core", "resultity_runtime", "resultity_servers"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in (ROOT / "kernels").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "kernels").parts
        found.add(".".join(("resultity_kernels", *rel)))
    return found


def test_every_source_package_is_declared_for_install() -> None:
    # a package missing from the explicit list is silently left out of the wheel
    assert _source_packages() == _declared_packages()


@pytest.mark.parametrize("name", PUBLIC_PACKAGES)
def test_public_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    missing = [attr for attr in exported if not hasattr(module, attr)]
    assert missing == []


@pytest.mark.parametrize(
    "name",
    [
        "resultity_core",
        "resultity_servers.cloud",
        "resultity_servers.network",
        "resultity_servers.cli",
    ],
)
def test_coordinating_processes_never_import_torch(name: str) -> None:
    code = f"import sys, {name}; sys.exit('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr or f"{name} imported torch"
