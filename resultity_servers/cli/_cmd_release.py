"""``resultity release build|sign|publish|publish-root|nodes``: ship new versions to nodes."""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._cmd_network import add_network_client_args, admin_call
from ._cmd_trust import current_time, load_envelope_file, load_keys, load_trust, now_arg
from ._common import CLIError, add_command_group, write_json_file

__all__ = ["build_wheel", "register"]

_DAY = 86_400
_ADMIN_TIMEOUT_S = 120.0  # artifact uploads are large
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*([.+-]?[A-Za-z0-9]+)*")
_TREE = ("pyproject.toml", "README.md", "LICENSE", "resultity_core", "resultity_runtime",
         "kernels", "resultity_servers")

_DESCRIPTION = """\
Releases: how nodes update themselves. An operator builds a wheel of this repository with a
new version, signs a Release manifest naming the agent and runtime versions and each artifact
with its sha256 and size (role `release` of the trust root, threshold signatures), and
publishes manifest and artifacts to the Network. Nodes fetch the manifest, refuse one that is
older than theirs, expired or not signed by the threshold, download and check each artifact,
install it beside the current version, health-check a Runtime started from it, and switch.

example:
  resultity release build --version 0.2.0 --out dist/
  resultity release sign --trust trust.json --key release.key --version 2 \\
      --agent-version 0.2.0 --runtime-version 0.2.0 --out release.json \\
      dist/resultity-0.2.0-py3-none-any.whl
  resultity release publish --manifest release.json dist/resultity-0.2.0-py3-none-any.whl
"""


def build_wheel(version: str, out_dir: Path, source: Path | None = None,
                *, timeout_s: float = 300.0) -> Path:
    """Build a wheel of the repository at ``source`` with ``version``; returns its path.

    The tree is copied to a temporary directory and the copy's version patched, so the
    working tree is never modified. Raises CLIError when the version is not a plain PEP 440
    version or the build fails.
    """
    if not _VERSION.fullmatch(version):
        raise CLIError(f"--version {version!r}: use a PEP 440 version such as 0.2.0")
    src = source or Path(__file__).resolve().parents[2]
    if not (src / "pyproject.toml").is_file():
        raise CLIError(f"{src} is not the repository root (no pyproject.toml)")
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    with tempfile.TemporaryDirectory(prefix="resultity-build-") as tmp:
        tree = Path(tmp, "src")
        tree.mkdir()
        for name in _TREE:
            path = src / name
            if path.is_dir():
                shutil.copytree(path, tree / name, ignore=ignore, symlinks=False)
            elif path.is_file():
                shutil.copy2(path, tree / name)
        pyproject = (tree / "pyproject.toml").read_text(encoding="utf-8")
        patched, count = re.subn(r'(?m)^version\s*=\s*"[^"]*"', f'version = "{version}"',
                                 pyproject, count=1)
        if count != 1:
            raise CLIError("pyproject.toml has no static version line to patch")
        (tree / "pyproject.toml").write_text(patched, encoding="utf-8")
        built = Path(tmp, "dist")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "-q", str(tree), "-w", str(built)],
                capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise CLIError(f"building the wheel took more than {timeout_s:g} s") from None
        wheels = sorted(built.glob("*.whl")) if built.exists() else []
        if proc.returncode != 0 or len(wheels) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise CLIError(f"building the wheel failed: {' | '.join(tail)}")
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest(), path.stat().st_size


