"""Fixtures shared by the runtime tests: a tiny generated model directory, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from resultity_runtime._presets import init_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a `tiny` preset model directory (seed 0), written once per test session.

    Treat it as read-only: copy it first if a test needs to change files.
    """
    return init_model_dir(tmp_path_factory.mktemp("tiny_model") / "tiny", "tiny", seed=0)
