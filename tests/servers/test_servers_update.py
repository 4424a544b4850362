"""Releases and root rotations: the Network's checks, and a node refusing bad releases while
it keeps serving (fake Runtime, no wheel builds: see test_servers_update_e2e.py for those)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from test_servers_update_harness import (
    Running,
    World,
    make_world,
    running,
    sign_release,
    submit,
    until,
)

from resultity_core import (
    Envelope,
    JobState,
    NodeTrustState,
    ResultityError,
    RollbackError,
    Signature,
    SignatureVerificationError,
    ThresholdNotMetError,
    generate_key,
    make_root,
    sign_envelope,
)
from resultity_servers.network import AdminRequestError
from resultity_servers.network._release_admin import publish_root, upload_artifact
from resultity_servers.network._releases import ReleaseDesk, ReleaseError, artifact_address

pytestmark = pytest.mark.anyio
WHEEL = "resultity-9.9.9-py3-none-any.whl"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


# ---- the Network's ReleaseDesk ----------------------------------------------------------


def test_the_desk_checks_artifacts_signatures_threshold_and_versions(
        world: World, tmp_path: Path) -> None:
    desk = ReleaseDesk(tmp_path / "desk", world.root)
    data = b"wheel bytes"
    with pytest.raises(ReleaseError, match="hash to"):
        desk.put_artifact(artifact_address(b"other"), data)
    ok = sign_release(world, 2, [(WHEEL, data)], world.release_keys)
    with pytest.raises(ReleaseError, match="was not uploaded"):
        desk.publish_release(ok.to_payload(), world.now)
    desk.put_artifact(artifact_address(data), data)
    with pytest.raises(ThresholdNotMetError):
        desk.publish_release(sign_release(world, 2, [(WHEEL, data)], world.release_keys[:1])
                             .to_payload(), world.now)
    with pytest.raises(SignatureVerificationError):
        desk.publish_release(sign_release(world, 2, [(WHEEL, data)], [world.config_key])
                             .to_payload(), world.now)
    digest = desk.publish_release(ok.to_payload(), world.now)
    assert desk.release is not None
    assert desk.release.version == 2
    with pytest.raises(RollbackError):
        desk.publish_release(sign_release(world, 1, [(WHEEL, data)], world.release_keys)
                             .to_payload(), world.now)
    again = ReleaseDesk(tmp_path / "desk", world.root)  # survives a restart
    assert again.release_envelope is not None
    assert again.release_envelope.digest() == digest
    assert again.artifact(artifact_address(data)) == data


def test_the_desk_accepts_only_a_valid_root_rotation(world: World, tmp_path: Path) -> None:
    desk = ReleaseDesk(tmp_path / "desk", world.root)
    new_root_key = generate_key()
    v2 = make_root(version=2, expires_at=world.now + 86_400, role_keys={
        "root": [new_root_key.public_key], "config": [world.config_key.public_key],
        "release": [world.release_keys[0].public_key], "network": [new_root_key.public_key]})
    with pytest.raises(ResultityError):  # only the new key: the old root did not sign it
        desk.publish_root(sign_envelope(v2.to_payload(), [new_root_key]).to_payload(), world.now)
    desk.publish_root(sign_envelope(v2.to_payload(), [world.root_key, new_root_key])
                      .to_payload(), world.now)
    assert desk.root == v2
    assert [r["signed"]["version"] for r in desk.roots_after(1)] == [2]
    assert ReleaseDesk(tmp_path / "desk", world.root).root == v2  # chain re-checked on start


# ---- a node against a Network that serves bad releases ------------------------------------


async def _serves(run: Running) -> None:
    job = submit(run, "still serving", 3)
    await until(lambda: run.app.coordinator.get_job(job).state == JobState.DONE)


async def _refused(run: Running, marker: str) -> str:
    await until(lambda: marker in run.status())
    status = run.status()
    assert status.startswith("refused release") or "failed" in status
    await until(lambda: run.routes.statuses.get(run.agent.node_id, {})
                .get("update_status") == status)
    supervisor = run.agent.fleet.supervisor("echo")
    assert supervisor is not None
    assert supervisor.spec.python is None  # still the Runtime it started with
    assert run.agent.trust.release is None
    await _serves(run)
    return status


async def test_a_node_refuses_bad_releases_and_keeps_serving(world: World) -> None:
    good, bad = b"the real wheel", b"THE REAL WHEEL"  # same size, other bytes
    async with running(world, trusted_network=False) as run:
        await _serves(run)
        await run.publish(sign_release(world, 1, [(WHEEL, good)], [world.config_key,
                                                                   world.root_key]), [good])
        await _refused(run, "UnknownKeyError")  # signed, but not by release keys
        await run.publish(sign_release(world, 2, [(WHEEL, good)], world.release_keys[:1]),
                          [good])
        await _refused(run, "ThresholdNotMetError")
        signed = sign_release(world, 3, [(WHEEL, good)], world.release_keys)
        forged = Envelope(signed.signed, (Signature(signed.signatures[0].keyid, "00" * 64),
                                          signed.signatures[1]))
        await run.publish(forged, [good])
        await _refused(run, "BadSignatureError")
        await run.publish(sign_release(world, 4, [(WHEEL, good)], world.release_keys,
                                       expires_in=-5), [good])
        await _refused(run, "ExpiredError")
        # Properly signed, but the Network hands out other bytes than the manifest names.
        await upload_artifact(run.admin, good)
        run.routes.desk._artifacts[artifact_address(good)] = bad
        await run.publish(sign_release(world, 5, [(WHEEL, good)], world.release_keys), [])
        status = await _refused(run, "hashes to")
        assert "release v5 failed, staying on" in status
        assert not (world.data / "runtimes" / "9.9.9").exists()


async def test_a_node_refuses_an_older_release_than_the_one_applied(world: World) -> None:
    data = b"wheel"
    trust = NodeTrustState(world.root, node_id=json.loads(
        (world.data / "node.key").read_text())["keyid"])
    trust.apply_release(sign_release(world, 7, [(WHEEL, data)], world.release_keys),
                        now=world.now)
    (world.data / "trust-state.json").write_text(json.dumps(trust.export_state()))
    async with running(world) as run:
        await run.publish(sign_release(world, 6, [(WHEEL, data)], world.release_keys), [data])
        await until(lambda: "RollbackError" in run.status())
        assert run.agent.trust.release is not None
        assert run.agent.trust.release.version == 7
        await _serves(run)


async def test_a_rotated_root_reaches_the_node_before_what_its_new_keys_sign(
        world: World) -> None:
    new_root, new_config, new_release = generate_key(), generate_key(), generate_key()
    v2 = make_root(version=2, expires_at=world.now + 86_400, role_keys={
        "root": [new_root.public_key], "config": [new_config.public_key],
        "release": [new_release.public_key], "network": [new_root.public_key]})
    async with running(world) as run:
        await publish_root(run.admin, sign_envelope(v2.to_payload(),
                                                    [world.root_key, new_root]))
        await until(lambda: run.agent.trust.root.version == 2)
        state = json.loads((world.data / "trust-state.json").read_text())
        assert state["root"]["version"] == 2
        # The old release keys no longer count, on the Network or on the node.
        data = b"not really a wheel"
        await upload_artifact(run.admin, data)
        with pytest.raises(AdminRequestError):
            await run.publish(sign_release(world, 1, [(WHEEL, data)], world.release_keys), [])
        # A snapshot signed by the new config key is accepted by both.
        config = attrs.evolve(world.config, version=2)
        run.app.coordinator.publish_config(
            sign_envelope(config.to_payload(), [new_config]), world.now)
        run.app.wake()
        await until(lambda: run.agent.trust.current is not None
                    and run.agent.trust.current.version == 2)
        # A release signed by the new release key passes verification (it then fails to
        # install: these bytes are no wheel) and the node stays on its Runtime.
        await run.publish(sign_release(world, 1, [(WHEEL, data)], [new_release]), [])
        await until(lambda: "release v1 failed" in run.status(), timeout=60)
        assert "pip install" in run.status()
        await _serves(run)
