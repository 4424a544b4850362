"""Release manifests, their artifacts and trust-root rotations, as the Network keeps them.

``ReleaseDesk`` stores what operators publish and nodes fetch:

* artifacts (wheel files), addressed by ``sha256:<hex>`` of their bytes: an upload whose
  bytes do not hash to the address it names is refused;
* signed ``Release`` envelopes: with a trust root, each must pass the node rules for the
  ``release`` role (threshold signatures, not expired, not future-dated) and be newer than
  the current one; every artifact it names must already be stored with that size;
* trust roots after the first: root N+1 is accepted only as a valid rotation of root N
  (``rotate_root``: signed by a threshold of the old and of the new root keys). The rotated
  root also becomes the coordinator's, so snapshots signed by the new keys are accepted.

With a ``directory`` everything is kept on disk (``artifacts/``, ``releases/``, ``roots/``,
``current``) and reloaded on start; without one it lives in memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from resultity_core import (
    Envelope,
    Release,
    TrustRoot,
    as_envelope,
    check_payload_type,
    check_release,
    parse_json_strict,
    rotate_root,
    sha256_digest,
)

from ._errors import NetworkError

__all__ = ["MAX_ARTIFACT_BYTES", "ReleaseDesk", "ReleaseError", "artifact_address"]

MAX_ARTIFACT_BYTES = 64 << 20
_ADDRESS = re.compile(r"sha256:[0-9a-f]{64}")


def artifact_address(data: bytes) -> str:
    """Return ``sha256:<hex>`` of ``data`` (the address an artifact is stored and served at)."""
    return sha256_digest(data)


class ReleaseError(NetworkError):
    """A release, artifact or root the Network refuses to publish (HTTP 400)."""

    status = 400
    code = "release_refused"


class ReleaseDesk:
    """The Network's releases, artifacts and root chain; see the module docstring.

    ``root`` is the trust root in force (None: releases are only format-checked, and no
    rotation can be accepted). ``on_root`` is called with each newly accepted root.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, root: TrustRoot | None,
                 ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.root = root
        self.roots: list[dict[str, Any]] = []
        self.release: Release | None = None
        self.release_envelope: Envelope | None = None
        self._artifacts: dict[str, bytes] = {}
        if self.directory is not None:
            for sub in ("artifacts", "releases", "roots"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
            self._load()

    # ---- persistence --------------------------------------------------------------------

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _load(self) -> None:
        assert self.directory is not None
        for path in sorted((self.directory / "roots").glob("*.json"),
                           key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            envelope = Envelope.from_bytes(path.read_bytes())
            if self.root is not None and int(envelope.signed.get("version", 0)) \
                    > self.root.version:
                self.root = rotate_root(self.root, envelope, _far_past())
            self.roots.append(envelope.to_payload())
        current = self.directory / "current"
        if current.exists():
            envelope = Envelope.from_bytes(current.read_bytes())
            self.release = Release.from_payload(envelope.signed)
            self.release_envelope = envelope

    # ---- artifacts ----------------------------------------------------------------------

    def put_artifact(self, address: str, data: bytes) -> str:
        """Store ``data`` under ``address``; returns it. Raises ReleaseError when the bytes do
        not hash to ``address`` or are too large."""
        if not _ADDRESS.fullmatch(address):
            raise ReleaseError(f"artifact address must be sha256:<64 hex>, got {address!r}")
        if len(data) > MAX_ARTIFACT_BYTES:
            raise ReleaseError(f"artifact is larger than {MAX_ARTIFACT_BYTES} bytes")
        actual = artifact_address(data)
        if actual != address:
            raise ReleaseError(f"artifact bytes hash to {actual}, not {address}")
        if self.directory is None:
            self._artifacts[address] = bytes(data)
        else:
            path = self.directory / "artifacts" / address.removeprefix("sha256:")
            if not path.exists():
                self._write(path, data)
        return address

    def artifact(self, address: str) -> bytes | None:
        """Return the artifact stored at ``address``, or None."""
        if not _ADDRESS.fullmatch(address):
            return None
        if self.directory is None:
            return self._artifacts.get(address)
        path = self.directory / "artifacts" / address.removeprefix("sha256:")
        return path.read_bytes() if path.exists() else None

    def _artifact_size(self, address: str) -> int | None:
        if self.directory is None:
            data = self._artifacts.get(address)
            return None if data is None else len(data)
        path = self.directory / "artifacts" / address.removeprefix("sha256:")
        return path.stat().st_size if path.exists() else None

    # ---- releases -----------------------------------------------------------------------

    def publish_release(self, body: bytes | dict[str, Any], now: float) -> str:
        """Make a signed Release current; returns its digest.

        Raises the core's envelope, signature and format errors, RollbackError for a release
        not newer than the current one, and ReleaseError for a missing or mis-sized artifact.
        """
        env = as_envelope(parse_json_strict(body) if isinstance(body, bytes) else body)
        applied = self.release.version if self.release is not None else None
        applied_hash = self.release_envelope.digest() if self.release_envelope else None
        if self.root is not None:
            release, digest = check_release(env, self.root, int(now), applied_version=applied,
                                            applied_hash=applied_hash)
        else:
            check_payload_type(env, Release.TYPE)
            release, digest = Release.from_payload(env.signed), env.digest()
            if applied is not None and release.version <= applied and digest != applied_hash:
                raise ReleaseError(f"release v{release.version} does not supersede "
                                   f"the current v{applied}")
        for item in release.artifacts:
            size = self._artifact_size(item.sha256)
            if size is None:
                raise ReleaseError(f"artifact {item.name} ({item.sha256}) was not uploaded")
            if size != item.size:
                raise ReleaseError(f"artifact {item.name} has {size} bytes, the manifest "
                                   f"says {item.size}")
        if self.directory is not None:
            data = env.to_bytes()
            self._write(self.directory / "releases" / f"{release.version}.json", data)
            self._write(self.directory / "current", data)
        self.release, self.release_envelope = release, env
        return digest

    # ---- roots --------------------------------------------------------------------------

    def publish_root(self, body: bytes | dict[str, Any], now: float) -> TrustRoot:
        """Accept root N+1 as a rotation of the root in force; returns it.

        Raises ReleaseError without a root in force, and ``rotate_root``'s errors.
        """
        if self.root is None:
            raise ReleaseError("this Network has no trust root configured to rotate from")
        env = as_envelope(parse_json_strict(body) if isinstance(body, bytes) else body)
        new = rotate_root(self.root, env, int(now))
        if self.directory is not None:
            self._write(self.directory / "roots" / f"{new.version}.json", env.to_bytes())
        self.roots.append(env.to_payload())
        self.root = new
        return new

    def roots_after(self, version: int) -> list[dict[str, Any]]:
        """Return the rotated root envelopes newer than ``version``, oldest first."""
        return [r for r in self.roots if int(r["signed"]["version"]) > version]


def _far_past() -> int:
    # Roots reloaded from disk were verified when accepted; only their chain is re-checked
    # (expiry is the node's business at the time it applies them).
    return 0
