"""An update whose new Runtime crashes, never starts, sends garbage or cannot load is not
switched to: the old Runtime keeps serving, the reason is reported, and the release is not
applied. Slow: one wheel is built and installed (once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_servers_update_harness import make_world, running, sign_release, submit, until

from resultity_core import JobState
from resultity_servers.cli._cmd_release import build_wheel
from resultity_servers.node import install_environment

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
BAD = Path(__file__).with_name("test_servers_sandbox_badruntime.py")
VERSION = "0.9.3"


@pytest.fixture(scope="module")
def release_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel, and a runtimes/ directory with it installed (copied into each node)."""
    out = tmp_path_factory.mktemp("rollback")
    wheel = build_wheel(VERSION, out / "dist", timeout_s=240)
    install_environment(out / "runtimes", VERSION, [wheel])
    return wheel, out / "runtimes"


@pytest.mark.parametrize(("mode", "why"), [
    ("crash_always", "runtime died"),
    ("exit_at_start", "runtime exited (5)"),
    ("garbage", "bad frame"),
    ("bad_load", "no such model"),
])
async def test_a_release_whose_runtime_fails_is_not_switched_to(
        tmp_path: Path, release_env: tuple[Path, Path], mode: str, why: str) -> None:
    wheel, runtimes = release_env
    world = make_world(tmp_path)
    shutil.copytree(runtimes, world.data / "runtimes", symlinks=True)
    data = wheel.read_bytes()
    async with running(world, mode=mode, script=BAD, prove_timeout_s=3) as run:
        old = run.agent.fleet.runtimes["echo"]
        await run.publish(sign_release(world, 1, [(wheel.name, data)], world.release_keys,
                                       runtime_version=VERSION), [data])
        await until(lambda: "failed" in run.status(), timeout=30)
        status = run.status()
        assert status.startswith(f"release v1 failed, staying on {run.agent.code_version}")
        assert why in status
        assert run.agent.fleet.runtimes["echo"] is old
        assert old.supervisor.spec.python is None
        assert run.agent.trust.release is None
        assert not (world.data / "runtimes" / "current.json").exists()
        await until(lambda: run.routes.statuses.get(run.agent.node_id, {})
                    .get("update_status") == status)
        job = submit(run, "the old runtime still serves", 3)
        await until(lambda: run.app.coordinator.get_job(job).state == JobState.DONE)
        await until(lambda: not run.agent.fleet.draining)  # no new Runtime left behind
    starts = [line for line in world.log.read_text().splitlines() if line.startswith("start")]
    assert len(starts) >= 2  # the new Runtime was really started (and given up)
