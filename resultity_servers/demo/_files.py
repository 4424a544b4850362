"""Preparing a demo data directory: keys, trust root, model and node directories.

Layout::

    keys/root.key keys/config.key keys/account.key    the operator's Ed25519 keys
    trust.json                                        trust root (v1, root + config keys)
    models/<name>/1/                                  the model (created once, then reused)
    snapshot.json                                     the last NodeConfig published
    network/network.db                                the Network's SQLite state
    service-token                                     the Cloud's and operators' token (0600)
    api-key                                           the demo user's API key (0600)
    demo.json                                         URLs of the running demo
    nodes/node-<i>/                                   node.key, grant.json, root.json, ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from resultity_core import (
    Envelope,
    ModelEntry,
    NetworkParams,
    NodeConfig,
    NodeGrant,
    Participation,
    Price,
    Resources,
    RuntimeParams,
    SecretKey,
    TrustRoot,
    generate_key,
    load_key_file,
    make_root,
    save_key_file,
    sign_envelope,
    sign_grant,
)

__all__ = [
    "DEMO_ACCOUNT",
    "OPERATOR_ACCOUNT",
    "DemoFiles",
    "DemoOptions",
    "default_demo_dir",
    "demo_node_config",
    "prepare_demo",
    "prepare_node_dir",
]

Log = Callable[[str], None]
DEMO_ACCOUNT = "demo-user"
OPERATOR_ACCOUNT = "demo-operator"
MODEL_VERSION = "1"
PRICE = Price(prompt_per_1k=1_000, completion_per_1k=2_000)
_DAY = 86_400
_DONE = ".resultity-demo-complete"


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


def _stderr(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def default_demo_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/resultity/demo`` (default ``~/.cache/resultity/demo``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resultity" / "demo"


@attrs.frozen
class DemoOptions:
    """What ``running_demo`` starts. ``port`` 0 picks a free port for the Cloud.

    ``api_key`` (must start with ``rk-``) replaces the generated one. ``preset`` None uses the
    runtime's ``demo`` preset when it exists, else ``tiny``. ``credits`` are micro-credits.
    ``data_dir`` is made absolute (the paths the demo prints and writes to demo.json stay
    valid from any directory).
    """

    data_dir: Path = attrs.field(converter=_absolute)
    port: int = 8000
    host: str = "127.0.0.1"
    nodes: int = 1
    api_key: str | None = None
    preset: str | None = None
    credits: int = 10_000_000
    heartbeat_timeout_s: float = 5.0
    runtime_threads: int = 0
    network_namespace: bool = True
    device: str = "cpu"


@attrs.frozen
class DemoFiles:
    """The prepared data directory: paths, the operator keys and the model entry."""

    data_dir: Path
    root_key: SecretKey
    config_key: SecretKey
    account_key: SecretKey
    trust: TrustRoot
    trust_envelope: Envelope
    model: ModelEntry
    model_dir: Path

    @property
    def models_dir(self) -> Path:
        """The model source directory nodes install from."""
        return self.data_dir / "models"

    def node_dir(self, index: int) -> Path:
        """Return the data directory of node ``index`` (0-based)."""
        return self.data_dir / "nodes" / f"node-{index + 1}"


def _key(path: Path) -> SecretKey:
    if path.exists():
        return load_key_file(path)
    key = generate_key()
    save_key_file(key, path)
    return key


def _pick_preset(preset: str | None) -> str:
    from resultity_runtime import _presets

    if preset is not None:
        if preset not in _presets.PRESETS:
            raise ValueError(f"preset: unknown {preset!r} (use one of "
                             f"{', '.join(_presets.PRESETS)})")
        return preset
    return "demo" if "demo" in _presets.PRESETS else "tiny"


def _make_model(models_dir: Path, preset: str, log: Log) -> Path:
    from resultity_runtime import init_model_dir

    path = models_dir / preset / MODEL_VERSION
    if (path / _DONE).is_file():
        log(f"using the {preset} model cached in {path}")
        return path
    log(f"creating the {preset} model in {path} (once; cached for the next runs)")
    init_model_dir(path, preset, 0, force=True)
    (path / _DONE).write_text(preset + "\n")
    return path


def prepare_demo(options: DemoOptions, log: Log = _stderr) -> DemoFiles:
    """Create (or reuse) the keys, trust root, model and node directories of a demo.

    Blocking; imports the runtime to create the model. Returns the prepared files. Raises
    OSError when the directory cannot be written and ValueError for an unknown preset.
    """
    from resultity_servers.node import model_entry_for_dir

    data = options.data_dir
    for sub in ("", "keys", "models", "network", "nodes"):
        (data / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    root_key = _key(data / "keys" / "root.key")
    config_key = _key(data / "keys" / "config.key")
    account_key = _key(data / "keys" / "account.key")
    trust_path = data / "trust.json"
    now = int(time.time())
    envelope: Envelope | None = None
    if trust_path.exists():
        envelope = Envelope.from_payload(json.loads(trust_path.read_text()))
        trust = TrustRoot.from_payload(envelope.signed)
        if trust.is_expired(now + 30 * _DAY):
            envelope = None
    if envelope is None:
        root_public = [root_key.public_key]
        trust = make_root(version=1, expires_at=now + 365 * _DAY, role_keys={
            "root": root_public, "config": [config_key.public_key],
            "release": root_public, "network": root_public})
        envelope = sign_envelope(trust.to_payload(), [root_key])
        trust_path.write_text(json.dumps(envelope.to_payload(), indent=2) + "\n")
    trust = TrustRoot.from_payload(envelope.signed)
    preset = _pick_preset(options.preset)
    model_dir = _make_model(data / "models", preset, log)
    entry = model_entry_for_dir(model_dir, preset, MODEL_VERSION, PRICE)
    files = DemoFiles(data, root_key, config_key, account_key, trust, envelope, entry, model_dir)
    for index in range(options.nodes):
        prepare_node_dir(files, index, now)
    return files


def prepare_node_dir(files: DemoFiles, index: int, now: int) -> Path:
    """Write node ``index``'s key (once), a fresh 30-day grant from the operator account and
    the trust root; return its directory."""
    path = files.node_dir(index)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _key(path / "node.key")
    grant = sign_grant(NodeGrant(OPERATOR_ACCOUNT, key.public_key, now - 60, now + 30 * _DAY),
                       files.account_key)
    (path / "grant.json").write_text(json.dumps(grant.to_payload(), indent=2) + "\n")
    (path / "root.json").write_text(json.dumps(files.trust_envelope.to_payload(), indent=2))
    return path


def demo_node_config(files: DemoFiles, network_url: str, now: int, version: int) -> Envelope:
    """Return the NodeConfig approving the demo model, signed by the config key."""
    config = NodeConfig(
        version=version, issued_at=now - 60, expires_at=now + 30 * _DAY,
        models=(files.model,),
        runtime=RuntimeParams("auto", max_batch_size=8, max_model_len=2048,
                              kv_cache_bytes=64 << 20),
        network=NetworkParams((network_url,), heartbeat_interval_ms=1_000,
                              lease_timeout_ms=20_000, request_timeout_ms=30_000),
        participation=Participation(accept_jobs=True, max_concurrent_jobs=8,
                                    drain_timeout_ms=10_000),
        resources=Resources(max_memory_bytes=0, max_disk_bytes=0, max_cpu_threads=0),
    )
    return sign_envelope(config.to_payload(), [files.config_key])
