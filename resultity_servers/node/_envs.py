"""Versioned Runtime environments beside the current one: ``DATA_DIR/runtimes/<version>/``.

An update installs the release's wheels into a new virtual environment (``venv/``) whose
``_resultity_base.pth`` adds the site-packages of the interpreter the Agent runs on, so the
heavy dependencies (torch, sentencepiece, ...) come from the base install while
``resultity`` itself comes from the new wheel (the environment's own site-packages is
searched first). ``pip install --no-deps --no-index`` installs only the given files: nothing
is downloaded. ``.installed`` is written last; a directory without it is removed and rebuilt.

``runtimes/current.json`` names the environment in use (``version``, ``python``,
``release``); ``build_agent`` starts Runtimes from it, and a node launcher may start the
Agent itself from it (``current_python``).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from ._errors import NodeError

__all__ = ["RuntimeEnvError", "current_python", "install_environment", "write_current"]

CURRENT = "current.json"
_MARKER = ".installed"


class RuntimeEnvError(NodeError):
    """A versioned environment could not be created, installed or verified."""


def _python(env_dir: Path) -> Path:
    return env_dir / "venv" / "bin" / "python"


def _base_paths() -> list[str]:
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return list(dict.fromkeys(paths))


def _run(argv: list[str], what: str, timeout_s: float) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                                                "PIP_NO_INPUT": "1"})
    except subprocess.TimeoutExpired:
        raise RuntimeEnvError(f"{what} took more than {timeout_s:g} s") from None
    except OSError as exc:
        raise RuntimeEnvError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeEnvError(f"{what} failed ({proc.returncode}): {tail}")
    return proc.stdout


def install_environment(runtimes_dir: Path, version: str, wheels: list[Path], *,
                        timeout_s: float = 300.0) -> Path:
    """Install ``wheels`` into ``runtimes_dir/<version>`` (reused when complete); returns its
    Python.

    Checks that the new interpreter imports ``resultity_servers`` from the new environment
    and that the installed ``resultity`` version is ``version``. Raises RuntimeEnvError.
    """
    target = runtimes_dir / version
    python = _python(target)
    if (target / _MARKER).is_file() and python.exists():
        return python
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(target / "venv")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeEnvError(f"cannot create the environment {target}: {exc}") from None
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "locating the new site-packages", 60).strip()
    Path(purelib, "_resultity_base.pth").write_text("\n".join(_base_paths()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--no-cache-dir", "-q", *[str(w) for w in wheels]],
         "pip install of the release", timeout_s)
    out = _run([str(python), "-I", "-c",
                "import importlib.metadata as m, resultity_servers as s; "
                "print(m.version('resultity')); print(s.__file__)"],
               "checking the new environment", 60).splitlines()
    if len(out) < 2 or out[0] != version:
        raise RuntimeEnvError(f"the new environment has resultity {out[:1]}, not {version}")
    if not Path(out[1]).resolve().is_relative_to(target.resolve()):
        raise RuntimeEnvError(f"the new environment imports resultity from {out[1]}")
    (target / _MARKER).write_text(version + "\n")
    return python


def write_current(runtimes_dir: Path, version: str, python: Path, release: int) -> None:
    """Record the environment in use (atomically)."""
    data = json.dumps({"version": version, "python": str(python), "release": release})
    tmp = runtimes_dir / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.write_text(data + "\n")
    os.replace(tmp, runtimes_dir / CURRENT)


def current_python(data_dir: Path) -> tuple[str, str] | None:
    """Return ``(version, python)`` of the environment in use under ``data_dir``, or None
    (no update installed yet, or its interpreter is gone)."""
    path = Path(data_dir) / "runtimes" / CURRENT
    try:
        data = json.loads(path.read_text())
        version, python = str(data["version"]), str(data["python"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (version, python) if os.path.exists(python) else None
