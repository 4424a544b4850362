"""Running the demo: the Network, the Cloud and N nodes in one process, and the command."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
import anyio.abc
import attrs

from resultity_core import ResultityError
from resultity_servers._http import HTTPClient
from resultity_servers.cloud import CloudSettings, running_cloud
from resultity_servers.network import (
    ApiKeyRecord,
    Coordinator,
    CoordinatorSettings,
    NetworkSettings,
    hash_secret,
    running_network,
)
from resultity_servers.node import Agent, NodeSettings, build_agent

from ._files import (
    DEMO_ACCOUNT,
    OPERATOR_ACCOUNT,
    DemoFiles,
    DemoOptions,
    demo_node_config,
    prepare_demo,
)

__all__ = [
    "SAMPLE_PROMPT", "Demo", "check_port", "run_demo", "running_demo",
    "sample_chat",
]

Log = Callable[[str], None]
SAMPLE_PROMPT = "What does the Network do in Resultity?"


def _stderr(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def check_port(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when ``host:port`` cannot be bound; port 0 always passes."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


@attrs.define(eq=False)
class _Node:
    index: int
    agent: Agent | None = None
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    error: str | None = None
    shown: str = ""


@attrs.define(eq=False)
class Demo:
    """A running demo. ``base_url`` is the OpenAI base URL (``http://127.0.0.1:P/v1``)."""

    options: DemoOptions
    files: DemoFiles
    coordinator: Coordinator
    network_url: str
    cloud_url: str
    api_key: str
    service_token: str
    config_hash: str
    log: Log
    nodes: list[_Node] = attrs.field(factory=list)
    _tg: anyio.abc.TaskGroup | None = None

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client as ``base_url``."""
        return self.cloud_url + "/v1"

    @property
    def model(self) -> str:
        """The name of the model the demo serves."""
        return self.files.model.name

    def ready_nodes(self) -> int:
        """How many registered nodes are ready to serve the demo model."""
        return sum(m.ready_nodes for m in self.coordinator.list_models() if m.name == self.model)

    def start_node(self, index: int) -> None:
        """Start in-process node ``index`` (its directory must be prepared)."""
        assert self._tg is not None
        node = _Node(index)
        self.nodes.append(node)
        settings = NodeSettings(
            self.network_url, self.files.node_dir(index), models_dir=self.files.models_dir,
            runtime_threads=self.options.runtime_threads, device=self.options.device,
            network_namespace=self.options.network_namespace,
        )
        node.agent = build_agent(settings)
        self._tg.start_soon(self._run_node, node)

    async def _run_node(self, node: _Node) -> None:
        assert node.agent is not None
        with node.scope:
            try:
                await node.agent.run()
            except ResultityError as exc:
                node.error = f"{type(exc).__name__}: {exc}"
                self.log(f"node-{node.index + 1} stopped: {node.error}")
            finally:
                with anyio.CancelScope(shield=True):
                    await node.agent.transport.aclose()

    def stop_node(self, index: int) -> None:
        """Stop in-process node ``index`` (its Runtime children are terminated)."""
        for node in self.nodes:
            if node.index == index:
                node.scope.cancel()

    def _report(self) -> None:
        for node in self.nodes:
            if node.agent is None or node.error:
                continue
            st = node.agent.status()
            runtimes = ", ".join(f"{k} {v}" for k, v in sorted(st["runtimes"].items()))
            line = (f"node-{node.index + 1}: config v{st['config_version'] or '-'}, "
                    f"runtime {runtimes or 'not started'}, "
                    f"{'registered' if st['registered_models'] else 'not serving yet'}")
            if line != node.shown:
                node.shown = line
                self.log(line)

    async def wait_ready(self, timeout_s: float = 600.0, count: int = 1) -> None:
        """Wait until ``count`` nodes serve the model, logging progress; raises TimeoutError
        (or RuntimeError when every in-process node stopped with an error)."""
        with anyio.fail_after(timeout_s):
            while self.ready_nodes() < count:
                self._report()
                if self.nodes and all(n.error for n in self.nodes):
                    raise RuntimeError("no node could start: " + str(self.nodes[0].error))
                await anyio.sleep(0.2)
        self._report()


def _ensure_accounts(coordinator: Coordinator, files: DemoFiles, options: DemoOptions) -> str:
    now = time.time()
    store = coordinator.store
    with store.transaction() as tx:
        have_operator = tx.get_account(OPERATOR_ACCOUNT) is not None
        have_user = tx.get_account(DEMO_ACCOUNT) is not None
    public = files.account_key.public_key
    if have_operator:
        coordinator.set_account_key(OPERATOR_ACCOUNT, public)
    else:
        coordinator.create_account(now, account_id=OPERATOR_ACCOUNT, public_key=public)
    key_file = files.data_dir / "api-key"
    key = key_file.read_text().strip() if key_file.exists() else ""
    if not have_user:
        _record, key = coordinator.create_account(now, account_id=DEMO_ACCOUNT,
                                                  initial_credits=options.credits)
    elif not key:
        key = coordinator.create_api_key(DEMO_ACCOUNT, now)
    balance = coordinator.account_balance(DEMO_ACCOUNT).balance
    if balance < options.credits // 10:
        coordinator.credit_account(DEMO_ACCOUNT, options.credits - balance, now)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    if options.api_key is not None:
        digest = hash_secret(options.api_key)
        with store.transaction() as tx:
            if tx.get_api_key(digest) is None:
                tx.insert_api_key(ApiKeyRecord(digest, DEMO_ACCOUNT, now, options.api_key[:8]))
        key = options.api_key
    return key


def _publish(coordinator: Coordinator, files: DemoFiles, network_url: str) -> str:
    now = int(time.time())
    current = coordinator.current_config()
    version = max(now, current[1].version + 1) if current else now
    envelope = demo_node_config(files, network_url, now, version)
    (files.data_dir / "snapshot.json").write_text(json.dumps(envelope.to_payload(), indent=2))
    return coordinator.publish_config(envelope, now)


@asynccontextmanager
async def running_demo(
    options: DemoOptions, *, files: DemoFiles | None = None, log: Log = _stderr,
) -> AsyncIterator[Demo]:
    """Start the Network, the Cloud and ``options.nodes`` nodes; stop them all on exit.

    Prepares the data directory first unless ``files`` is given. Yields once everything
    listens (nodes may still be loading: see ``Demo.wait_ready``). Raises OSError when the
    Cloud's port cannot be bound, ValueError for an API key not starting with ``rk-``.
    """
    if options.api_key is not None and not options.api_key.startswith("rk-"):
        raise ValueError("the API key must start with rk-")
    if files is None:
        files = await anyio.to_thread.run_sync(prepare_demo, options, log)
    token = "svc-" + secrets.token_urlsafe(24)
    (files.data_dir / "service-token").write_text(token + "\n")
    (files.data_dir / "service-token").chmod(0o600)
    net_settings = NetworkSettings(
        host="127.0.0.1", port=0, data_dir=str(files.data_dir / "network"), service_token=token,
        coordinator=CoordinatorSettings(heartbeat_timeout_s=options.heartbeat_timeout_s,
                                        trust_root=files.trust),
        tick_interval_s=0.25,
    )
    async with running_network(net_settings) as (net_server, net_app):
        network_url = f"http://127.0.0.1:{net_server.port}"
        coordinator = net_app.coordinator
        config_hash = _publish(coordinator, files, network_url)
        api_key = _ensure_accounts(coordinator, files, options)
        cloud_settings = CloudSettings(host=options.host, port=options.port,
                                       network_url=network_url, service_token=token)
        log(f"network listening on {network_url} (state in {files.data_dir / 'network'})")
        async with running_cloud(cloud_settings) as (cloud_server, _cloud_app):
            cloud_url = f"http://{options.host}:{cloud_server.port}"
            demo = Demo(options, files, coordinator, network_url, cloud_url, api_key, token,
                        config_hash, log)
            (files.data_dir / "demo.json").write_text(json.dumps({
                "network_url": network_url, "cloud_url": cloud_url, "model": demo.model,
                "service_token_file": str(files.data_dir / "service-token"),
            }, indent=2) + "\n")
            async with anyio.create_task_group() as tg:
                demo._tg = tg
                for index in range(options.nodes):
                    demo.start_node(index)
                try:
                    yield demo
                finally:
                    tg.cancel_scope.cancel()


async def sample_chat(base_url: str, api_key: str, model: str, out: TextIO, *,
                      prompt: str = SAMPLE_PROMPT, max_tokens: int = 48) -> dict[str, Any]:
    """Send one streamed chat request, writing the answer to ``out`` as it arrives.

    Returns ``{"text", "usage", "finish_reason"}``. Raises RuntimeError for an error status
    or an ``error`` event, and the HTTP client's errors.
    """
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    url = urlsplit(base_url)
    async with HTTPClient(f"{url.scheme}://{url.netloc}", timeout_s=120.0) as client, \
            client.stream("POST", url.path.rstrip("/") + "/chat/completions", json=body,
                          headers={"authorization": f"Bearer {api_key}"}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.aread()).decode()}")
        async for event in response.aiter_sse():
            if event.data == "[DONE]":
                break
            chunk = json.loads(event.data)
            if event.event == "error" or "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk.get('error', chunk)}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text.append(piece)
                out.write(piece)
                out.flush()
                finish = choice.get("finish_reason") or finish
    out.write("\n")
    out.flush()
    return {"text": "".join(text), "usage": usage, "finish_reason": finish}


async def run_demo(options: DemoOptions, *, once: bool = False, out: TextIO | None = None,
                   ready_timeout_s: float = 600.0, log: Log = _stderr) -> int:
    """The ``resultity demo`` command; returns the exit status.

    Raises OSError (EADDRINUSE) when the Cloud's port is taken, before creating anything.
    """
    out = out or sys.stdout
    check_port(options.host, options.port)
    async with running_demo(options, log=log) as demo:
        log(f"starting {options.nodes} node(s); waiting for one to be ready")
        await demo.wait_ready(ready_timeout_s)
        print(f"Resultity cloud ready at {demo.base_url}", file=out, flush=True)
        print(f"API key: {demo.api_key}", file=out)
        print(f"model: {demo.model}", file=out)
        print(f"\n> {SAMPLE_PROMPT}", file=out, flush=True)
        result = await sample_chat(demo.base_url, demo.api_key, demo.model, out)
        usage = result["usage"]
        log(f"sample answered: {usage.get('prompt_tokens')} prompt + "
            f"{usage.get('completion_tokens')} completion tokens "
            f"(finish: {result['finish_reason']})")
        if once:
            return 0
        # the receiver is in place before the line that invites Ctrl-C: a signal sent right
        # after it must shut down gracefully, not kill the process with the default action
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            print(f"\nserving until Ctrl-C (try: OPENAI_BASE_URL={demo.base_url} "
                  f"OPENAI_API_KEY={demo.api_key} python examples/chat_openai.py)",
                  file=out, flush=True)
            async for signum in signals:
                log(f"{signal.Signals(signum).name}: shutting down (finishing open streams)")
                break
    return 0
