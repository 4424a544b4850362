"""resultity_core: pure-Python roles, signed formats, OpenAI protocol and ledger arithmetic.

Imports only attrs, cattrs, pynacl and the standard library. Nothing here opens a socket or
reads the clock: callers pass ``now`` in.
"""

from __future__ import annotations

from ._canonical import DIGEST_PREFIX, canonical_bytes, canonical_digest, sha256_digest
from ._envelope import (
    Envelope,
    Signature,
    check_payload_type,
    parse_json_strict,
    sign_envelope,
    verify_signatures,
)
from ._errors import (
    BadSignatureError,
    CanonicalEncodingError,
    ExpiredError,
    FutureDatedError,
    HashMismatchError,
    KeyFileError,
    MalformedEnvelopeError,
    PayloadFormatError,
    ReplayError,
    ResultityError,
    RollbackError,
    RootVersionError,
    RuleViolationError,
    SignatureVerificationError,
    ThresholdNotMetError,
    UnknownKeyError,
    WrongNodeError,
    WrongPayloadTypeError,
)
from ._keys import (
    KEY_FILE_TYPE,
    KEY_TYPE,
    PublicKey,
    SecretKey,
    generate_key,
    key_id,
    load_key_file,
    save_key_file,
)
from ._trust import (
    ROLES,
    ROOT_TYPE,
    Role,
    TrustRoot,
    load_trusted_root,
    make_root,
    rotate_root,
    verify_envelope,
)

__all__ = [
    "DIGEST_PREFIX",
    "KEY_FILE_TYPE",
    "KEY_TYPE",
    "ROLES",
    "ROOT_TYPE",
    "BadSignatureError",
    "CanonicalEncodingError",
    "Envelope",
    "ExpiredError",
    "FutureDatedError",
    "HashMismatchError",
    "KeyFileError",
    "MalformedEnvelopeError",
    "PayloadFormatError",
    "PublicKey",
    "ReplayError",
    "ResultityError",
    "Role",
    "RollbackError",
    "RootVersionError",
    "RuleViolationError",
    "SecretKey",
    "Signature",
    "SignatureVerificationError",
    "ThresholdNotMetError",
    "TrustRoot",
    "UnknownKeyError",
    "WrongNodeError",
    "WrongPayloadTypeError",
    "canonical_bytes",
    "canonical_digest",
    "check_payload_type",
    "generate_key",
    "key_id",
    "load_key_file",
    "load_trusted_root",
    "make_root",
    "parse_json_strict",
    "rotate_root",
    "save_key_file",
    "sha256_digest",
    "sign_envelope",
    "verify_envelope",
    "verify_signatures",
]
