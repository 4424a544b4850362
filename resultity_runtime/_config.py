"""ModelConfig: the architecture of a Llama-family model, parsed from a Hugging Face config.json.

Both the transformers 4 spelling (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and the
transformers 5 spelling (``rope_parameters``, ``dtype``) are accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._errors import ModelLoadError

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeScaling", "load_config", "parse_config"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_CONFIG = "config.json"
_DTYPES = ("float32", "float16", "bfloat16")


@attrs.frozen
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@attrs.frozen
class ModelConfig:
    """The fields of config.json the runtime uses; ``eos_token_ids`` is always a tuple."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: always; Llama/Mistral: attention_bias
    o_bias: bool  # Llama/Mistral attention_bias only
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    sliding_window: int | None = None

    @property
    def num_params(self) -> int:
        """Return the number of parameters of the model (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h


def _err(field: str, reason: str) -> ModelLoadError:
    return ModelLoadError(_CONFIG, reason, field=field)


def _int(raw: Mapping[str, Any], name: str, default: int | None = None, minimum: int = 1) -> int:
    value = raw.get(name)
    value = default if value is None else value  # configs write null for "use the default"
    if value is None:
        raise _err(name, "missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise _err(name, f"must be >= {minimum}, got {value}")
    return value


def _float(raw: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = raw.get(name)
    value = default if value is None else value
    if value is None:
        raise _err(name, "missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _err(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise _err(name, f"must be a positive finite number, got {value!r}")
    return float(value)


def _bool(raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name)
    value = default if value is None else value
    if not isinstance(value, bool):
        raise _err(name, f"must be true or false, got {value!r}")
    return value


def _optional_id(raw: Mapping[str, Any], name: str) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _err(name, f"must be a non-negative integer or null, got {value!r}")
    return value


def _eos_ids(raw: Mapping[str, Any]) -> tuple[int, ...]:
    value = raw.get("eos_token_id")
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise _err("eos_token_id", f"must be an integer or a list of integers, got {value!r}")
    return tuple(items)


def _rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise _err("rope_parameters", f"must be an object, got {params!r}")
    if params is not None and "rope_theta" in params:
        theta = _float(params, "rope_theta")
        scaling: Any = params
        field = "rope_parameters"
    else:
        theta = _float(raw, "rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
        field = "rope_scaling"
    if scaling is None:
        return theta, None
    if not isinstance(scaling, Mapping):
        raise _err(field, f"must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise _err(f"{field}.rope_type", f"unsupported RoPE scaling {kind!r} (supported: llama3)")
    try:
        rs = RopeScaling(
            factor=_float(scaling, "factor"),
            low_freq_factor=_float(scaling, "low_freq_factor"),
            high_freq_factor=_float(scaling, "high_freq_factor"),
            original_max_position_embeddings=_int(scaling, "original_max_position_embeddings"),
        )
    except ModelLoadError as exc:
        raise _err(f"{field}.{exc.field}", exc.reason) from None
    if rs.high_freq_factor <= rs.low_freq_factor:
        raise _err(f"{field}.high_freq_factor", "must be greater than low_freq_factor")
    return theta, rs


def parse_config(raw: Any) -> ModelConfig:
    """Return the ModelConfig of a parsed config.json object.

    Raises ModelLoadError naming config.json and the first missing or invalid field, or the
    architecture when it is not one of SUPPORTED_ARCHITECTURES.
    """
    if not isinstance(raw, Mapping):
        raise ModelLoadError(_CONFIG, "must be a JSON object")
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise _err("architectures", f"must be a non-empty list of names, got {archs!r}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _err(
            "architectures",
            f"unknown architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise _err("hidden_act", f"unsupported activation {act!r} (supported: silu)")
    if raw.get("mlp_bias", False) is not False:
        raise _err("mlp_bias", "MLP biases are not supported")
    if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window", False):
        raise _err("use_sliding_window", "sliding-window attention is not supported")
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise _err(
            "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    if raw.get("head_dim") is None and hidden % heads:
        raise _err("num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
    head_dim = _int(raw, "head_dim", hidden // heads)
    if head_dim % 2:
        raise _err("head_dim", f"must be even for RoPE, got {head_dim}")
    theta, scaling = _rope(raw)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise _err("torch_dtype", f"unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
    sliding = raw.get("sliding_window")
    if sliding is not None and (isinstance(sliding, bool) or not isinstance(sliding, int)):
        raise _err("sliding_window", f"must be an integer or null, got {sliding!r}")
    attention_bias = _bool(raw, "attention_bias", False)
    is_qwen2 = arch == "Qwen2ForCausalLM"
    return ModelConfig(
        architecture=arch,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=(not is_qwen2) and attention_bias,
        bos_token_id=_optional_id(raw, "bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        torch_dtype=dtype,
        sliding_window=sliding if not is_qwen2 else None,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and parse ``model_dir/config.json``; raise ModelLoadError naming the file/field."""
    path = Path(model_dir) / _CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(_CONFIG, f"no such file in {Path(model_dir)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(_CONFIG, f"cannot read {path}: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            _CONFIG, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return parse_config(raw)
