"""How the Agent talks to the Network: the ``NetworkTransport`` interface and its HTTP form.

The Agent only dials out. Every call is one request/answer; ``lease`` is a long poll. After
``complete_registration`` the transport keeps the session token and sends it with every later
call; a call the Network refuses because the session is gone raises ``SessionLostError`` (the
Agent registers again). Failures to reach the Network raise ``TransportError``.

HTTP routes (``NODE_ROUTES``), JSON bodies in the core's wire forms, the session as
``Authorization: Bearer <token>``:

- ``POST /network/v1/nodes/register`` RegisterRequest -> Challenge
- ``POST /network/v1/nodes/challenge`` ChallengeResponse -> ``{"node_id", "token", ...}``
- ``POST /network/v1/nodes/heartbeat`` Heartbeat -> ``{"state", "config_hash", "cancel"}``
- ``GET  /network/v1/snapshots/{config_hash}`` -> the signed NodeConfig envelope
- ``POST /network/v1/nodes/lease`` LeaseRequest -> LeaseBatch (long poll)
- ``POST /network/v1/nodes/events`` ``{"events": [JobEvent, ...]}`` -> ``{"cancel": [...]}``
- ``POST /network/v1/nodes/receipts`` ReceiptSubmit -> the receipt outcome (JSON object)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs

from resultity_core import (
    Challenge,
    ChallengeResponse,
    Heartbeat,
    JobEvent,
    LeaseBatch,
    LeaseRequest,
    ReceiptSubmit,
    RegisterRequest,
    ResultityError,
)
from resultity_servers._http import HTTPClient, HTTPClientError

from ._errors import NodeError, RegistrationError

__all__ = [
    "NODE_ROUTES",
    "HTTPNetworkTransport",
    "HeartbeatAnswer",
    "NetworkTransport",
    "ReleaseTransport",
    "SessionLostError",
    "TransportError",
]

_T = TypeVar("_T")

NODE_ROUTES: Mapping[str, str] = {
    "register": "/network/v1/nodes/register",
    "challenge": "/network/v1/nodes/challenge",
    "heartbeat": "/network/v1/nodes/heartbeat",
    "snapshot": "/network/v1/snapshots/{config_hash}",
    "lease": "/network/v1/nodes/lease",
    "events": "/network/v1/nodes/events",
    "receipts": "/network/v1/nodes/receipts",
    "release": "/network/v1/nodes/release",
    "artifact": "/network/v1/nodes/artifacts/{address}",
}


class TransportError(NodeError):
    """The Network could not be reached or answered with an unexpected status or body.

    ``retryable`` is True when sending the same request again may succeed (no connection,
    timeout, a 5xx answer) and False when the Network refused it (a 4xx answer).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class SessionLostError(TransportError):
    """The Network no longer knows this node's session (expired, or the node was marked dead)."""


@attrs.frozen
class HeartbeatAnswer:
    """The Network's answer to a heartbeat: the node's state as it sees it, the current
    config pointer (``node_config_hash`` or None) and the jobs the node must abort."""

    state: str
    config_hash: str | None
    cancel: tuple[str, ...] = ()


