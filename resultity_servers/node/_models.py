"""Installing approved models: sources, hash-and-size checks, and the install directory.

A ``ModelSource`` opens the files of a ``ModelEntry`` (``LocalDirectorySource`` reads
``<models_dir>/<name>/<version>/<path>``, or ``<models_dir>/<name>/<path>``; a network
source can be added behind the same interface). ``install_model``
copies each file into a staging directory while hashing it, refuses a file whose size or
sha256 is not the one the signed NodeConfig names, and only then renames the staging directory
into ``<install_dir>/<name>/<version>``: the Runtime never sees an unchecked byte. A marker file
remembers the verified entry so a restart does not hash again. Blocking (run it in a thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from resultity_core import ModelEntry, ModelFile, Price, canonical_digest

from ._errors import ModelInstallError

__all__ = [
    "LocalDirectorySource",
    "ModelSource",
    "Progress",
    "install_model",
    "installed_path",
    "model_entry_for_dir",
]

# (model name, file path, bytes hashed so far, file size)
Progress = Callable[[str, str, int, int], None]
_CHUNK = 1 << 20
_MARKER = ".resultity-model.json"


class ModelSource(Protocol):
    """Where approved model files come from."""

    def open(self, entry: ModelEntry, file: ModelFile) -> BinaryIO:
        """Return the file opened for binary reading; raises ModelInstallError if absent."""
        ...


def _safe_name(name: str) -> str:
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ModelInstallError(f"model name {name!r} cannot name a directory")
    return "--".join(parts)


class LocalDirectorySource:
    """Model files from a local directory, looked up by model name and version."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)

    def candidates(self, entry: ModelEntry) -> list[Path]:
        """Return the directories searched for ``entry``, in order: ``<name>/<version>``,
        ``<name>`` (a name ``org/model`` as nested directories, then as ``org--model``)."""
        flat = self.models_dir / _safe_name(entry.name)
        nested = self.models_dir.joinpath(*entry.name.split("/"))
        out: list[Path] = []
        for base in (nested, flat):
            for path in (base / entry.version, base):
                if path not in out:
                    out.append(path)
        return out

    def open(self, entry: ModelEntry, file: ModelFile) -> BinaryIO:
        """See ModelSource."""
        for root in self.candidates(entry):
            path = root / file.path
            if path.is_file():
                return path.open("rb")
        raise ModelInstallError(
            f"model {entry.name} {entry.version}: {file.path} not found under "
            f"{self.models_dir}"
        )


def installed_path(install_dir: Path, entry: ModelEntry) -> Path:
    """Return where ``entry`` is (or will be) installed."""
    return Path(install_dir) / _safe_name(entry.name) / entry.version


def _entry_digest(entry: ModelEntry) -> str:
    return canonical_digest(entry.to_payload())


def _already_installed(final: Path, entry: ModelEntry) -> bool:
    marker = final / _MARKER
    try:
        if marker.read_text().strip() != _entry_digest(entry):
            return False
    except OSError:
        return False
    return all((final / f.path).is_file() and (final / f.path).stat().st_size == f.size
               for f in entry.files)


def _copy_checked(entry: ModelEntry, file: ModelFile, src: BinaryIO, dest: Path,
                  progress: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done = 0
    with src, dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            done += len(chunk)
            if done > file.size:
                raise ModelInstallError(
                    f"model {entry.name} {entry.version}: {file.path} is larger than the "
                    f"{file.size} bytes the config names"
                )
            digest.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(entry.name, file.path, done, file.size)
        out.flush()
        os.fsync(out.fileno())
    if done != file.size:
        raise ModelInstallError(
            f"model {entry.name} {entry.version}: {file.path} has {done} bytes, the config "
            f"names {file.size}"
        )
    actual = "sha256:" + digest.hexdigest()
    if actual != file.sha256:
        raise ModelInstallError(
            f"model {entry.name} {entry.version}: {file.path} sha256 {actual} is not the "
            f"approved {file.sha256}"
        )
    if progress is not None and file.size == 0:
        progress(entry.name, file.path, 0, 0)


def install_model(
    entry: ModelEntry, source: ModelSource, install_dir: Path, *,
    progress: Progress | None = None,
) -> Path:
    """Install ``entry`` from ``source`` under ``install_dir``; return the model directory.

    Every file is copied while hashed and must match the entry's size and sha256; on any
    mismatch nothing is installed (a previous install of the same version is kept). Raises
    ModelInstallError naming the model and file.
    """
    final = installed_path(install_dir, entry)
    if _already_installed(final, entry):
        return final
    staging = final.parent / f".staging-{entry.version}-{os.getpid()}"
    try:
        final.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        for file in entry.files:
            _copy_checked(entry, file, source.open(entry, file), staging / file.path, progress)
        (staging / _MARKER).write_text(_entry_digest(entry) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except OSError as exc:
        raise ModelInstallError(f"model {entry.name} {entry.version}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return final


def model_entry_for_dir(
    path: Path, name: str, version: str, price: Price, *, progress: Progress | None = None
) -> ModelEntry:
    """Return a ModelEntry listing every file under ``path`` with its sha256 and size.

    For operators and the demo: what a NodeConfig approves for a local model directory.
    Raises OSError when the directory cannot be read.
    """
    files = []
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest = hashlib.sha256()
        size = 0
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(name, rel, size, file.stat().st_size)
        files.append(ModelFile(rel, "sha256:" + digest.hexdigest(), size))
    return ModelEntry(name, version, tuple(files), price)
