"""Starting the Network: settings, its store, ``serve_network`` and ``running_network``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import attrs

from resultity_servers._http import HTTPServer, ServerConfig

from ._app import NetworkApp
from ._app_releases import attach_releases
from ._coordinator import Coordinator
from ._memory import MemoryStore
from ._releases import ReleaseDesk
from ._settings import CoordinatorSettings
from ._sqlite import SQLiteStore
from ._store import Store

__all__ = ["DB_FILE", "NetworkSettings", "open_store", "running_network", "serve_network"]

DB_FILE = "network.db"
RELEASES_DIR = "releases"


@attrs.frozen
class NetworkSettings:
    """Where the Network listens, where it keeps its state and how it behaves.

    ``data_dir`` holds ``network.db`` (SQLite, WAL); None keeps everything in memory (lost on
    exit). ``service_token`` authenticates the Cloud and operators; it must not be empty.
    ``sqlite_synchronous`` is ``NORMAL`` (survives a process crash) or ``FULL`` (also power
    loss). ``coordinator`` holds the timeouts, retry and fee rules.
    """

    host: str = "127.0.0.1"
    port: int = 8100
    data_dir: str | None = None
    service_token: str = ""
    coordinator: CoordinatorSettings = attrs.field(factory=CoordinatorSettings)
    sqlite_synchronous: str = "NORMAL"
    max_lease_wait_s: float = 20.0
    tick_interval_s: float = 0.5
    max_body_bytes: int = 8 << 20
    max_connections: int = 1000

    def server_config(self) -> ServerConfig:
        """Return the HTTP server configuration for these settings."""
        return ServerConfig(host=self.host, port=self.port, max_body_bytes=self.max_body_bytes,
                            max_connections=self.max_connections)


def open_store(settings: NetworkSettings) -> Store:
    """Return the store for ``settings``: SQLite in ``data_dir``, else in memory.

    Raises OSError when the directory cannot be created and sqlite3.DatabaseError for a file
    that is not a database.
    """
    if settings.data_dir is None:
        return MemoryStore()
    return SQLiteStore(os.path.join(settings.data_dir, DB_FILE),
                       synchronous=settings.sqlite_synchronous)


def _app(settings: NetworkSettings, coordinator: Coordinator) -> NetworkApp:
    app = NetworkApp(coordinator, service_token=settings.service_token,
                     max_lease_wait_s=settings.max_lease_wait_s,
                     tick_interval_s=settings.tick_interval_s)
    releases = (os.path.join(settings.data_dir, RELEASES_DIR)
                if settings.data_dir is not None else None)
    desk = ReleaseDesk(releases, coordinator.settings.trust_root)
    if desk.root is not None and desk.root != coordinator.settings.trust_root:
        coordinator.settings = attrs.evolve(coordinator.settings, trust_root=desk.root)
    attach_releases(app, desk)
    return app


async def serve_network(
    settings: NetworkSettings,
    *,
    coordinator: Coordinator | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Network until cancelled; ``task_status.started(port)`` once listening.

    Uses ``coordinator`` if given (its store is left open), else opens the store of
    ``settings`` and closes it on exit. Raises ValueError for an empty service token and
    OSError if the address cannot be bound.
    """
    async with running_network(settings, coordinator=coordinator) as running:
        server = running[0]
        task_status.started(server.port)
        await anyio.sleep_forever()


@asynccontextmanager
async def running_network(
    settings: NetworkSettings, *, coordinator: Coordinator | None = None
) -> AsyncIterator[tuple[HTTPServer, NetworkApp]]:
    """Run the Network in the background for an ``async with`` body; shut down on exit.

    Yields the server (``server.url``, ``server.port``) and the app (``app.coordinator``).
    """
    own = coordinator is None
    if coordinator is None:
        coordinator = Coordinator(open_store(settings), settings.coordinator)
    try:
        app = _app(settings, coordinator)
        server = HTTPServer(app, settings.server_config())
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            tg.start_soon(app.run_ticker)
            try:
                yield server, app
            finally:
                # Shielded: even when cancelled (Ctrl-C), in-flight job streams get
                # ``shutdown_timeout_s`` to finish; lease long polls answer at once.
                app.begin_shutdown()
                with anyio.CancelScope(shield=True):
                    await server.shutdown()
                tg.cancel_scope.cancel()
    finally:
        if own:
            coordinator.store.close()
