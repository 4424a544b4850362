"""Model installation: sha256 and size checks, staging, the marker, sources, the node dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import pytest

from resultity_core import (
    ModelEntry,
    ModelFile,
    NodeGrant,
    Price,
    generate_key,
    load_key_file,
    make_root,
    sign_envelope,
    sign_grant,
)
from resultity_servers.node import (
    LocalDirectorySource,
    ModelInstallError,
    NodeSettings,
    build_agent,
    install_model,
    installed_path,
    model_entry_for_dir,
    prepare_node_dir,
)


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models" / "org/echo" / "2"
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(bytes(range(256)) * 9000)  # 2.3 MB: several chunks
    (root / "sub" / "tokenizer.model").write_bytes(b"tok")
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_bytes(b"not part of the model")
    return root


@pytest.fixture
def entry(source_dir: Path) -> ModelEntry:
    return model_entry_for_dir(source_dir, "org/echo", "2", Price(1, 2))


def test_entry_for_dir_lists_every_visible_file(source_dir: Path, entry: ModelEntry) -> None:
    assert [f.path for f in entry.files] == ["empty.txt", "sub/tokenizer.model", "weights.bin"]
    weights = entry.files[2]
    data = (source_dir / "weights.bin").read_bytes()
    assert weights.size == len(data)
    assert weights.sha256 == "sha256:" + hashlib.sha256(data).hexdigest()


def test_install_copies_checked_files_and_reports_progress(tmp_path: Path, source_dir: Path,
                                                           entry: ModelEntry) -> None:
    seen: list[tuple[str, int, int]] = []
    dest = install_model(entry, LocalDirectorySource(tmp_path / "models"), tmp_path / "inst",
                         progress=lambda _m, path, done, total: seen.append((path, done, total)))
    assert dest == installed_path(tmp_path / "inst", entry) == tmp_path / "inst" / "org--echo" / "2"
    for f in entry.files:
        assert (dest / f.path).read_bytes() == (source_dir / f.path).read_bytes()
    assert not (dest / ".hidden").exists()
    weights = [(d, t) for p, d, t in seen if p == "weights.bin"]
    assert len(weights) >= 3
    assert weights[-1] == (entry.files[2].size, entry.files[2].size)
    assert ("empty.txt", 0, 0) in seen
    # installed once: a second call neither reads the source nor hashes again
    seen.clear()
    assert install_model(entry, LocalDirectorySource(tmp_path / "nowhere"), tmp_path / "inst",
                         progress=lambda *a: seen.append(a)) == dest  # type: ignore[arg-type]
    assert seen == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "sha256:" + "0" * 64}, "sha256"),
        ({"size": 10}, "larger than"),
        ({"size": 10**9}, "has 2304000 bytes"),
        ({"path": "missing.bin"}, "not found"),
    ],
)
def test_a_mismatch_installs_nothing(tmp_path: Path, entry: ModelEntry,
                                     change: dict[str, object], message: str) -> None:
    bad = attrs.evolve(entry, files=(*entry.files[:2], attrs.evolve(entry.files[2], **change)))
    with pytest.raises(ModelInstallError, match=message):
        install_model(bad, LocalDirectorySource(tmp_path / "models"), tmp_path / "inst")
    parent = tmp_path / "inst" / "org--echo"
    assert not (parent / "2").exists()
    assert [p.name for p in parent.iterdir()] == []  # staging removed


def test_a_changed_entry_is_installed_again(tmp_path: Path, source_dir: Path,
                                            entry: ModelEntry) -> None:
    source = LocalDirectorySource(tmp_path / "models")
    dest = install_model(entry, source, tmp_path / "inst")
    (dest / "weights.bin").write_bytes(b"corrupted")  # size no longer matches: re-installed
    install_model(entry, source, tmp_path / "inst")
    assert (dest / "weights.bin").read_bytes() == (source_dir / "weights.bin").read_bytes()


def test_source_falls_back_to_the_unversioned_directory(tmp_path: Path) -> None:
    (tmp_path / "m" / "plain").mkdir(parents=True)
    (tmp_path / "m" / "plain" / "a.bin").write_bytes(b"abc")
    entry = ModelEntry("plain", "7", (ModelFile(
        "a.bin", "sha256:" + hashlib.sha256(b"abc").hexdigest(), 3),), Price(0, 0))
    dest = install_model(entry, LocalDirectorySource(tmp_path / "m"), tmp_path / "inst")
    assert (dest / "a.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("name", ["a/../../etc", "a//b", "./x"])
def test_model_names_cannot_escape_the_directory(tmp_path: Path, name: str) -> None:
    entry = ModelEntry(name, "1", (ModelFile("a", "sha256:" + "0" * 64, 0),), Price(0, 0))
    with pytest.raises(ModelInstallError, match="cannot name a directory"):
        install_model(entry, LocalDirectorySource(tmp_path), tmp_path / "inst")


def test_prepare_node_dir_writes_what_build_agent_reads(tmp_path: Path) -> None:
    key, account, root_key = generate_key(), generate_key(), generate_key()
    grant = sign_grant(NodeGrant("acct", key.public_key, 0, 2**40), account)
    root = make_root(version=1, expires_at=2**40, role_keys={
        r: [root_key.public_key] for r in ("root", "config", "release", "network")})
    root_env = sign_envelope(root.to_payload(), [root_key])
    data = tmp_path / "node"
    prepare_node_dir(data, node_key=key, grant=grant, trust_root=root_env)
    assert load_key_file(data / "node.key") == key
    assert (data / "node.key").stat().st_mode & 0o777 == 0o600
    agent = build_agent(NodeSettings("http://127.0.0.1:9", data))
    assert agent.node_id == key.keyid
    assert agent.trust.root == root
    assert json.loads((data / "trust-state.json").read_text())["node_id"] == key.keyid


def test_node_settings_make_relative_paths_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the Runtime child runs in its own working directory: no path may stay relative
    monkeypatch.chdir(tmp_path)
    settings = NodeSettings("http://127.0.0.1:9", "node", key_path="keys/node.key",
                            models_dir="models")
    assert settings.data_dir == tmp_path / "node"
    assert settings.key_path == tmp_path / "keys" / "node.key"
    assert settings.models_dir == tmp_path / "models"
    assert settings.grant_path is None
    assert settings.path(settings.grant_path, "grant.json") == tmp_path / "node" / "grant.json"


def test_build_agent_refuses_a_grant_for_another_key(tmp_path: Path) -> None:
    key, other, account, root_key = (generate_key() for _ in range(4))
    root = make_root(version=1, expires_at=2**40, role_keys={
        r: [root_key.public_key] for r in ("root", "config", "release", "network")})
    prepare_node_dir(tmp_path, node_key=key,
                     grant=sign_grant(NodeGrant("acct", other.public_key, 0, 2**40), account),
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    with pytest.raises(Exception, match="not this node's key"):
        build_agent(NodeSettings("http://127.0.0.1:9", tmp_path))
