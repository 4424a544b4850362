"""An update end to end on 127.0.0.1: two wheels of this repository are built, signed and
published; the node installs each into a new environment, proves a Runtime started from it
and switches with no failed request (a job running across the switch completes on the old
Runtime). Slow: building wheels and installing them takes seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import attrs
import pytest
from test_servers_update_harness import (
    WHEEL_VERSIONS,
    Running,
    World,
    make_world,
    running,
    sign_release,
    submit,
    until,
)

from resultity_core import JobState, RuntimeParams
from resultity_servers.cli._cmd_release import build_wheel
from resultity_servers.network import AdminRequestError
from resultity_servers.node import model_entry_for_dir

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WRAPPER = Path(__file__).with_name("test_servers_sandbox_badruntime.py")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    built = {v: build_wheel(v, out, timeout_s=240) for v in WHEEL_VERSIONS}
    assert [p.name for p in built.values()] == [
        f"resultity-{v}-py3-none-any.whl" for v in WHEEL_VERSIONS]
    return built


def _cmdline(pid: int | None) -> list[str]:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def _release(run: Running, world: World, version: int, wheel: Path, rv: str) -> None:
    data = wheel.read_bytes()
    await run.publish(sign_release(world, version, [(wheel.name, data)], world.release_keys,
                                   runtime_version=rv), [data])


async def test_a_node_updates_twice_without_a_failed_request(
        tmp_path: Path, wheels: dict[str, Path]) -> None:
    world = make_world(tmp_path)
    first, second = WHEEL_VERSIONS
    runtimes = world.data / "runtimes"
    async with running(world, interval_s=0.2, script=WRAPPER) as run:
        await _release(run, world, 1, wheels[first], first)
        await until(lambda: run.agent.version == first, timeout=120)
        served = run.agent.fleet.runtimes["echo"]
        python = runtimes / first / "venv" / "bin" / "python"
        assert served.supervisor.spec.python == str(python)
        await until(lambda: served.supervisor.pid is not None)
        assert _cmdline(served.supervisor.pid)[0] == str(python)
        assert run.status() == f"running release v1 ({first})"
        # A job running across the second switch completes on the old Runtime.
        long = submit(run, "one job that runs across the switch", 300)
        await until(lambda: served.users == 1)
        await _release(run, world, 2, wheels[second], second)
        await until(lambda: run.agent.version == second, timeout=120)
        assert run.app.coordinator.get_job(long).state != JobState.DONE  # still running
        assert served.supervisor.state == "ready"  # draining, not stopped
        after = submit(run, "taken by the new runtime", 3)
        await until(lambda: run.app.coordinator.get_job(after).state == JobState.DONE)
        await until(lambda: run.app.coordinator.get_job(long).state == JobState.DONE, 30)
        assert run.app.coordinator.get_job(long).completion_tokens == 300
        await until(lambda: served.supervisor.state == "stopped")
        new = run.agent.fleet.runtimes["echo"]
        assert _cmdline(new.supervisor.pid)[0] == str(runtimes / second / "venv" / "bin"
                                                       / "python")
        # The Network refuses to go back; the node reported its version and status.
        with pytest.raises(AdminRequestError, match="older"):
            await _release(run, world, 1, wheels[first], first)
        report = run.routes.statuses[run.agent.node_id]
        assert report["version"] == second
        assert report["update_status"] == f"running release v2 ({second})"
    current = json.loads((runtimes / "current.json").read_text())
    assert current == {"version": second, "release": 2,
                       "python": str(runtimes / second / "venv" / "bin" / "python")}
    state = json.loads((world.data / "trust-state.json").read_text())
    assert state["release"]["signed"]["version"] == 2
    # Each Runtime imported the code of its own environment (not the Agent's).
    imports = [line.split() for line in world.log.read_text().splitlines()
               if line.startswith("imports")]
    assert [v for _, v, _ in imports] == [run.agent.code_version, first, second]
    for _, version, path in imports[1:]:
        assert path.startswith(str(runtimes / version / "venv"))
    # Restarted, the node starts its Runtime from the installed release at once.
    async with running(world, interval_s=0.2, script=WRAPPER) as run:
        assert run.agent.version == second
        served = run.agent.fleet.runtimes["echo"]
        assert served.supervisor.spec.python == current["python"]
        job = submit(run, "after a restart", 3)
        await until(lambda: run.app.coordinator.get_job(job).state == JobState.DONE)
    last = [line for line in world.log.read_text().splitlines() if line.startswith("imports")]
    assert last[-1].split()[1] == second


async def test_the_real_runtime_updates_with_no_failed_request(
        tmp_path: Path, wheels: dict[str, Path]) -> None:
    from resultity_runtime import init_model_dir

    world = make_world(tmp_path)
    init_model_dir(world.data / "models" / "tiny" / "1", "tiny", seed=0)
    entry = model_entry_for_dir(world.data / "models" / "tiny" / "1", "tiny", "1",
                                world.config.models[0].price)
    world.config = attrs.evolve(world.config, models=(entry,),
                                runtime=RuntimeParams("torch", 4, 256, 8 << 20))
    second = WHEEL_VERSIONS[1]
    async with running(world, interval_s=0.2, fake=False) as run:
        await until(lambda: "tiny" in run.agent.ready_models(), timeout=120)
        results: list[str] = []
        done = anyio.Event()

        async def traffic() -> None:
            while not done.is_set():
                job = run.app.coordinator.submit_job(
                    "buyer", "tiny", {"model": "tiny", "prompt": "The network",
                                      "max_tokens": 16, "temperature": 0},
                    prompt_tokens_estimate=10, max_tokens=16, now=time.time())
                run.app.wake()
                await until(lambda j=job.job_id: run.app.coordinator.get_job(j).state  # type: ignore[misc]
                            in (JobState.DONE, JobState.FAILED, JobState.CANCELLED), 60)
                results.append(str(run.app.coordinator.get_job(job.job_id).state))

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            await until(lambda: len(results) >= 1, timeout=60)
            await _release(run, world, 1, wheels[second], second)
            await until(lambda: run.agent.version == second, timeout=240)
            count = len(results)
            await until(lambda: len(results) >= count + 2, timeout=60)
            done.set()
        assert set(results) == {"done"}, results
        served = run.agent.fleet.runtimes["tiny"]
        assert _cmdline(served.supervisor.pid)[1:3] == [
            "-m", "resultity_servers.node._runtime_main"]
        assert _cmdline(served.supervisor.pid)[0].endswith(f"runtimes/{second}/venv/bin/python")
        assert served.supervisor.version == second  # from its ready frame
        assert "PYTHONPATH" not in Path(f"/proc/{served.supervisor.pid}/environ").read_text()


async def test_a_new_agent_version_ends_the_agent_after_its_jobs_for_a_restart(
        tmp_path: Path, wheels: dict[str, Path]) -> None:
    world = make_world(tmp_path)
    second = WHEEL_VERSIONS[1]
    async with running(world, interval_s=0.2, script=WRAPPER) as run:
        assert run.agent.updater is not None
        run.agent.updater.restart_agent = True
        long = submit(run, "a job the restart waits for", 800)
        await until(lambda: run.agent.active)
        await _release(run, world, 1, wheels[second], second)
        await until(lambda: run.agent.updater is not None
                    and run.agent.updater.restart_requested, timeout=120)
        assert not run.agent.can_lease()
        assert not run.restart  # the job is still running
        await until(lambda: run.restart, timeout=30)
        assert run.app.coordinator.get_job(long).state == JobState.DONE
        assert run.app.coordinator.get_job(long).completion_tokens == 800
    assert json.loads((world.data / "runtimes" / "current.json").read_text())["version"] \
        == second
