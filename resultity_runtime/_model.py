"""A Llama-family decoder (Llama, Mistral, Qwen2) over a flattened batch and a paged KV cache.

Weights are fused at load time: ``qkv_proj`` is q, k and v stacked, ``gate_up_proj`` is gate
and up stacked, so each layer runs three large matmuls and one attention call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._attention import AttentionBackend, AttentionMetadata
from ._config import ModelConfig
from ._quant import Int4Weight, int4_eligible, quantize_int4

__all__ = ["KVCache", "LlamaForCausalLM", "rope_inv_freq"]

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Return the float32 RoPE inverse frequencies ``[D/2]``, Llama-3 scaled when configured.

    Computed exactly as transformers does, so positions rotate bit-identically.
    """
    d = config.head_dim
    inv = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").to(torch.float32) / d)
    )
    rs = config.rope_scaling
    if rs is None:
        return inv
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _can_prepack(dtype: torch.dtype) -> bool:
    try:
        w = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(w, packed, None, "none", [], "")
        return bool((out == 8).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Linear(nn.Linear):
    """nn.Linear that can run from a oneDNN-prepacked copy of its weight (CPU).

    The packed copy serves inputs of at least ``packed_min_rows`` rows; smaller ones use the
    dense weight (float32: a single row runs faster as MKL's GEMV on the dense weight).
    """

    packed: Tensor | None = None
    packed_min_rows: int = 1
    int4: Int4Weight | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.int4 is not None:  # the kernels take [rows, in] contiguous
            rows = self.int4.matmul(x.reshape(-1, x.shape[-1]).contiguous())
            rows = rows.view(*x.shape[:-1], rows.shape[-1])
            return rows if self.bias is None else rows.add_(self.bias)
        if self.packed is not None and x.numel() >= self.packed_min_rows * x.shape[-1]:
            out: Tensor = _linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)


