"""Ed25519 keys (PyNaCl): generation, key ids, signing, verification and JSON key files.

A **key id** is the lowercase hex SHA-256 of the raw 32-byte public key, without a prefix
(64 characters), the way TUF names keys. Digests of *content* carry the ``sha256:`` prefix;
key ids never do, so the two cannot be confused. Public keys are written as 64 hex characters.

A secret key file is JSON, written atomically with mode 0600::

    {"_type": "ed25519-secret-key", "keytype": "ed25519",
     "keyid": <key id>, "public": <hex>, "seed": <hex of the 32-byte seed>}

``load_key_file`` checks every field and that ``public`` and ``keyid`` are the ones the seed
derives, so a truncated, edited or mixed-up file is refused with a KeyFileError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import nacl.exceptions
import nacl.signing

from ._errors import BadSignatureError, KeyFileError, PayloadFormatError

__all__ = [
    "KEY_FILE_TYPE",
    "KEY_TYPE",
    "PublicKey",
    "SecretKey",
    "generate_key",
    "key_id",
    "load_key_file",
    "save_key_file",
]

KEY_TYPE = "ed25519"
KEY_FILE_TYPE = "ed25519-secret-key"
_RAW_LEN = 32
_SIG_LEN = 64


def key_id(public_raw: bytes) -> str:
    """Return the key id of a raw 32-byte Ed25519 public key: lowercase hex SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()


def _hex_bytes(value: object, path: str, length: int) -> bytes:
    if not isinstance(value, str):
        raise PayloadFormatError(path, f"expected a hex string, got {type(value).__name__}")
    if len(value) != 2 * length or value != value.lower():
        raise PayloadFormatError(path, f"expected {2 * length} lowercase hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise PayloadFormatError(path, "not hexadecimal") from None


@attrs.frozen
class PublicKey:
    """An Ed25519 public key; ``raw`` is its 32 bytes."""

    raw: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def __attrs_post_init__(self) -> None:
        if len(self.raw) != _RAW_LEN:
            raise PayloadFormatError("public", f"an Ed25519 public key is {_RAW_LEN} bytes")

    @property
    def keyid(self) -> str:
        """The key id (hex SHA-256 of the raw key)."""
        return key_id(self.raw)

    @property
    def hex(self) -> str:
        """The raw key as 64 lowercase hex characters."""
        return self.raw.hex()

    @classmethod
    def from_hex(cls, value: object, path: str = "public") -> PublicKey:
        """Parse 64 lowercase hex characters; raises PayloadFormatError naming ``path``."""
        return cls(_hex_bytes(value, path, _RAW_LEN))

    def verify(self, message: bytes, signature: bytes) -> None:
        """Return None when ``signature`` is this key's signature of ``message``.

        Raises BadSignatureError (role ``"key"``, this key id in ``bad``) otherwise.
        """
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            raise BadSignatureError(
                "key", 1, valid=(), unknown=(), bad=(self.keyid,)
            ) from None

    def to_payload(self) -> dict[str, Any]:
        """Return the trust-root form ``{"keytype": "ed25519", "public": <hex>}``."""
        return {"keytype": KEY_TYPE, "public": self.hex}

    @classmethod
    def from_payload(cls, obj: object, path: str = "") -> PublicKey:
        """Parse the trust-root form; raises PayloadFormatError naming the field."""
        if not isinstance(obj, dict):
            raise PayloadFormatError(path, "expected an object with keytype and public")
        extra = sorted(set(obj) - {"keytype", "public"})
        if extra:
            raise PayloadFormatError(f"{path}.{extra[0]}", "unknown field")
        if obj.get("keytype") != KEY_TYPE:
            raise PayloadFormatError(f"{path}.keytype", f"expected {KEY_TYPE!r}")
        return cls.from_hex(obj.get("public"), f"{path}.public")


@attrs.frozen(repr=False)
class SecretKey:
    """An Ed25519 signing key held as its 32-byte seed. Its repr never shows the seed."""

    seed: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def __attrs_post_init__(self) -> None:
        if len(self.seed) != _RAW_LEN:
            raise ValueError(f"an Ed25519 seed is {_RAW_LEN} bytes")

    def __repr__(self) -> str:
        return f"SecretKey(keyid={self.keyid!r})"

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(bytes(nacl.signing.SigningKey(self.seed).verify_key))

    @property
    def keyid(self) -> str:
        """The key id of the public key."""
        return self.public_key.keyid

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message`` (deterministic)."""
        return nacl.signing.SigningKey(self.seed).sign(message).signature


def generate_key() -> SecretKey:
    """Return a new random Ed25519 key (from the operating system's CSPRNG)."""
    return SecretKey(bytes(nacl.signing.SigningKey.generate()))


def _key_file_payload(key: SecretKey) -> dict[str, Any]:
    public = key.public_key
    return {
        "_type": KEY_FILE_TYPE,
        "keytype": KEY_TYPE,
        "keyid": public.keyid,
        "public": public.hex,
        "seed": key.seed.hex(),
    }


def save_key_file(key: SecretKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` as a JSON key file with mode 0600, atomically.

    The file is written to a temporary name in the same directory and renamed into place, so a
    crash never leaves a half-written key. Raises KeyFileError when ``path`` exists and
    ``overwrite`` is false, or when the file cannot be written.
    """
    p = Path(path)
    if not overwrite and (p.exists() or p.is_symlink()):
        raise KeyFileError(str(p), "already exists (refusing to overwrite)")
    data = (json.dumps(_key_file_payload(key), indent=2, sort_keys=True) + "\n").encode()
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not overwrite and (p.exists() or p.is_symlink()):
            raise KeyFileError(str(p), "already exists (refusing to overwrite)")
        os.replace(tmp, p)
    except OSError as exc:
        raise KeyFileError(str(p), f"cannot write: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_key_file(path: str | os.PathLike[str]) -> SecretKey:
    """Return the secret key stored in the JSON key file at ``path``.

    Raises KeyFileError naming the file when it is missing, unreadable, not JSON, not a
    Resultity Ed25519 secret key file, truncated, or when its public key or key id does not
    match its seed.
    """
    p = Path(path)
    name = str(p)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise KeyFileError(name, "no such file") from None
    except IsADirectoryError:
        raise KeyFileError(name, "is a directory") from None
    except UnicodeDecodeError:
        raise KeyFileError(name, "not a JSON key file (not UTF-8 text)") from None
    except OSError as exc:
        raise KeyFileError(name, f"cannot read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(
            name, f"not a JSON key file (truncated or corrupt: {exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(obj, dict):
        raise KeyFileError(name, "not a key file (expected a JSON object)")
    if obj.get("_type") != KEY_FILE_TYPE:
        raise KeyFileError(
            name, f"not an Ed25519 secret key file (_type is {obj.get('_type')!r})"
        )
    if obj.get("keytype") != KEY_TYPE:
        raise KeyFileError(name, f"unsupported keytype {obj.get('keytype')!r}")
    try:
        key = SecretKey(_hex_bytes(obj.get("seed"), "seed", _RAW_LEN))
        public = PublicKey.from_hex(obj.get("public"))
    except PayloadFormatError as exc:
        raise KeyFileError(name, f"corrupt: {exc}") from None
    if public != key.public_key:
        raise KeyFileError(name, "corrupt: public key does not match the seed")
    if obj.get("keyid") != public.keyid:
        raise KeyFileError(name, "corrupt: keyid does not match the public key")
    return key
