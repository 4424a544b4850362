"""The error family of resultity_runtime: one base class, each subclass named for what went wrong.

Other runtime modules append their errors here, below the model-loading section.
"""

from __future__ import annotations

from resultity_core import ResultityError

__all__ = ["ChatTemplateError", "ModelLoadError", "RuntimeEngineError"]


class RuntimeEngineError(ResultityError):
    """Base of every error raised by resultity_runtime."""


# --- model loading (resultity_runtime._config, _loader, _tokenizer, _presets) ---------------


class ModelLoadError(RuntimeEngineError):
    """A model directory cannot be loaded.

    ``file`` names the offending file (``config.json``, ``model-00001-of-00002.safetensors``),
    ``field`` the config field or tensor name when one is at fault (else ``None``), and
    ``reason`` says what is wrong with it.
    """

    def __init__(self, file: str, reason: str, field: str | None = None) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {reason}")


class ChatTemplateError(RuntimeEngineError, ValueError):
    """The chat template cannot be rendered (no template, bad syntax, or raise_exception)."""
