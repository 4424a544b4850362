"""Fixtures shared by the servers tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from resultity_servers.network import MemoryStore, SQLiteStore, Store


@pytest.fixture
def anyio_backend() -> str:
    """The servers run on asyncio (anyio's asyncio backend; trio is not a target)."""
    return "asyncio"


@pytest.fixture(params=["memory", "sqlite"])
def network_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh Network store, once per backend (MemoryStore and SQLiteStore in tmp_path)."""
    store: Store = MemoryStore() if request.param == "memory" else SQLiteStore(
        tmp_path / "network.db")
    try:
        yield store
    finally:
        store.close()
