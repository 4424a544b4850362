"""Starting the Cloud: ``CloudSettings``, ``serve_cloud`` and ``running_cloud``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import attrs

from resultity_servers._http import HTTPServer, ServerConfig

from ._app import CloudApp
from ._http_network import HTTPNetworkClient
from ._network import NetworkClient

__all__ = ["CloudSettings", "running_cloud", "serve_cloud"]


@attrs.frozen
class CloudSettings:
    """Where the Cloud listens and how it reaches the Network.

    ``service_token`` authenticates the Cloud to the Network's internal routes.
    ``auth_cache_ttl_s`` is how long a valid API key is remembered (0: ask every time).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    network_url: str = "http://127.0.0.1:8100"
    service_token: str = ""
    max_body_bytes: int = 4 << 20
    max_connections: int = 1000
    auth_cache_ttl_s: float = 30.0
    network_timeout_s: float = 30.0

    def server_config(self) -> ServerConfig:
        """Return the HTTP server configuration for these settings."""
        return ServerConfig(
            host=self.host,
            port=self.port,
            max_body_bytes=self.max_body_bytes,
            max_connections=self.max_connections,
        )


def _network(settings: CloudSettings, network: NetworkClient | None) -> NetworkClient:
    if network is not None:
        return network
    return HTTPNetworkClient(
        settings.network_url, settings.service_token, timeout_s=settings.network_timeout_s
    )


async def serve_cloud(
    settings: CloudSettings,
    *,
    network: NetworkClient | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Cloud until cancelled; ``task_status.started(port)`` once listening.

    Uses ``network`` if given (tests, demos), else an ``HTTPNetworkClient`` for
    ``settings.network_url``, which is closed on exit. Raises OSError if the address cannot
    be bound.
    """
    client = _network(settings, network)
    app = CloudApp(client, auth_ttl_s=settings.auth_cache_ttl_s)
    server = HTTPServer(app, settings.server_config())
    try:
        await server.serve(task_status=task_status)
    finally:
        if network is None:
            with anyio.CancelScope(shield=True):
                await client.aclose()


@asynccontextmanager
async def running_cloud(
    settings: CloudSettings, network: NetworkClient | None = None
) -> AsyncIterator[tuple[HTTPServer, CloudApp]]:
    """Run the Cloud in the background for an ``async with`` body; shut down gracefully on exit.

    Yields the server (``server.url``, ``server.port``) and the app (``app.metrics``).
    """
    client = _network(settings, network)
    app = CloudApp(client, auth_ttl_s=settings.auth_cache_ttl_s)
    server = HTTPServer(app, settings.server_config())
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            try:
                yield server, app
            finally:
                await server.shutdown()
    finally:
        if network is None:
            with anyio.CancelScope(shield=True):
                await client.aclose()
