"""``resultity demo`` as a subprocess: the README's main command."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "import sys; from resultity_servers.cli import main; sys.exit(main())"]


def _demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_demo_once_answers_the_sample_and_exits_0(tmp_path: Path) -> None:
    data = str(tmp_path / "demo")
    first = _demo("--once", "--port", "0", "--data-dir", data)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert re.fullmatch(r"Resultity cloud ready at http://127\.0\.0\.1:\d+/v1", lines[0])
    assert re.fullmatch(r"API key: rk-\S+", lines[1])
    answer = first.stdout.split("> What does the Network do in Resultity?\n", 1)[1]
    assert answer.strip(), "the sample request streamed no text"
    if "model: demo" in lines:  # the trained demo model answers about its own network
        assert "network" in answer.lower()
    assert "creating the" in first.stderr
    assert "ready" in first.stderr
    assert "sample answered" in first.stderr
    # a second run reuses the model and the state, and takes the given API key
    second = _demo("--once", "--port", "0", "--data-dir", data, "--api-key", "rk-given-key")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "API key: rk-given-key" in second.stdout.splitlines()
    assert "using the" in second.stderr
    assert "cached" in second.stderr


def test_demo_refuses_a_taken_port_before_doing_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _demo("--once", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                       timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"resultity: error: port {port} is already in use (another demo or cloud?); pass "
        "--port N, or --port 0 for a free one"]
    assert not (tmp_path / "d").exists()


def test_demo_checks_its_arguments(tmp_path: Path) -> None:
    result = _demo("--api-key", "sk-wrong", "--data-dir", str(tmp_path / "d"), timeout=60)
    assert result.returncode == 2
    assert "rk-" in result.stderr
