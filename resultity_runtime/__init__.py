"""resultity_runtime: the PyTorch inference engine (the Runtime role).

Names are exported lazily (PEP 562), so importing a torch-free submodule such as
``resultity_runtime._scheduler`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ChatTemplateError",
    "CompletionOutput",
    "Engine",
    "EngineRequestError",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "RuntimeEngineError",
    "SamplingParams",
    "StreamDelta",
    "TokenLogprobs",
    "Tokenizer",
    "Usage",
    "init_model_dir",
    "load_model",
]

_WHERE = {
    "ChatTemplateError": "_errors",
    "CompletionOutput": "_outputs",
    "Engine": "_engine",
    "EngineRequestError": "_engine",
    "ModelConfig": "_config",
    "ModelLoadError": "_errors",
    "RequestOutput": "_outputs",
    "RuntimeEngineError": "_errors",
    "SamplingParams": "_sampling",
    "StreamDelta": "_outputs",
    "Tokenizer": "_tokenizer",
    "TokenLogprobs": "_sampling",
    "Usage": "_outputs",
    "init_model_dir": "_presets",
    "load_model": "_loader",
}

if TYPE_CHECKING:
    from ._config import ModelConfig
    from ._engine import Engine, EngineRequestError
    from ._errors import ChatTemplateError, ModelLoadError, RuntimeEngineError
    from ._loader import load_model
    from ._outputs import CompletionOutput, RequestOutput, StreamDelta, Usage
    from ._presets import init_model_dir
    from ._sampling import SamplingParams, TokenLogprobs
    from ._tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'resultity_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
