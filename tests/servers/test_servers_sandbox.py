"""Hostile code inside the real Runtime child, started exactly as the Agent starts it.

A ``sitecustomize`` (on the child's PYTHONPATH) wraps ``confine`` so that, right after the
sandbox is applied and before the Runtime speaks, it plays a compromised Runtime: it tries to
connect to a listening socket on 127.0.0.1, to read the node key and the grant, to overwrite
the trust state, to write in its own working directory and to read the Agent's environment
secret; it writes what happened to its working directory.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from pathlib import Path

import anyio
import attrs
import pytest

from resultity_core import (
    NodeGrant,
    generate_key,
    make_root,
    sign_envelope,
    sign_grant,
)
from resultity_servers.node import (
    NodeSettings,
    RuntimeSupervisor,
    build_agent,
    prepare_node_dir,
)
from resultity_servers.node._sandbox import _import_roots

pytestmark = pytest.mark.anyio

PROBE = textwrap.dedent('''
    import json, os, socket
    import resultity_servers.node._sandbox as sandbox

    _confine = sandbox.confine

    def confine(limits):
        report = _confine(limits)
        out = {"report": report}
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", int(os.environ["PROBE_PORT"])))
            out["connect"] = "connected"
        except OSError as exc:
            out["connect"] = type(exc).__name__
        data = os.environ["PROBE_DATA"]
        for name in ("node.key", "grant.json"):
            try:
                out[name] = open(os.path.join(data, name)).read()
            except OSError as exc:
                out[name] = type(exc).__name__
        try:
            open(os.path.join(data, "trust-state.json"), "w").write("{}")
            out["trust_state"] = "written"
        except OSError as exc:
            out["trust_state"] = type(exc).__name__
        out["secret_env"] = os.environ.get("AGENT_SECRET")
        open("probe.json", "w").write(json.dumps(out))
        return report

    sandbox.confine = confine
''')


async def test_a_compromised_runtime_cannot_reach_the_network_or_the_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = int(time.time())
    data = tmp_path / "node"
    key, account, root_key = generate_key(), generate_key(), generate_key()
    grant = sign_grant(NodeGrant("acct", key.public_key, now - 10, now + 3600), account)
    root = make_root(version=1, expires_at=now + 3600, role_keys={
        r: [root_key.public_key] for r in ("root", "config", "release", "network")})
    prepare_node_dir(data, node_key=key, grant=grant,
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("AGENT_SECRET", "must not leak")
    env = {"PYTHONPATH": os.pathsep.join([str(probe_dir), *_import_roots()]),
           "PROBE_PORT": str(server.getsockname()[1]), "PROBE_DATA": str(data)}
    agent = build_agent(NodeSettings(network_url="http://127.0.0.1:9", data_dir=data,
                                     runtime_env=env, update_interval_s=0))
    spec = attrs.evolve(agent.fleet.runtime, workdir=data / "runtime" / "probe",
                        start_timeout_s=60)
    supervisor = RuntimeSupervisor(spec)  # as the Agent starts it, without a model
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run)
            await supervisor.wait_ready(60)
            tg.cancel_scope.cancel()
    finally:
        server.close()
    out = json.loads((spec.workdir / "probe.json").read_text())
    report = out["report"]
    assert report == supervisor.sandbox  # what the Agent was told is what took effect
    assert out["secret_env"] is None  # cleared environment
    assert report["no_new_privs"] is True
    assert report["core_dumps"] is False
    if not report["network_namespace"] or not report["hidden_paths"]:
        pytest.skip(f"this platform allows no namespaces for the Runtime: {report}")
    assert out["connect"] != "connected"
    assert out["node.key"] == ""
    assert out["grant.json"] == ""
    assert out["trust_state"] == "OSError"
    assert json.loads((data / "trust-state.json").read_text())["_type"] == "node-trust-state"
    assert sorted(report["hidden_paths"]) == sorted(
        str(p.resolve()) for p in (data / "node.key", data / "grant.json"))
