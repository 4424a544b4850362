"""Fixtures shared by the servers tests."""

from __future__ import annotations

import gc
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


@pytest.fixture(autouse=True)
def _collect_garbage_after_the_test() -> Iterator[None]:
    """Collect garbage at the end of every servers test, so that an object a test leaks
    (a Runtime child's process or pipe transport, a socket) warns in that test's teardown,
    naming it, instead of in whichever later test the collector happens to run."""
    yield
    gc.collect()
