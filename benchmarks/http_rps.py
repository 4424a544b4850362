"""Requests per second of ``GET /v1/models`` on our HTTP layer (and uvicorn, if installed).

The server runs in its own process; one load process drives N concurrent keep-alive
connections with a minimal HTTP/1.1 client (raw sockets, so the client is not the
bottleneck), each sending one request at a time. Prints requests/s and latency percentiles.

    python benchmarks/http_rps.py [--clients 32] [--seconds 5] [--server resultity|uvicorn|both]

uvicorn is not a dependency: without it the comparison is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import anyio.abc

MODELS = {
    "object": "list",
    "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "resultity"}],
}
REQUEST = b"GET /v1/models HTTP/1.1\r\nhost: bench\r\n\r\n"


# --- servers (run in a child process) -----------------------------------------------------------


def serve_resultity() -> None:
    from resultity_servers._http import HTTPServer, Request, Response, Router, ServerConfig

    router = Router()

    @router.route("GET", "/v1/models")
    async def models(request: Request) -> Response:
        return Response.json(MODELS)

    async def main() -> None:
        server = HTTPServer(router, ServerConfig(max_connections=10_000))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            print(port, flush=True)

    anyio.run(main)


def serve_uvicorn() -> None:
    import socket

    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        # The same work and bytes as ours: JSON encoded per request, content-length framing.
        body = json.dumps(MODELS, ensure_ascii=False, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (with proto 0 uvicorn's separate head and body writes would wait for delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, http="h11", lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])


# --- load generator -----------------------------------------------------------------------------


async def _client(port: int, stop_at: float, latencies: list[float], errors: list[str]) -> None:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError as exc:
        errors.append(str(exc))
        return
    async with stream:
        buffer = b""
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await stream.send(REQUEST)
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive()
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode())
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await stream.receive()
            buffer = buffer[length:]
            latencies.append(time.perf_counter() - start)


def _cpu_seconds(pid: int) -> float:
    """Return user+system CPU time of ``pid`` (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _load(port: int, clients: int, seconds: float, pid: int) -> dict[str, float]:
    # A short warm-up, then the measured run.
    for duration, keep in ((min(1.0, seconds / 5), False), (seconds, True)):
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.perf_counter() + duration
        cpu_before = _cpu_seconds(pid)
        client_before = time.process_time()
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(_client, port, stop_at, latencies, errors)
        if errors:
            raise SystemExit(f"load errors: {errors[:3]}")
        if keep:
            lat = sorted(latencies)
            return {
                "rps": len(lat) / duration,
                "p50_ms": 1000 * statistics.median(lat),
                "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1],
                "requests": len(lat),
                # Server CPU per request: steadier than req/s on a shared machine.
                "cpu_us": 1e6 * (_cpu_seconds(pid) - cpu_before) / max(1, len(lat)),
                "client_cpu_us": 1e6 * (time.process_time() - client_before) / max(1, len(lat)),
            }
    raise AssertionError("unreachable")


def _wait_accepting(port: int, child: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Return once the child accepts connections on ``port`` (uvicorn prints it earlier)."""
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server on port {port} never accepted a connection") from None
            time.sleep(0.02)


def measure(kind: str, clients: int, seconds: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        _wait_accepting(port, child)
        return anyio.run(_load, port, clients, seconds, child.pid)
    finally:
        child.terminate()
        child.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--server", choices=["resultity", "uvicorn", "both"], default="both")
    parser.add_argument("--serve", choices=["resultity", "uvicorn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "resultity":
        serve_resultity()
        return 0
    if args.serve == "uvicorn":
        serve_uvicorn()
        return 0
    kinds = ["resultity", "uvicorn"] if args.server == "both" else [args.server]
    print(
        f"GET /v1/models, {args.clients} keep-alive clients, {args.seconds:g} s, "
        f"{os.cpu_count()} CPUs"
    )
    results: dict[str, dict[str, float]] = {}
    for kind in kinds:
        if kind == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
            print("uvicorn: not installed, comparison skipped (pip install uvicorn to run it)")
            continue
        r = measure(kind, args.clients, args.seconds)
        results[kind] = r
        print(
            f"{kind:>10}: {r['rps']:9.0f} req/s   p50 {r['p50_ms']:6.2f} ms   "
            f"p99 {r['p99_ms']:6.2f} ms   server CPU {r['cpu_us']:5.0f} us/req   "
            f"(client {r['client_cpu_us']:.0f})   ({r['requests']:.0f} requests)"
        )
    if len(results) == 2:
        ratio = results["resultity"]["rps"] / results["uvicorn"]["rps"]
        print(f"resultity / uvicorn: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