class NetworkTransport(Protocol):
    """What the Agent needs from the Network (one implementation per way of reaching it)."""

    async def register(self, request: RegisterRequest) -> Challenge:
        """Offer the grant and key; return the challenge. Raises RegistrationError."""
        ...

    async def complete_registration(self, response: ChallengeResponse) -> str:
        """Answer the challenge; return the admitted node id. Raises RegistrationError."""
        ...

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatAnswer:
        """Report liveness and load; return the Network's answer."""
        ...

    async def fetch_snapshot(self, config_hash: str) -> dict[str, Any]:
        """Return the signed NodeConfig envelope (JSON form) published under the hash."""
        ...

    async def lease(self, request: LeaseRequest) -> LeaseBatch:
        """Long poll for jobs; return the batch (empty when the wait ran out)."""
        ...

    async def post_events(self, events: Sequence[JobEvent]) -> tuple[str, ...]:
        """Send job events in order; return job ids the node must abort."""
        ...

    async def submit_receipt(self, submit: ReceiptSubmit) -> dict[str, Any]:
        """Send a signed receipt; return the Network's outcome."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class HTTPNetworkTransport:
    """``NetworkTransport`` over HTTP (``NODE_ROUTES``) with the shared httpcore client."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0) -> None:
        self.http = HTTPClient(base_url, timeout_s=timeout_s, max_connections=16)
        self.timeout_s = timeout_s
        self.token: str | None = None

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self.http.aclose()

    async def _call(self, method: str, route: str, payload: Any = None, *,
                    timeout_s: float | None = None, query: str = "", raw: bool = False,
                    **params: str) -> Any:
        path = NODE_ROUTES[route].format(**params) + query
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            if payload is None:
                response = await self.http.request(method, path, headers=headers,
                                                   timeout_s=timeout_s)
            else:
                response = await self.http.request(method, path, json=payload, headers=headers,
                                                   timeout_s=timeout_s)
        except HTTPClientError as exc:
            raise TransportError(str(exc)) from None
        detail = response.body[:300].decode("utf-8", "replace")
        if response.status in (401, 403):
            if route in ("register", "challenge"):
                raise RegistrationError(f"the network refused this node: {detail}")
            raise SessionLostError(f"session refused ({response.status}): {detail}")
        if not 200 <= response.status < 300:
            if route in ("register", "challenge") and 400 <= response.status < 500:
                raise RegistrationError(f"the network refused this node: {detail}")
            raise TransportError(f"{method} {path}: HTTP {response.status}: {detail}",
                                 retryable=response.status >= 500)
        if raw:
            return response.body
        try:
            return response.json()
        except ValueError:
            raise TransportError(f"{method} {path}: the answer is not JSON") from None

    async def register(self, request: RegisterRequest) -> Challenge:
        """See NetworkTransport."""
        self.token = None
        body = await self._call("POST", "register", request.to_payload())
        return _parse(Challenge.from_payload, body)

    async def complete_registration(self, response: ChallengeResponse) -> str:
        """See NetworkTransport."""
        body = await self._call("POST", "challenge", response.to_payload())
        token, node_id = _get(body, "token"), _get(body, "node_id")
        if not isinstance(token, str) or not isinstance(node_id, str):
            raise RegistrationError("the network's session answer lacks token or node_id")
        self.token = token
        return node_id

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatAnswer:
        """See NetworkTransport."""
        body = await self._call("POST", "heartbeat", beat.to_payload())
        state, config_hash, cancel = (_get(body, "state"), _get(body, "config_hash"),
                                      _get(body, "cancel") or [])
        if not isinstance(state, str) or not (config_hash is None or isinstance(config_hash, str))\
                or not isinstance(cancel, list) or not all(isinstance(c, str) for c in cancel):
            raise TransportError("malformed heartbeat answer")
        return HeartbeatAnswer(state, config_hash, tuple(cancel))

    async def fetch_snapshot(self, config_hash: str) -> dict[str, Any]:
        """See NetworkTransport."""
        body = await self._call("GET", "snapshot", config_hash=config_hash)
        if not isinstance(body, dict):
            raise TransportError("the snapshot is not a JSON object")
        return body

    async def lease(self, request: LeaseRequest) -> LeaseBatch:
        """See NetworkTransport (the read timeout covers the long poll)."""
        body = await self._call("POST", "lease", request.to_payload(),
                                timeout_s=self.timeout_s + request.wait_ms / 1000)
        return _parse(LeaseBatch.from_payload, body)

    async def post_events(self, events: Sequence[JobEvent]) -> tuple[str, ...]:
        """See NetworkTransport."""
        body = await self._call("POST", "events", {"events": [e.to_payload() for e in events]})
        cancel = _get(body, "cancel") or []
        if not isinstance(cancel, list) or not all(isinstance(c, str) for c in cancel):
            raise TransportError("malformed events answer")
        return tuple(cancel)

    async def submit_receipt(self, submit: ReceiptSubmit) -> dict[str, Any]:
        """See NetworkTransport."""
        body = await self._call("POST", "receipts", submit.to_payload())
        return body if isinstance(body, dict) else {}

    async def fetch_release(self, root_version: int) -> dict[str, Any]:
        """See ReleaseTransport."""
        body = await self._call("GET", "release", query=f"?root_version={int(root_version)}")
        if not isinstance(body, dict) or not isinstance(body.get("roots", []), list):
            raise TransportError("malformed release answer")
        return body

    async def fetch_artifact(self, address: str) -> bytes:
        """See ReleaseTransport."""
        data = await self._call("GET", "artifact", raw=True, timeout_s=max(self.timeout_s, 120),
                                address=address)
        assert isinstance(data, bytes)
        return data


class ReleaseTransport(Protocol):
    """What the Agent's updater needs from the Network (``HTTPNetworkTransport`` has it)."""

    async def fetch_release(self, root_version: int) -> dict[str, Any]:
        """Return ``{"roots": [root envelopes newer than root_version], "release": the
        current Release envelope or None}``."""
        ...

    async def fetch_artifact(self, address: str) -> bytes:
        """Return the bytes of the artifact stored at ``address`` (``sha256:<hex>``)."""
        ...


def _get(body: object, key: str) -> object:
    return body.get(key) if isinstance(body, dict) else None


def _parse(parse: Callable[[Any], _T], body: object) -> _T:
    try:
        return parse(body)
    except ResultityError as exc:
        raise TransportError(f"malformed answer from the network: {exc}") from None
