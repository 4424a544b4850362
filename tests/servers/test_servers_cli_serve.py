"""``resultity network|cloud|node serve``, ``account`` and ``node model-entry`` commands."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from resultity_core import (
    Envelope,
    NodeConfig,
    example_node_config,
    generate_key,
    save_key_file,
    verify_grant,
)
from resultity_servers.cli import main
from resultity_servers.network import Coordinator, NetworkSettings, running_network

TOKEN = "svc-cli-test-token"
CLI = [sys.executable, "-c", "import sys; from resultity_servers.cli import main; sys.exit(main())"]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[BlockingPortal, Coordinator, str, Path]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = NetworkSettings(port=0, service_token=TOKEN)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(
            running_network(settings)) as (server, app):
        yield portal, app.coordinator, f"http://127.0.0.1:{server.port}", token_file


@pytest.mark.parametrize("argv", [
    ["network", "serve", "--help"], ["network", "publish", "--help"],
    ["cloud", "serve", "--help"], ["node", "serve", "--help"],
    ["node", "model-entry", "--help"], ["account", "--help"], ["account", "create", "--help"],
    ["account", "credit", "--help"], ["account", "grant", "--help"], ["demo", "--help"],
])
def test_help_explains_each_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert len(out) > 200
    if argv[0] == "account" and "grant" not in argv:
        assert "micro-credits" in out
    if argv[:2] == ["cloud", "serve"]:
        assert "8000" in out
        assert "127.0.0.1" in out


def test_a_port_in_use_is_one_clear_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = main(["network", "serve", "--port", str(port), "--data-dir", str(tmp_path),
                       "--log-level", "error"])
    assert status == 1
    line = _error_line(capsys)
    assert f"port {port}" in line
    assert "already in use" in line
    assert "--port" in line


def test_cloud_needs_a_token_and_a_reachable_network(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESULTITY_SERVICE_TOKEN", raising=False)
    missing = tmp_path / "nope"
    assert main(["cloud", "serve", "--service-token-file", str(missing)]) == 1
    assert "no such file" in _error_line(capsys)
    monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", TOKEN)
    assert main(["cloud", "serve", "--port", "0", "--network", "http://127.0.0.1:9",
                 "--log-level", "error"]) == 1
    assert "cannot reach the network at http://127.0.0.1:9" in _error_line(capsys)


def test_node_reports_missing_files_and_an_unreachable_network(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "serve", "--data-dir", str(tmp_path / "n"), "--log-level",
                 "error"]) == 1
    line = _error_line(capsys)
    assert "node.key" in line
    assert "no such file" in line
    key = generate_key()
    save_key_file(key, tmp_path / "n" / "node.key")
    assert main(["node", "serve", "--data-dir", str(tmp_path / "n")]) == 1
    assert "grant" in _error_line(capsys)


def test_account_commands_against_a_running_network(
        network: tuple[BlockingPortal, Coordinator, str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    portal, coordinator, url, token_file = network
    common = ["--network", url, "--service-token-file", str(token_file)]
    owner = generate_key()
    save_key_file(owner, tmp_path / "alice.key")
    assert main(["account", "create", "--id", "alice", "--credits", "2500000",
                 "--public-key", str(tmp_path / "alice.key"), *common]) == 0
    out = capsys.readouterr().out
    key = re.search(r"API key: (rk-\S+)", out)
    assert key is not None
    assert "2,500,000 micro-credits (2.5 credits)" in out
    assert portal.call(coordinator.authenticate, key.group(1)) == "alice"
    assert main(["account", "credit", "alice", "500000", *common]) == 0
    assert "3,000,000 micro-credits" in capsys.readouterr().out
    assert main(["account", "list", "--json", *common]) == 0
    rows = {r["account_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alice"]["balance"] == 3_000_000
    assert main(["account", "key", "alice", *common]) == 0
    second = re.search(r"API key: (rk-\S+)", capsys.readouterr().out)
    assert second is not None
    assert second.group(1) != key.group(1)
    assert portal.call(coordinator.authenticate, second.group(1)) == "alice"
    # errors: unknown account, wrong token, bad amount
    assert main(["account", "credit", "nobody", "5", *common]) == 1
    assert "404" in _error_line(capsys)
    (tmp_path / "wrong").write_text("svc-wrong\n")
    assert main(["account", "list", "--network", url, "--service-token-file",
                 str(tmp_path / "wrong")]) == 1
    assert "401" in _error_line(capsys)
    assert main(["account", "credit", "alice", "0", *common]) == 1
    assert "positive" in _error_line(capsys)


def test_account_grant_signs_a_grant_the_network_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    owner, node = generate_key(), generate_key()
    save_key_file(owner, tmp_path / "owner.key")
    save_key_file(node, tmp_path / "node.key")
    assert main(["account", "grant", "--account", "alice", "--account-key",
                 str(tmp_path / "owner.key"), "--node-key", str(tmp_path / "node.key"),
                 "--out", str(tmp_path / "grant.json")]) == 0
    envelope = Envelope.from_payload(json.loads((tmp_path / "grant.json").read_text()))
    grant = verify_grant(envelope, owner.public_key, int(time.time()))
    assert grant.account_id == "alice"
    assert grant.node_public == node.public_key
    capsys.readouterr()


def test_unreachable_network_for_account_commands(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t").write_text(TOKEN)
    assert main(["account", "list", "--network", "http://127.0.0.1:9",
                 "--service-token-file", str(tmp_path / "t")]) == 1
    assert "cannot reach the network" in _error_line(capsys)


def test_model_entry_fills_a_config_that_signs(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    (model / ".hidden").write_text("skip me")
    payload = tmp_path / "config.json"
    payload.write_text(json.dumps(example_node_config(now=int(time.time())).to_payload()))
    assert main(["node", "model-entry", str(model), "--name", "tiny", "--config",
                 str(payload)]) == 0
    config = NodeConfig.from_payload(json.loads(payload.read_text()))
    (entry,) = config.models
    assert {(f.path, f.size) for f in entry.files} == {("config.json", 2), ("weights.bin", 1000)}
    assert entry.files[1].sha256 == (
        "sha256:" + __import__("hashlib").sha256(b"\x01" * 1000).hexdigest())
    capsys.readouterr()


def test_network_serve_runs_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen([*CLI, "network", "serve", "--port", "0", "--log-level", "error"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.match(r"resultity network listening on http://127\.0\.0\.1:\d+ ", line), line
        token = tmp_path / "xdg" / "resultity" / "network" / "service-token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "xdg" / "resultity" / "network" / "network.db").exists()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "stopped (SIGTERM)" in err


def test_the_demo_package_imports_without_torch() -> None:
    code = ("import sys, resultity_servers.demo as d, resultity_servers.cli._cmd_demo; "
            "assert 'torch' not in sys.modules; print(len(d.__all__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    import resultity_servers.demo as demo

    assert int(result.stdout) == len(demo.__all__)
    assert all(hasattr(demo, name) for name in demo.__all__)


def test_node_serve_exits_with_the_restart_status_after_an_agent_update(
        network: tuple[BlockingPortal, Coordinator, str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # a supervisor restarts the node on status 75 (deploy/node-entrypoint.sh); 1 means failure
    import resultity_servers.node as node_pkg

    _portal, _coordinator, url, _token = network

    class _Transport:
        async def aclose(self) -> None:
            return None

    class _Agent:
        node_id = "f" * 64
        transport = _Transport()

        async def run(self) -> None:
            raise node_pkg.AgentRestartRequired("release 0.2.0 installed; restart to run it")

    monkeypatch.setattr(node_pkg, "build_agent", lambda settings: _Agent())
    status = main(["node", "serve", "--network", url, "--data-dir", str(tmp_path / "n"),
                   "--log-level", "error"])
    assert status == node_pkg.RESTART_EXIT_CODE == 75
    assert "restart to run it" in capsys.readouterr().err
