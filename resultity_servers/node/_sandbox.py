"""The Runtime's confinement: what the child applies to itself, and the environment it gets.

What it does (Linux; each step best effort and reported in the ``ready`` frame):

* resource limits (``setrlimit``): open files, address space, CPU seconds, file size; no core
  dumps (a core file could hold prompts);
* ``PR_SET_NO_NEW_PRIVS`` (no setuid escalation) and ``PR_SET_PDEATHSIG`` (the child dies with
  the Agent, never orphaned);
* an empty network namespace (``unshare(CLONE_NEWNET)``, inside a new user namespace when not
  root): the Runtime cannot open any network connection, loopback included;
* a private mount namespace in which the Agent's data directory is read-only (but for the
  Runtime's working directory) and its key and grant are covered by /dev/null: the Runtime
  holds no key material and cannot change the installed models or the trust state, though it
  runs as the same user;
* a cleared environment (``runtime_env``): no inherited secrets, HOME and TMPDIR in its private
  working directory, thread counts set; umask 077.

What it does not do: it is no filesystem jail (outside those paths the child can read and
write what the Agent's user can; run the Runtime as another user or in a container in
production), and it filters no system calls.
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
_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_REMOUNT = 32


@attrs.frozen
class SandboxLimits:
    """Limits for the Runtime child; 0 means no limit for the byte and second counts.

    In the child's private mount namespace (absolute paths): ``readonly_paths`` become
    read-only, ``writable_paths`` (inside them) stay writable, ``hidden_paths`` unreadable.
    The Agent makes its data directory read-only except the Runtime's working directory, and
    hides its key and grant.
    """

    max_open_files: int = 256
    max_address_space: int = 0
    max_cpu_seconds: int = 0
    max_file_size: int = 0
    network_namespace: bool = True
    readonly_paths: tuple[str, ...] = ()
    writable_paths: tuple[str, ...] = ()
    hidden_paths: tuple[str, ...] = ()

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
        out.extend(f"--readonly={path}" for path in self.readonly_paths)
        out.extend(f"--writable={path}" for path in self.writable_paths)
        out.extend(f"--hide={path}" for path in self.hidden_paths)
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


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _unshare(flags: int) -> bool:
    """Enter new namespaces (``flags``), inside a new user namespace when not root."""
    libc = _libc()
    if libc is None or not flags:
        return False
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | flags) != 0:
        return False
    # Map our own ids into the new user namespace so that files keep their owner.
    with contextlib.suppress(OSError):
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return True


def _mount_all(limits: SandboxLimits) -> dict[str, list[str]]:
    """In the (new, private) mount namespace: bind ``readonly_paths`` read-only, then
    ``writable_paths`` writable again inside them, then cover ``hidden_paths`` (a file with
    /dev/null, a directory with an empty tmpfs). Returns the paths each step applied to."""
    done: dict[str, list[str]] = {"readonly_paths": [], "writable_paths": [],
                                  "hidden_paths": []}
    libc = _libc()
    if libc is None:
        return done
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                      ctypes.c_char_p]
    if mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return done

    def rebind(path: str, flags: int) -> bool:
        target = os.fsencode(path)
        return (os.path.exists(path)
                and mount(target, target, None, _MS_BIND | _MS_REC, None) == 0
                and mount(None, target, None, _MS_REMOUNT | _MS_BIND | flags, None) == 0)

    for path in limits.readonly_paths:
        if rebind(path, _MS_RDONLY):
            done["readonly_paths"].append(path)
    for path in limits.writable_paths:
        if rebind(path, 0):
            done["writable_paths"].append(path)
    for path in limits.hidden_paths:
        target = os.fsencode(path)
        if os.path.isdir(path):
            ok = mount(b"tmpfs", target, b"tmpfs", _MS_RDONLY, b"size=4k,mode=000") == 0
        else:
            ok = os.path.exists(path) and mount(b"/dev/null", target, None, _MS_BIND,
                                                None) == 0
        if ok:
            done["hidden_paths"].append(path)
    return done


def _prctl(option: int, value: int) -> bool:
    libc = _libc()
    return libc is not None and bool(libc.prctl(option, value, 0, 0, 0) == 0)


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
    mounts = bool(limits.readonly_paths or limits.hidden_paths)
    flags = (_CLONE_NEWNET if limits.network_namespace else 0) | (_CLONE_NEWNS if mounts else 0)
    entered = _unshare(flags)
    report["network_namespace"] = limits.network_namespace and entered
    report.update(_mount_all(limits) if entered and mounts else {
        "readonly_paths": [], "writable_paths": [], "hidden_paths": []})
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
