"""Signed snapshot formats: ``NodeConfig``, the rules a node runs under (``Release`` is beside).

Every format is a frozen attrs class with ``to_payload()`` (the canonical JSON form, with a
``_type`` field) and ``from_payload()`` (strict validation). Conventions:

* times are integer unix seconds, durations integer milliseconds (``*_ms``), sizes integer
  bytes, prices integer micro-credits per 1,000 tokens; floats are refused everywhere, with the
  offending field's path in the error (``models[0].files[1].size``);
* content digests are ``sha256:<64 lowercase hex>``;
* the formats are **strict**: an unknown field is an error. A node must not run under a rule it
  does not understand, so adding a field is a format change that old nodes refuse. (The signed
  *envelope* keeps its payload verbatim; only parsing into these classes is strict.)

``from_payload(x).to_payload() == x`` for every accepted ``x``, so ``node_config_hash`` of the
parsed config equals the digest of the payload that was signed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ._canonical import canonical_digest, check_canonical_value
from ._errors import CanonicalEncodingError, PayloadFormatError
from ._fields import Fields

__all__ = [
    "BACKENDS",
    "RUNTIME_DTYPES",
    "RUNTIME_QUANTIZATIONS",
    "ModelEntry",
    "ModelFile",
    "NetworkParams",
    "NodeConfig",
    "Participation",
    "Price",
    "Resources",
    "RuntimeParams",
    "check_canonical",
    "example_node_config",
    "node_config_hash",
]

BACKENDS = ("auto", "torch", "triton")
RUNTIME_DTYPES = ("auto", "float32", "bfloat16", "float16")
RUNTIME_QUANTIZATIONS = ("none", "int4")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]*")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_REL_PATH = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(:[0-9]{1,5})?(/[^\s]*)?")
MAX_SIZE = 2**50
_HOUR_MS = 3_600_000


def check_canonical(obj: object) -> None:
    """Raise PayloadFormatError (with the path) when ``obj`` has no canonical form."""
    try:
        check_canonical_value(obj)
    except CanonicalEncodingError as exc:
        raise PayloadFormatError(exc.path, exc.reason) from None


def unique(names: list[str], paths: list[str], what: str) -> None:
    seen: set[str] = set()
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise PayloadFormatError(path, f"duplicate {what} {name!r}")
        seen.add(name)


@attrs.frozen
class ModelFile:
    """One file of a model: relative ``path``, ``sha256`` digest and ``size`` in bytes."""

    path: str
    sha256: str
    size: int

    def to_payload(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def parse(cls, f: Fields) -> ModelFile:
        path = f.text("path", pattern=_REL_PATH, max_len=512)
        if any(part in {".", ".."} for part in path.split("/")):
            raise PayloadFormatError(f.where("path"), "must not contain . or .. segments")
        out = cls(path, f.digest("sha256"), f.integer("size", maximum=MAX_SIZE))
        f.done()
        return out


@attrs.frozen
class Price:
    """Micro-credits per 1,000 prompt tokens and per 1,000 completion tokens."""

    prompt_per_1k: int
    completion_per_1k: int

    def to_payload(self) -> dict[str, Any]:
        return {"prompt_per_1k": self.prompt_per_1k, "completion_per_1k": self.completion_per_1k}

    @classmethod
    def parse(cls, f: Fields) -> Price:
        out = cls(f.integer("prompt_per_1k"), f.integer("completion_per_1k"))
        f.done()
        return out


@attrs.frozen
class ModelEntry:
    """An approved model: ``name``, ``version``, its files and its price."""

    name: str
    version: str
    files: tuple[ModelFile, ...]
    price: Price

    def to_payload(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "files": [x.to_payload() for x in self.files],
            "price": self.price.to_payload(),
        }

    @classmethod
    def parse(cls, f: Fields) -> ModelEntry:
        name = f.text("name", pattern=NAME, max_len=128)
        version = f.text("version", pattern=VERSION, max_len=64)
        items = f.items("files", min_len=1, max_len=1024)
        files = tuple(ModelFile.parse(Fields(item, path)) for path, item in items)
        unique([x.path for x in files], [p + ".path" for p, _ in items], "file path")
        price = Price.parse(f.sub("price"))
        f.done()
        return cls(name, version, files, price)


@attrs.frozen
class RuntimeParams:
    """Engine settings: backend, batch size, context length, KV-cache budget in bytes, and
    the numeric format the models run in.

    ``dtype``: "auto" (the engine's default: float32 on CPU, the checkpoint's half type on
    CUDA), "float32", "bfloat16" or "float16" (CUDA only). ``quantization``: "none" or "int4"
    (4-bit weights, CPU, bfloat16: faster decode, outputs no longer exactly the
    checkpoint's). Both were added after the first format: a payload without them means the
    defaults, and the defaults are not written, so earlier snapshots keep their bytes and hash.
    """

    backend: str
    max_batch_size: int
    max_model_len: int
    kv_cache_bytes: int
    dtype: str = "auto"
    quantization: str = "none"

    def to_payload(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        for name, default in _RUNTIME_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def parse(cls, f: Fields) -> RuntimeParams:
        backend = f.text("backend")
        if backend not in BACKENDS:
            raise PayloadFormatError(f.where("backend"), f"must be one of {', '.join(BACKENDS)}")
        choices = {}
        for name, allowed in (("dtype", RUNTIME_DTYPES), ("quantization", RUNTIME_QUANTIZATIONS)):
            value = f.raw(name, optional=True)
            if value is None:
                value = _RUNTIME_DEFAULTS[name]
            elif value not in allowed:
                raise PayloadFormatError(f.where(name), f"must be one of {', '.join(allowed)}")
            choices[name] = value
        out = cls(
            backend,
            f.integer("max_batch_size", minimum=1, maximum=4096),
            f.integer("max_model_len", minimum=1, maximum=1 << 24),
            f.integer("kv_cache_bytes", maximum=MAX_SIZE),
            **choices,
        )
        f.done()
        return out


# the fields added after the first format, with their defaults (left out of payloads)
_RUNTIME_DEFAULTS = {a.name: a.default for a in attrs.fields(RuntimeParams)
                     if a.default is not attrs.NOTHING}


@attrs.frozen
class NetworkParams:
    """Where the Agent dials (``endpoints``, http/https URLs, tried in order) and its timeouts."""

    endpoints: tuple[str, ...]
    heartbeat_interval_ms: int
    lease_timeout_ms: int
    request_timeout_ms: int

    def to_payload(self) -> dict[str, Any]:
        return {
            "endpoints": list(self.endpoints),
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "lease_timeout_ms": self.lease_timeout_ms,
            "request_timeout_ms": self.request_timeout_ms,
        }

    @classmethod
    def parse(cls, f: Fields) -> NetworkParams:
        endpoints = []
        for path, url in f.items("endpoints", min_len=1, max_len=16):
            if not isinstance(url, str) or len(url) > 512 or not _URL.fullmatch(url):
                raise PayloadFormatError(path, "expected an http:// or https:// URL")
            endpoints.append(url)
        out = cls(
            tuple(endpoints),
            f.integer("heartbeat_interval_ms", minimum=100, maximum=_HOUR_MS),
            f.integer("lease_timeout_ms", minimum=100, maximum=_HOUR_MS),
            f.integer("request_timeout_ms", minimum=100, maximum=_HOUR_MS),
        )
        f.done()
        return out


@attrs.frozen
class Participation:
    """Whether the node takes jobs, how many at once, and how long a drain may take."""

    accept_jobs: bool
    max_concurrent_jobs: int
    drain_timeout_ms: int

    def to_payload(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def parse(cls, f: Fields) -> Participation:
        out = cls(
            f.boolean("accept_jobs"),
            f.integer("max_concurrent_jobs", minimum=1, maximum=4096),
            f.integer("drain_timeout_ms", maximum=24 * _HOUR_MS),
        )
        f.done()
        return out


@attrs.frozen
class Resources:
    """Limits for the Runtime: memory and disk in bytes, CPU threads (0 = no limit)."""

    max_memory_bytes: int
    max_disk_bytes: int
    max_cpu_threads: int

    def to_payload(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def parse(cls, f: Fields) -> Resources:
        out = cls(
            f.integer("max_memory_bytes", maximum=MAX_SIZE),
            f.integer("max_disk_bytes", maximum=MAX_SIZE),
            f.integer("max_cpu_threads", maximum=4096),
        )
        f.done()
        return out


@attrs.frozen
class NodeConfig:
    """The signed rules a node runs under (role ``config``, ``_type`` "node-config")."""

    TYPE: ClassVar[str] = "node-config"

    version: int
    issued_at: int
    expires_at: int
    models: tuple[ModelEntry, ...]
    runtime: RuntimeParams
    network: NetworkParams
    participation: Participation
    resources: Resources

    def model(self, name: str) -> ModelEntry | None:
        """Return the approved model called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form."""
        return {
            "_type": self.TYPE,
            "version": self.version,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "models": [m.to_payload() for m in self.models],
            "runtime": self.runtime.to_payload(),
            "network": self.network.to_payload(),
            "participation": self.participation.to_payload(),
            "resources": self.resources.to_payload(),
        }

    @classmethod
    def from_payload(cls, obj: object) -> NodeConfig:
        """Parse and validate; raises PayloadFormatError naming the first bad field."""
        check_canonical(obj)
        f = Fields(obj)
        f.type_tag(cls.TYPE)
        version = f.integer("version", minimum=1)
        issued_at, expires_at = f.window()
        items = f.items("models", max_len=256)
        models = tuple(ModelEntry.parse(Fields(item, path)) for path, item in items)
        unique([m.name for m in models], [p + ".name" for p, _ in items], "model")
        out = cls(
            version,
            issued_at,
            expires_at,
            models,
            RuntimeParams.parse(f.sub("runtime")),
            NetworkParams.parse(f.sub("network")),
            Participation.parse(f.sub("participation")),
            Resources.parse(f.sub("resources")),
        )
        f.done()
        return out


def node_config_hash(payload: Mapping[str, Any] | NodeConfig) -> str:
    """Return ``sha256:<hex>`` of the canonical bytes of a NodeConfig payload.

    Raises CanonicalEncodingError when the payload has no canonical form.
    """
    obj = payload.to_payload() if isinstance(payload, NodeConfig) else payload
    return canonical_digest(obj)


def example_node_config(*, now: int, version: int = 1, days: int = 30) -> NodeConfig:
    """Return a valid example NodeConfig issued at ``now`` and expiring ``days`` later.

    One model entry (``tiny``) whose single file digest is a placeholder, a local endpoint and
    moderate limits: a starting point for operators and tests, not a recommendation.
    """
    return NodeConfig(
        version=version,
        issued_at=now,
        expires_at=now + days * 86_400,
        models=(
            ModelEntry(
                name="tiny",
                version="1",
                files=(ModelFile("model.safetensors", "sha256:" + "0" * 64, 0),),
                price=Price(prompt_per_1k=100, completion_per_1k=200),
            ),
        ),
        runtime=RuntimeParams("auto", max_batch_size=8, max_model_len=2048,
                              kv_cache_bytes=256 << 20),
        network=NetworkParams(("http://127.0.0.1:8700",), heartbeat_interval_ms=5_000,
                              lease_timeout_ms=30_000, request_timeout_ms=60_000),
        participation=Participation(accept_jobs=True, max_concurrent_jobs=4,
                                    drain_timeout_ms=60_000),
        resources=Resources(max_memory_bytes=4 << 30, max_disk_bytes=20 << 30,
                            max_cpu_threads=0),
    )
