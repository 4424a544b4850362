"""resultity_core: pure-Python roles, signed formats, OpenAI protocol and ledger arithmetic.

Imports only attrs, cattrs, pynacl and the standard library. Nothing here opens a socket or
reads the clock: callers pass ``now`` in.
"""

from __future__ import annotations

from ._canonical import DIGEST_PREFIX, canonical_bytes, canonical_digest, sha256_digest
from ._errors import CanonicalEncodingError, ResultityError

__all__ = [
    "DIGEST_PREFIX",
    "CanonicalEncodingError",
    "ResultityError",
    "canonical_bytes",
    "canonical_digest",
    "sha256_digest",
]
