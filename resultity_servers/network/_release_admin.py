"""Operator calls for releases: upload artifacts, publish a Release, publish root N+1.

Functions over a ``NetworkAdminClient`` (its service token and error handling); each raises
``AdminRequestError`` when the Network refuses and the HTTP layer's errors when it is
unreachable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resultity_core import Envelope

from ._admin import NetworkAdminClient
from ._http_util import PREFIX
from ._releases import artifact_address

__all__ = ["node_update_statuses", "publish_release", "publish_root", "upload_artifact"]


def _payload(envelope: Envelope | Mapping[str, Any]) -> dict[str, Any]:
    return envelope.to_payload() if isinstance(envelope, Envelope) else dict(envelope)


async def upload_artifact(client: NetworkAdminClient, data: bytes) -> str:
    """Store ``data`` on the Network; returns its ``sha256:`` address."""
    address = artifact_address(data)
    response = await client.http.request(
        "PUT", f"{PREFIX}/artifacts/{address}", content=data,
        headers={"content-type": "application/octet-stream"})
    return str(client._ok(response)["sha256"])


async def publish_release(client: NetworkAdminClient,
                          envelope: Envelope | Mapping[str, Any]) -> tuple[str, int]:
    """Make a signed Release current; returns ``(release_hash, version)``."""
    response = await client.http.request("POST", f"{PREFIX}/releases",
                                         json=_payload(envelope))
    body = client._ok(response)
    return str(body["release_hash"]), int(body["version"])


async def publish_root(client: NetworkAdminClient,
                       envelope: Envelope | Mapping[str, Any]) -> int:
    """Publish root N+1 (signed by the old and the new root keys); returns its version."""
    response = await client.http.request("POST", f"{PREFIX}/roots", json=_payload(envelope))
    return int(client._ok(response)["version"])


async def node_update_statuses(client: NetworkAdminClient) -> list[dict[str, Any]]:
    """Return each node's last update report (``node_id``, ``version``, ``update_status``)."""
    response = await client.http.request("GET", f"{PREFIX}/releases/nodes")
    return list(client._ok(response)["data"])
