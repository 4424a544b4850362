"""Serving benchmark: the whole stack (cloud -> network -> node -> runtime) on 127.0.0.1.

One run prints one table with three parts, on the ``tiny`` model:

1. time to first token (TTFT) through the stack against the engine called in this process
   (same chat prompt, greedy, ``--max-tokens``), medians over ``--requests`` of each, run
   in alternating blocks of ``--block`` (25; 1 alternates every request, which lets the
   in-process engine's runs evict the servers' caches); the added time is the difference
   (target: at most 5 ms at the median);
2. ``--clients`` concurrent streaming clients for ``--duration`` seconds: errors, tokens/s,
   p50/p99 request latency and TTFT, RSS of every server process before and after;
3. requests/s of ``GET /v1/models`` on our HTTP layer against uvicorn serving an equivalent
   minimal ASGI app (benchmarks/http_rps.py's servers, in child processes, and its load
   generator; server CPU per request is printed too, as the client may saturate first on a
   small machine), and
   the Cloud's own ``/v1/models`` (auth and model cache) for reference.

The stack is ``resultity demo --preset tiny --port 0`` started as a subprocess: one process
for the Network, the Cloud and the node's Agent, plus the Runtime child it supervises. The
load generator is a minimal HTTP/1.1 client on raw anyio sockets (keep-alive, chunked, SSE),
so no client library's overhead is counted.

    python benchmarks/serving.py [--duration 30] [--clients 64] [--requests 100]
        [--max-tokens 8] [--block 25] [--threads 1] [--rps-seconds 5] [--rps-clients 32]
        [--skip ttft,load,rps] [--settle 0] [--breakdown N]

``--settle S`` runs the load test a second time after S idle seconds (memory check past the
Network's event retention); ``--breakdown N`` instead prints the median timeline of N
requests through a demo run in this process, with timestamps on internal steps.

uvicorn is not a dependency (``pip install uvicorn`` or the ``bench`` extra); without it the
comparison is skipped with a message.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_rps  # the minimal GET /v1/models servers and their load (benchmarks/http_rps.py)

PROMPT = "What does the Network do in Resultity?"
MESSAGES = [{"role": "user", "content": PROMPT}]
_CLK = os.sysconf("SC_CLK_TCK")


# --- /proc helpers -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of ``pid`` (NaN if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, ValueError, IndexError):
        return float("nan")


def rss_mib(pid: int) -> float:
    """Return the resident set size of ``pid`` in MiB (NaN if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """Return the direct children of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def load_average() -> str:
    """Return the 1/5/15-minute load averages as text."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- a minimal HTTP/1.1 client -----------------------------------------------------------------


class RawConnection:
    """One keep-alive connection: requests one at a time, chunked and SSE bodies."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(await anyio.connect_tcp("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> None:
        self.buffer += await self.stream.receive(65536)

    async def _until(self, sep: bytes) -> bytes:
        while sep not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(sep)
        return head

    async def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def send(self, method: str, path: str, body: bytes = b"", headers: str = "") -> None:
        head = f"{method} {path} HTTP/1.1\r\nhost: bench\r\n{headers}"
        if body:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        await self.stream.send(head.encode() + b"\r\n" + body)

    async def head(self) -> tuple[int, dict[str, str]]:
        """Read a response head; return the status and lower-case headers."""
        lines = (await self._until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """Yield the body of the response whose head was just read."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self._until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._until(b"\r\n")
                    return
                yield await self._exact(size)
                await self._exact(2)
        yield await self._exact(int(headers.get("content-length", "0")))


async def sse_events(conn: RawConnection, headers: dict[str, str]) -> AsyncIterator[str]:
    """Yield the ``data`` of each Server-Sent Event (an ``error`` event raises)."""
    pending = b""
    async for chunk in conn.body(headers):
        pending += chunk
        *events, pending = pending.split(b"\n\n")
        for raw in events:
            kind, data = "message", []
            for line in raw.decode().split("\n"):
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if kind == "error":
                raise RuntimeError(f"error event: {''.join(data)[:200]}")
            if data:
                yield "\n".join(data)


async def stream_chat(
    conn: RawConnection, api_key: str, max_tokens: int, content: str = PROMPT
) -> dict[str, float]:
    """One streamed chat request; return ``ttft``, ``latency`` (s) and ``tokens``."""
    body = json.dumps({
        "model": "tiny", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    start = time.perf_counter()
    await conn.send("POST", "/v1/chat/completions", body, f"authorization: Bearer {api_key}\r\n")
    status, headers = await conn.head()
    if status != 200:
        detail = b"".join([c async for c in conn.body(headers)])
        raise RuntimeError(f"HTTP {status}: {detail[:200]!r}")
    first = None
    tokens = 0.0
    done = False
    async for data in sse_events(conn, headers):
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if first is None and any(c.get("delta", {}).get("content")
                                 for c in chunk.get("choices", ())):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    if not done or first is None:
        raise RuntimeError("stream ended without [DONE] or without content")
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens}


# --- the stack ---------------------------------------------------------------------------------


class Stack:
    """``resultity demo`` in a subprocess: its Cloud port, API key and processes."""

    def __init__(self, data_dir: Path, threads: int) -> None:
        self.data_dir = data_dir
        # -P: no current directory on sys.path, so PYTHONPATH decides which resultity_servers
        # runs (an old tree from ``git archive`` in a before/after run from the repository).
        argv = [sys.executable, "-P", "-c", "import sys; from resultity_servers.cli import main; "
                "sys.exit(main())", "demo", "--preset", "tiny", "--port", "0",
                "--data-dir", str(data_dir), "--threads", str(threads)]
        self.log = open(data_dir / "bench-demo.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = 0
        self.api_key = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.match(r"Resultity cloud ready at http://127\.0\.0\.1:(\d+)/v1", line):
                self.port = int(m.group(1))
            elif line.startswith("API key:"):
                self.api_key = line.split(":", 1)[1].strip()
            elif line.startswith("serving until Ctrl-C"):
                break
        if not self.port or not self.api_key or self.proc.poll() is not None:
            self.stop()
            raise SystemExit(f"the demo did not start; see {data_dir / 'bench-demo.log'}")

    def processes(self) -> dict[str, int]:
        """Return ``{label: pid}`` of the demo process and its Runtime children."""
        out = {"network+cloud+agent": self.proc.pid}
        for i, pid in enumerate(children(self.proc.pid)):
            out[f"runtime-{i + 1}"] = pid
        return out

    def rss(self) -> dict[str, float]:
        return {label: rss_mib(pid) for label, pid in self.processes().items()}

    def model_dir(self) -> Path:
        return self.data_dir / "models" / "tiny" / "1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- the same stack, one process per server (``--split``) ---------------------------------------
#
# ``resultity demo`` runs the Network, the Cloud and the Agent on one event loop; deployments
# run them as separate ``resultity network|cloud|node serve`` processes. ``--split`` starts
# each in its own process from the same prepared demo directory (demo keys, grant, config and
# accounts), so the two layouts are measured with the same model, config and client.


def serve_part(part: str, data_dir: Path, threads: int) -> None:
    """Run one server of the split stack until SIGINT/SIGTERM (``--serve-part``).

    The network prints ``{"network_url", "service_token", "api_key"}``, the cloud its port;
    the node prints nothing (the Cloud's ``/health`` says when it serves).
    """
    import secrets

    from resultity_servers.cloud import CloudSettings, running_cloud
    from resultity_servers.demo import DemoOptions, prepare_demo
    from resultity_servers.demo._run import _ensure_accounts, _publish
    from resultity_servers.network import CoordinatorSettings, NetworkSettings, running_network
    from resultity_servers.node import NodeSettings, build_agent

    options = DemoOptions(data_dir=data_dir, port=0, preset="tiny", runtime_threads=threads)
    files = prepare_demo(options, lambda message: None)
    info_path = data_dir / "split.json"

    async def network() -> None:
        token = "svc-" + secrets.token_urlsafe(24)
        settings = NetworkSettings(
            host="127.0.0.1", port=0, data_dir=str(data_dir / "network"), service_token=token,
            coordinator=CoordinatorSettings(heartbeat_timeout_s=options.heartbeat_timeout_s,
                                            trust_root=files.trust),
            tick_interval_s=0.25)
        async with running_network(settings) as (server, app):
            url = f"http://127.0.0.1:{server.port}"
            _publish(app.coordinator, files, url)
            key = _ensure_accounts(app.coordinator, files, options)
            print(json.dumps({"network_url": url, "service_token": token, "api_key": key}),
                  flush=True)
            await anyio.sleep_forever()

    async def cloud() -> None:
        info = json.loads(info_path.read_text())
        settings = CloudSettings(host="127.0.0.1", port=0, network_url=info["network_url"],
                                 service_token=info["service_token"])
        async with running_cloud(settings) as (server, _app):
            print(server.port, flush=True)
            await anyio.sleep_forever()

    async def node() -> None:
        info = json.loads(info_path.read_text())
        agent = build_agent(NodeSettings(
            info["network_url"], files.node_dir(0), models_dir=files.models_dir,
            runtime_threads=threads, device=options.device,
            network_namespace=options.network_namespace))
        try:
            await agent.run()
        finally:
            with anyio.CancelScope(shield=True):
                await agent.transport.aclose()

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon({"network": network, "cloud": cloud, "node": node}[part])
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)


class SplitStack(Stack):
    """The Network, the Cloud and the Agent each in its own process (``--split``)."""

    def __init__(self, data_dir: Path, threads: int) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir / "bench-split.log", "w")  # noqa: SIM115 - closed in stop()
        self.procs: dict[str, subprocess.Popen[str]] = {}
        try:
            info = json.loads(self._start("network", threads))
            (data_dir / "split.json").write_text(json.dumps(info))
            self.api_key = info["api_key"]
            self.port = int(self._start("cloud", threads))
            self._start("node", threads, wait=False)
            self._wait_ready(300)
        except BaseException:
            self.stop()
            raise
        self.proc = self.procs["cloud"]  # the process the GET /v1/models row measures

    def _start(self, part: str, threads: int, *, wait: bool = True) -> str:
        argv = [sys.executable, __file__, "--serve-part", part, "--data-dir", str(self.data_dir),
                "--threads", str(threads)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.procs[part] = proc
        if not wait:
            return ""
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {part} did not start; see {self.data_dir / 'bench-split.log'}")
        return line

    def _wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return  # 200: a node serves
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"no node became ready; see {self.data_dir / 'bench-split.log'}")

    def processes(self) -> dict[str, int]:
        """Return ``{label: pid}`` of the three servers and the node's Runtime children."""
        out = {name: proc.pid for name, proc in self.procs.items()}
        for i, pid in enumerate(children(self.procs["node"].pid)):
            out[f"runtime-{i + 1}"] = pid
        return out

    def stop(self) -> None:
        for name in ("node", "cloud", "network"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


def make_engine(model_dir: Path, threads: int) -> Any:
    """Return an Engine configured like the demo's Runtime (NodeConfig runtime params)."""
    import torch

    from resultity_runtime import Engine

    torch.set_num_threads(threads)
    return Engine.from_pretrained(model_dir, device="cpu", max_num_seqs=8, max_model_len=2048,
                                  kv_cache_bytes=64 << 20, backend="torch")


def engine_ttft(engine: Any, max_tokens: int) -> float:
    """Return the seconds from add_request to the first delta with text (run to the end)."""
    from resultity_runtime import SamplingParams

    rid = engine.new_request_id()
    start = time.perf_counter()
    engine.add_request(rid, MESSAGES, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    first = None
    while engine.has_unfinished():
        for delta in engine.step():
            if first is None and delta.text:
                first = time.perf_counter() - start
    assert first is not None
    return first


async def measure_ttft(stack: Stack, engine: Any, requests: int, max_tokens: int,
                       block: int = 25) -> dict[str, float]:
    """Time ``requests`` chat requests through the stack and as many engine calls in this
    process, ``block`` of one kind, then ``block`` of the other, and so on.

    Blocks, not strict alternation: the in-process engine runs a second copy of the model in
    this process, on the same two cores, and one run of it between two stack requests evicts
    the servers' and the Runtime's working sets, which no real client does (about +3 ms on the
    stack's TTFT against +0.8 ms on the engine's; see RESULTS.md). Blocks of 25 still see the
    same background load, a second apart. ``block=1`` is strict alternation.
    """
    pids = stack.processes()
    conn = await RawConnection.open(stack.port)
    try:
        for _ in range(3):  # warm-up: auth cache, model list, connections, prefix cache
            await stream_chat(conn, stack.api_key, max_tokens)
            engine_ttft(engine, max_tokens)
        # The servers' background CPU (heartbeats, ticker) per second, to subtract below.
        idle0, start = {k: cpu_seconds(p) for k, p in pids.items()}, time.perf_counter()
        await anyio.sleep(2.0)
        idle = {k: (cpu_seconds(p) - idle0[k]) / (time.perf_counter() - start)
                for k, p in pids.items()}
        stack_s, engine_s, cpu = [], [], dict.fromkeys(pids, 0.0)
        for first in range(0, requests, block):
            n = min(block, requests - first)
            for _ in range(n):
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                start = time.perf_counter()
                stack_s.append((await stream_chat(conn, stack.api_key, max_tokens))["ttft"])
                wall = time.perf_counter() - start
                for k, p in pids.items():
                    cpu[k] += cpu_seconds(p) - before[k] - idle[k] * wall
                await anyio.sleep(0.02)
            for _ in range(n):
                engine_s.append(engine_ttft(engine, max_tokens))
                await anyio.sleep(0.02)
    finally:
        await conn.aclose()
    diffs = [a - b for a, b in zip(stack_s, engine_s, strict=True)]
    return {
        "stack_ms": 1000 * statistics.median(stack_s),
        "engine_ms": 1000 * statistics.median(engine_s),
        "added_ms": 1000 * (statistics.median(stack_s) - statistics.median(engine_s)),
        "paired_ms": 1000 * statistics.median(diffs),
        "stack_min_ms": 1000 * min(stack_s), "engine_min_ms": 1000 * min(engine_s),
        "cpu_ms": {k: 1000 * v / requests for k, v in cpu.items()},
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_load(stack: Stack, clients: int, duration: float, max_tokens: int
                       ) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    async def client(index: int) -> None:
        try:
            conn = await RawConnection.open(stack.port)
        except OSError as exc:
            errors.append(f"connect: {exc}")
            return
        try:
            while time.perf_counter() < stop_at:
                try:
                    results.append(await stream_chat(conn, stack.api_key, max_tokens,
                                                     f"{PROMPT} ({index})"))
                except (RuntimeError, ValueError, OSError, anyio.EndOfStream,
                        anyio.BrokenResourceError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    await conn.aclose()
                    conn = await RawConnection.open(stack.port)
        finally:
            await conn.aclose()

    pids = stack.processes()
    before = stack.rss()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, i)
    elapsed = time.perf_counter() - started
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    await anyio.sleep(1.0)
    after = stack.rss()
    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {
        "requests": len(results), "errors": errors, "elapsed": elapsed,
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "requests_per_s": len(results) / elapsed,
        "p50_ms": 1000 * _pct(latency, 0.5), "p99_ms": 1000 * _pct(latency, 0.99),
        "ttft_p50_ms": 1000 * _pct(ttft, 0.5), "ttft_p99_ms": 1000 * _pct(ttft, 0.99),
        "rss_before": before, "rss_after": after, "cpu": cpu,
    }


# --- where the time goes: one request's timeline (``--breakdown``) ----------------------------
#
# Runs the demo in this process (``running_demo``; the Runtime is still a child process) and
# wraps a few internal methods to timestamp each step of a request. The names are internals:
# a hook whose target is gone is skipped, so the breakdown degrades instead of failing.

# (module, class, method, label, truthy): a truthy hook marks when a call returns something
# (a lease, events), the others when the call starts.
_HOOKS = [
    ("resultity_servers.cloud._app", "CloudApp", "chat", "cloud: handler starts", False),
    ("resultity_servers.cloud._http_network", "HTTPNetworkClient", "submit",
     "cloud: submit sent", False),
    ("resultity_servers.network._app", "NetworkApp", "submit", "network: submit handler",
     False),
    # every lease goes through _leased (before it, _lease_job): a poll's own lease pass, or a
    # submit handing the job to the node's waiting (parked) poll
    ("resultity_servers.network._jobs", "JobDesk", "_leased", "network: job leased", True),
    ("resultity_servers.network._jobs", "JobDesk", "_lease_job", "network: job leased", True),
    ("resultity_servers.node._transport", "HTTPNetworkTransport", "lease",
     "node: lease answer read", True),
    ("resultity_servers.node._supervisor", "RuntimeSupervisor", "_send_job",
     "node: job written to the Runtime", False),
    ("resultity_servers.node._outbox", "Outbox", "put", "node: first token from the Runtime",
     False),
    ("resultity_servers.network._app", "NetworkApp", "events_in", "network: events posted",
     False),
    ("resultity_servers.network._jobs", "JobDesk", "job_events",
     "network: token sent to the cloud", True),
    ("resultity_servers.cloud._jobs", "JobRun", "next", "cloud: token read", True),
]


def _install_hooks(marks: list[tuple[str, float]]) -> None:
    import importlib
    import inspect

    for module_name, cls_name, meth, label, truthy in _HOOKS:
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        orig = getattr(cls, meth, None)
        if orig is None:
            continue

        def hook(orig: Any = orig, label: str = label, truthy: bool = truthy) -> Any:
            if inspect.iscoroutinefunction(orig):
                async def timed(*a: Any, **k: Any) -> Any:
                    start = time.perf_counter()
                    result = await orig(*a, **k)
                    if not truthy:
                        marks.append((label, start))
                    elif getattr(result, "leases", getattr(result, "events", result)):
                        marks.append((label, time.perf_counter()))
                    return result
                return timed

            def timed_sync(*a: Any, **k: Any) -> Any:
                start = time.perf_counter()
                result = orig(*a, **k)
                if not truthy:
                    marks.append((label, start))
                elif getattr(result, "leases", getattr(result, "events", result)):
                    marks.append((label, time.perf_counter()))
                return result
            return timed_sync

        setattr(cls, meth, hook())


async def breakdown(requests: int, max_tokens: int, threads: int, data_dir: Path,
                    block: int = 25) -> None:
    from resultity_servers.demo import DemoOptions, running_demo

    marks: list[tuple[str, float]] = []
    _install_hooks(marks)
    options = DemoOptions(data_dir=data_dir, port=0, preset="tiny", runtime_threads=threads)
    async with running_demo(options, log=lambda message: None) as demo:
        await demo.wait_ready(300)
        engine = make_engine(data_dir / "models" / "tiny" / "1", threads)
        conn = await RawConnection.open(int(demo.cloud_url.rsplit(":", 1)[1]))
        rows: dict[str, list[float]] = {}
        engine_s: list[float] = []
        for _ in range(3):  # warm-up
            await stream_chat(conn, demo.api_key, max_tokens)
            engine_ttft(engine, max_tokens)
        for first in range(0, requests, block):  # in blocks, as in the TTFT table
            n = min(block, requests - first)
            for _ in range(n):
                marks.clear()
                start = time.perf_counter()
                result = await stream_chat(conn, demo.api_key, max_tokens)
                marks.append(("client: first token", start + result["ttft"]))
                seen: set[str] = set()
                for label, at in sorted(marks, key=lambda m: m[1]):
                    if label not in seen:  # the first time each step happened
                        seen.add(label)
                        rows.setdefault(label, []).append(1000 * (at - start))
                await anyio.sleep(0.02)
            for _ in range(n):
                engine_s.append(engine_ttft(engine, max_tokens))
                await anyio.sleep(0.02)
        await conn.aclose()
    print(f"one request's timeline, in-process demo, median (min) of {requests} (blocks of "
          f"{block}), ms from the client's send; load average {load_average()}")
    previous = 0.0
    for label, values in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        median = statistics.median(values)
        print(f"  {median:7.2f} ({min(values):6.2f})  +{median - previous:5.2f}  {label}")
        previous = median
    engine_ms = 1000 * statistics.median(engine_s)
    first = statistics.median(rows["client: first token"])
    print(f"  engine in process (in blocks): {engine_ms:.2f} ({1000 * min(engine_s):.2f}) ms; "
          f"added: {first - engine_ms:.2f} ms (medians)")


# --- GET /v1/models requests/s -----------------------------------------------------------------


async def rps_load(port: int, clients: int, seconds: float, pid: int, *,
                   path: str = "/v1/models", headers: str = "") -> dict[str, float]:
    """Drive ``clients`` keep-alive connections sending GET ``path`` for ``seconds``."""

    async def client(stop_at: float, latencies: list[float]) -> None:
        conn = await RawConnection.open(port)
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                await conn.send("GET", path, headers=headers)
                status, head = await conn.head()
                async for _ in conn.body(head):
                    pass
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                latencies.append(time.perf_counter() - start)
        finally:
            await conn.aclose()

    result: dict[str, float] = {}
    for duration in (min(1.0, seconds / 5), seconds):  # warm-up, then the measured run
        latencies: list[float] = []
        cpu0 = cpu_seconds(pid)
        own0 = time.process_time()
        stop_at = time.perf_counter() + duration
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(client, stop_at, latencies)
        n = max(1, len(latencies))
        result = {
            "rps": len(latencies) / duration, "requests": len(latencies),
            "p50_ms": 1000 * _pct(latencies, 0.5), "p99_ms": 1000 * _pct(latencies, 0.99),
            "cpu_us": 1e6 * (cpu_seconds(pid) - cpu0) / n,
            "client_cpu_us": 1e6 * (time.process_time() - own0) / n,
        }
    return result


# --- main --------------------------------------------------------------------------------------


def _row(name: str, value: str, target: str = "") -> None:
    print(f"| {name:<58} | {value:>22} | {target:<26} |")


def _print_load(r: dict[str, Any], clients: int) -> None:
    label = f"{clients} streaming clients, {r['elapsed']:.0f} s"
    _row(f"{label}: requests (errors)", f"{r['requests']} ({len(r['errors'])})",
         "zero errors: " + ("met" if not r["errors"] else "NOT met"))
    _row(f"{label}: completion tokens/s", f"{r['tokens_per_s']:.1f}")
    _row(f"{label}: requests/s", f"{r['requests_per_s']:.2f}")
    _row(f"{label}: latency p50 / p99", f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms")
    _row(f"{label}: TTFT p50 / p99", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms")
    for proc, before in r["rss_before"].items():
        after = r["rss_after"].get(proc, float("nan"))
        per_k = 1000 * (after - before) / max(1, r["requests"])
        _row(f"RSS {proc} before / after (MiB)", f"{before:.1f} / {after:.1f}",
             f"{after - before:+.1f} MiB ({per_k:+.1f}/1k req)")
    for proc, cpu in r["cpu"].items():
        _row(f"CPU {proc} during load (cores)", f"{cpu / r['elapsed']:.2f}")
    for err in sorted(set(r["errors"]))[:5]:
        print(f"  error: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="load test seconds (30)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streams (64)")
    parser.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="after the load test, wait this long and run it again (memory "
                        "check past the Network's 120 s event retention; 0: off)")
    parser.add_argument("--requests", type=int, default=100, help="TTFT samples (100)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per request (8)")
    parser.add_argument("--block", type=int, default=25,
                        help="TTFT: stack and in-process requests alternate in blocks of this "
                        "many (25; 1: every request)")
    parser.add_argument("--rps-seconds", type=float, default=5.0)
    parser.add_argument("--rps-clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the Runtime and of the in-process engine (1: "
                        "steadier on a shared machine)")
    parser.add_argument("--skip", default="", help="comma list of ttft, load, rps")
    parser.add_argument("--data-dir", default=None, help="demo data directory (default: temp)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="instead: print the median timeline of N requests through an "
                        "in-process demo")
    parser.add_argument("--split", action="store_true",
                        help="run the Network, the Cloud and the node's Agent each in its own "
                        "process (as separate 'resultity ... serve' deployments do) instead of "
                        "the demo's one process")
    parser.add_argument("--serve-part", choices=["network", "cloud", "node"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_part:
        serve_part(args.serve_part, Path(args.data_dir), args.threads)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
            anyio.run(breakdown, args.breakdown, args.max_tokens, args.threads,
                      Path(args.data_dir or tmp), args.block)
        return 0
    layout = ("network, cloud and agent in separate processes (--split)" if args.split
              else "network, cloud and agent in the demo's one process")
    print(f"serving benchmark, tiny model, {args.threads} torch thread(s), {os.cpu_count()} "
          f"CPUs, {layout}, load average {load_average()}")
    print(f"| {'measure':<58} | {'value':>22} | {'target':<26} |")
    print(f"|{'-' * 60}|{'-' * 24}|{'-' * 28}|")
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        data_dir = Path(args.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        if not skip >= {"ttft", "load", "rps"}:
            stack = (SplitStack if args.split else Stack)(data_dir, args.threads)
            try:
                if "ttft" not in skip:
                    engine = make_engine(stack.model_dir(), args.threads)
                    t = anyio.run(measure_ttft, stack, engine, args.requests, args.max_tokens,
                                  args.block)
                    del engine
                    _row(f"TTFT cloud->network->node, median of {args.requests}, "
                         f"blocks of {args.block}",
                         f"{t['stack_ms']:.2f} ms")
                    _row("TTFT engine in process, median", f"{t['engine_ms']:.2f} ms")
                    ok = "met" if t["added_ms"] <= 5 else "NOT met"
                    _row("added TTFT (difference of medians)", f"{t['added_ms']:.2f} ms",
                         f"<= 5 ms: {ok}")
                    _row("added TTFT (median of paired differences)",
                         f"{t['paired_ms']:.2f} ms")
                    _row("added TTFT (difference of minimums)",
                         f"{t['stack_min_ms'] - t['engine_min_ms']:.2f} ms")
                    for proc, ms in t["cpu_ms"].items():
                        _row(f"CPU {proc} per request ({args.max_tokens} tokens)",
                             f"{ms:.2f} ms")
                if "load" not in skip:
                    r = anyio.run(measure_load, stack, args.clients, args.duration,
                                  args.max_tokens)
                    _print_load(r, args.clients)
                    if args.settle:
                        # The Network keeps finished jobs' events in memory for a while
                        # (event_retention_s): run again once they are gone; flat memory
                        # means the second run reuses what the first one freed.
                        time.sleep(args.settle)
                        again = anyio.run(measure_load, stack, args.clients, args.duration,
                                          args.max_tokens)
                        print(f"again after {args.settle:g} s idle:")
                        _print_load(again, args.clients)
                        for proc, first in r["rss_after"].items():
                            second = again["rss_after"].get(proc, float("nan"))
                            _row(f"RSS {proc} after 1st / 2nd run (MiB)",
                                 f"{first:.1f} / {second:.1f}", f"{second - first:+.1f} MiB")
                if "rps" not in skip:
                    auth = f"authorization: Bearer {stack.api_key}\r\n"
                    c = anyio.run(functools.partial(
                        rps_load, stack.port, args.rps_clients, args.rps_seconds,
                        stack.proc.pid, headers=auth))
                    _row("Cloud GET /v1/models (auth, model cache) req/s",
                         f"{c['rps']:.0f} ({c['cpu_us']:.0f} us/req)")
            finally:
                stack.stop()
    if "rps" not in skip:
        results = {}
        for kind in ("resultity", "uvicorn"):
            if kind == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
                print("uvicorn: not installed, comparison skipped (pip install uvicorn, or "
                      "pip install -e '.[bench]')")
                continue
            r = http_rps.measure(kind, args.rps_clients, args.rps_seconds)
            results[kind] = r
            _row(f"{kind} minimal GET /v1/models, {args.rps_clients} conns: req/s",
                 f"{r['rps']:.0f}")
            _row(f"{kind}: p50 / p99 latency", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms")
            _row(f"{kind}: server / client CPU per request",
                 f"{r['cpu_us']:.0f} / {r['client_cpu_us']:.0f} us")
        if len(results) == 2:
            ratio = results["resultity"]["rps"] / results["uvicorn"]["rps"]
            cpu_ratio = results["uvicorn"]["cpu_us"] / results["resultity"]["cpu_us"]
            _row("resultity / uvicorn req/s", f"{ratio:.2f}x",
                 ">= 1.0: " + ("met" if ratio >= 1.0 else "NOT met"))
            _row("uvicorn / resultity server CPU per request", f"{cpu_ratio:.2f}x")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