def register(subparsers: Any) -> None:
    """Add ``release build|sign|publish|publish-root|nodes`` to the CLI."""
    sub = add_command_group(subparsers, "release", help="build, sign and publish node updates",
                            description=_DESCRIPTION)

    build = sub.add_parser("build", help="build a wheel of this repository with a version",
                           description="Build a wheel (pip wheel --no-deps --no-build-isolation)"
                           " from a copy of the repository whose version is patched; the "
                           "working tree is not modified.")
    build.add_argument("--version", required=True, help="the wheel's version, e.g. 0.2.0")
    build.add_argument("--out", required=True, metavar="DIR", help="where to write the wheel")
    build.add_argument("--source", default=None, metavar="DIR",
                       help="repository root (default: the one this command runs from)")
    build.set_defaults(handler=_build)

    sign = sub.add_parser("sign", help="write a signed Release manifest for artifacts",
                          description="Hash the artifacts, write a Release manifest and sign "
                          "it with the release keys; it is checked against the trust root "
                          "exactly as a node checks it before it is written.")
    sign.add_argument("artifacts", nargs="+", metavar="FILE", help="wheel files")
    sign.add_argument("--trust", required=True, metavar="TRUST", help="the trust root")
    sign.add_argument("--key", action="append", required=True, default=[], metavar="K",
                      help="release key file (repeat to reach the threshold)")
    sign.add_argument("--version", type=int, required=True, metavar="N",
                      help="the manifest's version (higher than the published one)")
    sign.add_argument("--agent-version", required=True, help="the Agent version it installs")
    sign.add_argument("--runtime-version", default=None,
                      help="the Runtime version (default: the agent version)")
    sign.add_argument("--expires-in", type=int, default=30, metavar="DAYS",
                      help="days until nodes stop accepting it (default 30)")
    sign.add_argument("--out", required=True, metavar="PATH", help="where to write it")
    now_arg(sign)
    sign.set_defaults(handler=_sign)

    publish = sub.add_parser("publish", help="upload a manifest and its artifacts",
                             description="Upload each artifact, then the signed manifest; "
                             "the Network checks hashes, sizes and signatures.")
    publish.add_argument("artifacts", nargs="*", metavar="FILE", help="the artifact files")
    publish.add_argument("--manifest", required=True, metavar="PATH")
    add_network_client_args(publish)
    publish.set_defaults(handler=_publish)

    root = sub.add_parser("publish-root", help="publish trust root N+1 to the nodes",
                          description="Upload a rotated trust root (see `resultity trust "
                          "rotate`); nodes apply it before newer snapshots and releases.")
    root.add_argument("root", metavar="TRUST", help="the new root (signed by old and new keys)")
    add_network_client_args(root)
    root.set_defaults(handler=_publish_root)

    nodes = sub.add_parser("nodes", help="show each node's version and last update outcome",
                           description="List what each node last reported: the release "
                           "version it runs and the outcome of its last update (or why it "
                           "refused one).")
    add_network_client_args(nodes)
    nodes.set_defaults(handler=_nodes)


def _build(args: argparse.Namespace) -> int:
    path = build_wheel(args.version, Path(args.out),
                       Path(args.source) if args.source else None)
    digest, size = _digest(path)
    print(f"built {path} ({size} bytes, {digest})")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from resultity_core import Artifact, Release, ResultityError, check_release, sign_envelope

    now = current_time(args)
    root = load_trust(args.trust, now)
    items = []
    for name in args.artifacts:
        path = Path(name)
        if not path.is_file():
            raise CLIError(f"artifact {path}: no such file")
        digest, size = _digest(path)
        items.append(Artifact(path.name, digest, size))
    try:
        release = Release(args.version, args.agent_version,
                          args.runtime_version or args.agent_version, tuple(items), now,
                          now + args.expires_in * _DAY)
        payload = release.to_payload()
        Release.from_payload(payload)
        envelope = sign_envelope(payload, load_keys(args.key))
        _, digest = check_release(envelope, root, now)
    except ResultityError as exc:
        raise CLIError(f"the release would be refused by nodes: {exc}") from None
    write_json_file(args.out, envelope.to_payload(), mode=0o644)
    print(f"wrote release v{release.version} to {args.out}; digest {digest}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from resultity_servers.network import publish_release, upload_artifact

    envelope = load_envelope_file(args.manifest, "release manifest")
    files = [Path(a) for a in args.artifacts]
    for path in files:
        if not path.is_file():
            raise CLIError(f"artifact {path}: no such file")

    async def call(client: Any) -> tuple[str, int]:
        for path in files:
            address = await upload_artifact(client, path.read_bytes())
            print(f"uploaded {path.name} ({address})")
        return await publish_release(client, envelope)

    digest, version = admin_call(args, call, timeout_s=_ADMIN_TIMEOUT_S)
    print(f"published release v{version} ({digest})")
    return 0


def _publish_root(args: argparse.Namespace) -> int:
    from resultity_servers.network import publish_root

    envelope = load_envelope_file(args.root, "trust root")

    async def call(client: Any) -> int:
        return await publish_root(client, envelope)

    version = admin_call(args, call, timeout_s=_ADMIN_TIMEOUT_S)
    print(f"published trust root v{version}")
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from resultity_servers.network import node_update_statuses

    rows = admin_call(args, node_update_statuses, timeout_s=_ADMIN_TIMEOUT_S)
    if not rows:
        print("no node has reported an update status yet")
    for row in rows:
        print(f"{str(row['node_id'])[:12]}  {row['version']}  {row['update_status']}")
    return 0
