"""``resultity release build|sign|publish|publish-root`` against a running Network."""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

from resultity_core import Envelope, TrustRoot, load_trusted_root
from resultity_servers.cli import main
from resultity_servers.network import CoordinatorSettings, NetworkSettings, running_network
from resultity_servers.network._app_releases import release_routes

TOKEN = "svc-release-cli"
REPO = Path(__file__).resolve().parents[2]
NOW = int(time.time())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    for name in ("root", "config", "r1", "r2", "root2"):
        assert main(["keys", "generate", str(tmp_path / f"{name}.key")]) == 0
    assert main(["trust", "init", "--out", str(tmp_path / "trust.json"), "--now", str(NOW),
                 "--root-key", str(tmp_path / "root.key"),
                 "--config-key", str(tmp_path / "config.key"),
                 "--release-key", str(tmp_path / "r1.key"),
                 "--release-key", str(tmp_path / "r2.key"), "--release-threshold", "2"]) == 0
    capsys.readouterr()
    return tmp_path


@pytest.fixture
def network(keys: Path) -> Iterator[tuple[str, Path, object]]:
    (keys / "token").write_text(TOKEN + "\n")
    env = Envelope.from_payload(json.loads((keys / "trust.json").read_text()))
    root: TrustRoot = load_trusted_root(env, NOW)
    settings = NetworkSettings(port=0, service_token=TOKEN,
                               coordinator=CoordinatorSettings(trust_root=root))
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(
            running_network(settings)) as (server, app):
        yield f"http://127.0.0.1:{server.port}", keys / "token", app


def test_build_patches_a_copy_and_leaves_the_tree_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (REPO / "pyproject.toml").read_bytes()
    status, out, _ = _run(["release", "build", "--version", "3.4.5", "--out",
                           str(tmp_path)], capsys)
    assert status == 0
    wheel = tmp_path / "resultity-3.4.5-py3-none-any.whl"
    assert f"built {wheel}" in out
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read("resultity-3.4.5.dist-info/METADATA").decode()
        names = zf.namelist()
    assert "Version: 3.4.5" in metadata
    assert "resultity_servers/node/_updates.py" in names
    assert not any("__pycache__" in n for n in names)
    assert (REPO / "pyproject.toml").read_bytes() == before
    status, _, err = _run(["release", "build", "--version", "not a version", "--out",
                           str(tmp_path)], capsys)
    assert status != 0
    assert "PEP 440" in err


def test_sign_checks_the_threshold_and_publish_uploads(
        network: tuple[str, Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    url, token, app = network
    d = token.parent
    wheel = d / "resultity-9.0.0-py3-none-any.whl"
    wheel.write_bytes(b"pretend wheel")
    sign = ["release", "sign", str(wheel), "--trust", str(d / "trust.json"), "--version", "2",
            "--agent-version", "9.0.0", "--out", str(d / "rel.json"), "--now", str(NOW)]
    status, _, err = _run([*sign, "--key", str(d / "r1.key")], capsys)
    assert status != 0
    assert "would be refused by nodes" in err
    assert "ThresholdNotMet" in err or "threshold" in err
    assert not (d / "rel.json").exists()
    status, out, _ = _run([*sign, "--key", str(d / "r1.key"), "--key", str(d / "r2.key")],
                          capsys)
    assert status == 0
    assert "wrote release v2" in out
    manifest = json.loads((d / "rel.json").read_text())
    assert manifest["signed"]["artifacts"][0]["size"] == len(b"pretend wheel")
    net = ["--network", url, "--service-token-file", str(token)]
    status, _, err = _run(["release", "publish", "--manifest", str(d / "rel.json"), *net],
                          capsys)
    assert status != 0
    assert "was not uploaded" in err
    status, out, _ = _run(["release", "publish", "--manifest", str(d / "rel.json"),
                           str(wheel), *net], capsys)
    assert status == 0
    assert "published release v2" in out
    routes = release_routes(app)  # type: ignore[arg-type]
    assert routes is not None
    assert routes.desk.release is not None
    assert routes.desk.release.version == 2
    routes.statuses["a" * 64] = {"version": "9.0.0", "update_status": "running release v2"}
    status, out, _ = _run(["release", "nodes", *net], capsys)
    assert status == 0
    assert out.strip() == "aaaaaaaaaaaa  9.0.0  running release v2"


def test_publish_root_rotates_the_networks_root(
        network: tuple[str, Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    url, token, app = network
    d = token.parent
    assert main(["trust", "rotate", "--current", str(d / "trust.json"), "--out",
                 str(d / "trust2.json"), "--old-key", str(d / "root.key"), "--root-key",
                 str(d / "root2.key"), "--now", str(NOW)]) == 0
    net = ["--network", url, "--service-token-file", str(token)]
    status, out, _ = _run(["release", "publish-root", str(d / "trust2.json"), *net], capsys)
    assert status == 0
    assert "published trust root v2" in out
    status, _, err = _run(["release", "publish-root", str(d / "trust2.json"), *net], capsys)
    assert status != 0
    assert "refused" in err
    assert app.coordinator.settings.trust_root.version == 2  # type: ignore[attr-defined]
