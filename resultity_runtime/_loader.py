"""Load a Hugging Face model directory: config.json, safetensors weights, tokenizer.

Every failure is a ModelLoadError naming the file and, where one is at fault, the tensor.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ._config import ModelConfig, load_config
from ._errors import ModelLoadError
from ._model import LlamaForCausalLM
from ._quant import QUANTIZATIONS, int4_available
from ._tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "LoadedModel",
    "check_quantization",
    "hf_tensor_shapes",
    "load_model",
    "load_weights",
    "resolve_dtype",
]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadedModel(NamedTuple):
    """What load_model returns: unpack as ``model, config, tokenizer = load_model(...)``."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer


def resolve_dtype(
    device: torch.device | str, dtype: torch.dtype | str | None, config: ModelConfig
) -> torch.dtype:
    """Return the dtype to run in: float32/bfloat16 on CPU, float16/bfloat16 on CUDA.

    ``None`` picks float32 on CPU and the checkpoint's half dtype (else bfloat16) on CUDA.
    Raises ValueError for an unsupported name or device/dtype pair (float16 on CPU).
    """
    dev = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype: unknown {dtype!r} (use one of {', '.join(_DTYPE_NAMES)})")
        dtype = _DTYPE_NAMES[dtype]
    if dev.type == "cpu":
        if dtype is None:
            return torch.float32
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: {dtype} is not supported on CPU (use float32 or bfloat16)")
        return dtype
    if dev.type == "cuda":
        if dtype is None:
            return torch.float16 if config.torch_dtype == "float16" else torch.bfloat16
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: {dtype} is not supported on CUDA (use float16 or bfloat16)")
        return dtype
    raise ValueError(f"device: unsupported device type {dev.type!r} (use cpu or cuda)")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_quantization(
    quantization: str | None, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Raise ValueError naming ``quantization`` when it is unknown or cannot run on this
    device, dtype or torch build (int4: CPU, bfloat16, torch's CPU int4 kernel)."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: unknown {quantization!r} (use one of "
                         f"{', '.join(QUANTIZATIONS)}, or none)")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantization: {quantization} runs on CPU only "
                         f"(on {torch.device(device).type} use float16 or bfloat16)")
    if dtype != torch.bfloat16:
        raise ValueError(f"quantization: {quantization} needs dtype bfloat16 (the kernel's "
                         f"activations), got {dtype}")
    if not int4_available():
        raise ValueError(f"quantization: this torch build ({torch.__version__}) has no working "
                         f"CPU int4 kernel")


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Return every Hugging Face tensor name the checkpoint must hold, with its shape."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{name}.weight"] = (rows, h)
            if config.qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / _INDEX
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(_INDEX, f"cannot read: {exc}") from None
        wm = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ModelLoadError(_INDEX, "must hold an object of tensor name -> file",
                                 field="weight_map")
        for file in sorted(set(wm.values())):
            if "/" in file or "\\" in file or file.startswith("."):
                raise ModelLoadError(_INDEX, f"refusing file name {file!r}", field="weight_map")
        return dict(wm)
    if not (model_dir / _SINGLE).is_file():
        raise ModelLoadError(_SINGLE, f"no such file (nor {_INDEX}) in {model_dir}")
    return {}


