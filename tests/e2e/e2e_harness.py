"""Helpers for the end-to-end tests: real servers on 127.0.0.1 in a background event loop.

``demo_in_thread`` runs ``running_demo`` (Network, Cloud, in-process Agents with Runtime child
processes) in a blocking portal so that the synchronous ``openai`` client can talk to it from
the test thread. ``Cluster`` runs the Network and the Cloud on fixed ports (so they can be
restarted) and nodes as real ``resultity node serve`` subprocesses (so they can be killed).
Everything that touches the coordinator goes through ``portal.call`` (its SQLite connection
belongs to the loop thread).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from resultity_core import JobState, NodeState
from resultity_servers.cloud import CloudSettings, running_cloud
from resultity_servers.demo import (
    DEMO_ACCOUNT,
    OPERATOR_ACCOUNT,
    Demo,
    DemoFiles,
    DemoOptions,
    demo_node_config,
    running_demo,
)
from resultity_servers.network import (
    Coordinator,
    CoordinatorSettings,
    JobRecord,
    NetworkSettings,
    running_network,
)

_T = TypeVar("_T")
SERVICE = "svc-e2e-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> float:
    """Poll ``condition`` until true; return the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


@contextmanager
def demo_in_thread(options: DemoOptions, *, ready: int = 1,
                   timeout: float = 120.0) -> Iterator[tuple[BlockingPortal, Demo]]:
    """Run ``running_demo(options)`` in a background loop; yield once ``ready`` nodes serve."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(
            running_demo(options, log=lambda _m: None)) as demo:
        if ready:
            portal.call(demo.wait_ready, timeout, ready)
        yield portal, demo


def jobs_of(portal: BlockingPortal, coordinator: Coordinator, account: str) -> list[JobRecord]:
    def read() -> list[JobRecord]:
        with coordinator.store.transaction() as tx:
            return [j for j in tx.list_jobs(list(JobState)) if j.account_id == account]

    return portal.call(read)


def balance(portal: BlockingPortal, coordinator: Coordinator, account: str) -> tuple[int, int]:
    b = portal.call(coordinator.account_balance, account)
    return b.balance, b.reserved


class Cluster:
    """Network + Cloud on fixed ports in a background loop; nodes as subprocesses."""

    def __init__(self, files: DemoFiles, tmp: Path, *, heartbeat_timeout_s: float = 3.0,
                 check_snapshots: bool = True) -> None:
        self.files = files
        self.tmp = tmp
        self.net_port = free_port()
        self.cloud_port = free_port()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.check_snapshots = check_snapshots
        self.api_key = ""
        self.portal: BlockingPortal | None = None
        self.coordinator: Coordinator | None = None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stack: list[AbstractContextManager[Any]] = []

    @property
    def network_url(self) -> str:
        return f"http://127.0.0.1:{self.net_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.cloud_port}/v1"

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self.portal is not None
        return self.portal.call(fn, *args)

    @asynccontextmanager
    async def _servers(self) -> Any:
        settings = NetworkSettings(
            port=self.net_port, data_dir=str(self.files.data_dir / "network"),
            service_token=SERVICE, tick_interval_s=0.2,
            coordinator=CoordinatorSettings(
                heartbeat_timeout_s=self.heartbeat_timeout_s,
                trust_root=self.files.trust if self.check_snapshots else None),
        )
        async with running_network(settings) as (_server, app):
            self.coordinator = app.coordinator
            async with running_cloud(CloudSettings(
                    port=self.cloud_port, network_url=self.network_url, service_token=SERVICE,
                    auth_cache_ttl_s=0)):
                yield

    def start_servers(self) -> None:
        portal_cm = start_blocking_portal()
        self.portal = portal_cm.__enter__()
        servers = self.portal.wrap_async_context_manager(self._servers())
        servers.__enter__()
        self._stack = [portal_cm, servers]
        if self.call(self.coordinator_current) is None:
            self.publish(1)
            self.call(self._accounts)

    def stop_servers(self) -> None:
        for cm in reversed(self._stack):
            cm.__exit__(None, None, None)
        self._stack = []
        self.portal = None

    def coordinator_current(self) -> Any:
        assert self.coordinator is not None
        return self.coordinator.current_config()

    def _accounts(self) -> None:
        assert self.coordinator is not None
        now = time.time()
        self.coordinator.create_account(now, account_id=OPERATOR_ACCOUNT,
                                        public_key=self.files.account_key.public_key)
        _rec, self.api_key = self.coordinator.create_account(
            now, account_id=DEMO_ACCOUNT, initial_credits=10_000_000)

    def publish(self, version: int, tamper: bool = False) -> str:
        envelope = demo_node_config(self.files, self.network_url, int(time.time()), version)
        payload = envelope.to_payload()
        if tamper:  # changed after signing: the signature no longer matches
            payload["signed"]["participation"]["max_concurrent_jobs"] = 64
        assert self.coordinator is not None
        return self.call(self.coordinator.publish_config, payload, time.time())

    def start_node(self, index: int, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"node-{index + 1}.log").open("wb")
        cmd = [sys.executable, "-c",
               "import sys; from resultity_servers.cli import main; sys.exit(main())",
               "node", "serve", "--network", self.network_url,
               "--data-dir", str(self.files.node_dir(index)),
               "--models-dir", str(self.files.models_dir), "--threads", "1",
               "--log-level", "info", *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.procs[index] = proc
        return proc

    def node_log(self, index: int) -> str:
        return (self.tmp / f"node-{index + 1}.log").read_text(errors="replace")

    def ready_node_ids(self) -> set[str]:
        assert self.coordinator is not None
        nodes = self.call(self.coordinator.list_nodes)
        return {n.node_id for n in nodes if n.state == NodeState.READY}

    def signal_node(self, index: int, signum: int) -> None:
        self.procs[index].send_signal(signum)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        if self._stack:
            self.stop_servers()
