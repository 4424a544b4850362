"""Model version transitions driven by a new NodeConfig: the new version takes new jobs once
ready, the old one drains (a job running across the switch completes) and is removed; a model
no longer approved is drained and unloaded."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from test_servers_update_harness import make_world, running, submit, until

from resultity_core import JobState, sign_envelope
from resultity_servers.node import model_entry_for_dir

pytestmark = pytest.mark.anyio


async def test_a_new_model_version_takes_new_jobs_while_the_old_drains(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    (world.data / "models" / "echo" / "2").mkdir()
    (world.data / "models" / "echo" / "2" / "weights.bin").write_bytes(b"v" * 1000)
    entry = model_entry_for_dir(world.data / "models" / "echo" / "2", "echo", "2",
                                world.config.models[0].price)
    v2 = attrs.evolve(world.config, version=2, models=(entry,))
    v3 = attrs.evolve(world.config, version=3, models=())
    async with running(world) as run:
        old = run.agent.fleet.runtimes["echo"]
        long = submit(run, "a long job crossing the switch", 150)
        await until(lambda: old.users == 1)
        run.app.coordinator.publish_config(sign_envelope(v2.to_payload(), [world.config_key]),
                                           world.now)
        run.app.wake()
        await until(lambda: run.agent.fleet.runtimes["echo"].entry.version == "2")
        assert old in run.agent.fleet.draining  # the old one still runs the long job
        assert old.supervisor.state == "ready"
        short = submit(run, "on the new version", 3)
        await until(lambda: run.app.coordinator.get_job(short).state == JobState.DONE)
        await until(lambda: run.app.coordinator.get_job(long).state == JobState.DONE, 30)
        assert run.app.coordinator.get_job(long).completion_tokens == 150
        await until(lambda: old.supervisor.state == "stopped")
        assert not (world.data / "installed" / "echo" / "1").exists()
        assert (world.data / "installed" / "echo" / "2").exists()
        new = run.agent.fleet.runtimes["echo"]
        run.app.coordinator.publish_config(sign_envelope(v3.to_payload(), [world.config_key]),
                                           world.now)
        run.app.wake()
        await until(lambda: "echo" not in run.agent.fleet.runtimes)
        await until(lambda: new.supervisor.state == "stopped")
        assert not (world.data / "installed" / "echo" / "2").exists()
    lines = world.log.read_text().splitlines()
    assert sum(line.startswith("start") for line in lines) == 2  # old and new, no restarts
