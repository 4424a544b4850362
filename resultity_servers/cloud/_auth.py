"""Bearer API keys: parsing the header and a short positive cache in front of the Network."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from resultity_core import invalid_api_key

from ._network import Account, NetworkClient

__all__ = ["AuthCache", "bearer_token"]


def bearer_token(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, None if absent or
    malformed (another scheme, an empty token)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class AuthCache:
    """Asks the Network who owns a key; remembers positive answers for ``ttl_s``.

    Only the SHA-256 of a key is kept in memory. Unknown keys are never cached, so a key
    created a moment ago works at once; a revoked key keeps working for at most ``ttl_s``.
    """

    def __init__(
        self,
        network: NetworkClient,
        ttl_s: float = 30.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.network = network
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Account]] = OrderedDict()

    async def account(self, authorization: str | None) -> Account:
        """Return the account of the request's bearer key.

        Raises ``InvalidAPIKeyError`` (401) for a missing, malformed or unknown key, and
        ``NoCapacityError`` (503) when the Network cannot be asked.
        """
        token = bearer_token(authorization)
        if token is None:
            raise invalid_api_key()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(digest)
            return hit[1]
        account = await self.network.authenticate(token)
        if account is None:
            self._cache.pop(digest, None)
            raise invalid_api_key()
        if self.ttl_s > 0:
            self._cache[digest] = (now + self.ttl_s, account)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return account