_linear_pointwise: Any = None  # torch built without oneDNN: weights are never packed then
# resolved once: the overload packet's lookup costs microseconds per call
with contextlib.suppress(AttributeError, RuntimeError):
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise.default


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalised in float32 (torch upcasts half inputs inside rms_norm), then scaled;
        # in bfloat16 the result is rounded once where transformers rounds before the scale
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [N, H, D]; cos/sin: [N, 1, D]; neox layout (halves), as transformers' rotate_half
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _signed_sin(sin: Tensor) -> Tensor:
    """Return sin with its first half negated, for ``_rotate_signed``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate_signed(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    # _rotate in three ops: swapping x's halves (flip of a [.., 2, D/2] view) and the sign
    # folded into signed_sin give cat(-x2, x1) * sin
    n, h, d = x.shape
    swapped = x.reshape(n, h, 2, d // 2).flip(2).view(n, h, d)
    return torch.addcmul(x * cos, swapped, signed_sin)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.hq, self.hkv, self.d = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = d**-0.5
        self.inter = config.intermediate_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.qkv_proj = Linear(h, (self.hq + 2 * self.hkv) * d, bias=config.qkv_bias)
        self.o_proj = Linear(self.hq * d, h, bias=config.o_bias)
        self.gate_up_proj = Linear(h, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, h, bias=False)

    def forward(  # noqa: PLR0917
        self,
        x: Tensor,  # [N, H]
        cos: Tensor,  # [N, 1, D]
        sin: Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:  # [N, H]
        # sin comes sign-folded (``_signed_sin``). x is updated in place (the residual stream
        # belongs to the forward pass): fewer ops and allocations per layer
        # Submodules are called through .forward: no hooks are used, and nn.Module.__call__
        # costs more than the small ops of a decode step
        n, hq, hkv, d = x.shape[0], self.hq, self.hkv, self.d
        qkv = self.qkv_proj.forward(self.input_layernorm.forward(x))  # [N, (Hq + 2Hkv) * D]
        qk = _rotate_signed(qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d), cos, sin)
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
        o = backend.forward(qk[:, :hq], qk[:, hq:], v, kv_cache[0], kv_cache[1], meta,
                            self.scale)  # [N, Hq, D]
        x.add_(self.o_proj.forward(o.reshape(n, hq * d)))
        gate_up = self.gate_up_proj.forward(self.post_attention_layernorm.forward(x))
        gate = F.silu(gate_up[:, : self.inter])
        return x.add_(self.down_proj.forward(gate.mul_(gate_up[:, self.inter :])))


class LlamaForCausalLM(nn.Module):
    """The decoder: ``forward`` returns final-normed hidden states, ``compute_logits`` logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain attribute, not a buffer: it must stay float32 whatever the model dtype
        self._inv_freq = rope_inv_freq(config)

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config ties them (after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def prepack_cpu_weights(self, float32: bool = False) -> bool:
        """Prepack every projection for oneDNN when the model is on CPU.

        bfloat16: every matmul then skips the per-call weight reordering (about 30% faster
        decode on CPUs with AVX512-BF16/AMX). float32, only with ``float32=True``: steps of 3
        or more rows run from the packed copy (a 16-row step about 1.6x faster than MKL's
        sgemm), single rows keep MKL's GEMV. The dense weights stay (state_dict, tied
        embedding), so the projections take twice the memory. Returns whether the weights
        were packed.
        """
        weight = self.embed_tokens.weight
        dtype = weight.dtype
        if weight.device.type != "cpu" or _linear_pointwise is None:
            return False
        if not (dtype == torch.bfloat16 or (float32 and dtype == torch.float32)):
            return False
        if not _can_prepack(dtype):
            return False
        # the batch-size hint picks oneDNN's layout: 1 suits bfloat16 decode best, 16 float32
        hint, min_rows = (16, 3) if dtype == torch.float32 else (1, 1)
        for module in self.modules():
            if isinstance(module, Linear) and module.int4 is None:
                w = module.weight.detach()
                module.packed = torch.ops.mkldnn._reorder_linear_weight(w, hint)
                module.packed_min_rows = min_rows
        return True

    def quantize_cpu_weights(self, group_size: int = 32) -> int:
        """Replace every projection that fits the kernel by its 4-bit form (``_quant``).

        The model must be bfloat16 on CPU (the kernel's activations). Projections whose shape
        does not fit (rows not a multiple of 16, columns not a multiple of ``group_size``)
        keep their dense weight. The dense weights of quantized projections are released,
        except lm_head's when it is the (tied) embedding. Returns how many were quantized.
        Raises ValueError for another dtype or device.
        """
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            raise ValueError(f"quantization: int4 runs on CPU in bfloat16, the model is "
                             f"{weight.dtype} on {weight.device.type}")
        count = 0
        for module in self.modules():
            if not isinstance(module, Linear):
                continue
            if not int4_eligible(module.out_features, module.in_features, group_size):
                continue
            module.int4 = quantize_int4(module.weight, group_size)
            module.packed = None
            if module.weight is not weight:
                module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
            count += 1
        return count

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Return (cos, sin) ``[N, 1, D]`` in ``dtype`` for int64 positions ``[N]``."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: Tensor,  # int64 [N]
        positions: Tensor,  # int64 [N]
        kv_caches: Sequence[KVCache],  # one (k, v) per layer
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:  # [N, H], final norm applied
        """Run every layer over the N new tokens, writing their k/v into ``kv_caches``."""
        x = self.embed_tokens(input_ids)  # [N, H], a fresh tensor: the layers add in place
        cos, sin = self.rope(positions, x.dtype)
        sin = _signed_sin(sin)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, cos, sin, kv, meta, backend)
        out: Tensor = self.norm(x)
        return out

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Return float32 logits ``[M, vocab]`` for hidden states ``[M, H]``."""
        logits: Tensor = self.lm_head(hidden)
        return logits.float()
