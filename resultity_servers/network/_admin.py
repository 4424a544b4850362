"""``NetworkAdminClient``: the operator routes over HTTP (accounts, credits, keys, config).

For the ``resultity account`` and ``snapshot publish`` commands and scripts: every call sends
the service token and returns plain data; a refusal raises ``AdminRequestError`` carrying the
Network's status and message, an unreachable Network the HTTP layer's ``HTTPClientError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import attrs

from resultity_core import Envelope, PublicKey
from resultity_servers._http import ClientResponse, HTTPClient

from ._coordinator import AccountBalance
from ._errors import NetworkError
from ._http_util import PREFIX

__all__ = ["AdminRequestError", "CreatedAccount", "NetworkAdminClient"]


class AdminRequestError(NetworkError):
    """The Network refused an operator request; ``status`` and ``code`` are its answer's."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        self.status = status
        self.code = code or "network_error"
        super().__init__(f"HTTP {status}: {message}")


@attrs.frozen
class CreatedAccount:
    """A new account: its balance, its API key (shown once) and its registered public key."""

    account_id: str
    balance: int
    api_key: str
    public_key: str | None


def _balance(body: Mapping[str, Any]) -> AccountBalance:
    return AccountBalance(str(body["account_id"]), int(body["balance"]), int(body["reserved"]))


class NetworkAdminClient:
    """Call the Network at ``base_url`` as an operator (``service_token``)."""

    def __init__(self, base_url: str, service_token: str, *, timeout_s: float = 30.0) -> None:
        self.http = HTTPClient(base_url, headers={"authorization": f"Bearer {service_token}"},
                               timeout_s=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self.http.aclose()

    @staticmethod
    def _ok(response: ClientResponse) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        if 200 <= response.status < 300 and body is not None:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise AdminRequestError(response.status, str(error.get("message")),
                                    error.get("code") if isinstance(error.get("code"), str)
                                    else None)
        raise AdminRequestError(response.status, response.body[:200].decode("utf-8", "replace"),
                                None)

    async def create_account(
        self, account_id: str | None = None, *, public_key: PublicKey | None = None,
        credits: int = 0,
    ) -> CreatedAccount:
        """Create an account; returns it with its API key. Raises AdminRequestError."""
        payload: dict[str, Any] = {"credits": credits}
        if account_id is not None:
            payload["account_id"] = account_id
        if public_key is not None:
            payload["public_key"] = public_key.hex
        body = self._ok(await self.http.request("POST", f"{PREFIX}/accounts", json=payload))
        public = body.get("public_key")
        return CreatedAccount(str(body["account_id"]), int(body["balance"]), str(body["api_key"]),
                              public if isinstance(public, str) else None)

    async def list_accounts(self) -> list[AccountBalance]:
        """Return every account's balance. Raises AdminRequestError."""
        body = self._ok(await self.http.request("GET", f"{PREFIX}/accounts"))
        return [_balance(item) for item in body["data"]]

    async def account(self, account_id: str) -> AccountBalance:
        """Return one account's balance. Raises AdminRequestError (404 unknown)."""
        response = await self.http.request("GET", f"{PREFIX}/accounts/{account_id}")
        return _balance(self._ok(response))

    async def credit(self, account_id: str, amount: int) -> AccountBalance:
        """Mint ``amount`` micro-credits into the account; returns the new balance."""
        response = await self.http.request("POST", f"{PREFIX}/accounts/{account_id}/credit",
                                           json={"amount": amount})
        return _balance(self._ok(response))

    async def create_api_key(self, account_id: str) -> str:
        """Return a new API key for the account (shown once)."""
        response = await self.http.request("POST", f"{PREFIX}/accounts/{account_id}/keys")
        return str(self._ok(response)["api_key"])

    async def set_public_key(self, account_id: str, public_key: PublicKey | None) -> None:
        """Register (or clear, with None) the account's grant-signing key."""
        payload = {"public_key": public_key.hex if public_key is not None else None}
        self._ok(await self.http.request(
            "POST", f"{PREFIX}/accounts/{account_id}/public-key", json=payload))

    async def publish_config(self, envelope: Envelope | Mapping[str, Any]) -> str:
        """Publish a signed NodeConfig; returns its ``node_config_hash``."""
        payload = envelope.to_payload() if isinstance(envelope, Envelope) else dict(envelope)
        body = self._ok(await self.http.request("POST", f"{PREFIX}/config", json=payload))
        return str(body["config_hash"])
