"""``resultity network``: run the Network coordinator and publish snapshots to it.

Also holds what the serve and account commands share: data directories, the service token,
logging, running a server until a signal, and operator calls to a running Network.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._common import CLIError, add_command_group

if TYPE_CHECKING:
    from resultity_servers.network import NetworkAdminClient

__all__ = [
    "DEFAULT_NETWORK_URL",
    "add_network_client_args",
    "admin_call",
    "bind_error",
    "data_home",
    "read_service_token",
    "register",
    "run_server",
    "setup_logging",
    "termination_signals",
]

_T = TypeVar("_T")
DEFAULT_NETWORK_URL = "http://127.0.0.1:8100"
TOKEN_ENV = "RESULTITY_SERVICE_TOKEN"

_DESCRIPTION = """\
The Network coordinates: it admits nodes (account grant + node key challenge), publishes the
signed NodeConfig, routes jobs from the Cloud to live nodes, verifies receipts and settles
credits. State is kept in SQLite (WAL) in the data directory, so accounts, credits, receipts
and the published config survive a restart.

The Cloud and operator commands (`resultity account ...`, `network publish`) authenticate with
the service token, a random secret the Network writes to DATA_DIR/service-token (0600) on
first start; they read it from that file (--service-token-file) or from the environment
variable RESULTITY_SERVICE_TOKEN.
"""


def data_home(*parts: str) -> Path:
    """Return ``$XDG_DATA_HOME/resultity/...`` (default ``~/.local/share/resultity/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base, "resultity", *parts)


def default_token_file() -> Path:
    """Return where ``network serve`` keeps the service token by default."""
    return data_home("network", "service-token")


def read_service_token(path: str | None) -> str:
    """Return the service token: $RESULTITY_SERVICE_TOKEN, else the file (CLIError if none)."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env and path is None:
        return env
    p = Path(path) if path is not None else default_token_file()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CLIError(f"service token file {p}: no such file (start `resultity network serve` "
                       f"first, or pass --service-token-file / set {TOKEN_ENV})") from None
    except OSError as exc:
        raise CLIError(f"service token file {p}: {exc.strerror or exc}") from None
    if not token:
        raise CLIError(f"service token file {p} is empty")
    return token


def _ensure_token(path: Path) -> str:
    if path.exists():
        return read_service_token(str(path))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = "svc-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def add_network_client_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--network URL`` and ``--service-token-file PATH``."""
    parser.add_argument("--network", default=DEFAULT_NETWORK_URL, metavar="URL",
                        help=f"the Network's URL (default {DEFAULT_NETWORK_URL})")
    parser.add_argument(
        "--service-token-file", metavar="PATH", default=None,
        help=f"file holding the service token (default ${TOKEN_ENV}, else "
             f"{default_token_file()})")


