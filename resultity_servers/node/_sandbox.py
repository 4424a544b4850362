"""The Runtime's confinement: what the child applies to itself, and the environment it gets.

What it does (Linux; each step best effort and reported in the ``ready`` frame):

* resource limits (``setrlimit``): open files, address space, CPU seconds, file size; no core
  dumps (a core file could hold prompts);
* ``PR_SET_NO_NEW_PRIVS`` (no setuid escalation) and ``PR_SET_PDEATHSIG`` (the child dies with
  the Agent, never orphaned);
* an empty network namespace (``unshare(CLONE_NEWNET)``, inside a new user namespace when not
  root): the Runtime cannot open any network connection, loopback included;
* a cleared environment (``runtime_env``): no inherited secrets, HOME and TMPDIR in its private
  working directory, thread counts set; umask 077.

What it does not do: it is no filesystem jail (the child can read what the Agent's user can,
the node key file included unless it is kept out of reach by ownership; run the Runtime as
another user or in a container in production), and it filters no system calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs

__all__ = ["SandboxLimits", "confine", "package_version", "runtime_env"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_SIGKILL = 9


@attrs.frozen
class SandboxLimits:
    """Limits for the Runtime child; 0 means no limit for the byte and second counts."""

    max_open_files: int = 256
    max_address_space: int = 0
    max_cpu_seconds: int = 0
    max_file_size: int = 0
    network_namespace: bool = True

    def to_args(self) -> list[str]:
        """Return the ``_runtime_main`` command-line options for these limits."""
        out = [
            f"--max-open-files={self.max_open_files}",
            f"--max-address-space={self.max_address_space}",
            f"--max-cpu-seconds={self.max_cpu_seconds}",
            f"--max-file-size={self.max_file_size}",
        ]
        if not self.network_namespace:
            out.append("--no-network-namespace")
        return out


def package_version() -> str:
    """Return the installed ``resultity`` version ("0+unknown" when not installed)."""
    try:
        return metadata.version("resultity")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _limit(kind: int, value: int) -> bool:
    try:
        _soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        return False
    return True


def _unshare_network() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if os.geteuid() == 0 and libc.unshare(_CLONE_NEWNET) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    # Map our own ids into the new user namespace so that files keep their owner.
    with contextlib.suppress(OSError):
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return True


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return bool(libc.prctl(option, value, 0, 0, 0) == 0)


def confine(limits: SandboxLimits) -> dict[str, Any]:
    """Apply ``limits`` to the current process; return what took effect (JSON object).

    Must run first in the child, while it has one thread (a user namespace needs that).
    Never raises: each step that fails is reported as False.
    """
    os.umask(0o077)
    report: dict[str, Any] = {
        "no_new_privs": _prctl(_PR_SET_NO_NEW_PRIVS, 1),
        "parent_death_signal": _prctl(_PR_SET_PDEATHSIG, _SIGKILL),
        "core_dumps": not _limit(resource.RLIMIT_CORE, 0),
        "max_open_files": limits.max_open_files if _limit(
            resource.RLIMIT_NOFILE, limits.max_open_files) else 0,
    }
    for key, kind, value in (
        ("max_address_space", resource.RLIMIT_AS, limits.max_address_space),
        ("max_cpu_seconds", resource.RLIMIT_CPU, limits.max_cpu_seconds),
        ("max_file_size", resource.RLIMIT_FSIZE, limits.max_file_size),
    ):
        report[key] = value if value > 0 and _limit(kind, value) else 0
    report["network_namespace"] = limits.network_namespace and _unshare_network()
    return report


def _import_roots() -> list[str]:
    """Return the directories holding the resultity packages (so the child imports them)."""
    import resultity_core
    import resultity_servers

    roots: list[str] = []
    for module in (resultity_servers, resultity_core):
        root = str(Path(module.__file__ or ".").resolve().parent.parent)
        if root not in roots:
            roots.append(root)
    return roots


def runtime_env(
    workdir: Path, *, threads: int = 0, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the cleared environment of a Runtime child working in ``workdir``.

    Only PATH, PYTHONPATH (the directories of the resultity packages), HOME and TMPDIR (in
    ``workdir``), locale, and thread settings when ``threads > 0``; ``extra`` is added last
    (tests and operators: for example ``TRITON_INTERPRET``).
    """
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {
        "PATH": os.defpath,
        "PYTHONPATH": os.pathsep.join(_import_roots()),
        "HOME": str(workdir),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if threads > 0:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    env.update(extra or {})
    return env