def _open(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(path.name, f"no such file in {path.parent}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(path.name, f"corrupt or truncated safetensors file: {exc}") from None


def _reader(model_dir: Path) -> Callable[[str, tuple[int, ...]], Tensor]:
    """Return get(name, expected_shape) reading tensors across one file or a sharded set."""
    weight_map = _weight_map(model_dir)
    handles: dict[str, Any] = {}

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        file = weight_map.get(name, _SINGLE) if weight_map else _SINGLE
        if weight_map and name not in weight_map:
            raise ModelLoadError(_INDEX, "missing tensor", field=name)
        if file not in handles:
            handles[file] = _open(model_dir / file)
        handle = handles[file]
        if name not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise ModelLoadError(file, "missing tensor", field=name)
        try:
            got = tuple(handle.get_slice(name).get_shape())
            if got != shape:
                raise ModelLoadError(file, f"unexpected shape: expected {list(shape)}, "
                                           f"got {list(got)}", field=name)
            tensor: Tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(file, f"cannot read tensor: {exc}", field=name) from None
        if not tensor.is_floating_point():
            raise ModelLoadError(file, f"expected a floating-point tensor, got {tensor.dtype}",
                                 field=name)
        return tensor

    return get


def load_weights(
    model_dir: str | Path,
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    prepack: bool = True,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    """Return the model with its weights read from the directory's safetensors files.

    q/k/v and gate/up are concatenated into the fused projections; with ``quantization``
    "int4" (bfloat16 on CPU) the projections are quantized to 4 bits in groups of 32
    (``LlamaForCausalLM.quantize_cpu_weights``); with ``prepack``, a float32 or bfloat16
    model on CPU gets oneDNN-prepacked copies of its (other) projections
    (``LlamaForCausalLM.prepack_cpu_weights``: faster steps, twice the projection memory).
    Raises ModelLoadError naming the file and tensor (missing file or tensor, unexpected
    shape, corrupt file); ValueError for a quantization this device or dtype cannot run.
    """
    check_quantization(quantization, device, dtype)
    get = _reader(Path(model_dir))
    shapes = hf_tensor_shapes(config)

    def t(name: str) -> Tensor:
        return get(name, shapes[name]).to(dtype)

    state: dict[str, Tensor] = {"embed_tokens.weight": t("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        mine = f"layers.{i}."
        state[mine + "input_layernorm.weight"] = t(p + "input_layernorm.weight")
        state[mine + "post_attention_layernorm.weight"] = t(p + "post_attention_layernorm.weight")
        state[mine + "qkv_proj.weight"] = torch.cat(
            [t(a + "q_proj.weight"), t(a + "k_proj.weight"), t(a + "v_proj.weight")])
        if config.qkv_bias:
            state[mine + "qkv_proj.bias"] = torch.cat(
                [t(a + "q_proj.bias"), t(a + "k_proj.bias"), t(a + "v_proj.bias")])
        state[mine + "o_proj.weight"] = t(a + "o_proj.weight")
        if config.o_bias:
            state[mine + "o_proj.bias"] = t(a + "o_proj.bias")
        state[mine + "gate_up_proj.weight"] = torch.cat(
            [t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")])
        state[mine + "down_proj.weight"] = t(p + "mlp.down_proj.weight")
    state["norm.weight"] = t("model.norm.weight")
    state["lm_head.weight"] = (state["embed_tokens.weight"] if config.tie_word_embeddings
                               else t("lm_head.weight"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.requires_grad_(False)
    model = model.to(device).eval()
    if quantization == "int4":
        model.quantize_cpu_weights(group_size=32)
    if prepack:
        model.prepack_cpu_weights(float32=True)
    return model


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    prepack: bool = True,
    quantization: str | None = None,
) -> LoadedModel:
    """Return (model, config, tokenizer) loaded from a Hugging Face model directory.

    ``dtype`` follows resolve_dtype, except that ``quantization="int4"`` (CPU only) picks
    bfloat16 when ``dtype`` is None; ``prepack`` and ``quantization`` as in load_weights.
    Raises ModelLoadError naming the file (and tensor or field) for a bad directory,
    ValueError for an unsupported device/dtype/quantization.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(str(path), "not a directory")
    config = load_config(path)
    if quantization is not None and dtype is None:
        dtype = torch.bfloat16
    run_dtype = resolve_dtype(device, dtype, config)
    tokenizer = load_tokenizer(path, config)
    model = load_weights(path, config, device, run_dtype, prepack=prepack,
                         quantization=quantization)
    if quantization is not None:
        _release_free_heap()  # the float32 temporaries of quantization: ~100 MB on `small`
    return LoadedModel(model, config, tokenizer)