def setup_logging(level: str) -> None:
    """Log to standard error at ``level`` (debug, info, warning, error)."""
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def add_log_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level``."""
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="what to log on standard error (default info)")


def bind_error(exc: OSError, host: str, port: int) -> CLIError:
    """Return the one-line error for a failure to listen on ``host:port``."""
    if exc.errno == errno.EADDRINUSE:
        return CLIError(f"port {port} on {host} is already in use; choose another with --port "
                        "(0 picks a free one)")
    if exc.errno == errno.EACCES:
        return CLIError(f"no permission to listen on {host}:{port}; use a port above 1023")
    return CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def run_server(main: Callable[[], Awaitable[_T]], host: str, port: int, what: str) -> _T:
    """``anyio.run(main)``, turning a failure to listen (even inside an exception group) into
    a one-line CLIError; other user-facing errors are re-raised unwrapped."""
    import anyio

    from resultity_core import ResultityError

    try:
        return anyio.run(main)
    except BaseException as exc:
        inner: BaseException = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, OSError) and inner.errno in (
                errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise bind_error(inner, host, port) from None
        if isinstance(inner, OSError):
            raise CLIError(f"{what}: {inner.strerror or inner}") from None
        if isinstance(inner, CLIError | ResultityError | KeyboardInterrupt):
            raise inner from None
        raise


@contextlib.contextmanager
def termination_signals() -> Iterator[Callable[[], Awaitable[str]]]:
    """Catch SIGINT and SIGTERM from now on; yield ``wait()`` that returns the signal's name.

    Enter it before announcing readiness: a signal sent right after the announcement must
    find the handler installed, or the process dies with the default action.
    """
    import anyio

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def wait() -> str:
            async for signum in signals:
                return signal.Signals(signum).name
            return "EOF"  # pragma: no cover - the receiver never ends by itself

        yield wait


def admin_call(args: argparse.Namespace,
               call: Callable[[NetworkAdminClient], Awaitable[_T]], *,
               timeout_s: float = 30.0) -> _T:
    """Run ``call(client)`` with a NetworkAdminClient for ``args.network``, authenticated by
    the service token (``args.service_token_file`` or the environment).

    Returns what ``call`` returns. Raises CLIError for a missing token, a refusal (naming the
    Network's status and message) and an unreachable Network.
    """
    import anyio

    from resultity_servers._http import HTTPClientError
    from resultity_servers.network import AdminRequestError, NetworkAdminClient

    token = read_service_token(args.service_token_file)

    async def run() -> _T:
        async with NetworkAdminClient(args.network, token, timeout_s=timeout_s) as client:
            return await call(client)

    try:
        return anyio.run(run)
    except AdminRequestError as exc:
        hint = " (is the service token the one the Network uses?)" if exc.status == 401 else ""
        raise CLIError(f"the network refused it: {exc}{hint}") from None
    except HTTPClientError as exc:
        raise CLIError(f"cannot reach the network at {args.network}: {exc} (is `resultity "
                       f"network serve` running?)") from None


def register(subparsers: Any) -> None:
    """Add ``network serve`` and ``network publish`` to the CLI."""
    sub = add_command_group(
        subparsers, "network", help="run the Network coordinator; publish snapshots",
        description=_DESCRIPTION)

    serve = sub.add_parser(
        "serve", help="run the Network until Ctrl-C",
        description="Run the Network on HOST:PORT until SIGINT/SIGTERM (graceful: open "
        "streams finish). Prints the URL and where the service token is.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; use 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8100, help="port (default 8100; 0: free)")
    serve.add_argument("--data-dir", default=None, metavar="DIR",
                       help=f"where network.db lives (default {data_home('network')})")
    serve.add_argument("--memory", action="store_true",
                       help="keep all state in memory (lost on exit) instead of SQLite")
    serve.add_argument("--service-token-file", default=None, metavar="PATH",
                       help="the service token file, created with a random token if missing "
                       "(default DATA_DIR/service-token)")
    serve.add_argument("--trust", default=None, metavar="TRUST",
                       help="trust root file: published snapshots must verify against it")
    serve.add_argument("--publish", default=None, metavar="SNAPSHOT",
                       help="publish this signed NodeConfig snapshot at start")
    serve.add_argument("--heartbeat-timeout", type=float, default=15.0, metavar="SECONDS",
                       help="a node silent this long is dead (default 15)")
    add_log_arg(serve)
    serve.set_defaults(handler=_serve)

    publish = sub.add_parser(
        "publish", help="publish a signed NodeConfig snapshot to a running Network",
        description="Send SNAPSHOT (from `resultity snapshot sign`) to the Network, which "
        "makes it current; nodes fetch it on their next heartbeat. Prints its hash.")
    publish.add_argument("snapshot", metavar="SNAPSHOT", help="signed snapshot (JSON file)")
    add_network_client_args(publish)
    publish.set_defaults(handler=_publish)


def _serve(args: argparse.Namespace) -> int:
    import time

    from resultity_servers.network import CoordinatorSettings, NetworkSettings, running_network

    from ._cmd_trust import load_envelope_file, load_trust

    setup_logging(args.log_level)
    data_dir = Path(args.data_dir) if args.data_dir else data_home("network")
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        token_file = Path(args.service_token_file or data_dir / "service-token")
        token = _ensure_token(token_file)
    except OSError as exc:
        raise CLIError(f"cannot use data directory {data_dir}: {exc.strerror or exc}") from None
    trust = load_trust(args.trust, int(time.time())) if args.trust else None
    snapshot = load_envelope_file(args.publish, "snapshot") if args.publish else None
    if args.heartbeat_timeout <= 0:
        raise CLIError("--heartbeat-timeout must be positive")
    settings = NetworkSettings(
        host=args.host, port=args.port, service_token=token,
        data_dir=None if args.memory else str(data_dir),
        coordinator=CoordinatorSettings(heartbeat_timeout_s=args.heartbeat_timeout,
                                        trust_root=trust),
    )

    async def main() -> str:
        async with running_network(settings) as (server, app):
            if snapshot is not None:
                digest = app.coordinator.publish_config(snapshot, time.time())
                print(f"published {args.publish}: {digest}", file=sys.stderr)
            where = "memory" if args.memory else str(data_dir / "network.db")
            with termination_signals() as wait:
                print(f"resultity network listening on http://{args.host}:{server.port} "
                      f"(state: {where}; service token: {token_file})", flush=True)
                return await wait()

    name = run_server(main, args.host, args.port, "network")
    print(f"resultity network stopped ({name})", file=sys.stderr)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from ._cmd_trust import load_envelope_file

    envelope = load_envelope_file(args.snapshot, "snapshot")
    print(admin_call(args, lambda client: client.publish_config(envelope)))
    return 0
