"""Signed release manifests: ``Release`` (role ``release``) and its ``Artifact`` entries.

Same conventions as ``_formats``: strict fields, integers only, ``sha256:`` digests.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ._fields import Fields
from ._formats import FILE_NAME, MAX_SIZE, VERSION, check_canonical, unique

__all__ = ["Artifact", "Release"]


@attrs.frozen
class Artifact:
    """A release artifact (e.g. a wheel file name), its sha256 digest and size in bytes."""

    name: str
    sha256: str
    size: int

    def to_payload(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}

    @classmethod
    def parse(cls, f: Fields) -> Artifact:
        out = cls(
            f.text("name", pattern=FILE_NAME, max_len=255),
            f.digest("sha256"),
            f.integer("size", maximum=MAX_SIZE),
        )
        f.done()
        return out


@attrs.frozen
class Release:
    """A signed release manifest (role ``release``, ``_type`` "release")."""

    TYPE: ClassVar[str] = "release"

    version: int
    agent_version: str
    runtime_version: str
    artifacts: tuple[Artifact, ...]
    issued_at: int
    expires_at: int

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form."""
        return {
            "_type": self.TYPE,
            "version": self.version,
            "agent_version": self.agent_version,
            "runtime_version": self.runtime_version,
            "artifacts": [a.to_payload() for a in self.artifacts],
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_payload(cls, obj: object) -> Release:
        """Parse and validate; raises PayloadFormatError naming the first bad field."""
        check_canonical(obj)
        f = Fields(obj)
        f.type_tag(cls.TYPE)
        version = f.integer("version", minimum=1)
        agent_version = f.text("agent_version", pattern=VERSION, max_len=64)
        runtime_version = f.text("runtime_version", pattern=VERSION, max_len=64)
        items = f.items("artifacts", min_len=1, max_len=256)
        artifacts = tuple(Artifact.parse(Fields(item, path)) for path, item in items)
        unique([a.name for a in artifacts], [p + ".name" for p, _ in items], "artifact")
        issued_at, expires_at = f.window()
        f.done()
        return cls(version, agent_version, runtime_version, artifacts, issued_at, expires_at)
